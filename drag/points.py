"""The EDITKIT_DRAG value: handle -> target point pairs in pixel coordinates of an image, an optional
editable-region mask, and the image size the points refer to. Serialised as JSON (the widget value of
"EditKit Drag Points", what workflows save and the API accepts):

    {"version": 1, "width": 512, "height": 512,
     "points": [{"handle": [x, y], "target": [x, y]}, ...],
     "mask": {"strokes": [[x, y, radius, 1], ...]}}        (optional; 1 paints, 0 erases)

Pixel coordinates: x to the right, y down, (0, 0) the top-left corner of the top-left pixel, so a point
lies inside the image when 0 <= x < width and 0 <= y < height. A drag made on one image size applies to
another of the same aspect ratio (`fit`): the points scale with the image (the workflow's Image Scale,
or `--model toy`'s 128 px). `DragError(field, problem, fix)` names what is wrong; nodes turn it into an
EditKitInputError on their input.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

VERSION = 1
ASPECT_TOLERANCE = 0.02


class DragError(ValueError):
    def __init__(self, field_name: str, problem: str, fix: str = ""):
        self.field, self.problem, self.fix = field_name, problem, fix
        super().__init__(f"{field_name}: {problem}" + (f" ({fix})" if fix else ""))


def _number(v, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        raise DragError(where, f"{v!r} is not a finite number", "write pixel coordinates as numbers")
    return float(v)


def _xy(v, where: str) -> tuple[float, float]:
    if isinstance(v, dict) and set(v) >= {"x", "y"}:
        v = [v["x"], v["y"]]
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise DragError(where, f"{v!r} is not a point", "write a point as [x, y] in pixels")
    return _number(v[0], where + ".x"), _number(v[1], where + ".y")


@dataclass(frozen=True)
class Stroke:
    """A round brush dab of the editable-region mask (paint=True adds, False erases)."""
    x: float
    y: float
    radius: float
    paint: bool = True


@dataclass(frozen=True)
class DragPoints:
    width: int
    height: int
    pairs: tuple = ()                        # ((hx, hy), (tx, ty)), ...
    strokes: tuple = ()                      # Stroke, ... (empty: no mask from the editor)
    mask: Optional[torch.Tensor] = field(default=None, compare=False, repr=False)   # (H, W) in [0, 1], overrides strokes

    # -- JSON ---------------------------------------------------------------------------------------
    @classmethod
    def from_json(cls, text, width: Optional[int] = None, height: Optional[int] = None) -> "DragPoints":
        """Parse (and validate) the JSON; width/height (e.g. of a connected image) fill in a missing size."""
        if isinstance(text, DragPoints):
            return text
        if isinstance(text, str):
            if not text.strip():
                raise DragError("points", "the JSON is empty", "click a handle and its target on the image, or paste "
                                '{"width": W, "height": H, "points": [{"handle": [x, y], "target": [x, y]}]}')
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise DragError("points", f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})",
                                "fix the JSON or clear it and click the points again") from None
        else:
            data = text
        if isinstance(data, list):
            data = {"points": data}
        if not isinstance(data, dict):
            raise DragError("points", "the JSON is not an object", 'write {"width": W, "height": H, "points": [...]}')
        w, h = data.get("width", width), data.get("height", height)
        if w is None or h is None:
            raise DragError("width", "the image size the points refer to is missing",
                            "add \"width\" and \"height\" (pixels), or connect the image")
        size = []
        for name, v in (("width", w), ("height", h)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or int(v) < 1:
                raise DragError(name, f"{v!r} is not a positive whole number of pixels", "give the image size in pixels")
            size.append(int(v))
        pts = data.get("points", [])
        if not isinstance(pts, list):
            raise DragError("points", "\"points\" is not a list", 'write "points": [{"handle": [x, y], "target": [x, y]}]')
        pairs = []
        for i, p in enumerate(pts):
            where = f"points[{i}]"
            if isinstance(p, dict):
                if "handle" not in p or "target" not in p:
                    raise DragError(where, "needs both a \"handle\" and a \"target\"",
                                    "click the target after the handle (or delete the unfinished point)")
                pairs.append((_xy(p["handle"], where + ".handle"), _xy(p["target"], where + ".target")))
            elif isinstance(p, (list, tuple)) and len(p) == 2:
                pairs.append((_xy(p[0], where + ".handle"), _xy(p[1], where + ".target")))
            else:
                raise DragError(where, f"{p!r} is not a handle/target pair", 'write {"handle": [x, y], "target": [x, y]}')
        strokes = []
        m = data.get("mask")
        if m is not None:
            if not isinstance(m, dict) or not isinstance(m.get("strokes", []), list):
                raise DragError("mask", "is not {\"strokes\": [[x, y, radius, paint], ...]}", "repaint the region or remove \"mask\"")
            for i, s in enumerate(m.get("strokes", [])):
                where = f"mask.strokes[{i}]"
                if not isinstance(s, (list, tuple)) or len(s) not in (3, 4):
                    raise DragError(where, f"{s!r} is not [x, y, radius, paint]", "repaint the region")
                r = _number(s[2], where + ".radius")
                if r <= 0:
                    raise DragError(where + ".radius", f"{r} is not positive", "use a brush radius above 0")
                paint = bool(s[3]) if len(s) == 4 else True
                strokes.append(Stroke(_number(s[0], where + ".x"), _number(s[1], where + ".y"), r, paint))
        return cls(size[0], size[1], tuple(pairs), tuple(strokes))

    def to_dict(self) -> dict:
        d = {"version": VERSION, "width": self.width, "height": self.height,
             "points": [{"handle": [_num(h[0]), _num(h[1])], "target": [_num(t[0]), _num(t[1])]} for h, t in self.pairs]}
        if self.strokes:
            d["mask"] = {"strokes": [[_num(s.x), _num(s.y), _num(s.radius), int(s.paint)] for s in self.strokes]}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    # -- geometry -----------------------------------------------------------------------------------
    @property
    def has_mask(self) -> bool:
        return self.mask is not None or any(s.paint for s in self.strokes)

    def with_mask(self, mask: Optional[torch.Tensor]) -> "DragPoints":
        """This drag with an editable region from a MASK (any size: resized to the image)."""
        if mask is None:
            return self
        m = torch.as_tensor(mask).float()
        m = m[0] if m.ndim == 3 else m
        if m.ndim != 2:
            raise DragError("mask", f"a mask of shape {tuple(torch.as_tensor(mask).shape)} is not one (H, W) mask",
                            "connect a single MASK")
        if tuple(m.shape) != (self.height, self.width):
            if abs(m.shape[1] / m.shape[0] - self.width / self.height) > ASPECT_TOLERANCE * self.width / self.height:
                raise DragError("mask", f"is {m.shape[1]}x{m.shape[0]} px, the points refer to {self.width}x{self.height}",
                                "paint the mask on the same image")
            m = torch.nn.functional.interpolate(m[None, None], size=(self.height, self.width), mode="bilinear")[0, 0]
        return DragPoints(self.width, self.height, self.pairs, self.strokes, m.clamp(0, 1))

    def region(self, width: Optional[int] = None, height: Optional[int] = None) -> Optional[torch.Tensor]:
        """The editable region as an (H, W) float mask at (width, height) (default: the drag's size), or None."""
        w, h = width or self.width, height or self.height
        if self.mask is not None:
            m = self.mask
            if tuple(m.shape) != (h, w):
                m = torch.nn.functional.interpolate(m[None, None].float(), size=(h, w), mode="bilinear")[0, 0]
            return m.clamp(0, 1)
        if not any(s.paint for s in self.strokes):
            return None
        sx, sy = w / self.width, h / self.height
        yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32) + 0.5, torch.arange(w, dtype=torch.float32) + 0.5,
                                indexing="ij")
        m = torch.zeros(h, w)
        for s in self.strokes:
            inside = ((xx - s.x * sx) / (s.radius * sx)) ** 2 + ((yy - s.y * sy) / (s.radius * sy)) ** 2 <= 1.0
            m = torch.where(inside, torch.full_like(m, 1.0 if s.paint else 0.0), m)
        return m

    def fit(self, width: int, height: int) -> "DragPoints":
        """The same drag on an image of width x height (same aspect ratio): points scale with the image."""
        if (width, height) == (self.width, self.height):
            return self
        a, b = width / height, self.width / self.height
        if abs(a - b) > ASPECT_TOLERANCE * b:
            raise DragError("width", f"the points were placed on a {self.width}x{self.height} image, the latent is "
                            f"{width}x{height} px (another aspect ratio)",
                            "place the points on the image you encode (same size, or the same aspect ratio)")
        sx, sy = width / self.width, height / self.height
        pairs = tuple(((h[0] * sx, h[1] * sy), (t[0] * sx, t[1] * sy)) for h, t in self.pairs)
        strokes = tuple(Stroke(s.x * sx, s.y * sy, s.radius * math.sqrt(sx * sy), s.paint) for s in self.strokes)
        return DragPoints(width, height, pairs, strokes, self.mask)

    def validate(self, need_points: bool = True) -> "DragPoints":
        """Refuse what no drag method can do: no points, a point outside the image, a handle or target
        outside the editable region. Returns self."""
        if need_points and not self.pairs:
            raise DragError("points", "there are no handle/target pairs",
                            "click a point on the object (the handle), then where it should go (the target)")
        for i, (hnd, tgt) in enumerate(self.pairs):
            for name, (x, y) in (("handle", hnd), ("target", tgt)):
                if not (0 <= x < self.width and 0 <= y < self.height):
                    raise DragError(f"points[{i}].{name}", f"({x:g}, {y:g}) is outside the {self.width}x{self.height} image",
                                    "place every point on the image")
        reg = self.region()
        if reg is not None:
            for i, (hnd, tgt) in enumerate(self.pairs):
                for name, (x, y) in (("handle", hnd), ("target", tgt)):
                    if reg[min(int(y), self.height - 1), min(int(x), self.width - 1)] < 0.5:
                        raise DragError(f"points[{i}].{name}", f"({x:g}, {y:g}) is outside the editable region (mask)",
                                        "paint the region over the object and where it goes, or move the point")
        return self

    def describe(self) -> str:
        lines = [f"{len(self.pairs)} drag(s) on {self.width}x{self.height} px" + (", masked" if self.has_mask else "")]
        for i, (h, t) in enumerate(self.pairs):
            lines.append(f"  {i + 1}: ({h[0]:.0f}, {h[1]:.0f}) -> ({t[0]:.0f}, {t[1]:.0f}), "
                         f"{math.hypot(t[0] - h[0], t[1] - h[1]):.1f} px")
        return "\n".join(lines)


def _num(v: float):
    r = round(float(v), 3)
    return int(r) if r == int(r) else r
