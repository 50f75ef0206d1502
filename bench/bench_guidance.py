"""Model calls and wall time of EditKitGuider configurations vs plain CFG at the same steps.

Counts come from an APPLY_MODEL wrapper (every call of either network, and the batch chunks =
branch evaluations in it); wall time is the median of interleaved repeats, as a ratio against
plain CFG (CFGGuider) in the same run. Tiny SD-style UNet (random weights), 32x32 latent.

The time goal of each configuration is "the work it needs and nothing more": within 15 % of the
time core guiders take for the same evaluations, measured in the same run: a 1-branch call
(CFGGuider at cfg 1), a 2-branch call (CFGGuider), a 3-branch batched call (core PerpNegGuider);
e.g. PAG should cost what a 3-branch batch costs, AutoGuidance and SAG what plain CFG plus one
1-branch call cost, the interval the mix of 1- and 2-branch steps it runs.
"""
import torch

from common import interleaved

TITLE = "Guidance composer: model calls and wall time vs plain CFG (tiny UNet, 32x32 latent, 12 euler steps)"
STEPS = 12


def run():
    import comfy.patcher_extension as PE
    import comfy.samplers
    from editkit.builtin_models import tiny
    from editkit.guidance import schedules as S, terms as T
    from editkit.guidance.guider import GuidanceGuider
    from editkit.nodes.guidance import resolve_sites

    clip = tiny.tiny_clip()
    pos, neg = tiny.encode(clip, "a red circle on a white background"), tiny.encode(clip, "blurry")
    calls = []

    def counted(m, tag):
        m = m.clone()

        def w(executor, *args, **kwargs):
            calls.append((tag, len(args[5].get("cond_or_uncond", []))))
            return executor(*args, **kwargs)
        m.add_wrapper_with_key(PE.WrappersMP.APPLY_MODEL, "bench.count", w)
        return m

    model = counted(tiny.tiny_unet(tiny.EPS, seed=0), "main")
    weak = counted(tiny.tiny_unet(tiny.EPS, seed=3), "weak")
    ms = model.get_model_object("model_sampling")
    sig = comfy.samplers.calculate_sigmas(ms, "normal", STEPS).cpu()
    lo, hi = 0.28, 5.42
    inside = sum(1 for s in sig[:-1] if lo < float(s) <= hi)
    interval = S.Schedule(S.INTERVAL, sigma_low=lo, sigma_high=hi)
    shape = (1, 4, 32, 32)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    lat = torch.zeros(shape)
    sampler = comfy.samplers.sampler_object("euler")

    def core():
        g = comfy.samplers.CFGGuider(model)
        g.set_conds(pos, neg)
        g.set_cfg(5.0)
        return g

    def core1():
        g = comfy.samplers.CFGGuider(model)
        g.set_conds(pos, neg)
        g.set_cfg(1.0)
        return g

    def core3():
        from comfy_extras.nodes_perpneg import Guider_PerpNeg
        g = Guider_PerpNeg(model)
        g.set_conds(pos, neg, tiny.encode(clip, ""))
        g.set_cfg(5.0, 1.0)
        return g

    def ek(terms):
        g = GuidanceGuider(model, terms, resolve_sites(model, terms, "bench"))
        g.set_conds(pos, neg)
        g.set_cfg(5.0)
        return g

    refs = {"ref1": core1, "ref3": core3}
    configs = {
        "plain CFG (CFGGuider)": (core, 1, 2, 0),
        "EditKitGuider, constant CFG": (lambda: ek(()), 1, 2, 0),
        f"guidance interval ({lo}, {hi}]": (lambda: ek((T.CFGTerm(interval),)), 1, (STEPS + inside) / STEPS, 0),
        "PAG (auto layers)": (lambda: ek((T.PAGTerm(),)), 1, 3, 0),
        "AutoGuidance (weak model)": (lambda: ek((T.AutoGuidanceTerm(weak_model=weak),)), 1, 2, 1),
        "SAG (auto layers)": (lambda: ek((T.SAGTerm(),)), 2, 3, 0),
        "stack: CFG ramp x interval + APG + PAG": (
            lambda: ek((T.CFGTerm(S.Schedule(S.LINEAR, 0.6, 1.2).then(interval)), T.APGTerm(), T.PAGTerm())),
            1, (2 * STEPS + inside) / STEPS, 0),
    }
    guiders = {name: cfg[0]() for name, cfg in configs.items()}
    guiders.update({name: fn() for name, fn in refs.items()})

    def sample(g):
        with torch.inference_mode():
            g.sample(noise, lat, sampler, sig, seed=0, disable_pbar=True)

    counts = {}
    for name, g in guiders.items():
        calls.clear()
        sample(g)
        counts[name] = list(calls)
    times = interleaved({name: (lambda g=g: sample(g)) for name, g in guiders.items()}, repeats=3)
    base = times["plain CFG (CFGGuider)"]
    t1, t2, t3 = times["ref1"], base, times["ref3"]
    out_frac = (STEPS - inside) / STEPS
    predicted = {
        "plain CFG (CFGGuider)": t2, "EditKitGuider, constant CFG": t2,
        f"guidance interval ({lo}, {hi}]": out_frac * t1 + (1 - out_frac) * t2,
        "PAG (auto layers)": t3, "AutoGuidance (weak model)": t2 + t1, "SAG (auto layers)": t2 + t1,
        "stack: CFG ramp x interval + APG + PAG": out_frac * t2 + (1 - out_frac) * t3,
    }
    rows = []
    for name, (_, main_per_step, branches_per_step, weak_per_step) in configs.items():
        c = counts[name]
        main_calls = sum(1 for t, _ in c if t == "main")
        weak_calls = sum(1 for t, _ in c if t == "weak")
        branches = sum(n for _, n in c)
        exp_branches = round(branches_per_step * STEPS) + weak_per_step * STEPS
        ratio = times[name] / base
        ok_calls = main_calls == main_per_step * STEPS and weak_calls == weak_per_step * STEPS and branches == exp_branches
        budget = predicted[name] / base * 1.15
        rows.append({"configuration": name, "model calls (main+weak)": f"{main_calls}+{weak_calls}",
                     "branch evals": branches, "evals vs plain": f"{branches / (2 * STEPS):.2f}",
                     "expected evals": exp_branches, "wall-time ratio": f"{ratio:.2f}",
                     "same work in core": f"{predicted[name] / base:.2f}", "goal": f"evals = expected, time <= {budget:.2f}",
                     "met": "yes" if ok_calls and ratio <= budget else "NO"})
    return rows
