"""Attention control: identity/bit-exactness, each technique's edit equal to an independent reference
computed here, injections counted per layer and step, composition with another pack's patch, DiTs."""
import math

import pytest
import torch

from editkit.attention import alignment
from editkit.attention.controller import Rows, Technique, adain, branch_layout
from editkit.attention.prompt_to_prompt import PromptToPrompt, make_plan
from editkit.core.introspect import attention_layout
from editkit.core.patches import default_attention
from editkit.nodes.attention_control import (MasaCtrlNode, PlugAndPlayNode, PromptBatch, PromptToPromptNode,
                                             ReferenceAttentionNode, StyleAlignedNode, encode_batch)
from ek_helpers import flux_pair_run, node_out

SRC = "a red circle on a white background"
TGT = "a blue circle on a white background"
STEPS = 4


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def batch(clip, src=SRC, tgt=TGT, size=64):
    cond, lat = node_out(PromptBatch.execute(clip, src, tgt, size, size))
    return cond, lat["samples"]


def ks(model, cond, neg, lat, steps=STEPS, cfg=5.0):
    import nodes
    n = lat.shape[0]
    return nodes.common_ksampler(model, 1, steps, cfg, "euler", "normal", cond, neg,
                                 {"samples": lat, "batch_index": [0] * n})[0]["samples"]


def manual_attention(q, k, v, heads, bias=None):
    """softmax(q k^T / sqrt(d) + bias) v per head, float64, on (B, L, heads*d) tensors."""
    b, lq, inner = q.shape
    d = inner // heads
    qh = q.double().reshape(b, lq, heads, d).transpose(1, 2)
    kh = k.double().reshape(b, k.shape[1], heads, d).transpose(1, 2)
    vh = v.double().reshape(b, v.shape[1], heads, -1).transpose(1, 2)
    logits = qh @ kh.transpose(-1, -2) / math.sqrt(d)
    if bias is not None:
        logits = logits + bias.double().reshape(bias.shape[0], 1, 1, -1)
    return (logits.softmax(-1) @ vh).transpose(1, 2).reshape(b, lq, -1)


class Spy:
    """A replace patch installed AFTER a technique: records inputs and the chain's output per call."""

    def __init__(self, m, kind, sites):
        from editkit.core.patches import chain_attn_replace
        self.calls = []
        for s in sites:
            chain_attn_replace(m, kind, s.key, lambda prev, s=s: self._make(prev, s))

    def _make(self, prev, site):
        def fn(q, k, v, extra):
            out = prev(q, k, v, extra) if prev is not None else default_attention(q, k, v, extra)
            from editkit.attention.controller import step_of
            self.calls.append(dict(site=site, step=step_of(extra)[0], q=q.clone(), k=k.clone(), v=v.clone(), out=out.clone(),
                                   heads=extra["n_heads"], cou=list(extra["cond_or_uncond"])))
            return out
        fn.prev = prev
        return fn


def find_tech(m, cls=Technique):
    """The technique object an EditKit node installed on m (read before any spy is chained on top)."""
    to = m.model_options["transformer_options"]
    objs = [to.get("optimized_attention_override")]
    for kind in ("attn1", "attn2"):
        objs += list(to.get("patches_replace", {}).get(kind, {}).values())
    for o in objs:
        while o is not None:
            tech = getattr(o, "tech", None)
            # compare by name: `from editkit.x import C` can bind a second copy of a module not yet imported by the pack
            if tech is not None and cls.__name__ in {c.__name__ for c in type(tech).__mro__}:
                return tech
            o = getattr(o, "prev", None)
    raise AssertionError("no technique installed")


@pytest.fixture(scope="module")
def flux_attn():
    """Tiny Flux with its RMSNorm scales set to 1 (the shared fixture leaves them 0, i.e. uniform attention)."""
    from editkit.builtin_models import tiny
    f = tiny.tiny_flux(seed=0)
    with torch.no_grad():
        for n, p in f.model.diffusion_model.named_parameters():
            if n.endswith(".scale"):
                p.fill_(1.0)
    return f


# ---------------------------------------------------------------------------------------------
# batch layout and prompt batch
# ---------------------------------------------------------------------------------------------

def test_branch_layout_contract():
    # generated pair: row 0 of each chunk is the source
    c = branch_layout([1, 0], 6)
    assert [(x.start, x.cond, x.source, x.targets) for x in c] == [(0, False, (0,), [1, 2]), (3, True, (3,), [4, 5])]
    assert c[1].pairs == ((4, 3, 0), (5, 3, 1))
    # EditKit branch sampler: branches stacked inside every chunk, source first
    c = branch_layout([1, 0], 8, ("source", "target"))
    assert c[0].pairs == ((2, 0, 0), (3, 1, 1)) and c[1].pairs == ((6, 4, 0), (7, 5, 1)) and c[1].source == (4, 5)


def test_prompt_batch_shares_noise_and_orders_rows(tiny_eps, tiny_clip, encode):
    cond, lat = batch(tiny_clip, SRC, SRC + "\n" + TGT)
    assert cond[0][0].shape[0] == 3 and lat.shape == (3, 4, 8, 8)
    assert torch.equal(cond[0][0][0], encode(SRC)[0][0][0]) and torch.equal(cond[0][0][2], encode(TGT)[0][0][0])
    out = ks(tiny_eps, cond, encode(""), lat)
    assert torch.equal(out[0], out[1]) and not torch.allclose(out[0], out[2])   # same noise, same prompt


def test_prompt_batch_errors(tiny_clip):
    with pytest.raises(ValueError, match="input 'target_prompts'"):
        PromptBatch.execute(tiny_clip, SRC, "  \n ", 64, 64)
    with pytest.raises(ValueError, match="different lengths"):
        PromptBatch.execute(tiny_clip, SRC, " ".join(["word"] * 90), 64, 64)


# ---------------------------------------------------------------------------------------------
# identity: no edit -> bit-identical
# ---------------------------------------------------------------------------------------------

def test_identity_controllers_are_bit_identical(tiny_eps, tiny_clip, encode):
    neg = encode("")
    cond, lat = batch(tiny_clip, SRC, SRC)
    plain = ks(tiny_eps, cond, neg, lat)
    models = [
        # P2P replacing every map (cross and self) with the source's own: same prompt -> same values
        node_out(PromptToPromptNode.execute(tiny_eps, tiny_clip, SRC, SRC, "replace", 1.0, 1.0, "", "circle", 0.3))[0],
        node_out(PromptToPromptNode.execute(tiny_eps, tiny_clip, SRC, SRC, "refine", 1.0, 1.0, "", "", 0.3))[0],
        node_out(MasaCtrlNode.execute(tiny_eps, 0, 0, -1, "", 0.1))[0],
        node_out(PlugAndPlayNode.execute(tiny_eps, 1.0, 1.0, -1, -1))[0],
    ]
    for m in models:
        assert torch.equal(ks(m, cond, neg, lat), plain)
    # disabled controllers (empty windows) on a real edit: untouched calls are bit-identical too
    cond2, _ = batch(tiny_clip)
    plain2 = ks(tiny_eps, cond2, neg, lat)
    off = [node_out(PromptToPromptNode.execute(tiny_eps, tiny_clip, SRC, TGT, "auto", 0.0, 0.0, "", "", 0.3))[0],
           node_out(MasaCtrlNode.execute(tiny_eps, 99, -1, -1, "", 0.1))[0],
           node_out(StyleAlignedNode.execute(tiny_eps, True, True, False, False, 0, -1, 1.0, 1.0, 0.0))[0],
           node_out(ReferenceAttentionNode.execute(tiny_eps, 0.0, 0.0, 1.0, 0, -1, False))[0]]
    for m in off:
        assert torch.equal(ks(m, cond2, neg, lat), plain2)


# ---------------------------------------------------------------------------------------------
# Prompt-to-Prompt
# ---------------------------------------------------------------------------------------------

def _p2p_call(tech, q, k, v, step=0, n_steps=10, kind="cross", site=None):
    from editkit.attention.controller import Call
    chunks = branch_layout([0], q.shape[0])
    return tech.attention(Call(kind, site, 0, 1, step, n_steps, step / n_steps, chunks, 1, None, {"n_heads": 1}), q, k, v)


def _maps_of(edit, q, k, v, extra):
    """Run an edit as the controller does (no previous patch); with v = identity the output IS the map."""
    from editkit.attention.controller import compose
    run = lambda a, b, c: default_attention(a, b, c, extra)
    return compose(edit, None, q, k, v, extra, run, run)


@pytest.mark.parametrize("mode", ["replace", "refine"])
def test_p2p_target_maps_are_the_source_maps_word_aligned(tiny_clip, mode):
    src, tgt = ("a cat sitting on a mat", "a tiger sitting on a mat") if mode == "replace" else \
               ("a cat sitting on a mat", "a fluffy cat sitting on a red mat")
    ts, tt = alignment.Tokens(tiny_clip, src, "sd1"), alignment.Tokens(tiny_clip, tgt, "sd1")
    T = len(ts)
    if mode == "replace":
        g, alpha = alignment.replace_mapper(tiny_clip, src, tgt, "sd1"), None
    else:
        g, alpha = alignment.refine_mapper(tiny_clip, src, tgt, "sd1")
    tech = PromptToPrompt([make_plan(g, alpha, None, T)], 0.8, 0.0, frozenset())
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 16, T, generator=gen) * 0.4, torch.randn(2, T, T, generator=gen) * 0.4
    v = torch.eye(T).expand(2, T, T).clone()                      # one-hot values: output = attention map
    extra = {"n_heads": 1}
    edit = _p2p_call(tech, q, k, v)
    out = _maps_of(edit, q, k, v, extra)
    p = (q @ k.transpose(1, 2) / math.sqrt(T)).softmax(-1)        # (2, 16, T) own maps of each row
    expected_t = p[0] @ g if alpha is None else p[0] @ g + p[1] * (1 - alpha)
    torch.testing.assert_close(out[1], expected_t, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0], p[0], atol=1e-6, rtol=1e-6)        # source untouched
    # word-aligned: each target token that has a source counterpart carries exactly that token's map
    src_of = {j: int(g[:, j].argmax()) for j in range(T) if g[:, j].sum() == 1 and g[:, j].max() == 1}
    assert len(src_of) >= 7
    for j, i in src_of.items():
        torch.testing.assert_close(out[1][:, j], p[0][:, i], atol=1e-5, rtol=1e-5)
    if mode == "replace":
        cat, tiger = ts.find("cat"), tt.find("tiger")
        assert tiger == cat and g[cat[0], tiger[0]] == 1            # swapped word: same slot, source map
    else:
        for w in ("fluffy", "red"):                                 # added words keep the target's own maps
            for j in tt.find(w):
                assert alpha[j] == 0
                torch.testing.assert_close(out[1][:, j], p[1][:, j], atol=1e-6, rtol=1e-6)
    # after the cross-attention window the target attends with its own maps
    late = _maps_of(_p2p_call(tech, q, k, v, step=9), q, k, v, extra)
    torch.testing.assert_close(late[1], p[1], atol=1e-6, rtol=1e-6)


def test_p2p_reweight_scales_exactly_the_given_word(tiny_clip):
    prompt = "a smiling teddy bear in a garden"
    T = len(alignment.Tokens(tiny_clip, prompt, "sd1"))
    w = alignment.reweight_vector(tiny_clip, prompt, [("smiling", 3.0)], "sd1", "n", "reweight")
    j = alignment.Tokens(tiny_clip, prompt, "sd1").find("smiling")
    assert (w != 1).nonzero().flatten().tolist() == j and float(w[j[0]]) == 3.0
    tech = PromptToPrompt([make_plan(torch.eye(T), None, w, T)], 0.5, 0.0, frozenset())
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 9, T, generator=gen) * 0.4, torch.randn(2, T, T, generator=gen) * 0.4
    v = torch.eye(T).expand(2, T, T).clone()
    p = (q @ k.transpose(1, 2) / math.sqrt(T)).softmax(-1)
    for step, base in ((0, p[0]), (9, p[1])):       # inside the window: source maps; after: the target's own
        out = _maps_of(_p2p_call(tech, q, k, v, step=step), q, k, v, {"n_heads": 1})
        ratio = out[1] / base
        torch.testing.assert_close(ratio[:, j[0]], torch.full((9,), 3.0), atol=1e-4, rtol=1e-4)
        others = [c for c in range(T) if c not in j]
        torch.testing.assert_close(out[1][:, others], base[:, others], atol=1e-6, rtol=1e-6)


def test_p2p_in_the_model_replaces_at_every_cross_layer_within_the_window(tiny_eps, tiny_clip, encode):
    neg = encode("")
    cond, lat = batch(tiny_clip)
    m = node_out(PromptToPromptNode.execute(tiny_eps, tiny_clip, SRC, TGT, "replace", 0.5, 0.0, "", "", 0.3))[0]
    sites = [s for s in attention_layout(m).sites if s.cross]
    spy = Spy(m, "attn2", sites)
    ks(m, cond, neg, lat)
    assert {(c["site"].key, c["step"]) for c in spy.calls} == {(s.key, i) for s in sites for i in range(STEPS)}
    for c in spy.calls:
        b = c["q"].shape[0] // len(c["cou"])
        ci = c["cou"].index(0)
        s, t = ci * b, ci * b + 1
        own = manual_attention(c["q"][t:t + 1], c["k"][t:t + 1], c["v"][t:t + 1], c["heads"])
        if c["step"] < STEPS * 0.5:     # replaced: source maps (identity mapper) over the target's values
            exp = manual_attention(c["q"][s:s + 1], c["k"][s:s + 1], c["v"][t:t + 1], c["heads"])
        else:
            exp = own
        torch.testing.assert_close(c["out"][t:t + 1].double(), exp, atol=1e-5, rtol=1e-4)
        u = (1 - ci) * b + 1            # unconditional target: untouched (P2P edits the conditional branch)
        torch.testing.assert_close(c["out"][u:u + 1].double(), manual_attention(c["q"][u:u + 1], c["k"][u:u + 1], c["v"][u:u + 1], c["heads"]),
                                   atol=1e-5, rtol=1e-4)


def test_p2p_self_replace_and_local_blend(tiny_eps, tiny_clip, encode):
    neg = encode("")
    cond, lat = batch(tiny_clip, size=256)        # 32x32 latent: 16x16 blend maps, as P2P reads them at 512 px
    plain = ks(tiny_eps, cond, neg, lat)
    # random weights give nearly flat word maps: take the threshold from the maps of a first run
    probe = node_out(PromptToPromptNode.execute(tiny_eps, tiny_clip, SRC, TGT, "replace", 0.8, 0.5, "", "circle", 0.3))[0]
    ks(probe, cond, neg, lat)
    maps = torch.nn.functional.max_pool2d(find_tech(probe).blend.raw(2).sum(1, keepdim=True), 3, 1, padding=1)
    thr = float((maps[1] / maps[1].max()).median())
    m = node_out(PromptToPromptNode.execute(tiny_eps, tiny_clip, SRC, TGT, "replace", 0.8, 0.5, "", "circle", thr))[0]
    layout = attention_layout(m)
    fine = min(s.downsample for s in layout.sites)
    self_sites = [s for s in layout.sites if s.downsample != fine]
    tech = find_tech(m)
    spy = Spy(m, "attn1", layout.sites)
    out = ks(m, cond, neg, lat)
    assert {k: v for k, v in tech.applied.items() if k[0] == "self"} == {("self", s.order): {0, 1} for s in self_sites}
    assert {k: v for k, v in tech.applied.items() if k[0] == "cross"} == {("cross", s.order): {0, 1, 2, 3} for s in layout.sites if s.cross}
    for c in spy.calls:
        if c["step"] < 2 and c["site"].downsample != fine:
            exp = manual_attention(c["q"][-2:-1], c["k"][-2:-1], c["v"][-1:], c["heads"])   # source Q/K, target V
            torch.testing.assert_close(c["out"][-1:].double(), exp, atol=1e-5, rtol=1e-4)
    mask = tech.last_mask
    assert mask is not None and mask.shape == (2, 1, 32, 32) and mask[1].any() and not mask[1].all()
    outside = ~mask[1, 0]
    assert torch.equal(out[1][:, outside], out[0][:, outside])         # local blend: the source outside the mask
    assert not torch.allclose(out[1][:, mask[1, 0]], out[0][:, mask[1, 0]])
    assert torch.equal(out[0], plain[0]) or torch.allclose(out[0], plain[0])
    assert tech.blend.nbytes < 64 * 1024


def test_p2p_errors(tiny_eps, tiny_clip, tiny_vae):
    P = PromptToPromptNode.execute
    with pytest.raises(ValueError, match=r"input 'local_blend_words'.*'dog'.*neither the source prompt"):
        P(tiny_eps, tiny_clip, SRC, TGT, "auto", 0.8, 0.4, "", "circle, dog", 0.3)
    with pytest.raises(ValueError, match=r"input 'reweight'.*'square'.*not in the target prompt"):
        P(tiny_eps, tiny_clip, SRC, TGT, "auto", 0.8, 0.4, "square:2", "", 0.3)
    with pytest.raises(ValueError, match=r"input 'reweight'.*no weight"):
        P(tiny_eps, tiny_clip, SRC, TGT, "auto", 0.8, 0.4, "circle", "", 0.3)
    with pytest.raises(ValueError, match=r"input 'target_prompt'.*same number of words"):
        P(tiny_eps, tiny_clip, SRC, "a big blue circle on a white background", "replace", 0.8, 0.4, "", "", 0.3)
    with pytest.raises(ValueError, match=r"input 'source_prompt'"):
        P(tiny_eps, tiny_clip, " ", TGT, "auto", 0.8, 0.4, "", "", 0.3)
    with pytest.raises(ValueError, match=r"input 'mask_words'.*'dog'.*not in the source prompt"):
        MasaCtrlNode.execute(tiny_eps, 4, -1, -1, "dog", 0.1, tiny_clip, SRC, TGT)


def test_p2p_composes_with_another_attn2_patch(tiny_eps, tiny_clip, encode):
    """A stand-in for another pack's IP-Adapter (decoupled attention added in attn2) keeps working under P2P."""
    neg = encode("")
    cond, lat = batch(tiny_clip)
    calls = []
    ip_tokens = lambda k, v: (k[:, :4].flip(1) * 1.5, v[:, :4] * 2.0)   # "image tokens" of the stand-in

    def ipa(q, k, v, extra):
        calls.append(1)
        k_ip, v_ip = ip_tokens(k, v)
        return default_attention(q, k, v, extra) + 0.7 * default_attention(q, k_ip, v_ip, extra)
    other = tiny_eps.clone()
    sites = [s for s in attention_layout(tiny_eps).sites if s.cross]
    for s in sites:
        other.set_model_attn2_replace(ipa, s.block, s.number)
    p2p_only = node_out(PromptToPromptNode.execute(tiny_eps, tiny_clip, SRC, TGT, "replace", 1.0, 0.0, "", "", 0.3))[0]
    both = node_out(PromptToPromptNode.execute(other, tiny_clip, SRC, TGT, "replace", 1.0, 0.0, "", "", 0.3))[0]
    spy = Spy(both, "attn2", sites)
    out_both = ks(both, cond, neg, lat)
    assert calls
    for c in spy.calls:
        n = c["q"].shape[0]
        ci = c["cou"].index(0)
        b = n // len(c["cou"])
        s, t = ci * b, ci * b + 1
        p2p = manual_attention(c["q"][s:s + 1], c["k"][s:s + 1], c["v"][t:t + 1], c["heads"])
        k_ip, v_ip = ip_tokens(c["k"][t:t + 1], c["v"][t:t + 1])
        ip = manual_attention(c["q"][t:t + 1], k_ip, v_ip, c["heads"])
        torch.testing.assert_close(c["out"][t:t + 1].double(), p2p + 0.7 * ip, atol=1e-5, rtol=1e-4)   # both effects
    assert not torch.allclose(out_both, ks(p2p_only, cond, neg, lat)) and not torch.allclose(out_both, ks(other, cond, neg, lat))


# ---------------------------------------------------------------------------------------------
# MasaCtrl
# ---------------------------------------------------------------------------------------------

def test_masactrl_target_attends_source_keys_values(tiny_eps, tiny_clip, encode):
    neg = encode("")
    cond, lat = batch(tiny_clip)
    layout = attention_layout(tiny_eps)
    start_layer, start_step = 4, 1
    m = node_out(MasaCtrlNode.execute(tiny_eps, start_step, start_layer, -1, "", 0.1))[0]
    spy = Spy(m, "attn1", layout.sites)
    ks(m, cond, neg, lat)
    tech = find_tech(m)
    assert tech.applied == {s.order: set(range(start_step, STEPS)) for s in layout.sites if s.order >= start_layer}
    checked = 0
    for c in spy.calls:
        for ci in range(len(c["cou"])):            # cond and uncond chunks alike
            b = c["q"].shape[0] // len(c["cou"])
            s, t = ci * b, ci * b + 1
            if c["site"].order >= start_layer and c["step"] >= start_step:
                exp = manual_attention(c["q"][t:t + 1], c["k"][s:s + 1], c["v"][s:s + 1], c["heads"])
                checked += 1
            else:
                exp = manual_attention(c["q"][t:t + 1], c["k"][t:t + 1], c["v"][t:t + 1], c["heads"])
            torch.testing.assert_close(c["out"][t:t + 1].double(), exp, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(c["out"][s:s + 1].double(),
                                       manual_attention(c["q"][s:s + 1], c["k"][s:s + 1], c["v"][s:s + 1], c["heads"]), atol=1e-5, rtol=1e-4)
    assert checked == 3 * 2 * 3


def test_masactrl_mask_mode(tiny_eps, tiny_clip, encode):
    neg = encode("")
    cond, lat = batch(tiny_clip)
    m = node_out(MasaCtrlNode.execute(tiny_eps, 1, 4, -1, "circle", 0.5, tiny_clip, SRC, TGT))[0]
    layout = attention_layout(m)
    spy = Spy(m, "attn1", [s for s in layout.sites if s.order >= 4])
    ks(m, cond, neg, lat, cfg=1.0)
    tech = find_tech(m)
    maps = tech.masks.raw(tech.mask_level, current_step=True)
    assert maps is not None and maps.shape[:2] == (2, 1)
    c = [c for c in spy.calls if c["step"] == STEPS - 1][-1]
    from editkit.attention.masactrl import _NEG
    from editkit.attention.controller import Call
    call = Call("self", c["site"], c["site"].order, 7, 3, 4, 0.75, branch_layout([0], 2), c["heads"],
                tuple(lat.shape[-2:]), {"n_heads": c["heads"]})
    masks = tech._row_masks(call)
    ms, mt = masks[0], masks[1]
    assert ms.any() and not ms.all()
    big = torch.where(ms, 0.0, _NEG)[None]
    fg = manual_attention(c["q"][1:2], c["k"][:1], c["v"][:1], c["heads"], big)
    bg = manual_attention(c["q"][1:2], c["k"][:1], c["v"][:1], c["heads"], torch.where(ms, _NEG, 0.0)[None])
    exp = fg * mt.double()[None, :, None] + bg * (1 - mt.double())[None, :, None]
    torch.testing.assert_close(c["out"][1:2].double(), exp, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Plug-and-Play
# ---------------------------------------------------------------------------------------------

def test_pnp_injects_source_features_and_qk(tiny_eps, tiny_clip, encode):
    neg = encode("")
    cond, lat = batch(tiny_clip)
    layout = attention_layout(tiny_eps)
    from editkit.attention.pnp import default_blocks
    fb, ab = default_blocks(layout)
    m = node_out(PlugAndPlayNode.execute(tiny_eps, 0.75, 0.5, -1, -1))[0]
    seen = []

    def after(h, hsp, to):          # appended after PnP's patch: sees what the block receives
        seen.append((to["block"], m_step(to), h.clone(), hsp.clone(), list(to["cond_or_uncond"])))
        return h, hsp
    from editkit.attention.controller import step_of
    m_step = lambda to: step_of(to)[0]
    m.set_model_output_block_patch(after)
    out_sites = [s for s in layout.sites if s.block == "output" and s.number >= ab]
    spy = Spy(m, "attn1", out_sites)
    ks(m, cond, neg, lat)
    tech = find_tech(m)
    assert tech.applied[("features", fb)] == {0, 1, 2}                               # 75% of 4 steps
    assert {k: v for k, v in tech.applied.items() if k[0] == "attn1"} == {("attn1",) + s.key: {0, 1} for s in out_sites}
    for block, step, h, hsp, cou in seen:
        b = h.shape[0] // len(cou)
        for ci in range(len(cou)):
            s, t = ci * b, ci * b + 1
            injected = block == ("output", fb) and step < 3
            assert torch.equal(h[t], h[s]) == injected or (not injected and torch.equal(h[t], h[s]))
            if injected:
                assert torch.equal(hsp[t], hsp[s])
    assert any(not torch.equal(h[1], h[0]) for block, step, h, _, _ in seen if block == ("output", fb) and step == 3)
    for c in spy.calls:
        b = c["q"].shape[0] // len(c["cou"])
        for ci in range(len(c["cou"])):
            s, t = ci * b, ci * b + 1
            qk = (s, s) if c["step"] < 2 else (t, t)
            exp = manual_attention(c["q"][qk[0]:qk[0] + 1], c["k"][qk[1]:qk[1] + 1], c["v"][t:t + 1], c["heads"])
            torch.testing.assert_close(c["out"][t:t + 1].double(), exp, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# StyleAligned and reference attention
# ---------------------------------------------------------------------------------------------

def test_style_aligned_shares_attention_with_adain(tiny_eps, tiny_clip, encode):
    neg = encode("")
    cond, lat = batch(tiny_clip, SRC, TGT + "\na green square")
    m = node_out(StyleAlignedNode.execute(tiny_eps, True, True, False, False, 2, 5, 0.0, 0.5, math.log(2)))[0]
    layout = attention_layout(m)
    assert set(m.model_options["transformer_options"]["patches_replace"]["attn1"]) == {s.key for s in layout.sites if 2 <= s.order <= 5}
    spy = Spy(m, "attn1", layout.sites)
    ks(m, cond, neg, lat)
    tech = find_tech(m)
    assert tech.applied == {o: {0, 1} for o in range(2, 6)}
    for c in spy.calls:
        b = c["q"].shape[0] // len(c["cou"])
        for ci in range(len(c["cou"])):
            r = ci * b
            q, k, v = c["q"], c["k"], c["v"]
            torch.testing.assert_close(c["out"][r:r + 1].double(), manual_attention(q[r:r + 1], k[r:r + 1], v[r:r + 1], c["heads"]),
                                       atol=1e-5, rtol=1e-4)           # the reference is unchanged
            for t in (r + 1, r + 2):
                if 2 <= c["site"].order <= 5 and c["step"] < 2:
                    qt = adain(q[t:t + 1], q[r:r + 1])
                    keys = torch.cat([adain(k[t:t + 1], k[r:r + 1]), k[r:r + 1]], 1)
                    vals = torch.cat([v[t:t + 1], v[r:r + 1]], 1)
                    bias = torch.cat([torch.zeros(1, k.shape[1]), torch.full((1, k.shape[1]), math.log(2))], 1)
                    exp = manual_attention(qt, keys, vals, c["heads"], bias)
                else:
                    exp = manual_attention(q[t:t + 1], k[t:t + 1], v[t:t + 1], c["heads"])
                torch.testing.assert_close(c["out"][t:t + 1].double(), exp, atol=2e-5, rtol=1e-4)


def test_style_aligned_shared_group_norm(tiny_eps, tiny_clip, encode):
    neg = encode("")
    cond, lat = batch(tiny_clip)
    before = ks(tiny_eps, cond, neg, lat)
    plain = node_out(StyleAlignedNode.execute(tiny_eps, True, True, False, False, 0, -1, 0.0, 1.0, 0.0))[0]
    shared = node_out(StyleAlignedNode.execute(tiny_eps, True, True, False, True, 0, -1, 0.0, 1.0, 0.0))[0]
    n_gn = sum(isinstance(x, torch.nn.GroupNorm) for x in tiny_eps.model.diffusion_model.modules())
    assert len(shared.object_patches) == n_gn > 0
    a, b = ks(plain, cond, neg, lat), ks(shared, cond, neg, lat)
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1])
    # the shared model's module is untouched after sampling, and the unpatched model still samples plainly
    for key in shared.object_patches:                       # ComfyUI's own modules are never modified
        assert "forward" not in vars(tiny_eps.get_model_object(key))
    assert torch.equal(ks(tiny_eps, cond, neg, lat), before)   # and the plain model samples as before
    # shared statistics: a target row normalised together with the reference
    key = next(iter(shared.object_patches))
    gn = shared.object_patches[key]
    tech = find_tech(shared)
    x = torch.randn(2, gn.num_channels, 4, 4)
    tech.set_rows([(1, 0, 0)])
    y = gn(x)
    tech.set_rows(None)
    joint = torch.cat([x[1:2], x[0:1]], dim=-1)
    ref = torch.nn.functional.group_norm(joint, gn.num_groups, gn.weight, gn.bias, gn.eps)[..., :4]
    torch.testing.assert_close(y[1:2], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y[0:1], torch.nn.functional.group_norm(x[0:1], gn.num_groups, gn.weight, gn.bias, gn.eps))


def test_reference_attention_batch_and_latent(tiny_eps, tiny_clip, encode):
    neg = encode("")
    cond, lat = batch(tiny_clip)
    m = node_out(ReferenceAttentionNode.execute(tiny_eps, 2.0, 0.0, 0.5, 1, -1, True))[0]
    layout = attention_layout(m)
    spy = Spy(m, "attn1", layout.sites)
    ks(m, cond, neg, lat)
    for c in spy.calls:
        b = c["q"].shape[0] // len(c["cou"])
        for ci, cu in enumerate(c["cou"]):
            s, t = ci * b, ci * b + 1
            q, k, v = c["q"], c["k"], c["v"]
            if c["site"].order >= 1 and c["step"] < 2 and cu == 0:
                bias = torch.cat([torch.zeros(1, k.shape[1]), torch.full((1, k.shape[1]), math.log(2.0))], 1)
                exp = manual_attention(q[t:t + 1], torch.cat([k[t:t + 1], k[s:s + 1]], 1), torch.cat([v[t:t + 1], v[s:s + 1]], 1),
                                       c["heads"], bias)
            else:
                exp = manual_attention(q[t:t + 1], k[t:t + 1], v[t:t + 1], c["heads"])
            torch.testing.assert_close(c["out"][t:t + 1].double(), exp, atol=2e-5, rtol=1e-4)
    # a reference latent: noised and run once per model call; its keys/values are the ones injected
    ref = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))}
    m2 = node_out(ReferenceAttentionNode.execute(tiny_eps, 1.0, 0.0, 1.0, 0, -1, False, ref, 7))[0]
    spy2 = Spy(m2, "attn1", layout.sites)
    ks(m2, cond, neg, lat)
    tech = find_tech(m2)
    assert tech.ref_passes == STEPS and tech.applied == {s.order: set(range(STEPS)) for s in layout.sites}
    per_layer = {}
    for c in spy2.calls:
        per_layer.setdefault((c["site"].key, c["step"]), []).append(c)
    for (key, step), cs in per_layer.items():
        assert len(cs) == 2 and cs[0]["q"].shape[0] == 1          # the reference pass first, then the batch
        rk, rv = cs[0]["k"], cs[0]["v"]
        main = cs[1]
        for r in range(main["q"].shape[0]):
            exp = manual_attention(main["q"][r:r + 1], torch.cat([main["k"][r:r + 1], rk], 1), torch.cat([main["v"][r:r + 1], rv], 1),
                                   main["heads"])
            torch.testing.assert_close(main["out"][r:r + 1].double(), exp, atol=2e-5, rtol=1e-4)


def test_layer_and_family_errors(tiny_eps, tiny_clip, flux_attn):
    with pytest.raises(ValueError, match=r"input 'start_layer'.*7 attention layers"):
        MasaCtrlNode.execute(tiny_eps, 4, 7, -1, "", 0.1)
    with pytest.raises(ValueError, match=r"EditKitPlugAndPlay: input 'feature_block'.*double block 2"):
        PlugAndPlayNode.execute(flux_attn, 0.8, 0.5, 2, -1)
    with pytest.raises(ValueError, match=r"input 'end_layer'"):
        StyleAlignedNode.execute(tiny_eps, True, True, False, False, 3, 2, 0.0, 1.0, 0.0)
    with pytest.raises(ValueError, match=r"input 'share_group_norm'"):
        StyleAlignedNode.execute(flux_attn, True, True, False, True, 0, -1, 0.0, 1.0, 0.0)
    with pytest.raises(ValueError, match=r"input 'mask_words'.*'square'"):
        MasaCtrlNode.execute(flux_attn, 1, -1, -1, "square", 0.1, tiny_clip, SRC, TGT)


# ---------------------------------------------------------------------------------------------
# DiT (tiny Flux): through the attention override, text tokens first
# ---------------------------------------------------------------------------------------------

class OverrideSpy:
    """An attention override installed AFTER a technique's (so it sees the technique's q/k/v)."""

    def __init__(self, m):
        from editkit.core.patches import chain_attention_override
        self.calls = []
        chain_attention_override(m, self._make)

    def _make(self, prev):
        def fn(func, *args, **kwargs):
            out = prev(func, *args, **kwargs) if prev is not None else func(*args, **kwargs)
            to = kwargs.get("transformer_options", {})
            from editkit.attention.controller import step_of
            self.calls.append(dict(q=args[0].clone(), k=args[1].clone(), v=args[2].clone(), out=out.clone(),
                                   block=(to.get("block_type"), to.get("block_index")), step=step_of(to)[0]))
            return out
        fn.prev = prev
        return fn


def _flux_run(model, clip, steps=3, src=SRC, tgt=TGT):
    return flux_pair_run(model, clip, src, tgt, steps)


def record_attention(tech, extra=None):
    """Wrap the technique's attention to record (call, q, k, v, result[, extra(call, result)]) per call."""
    seen, orig = [], tech.attention

    def spy(call, q, k, v):
        r = orig(call, q, k, v)
        rec = (call, q.clone(), k.clone(), v.clone(), r)
        seen.append(rec + (extra(call, r),) if extra else rec)
        return r
    tech.attention = spy
    return seen


def _heads(x):   # (B, H, L, d) -> manual_attention's (B, L, H*d)
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


def test_flux_masactrl_styles_reference_through_the_override(flux_attn, tiny_clip):
    plain = _flux_run(flux_attn, tiny_clip)
    T = 77
    # MasaCtrl: from block 2 on, the target's image keys/values are the source's; its text keys/values stay
    base = flux_attn.clone()
    spy = OverrideSpy(base)          # installed first: MasaCtrl chains it, so it sees the edited q/k/v
    m = node_out(MasaCtrlNode.execute(base, 1, 2, -1, "", 0.1))[0]
    out = _flux_run(m, tiny_clip)
    assert torch.equal(out[0], plain[0]) and not torch.equal(out[1], plain[1])
    tech = find_tech(m)
    assert tech.applied == {l: {1, 2} for l in range(2, 4)}
    assert any(c["block"] == ("single", 1) for c in spy.calls)
    heads = spy.calls[0]["q"].shape[1]
    for i, c in enumerate(spy.calls):
        layer = i % 4
        step = i // 4
        q, k, v = c["q"], c["k"], c["v"]          # what MasaCtrl handed to the rest of the chain
        if layer >= 2 and step >= 1:
            assert torch.equal(k[1, :, T:], k[0, :, T:]) and torch.equal(v[1, :, T:], v[0, :, T:])
            assert not torch.equal(k[1, :, :T], k[0, :, :T])
    # StyleAligned and reference attention: the target attends [own, reference image tokens]
    for node, args in ((StyleAlignedNode, (flux_attn, False, False, False, False, 0, -1, 0.0, 1.0, 0.0)),
                       (ReferenceAttentionNode, (flux_attn, 1.0, 0.0, 1.0, 0, -1, False))):
        m = node_out(node.execute(*args))[0]
        tech = find_tech(m)
        seen = record_attention(tech)
        out = _flux_run(m, tiny_clip)
        assert torch.equal(out[0], plain[0]) and not torch.allclose(out[1], plain[1])
        assert len(seen) == 3 * 4 and all(isinstance(r, Rows) and r.rows == [1] for *_, r in seen)
        call, q, k, v, r = seen[5]
        img = slice(T, T + call.img)
        keys = torch.cat([k[1:2], k[0:1, :, img]], 2)
        vals = torch.cat([v[1:2], v[0:1, :, img]], 2)
        exp = manual_attention(_heads(q[1:2]), _heads(keys), _heads(vals), q.shape[1])
        torch.testing.assert_close(r.out.double(), exp, atol=2e-5, rtol=1e-4)


def test_flux_masactrl_mask_mode(flux_attn, tiny_clip):
    """Mask-guided MasaCtrl on a DiT: the target's image queries attend to the source's object image keys where
    the target's mask is set and to its background keys elsewhere (text keys always); text queries see all."""
    plain = _flux_run(flux_attn, tiny_clip)
    m = node_out(MasaCtrlNode.execute(flux_attn, 1, 2, -1, "circle", 0.5, tiny_clip, SRC, TGT))[0]
    tech = find_tech(m)
    seen = record_attention(tech, lambda call, r: tech._row_masks(call) if isinstance(r, Rows) else None)
    out = _flux_run(m, tiny_clip)
    assert torch.equal(out[0], plain[0]) and not torch.equal(out[1], plain[1])
    assert len(seen) == 3 * 4                                    # every joint block is seen (maps), 2 edited per step
    edited = [x for x in seen if isinstance(x[4], Rows)]
    assert [(c.step, c.layer) for c, *_ in edited] == [(1, 2), (1, 3), (2, 2), (2, 3)]
    checked = 0
    for call, q, k, v, r, masks in edited:
        ms, mt = masks[0], masks[1]
        if not bool(ms.any()) or bool(ms.all()):
            continue
        T, I = call.txt, slice(call.txt, call.txt + call.img)
        keys, vals = torch.cat([k[1:2, :, :T], k[0:1, :, I]], 2).double(), torch.cat([v[1:2, :, :T], v[0:1, :, I]], 2).double()
        logits = q[1:2].double() @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])
        keep_fg = torch.cat([torch.ones(T, dtype=torch.bool), ms])
        keep_bg = torch.cat([torch.ones(T, dtype=torch.bool), ~ms])
        full = logits.softmax(-1) @ vals
        fg = logits.masked_fill(~keep_fg, float("-inf")).softmax(-1) @ vals
        bg = logits.masked_fill(~keep_bg, float("-inf")).softmax(-1) @ vals
        w = mt.double()[:, None]
        exp = full.clone()
        exp[:, :, I] = fg[:, :, I] * w + bg[:, :, I] * (1 - w)
        torch.testing.assert_close(r.out.double(), _heads(exp), atol=2e-5, rtol=1e-4)
        checked += 1
    assert checked >= 2


def test_flux_plug_and_play_block_output_and_qk(flux_attn, tiny_clip):
    """DiT Plug-and-Play: the target leaves double block 1 (the middle one) with the source's image tokens for
    the first 80 % of the steps, and from layer 1 on its joint-attention image queries/keys are the source's
    for the first 50 % (its text tokens stay its own)."""
    from editkit.core.patches import call_dit_block, chain_dit_block_replace
    plain = _flux_run(flux_attn, tiny_clip, steps=5)
    base = flux_attn.clone()
    spy = OverrideSpy(base)                                   # sees the q/k/v Plug-and-Play hands on
    m = node_out(PlugAndPlayNode.execute(base, 0.8, 0.5, -1, -1))[0]
    outs = []

    def make(prev):
        def after(args, extra):                               # installed after PnP: sees its block output
            out = call_dit_block(prev, args, extra)
            outs.append(out["img"].clone())
            return out
        return after
    chain_dit_block_replace(m, "double_block", 1, make)
    out = _flux_run(m, tiny_clip, steps=5)
    assert torch.equal(out[0], plain[0]) and not torch.equal(out[1], plain[1])
    tech = find_tech(m)
    assert tech.applied[("features", 1)] == {0, 1, 2, 3}       # progress 0, .2, .4, .6 < 0.8
    assert [torch.equal(o[1], o[0]) for o in outs] == [True] * 4 + [False]
    assert {k: v for k, v in tech.applied.items() if k[0] == "joint"} == {("joint", l): {0, 1, 2} for l in (1, 2, 3)}
    T = 77
    for c in spy.calls:
        layer = c["block"][1] + (2 if c["block"][0] == "single" else 0)
        q, k = c["q"], c["k"]
        same = torch.equal(q[1, :, T:], q[0, :, T:]) and torch.equal(k[1, :, T:], k[0, :, T:])
        assert same == (layer >= 1 and c["step"] <= 2), (layer, c["step"])
        assert not torch.equal(k[1, :, :T], k[0, :, :T])        # the target's text keys stay its own


def test_flux_prompt_to_prompt_and_maps(flux_attn, tiny_clip):
    import editkit.attention.prompt_to_prompt as P
    plain = _flux_run(flux_attn, tiny_clip)
    same = _flux_run(flux_attn, tiny_clip, src=SRC, tgt=SRC)
    m_id = node_out(PromptToPromptNode.execute(flux_attn, tiny_clip, SRC, SRC, "auto", 1.0, 0.0, "", "circle", 0.3))[0]
    assert torch.equal(_flux_run(m_id, tiny_clip, src=SRC, tgt=SRC), same)         # identity edit: bit-identical
    m = node_out(PromptToPromptNode.execute(flux_attn, tiny_clip, SRC, TGT, "auto", 1.0, 0.0, "", "circle, blue", 0.3))[0]
    tech = find_tech(m)
    seen = record_attention(tech)
    out = _flux_run(m, tiny_clip)
    assert torch.equal(out[0], plain[0]) and not torch.allclose(out[1], plain[1])
    # independent reference: image queries of the target take the source's text distribution with their own text mass
    call, q, k, v, r = seen[6]
    T, I = call.txt, slice(call.txt, call.txt + call.img)
    H = q.shape[1]
    d = q.shape[-1]
    lt = (q[1:2, :, I].double() @ k[1:2].double().transpose(-1, -2)) / math.sqrt(d)     # target joint logits
    pt = lt.softmax(-1)
    mass = pt[..., :T].sum(-1, keepdim=True)
    ps = ((q[0:1, :, I].double() @ k[0:1, :, :T].double().transpose(-1, -2)) / math.sqrt(d)).softmax(-1)
    new = torch.cat([ps * mass, pt[..., T:]], -1)                                      # edited joint maps of image queries
    exp_img = new @ v[1:2].double()
    exp_txt = ((q[1:2, :, :T].double() @ k[1:2].double().transpose(-1, -2)) / math.sqrt(d)).softmax(-1) @ v[1:2].double()
    exp = _heads(torch.cat([exp_txt, exp_img], 2))
    torch.testing.assert_close(r.out.double(), exp, atol=2e-5, rtol=1e-4)
    assert tech.blend.raw(1) is not None and tech.last_mask is not None and tech.last_mask.shape == (2, 1, 8, 8)
    assert tech.blend.raw(1).shape[-2:] == (4, 4)                                    # the Flux token grid (8x8 latent / 2)


@pytest.mark.parametrize("cross", [1.0, 0.0])
def test_flux_prompt_to_prompt_self_replacement(flux_attn, tiny_clip, cross):
    """Inside the self window the target's image queries take the source's image-to-image distribution with
    their own image mass (and, inside the cross window, the source's text distribution with their text mass)."""
    plain = _flux_run(flux_attn, tiny_clip)
    m = node_out(PromptToPromptNode.execute(flux_attn, tiny_clip, SRC, TGT, "auto", cross, 1.0, "", "", 0.3))[0]
    tech = find_tech(m)
    seen = record_attention(tech)
    out = _flux_run(m, tiny_clip)
    assert torch.equal(out[0], plain[0]) and not torch.equal(out[1], plain[1])
    assert {k for k in tech.applied if k[0] == "joint_self"} == {("joint_self", l) for l in range(4)}
    call, q, k, v, r = seen[6]
    T, I = call.txt, slice(call.txt, call.txt + call.img)
    d = q.shape[-1]
    logits = lambda a, b: (a.double() @ b.double().transpose(-1, -2)) / math.sqrt(d)
    pt = logits(q[1:2, :, I], k[1:2]).softmax(-1)                                     # target joint maps
    m_txt, m_img = pt[..., :T].sum(-1, keepdim=True), pt[..., T:].sum(-1, keepdim=True)
    txt = logits(q[0:1, :, I], k[0:1, :, :T]).softmax(-1) * m_txt if cross else pt[..., :T]
    img = logits(q[0:1, :, I], k[0:1, :, I]).softmax(-1) * m_img
    exp_img = torch.cat([txt, img], -1) @ v[1:2].double()
    exp_txt = logits(q[1:2, :, :T], k[1:2]).softmax(-1) @ v[1:2].double()
    torch.testing.assert_close(r.out.double(), _heads(torch.cat([exp_txt, exp_img], 2)), atol=2e-5, rtol=1e-4)
    # identity edit with self replacement on: bit-identical to plain sampling
    same = _flux_run(flux_attn, tiny_clip, src=SRC, tgt=SRC)
    m_id = node_out(PromptToPromptNode.execute(flux_attn, tiny_clip, SRC, SRC, "auto", cross, 1.0, "", "", 0.3))[0]
    assert torch.equal(_flux_run(m_id, tiny_clip, src=SRC, tgt=SRC), same)


# ---------------------------------------------------------------------------------------------
# SD3 (MMDiT): joint attention without block indices, heads passed by keyword, plus x-block self-attention
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_sd3():
    """A 3-block MMDiT (SD3 config class, hidden 192, 3 heads, with SD3.5's extra image self-attention in every block)."""
    from editkit.builtin_models.tiny import tiny_sd3 as build
    return build(seed=0, depth=3, x_block_self_attn=True, qk_norm="rms")


def _sd3_run(model, steps=3):
    import nodes
    g = torch.Generator().manual_seed(0)
    cond = [[torch.randn(2, 77, 32, generator=g), {"pooled_output": torch.randn(2, 32, generator=g)}]]
    lat = {"samples": torch.zeros(2, 16, 8, 8), "batch_index": [0, 0]}
    return nodes.common_ksampler(model, 1, steps, 1.0, "euler", "simple", cond, cond, lat)[0]["samples"]


def test_sd3_masactrl_style_reference_p2p_through_the_override(tiny_sd3, tiny_clip):
    from editkit.core.introspect import model_family
    assert model_family(tiny_sd3) == "sd3"
    plain = _sd3_run(tiny_sd3)
    base = tiny_sd3.clone()
    spy = OverrideSpy(base)
    m = node_out(MasaCtrlNode.execute(base, 1, 1, -1, "", 0.1))[0]
    out = _sd3_run(m)
    assert torch.equal(out[0], plain[0]) and not torch.equal(out[1], plain[1])
    tech = find_tech(m)
    assert tech.applied == {1: {1, 2}, 2: {1, 2}}         # layers from the call order (SD3 sets no block index)
    kinds = {"joint": 0, "image": 0}
    for c in [c for c in spy.calls if c["step"] >= 1]:
        k = c["k"] if c["k"].ndim == 4 else c["k"].reshape(2, c["k"].shape[1], 3, -1).transpose(1, 2)
        v = c["v"] if c["v"].ndim == 4 else c["v"].reshape(2, c["v"].shape[1], 3, -1).transpose(1, 2)
        if k.shape[2] == 77 + 16 and torch.equal(k[1, :, 77:], k[0, :, 77:]):
            assert torch.equal(v[1, :, 77:], v[0, :, 77:]) and not torch.equal(k[1, :, :77], k[0, :, :77])
            kinds["joint"] += 1
        elif k.shape[2] == 16 and torch.equal(k[1], k[0]) and torch.equal(v[1], v[0]):
            kinds["image"] += 1
    assert kinds == {"joint": 4, "image": 4}               # layers 1-2 at steps 1-2, joint and image self-attention
    for node, args in ((StyleAlignedNode, (tiny_sd3, True, True, False, False, 0, -1, 0.0, 1.0, 0.0)),
                       (ReferenceAttentionNode, (tiny_sd3, 1.5, 0.0, 1.0, 0, -1, False)),
                       (PromptToPromptNode, (tiny_sd3, tiny_clip, SRC, TGT, "auto", 1.0, 0.0, "", "circle", 0.3)),
                       (PromptToPromptNode, (tiny_sd3, tiny_clip, SRC, TGT, "auto", 0.0, 1.0, "", "", 0.3)),
                       (MasaCtrlNode, (tiny_sd3, 1, 0, -1, "circle", 0.5, tiny_clip, SRC, TGT)),
                       (PlugAndPlayNode, (tiny_sd3, 0.8, 0.5, 0, 0))):
        m = node_out(node.execute(*args))[0]
        out = _sd3_run(m)
        assert torch.equal(out[0], plain[0]) and not torch.equal(out[1], plain[1])
        assert {k[-1] if isinstance(k, tuple) else k for k in find_tech(m).applied} == {0, 1, 2}
