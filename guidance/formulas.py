"""Guidance formulas as plain tensor functions of x0 ("denoised") predictions.

Every formula works per sample, on predictions of shape (B, ...) for any latent rank; the terms
in `terms.py` call them from the guider's phases.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def _dims(t: torch.Tensor) -> tuple:
    return tuple(range(1, t.ndim))


def _bview(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    s = torch.as_tensor(s, dtype=like.dtype, device=like.device).flatten()
    if s.numel() == 1:
        s = s.expand(like.shape[0])
    return s.reshape((-1,) + (1,) * (like.ndim - 1))


def cfg_scale(base_cfg: float, weight: float) -> float:
    """Effective CFG scale for a schedule weight: the guidance above the conditional prediction scales."""
    if weight == 1.0:
        return base_cfg
    return 1.0 + (base_cfg - 1.0) * weight


def cond_for_scale(cond: torch.Tensor, uncond: torch.Tensor, scale: float, target: torch.Tensor) -> torch.Tensor:
    """The conditional prediction that makes linear CFG at `scale` give `target`: u + (target - u) / scale."""
    return uncond + (target - uncond) / scale


def project(v: torch.Tensor, onto: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Components of v parallel and orthogonal to `onto`, per sample."""
    dims = _dims(v)
    unit = torch.nn.functional.normalize(onto.double(), dim=dims)
    par = (v.double() * unit).sum(dim=dims, keepdim=True) * unit
    return par.to(v.dtype), (v.double() - par).to(v.dtype)


def apg_direction(cond: torch.Tensor, uncond: torch.Tensor, eta: float, norm_threshold: float, momentum: float,
                  running: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """APG (Sadat et al. 2024, Algorithm 1): the guidance direction replacing cond - uncond.

    diff = cond - uncond; with momentum beta: running = beta * running + diff, diff = running;
    diff *= min(1, r / ||diff||); diff = diff_orth + eta * diff_par (relative to cond).
    The guided prediction is cond + (w - 1) * diff. Returns (direction, new running average).
    """
    diff = cond - uncond
    new_running = running
    if momentum != 0:
        new_running = diff if running is None else momentum * running + diff
        diff = new_running
    if norm_threshold > 0:
        norm = diff.pow(2).sum(dim=_dims(diff), keepdim=True).sqrt()
        diff = diff * torch.minimum(torch.ones_like(norm), norm_threshold / norm.clamp_min(1e-12))
    par, orth = project(diff, cond)
    return orth + eta * par, new_running


def perp_component(neg: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Perp-Neg (Armandpour et al. 2023): the part of `neg` orthogonal to `pos`, per sample."""
    dims = _dims(pos)
    coef = (neg * pos).sum(dim=dims, keepdim=True) / pos.pow(2).sum(dim=dims, keepdim=True).clamp_min(1e-12)
    return neg - coef * pos


def _v_space(x: torch.Tensor, sigma: torch.Tensor, x0: torch.Tensor, flow: bool) -> torch.Tensor:
    s = _bview(sigma, x)
    if flow:
        return (x - x0) / s
    return (x / (s * s + 1.0) - x0) * (s * s + 1.0) ** 0.5 / s


def _from_v_space(x: torch.Tensor, sigma: torch.Tensor, v: torch.Tensor, flow: bool) -> torch.Tensor:
    s = _bview(sigma, x)
    if flow:
        return x - v * s
    return x / (s * s + 1.0) - v * s / (s * s + 1.0) ** 0.5


def rescale(x: torch.Tensor, sigma, guided: torch.Tensor, cond: torch.Tensor, phi: float, flow: bool = False) -> torch.Tensor:
    """Rescale CFG (Lin et al. 2024): match the guided prediction's std to the conditional one's.

    Computed in v-prediction space for "ve" models, exactly as ComfyUI's RescaleCFG, and in
    velocity space for flow models: v_final = phi * v_g * std(v_c) / std(v_g) + (1 - phi) * v_g.
    """
    if phi == 0:
        return guided
    vg = _v_space(x, sigma, guided, flow)
    vc = _v_space(x, sigma, cond, flow)
    ro_pos = torch.std(vc, dim=_dims(vc), keepdim=True)
    ro_cfg = torch.std(vg, dim=_dims(vg), keepdim=True)
    v_final = phi * (vg * (ro_pos / ro_cfg)) + (1.0 - phi) * vg
    return _from_v_space(x, sigma, v_final, flow)


def dynamic_threshold(guided: torch.Tensor, mimic: torch.Tensor, percentile: float) -> torch.Tensor:
    """Dynamic thresholding (Saharia et al. 2022, latent form of sd-dynamic-thresholding).

    Per sample and channel: centre the guided prediction, take its `percentile` absolute value s,
    clamp to [-s', s'] with s' = max(s, M) and rescale to M, where M is the largest absolute
    centred value of the `mimic` prediction (CFG at a low "mimic" scale); then un-centre.
    """
    b, c = guided.shape[:2]
    g = guided.reshape(b, c, -1).float()
    mm = mimic.reshape(b, c, -1).float()
    mean = g.mean(-1, keepdim=True)
    centred = g - mean
    mim_max = (mm - mm.mean(-1, keepdim=True)).abs().max(-1, keepdim=True).values
    s = torch.quantile(centred.abs(), percentile, dim=-1, keepdim=True)
    s = torch.maximum(s, mim_max).clamp_min(1e-12)
    out = torch.maximum(torch.minimum(centred, s), -s) / s * mim_max + mean
    return out.reshape(guided.shape).to(guided.dtype)


def cads_gamma(t: float, tau1: float, tau2: float) -> float:
    """CADS annealing (Sadat et al. 2024) at diffusion time t (1 = noise): 1 for t <= tau1, 0 for t >= tau2, linear between."""
    if t <= tau1:
        return 1.0
    if t >= tau2:
        return 0.0
    return (tau2 - t) / (tau2 - tau1)


def cads_anneal(y: torch.Tensor, gamma: float, noise_scale: float, psi: float, noise: torch.Tensor) -> torch.Tensor:
    """y_hat = sqrt(g) y + s sqrt(1 - g) n, rescaled to y's per-sample mean/std, mixed by psi."""
    if gamma >= 1.0 or noise_scale == 0:
        return y
    yf = y.float()
    yh = math.sqrt(gamma) * yf + noise_scale * math.sqrt(1.0 - gamma) * noise.float()
    if psi > 0:
        dims = _dims(yf)
        y_mean, y_std = yf.mean(dim=dims, keepdim=True), yf.std(dim=dims, keepdim=True)
        h_mean, h_std = yh.mean(dim=dims, keepdim=True), yh.std(dim=dims, keepdim=True)
        rescaled = (yh - h_mean) / h_std.clamp_min(1e-12) * y_std + y_mean
        yh = psi * rescaled + (1.0 - psi) * yh
    return yh.to(y.dtype)


def gaussian_blur(img: torch.Tensor, sigma: float, kernel_size: int = 9) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding, per channel (SAG's degradation)."""
    half = (kernel_size - 1) * 0.5
    xs = torch.linspace(-half, half, steps=kernel_size)
    pdf = torch.exp(-0.5 * (xs / sigma).pow(2))
    k1 = (pdf / pdf.sum()).to(device=img.device, dtype=img.dtype)
    k2 = torch.mm(k1[:, None], k1[None, :]).expand(img.shape[-3], 1, kernel_size, kernel_size)
    pad = kernel_size // 2
    return F.conv2d(F.pad(img, [pad, pad, pad, pad], mode="reflect"), k2, groups=img.shape[-3])


def sag_mask(maps: list[torch.Tensor], latent_hw: tuple[int, int], threshold: float = 1.0) -> torch.Tensor:
    """Salient-region mask (B, 1, H, W): attention received above the mean, averaged over the chosen layers."""
    up = [F.interpolate(m.unsqueeze(1).float(), latent_hw) for m in maps]
    return (torch.stack(up).mean(0) > threshold).float()


def sega_direction(diff: torch.Tensor, scale: float, threshold: float, reverse: bool = False) -> torch.Tensor:
    """SEGA's (Brack et al. 2023) guidance of one concept: scale * (e_concept - e_uncond), negated to remove the
    concept, kept only where its magnitude reaches the element-wise `threshold` quantile of its channel (over
    the spatial positions of each image, per channel) and zero elsewhere."""
    g = (-scale if reverse else scale) * diff
    if threshold <= 0:
        return g
    flat = g.abs().flatten(2).float()
    q = torch.quantile(flat, min(float(threshold), 1.0), dim=2).to(g.dtype)
    q = q.view(*q.shape, *([1] * (g.ndim - 2)))
    return torch.where(g.abs() >= q, g, torch.zeros_like(g))


def sega_momentum(direction: torch.Tensor, velocity: Optional[torch.Tensor], scale: float, beta: float):
    """SEGA's momentum: the guidance g = direction + scale * v and the next v = beta * v + (1 - beta) * g
    (v starts at 0)."""
    g = direction if velocity is None else direction + scale * velocity
    new = (1.0 - beta) * g if velocity is None else beta * velocity + (1.0 - beta) * g
    return g, new
