"""Masked decoding (blended latents) as a replay hook of EditKit's inversion sampler.

After every replay step, outside the mask the edit branch is put back onto the source: the stored inversion
latent of the level the step arrived at (the Blended Latent Diffusion recipe, Avrahami et al. 2023, with the
exact source trajectory instead of a freshly noised source). A soft mask acts as a per-pixel strength
(Differential Diffusion, Levin & Fried 2024): a pixel of strength s follows the edit during the last s of the
run's steps and the source before, so s = 1 is edited everywhere along the run, s = 0 is never edited, and a
blurred mask edge changes gradually. A binary mask is plain blending.
"""
from __future__ import annotations

import torch

from ..samplers.methods.base import ReplayHook


class MaskedDecoding(ReplayHook):
    """Outside `strength` (B, 1, h, w) in [0, 1], latent size, CPU) the target follows the stored source latent."""

    def __init__(self, strength: torch.Tensor):
        self._strength = strength.detach().float().cpu().clone()

    @property
    def strength(self) -> torch.Tensor:
        return self._strength.clone()

    def free(self, step, like: torch.Tensor) -> torch.Tensor:
        """Which pixels follow the edit after this step (1) and which the source (0)."""
        remaining = (step.total - step.position - 1) / max(step.total, 1)
        m = self._strength.to(device=like.device, dtype=like.dtype)
        return (m > remaining).to(like.dtype)

    def on_step(self, ctx, step, state):
        if ctx.source_only or state.target is None:
            return state
        free = self.free(step, state.target)
        src = ctx.latent(step.index + 1)
        changes = {"target": free * state.target + (1 - free) * src}
        if state.target_pair is not None and ctx.inv.pair is not None:
            pair = ctx.load(ctx.inv.pair[step.index + 1])
            changes["target_pair"] = free * state.target_pair + (1 - free) * pair
        ctx.stats["masked_fraction"] = float(free.mean())
        return state.replace(**changes)
