"""The diffusion training objective, one code path for every parameterization.

A clean latent x0, unit noise eps and a noise level sigma give the noisy latent through the model's own
latent space (core.denoiser.add_noise: x0 + sigma eps, or (1 - sigma) x0 + sigma eps for flow). The
target is what the network itself should output there: `denoiser.native_output(ms, x_t, x0, sigma)`,
i.e. the inverse of the model's own calculate_denoised at the true x0 -- eps for EPS models,
v = (eps - sigma x0) / sqrt(1 + sigma^2) for v-prediction, eps - x0 for flow. The loss is the mean
squared error between the network's output (`Prediction.native`) and that target.

Timesteps are drawn uniformly over the model's own discrete training schedule (`model_sampling.sigmas`,
the shifted schedule on flow models), as each family was trained."""
from __future__ import annotations

import torch

from ..core import denoiser


def sample_sigmas(ms, n: int, generator: torch.Generator) -> torch.Tensor:
    """n noise levels drawn uniformly from the model's training schedule (float32, CPU)."""
    table = ms.sigmas.detach().float().cpu()
    idx = torch.randint(0, table.numel(), (n,), generator=generator)
    return table[idx]


def noisy_latent(ms, x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return denoiser.add_noise(ms, x0, eps, sigma)


def target(ms, x_t: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The network output that predicts exactly x0 at (x_t, sigma)."""
    return denoiser.native_output(ms, x_t, x0, sigma)


def network_input(ms, x_t: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, timestep) the raw network takes at (x_t, sigma), as ComfyUI's BaseModel.apply_model scales them
    (for a direct call of the diffusion network outside a ModelPatcher)."""
    return ms.calculate_input(sigma, x_t), ms.timestep(sigma)


def mse_rows(native: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """Mean squared error per batch row (fp32)."""
    return (native.float() - tgt.float()).square().flatten(1).mean(1)


def min_snr_weight(ms, sigma: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) for the native-output loss: min(SNR, gamma) / c(sigma),
    where c is what the native loss weighs the x0 error with (SNR for EPS, SNR + 1 for v-prediction, 1 / sigma^2
    for flow's velocity). SNR = 1 / sigma^2 in the "ve" space, ((1 - sigma) / sigma)^2 for flow."""
    import comfy.model_sampling as M
    s = sigma.float()
    if denoiser.space(ms) == "flow":
        snr, c = ((1 - s) / s) ** 2, 1 / s ** 2
    else:
        snr = 1 / s ** 2
        c = snr + 1 if isinstance(ms, M.V_PREDICTION) else snr
    return torch.clamp(snr, max=gamma) / c


def per_row_loss(prediction, x0: torch.Tensor) -> torch.Tensor:
    """Mean squared error per batch row between the network output and its target (differentiable)."""
    ms, x_t, sigma = prediction.model_sampling, prediction.x, prediction.sigma
    with torch.no_grad():
        tgt = target(ms, x_t.detach(), x0, sigma.detach())
    return mse_rows(prediction.native, tgt)
