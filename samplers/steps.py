"""Elementary steps shared by the inversion methods and their replays (pure functions of tensors and the
model's `model_sampling`; core/denoiser conventions: sampler-space latents, k-diffusion sigmas, x0).

  * a sampling step is Euler, x' = x + (x - x0(x, s)) / s * (s' - s), which is DDIM for every model;
  * the DDPM (eta = 1) posterior q(x_{s'} | x_s, x0) in any model space (edit-friendly DDPM).
"""
from __future__ import annotations

import math

import torch

from ..core import denoiser


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


def sigma_at(sigmas, i: int, like: torch.Tensor) -> torch.Tensor:
    """sigmas[i] on the device and in the dtype of `like`."""
    return sigmas[i].to(device=like.device, dtype=like.dtype)


def progress_bar(total: int, model=None):
    """Progress bar (with ComfyUI's latent previews of `model`) over `total` model evaluations."""
    from ..core.progress import StepProgress
    return StepProgress(model, total)


def prepare_latent(model, latent: torch.Tensor) -> torch.Tensor:
    """A user-space LATENT tensor in the model's sampler space (float32)."""
    import comfy.sample
    samples = comfy.sample.fix_empty_latent_channels(model, latent)
    return model.model.process_latent_in(samples.float())
