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
                             swap, with the DiffEdit mask in the inversion sampler.
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


ROWS = [("DiffEdit", lambda ctx, c, t, m: diffedit(ctx, c, t, m)),
        ("DiffEdit, unmasked", lambda ctx, c, t, m: diffedit(ctx, c, t, m, masked=False)),
        ("masked Direct Inv. + P2P", direct_p2p)]


def run(per_split: int = 8, steps: int = 20, progress=print) -> dict:
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
            mask = diffedit_mask(ctx, case, case.target_prompt)
            mask_times.append(time.perf_counter() - t)
            if case.kind == "colour":
                ious.append(scoring.mask_iou(mask[0], case.source.masks()[case.index]))
            for name, fn in ROWS:
                t = time.perf_counter()
                img = fn(ctx, case, case.target_prompt, mask)
                times[name].append(time.perf_counter() - t + mask_times[-1] * (name != ROWS[1][0]))
                s = case.score(img)
                records[name].append({"case": case.name, "kind": case.kind, **s.record()})
            if progress:
                progress(f"[{k + 1}/{len(cases)}] {case.name}: IoU {ious[-1] if case.kind == 'colour' else float('nan'):.2f} "
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
                "mask cost": f"{2 * MASK['n']} model evaluations, {sum(mask_times) / len(mask_times) / plain:.2f}x plain"}
    return {"title": TITLE, "cases": len(cases), "per_split": per_split, "steps": steps, "mask": mask_row,
            "rows": rows, "records": records}


def table(result: dict) -> str:
    cols = ["row", "edit success", "colour swaps", "shape swaps", "other object kept", "PSNR outside (dB)", "time vs plain"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r[c] for c in cols) + " |" for r in result["rows"]]
    m = result["mask"]
    lines += ["", f"DiffEdit mask vs the edited object's ground truth ({result['cases']} cases, colour swaps only): "
              f"mean IoU {m['mask IoU (colour swaps)']}, IoU >= 0.8 in {m['IoU >= 0.8']}; {m['mask cost']}."]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=TITLE)
    p.add_argument("--per-split", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--json", default=None, help="write the rows and per-case records here")
    a = p.parse_args(argv)
    result = run(a.per_split, a.steps)
    print(table(result))
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
