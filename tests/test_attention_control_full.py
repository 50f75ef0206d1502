"""Full-size SD1.5 and SDXL architectures (random weights, bf16, 32x32 latent, 1 step): every attention
controller attaches to the expected layers (calls counted per layer) and runs. All five are stacked on
one clone, so this is also a composition run at full size."""
import pytest
import torch

from editkit.core.introspect import attention_layout
from editkit.nodes.attention_control import (MasaCtrlNode, PlugAndPlayNode, PromptToPromptNode, ReferenceAttentionNode,
                                             StyleAlignedNode)
from ek_helpers import node_out, sample_ksampler
from test_attention_control import SRC, TGT, find_tech
from editkit.attention.masactrl import MasaCtrl
from editkit.attention.pnp import PlugAndPlay
from editkit.attention.prompt_to_prompt import PromptToPrompt
from editkit.attention.reference import ReferenceAttention
from editkit.attention.style_aligned import StyleAligned


def _stack(model, clip):
    m = node_out(PromptToPromptNode.execute(model, clip, SRC, TGT, "auto", 0.8, 0.4, "", "red, blue", 0.3))[0]
    m = node_out(MasaCtrlNode.execute(m, 0, -1, -1, "", 0.1))[0]
    m = node_out(PlugAndPlayNode.execute(m, 0.8, 0.5, -1, -1))[0]
    m = node_out(StyleAlignedNode.execute(m, True, True, False, False, 0, -1, 0.0, 1.0, 0.0))[0]
    m = node_out(ReferenceAttentionNode.execute(m, 1.0, 0.0, 1.0, 0, -1, False))[0]
    return m, {cls: find_tech(m, cls) for cls in (PromptToPrompt, MasaCtrl, PlugAndPlay, StyleAligned, ReferenceAttention)}


def _check(model, clip, cond, expected_masa_blocks, expected_pnp):
    layout = attention_layout(model)
    m, t = _stack(model, clip)
    lat = torch.zeros(2, 4, 32, 32)
    plain = sample_ksampler(model, cond, cond, lat, steps=1, cfg=1.0)
    out = sample_ksampler(m, cond, cond, lat, steps=1, cfg=1.0)
    assert torch.isfinite(out).all() and not torch.equal(out[1], plain[1])
    assert torch.equal(out[0], plain[0])                      # the source row is never edited
    orders = {s.order: s for s in layout.sites}
    fine = min(s.downsample for s in layout.sites)
    p2p = t[PromptToPrompt].applied
    assert {o for k, o in p2p if k == "cross"} == {s.order for s in layout.sites if s.cross}
    assert {o for k, o in p2p if k == "self"} == {s.order for s in layout.sites if s.downsample != fine}
    assert t[PromptToPrompt].blend.nbytes > 0
    masa = t[MasaCtrl].applied
    assert {(orders[o].block, orders[o].number) for o in masa} == expected_masa_blocks
    pnp = t[PlugAndPlay].applied
    feature, attn_blocks = expected_pnp
    assert {k[1:3] for k in pnp if k[0] == "attn1"} == {("output", b) for b in attn_blocks}
    assert ("features", feature) in pnp
    assert set(t[StyleAligned].applied) == set(orders) == set(t[ReferenceAttention].applied)
    assert all(steps == {0} for tech in t.values() for steps in tech.applied.values())
    return m


@pytest.mark.slow
def test_sd15_full_every_controller_attaches(sd15_full, tiny_clip):
    from editkit.builtin_models.fullsize import sd15_conditioning
    layout = attention_layout(sd15_full)
    assert len(layout.sites) == 16
    _check(sd15_full, tiny_clip, sd15_conditioning(batch=2),
           {("output", i) for i in range(6, 12)},               # MasaCtrl: layers 10-15 of 16
           (4, range(4, 12)))                                    # PnP: features at output block 4, Q/K in 4-11


@pytest.mark.slow
def test_sdxl_full_every_controller_attaches(sdxl_full, tiny_clip):
    from editkit.builtin_models.fullsize import sdxl_conditioning
    layout = attention_layout(sdxl_full)
    assert len(layout.sites) == 70
    _check(sdxl_full, tiny_clip, sdxl_conditioning(batch=2),
           {("output", i) for i in range(1, 6)},                # MasaCtrl: layers 44-69 of 70
           (1, range(1, 6)))                                     # PnP: the same decoder position as SD1.5's block 4
