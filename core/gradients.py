"""The gradient core: ComfyUI's model under autograd, on a clone, outside inference mode.

One owner for what null-text inversion (gradients w.r.t. a text context), drag editing (w.r.t. a
latent) and training (w.r.t. LoRA / embedding parameters) need. Three obstacles stand in the way
(comfy-integration §2.8), one helper each:
  1. ComfyUI runs every node under torch.inference_mode(): `autograd()` leaves it and enables grad.
  2. Tensors made in a node are inference tensors: `leaf(t)` is a normal copy that can require grad.
  3. Loaded weights are inference tensors, which autograd cannot save for backward: `gradient_clone`
     is a clone whose diffusion-model weights pass through `GradWeight` (a normal copy of an
     inference weight, made only while a gradient is being recorded): as a weight wrapper on every
     weight ComfyUI casts, through a per-clone module copy for the few read directly (Flux's RMSNorm
     scales). The user's model is untouched.
`run_with_gradients` runs a program inside CFGGuider.sample (models loaded, conditioning processed as
the sampler processes it, wrappers and patches active) and hands it a `GradientEnv`, whose `denoise`
returns a `Prediction`: x0, eps, velocity and the network's own output, all from the model's
model_sampling (EPS, v-prediction and flow alike) and differentiable.
"""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import denoiser
from .introspect import _base, architecture
from .patches import SharedPatch


class GradWeight(SharedPatch):
    """Weight wrapper: the weight as autograd may use it, at no cost when no gradient is recorded.

    An inference weight becomes a normal copy (autograd cannot save inference tensors); a weight that
    carries a graph back to the user's model (ComfyUI's cast copies a parameter that requires grad, as
    models built outside inference mode have) is detached, so no `.grad` lands on the user's weights.
    Wrappers added to the clone after this one (a trainable LoRA) keep their graphs; ComfyUI >= 0.3.7x
    already copies a weight before its wrappers run, so usually nothing is copied here.
    """

    def __call__(self, w):
        if not torch.is_grad_enabled():
            return w
        if w.is_inference():
            return w.detach().clone()
        return w.detach() if w.requires_grad else w


class _GradParams(dict):
    """A module's parameter table that hands out GradWeight's view of each parameter (for parameters a
    module reads directly, outside ComfyUI's cast path and so outside weight wrappers: Flux's RMSNorm
    scales). dict.items() and assignment still see the stored parameters, so loading and device moves
    work as before."""

    _wrap = GradWeight()

    def __getitem__(self, key):
        return self._wrap(dict.__getitem__(self, key))


def _unwrapped_params(dm) -> list[str]:
    """Modules whose parameters ComfyUI's weight wrappers do not reach (no comfy.ops cast path)."""
    out = []
    for name, mod in dm.named_modules():
        own = [pn for pn, _ in mod.named_parameters(recurse=False)]
        if own and not (hasattr(mod, "comfy_cast_weights") and set(own) <= {"weight", "bias"}):
            out.append(name)
    return out


def with_grad_params(module: torch.nn.Module) -> torch.nn.Module:
    """A shallow copy of `module` whose own parameters read through GradWeight (same tensors)."""
    c = copy.copy(module)
    object.__setattr__(c, "_parameters", _GradParams(module._parameters))
    return c


class _CheckpointedForward:
    """forward of a shallow module copy: gradient checkpointing while a gradient is recorded.

    Dict arguments (transformer_options) are snapshotted: ComfyUI keeps writing block indices into
    them after this module ran, and the recomputation in backward must see what the forward saw."""

    def __init__(self, module):
        self.module = module

    def __call__(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return type(self.module).forward(self.module, *args, **kwargs)
        args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
        kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
        return torch.utils.checkpoint.checkpoint(self._run, *args, use_reentrant=False, **kwargs)

    def _run(self, *args, **kwargs):
        # Blocks may add to their inputs in place (Flux: x += ...); the recomputation must start from the
        # inputs the forward got, so the block works on copies.
        args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
        kwargs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        return type(self.module).forward(self.module, *args, **kwargs)


def checkpointed(module: torch.nn.Module) -> torch.nn.Module:
    """A shallow copy of `module` (same submodules and weights, same class) whose forward checkpoints."""
    c = copy.copy(module)
    c.forward = _CheckpointedForward(c)
    return c


def checkpoint_units(model) -> list[str]:
    """Object-patch names of the units gradient checkpointing wraps: every ResBlock and transformer of a
    UNet block, every DiT block."""
    dm = _base(model).diffusion_model
    arch = architecture(model)
    if arch == "unet":
        from comfy.ldm.modules.attention import SpatialTransformer
        from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock
        names = []
        groups = [("input_blocks", list(enumerate(dm.input_blocks)))]
        groups.append(("middle_block", [(None, dm.middle_block)] if dm.middle_block is not None else []))
        groups.append(("output_blocks", list(enumerate(dm.output_blocks))))
        for prefix, blocks in groups:
            for i, blk in blocks:
                for j, sub in enumerate(blk):
                    if isinstance(sub, (ResBlock, SpatialTransformer)):
                        names.append(f"diffusion_model.{prefix}." + (f"{j}" if i is None else f"{i}.{j}"))
        return names
    groups = {"flux": ("double_blocks", "single_blocks"), "mmdit": ("joint_blocks",)}.get(arch, ())
    return [f"diffusion_model.{g}.{i}" for g in groups for i in range(len(getattr(dm, g)))]


def gradient_clone(model, checkpointing: bool = False):
    """A clone of `model` whose diffusion-model weights can take part in autograd (user's model untouched).

    checkpointing: recompute each ResBlock / transformer / DiT block in backward instead of keeping its
    activations (per-clone object patches of shallow module copies; weights stay shared). Patches that
    run inside those units run again during backward, so they must give the same result twice."""
    # Newer ComfyUI's dynamic-VRAM patcher attaches weight wrappers only to large modules; the gradient
    # needs every weight wrapped, so take the classic (non-dynamic) patcher where that exists.
    is_dynamic = getattr(model, "is_dynamic", None)
    m = model.clone(disable_dynamic=True) if callable(is_dynamic) and is_dynamic() else model.clone()
    wrapper = GradWeight()
    for name, _ in m.model.diffusion_model.named_parameters():
        m.add_weight_wrapper("diffusion_model." + name, wrapper)
    for name in _unwrapped_params(m.model.diffusion_model):
        m.add_object_patch("diffusion_model." + name, with_grad_params(m.get_model_object("diffusion_model." + name)))
    if checkpointing:
        for name in checkpoint_units(m):
            m.add_object_patch(name, checkpointed(m.get_model_object(name)))
    return m


def gradient_clip(clip):
    """A clone of a CLIP (text encoder) whose weights can take part in autograd: every weight ComfyUI casts
    passes through GradWeight (the user's CLIP untouched). For gradients w.r.t. token embeddings
    (textual inversion); the encoder's weights themselves get no gradient."""
    c = clip.clone()
    wrapper = GradWeight()
    for name, _ in c.patcher.model.named_parameters():
        c.patcher.add_weight_wrapper(name, wrapper)
    return c


def _pack(t: torch.Tensor) -> torch.Tensor:
    return t.clone()


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


@contextmanager
def autograd(copy_saved: bool = True):
    """Run the model with autograd: outside inference mode, gradients enabled (restored on exit).

    copy_saved: autograd keeps copies of the tensors it saves for backward. ComfyUI's blocks update
    tensors in place after using them (Flux: img += ..., SD3: x += ...), which otherwise fails the
    backward ("modified by an inplace operation"); UNets do not need it (copy_saved=False saves
    one copy of each saved activation)."""
    with torch.inference_mode(False), torch.enable_grad():
        if copy_saved:
            with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
                yield
        else:
            yield


def leaf(t: torch.Tensor, requires_grad: bool = True) -> torch.Tensor:
    """A normal (non-inference) copy of t that autograd can differentiate with respect to."""
    with torch.inference_mode(False):
        return t.detach().clone().requires_grad_(requires_grad)


def _batch_sigma(sigma, x: torch.Tensor) -> torch.Tensor:
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).flatten()
    return s[:1].expand(x.shape[0]).clone() if s.numel() == 1 else s


@dataclass
class Prediction:
    """The model's prediction at (x, sigma) in every parameterization, from its own model_sampling."""
    model_sampling: object
    x: torch.Tensor
    sigma: torch.Tensor        # per batch row
    x0: torch.Tensor           # after guidance when the prediction was guided

    @property
    def eps(self) -> torch.Tensor:
        return denoiser.to_eps(self.model_sampling, self.x, self.x0, self.sigma)

    @property
    def velocity(self) -> torch.Tensor:
        """k-diffusion's d = (x - x0) / sigma: the rectified-flow velocity eps - x0 on flow models, eps otherwise."""
        return denoiser.velocity(self.model_sampling, self.x, self.x0, self.sigma)

    @property
    def native(self) -> torch.Tensor:
        """What the network itself outputs: eps (EPS), v (v-prediction), eps - x0 (flow), ..."""
        return denoiser.native_output(self.model_sampling, self.x, self.x0, self.sigma)


class GradientEnv:
    """What a gradient program sees: the guider (conditioning processed, models loaded), the schedule,
    the run's model_options and device."""

    def __init__(self, guider, sigmas: torch.Tensor, extra_args: dict, device):
        self.guider, self.sigmas, self.extra_args, self.device = guider, sigmas, extra_args, device
        self.model_options = extra_args["model_options"]
        self.model_sampling = guider.inner_model.model_sampling

    def denoise(self, x: torch.Tensor, sigma, positive: str = "positive", negative: Optional[str] = None,
                cfg: float = 1.0, context: Optional[torch.Tensor] = None,
                uncond_context: Optional[torch.Tensor] = None) -> Prediction:
        """The (guided) prediction at (x, sigma) for the named condition sets, through ComfyUI's
        calc_cond_batch and cfg_function; differentiable w.r.t. x, the weights' wrappers and the
        optional cross-attention contexts (which replace the conditioning's own)."""
        from ..samplers.branch_guider import BranchSpec
        g, mo = self.guider, self.model_options
        ts = _batch_sigma(sigma, x)
        pos = g.cond_list(positive, context)
        guided = negative is not None and (not math.isclose(cfg, 1.0) or bool(mo.get("disable_cfg1_optimization")))
        neg = g.cond_list(negative, uncond_context) if guided else None
        cond, uncond = g.predict(x, ts, pos, neg, mo)[:2]
        x0 = g.combine(BranchSpec(positive, negative, cfg), cond, uncond, x, ts, mo, pos, neg) if guided else cond
        return Prediction(self.model_sampling, x, ts, x0)


def run_with_gradients(model, conds: dict, program: Callable[[GradientEnv], object], sigmas: torch.Tensor, shape,
                       cfg: float = 1.0, checkpointing: bool = False, seed: int = 0,
                       prepare: Optional[Callable[[object], None]] = None):
    """program(env) inside ComfyUI's sampling setup on a gradient clone of `model`; returns its result.

    conds: named CONDITIONINGs (None entries skipped); "positive"/"negative" keep ComfyUI's meaning.
    sigmas: the schedule patches see as transformer_options["sample_sigmas"]. shape: the latent shape
    the conditioning is processed for. The program decides where gradients are recorded (`autograd()`);
    the run itself is outside inference mode, so tensors it makes can require grad.
    prepare(clone): adds weight wrappers to the gradient clone (after GradWeight, so their graphs are
    kept: trainable LoRA), before the run starts."""
    from ..samplers.branch_guider import make_guider
    clone = gradient_clone(model, checkpointing)
    if prepare is not None:
        prepare(clone)
    guider = make_guider(clone, conds, cfg)
    out = {}

    def sampler_program(g, sig, extra_args, _callback, _noise, latent, _disable_pbar):
        out["result"] = program(GradientEnv(g, sig, extra_args, latent.device))
        return latent

    with torch.inference_mode(False):
        guider.run(sampler_program, sigmas, tuple(shape), seed=seed)
    return out["result"]
