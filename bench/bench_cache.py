"""Speed caches vs plain sampling, in the same run: EditKit DeepCache / ToDo / TGATE and ComfyUI's own
EasyCache, LazyCache and ToMe (TomePatchModel), at equal steps.

1. SD1.5 layout (random weights, host compute dtype for every arm, 32x32 latent = 256 px, cond+uncond
   batch): wall time of a BENCH_CACHE_FULL_STEPS-step (default 6) euler KSampler run per arm, a 1-step
   plain warm-up, then 2 interleaved rounds (median); reported as plain time / arm time.
2. Toy model, 20-step euler txt2img at 128 px, CFG 5: the prompts are cut into chunks and every chunk
   runs through every arm in rotated order (one 1-image warm-up run per arm first), so machine-load drift hits
   all arms alike; speed-up = plain total / arm total. Accuracy (toyworld/scoring.score_prompt) on
   held-out single objects and two-object scenes, with Wilson 95 % intervals.

`.venv/bin/python bench/run.py cache` (env BENCH_CACHE_N = prompts per toy split, default 16;
BENCH_CACHE_FULL=0 skips the full-size part). EditKit Block Cache (DiTs) is not here: there is no
trained DiT toy model and a full-size SD3/Flux layout does not fit this host's budget.
"""
import os
import time

import torch

from common import interleaved, sd15

TITLE = "Speed caches: speed-up at equal steps vs plain (same run), toy accuracy"
SLOW = True   # several minutes on the shared 2-core host


def arms():
    """{name: fn(model) -> patched clone}. Node defaults (paper settings) unless a variant says otherwise."""
    from comfy_extras.nodes_easycache import EasyCacheNode, LazyCacheNode
    from comfy_extras.nodes_tomesd import TomePatchModel
    from editkit.nodes.cache import DeepCache, TGateNode, ToDoNode

    def out(r):
        r = r.result if hasattr(r, "result") else r
        return r[0]

    def tome(m, ratio=0.3):
        return out(TomePatchModel.execute(m, ratio))

    return {
        "plain": lambda m: m,
        "EditKit DeepCache N=3": lambda m: out(DeepCache.execute(m, 3, 0, "uniform", 0.0, 1.0)),
        "EditKit DeepCache N=5": lambda m: out(DeepCache.execute(m, 5, 0, "uniform", 0.0, 1.0)),
        "EditKit DeepCache N=3 non-uniform": lambda m: out(DeepCache.execute(m, 3, 0, "non-uniform", 0.0, 1.0)),
        "EditKit ToDo x2": lambda m: out(ToDoNode.execute(m, 2, 1, "nearest")),
        "EditKit TGATE gate 40%": None,   # gate step set per run length below
        "core EasyCache (defaults)": lambda m: out(EasyCacheNode.execute(m, 0.2, 0.15, 0.95, False)),
        "core LazyCache (defaults)": lambda m: out(LazyCacheNode.execute(m, 0.2, 0.15, 0.95, False)),
        "core ToMe ratio 0.3": tome,
    }


def _tgate(steps):
    from editkit.nodes.cache import TGateNode
    return lambda m: (lambda r: (r.result if hasattr(r, "result") else r)[0])(TGateNode.execute(m, max(1, round(0.4 * steps)), True))


def _make(steps):
    a = arms()
    a["EditKit TGATE gate 40%"] = _tgate(steps)
    return a


def fullsize_rows(steps=10, size=32, repeats=2):
    import nodes
    from editkit.builtin_models.fullsize import sd15_conditioning
    base = sd15()
    cond, neg = sd15_conditioning(), sd15_conditioning(seed=1)
    lat = {"samples": torch.zeros(1, 4, size, size)}
    models = {k: f(base) for k, f in _make(steps).items()}

    def run(m):
        return lambda: nodes.common_ksampler(m, 1, steps, 7.5, "euler", "normal", cond, neg, lat, disable_noise=False)

    with torch.inference_mode():   # warm-up: one 1-step plain run (one-time costs outside the timing)
        nodes.common_ksampler(base, 1, 1, 7.5, "euler", "normal", cond, neg, lat, disable_noise=False)
        t = interleaved({k: run(m) for k, m in models.items()}, repeats=repeats, warmup=0)
    return {k: t["plain"] / v for k, v in t.items()}


def toy_rows(n=16, steps=20, chunk=8):
    from editkit.builtin_models import toy
    from editkit.toyworld import evaluate, scoring, world
    model, clip, vae = toy.load_toy_cached()[:3]
    held = [world.sample_scene(1000 + i, split="heldout") for i in range(n)]
    two = [world.sample_scene(2000 + i, n_objects=2) for i in range(n)]
    scenes = held + two
    prompts, seeds = [s.caption for s in scenes], [s.seed for s in scenes]
    models = {name: fn(model.clone()) for name, fn in _make(steps).items()}
    names = list(models)
    secs = {k: 0.0 for k in names}
    imgs = {k: [None] * len(scenes) for k in names}
    with torch.inference_mode():
        for k in names:          # warm-up: one-time costs (patch setup, allocator) paid outside the timing
            evaluate.txt2img(models[k], clip, vae, prompts[:1], seeds[:1], steps=steps, cfg=5.0)
        for ci, i in enumerate(range(0, len(scenes), chunk)):
            order = names[ci % len(names):] + names[:ci % len(names)]
            for k in order:
                t = time.perf_counter()
                out = evaluate.txt2img(models[k], clip, vae, prompts[i:i + chunk], seeds[i:i + chunk], steps=steps,
                                       cfg=5.0, batch=chunk)
                secs[k] += time.perf_counter() - t
                imgs[k][i:i + chunk] = list(out)
    res = {}
    for k in names:
        ok = [scoring.score_prompt(img.numpy(), s).ok for img, s in zip(imgs[k], scenes)]
        res[k] = (secs[k], scoring.rate(ok[:n]), scoring.rate(ok[n:]))
    return res


def run():
    n = int(os.environ.get("BENCH_CACHE_N", "16"))
    full_steps = int(os.environ.get("BENCH_CACHE_FULL_STEPS", "6"))
    toyr = toy_rows(n)
    for k, (secs, held, two) in toyr.items():    # printed now: the full-size part takes long on a shared host
        print(f"toy: {k}: {secs:.1f} s ({toyr['plain'][0] / secs:.2f}x), held-out {held}, two-object {two}", flush=True)
    full = fullsize_rows(full_steps) if os.environ.get("BENCH_CACHE_FULL", "1") != "0" else {}
    plain_t = toyr["plain"][0]
    rows = []
    for name, (secs, held, two) in toyr.items():
        rows.append({"arm": name,
                     f"SD1.5 layout speed-up ({full_steps} steps)": f"{full[name]:.2f}x" if name in full else "not run",
                     "toy speed-up (20 steps)": f"{plain_t / secs:.2f}x",
                     "toy held-out accuracy": str(held), "toy two-object accuracy": str(two)})
    return rows
