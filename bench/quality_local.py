"""Local editing on the toy world (issue 14): DiffEdit's mask against the ground truth, and local edits of
two-object scenes (one object edited, the other must stay).

    .venv/bin/python bench/quality_local.py --per-split 8          # a quick table
    .venv/bin/python bench/quality_local.py --per-split 8 --json out/local.json

Cases: toyworld.editbench.edit_cases(per_split, n_objects=2). Scores: toyworld.scoring only: the mask's IoU
with the edited object's ground-truth mask (`scoring.mask_iou`, colour swaps: the object keeps its footprint),
edit success / the untouched object kept / PSNR outside the edited object (`case.score`), rates with Wilson
intervals (`scoring.rate`). Time: per case, as a ratio of one plain 20-step txt2img measured in the same run.

Rows (settings = the shipped "Editing - DiffEdit" workflow's, at the benchmark's 20 steps):
  DiffEdit                   DiffEdit mask (n 10, ratio 0.5, threshold 0.5) + DDIM inversion to the ratio +
                             masked decoding, CFG 5;
  DiffEdit, unmasked         the same inversion and replay without the mask (what the mask buys);
  masked Direct Inv. + P2P   DDIM inversion of the whole schedule + Direct Inversion + Prompt-to-Prompt word
                             swap, with the DiffEdit mask in the inversion sampler;
  LEDITS++                   edit-friendly DDPM inversion (20 steps, skip 4, CFG 3.5 with an empty negative) +
                             EditKitLEDITS removing the source object's phrase and adding the target's in one pass
                             (scale 5, threshold 0.9, implicit masks "intersect"; the shipped workflow's edits).

`--rows LEDITS` runs only the rows whose name contains the text (the mask is still made and scored when a
DiffEdit row runs). `bench/quality.py --only local` runs this table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import boot  # noqa: E402

boot()

import torch  # noqa: E402

from editkit.builtin_models import toy  # noqa: E402
from editkit.toyworld import editbench, scoring  # noqa: E402

call = editbench.call_node
TITLE = "Local editing on the toy world (two-object scenes): DiffEdit mask and masked edits"
MASK = {"n": 10, "encode_ratio": 0.5, "threshold": 0.5, "dilate": 0, "blur": 0.0}
CFG = 5.0


def diffedit_mask(ctx, case, target_prompt):
    lat = {"samples": ctx.latent(case.source_image())}
    return call("EditKitDiffEditMask", model=ctx.model, latent=lat, reference=ctx.encode(case.source_prompt),
                query=ctx.encode(target_prompt), seed=case.seed, **MASK)[0]


def _sample(ctx, model, inv, target_prompt, mask):
    noise, guider, sampler, sigmas, lat = call("EditKitInversionSampler", model=model, inversion=inv,
                                               positive=ctx.encode(target_prompt), negative=ctx.encode(""),
                                               cfg=CFG, output="target", mask=mask)
    out = call("SamplerCustomAdvanced", noise=noise, guider=guider, sampler=sampler, sigmas=sigmas, latent_image=lat)[0]
    return ctx.decode(out["samples"][-1:])


def diffedit(ctx, case, target_prompt, mask, masked=True):
    import comfy.samplers
    lat = {"samples": ctx.latent(case.source_image())}
    sig = comfy.samplers.calculate_sigmas(ctx.model.get_model_object("model_sampling"), "normal", ctx.steps).cpu()
    low = sig[-(round(ctx.steps * MASK["encode_ratio"]) + 1):]
    inv = call("EditKitInvert", model=ctx.model, latent=lat, positive=ctx.encode(case.source_prompt), cfg=1.0,
               steps=ctx.steps, scheduler="normal", fixed_point_iterations=0, sigmas=low)[1]
    return _sample(ctx, ctx.model, inv, target_prompt, mask if masked else None)


def direct_p2p(ctx, case, target_prompt, mask):
    lat = {"samples": ctx.latent(case.source_image())}
    inv = call("EditKitInvert", model=ctx.model, latent=lat, positive=ctx.encode(case.source_prompt), cfg=1.0,
               steps=ctx.steps, scheduler="normal", fixed_point_iterations=0)[1]
    inv = call("EditKitDirectInversion", inversion=inv)[0]
    model = call("EditKitPromptToPrompt", model=ctx.model, clip=ctx.clip, source_prompt=case.source_prompt,
                 target_prompt=target_prompt, mode="auto")[0]
    return _sample(ctx, model, inv, target_prompt, mask)


LEDITS = {"skip": 4, "cfg": 3.5, "scale": 5.0, "threshold": 0.9, "warmup": 0, "masks": "intersect"}


def ledits(ctx, case, target_prompt, mask):
    src, tgt = case.source.objects[case.index], case.target.objects[case.index]

    def invert():
        lat = {"samples": ctx.latent(case.source_image())}
        return call("EditKitDDPMInversion", model=ctx.model, latent=lat, positive=ctx.encode(case.source_prompt),
                    negative=ctx.encode(""), cfg=LEDITS["cfg"], steps=ctx.steps, scheduler="normal",
                    skip=LEDITS["skip"], seed=0)[1]
    inv = invert()
    edits = f"- {src.phrase}\n+ {tgt.phrase}"
    out = call("EditKitLEDITS", model=ctx.model, clip=ctx.clip, inversion=inv, edits=edits, scale=LEDITS["scale"],
               threshold=LEDITS["threshold"], warmup=LEDITS["warmup"], masks=LEDITS["masks"], output="target")[0]
    return ctx.decode(out["samples"][-1:])


ROWS = [("DiffEdit", lambda ctx, c, t, m: diffedit(ctx, c, t, m)),
        ("DiffEdit, unmasked", lambda ctx, c, t, m: diffedit(ctx, c, t, m, masked=False)),
        ("masked Direct Inv. + P2P", direct_p2p),
        ("LEDITS++", ledits)]


SEGA = {"scale": 5.0, "warmup": 4, "threshold": 0.95, "momentum_scale": 0.3, "momentum_beta": 0.6}


def sega_image(ctx, prompt, concept, direction, seed):
    """txt2img at ctx.steps / ctx.cfg through EditKitGuider: a CFG term + one SEGA term (None: plain CFG)."""
    terms = call("EditKitGuidanceTermCFG")[0]
    if concept is not None:
        terms = call("EditKitGuidanceTermSEGA", concept=ctx.encode(concept), direction=direction, previous=terms, **SEGA)[0]
    guider = call("EditKitGuider", model=ctx.model, positive=ctx.encode(prompt), negative=ctx.encode(""), cfg=ctx.cfg,
                  terms=terms)[0]
    noise = call("RandomNoise", noise_seed=seed)[0]
    sampler = call("KSamplerSelect", sampler_name="euler")[0]
    sigmas = call("BasicScheduler", model=ctx.model, scheduler="normal", steps=ctx.steps, denoise=1.0)[0]
    lat = call("EmptyLatentImage", width=128, height=128, batch_size=1)[0]
    out = call("SamplerCustomAdvanced", noise=noise, guider=guider, sampler=sampler, sigmas=sigmas, latent_image=lat)[0]
    return ctx.decode(out["samples"][-1:])


def sega_rates(ctx, n: int, seed0: int = 60_000, progress=print) -> dict:
    """SEGA remove ('without' the second object of a two-object caption: success = the one-object caption's
    score) and add (the second object added to the one-object caption: success = the two-object caption),
    next to plain CFG on the same prompts and seeds (how often the result already reads as the goal)."""
    from editkit.toyworld import world
    flags = {"remove": [], "remove, plain CFG": [], "add": [], "add, plain CFG": []}
    for k in range(n):
        scene = world.sample_scene(seed0 + k, n_objects=2, split="train")
        one = world.caption_for(scene.background, [(scene.objects[0].color, scene.objects[0].shape)])
        other = scene.objects[1].phrase
        flags["remove"].append(scoring.score_prompt(sega_image(ctx, scene.caption, other, "remove", seed0 + k), one).ok)
        flags["remove, plain CFG"].append(scoring.score_prompt(sega_image(ctx, scene.caption, None, None, seed0 + k), one).ok)
        flags["add"].append(scoring.score_prompt(sega_image(ctx, one, other, "add", seed0 + k), scene.caption).ok)
        flags["add, plain CFG"].append(scoring.score_prompt(sega_image(ctx, one, None, None, seed0 + k), scene.caption).ok)
        if progress:
            progress(f"SEGA [{k + 1}/{n}] " + " ".join(f"{key}={'ok' if v[-1] else 'x'}" for key, v in flags.items()))
    return {key: str(scoring.rate(v)) for key, v in flags.items()}


def run(per_split: int = 8, steps: int = 20, progress=print, rows=None, sega: int = 0) -> dict:
    global ROWS
    if rows:
        ROWS = [r for r in ROWS if any(w.lower() in r[0].lower() for w in rows)]
    needs_mask = any(name.startswith("DiffEdit") or "masked" in name for name, _ in ROWS)
    model, clip, vae = toy.load_toy()
    ctx = editbench.EditContext(model, clip, vae, steps=steps, cfg=CFG)
    cases = editbench.edit_cases(per_split=per_split, n_objects=2)
    with torch.inference_mode():
        plain = editbench.plain_time(ctx)
        ious, mask_times = [], []
        records = {name: [] for name, _ in ROWS}
        times = {name: [] for name, _ in ROWS}
        for k, case in enumerate(cases):
            t = time.perf_counter()
            mask = diffedit_mask(ctx, case, case.target_prompt) if needs_mask else None
            mask_times.append(time.perf_counter() - t)
            if case.kind == "colour" and mask is not None:
                ious.append(scoring.mask_iou(mask[0], case.source.masks()[case.index]))
            for name, fn in ROWS:
                t = time.perf_counter()
                img = fn(ctx, case, case.target_prompt, mask)
                uses_mask = name != "DiffEdit, unmasked" and not name.startswith("LEDITS")
                times[name].append(time.perf_counter() - t + mask_times[-1] * uses_mask)
                s = case.score(img)
                records[name].append({"case": case.name, "kind": case.kind, **s.record()})
            if progress:
                progress(f"[{k + 1}/{len(cases)}] {case.name}: IoU {ious[-1] if case.kind == 'colour' and ious else float('nan'):.2f} "
                         + " ".join(f"{n}={'ok' if records[n][-1]['success'] else 'x'}" for n, _ in ROWS))
    rows = []
    for name, _ in ROWS:
        recs = records[name]
        psnrs = [r["preserve_psnr"] for r in recs if r["preserve_psnr"] is not None]
        rows.append({"row": name,
                     "edit success": str(scoring.rate([r["success"] for r in recs])),
                     "colour swaps": str(scoring.rate([r["success"] for r in recs if r["kind"] == "colour"])),
                     "shape swaps": str(scoring.rate([r["success"] for r in recs if r["kind"] == "shape"])),
                     "other object kept": str(scoring.rate([r["others_ok"] for r in recs])),
                     "PSNR outside (dB)": f"{sum(psnrs) / max(len(psnrs), 1):.2f}",
                     "time vs plain": f"{sum(times[name]) / len(times[name]) / plain:.2f}x"})
    mask_row = {"mask IoU (colour swaps)": f"{sum(ious) / max(len(ious), 1):.3f}",
                "IoU >= 0.8": str(scoring.rate([i >= 0.8 for i in ious])),
                "mask cost": (f"{2 * MASK['n']} model evaluations, {sum(mask_times) / len(mask_times) / plain:.2f}x plain"
                              if needs_mask else "not run")}
    with torch.inference_mode():
        sega_row = sega_rates(ctx, sega, progress=progress) if sega else None
    return {"title": TITLE, "cases": len(cases), "per_split": per_split, "steps": steps, "mask": mask_row,
            "rows": rows, "records": records, "sega": sega_row, "sega_n": sega}


def table(result: dict) -> str:
    cols = ["row", "edit success", "colour swaps", "shape swaps", "other object kept", "PSNR outside (dB)", "time vs plain"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r[c] for c in cols) + " |" for r in result["rows"]]
    m = result["mask"]
    lines += ["", f"DiffEdit mask vs the edited object's ground truth ({result['cases']} cases, colour swaps only): "
              f"mean IoU {m['mask IoU (colour swaps)']}, IoU >= 0.8 in {m['IoU >= 0.8']}; {m['mask cost']}."]
    if result.get("sega"):
        lines += ["", f"SEGA on txt2img ({result['sega_n']} two-object scenes, {result['steps']} steps, CFG 5, scale "
                  f"{SEGA['scale']:g}, warm-up {SEGA['warmup']}, threshold {SEGA['threshold']}): "
                  + "; ".join(f"{k} {v}" for k, v in result["sega"].items()) + "."]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=TITLE)
    p.add_argument("--per-split", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--json", default=None, help="write the rows and per-case records here")
    p.add_argument("--rows", action="append", help="only the rows whose name contains this text (repeatable)")
    p.add_argument("--sega", type=int, default=0, help="also measure SEGA add / remove on this many scenes")
    a = p.parse_args(argv)
    import comfy.utils
    comfy.utils.set_progress_bar_enabled(False)
    result = run(a.per_split, a.steps, rows=a.rows, sega=a.sega)
    print(table(result))
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
