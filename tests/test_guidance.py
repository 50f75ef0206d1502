"""Guidance composer: bit-for-bit CFG, skipped uncond passes, each term against its formula on
recorded predictions, layers perturbed exactly where chosen (UNet and Flux), composition with
core and EditKit patches, CFG++ samplers, the KSampler schedule patch, nodes and errors."""
import math

import pytest
import torch

import comfy.patcher_extension as PE
import comfy.samplers

from editkit.core import patches as P
from editkit.core.introspect import attention_layout
from editkit.guidance import schedules as S, terms as T
from editkit.nodes import guidance as N
from ek_helpers import flow_cond, node_out, sample_ksampler

STEPS = 6


def _noise(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def sigmas(model, steps=STEPS, scheduler="normal"):
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).cpu()


def ek_guider(model, pos, neg, terms=(), cfg=5.0):
    return node_out(N.Guider.execute(model, pos, neg, cfg, tuple(terms)))[0]


def core_guider(model, pos, neg, cfg=5.0):
    g = comfy.samplers.CFGGuider(model)
    g.set_conds(pos, neg)
    g.set_cfg(cfg)
    return g


def run(guider, shape=(1, 4, 8, 8), sampler="euler", steps=STEPS, seed=0, callback=None, sig=None):
    model = guider.model_patcher
    sig = sigmas(model, steps) if sig is None else sig
    smp = sampler if not isinstance(sampler, str) else comfy.samplers.sampler_object(sampler)
    return guider.sample(_noise(shape, seed), torch.zeros(shape), smp, sig, callback=callback, seed=seed)


def counting(model, key="test.count"):
    """A clone whose every model call is recorded as the tuple of its batch chunks (cond_or_uncond)."""
    calls = []
    m = model.clone()

    def wrapper(executor, *args, **kwargs):
        to = args[5] if len(args) > 5 else kwargs.get("transformer_options", {})
        calls.append(tuple(to.get("cond_or_uncond", [])))
        return executor(*args, **kwargs)
    m.add_wrapper_with_key(PE.WrappersMP.APPLY_MODEL, key, wrapper)
    return m, calls


def recording(model):
    """A clone recording every calc_cond_batch: (x, sigma, outputs)."""
    rec = []
    m = model.clone()

    def wrapper(executor, mdl, conds, x, timestep, model_options):
        out = executor(mdl, conds, x, timestep, model_options)
        rec.append((x.clone(), timestep.clone(), [o.clone() for o in out]))
        return out
    m.add_wrapper_with_key(PE.WrappersMP.CALC_COND_BATCH, "test.record", wrapper)
    return m, rec


def denoised_trace():
    seen = []

    def cb(i, denoised, x, total):
        seen.append(denoised.clone())
    return seen, cb


@pytest.fixture(scope="module")
def prompts(encode):
    return encode("a red circle on a white background"), encode("blurry, dark")


@pytest.fixture(scope="module")
def encode(tiny_clip):
    from editkit.builtin_models import tiny
    return lambda text: tiny.encode(tiny_clip, text)


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------

def test_schedule_shapes():
    sig = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5, 0.0])
    w = lambda s: S.weights_over(s, sig)  # noqa: E731
    assert w(S.Schedule()) == [1.0] * 5
    assert w(S.Schedule(S.LINEAR, 0.0, 1.0)) == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])
    cos = w(S.Schedule(S.COSINE, 0.0, 2.0))
    assert cos[0] == 0 and cos[-1] == pytest.approx(2.0) and cos[2] == pytest.approx(1.0)
    assert w(S.Schedule(S.STEP, 2.0, start_percent=0.25, end_percent=0.5)) == [0, 2.0, 2.0, 0, 0]
    assert w(S.Schedule(S.EARLY, 1.0, end_percent=0.5)) == [1, 1, 0, 0, 0]
    assert w(S.Schedule(S.INTERVAL, 1.0, sigma_low=1.0, sigma_high=5.0)) == [0, 1, 1, 0, 0]
    # composition multiplies; sigma position is log-sigma between first and last nonzero sigma
    both = S.Schedule(S.LINEAR, 0.0, 1.0).then(S.Schedule(S.INTERVAL, sigma_low=1.0, sigma_high=5.0))
    assert w(both) == pytest.approx([0, 0.25, 0.5, 0, 0])
    pos = [S.step_info(sig, s).sigma_pos for s in sig[:-1]]
    assert pos[0] == 0 and pos[-1] == 1 and pos[2] == pytest.approx(math.log(5) / math.log(20))
    # a sigma between grid points (second-order samplers) gets a fractional progress
    assert 0.25 < S.step_info(sig, 3.0).progress < 0.5


# ---------------------------------------------------------------------------------------------
# Bit for bit, skipped passes
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_constant_cfg_is_cfgguider_bit_for_bit(tiny_eps, prompts, sampler):
    pos, neg = prompts
    ref = run(core_guider(tiny_eps, pos, neg), sampler=sampler)
    assert torch.equal(run(ek_guider(tiny_eps, pos, neg), sampler=sampler), ref)
    assert torch.equal(run(ek_guider(tiny_eps, pos, neg, [T.CFGTerm(S.Schedule())]), sampler=sampler), ref)


def test_constant_cfg_bit_for_bit_flux(tiny_flux):
    pos, neg = flow_cond(seed=0), flow_cond(seed=1)
    shape = (1, 16, 8, 8)
    ref = run(core_guider(tiny_flux, pos, neg, 3.0), shape, steps=3)
    assert torch.equal(run(ek_guider(tiny_flux, pos, neg, [T.CFGTerm()], 3.0), shape, steps=3), ref)


def test_interval_outside_is_cond_only_without_uncond_calls(tiny_eps, prompts):
    pos, neg = prompts
    m, calls = counting(tiny_eps)
    never = T.CFGTerm(S.Schedule(S.INTERVAL, sigma_low=100.0, sigma_high=200.0))
    out = run(ek_guider(m, pos, neg, [never]))
    cond_only = run(core_guider(tiny_eps, pos, neg, 1.0))
    assert torch.equal(out, cond_only)
    assert calls == [(0,)] * STEPS


def test_interval_skips_in_proportion(tiny_eps, prompts):
    pos, neg = prompts
    m, calls = counting(tiny_eps)
    sig = sigmas(tiny_eps)
    lo, hi = 1.0, 5.0
    inside = sum(1 for s in sig[:-1] if lo < float(s) <= hi)
    assert 0 < inside < STEPS
    g = ek_guider(m, pos, neg, [T.CFGTerm(S.Schedule(S.INTERVAL, sigma_low=lo, sigma_high=hi))])
    run(g)
    assert len(calls) == STEPS and sum(len(c) for c in calls) == STEPS + inside
    assert [len(s["branches"]) for s in g.stats] == [2 if lo < float(s) <= hi else 1 for s in sig[:-1]]


# ---------------------------------------------------------------------------------------------
# Terms against their formulas on recorded predictions
# ---------------------------------------------------------------------------------------------

def _recorded(model, pos, neg, terms, cfg=5.0, steps=STEPS):
    m, rec = recording(model)
    seen, cb = denoised_trace()
    run(ek_guider(m, pos, neg, terms, cfg), callback=cb, steps=steps)
    assert len(rec) == len(seen) == steps
    return rec, seen


def test_rescale_matches_formula_and_core_rescalecfg(tiny_eps, prompts, comfy_nodes):
    pos, neg = prompts
    phi, w = 0.7, 6.0
    rec, seen = _recorded(tiny_eps, pos, neg, [T.RescaleTerm(phi=phi)], w)
    for (x, sigma, (c, u)), got in zip(rec, seen):
        s = sigma.view(-1, 1, 1, 1)
        xs = x / (s * s + 1.0)
        vc = (xs - c) * (s * s + 1.0) ** 0.5 / s
        vu = (xs - u) * (s * s + 1.0) ** 0.5 / s
        vcfg = vu + w * (vc - vu)
        vfin = phi * vcfg * (vc.std() / vcfg.std()) + (1 - phi) * vcfg
        torch.testing.assert_close(got, xs - vfin * s / (s * s + 1.0) ** 0.5, atol=1e-4, rtol=1e-4)
    core = comfy_nodes.NODE_CLASS_MAPPINGS["RescaleCFG"]().patch(tiny_eps, phi)[0]
    torch.testing.assert_close(run(ek_guider(tiny_eps, pos, neg, [T.RescaleTerm(phi=phi)], w)),
                               run(core_guider(core, pos, neg, w)), atol=1e-4, rtol=1e-4)


def test_apg_with_momentum_matches_paper_algorithm(tiny_eps, prompts):
    pos, neg = prompts
    w, eta, r, beta = 7.0, 0.2, 0.012, -0.5
    rec, seen = _recorded(tiny_eps, pos, neg, [T.APGTerm(eta=eta, norm_threshold=r, momentum=beta)], w)
    running = None
    clipped = 0
    for (x, sigma, (c, u)), got in zip(rec, seen):
        diff = (c - u).double()
        running = diff if running is None else beta * running + diff
        diff = running
        norm = diff.flatten().norm()
        clipped += int(norm > r)
        diff = diff * min(1.0, r / float(norm))
        unit = c.double().flatten() / c.double().flatten().norm()
        par = (diff.flatten() @ unit) * unit
        upd = (diff.flatten() - par) + eta * par
        expected = c.double() + (w - 1) * upd.view_as(c)
        torch.testing.assert_close(got.double(), expected, atol=2e-4, rtol=1e-4)
    assert clipped >= 2  # the threshold really acted


def test_dynamic_thresholding_matches_formula(tiny_eps, prompts):
    pos, neg = prompts
    w, mimic, pct = 12.0, 3.0, 0.9
    rec, seen = _recorded(tiny_eps, pos, neg, [T.DynamicThresholdTerm(percentile=pct, mimic_scale=mimic)], w)
    changed = False
    for (x, sigma, (c, u)), got in zip(rec, seen):
        guided = u + w * (c - u)
        mim = u + mimic * (c - u)
        exp = torch.empty_like(guided)
        for ch in range(c.shape[1]):
            g = guided[0, ch].flatten()
            mu = g.mean()
            ctr = g - mu
            m_max = (mim[0, ch] - mim[0, ch].mean()).abs().max()
            s = max(float(torch.quantile(ctr.abs(), pct)), float(m_max))
            exp[0, ch] = (ctr.clamp(-s, s) / s * m_max + mu).view_as(guided[0, ch])
        torch.testing.assert_close(got, exp, atol=1e-4, rtol=1e-4)
        changed |= not torch.allclose(got, guided, atol=1e-3)
    assert changed


def test_perp_neg_matches_formula_and_core_guider(tiny_eps, prompts, encode):
    from comfy_extras.nodes_perpneg import Guider_PerpNeg, perp_neg
    pos, neg = prompts
    empty = encode("")
    w, ns = 5.0, 1.5
    rec, seen = _recorded(tiny_eps, pos, neg, [T.PerpNegTerm(empty=empty, neg_scale=ns)], w)
    for (x, sigma, (c, u, e)), got in zip(rec, seen):
        pos_d, neg_d = c - e, u - e
        perp = neg_d - (neg_d * pos_d).sum() / pos_d.pow(2).sum() * pos_d
        torch.testing.assert_close(got, e + w * (pos_d - ns * perp), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got, perp_neg(x, c, u, e, ns, w), atol=1e-4, rtol=1e-4)
    g = Guider_PerpNeg(tiny_eps)
    g.set_conds(pos, neg, empty)
    g.set_cfg(w, ns)
    torch.testing.assert_close(run(ek_guider(tiny_eps, pos, neg, [T.PerpNegTerm(empty=empty, neg_scale=ns)], w)), run(g),
                               atol=1e-4, rtol=1e-4)


def test_cads_noise_statistics(tiny_eps, prompts):
    pos, neg = prompts
    y = pos[0][0]
    seen = []
    m = tiny_eps.clone()

    def wrapper(executor, *args, **kwargs):
        to = args[5]
        seen.append((float(args[1][0]), list(to["cond_or_uncond"]), args[3].clone()))
        return executor(*args, **kwargs)
    m.add_wrapper_with_key(PE.WrappersMP.APPLY_MODEL, "test.cads", wrapper)
    s, tau1, tau2 = 0.5, 0.3, 0.7
    steps = 8
    sig = sigmas(tiny_eps, steps)

    def per_step(psi):
        seen.clear()
        run(ek_guider(m, pos, neg, [T.CADSTerm(noise_scale=s, tau1=tau1, tau2=tau2, psi=psi)]), steps=steps)
        assert len(seen) == steps
        return seen[:]
    for psi in (0.0, 1.0):
        for i, (sigma, cou, ctx) in enumerate(per_step(psi)):
            b = ctx.shape[0] // len(cou)
            c_ctx, u_ctx = ctx[cou.index(0) * b:(cou.index(0) + 1) * b], ctx[cou.index(1) * b:(cou.index(1) + 1) * b]
            assert torch.equal(u_ctx, neg[0][0])                              # negative untouched
            t = 1.0 - i / (steps - 1)
            gamma = 1.0 if t <= tau1 else 0.0 if t >= tau2 else (tau2 - t) / (tau2 - tau1)
            if gamma == 1.0:
                assert torch.equal(c_ctx, y)
                continue
            if psi == 0.0:
                n = (c_ctx - math.sqrt(gamma) * y) / (s * math.sqrt(1 - gamma))
                assert abs(float(n.mean())) < 0.1 and abs(float(n.std()) - 1.0) < 0.06
            else:                                                            # rescaled to y's mean and std
                assert float(c_ctx.mean()) == pytest.approx(float(y.mean()), abs=1e-4)
                assert float(c_ctx.std()) == pytest.approx(float(y.std()), rel=1e-3)
                assert not torch.allclose(c_ctx, y)
    assert float(sig[0]) > 0


def test_autoguidance_one_extra_call_and_formula(tiny_eps, prompts):
    from editkit.builtin_models import tiny
    pos, neg = prompts
    weak, weak_calls = counting(tiny.tiny_unet(tiny.EPS, seed=5), "test.weak")
    weak_rec = []

    def wrec(executor, mdl, conds, x, timestep, model_options):
        out = executor(mdl, conds, x, timestep, model_options)
        weak_rec.append(out[0].clone())
        return out
    weak.add_wrapper_with_key(PE.WrappersMP.CALC_COND_BATCH, "test.weakrec", wrec)
    main, calls = counting(tiny_eps)
    main, rec = recording(main)
    seen, cb = denoised_trace()
    w, scale = 4.0, 1.5
    run(ek_guider(main, pos, neg, [T.AutoGuidanceTerm(weak_model=weak, scale=scale)], w), callback=cb)
    assert calls == [(1, 0)] * STEPS and weak_calls == [(0,)] * STEPS
    for (x, sigma, (c, u)), wk, got in zip(rec, weak_rec, seen):
        torch.testing.assert_close(got, u + w * (c - u) + scale * (c - wk), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# PAG / SAG: exactly the chosen layers
# ---------------------------------------------------------------------------------------------

def _spy_attn1(model):
    """Another pack's attn1 replace on every UNet site, recording (site, chunks seen)."""
    seen = []
    m = model.clone()
    for site in attention_layout(model).sites:
        def make(prev, site=site):
            def fn(q, k, v, extra):
                seen.append((site.key, tuple(extra["cond_or_uncond"]), q.shape[0]))
                return P.call_attention(prev, q, k, v, extra)
            return fn
        P.chain_attn_replace(m, "attn1", site.key, make)
    return m, seen


def test_pag_unet_perturbs_exactly_the_chosen_layers(tiny_eps, prompts):
    pos, neg = prompts
    spy, seen = _spy_attn1(tiny_eps)
    m, calls = counting(spy)
    layout = attention_layout(tiny_eps)
    chosen = {("input", 1, 0), ("output", 3, 0)}
    g = ek_guider(m, pos, neg, [T.PAGTerm(scale=2.0, layers="input 1, output 3")])
    out = run(g)
    assert [tuple(sorted(c)) for c in calls] == [(0, 1, 2)] * STEPS   # one call, one extra branch, nothing more
    assert len(seen) == STEPS * len(layout.sites)
    for key, cou, rows in seen:
        assert (2 not in cou) == (key in chosen)              # the PAG chunk skips the others' attention only there
        assert rows == len(cou)
    assert {(s, a) for st in g.stats for s, a, _ in st["sites"]} == {("input 1", "identity"), ("output 3", "identity")}
    assert torch.isfinite(out).all()


def test_pag_middle_matches_core_pag(tiny_eps, prompts, comfy_nodes):
    from comfy_extras.nodes_pag import PerturbedAttentionGuidance
    pos, neg = prompts
    core = node_out(PerturbedAttentionGuidance.execute(tiny_eps, 2.5))[0]
    ref = run(core_guider(core, pos, neg))
    out = run(ek_guider(tiny_eps, pos, neg, [T.PAGTerm(scale=2.5, layers="auto")]))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(out, run(core_guider(tiny_eps, pos, neg)), atol=1e-3)


def test_sag_middle_matches_core_sag_and_records_only_chosen(tiny_eps, prompts):
    from comfy_extras.nodes_sag import SelfAttentionGuidance
    pos, neg = prompts
    core = node_out(SelfAttentionGuidance.execute(tiny_eps, 0.8, 2.0))[0]
    ref = run(core_guider(core, pos, neg))
    m, calls = counting(tiny_eps)
    g = ek_guider(m, pos, neg, [T.SAGTerm(scale=0.8, blur_sigma=2.0, layers="auto")])
    out = run(g)
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3)     # float rounding only (attention computed differently)
    assert float((out - ref).abs().mean() / ref.abs().mean()) < 1e-5
    assert calls == [(1, 0), (0,)] * STEPS                   # the main batch, then the blurred uncond pass (own batch)
    assert {s for st in g.stats for s, a, b in st["sites"]} == {"middle 0"}
    g2 = ek_guider(tiny_eps, pos, neg, [T.SAGTerm(scale=0.8, layers="input 1")])
    other = run(g2)
    assert {s for st in g2.stats for s, a, b in st["sites"]} == {"input 1"}
    assert not torch.allclose(other, out, atol=1e-4)


def _spy_override(model):
    seen = []
    m = model.clone()

    def make(prev):
        def override(func, *args, **kwargs):
            to = kwargs.get("transformer_options", {})
            seen.append((to.get("block_type"), to.get("block_index"), tuple(to.get("cond_or_uncond", [])), args[0].shape[0]))
            return P.next_attention(prev, func)(*args, **kwargs)
        return override
    P.chain_attention_override(m, make)
    return m, seen


def test_pag_and_sag_on_flux_perturb_exactly_the_chosen_blocks(tiny_flux):
    pos, neg = flow_cond(seed=0), flow_cond(seed=1)
    spy, seen = _spy_override(tiny_flux)
    m, calls = counting(spy)
    shape, steps = (1, 16, 8, 8), 3
    g = ek_guider(m, pos, neg, [T.PAGTerm(scale=2.0, layers="double 1, single 0")], 3.0)
    out = run(g, shape, steps=steps)
    assert [tuple(sorted(c)) for c in calls] == [(0, 1, 2)] * steps
    blocks = [("double", 0), ("double", 1), ("single", 0), ("single", 1)]
    assert len(seen) == steps * len(blocks)
    for btype, bidx, cou, rows in seen:
        assert (2 not in cou) == ((btype, bidx) in {("double", 1), ("single", 0)})
        assert rows == len(cou)
    plain = run(core_guider(tiny_flux, pos, neg, 3.0), shape, steps=steps)
    assert torch.isfinite(out).all() and not torch.allclose(out, plain, atol=1e-5)
    # SAG on the DiT: the map comes from the chosen block only; one extra (blurred) call per step
    m2, calls2 = counting(tiny_flux)
    g2 = ek_guider(m2, pos, neg, [T.SAGTerm(scale=1.0, blur_sigma=1.0, layers="single 1")], 3.0)
    out2 = run(g2, (1, 16, 16, 16), steps=steps)
    assert calls2 == [(1, 0), (0,)] * steps                 # the blurred re-evaluation is a separate batch (as in core SAG)
    assert {s for st in g2.stats for s, a, b in st["sites"]} == {"single 1"}
    assert torch.isfinite(out2).all()


def _tiny_sd3():
    """A 2-block SD3 MMDiT (joint attention, no block_index in transformer_options)."""
    from editkit.builtin_models.tiny import tiny_sd3
    return tiny_sd3(seed=0, depth=2)


def test_pag_and_sag_on_sd3_joint_blocks():
    model = _tiny_sd3()
    pos, neg = flow_cond(seed=0), flow_cond(seed=1)
    spy, seen = _spy_override(model)
    m, calls = counting(spy)
    shape, steps = (1, 16, 8, 8), 2
    out = run(ek_guider(m, pos, neg, [T.PAGTerm(scale=2.0, layers="double 1")], 3.0), shape, steps=steps)
    assert [tuple(sorted(c)) for c in calls] == [(0, 1, 2)] * steps
    # two joint blocks per call, in order: block 0 sees the PAG chunk, block 1 (perturbed) does not
    assert [(2 in cou, rows == len(cou)) for _, _, cou, rows in seen] == [(True, True), (False, True)] * steps
    plain = run(core_guider(model, pos, neg, 3.0), shape, steps=steps)
    assert torch.isfinite(out).all() and not torch.allclose(out, plain, atol=1e-6)
    g = ek_guider(model, pos, neg, [T.SAGTerm(scale=1.0, blur_sigma=1.0, layers="double 0")], 3.0)
    out2 = run(g, (1, 16, 16, 16), steps=steps)
    assert {s for st in g.stats for s, a, b in st["sites"]} == {"double 0"} and torch.isfinite(out2).all()


# ---------------------------------------------------------------------------------------------
# Composition with core and EditKit patches
# ---------------------------------------------------------------------------------------------

def test_core_patches_keep_working_through_the_guider(tiny_eps, prompts, comfy_nodes):
    from comfy_extras.nodes_pag import PerturbedAttentionGuidance
    pos, neg = prompts
    rescaled = comfy_nodes.NODE_CLASS_MAPPINGS["RescaleCFG"]().patch(tiny_eps, 0.7)[0]
    assert torch.equal(run(ek_guider(rescaled, pos, neg)), run(core_guider(rescaled, pos, neg)))
    both = node_out(PerturbedAttentionGuidance.execute(rescaled, 2.0))[0]
    assert torch.equal(run(ek_guider(both, pos, neg)), run(core_guider(both, pos, neg)))
    # and EditKit terms stack on top of them
    stacked = run(ek_guider(both, pos, neg, [T.PAGTerm(scale=1.0, layers="input 3")]))
    assert torch.isfinite(stacked).all() and not torch.equal(stacked, run(core_guider(both, pos, neg)))


def test_editkit_patches_keep_working_through_the_guider(tiny_eps, tiny_clip, prompts):
    from editkit.nodes.analysis import AttentionMapsCapture
    pos, neg = prompts
    scheduled = node_out(N.CFGSchedule.execute(tiny_eps, S.Schedule(S.INTERVAL, sigma_low=100.0, sigma_high=200.0)))[0]
    m, calls = counting(scheduled)
    out = run(ek_guider(m, pos, neg))
    assert calls == [(0,)] * STEPS and torch.equal(out, run(core_guider(tiny_eps, pos, neg, 1.0)))
    cap, store = node_out(AttentionMapsCapture.execute(tiny_eps, tiny_clip, "a red circle on a white background",
                                                       "circle", "all", 0.0, 1.0))
    run(ek_guider(cap, pos, neg, [T.PAGTerm(layers="all"), T.APGTerm()]))
    assert store.sums and store.steps_seen == set(range(STEPS))


# ---------------------------------------------------------------------------------------------
# KSampler patch, CFG++
# ---------------------------------------------------------------------------------------------

def test_cfg_schedule_patch_with_ksampler(tiny_eps, prompts):
    pos, neg = prompts
    lat = torch.zeros(1, 4, 8, 8)
    plain = sample_ksampler(tiny_eps, pos, neg, lat, steps=STEPS)
    const = node_out(N.CFGSchedule.execute(tiny_eps, S.Schedule()))[0]
    assert torch.equal(sample_ksampler(const, pos, neg, lat, steps=STEPS), plain)
    never, calls = counting(node_out(N.CFGSchedule.execute(tiny_eps, S.Schedule(S.EARLY, end_percent=0.0)))[0])
    assert torch.equal(sample_ksampler(never, pos, neg, lat, steps=STEPS), sample_ksampler(tiny_eps, pos, neg, lat, steps=STEPS, cfg=1.0))
    assert calls == [(0,)] * STEPS
    ramp = S.Schedule(S.LINEAR, 0.2, 1.5)
    patched = node_out(N.CFGSchedule.execute(tiny_eps, ramp))[0]
    ks = sample_ksampler(patched, pos, neg, lat, steps=STEPS)
    g = ek_guider(tiny_eps, pos, neg, [T.CFGTerm(ramp)])
    import comfy.sample
    ek = g.sample(comfy.sample.prepare_noise(lat, 1), lat, comfy.samplers.sampler_object("euler"), sigmas(tiny_eps), seed=1)
    torch.testing.assert_close(ks, ek, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ks, plain, atol=1e-3)


@pytest.mark.parametrize("solver,core_name", [("euler", "euler_cfg_pp"), ("dpmpp_2m", "dpmpp_2m_cfg_pp")])
def test_cfgpp_matches_core_on_eps(tiny_eps, prompts, solver, core_name):
    pos, neg = prompts
    ours = node_out(N.SamplerCFGPP.execute(solver))[0]
    a = run(core_guider(tiny_eps, pos, neg, 1.5), sampler=ours)
    b = run(core_guider(tiny_eps, pos, neg, 1.5), sampler=core_name)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(a, run(core_guider(tiny_eps, pos, neg, 1.5), sampler=solver.replace("_cfg_pp", "")), atol=1e-3)


def test_cfgpp_flow_and_without_uncond(tiny_flow, tiny_eps, prompts):
    pos, neg = prompts
    ours = node_out(N.SamplerCFGPP.execute("euler"))[0]
    torch.testing.assert_close(run(core_guider(tiny_flow, pos, neg, 1.5), sampler=ours),
                               run(core_guider(tiny_flow, pos, neg, 1.5), sampler="euler_cfg_pp"), atol=1e-4, rtol=1e-4)
    # no unconditional pass (outside the interval): CFG++ steps are plain Euler / DPM++(2M) steps
    never = [T.CFGTerm(S.Schedule(S.INTERVAL, sigma_low=100.0, sigma_high=200.0))]
    for solver in ("euler", "dpmpp_2m"):
        m, calls = counting(tiny_eps)
        got = run(ek_guider(m, pos, neg, never), sampler=node_out(N.SamplerCFGPP.execute(solver))[0])
        assert calls == [(0,)] * STEPS
        torch.testing.assert_close(got, run(core_guider(tiny_eps, pos, neg, 1.0), sampler=solver), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Nodes, plot, errors
# ---------------------------------------------------------------------------------------------

def test_term_chain_and_plot():
    sched = node_out(N.GuidanceSchedule.execute("interval", 1.0, 1.0, 0.0, 1.0, "progress", 1.0, 5.0))[0]
    ramp = node_out(N.GuidanceSchedule.execute("linear", 0.5, 1.0, 0.0, 1.0, "progress", 0.28, 5.42, sched))[0]
    terms = node_out(N.TermCFG.execute(None, ramp))[0]
    terms = node_out(N.TermAPG.execute(0.0, 15.0, -0.5, terms))[0]
    terms2 = node_out(N.TermPAG.execute(3.0, "auto", terms))[0]
    assert [t.kind for t in terms2] == ["cfg", "apg", "pag"] and len(terms) == 2   # immutable: the old list is unchanged
    sig = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5, 0.0])
    curves = dict(__import__("editkit.guidance.plot", fromlist=["curves"]).curves(terms2, sig, 5.0))
    assert curves["CFG scale"] == pytest.approx([1.0, 1 + 4 * 0.625, 1 + 4 * 0.75, 1.0, 1.0])
    img = node_out(N.GuidancePlot.execute(sig, 5.0, terms2))[0]
    assert img.shape == (1, 384, 768, 3) and float(img.min()) < 0.5 and float(img.max()) == 1.0
    colored = ((img[0] - img[0].mean(-1, keepdim=True)).abs().sum(-1) > 0.3).sum()
    assert colored > 500


def test_errors_name_the_input(tiny_eps, tiny_flux, prompts):
    pos, neg = prompts
    with pytest.raises(ValueError, match="EditKitGuider: input 'terms'.*no layer 'output 9'.*it has: input 1"):
        ek_guider(tiny_eps, pos, neg, [T.PAGTerm(layers="output 9")])
    with pytest.raises(ValueError, match="no layer 'middle'.*double 0"):
        ek_guider(tiny_flux, pos, neg, [T.SAGTerm(layers="middle")])
    with pytest.raises(ValueError, match="two APG terms"):
        ek_guider(tiny_eps, pos, neg, [T.APGTerm(), T.APGTerm()])
    with pytest.raises(ValueError, match="same network"):
        ek_guider(tiny_eps, pos, neg, [T.AutoGuidanceTerm(weak_model=tiny_eps.clone())])
    with pytest.raises(ValueError, match="latent channels"):
        ek_guider(tiny_eps, pos, neg, [T.AutoGuidanceTerm(weak_model=tiny_flux)])
    with pytest.raises(ValueError, match="EditKitGuidanceSchedule: input 'start_percent'"):
        N.GuidanceSchedule.execute("linear", 0.0, 1.0, 0.8, 0.2, "progress", 0.28, 5.42)
    with pytest.raises(ValueError, match="EditKitGuidanceTermCADS: input 'tau1'"):
        N.TermCADS.execute(0.25, 0.9, 0.6, 1.0, False, 0)


@pytest.mark.slow
def test_pag_auto_on_sd15_layout(sd15_full):
    """'auto' picks the SD1.5 middle block from the real layout; the PAG chunk skips only there."""
    from editkit.builtin_models.fullsize import sd15_conditioning
    spy, seen = _spy_attn1(sd15_full)
    g = ek_guider(spy, sd15_conditioning(), sd15_conditioning(seed=1), [T.PAGTerm(layers="auto")], 3.0)
    out = run(g, (1, 4, 32, 32), steps=1)
    assert torch.isfinite(out).all()
    skipped = {key for key, cou, _ in seen if 2 not in cou}
    assert skipped == {("middle", 0, 0)} and len(seen) == 16


# ---------------------------------------------------------------------------------------------
# Term protocol and per-run state
# ---------------------------------------------------------------------------------------------

def test_per_run_state_does_not_leak_between_runs(tiny_eps, prompts):
    """APG momentum and the AutoGuidance weak model's prepared conds live in one Run per sample: the same
    guider run again, after an interrupted run, or next to a guider on a clone gives the fresh guider's result."""
    from editkit.builtin_models import tiny
    pos, neg = prompts
    weak = tiny.tiny_unet(tiny.EPS, seed=5)
    terms = [T.APGTerm(eta=0.2, norm_threshold=0.05, momentum=0.6), T.AutoGuidanceTerm(weak_model=weak, scale=0.5)]
    fresh = run(ek_guider(tiny_eps, pos, neg, terms))
    no_momentum = run(ek_guider(tiny_eps, pos, neg, [T.APGTerm(eta=0.2, norm_threshold=0.05, momentum=0.0), terms[1]]))
    assert not torch.allclose(fresh, no_momentum, atol=1e-4)        # the momentum buffer really carries over steps
    g = ek_guider(tiny_eps, pos, neg, terms)
    assert torch.equal(run(g), fresh) and torch.equal(run(g), fresh)
    assert len(g.stats) == STEPS and all(s["extra_calls"] == 1 for s in g.stats)

    def interrupt(i, denoised, x, total):
        if i == 2:
            raise InterruptedError

    with pytest.raises(InterruptedError):
        run(g, callback=interrupt)
    other = ek_guider(tiny_eps.clone(), pos, neg, terms)
    assert torch.equal(run(other), fresh) and torch.equal(run(g), fresh)
    assert g._run is None and len(g.stats) == STEPS               # nothing stays attached between runs


def test_momentum_resets_when_the_run_restarts():
    from editkit.guidance.protocol import Momentum, Run
    r = Run(None, None, "cpu", None, None, 0)
    m = Momentum(r)
    r.observe(10.0)
    m.set(torch.ones(1))
    r.observe(5.0)
    assert torch.equal(m.get(), torch.ones(1)) and r.segment == 0
    r.observe(8.0)                                                   # a higher sigma: a restart
    assert m.get() is None and r.segment == 1 and r.calls == 3


def test_a_new_term_plugs_in_through_the_protocol(tiny_eps, prompts, encode):
    """A term written only against protocol.Term (an extra prompt prepared with the run's conds, its branch in
    the ONE batched call, per-run state, a post-CFG step): the guider runs it without any change, skips its
    branch where its schedule weight is 0, and the result is the formula on the recorded predictions."""
    from dataclasses import dataclass
    from typing import Any
    from editkit.guidance.protocol import Term
    created = []

    @dataclass(frozen=True, eq=False)
    class AwayFrom(Term):
        other: Any = None
        scale: float = 1.0
        kind, title, needs_uncond = "test_away", "away from", True

        def extra_conds(self):
            return {"test_away": self.other}

        def start(self, guider, run, i):
            created.append({"calls": 0})
            return created[-1]

        def plan(self, call, i, w):
            call.add_branch("away", call.named_conds("test_away"))

        def post_cfg(self, call, i, w, guided):
            call.state(i)["calls"] += 1
            return guided + (self.scale * w) * (call.cond - call.prediction("away"))

    pos, neg = prompts
    w, scale = 4.0, 0.7
    early = S.Schedule(S.EARLY, end_percent=0.5)
    m, calls = counting(tiny_eps)
    m, rec = recording(m)
    seen, cb = denoised_trace()
    g = ek_guider(m, pos, neg, [AwayFrom(early, other=encode("a blue square"), scale=scale)], w)
    run(g, callback=cb)
    on = [s["progress"] < 0.5 for s in g.stats]
    assert 0 < sum(on) < STEPS
    assert [len(c) for c in calls] == [3 if a else 2 for a in on]           # one batched call per step
    assert [s["branches"] for s in g.stats] == [["cond", "uncond", "away"] if a else ["cond", "uncond"] for a in on]
    for (x, sigma, outs), got, a in zip(rec, seen, on):
        c, u = outs[0], outs[1]
        expected = u + w * (c - u) + (scale * (c - outs[2]) if a else 0)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert (rec[0][2][0] - rec[0][2][2]).abs().mean() > 1e-3                # the extra prompt really differs
    run(g)
    assert [s["calls"] for s in created] == [sum(on)] * 2                   # a fresh state per run
