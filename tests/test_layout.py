"""Layout: regional attention (masked cross-attention, DenseDiffusion modulation) and MultiDiffusion,
each against an independent reference computed here; composition with a previous attention patch."""
import math

import pytest
import torch

from editkit.core.errors import EditKitInputError
from editkit.core.patches import chain_attn_replace, default_attention
from editkit.layout import regional_attention as ra
from editkit.layout.regions import make_region

NODE = "EditKitRegionalAttention"
BASE = "a red circle and a blue square on a white background"
LEFT = "a red circle on a white background"
NEG = "a green triangle on a black background"


def explicit(q, k, v, heads, bias=None):
    """softmax(q k^T / sqrt(d) + bias) v per head in float64; bias (B, Lq, Lk)."""
    b, lq, inner = q.shape
    d = inner // heads
    qh = q.double().reshape(b, lq, heads, d).transpose(1, 2)
    kh = k.double().reshape(b, k.shape[1], heads, d).transpose(1, 2)
    vh = v.double().reshape(b, v.shape[1], heads, d).transpose(1, 2)
    s = qh @ kh.transpose(-1, -2) / math.sqrt(d)
    if bias is not None:
        s = s + bias.double()[:, None]
    return (torch.softmax(s, -1) @ vh).transpose(1, 2).reshape(b, lq, inner)


def ctx_region(box=None, mask=None, tokens=5, dim=16, seed=0, label=""):
    g = torch.Generator().manual_seed(seed)
    return make_region(NODE, [[torch.randn(1, tokens, dim, generator=g), {}]], mask=mask, box=box, label=label)


def test_lowrank_bias_is_exact():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 12, 2 * 8, generator=g) for _ in range(3))
    qf, kf = torch.randn(2, 12, 3, generator=g), torch.randn(2, 12, 3, generator=g)
    out = ra.lowrank_bias_attention(q, k, v, {"n_heads": 2}, qf, kf)
    ref = explicit(q, k, v, 2, qf @ kf.transpose(1, 2))
    assert torch.allclose(out.double(), ref, atol=1e-4)


def _call(regions, mode="masked", global_in_regions=True, lat=(4, 4), base=6, cou=(0, 1), seed=3, heads=2, d=8):
    """One attn2 call on a 4x4 latent grid (16 queries): base tokens then each region's tokens."""
    reg = ra.RegionalAttention(NODE, regions, mode=mode, global_in_regions=global_in_regions, downscale=8)
    g = torch.Generator().manual_seed(seed)
    lens = [r.context.shape[1] for r in regions]
    b, lq, lk = len(cou), lat[0] * lat[1], base + sum(lens)
    q, k, v = (torch.randn(b, n, heads * d, generator=g) for n in (lq, lk, lk))
    extra = {"n_heads": heads, "original_shape": [b, 4, *lat], "cond_or_uncond": list(cou), ra.MARK: (base, tuple(lens))}
    return reg, q, k, v, extra


def test_masked_cross_attention_equals_explicit_reference():
    left = ctx_region(box=(0, 0, 16, 32), seed=1)          # left half of a 32x32 px image (4x4 latent)
    right = ctx_region(box=(16, 0, 16, 32), tokens=3, seed=2)
    reg, q, k, v, extra = _call([left, right])
    out = reg.replace(None)(q, k, v, extra)
    # reference: allowed(p, j) built token by token from the boxes
    xs = torch.arange(16) % 4
    bias = torch.zeros(2, 16, 14)
    bias[:, :, 6:] = -1e9
    bias[0, xs < 2, 6:11] = 0          # cond row: left pixels see the left prompt
    bias[0, xs >= 2, 11:14] = 0        # right pixels the right one; the uncond row sees neither
    assert torch.allclose(out.double(), explicit(q, k, v, 2, bias), atol=1e-4)
    # zero attention outside a region to its tokens: changing the left prompt's values moves only left pixels
    v2 = v.clone()
    v2[:, 6:11] += 5.0
    out2 = reg.replace(None)(q, k, v2, extra)
    moved = (out2 - out).abs().amax(-1)
    assert float(moved[0, xs >= 2].max()) < 1e-5 and float(moved[1].max()) < 1e-5
    assert float(moved[0, xs < 2].min()) > 1e-3


def test_global_prompt_outside_regions_only():
    left = ctx_region(box=(0, 0, 16, 32), seed=1)
    reg, q, k, v, extra = _call([left], global_in_regions=False)
    out = reg.replace(None)(q, k, v, extra)
    xs = torch.arange(16) % 4
    bias = torch.zeros(2, 16, 11)
    bias[:, :, 6:] = -1e9
    bias[0, xs < 2, 6:] = 0
    bias[0, xs < 2, :6] = -1e9
    assert torch.allclose(out.double(), explicit(q, k, v, 2, bias), atol=1e-4)


def test_dense_diffusion_modulation_equals_formula():
    left = ctx_region(box=(0, 0, 16, 32), seed=1)
    reg, q, k, v, extra = _call([left], mode="dense_diffusion")
    out = reg.replace(None)(q, k, v, extra)           # no sigmas: lambda = strength = 1
    heads, d = 2, 8
    qh = q.double().reshape(2, 16, heads, d).transpose(1, 2)
    kh = k.double().reshape(2, 11, heads, d).transpose(1, 2)
    s = qh @ kh.transpose(-1, -2) / math.sqrt(d)
    R = (torch.arange(16) % 4 < 2).double()[None, None, :, None]
    smax, smin = s.amax(-1, keepdim=True), s.amin(-1, keepdim=True)
    mod = torch.zeros_like(s)
    mod[0, :, :, 6:] = 0.5 * (R[0] * (smax[0] - s[0, :, :, 6:]) - (1 - R[0]) * (s[0, :, :, 6:] - smin[0]))
    mod[1, :, :, 6:] = -1e9
    vh = v.double().reshape(2, 11, heads, d).transpose(1, 2)
    ref = (torch.softmax(s + mod, -1) @ vh).transpose(1, 2).reshape(2, 16, heads * d)
    assert torch.allclose(out.double(), ref, atol=1e-4)


def test_composes_with_previous_attn2_patch():
    """prev runs on the original tokens and the regional change is added on top."""
    seen = []

    def prev(q, k, v, extra):
        seen.append(k.shape[1])
        return default_attention(q, k, 2 * v, extra)       # a patch that doubles the attention output
    left = ctx_region(box=(0, 0, 32, 32), seed=1)          # whole image
    reg, q, k, v, extra = _call([left], global_in_regions=False)
    out = reg.replace(prev)(q, k, v, extra)
    assert seen == [6]
    a0 = explicit(q[:, :, :], k[:, :6], v[:, :6], 2)
    areg = explicit(q, k[:, 6:], v[:, 6:], 2)
    ref = 2 * a0 + torch.stack([areg[0], a0[1]]) - a0       # cond row regional, uncond row unchanged
    assert torch.allclose(out.double(), ref, atol=1e-4)
    # an inactive call goes straight to prev, bit-identical
    extra.pop(ra.MARK)
    assert torch.equal(reg.replace(prev)(q, k[:, :6], v[:, :6], extra), prev(q, k[:, :6], v[:, :6], extra))


def _sample(model, pos, neg, steps=2, size=16, seed=1):
    from ek_helpers import sample_ksampler
    return sample_ksampler(model, pos, neg, torch.zeros(1, 4, size, size), seed=seed, steps=steps, cfg=4.0)


def test_full_region_without_global_equals_plain_with_region_prompt(tiny_eps, encode):
    """A region covering the whole image, global prompt off: every cond pixel attends only to the region
    prompt, i.e. the plain model sampled with that prompt (independent reference); uncond untouched."""
    base, left, neg = encode(BASE), encode(LEFT), encode(NEG)
    m = tiny_eps.clone()
    r = make_region(NODE, left, box=(0, 0, 128, 128))
    n = ra.install(m, ra.RegionalAttention(NODE, [r], global_in_regions=False, downscale=8))
    assert n > 0
    out = _sample(m, base, neg)
    ref = _sample(tiny_eps, left, neg)
    plain = _sample(tiny_eps, base, neg)
    err, effect = (out - ref).abs().max(), (plain - ref).abs().max()
    assert err < 1e-5 * ref.abs().max()          # float32 rounding of the extra channels
    assert err < 0.01 * effect                   # the prompts differ far more than that


def test_model_composition_with_existing_patch_and_errors(tiny_eps, encode):
    from editkit.core.introspect import attention_layout
    base, left, neg = encode(BASE), encode(LEFT), encode(NEG)
    seen = set()

    def make(prev):
        def fn(q, k, v, extra):
            seen.add(k.shape[1])
            return default_attention(q, k, v, extra) * 1.5
        return fn
    first = tiny_eps.clone()
    for s in attention_layout(first).sites:
        chain_attn_replace(first, "attn2", s.key, make)
    both = first.clone()
    r = make_region(NODE, left, box=(0, 0, 64, 128))
    # active only below sigma 0: never -> identical to the first patch alone, which still runs
    ra.install(both, ra.RegionalAttention(NODE, [r], sigma_start=-1.0, sigma_end=-2.0))
    assert torch.equal(_sample(both, base, neg), _sample(first, base, neg))
    both2 = first.clone()
    ra.install(both2, ra.RegionalAttention(NODE, [r]))
    seen.clear()
    out = _sample(both2, base, neg)
    assert seen == {77}                        # the previous patch saw only the original tokens
    assert (out - _sample(first, base, neg)).abs().max() > 1e-3
    # a box outside the image: a clear error naming the region
    bad = tiny_eps.clone()
    ra.install(bad, ra.RegionalAttention(NODE, [make_region(NODE, left, box=(100, 0, 64, 64), label="left")]))
    with pytest.raises(EditKitInputError, match="outside the 128x128"):
        _sample(bad, base, neg)
    wrong = tiny_eps.clone()
    ra.install(wrong, ra.RegionalAttention(NODE, [make_region(NODE, left, mask=torch.ones(1, 64, 128))]))
    with pytest.raises(EditKitInputError, match="aspect ratio"):
        _sample(wrong, base, neg)


# ---------------------------------------------------------------------------------------------
# MultiDiffusion
# ---------------------------------------------------------------------------------------------

from editkit.layout import multidiffusion as mdiff  # noqa: E402

MD = "EditKitMultiDiffusion"


def _direct(am, a):
    return am(a["input"], a["timestep"], **a["c"])


def _call_md(model, md, x, sigma, ctx, cou):
    fn = md.wrapper(_direct)
    c = {"c_crossattn": ctx, "transformer_options": {"cond_or_uncond": cou}}
    return fn(model.model.apply_model, {"input": x, "timestep": sigma, "c": c, "cond_or_uncond": cou})


def test_one_window_covering_everything_equals_plain(tiny_eps, encode):
    base, neg = encode(BASE), encode(NEG)
    m = tiny_eps.clone()
    mdiff.install(m, mdiff.MultiDiffusion(MD, (16, 16), 8))
    assert torch.equal(_sample(m, base, neg), _sample(tiny_eps, base, neg))


@pytest.mark.parametrize("weighting", ["uniform", "gaussian"])
def test_window_blend_equals_reference(tiny_eps, encode, weighting):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 40, generator=g) * 3
    sigma = torch.tensor([3.0, 3.0])
    ctx = torch.cat([encode(BASE)[0][0], encode(NEG)[0][0]])
    out = _call_md(tiny_eps, mdiff.MultiDiffusion(MD, (16, 16), 8, weighting), x, sigma, ctx, [0, 1])
    # reference: crops at x = 0, 8, 16, 24 (the last flush with the end), predictions averaged per pixel
    n = 16
    if weighting == "uniform":
        w = torch.ones(n, n)
    else:
        t = torch.arange(n, dtype=torch.float64)
        a = torch.exp(-((t - 7.5) ** 2) / 256 / 0.02)
        w = (a[:, None] * a[None, :]).float()
    acc, cnt = torch.zeros_like(x), torch.zeros(1, 1, 16, 40)
    for x0 in (0, 8, 16, 24):
        pred = tiny_eps.model.apply_model(x[..., x0:x0 + 16], sigma, c_crossattn=ctx, transformer_options={})
        acc[..., x0:x0 + 16] += pred * w
        cnt[..., x0:x0 + 16] += w
    ref = acc / cnt
    assert torch.allclose(out, ref, atol=1e-4 * float(ref.abs().max()))
    # blending is not a no-op: a single 40-wide call differs
    whole = tiny_eps.model.apply_model(x, sigma, c_crossattn=ctx, transformer_options={})
    assert (whole - ref).abs().max() > 1e-3


def test_region_prompt_blend_and_errors(tiny_eps, encode):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 24, generator=g) * 3
    sigma = torch.tensor([2.0, 2.0])
    base, left, neg = encode(BASE)[0][0], encode(LEFT)[0][0], encode(NEG)[0][0]
    ctx = torch.cat([base, neg])
    r = make_region(MD, [[left, {}]], box=(0, 0, 64, 128))                # left 8 latent columns
    out = _call_md(tiny_eps, mdiff.MultiDiffusion(MD, (16, 16), 8, regions=[r]), x, sigma, ctx, [0, 1])
    # reference: cond row = region prompt on the left 8 columns, global prompt elsewhere (windowed);
    # the uncond row only windowed
    glob = _call_md(tiny_eps, mdiff.MultiDiffusion(MD, (16, 16), 8), x, sigma, ctx, [0, 1])
    reg = _call_md(tiny_eps, mdiff.MultiDiffusion(MD, (16, 16), 8), x[:1], sigma[:1], left, [0])
    ref = glob.clone()
    ref[0, :, :, :8] = reg[0, :, :, :8]
    assert torch.allclose(out, ref, atol=1e-4 * float(ref.abs().max()))
    assert (out - glob).abs().max() > 1e-3
    with pytest.raises(EditKitInputError, match="smaller than one window"):
        _call_md(tiny_eps, mdiff.MultiDiffusion(MD, (16, 32), 8), x, sigma, ctx, [0, 1])
