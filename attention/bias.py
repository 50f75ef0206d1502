"""An exact additive logit bias through ComfyUI's own attention kernels, by extra q/k/v channels.

ComfyUI's fast attention (SDPA, xformers, sage, ...) takes no arbitrary bias. A bias of rank r,
B = qf kf^T (the same for every head), rides on r extra channels instead: q gets qf, k gets kf, v gets
zeros, so the kernel computes softmax(q k^T / sqrt(d) + qf kf^T) v without ever materialising the
attention matrix. One owner for the attention controller (per-key bias, rank 1) and regional
prompting (region masks, rank regions + 2).
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def lowrank_augment(q, k, v, qf: torch.Tensor, kf: torch.Tensor, scale: Optional[float] = None):
    """q, k, v as (B, L, H, d) views -> (qa, ka, va) with extra channels such that a plain attention kernel
    computes softmax(q k^T / sqrt(d) + qf kf^T) v (scaled by 1/sqrt of the padded head size, or by an
    explicit `scale`). qf (B, Lq, r), kf (B, Lk, r): the bias factors, the same for every head; the extra
    channels are padded to a multiple of 8 and the output's extra channels are zero (drop them)."""
    b, lq, heads, d = q.shape
    lk = k.shape[1]
    r = qf.shape[-1]
    dp = d + 8 * math.ceil(r / 8)
    alpha, beta = (math.sqrt(dp / d), math.sqrt(dp)) if scale is None else (1.0, 1.0 / scale)
    qa = q.new_zeros(b, lq, heads, dp)
    qa[..., :d] = q * alpha
    qa[..., d:d + r] = qf.to(q.dtype)[:, :, None, :]
    ka = k.new_zeros(b, lk, heads, dp)
    ka[..., :d] = k
    ka[..., d:d + r] = (kf * beta).to(k.dtype)[:, :, None, :]
    va = v.new_zeros(b, lk, heads, dp)
    va[..., :d] = v
    return qa, ka, va


def bias_augment(q, k, v, bias: torch.Tensor, scale: Optional[float] = None):
    """Per-key logit bias (rank 1): softmax(q k^T / sqrt(d) + bias_j) v. q, k, v are (B, L, H, d) views; bias is
    (B or 1, Lk). Returns (qa, ka, va); the output's extra channels are zero (keep the first d)."""
    b, lq, lk = q.shape[0], q.shape[1], k.shape[1]
    kf = bias.to(device=k.device, dtype=torch.float32).expand(b, lk)[..., None]
    return lowrank_augment(q, k, v, q.new_ones(b, lq, 1), kf, scale)
