"""Small image helpers for previews: colour maps, overlays and labelled grids (IMAGE = B,H,W,C in [0,1])."""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Anchor colours of perceptual colour maps, interpolated linearly (enough for previews).
_COLORMAPS = {
    "inferno": [(0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66), (245, 125, 21), (250, 193, 39), (252, 255, 164)],
    "viridis": [(68, 1, 84), (72, 40, 120), (62, 74, 137), (49, 104, 142), (38, 130, 142), (31, 158, 137), (53, 183, 121), (109, 205, 89), (180, 222, 44), (253, 231, 37)],
    "jet": [(0, 0, 128), (0, 0, 255), (0, 128, 255), (0, 255, 255), (128, 255, 128), (255, 255, 0), (255, 128, 0), (255, 0, 0), (128, 0, 0)],
}
COLORMAPS = list(_COLORMAPS)


def colorize(maps: torch.Tensor, name: str = "inferno") -> torch.Tensor:
    """(..., H, W) values in [0,1] -> (..., H, W, 3) RGB."""
    lut = torch.tensor(_COLORMAPS[name], dtype=torch.float32) / 255.0
    x = maps.clamp(0, 1).float() * (len(lut) - 1)
    lo = x.floor().long().clamp(max=len(lut) - 2)
    frac = (x - lo.float()).unsqueeze(-1)
    return lut[lo] * (1 - frac) + lut[lo + 1] * frac


def resize_maps(maps: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, N, h0, w0) -> (B, N, h, w), bilinear."""
    return F.interpolate(maps.float(), size=(h, w), mode="bilinear", align_corners=False)


def overlay(image: torch.Tensor, heat_rgb: torch.Tensor, opacity: float) -> torch.Tensor:
    return (image[..., :3].float() * (1 - opacity) + heat_rgb * opacity).clamp(0, 1)


def label(image: torch.Tensor, text: str) -> torch.Tensor:
    """Write `text` in the top-left corner of one (H, W, 3) image, on a dark band."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont
    arr = (image.clamp(0, 1).cpu().numpy() * 255).astype("uint8")
    pil = Image.fromarray(arr)
    draw = ImageDraw.Draw(pil)
    font_size = max(10, min(24, pil.height // 12))
    try:
        font = ImageFont.load_default(size=font_size)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    box = draw.textbbox((3, 1), text, font=font)
    draw.rectangle((0, 0, box[2] + 3, box[3] + 3), fill=(0, 0, 0))
    draw.text((3, 1), text, fill=(255, 255, 255), font=font)
    return torch.from_numpy(np.asarray(pil).astype("float32") / 255.0)


def hstack(images: list[torch.Tensor], gap: int = 4) -> torch.Tensor:
    """Concatenate (H, W, 3) images left to right with a white gap."""
    h = images[0].shape[0]
    sep = torch.ones(h, gap, 3)
    parts = []
    for i, im in enumerate(images):
        if i:
            parts.append(sep)
        parts.append(im.cpu().float())
    return torch.cat(parts, dim=1)
