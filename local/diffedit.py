"""DiffEdit's automatic mask (Couairon et al. 2023, "DiffEdit: Diffusion-based semantic image editing with
mask guidance"): where do the noise predictions under a reference prompt R and a query prompt Q differ?

The image latent is noised to the encode ratio (diffusion time t, 0.5 in the paper) with n noise draws
(10 in the paper); for each draw the model predicts the noise under R and under Q (both in ONE batched
model call, the branch contract of core/branches.py); |eps_Q - eps_R| is averaged over the channels and the
draws, rescaled to [0, 1] per image and binarised at a threshold (0.5).

Model-agnostic: at a fixed latent x and level sigma every parameterization's noise prediction is affine in
its x0 prediction with the same slope for both prompts (eps = (x - a x0) / s with a = 1 for EPS / v models
and a = 1 - s for flow models), so |eps_Q - eps_R| = (a / s) |x0_Q - x0_R|. The map is computed from the x0
predictions ComfyUI's model_sampling gives (EPS, v-prediction, flow; UNets and DiTs alike); the scalar a / s
disappears in the rescaling, and the map stays defined at sigma = 1 of a flow model, where eps = x.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core import denoiser
from ..core.introspect import model_sampling
from ..samplers.branch_guider import BranchSpec, make_guider
from ..samplers.steps import prepare_latent
from . import masks as M

PAPER_N = 10
PAPER_RATIO = 0.5
PAPER_THRESHOLD = 0.5


@dataclass
class DiffEditMap:
    raw: torch.Tensor          # (B, h, w) mean |eps_Q - eps_R| at latent size (before rescaling)
    normalized: torch.Tensor   # (B, h, w) rescaled to [0, 1] per image
    sigma: float               # the noise level of the encode ratio
    evaluations: int           # batched model calls (each holds both prompts: 2 n model evaluations)


def noise_difference(model, latent: torch.Tensor, reference, query, n: int = PAPER_N, ratio: float = PAPER_RATIO,
                     seed: int = 0, progress=None) -> DiffEditMap:
    """The DiffEdit noise-difference map of a user-space latent (B, C, h, w) for CONDITIONINGs reference and
    query. progress: optional callable(done, total) after each draw."""
    ms = model_sampling(model)
    sigma = denoiser.sigma_at(ms, float(ratio))
    x0_user = latent.float()
    x_in = prepare_latent(model, x0_user)
    guider = make_guider(model, {"reference": reference, "query": query}, 1.0)
    specs = [BranchSpec("reference", None, 1.0), BranchSpec("query", None, 1.0)]
    gen = torch.Generator().manual_seed(int(seed))
    draws = [torch.randn(x_in.shape, generator=gen) for _ in range(int(n))]

    def loop(g, sig, extra_args, latent_image):
        dev = latent_image.device
        x0 = x_in.to(dev, torch.float32)
        s = torch.tensor(sigma, dtype=torch.float32, device=dev)
        acc = torch.zeros(x0.shape[0], x0.shape[-2], x0.shape[-1], dtype=torch.float32, device=dev)
        for k, eps in enumerate(draws):
            x = denoiser.add_noise(ms, x0, eps.to(dev), s)
            ref, qry = g.evaluate([x, x], s, specs, extra_args["model_options"])
            acc += (qry.float() - ref.float()).abs().mean(dim=1)
            if progress is not None:
                progress(k + 1, len(draws))
        return acc / max(len(draws), 1)

    sigmas = torch.tensor([max(sigma, 1e-4), 0.0])
    raw = guider.call(loop, sigmas, tuple(x_in.shape)).cpu()
    lo = raw.flatten(1).min(dim=1).values.view(-1, 1, 1)
    hi = raw.flatten(1).max(dim=1).values.view(-1, 1, 1)
    span = hi - lo
    normalized = torch.where(span > 0, (raw - lo) / span.clamp(min=1e-12), torch.zeros_like(raw))
    return DiffEditMap(raw, normalized, float(sigma), int(getattr(guider, "evaluations", 0)))


def make_mask(normalized: torch.Tensor, size, threshold: float = PAPER_THRESHOLD, dilate_px: int = 0,
              blur_px: float = 0.0) -> torch.Tensor:
    """The MASK (B, H, W) at `size` (H, W): the rescaled map upsampled, binarised at threshold, grown by
    dilate_px pixels and blurred (std blur_px pixels: soft edges = per-pixel strength of masked decoding)."""
    up = F.interpolate(normalized.unsqueeze(1).float(), size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    mask = (up >= float(threshold)).float()
    mask = M.dilate(mask, int(dilate_px))
    return M.blur(mask, float(blur_px))
