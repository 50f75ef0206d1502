"""Real-image inversion: the entry point over the inversion-method registry (samplers/methods/: DDIM/Euler
(+ fixed-point refinement), NPI, NTI, EDICT, edit-friendly DDPM and RF-Inversion), all on one
model-agnostic step (samplers/steps.py; core/denoiser conventions: sampler-space latents, k-diffusion
sigmas, x0 predictions; EPS, v-prediction and flow models alike).

Conventions shared with samplers/replay.py (so a replay retraces an inversion step for step):
  * the schedule `sigmas` is the descending *sampling* schedule (sigmas[-1] == 0);
  * a sampling step is Euler, which is DDIM for every model (steps.euler_step);
  * every inversion loop runs inside a BranchGuider sampling context (branch_guider.call).
"""
from __future__ import annotations

from typing import Optional

import torch

from .methods import get_method
from .steps import (ddpm_posterior, euler_step, prepare_latent, progress_bar, sigma_at, ve_sigma,  # noqa: F401
                    vp_scale)
from .trajectory import EditKitInversion

# Old names (samplers/null_text.py imports them from here).
_prepare, _progress, _sig = prepare_latent, progress_bar, sigma_at
_ALIASES = {"fixed_point": "fixed_point_iterations"}


def invert(model, latent: torch.Tensor, positive, negative, cfg: float, sigmas: torch.Tensor, method: str = "ddim",
           params=None, *, noise: Optional[torch.Tensor] = None, settings: Optional[dict] = None,
           **param_values) -> EditKitInversion:
    """Invert `latent` (user space, B x C x H x W) along `sigmas` with a registered method.

    params: the method's Params (default: its defaults), changed by keyword values (`fixed_point=` is
    `fixed_point_iterations`); noise: RF-Inversion's noise target; settings: display entries (steps,
    scheduler) stored in front of the parameters.
    """
    m = get_method(method)
    p = m.make_params(params, **{_ALIASES.get(k, k): v for k, v in param_values.items()})
    return m.make(model, latent, positive, negative, cfg, sigmas, p, noise=noise, settings=settings)


def latent_out(model, inv: EditKitInversion, index: Optional[int] = None) -> torch.Tensor:
    """A stored latent in user space (LATENT convention)."""
    idx = inv.start_index if index is None else index
    return model.model.process_latent_out(inv.latents[idx].float().clone())
