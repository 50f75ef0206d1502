"""A CFGGuider that evaluates several named condition sets and several branches in one batch.

Inversion and editing loops need more than KSampler's one (positive, negative, cfg) triple: the
source branch and the target branch of an edit each have their own prompts and guidance, NTI swaps
the unconditional context every step, and attention-control patches need both branches in the same
model call. `BranchGuider` keeps ComfyUI's whole sampling machinery (model loading, cond processing,
hooks, ControlNet, wrappers, patches, pre/post-CFG functions) and adds:

  * `evaluate(xs, sigma, specs)`: x0 predictions for one or more branches. Branch latents are stacked
    along the batch (source first) inside every cond_or_uncond chunk, each branch with its own
    conditioning, following the branch contract of core/branches.py: the model call declares the
    branch names, and each branch's cfg_function / post-CFG functions are told which branch they see.
  * `run(program, ...)`: run a custom loop (`program(guider, sigmas, extra_args, ...)`) inside
    `CFGGuider.sample`, so everything a real sampler gets is set up.

Used by the inversion methods (samplers/methods/) and the replay driver (samplers/replay.py). No node classes.
"""
from __future__ import annotations

from ..core.progress import check_interrupt
import math
from dataclasses import dataclass
from typing import Callable, Optional

import comfy.samplers
import torch

from ..core.branches import DEFAULT_BRANCHES, with_branches, with_current
from ..core.branches import BRANCHES_KEY as BRANCH_KEY  # noqa: F401  (the old import path of the key)


@dataclass(frozen=True)
class BranchSpec:
    """How one branch is guided: which condition sets, which cfg, optional per-step uncond context."""
    positive: str = "positive"
    negative: Optional[str] = "negative"
    cfg: float = 1.0
    uncond_context: Optional[torch.Tensor] = None   # replaces the negative's cross-attention context (NTI)
    proximal: Optional[str] = None                  # None | "l0" | "l1" (ProxEdit's proximal guidance)
    quantile: float = 0.7


@dataclass(frozen=True)
class BranchPrediction:
    """One branch of a batched call, for callers that combine branches themselves (LEDITS++'s edit terms):
    the guided x0, and the raw conditional and unconditional x0 (uncond None when the call had no uncond row)."""
    x0: torch.Tensor
    cond: torch.Tensor
    uncond: Optional[torch.Tensor]


class BranchCond:
    """A model cond made of one part per branch; process_cond gives each part its share of the batch."""

    def __init__(self, parts):
        self.parts = list(parts)
        self.cond = parts[0].cond

    def process_cond(self, batch_size, **kwargs):
        n = len(self.parts)
        if batch_size % n:
            raise ValueError(f"EditKit: a batch of {batch_size} cannot hold {n} branches")
        done = [p.process_cond(batch_size=batch_size // n, **kwargs) for p in self.parts]
        return done[0]._copy_with(done[0].concat(done[1:]))

    def can_concat(self, other):
        return False

    def size(self):
        return self.parts[0].size()


def _with_context(cond_list, context: torch.Tensor):
    import comfy.conds
    out = []
    for c in cond_list:
        if "c_crossattn" not in c.get("model_conds", {}):
            raise ValueError("EditKit: this model's conditioning has no cross-attention context to optimise")
        mc = dict(c["model_conds"])
        mc["c_crossattn"] = comfy.conds.CONDCrossAttn(context)
        c = dict(c)
        c["model_conds"] = mc
        out.append(c)
    return out


def merge_branches(lists: list) -> list:
    """Pair the entries of several processed cond lists into one list of branch-stacked entries."""
    if len(lists) == 1:
        return lists[0]
    n = len(lists[0])
    if any(len(lst) != n for lst in lists):
        raise ValueError("source and target conditioning have a different number of entries "
                         "(combined/area conditioning); give both the same structure")
    merged = []
    for entries in zip(*lists):
        first = entries[0]
        keys = set(first["model_conds"])
        if any(set(e["model_conds"]) != keys for e in entries):
            raise ValueError("source and target conditioning carry different model inputs "
                             f"({sorted(keys)} vs {[sorted(e['model_conds']) for e in entries[1:]]})")
        m = dict(first)
        m["model_conds"] = {k: BranchCond([e["model_conds"][k] for e in entries]) for k in keys}
        merged.append(m)
    return merged


def prox(delta: torch.Tensor, kind: str, quantile: float) -> torch.Tensor:
    """ProxEdit's proximal operator on the guidance difference, per image: l0 = hard, l1 = soft threshold."""
    flat = delta.flatten(1).abs().float()
    if quantile > 0:
        thr = torch.quantile(flat, min(quantile, 1.0), dim=1).to(delta.dtype)
    else:
        thr = torch.full((delta.shape[0],), -quantile, dtype=delta.dtype, device=delta.device)
    thr = thr.view(-1, *([1] * (delta.ndim - 1)))
    if kind == "l0":
        return torch.where(delta.abs() > thr, delta, torch.zeros_like(delta))
    return torch.sign(delta) * (delta.abs() - thr).clamp(min=0)


class _ProgramSampler(comfy.samplers.Sampler):
    """A Sampler that runs a custom loop (no noise_scaling / inverse_noise_scaling)."""

    def __init__(self, program):
        self.program = program

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None, disable_pbar=False):
        return self.program(model_wrap, sigmas, extra_args, callback, noise, latent_image, disable_pbar)


class BranchGuider(comfy.samplers.CFGGuider):
    """CFGGuider with named condition sets (see the module docstring). Used as a plain GUIDER it guides
    with "positive"/"negative" at self.cfg, exactly like CFGGuider."""

    def set_named_conds(self, conds: dict):
        clean = {k: v for k, v in conds.items() if v is not None}
        self.inner_set_conds(clean)
        # encode_model_conds uses the dict key as prompt_type: keep positive/negative semantics.
        for k in clean:
            ptype = "negative" if k.endswith("negative") else "positive"
            self.original_conds[k] = [dict(c, prompt_type=c.get("prompt_type", ptype)) for c in self.original_conds[k]]

    def has(self, key: Optional[str]) -> bool:
        return key is not None and key in self.original_conds

    def cond_list(self, key: str, context: Optional[torch.Tensor] = None) -> list:
        lst = self.conds[key]
        return _with_context(lst, context) if context is not None else lst

    # -- evaluation -------------------------------------------------------------------------------
    def predict(self, x, ts, positive, negative, model_options: dict) -> list:
        """Raw [cond_x0, uncond_x0] for processed cond lists (either may be None), honouring ComfyUI's
        calc-cond-batch function and pre-CFG functions."""
        check_interrupt()
        conds = [positive, negative]
        mo = model_options
        if "sampler_calc_cond_batch_function" in mo:
            out = mo["sampler_calc_cond_batch_function"]({"conds": conds, "input": x, "sigma": ts,
                                                           "model": self.inner_model, "model_options": mo})
        else:
            out = comfy.samplers.calc_cond_batch(self.inner_model, conds, x, ts, mo)
        for fn in mo.get("sampler_pre_cfg_function", []):
            out = fn({"conds": conds, "conds_out": out, "cond_scale": self.cfg, "timestep": ts, "input": x,
                      "sigma": ts, "model": self.inner_model, "model_options": mo})
        self.evaluations = getattr(self, "evaluations", 0) + 1
        return out

    def combine(self, spec: BranchSpec, cond, uncond, x, ts, model_options, pos=None, neg=None):
        """Guidance of one branch (x0 space), through ComfyUI's cfg_function unless proximal."""
        if uncond is None:
            uncond = torch.zeros_like(cond)
        if spec.proximal and neg is not None:
            return uncond + prox(cond - uncond, spec.proximal, spec.quantile) * spec.cfg
        return comfy.samplers.cfg_function(self.inner_model, cond, uncond, spec.cfg, x, ts, model_options=model_options,
                                           cond=pos, uncond=neg)

    def wants_uncond(self, spec: BranchSpec, model_options: dict) -> bool:
        return (not math.isclose(spec.cfg, 1.0)) or bool(model_options.get("disable_cfg1_optimization", False))

    def evaluate(self, xs: list, sigma, specs: list, model_options: dict, names: Optional[tuple] = None,
                 raw: bool = False) -> list:
        """x0 (after guidance) for each branch latent in xs, all branches in one batched model call;
        raw=True: a BranchPrediction per branch (guided, raw cond and uncond x0)."""
        n = len(xs)
        b = xs[0].shape[0]
        # The model sees float32 latents, as from ComfyUI's samplers (callers may keep float64 states).
        x = torch.cat([t.to(torch.float32) for t in xs]) if n > 1 else xs[0].to(torch.float32)
        ts = _timesteps(sigma, x)
        wants = [self.wants_uncond(s, model_options) for s in specs]
        for s, w in zip(specs, wants):
            if w and not self.has(s.negative) and s.uncond_context is None:
                raise ValueError("EditKit: guidance (cfg != 1) needs a negative conditioning")
        pos = merge_branches([self.conds[s.positive] for s in specs])
        neg = None
        if any(wants):
            neg = merge_branches([self.cond_list(s.negative if self.has(s.negative) else s.positive, s.uncond_context)
                                  for s in specs])
        mo = model_options
        names = tuple(names or DEFAULT_BRANCHES)
        if n > 1:
            mo = with_branches(model_options, names)
        cond_pred, uncond_pred = self.predict(x, ts, pos, neg, mo)[:2]
        results = []
        for i, s in enumerate(specs):
            sl = slice(i * b, (i + 1) * b)
            u = uncond_pred[sl] if wants[i] else None
            mo_i = with_current(mo, names[i]) if n > 1 else mo
            guided = self.combine(s, cond_pred[sl], u, x[sl], ts[sl], mo_i, pos, neg if wants[i] else None)
            results.append(BranchPrediction(guided, cond_pred[sl], u)
                           if raw else guided)
        return results

    def x0(self, x, sigma, spec: BranchSpec, model_options: dict):
        """x0 of one branch, in x's dtype."""
        return self.evaluate([x], sigma, [spec], model_options)[0].to(x.dtype)

    # -- custom loops -----------------------------------------------------------------------------
    def run(self, program: Callable, sigmas: torch.Tensor, shape, seed: int = 0, dtype=torch.float32):
        """Run program(guider, sigmas, extra_args, callback, noise, latent, disable_pbar) inside
        CFGGuider.sample (models loaded, conds processed, wrappers active); returns the program's
        result after process_latent_out."""
        zeros = torch.zeros(shape, dtype=dtype)
        self.evaluations = 0
        return self.sample(zeros, zeros, _ProgramSampler(program), sigmas.clone(), disable_pbar=True, seed=seed)

    def call(self, fn: Callable, sigmas: torch.Tensor, shape, seed: int = 0):
        """Like run, for loops that return results rather than a latent: returns
        fn(guider, sigmas, extra_args, latent_image) itself (any object)."""
        out = []

        def program(guider, sig, extra_args, callback, noise, latent, disable_pbar):
            out.append(fn(guider, sig, extra_args, latent))
            return latent
        self.run(program, sigmas, shape, seed)
        return out[0]


def _timesteps(sigma, x):
    sig = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).flatten()
    return sig[:1].expand(x.shape[0]).clone() if sig.numel() == 1 else sig


def make_guider(model, conds: dict, cfg: float = 1.0) -> BranchGuider:
    """A BranchGuider over `model` with named CONDITIONINGs (None entries are skipped)."""
    g = BranchGuider(model)
    g.set_named_conds(conds)
    g.set_cfg(cfg)
    return g


def is_branch_guider(obj) -> bool:
    return isinstance(obj, BranchGuider)
