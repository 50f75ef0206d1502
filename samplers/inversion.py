"""Real-image inversion: DDIM/Euler (+ fixed-point refinement), NPI, EDICT, edit-friendly DDPM and
RF-Inversion, all on one model-agnostic step (core/denoiser conventions: sampler-space latents,
k-diffusion sigmas, x0 predictions; EPS, v-prediction and flow models alike).

Conventions shared with samplers/replay.py (so a replay retraces an inversion step for step):
  * the schedule `sigmas` is the descending *sampling* schedule (sigmas[-1] == 0);
  * a sampling step is Euler, x' = x + (x - x0(x, s)) / s * (s' - s), which is DDIM for every model;
  * an inversion step from the lower level s' to s evaluates the model at the *target* level s with the
    known lower latent (classic DDIM inversion, eps(x_{t-1}, t)), and fixed-point refinement then
    solves x = x' + (s - s') * d(x, s) exactly (AIDI / ReNoise style), so that the sampling step
    from x lands on x' .

Every function here runs inside a BranchGuider sampling context (see branch_guider.run).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ..core import denoiser
from .branch_guider import BranchGuider, BranchSpec, make_guider
from .trajectory import EditKitInversion, model_identity, to_storage, work_dtype


# ---------------------------------------------------------------------------------------------
# Elementary steps
# ---------------------------------------------------------------------------------------------

def euler_step(x: torch.Tensor, den: torch.Tensor, s, s_next) -> torch.Tensor:
    """Deterministic step (DDIM == Euler) written exactly as k-diffusion's sample_euler does."""
    d = (x - den) / s
    return x + d * (s_next - s)


def ve_sigma(ms, s: float) -> float:
    """The noise level in variance-exploding units (flow latents x / (1 - s) are VE at s / (1 - s))."""
    if denoiser.space(ms) == "flow":
        return math.inf if s >= 1.0 else s / (1.0 - s)
    return s


def ddpm_posterior(ms, x: torch.Tensor, den: torch.Tensor, s: float, s_next: float):
    """Mean and std of the DDPM (eta = 1) posterior q(x_{s'} | x_s, x0 = den), for any model space."""
    if s_next <= 0.0:
        return den.clone(), 0.0
    v, v_next = ve_sigma(ms, s), ve_sigma(ms, s_next)
    rho = 0.0 if math.isinf(v) else v_next / v
    eps = denoiser.to_eps(ms, x, den, s) if rho > 0 else torch.zeros_like(x)
    mean = denoiser.add_noise(ms, den, rho * eps, s_next)
    return mean, s_next * math.sqrt(max(0.0, 1.0 - rho * rho))


def vp_scale(ms, s: float) -> float:
    """Factor that brings a sampler-space latent at level s to unit (VP-like) scale (NTI's loss units)."""
    return 1.0 if denoiser.space(ms) == "flow" else 1.0 / math.sqrt(1.0 + s * s)


def _progress(total: int, model=None):
    """Progress bar (with ComfyUI's latent previews of `model`) over `total` model evaluations."""
    from ..core.progress import StepProgress
    return StepProgress(model, total)


def _sig(sigmas, i, like):
    return sigmas[i].to(device=like.device, dtype=like.dtype)


# ---------------------------------------------------------------------------------------------
# Programs (run inside BranchGuider.run)
# ---------------------------------------------------------------------------------------------

def ode_inversion_program(x0: torch.Tensor, spec: BranchSpec, fixed_point: int, record: dict,
                          gamma: float = 0.0, noise: Optional[torch.Tensor] = None, pbar=None) -> Callable:
    """DDIM/Euler inversion (gamma = 0) or RF-Inversion's controlled forward ODE (gamma > 0, toward `noise`)."""

    def program(guider: BranchGuider, sigmas, extra_args, callback, _noise, _latent, disable_pbar):
        mo = extra_args["model_options"]
        dev = _latent.device
        wd = work_dtype(dev)
        x = x0.to(dev, wd)
        y1 = noise.to(dev, wd) if noise is not None else None
        n = len(sigmas) - 1
        lat = [None] * (n + 1)
        lat[n] = to_storage(x)
        for k in range(n - 1, -1, -1):
            s_lo, s_hi = _sig(sigmas, k + 1, x), _sig(sigmas, k, x)
            den = guider.x0(x, s_hi, spec, mo)
            d = (x - den) / s_hi
            if gamma:
                d = d + gamma * ((y1 - x) / (1.0 - s_lo) - d)
            x_hi = x + d * (s_hi - s_lo)
            for _ in range(fixed_point):
                den = guider.x0(x_hi, s_hi, spec, mo)
                x_hi = x + (x_hi - den) / s_hi * (s_hi - s_lo)
            x = x_hi
            lat[k] = to_storage(x)
            if pbar is not None:
                pbar.update(1 + fixed_point, den)
        record["latents"] = lat
        record["nfe"] = getattr(guider, "evaluations", 0)
        return x

    return program


def edict_inversion_program(x0: torch.Tensor, spec: BranchSpec, p: float, record: dict, pbar=None) -> Callable:
    """EDICT (Wallace et al. 2023): exact inversion of the coupled sampler of replay.edict_step."""

    def program(guider: BranchGuider, sigmas, extra_args, callback, _noise, _latent, disable_pbar):
        mo = extra_args["model_options"]
        x = x0.to(_latent.device, work_dtype(_latent.device))
        y = x.clone()
        n = len(sigmas) - 1
        xs, ys = [None] * (n + 1), [None] * (n + 1)
        xs[n], ys[n] = to_storage(x), to_storage(y)
        for k in range(n - 1, -1, -1):
            s_lo, s_hi = _sig(sigmas, k + 1, x), _sig(sigmas, k, x)
            dt = s_lo - s_hi
            y_inter = (y - (1 - p) * x) / p
            x_inter = (x - (1 - p) * y_inter) / p
            den = guider.x0(x_inter, s_hi, spec, mo)
            y = y_inter - (x_inter - den) / s_hi * dt
            den = guider.x0(y, s_hi, spec, mo)
            x = x_inter - (y - den) / s_hi * dt
            xs[k], ys[k] = to_storage(x), to_storage(y)
            if pbar is not None:
                pbar.update(2, den)
        record.update(latents=xs, pair=ys, nfe=getattr(guider, "evaluations", 0))
        return x

    return program


def ddpm_inversion_program(x0: torch.Tensor, spec: BranchSpec, seed: int, record: dict, pbar=None) -> Callable:
    """Edit-friendly DDPM inversion (Huberman-Spiegelglas et al. 2024): independent noisy latents at every
    level, then the residual of each DDPM step, so replaying the residuals reproduces them exactly."""

    def program(guider: BranchGuider, sigmas, extra_args, callback, _noise, _latent, disable_pbar):
        mo = extra_args["model_options"]
        ms = guider.inner_model.model_sampling
        dev = _latent.device
        x = x0.to(dev, work_dtype(dev))
        n = len(sigmas) - 1
        gen = torch.Generator().manual_seed(int(seed))
        noisy = []
        for i in range(n):
            eps = torch.randn(x.shape, generator=gen, dtype=torch.float32).to(dev, x.dtype)
            noisy.append(denoiser.add_noise(ms, x, eps, float(sigmas[i])))
        noisy.append(x)
        residuals, stds = [], []
        for i in range(n):
            s, s_next = float(sigmas[i]), float(sigmas[i + 1])
            den = guider.x0(noisy[i], _sig(sigmas, i, x), spec, mo)
            mean, std = ddpm_posterior(ms, noisy[i], den, s, s_next)
            residuals.append(to_storage(noisy[i + 1] - mean))
            stds.append(std)
            if pbar is not None:
                pbar.update(1, den)
        record.update(latents=[to_storage(t) for t in noisy], residuals=residuals, noise_std=stds,
                      nfe=getattr(guider, "evaluations", 0))
        return noisy[0]

    return program


# ---------------------------------------------------------------------------------------------
# Entry points used by the nodes
# ---------------------------------------------------------------------------------------------

def _prepare(model, latent: torch.Tensor):
    import comfy.sample
    samples = comfy.sample.fix_empty_latent_channels(model, latent)
    return model.model.process_latent_in(samples.float())


def _source_spec(cfg: float, negative) -> BranchSpec:
    return BranchSpec("positive", "negative" if negative is not None else None, float(cfg))


def invert(model, latent: torch.Tensor, positive, negative, cfg: float, sigmas: torch.Tensor, method: str = "ddim",
           fixed_point: int = 0, gamma: float = 0.0, noise: Optional[torch.Tensor] = None, seed: int = 0,
           mix: float = 0.93, settings: Optional[dict] = None) -> EditKitInversion:
    """Invert `latent` (user space, B x C x H x W) along `sigmas` with one of the deterministic methods.

    method: "ddim" (also the pivot of NPI/NTI), "rf" (gamma, noise), "edict" (mix), "ddpm" (seed).
    """
    x0 = _prepare(model, latent)
    spec = _source_spec(cfg, negative)
    n = len(sigmas) - 1
    record: dict = {}
    if method == "edict":
        pbar = _progress(2 * n, model)
        program = edict_inversion_program(x0, spec, mix, record, pbar)
    elif method == "ddpm":
        pbar = _progress(n, model)
        program = ddpm_inversion_program(x0, spec, seed, record, pbar)
    else:
        pbar = _progress(n * (1 + fixed_point), model)
        program = ode_inversion_program(x0, spec, fixed_point, record, gamma=gamma, noise=noise, pbar=pbar)
    guider = make_guider(model, {"positive": positive, "negative": negative}, cfg)
    guider.run(program, sigmas, tuple(x0.shape))
    settings = dict(settings or {})
    return EditKitInversion(
        method=method, sigmas=sigmas.detach().float().cpu().clone(), latents=record["latents"], positive=positive,
        negative=negative, cfg=float(cfg), identity=model_identity(model), settings=settings,
        pair=record.get("pair"), residuals=record.get("residuals"), noise_std=record.get("noise_std"),
        noise=to_storage(noise) if noise is not None else None,
        stats={"nfe": int(record.get("nfe", 0))})


def latent_out(model, inv: EditKitInversion, index: Optional[int] = None) -> torch.Tensor:
    """A stored latent in user space (LATENT convention)."""
    idx = inv.start_index if index is None else index
    return model.model.process_latent_out(inv.latents[idx].float().clone())
