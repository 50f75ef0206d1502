"""Regional attention on SD3/Flux joint attention (the text part): the mask factors against an explicit
masked softmax computed here, locality (a region prompt never reaches image tokens outside its region in
an attention call), the whole model on tiny Flux and tiny SD3, and bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

from editkit.builtin_models import tiny
from editkit.core.errors import EditKitInputError
from editkit.core.patches import chain_attention_override
from editkit.layout import regional_attention as ra, regional_joint as rj
from editkit.layout.regions import make_region

NODE = "EditKitRegionalAttention"


def dense_reference(q, k, v, T0, spans, m, global_in_regions=True):
    """Explicit -inf mask over the joint sequence [global text, region texts, image]; float64."""
    b, h, L, d = q.shape
    txt = T0 + sum(n for _, n in spans)
    allow = torch.ones(b, L, L, dtype=torch.bool)
    for r, (s, n) in enumerate(spans):
        allow[:, :T0, s:s + n] = False                     # global text rows: no region tokens
        for o, (s2, n2) in enumerate(spans):
            if o != r:
                allow[:, s:s + n, s2:s2 + n2] = False      # region rows: not other regions' tokens
        allow[:, txt:, s:s + n] = m[:, :, r, None] > 0.5   # image rows: only inside the region
    if not global_in_regions:
        allow[:, txt:, :T0] = (m.amax(-1) < 0.5)[:, :, None]
    s = q.double() @ k.double().transpose(-1, -2) / math.sqrt(d)
    s = s.masked_fill(~allow[:, None], float("-inf"))
    return torch.softmax(s, -1) @ v.double()


@pytest.mark.parametrize("global_in_regions", [True, False])
def test_joint_mask_equals_explicit_and_is_local(global_in_regions):
    g = torch.Generator().manual_seed(0)
    b, h, d, T0, lens, img = 2, 2, 16, 4, (3, 2), 16
    txt = T0 + sum(lens)
    L = txt + img
    q, k, v = (torch.randn(b, h, L, d, generator=g) for _ in range(3))
    m = torch.zeros(b, img, 2)
    m[:, :8, 0] = 1.0                      # region 1: first half of the image tokens
    m[:, 4:12, 1] = 1.0                    # region 2 overlaps it
    starts = [T0, T0 + lens[0]]

    def run(k, v):
        qf, kf = ra.masked_factors(m, T0, starts, lens, L, global_in_regions, q_text=txt)
        t = lambda x: x.transpose(1, 2)
        qa, ka, va = ra.lowrank_augment(t(q), t(k), t(v), qf, kf)
        return F.scaled_dot_product_attention(t(qa), t(ka), t(va))[..., :d]   # the kernel's own 1/sqrt(dp)
    out = run(k, v)
    ref = dense_reference(q, k, v, T0, list(zip(starts, lens)), m, global_in_regions)
    assert (out.double() - ref).abs().max() < 1e-4      # float32 rounding of the extra channels
    # perturb region 1's prompt tokens: image tokens outside region 1 and the global text rows are unchanged
    k2, v2 = k.clone(), v.clone()
    k2[:, :, T0:T0 + 3] += 3 * torch.randn(b, h, 3, d, generator=g)
    v2[:, :, T0:T0 + 3] += 3 * torch.randn(b, h, 3, d, generator=g)
    out2 = run(k2, v2)
    outside = torch.cat([torch.arange(T0), txt + torch.arange(8, img)])
    inside = txt + torch.arange(8)
    assert torch.equal(out2[:, :, outside], out[:, :, outside])
    assert (out2[:, :, inside] - out[:, :, inside]).abs().max() > 1e-2


def _model(kind):
    return tiny.tiny_flux(seed=0) if kind == "flux" else tiny.tiny_sd3(seed=0)


def _call(m, x, ctx, y):
    to = {**m.model_options.get("transformer_options", {}), "wrappers": m.wrappers}   # as sampler_helpers merges them
    sigma = torch.full((x.shape[0],), 0.5)
    to["cond_or_uncond"] = [0] * x.shape[0]
    to["sigmas"] = sigma
    return m.model.apply_model(x, sigma, c_crossattn=ctx, transformer_options=to, y=y)


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_model_regions_on_dit(kind):
    base = _model(kind)
    dim = tiny.CONTEXT_DIM
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 8, 8, generator=g)
    ctx = torch.randn(1, 6, dim, generator=g)
    y = torch.randn(1, 32 if kind == "flux" else dim, generator=g)
    rctx = torch.randn(1, 5, dim, generator=g)
    plain = _call(base, x, ctx, y)
    scale = (_call(base, x, torch.randn(1, 6, dim, generator=g), y) - plain).abs().max()   # a prompt's effect
    assert scale > 0
    # a region below every token's half coverage (empty at the token grid): the global and image streams
    # are exactly those of the plain model
    speck = torch.zeros(1, 64, 64)
    speck[:, 0, 0] = 1.0
    empty = base.clone()
    rj.install(empty, ra.RegionalAttention(NODE, [make_region(NODE, [[rctx, {}]], mask=speck)]))
    # (up to float32 rounding of the output, a few ulps: the extra mask channels change the kernels' summation
    # order on some CPUs, e.g. 1 ulp with ATEN_CPU_CAPABILITY=avx2)
    ulps = 8 * torch.finfo(torch.float32).eps * float(plain.abs().max())
    assert (_call(empty, x, ctx, y) - plain).abs().max() < max(1e-3 * float(scale), ulps)
    # a region covering the whole image changes the result (the region prompt is seen)
    full = base.clone()
    rj.install(full, ra.RegionalAttention(NODE, [make_region(NODE, [[rctx, {}]], mask=torch.ones(1, 64, 64))]))
    assert (_call(full, x, ctx, y) - plain).abs().max() > 0.05 * scale
    # the same region on the left half, against an independent reference: the plain model on the context
    # [prompt, region prompt] with the explicit mask of dense_reference in every joint attention call
    left = torch.zeros(1, 64, 64)
    left[:, :, :32] = 1.0
    half = base.clone()
    rj.install(half, ra.RegionalAttention(NODE, [make_region(NODE, [[rctx, {}]], mask=left)]))
    m_tok = torch.zeros(1, 16, 1)
    m_tok[0, :, 0] = (torch.arange(16) % 4 < 2).float()      # the 4x4 token grid's left half
    ref_model = base.clone()

    def make(prev):
        def fn(func, q, k, v, heads, **kw):
            q4, k4, v4 = (t if kw.get("skip_reshape") else t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)
                          for t in (q, k, v))
            if q4.shape[2] != 6 + 5 + 16:
                return func(q, k, v, heads, **kw)
            out = dense_reference(q4, k4, v4, 6, [(6, 5)], m_tok).to(q.dtype)
            return out if kw.get("skip_output_reshape") else out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)
        return fn
    chain_attention_override(ref_model, make)
    got, want = _call(half, x, ctx, y), _call(ref_model, x, torch.cat([ctx, rctx], 1), y)
    # (the tiny models' random weights move the denoised output by ~1e-5 against values ~4: float32 rounding
    # of the output is ~5e-7, so the bound is relative to the region's own effect)
    assert (got - want).abs().max() < 0.02 * (got - plain).abs().max()
    # a mask of the wrong aspect ratio: an error naming the region's mask
    bad = base.clone()
    rj.install(bad, ra.RegionalAttention(NODE, [make_region(NODE, [[rctx, {}]], mask=torch.ones(1, 32, 64), label="left")]))
    with pytest.raises(EditKitInputError, match="left mask"):
        _call(bad, x, ctx, y)
    if kind == "flux":          # a text attention mask would leave region tokens unmasked: refused, named
        with pytest.raises(EditKitInputError, match="attention mask"):
            to = {**half.model_options["transformer_options"], "wrappers": half.wrappers, "cond_or_uncond": [0]}
            half.model.apply_model(x, torch.full((1,), 0.5), c_crossattn=ctx, transformer_options=to, y=y,
                                   attention_mask=torch.ones(1, 6))


def test_node_on_dit_refuses_dense_mode_and_wrong_context():
    from editkit.nodes.layout import RegionalAttention
    m = tiny.tiny_flux(seed=0)
    r = make_region(NODE, [[torch.randn(1, 5, tiny.CONTEXT_DIM), {}]], box=(0, 0, 32, 64))
    out = RegionalAttention.execute(m, [r], "masked", 1.0, True, 0.0, 1.0)
    assert out.args[0] is not m
    with pytest.raises(EditKitInputError, match="mode"):
        RegionalAttention.execute(m, [r], "dense_diffusion", 1.0, True, 0.0, 1.0)
    wide = make_region(NODE, [[torch.randn(1, 5, 48), {}]], box=(0, 0, 32, 64))
    with pytest.raises(EditKitInputError, match="48-wide"):
        RegionalAttention.execute(m, [wide], "masked", 1.0, True, 0.0, 1.0)
