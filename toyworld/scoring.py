"""The one scorer of every toy-world quality table: position-aware success against rendered ground truth,
the image metrics, and rates with 95 % Wilson intervals.

A scene's ground truth says where every object is, so success means what a user means: the object is
*where it should be* (IoU of the region the checker reads with the ground-truth mask >= IOU_MIN), with
the asked colour and shape, every other object unchanged and nothing extra in the picture.

    score_scene(image, scene)                the image should show exactly `scene` (the core test)
    score_edit(edited, source, target, i)    attribute edit of object i in place (colour / shape swaps,
                                             local edits in two-object scenes: the other object must stay)
    score_edits(edited, source, target, ix)  several objects edited in one pass (LEDITS++'s two edits)
    score_drag(edited, source, target, i)    object i moved to where `target` has it; the others stay put
    score_prompt(image, prompt, regions)     txt2img: the prompt's objects, optionally each centroid in a
                                             given box or mask (layout); caching and personalization too
    mask_iou(pred, gt)                       a predicted MASK (e.g. DiffEdit's) against a ground-truth mask
    Rate / rate / tally                      k of n with a Wilson interval, grouped per split
    color_split / shape_pair                 the near / far colour split and the shape-pair label of a case

Every score has `ok` (success), `why` (the first failure, "" on success) and `record()` (a flat,
JSON-able dict for the per-case results files). The old position-free reading (checker.check: colours,
shapes and background wherever they are) is kept as `position_free` on edit and prompt scores.
Numpy/scipy only: no model needed, so the tests score rendered ground truth cheaply.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from . import checker, world
from .world import CaptionSpec, Scene, ToyObject, Vocabulary

IOU_MIN = 0.7            # region of the read object vs the ground-truth mask
PRESERVE_DILATE = 3      # px around edited objects left out of preservation PSNR (anti-aliased edges, halos)
NEAR_RGB = 0.7           # colour swaps below this RGB distance (unit cube) are "near", the rest "far"
DRAG_TOLERANCE = 6.0     # px (at 128 px; scaled with the image) between a dragged object's centroid and its target
Z95 = 1.959963984540054


# ---------------------------------------------------------------------------------------------
# Rates

def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/n (95 % by default); (0, 1) when n == 0."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Rate:
    """k successes of n, with its 95 % Wilson interval; str() is the table cell, e.g. "63 % [49-75] (30/48)"."""
    k: int
    n: int

    @property
    def value(self) -> float:
        return self.k / self.n if self.n else float("nan")

    @property
    def interval(self) -> tuple[float, float]:
        return wilson(self.k, self.n)

    def __str__(self) -> str:
        if not self.n:
            return "n/a"
        lo, hi = self.interval
        return f"{100 * self.value:.0f} % [{100 * lo:.0f}–{100 * hi:.0f}] ({self.k}/{self.n})"

    def record(self) -> dict:
        lo, hi = self.interval
        return {"k": self.k, "n": self.n, "rate": self.value, "lo": lo, "hi": hi}


def rate(flags) -> Rate:
    flags = [bool(f) for f in flags]
    return Rate(sum(flags), len(flags))


def tally(records, key, flag="success") -> dict:
    """{group: Rate} over records (dicts or objects); key(record) -> group name (None: left out);
    flag is the record field (or a callable) that says success."""
    get = flag if callable(flag) else (lambda r: r[flag] if isinstance(r, dict) else getattr(r, flag))
    groups: dict = {}
    for r in records:
        g = key(r)
        if g is not None:
            groups.setdefault(g, []).append(get(r))
    return {g: rate(v) for g, v in groups.items()}


def color_split(a: str, b: str, vocab: Vocabulary = world.BASE) -> str:
    """"near" when colours a and b are closer than NEAR_RGB in RGB (red-orange, blue-purple, ...), else "far"."""
    return "near" if float(np.linalg.norm(vocab.rgb(a) - vocab.rgb(b))) < NEAR_RGB else "far"


def shape_pair(a: str, b: str, vocab: Vocabulary = world.BASE) -> str:
    """Unordered label of a shape swap in vocabulary order, e.g. "circle<->triangle" for either direction."""
    order = vocab.shape_names
    x, y = sorted((a, b), key=order.index)
    return f"{x}<->{y}"


# ---------------------------------------------------------------------------------------------
# Image metrics

def psnr(a, b, mask=None) -> float:
    """PSNR in dB of two (H, W, 3) images in [0, 1], optionally over a (H, W) bool mask only."""
    a = checker._to_numpy(a).astype(np.float64)
    b = checker._to_numpy(b).astype(np.float64)
    d = (a - b) ** 2
    if mask is not None:
        m = np.asarray(mask, bool)
        if m.sum() == 0:
            return float("nan")
        d = d[m]
    mse = float(d.mean())
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


def dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    from scipy import ndimage
    if pixels <= 0:
        return np.asarray(mask, bool)
    return ndimage.binary_dilation(np.asarray(mask, bool), structure=np.ones((3, 3), bool), iterations=pixels)


def _bool_mask(m, shape=None) -> np.ndarray:
    """A (H, W) bool mask from numpy/torch, (H, W), (1, H, W) or (1, H, W, 1), float (>= 0.5) or bool;
    resized to `shape` (nearest) when given and different, as a MASK at latent or image size may be."""
    if hasattr(m, "detach"):
        m = m.detach().float().cpu().numpy()
    m = np.asarray(m)
    m = m.reshape(m.shape[-2:]) if m.ndim == 3 and m.shape[0] == 1 else m
    m = m[..., 0] if m.ndim == 3 and m.shape[-1] == 1 else m
    if m.ndim != 2:
        raise ValueError(f"a mask must be one (H, W) map, got shape {m.shape}")
    b = m >= 0.5 if m.dtype != bool else m
    if shape is not None and b.shape != tuple(shape):
        ys = (np.arange(shape[0]) * b.shape[0] // shape[0])
        xs = (np.arange(shape[1]) * b.shape[1] // shape[1])
        b = b[ys][:, xs]
    return b


def mask_iou(pred, gt) -> float:
    """IoU of a predicted mask (any of _bool_mask's forms, resized to gt) with a ground-truth bool mask;
    1.0 when both are empty."""
    g = _bool_mask(gt)
    p = _bool_mask(pred, g.shape)
    union = float((p | g).sum())
    return float((p & g).sum()) / union if union else 1.0


def centroid(mask) -> tuple[float, float]:
    """(x, y) centre of mass of a bool mask in pixels (pixel centres at +0.5), as DetectedObject.centroid."""
    ys, xs = np.nonzero(np.asarray(mask, bool))
    if not len(xs):
        return float("nan"), float("nan")
    return float(xs.mean() + 0.5), float(ys.mean() + 0.5)


def _distance(a, b) -> float:
    return float(math.hypot(a[0] - b[0], a[1] - b[1]))


# ---------------------------------------------------------------------------------------------
# A scene against the image

@dataclass
class ObjectCheck:
    """One ground-truth object against the object read at its place (found is None: nothing overlaps it)."""
    expected: ToyObject
    found: checker.DetectedObject | None
    iou: float                      # found's region vs the expected object's ground-truth mask
    centroid_error: float           # px between found's centroid and the expected one (inf if not found)

    @property
    def in_place(self) -> bool:
        return self.found is not None and self.iou >= IOU_MIN

    @property
    def color_ok(self) -> bool:
        return self.found is not None and self.found.color == self.expected.color

    @property
    def shape_ok(self) -> bool:
        return self.found is not None and self.found.shape == self.expected.shape

    @property
    def ok(self) -> bool:
        return self.in_place and self.color_ok and self.shape_ok

    @property
    def why(self) -> str:
        e = self.expected.phrase
        if self.found is None:
            return f"{e}: nothing at its place"
        if not self.in_place:
            return f"{e}: moved or resized (IoU {self.iou:.2f})"
        if not self.color_ok:
            return f"{e}: read as {self.found.color}"
        if not self.shape_ok:
            return f"{e}: read as {self.found.shape}"
        return ""

    def record(self, prefix: str = "") -> dict:
        f = self.found
        return {prefix + "read": f"{f.color} {f.shape}" if f else None, prefix + "iou": round(self.iou, 3),
                prefix + "centroid_error": round(self.centroid_error, 2)}


@dataclass
class SceneScore:
    objects: list[ObjectCheck]                  # in the scene's order
    extra: list[checker.DetectedObject]         # objects read that match no ground-truth object
    background_ok: bool
    reading: checker.Reading = field(repr=False)

    @property
    def ok(self) -> bool:
        return self.background_ok and not self.extra and all(o.ok for o in self.objects)

    @property
    def why(self) -> str:
        if not self.background_ok:
            return f"background read as {self.reading.background}"
        for o in self.objects:
            if not o.ok:
                return o.why + (f"; {self._extra_names()} elsewhere" if self.extra else "")
        if self.extra:
            return f"extra object: {self._extra_names()}"
        return ""

    def _extra_names(self) -> str:
        return ", ".join(f"{d.color} {d.shape}" for d in self.extra)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = float((a | b).sum())
    return float((a & b).sum()) / union if union else 0.0


def score_scene(image, scene: Scene, vocab: Vocabulary | None = None) -> SceneScore:
    """Does the image show exactly `scene`? Each ground-truth object is paired with the read object whose
    region overlaps its mask most (one to one, largest IoU first); it passes when that IoU is at least
    IOU_MIN and the colour and shape read are its own. Read objects paired with nothing are `extra`."""
    vocab = vocab or scene.vocab
    reading = checker.read(image, vocab)
    gts = scene.masks()
    pairs = sorted(((_iou(d.mask, g), j, i) for i, g in enumerate(gts) for j, d in enumerate(reading.objects)),
                   reverse=True)
    found: dict[int, tuple[int, float]] = {}
    used = set()
    for iou, j, i in pairs:
        if iou > 0 and i not in found and j not in used:
            found[i] = (j, iou)
            used.add(j)
    checks = []
    for i, (o, g) in enumerate(zip(scene.objects, gts)):
        if i in found:
            d = reading.objects[found[i][0]]
            checks.append(ObjectCheck(o, d, found[i][1], _distance(d.centroid, centroid(g))))
        else:
            checks.append(ObjectCheck(o, None, 0.0, float("inf")))
    extra = [d for j, d in enumerate(reading.objects) if j not in used]
    return SceneScore(checks, extra, reading.background == scene.background, reading)


# ---------------------------------------------------------------------------------------------
# Edits

def preserve_region(*masks: np.ndarray, dilate_px: int = PRESERVE_DILATE) -> np.ndarray:
    """Pixels preservation is measured on: outside the union of the given masks, dilated."""
    region = np.zeros_like(np.asarray(masks[0], bool))
    for m in masks:
        region |= np.asarray(m, bool)
    return ~dilate(region, dilate_px)


@dataclass
class EditScore:
    """An edit of object `index` scored against the ground-truth target scene."""
    scene: SceneScore              # the edited image against the target scene
    index: int
    position_free: bool            # the old reading: checker.check(edited, target) colours, shapes, background
    preserve_psnr: float           # dB against the source outside the edited object (both footprints, dilated)
    footprint: str = "box"         # which ground-truth footprint of a new shape was met: "box" or "centroid"
    indices: tuple = ()            # every edited object (score_edits); () = (index,)

    @property
    def ok(self) -> bool:
        return self.scene.ok

    @property
    def edited(self) -> ObjectCheck:
        return self.scene.objects[self.index]

    @property
    def edited_ok(self) -> list:
        """Per edited object (score_edits' order): in place with its target colour and shape."""
        return [self.scene.objects[i].ok for i in (self.indices or (self.index,))]

    @property
    def others_ok(self) -> bool:
        """Every object other than the edited ones is where it was, with its colour and shape."""
        edited = set(self.indices or (self.index,))
        return all(o.ok for i, o in enumerate(self.scene.objects) if i not in edited)

    @property
    def why(self) -> str:
        return self.scene.why

    def record(self) -> dict:
        return {"success": self.ok, "position_free": self.position_free, "why": self.why, **self.edited.record(),
                "footprint": self.footprint, "others_ok": self.others_ok,
                "preserve_psnr": json_number(self.preserve_psnr)}


def json_number(x: float, digits: int = 3):
    """A float for a results file: rounded, None for NaN, inf kept."""
    return None if math.isnan(x) else (x if math.isinf(x) else round(float(x), digits))


def centred_footprint(source: Scene, target: Scene, index: int) -> Scene | None:
    """For a shape swap, the target with the new shape moved so that its centre of mass is the source
    object's (a triangle's sits lower in its box than a circle's); None when that is the box itself."""
    (sx, sy), (tx, ty) = centroid(source.masks()[index]), centroid(target.masks()[index])
    dx, dy = round(sx - tx), round(sy - ty)
    if (dx, dy) == (0, 0):
        return None
    o = target.objects[index]
    return target.with_object(index, x=o.x + dx, y=o.y + dy)


def score_edit(edited, source: Scene, target: Scene, index: int = 0, source_image=None) -> EditScore:
    """Attribute edit of object `index` in place: target is source.with_object(index, color=..., shape=...).
    Success: score_scene(edited, target).ok, i.e. the edited object overlaps its ground-truth footprint
    with IoU >= IOU_MIN and reads as the target colour and shape, every other object is unchanged,
    nothing was added and the background is kept. The footprint of a colour swap is the source object's
    mask; a new shape may fill the source's box ("box") or sit on the source's centre of mass
    ("centroid", centred_footprint): both keep the object where it was, the better one counts.
    Preservation: PSNR against `source_image` (default: the clean source render) outside the edited
    object's source and target footprints, dilated by PRESERVE_DILATE px."""
    return score_edits(edited, source, target, (index,), source_image)


def score_edits(edited, source: Scene, target: Scene, indices, source_image=None) -> EditScore:
    """score_edit for several objects edited in one pass (e.g. object 0's colour and object 1's shape):
    target differs from source in the objects `indices`; success = every one of them in place with its
    target colour and shape, the rest unchanged (score_scene(edited, target).ok). Each reshaped object may
    meet its box or its centred footprint (every combination is tried, the best counts: success first,
    then the summed IoU of the edited objects); preservation is measured outside all their footprints.
    `footprint` names each edited object's footprint, joined by "+"."""
    indices = tuple(int(i) for i in indices)
    src_img = source.render() if source_image is None else source_image
    masks = [m for i in indices for m in (source.masks()[i], target.masks()[i])]
    reshaped = [i for i in indices if source.objects[i].shape != target.objects[i].shape]
    best = None
    for moved in itertools.product((False, True), repeat=len(reshaped)):
        scene = target
        for i, m in zip(reshaped, moved):
            alt = centred_footprint(source, scene, i) if m else scene
            if alt is None:
                break
            scene = alt
        else:
            sc = score_scene(edited, scene)
            masks += [scene.masks()[i] for i, m in zip(reshaped, moved) if m]
            key = (sc.ok, sum(sc.objects[i].iou for i in indices))
            if best is None or key > best[0]:
                names = dict(zip(reshaped, moved))
                best = (key, sc, "+".join("centroid" if names.get(i) else "box" for i in indices))
    _, sc, footprint = best
    v = checker.check(edited, target)
    keep = preserve_region(*masks)
    return EditScore(sc, indices[0], bool(v.background_ok and v.colors_ok and v.shapes_ok), psnr(edited, src_img, keep),
                     footprint, indices if len(indices) > 1 else ())


@dataclass
class DragScore:
    """A drag of object `index` scored against the target scene (the object at its intended place)."""
    scene: SceneScore
    index: int
    dragged: checker.DetectedObject | None   # the object read as the dragged one (None: it vanished)
    centroid_error: float                    # px from the intended centroid (inf if vanished)
    tolerance: float
    preserve_psnr: float                     # dB outside the old and new footprints (dilated)

    @property
    def kept_look(self) -> bool:
        o = self.scene.objects[self.index].expected
        return self.dragged is not None and self.dragged.color == o.color and self.dragged.shape == o.shape

    @property
    def others_ok(self) -> bool:
        return all(o.ok for i, o in enumerate(self.scene.objects) if i != self.index)

    @property
    def leftovers(self) -> list:
        return [d for d in self.scene.extra if d is not self.dragged]

    @property
    def ok(self) -> bool:
        return (self.scene.background_ok and self.dragged is not None and self.centroid_error <= self.tolerance
                and self.kept_look and self.others_ok and not self.leftovers)

    @property
    def why(self) -> str:
        o = self.scene.objects[self.index].expected
        if not self.scene.background_ok:
            return f"background read as {self.scene.reading.background}"
        if self.dragged is None:
            return f"{o.phrase}: vanished"
        if not self.kept_look:
            return f"{o.phrase}: read as {self.dragged.color} {self.dragged.shape}"
        if self.centroid_error > self.tolerance:
            return f"{o.phrase}: {self.centroid_error:.1f} px from its target"
        for i, c in enumerate(self.scene.objects):
            if i != self.index and not c.ok:
                return c.why
        if self.leftovers:
            return "extra object: " + ", ".join(f"{d.color} {d.shape}" for d in self.leftovers)
        return ""

    def record(self) -> dict:
        d = self.dragged
        return {"success": self.ok, "why": self.why, "read": f"{d.color} {d.shape}" if d else None,
                "centroid_error": json_number(self.centroid_error, 2), "others_ok": self.others_ok,
                "preserve_psnr": json_number(self.preserve_psnr)}


def score_drag(edited, source: Scene, target: Scene, index: int = 0, tolerance: float | None = None,
               source_image=None) -> DragScore:
    """Drag edit: target is source.with_object(index, x=..., y=...). The dragged object is the one read at
    its target place, else (it stopped short or never moved) the unclaimed object of its colour nearest the
    target centroid, else the nearest unclaimed one. Success: its centroid within `tolerance` px
    (DRAG_TOLERANCE scaled to the image) of the target centroid, its colour and shape kept, every other
    object where it was and unchanged, no copy left behind, background kept. Preservation: PSNR against the
    source outside the union of the old and new footprints (dilated)."""
    tol = DRAG_TOLERANCE * target.size / world.IMAGE_SIZE if tolerance is None else float(tolerance)
    sc = score_scene(edited, target)
    want = centroid(target.masks()[index])
    chk = sc.objects[index]
    dragged = chk.found
    if dragged is None and sc.extra:
        color = [d for d in sc.extra if d.color == chk.expected.color]
        dragged = min(color or sc.extra, key=lambda d: _distance(d.centroid, want))
    err = _distance(dragged.centroid, want) if dragged is not None else float("inf")
    src_img = source.render() if source_image is None else source_image
    keep = preserve_region(source.masks()[index], target.masks()[index])
    return DragScore(sc, index, dragged, err, tol, psnr(edited, src_img, keep))


# ---------------------------------------------------------------------------------------------
# Prompts (txt2img, layout, caching, personalization)

def _in_region(d: checker.DetectedObject, region) -> bool:
    x, y = d.centroid
    if isinstance(region, (tuple, list)) and len(region) == 4 and np.ndim(region) == 1:
        x0, y0, x1, y1 = region
        return x0 <= x < x1 and y0 <= y < y1
    m = _bool_mask(region, d.mask.shape)
    return bool(m[min(int(y), m.shape[0] - 1), min(int(x), m.shape[1] - 1)])


@dataclass
class PromptScore:
    """An image against a prompt's objects (in prompt order); with regions, each object's centroid must
    lie in its region."""
    spec: CaptionSpec
    found: list[checker.DetectedObject | None]
    color_ok: list[bool]
    shape_ok: list[bool]
    in_region: list[bool | None]        # None where no region was given
    background_ok: bool
    count_ok: bool
    reading: checker.Reading = field(repr=False)

    @property
    def position_free(self) -> bool:
        """Colours, shapes, background and count, wherever the objects are (checker.check's `ok`)."""
        return self.background_ok and self.count_ok and all(self.color_ok) and all(self.shape_ok)

    @property
    def ok(self) -> bool:
        return self.position_free and all(r is not False for r in self.in_region)

    @property
    def why(self) -> str:
        if not self.background_ok:
            return f"background read as {self.reading.background}"
        for (c, s), f, cok, sok, r in zip(self.spec.objects, self.found, self.color_ok, self.shape_ok, self.in_region):
            if f is None:
                return f"{c} {s}: missing"
            if not (cok and sok):
                return f"{c} {s}: read as {f.color} {f.shape}"
            if r is False:
                return f"{c} {s}: outside its region"
        if not self.count_ok:
            return f"{len(self.reading.objects)} objects read, {len(self.spec.objects)} asked"
        return ""

    def record(self) -> dict:
        return {"success": self.ok, "position_free": self.position_free, "why": self.why,
                "read": self.reading.names(), "in_region": self.in_region}


def score_prompt(image, prompt: str | CaptionSpec | Scene, regions=None, vocab: Vocabulary | None = None) -> PromptScore:
    """txt2img correctness: background, count, and each prompt object found with its colour and shape;
    `regions` (one per prompt object: an (x0, y0, x1, y1) box in pixels, a (H, W) mask, or None) also
    asks for each object's centroid inside its region. Prompt objects are paired one to one with read
    objects to get the most right (colour, then shape, then region; larger objects first on ties).
    Personalization passes the extended vocabulary it taught; a Scene prompt brings its own."""
    if isinstance(prompt, Scene):
        vocab = vocab or prompt.vocab
        spec = prompt.spec
    else:
        vocab = vocab or world.BASE
        spec = prompt if isinstance(prompt, CaptionSpec) else world.parse_caption(prompt, vocab)
    reading = checker.read(image, vocab)
    objs = list(spec.objects)
    regions = list(regions) if regions is not None else [None] * len(objs)
    if len(regions) != len(objs):
        raise ValueError(f"{len(regions)} regions for {len(objs)} prompt objects")
    det = reading.objects

    def merit(i, d):
        c, s = objs[i]
        return (4 * (d.color == c) + 2 * (d.shape == s) + (regions[i] is not None and _in_region(d, regions[i])),
                d.area)

    best: list = [None] * len(objs)
    if len(det) <= 6:   # the best one-to-one pairing (a prompt has few objects)
        best_key = None
        for perm in itertools.permutations(list(range(len(det))) + [None] * len(objs), len(objs)):
            if len({p for p in perm if p is not None}) != sum(p is not None for p in perm):
                continue
            key = tuple(map(sum, zip(*[merit(i, det[p]) if p is not None else (0, 0) for i, p in enumerate(perm)])))
            if best_key is None or key > best_key:
                best_key, best = key, [det[p] if p is not None else None for p in perm]
    else:               # a noisy picture: greedy in prompt order
        free = list(det)
        for i in range(len(objs)):
            if free:
                best[i] = max(free, key=lambda d, i=i: merit(i, d))
                free.remove(best[i])
    color_ok = [f is not None and f.color == c for f, (c, _s) in zip(best, objs)]
    shape_ok = [f is not None and f.shape == s for f, (_c, s) in zip(best, objs)]
    in_region = [None if r is None else (f is not None and _in_region(f, r)) for f, r in zip(best, regions)]
    return PromptScore(spec, best, color_ok, shape_ok, in_region, reading.background == spec.background,
                       len(det) == len(objs), reading)


def seam_difference(image, borders, band: int = 1) -> tuple[float, float]:
    """Panorama seams: (mean |column x - column x-1| over the given border columns x (each +- `band` - 1
    neighbours), the same mean over every other column pair). A seamless picture gives about equal values;
    a visible seam a border value well above the inside one. image (H, W, 3) in [0, 1], numpy or torch."""
    img = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    d = np.abs(np.diff(img.astype(np.float64), axis=1)).mean(axis=(0, 2))     # d[x - 1] = |col x - col x-1|
    at = set()
    for b in borders:
        for x in range(b - band + 1, b + band):
            if 1 <= x < img.shape[1]:
                at.add(x - 1)
    inside = [i for i in range(len(d)) if i not in at]
    return float(np.mean([d[i] for i in sorted(at)])) if at else 0.0, float(np.mean(d[inside])) if inside else 0.0
