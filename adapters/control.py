"""Control schedules for ControlNet, T2I-Adapter and Control-LoRA residuals.

`ScheduledControl` wraps the CONTROL_NET object ComfyUI's loaders return (any `ControlBase`) and
reshapes the residuals it produces before they reach the UNet:

  * a strength schedule over the sampling progress (constant, linear, cosine or keyframes);
  * per-block weights: uniform, the ControlNet code's "soft" weighting w_i = ratio^(N - i) (ratio
    0.825, N = 12 for SD1.5: the middle block gets 1, the shallowest skip 0.825^12 ~ 0.1), the
    paper's resolution weighting (w_i proportional to 1 / block size, the deepest block = 1), or a
    custom list;
  * a spatial mask multiplied into every residual (Local-Control / MGPF: control only a region);
  * cond-only application (residuals of the unconditional batch chunks zeroed, the paper's choice
    for empty prompts), without splitting ComfyUI's batched cond/uncond pass;
  * how it combines with the controls applied before it: sum (ComfyUI's rule) or MaxFusion-style
    selection, per location, of the residual with the larger relative standard deviation.

Use it as ComfyUI's ControlNetApplyAdvanced input: the wrapper survives that node's copy() /
set_cond_hint() / set_previous_controlnet() protocol, and with neutral settings its output is
bit-identical to the unwrapped control.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..core import denoiser
from ..core.errors import EditKitInputError

NODE = "EditKitControlSchedule"
SCHEDULES = ["constant", "linear", "cosine", "keyframes"]
BLOCK_WEIGHTS = ["uniform", "soft (ControlNet code)", "resolution (paper)", "custom"]
COMBINE = ["sum", "max variance (MaxFusion)"]
SOFT_RATIO = 0.825


# ---------------------------------------------------------------------------------------------
# Strength schedules
# ---------------------------------------------------------------------------------------------

def parse_keyframes(text: str, node: str = NODE, input_name: str = "keyframes") -> tuple[tuple[float, float], ...]:
    """'0:1.0, 0.5:0.8, 1:0.2' -> ((0.0, 1.0), (0.5, 0.8), (1.0, 0.2)), sorted by progress."""
    frames = []
    for part in [p.strip() for p in (text or "").replace(";", ",").split(",") if p.strip()]:
        try:
            p, v = part.split(":")
            frames.append((float(p), float(v)))
        except ValueError:
            raise EditKitInputError(node, input_name, f"cannot read keyframe {part!r}",
                                    "write progress:strength pairs, e.g. '0:1.0, 0.5:0.8, 1:0.2'") from None
    for p, _ in frames:
        if not 0.0 <= p <= 1.0:
            raise EditKitInputError(node, input_name, f"keyframe progress {p} is outside [0, 1]",
                                    "use progress values from 0 (first step) to 1 (last step)")
    if not frames:
        raise EditKitInputError(node, input_name, "no keyframes given", "write e.g. '0:1.0, 1:0.0' or pick another schedule")
    return tuple(sorted(frames))


@dataclass(frozen=True)
class Schedule:
    shape: str = "constant"
    start: float = 1.0
    end: float = 1.0
    keyframes: tuple = ()

    @property
    def is_constant_one(self) -> bool:
        return self.shape == "constant" or (self.shape in ("linear", "cosine") and self.start == 1.0 and self.end == 1.0)

    def __call__(self, p: float) -> float:
        p = min(max(float(p), 0.0), 1.0)
        if self.shape == "constant":
            return 1.0
        if self.shape == "linear":
            return self.start + (self.end - self.start) * p
        if self.shape == "cosine":
            return self.start + (self.end - self.start) * (1.0 - math.cos(math.pi * p)) / 2.0
        frames = self.keyframes
        if p <= frames[0][0]:
            return frames[0][1]
        for (p0, v0), (p1, v1) in zip(frames, frames[1:]):
            if p <= p1:
                return v0 if p1 == p0 else v0 + (v1 - v0) * (p - p0) / (p1 - p0)
        return frames[-1][1]


# ---------------------------------------------------------------------------------------------
# Settings and residual shaping
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class ControlSettings:
    schedule: Schedule = Schedule()
    block_weights: str = "uniform"
    soft_ratio: float = SOFT_RATIO
    custom_weights: tuple = ()
    mask: Optional[torch.Tensor] = None        # (1 or B, H, W)
    cond_only: bool = False
    combine: str = "sum"

    @property
    def neutral(self) -> bool:
        return (self.schedule.is_constant_one and self.block_weights == "uniform" and self.mask is None
                and not self.cond_only and self.combine == "sum")


def residual_positions(control: dict, n_input: int) -> dict[tuple[str, int], int]:
    """Block position of every residual: input block index 0..n_input-1, the middle block = n_input.

    ControlNets return {"output": [one per input block, in order], "middle": [...]} (added to the skip
    connections); T2I-Adapters return {"input": [...]} consumed from the end by the input blocks.
    """
    pos = {}
    for key, lst in control.items():
        n = len(lst)
        for j in range(n):
            if key == "output":
                pos[(key, j)] = j
            elif key == "input":
                pos[(key, j)] = n - 1 - j
            else:
                pos[(key, j)] = n_input
    return pos


def block_weight(settings: ControlSettings, position: int, n_input: int, size: int, min_size: int) -> float:
    mode = settings.block_weights
    if mode.startswith("soft"):
        return settings.soft_ratio ** float(max(n_input - position, 0))
    if mode.startswith("resolution"):
        return min_size / size
    if mode == "custom":
        w = settings.custom_weights
        return float(w[position]) if position < len(w) else float(w[-1])
    return 1.0


def resize_mask(mask: torch.Tensor, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """(Bm, H, W) -> (Bm, 1, h, w): area-averaged when shrinking (0 stays 0 outside the region)."""
    m = mask.to(device=like.device, dtype=torch.float32).unsqueeze(1)
    if tuple(m.shape[-2:]) != (h, w):
        shrink = m.shape[-2] >= h and m.shape[-1] >= w
        m = F.interpolate(m, size=(h, w), mode="area") if shrink else \
            F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
    return m.to(like.dtype)


def _batch_mask(m: torch.Tensor, total: int, chunks: int) -> torch.Tensor:
    if m.shape[0] == 1 or m.shape[0] == total:
        return m
    per = max(total // max(chunks, 1), 1)
    if m.shape[0] == per:
        return m.repeat(chunks, 1, 1, 1)
    return m[:1]


def shape_residuals(control: dict, settings: ControlSettings, factor: float, n_input: int,
                    cond_or_uncond: list) -> dict:
    """Apply schedule factor, block weights, mask and cond-only to a control dict (new tensors)."""
    tensors = [t for lst in control.values() for t in lst if t is not None]
    if not tensors:
        return control
    min_size = min((int(t.shape[-2]) for t in tensors if t.ndim == 4), default=1)
    positions = residual_positions(control, n_input)
    chunks = max(len(cond_or_uncond), 1)
    out = {}
    for key, lst in control.items():
        new = []
        for j, t in enumerate(lst):
            if t is None:
                new.append(None)
                continue
            spatial = t.ndim == 4
            if not spatial and (settings.mask is not None or settings.block_weights.startswith("resolution")):
                raise EditKitInputError(NODE, "mask" if settings.mask is not None else "block_weights",
                                        f"this control's residuals are token sequences {tuple(t.shape)}, not feature maps",
                                        "use masks and resolution weights with UNet ControlNets / T2I-Adapters; "
                                        "schedules, cond-only and fusion work with every control")
            w = factor * block_weight(settings, positions[(key, j)], n_input, int(t.shape[-2]) if spatial else 1,
                                      min_size if spatial else 1)
            if w != 1.0:
                t = t * w
            if settings.mask is not None:
                t = t * _batch_mask(resize_mask(settings.mask, int(t.shape[-2]), int(t.shape[-1]), t), t.shape[0], chunks)
            if settings.cond_only and any(c != 0 for c in cond_or_uncond):
                gate = torch.tensor([1.0 if c == 0 else 0.0 for c in cond_or_uncond], dtype=t.dtype, device=t.device)
                gate = gate.repeat_interleave(t.shape[0] // chunks).view(-1, *([1] * (t.ndim - 1)))
                t = t * gate
            new.append(t)
        out[key] = new
    return out


def relative_std(t: torch.Tensor) -> torch.Tensor:
    """Per-location channel std, relative to the residual's overall std per sample: (B, 1, H, W)."""
    x = t.float()
    local = x.std(dim=1, keepdim=True, unbiased=False)
    overall = x.flatten(1).std(dim=1, unbiased=False).view(-1, 1, 1, 1)
    return local / overall.clamp_min(1e-12)


def merge(own: dict, prev: Optional[dict], combine: str) -> dict:
    """Combine with the previous controls' residuals: ComfyUI's sum (same order of operands) or max-variance."""
    if prev is None:
        return own
    out = {k: list(v) for k, v in own.items()}
    for key in ("input", "middle", "output"):
        o = out.setdefault(key, [])
        for i, pv in enumerate(prev.get(key, [])):
            if i >= len(o):
                o.append(pv)
            elif pv is not None:
                if o[i] is None:
                    o[i] = pv
                elif combine == "sum" or pv.shape != o[i].shape or pv.ndim != 4:
                    o[i] = pv + o[i]
                else:
                    o[i] = torch.where(relative_std(o[i]) >= relative_std(pv), o[i], pv.to(o[i].dtype))
    return out


# ---------------------------------------------------------------------------------------------
# The ControlBase wrapper
# ---------------------------------------------------------------------------------------------

def _control_base():
    import comfy.controlnet
    return comfy.controlnet.ControlBase


def make_scheduled(inner, settings: ControlSettings):
    """A ScheduledControl around a copy-able ControlBase (class built lazily: comfy imports stay out of import time)."""
    return _scheduled_class()(inner, settings)


_CLASS = {}


def _scheduled_class():
    if "cls" in _CLASS:
        return _CLASS["cls"]
    Base = _control_base()

    class ScheduledControl(Base):
        """ControlBase wrapper: the inner control computes its residuals alone; this object shapes them
        and combines them with the controls applied before it (its own previous_controlnet)."""

        def __init__(self, inner, settings: ControlSettings):
            super().__init__()
            self.inner = inner
            self.settings = settings
            self.n_input = 12              # SD1.5 until pre_run reads the model
            self.extra_hooks = getattr(inner, "extra_hooks", None)
            for attr in ("cond_hint_original", "strength", "timestep_percent_range", "compression_ratio",
                         "latent_format", "upscale_algorithm", "global_average_pooling"):
                if hasattr(inner, attr):
                    setattr(self, attr, getattr(inner, attr))

        # -- ComfyUI's apply protocol --------------------------------------------------------
        def copy(self):
            c = ScheduledControl(self.inner.copy(), self.settings)
            self.copy_to(c)
            c.extra_hooks = getattr(c.inner, "extra_hooks", None)
            return c

        def deepclone_multigpu(self, load_device, autoregister=False):
            """Newer ComfyUI's multi-GPU copies: the wrapper around the inner control's device clone."""
            c = self.copy()
            c.inner = self.inner.deepclone_multigpu(load_device)
            if autoregister and hasattr(self, "multigpu_clones"):
                self.multigpu_clones[load_device] = c
            return c

        def set_cond_hint(self, cond_hint, strength=1.0, timestep_percent_range=(0.0, 1.0), vae=None, extra_concat=[]):
            self.inner.set_cond_hint(cond_hint, strength, timestep_percent_range, vae=vae, extra_concat=extra_concat)
            self.cond_hint_original = cond_hint
            self.strength = strength
            self.timestep_percent_range = timestep_percent_range
            self.vae = vae
            return self

        def set_extra_arg(self, argument, value=None):
            self.inner.set_extra_arg(argument, value)

        def pre_run(self, model, percent_to_timestep_function):
            self.inner.pre_run(model, percent_to_timestep_function)
            if self.previous_controlnet is not None:
                self.previous_controlnet.pre_run(model, percent_to_timestep_function)
            dm = getattr(model, "diffusion_model", None)
            blocks = getattr(dm, "input_blocks", None)
            self.n_input = len(blocks) if blocks is not None else None
            if self.n_input is None and self.settings.block_weights != "uniform":
                raise EditKitInputError(NODE, "block_weights", "per-block weights follow a UNet's blocks and this "
                                        "model has none (a DiT)", "use block_weights = uniform with this model")
            w = self.settings.custom_weights
            if self.settings.block_weights == "custom" and self.n_input is not None and len(w) not in (1, self.n_input + 1):
                raise EditKitInputError(NODE, "custom_weights", f"{len(w)} weights given, this model has "
                                        f"{self.n_input} input blocks + the middle block",
                                        f"give {self.n_input + 1} comma-separated weights (input block 0 first, "
                                        "middle block last), or one weight for all")

        def cleanup(self):
            self.inner.cleanup()
            super().cleanup()

        def get_models(self):
            return self.inner.get_models() + super().get_models()

        def get_extra_hooks(self):
            return self.inner.get_extra_hooks() + super().get_extra_hooks()

        def inference_memory_requirements(self, dtype):
            return self.inner.inference_memory_requirements(dtype) + super().inference_memory_requirements(dtype)

        # -- residuals -----------------------------------------------------------------------
        def factor(self, t, transformer_options: dict) -> float:
            sched = self.settings.schedule
            if sched.is_constant_one:
                return 1.0
            sigmas = transformer_options.get("sample_sigmas")
            p = denoiser.progress(sigmas, t[0]) if sigmas is not None else 0.0
            return float(sched(p))

        def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
            prev = None
            if self.previous_controlnet is not None:
                prev = self.previous_controlnet.get_control(x_noisy, t, cond, batched_number, transformer_options)
            factor = self.factor(t, transformer_options)
            if factor == 0.0:
                return prev
            own = self.inner.get_control(x_noisy, t, cond, batched_number, transformer_options)
            if own is None:
                return prev
            s = self.settings
            if not s.neutral or factor != 1.0:
                cou = list(transformer_options.get("cond_or_uncond", [0] * max(batched_number, 1)))
                own = shape_residuals(own, s, factor, self.n_input or 0, cou)
            return merge(own, prev, s.combine)

    _CLASS["cls"] = ScheduledControl
    return ScheduledControl
