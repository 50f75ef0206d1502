"""The edit-quality benchmark on the toy world: fixed edit cases with exact ground truth, a registry of
technique runners, and one table row per technique.

A technique runner edits a real image (a clean render of a toy scene) from its caption to a target
caption:

    @register("SDEdit (t0=0.6)", order=10)
    def run(ctx: EditContext, case: EditCase, target_prompt: str) -> torch.Tensor:   # (H, W, 3) in [0, 1]
        ...

It is called twice per case: with the edit caption (scored for edit success and preservation) and
with the source caption itself (scored for reconstruction). Columns (stable; later techniques only
add rows):
  * recon PSNR     PSNR of the "edit" to the source caption against the source image (dB);
  * edit success   the checker reads the edited object with the target colour and shape (and the
                   background unchanged); split into colour and shape edits;
  * preserve PSNR  PSNR against the source outside the edited object (union of the source and target
                   object masks, dilated by 3 px), dB;
  * time vs plain  median wall time of one edit / median time of plain txt2img with ctx.steps steps.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from . import checker, evaluate, world

COLUMNS = ["technique", "recon PSNR (dB)", "edit success", "colour edits", "shape edits", "preserve PSNR (dB)",
           "time vs plain"]


@dataclass(frozen=True)
class EditCase:
    name: str
    source: world.Scene      # the image to edit (ground truth known)
    target: world.Scene      # the same scene with the object recoloured / reshaped
    kind: str                # "colour" or "shape"
    seed: int                # noise seed a technique should use

    @property
    def source_prompt(self) -> str:
        return self.source.caption

    @property
    def target_prompt(self) -> str:
        return self.target.caption

    def source_image(self) -> torch.Tensor:
        return torch.from_numpy(self.source.render())

    def edit_region(self, dilate: int = 3) -> np.ndarray:
        m = self.source.masks()[0] | self.target.masks()[0]
        return evaluate.dilate(m, dilate)


def edit_cases(n_colour: int = 16, n_shape: int = 8, seed0: int = 50_000) -> list[EditCase]:
    """Fixed cases: single-object scenes (trained caption triples), one colour or shape change each."""
    cases = []
    k = 0
    while len([c for c in cases if c.kind == "colour"]) < n_colour or len([c for c in cases if c.kind == "shape"]) < n_shape:
        seed = seed0 + k
        k += 1
        src = world.sample_scene(seed, n_objects=1, split="train")
        o = src.objects[0]
        rng = np.random.default_rng([seed, 0xED17])
        want_colour = len([c for c in cases if c.kind == "colour"]) < n_colour and (
            len([c for c in cases if c.kind == "shape"]) >= n_shape or k % 3 != 0)
        if want_colour:
            options = [c for c in world.COLOR_NAMES if c not in (o.color, src.background)]
            tgt = src.with_object(0, color=options[rng.integers(len(options))])
            kind = "colour"
        else:
            options = [s for s in world.SHAPES if s != o.shape]
            tgt = src.with_object(0, shape=options[rng.integers(len(options))])
            kind = "shape"
        if world.is_held_out(tgt.objects[0].color, tgt.objects[0].shape, tgt.background):
            continue
        cases.append(EditCase(f"{o.color} {o.shape} -> {tgt.objects[0].color} {tgt.objects[0].shape} on {src.background}",
                              src, tgt, kind, seed))
    return cases


@dataclass
class EditContext:
    """What runners get: the model triple and the shared settings. Helpers cache encodings."""
    model: object
    clip: object
    vae: object
    steps: int = 20
    cfg: float = 5.0
    sampler: str = "euler"
    scheduler: str = "normal"
    _cond: dict = field(default_factory=dict)

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


Runner = Callable[[EditContext, EditCase, str], torch.Tensor]


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
    reference: bool = False      # a calibration row (e.g. the VAE round trip), not an editing method
    available: Callable[[], bool] = lambda: True


TECHNIQUES: dict[str, Technique] = {}


def register(name: str, order: int = 100, reference: bool = False, available: Callable[[], bool] | None = None):
    """Decorator: add a technique runner (a row of the table)."""
    def deco(fn: Runner) -> Runner:
        TECHNIQUES[name] = Technique(name, fn, order, reference, available or (lambda: True))
        return fn
    return deco


@dataclass
class CaseScore:
    recon_psnr: float
    success: bool
    preserve_psnr: float
    seconds: float
    kind: str


def score_case(case: EditCase, recon: torch.Tensor | None, edited: torch.Tensor, seconds: float) -> CaseScore:
    src = case.source.render()
    v = checker.check(edited, case.target)
    success = v.background_ok and v.colors_ok and v.shapes_ok
    keep = ~case.edit_region()
    return CaseScore(evaluate.psnr(recon, src) if recon is not None else float("nan"), bool(success),
                     evaluate.psnr(edited, src, keep), seconds, case.kind)


def plain_time(ctx: EditContext, repeats: int = 3) -> float:
    ctx.txt2img("a red circle on a white background", 0)   # warm-up
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        ctx.txt2img("a red circle on a white background", i)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _fmt(x: float, digits: int = 2) -> str:
    return "n/a" if x != x else f"{x:.{digits}f}"


def run_technique(ctx: EditContext, tech: Technique, cases: list[EditCase], plain_seconds: float) -> tuple[dict, list]:
    scores = []
    for case in cases:
        recon = tech.run(ctx, case, case.source_prompt)
        t = time.perf_counter()
        edited = tech.run(ctx, case, case.target_prompt)
        dt = time.perf_counter() - t
        scores.append(score_case(case, recon, edited, dt))
    return summarize(tech.name, scores, plain_seconds), scores


def summarize(name: str, scores: list[CaseScore], plain_seconds: float) -> dict:
    def rate(kind=None):
        s = [c.success for c in scores if kind is None or c.kind == kind]
        return f"{100 * sum(s) / len(s):.0f} % ({sum(s)}/{len(s)})" if s else "n/a"
    recon = [c.recon_psnr for c in scores if c.recon_psnr == c.recon_psnr]
    return {
        "technique": name,
        "recon PSNR (dB)": _fmt(statistics.mean(recon)) if recon else "n/a",
        "edit success": rate(),
        "colour edits": rate("colour"),
        "shape edits": rate("shape"),
        "preserve PSNR (dB)": _fmt(statistics.mean(c.preserve_psnr for c in scores)),
        "time vs plain": _fmt(statistics.median(c.seconds for c in scores) / plain_seconds),
    }


def run_benchmark(ctx: EditContext, cases: list[EditCase], names: list[str] | None = None) -> list[dict]:
    plain = plain_time(ctx)
    rows = []
    for tech in sorted(TECHNIQUES.values(), key=lambda t: (t.order, t.name)):
        if names and tech.name not in names:
            continue
        if not tech.available():
            continue
        row, _ = run_technique(ctx, tech, cases, plain)
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in COLUMNS} if rows else {c: len(c) for c in COLUMNS}
    lines = ["| " + " | ".join(c.ljust(widths[c]) for c in COLUMNS) + " |",
             "|" + "|".join("-" * (widths[c] + 2) for c in COLUMNS) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")).ljust(widths[c]) for c in COLUMNS) + " |")
    return "\n".join(lines)


def measure_edit(source, edited, target_caption: str, dilate: int = 3) -> dict:
    """Edit metrics without ground truth (e.g. a demo edit of a generated image): the checker reads the
    edited image against the target caption; preservation is the PSNR outside the objects the checker
    finds in either image (dilated)."""
    v = checker.check(edited, target_caption)
    src_reading = checker.read(source)
    region = np.zeros(checker._to_numpy(source).shape[:2], bool)
    for o in src_reading.objects + v.reading.objects:
        region |= o.mask
    keep = ~evaluate.dilate(region, dilate)
    return {"success": bool(v.ok), "colour_ok": v.colors_ok, "shape_ok": v.shapes_ok, "background_ok": v.background_ok,
            "source_objects": src_reading.names(), "edited_objects": v.reading.names(),
            "preserve_psnr": evaluate.psnr(edited, source, keep)}
