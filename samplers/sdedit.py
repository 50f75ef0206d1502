"""SDEdit (Meng et al. 2022): noise a guide latent to time t0, then denoise it with the text prompt.

t0 in (0, 1] is diffusion time: sigma(t0) is the model's own noise level at that time, so the
same strength means the same signal-to-noise ratio on EPS, v-prediction and flow models.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core import denoiser


MAX_FULL_SCHEDULE = 10_000  # grid points of the full schedule the tail is cut from (KSampler-like)


def sdedit_sigmas(ms, full_schedule_fn, steps: int, t0: float) -> torch.Tensor:
    """Remaining schedule from sigma(t0) to 0 with `steps` steps.

    Built like KSampler's `denoise`: a full schedule of int(steps / t0) steps, keep the last
    steps + 1 entries, and pin the first to sigma(t0) exactly, so the start noise level is the
    one the strength names and KSampler(denoise=t0) runs the same tail.

    The full schedule is bounded (MAX_FULL_SCHEDULE): a tiny strength (1e-6 asked for 8 million
    steps) keeps the tail of the bounded grid below sigma(t0), i.e. fewer steps, never a hang.
    """
    total = steps if t0 >= 1.0 else max(steps, min(int(steps / t0), MAX_FULL_SCHEDULE))
    full = full_schedule_fn(total)
    tail = full[-(steps + 1):].clone()
    sigma0 = denoiser.sigma_at(ms, t0)
    if t0 < 1.0:
        tail[0] = sigma0
        if len(tail) > 1 and tail[1] >= tail[0]:  # a scheduler grid coarser than t0: keep it descending
            tail = torch.cat([tail[:1], tail[1:][tail[1:] < sigma0]])
    return tail


@dataclass
class SDEditStart:
    """What SamplerCustomAdvanced needs to start exactly at x_t0."""
    noised: torch.Tensor     # resumable latent (user space, ComfyUI's partial-result convention)
    sampler_noise: torch.Tensor  # the NOISE the sampler must add on top (zeros except flow at sigma = 1)
    x_t0: torch.Tensor       # the noisy latent in sampler space (for tests and previews)


def sdedit_start(latent_format_in, latent_format_out, ms, latent: torch.Tensor, noise: torch.Tensor, sigma0: float) -> SDEditStart:
    """Noise `latent` (user space) to sigma0 with unit noise `noise`.

    t0 = 1 (sigma0 at the model's maximum) is plain txt2img from that noise: the guide is
    forgotten exactly as KSampler does for an empty latent.
    """
    x = latent_format_in(latent)
    at_max = denoiser.is_max_sigma(ms, sigma0)
    if at_max:
        x_t0 = denoiser.initial_latent(ms, noise, torch.zeros_like(x), sigma0, max_denoise=True)
    else:
        x_t0 = denoiser.add_noise(ms, x, noise, sigma0)
    if denoiser.space(ms) == "flow" and at_max and float(sigma0) >= 1.0:
        # A flow latent at sigma = 1 cannot be stored as x / (1 - sigma): hand the sampler the noise itself;
        # its noise_scaling(1, noise, anything) is the noise.
        return SDEditStart(torch.zeros_like(latent), noise.clone(), x_t0)
    noised = latent_format_out(denoiser.to_resumable(ms, x_t0, sigma0))
    return SDEditStart(noised, torch.zeros_like(noise), x_t0)


class PreparedNoise:
    """A NOISE object (SamplerCustomAdvanced socket) that returns a precomputed tensor."""

    def __init__(self, noise: torch.Tensor, seed: int):
        self.noise, self.seed = noise, seed

    def generate_noise(self, input_latent):
        samples = input_latent["samples"]
        if tuple(samples.shape) != tuple(self.noise.shape):
            raise ValueError("EditKitSDEdit: the latent given to the sampler is not the one EditKitSDEdit produced "
                             f"(shape {tuple(samples.shape)} vs {tuple(self.noise.shape)}); connect its 'latent' output")
        return self.noise.clone()
