"""Block Cache (cache/blockcache.py) on the tiny Flux and SD3 DiTs: threshold 0 is plain sampling bit for
bit, a cached step equals the first block followed by the stored residual (independent reference: the
unpatched blocks run by hand), rows/branches never read each other's cache, the fixed schedule skips the
blocks it says, bad input."""
import pytest
import torch

from editkit.builtin_models import tiny
from editkit.cache import blockcache
from editkit.cache.store import RUN_KEY, RunCaches
from editkit.core.errors import EditKitInputError
from editkit.core.patches import chain_dit_block_replace, call_dit_block
from editkit.nodes.cache import BlockCacheNode
from ek_helpers import node_out, sample_ksampler


@pytest.fixture(scope="module")
def tiny_sd3_model():
    return tiny.tiny_sd3(seed=0)


def _bc(model, mode="threshold", threshold=0.08, interval=2, start=0.0, end=1.0):
    return node_out(BlockCacheNode.execute(model, mode, threshold, interval, start, end))[0]


def _lat(n=1, size=16):
    return torch.zeros(n, 16, size, size)


@pytest.fixture(params=["flux", "sd3"])
def dit(request, tiny_flux, tiny_sd3_model):
    return tiny_flux if request.param == "flux" else tiny_sd3_model


class BlockCounter:
    """Counts rows through every DiT block (chained after the cache's patches: it sees real block runs only)."""

    def __init__(self, m):
        from editkit.core.introspect import attention_layout
        self.rows = {}
        for b in attention_layout(m).dit_blocks:
            chain_dit_block_replace(m, b.kind, b.index, lambda prev, k=(b.kind, b.index): self._make(prev, k))

    def _make(self, prev, key):
        def fn(args, extra):
            self.rows[key] = self.rows.get(key, 0) + args["img"].shape[0]
            return call_dit_block(prev, args, extra)
        return fn


def _counted(model):
    """A clone whose block runs are counted; the cache is installed on top (so it wraps the counter)."""
    m = model.clone()
    return m, BlockCounter(m)


def test_threshold_zero_is_plain_sampling_exactly(dit, encode):
    pos, neg = encode("a red circle"), encode("")
    plain = sample_ksampler(dit, pos, neg, _lat(), steps=5)
    assert torch.equal(plain, sample_ksampler(_bc(dit, threshold=0.0), pos, neg, _lat(), steps=5))
    assert torch.equal(plain, sample_ksampler(_bc(dit, "uniform", interval=1), pos, neg, _lat(), steps=5))


@pytest.mark.parametrize("mode", ["uniform", "non-uniform"])
def test_fixed_schedule_runs_the_rest_only_on_key_steps(dit, encode, mode):
    from editkit.cache.schedule import key_steps
    steps = 6
    pos, neg = encode("a red circle"), encode("")
    base, count = _counted(dit)
    m = _bc(base, mode, interval=3)
    out = sample_ksampler(m, pos, neg, _lat(), steps=steps)
    keys = key_steps(steps, 3, mode)
    first, *rest = sorted(count.rows, key=lambda k: (k[0] != "double_block", k[1]))
    assert count.rows[first] == 2 * steps                     # the first block runs on every step
    assert all(count.rows[k] == 2 * len(keys) for k in rest)  # the others on key steps only
    plain = sample_ksampler(dit, pos, neg, _lat(), steps=steps)
    assert torch.isfinite(out).all() and not torch.equal(out, plain)
    assert (out - plain).norm() / plain.norm() < 0.25


def _forward(m, x, ctx, y, to, t=0.5):
    """One diffusion_model call as the sampler makes it (through apply_model: the APPLY_MODEL wrapper runs)."""
    import comfy.patcher_extension as pe
    base = {**m.model_options["transformer_options"], "wrappers": m.wrappers, **to}
    ts = torch.full((x.shape[0],), t)
    return m.model.apply_model(x, ts, c_crossattn=ctx, y=y, transformer_options=base)


def test_cached_step_is_first_block_plus_the_stored_residual(tiny_flux):
    """Independent reference: run the unpatched Flux blocks by hand-made replace patches on a plain clone:
    step 0 records (last output - first output) on the image tokens; step 1 runs the first block and adds it."""
    m = _bc(tiny_flux, "uniform", interval=2)
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    ctx, y = torch.randn(2, 5, 32, generator=g), torch.randn(2, 32, generator=g)
    sig = torch.tensor([1.0, 0.7, 0.4, 0.0])
    run = RunCaches()
    opts = lambda i: {"sample_sigmas": sig, "sigmas": sig[i:i + 1], RUN_KEY: run, "cond_or_uncond": [0, 1]}
    _forward(m, x0, ctx, y, opts(0), 0.9)
    cached = _forward(m, x1, ctx, y, opts(1), 0.6)
    # reference: plain clone; record the first block's output and the last block's image tokens
    ref = tiny_flux.clone()
    rec = {}
    from editkit.core.introspect import attention_layout
    blocks = attention_layout(ref).dit_blocks
    first, last = blocks[0], blocks[-1]

    def make(prev, role):
        def fn(args, extra):
            if role in ("middle", "last") and "res" in rec:
                out = {"img": args["img"]}
                if "txt" in args:
                    out["txt"] = args["txt"]
                if role == "last":
                    n = rec["res"].shape[1]
                    out["img"] = torch.cat([out["img"][:, :-n], out["img"][:, -n:] + rec["res"]], 1)
                return out
            out = call_dit_block(prev, args, extra)
            if role == "first":
                rec["h1"] = out["img"]
            if role == "last":
                n = rec["h1"].shape[1]
                rec["res"] = out["img"][:, -n:] - rec["h1"]
            return out
        return fn
    for b in blocks:
        role = "first" if b == first else "last" if b == last else "middle"
        chain_dit_block_replace(ref, b.kind, b.index, lambda prev, role=role: make(prev, role))
    _forward(ref, x0, ctx, y, {}, 0.9)
    expected = _forward(ref, x1, ctx, y, {}, 0.6)
    assert torch.allclose(cached, expected, atol=1e-5, rtol=1e-5)
    full = _forward(tiny_flux, x1, ctx, y, {}, 0.6)
    assert (cached - full).abs().max() > 100 * (cached - expected).abs().max() + 1e-7   # it reused
    space = next(iter(run.spaces.values()))
    assert (space["full_calls"], space["cached_calls"]) == (1, 1)


def test_threshold_skips_only_below_the_relative_change(tiny_sd3_model):
    """With a huge threshold every call after the first reuses; a changed input with threshold just above
    the measured change reuses, just below recomputes."""
    m = _bc(tiny_sd3_model, threshold=1.0)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(1, 16, 8, 8, generator=g)
    ctx, y = torch.randn(1, 5, 32, generator=g), torch.randn(1, 32, generator=g)
    sig = torch.tensor([1.0, 0.9, 0.8, 0.0])
    run = RunCaches()
    opts = lambda i: {"sample_sigmas": sig, "sigmas": sig[i:i + 1], RUN_KEY: run, "cond_or_uncond": [0]}
    _forward(m, x0, ctx, y, opts(0))
    _forward(m, x0 * 1.01, ctx, y, opts(1))
    space = next(iter(run.spaces.values()))
    assert (space["full_calls"], space["cached_calls"]) == (1, 1)
    # measured change of the first block's residual for the same pair, then thresholds either side
    r = {}

    def grab(prev):
        def fn(args, extra):
            out = call_dit_block(prev, args, extra)
            r.setdefault("r0", []).append(out["img"] - args["img"])
            return out
        return fn
    probe = tiny_sd3_model.clone()
    chain_dit_block_replace(probe, "double_block", 0, grab)
    _forward(probe, x0, ctx, y, {})
    _forward(probe, x0 * 1.01, ctx, y, {})
    change = float(blockcache.rel_change(r["r0"][1], r["r0"][0])[0])
    assert 0 < change < 0.5
    for thr, cached in ((change * 1.05, 1), (change * 0.95, 0)):
        m2, run2 = _bc(tiny_sd3_model, threshold=thr), RunCaches()
        o2 = lambda i: {"sample_sigmas": sig, "sigmas": sig[i:i + 1], RUN_KEY: run2, "cond_or_uncond": [0]}
        _forward(m2, x0, ctx, y, o2(0))
        _forward(m2, x0 * 1.01, ctx, y, o2(1))
        assert next(iter(run2.spaces.values())).get("cached_calls", 0) == cached


@pytest.mark.parametrize("mode,thr", [("uniform", 0.0), ("threshold", 0.3)])
def test_rows_never_read_each_others_cache(dit, encode, mode, thr):
    """Two rows of one batch (different noise: distinct cache keys, each row deciding alone) with caching:
    each row is exactly what it gives sampled alone with the same cache, and caching did act."""
    import nodes
    pos, neg = encode("a red circle on a white background"), encode("")
    ks = lambda m, idx: nodes.common_ksampler(m, 1, 6, 5.0, "euler", "normal", pos, neg,
                                              {"samples": _lat(len(idx)), "batch_index": idx})[0]["samples"]
    m = _bc(dit, mode, threshold=thr, interval=3)
    pair = ks(m, [0, 5])
    for row, idx in ((0, 0), (1, 5)):
        alone = ks(m, [idx])
        assert (pair[row] - alone[0]).abs().max() <= 1e-4 * alone[0].abs().max() + 1e-6
    assert not torch.equal(pair[:1], ks(dit, [0]))       # the cache acted


def test_bad_inputs(tiny_eps, tiny_flux, encode):
    with pytest.raises(EditKitInputError, match="threshold"):
        _bc(tiny_flux, threshold=1.5)
    with pytest.raises(EditKitInputError, match="threshold"):
        _bc(tiny_flux, threshold=-0.1)
    with pytest.raises(EditKitInputError, match="cache_interval"):
        _bc(tiny_flux, "uniform", interval=0)
    with pytest.raises(EditKitInputError, match="start_percent"):
        _bc(tiny_flux, start=0.5, end=0.5)
    with pytest.raises(EditKitInputError, match="(?s)model.*DeepCache"):
        _bc(tiny_eps)
    with pytest.raises(EditKitInputError, match="cache_interval"):
        sample_ksampler(_bc(tiny_flux, "uniform", interval=8), encode("a"), encode(""), _lat(), steps=4)


@pytest.mark.parametrize("mode,thr", [("uniform", 0.0), ("threshold", 0.5)])
def test_source_and_target_branches_never_read_each_others_cache(tiny_flux, mode, thr):
    """A source+target batch (branch contract, core/branches.py) through three calls of one run: each branch's
    outputs equal that branch replayed alone through a fresh run (its own cache only), and reuse happened."""
    from editkit.core.branches import with_branches
    m = _bc(tiny_flux, mode, threshold=thr, interval=3)
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(2, 16, 8, 8, generator=g) for _ in range(3)]
    ctx, y = torch.randn(2, 5, 32, generator=g), torch.randn(2, 32, generator=g)
    sig = torch.tensor([1.0, 0.95, 0.9, 0.0])
    branches = with_branches({"transformer_options": {"cond_or_uncond": [0]}}, ("source", "target"))["transformer_options"]
    run = RunCaches()
    outs = [_forward(m, x * (1 + 0.01 * i), ctx, y, {**branches, "sample_sigmas": sig, "sigmas": sig[i:i + 1], RUN_KEY: run},
                     0.9 - 0.01 * i) for i, x in enumerate([xs[0]] * 3)]
    assert next(iter(run.spaces.values())).get("cached_calls", 0) >= 1
    for r in range(2):
        alone_run = RunCaches()
        for i in range(3):
            to = {"cond_or_uncond": [0], "sample_sigmas": sig, "sigmas": sig[i:i + 1], RUN_KEY: alone_run}
            alone = _forward(m, xs[0][r:r + 1] * (1 + 0.01 * i), ctx[r:r + 1], y[r:r + 1], to, 0.9 - 0.01 * i)
            assert (alone[0] - outs[i][r]).abs().max() <= 1e-5 * outs[i][r].abs().max() + 1e-6
