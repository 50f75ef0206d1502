"""Edit-quality benchmark on EditKit's trained toy model: `make bench-quality`.

    .venv/bin/python bench/quality.py                     # every technique, reference + shipped settings
    .venv/bin/python bench/quality.py --only sdedit       # a subset (case-insensitive substring, repeatable)
    .venv/bin/python bench/quality.py --only personalization   # the personalization table (quality_personalization.py)
    .venv/bin/python bench/quality.py --only sdedit --which shipped --per-split 8   # quick look
    .venv/bin/python bench/quality.py --readme            # rewrite the README table from bench/results/quality/
    .venv/bin/python bench/quality.py --list              # techniques and the workflows they read

Cases: toyworld.editbench.edit_cases (single-object scenes; at least --per-split cases in each of colour
near, colour far and every shape pair). Scoring: toyworld.scoring (position-aware, Wilson intervals).
Each technique runs at the benchmark's reference settings (20-step Euler, CFG 5, node defaults) and at
the settings its shipped workflow uses, read from workflows/*.json at run time (the Setting tables
below); a row whose shipped settings equal a reference set is marked "reference = shipped".

Results: bench/results/quality/summary.json (the rows, merged across subset runs of the same cases) and
one CSV of per-case results per row in bench/results/quality/cases/ (committed: every number traces to
its cases). With --write-readme (or later with --readme) the README's "Measured" table is regenerated
between the bench-quality markers.

To add a technique, register a runner below (see toyworld/editbench.py for the contract):

    @register("My method", order=30, reference=lambda ctx: [{"steps": ctx.steps, "cfg": ctx.cfg}],
              shipped=lambda: shipped.read_settings(MY_TABLE), shipped_from=("my_method.json",))
    def my_method(ctx, case, target_prompt, settings):
        # edit case.source_image() (a clean toy-world render) from case.source_prompt to target_prompt
        return image          # (H, W, 3) in [0, 1]; or (edit, reconstruction)
"""
import argparse
import csv
import datetime
import functools
import hashlib
import json
import os
import re
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from common import boot  # noqa: E402

boot()

from editkit.builtin_models import toy  # noqa: E402
from editkit.toyworld import editbench, scoring, shipped  # noqa: E402
from editkit.toyworld.shipped import Setting  # noqa: E402

register = editbench.register
call = editbench.call_node
RESULTS = os.path.join(HERE, "results", "quality")   # --results DIR overrides (development runs)
README = os.path.join(ROOT, "README.md")
MARK_BEGIN, MARK_END = "<!-- bench-quality:begin -->", "<!-- bench-quality:end -->"


# ---------------------------------------------------------------------------------------------
# Calibration rows: what the scorer and the VAE alone give.

@register("(calibration) VAE round trip, no edit", order=0, calibration=True)
def vae_round_trip(ctx, case, target_prompt, settings):
    return ctx.decode(ctx.latent(case.source_image()))


@register("(calibration) ground-truth edit through the VAE", order=1, calibration=True)
def ground_truth_edit(ctx, case, target_prompt, settings):
    scene = case.target if target_prompt == case.target_prompt else case.source
    return ctx.decode(ctx.latent(torch.from_numpy(scene.render())))


# ---------------------------------------------------------------------------------------------
# SDEdit: EditKitSDEdit -> CFGGuider + KSamplerSelect -> SamplerCustomAdvanced, as sdedit.json wires it.

SDEDIT_SHIPPED = {"strength": Setting("sdedit.json", "EditKitSDEdit", "strength"),
                  "steps": Setting("sdedit.json", "EditKitSDEdit", "steps"),
                  "scheduler": Setting("sdedit.json", "EditKitSDEdit", "scheduler"),
                  "cfg": Setting("sdedit.json", "CFGGuider", "cfg"),
                  "sampler": Setting("sdedit.json", "KSamplerSelect", "sampler_name")}


def _sdedit_reference(ctx):
    # t0 of a 20-step schedule: the steps that remain from t0 (as a KSampler with denoise t0 runs).
    return [{"strength": t, "steps": max(1, round(ctx.steps * t)), "scheduler": ctx.scheduler, "cfg": ctx.cfg,
             "sampler": ctx.sampler} for t in (0.5, 0.7, 0.85)]


@register("SDEdit", order=10, reference=_sdedit_reference, shipped=lambda: shipped.read_settings(SDEDIT_SHIPPED),
          shipped_from=shipped.sources(SDEDIT_SHIPPED))
def sdedit(ctx, case, target_prompt, s):
    noise, latent, sigmas, _ = call("EditKitSDEdit", model=ctx.model, latent={"samples": ctx.latent(case.source_image())},
                                    strength=s["strength"], steps=s["steps"], scheduler=s["scheduler"], seed=case.seed)
    guider = call("CFGGuider", model=ctx.model, positive=ctx.encode(target_prompt), negative=ctx.encode(""),
                  cfg=s["cfg"])[0]
    sampler = call("KSamplerSelect", sampler_name=s["sampler"])[0]
    out = call("SamplerCustomAdvanced", noise=noise, guider=guider, sampler=sampler, sigmas=sigmas, latent_image=latent)[0]
    return ctx.decode(out["samples"])


# ---------------------------------------------------------------------------------------------
# Inversion (+ Prompt-to-Prompt) techniques, run through their nodes as the workflows wire them:
# invert -> [EditKitPromptToPrompt] -> EditKit Inversion Sampler -> SamplerCustomAdvanced.
# The inversion of a source is computed once per row (ctx.memo) and reused by its edits.

INVERT_NODE = {"ddim": "EditKitInvert", "direct": "EditKitInvert", "nti": "EditKitNullTextInversion",
               "npi": "EditKitNegativePromptInversion", "ddpm": "EditKitDDPMInversion"}
# settings key -> the inversion node's input
INVERT_INPUTS = {
    "ddim": {"steps": "steps", "invert_cfg": "cfg", "scheduler": "scheduler", "fixed_point_iterations": "fixed_point_iterations"},
    "nti": {"steps": "steps", "invert_cfg": "cfg", "scheduler": "scheduler", "inner_iterations": "inner_iterations",
            "learning_rate": "learning_rate", "early_stop": "early_stop", "fixed_point_iterations": "fixed_point_iterations"},
    "npi": {"steps": "steps", "scheduler": "scheduler", "fixed_point_iterations": "fixed_point_iterations",
            "proximal": "proximal", "quantile": "quantile"},
    "ddpm": {"steps": "steps", "invert_cfg": "cfg", "scheduler": "scheduler", "skip": "skip"},
}
INVERT_INPUTS["direct"] = INVERT_INPUTS["ddim"]
INVERSION_WORKFLOW = {"ddim": "inversion_ddim.json", "direct": "inversion_direct.json", "nti": "inversion_null_text.json",
                      "npi": "inversion_negative_prompt.json", "ddpm": "inversion_ddpm.json"}
P2P_WORKFLOW = "attention_p2p_inverted.json"     # the shipped DDIM inversion + Prompt-to-Prompt graph
P2P_INPUTS = {"p2p_mode": "mode", "cross_replace_steps": "cross_replace_steps", "self_replace_steps": "self_replace_steps",
              "local_blend": "local_blend_words", "blend_threshold": "blend_threshold"}


def shipped_table(kind: str, control: str | None) -> dict:
    """Where each setting of an inversion row ships: the inversion and the edit CFG from the technique's
    workflow (the DDIM + P2P graph for DDIM + P2P), Prompt-to-Prompt's from the P2P graph."""
    wf = P2P_WORKFLOW if (kind == "ddim" and control) else INVERSION_WORKFLOW[kind]
    table = {k: Setting(wf, INVERT_NODE[kind], v) for k, v in INVERT_INPUTS[kind].items()}
    table["cfg"] = Setting(wf, "EditKitInversionSampler", "cfg")
    if control == "p2p":
        table.update({k: Setting(P2P_WORKFLOW, "EditKitPromptToPrompt", v, convert=bool if k == "local_blend" else None)
                      for k, v in P2P_INPUTS.items()})
    return table


def reference_settings(ctx, kind: str, control: str | None) -> dict:
    """The benchmark's reference: ctx.steps steps, CFG ctx.cfg, node defaults (toy-model learning rate for NTI)."""
    inv = {"ddim": {"steps": ctx.steps, "invert_cfg": 1.0, "scheduler": ctx.scheduler, "fixed_point_iterations": 0},
           "nti": {"steps": ctx.steps, "invert_cfg": ctx.cfg, "scheduler": ctx.scheduler, "inner_iterations": 10,
                   "learning_rate": 0.05, "early_stop": 1e-5, "fixed_point_iterations": 0},   # 64-d text embeddings: see the tooltip
           "npi": {"steps": ctx.steps, "scheduler": ctx.scheduler, "fixed_point_iterations": 0, "proximal": "none",
                   "quantile": 0.7},
           "ddpm": {"steps": ctx.steps, "invert_cfg": ctx.cfg, "scheduler": ctx.scheduler, "skip": round(ctx.steps * 18 / 50)}}
    s = dict(inv["ddim" if kind == "direct" else kind])
    s["cfg"] = ctx.cfg
    if control == "p2p":
        s.update({"p2p_mode": "auto", "cross_replace_steps": 0.8, "self_replace_steps": 0.4, "local_blend": True,
                  "blend_threshold": 0.3})
    return s


def _invert(kind, ctx, case, s):
    latent = {"samples": ctx.latent(case.source_image())}
    args = {node_input: s[k] for k, node_input in INVERT_INPUTS[kind].items()}
    src, neg = ctx.encode(case.source_prompt), ctx.encode("")
    if kind in ("ddim", "direct"):
        inv = call("EditKitInvert", model=ctx.model, latent=latent, positive=src, **args)[1]
        return call("EditKitDirectInversion", inversion=inv)[0] if kind == "direct" else inv
    if kind == "nti":
        with torch.inference_mode(False):
            return call("EditKitNullTextInversion", model=ctx.model, latent=latent, positive=src, negative=neg, **args)[1]
    if kind == "npi":
        return call("EditKitNegativePromptInversion", model=ctx.model, latent=latent, positive=src, **args)[1]
    if kind == "ddpm":
        return call("EditKitDDPMInversion", model=ctx.model, latent=latent, positive=src, negative=neg, seed=case.seed,
                    **args)[1]
    raise ValueError(kind)


def inversion_edit(kind: str, control: str | None = None):
    keys = tuple(INVERT_INPUTS[kind])

    def run(ctx, case, target_prompt, s):
        inv = ctx.memo((kind, case.seed) + tuple(s[k] for k in keys), lambda: _invert(kind, ctx, case, s))
        model = ctx.model
        if control == "p2p":
            words = editbench.changed_words(case.source_prompt, target_prompt) if s["local_blend"] else []
            model = call("EditKitPromptToPrompt", model=ctx.model, clip=ctx.clip, source_prompt=case.source_prompt,
                         target_prompt=target_prompt, mode=s["p2p_mode"], cross_replace_steps=s["cross_replace_steps"],
                         self_replace_steps=s["self_replace_steps"], local_blend_words=", ".join(words),
                         blend_threshold=s["blend_threshold"])[0]
        noise, guider, sampler, sigmas, lat = call("EditKitInversionSampler", model=model, inversion=inv,
                                                   positive=ctx.encode(target_prompt), negative=ctx.encode(""),
                                                   cfg=s["cfg"], output="source + target" if control else "target")
        out = call("SamplerCustomAdvanced", noise=noise, guider=guider, sampler=sampler, sigmas=sigmas, latent_image=lat)[0]
        samples = out["samples"]
        if control:   # the source branch is the reconstruction, for free
            return ctx.decode(samples[-1:]), ctx.decode(samples[:1])
        return ctx.decode(samples[-1:])
    return run


def _has(*node_ids):
    def check():
        import nodes
        return all(n in nodes.NODE_CLASS_MAPPINGS for n in node_ids)
    return check


for _order, (_kind, _control, _label) in enumerate((
        ("ddim", None, "DDIM inversion, prompt swap"),
        ("ddpm", None, "DDPM (edit-friendly) inversion, prompt swap"),
        ("ddim", "p2p", "DDIM inversion + Prompt-to-Prompt"),
        ("nti", "p2p", "Null-text inversion + Prompt-to-Prompt"),
        ("npi", "p2p", "Negative-prompt inversion + Prompt-to-Prompt"),
        ("direct", "p2p", "Direct inversion + Prompt-to-Prompt"))):
    _table = shipped_table(_kind, _control)
    _nodes = (INVERT_NODE[_kind], "EditKitInversionSampler") + (("EditKitDirectInversion",) if _kind == "direct" else ()) \
        + (("EditKitPromptToPrompt",) if _control else ())
    register(_label, order=20 + _order, available=_has(*_nodes),
             reference=functools.partial(lambda ctx, k, c: [reference_settings(ctx, k, c)], k=_kind, c=_control),
             shipped=functools.partial(shipped.read_settings, _table),
             shipped_from=shipped.sources(_table))(inversion_edit(_kind, _control))


# ---------------------------------------------------------------------------------------------
# Results files and the README

def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:120]


CSV_FIELDS = ["case", "split", "seed", "success", "position_free", "why", "read", "iou", "centroid_error",
              "footprint", "others_ok", "preserve_psnr", "recon_psnr"]


def cases_name(summary: dict) -> str:
    digest = hashlib.sha1(json.dumps(summary["settings"], sort_keys=True).encode()).hexdigest()[:8]
    return slug(f"{summary['technique']} {summary['which']}")[:80] + f"-{digest}"


def write_cases(summary: dict, records: list[dict]) -> str:
    os.makedirs(os.path.join(RESULTS, "cases"), exist_ok=True)
    name = cases_name(summary) + ".csv"
    with open(os.path.join(RESULTS, "cases", name), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(records)
    return "cases/" + name


def load_summary() -> dict | None:
    path = os.path.join(RESULTS, "summary.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def save_summary(data: dict) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    data["rows"].sort(key=lambda r: (r["order"], r["technique"], r["which"] == "shipped", r["key"]))
    keep = {r["cases_file"] for r in data["rows"]}
    folder = os.path.join(RESULTS, "cases")
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if "cases/" + name not in keep:
            os.remove(os.path.join(folder, name))   # a row no longer measured (e.g. shipped settings changed)
    with open(os.path.join(RESULTS, "summary.json"), "w") as f:
        json.dump(data, f, indent=1, ensure_ascii=False)
        f.write("\n")


PAIR_COLUMNS = ["technique", "settings"] + ["shape " + p.split(" ", 1)[1] for p in editbench.shape_splits()]


def tables(data: dict) -> str:
    rows = data["rows"]
    return (editbench.format_table(rows, editbench.MAIN_COLUMNS) + "\n\nShape swaps by pair (same rows):\n\n"
            + editbench.format_table(rows, PAIR_COLUMNS))


def readme_block(data: dict) -> str:
    st = data["settings"]
    c = data["cases"]
    shipped_files = sorted({f for r in data["rows"] if r["which"] != "reference" for f in r.get("shipped_from", [])})
    lines = [
        MARK_BEGIN,
        "<!-- generated by `bench/quality.py --readme` from bench/results/quality/summary.json; edit the script, not this table -->",
        f"`make bench-quality` edits {c['n']} fixed toy-world cases ({c['sources']} single-object scenes, clean renders; "
        f"{', '.join(f'{v} {k}' for k, v in c['per_split'].items())}) with every technique on the trained toy model and "
        "scores each edit against the scene's ground truth with `toyworld/scoring.py`. **Edit success** is position-aware: "
        f"the edited object overlaps the source object's footprint (mask IoU >= {st['iou_min']}) and reads as the target "
        "colour and shape, with no other object and the background unchanged. **Position-free reading** is the old "
        "column (target colour/shape and background read anywhere in the image), kept for comparison. Colour swaps "
        f"are *near* below an RGB distance of {st['near_rgb']} (red<->orange, orange<->yellow, blue<->purple, green<->black, "
        "red<->purple, green<->blue), *far* otherwise. Every rate shows its 95 % Wilson interval in brackets. "
        f"Preservation: PSNR outside the edited object (both footprints, dilated {st['preserve_dilate']} px); recon: "
        f"PSNR of the edit to the source caption (first {st['n_recon']} sources, or every source where the method "
        "returns its reconstruction branch); time: median wall time of one edit from scratch over one plain "
        f"{st['steps']}-step txt2img at CFG {st['cfg']:g}, measured before each row in the same run.",
        "",
        "**Settings.** *reference* rows run at the benchmark's reference settings "
        f"({st['steps']}-step Euler, CFG {st['cfg']:g}, node defaults; SDEdit at three t0); *shipped* rows run at the settings "
        "read at run time from the workflow files a user loads"
        + (f" ({', '.join('`workflows/' + shipped.file_title(f) + '`' for f in shipped_files)}; rows combining two techniques take each "
           "one's settings from its own workflow)" if shipped_files else "")
        + "; *reference = shipped* marks a row where they agree. Euler sampler and normal schedule unless the row says otherwise.",
        "",
        tables(data),
        "",
        f"Measured {data['date']} on {data['machine']} (compute dtype {data.get('dtype', 'n/a')}); "
        + (f"the last full run took {data['run_minutes']:.0f} min " if data.get("run_minutes") else "measured in subset runs ")
        + "(CPU shared with other jobs, so wall times are inflated; the time ratios are taken within the run). Per-case results: `bench/results/quality/cases/` (one CSV per row).",
    ]
    if data.get("notes"):
        lines += ["", data["notes"]]
    lines.append(MARK_END)
    return "\n".join(lines)


def write_readme(data: dict, path: str = README) -> None:
    with open(path) as f:
        text = f.read()
    if MARK_BEGIN not in text or MARK_END not in text:
        raise SystemExit(f"{path} has no {MARK_BEGIN} ... {MARK_END} block to rewrite")
    a = text.index(MARK_BEGIN)
    b = text.index(MARK_END) + len(MARK_END)
    with open(path, "w") as f:
        f.write(text[:a] + readme_block(data) + text[b:])


# ---------------------------------------------------------------------------------------------

def image_saver(folder: str | None, summary_name: str):
    """on_image callback writing each scored result as an 8-bit PNG (lossless: rescoring gives the same)."""
    if not folder:
        return None
    from PIL import Image
    out = os.path.join(folder, summary_name)
    os.makedirs(out, exist_ok=True)

    def save(i, image):
        Image.fromarray((image * 255.0).round().astype("uint8")).save(os.path.join(out, f"{i:04d}.png"))
    return save


def rescore(images: str) -> None:
    """Score the saved images of every row again (after a scorer change) without sampling: records,
    rates and cells are rebuilt; reconstruction PSNR and time are kept from the run."""
    import numpy as np
    from PIL import Image
    data = load_summary()
    if data is None:
        raise SystemExit("no bench/results/quality/summary.json to rescore")
    cases = editbench.edit_cases(per_split=data["settings"]["per_split"])
    for r in data["rows"]:
        folder = os.path.join(images, os.path.basename(r["cases_file"])[:-4])
        if not os.path.isdir(folder) or len(os.listdir(folder)) != len(cases):
            print(f"  {r['key']}: no saved images in {folder}, kept as measured")
            continue
        with open(os.path.join(RESULTS, r["cases_file"])) as f:
            recon = {int(x["seed"]): float(x["recon_psnr"]) for x in csv.DictReader(f) if x["recon_psnr"] not in ("", "None")}
        records = [editbench.score_records(c, np.asarray(Image.open(os.path.join(folder, f"{i:04d}.png")), np.float32) / 255.0,
                                           recon.get(c.seed, float("nan"))) for i, c in enumerate(cases)]
        tech = editbench.TECHNIQUES.get(r["technique"])
        if tech is None:
            print(f"  {r['key']}: no such technique registered any more, kept as measured")
            continue
        row = editbench.Row(tech, r["settings"], r["which"])
        s = editbench.summarize(row, {"records": records, "recon": list(recon.values()), "seconds": [],
                                      "wall": r["wall_seconds"]}, r["plain_seconds"])
        s.update(key=r["key"], label=r["label"], shipped_from=r.get("shipped_from", []), cases_file=r["cases_file"])
        s["cells"].update(settings=r["cells"]["settings"], **{"time vs plain": r["cells"]["time vs plain"]})
        write_cases(s, records)
        r.clear()
        r.update(s)
        print(f"  {s['key']}: {s['cells']['edit success']}")
    save_summary(data)


def _matches(name: str, only) -> bool:
    return not only or any(o.lower() in name.lower() for o in only)


def _machine() -> str:
    import platform
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, TORCH_THREADS={os.environ.get('TORCH_THREADS', '1')}"


def _dtype(model) -> str:
    return str(next(model.model.parameters()).dtype).replace("torch.", "")


def main(argv=None):
    p = argparse.ArgumentParser(description="Edit-quality benchmark on the toy model.")
    p.add_argument("--per-split", type=int, default=48, help="cases in each split (colour near/far, each shape pair)")
    p.add_argument("--recon", type=int, default=24, help="sources whose reconstruction is run separately")
    p.add_argument("--steps", type=int, default=20, help="reference sampling steps of a full txt2img")
    p.add_argument("--cfg", type=float, default=5.0, help="reference CFG")
    p.add_argument("--only", action="append", help="technique name substring, case-insensitive (repeatable)")
    p.add_argument("--which", choices=("both", "reference", "shipped"), default="both",
                   help="reference settings, shipped settings, or both")
    p.add_argument("--weights", default=toy.DEFAULT_PATH, help="toy model file (default: the shipped one)")
    p.add_argument("--list", action="store_true", help="list the techniques and the workflows they read, and exit")
    p.add_argument("--write-readme", action="store_true", help="after the run, rewrite the README's table")
    p.add_argument("--readme", action="store_true", help="only rewrite the README's table from the saved results")
    p.add_argument("--no-save", action="store_true", help="print only; keep bench/results/quality/ as it is")
    p.add_argument("--results", help="results folder (default bench/results/quality; e.g. /tmp/q for development)")
    p.add_argument("--images", help="also save every scored result as a PNG under this folder (not committed)")
    p.add_argument("--rescore", metavar="IMAGES", help="score the images a run saved with --images again, no sampling")
    a = p.parse_args(argv)
    global RESULTS
    if a.only and [o.lower() for o in a.only] == ["drag"]:   # the drag table (bench/quality_drag.py)
        import quality_drag
        return quality_drag.main((["--results", a.results] if a.results else []) + (["--no-save"] if a.no_save else [])
                                 + (["--write-readme"] if a.write_readme else []) + (["--readme"] if a.readme else []))
    if a.only and [o.lower() for o in a.only] == ["local"]:  # the local-editing table (bench/quality_local.py)
        import quality_local
        out = os.path.join(os.path.abspath(a.results) if a.results else RESULTS, "local.json")
        per_split = a.per_split if a.per_split != 48 else 4     # 20 cases by default: the table takes minutes, not hours
        return quality_local.main(["--per-split", str(per_split), "--double", "16", "--sega", "8"]
                                  + ([] if a.no_save else ["--json", out]))
    if a.only and [o.lower() for o in a.only] == ["layout"]:   # the layout table (bench/quality_layout.py)
        import quality_layout
        return quality_layout.main((["--results", a.results] if a.results else []) + (["--no-save"] if a.no_save else [])
                                   + (["--write-readme"] if a.write_readme else []) + (["--readme"] if a.readme else []))
    if a.only and [o.lower() for o in a.only] == ["personalization"]:   # bench/quality_personalization.py
        import quality_personalization
        return quality_personalization.main((["--results", a.results] if a.results else [])
                                            + (["--no-save"] if a.no_save else [])
                                            + (["--write-readme"] if a.write_readme else [])
                                            + (["--readme"] if a.readme else []))
    RESULTS = os.path.abspath(a.results) if a.results else RESULTS
    import comfy.utils
    comfy.utils.set_progress_bar_enabled(False)    # this script prints tables, not per-sample bars
    techs = sorted(editbench.TECHNIQUES.values(), key=lambda t: (t.order, t.name))
    if a.list:
        for t in techs:
            print(f"{t.name}" + (f"   (shipped: {', '.join(t.shipped_from)})" if t.shipped_from else ""))
        return 0
    if a.rescore:
        rescore(a.rescore)
        if a.write_readme:
            write_readme(load_summary())
        return 0
    if a.readme:
        data = load_summary()
        if data is None:
            raise SystemExit("no bench/results/quality/summary.json yet: run bench/quality.py first")
        write_readme(data)
        print(f"rewrote the table in {README}")
        return 0
    if not toy.available(a.weights):
        raise SystemExit(f"no toy model at {a.weights}: run `make toy-model` or restore models/toy/ from git")
    t_run = time.perf_counter()
    cases = editbench.edit_cases(per_split=a.per_split)
    per_split = {k: v.n for k, v in scoring.tally(cases, key=lambda c: c.split, flag=lambda c: True).items()}
    case_info = {"n": len(cases), "sources": len({c.seed for c in cases}), "per_split": dict(sorted(per_split.items())),
                 "id": slug(f"{len(cases)}-{cases[0].name}-{cases[-1].name}")}
    model, clip, vae = toy.load_toy(a.weights)
    ctx = editbench.EditContext(model, clip, vae, steps=a.steps, cfg=a.cfg)
    settings = {"steps": a.steps, "cfg": a.cfg, "per_split": a.per_split, "n_recon": a.recon,
                "iou_min": scoring.IOU_MIN, "near_rgb": scoring.NEAR_RGB, "preserve_dilate": scoring.PRESERVE_DILATE}
    old = load_summary()
    subset = bool(a.only) or a.which != "both"
    if old is not None and (old.get("cases", {}).get("id") != case_info["id"] or old.get("settings") != settings):
        if subset and not a.no_save:
            print("bench/results/quality/summary.json holds another case set or settings: this subset run is printed, "
                  "not saved (a full run starts a new summary)")
            a.no_save = True
        old = None
    data = old or {"rows": []}
    data.update({"cases": case_info, "settings": settings, "date": datetime.date.today().isoformat(),
                 "machine": _machine(), "dtype": _dtype(model)})
    print(f"{len(cases)} cases from {case_info['sources']} sources: {case_info['per_split']}", flush=True)
    done = []
    with torch.inference_mode():
        plain = editbench.plain_time(ctx)
        for tech in techs:
            if not _matches(tech.name, a.only) or not tech.available():
                continue
            rows = editbench.rows_for(ctx, tech, a.which)
            replaced = {"both": None, "reference": ("reference", "reference = shipped"),
                        "shipped": ("shipped", "reference = shipped")}[a.which]
            data["rows"] = [r for r in data["rows"] if r["technique"] != tech.name
                            or (replaced is not None and r["which"] not in replaced)]
            for row in rows:
                plain = editbench.plain_time(ctx, warmup=False)
                t0 = time.perf_counter()
                last = [t0]

                def progress(i, n, _row=row, _last=last, _t0=t0):
                    if time.perf_counter() - _last[0] > 60 or i == n:
                        _last[0] = time.perf_counter()
                        print(f"  {_row.key}: {i}/{n} ({(_last[0] - _t0) / 60:.1f} min)", flush=True)
                stem = cases_name({"technique": tech.name, "which": row.which, "settings": row.settings})
                result = editbench.run_row(ctx, row, cases, n_recon=a.recon, progress=progress,
                                           on_image=image_saver(a.images, stem))
                s = editbench.summarize(row, result, plain)
                s["shipped_from"] = list(tech.shipped_from) if row.which != "reference" else []
                data["rows"].append(s)
                done.append(s)
                if not a.no_save:      # saved row by row: an interrupted run keeps what it measured
                    s["cases_file"] = write_cases(s, result["records"])
                    save_summary(data)
                print(editbench.format_table([s], editbench.MAIN_COLUMNS).splitlines()[-1], flush=True)
    minutes = (time.perf_counter() - t_run) / 60
    if not subset and not a.only:
        data["run_minutes"] = minutes
    print(f"\n## Edit quality on the toy world ({len(cases)} cases; {minutes:.1f} min)\n")
    print(tables({"rows": done}))
    if not a.no_save:
        save_summary(data)
        if a.write_readme:
            write_readme(data)
            print(f"\nrewrote the table in {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
