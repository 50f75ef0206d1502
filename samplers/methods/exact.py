"""Inversions that are exact by construction: EDICT's coupled sequences and the edit-friendly DDPM
noise space. Their replays reproduce the source up to rounding; the SnapSource hook removes the rounding
of the batched (source + target) evaluation."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...core import denoiser
from ..steps import ddpm_posterior
from ..trajectory import to_storage
from .base import InversionMethod, InversionResult, Params, ReplayState, SnapSource, register


@dataclass(frozen=True)
class EDICTParams(Params):
    mix: float = 0.93        # mixing weight p of the coupling layers


@register
class EDICT(InversionMethod):
    """EDICT (Wallace et al. 2023): two coupled latent sequences with mixing layers, exactly invertible."""
    name = "edict"
    label = "EDICT"
    Params = EDICTParams

    def evaluations(self, steps, p):
        return 2 * steps

    def invert(self, run, p):
        mix = p.mix
        x = run.x0
        y = x.clone()
        n = run.steps
        xs, ys = [None] * (n + 1), [None] * (n + 1)
        xs[n], ys[n] = to_storage(x), to_storage(y)
        for k in range(n - 1, -1, -1):
            s_lo, s_hi = run.sigma(k + 1, x), run.sigma(k, x)
            dt = s_lo - s_hi
            y_inter = (y - (1 - mix) * x) / mix
            x_inter = (x - (1 - mix) * y_inter) / mix
            den = run.denoise(x_inter, s_hi)
            y = y_inter - (x_inter - den) / s_hi * dt
            den = run.denoise(y, s_hi)
            x = x_inter - (y - den) / s_hi * dt
            xs[k], ys[k] = to_storage(x), to_storage(y)
            run.tick(2, den)
        return InversionResult(latents=xs, pair=ys)

    def start(self, ctx):
        x, y = ctx.latent(ctx.k0), ctx.load(ctx.inv.pair[ctx.k0])
        if ctx.source_only:
            return ReplayState(x, None, y, None)
        return ReplayState(x, x.clone(), y, y.clone())

    def replay_step(self, ctx, step, st: ReplayState):
        p = ctx.params.mix
        s, dt = step.sigma, step.sigma_next - step.sigma
        xs, ys, xt, yt = st.source, st.source_pair, st.target, st.target_pair
        d_s, d_t = ctx.predict(step, ys, yt)
        xs_i = xs + (ys - d_s) / s * dt
        xt_i = xt + (yt - d_t) / s * dt if xt is not None else None
        d_s, d_t = ctx.predict(step, xs_i, xt_i)
        ys_i = ys + (xs_i - d_s) / s * dt
        xs = p * xs_i + (1 - p) * ys_i
        ys = p * ys_i + (1 - p) * xs
        if xt is not None:
            yt_i = yt + (xt_i - d_t) / s * dt
            xt = p * xt_i + (1 - p) * yt_i
            yt = p * yt_i + (1 - p) * xt
        return ReplayState(xs, xt, ys, yt), d_t

    def hooks(self, inv, p):
        return [SnapSource()]


@dataclass(frozen=True)
class DDPMParams(Params):
    skip: int = 0            # T_skip: editing starts this many steps into the schedule
    seed: int = 0            # seed of the independent noise at each level


@register
class EditFriendlyDDPM(InversionMethod):
    """Edit-friendly DDPM inversion (Huberman-Spiegelglas et al. 2024): independent noisy latents at every
    level, then the residual of each DDPM step, so replaying the residuals reproduces them exactly."""
    name = "ddpm"
    label = "edit-friendly DDPM inversion"
    Params = DDPMParams

    def invert(self, run, p):
        ms = run.model_sampling
        x = run.x0
        sigmas, n = run.sigmas, run.steps
        gen = torch.Generator().manual_seed(int(p.seed))
        noisy = []
        for i in range(n):
            eps = torch.randn(x.shape, generator=gen, dtype=torch.float32).to(x.device, x.dtype)
            noisy.append(denoiser.add_noise(ms, x, eps, float(sigmas[i])))
        noisy.append(x)
        residuals, stds = [], []
        for i in range(n):
            s, s_next = float(sigmas[i]), float(sigmas[i + 1])
            den = run.denoise(noisy[i], run.sigma(i, x))
            mean, std = ddpm_posterior(ms, noisy[i], den, s, s_next)
            residuals.append(to_storage(noisy[i + 1] - mean))
            stds.append(std)
            run.tick(1, den)
        return InversionResult(latents=[to_storage(t) for t in noisy], residuals=residuals, noise_std=stds,
                               start_index=int(p.skip))

    def replay_step(self, ctx, step, st):
        den_s, den_t = ctx.predict(step, st.source, st.target)
        r = ctx.load(ctx.inv.residuals[step.index])
        s, s_next = float(step.sigma), float(step.sigma_next)
        src = ddpm_posterior(ctx.model_sampling, st.source, den_s, s, s_next)[0] + r
        tgt = ddpm_posterior(ctx.model_sampling, st.target, den_t, s, s_next)[0] + r if st.target is not None else None
        return st.replace(source=src, target=tgt), den_t

    def hooks(self, inv, p):
        return [SnapSource()]
