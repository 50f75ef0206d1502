"""Read an image of the toy world back into colours, shapes and boxes, and score it against a caption.

Pixel statistics only (no learned model): the background is the most frequent named colour in a
band just inside the frame; foreground pixels differ from it by more than FG_THRESHOLD; connected components of the
foreground larger than MIN_AREA are objects. An object's colour is the nearest named colour to the
median of its interior; its shape is the template (circle, square, triangle inscribed in the
component's bounding box) with the highest IoU against the component's mask.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .world import BASE, CaptionSpec, Scene, Vocabulary, parse_caption, shape_template

FG_THRESHOLD = 0.22     # RGB distance (unit cube) from the background colour
MIN_AREA = 250          # pixels at 128x128, scaled with the image area (the smallest object, a 32 px triangle, has 512)
BORDER = 2              # the background is read in the band BORDER..BAND px inside the frame
BAND = 12


def nearest_color(rgb, vocab: Vocabulary = BASE) -> tuple[str, float]:
    d = np.linalg.norm(vocab.palette() - np.asarray(rgb, dtype=np.float32)[None], axis=1)
    i = int(np.argmin(d))
    return vocab.color_names[i], float(d[i])


@dataclass
class DetectedObject:
    color: str
    shape: str
    box: tuple[int, int, int, int]      # x0, y0, x1, y1 (exclusive)
    area: int
    rgb: tuple[float, float, float]
    color_distance: float               # distance of the median colour to its named colour
    shape_iou: dict = field(default_factory=dict)
    mask: np.ndarray | None = field(default=None, repr=False)

    @property
    def centroid(self) -> tuple[float, float]:
        """(x, y) of the mask's centre of mass, in pixels (pixel centres at +0.5)."""
        ys, xs = np.nonzero(self.mask)
        return float(xs.mean() + 0.5), float(ys.mean() + 0.5)


@dataclass
class Reading:
    background: str
    background_rgb: tuple[float, float, float]
    objects: list[DetectedObject]       # largest first

    def names(self) -> list[str]:
        return [f"{o.color} {o.shape}" for o in self.objects]


def _to_numpy(image) -> np.ndarray:
    if hasattr(image, "detach"):
        image = image.detach().float().cpu().numpy()
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 4:
        if img.shape[0] != 1:
            raise ValueError("read() takes one image; loop over the batch")
        img = img[0]
    if img.shape[-1] != 3 and img.shape[0] == 3:
        img = np.moveaxis(img, 0, -1)
    return np.clip(img[..., :3], 0.0, 1.0)


def _background(img: np.ndarray, vocab: Vocabulary = BASE) -> tuple[str, np.ndarray]:
    """The most frequent named colour in a band BORDER..BAND px inside the frame (a decoder's edge halo and
    objects touching the frame barely affect it), and the median RGB of the band pixels of that colour."""
    h, w, _ = img.shape
    ring = np.zeros((h, w), bool)
    ring[BORDER:h - BORDER, BORDER:w - BORDER] = True
    ring[BAND:h - BAND, BAND:w - BAND] = False
    pix = img[ring]
    d = np.linalg.norm(pix[:, None, :] - vocab.palette()[None], axis=-1)
    cls = d.argmin(axis=1)
    best = int(np.bincount(cls, minlength=len(vocab.colors)).argmax())
    return vocab.color_names[best], np.median(pix[cls == best], axis=0)


def read(image, vocab: Vocabulary = BASE) -> Reading:
    """Analyse one (H, W, 3) image in [0, 1] (numpy or torch; a batch of one is accepted). Colours and
    shapes are named from `vocab` (the trained world's by default; pass an extended one to read a
    personalized concept)."""
    from scipy import ndimage
    img = _to_numpy(image)
    h, w, _ = img.shape
    bg_name, bg_rgb = _background(img, vocab)
    dist = np.linalg.norm(img - bg_rgb[None, None], axis=-1)
    fg = dist > FG_THRESHOLD
    fg = ndimage.binary_opening(fg, structure=np.ones((3, 3), bool))
    labels, n = ndimage.label(fg, structure=np.ones((3, 3), int))
    min_area = MIN_AREA * (h * w) / (128 * 128)
    objects = []
    for idx in range(1, n + 1):
        mask = labels == idx
        area = int(mask.sum())
        if area < min_area:
            continue
        ys, xs = np.nonzero(mask)
        x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
        inner = ndimage.binary_erosion(mask, structure=np.ones((3, 3), bool), iterations=2)
        pix = img[inner] if inner.sum() >= 16 else img[mask]
        rgb = np.median(pix, axis=0)
        cname, cdist = nearest_color(rgb, vocab)
        crop = mask[y0:y1, x0:x1].astype(np.float32)
        ious = {}
        for s in vocab.shape_names:
            t = shape_template(s, y1 - y0, x1 - x0, vocab=vocab) >= 0.5
            inter = float((t & (crop > 0)).sum())
            union = float((t | (crop > 0)).sum())
            ious[s] = inter / max(union, 1.0)
        shape = max(ious, key=ious.get)
        objects.append(DetectedObject(cname, shape, (x0, y0, x1, y1), area, tuple(float(v) for v in rgb), cdist, ious, mask))
    objects.sort(key=lambda o: -o.area)
    return Reading(bg_name, tuple(float(v) for v in bg_rgb), objects)


@dataclass
class Verdict:
    """How well an image matches a caption. Per-object flags are in caption order."""
    background_ok: bool
    color_ok: list[bool]
    shape_ok: list[bool]
    count_ok: bool
    matched: list[DetectedObject | None]
    reading: Reading

    @property
    def colors_ok(self) -> bool:
        return all(self.color_ok)

    @property
    def shapes_ok(self) -> bool:
        return all(self.shape_ok)

    @property
    def ok(self) -> bool:
        return self.background_ok and self.colors_ok and self.shapes_ok and self.count_ok


def check(image, caption: str | CaptionSpec | Scene, vocab: Vocabulary | None = None) -> Verdict:
    """Position-free reading of an image against a caption (or a spec / scene): colours, shapes,
    background and count, wherever the objects are. Edit and prompt tables score with
    toyworld.scoring, which also checks where each object is; this is its "position-free" column.

    Each captioned object is matched to the largest unmatched detected object of its colour (colour
    correct), else to the largest unmatched object (colour wrong); its shape is that object's shape.
    """
    if vocab is None:
        vocab = caption.vocab if isinstance(caption, Scene) else BASE
    spec = caption if isinstance(caption, CaptionSpec) else caption.spec if isinstance(caption, Scene) else parse_caption(caption, vocab)
    reading = read(image, vocab)
    free = list(reading.objects)
    color_ok, matched = [], []
    for c, _s in spec.objects:
        hit = next((o for o in free if o.color == c), None)
        color_ok.append(hit is not None)
        if hit is not None:
            free.remove(hit)
        matched.append(hit)
    for i, (_c, _s) in enumerate(spec.objects):
        if matched[i] is None and free:
            matched[i] = free.pop(0)
    shape_ok = [m is not None and m.shape == s for m, (_c, s) in zip(matched, spec.objects)]
    return Verdict(reading.background == spec.background, color_ok, shape_ok,
                   len(reading.objects) == len(spec.objects), matched, reading)


def check_scene(image, scene: Scene) -> dict:
    """Against full ground truth, position included (toyworld.scoring.score_scene, as a dict):
    every object in place (mask IoU >= scoring.IOU_MIN) with its colour and shape, nothing extra,
    background kept."""
    from . import scoring
    sc = scoring.score_scene(image, scene)
    return {"background": sc.background_ok, "color": all(o.color_ok for o in sc.objects),
            "shape": all(o.shape_ok for o in sc.objects), "count": len(sc.reading.objects) == len(scene.objects),
            "in_place": all(o.in_place for o in sc.objects), "ok": sc.ok, "score": sc,
            "verdict": check(image, scene)}
