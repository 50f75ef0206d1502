"""Speed caches (cache/): interval 1 is plain sampling bit for bit, a cached step equals the full UNet
with the cached deep feature injected (an independent reference), deep-block calls counted, caches
per branch (a Prompt-to-Prompt pair's source row = the source sampled alone), bad input."""
import pytest
import torch

from editkit.cache import deepcache
from editkit.cache.schedule import key_steps
from editkit.cache.store import RUN_KEY, RunCaches, row_keys
from editkit.core.branches import with_branches
from editkit.core.errors import EditKitInputError
from editkit.core.features import Hook, install_hook
from editkit.nodes.attention_control import PromptBatch, PromptToPromptNode
from editkit.cache.todo import downsample_tokens
from editkit.core.introspect import attention_layout
from editkit.core.patches import call_attention, chain_attn_replace
from editkit.nodes.cache import DeepCache, TGateNode, ToDoNode
from ek_helpers import node_out, sample_ksampler

SRC = "a red circle on a white background"
TGT = "a blue circle on a white background"


def _lat(n=1, size=16, seed=0):
    return torch.zeros(n, 4, size, size)


class MiddleCounter:
    """Counts how many rows went through the UNet's middle (deepest) block."""

    def __init__(self, m):
        self.rows = 0
        install_hook(m, Hook("output_entry", 0), self._fn)

    def _fn(self, tensors, to):
        self.rows += tensors["h"].shape[0]


def _dc(model, interval=3, branch=0, schedule="uniform", start=0.0, end=1.0):
    return node_out(DeepCache.execute(model, interval, branch, schedule, start, end))[0]


def test_interval_one_is_plain_sampling_exactly(tiny_eps, encode):
    pos, neg = encode("a red circle"), encode("")
    plain = sample_ksampler(tiny_eps, pos, neg, _lat(), steps=6)
    cached = sample_ksampler(_dc(tiny_eps, 1), pos, neg, _lat(), steps=6)
    assert torch.equal(plain, cached)


@pytest.mark.parametrize("interval,schedule", [(2, "uniform"), (3, "uniform"), (3, "non-uniform")])
def test_deep_blocks_run_only_on_key_steps(tiny_eps, encode, interval, schedule):
    steps = 9
    pos, neg = encode("a red circle"), encode("")
    m = _dc(tiny_eps, interval, schedule=schedule)
    count = MiddleCounter(m)
    out = sample_ksampler(m, pos, neg, _lat(), steps=steps)
    keys = key_steps(steps, interval, schedule)
    assert count.rows == 2 * len(keys)          # cond + uncond rows, key steps only
    assert len(keys) == -(-steps // interval) and 0 in keys
    plain = sample_ksampler(tiny_eps, pos, neg, _lat(), steps=steps)
    assert torch.isfinite(out).all() and not torch.equal(out, plain)
    assert (out - plain).norm() / plain.norm() < 0.25   # an approximation of plain sampling, not another image


def _call(model, x, t, ctx, to):
    return model.model.diffusion_model(x, t, ctx, transformer_options=to)


def test_cached_step_equals_full_unet_with_the_deep_feature_injected(tiny_eps):
    """Independent reference: the whole UNet with the cached feature written in at output block j0."""
    m = _dc(tiny_eps, 2, branch=1)
    dm = m.model.diffusion_model
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 5, 32, generator=g)
    sig = torch.tensor([3.0, 2.0, 1.0, 0.0])
    t = torch.tensor([700.0, 700.0])
    run = RunCaches()
    base = {**m.model_options["transformer_options"], "wrappers": m.wrappers}   # as sampler_helpers merges them
    opts = lambda i: {**base, "sample_sigmas": sig, "sigmas": sig[i:i + 1], RUN_KEY: run, "cond_or_uncond": [0, 1]}
    _call(m, x0, t, ctx, opts(0))                          # key step: fills the cache
    cached = _call(m, x1, t * 0.5, ctx, opts(1))           # cached step
    _, n_out, j0 = deepcache.deep_blocks(m, 1)
    # reference on the unpatched model: record at step 0, inject at step 1
    ref = tiny_eps.clone()
    store = {}

    def fn(tensors, to):
        if "h" in store:
            return {"h": store["h"]}
        store["h"] = tensors["h"].clone()
    install_hook(ref, Hook("output_entry", j0), fn)
    rto = dict(ref.model_options["transformer_options"])
    ref.model.diffusion_model(x0, t, ctx, transformer_options=dict(rto))
    expected = ref.model.diffusion_model(x1, t * 0.5, ctx, transformer_options=dict(rto))
    assert torch.allclose(cached, expected, atol=1e-5, rtol=1e-5)
    full = tiny_eps.model.diffusion_model(x1, t * 0.5, ctx, transformer_options={})
    # it did reuse, not recompute: far from the full UNet on this input (compared with the reference gap)
    assert (cached - full).abs().max() > 100 * (cached - expected).abs().max() + 1e-7
    space = next(iter(run.spaces.values()))
    assert (space["full_calls"], space["cached_calls"]) == (1, 1)


def test_row_keys_follow_the_branch_contract():
    plain = row_keys({"cond_or_uncond": [0, 1]}, 4)
    assert plain == [(0, 0, "source", 0), (0, 0, "target", 0), (1, 0, "source", 0), (1, 0, "target", 0)]
    mo = with_branches({"transformer_options": {"cond_or_uncond": [0]}}, ("source", "target"))
    keys = row_keys(mo["transformer_options"], 4)
    assert keys == [(0, 0, "source", 0), (0, 0, "source", 1), (0, 0, "target", 0), (0, 0, "target", 1)]
    assert len(set(row_keys({"cond_or_uncond": [0, 0, 1]}, 3))) == 3      # extra chunks of one kind stay apart


def _todo(model, f=2, f2=1, method="nearest"):
    return node_out(ToDoNode.execute(model, f, f2, method))[0]


def _tg(model, gate=2, average=True):
    return node_out(TGateNode.execute(model, gate, average))[0]


CACHES = {"deepcache": lambda m: _dc(m, 3), "tgate": lambda m: _tg(m, 2), "todo": lambda m: _todo(m)}


@pytest.mark.parametrize("kind", list(CACHES))
def test_p2p_pair_source_row_equals_the_source_alone(tiny_eps, tiny_clip, encode, kind):
    """Branches never read each other's cache: with a cache under Prompt-to-Prompt, the pair's source
    row is the source prompt sampled alone with the same cache, and the target is still an edit."""
    import nodes
    cond, lat = node_out(PromptBatch.execute(tiny_clip, SRC, TGT, 128, 128))
    neg = encode("")
    p2p = node_out(PromptToPromptNode.execute(tiny_eps, tiny_clip, SRC, TGT, "replace", 0.8, 0.4, "", "", 0.3))[0]
    both = CACHES[kind](p2p)
    ks = lambda m, c, la: nodes.common_ksampler(m, 1, 6, 5.0, "euler", "normal", c, neg,
                                                {"samples": la, "batch_index": [0] * la.shape[0]})[0]["samples"]
    pair = ks(both, cond, lat["samples"])
    alone = ks(CACHES[kind](tiny_eps), encode(SRC), lat["samples"][:1])
    assert (pair[0] - alone[0]).abs().max() <= 1e-5 * alone[0].abs().max()   # batch-size rounding only
    assert (pair[1] - pair[0]).abs().mean() > 1e-3              # the target still differs: an edit
    uncached = ks(p2p, cond, lat["samples"])
    assert not torch.equal(pair, uncached)


def test_interval_above_the_step_count_is_refused_at_sampling(tiny_eps, encode):
    with pytest.raises(EditKitInputError, match="cache_interval"):
        sample_ksampler(_dc(tiny_eps, 8), encode("a"), encode(""), _lat(), steps=4)


def test_bad_inputs(tiny_eps, tiny_flux):
    with pytest.raises(EditKitInputError, match="cache_interval"):
        _dc(tiny_eps, 0)
    with pytest.raises(EditKitInputError, match="cache_branch"):
        _dc(tiny_eps, 3, branch=10)
    with pytest.raises(EditKitInputError, match="start_percent"):
        _dc(tiny_eps, 3, start=0.6, end=0.5)
    with pytest.raises(EditKitInputError, match="Block Cache"):
        _dc(tiny_flux, 3)


def test_runs_do_not_share_a_cache(tiny_eps, encode):
    """A second run on the same patched model starts with an empty cache (same result twice)."""
    m = _dc(tiny_eps, 3)
    a = sample_ksampler(m, encode("a red circle"), encode(""), _lat(), steps=6)
    sample_ksampler(m, encode("a blue square"), encode(""), _lat(), steps=6, seed=5)
    b = sample_ksampler(m, encode("a red circle"), encode(""), _lat(), steps=6)
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# ToDo
# ---------------------------------------------------------------------------------------------

def test_todo_factor_one_is_plain_and_nearest_keeps_every_other_token(tiny_eps, encode):
    pos, neg = encode("a red circle"), encode("")
    assert torch.equal(sample_ksampler(_todo(tiny_eps, 1), pos, neg, _lat(), steps=3),
                       sample_ksampler(tiny_eps, pos, neg, _lat(), steps=3))
    t = torch.randn(2, 6 * 8, 5)
    grid = t.reshape(2, 6, 8, 5)
    assert torch.equal(downsample_tokens(t, 6, 8, 2), grid[:, ::2, ::2].reshape(2, 12, 5))
    assert torch.allclose(downsample_tokens(t, 6, 8, 2, "avg_pool"),
                          grid.reshape(2, 3, 2, 4, 2, 5).mean((2, 4)).reshape(2, 12, 5), atol=1e-6)


def test_todo_shrinks_keys_only_at_the_finest_level(tiny_eps, encode):
    m = _todo(tiny_eps, 2, 1)
    seen = []
    lay = attention_layout(m)

    def make(prev, site):
        def fn(q, k, v, extra):
            seen.append((site.downsample, q.shape[1], k.shape[1], v.shape[1]))
            return call_attention(prev, q, k, v, extra)
        return fn
    for s in lay.sites:
        chain_attn_replace(m, "attn1", s.key, lambda prev, s=s: make(prev, s))
    out = sample_ksampler(m, encode("a red circle"), encode(""), _lat(size=16), steps=2)
    assert torch.isfinite(out).all()
    assert {d for d, *_ in seen} == {1, 2}
    for d, lq, lk, lv in seen:
        assert lk == lv == (lq // 4 if d == 1 else lq)


# ---------------------------------------------------------------------------------------------
# TGATE
# ---------------------------------------------------------------------------------------------

def test_tgate_gate_at_the_last_step_is_plain_exactly(tiny_eps, encode):
    pos, neg = encode("a red circle"), encode("")
    assert torch.equal(sample_ksampler(_tg(tiny_eps, 4), pos, neg, _lat(), steps=4),
                       sample_ksampler(tiny_eps, pos, neg, _lat(), steps=4))


def test_tgate_drops_cross_attention_and_the_uncond_half_after_the_gate(tiny_eps, encode):
    pos, neg = encode("a red circle"), encode("")
    m = _tg(tiny_eps, 2)
    count = MiddleCounter(m)
    ctx_tokens = []
    m.set_model_attn2_output_patch(lambda n, extra: ctx_tokens.append(n.shape[0]) or n)
    out = sample_ksampler(m, pos, neg, _lat(), steps=6)
    assert count.rows == 2 * 2 + 1 * 4                    # cond+uncond before the gate, cond only after
    plain = sample_ksampler(tiny_eps, pos, neg, _lat(), steps=6)
    assert torch.isfinite(out).all() and not torch.equal(out, plain)
    assert (out - plain).norm() / plain.norm() < 0.25
    # each row keeps its own cache: without averaging, CFG still acts and both halves run
    m2 = _tg(tiny_eps, 2, average=False)
    c2 = MiddleCounter(m2)
    sample_ksampler(m2, pos, neg, _lat(), steps=6)
    assert c2.rows == 12


def test_tgate_cached_output_is_the_gate_steps_mean(tiny_eps, encode):
    """Independent reference: the cross-attention outputs recorded at step gate-1 (full), averaged over
    cond/uncond, are what every later step's cross-attention returns."""
    pos, neg = encode("a red circle"), encode("")
    m = _tg(tiny_eps, 2)
    rec = []
    m.set_model_attn2_output_patch(lambda n, extra: rec.append((float(extra["sigmas"][0]), tuple(extra["block"]),
                                                               extra["block_index"], n.clone())) or n)
    sample_ksampler(m, pos, neg, _lat(), steps=4)
    sigmas = sorted({r[0] for r in rec}, reverse=True)
    site = rec[0][1:3]
    at = lambda s: [r[3] for r in rec if r[0] == s and r[1:3] == site][0]
    gate = at(sigmas[1])                                   # step 1: the last full one (cond, uncond rows)
    mean = gate.mean(0, keepdim=True)
    for s in sigmas[2:]:
        assert torch.allclose(at(s), mean, atol=1e-6)


def test_todo_tgate_bad_inputs(tiny_eps, tiny_flux, encode):
    with pytest.raises(EditKitInputError, match="gate_step"):
        _tg(tiny_eps, 0)
    with pytest.raises(EditKitInputError, match="gate_step"):
        sample_ksampler(_tg(tiny_eps, 9), encode("a"), encode(""), _lat(), steps=4)
    with pytest.raises(EditKitInputError, match="model"):
        _tg(tiny_flux, 3)
    with pytest.raises(EditKitInputError, match="downsample_factor"):
        _todo(tiny_eps, 0)
    with pytest.raises(EditKitInputError, match="model"):
        _todo(tiny_flux)


@pytest.mark.parametrize("kind", ["deepcache", "tgate"])
def test_inversion_sampler_source_branch_never_reads_the_target_cache(tiny_eps, encode, kind):
    """EditKitInversionSampler (source + target branches in one batch) with a cache: the source branch
    is the same whatever the target prompt, while the target follows its prompt."""
    from editkit.nodes.inversion import Invert
    from ek_inversion_helpers import edit
    lat = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3)) * 0.5
    pos = encode(SRC)
    inv = node_out(Invert.execute(tiny_eps, {"samples": lat}, pos, 1.0, 6, "normal", 0))[1]
    make = (lambda m: _dc(m, 2)) if kind == "deepcache" else (lambda m: _tg(m, 2))
    a, _ = edit(make(tiny_eps), inv, encode(TGT), output="source + target")
    b, _ = edit(make(tiny_eps), inv, encode("a green square on a black background"), output="source + target")
    assert a.shape[0] == 2
    assert (a[0] - b[0]).abs().max() <= 1e-5 * a[0].abs().max() + 1e-6
    assert (a[1] - b[1]).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------
# Caches under MasaCtrl and under EditKitGuider's extra branches
# ---------------------------------------------------------------------------------------------

REPLAY = {"deepcache": lambda m: _dc(m, 3), "tgate": lambda m: _tg(m, 2, average=False), "todo": lambda m: _todo(m)}


def _recording(m):
    """Records every model call (inputs per chunk, output) of the clone m."""
    import comfy.patcher_extension as pe
    calls, on = [], [True]

    def wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kw):
        out = executor(x, t, c_concat, c_crossattn, control, transformer_options, **kw)
        if on[0]:
            to = transformer_options
            calls.append(dict(x=x.clone(), t=t.clone(), ctx=c_crossattn.clone(), cou=list(to["cond_or_uncond"]),
                              sig=to["sigmas"].clone(), sched=to["sample_sigmas"].clone(), out=out.clone()))
        return out
    m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "test.record", wrapper)
    return calls, on


@pytest.mark.parametrize("kind", list(REPLAY))
def test_guider_extra_branch_rows_never_read_each_others_cache(tiny_eps, encode, kind):
    """EditKitGuider with Perp-Neg (a third, "empty" branch batched with cond and uncond) on a cached model:
    every chunk's outputs over the run equal that chunk replayed ALONE through a fresh run of the same cache
    (its own inputs step by step), so no branch read another's cached features; and the term still acts."""
    from editkit.guidance import terms as T
    from editkit.nodes import guidance as N
    import comfy.samplers
    pos, neg, empty = encode(SRC), encode("a green square"), encode("")
    m = REPLAY[kind](tiny_eps)
    calls, on = _recording(m)
    sig = comfy.samplers.calculate_sigmas(m.get_model_object("model_sampling"), "normal", 6).cpu()
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))

    def run(model, terms):
        g = node_out(N.Guider.execute(model, pos, neg, 5.0, tuple(terms)))[0]
        return g.sample(noise, torch.zeros_like(noise), comfy.samplers.sampler_object("euler"), sig, seed=0)
    perp = [T.PerpNegTerm(empty=empty, neg_scale=1.0)]
    out = run(m, perp)
    on[0] = False
    assert len(calls) == 6 and all(len(c["cou"]) == 3 for c in calls)     # cond, uncond and the extra branch
    base = {**m.model_options["transformer_options"], "wrappers": m.wrappers}
    n = calls[0]["x"].shape[0] // 3
    for ci in range(3):
        run_state = RunCaches()
        for c in calls:
            rows = slice(ci * n, (ci + 1) * n)
            to = {**base, RUN_KEY: run_state, "cond_or_uncond": [c["cou"][ci]], "sigmas": c["sig"],
                  "sample_sigmas": c["sched"]}
            alone = m.model.apply_model(c["x"][rows], c["t"][rows], c_crossattn=c["ctx"][rows], transformer_options=to)
            assert (alone - c["out"][rows]).abs().max() <= 1e-5 * c["out"][rows].abs().max() + 1e-6
    assert (out - run(REPLAY[kind](tiny_eps), [])).abs().mean() > 1e-3      # Perp-Neg still acts with the cache


@pytest.mark.parametrize("kind", list(CACHES))
def test_masactrl_pair_with_a_cache_stays_an_edit(tiny_eps, tiny_clip, encode, kind):
    """MasaCtrl (the target's self-attention reads the source's keys/values) with a cache: the pair's source
    row is the source prompt sampled alone with the same cache (the source never reads the target's
    cache), the target differs from the source (an edit), and from the uncached pair (the cache acted)."""
    import nodes
    from editkit.nodes.attention_control import MasaCtrlNode
    cond, lat = node_out(PromptBatch.execute(tiny_clip, SRC, TGT, 128, 128))
    neg = encode("")
    masa = node_out(MasaCtrlNode.execute(tiny_eps, 1, 4, -1, "", 0.1))[0]
    ks = lambda m, c, la: nodes.common_ksampler(m, 1, 6, 5.0, "euler", "normal", c, neg,
                                                {"samples": la, "batch_index": [0] * la.shape[0]})[0]["samples"]
    pair = ks(CACHES[kind](masa), cond, lat["samples"])
    alone = ks(CACHES[kind](tiny_eps), encode(SRC), lat["samples"][:1])
    assert (pair[0] - alone[0]).abs().max() <= 1e-5 * alone[0].abs().max()
    assert (pair[1] - pair[0]).abs().mean() > 1e-3
    assert not torch.equal(pair, ks(masa, cond, lat["samples"]))
