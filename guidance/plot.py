"""A preview of a guidance term list: each term's effective scale at every step, drawn as an IMAGE."""
from __future__ import annotations

import torch

from .schedules import weights_over
from .formulas import cfg_scale

_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def curves(guidance_terms, sigmas, cfg: float) -> list[tuple[str, list[float]]]:
    """(label, effective scale per step) for the CFG scale and every non-CFG term."""
    sig = torch.as_tensor(sigmas).flatten()
    n = max(len(sig) - 1, 0)
    cfg_w = [1.0] * n
    out = []
    for t in guidance_terms:
        w = weights_over(t.schedule, sig)
        if t.kind == "cfg":
            cfg_w = [a * b for a, b in zip(cfg_w, w)]
        else:
            out.append((t.label(), [t.strength() * x for x in w]))
    return [("CFG scale", [cfg_scale(cfg, x) for x in cfg_w])] + out


def draw(guidance_terms, sigmas, cfg: float, width: int = 768, height: int = 384) -> torch.Tensor:
    """(1, H, W, 3) plot: x = step, y = effective scale, one line per term, with a legend."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont
    lines = curves(guidance_terms, sigmas, cfg)
    n = len(lines[0][1])
    img = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    left, right, top, bottom = 48, width - 200, 16, height - 36
    vals = [v for _, ys in lines for v in ys] or [0.0, 1.0]
    lo, hi = min(0.0, min(vals)), max(vals)
    if hi - lo < 1e-9:
        hi = lo + 1.0
    hi += (hi - lo) * 0.05

    def px(i, v):
        x = left + (right - left) * (i / max(n - 1, 1))
        y = bottom - (bottom - top) * ((v - lo) / (hi - lo))
        return x, y

    d.rectangle((left, top, right, bottom), outline=(0, 0, 0))
    for k in range(5):
        v = lo + (hi - lo) * k / 4
        _, y = px(0, v)
        d.line((left - 4, y, left, y), fill=(0, 0, 0))
        d.line((left + 1, y, right - 1, y), fill=(235, 235, 235))
        d.text((2, y - 7), f"{v:.2f}", fill=(0, 0, 0), font=font)
    for k in range(min(n, 6)):
        i = round(k * (n - 1) / max(min(n, 6) - 1, 1))
        x, _ = px(i, lo)
        d.line((x, bottom, x, bottom + 4), fill=(0, 0, 0))
        d.text((x - 6, bottom + 6), str(i), fill=(0, 0, 0), font=font)
    d.text(((left + right) // 2 - 14, height - 16), "step", fill=(0, 0, 0), font=font)
    for j, (name, ys) in enumerate(lines):
        col = _COLORS[j % len(_COLORS)]
        pts = [px(i, v) for i, v in enumerate(ys)]
        if len(pts) == 1:
            x, y = pts[0]
            d.ellipse((x - 3, y - 3, x + 3, y + 3), fill=col)
        else:
            d.line(pts, fill=col, width=3)
        for x, y in pts:
            d.ellipse((x - 2, y - 2, x + 2, y + 2), fill=col)
        ly = top + 18 * j
        d.line((right + 12, ly + 7, right + 32, ly + 7), fill=col, width=3)
        d.text((right + 38, ly), name[:24], fill=(0, 0, 0), font=font)
    arr = np.asarray(img).astype("float32") / 255.0
    return torch.from_numpy(arr).unsqueeze(0)
