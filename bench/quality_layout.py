"""Layout table on the toy world: `bench/quality.py --only layout`, or

    .venv/bin/python bench/quality_layout.py [--n 10] [--write-readme]

Cases: toyworld.world.sample_scene(seed, n_objects=2) for seeds 5000.. (two objects, random places);
the prompt is the scene's caption, the boxes are the objects' ground-truth boxes. Scoring:
toyworld.scoring.score_prompt (objects, colours, shapes, count, background; with `regions` each
object's centroid inside its box).
  * binding: two-object prompts fully correct, plain vs Attend-and-Excite (the shipped workflow's settings;
    subjects = the two nouns, or the two phrases when the nouns are equal);
  * layout: every centroid inside its box (score_prompt with regions), plain (no layout input: the chance
    level) vs regional attention (masked; region prompt "a <colour> <shape> on a <bg> background"),
    MultiDiffusion region prompts (one 128 px window, the same regions) and box guidance (shipped settings).
Time per image is a ratio to plain 20-step txt2img in the same run (Euler, CFG 5, 128 px).

Results: bench/results/quality/layout.json and cases/layout-*.csv; --write-readme rewrites the README between
<!-- bench-quality-layout:begin --> and <!-- bench-quality-layout:end -->.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from common import boot, replace_block, write_cases  # noqa: E402

boot()

from editkit.builtin_models import toy  # noqa: E402
from editkit.toyworld import evaluate, scoring, shipped, world  # noqa: E402
from editkit.toyworld.shipped import Setting  # noqa: E402

RESULTS = os.path.join(HERE, "results", "quality")
README = os.path.join(ROOT, "README.md")
MARK_BEGIN, MARK_END = "<!-- bench-quality-layout:begin -->", "<!-- bench-quality-layout:end -->"
STEPS, CFG = 20, 5.0

AE_SHIPPED = {k: Setting("attend_and_excite.json", "EditKitAttendAndExcite", k)
              for k in ("scale", "end_percent", "iterative_refinement", "max_refine")}
BOX_SHIPPED = {k: Setting("box_guidance.json", "EditKitBoxGuidance", k)
               for k in ("scale", "end_percent", "iterative_refinement", "max_refine", "top_fraction", "corner_weight")}


def cases(n: int) -> list:
    return [world.sample_scene(5000 + i, n_objects=2, split="any") for i in range(n)]


def boxes(scene) -> list:
    return [(o.x, o.y, o.x + o.size, o.y + o.size) for o in scene.objects]


def subjects(scene) -> str:
    nouns = [o.shape for o in scene.objects]
    return ", ".join(nouns) if len(set(nouns)) == len(nouns) else ", ".join(o.phrase for o in scene.objects)


def _img(model, clip, vae, scene):
    return evaluate.txt2img(model, clip, vae, [scene.caption], [scene.seed], steps=STEPS, cfg=CFG)[0].detach().numpy()


def _regions(clip, scene, with_prompt=True, labels=None):
    from editkit.layout.regions import make_region
    out = []
    for k, o in enumerate(scene.objects):
        cond = toy.encode(clip, f"{world.article(o.color)} {o.color} {o.shape} on {world.article(scene.background)} "
                                f"{scene.background} background") if with_prompt else None
        out.append(make_region("bench", cond, box=(o.x, o.y, o.size, o.size), label=labels[k] if labels else o.phrase))
    return tuple(out)


def run_plain(m, clip, vae, scene, s):
    return _img(m, clip, vae, scene)


def run_ae(m, clip, vae, scene, s):
    from editkit.nodes.layout import AttendAndExcite
    am = AttendAndExcite.execute(m, clip, scene.caption, subjects(scene), s["scale"], s["end_percent"],
                                 s["iterative_refinement"], s["max_refine"], "", 1.0).args[0]
    return _img(am, clip, vae, scene)


def run_regional(m, clip, vae, scene, s):
    from editkit.nodes.layout import RegionalAttention
    rm = RegionalAttention.execute(m, _regions(clip, scene), "masked", 1.0, s.get("global_prompt_in_regions", True),
                                   0.0, 1.0).args[0]
    return _img(rm, clip, vae, scene)


def run_multidiffusion(m, clip, vae, scene, s):
    from editkit.nodes.layout import MultiDiffusion
    mm = MultiDiffusion.execute(m, scene.size, scene.size, 64, "uniform", _regions(clip, scene)).args[0]
    return _img(mm, clip, vae, scene)


def run_box(m, clip, vae, scene, s):
    from editkit.nodes.layout import BoxGuidance
    words = [w.strip() for w in subjects(scene).split(",")]
    bm = BoxGuidance.execute(m, clip, scene.caption, _regions(clip, scene, False, words), s["scale"], s["end_percent"],
                             s["iterative_refinement"], s["max_refine"], s["top_fraction"], s["corner_weight"]).args[0]
    return _img(bm, clip, vae, scene)


def rows() -> list:
    """(table, technique, settings, runner, score with regions)"""
    ae = shipped.read_settings(AE_SHIPPED)
    box = shipped.read_settings(BOX_SHIPPED)
    return [("binding", "plain", {}, run_plain, False),
            ("binding", "Attend-and-Excite (shipped)", ae, run_ae, False),
            ("binding", "Attend-and-Excite (reference: scale 200)", {**ae, "scale": 200.0}, run_ae, False),
            ("layout", "plain (no layout input)", {}, run_plain, True),
            ("layout", "regional attention (masked)", {}, run_regional, True),
            ("layout", "regional attention (masked, global prompt only outside the boxes)",
             {"global_prompt_in_regions": False}, run_regional, True),
            ("layout", "MultiDiffusion region prompts", {}, run_multidiffusion, True),
            ("layout", "box guidance (shipped)", box, run_box, True)]


PANO_W = 384


def _panorama_image(model, clip, vae, scene):
    import comfy.sample
    noise = evaluate.seed_noise((4, 16, PANO_W // 8), [scene.seed])
    pos, neg = toy.encode(clip, scene.caption), toy.encode(clip, "")
    lat = comfy.sample.sample(model, noise, STEPS, CFG, "euler", "normal", pos, neg, torch.zeros_like(noise),
                              disable_pbar=True, seed=scene.seed)
    return vae.decode(lat)[0].float().cpu().detach().numpy()


def panorama(n: int, clip, vae, m) -> list:
    """MultiDiffusion panoramas 384x128 of single-object captions: each 128 px window scored by score_prompt
    (fully right; background right), and the seam difference at the window borders x = 128, 256 vs inside;
    against tiles (stride = window: no overlap) in the same run."""
    from editkit.nodes.layout import MultiDiffusion
    scenes = [world.sample_scene(7000 + i, n_objects=1, split="any") for i in range(n)]
    out = []
    for name, stride in (("MultiDiffusion, stride 64 px", 64), ("tiles, stride 128 px (no overlap)", 128)):
        mm = MultiDiffusion.execute(m, 128, 128, stride, "uniform", None).args[0]
        ok, bg, at, inside, times, records = [], [], [], [], [], []
        for sc in scenes:
            t = time.perf_counter()
            img = _panorama_image(mm, clip, vae, sc)
            times.append(time.perf_counter() - t)
            for k in range(PANO_W // 128):
                sco = scoring.score_prompt(img[:, 128 * k:128 * (k + 1)], sc.caption)
                ok.append(sco.ok)
                bg.append(sco.background_ok)
                records.append({"case": sc.caption, "seed": sc.seed, "window": k, "ok": sco.ok, "why": sco.why})
            a, i = scoring.seam_difference(img, [128, 256])
            at.append(a)
            inside.append(i)
        out.append({"table": "panorama", "technique": name, "n": n, "windows": len(ok),
                    "success": str(scoring.rate(ok)), "background": str(scoring.rate(bg)),
                    "seam_border": round(statistics.mean(at), 4), "seam_inside": round(statistics.mean(inside), 4),
                    "seconds_per_image": round(statistics.median(times), 2), "records": records})
        print(json.dumps({k: v for k, v in out[-1].items() if k != "records"}), flush=True)
    return out


def _label(s: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in s.items()) or "-"


def run(n: int, results, write: bool, only=None) -> list:
    import comfy.utils
    comfy.utils.set_progress_bar_enabled(False)
    scenes = cases(n)
    m, clip, vae = toy.load_toy()[:3]
    out, plain_times = [], []
    with torch.inference_mode():
        for table_, name, s, fn, with_regions in rows():
            if only and not any(o.lower() in name.lower() for o in only):
                continue
            records, times = [], []
            for sc in scenes:
                t = time.perf_counter()
                img = fn(m, clip, vae, sc, s)
                times.append(time.perf_counter() - t)
                score = scoring.score_prompt(img, sc, regions=boxes(sc) if with_regions else None)
                records.append({"case": sc.caption, "seed": sc.seed, "ok": score.ok, "why": score.why,
                                "in_boxes": all(r is True for r in score.in_region) if with_regions else None,
                                "seconds": round(times[-1], 2)})
            if fn is run_plain:
                plain_times += times
            med = statistics.median(times)
            row = {"table": table_, "technique": name, "settings": _label(s), "n": len(scenes),
                   "success": str(scoring.rate(r["ok"] for r in records)), "seconds_per_image": round(med, 2)}
            if with_regions:
                row["in_boxes"] = str(scoring.rate(r["in_boxes"] for r in records))
            out.append(row)
            print(json.dumps(row), flush=True)
            if results:
                slug = "".join(ch if ch.isalnum() else "-" for ch in name.lower()).strip("-")
                while "--" in slug:
                    slug = slug.replace("--", "-")
                write_cases(os.path.join(results, "cases", f"layout-{table_}-{slug}.csv"), records, list(records[0]))
    if not only or any("panorama" in o.lower() for o in only):
        with torch.inference_mode():
            pano = panorama(max(2, n // 2), clip, vae, m)
        for r in pano:
            if results:
                slug = "multidiffusion" if r["technique"].startswith("Multi") else "tiles"
                write_cases(os.path.join(results, "cases", f"layout-panorama-{slug}.csv"), r["records"],
                            list(r["records"][0]))
            del r["records"]
            r["settings"] = "384x128, window 128 px, uniform"
        out += pano
    plain = statistics.median(plain_times) if plain_times else None
    if plain is None and results and os.path.exists(os.path.join(results, "layout.json")):
        plain = json.load(open(os.path.join(results, "layout.json"))).get("plain_seconds")   # an earlier run's plain row
    for r in out:
        r["time_vs_plain"] = round(r["seconds_per_image"] / plain, 2) if plain else None
    if results:
        path = os.path.join(results, "layout.json")
        old = json.load(open(path)) if os.path.exists(path) else {"rows": []}
        keys = {(x["table"], x["technique"]) for x in out}
        data = {"rows": [r for r in old["rows"] if (r["table"], r["technique"]) not in keys] + out,
                "plain_seconds": round(plain, 3) if plain else old.get("plain_seconds"), "cases": n, "host": _host()}
        with open(path, "w") as f:
            json.dump(data, f, indent=1)
        if write:
            write_readme(data)
    return out


def _host() -> str:
    from common import host_line
    return host_line()


def table(data: dict) -> str:
    lines = [f"Layout on the toy world ({data['cases']} two-object scenes, 128 px, {STEPS} steps Euler, CFG {CFG:g}; "
             f"{data.get('host', '')})", "",
             "| table | method | settings | success (95 % Wilson) | each matched centroid in its box | time / image (x plain) |",
             "|---|---|---|---|---|---|"]
    order = ["binding", "layout", "panorama"]
    data = {**data, "rows": sorted(data["rows"], key=lambda r: (order.index(r["table"]) if r["table"] in order else 9,
                                                               not r["technique"].startswith("plain"), r["technique"]))}
    for r in data["rows"]:
        if r["table"] == "panorama":
            continue
        what = "both objects right" if r["table"] == "binding" else "both right, each centroid in its box"
        lines.append(f"| {r['table']}: {what} | {r['technique']} | {r['settings']} | {r['success']} | {r.get('in_boxes', '-')} | "
                     f"{r['seconds_per_image']} s ({r.get('time_vs_plain')}x) |")
    pano = [r for r in data["rows"] if r["table"] == "panorama"]
    if pano:
        lines += ["", f"Panorama 384x128 (single-object captions; each 128 px window scored by score_prompt):", "",
                  "| method | windows fully right | background right | seam: mean column difference at x = 128, 256 "
                  "vs inside | time / panorama (x plain image) |", "|---|---|---|---|---|"]
        for r in pano:
            lines.append(f"| {r['technique']} | {r['success']} | {r['background']} | {r['seam_border']} vs "
                         f"{r['seam_inside']} | {r['seconds_per_image']} s ({r.get('time_vs_plain')}x) |")
    return "\n".join(lines)


def write_readme(data: dict, path: str = README) -> None:
    replace_block(path, MARK_BEGIN, MARK_END, table(data))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--only", nargs="*", help="rows whose method contains one of these words")
    p.add_argument("--results", default=RESULTS)
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--write-readme", action="store_true")
    p.add_argument("--readme", action="store_true", help="only rewrite the README table from the saved layout.json")
    a = p.parse_args(argv)
    if a.readme:
        write_readme(json.load(open(os.path.join(a.results, "layout.json"))))
        return 0
    rows_ = run(a.n, None if a.no_save else a.results, a.write_readme and not a.no_save, a.only)
    print(table({"rows": rows_, "cases": a.n}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
