"""Editing from an EDITKIT_INVERSION: the SAMPLER/GUIDER pair behind EditKitInversionSampler, and the
replay driver.

The guider is a BranchGuider holding the target prompt ("positive"/"negative", cfg) and the
inversion's source prompt ("source_positive"/"source_negative"). The sampler runs the source and
target branches in one batch per model call (source first inside every cond_or_uncond chunk, the
branch contract of core/branches.py) and steps them with the method the trajectory was made by:
`run_replay` is one loop for every method; what differs lives in the method object
(samplers/methods/: branch specs per step, the step itself) and in replay hooks (Direct Inversion's
snap of the source branch, RF-Inversion's pull toward the source, masked decoding, ...).
"""
from __future__ import annotations

import comfy.samplers
import torch

from ..core.errors import EditKitInputError
from .branch_guider import BranchGuider, make_guider
from .methods import ReplayContext, ReplayState
from .trajectory import EditKitInversion

NODE = "EditKitInversionSampler"
OUTPUTS = ("target", "source + target")


class ZeroNoise:
    """NOISE for SamplerCustomAdvanced: the replay starts from the stored trajectory, so no noise is added."""
    seed = 0

    def generate_noise(self, input_latent):
        s = input_latent["samples"]
        return torch.zeros(s.shape, dtype=torch.float32, device="cpu")


def make_edit_guider(model, inv: EditKitInversion, positive, negative, cfg: float, extra_conds=None) -> BranchGuider:
    """The guider of an edit: target prompt, the inversion's source prompt, and any further named
    CONDITIONINGs a method's steps evaluate (extra_conds)."""
    g = make_guider(model, {"positive": positive, "negative": negative,
                            "source_positive": inv.positive, "source_negative": inv.negative, **(extra_conds or {})}, cfg)
    g.inversion = inv
    return g


def start_index(inv: EditKitInversion, sigmas: torch.Tensor) -> int:
    """Which stored step `sigmas` starts at: it must be a tail of the trajectory's schedule."""
    full = inv.sigmas.float()
    k = len(full) - len(sigmas)
    if k < 0 or len(sigmas) < 2 or not torch.allclose(full[k:], sigmas.detach().float().cpu(), rtol=1e-4, atol=1e-6):
        raise EditKitInputError(NODE, "sigmas",
                                f"the sigmas ({len(sigmas) - 1} steps) are not the inversion's schedule "
                                f"({inv.steps} steps, editing from step {inv.start_index})",
                                "connect the 'sigmas' output of EditKit Inversion Sampler (or a tail of it, e.g. SplitSigmas)")
    return k


class InversionReplaySampler(comfy.samplers.Sampler):
    """SAMPLER that edits from an inversion; needs the GUIDER of the same EditKitInversionSampler node."""

    def __init__(self, inv: EditKitInversion, output: str = "target", hooks=()):
        self.inv = inv
        self.output = output
        self.hooks = tuple(hooks)      # ReplayHooks of the sampler node (after the method's own)

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        inv = self.inv
        if not isinstance(model_wrap, BranchGuider) or getattr(model_wrap, "inversion", None) is not inv:
            raise EditKitInputError(NODE, "guider", "this sampler needs the guider of the same EditKit Inversion Sampler node",
                                    "connect both its 'guider' and 'sampler' outputs to SamplerCustomAdvanced")
        if denoise_mask is not None:
            raise EditKitInputError(NODE, "latent", "the latent carries a noise mask",
                                    "inversion editing runs on the whole latent; remove SetLatentNoiseMask")
        if latent_image is not None:
            inv.check_latent(latent_image.shape, NODE, "latent")
        k0 = start_index(inv, sigmas)
        return replay(model_wrap, inv, k0, extra_args["model_options"], callback, self.output, hooks=self.hooks)


def run_replay(ctx: ReplayContext, callback=None) -> ReplayState:
    """The replay driver: the steps of the hooks' plan, each the method's step between the hooks."""
    method, hooks = ctx.method, ctx.hooks
    plan = list(range(ctx.k0, ctx.n))
    for h in hooks:
        plan = h.plan(ctx, plan)
    state = method.start(ctx)
    level, total = ctx.k0, len(plan)
    for pos, i in enumerate(plan):
        if i != level:
            for h in hooks:
                state = h.on_jump(ctx, state, level, i)
        step = ctx.step(i, pos, total)
        state, den_t = method.replay_step(ctx, step, state)
        for h in hooks:
            state = h.on_step(ctx, step, state)
        level = i + 1
        if callback is not None:
            shown = den_t if den_t is not None else state.source
            latest = state.target if state.target is not None else state.source
            callback(pos, shown.float(), latest.float(), total)
    return state


def replay(guider: BranchGuider, inv: EditKitInversion, k0: int, model_options: dict, callback=None,
           output: str = "target", source_only: bool = False, hooks=()) -> torch.Tensor:
    """Run the edit from step k0; returns the target (or source + target) latent in sampler space."""
    guider.evaluations = 0          # per-run counters (the guider object may be reused by ComfyUI's cache)
    ctx = ReplayContext(guider, inv, k0, model_options, hooks, source_only)
    state = run_replay(ctx, callback)
    guider.source_drift = ctx.stats["source_drift"]
    guider.replay_stats = ctx.stats       # what the hooks measured (LEDITS++'s implicit masks)
    if source_only:
        return state.source.float()
    if output == OUTPUTS[1]:
        return torch.cat([state.source, state.target]).float()
    return state.target.float()


def reconstruct(model, inv: EditKitInversion, k0: int | None = None) -> torch.Tensor:
    """Source-branch-only replay (the reconstruction), user-space latent. For tests and metrics."""
    guider = make_edit_guider(model, inv, inv.positive, inv.negative, inv.cfg)
    k = inv.start_index if k0 is None else k0

    def program(g, sigmas, extra_args, callback, noise, latent, disable_pbar):
        return replay(g, inv, k, extra_args["model_options"], source_only=True)
    return guider.run(program, inv.sigmas[k:], inv.batch_shape)
