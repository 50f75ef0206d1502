"""IP-Adapter: real file layouts detected, decoupled attention equal to an independent computation,
mask / step range / weight 0 / stacking behave as specified, errors name what was found."""
import os

import pytest
import torch

from editkit.adapters import demo_models as DM
from editkit.adapters import ipadapter as IPA
from editkit.builtin_models import fullsize, tiny
from editkit.core import patches as P
from editkit.core.errors import EditKitInputError
from ek_helpers import node_out, sample_ksampler


# ---------------------------------------------------------------------------------------------
# State dicts with the real files' key names and shapes (random values; large matrices are random
# rows broadcast over their first dimension, so the SDXL layouts cost no memory)
# ---------------------------------------------------------------------------------------------

def _t(shape, g, dtype=torch.float16):
    n = 1
    for s in shape:
        n *= s
    if n <= 1_100_000 or len(shape) < 2:
        return (torch.randn(shape, generator=g) * 0.02).to(dtype)
    return (torch.randn((1,) + tuple(shape[1:]), generator=g) * 0.02).to(dtype).expand(shape)


def _resampler(dim, depth, clip_dim, out_dim, tokens, g):
    sd = {"latents": _t((1, tokens, dim), g), "proj_in.weight": _t((dim, clip_dim), g), "proj_in.bias": _t((dim,), g),
          "proj_out.weight": _t((out_dim, dim), g), "proj_out.bias": _t((out_dim,), g),
          "norm_out.weight": torch.ones(out_dim, dtype=torch.float16), "norm_out.bias": _t((out_dim,), g)}
    for i in range(depth):
        p = f"layers.{i}."
        for n in ("0.norm1", "0.norm2", "1.0"):
            sd[p + n + ".weight"] = torch.ones(dim, dtype=torch.float16)
            sd[p + n + ".bias"] = _t((dim,), g)
        sd.update({p + "0.to_q.weight": _t((dim, dim), g), p + "0.to_kv.weight": _t((2 * dim, dim), g),
                   p + "0.to_out.weight": _t((dim, dim), g), p + "1.1.weight": _t((4 * dim, dim), g),
                   p + "1.3.weight": _t((dim, 4 * dim), g)})
    return sd


def real_state_dict(family: str, kind: str, clip_dim: int, nested: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    unet = fullsize.SD15_UNET if family == "sd15" else fullsize.SDXL_UNET
    sites = DM.unet_cross_sites(unet)
    cross = unet["context_dim"]
    if kind == "base":
        proj = {"proj.weight": _t((4 * cross, clip_dim), g), "proj.bias": _t((4 * cross,), g),
                "norm.weight": torch.ones(cross, dtype=torch.float16), "norm.bias": _t((cross,), g)}
    elif kind == "plus":
        dim = 768 if family == "sd15" else 1280
        proj = _resampler(dim, 4, clip_dim, cross, 16, g)
    else:  # full face
        proj = {"proj.0.weight": _t((clip_dim, clip_dim), g), "proj.0.bias": _t((clip_dim,), g),
                "proj.2.weight": _t((cross, clip_dim), g), "proj.2.bias": _t((cross,), g),
                "proj.3.weight": torch.ones(cross, dtype=torch.float16), "proj.3.bias": _t((cross,), g)}
    ip = {}
    for i, s in enumerate(sites):
        inner = s.heads * s.dim_head
        ip[f"{2 * i + 1}.to_k_ip.weight"] = _t((inner, cross), g)
        ip[f"{2 * i + 1}.to_v_ip.weight"] = _t((inner, cross), g)
    if nested:
        return {"image_proj": proj, "ip_adapter": ip}
    out = {f"image_proj.{k}": v for k, v in proj.items()}
    out.update({f"ip_adapter.{k}": v for k, v in ip.items()})
    return out


REAL = [  # (id, family, kind, clip input dim, nested .bin, expected name fragment, tokens per image)
    ("ip-adapter_sd15", "sd15", "base", 1024, False, "SD1.5 base (CLIP ViT-H/14)", 4),
    ("ip-adapter-plus_sd15", "sd15", "plus", 1280, False, "SD1.5 plus / plus-face (CLIP ViT-H/14)", 16),
    ("ip-adapter-plus-face_sd15.bin", "sd15", "plus", 1280, True, "SD1.5 plus / plus-face (CLIP ViT-H/14)", 16),
    ("ip-adapter-full-face_sd15", "sd15", "full", 1280, False, "SD1.5 full-face (CLIP ViT-H/14)", 257),
    ("ip-adapter_sdxl (bigG)", "sdxl", "base", 1280, False, "SDXL base (CLIP ViT-bigG/14)", 4),
    ("ip-adapter_sdxl_vit-h", "sdxl", "base", 1024, False, "SDXL base (CLIP ViT-H/14)", 4),
    ("ip-adapter-plus_sdxl_vit-h", "sdxl", "plus", 1280, False, "SDXL plus / plus-face (CLIP ViT-H/14)", 16),
]


@pytest.mark.parametrize("case", REAL, ids=[c[0] for c in REAL])
def test_real_variants_detected_and_project_to_right_token_count(case):
    _, family, kind, clip_dim, nested, name, tokens = case
    sd = real_state_dict(family, kind, clip_dim, nested)
    adapter = IPA.from_state_dict(sd)
    v = adapter.variant
    assert v.name == name
    assert v.layers == (16 if family == "sd15" else 70)
    assert v.layer_keys == tuple(range(1, 2 * v.layers, 2))
    feats = torch.randn(2, clip_dim) if kind == "base" else torch.randn(2, 257, clip_dim)
    toks = IPA.project(adapter, feats)
    assert toks.shape == (2, tokens, v.cross_dim) and torch.isfinite(toks).all()


def test_bin_file_and_unknown_files(tmp_path):
    sd = real_state_dict("sd15", "base", 1024, nested=True)
    path = tmp_path / "ip-adapter_sd15.bin"
    torch.save(sd, path)
    assert IPA.load(str(path)).variant.name == "SD1.5 base (CLIP ViT-H/14)"
    with pytest.raises(IPA.UnknownAdapter, match=r"found: .*proj_in"):
        IPA.detect({"image_proj.proj_in.weight": torch.zeros(4, 4), "ip_adapter.1.to_k_ip.weight": torch.zeros(4, 4),
                    "ip_adapter.1.to_v_ip.weight": torch.zeros(4, 4)})
    with pytest.raises(IPA.UnknownAdapter, match=r"no 'image_proj'.*model\.diffusion_model\.x"):
        IPA.detect({"model.diffusion_model.x": torch.zeros(2, 2)})
    with pytest.raises(IPA.UnknownAdapter, match="FaceID"):
        IPA.detect({"image_proj.proj.0.weight": torch.zeros(2, 2), "image_proj.perceiver_resampler.x": torch.zeros(1),
                    "ip_adapter.1.to_k_ip.weight": torch.zeros(4, 4), "ip_adapter.1.to_v_ip.weight": torch.zeros(4, 4),
                    "ip_adapter.1.to_k_lora.down.weight": torch.zeros(1, 4)})


def test_layer_order_is_files_order_for_sd15_and_sdxl():
    sd15 = DM.unet_cross_sites(fullsize.SD15_UNET)
    assert [(s.block, s.number) for s in sd15] == [("input", n) for n in (1, 2, 4, 5, 7, 8)] + \
        [("output", n) for n in range(3, 12)] + [("middle", 0)]
    xl = DM.unet_cross_sites(fullsize.SDXL_UNET)
    assert len(xl) == 70 and xl[0].key == ("input", 4, 0) and xl[-1].key == ("middle", 0, 9)
    style, comp = IPA.style_and_composition_blocks(xl)
    assert style == ("output", 1) and comp == ("input", 8)       # InstantStyle's up_blocks.0.attentions.1 / down_blocks.2.attentions.1
    w = IPA.layer_weights(xl, "style only")
    assert sum(w.values()) == 10 and all(w[s.key] == 1.0 for s in xl if (s.block, s.number) == ("output", 1))
    lin = IPA.layer_weights(sd15, "ease in")
    first, last = min(sd15, key=lambda s: s.order), max(sd15, key=lambda s: s.order)
    assert lin[first.key] == pytest.approx(1.0) and lin[last.key] == pytest.approx(0.05)


# ---------------------------------------------------------------------------------------------
# The patch on the tiny UNet
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_adapter():
    sd, meta = DM.make_ipadapter(dict(tiny.TINY_UNET, num_heads=2, num_head_channels=-1), "base", clip_dim=64, tokens=4,
                                 seed=3, std=0.2)
    return IPA.from_state_dict(sd, meta, "tiny")


def _tokens(seed, n=4, dim=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, n, dim, generator=g), torch.randn(1, n, dim, generator=g)


def _apply(model, adapter, weight=1.0, start=0.0, end=1.0, mask=None, weight_type="linear", seed=0):
    cond, uncond = _tokens(seed)
    app = IPA.Application(adapter, cond, uncond, weight, start, end, mask)
    pairs = IPA.match_layers(model, adapter, "test")
    m = model.clone()
    IPA.install(m, app, pairs, IPA.layer_weights([s for s, _ in pairs], weight_type))
    return m, app


class Probe(P.SharedPatch):
    """Outermost attn2 patch: records q, k, v, the layer output below it and the call context."""

    def __init__(self, site, prev, log):
        self.site, self.prev, self.log = site, prev, log

    def __call__(self, q, k, v, extra):
        out = P.call_attention(self.prev, q, k, v, extra)
        step = None
        if "sample_sigmas" in extra:
            from editkit.core import denoiser
            step = denoiser.step_index(extra["sample_sigmas"], extra["sigmas"])
        self.log.append(dict(site=self.site, q=q.clone(), k=k.clone(), v=v.clone(), out=out.clone(), step=step,
                             cou=list(extra["cond_or_uncond"]), heads=extra["n_heads"],
                             shape=extra.get("activations_shape"), extra=dict(extra)))
        return out


def probe(model):
    log = []
    for s in IPA.cross_sites(model):
        P.chain_attn_replace(model, "attn2", s.key, lambda prev, s=s: Probe(s, prev, log))
    return log


def reference_attention(q, k, v, heads):
    """softmax(q k^T / sqrt(d)) v per head, float64, on (B, L, heads * d)."""
    b, lq, inner = q.shape
    d = inner // heads
    qh = q.double().reshape(b, lq, heads, d).transpose(1, 2)
    kh = k.double().reshape(b, k.shape[1], heads, d).transpose(1, 2)
    vh = v.double().reshape(b, v.shape[1], heads, d).transpose(1, 2)
    p = (qh @ kh.transpose(-1, -2) / d ** 0.5).softmax(-1)
    return (p @ vh).transpose(1, 2).reshape(b, lq, inner)


def image_kv(adapter, app, key, cou, b):
    layer = adapter.module.ip_layers[key]
    toks = [app.cond if c == 0 else app.uncond for c in cou]
    t = torch.cat([x.expand(b, -1, -1) for x in toks]).double()
    return t @ layer.to_k_ip.weight.double().T, t @ layer.to_v_ip.weight.double().T


def test_patched_layers_equal_independent_computation(tiny_eps, encode, tiny_adapter):
    m, app = _apply(tiny_eps, tiny_adapter, weight=0.8)
    log = probe(m)
    sample_ksampler(m, encode("a red circle"), encode(""), torch.zeros(2, 4, 8, 8), steps=1)
    keys = dict((s.key, k) for s, k in IPA.match_layers(tiny_eps, tiny_adapter, "t"))
    assert len(log) == 7 and all(r["cou"] == [1, 0] for r in log)
    for r in log:
        b = r["q"].shape[0] // 2
        ki, vi = image_kv(tiny_adapter, app, keys[r["site"].key], r["cou"], b)
        ref = reference_attention(r["q"], r["k"], r["v"], r["heads"]) + 0.8 * reference_attention(r["q"].double(), ki, vi, r["heads"])
        assert torch.allclose(r["out"].double(), ref, atol=1e-5, rtol=1e-4), r["site"].key
        # the uncond chunk really used the uncond tokens
        wrong_k, wrong_v = image_kv(tiny_adapter, app, keys[r["site"].key], [0, 0], b)
        wrong = reference_attention(r["q"], r["k"], r["v"], r["heads"]) + 0.8 * reference_attention(r["q"].double(), wrong_k, wrong_v, r["heads"])
        assert not torch.allclose(r["out"][:b].double(), wrong[:b], atol=1e-5)


def test_weight_zero_and_empty_range_are_bit_identical(tiny_eps, encode, tiny_adapter, comfy_nodes):
    pos, neg, lat = encode("a red circle"), encode(""), torch.zeros(1, 4, 8, 8)
    plain = sample_ksampler(tiny_eps, pos, neg, lat, steps=3)
    m, _ = _apply(tiny_eps, tiny_adapter, weight=0.0)
    assert torch.equal(sample_ksampler(m, pos, neg, lat, steps=3), plain)
    m, _ = _apply(tiny_eps, tiny_adapter, weight=1.0)
    assert not torch.equal(sample_ksampler(m, pos, neg, lat, steps=3), plain)
    from editkit.nodes.adapters import IPAdapterApply
    cv = DM.clip_vision_from_state_dict(*_demo_clip())
    out = node_out(IPAdapterApply.execute(tiny_eps, tiny_adapter, cv, torch.rand(1, 64, 64, 3), 0.0, "linear", "average",
                                          0.0, 1.0))[0]
    assert torch.equal(sample_ksampler(out, pos, neg, lat, steps=3), plain)


def _demo_clip():
    sd, meta = DM.make_clip_vision()
    import json
    return sd, json.loads(meta[DM.CLIP_VISION_KEY])


def test_mask_confines_the_image_term(tiny_eps, encode, tiny_adapter):
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0                      # left half
    m, _ = _apply(tiny_eps, tiny_adapter, mask=mask)
    log = probe(m)
    sample_ksampler(m, encode("a red circle"), encode(""), torch.zeros(1, 4, 8, 8), steps=1)
    for r in log:
        text = P.default_attention(r["q"], r["k"], r["v"], r["extra"])
        h, w = int(r["shape"][2]), int(r["shape"][3])
        diff = (r["out"] - text).reshape(r["q"].shape[0], h, w, -1)
        assert torch.equal(diff[:, :, w // 2:], torch.zeros_like(diff[:, :, w // 2:])), r["site"].key
        assert diff[:, :, : w // 2].abs().amax(dim=(0, 3)).gt(0).all(), r["site"].key


def test_start_end_switch_at_the_right_steps(tiny_eps, encode, tiny_adapter):
    m, _ = _apply(tiny_eps, tiny_adapter, start=0.25, end=0.75)
    log = probe(m)
    sample_ksampler(m, encode("a red circle"), encode(""), torch.zeros(1, 4, 8, 8), steps=4)
    active = {}
    for r in log:
        text = P.default_attention(r["q"], r["k"], r["v"], r["extra"])
        active.setdefault(r["step"], set()).add(not torch.equal(r["out"], text))
    assert active == {0: {False}, 1: {True}, 2: {True}, 3: {False}}


def test_stacks_with_another_attn2_patch_and_itself(tiny_eps, encode, tiny_adapter):
    """A stand-in 'other pack' patch (scales the text attention) below, two adapters on top: all take effect."""
    calls = []

    def other(prev):
        def fn(q, k, v, extra):
            calls.append(1)
            return P.call_attention(prev, q, k, v, extra) * 0.5
        return fn
    base = tiny_eps.clone()
    for s in IPA.cross_sites(base):
        base.set_model_attn2_replace(other(None), s.key[0], s.key[1])      # 2-tuple keys, as many packs do
    m1, app1 = _apply(base, tiny_adapter, weight=0.6, seed=1)
    m2, app2 = _apply(m1, tiny_adapter, weight=0.3, seed=2)
    log = probe(m2)
    sample_ksampler(m2, encode("a red circle"), encode(""), torch.zeros(1, 4, 8, 8), steps=1)
    assert calls and len(calls) == len(log)
    keys = dict((s.key, k) for s, k in IPA.match_layers(tiny_eps, tiny_adapter, "t"))
    for r in log:
        b = r["q"].shape[0] // 2
        ref = 0.5 * reference_attention(r["q"], r["k"], r["v"], r["heads"])
        for app, w in ((app1, 0.6), (app2, 0.3)):
            ki, vi = image_kv(tiny_adapter, app, keys[r["site"].key], r["cou"], b)
            ref = ref + w * reference_attention(r["q"].double(), ki, vi, r["heads"])
        assert torch.allclose(r["out"].double(), ref, atol=1e-5, rtol=1e-4)
    # the models that were stacked on are untouched (immutable patches, copy-on-write options)
    assert all(not isinstance(p, IPA.IPAdapterAttn2) for p in base.model_options["transformer_options"]["patches_replace"]["attn2"].values())
    assert len(m1.get_additional_models_with_key(IPA.ADDITIONAL_MODELS_KEY)) == 1


@pytest.mark.parametrize("order", ["ip-adapter over p2p", "p2p over ip-adapter"])
def test_stacks_with_prompt_to_prompt(tiny_eps, tiny_clip, encode, tiny_adapter, order):
    """EditKitPromptToPrompt (word swap, source maps in every step) and the IP-Adapter on the same layers,
    in either order: the target row gets the source's cross-attention maps AND the image term."""
    from editkit.nodes.attention_control import PromptBatch, PromptToPromptNode
    src, tgt = "a red circle on a white background", "a blue circle on a white background"
    cond, lat = node_out(PromptBatch.execute(tiny_clip, src, tgt, 64, 64))

    def p2p(model):
        return node_out(PromptToPromptNode.execute(model, tiny_clip, src, tgt, "replace", 1.0, 0.0, "", "", 0.3))[0]
    if order == "ip-adapter over p2p":
        m, app = _apply(p2p(tiny_eps), tiny_adapter, weight=0.8)
    else:
        ipa, app = _apply(tiny_eps, tiny_adapter, weight=0.8)
        m = p2p(ipa)
    log = probe(m)
    import nodes
    nodes.common_ksampler(m, 1, 2, 5.0, "euler", "normal", cond, encode(""),
                          {"samples": lat["samples"], "batch_index": [0, 0]})
    keys = dict((s.key, k) for s, k in IPA.match_layers(tiny_eps, tiny_adapter, "t"))
    assert len(log) == 2 * 7
    for r in log:
        b = r["q"].shape[0] // len(r["cou"])
        ci = r["cou"].index(0)
        s_, t_ = ci * b, ci * b + 1                     # source and target rows of the conditional chunk
        ki, vi = image_kv(tiny_adapter, app, keys[r["site"].key], r["cou"], b)
        text = reference_attention(r["q"][s_:s_ + 1], r["k"][s_:s_ + 1], r["v"][t_:t_ + 1], r["heads"])
        image = reference_attention(r["q"][t_:t_ + 1].double(), ki[t_:t_ + 1], vi[t_:t_ + 1], r["heads"])
        assert torch.allclose(r["out"][t_:t_ + 1].double(), text + 0.8 * image, atol=1e-5, rtol=1e-4), r["site"].key


def test_adapter_weights_load_with_the_model(tiny_eps, encode, tiny_adapter):
    import comfy.model_management as mm
    m, app = _apply(tiny_eps, tiny_adapter)
    assert m.get_additional_models_with_key(IPA.ADDITIONAL_MODELS_KEY) == [tiny_adapter.patcher]
    assert not tiny_eps.get_additional_models_with_key(IPA.ADDITIONAL_MODELS_KEY)
    sample_ksampler(m, encode("a"), encode(""), torch.zeros(1, 4, 8, 8), steps=1)
    assert any(lm.model is tiny_adapter.patcher for lm in mm.current_loaded_models)


# ---------------------------------------------------------------------------------------------
# Nodes, files, errors
# ---------------------------------------------------------------------------------------------

def test_nodes_with_demo_files_and_batches(tiny_eps, encode):
    from editkit.adapters import demo_assets
    from editkit.nodes.adapters import IPAdapterApply, IPAdapterLoader, TinyCLIPVisionLoader
    plus = node_out(IPAdapterLoader.execute(demo_assets.ipadapter_file("tiny", "plus")))[0]
    base = node_out(IPAdapterLoader.execute(demo_assets.ipadapter_file("tiny")))[0]
    cv = node_out(TinyCLIPVisionLoader.execute(demo_assets.CLIP_VISION_FILE))[0]
    assert plus.variant.kind == "plus" and plus.variant.tokens == 16 and base.variant.tokens == 4
    imgs = torch.rand(3, 64, 64, 3)
    cond, uncond = IPA.image_tokens(plus, cv, imgs, "concat", "t")
    assert cond.shape == (1, 48, 32) and uncond.shape == cond.shape
    cond, uncond = IPA.image_tokens(base, cv, imgs, "average", "t", negative=torch.rand(1, 64, 64, 3))
    assert cond.shape == (1, 4, 32) and uncond.shape == (1, 4, 32)
    m = node_out(IPAdapterApply.execute(tiny_eps, plus, cv, imgs, 0.7, "style and composition", "concat", 0.0, 1.0,
                                        attn_mask=torch.ones(64, 64)))[0]
    out = sample_ksampler(m, encode("a red circle"), encode(""), torch.zeros(2, 4, 8, 8), steps=2)
    assert torch.isfinite(out).all()


def test_errors_name_what_was_found(tiny_eps, tiny_flux):
    from editkit.nodes.adapters import IPAdapterApply, IPAdapterLoader
    sd15 = IPA.from_state_dict(real_state_dict("sd15", "base", 1024))
    with pytest.raises(EditKitInputError, match=r"SD1\.5 base.*16 cross-attention layers.*model has 7 cross-attention layers with a 32-dim"):
        IPA.match_layers(tiny_eps, sd15, "EditKitIPAdapterApply")
    cv = DM.clip_vision_from_state_dict(*_demo_clip())
    with pytest.raises(EditKitInputError, match="does not support"):
        IPAdapterApply.execute(tiny_flux, sd15, cv, torch.rand(1, 64, 64, 3), 1.0, "linear", "average", 0.0, 1.0)
    with pytest.raises(EditKitInputError, match="not found"):
        IPAdapterLoader.execute("no-such-file.safetensors")
    sd, meta = DM.make_ipadapter(dict(tiny.TINY_UNET, num_heads=2, num_head_channels=-1), "base", clip_dim=48)
    wrong_clip = IPA.from_state_dict(sd, {"dim_head": 16})
    with pytest.raises(EditKitInputError, match=r"reads 48-dim image embeds but this CLIP vision model gives 64"):
        IPA.image_tokens(wrong_clip, cv, torch.rand(1, 64, 64, 3), "average", "EditKitIPAdapterApply")


def test_models_folder_registered(tmp_path):
    import folder_paths
    assert IPA.FOLDER in folder_paths.folder_names_and_paths
    paths, exts = folder_paths.folder_names_and_paths[IPA.FOLDER]
    assert os.path.join(folder_paths.models_dir, "ipadapter") in paths and ".safetensors" in exts and ".bin" in exts
    # an extra_model_paths.yaml entry ("ipadapter: <dir>") is added the same way; its files are listed
    folder_paths.add_model_folder_path(IPA.FOLDER, str(tmp_path))
    IPA.register_folder()
    (tmp_path / "my-ip-adapter.safetensors").write_bytes(b"")
    folder_paths.filename_list_cache.pop(IPA.FOLDER, None)
    assert "my-ip-adapter.safetensors" in folder_paths.get_filename_list(IPA.FOLDER)
    paths.remove(str(tmp_path))
    folder_paths.filename_list_cache.pop(IPA.FOLDER, None)


# ---------------------------------------------------------------------------------------------
# Full-size SD1.5
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sd15_full_layer_equals_independent_computation(sd15_full):
    adapter = IPA.from_state_dict(real_state_dict("sd15", "base", 1024))
    toks = IPA.project(adapter, torch.randn(2, 1024))
    app = IPA.Application(adapter, toks[:1], toks[1:], 0.7)
    pairs = IPA.match_layers(sd15_full, adapter, "t")
    m = sd15_full.clone()
    IPA.install(m, app, pairs, IPA.layer_weights([s for s, _ in pairs], "linear"))
    target = ("input", 7, 0)
    log = []
    P.chain_attn_replace(m, "attn2", target, lambda prev: Probe(target, prev, log))
    pos, neg = fullsize.sd15_conditioning(), fullsize.sd15_conditioning(seed=1)
    sample_ksampler(m, pos, neg, torch.zeros(1, 4, 32, 32), steps=1)
    assert len(log) == 1
    r = log[0]
    key = dict((s.key, k) for s, k in pairs)[target]
    b = r["q"].shape[0] // 2
    layer = adapter.module.ip_layers[key]
    dt = fullsize.compute_dtype_of(sd15_full)  # bf16 natively or fp32 through manual cast, by host
    t = torch.cat([(app.cond if c == 0 else app.uncond).to(dt).expand(b, -1, -1) for c in r["cou"]])
    ki = (t.double() @ layer.to_k_ip.weight.to(dt).double().T).to(dt)
    vi = (t.double() @ layer.to_v_ip.weight.to(dt).double().T).to(dt)
    ref = reference_attention(r["q"], r["k"], r["v"], r["heads"]) + 0.7 * reference_attention(r["q"], ki, vi, r["heads"])
    assert r["out"].dtype == dt and r["q"].shape == (2, 64, 1280)
    text = reference_attention(r["q"], r["k"], r["v"], r["heads"])
    err = (r["out"].double() - ref).abs().max() / ref.abs().max()
    term = (ref - text).abs().max() / ref.abs().max()
    print(f"sd15 input 7: relative error {float(err):.4f}, image term {float(term):.4f}")
    assert err < 0.02 and err < term / 5, (err, term)


def test_clip_vision_loader_reads_config_from_metadata_or_shapes(tmp_path):
    import comfy.utils
    sd, meta = DM.make_clip_vision()
    with_meta, without = tmp_path / "with.safetensors", tmp_path / "without.safetensors"
    comfy.utils.save_torch_file(sd, str(with_meta), metadata=meta)
    comfy.utils.save_torch_file(sd, str(without))
    for path in (with_meta, without):
        cv = DM.load_clip_vision(str(path))
        out = cv.encode_image(torch.rand(2, 64, 64, 3))
        assert out["image_embeds"].shape == (2, 64) and out["penultimate_hidden_states"].shape == (2, 50, 64)
