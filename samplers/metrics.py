"""Reconstruction metrics: PSNR, SSIM (kornia), latent errors and a difference heat map. No node classes."""
from __future__ import annotations

import math

import torch

from ..core import imaging


def _bchw(image: torch.Tensor) -> torch.Tensor:
    return image[..., :3].permute(0, 3, 1, 2).float().clamp(0, 1)


def psnr(image: torch.Tensor, reconstruction: torch.Tensor) -> float:
    """Mean PSNR (dB) over the batch of IMAGE tensors (B, H, W, C) in [0, 1]; inf for identical images."""
    mse = ((_bchw(image) - _bchw(reconstruction)) ** 2).flatten(1).mean(1)
    vals = [math.inf if float(m) == 0.0 else 10.0 * math.log10(1.0 / float(m)) for m in mse]
    return float(sum(vals) / len(vals))


def ssim(image: torch.Tensor, reconstruction: torch.Tensor) -> float:
    """Mean SSIM (kornia, Gaussian window 11 or the largest odd size that fits)."""
    import kornia
    a, b = _bchw(image), _bchw(reconstruction)
    win = min(11, min(a.shape[-2:]))
    win = win if win % 2 else win - 1
    return float(kornia.metrics.ssim(a, b, max(win, 1), max_val=1.0).mean())


def latent_errors(latent: torch.Tensor, reconstruction: torch.Tensor) -> tuple[float, float]:
    d = (latent.float() - reconstruction.float()).abs()
    return float(d.max()), float(d.mean())


def heatmap(image: torch.Tensor, reconstruction: torch.Tensor, colormap: str = "inferno") -> tuple[torch.Tensor, float]:
    """Per-pixel absolute difference (channel mean) as a colour image, scaled to its maximum; returns (IMAGE, max)."""
    diff = (image[..., :3].float() - reconstruction[..., :3].float()).abs().mean(-1)   # (B, H, W)
    top = float(diff.max())
    rgb = imaging.colorize(diff / max(top, 1e-8), colormap)
    labelled = torch.stack([imaging.label(rgb[i], f"max |diff| {top:.3g}") for i in range(rgb.shape[0])])
    return labelled, top


def broadcast_pair(a: torch.Tensor, b: torch.Tensor):
    if a.shape[0] == b.shape[0]:
        return a, b
    if a.shape[0] == 1:
        return a.expand(b.shape[0], *a.shape[1:]), b
    if b.shape[0] == 1:
        return a, b.expand(a.shape[0], *b.shape[1:])
    raise ValueError(f"batch sizes {a.shape[0]} and {b.shape[0]} do not match")
