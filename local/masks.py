"""Masks for local editing: MASK (B, H, W) at image or latent size -> a per-pixel strength at latent size,
and the small morphology the mask nodes offer (dilate, blur). Pure torch, no node classes.

ComfyUI's latents are the image downscaled by 8 in every supported family (SD1.x, SDXL, SD3, Flux and the
toy model), so a mask of the image's pixel size and a mask of the latent's size are both accepted.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.errors import EditKitInputError

DOWNSCALE = 8


def _as_bhw(mask: torch.Tensor, node: str, input_name: str) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise EditKitInputError(node, input_name, "not a MASK", "connect a MASK output (e.g. EditKit DiffEdit Mask)")
    m = mask.float()
    if m.ndim == 2:
        m = m.unsqueeze(0)
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.ndim != 3:
        raise EditKitInputError(node, input_name, f"a mask of shape {tuple(mask.shape)} is not a MASK (B, H, W)",
                                "connect a MASK output")
    return m


def to_latent(mask: torch.Tensor, latent_shape, node: str, input_name: str = "mask",
              allow_empty: bool = False) -> torch.Tensor:
    """A (B, 1, h, w) strength in [0, 1] at the latent's size from a MASK at the latent's or the image's size.

    Batch: 1 (shared) or the latent's. Any other size or batch is an error naming what was expected; an
    all-zero mask is "nothing to edit" unless allow_empty."""
    m = _as_bhw(mask, node, input_name)
    b, h, w = int(latent_shape[0]), int(latent_shape[-2]), int(latent_shape[-1])
    if m.shape[0] not in (1, b):
        raise EditKitInputError(node, input_name, f"the mask holds {m.shape[0]} masks for a latent batch of {b}",
                                f"give one mask (shared) or {b} masks")
    mh, mw = int(m.shape[-2]), int(m.shape[-1])
    if (mh, mw) == (h, w):
        out = m
    elif (mh, mw) == (h * DOWNSCALE, w * DOWNSCALE):
        out = F.interpolate(m.unsqueeze(1), size=(h, w), mode="area")[:, 0]
    else:
        raise EditKitInputError(node, input_name,
                                f"a {mw}x{mh} mask does not fit a {w * DOWNSCALE}x{h * DOWNSCALE} image "
                                f"(latent {w}x{h})",
                                f"give a mask of the image's size ({w * DOWNSCALE}x{h * DOWNSCALE}) or the latent's "
                                f"({w}x{h}); resize it with a mask/image scale node")
    out = out.clamp(0.0, 1.0)
    if not allow_empty and float(out.max()) <= 0.0:
        raise EditKitInputError(node, input_name, "the mask is empty: nothing to edit",
                                "paint the region to change, or lower the DiffEdit threshold")
    if out.shape[0] != b:
        out = out.expand(b, -1, -1)
    return out.unsqueeze(1).contiguous()


def dilate(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """Grow a (B, H, W) mask by `pixels` (a square max filter)."""
    if pixels <= 0:
        return mask
    k = 2 * int(pixels) + 1
    return F.max_pool2d(mask.unsqueeze(1), k, stride=1, padding=int(pixels))[:, 0]


def blur(mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur (std `sigma` pixels) of a (B, H, W) mask: soft edges, values stay in [0, 1]."""
    if sigma <= 0:
        return mask
    r = max(1, int(round(3 * sigma)))
    x = torch.arange(-r, r + 1, dtype=torch.float32, device=mask.device)
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    g = (g / g.sum()).to(mask.dtype)
    m = mask.unsqueeze(1)
    m = F.conv2d(F.pad(m, (r, r, 0, 0), mode="replicate"), g.view(1, 1, 1, -1))
    m = F.conv2d(F.pad(m, (0, 0, r, r), mode="replicate"), g.view(1, 1, -1, 1))
    return m[:, 0].clamp(0.0, 1.0)
