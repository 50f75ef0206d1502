"""Deterministic (ODE) inversions replayed with Euler/DDIM steps: DDIM (+ fixed point), negative-prompt
inversion (+ ProxEdit), null-text inversion and RF-Inversion.

An inversion step from the lower level s' to s evaluates the model at the *target* level s with the
known lower latent (classic DDIM inversion, eps(x_{t-1}, t)); fixed-point refinement then solves
x = x' + (s - s') * d(x, s) exactly (AIDI / ReNoise style), so that the sampling step from x lands on x'.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..branch_guider import BranchSpec
from ..steps import euler_step
from ..trajectory import to_storage
from .base import InversionMethod, InversionResult, InversionRun, Params, ReplayHook, register


def ode_invert(run: InversionRun, fixed_point: int, gamma: float = 0.0) -> InversionResult:
    """DDIM/Euler inversion (gamma = 0) or RF-Inversion's controlled forward ODE (gamma > 0, toward run.noise)."""
    if gamma and run.noise is None:
        raise ValueError("EditKit: RF-Inversion with gamma > 0 needs its noise target")
    x, y1 = run.x0, run.noise
    n = run.steps
    lat = [None] * (n + 1)
    lat[n] = to_storage(x)
    for k in range(n - 1, -1, -1):
        s_lo, s_hi = run.sigma(k + 1, x), run.sigma(k, x)
        den = run.denoise(x, s_hi)
        d = (x - den) / s_hi
        if gamma:
            d = d + gamma * ((y1 - x) / (1.0 - s_lo) - d)
        x_hi = x + d * (s_hi - s_lo)
        for _ in range(fixed_point):
            den = run.denoise(x_hi, s_hi)
            x_hi = x + (x_hi - den) / s_hi * (s_hi - s_lo)
        x = x_hi
        lat[k] = to_storage(x)
        run.tick(1 + fixed_point, den)
    return InversionResult(latents=lat)


def euler_replay_step(ctx, step, state):
    """One deterministic step of both branches."""
    den_s, den_t = ctx.predict(step, state.source, state.target)
    src = euler_step(state.source, den_s, step.sigma, step.sigma_next)
    tgt = euler_step(state.target, den_t, step.sigma, step.sigma_next) if state.target is not None else None
    return state.replace(source=src, target=tgt), den_t


@dataclass(frozen=True)
class DDIMParams(Params):
    fixed_point_iterations: int = 0


@register
class DDIM(InversionMethod):
    name = "ddim"
    label = "DDIM/Euler inversion"
    Params = DDIMParams
    direct_inversion = True

    def evaluations(self, steps, p):
        return steps * (1 + p.fixed_point_iterations)

    def invert(self, run, p):
        return ode_invert(run, p.fixed_point_iterations)

    replay_step = staticmethod(euler_replay_step)


@dataclass(frozen=True)
class NPIParams(Params):
    fixed_point_iterations: int = 0
    proximal: Optional[str] = None      # None | "l0" | "l1" (ProxEdit)
    quantile: float = 0.7


@register
class NegativePrompt(DDIM):
    """Negative-prompt inversion (Miyake et al. 2023): DDIM-inverted at guidance 1; the source prompt stands
    in for the null text when editing (the source branch unguided), with optional ProxEdit thresholding."""
    name = "npi"
    label = "negative-prompt inversion"
    Params = NPIParams
    own_target_uncond = True

    def branch_specs(self, ctx, step):
        p = ctx.params
        return [BranchSpec("source_positive", None, 1.0),
                BranchSpec("positive", "source_positive", float(ctx.guider.cfg), proximal=p.proximal, quantile=p.quantile)]


@dataclass(frozen=True)
class NTIParams(Params):
    inner_iterations: int = 10
    learning_rate: float = 0.01
    early_stop: float = 1e-5
    fixed_point_iterations: int = 0


@register
class NullText(DDIM):
    """Null-text inversion (Mokady et al. 2023): the DDIM pivot plus an optimised unconditional context per
    step (samplers/null_text.py), used by both branches when editing."""
    name = "nti"
    label = "null-text inversion"
    Params = NTIParams
    own_target_uncond = True

    def make(self, model, latent, positive, negative, cfg, sigmas, p, noise=None, settings=None):
        from ..null_text import null_text_inversion   # null_text builds on this registry's DDIM pivot
        return null_text_inversion(model, latent, positive, negative, cfg, sigmas, inner=p.inner_iterations,
                                   lr=p.learning_rate, early_stop=p.early_stop, fixed_point=p.fixed_point_iterations,
                                   settings={**(settings or {}), **p.as_settings()})

    def invert(self, run, p):
        raise NotImplementedError("null-text inversion optimises on a gradient clone: use make()")

    def branch_specs(self, ctx, step):
        uncond = ctx.inv.null_embeddings[step]
        return [BranchSpec("source_positive", "source_negative", ctx.inv.cfg, uncond_context=uncond),
                BranchSpec("positive", "source_negative", float(ctx.guider.cfg), uncond_context=uncond)]


@dataclass(frozen=True)
class RFParams(Params):
    gamma: float = 0.0       # forward controller strength
    seed: int = 0            # seed of the noise target (the node draws it)
    eta: float = 0.0         # reverse controller strength toward the source image
    start: float = 0.0       # reverse controller on for the steps in [start, stop) (fractions of the schedule)
    stop: float = 0.0


class PullToSource(ReplayHook):
    """RF-Inversion's controlled reverse ODE: x0 pulled toward the source image with strength eta for the
    steps in [start, stop) (both branches)."""

    def __init__(self, eta: float, start: float, stop: float):
        self.eta, self.start, self.stop = float(eta), float(start), float(stop)

    def on_denoised(self, ctx, step, source, target):
        lo, hi = int(round(self.start * ctx.n)), int(round(self.stop * ctx.n))
        if not self.eta or not lo <= step.index < hi:
            return source, target
        y0 = ctx.scratch.get(self)
        if y0 is None:
            y0 = ctx.scratch[self] = ctx.load(ctx.inv.source)
        eta = self.eta
        source = (1 - eta) * source + eta * y0
        if target is not None:
            target = (1 - eta) * target + eta * y0
        return source, target


@register
class RFInversion(InversionMethod):
    """RF-Inversion (Rout et al. 2025) for rectified-flow models."""
    name = "rf"
    label = "RF-Inversion"
    Params = RFParams

    def invert(self, run, p):
        return ode_invert(run, 0, p.gamma)

    replay_step = staticmethod(euler_replay_step)

    def hooks(self, inv, p):
        return [PullToSource(p.eta, p.start, p.stop)] + super().hooks(inv, p)
