"""MultiDiffusion (Bar-Tal et al. 2023) as a model wrapper: every model call on a latent larger than the
model's window is made window by window and the predictions are averaged per pixel, so any sampler
(k-diffusion, DDIM, the EditKit guider) gets one prediction for the whole latent.

Averaging the x0 predictions of the windows is MultiDiffusion's least-squares average of the windows'
z_{t-1}: for a fixed x_t a sampler step is affine in the prediction, per pixel. Weights per window are
uniform (MultiDiffusion) or Gaussian around the window centre (Mixture of Diffusers, variance 0.01 of
the window size). Regions (a prompt with a mask or box) are MultiDiffusion's region-based generation:
each region's prompt predicts the windows it touches and is blended with its mask (times `weight`); the
global prompt fills the rest (1 - coverage, clamped at 0). Overlapping regions average by their weights.
Uncond rows (the negative prompt) are shared by all regions and only windowed.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..core.errors import EditKitInputError
from ..core.patches import SharedPatch, chain_unet_wrapper
from .regions import latent_grid, rows_per_sample

WEIGHTINGS = ("uniform", "gaussian")


def positions(length: int, window: int, stride: int) -> list[int]:
    """Window starts along one axis: every `stride`, plus one flush with the end."""
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] + window < length:
        starts.append(length - window)
    return starts


def window_weight(h: int, w: int, weighting: str) -> torch.Tensor:
    if weighting == "uniform":
        return torch.ones(h, w)
    var = 0.01

    def axis(n):
        mid = (n - 1) / 2
        x = torch.arange(n, dtype=torch.float64)
        return torch.exp(-((x - mid) ** 2) / (n * n) / (2 * var)) / math.sqrt(2 * math.pi * var)
    return (axis(h)[:, None] * axis(w)[None, :]).float()


def _rows(value, idx):
    return value[idx] if torch.is_tensor(value) and value.ndim >= 1 else value


class MultiDiffusion(SharedPatch):
    def __init__(self, node: str, window: tuple[int, int], stride: int, weighting: str = "uniform", regions=(),
                 downscale: int = 8):
        self.node, self.window, self.stride, self.weighting = node, tuple(window), int(stride), weighting
        self.regions, self.downscale = tuple(regions), downscale

    def plan(self, lat_h: int, lat_w: int) -> list[tuple[int, int]]:
        wh, ww = self.window
        if lat_h < wh or lat_w < ww:
            raise EditKitInputError(self.node, "window_width" if lat_w < ww else "window_height",
                                    f"the latent ({lat_w * self.downscale}x{lat_h * self.downscale} px) is smaller than one "
                                    f"window ({ww * self.downscale}x{wh * self.downscale} px)",
                                    "make the window at most the image size (the model's native size, e.g. 512 for SD1.5)")
        return [(y, x) for y in positions(lat_h, wh, self.stride) for x in positions(lat_w, ww, self.stride)]

    def wrapper(self, call_next: Callable) -> Callable:
        def fn(apply_model, args):
            x, sigma, c = args["input"], args["timestep"], args["c"]
            cou = list(args.get("cond_or_uncond") or [0])
            b, _, lat_h, lat_w = x.shape
            wh, ww = self.window
            wts = window_weight(wh, ww, self.weighting).to(x.device, torch.float32)
            per = max(b // len(cou), 1)
            cond_rows = [i for i in range(b) if cou[min(i // per, len(cou) - 1)] == 0]
            grids = []
            for i, r in enumerate(self.regions):
                g = latent_grid(self.node, r, lat_h, lat_w, self.downscale, i).to(x.device)
                grids.append(g[rows_per_sample(g.shape[0], b, len(cou))])        # (B, H, W)
            bg = torch.ones(b, lat_h, lat_w, device=x.device)
            if grids:
                cover = torch.stack(grids).sum(0)
                bg[cond_rows] = (1 - cover[cond_rows]).clamp_min(0)
            acc = torch.zeros(x.shape, device=x.device, dtype=torch.float32)
            count = torch.zeros(b, 1, lat_h, lat_w, device=x.device)
            for (y0, x0) in self.plan(lat_h, lat_w):
                sl = (Ellipsis, slice(y0, y0 + wh), slice(x0, x0 + ww))
                cw = self._crop(c, x.shape, sl)
                out = call_next(apply_model, {"input": x[sl], "timestep": sigma, "c": cw, "cond_or_uncond": cou})
                wgt = (wts * bg[sl])[:, None]
                acc[sl] += out.float() * wgt
                count[sl] += wgt
                if not cond_rows:
                    continue
                for i, r in enumerate(self.regions):
                    wr = (wts * grids[i][cond_rows][sl] * r.weight)[:, None]
                    if float(wr.max()) <= 0:
                        continue                         # the region does not touch this window
                    cr = self._region_c(cw, r, cond_rows, b)
                    out_r = call_next(apply_model, {"input": x[sl][cond_rows], "timestep": _rows(sigma, cond_rows),
                                                    "c": cr, "cond_or_uncond": [0] * max(len(cond_rows) // per, 1)})
                    idx = torch.tensor(cond_rows, device=x.device)
                    acc_w = acc.index_select(0, idx)
                    acc_w[sl] += out_r.float() * wr
                    acc.index_copy_(0, idx, acc_w)
                    cnt_w = count.index_select(0, idx)
                    cnt_w[sl] += wr
                    count.index_copy_(0, idx, cnt_w)
            return (acc / torch.where(count > 0, count, torch.ones_like(count))).to(x.dtype)
        return fn

    @staticmethod
    def _crop(c: dict, shape, sl) -> dict:
        out = dict(c)
        for key in ("c_concat", "denoise_mask"):
            t = c.get(key)
            if torch.is_tensor(t) and t.ndim == 4 and tuple(t.shape[-2:]) == tuple(shape[-2:]):
                out[key] = t[sl]
        return out

    @staticmethod
    def _region_c(c: dict, region, rows: list, b: int) -> dict:
        out = {}
        for key, value in c.items():
            if key == "c_crossattn":
                out[key] = region.context.to(device=value.device, dtype=value.dtype).expand(len(rows), -1, -1)
            elif key == "transformer_options":
                to = dict(value)
                to["cond_or_uncond"] = [0]
                out[key] = to
            elif torch.is_tensor(value) and value.ndim >= 1 and value.shape[0] == b:
                out[key] = value[rows]
            else:
                out[key] = value
        return out


def install(m, md: MultiDiffusion) -> None:
    chain_unet_wrapper(m, md.wrapper)
