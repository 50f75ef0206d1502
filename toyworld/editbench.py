"""The edit-quality benchmark on the toy world: fixed edit cases with exact ground truth, a registry of
technique runners, and one table row per technique and settings. Scoring: toyworld/scoring.py.

A technique runner edits a real image (a clean render of a toy scene) from its caption to a target
caption, with a settings dict:

    @register("SDEdit", order=10, reference=lambda ctx: [{"strength": 0.5, "steps": 10, "cfg": ctx.cfg}],
              shipped=lambda: shipped.read_settings({...}))
    def run(ctx: EditContext, case: EditCase, target_prompt: str, settings: dict) -> torch.Tensor:
        ...   # (H, W, 3) in [0, 1]; or (edited, reconstruction) when one call yields both

Each technique is measured once per reference settings (the benchmark's own: ctx.steps, ctx.cfg, node
defaults) and once at the settings its shipped workflow uses (read from the workflow JSON at run time)
when those differ from every reference set. Per row it is called with each case's target caption
(scored by scoring.score_edit) and, on the first `n_recon` sources, with the source caption itself
(reconstruction PSNR) unless the edit call already returned a reconstruction. Expensive per-source work
(an inversion) may be cached with ctx.memo; the time column counts the calls that did that work, so
it is the cost of one edit from scratch.

Columns (stable; later techniques only add rows): edit success with its 95 % Wilson interval, the
near / far colour split and the shape swaps (by pair in a second table), the old position-free
reading, recon PSNR, preserve PSNR (outside the edited object), time vs plain txt2img.
"""
from __future__ import annotations

import math
import statistics
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from . import checker, evaluate, scoring, world

COLOUR_SPLITS = ("colour near", "colour far")


def shape_splits(vocab: world.Vocabulary = world.BASE) -> list[str]:
    names = vocab.shape_names
    return ["shape " + scoring.shape_pair(a, b, vocab) for i, a in enumerate(names) for b in names[i + 1:]]


class _SceneEdit:
    """What every edit case offers a runner: the source scene's caption, the target's, the source image."""

    @property
    def source_prompt(self) -> str:
        return self.source.caption

    @property
    def target_prompt(self) -> str:
        return self.target.caption

    def source_image(self) -> torch.Tensor:
        return torch.from_numpy(self.source.render())


@dataclass(frozen=True)
class EditCase(_SceneEdit):
    name: str
    source: world.Scene      # the image to edit (ground truth known)
    target: world.Scene      # the same scene with object `index` recoloured / reshaped
    kind: str                # "colour" or "shape"
    seed: int                # noise seed a technique should use (also the source scene's seed)
    index: int = 0           # the edited object

    @property
    def split(self) -> str:
        """"colour near" / "colour far" by RGB distance, "shape circle<->square" etc. by unordered pair."""
        a, b = self.source.objects[self.index], self.target.objects[self.index]
        if self.kind == "colour":
            return "colour " + scoring.color_split(a.color, b.color, self.source.vocab)
        return "shape " + scoring.shape_pair(a.shape, b.shape, self.source.vocab)

    def score(self, edited, source_image=None) -> scoring.EditScore:
        return scoring.score_edit(edited, self.source, self.target, self.index, source_image)


def edit_cases(per_split: int = 48, seed0: int = 50_000, n_objects: int = 1) -> list[EditCase]:
    """Fixed cases, grouped by source scene: at least `per_split` in each of "colour near", "colour far"
    and every shape pair. Each source (a trained caption, never a held-out triple) gives up to one near
    and one far colour swap and a swap to each other shape, while those splits still need cases; with
    n_objects=2 (local edits) the edited object is drawn per source and a new colour never repeats the
    other object's."""
    need = {s: per_split for s in COLOUR_SPLITS + tuple(shape_splits())}
    # A source of shape a feeds the pairs a<->b and a<->c: sources balanced over shapes (per_split / 2 each,
    # the seed's object reshaped when its shape has enough) fill every pair with the fewest sources (each
    # source is one inversion for the expensive methods).
    shape_quota = {s: -(-per_split // 2) for s in world.SHAPES}
    cases: list[EditCase] = []
    k = 0
    while any(v > 0 for v in need.values()):
        seed = seed0 + k
        k += 1
        src = world.sample_scene(seed, n_objects=n_objects, split="train")
        rng = np.random.default_rng([seed, 0xED17])
        i = int(rng.integers(len(src.objects)))
        o = src.objects[i]
        # Shape swaps only from a colour and background whose three shapes are all trained captions.
        reshapable = not any(world.is_held_out(o.color, t, src.background) for t in world.SHAPES)
        if not reshapable and any(v > 0 for split, v in need.items() if split.startswith("shape ")):
            continue     # while shape swaps are still needed, every source must give them
        best = max(world.SHAPES, key=lambda s: (shape_quota[s], s == o.shape))
        if reshapable and shape_quota[best] > 0 and best != o.shape:
            src = src.with_object(i, shape=best)    # balance the sources over shapes
            o = src.objects[i]
        taken = {src.background} | {p.color for p in src.objects}
        made = []
        for s in world.SHAPES if reshapable else ():
            pair = "shape " + scoring.shape_pair(o.shape, s)
            wanted = s != o.shape and need[pair] > 0 and (shape_quota[o.shape] > 0 or shape_quota[s] <= 0)
            if wanted and not world.is_held_out(o.color, s, src.background):
                made.append(EditCase("", src, src.with_object(i, shape=s), "shape", seed, i))
        for split in ("near", "far"):
            options = [c for c in world.COLOR_NAMES if c not in taken and scoring.color_split(o.color, c) == split
                       and not world.is_held_out(c, o.shape, src.background)]
            if options:
                made.append(EditCase("", src, src.with_object(i, color=options[int(rng.integers(len(options)))]),
                                     "colour", seed, i))
        if any(c.kind == "shape" and need[c.split] > 0 for c in made):
            shape_quota[o.shape] -= 1
        for c in made:
            if need[c.split] > 0:
                need[c.split] -= 1
                t = c.target.objects[i]
                others = "".join(f" (beside a {p.phrase})" for j, p in enumerate(src.objects) if j != i)
                name = f"#{seed} {o.phrase} -> {t.phrase} on {src.background}{others}"
                cases.append(EditCase(name, c.source, c.target, c.kind, c.seed, c.index))
    return cases


@dataclass(frozen=True)
class DoubleEditCase(_SceneEdit):
    """Two objects edited in one pass: object 0 recoloured and object 1 reshaped (LEDITS++'s several
    edits); scored by scoring.score_edits."""
    name: str
    source: world.Scene
    target: world.Scene
    seed: int
    indices: tuple = (0, 1)
    kind: str = "colour + shape"

    def score(self, edited, source_image=None) -> scoring.EditScore:
        return scoring.score_edits(edited, self.source, self.target, self.indices, source_image)


def double_edit_cases(n: int = 16, seed0: int = 70_000) -> list[DoubleEditCase]:
    """Fixed two-object cases (trained captions only): object 0 gets a new colour (never the background's
    or object 1's), object 1 a new shape; one case per source scene, consecutive seeds from seed0."""
    cases = []
    seed = seed0 - 1
    while len(cases) < n:
        seed += 1
        src = world.sample_scene(seed, n_objects=2, split="train")
        rng = np.random.default_rng([seed, 0xD0B1])
        a, b = src.objects
        colours = [c for c in world.COLOR_NAMES if c not in (src.background, a.color, b.color)
                   and not world.is_held_out(c, a.shape, src.background)]
        shapes = [s for s in world.SHAPES if s != b.shape and not world.is_held_out(b.color, s, src.background)]
        if not colours or not shapes:
            continue
        tgt = src.with_object(0, color=colours[int(rng.integers(len(colours)))])
        tgt = tgt.with_object(1, shape=shapes[int(rng.integers(len(shapes)))])
        name = f"#{seed} {a.phrase} -> {tgt.objects[0].phrase}, {b.phrase} -> {tgt.objects[1].phrase} on {src.background}"
        cases.append(DoubleEditCase(name, src, tgt, seed))
    return cases


DRAG_LONG = 22.0   # px: drags up to this are "drag short", longer ones "drag long"


@dataclass(frozen=True)
class DragCase:
    """A drag of object `index` from its place in `source` to its place in `target`; same runner contract
    as EditCase (run_row runs either), scored by scoring.score_drag."""
    name: str
    source: world.Scene
    target: world.Scene      # object `index` moved
    seed: int
    index: int = 0

    @property
    def split(self) -> str:
        """"drag short" up to DRAG_LONG px, "drag long" beyond."""
        (x0, y0), (x1, y1) = self.handle, self.goal
        return "drag long" if math.hypot(x1 - x0, y1 - y0) > DRAG_LONG else "drag short"

    @property
    def source_prompt(self) -> str:
        return self.source.caption

    @property
    def target_prompt(self) -> str:
        """The caption after the drag (objects are named left to right, so a drag past the other object
        swaps their order)."""
        return self.target.caption

    def source_image(self) -> torch.Tensor:
        return torch.from_numpy(self.source.render())

    @property
    def handle(self) -> tuple[float, float]:
        """(x, y) the drag starts at: the object's centroid in the source."""
        return scoring.centroid(self.source.masks()[self.index])

    @property
    def goal(self) -> tuple[float, float]:
        """(x, y) the drag ends at: the centroid of the moved object."""
        return scoring.centroid(self.target.masks()[self.index])

    def score(self, edited, tolerance: float | None = None, source_image=None) -> scoring.DragScore:
        return scoring.score_drag(edited, self.source, self.target, self.index, tolerance, source_image)


DRAG_DIRECTIONS = 8   # compass directions of the drags: right, down-right, down, ... (45 degrees apart)


def drag_direction(k: int) -> tuple[float, float]:
    """The unit vector of direction k (0 = right, then clockwise on screen: y grows downward)."""
    a = 2 * math.pi * (k % DRAG_DIRECTIONS) / DRAG_DIRECTIONS
    return math.cos(a), math.sin(a)


def drag_cases(n: int = 48, seed0: int = 60_000, min_shift: int = 16, max_shift: int = 40) -> list[DragCase]:
    """Fixed drag cases: case k moves one object in direction k % 8 (drag_direction: the eight compass
    directions in turn, so every direction has n/8 cases) by min_shift..max_shift px (diagonals move by
    the same whole number of pixels in x and y, so they are exactly 45 degrees); blocks of eight alternate
    two-object scenes (the other object must stay put; the moved one ends GAP px clear of its box) and
    one-object scenes. The object stays MARGIN px inside the frame. Scenes come from consecutive seeds
    from seed0; a scene where the drag does not fit is skipped."""
    cases = []
    seed = seed0 - 1
    while len(cases) < n:
        k = len(cases)
        ux, uy = drag_direction(k)
        n_objects = 2 if (k // DRAG_DIRECTIONS) % 2 == 0 else 1
        seed += 1
        src = world.sample_scene(seed, n_objects=n_objects, split="train")
        rng = np.random.default_rng([seed, 0xD4A6])
        i = int(rng.integers(n_objects))
        o = src.objects[i]
        other = src.objects[1 - i] if n_objects == 2 else None
        for shift in rng.permutation(np.arange(min_shift, max_shift + 1)):
            diag = ux != 0 and uy != 0 and abs(abs(ux) - abs(uy)) < 1e-9
            step = int(round(shift / math.sqrt(2))) if diag else int(shift)
            dx, dy = int(round(ux)) * step if abs(ux) > 1e-9 else 0, int(round(uy)) * step if abs(uy) > 1e-9 else 0
            if not min_shift <= math.hypot(dx, dy) <= max_shift:
                continue
            x, y = o.x + dx, o.y + dy
            if not (world.MARGIN <= x <= src.size - world.MARGIN - o.size and world.MARGIN <= y <= src.size - world.MARGIN - o.size):
                continue
            if other is not None:
                g = world.GAP
                if not (x + o.size + g <= other.x or other.x + other.size + g <= x
                        or y + o.size + g <= other.y or other.y + other.size + g <= y):
                    continue
            tgt = src.with_object(i, x=x, y=y)
            beside = f" beside a {other.phrase}" if other is not None else ""
            cases.append(DragCase(f"#{seed} {o.phrase} by ({dx:+d}, {dy:+d}){beside} on {src.background}",
                                  src, tgt, seed, i))
            break
    return cases


class EditContext:
    """What runners get: the model triple and the benchmark's reference settings. Helpers cache prompt
    encodings; memo() caches per-source work (cleared when the benchmark moves to the next source)."""

    def __init__(self, model, clip, vae, steps: int = 20, cfg: float = 5.0, sampler: str = "euler",
                 scheduler: str = "normal", memo_size: int = 16):
        self.model, self.clip, self.vae = model, clip, vae
        self.steps, self.cfg, self.sampler, self.scheduler = steps, cfg, sampler, scheduler
        self._cond: dict = {}
        self._memo: OrderedDict = OrderedDict()
        self._memo_size = memo_size
        self.misses = 0

    def encode(self, prompt: str):
        if prompt not in self._cond:
            self._cond[prompt] = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(prompt))
        return self._cond[prompt]

    def latent(self, image: torch.Tensor) -> torch.Tensor:
        """VAE-encode one (H, W, 3) image -> (1, 4, h, w) latent, as VAEEncode does."""
        return self.vae.encode(image[None, ..., :3])

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent)[0].float().cpu()

    def txt2img(self, prompt: str, seed: int) -> torch.Tensor:
        return evaluate.txt2img(self.model, self.clip, self.vae, [prompt], [seed], steps=self.steps, cfg=self.cfg,
                                sampler=self.sampler, scheduler=self.scheduler)[0]

    def memo(self, key, compute: Callable):
        """compute() once per key (e.g. the inversion of a source with given settings); counts misses."""
        if key in self._memo:
            self._memo.move_to_end(key)
            return self._memo[key]
        self.misses += 1
        value = self._memo[key] = compute()
        while len(self._memo) > self._memo_size:
            self._memo.popitem(last=False)
        return value

    def forget(self):
        self._memo.clear()


Runner = Callable[[EditContext, EditCase, str, dict], object]


def changed_words(source: str, target: str) -> list[str]:
    """Words that differ between two prompts (word swap: both sides; otherwise the symmetric difference),
    e.g. for Prompt-to-Prompt's local blend."""
    a, b = source.split(), target.split()
    if len(a) == len(b):
        pairs = [(x, y) for x, y in zip(a, b) if x != y]
        return [x for x, _ in pairs] + [y for _, y in pairs]
    return sorted(set(a) ^ set(b))


def call_node(node_id: str, **inputs):
    """Run one node (core or EditKit, V1 or V3) by its id as the executor would, with its widget defaults for
    the required inputs not given; returns its output tuple."""
    import nodes
    cls = nodes.NODE_CLASS_MAPPINGS[node_id]
    for name, value in (cls.INPUT_TYPES().get("required") or {}).items():
        opts = value[1] if len(value) > 1 and isinstance(value[1], dict) else {}
        if name not in inputs and "default" in opts:
            inputs[name] = opts["default"]
    if hasattr(cls, "GET_SCHEMA"):        # V3 node
        out = cls.execute(**inputs)
        return tuple(out.result if hasattr(out, "result") else out)
    return tuple(getattr(cls(), cls.FUNCTION)(**inputs))


@dataclass
class Technique:
    name: str
    run: Runner
    order: int = 100
    calibration: bool = False    # a calibration row (VAE round trip, ground truth through the VAE), not an editor
    reference: Callable[[EditContext], list[dict]] = lambda ctx: [{}]
    shipped: Callable[[], dict] | None = None   # reads the shipped workflow(s); raises ShippedSettingError
    shipped_from: tuple[str, ...] = ()          # the workflow files it reads (for the README)
    available: Callable[[], bool] = lambda: True


TECHNIQUES: dict[str, Technique] = {}


def register(name: str, order: int = 100, calibration: bool = False, reference=None, shipped=None,
             shipped_from=(), available: Callable[[], bool] | None = None):
    """Decorator: add a technique runner (rows of the table; see the module docstring)."""
    def deco(fn: Runner) -> Runner:
        TECHNIQUES[name] = Technique(name, fn, order, calibration, reference or (lambda ctx: [{}]), shipped,
                                     tuple(shipped_from), available or (lambda: True))
        return fn
    return deco


@dataclass
class Row:
    """One technique at one settings set."""
    technique: Technique
    settings: dict
    which: str                   # "reference", "shipped" or "reference = shipped"
    shown: tuple = ()            # the settings the table prints (those that differ between the rows, steps, CFG)

    @property
    def label(self) -> str:
        return settings_label({k: v for k, v in self.settings.items() if k in self.shown})

    @property
    def key(self) -> str:
        return f"{self.technique.name} | {self.which} | {self.label}"


ALWAYS_SHOWN = ("strength", "steps", "cfg")


def rows_for(ctx: EditContext, tech: Technique, which: str = "both") -> list[Row]:
    """The rows of a technique: its reference settings, and its shipped settings unless they equal one.
    Each row prints steps, CFG and the settings that differ between the technique's rows."""
    refs = [dict(r) for r in tech.reference(ctx)]
    ship = tech.shipped() if tech.shipped is not None and which in ("both", "shipped") else None
    sets = refs + ([ship] if ship is not None else [])
    keys = [k for k in sets[0] if k in ALWAYS_SHOWN or any(s.get(k) != sets[0].get(k) for s in sets)]
    rows = [Row(tech, r, "reference", tuple(keys)) for r in refs] if which in ("both", "reference") else []
    if ship is not None:
        same = next((r for r in rows if r.settings == ship), None)
        if same is not None:
            same.which = "reference = shipped"
        else:
            rows.append(Row(tech, ship, "reference = shipped" if ship in refs else "shipped", tuple(keys)))
    return rows


_SHORT = {"strength": "t0", "cfg": "CFG", "invert_cfg": "inversion CFG", "fixed_point_iterations": "fixed-point its",
          "inner_iterations": "inner its", "learning_rate": "lr"}


def settings_label(s: dict) -> str:
    def fmt(v):
        return f"{v:g}" if isinstance(v, float) else str(v)
    parts = []
    for k, v in s.items():
        if k == "steps":
            parts.append(f"{v} steps")
        else:
            parts.append(f"{_SHORT.get(k, k.replace('_', ' '))} {fmt(v)}")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# Running

def plain_time(ctx: EditContext, repeats: int = 3, warmup: bool = True) -> float:
    """Median wall time of one plain txt2img at the reference settings (the time column's unit)."""
    if warmup:
        ctx.txt2img("a red circle on a white background", 0)
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        ctx.txt2img("a red circle on a white background", i)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _split_result(out):
    if isinstance(out, tuple):
        return out[0], out[1]
    return out, None


def to_8bit(image) -> np.ndarray:
    """(H, W, 3) float32 on the 8-bit grid: what SaveImage writes, so a saved image rescores the same."""
    img = checker._to_numpy(image)
    return (np.round(img * 255.0) / 255.0).astype(np.float32)


def score_records(case, edited, recon_psnr: float = float("nan")) -> dict:
    """The per-case record of one result (edit or drag case)."""
    return {"case": case.name, "split": case.split, "seed": case.seed, **case.score(edited).record(),
            "recon_psnr": scoring.json_number(recon_psnr)}


def run_row(ctx: EditContext, row: Row, cases: list, n_recon: int = 24, progress=None, on_image=None) -> dict:
    """Run one row over the cases (EditCase or DragCase, grouped by source). Returns {"records": one
    flat dict per case (its score's record + case, split, seed, recon_psnr), "recon": PSNR per
    reconstructed source, "seconds": wall time of each call that did its source's work, "wall"}.
    Each result is scored on the 8-bit grid; on_image(i, image) can save it (to rescore later)."""
    tech, s = row.technique, row.settings
    records, recon, cold, warm = [], {}, [], []
    sources_seen: list[int] = []
    ctx.forget()
    t_row = time.perf_counter()
    for n, case in enumerate(cases):
        src_img = case.source.render()
        if case.seed not in sources_seen:
            sources_seen.append(case.seed)
            ctx.forget()
            want_recon = len(sources_seen) <= n_recon
        else:
            want_recon = False
        m0, t = ctx.misses, time.perf_counter()
        edited, rec = _split_result(tech.run(ctx, case, case.target_prompt, s))
        (cold if ctx.misses > m0 else warm).append(time.perf_counter() - t)
        edited = to_8bit(edited)
        if on_image:
            on_image(n, edited)
        if case.seed not in recon:   # a reconstruction the edit call returned is free: keep every one
            if rec is None and want_recon:
                rec, _ = _split_result(tech.run(ctx, case, case.source_prompt, s))
            if rec is not None:
                recon[case.seed] = scoring.psnr(rec, src_img)
        records.append(score_records(case, edited, recon.get(case.seed, float("nan"))))
        if progress:
            progress(n + 1, len(cases))
    # Runners that cache nothing do all their work in every call: all calls are "from scratch".
    seconds = cold if cold else warm
    return {"records": records, "recon": list(recon.values()), "seconds": seconds,
            "wall": time.perf_counter() - t_row}


def _mean(xs) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.mean(xs) if xs else float("nan")


def _fmt(x: float, digits: int = 2) -> str:
    if math.isnan(x):
        return "n/a"
    return "inf" if math.isinf(x) else f"{x:.{digits}f}"


MAIN_COLUMNS = ["technique", "settings", "edit success", "colour near", "colour far", "shape swaps",
                "position-free reading", "recon PSNR (dB)", "preserve PSNR (dB)", "time vs plain"]


EDIT_GROUPS = {"shape swaps": lambda split: split.startswith("shape ")}


def summarize(row: Row, result: dict, plain_seconds: float, success: str = "edit success",
              groups: dict | None = None) -> dict:
    """A row's cells (strings) and rates (records) from run_row's result, for any case type whose records
    carry "success" and "split": the overall rate (named `success`), one rate per split, one per group of
    splits (default: all shape swaps), the position-free reading where records have it, and the means of
    recon PSNR, preserve PSNR and centroid error. A table picks its columns from the cells."""
    recs = result["records"]
    groups = EDIT_GROUPS if groups is None else groups
    by_split = scoring.tally(recs, key=lambda r: r["split"])
    rates = {success: scoring.rate(r["success"] for r in recs)}
    rates.update({k: by_split.get(k, scoring.Rate(0, 0)) for k in COLOUR_SPLITS if success == "edit success"})
    rates.update({k: scoring.rate(r["success"] for r in recs if pick(r["split"])) for k, pick in groups.items()})
    rates.update({k: v for k, v in sorted(by_split.items()) if k not in rates})
    if recs and "position_free" in recs[0]:
        rates["position-free reading"] = scoring.rate(r["position_free"] for r in recs)

    def mean_of(field):
        return _mean([r[field] if r.get(field) is not None else float("nan") for r in recs])
    secs = result["seconds"]
    cells = {"technique": row.technique.name, "settings": f"{row.which}: {row.label}".rstrip(": "),
             **{k: str(v) for k, v in rates.items()},
             "recon PSNR (dB)": _fmt(_mean(result["recon"])),
             "preserve PSNR (dB)": _fmt(mean_of("preserve_psnr")),
             "centroid error (px)": _fmt(mean_of("centroid_error"), 1),
             "time vs plain": _fmt(statistics.median(secs) / plain_seconds) if secs else "n/a"}
    return {"key": row.key, "technique": row.technique.name, "which": row.which, "settings": row.settings,
            "label": row.label,
            "calibration": row.technique.calibration, "order": row.technique.order,
            "cells": cells, "rates": {k: v.record() for k, v in rates.items()},
            "plain_seconds": plain_seconds, "wall_seconds": result["wall"], "n_cases": len(recs)}


def format_table(summaries: list[dict], columns: list[str]) -> str:
    rows = [[str(s["cells"].get(c, "n/a")) for c in columns] for s in summaries]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def measure_edit(source, edited, target_caption: str, dilate: int = scoring.PRESERVE_DILATE) -> dict:
    """Edit metrics without ground truth (e.g. a demo edit of a generated image): the checker reads the
    edited image against the target caption (position-free: nothing says where the object should be);
    preservation is the PSNR outside the objects the checker finds in either image (dilated)."""
    v = checker.check(edited, target_caption)
    src_reading = checker.read(source)
    masks = [o.mask for o in src_reading.objects + v.reading.objects]
    keep = scoring.preserve_region(*masks, dilate_px=dilate) if masks else None
    return {"success": bool(v.ok), "colour_ok": v.colors_ok, "shape_ok": v.shapes_ok, "background_ok": v.background_ok,
            "source_objects": src_reading.names(), "edited_objects": v.reading.names(),
            "preserve_psnr": scoring.psnr(edited, source, keep)}

