"""Regions: a prompt placed by a MASK or a box, resolved onto a latent (or attention) grid.

A region is immutable; the nodes chain them into a tuple (`EDITKIT_REGIONS`). Its geometry is given in
image pixels (a box x, y, width, height) or as a MASK of any resolution with the image's aspect ratio;
it is resolved when the latent size is known (at sampling time), so one region list works for any size.

Overlaps (documented behaviour): regional attention lets a pixel inside several regions attend to all of
their prompts; MultiDiffusion averages the region predictions there by their `weight`s.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..core.errors import EditKitInputError


@dataclass(frozen=True)
class Region:
    context: Optional[torch.Tensor]  # (1, L, C) text tokens of the region's prompt (first CONDITIONING entry); None: a box only
    pooled: Optional[torch.Tensor]   # (1, C') pooled output if the conditioning has one
    mask: Optional[torch.Tensor]     # (Bm, H, W) in [0, 1] (Bm 1 or the image batch), or None
    box: Optional[tuple]             # (x, y, width, height) in image pixels, or None
    weight: float = 1.0
    label: str = ""

    def describe(self) -> str:
        where = f"box {self.box}" if self.mask is None else f"mask {tuple(self.mask.shape[-2:])}"
        toks = "no prompt" if self.context is None else f"{self.context.shape[1]} tokens"
        return f"{self.label or 'region'}: {where}, {toks}, weight {self.weight:g}"


def make_region(node: str, conditioning, mask=None, box=None, weight: float = 1.0, label: str = "") -> Region:
    """conditioning None: a box/mask without a prompt (Box Guidance reads only the geometry and the label)."""
    if conditioning is not None and not conditioning:
        raise EditKitInputError(node, "conditioning", "the conditioning is empty", "connect a CLIP Text Encode output")
    ctx, extra = (conditioning[0][0].detach().cpu(), conditioning[0][1]) if conditioning is not None else (None, {})
    if mask is not None:
        m = mask if mask.ndim == 3 else mask.reshape(1, *mask.shape[-2:])
        m = m.float().clamp(0, 1).cpu()
        if float(m.max()) <= 0:
            raise EditKitInputError(node, "mask", "the mask is empty (all zero)", "paint the region in white")
        mask = m
    elif box is not None:
        x, y, w, h = box
        if w <= 0 or h <= 0 or x < 0 or y < 0:
            raise EditKitInputError(node, "width", f"box {box} is empty or starts outside the image",
                                    "give x, y >= 0 and width, height > 0 (pixels)")
    else:
        raise EditKitInputError(node, "mask", "neither a mask nor a box is given",
                                "connect a MASK or set width and height of the box (pixels)")
    return Region(ctx, extra.get("pooled_output"), mask, tuple(int(v) for v in box) if mask is None else None,
                  float(weight), label)


def downscale_of(model) -> int:
    """Image pixels per latent pixel (8 for SD/SDXL/SD3/Flux VAEs)."""
    base = getattr(model, "model", model)
    fmt = getattr(base, "latent_format", None)
    return int(getattr(fmt, "spacial_downscale_ratio", 8) or 8)


def latent_grid(node: str, region: Region, lat_h: int, lat_w: int, downscale: int, index: int = 0) -> torch.Tensor:
    """The region on the latent grid: (Bm, lat_h, lat_w) area coverage in [0, 1]."""
    if region.mask is not None:
        m = region.mask
        mh, mw = m.shape[-2:]
        if abs((mh / mw) / (lat_h / lat_w) - 1.0) > 0.05:
            raise EditKitInputError(node, f"regions ({region.label or f'region {index + 1}'} mask)",
                                    f"the mask is {mw}x{mh} px but the image is {lat_w * downscale}x{lat_h * downscale} px "
                                    "(a different aspect ratio)",
                                    "make the mask at the image's size (e.g. from the same Load Image, or Solid Mask with its width/height)")
        return F.interpolate(m[:, None], size=(lat_h, lat_w), mode="area" if mh >= lat_h else "bilinear")[:, 0].clamp(0, 1)
    x, y, w, h = region.box
    W, H = lat_w * downscale, lat_h * downscale
    if x + w > W or y + h > H:
        raise EditKitInputError(node, f"regions ({region.label or f'region {index + 1}'} box)",
                                f"box x={x}, y={y}, width={w}, height={h} reaches outside the {W}x{H} px image",
                                f"keep x + width <= {W} and y + height <= {H}")
    px = torch.zeros(1, H, W)
    px[:, y:y + h, x:x + w] = 1.0
    return F.interpolate(px[:, None], size=(lat_h, lat_w), mode="area")[:, 0]


def layer_grid(lat_h: int, lat_w: int, tokens: int) -> tuple[int, int]:
    """The (h, w) grid of an attention layer with `tokens` queries on a lat_h x lat_w latent
    (stride-2 convs with padding 1: ceil halving, as core.introspect.AttnSite.resolution)."""
    h, w = lat_h, lat_w
    while h * w > tokens and h > 0:
        h, w = (h + 1) // 2, (w + 1) // 2
    if h * w != tokens:
        raise RuntimeError(f"EditKit regions: no grid of {tokens} tokens below a {lat_h}x{lat_w} latent")
    return h, w


def at_grid(grid: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """A latent-grid mask (Bm, H, W) at an attention grid (Bm, h, w), area-averaged."""
    if grid.shape[-2:] == (h, w):
        return grid
    return F.interpolate(grid[:, None], size=(h, w), mode="area")[:, 0]


def check_context(node: str, regions, context_dim: Optional[int]) -> None:
    for i, r in enumerate(regions):
        if r.context is None:
            raise EditKitInputError(node, "regions", f"region {i + 1} ({r.label or 'no label'}) has no prompt",
                                    "connect a CLIP Text Encode to that EditKit Region's conditioning input")
        if context_dim and r.context.shape[-1] != context_dim:
            raise EditKitInputError(node, "regions", f"region {i + 1}'s prompt has {r.context.shape[-1]}-wide tokens but the "
                                    f"model expects {context_dim}", "encode the region prompts with this model's CLIP")


def model_context_dim(model) -> Optional[int]:
    dm = getattr(getattr(model, "model", model), "diffusion_model", None)
    for mod in (dm.modules() if dm is not None else []):
        attn2 = getattr(mod, "attn2", None)
        if attn2 is not None and hasattr(attn2, "to_k"):
            return attn2.to_k.in_features
    for name in ("txt_in", "context_embedder"):                 # DiTs: Flux, SD3 text input projection
        lin = getattr(dm, name, None)
        if lin is not None and hasattr(lin, "in_features"):
            return lin.in_features
    return None


def rows_per_sample(mask_batch: int, n_rows: int, chunks: int) -> list[int]:
    """For each batch row of a model call, which mask of a (Bm, ...) stack applies (Bm 1: all the same)."""
    per = max(n_rows // max(chunks, 1), 1)
    return [0 if mask_batch == 1 else (i % per) % mask_batch for i in range(n_rows)]
