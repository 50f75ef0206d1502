"""Drag-editing table on the toy world (DragBench-style): `bench/quality.py --only drag`, or

    .venv/bin/python bench/quality_drag.py [--n 32] [--which reference|shipped|both] [--method NAME] [--write-readme]

Rows are saved one by one into drag.json (under a lock), so rows may run as separate processes, e.g. the
reference rows and `--which shipped --method DragDiffusion` side by side; `--readme` rewrites the table.

Cases: toyworld.editbench.drag_cases (eight directions in turn, blocks of eight alternating two-object and
one-object scenes, one object moved 16-40 px; handle = its centroid, goal = where the centroid should go). The editable region given to every method is the union of
the object's old and new footprints, dilated 4 px (the user paints over the object and where it goes).
Scoring: toyworld.scoring.score_drag (centroid error, look kept, other object put, no copy left behind,
PSNR outside old and new footprints). Time per drag is a ratio to a plain 20-step txt2img in the same
run; peak memory is the row's own peak RSS above its start (common.PeakRSS: sampled, so a row measured
after a heavier one still reports its own peak).

Results: bench/results/quality/drag.json and cases/drag-*.csv; --write-readme rewrites the README between
<!-- bench-quality-drag:begin --> and <!-- bench-quality-drag:end -->.
"""
import argparse
import contextlib
import json
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from common import PeakRSS, boot, replace_block, write_cases  # noqa: E402

boot()

from editkit.builtin_models import toy  # noqa: E402
from editkit.drag.points import DragPoints  # noqa: E402
from editkit.toyworld import editbench, scoring, shipped  # noqa: E402
from editkit.toyworld.shipped import Setting  # noqa: E402

RESULTS = os.path.join(HERE, "results", "quality")
README = os.path.join(ROOT, "README.md")
MARK_BEGIN, MARK_END = "<!-- bench-quality-drag:begin -->", "<!-- bench-quality-drag:end -->"
REGION_DILATE = 4

SDE_DRAG_SHIPPED = {k: Setting("sde_drag.json", "EditKitSDEDrag", k) for k in ("t0", "steps", "cfg", "sub_moves", "radius")}
DRAGON_KEYS = ("steps", "inversion_steps", "cfg", "energy_scale", "w_edit", "w_content", "w_inpaint", "guide_until")
DRAGON_SHIPPED = {k: Setting("dragon_diffusion.json", "EditKitDragonDiffusion", k) for k in DRAGON_KEYS}
DIFFEDITOR_SHIPPED = {k: Setting("diffeditor.json", "EditKitDiffEditor", k) for k in DRAGON_KEYS + ("sde_strength", "time_travel")}
DRAG_DIFFUSION_SHIPPED = {k: Setting("drag_diffusion.json", "EditKitDragDiffusion", k)
                          for k in ("steps", "inversion_steps", "iterations", "lr", "mask_weight", "cfg")}
SHIPPED_RESOLUTION = 512     # the shipped workflow's radius is in px of the SD1.5 photo


def region(case) -> torch.Tensor:
    from scipy.ndimage import binary_dilation
    m = case.source.masks()[case.index] | case.target.masks()[case.index]
    return torch.from_numpy(binary_dilation(m, iterations=REGION_DILATE)).float()


def _drag_of(case) -> DragPoints:
    return DragPoints(case.source.size, case.source.size, ((case.handle, case.goal),)).with_mask(region(case))


def sde_drag_runner(ctx, case, s):
    from editkit.nodes.drag import SDEDrag
    d = _drag_of(case)
    lat = ctx.latent(case.source_image())
    out = SDEDrag.execute(ctx.model, ctx.encode(case.source_prompt), {"samples": lat}, d, s["t0"], s["steps"], s["cfg"],
                          s["sub_moves"], s["radius"](case), "normal", case.seed, negative=ctx.encode(""))
    return ctx.decode(out.args[0]["samples"]).numpy()


def drag_diffusion_runner(ctx, case, s):
    from editkit.nodes.drag import DragDiffusion
    out = DragDiffusion.execute(ctx.model, ctx.encode(case.source_prompt), {"samples": ctx.latent(case.source_image())},
                                _drag_of(case), s["steps"], s["inversion_steps"], s["iterations"], s["lr"], s["mask_weight"],
                                s["cfg"], True, case.seed, negative=ctx.encode(""))
    return ctx.decode(out.args[0]["samples"]).numpy()


def dragon_runner(node_id):
    def run(ctx, case, s):
        from editkit.nodes.drag import DiffEditor, DragonDiffusion
        node = DiffEditor if node_id == "EditKitDiffEditor" else DragonDiffusion
        kw = {k: v for k, v in s.items()}
        out = node.execute(ctx.model, ctx.encode(case.source_prompt), {"samples": ctx.latent(case.source_image())},
                           _drag_of(case), negative=ctx.encode(""), visual_cross_attention=True, seed=case.seed, **kw)
        return ctx.decode(out.args[0]["samples"]).numpy()
    return run


# Reference settings of the gradient methods on the toy model (n cases each: a few minutes of CPU per row).
# The toy model's full DDIM inversion does not reconstruct the scene (the objects come back elsewhere), so the
# energy-guided methods start from 14 of 20 steps, at CFG 1 and energy scale 1 (2 pushes the background off).
DRAGON_REF = {"steps": 20, "inversion_steps": 14, "cfg": 1.0, "energy_scale": 1.0, "w_edit": 4.0, "w_content": 6.0,
              "w_inpaint": 0.2, "guide_until": 0.6}
DRAG_DIFFUSION_REF = {"steps": 20, "inversion_steps": 14, "iterations": 40, "lr": 0.05, "mask_weight": 0.1, "cfg": 1.0}


def rows(ctx, which: str):
    """(name, kind, settings, runner, n or None = all cases)."""
    ref = {"t0": 0.6, "steps": ctx.steps, "cfg": ctx.cfg, "sub_moves": 1,
           "radius": lambda c: 0.75 * c.source.objects[c.index].size}
    out = []
    if which in ("reference", "both"):
        out.append(("SDE-Drag", "reference", ref, sde_drag_runner, None))
    if which in ("shipped", "both"):
        s = shipped.read_settings(SDE_DRAG_SHIPPED)
        r = float(s["radius"])
        s["radius"] = lambda c, r=r: r * c.source.size / SHIPPED_RESOLUTION
        out.append(("SDE-Drag", "shipped", s, sde_drag_runner, None))
    gradient = [("DragonDiffusion", dict(DRAGON_REF), DRAGON_SHIPPED, dragon_runner("EditKitDragonDiffusion")),
                ("DiffEditor", {**DRAGON_REF, "sde_strength": 0.4, "time_travel": 2}, DIFFEDITOR_SHIPPED,
                 dragon_runner("EditKitDiffEditor")),
                ("DragDiffusion", dict(DRAG_DIFFUSION_REF), DRAG_DIFFUSION_SHIPPED, drag_diffusion_runner)]
    if which in ("reference", "both", "gradient"):
        out += [(name, "reference", ref_s, runner, None) for name, ref_s, _, runner in gradient]
    if which in ("shipped", "both"):
        out += [(name, "shipped", shipped.read_settings(spec), runner, None) for name, _, spec, runner in gradient]
    return out


def _label(s: dict) -> str:
    return ", ".join(f"{k} {v:g}" if isinstance(v, (int, float)) else f"{k} scaled" for k, v in s.items())


def _flag(v) -> bool:
    return v if isinstance(v, bool) else str(v) == "True"


def _num(v):
    return None if v is None or v == "" else float(v)


def _objects(r) -> int:
    """Objects in the case's scene (records written before the column existed: from the case name)."""
    return int(r["objects"]) if r.get("objects") not in (None, "") else (2 if " beside " in r["case"] else 1)


def summarize(records: list) -> dict:
    """A row's cells that come from its per-case records (dicts as run() makes them or as the per-case CSV
    reads back). "other object put" counts the two-object scenes only (a one-object scene has none)."""
    errs = [_num(r["centroid_error"]) for r in records]
    finite = [e for e in errs if e is not None and np.isfinite(e)]

    def scene(r):
        return "two objects" if _objects(r) > 1 else "one object"
    ok = [dict(r, success=_flag(r["success"])) for r in records]
    return {"n": len(records), "success": str(scoring.rate(r["success"] for r in ok)),
            "per_split": {k: str(v) for k, v in scoring.tally(ok, key=lambda r: r["split"]).items()},
            "per_scene": {k: str(v) for k, v in scoring.tally(ok, key=scene).items()},
            "centroid_error_mean": round(float(np.mean(finite)), 2) if finite else None,
            "centroid_error_median": round(float(np.median(finite)), 2) if finite else None,
            "vanished": len(errs) - len(finite),
            "kept_look": str(scoring.rate(_flag(r["kept_look"]) for r in records)),
            "others_ok": str(scoring.rate(_flag(r["others_ok"]) for r in records if _objects(r) > 1)),
            "preserve_psnr_mean": round(float(np.mean([_num(r["preserve_psnr"]) for r in records])), 2)}


def resummarize(results: str) -> dict:
    """Rebuild every saved row's case-derived cells from its per-case CSV (times and memory kept)."""
    import csv
    with _lock(results):
        path = os.path.join(results, "drag.json")
        with open(path) as f:
            data = json.load(f)
        for row in data["rows"]:
            with open(os.path.join(results, "cases", f"drag-{row['technique'].lower()}-{row['which']}.csv")) as f:
                row.update(summarize(list(csv.DictReader(f))))
        with open(path, "w") as f:
            json.dump(data, f, indent=1)
    return data


def run(n: int, which: str, results: str | None, write: bool, only=()) -> list:
    import comfy.utils
    comfy.utils.set_progress_bar_enabled(False)
    cases = editbench.drag_cases(n, min_shift=16, max_shift=40)
    model, clip, vae = toy.load_toy()
    ctx = editbench.EditContext(model, clip, vae)
    out = []
    with torch.inference_mode():
        ctx.txt2img("a red circle on a white background", 0)          # warm-up, outside the memory reading
        with PeakRSS() as plain_mem:
            plain = editbench.plain_time(ctx, warmup=False)
        for name, kind, s, runner, n_row in rows(ctx, which):
            if only and name.lower() not in only:
                continue
            records, times = [], []
            with PeakRSS() as mem:
                for c in cases[:n_row]:
                    t = time.perf_counter()
                    img = runner(ctx, c, s)
                    times.append(time.perf_counter() - t)
                    sc = c.score(img)
                    records.append({"case": c.name, "split": c.split, "objects": len(c.source.objects), **sc.record(),
                                    "kept_look": sc.kept_look, "seconds": round(times[-1], 2)})
                    print(f"  {name} ({kind}) {len(records)}/{len(cases[:n_row])}: {times[-1]:.2f} s, "
                          f"error {sc.record().get('centroid_error')}", file=sys.stderr, flush=True)
            row = {"technique": name, "which": kind, "settings": _label(s), **summarize(records),
                   "seconds_per_drag": round(float(np.median(times)), 2), "time_vs_plain": round(float(np.median(times)) / plain, 2),
                   "peak_rss_increase_mb": round(mem.peak_mb, 1)}
            out.append(row)
            print(json.dumps(row), flush=True)
            if results:   # saved row by row: an interrupted run keeps the rows it finished
                write_cases(os.path.join(results, "cases", f"drag-{name.lower()}-{kind}.csv"), records, list(records[0]))
                data = save(results, [row], plain, round(plain_mem.peak_mb, 1))
    if results and out and write:
        write_readme(data)
    return out


def save(results: str, new_rows: list, plain: float, plain_mb: float | None = None) -> dict:
    """Merge rows into drag.json (a row replaces the saved row of the same method and kind; rows keep the order
    SDE-Drag, DragonDiffusion, DiffEditor, DragDiffusion, reference before shipped)."""
    with _lock(results):
        return _merge(os.path.join(results, "drag.json"), new_rows, plain, plain_mb)


@contextlib.contextmanager
def _lock(results: str):
    """Two runs (e.g. reference and shipped rows) may save at once: drag.json is rewritten under a lock."""
    import fcntl
    os.makedirs(results, exist_ok=True)
    fd = os.open(results, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _merge(path: str, new_rows: list, plain: float, plain_mb: float | None = None) -> dict:
    old = json.load(open(path)) if os.path.exists(path) else {"rows": []}
    keep = [r for r in old["rows"] if (r["technique"], r["which"]) not in {(x["technique"], x["which"]) for x in new_rows}]
    order = ("SDE-Drag", "DragonDiffusion", "DiffEditor", "DragDiffusion")
    merged = sorted(keep + new_rows, key=lambda r: (order.index(r["technique"]) if r["technique"] in order else 9,
                                                    r["which"] != "reference"))
    data = {"rows": merged, "plain_seconds": round(plain, 3), "cases": max(r["n"] for r in merged), "host": _host(),
            "plain_peak_rss_increase_mb": plain_mb if plain_mb is not None else old.get("plain_peak_rss_increase_mb")}
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    return data


def _host() -> str:
    from common import host_line
    return host_line()


def table(data: dict) -> str:
    plain_mb = data.get("plain_peak_rss_increase_mb")
    lines = [(f"Drag on the toy world ({data['cases']} cases: eight directions, 16-40 px, one- and two-object scenes "
              f"alternating; 128 px; each row's n in its success cell; peak RSS + = the row's own peak above its start"
              + (f" (plain 20-step txt2img: {plain_mb} MB)" if plain_mb is not None else "") + f"; {data.get('host', '')})"),
             "",
             "| method | settings | success | mean / median centroid error (px) | look kept | other object put (two-object scenes) "
             "| PSNR outside (dB) | time / drag (x plain) | peak RSS + (MB) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['technique']} ({r['which']}) | {r['settings']} | {r['success']} | {r['centroid_error_mean']} / "
                     f"{r['centroid_error_median']}" + (f" ({r['vanished']} vanished)" if r["vanished"] else "") +
                     f" | {r['kept_look']} | {r['others_ok']} | {r['preserve_psnr_mean']} | {r['seconds_per_drag']} s "
                     f"({r['time_vs_plain']}x) | {r['peak_rss_increase_mb']} |")
    return "\n".join(lines)


def write_readme(data: dict, path: str = README) -> None:
    replace_block(path, MARK_BEGIN, MARK_END, table(data))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--which", choices=("reference", "shipped", "both", "gradient"), default="both",
                   help="gradient: only the rows of the gradient methods (DragonDiffusion, DiffEditor, DragDiffusion)")
    p.add_argument("--method", action="append", default=[], help="only this row's method (repeatable), e.g. DiffEditor")
    p.add_argument("--results", default=RESULTS)
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--write-readme", action="store_true")
    p.add_argument("--readme", action="store_true", help="only rewrite the README table from the saved drag.json")
    p.add_argument("--resummarize", action="store_true",
                   help="rebuild the saved rows' case cells from their per-case CSVs, then rewrite the README table")
    a = p.parse_args(argv)
    if a.readme or a.resummarize:
        data = resummarize(a.results) if a.resummarize else json.load(open(os.path.join(a.results, "drag.json")))
        data["host"] = data.get("host") or _host()
        write_readme(data)
        return 0
    rows_ = run(a.n, a.which, None if a.no_save else a.results, a.write_readme and not a.no_save,
                tuple(m.lower() for m in a.method))
    print(table({"rows": rows_, "cases": a.n}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
