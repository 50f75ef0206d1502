"""The denoiser toolkit: one set of formulas for EPS, v-prediction and flow models.

ComfyUI samples in k-diffusion coordinates: a latent x at noise level sigma and the model's x0
prediction ("denoised"). Two latent spaces exist:
  * "ve"   (EPS, V_PREDICTION, EDM, X0 ...):  x = x0 + sigma * eps
  * "flow" (CONST: SD3, Flux, AuraFlow ...):  x = (1 - sigma) * x0 + sigma * eps
In both, d = (x - x0) / sigma is the ODE derivative (eps in "ve", the rectified-flow velocity
eps - x0 in "flow"), and the deterministic DDIM step equals the Euler step. Every inversion or
editing sampler in EditKit uses these functions instead of branching on the model type.
"""
from __future__ import annotations

import math

import torch

from .introspect import model_sampling


def space(ms) -> str:
    import comfy.model_sampling as M
    return "flow" if isinstance(ms, M.CONST) else "ve"


def _s(sigma, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or per-batch sigma against a latent."""
    sigma = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    if sigma.ndim == 0 or sigma.numel() == 1:
        return sigma.reshape(())
    return sigma.reshape(sigma.shape[:1] + (1,) * (like.ndim - 1))


def add_noise(ms, x0: torch.Tensor, eps: torch.Tensor, sigma) -> torch.Tensor:
    """The latent at noise level sigma for a clean latent x0 and unit noise eps."""
    s = _s(sigma, x0)
    if space(ms) == "flow":
        return (1.0 - s) * x0 + s * eps
    return x0 + s * eps


def renoise(ms, x: torch.Tensor, sigma, sigma_to, eps: torch.Tensor) -> torch.Tensor:
    """A latent at level sigma re-noised forward to the higher level sigma_to with fresh unit noise eps, so that
    add_noise(x0, e, sigma) becomes add_noise(x0, e', sigma_to) in distribution (RePaint's jump back): EPS / v
    x + sqrt(st^2 - s^2) eps; flow a x + sqrt(st^2 - a^2 s^2) eps with a = (1 - st) / (1 - s)."""
    s, st = float(sigma), float(sigma_to)
    if space(ms) == "flow":
        a = (1.0 - st) / max(1.0 - s, 1e-12)
        return a * x + max(st * st - a * a * s * s, 0.0) ** 0.5 * eps
    return x + max(st * st - s * s, 0.0) ** 0.5 * eps


def to_eps(ms, x: torch.Tensor, x0: torch.Tensor, sigma) -> torch.Tensor:
    s = _s(sigma, x)
    if space(ms) == "flow":
        return (x - (1.0 - s) * x0) / s
    return (x - x0) / s


def to_x0(ms, x: torch.Tensor, eps: torch.Tensor, sigma) -> torch.Tensor:
    s = _s(sigma, x)
    if space(ms) == "flow":
        return (x - s * eps) / (1.0 - s)
    return x - s * eps


def derivative(x: torch.Tensor, x0: torch.Tensor, sigma) -> torch.Tensor:
    """k-diffusion's d = (x - x0) / sigma: eps ("ve") or velocity eps - x0 ("flow")."""
    return (x - x0) / _s(sigma, x)


def velocity(ms, x: torch.Tensor, x0: torch.Tensor, sigma) -> torch.Tensor:
    """Rectified-flow velocity v = eps - x0 (flow models); for "ve" models, d/dsigma of x, i.e. eps."""
    return derivative(x, x0, sigma)


def native_output(ms, x: torch.Tensor, x0: torch.Tensor, sigma) -> torch.Tensor:
    """The network output that gives x0 at (x, sigma): eps (EPS), v (v-prediction, EDM's sigma_data
    included), eps - x0 (flow), x0 (X0). Every ComfyUI model_sampling is affine in the network output,
    x0 = D(0) + (D(1) - D(0)) * F, so inverting its own calculate_denoised covers them all. Undefined
    where sigma is 0 for every parameterization but X0."""
    sig = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).flatten()
    sig = sig.expand(x.shape[0]) if sig.numel() == 1 else sig
    at0 = ms.calculate_denoised(sig, torch.zeros_like(x), x)
    slope = ms.calculate_denoised(sig, torch.ones_like(x), x) - at0
    return (x0 - at0) / slope


def ddim_step(ms, x: torch.Tensor, x0: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """Deterministic step from sigma to sigma_next given the model's x0 at (x, sigma).

    Works in both directions: sigma_next < sigma denoises (DDIM / Euler), sigma_next > sigma
    inverts (DDIM inversion: the noise predicted at x is reused at the higher level).
    """
    return add_noise(ms, x0, to_eps(ms, x, x0, sigma), sigma_next)


def initial_latent(ms, noise: torch.Tensor, latent: torch.Tensor, sigma, max_denoise: bool = False) -> torch.Tensor:
    """What ComfyUI's KSAMPLER starts from (model_sampling.noise_scaling)."""
    return ms.noise_scaling(torch.as_tensor(sigma, dtype=noise.dtype, device=noise.device), noise, latent, max_denoise)


def to_resumable(ms, x: torch.Tensor, sigma) -> torch.Tensor:
    """Store a noisy sampler-space latent the way ComfyUI hands partial results between samplers.

    KSAMPLER returns inverse_noise_scaling(sigma_end, x) and starts from noise_scaling(sigma_0, 0, latent),
    so a LATENT that a later sampler resumes with zero noise must be in this form (identity for
    "ve"; x / (1 - sigma) for flow). Undefined for a flow latent at sigma = 1.
    """
    return ms.inverse_noise_scaling(torch.as_tensor(sigma, dtype=x.dtype, device=x.device), x)


def is_max_sigma(ms, sigma) -> bool:
    """KSAMPLER.max_denoise's test: sigma at (or above) the model's maximum."""
    sigma_max = float(ms.sigma_max)
    return math.isclose(sigma_max, float(sigma), rel_tol=1e-05) or float(sigma) > sigma_max


def sigma_at(ms, t: float) -> float:
    """Noise level at diffusion time t in [0, 1] (t = 1: pure noise, t = 0: clean)."""
    if t >= 1.0:
        return float(ms.sigma_max)
    if t <= 0.0:
        return 0.0
    return float(ms.percent_to_sigma(1.0 - t))


def step_index(sigmas: torch.Tensor, sigma) -> int:
    """Index of the schedule entry nearest to sigma (ComfyUI passes the current sigma, not a step)."""
    sig = float(torch.as_tensor(sigma).flatten()[0])
    sched = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
    return int(torch.argmin((sched - sig).abs()).item())


def progress(sigmas: torch.Tensor, sigma) -> float:
    """Sampling progress in [0, 1] for sigma within a schedule (0 at the first step)."""
    n = max(len(sigmas) - 1, 1)
    return step_index(sigmas, sigma) / n


def schedule(model, scheduler: str, steps: int) -> torch.Tensor:
    import comfy.samplers
    return comfy.samplers.calculate_sigmas(model_sampling(model), scheduler, steps).cpu()


def model_conds(model, conditioning, x: torch.Tensor, prompt_type: str = "positive") -> dict:
    """Model keyword arguments (c_crossattn, y, guidance, ...) for a CONDITIONING, as the sampler builds them."""
    import comfy.samplers
    import comfy.sampler_helpers
    base = model.model
    conds = comfy.samplers.encode_model_conds(base.extra_conds, comfy.sampler_helpers.convert_cond(conditioning),
                                              x, x.device, prompt_type)
    return {k: v.process_cond(batch_size=x.shape[0], device=x.device, area=None).cond
            for k, v in conds[0]["model_conds"].items()}


def predict_x0(model, x: torch.Tensor, sigma, conditioning, transformer_options: dict | None = None) -> torch.Tensor:
    """x0 for a sampler-space latent outside a sampling loop (loads the model first)."""
    import comfy.model_management
    comfy.model_management.load_models_gpu([model])
    sig = torch.as_tensor(sigma, dtype=torch.float32).flatten().to(x.device)
    if sig.numel() == 1:
        sig = sig.expand(x.shape[0])
    kw = model_conds(model, conditioning, x)
    opts = dict(model.model_options.get("transformer_options", {}))
    if transformer_options:
        opts.update(transformer_options)
    return model.model.apply_model(x, sig, transformer_options=opts, **kw)
