"""Local editing on the toy world (issue 14): DiffEdit's mask against the ground truth, and local edits of
two-object scenes (one object edited, the other must stay).

    .venv/bin/python bench/quality_local.py --per-split 8          # a quick table
    .venv/bin/python bench/quality_local.py --per-split 8 --json out/local.json

Cases: toyworld.editbench.edit_cases(per_split, n_objects=2). Scores: toyworld.scoring only: the mask's IoU
with the edited object's ground-truth mask (`scoring.mask_iou`, colour swaps: the object keeps its footprint),
edit success / the untouched object kept / PSNR outside the edited object (`case.score`), rates with Wilson
intervals (`scoring.rate`). Time: the rows' mean per-case time over the mean of one plain 20-step txt2img run
before each case (so the unit follows the host's load through the run); model evaluations: latent rows through the
UNet per edit (RowCounter).

Rows (settings = the shipped "Editing - DiffEdit" workflow's, at the benchmark's 20 steps):
  DiffEdit                   DiffEdit mask (n 10, ratio 0.5, threshold 0.5) + DDIM inversion to the ratio +
                             masked decoding, CFG 5;
  DiffEdit, unmasked         the same inversion and replay without the mask (what the mask buys);
  masked Direct Inv. + P2P   DDIM inversion of the whole schedule + Direct Inversion + Prompt-to-Prompt word
                             swap, with the DiffEdit mask in the inversion sampler;
  DiffEdit + RePaint         the DiffEdit row with EditKitRePaint between the sampler and SamplerCustomAdvanced
                             (the shipped workflow's jump length 10, resamples 3);
  DDPM inversion, prompt swap  edit-friendly DDPM inversion (20 steps, skip 4, CFG 3.5 with an empty negative)
                             replayed with the target caption (CFG 3.5): LEDITS++'s inversion without edit terms;
  LEDITS++                   the same inversion + EditKitLEDITS removing the source object and adding the target
                             one in one pass, written as the shipped workflow writes them ("- a red circle [circle]",
                             "+ a blue circle [circle]"; scale 5, threshold 0.9, implicit masks "intersect");
  LEDITS++, no implicit masks  the same at threshold 0 (every mask is the whole image): the edit terms alone,
                             to tell the masks' share of the result from the guidance's.

Two edits in one pass (`--double N`, toyworld.editbench.double_edit_cases, scored by scoring.score_edits):
object 0's colour and object 1's shape, four LEDITS++ edit lines (a remove and an add per object).
LEDITS++ rows also report their implicit masks: area (union over the edited steps) and the share of the
mask's weight on the edited object's ground truth (the diagnostic of the README's LEDITS++ note).

`--directions` prints only the LEDITS++ diagnostic (direction_shares: where the concept terms' and the caption
swap's guidance falls relative to the edited object). `--rows LEDITS` runs only the rows whose name contains the text (the mask is still made and scored when a
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


def _sample(ctx, model, inv, target_prompt, mask, repaint=None, cfg=CFG):
    noise, guider, sampler, sigmas, lat = call("EditKitInversionSampler", model=model, inversion=inv,
                                               positive=ctx.encode(target_prompt), negative=ctx.encode(""),
                                               cfg=cfg, output="target", mask=mask)
    if repaint:
        sampler = call("EditKitRePaint", sampler=sampler, **repaint)[0]
    out = call("SamplerCustomAdvanced", noise=noise, guider=guider, sampler=sampler, sigmas=sigmas, latent_image=lat)[0]
    return ctx.decode(out["samples"][-1:])


def diffedit(ctx, case, target_prompt, mask, masked=True, repaint=None):
    import comfy.samplers
    lat = {"samples": ctx.latent(case.source_image())}
    sig = comfy.samplers.calculate_sigmas(ctx.model.get_model_object("model_sampling"), "normal", ctx.steps).cpu()
    low = sig[-(round(ctx.steps * MASK["encode_ratio"]) + 1):]
    inv = call("EditKitInvert", model=ctx.model, latent=lat, positive=ctx.encode(case.source_prompt), cfg=1.0,
               steps=ctx.steps, scheduler="normal", fixed_point_iterations=0, sigmas=low)[1]
    return _sample(ctx, ctx.model, inv, target_prompt, mask if masked else None, repaint)


def direct_p2p(ctx, case, target_prompt, mask):
    lat = {"samples": ctx.latent(case.source_image())}
    inv = call("EditKitInvert", model=ctx.model, latent=lat, positive=ctx.encode(case.source_prompt), cfg=1.0,
               steps=ctx.steps, scheduler="normal", fixed_point_iterations=0)[1]
    inv = call("EditKitDirectInversion", inversion=inv)[0]
    model = call("EditKitPromptToPrompt", model=ctx.model, clip=ctx.clip, source_prompt=case.source_prompt,
                 target_prompt=target_prompt, mode="auto")[0]
    return _sample(ctx, model, inv, target_prompt, mask)


LEDITS = {"skip": 4, "cfg": 3.5, "scale": 5.0, "threshold": 0.9, "warmup": 0, "masks": "intersect"}
REPAINT = {"jump_length": 10, "resamples": 3, "seed": 0}      # the shipped "DiffEdit + RePaint" workflow


def ddpm_inversion(ctx, case):
    """LEDITS++'s inversion of the case's source (made once per case; its time is added to every row using it,
    so each row's time is the cost of one edit from scratch)."""
    def invert():
        t = time.perf_counter()
        lat = {"samples": ctx.latent(case.source_image())}
        inv = call("EditKitDDPMInversion", model=ctx.model, latent=lat, positive=ctx.encode(case.source_prompt),
                   negative=ctx.encode(""), cfg=LEDITS["cfg"], steps=ctx.steps, scheduler="normal",
                   skip=LEDITS["skip"], seed=0)[1]
        ctx.extra_seconds = time.perf_counter() - t
        return inv
    return ctx.memo(("ddpm", case.name), invert)


def ledits_edits(pairs) -> str:
    """The edit lines of (old object, new object) pairs, as the shipped workflow writes them."""
    return "\n".join(f"- a {a.phrase} [{a.shape}]\n+ a {b.phrase} [{b.shape}]" for a, b in pairs)


def ledits_run(ctx, case, pairs, threshold=None):
    inv = ddpm_inversion(ctx, case)
    out, masks = call("EditKitLEDITS", model=ctx.model, clip=ctx.clip, inversion=inv, edits=ledits_edits(pairs),
                      scale=LEDITS["scale"], threshold=LEDITS["threshold"] if threshold is None else threshold,
                      warmup=LEDITS["warmup"], masks=LEDITS["masks"], output="target")[:2]
    ctx.last_masks = masks
    return ctx.decode(out["samples"][-1:])


def ledits(ctx, case, target_prompt, mask, threshold=None):
    return ledits_run(ctx, case, [(case.source.objects[case.index], case.target.objects[case.index])], threshold)


def ddpm_swap(ctx, case, target_prompt, mask):
    return _sample(ctx, ctx.model, ddpm_inversion(ctx, case), target_prompt, None, cfg=LEDITS["cfg"])


def mask_diagnostic(masks, gts) -> list:
    """Per edit: (area of the union over the edited steps, share of the mask's weight on the ground truth) of its
    implicit mask (the node's step-averaged output) against its object's ground-truth mask."""
    out = []
    for m, gt in zip(masks, gts):
        m = m.float().numpy()
        out.append((float((m > 0).mean()), float((m * gt).sum() / max(m.sum(), 1e-12))))
    return out


def _mean_diag(diags) -> dict:
    flat = [d for ds in diags for d in ds]
    return {"mask area": f"{100 * sum(a for a, _ in flat) / max(len(flat), 1):.1f} %",
            "mask on object": f"{100 * sum(w for _, w in flat) / max(len(flat), 1):.0f} %"}


ROWS = [("DiffEdit", lambda ctx, c, t, m: diffedit(ctx, c, t, m)),
        ("DiffEdit, unmasked", lambda ctx, c, t, m: diffedit(ctx, c, t, m, masked=False)),
        ("DiffEdit + RePaint", lambda ctx, c, t, m: diffedit(ctx, c, t, m, repaint=REPAINT)),
        ("masked Direct Inv. + P2P", direct_p2p),
        ("DDPM inversion, prompt swap", ddpm_swap),
        ("LEDITS++", ledits),
        ("LEDITS++, no implicit masks", lambda ctx, c, t, m: ledits(ctx, c, t, m, threshold=0.0))]
USES_MASK = ("DiffEdit", "DiffEdit + RePaint", "masked Direct Inv. + P2P")
DDPM_ROWS = ("DDPM inversion, prompt swap", "LEDITS++", "LEDITS++, no implicit masks")


def editbench_rows_of_inversion(steps: int) -> int:
    """Model evaluations of the DDPM inversion at CFG != 1: cond + uncond at each of its steps."""
    return 2 * steps


def double_rates(ctx, n: int, plain: float, progress=print) -> dict:
    """LEDITS++ with two edits in one pass (object 0's colour, object 1's shape): both, each edit, the implicit
    masks; per-case records."""
    recs, times, diags, evals = [], [], [], []
    plains = []
    for k, case in enumerate(editbench.double_edit_cases(n)):
        plains.append(editbench.plain_time(ctx, repeats=1, warmup=False))
        ctx.counter.rows = 0
        t = time.perf_counter()
        img = ledits_run(ctx, case, [(case.source.objects[i], case.target.objects[i]) for i in case.indices])
        times.append(time.perf_counter() - t)
        evals.append(ctx.counter.rows)
        ctx.forget()
        s = case.score(img)
        diags.append(mask_diagnostic(ctx.last_masks, [case.source.masks()[i] for i in case.indices for _ in (0, 1)]))
        recs.append({"case": case.name, **s.record(), "colour_ok": s.edited_ok[0], "shape_ok": s.edited_ok[1]})
        if progress:
            progress(f"two edits [{k + 1}/{n}] {case.name}: {'ok' if s.ok else s.why}")
    psnrs = [r["preserve_psnr"] for r in recs if r["preserve_psnr"] is not None]
    return {"n": n, "both": str(scoring.rate([r["success"] for r in recs])),
            "colour edit": str(scoring.rate([r["colour_ok"] for r in recs])),
            "shape edit": str(scoring.rate([r["shape_ok"] for r in recs])),
            "PSNR outside (dB)": f"{sum(psnrs) / max(len(psnrs), 1):.2f}",
            "model evaluations": f"{sum(evals) / len(evals):.0f}",
            "time vs plain": f"{sum(times) / sum(plains):.2f}x", **_mean_diag(diags), "records": recs}


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


def direction_shares(ctx, cases, levels=(4, 8, 12)) -> dict:
    """Why LEDITS++ misses on the toy model: at the DDPM inversion's own latents of the colour swaps, the share of
    each guidance direction's magnitude (|d_a - d_b| summed over channels) that falls on the edited object's
    ground truth (pooled to the latent grid), next to the object's share of the latent: a direction aimed at the
    object puts much more than its area there. Directions: '+ a <new object>' and '- a <old object>' (LEDITS++'s
    concept terms, d_concept - d_uncond) and the caption swap (d_target caption - d_source caption)."""
    import torch.nn.functional as F
    from editkit.core import denoiser as D
    out = {"object area": [], **{f"{k} @ step {s}": [] for s in levels for k in ("+ concept", "- concept", "caption swap")}}
    for case in cases:
        if case.kind != "colour":
            continue
        inv = ddpm_inversion(ctx, case)
        src, tgt = case.source.objects[case.index], case.target.objects[case.index]
        gt = torch.from_numpy(case.source.masks()[case.index]).float()[None, None]
        g = F.adaptive_avg_pool2d(gt, tuple(inv.latents[0].shape[-2:]))[0, 0]
        out["object area"].append(float(g.mean()))
        for k in levels:
            x, s = inv.latents[k].float(), float(inv.sigmas[k])
            x0 = {p: D.predict_x0(ctx.model, x, s, ctx.encode(p))
                  for p in ("", f"a {tgt.phrase}", f"a {src.phrase}", case.source_prompt, case.target_prompt)}

            def share(a, b):
                m = ((x0[b] - x0[a]) / s).abs().sum(1)[0]
                return float((m * g).sum() / m.sum())
            out[f"+ concept @ step {k}"].append(share(f"a {tgt.phrase}", ""))
            out[f"- concept @ step {k}"].append(share(f"a {src.phrase}", ""))
            out[f"caption swap @ step {k}"].append(share(case.target_prompt, case.source_prompt))
        ctx.forget()
    return {k: f"{100 * sum(v) / max(len(v), 1):.0f} %" for k, v in out.items()} | {"n": len(out["object area"])}


class RowCounter:
    """Model evaluations: the latent rows through the diffusion model (a forward pre-hook; a batched call of
    8 branches counts 8), so batched and sequential methods compare."""

    def __init__(self, model):
        self.rows = 0
        self.handle = model.model.diffusion_model.register_forward_pre_hook(self)

    def __call__(self, module, args):
        if args:
            self.rows += int(args[0].shape[0])


def run(per_split: int = 8, steps: int = 20, progress=print, rows=None, sega: int = 0, double: int = 0) -> dict:
    global ROWS
    if rows:
        ROWS = [r for r in ROWS if any(w.lower() in r[0].lower() for w in rows)]
    needs_mask = any(name in USES_MASK or name.startswith("DiffEdit") for name, _ in ROWS)
    model, clip, vae = toy.load_toy()
    ctx = editbench.EditContext(model, clip, vae, steps=steps, cfg=CFG)
    counter = ctx.counter = RowCounter(model)
    cases = editbench.edit_cases(per_split=per_split, n_objects=2)
    with torch.inference_mode():
        counter.rows = 0
        plain = editbench.plain_time(ctx)
        plain_rows = 2 * steps                  # one CFG txt2img: cond + uncond per step
        ious, mask_times, mask_rows = [], [], []
        records = {name: [] for name, _ in ROWS}
        times = {name: [] for name, _ in ROWS}
        evals = {name: [] for name, _ in ROWS}
        diags = {name: [] for name, _ in ROWS}
        plains = []              # one plain txt2img per case, between the rows: the time column's unit follows the load
        for k, case in enumerate(cases):
            plains.append(editbench.plain_time(ctx, repeats=1, warmup=False))
            t, counter.rows = time.perf_counter(), 0
            mask = diffedit_mask(ctx, case, case.target_prompt) if needs_mask else None
            mask_times.append(time.perf_counter() - t)
            mask_rows.append(counter.rows)
            if case.kind == "colour" and mask is not None:
                ious.append(scoring.mask_iou(mask[0], case.source.masks()[case.index]))
            inversion = None          # (seconds, rows) of the case's DDPM inversion, shared by the DDPM rows
            for name, fn in ROWS:
                ctx.extra_seconds, counter.rows = 0.0, 0
                t = time.perf_counter()
                misses = ctx.misses
                img = fn(ctx, case, case.target_prompt, mask)
                seconds, n = time.perf_counter() - t, counter.rows
                if ctx.misses > misses:              # this row made the DDPM inversion: remember its cost
                    inversion = (ctx.extra_seconds, editbench_rows_of_inversion(steps))
                elif ctx.extra_seconds == 0.0 and name in DDPM_ROWS and inversion is not None:
                    seconds, n = seconds + inversion[0], n + inversion[1]
                if name in USES_MASK:
                    seconds, n = seconds + mask_times[-1], n + mask_rows[-1]
                times[name].append(seconds)
                evals[name].append(n)
                s = case.score(img)
                records[name].append({"case": case.name, "kind": case.kind, **s.record()})
                if name.startswith("LEDITS"):
                    diags[name].append(mask_diagnostic(ctx.last_masks, [case.source.masks()[case.index]] * 2))
            ctx.forget()
            if progress:
                progress(f"[{k + 1}/{len(cases)}] {case.name}: IoU {ious[-1] if case.kind == 'colour' and ious else float('nan'):.2f} "
                         + " ".join(f"{n}={'ok' if records[n][-1]['success'] else 'x'}" for n, _ in ROWS))
        plain = sum(plains) / max(len(plains), 1) if plains else plain
        double_row = double_rates(ctx, double, plain, progress=progress) if double else None
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
                     "model evaluations": f"{sum(evals[name]) / len(evals[name]):.0f} ({sum(evals[name]) / len(evals[name]) / plain_rows:.2f}x)",
                     "time vs plain": f"{sum(times[name]) / len(times[name]) / plain:.2f}x",
                     **(_mean_diag(diags[name]) if diags[name] else {})})
    mask_row = {"mask IoU (colour swaps)": f"{sum(ious) / max(len(ious), 1):.3f}",
                "IoU >= 0.8": str(scoring.rate([i >= 0.8 for i in ious])),
                "mask cost": (f"{sum(mask_rows) / len(mask_rows):.0f} model evaluations, "
                              f"{sum(mask_times) / len(mask_times) / plain:.2f}x plain" if needs_mask else "not run")}
    with torch.inference_mode():
        sega_row = sega_rates(ctx, sega, progress=progress) if sega else None
    counter.handle.remove()
    return {"title": TITLE, "cases": len(cases), "per_split": per_split, "steps": steps, "plain_rows": plain_rows,
            "mask": mask_row, "rows": rows, "records": records, "sega": sega_row, "sega_n": sega, "double": double_row}


def table(result: dict) -> str:
    cols = ["row", "edit success", "colour swaps", "shape swaps", "other object kept", "PSNR outside (dB)",
            "model evaluations", "time vs plain"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r[c] for c in cols) + " |" for r in result["rows"]]
    m = result["mask"]
    lines += ["", f"DiffEdit mask vs the edited object's ground truth ({result['cases']} cases, colour swaps only): "
              f"mean IoU {m['mask IoU (colour swaps)']}, IoU >= 0.8 in {m['IoU >= 0.8']}; {m['mask cost']}."]
    led = [r for r in result["rows"] if "mask area" in r]
    if led:
        lines += ["", "LEDITS++ implicit masks (per edit, union over the edited steps): " + "; ".join(
            f"{r['row']}: area {r['mask area']} of the image, {r['mask on object']} of the mask's weight on the edited "
            "object" for r in led) + "."]
    d = result.get("double")
    if d:
        lines += ["", f"LEDITS++, two edits in one pass ({d['n']} two-object scenes: object 1's colour and object 2's "
                  f"shape, four edit lines): both {d['both']}, colour edit {d['colour edit']}, shape edit "
                  f"{d['shape edit']}; PSNR outside {d['PSNR outside (dB)']} dB; {d['model evaluations']} model evaluations, "
                  f"{d['time vs plain']} plain; implicit "
                  f"masks: area {d['mask area']}, {d['mask on object']} on the edited object."]
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
    p.add_argument("--double", type=int, default=0, help="also measure LEDITS++ with two edits on this many scenes")
    p.add_argument("--directions", action="store_true",
                   help="only the LEDITS++ diagnostic: where each guidance direction's magnitude falls (colour swaps)")
    a = p.parse_args(argv)
    import comfy.utils
    comfy.utils.set_progress_bar_enabled(False)
    if a.directions:
        model, clip, vae = toy.load_toy()
        ctx = editbench.EditContext(model, clip, vae, steps=a.steps, cfg=CFG)
        with torch.inference_mode():
            shares = direction_shares(ctx, editbench.edit_cases(per_split=a.per_split, n_objects=2))
        print(f"Share of each direction's magnitude on the edited object ({shares.pop('n')} colour swaps): "
              + "; ".join(f"{k} {v}" for k, v in shares.items()))
        return
    result = run(a.per_split, a.steps, rows=a.rows, sega=a.sega, double=a.double)
    print(table(result))
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
