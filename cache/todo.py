"""ToDo: token downsampling of keys and values in self-attention (Smith et al. 2024).

At the attention sites of the finest levels the self-attention's keys/values come from a
nearest-neighbour downsampled token grid (queries keep every token), so the output keeps its
resolution while attention costs 1/factor^2. Installed as an attn1_patch (ComfyUI's list of patches
that change the attention inputs before projection): ComfyUI's own fast attention still runs, the
key/value projections shrink too, and attn1 replace patches of other nodes stay in place.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.patches import SharedPatch

METHODS = ("nearest", "avg_pool", "max_pool")


@dataclass(frozen=True)
class ToDoConfig:
    factor: int = 2          # downsample factor per side at the finest level (paper: 2)
    factor_level2: int = 1   # at the next level (paper: 1 = untouched)
    method: str = "nearest"


def grid(tokens: int, latent_hw: tuple) -> tuple:
    """(h, w, level) of a token count at the latent size (stride-2 levels with ceil), or None."""
    h, w, level = latent_hw[0], latent_hw[1], 0
    while h >= 1 and w >= 1 and level < 6:
        if h * w == tokens:
            return h, w, level
        h, w, level = (h + 1) // 2, (w + 1) // 2, level + 1
    return None


def downsample_tokens(t: torch.Tensor, h: int, w: int, factor: int, method: str = "nearest") -> torch.Tensor:
    b, _, c = t.shape
    img = t.transpose(1, 2).reshape(b, c, h, w)
    nh, nw = max(h // factor, 1), max(w // factor, 1)
    if method == "nearest":
        out = F.interpolate(img, size=(nh, nw), mode="nearest")
    elif method == "avg_pool":
        out = F.adaptive_avg_pool2d(img, (nh, nw))
    else:
        out = F.adaptive_max_pool2d(img, (nh, nw))
    return out.reshape(b, c, nh * nw).transpose(1, 2)


class ToDo(SharedPatch):
    def __init__(self, cfg: ToDoConfig):
        self.cfg = cfg

    def __call__(self, n, context, value, extra):
        shape = extra.get("original_shape")
        if shape is None or context is None or context.shape[1] != n.shape[1]:
            return n, context, value
        g = grid(n.shape[1], tuple(shape[-2:]))
        if g is None:
            return n, context, value
        h, w, level = g
        f = self.cfg.factor if level == 0 else self.cfg.factor_level2 if level == 1 else 1
        if f <= 1:
            return n, context, value
        same = value is context
        context = downsample_tokens(context, h, w, f, self.cfg.method)
        value = context if same or value is None else downsample_tokens(value, h, w, f, self.cfg.method)
        return n, context, value


def install(m, cfg: ToDoConfig) -> ToDo:
    patch = ToDo(cfg)
    m.set_model_attn1_patch(patch)
    return patch
