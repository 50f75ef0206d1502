"""The toy world: seeded 128x128 scenes of flat shapes on a flat background, with captions and ground truth.

A scene is a background colour plus one or two objects. Each object is a shape (circle, square,
triangle) of a named colour, with a size (the side of its square bounding box, in pixels) and a
position. Everything is a pure function of the seed, so a caption, an image and its masks can be
regenerated anywhere. Rendering uses 4x4 supersampling, so edges are anti-aliased like a photo's.

Captions follow one template, objects named left to right:
    "a red circle on a white background"
    "a red circle and a blue square on a yellow background"
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

IMAGE_SIZE = 128

# Named colours, spaced at least 0.36 apart in RGB (unit cube) so a pixel's nearest name is unambiguous.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (240, 125, 20),
    "yellow": (245, 225, 40),
    "green": (35, 160, 60),
    "blue": (35, 75, 215),
    "purple": (135, 50, 175),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOR_NAMES = list(COLORS)
SHAPES = ("circle", "square", "triangle")

# Object sizes as a fraction of the frame (side of the bounding square). Larger objects make shapes
# easier to learn; two-object scenes use smaller ones so they fit side by side.
SINGLE_SIZE = (0.30, 0.60)
PAIR_SIZE = (0.25, 0.42)
MARGIN = 3          # pixels between an object and the frame edge
GAP = 4             # pixels between the boxes of two objects
P_SINGLE = 0.6      # share of one-object scenes in the training distribution


def shape_inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test of a base shape in box coordinates u, v in [0, 1] (v downwards)."""
    if shape == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    if shape == "square":
        return (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    if shape == "triangle":  # upright isosceles: apex at the top centre, base along the bottom edge
        return (v >= 0) & (v <= 1) & (np.abs(u - 0.5) <= 0.5 * v)
    raise ValueError(f"unknown shape {shape!r}")


MIN_COLOR_DISTANCE = 0.3   # a new colour closer than this (RGB unit cube) to a known one would be misread


@dataclass(frozen=True)
class Vocabulary:
    """The colours and shapes a scene may use and the checker reads. BASE is the trained world's (what
    sample_scene draws from and captions name); a technique that teaches a new concept (personalization)
    extends a copy, e.g. ``BASE.with_color("teal", (0, 150, 150))`` or
    ``BASE.with_shape("star", inside_fn)``, and passes it to the scenes it renders and to the scorer.
    Extending never changes BASE, so existing scenes, cases and readings stay as they are."""
    colors: tuple[tuple[str, tuple[int, int, int]], ...]
    shapes: tuple[tuple[str, Callable], ...]

    @property
    def color_names(self) -> list[str]:
        return [n for n, _ in self.colors]

    @property
    def shape_names(self) -> list[str]:
        return [n for n, _ in self.shapes]

    def rgb(self, name: str) -> np.ndarray:
        """A named colour as float RGB in [0, 1]."""
        for n, c in self.colors:
            if n == name:
                return np.asarray(c, dtype=np.float32) / 255.0
        raise ValueError(f"unknown colour {name!r} (known: {', '.join(self.color_names)})")

    def palette(self) -> np.ndarray:
        """(n_colours, 3) float RGB in [0, 1], in color_names order."""
        return np.stack([np.asarray(c, dtype=np.float32) / 255.0 for _, c in self.colors])

    def inside(self, shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        for n, fn in self.shapes:
            if n == shape:
                return fn(u, v)
        raise ValueError(f"unknown shape {shape!r} (known: {', '.join(self.shape_names)})")

    def with_color(self, name: str, rgb: tuple[int, int, int]) -> "Vocabulary":
        name = name.lower()
        if name in self.color_names or name in self.shape_names or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise ValueError(f"colour name {name!r} is taken or not one lowercase word")
        new = np.asarray(rgb, dtype=np.float32) / 255.0
        d = np.linalg.norm(self.palette() - new[None], axis=1)
        if d.min() < MIN_COLOR_DISTANCE:
            raise ValueError(f"colour {name} {tuple(rgb)} is {d.min():.2f} from {self.color_names[int(d.argmin())]} "
                             f"(at least {MIN_COLOR_DISTANCE} in the RGB unit cube keeps readings unambiguous)")
        return Vocabulary(self.colors + ((name, tuple(int(x) for x in rgb)),), self.shapes)

    def with_shape(self, name: str, inside: Callable) -> "Vocabulary":
        """inside(u, v) -> bool array: the shape in box coordinates u, v in [0, 1] (v downwards), inscribed in
        the square box so the checker's template fit can tell it from the others."""
        name = name.lower()
        if name in self.shape_names or name in self.color_names or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise ValueError(f"shape name {name!r} is taken or not one lowercase word")
        return Vocabulary(self.colors, self.shapes + ((name, inside),))


def _base_shape(name):
    return lambda u, v: shape_inside(name, u, v)


BASE = Vocabulary(tuple(COLORS.items()), tuple((s, _base_shape(s)) for s in SHAPES))


def color_rgb(name: str, vocab: Vocabulary = BASE) -> np.ndarray:
    """A named colour as float RGB in [0, 1]."""
    return vocab.rgb(name)


@dataclass(frozen=True)
class ToyObject:
    shape: str
    color: str
    x: int      # left edge of the bounding square, pixels
    y: int      # top edge
    size: int   # side of the bounding square, pixels

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), x1/y1 exclusive."""
        return (self.x, self.y, self.x + self.size, self.y + self.size)

    @property
    def phrase(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[ToyObject, ...]
    seed: int = -1
    size: int = IMAGE_SIZE
    vocab: Vocabulary = BASE     # the colours and shapes the scene's objects may use

    @property
    def caption(self) -> str:
        return caption_for(self.background, [(o.color, o.shape) for o in self.objects])

    @property
    def spec(self) -> "CaptionSpec":
        return CaptionSpec(self.background, tuple((o.color, o.shape) for o in self.objects))

    def render(self, supersample: int = 4) -> np.ndarray:
        """(H, W, 3) float32 in [0, 1]."""
        return render(self, supersample)

    def masks(self) -> list[np.ndarray]:
        """One (H, W) bool mask per object (pixel centre inside the shape)."""
        return [coverage(o, self.size, 1, self.vocab) >= 0.5 for o in self.objects]

    def coverages(self, supersample: int = 4) -> list[np.ndarray]:
        """One (H, W) float coverage map per object (anti-aliased mask)."""
        return [coverage(o, self.size, supersample, self.vocab) for o in self.objects]

    def with_object(self, index: int, color: str | None = None, shape: str | None = None,
                    x: int | None = None, y: int | None = None, size: int | None = None) -> "Scene":
        """The same scene with one object recoloured, reshaped, moved or resized (the ground truth of an
        edit; a drag edit is `with_object(i, x=..., y=...)`). Objects keep their order."""
        objs = list(self.objects)
        o = objs[index]
        objs[index] = ToyObject(shape or o.shape, color or o.color, o.x if x is None else int(x),
                                o.y if y is None else int(y), o.size if size is None else int(size))
        return Scene(self.background, tuple(objs), self.seed, self.size, self.vocab)


@dataclass(frozen=True)
class CaptionSpec:
    """What a caption asks for: a background colour and (colour, shape) pairs, left to right."""
    background: str
    objects: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    @property
    def caption(self) -> str:
        return caption_for(self.background, list(self.objects))


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_for(background: str, objects) -> str:
    phrases = " and ".join(f"{article(c)} {c} {s}" for c, s in objects)
    return f"{phrases} on {article(background)} {background} background"


_CAPTION_RE = re.compile(r"^\s*(?P<objs>.+?)\s+on\s+an?\s+(?P<bg>\w+)\s+background\s*$", re.I)
_OBJ_RE = re.compile(r"^an?\s+(?P<c>\w+)\s+(?P<s>\w+)$", re.I)


def parse_caption(text: str, vocab: Vocabulary = BASE) -> CaptionSpec:
    """Inverse of caption_for; raises ValueError on text outside the template (or the vocabulary)."""
    m = _CAPTION_RE.match(text)
    if not m:
        raise ValueError(f"not a toy-world caption: {text!r}")
    objs = []
    for part in re.split(r"\s+and\s+", m.group("objs").strip()):
        om = _OBJ_RE.match(part.strip())
        if not om or om.group("c").lower() not in vocab.color_names or om.group("s").lower() not in vocab.shape_names:
            raise ValueError(f"not a toy-world object phrase: {part!r} in {text!r}")
        objs.append((om.group("c").lower(), om.group("s").lower()))
    bg = m.group("bg").lower()
    if bg not in vocab.color_names:
        raise ValueError(f"unknown background colour {bg!r} in {text!r}")
    return CaptionSpec(bg, tuple(objs))


# ---------------------------------------------------------------------------------------------
# Held-out captions: single-object (colour, shape, background) triples never shown in training.

ALWAYS_TRAINED = {("red", "circle", "white"), ("blue", "circle", "white"), ("red", "square", "white")}


def _hash01(*parts: str) -> float:
    h = hashlib.sha256("|".join(parts).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0 ** 64


def single_triples() -> list[tuple[str, str, str]]:
    return [(c, s, bg) for c in COLOR_NAMES for s in SHAPES for bg in COLOR_NAMES if bg != c]


def is_held_out(color: str, shape: str, background: str) -> bool:
    """About 10 % of the single-object triples (a fixed hash), never the ones tests and demos use."""
    if (color, shape, background) in ALWAYS_TRAINED:
        return False
    return _hash01("heldout", color, shape, background) < 0.10


def held_out_triples() -> list[tuple[str, str, str]]:
    return [t for t in single_triples() if is_held_out(*t)]


# ---------------------------------------------------------------------------------------------
# Sampling

def sample_scene(seed: int, n_objects: int | None = None, size: int = IMAGE_SIZE, split: str = "train") -> Scene:
    """The scene of a seed. split="train" never yields a held-out single-object triple;
    split="heldout" yields only held-out single-object scenes; split="any" ignores the split."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x70F])
    if split == "heldout":
        triples = held_out_triples()
        c, s, bg = triples[rng.integers(len(triples))]
        return Scene(bg, (_place_single(rng, s, c, size),), seed, size)
    if n_objects is None:
        n_objects = 1 if rng.random() < P_SINGLE else 2
    for _ in range(1000):
        bg = COLOR_NAMES[rng.integers(len(COLOR_NAMES))]
        others = [c for c in COLOR_NAMES if c != bg]
        if n_objects == 1:
            c = others[rng.integers(len(others))]
            s = SHAPES[rng.integers(len(SHAPES))]
            if split == "train" and is_held_out(c, s, bg):
                continue
            return Scene(bg, (_place_single(rng, s, c, size),), seed, size)
        cols = rng.choice(len(others), size=2, replace=False)
        objs = []
        for ci in cols:
            objs.append((SHAPES[rng.integers(len(SHAPES))], others[ci]))
        placed = _place_pair(rng, objs, size)
        if placed is not None:
            placed.sort(key=lambda o: (o.x + o.size / 2, o.y))
            return Scene(bg, tuple(placed), seed, size)
    raise RuntimeError("could not place the objects")  # pragma: no cover


def _rand_size(rng, frac, size):
    lo, hi = frac
    return int(round(rng.uniform(lo, hi) * size))


def _place_single(rng, shape, color, size) -> ToyObject:
    s = _rand_size(rng, SINGLE_SIZE, size)
    x = int(rng.integers(MARGIN, size - MARGIN - s + 1))
    y = int(rng.integers(MARGIN, size - MARGIN - s + 1))
    return ToyObject(shape, color, x, y, s)


def _place_pair(rng, objs, size):
    for _ in range(200):
        placed = []
        for shape, color in objs:
            s = _rand_size(rng, PAIR_SIZE, size)
            x = int(rng.integers(MARGIN, size - MARGIN - s + 1))
            y = int(rng.integers(MARGIN, size - MARGIN - s + 1))
            placed.append(ToyObject(shape, color, x, y, s))
        a, b = placed
        sep_x = a.x + a.size + GAP <= b.x or b.x + b.size + GAP <= a.x
        sep_y = a.y + a.size + GAP <= b.y or b.y + b.size + GAP <= a.y
        # Objects must also be distinguishable left to right (the caption names them in that order).
        centre_gap = abs((a.x + a.size / 2) - (b.x + b.size / 2))
        if (sep_x or sep_y) and centre_gap >= 8:
            return placed
    return None


# ---------------------------------------------------------------------------------------------
# Rendering

def shape_template(shape: str, h: int, w: int, supersample: int = 2, vocab: Vocabulary = BASE) -> np.ndarray:
    """Coverage of `shape` inscribed in an h x w box (used by the checker)."""
    ss = supersample
    ys = (np.arange(h * ss) + 0.5) / (h * ss)
    xs = (np.arange(w * ss) + 0.5) / (w * ss)
    inside = vocab.inside(shape, xs[None, :], ys[:, None]).astype(np.float32)
    return inside.reshape(h, ss, w, ss).mean(axis=(1, 3))


def coverage(obj: ToyObject, size: int = IMAGE_SIZE, supersample: int = 4, vocab: Vocabulary = BASE) -> np.ndarray:
    """(size, size) fraction of each pixel covered by the object."""
    ss = supersample
    out = np.zeros((size, size), dtype=np.float32)
    x0, y0, x1, y1 = obj.box
    x0c, y0c, x1c, y1c = max(x0, 0), max(y0, 0), min(x1, size), min(y1, size)
    if x1c <= x0c or y1c <= y0c:
        return out
    ys = (np.arange(y0c * ss, y1c * ss) + 0.5) / ss
    xs = (np.arange(x0c * ss, x1c * ss) + 0.5) / ss
    u = (xs[None, :] - x0) / obj.size
    v = (ys[:, None] - y0) / obj.size
    inside = vocab.inside(obj.shape, u, v).astype(np.float32)
    out[y0c:y1c, x0c:x1c] = inside.reshape(y1c - y0c, ss, x1c - x0c, ss).mean(axis=(1, 3))
    return out


def render(scene: Scene, supersample: int = 4) -> np.ndarray:
    img = np.broadcast_to(scene.vocab.rgb(scene.background), (scene.size, scene.size, 3)).copy()
    for o in scene.objects:
        a = coverage(o, scene.size, supersample, scene.vocab)[..., None]
        img = img * (1 - a) + scene.vocab.rgb(o.color) * a
    return img.astype(np.float32)


def render_batch(scenes) -> np.ndarray:
    """(B, H, W, 3) float32: ComfyUI's IMAGE layout."""
    return np.stack([s.render() for s in scenes])
