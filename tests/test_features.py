"""Feature capture (core/features.py): decoder blocks from the discovered layout, the tensors Plug-and-Play
injects are the ones the capture records, features keep their gradient when asked, and q/k/v are the
attention's own inputs."""
import pytest
import torch

from editkit.attention.pnp import default_blocks
from editkit.core import denoiser as D
from editkit.core import features as F
from editkit.core import gradients as G
from editkit.core.introspect import DitBlock, Layout, attention_layout
from editkit.core.patches import call_attention, call_dit_block, chain_attention_override, chain_attn_replace, \
    chain_dit_block_replace
from editkit.nodes.attention_control import PlugAndPlayNode, PromptBatch
from ek_helpers import flux_pair_run, node_out, sample_ksampler

SRC, TGT = "a red circle on a white background", "a blue square on a white background"


def _meta_unet(name):
    import comfy.supported_models as sm
    from editkit.builtin_models import fullsize
    cls, cfg = {"sd15": (sm.SD15, fullsize.SD15_UNET), "sdxl": (sm.SDXL, fullsize.SDXL_UNET)}[name]
    return cls(dict(cfg)).get_model({}, device=torch.device("meta"))


def test_decoder_blocks_come_from_the_layout(tiny_eps, tiny_flux):
    lay = attention_layout(tiny_eps)
    assert lay.decoder_levels() == [(0, 1), (2, 3)]
    p = F.decoder_point(lay, -2)
    assert (p.key, p.channels, p.downsample) == (("output", 1), 64, 1)
    with pytest.raises(ValueError, match="finest"):
        F.decoder_point(lay, -1)
    with pytest.raises(ValueError, match="has 2"):
        F.decoder_point(lay, 2)
    # SD1.5: 4 levels of 3 blocks; DragDiffusion's "third decoder block" (diffusers up_blocks[2]) is output block 8
    sd15 = attention_layout(_meta_unet("sd15"))
    assert sd15.decoder_levels() == [(0, 1, 2), (3, 4, 5), (6, 7, 8), (9, 10, 11)]
    p = F.decoder_point(sd15, 2)
    assert (p.key, p.channels, p.downsample) == (("output", 8), 640, 1) and F.decoder_point(sd15, -2) == p
    assert p.hook() == F.Hook("output_entry", 9)
    sdxl = attention_layout(_meta_unet("sdxl"))
    assert len(sdxl.decoder_levels()) == 3
    p = F.decoder_point(sdxl, -2)
    assert (p.key, p.channels, p.downsample) == (("output", 5), 640, 1)
    # DiTs: the block at the same relative depth (7/8 through for level 2 of 4)
    assert F.decoder_point(tiny_flux, -2).key == ("single_block", 1)
    flux_dev = Layout("flux", dit_blocks=tuple([DitBlock("double_block", i, i) for i in range(19)]
                                               + [DitBlock("single_block", i, 19 + i) for i in range(38)]), dit_patch=2)
    assert F.decoder_point(flux_dev, 2).key == ("single_block", 30)
    sd3 = Layout("mmdit", dit_blocks=tuple(DitBlock("double_block", i, i) for i in range(24)), dit_patch=2)
    assert F.decoder_point(sd3, 2).key == ("double_block", 20)
    with pytest.raises(ValueError, match="no block layout"):
        F.decoder_point(Layout("other"), 2)
    with pytest.raises(ValueError, match="last UNet block"):
        F.feature_point(lay, "output", 3)


def _pnp_unet_run(tiny_eps, tiny_clip, encode, rows=None):
    cond, lat = node_out(PromptBatch.execute(tiny_clip, SRC, TGT, 64, 64))
    lay = attention_layout(tiny_eps)
    fb, _ = default_blocks(lay)
    n_in = len(tiny_eps.model.diffusion_model.input_blocks)
    h_point, skip_point = F.feature_point(lay, "output", fb - 1), F.feature_point(lay, "input", n_in - 1 - fb)
    base = tiny_eps.clone()
    cap = F.FeatureCapture([h_point, skip_point], rows=rows)
    cap.install(base)                                  # before Plug-and-Play: records the features it reads
    m = node_out(PlugAndPlayNode.execute(base, 0.75, 0.0, -1, -1))[0]
    seen = []

    def after(h, hsp, to):                            # after Plug-and-Play: what block fb receives
        if to["block"] == ("output", fb):
            seen.append((h.clone(), hsp.clone()))
        return h, hsp
    m.set_model_output_block_patch(after)
    import nodes
    nodes.common_ksampler(m, 1, 4, 5.0, "euler", "normal", cond, encode(""),
                          {"samples": lat["samples"], "batch_index": [0, 0]})
    return cap, h_point, skip_point, seen


def test_capture_records_the_features_plug_and_play_injects(tiny_eps, tiny_clip, encode):
    cap, h_point, skip_point, seen = _pnp_unet_run(tiny_eps, tiny_clip, encode)
    hs, skips = cap.captured(h_point), cap.captured(skip_point)
    assert len(hs) == len(skips) == len(seen) == 4                # one batched cond+uncond call per step
    for rec_h, rec_s, (h, hsp) in zip(hs, skips, seen):
        b = h.shape[0] // len(rec_h.cond_or_uncond)
        for ci in range(len(rec_h.cond_or_uncond)):
            s, t = ci * b, ci * b + 1
            assert torch.equal(rec_h.features[s], h[s]) and torch.equal(rec_s.features[s], hsp[s])
            if rec_h.step < 3:                                    # injected: the target got the source's features
                assert torch.equal(h[t], rec_h.features[s]) and torch.equal(hsp[t], rec_s.features[s])
                if rec_h.cond_or_uncond[ci] == 0:                  # ...which differ from its own (other prompt)
                    assert not torch.equal(rec_h.features[t], rec_h.features[s])
            else:
                assert torch.equal(h[t], rec_h.features[t])
    assert [r.step for r in hs] == [0, 1, 2, 3] and not hs[0].features.requires_grad
    # one row only
    cap1, h1, _, _ = _pnp_unet_run(tiny_eps, tiny_clip, encode, rows=lambda to, b: [0])
    assert [r.rows for r in cap1.captured(h1)] == [(0,)] * 4
    torch.testing.assert_close(cap1.captured(h1)[0].features, hs[0].features[:1], rtol=0, atol=0)


def test_flux_capture_records_the_block_output_plug_and_play_injects(tiny_flux, tiny_clip):
    base = tiny_flux.clone()
    point = F.feature_point(base, "double_block", 1)
    cap = F.FeatureCapture([point])
    cap.install(base)
    m = node_out(PlugAndPlayNode.execute(base, 0.8, 0.0, -1, -1))[0]
    outs = []

    def make(prev):
        def after(args, extra):
            out = call_dit_block(prev, args, extra)
            outs.append(out["img"].clone())
            return out
        return after
    chain_dit_block_replace(m, "double_block", 1, make)
    flux_pair_run(m, tiny_clip, SRC, TGT, steps=5)
    recs = cap.captured(point)
    assert len(recs) == len(outs) == 5
    for rec, img in zip(recs, outs):
        h, w = rec.features.shape[-2:]
        tokens = img.reshape(img.shape[0], h, w, -1).permute(0, 3, 1, 2)     # (B, C, h, w) like the capture
        assert rec.features.shape == (2, 64, 4, 4) and torch.equal(tokens[0], rec.features[0])
        injected = rec.step < 4                                   # progress 0, .2, .4, .6 < 0.8
        assert torch.equal(tokens[1], rec.features[0]) == injected
        assert not torch.equal(rec.features[1], rec.features[0])


@pytest.mark.parametrize("arch", ["unet", "flux"])
def test_captured_features_carry_gradients(arch, tiny_v, tiny_flux, encode):
    """Motion supervision's need: a loss on decoder features (upsampled to the latent) differentiates w.r.t.
    the latent, and the gradient matches finite differences; without grad=True the features are detached."""
    model, ch = (tiny_v, 4) if arch == "unet" else (tiny_flux, 16)
    lay = attention_layout(model)
    point = F.decoder_point(lay, -2)
    m = model.clone()
    cap, cap_nograd = F.FeatureCapture([point], rows=[0], grad=True), F.FeatureCapture([point])
    cap.install(m)
    cap_nograd.install(m)
    g = torch.Generator().manual_seed(5)
    lat, u = torch.randn(1, ch, 8, 8, generator=g), torch.randn(1, ch, 8, 8, generator=g)
    r = torch.randn(1, point.channels, 8, 8, generator=g)
    sigmas = D.schedule(m, "normal", 4)

    def loss(env, x, w):
        cap.clear()
        env.denoise(x, env.sigmas[2])
        return (cap.last(point).upsampled(x.shape[-2:]) * w).sum()

    def program(env):
        x, w = G.leaf(lat), G.leaf(r, False)
        with G.autograd():
            val = loss(env, x, w)
            assert val.requires_grad and not cap_nograd.last(point).features.requires_grad
            val.backward()
        with torch.no_grad():
            fd = (loss(env, lat + 1e-2 * u, w) - loss(env, lat - 1e-2 * u, w)) / 2e-2
        return float((x.grad * u).sum()), float(fd)

    analytic, numeric = G.run_with_gradients(m, {"positive": encode(SRC)}, program, sigmas, lat.shape)
    assert abs(numeric) > 1e-3
    assert abs(analytic - numeric) <= 1e-2 * abs(numeric), (analytic, numeric)


def test_qkv_are_the_attention_inputs(tiny_eps, tiny_flux, tiny_clip, encode):
    # UNet: the self-attention of the captured block, as the attention layer receives it
    lay = attention_layout(tiny_eps)
    point = F.feature_point(lay, "output", 1)
    sites = [s for s in lay.sites if (s.block, s.number) == point.key]
    m = tiny_eps.clone()
    spy = []

    def make(prev):
        def fn(q, k, v, extra):
            spy.append((q.clone(), k.clone(), v.clone(), extra["n_heads"]))
            return call_attention(prev, q, k, v, extra)
        return fn
    for s in sites:
        chain_attn_replace(m, "attn1", s.key, make)
    cap = F.FeatureCapture([point], qkv=True)
    cap.install(m)
    sample_ksampler(m, encode(SRC), encode(""), torch.zeros(1, 4, 8, 8), steps=2)
    recs = cap.captured(point)
    assert len(recs) == len(spy) == 2 and all(len(r.qkv) == len(sites) for r in recs)
    for rec, (q, k, v, heads) in zip(recs, spy):
        cq, ck, cv = rec.qkv[0]
        b, L, inner = q.shape
        assert cq.shape == (b, heads, L, inner // heads)
        for c, t in ((cq, q), (ck, k), (cv, v)):
            assert torch.equal(c, t.reshape(b, L, heads, -1).transpose(1, 2))
    # Flux: the joint attention of the captured double block (text tokens first)
    m = tiny_flux.clone()
    flux_spy = []

    def make_override(prev):
        def fn(func, *args, **kwargs):
            to = kwargs.get("transformer_options", {})
            if (to.get("block_type"), to.get("block_index")) == ("double", 1):
                flux_spy.append(args[0].clone())
            return prev(func, *args, **kwargs) if prev is not None else func(*args, **kwargs)
        return fn
    chain_attention_override(m, make_override)
    point = F.feature_point(m, "double_block", 1)
    cap = F.FeatureCapture([point], qkv=True)
    cap.install(m)
    flux_pair_run(m, tiny_clip, SRC, TGT, steps=2)
    recs = cap.captured(point)
    assert len(recs) == len(flux_spy) == 2
    for rec, q in zip(recs, flux_spy):
        assert len(rec.qkv) == 1 and torch.equal(rec.qkv[0][0], q) and rec.txt == 77
        assert q.shape[2] == rec.txt + 16                        # 77 text + 4x4 image tokens
