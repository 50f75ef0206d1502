"""Masked decoding (blended latents): a replay hook of EditKit's inversion sampler, and a model patch for plain
KSampler / SamplerCustomAdvanced img2img (`BlendedLatent`).

After every replay step, outside the mask the edit branch is put back onto the source: the stored inversion
latent of the level the step arrived at (the Blended Latent Diffusion recipe, Avrahami et al. 2023, with the
exact source trajectory instead of a freshly noised source). A soft mask acts as a per-pixel strength
(Differential Diffusion, Levin & Fried 2024): a pixel of strength s follows the edit during the last s of the
run's steps and the source before, so s = 1 is edited everywhere along the run, s = 0 is never edited, and a
blurred mask edge changes gradually. A binary mask is plain blending.
"""
from __future__ import annotations

import torch

from ..core.patches import SharedPatch
from ..samplers.methods.base import ReplayHook


def free_after(strength: torch.Tensor, position: int, total: int) -> torch.Tensor:
    """Which pixels follow the edit after step `position` of `total` (1) and which the source (0): a pixel of
    strength s is edited during the last s of the steps (s = 1 always, s = 0 never)."""
    remaining = (total - position - 1) / max(total, 1)
    return (strength > remaining).to(strength.dtype)


class MaskedDecoding(ReplayHook):
    """Outside `strength` (B, 1, h, w) in [0, 1], latent size, CPU) the target follows the stored source latent."""

    def __init__(self, strength: torch.Tensor):
        self._strength = strength.detach().float().cpu().clone()

    @property
    def strength(self) -> torch.Tensor:
        return self._strength.clone()

    def free(self, step, like: torch.Tensor) -> torch.Tensor:
        """Which pixels follow the edit after this step (1) and which the source (0)."""
        return free_after(self._strength.to(device=like.device, dtype=like.dtype), step.position, step.total)

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


class BlendedLatent(SharedPatch):
    """Blended Latent Diffusion (Avrahami et al. 2023) for any sampler, as a model_function_wrapper: outside the
    mask the model's x0 prediction is the source latent. A sampler stepping with it keeps the latent outside the
    mask on the source noised to the current sigma with the sampler's own noise (Euler / DDIM exactly: x_next =
    x0 + sigma_next / sigma (x - x0) for EPS / v models, the flow interpolation for flow models), and the result
    outside the mask IS the source. img2img: the sampler starts from the source (KSampler with denoise < 1,
    SDEdit). Soft masks: per-pixel strength as in MaskedDecoding (a pixel of strength s follows the edit during
    the last s of the steps, Differential-Diffusion style).

    source: (B, C, h, w) sampler-space latent; strength: (B, 1, h, w) in [0, 1]; both CPU, never mutated."""

    def __init__(self, source: torch.Tensor, strength: torch.Tensor):
        self._source = source.detach().float().cpu().clone()
        self._strength = strength.detach().float().cpu().clone()

    def rows(self, t: torch.Tensor, n: int, like: torch.Tensor) -> torch.Tensor:
        t = t.to(device=like.device, dtype=like.dtype)
        if n % t.shape[0]:
            raise ValueError(f"EditKit Blended Latent: a model call of {n} rows does not hold the source batch of {t.shape[0]}")
        return t.repeat(n // t.shape[0], 1, 1, 1)

    def free(self, x: torch.Tensor, sigma, transformer_options: dict) -> torch.Tensor:
        """(rows, 1, h, w) 1 where the prediction is the model's at this step, 0 where it is the source."""
        from ..core.denoiser import step_index
        sched = transformer_options.get("sample_sigmas")
        if sched is None:
            position, total = 0, 1
        else:
            total = max(len(sched) - 1, 1)
            position = min(step_index(sched, sigma), total - 1)
        return free_after(self.rows(self._strength, x.shape[0], x), position, total)

    def make(self, call_next):
        def wrapper(apply_model, args):
            x = args["input"]
            if tuple(x.shape[-2:]) != tuple(self._source.shape[-2:]):
                raise ValueError(f"EditKit Blended Latent: the sampled latent is {x.shape[-1]}x{x.shape[-2]}, the source "
                                 f"{self._source.shape[-1]}x{self._source.shape[-2]}: sample at the source's size")
            out = call_next(apply_model, args)
            to = args.get("c", {}).get("transformer_options", {})
            free = self.free(x, args["timestep"], to)
            src = self.rows(self._source, x.shape[0], out)
            return free * out + (1 - free) * src
        return wrapper


class RePaint(ReplayHook):
    """RePaint resampling (Lugmayr et al. 2022) for masked decoding: the replay runs its steps in blocks of `jump`;
    each block is run `resamples` times, and before every rerun the target is re-noised from the level the block
    reached back to the level it started at (fresh noise, core.denoiser.renoise) and the source is put back on
    its stored latent of that level, so the edit inside the mask is harmonised with the kept source outside.
    Use it after MaskedDecoding (which keeps the source outside the mask at every step)."""

    def __init__(self, jump: int, resamples: int, seed: int = 0):
        self.jump, self.resamples, self.seed = max(int(jump), 1), max(int(resamples), 1), int(seed)

    def plan(self, ctx, steps):
        out = []
        for b0 in range(0, len(steps), self.jump):
            out += list(steps[b0:b0 + self.jump]) * self.resamples
        return out

    def on_jump(self, ctx, state, level, to_level):
        if to_level >= level or state.target is None:
            return state
        gen = ctx.scratch.setdefault(self, torch.Generator().manual_seed(self.seed))
        eps = torch.randn(state.target.shape, generator=gen, dtype=torch.float32).to(state.target)
        from ..core.denoiser import renoise
        target = renoise(ctx.model_sampling, state.target, ctx.sigmas[level], ctx.sigmas[to_level], eps)
        ctx.stats["repaint_jumps"] = ctx.stats.get("repaint_jumps", 0) + 1
        changes = {"source": ctx.latent(to_level), "target": target}
        if state.target_pair is not None and ctx.inv.pair is not None:      # EDICT's coupled sequence
            changes["source_pair"] = ctx.load(ctx.inv.pair[to_level])
            changes["target_pair"] = renoise(ctx.model_sampling, state.target_pair, ctx.sigmas[level],
                                             ctx.sigmas[to_level], eps)
        return state.replace(**changes)
