"""The merge-statistics IMAGE: per-block norm of the merged delta (bars) and SVD energy kept (dots)."""
from __future__ import annotations

import math

import torch


def _font(size):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def draw(per_block: dict, title: str = "", height: int = 360) -> torch.Tensor:
    """per_block: label -> (energy, kept energy), in model order. Returns IMAGE (1, H, W, 3)."""
    import numpy as np
    from PIL import Image, ImageDraw

    labels = list(per_block)
    n = max(1, len(labels))
    left, right, top, bottom = 56, 56, 58, 58
    bar_w = max(8, min(36, 1400 // n))
    width = max(720, left + right + n * (bar_w + 4))
    img = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    small, body = _font(11), _font(14)
    lines = (title or "merged LoRA: per-block |delta| and energy kept").split("\n")[:2]
    for j, line in enumerate(lines):
        d.text((8, 4 + 18 * j), line[: max(20, width // 8)], fill=(0, 0, 0), font=body)
    plot_h = height - top - bottom
    x0, y0, y1 = left, top, top + plot_h
    d.line((x0, y0, x0, y1), fill=(0, 0, 0))
    d.line((x0, y1, width - right, y1), fill=(0, 0, 0))
    d.line((width - right, y0, width - right, y1), fill=(0, 0, 0))
    norms = [math.sqrt(max(e, 0.0)) for e, _ in per_block.values()]
    top_norm = max(norms) if norms and max(norms) > 0 else 1.0
    d.text((4, y0 - 14), f"{top_norm:.3g}", fill=(40, 70, 160), font=small)
    d.text((4, y1 - 12), "0", fill=(40, 70, 160), font=small)
    d.text((width - right + 4, y0 - 14), "100%", fill=(200, 80, 20), font=small)
    d.text((width - right + 4, y1 - 12), "0%", fill=(200, 80, 20), font=small)
    for frac in (0.25, 0.5, 0.75):
        yy = y1 - frac * plot_h
        d.line((x0 + 1, yy, width - right - 1, yy), fill=(225, 225, 225))
    step = max(1, math.ceil(n * 30 / max(1, width - left - right)))
    prev = None
    for i, (label, (e, k)) in enumerate(per_block.items()):
        cx = x0 + 4 + i * (bar_w + 4)
        h = plot_h * (math.sqrt(max(e, 0.0)) / top_norm)
        d.rectangle((cx, y1 - h, cx + bar_w, y1), fill=(70, 110, 200))
        kept = (k / e) if e > 0 else 1.0
        ky = y1 - kept * plot_h
        pt = (cx + bar_w / 2, ky)
        if prev is not None:
            d.line((prev[0], prev[1], pt[0], pt[1]), fill=(230, 120, 40), width=1)
        d.ellipse((pt[0] - 3, pt[1] - 3, pt[0] + 3, pt[1] + 3), fill=(220, 90, 20))
        prev = pt
        if i % step == 0:
            for j, line in enumerate(_wrap(label)):
                d.text((cx, y1 + 4 + 12 * j), line, fill=(0, 0, 0), font=small)
    d.text((8, height - 16), "bars: norm of the merged delta per block (left axis); dots: SVD energy kept (right)",
           fill=(60, 60, 60), font=small)
    arr = np.asarray(img).astype("float32") / 255.0
    return torch.from_numpy(arr)[None]


def _wrap(label: str) -> list[str]:
    if len(label) <= 4:
        return [label]
    return [label[:-2], label[-2:]] if label[-2:].isdigit() else [label[:4], label[4:]]
