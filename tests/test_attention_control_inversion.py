"""Attention control on an inverted real image: EditKit Inversion Sampler runs the source branch (the
reconstruction) and the target branch in one batch (transformer_options["editkit_branches"])."""
import torch

from editkit.core.introspect import attention_layout
from editkit.nodes.attention_control import MasaCtrlNode, PromptToPromptNode
from editkit.nodes.inversion import Invert, InversionSampler
from ek_helpers import node_out
from test_attention_control import SRC, TGT, Spy, find_tech, manual_attention


def _invert(model, encode, steps=4):
    g = torch.Generator().manual_seed(0)
    latent = {"samples": torch.randn(1, 4, 16, 16, generator=g) * 0.5}
    _, inv = node_out(Invert.execute(model, latent, encode(SRC), 1.0, steps, "normal", 0, negative=encode("")))
    return inv


def _edit(model, inv, encode, cfg=3.0, output="source + target"):
    noise, guider, sampler, sigmas, latent = node_out(InversionSampler.execute(model, inv, encode(TGT), cfg, output, encode("")))
    return guider.sample(noise.generate_noise(latent), latent["samples"], sampler, sigmas, seed=0)


def test_masactrl_reads_the_inverted_source_branch(tiny_eps, encode):
    inv = _invert(tiny_eps, encode)
    plain = _edit(tiny_eps, inv, encode)
    m = node_out(MasaCtrlNode.execute(tiny_eps, 1, 3, -1, "", 0.1))[0]
    layout = attention_layout(m)
    tech = find_tech(m)
    spy = Spy(m, "attn1", [s for s in layout.sites if s.order >= 3])
    out = _edit(m, inv, encode)
    assert out.shape[0] == 2
    assert torch.equal(out[0], plain[0])                 # the reconstruction (source branch) is untouched
    assert not torch.allclose(out[1], plain[1])
    assert tech.applied == {s.order: {1, 2, 3} for s in layout.sites if s.order >= 3}
    checked = 0
    for c in spy.calls:
        if c["step"] < 1:
            continue
        n = len(c["cou"])
        per = c["q"].shape[0] // n          # each chunk: [source, target] stacked
        assert per == 2
        for ci in range(n):
            s, t = ci * per, ci * per + 1
            exp = manual_attention(c["q"][t:t + 1], c["k"][s:s + 1], c["v"][s:s + 1], c["heads"])
            torch.testing.assert_close(c["out"][t:t + 1].double(), exp, atol=1e-5, rtol=1e-4)
            checked += 1
    assert checked >= 3 * 4


def test_p2p_local_blend_on_an_inverted_image(tiny_eps, tiny_clip, encode):
    inv = _invert(tiny_eps, encode)
    probe = node_out(PromptToPromptNode.execute(tiny_eps, tiny_clip, SRC, TGT, "auto", 0.8, 0.4, "", "red, blue", 0.3))[0]
    _edit(probe, inv, encode)
    maps = torch.nn.functional.max_pool2d(find_tech(probe).blend.raw(2).sum(1, keepdim=True), 3, 1, padding=1)
    thr = float((maps[1] / maps[1].max()).median())        # random weights: nearly flat maps; threshold from the data
    m = node_out(PromptToPromptNode.execute(tiny_eps, tiny_clip, SRC, TGT, "auto", 0.8, 0.4, "", "red, blue", thr))[0]
    tech = find_tech(m)
    calls = []
    orig = tech.attention

    def spy(call, q, k, v):
        calls.append((call.kind, [c.pairs for c in call.chunks]))
        return orig(call, q, k, v)
    tech.attention = spy
    out = _edit(m, inv, encode)
    assert tech.applied and tech.run_branches == ("source", "target")
    assert all(p == [((1, 0, 0),)] or p == [((1, 0, 0),), ((3, 2, 0),)] for _, p in calls)
    # the cond chunk of every call pairs target row with source row; the blend used the branch layout
    mask = tech.last_mask
    assert mask is not None and mask.shape == (2, 1, 16, 16)
    outside = ~mask[1, 0]
    assert outside.any() and mask[1].any()
    assert torch.equal(out[1][:, outside], out[0][:, outside])
    assert not torch.allclose(out[1][:, mask[1, 0]], out[0][:, mask[1, 0]])
    # target-only output: blended every step (x0 predictions), the final latent comes back unchanged in shape
    only = _edit(m, inv, encode, output="target")
    assert only.shape[0] == 1
