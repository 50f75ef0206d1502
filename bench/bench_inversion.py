"""Inversion suite: model calls (NFE), wall time relative to plain sampling with the same steps on the
same model, and memory of the stored trajectory, per method.

Model: the tiny UNet at a 48x48 latent by default (about a minute, median of 5 interleaved repeats);
EDITKIT_BENCH_INVERSION=sd15 uses the full-size SD1.5 UNet architecture (random weights, host dtype, 32x32
latent, 3 steps; several minutes on a CPU, EDITKIT_BENCH_REPEATS=1 by default there).
Null-text inversion's iteration count needs a model whose null text can actually be fitted (random
weights cannot: their prediction hardly depends on the text), so its early-stopping row runs the paper's
50 steps x 10 iterations on the analytic denoiser of the tests (tests/ek_inversion_helpers.py).
"""
import os
import sys

import torch

from common import interleaved, sd15

MODEL = os.environ.get("EDITKIT_BENCH_INVERSION", "tiny")
REPEATS = int(os.environ.get("EDITKIT_BENCH_REPEATS", "1" if MODEL == "sd15" else "5"))
TITLE = "Inversion suite: NFE, time vs plain sampling (same steps, same model), trajectory memory"
HERE = os.path.dirname(os.path.abspath(__file__))


def _counted(model):
    import comfy.patcher_extension as pe
    counter = {"calls": 0, "rows": 0}

    def count(executor, x, *args, **kwargs):
        counter["calls"] += 1
        counter["rows"] += x.shape[0]
        return executor(x, *args, **kwargs)
    m = model.clone()
    m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "bench.count", count)
    return m, counter


def _plain(model, pos, neg, lat, sigmas, cfg):
    import comfy.samplers
    g = comfy.samplers.CFGGuider(model)
    g.set_conds(pos, neg if neg is not None else pos)    # at cfg 1 the negative is never evaluated
    g.set_cfg(cfg)
    noise = torch.randn(lat.shape, generator=torch.Generator().manual_seed(0))
    return g.sample(noise, torch.zeros_like(lat), comfy.samplers.sampler_object("euler"), sigmas.clone(), seed=0,
                    disable_pbar=True)


def _flow_clone(model):
    import comfy.model_sampling as cms

    class FlowSampling(cms.ModelSamplingDiscreteFlow, cms.CONST):
        pass
    ms = FlowSampling(model.model.model_config)
    ms.set_parameters(shift=3.0, multiplier=1000)
    m = model.clone()
    m.add_object_patch("model_sampling", ms)
    return m


def _models():
    from editkit.builtin_models import tiny
    from editkit.builtin_models.fullsize import sd15_conditioning
    if MODEL != "sd15":
        clip = tiny.tiny_clip()
        return (tiny.tiny_unet(tiny.EPS), tiny.encode(clip, "a red circle"), tiny.encode(clip, ""),
                tiny.encode(clip, "a blue square"), 48, 10, "tiny UNet, 48x48 latent, fp32, 10 steps")
    return (sd15(), sd15_conditioning(), sd15_conditioning(seed=1), sd15_conditioning(seed=2), 32, 3,
            "SD1.5 architecture, random weights, host dtype, 32x32 latent, 3 steps")


def run():
    from editkit.core import denoiser as D
    from editkit.samplers.inversion import invert
    from editkit.samplers.null_text import null_text_inversion
    from editkit.samplers.replay import make_edit_guider, replay
    model, pos, neg, tgt, hw, steps, label = _models()
    lat = torch.randn(1, 4, hw, hw, generator=torch.Generator().manual_seed(0))
    flow = _flow_clone(model)
    rows = []
    with torch.inference_mode():   # load the model once before timing anything
        _plain(model, pos, None, lat, D.schedule(model, "normal", 1), 1.0)

    def measure(name, m, work, baseline, goal, check, note="", inv_holder=None):
        cm, counter = _counted(m)
        cb, base_counter = _counted(m)
        result = {}

        def method():
            result["inv"] = work(cm)
        with torch.inference_mode():
            t = interleaved({"plain": lambda: baseline(cb), "method": method}, repeats=REPEATS, warmup=0)
        for c in (counter, base_counter):
            c["calls"] //= REPEATS
            c["rows"] //= REPEATS
        inv = result["inv"]
        ratio = t["method"] / t["plain"]
        nbytes = getattr(inv, "nbytes", None) if inv_holder is None else inv_holder(inv)
        rows.append({"method": name, "NFE (calls)": counter["calls"], "plain NFE": base_counter["calls"],
                     "batch rows": f"{counter['rows']} vs {base_counter['rows']}", "time ratio": f"{ratio:.2f}",
                     "goal": goal, "met": {True: "yes", False: "NO", None: "-"}[check(ratio, counter, base_counter)],
                     "trajectory": f"{nbytes / 1024:.1f} KiB" if nbytes else "-", "note": note})
        return inv

    sig = D.schedule(model, "normal", steps)
    fsig = D.schedule(flow, "simple", steps)

    def plain1(m):
        return _plain(m, pos, None, lat, sig, 1.0)

    def plain_cfg(m):
        return _plain(m, pos, neg, lat, sig, 5.0)

    within = lambda limit: (lambda r, c, b: r <= limit)   # noqa: E731
    measure("DDIM inversion (cfg 1)", model, lambda m: invert(m, lat, pos, None, 1.0, sig), plain1, "<= 1.1x", within(1.1))
    measure("DDIM inversion (cfg 5)", model, lambda m: invert(m, lat, pos, neg, 5.0, sig), plain_cfg, "<= 1.1x", within(1.1))
    measure("NPI inversion", model, lambda m: invert(m, lat, pos, None, 1.0, sig).with_changes(method="npi"), plain1,
            "<= 1.1x", within(1.1))
    measure("DDIM + 2 fixed-point iterations", model, lambda m: invert(m, lat, pos, None, 1.0, sig, fixed_point=2),
            plain1, "~3x (1 + k)", within(3.3), "accuracy for cost")
    measure("EDICT inversion (cfg 1)", model, lambda m: invert(m, lat, pos, None, 1.0, sig, "edict"), plain1,
            "<= 2.1x", within(2.1))
    measure("DDPM inversion (cfg 1)", model, lambda m: invert(m, lat, pos, None, 1.0, sig, "ddpm"), plain1, "~1x", within(1.1))
    measure("RF-Inversion forward (flow schedule)", flow, lambda m: invert(m, lat, pos, None, 1.0, fsig, "rf", gamma=0.5,
            noise=torch.randn(lat.shape, generator=torch.Generator().manual_seed(1))),
            lambda m: _plain(m, pos, None, lat, fsig, 1.0), "~1x", within(1.1))

    # Editing: the dual-branch sampler vs plain sampling, and Direct Inversion vs the same sampler without it
    with torch.inference_mode():
        base_inv = invert(model, lat, pos, None, 1.0, sig)
    direct_inv = base_inv.with_changes(direct=True)

    def edit(inv, cfg=1.0):
        def go(m):
            g = make_edit_guider(m, inv, tgt, None, cfg)

            def program(gg, sigmas, extra_args, callback, noise, latent, disable_pbar):
                return replay(gg, inv, 0, extra_args["model_options"], output="source + target")
            return g.run(program, inv.sigmas, inv.batch_shape)
        return go

    measure("edit: source + target branches", model, edit(base_inv), plain1, "~2x rows, 1x calls",
            lambda r, c, b: c["calls"] == b["calls"], "one batched call per step", inv_holder=lambda _: base_inv.nbytes)
    measure("Direct Inversion edit", model, edit(direct_inv), edit(base_inv), "= same sampler without it",
            lambda r, c, b: c["calls"] == b["calls"] and c["rows"] == b["rows"] and r <= 1.1,
            "baseline here: the dual-branch edit without correction", inv_holder=lambda _: direct_inv.nbytes)

    # Null-text inversion: cost on this model (1 step x 3 iterations: each is a forward + backward pass) ...
    nsig = D.schedule(model, "normal", 1)
    measure("NTI (1 step x 3 it.) cost", model, lambda m: null_text_inversion(m, lat, pos, neg, 7.5, nsig, inner=3),
            lambda m: _plain(m, pos, neg, lat, nsig, 7.5), "(report)", lambda r, c, b: None,
            "vs plain cfg-7.5 sampling of 1 step; calls count forwards only")
    # ... and early stopping at the paper's settings on a model whose null text can be fitted
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
    from editkit.builtin_models import tiny
    from ek_inversion_helpers import analytic_model
    clip = tiny.tiny_clip()
    am = analytic_model(tiny.tiny_unet(tiny.EPS))
    apos, aneg = tiny.encode(clip, "a red circle on a white background"), tiny.encode(clip, "")
    alat = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    asig = D.schedule(am, "normal", 50)
    with torch.inference_mode():
        nti = null_text_inversion(am, alat, apos, aneg, 7.5, asig)
    used, budget = nti.stats["iterations_total"], nti.stats["iteration_budget"]
    rows.append({"method": "NTI early stopping (50 steps x 10 it., paper settings)", "NFE (calls)": nti.stats["nfe"],
                 "plain NFE": 50, "batch rows": "-", "time ratio": "-", "goal": "well under 500 iterations",
                 "met": "yes" if used <= 0.5 * budget else "NO", "trajectory": f"{nti.nbytes / 1024:.1f} KiB",
                 "note": f"{used}/{budget} iterations used (analytic denoiser, tests/ek_inversion_helpers.py)"})
    for r in rows:
        r["model"] = label if "analytic" not in r["note"] else "analytic denoiser, 8x8"
    return rows
