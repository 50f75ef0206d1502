"""Cross-attention map capture: no effect on the output, right shapes, real maps, bounded memory, clear errors."""
import pytest
import torch

from editkit.attention.maps import attention_probs
from editkit.core.introspect import attention_layout
from editkit.nodes.analysis import AttentionMapsCapture, AttentionMapsShow
from ek_helpers import node_out, sample_ksampler

PROMPT = "a red circle and a blue square on a yellow background"


def capture(model, clip, words="red, blue square", levels="all", prompt=PROMPT, start=0.0, end=1.0):
    return node_out(AttentionMapsCapture.execute(model, clip, prompt, words, levels, start, end))


def test_probs_equal_reference_softmax():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 10, 32, generator=g), torch.randn(2, 7, 32, generator=g)
    heads, d = 4, 8
    ref = torch.einsum("bhqd,bhkd->bhqk", q.view(2, 10, heads, d).transpose(1, 2), k.view(2, 7, heads, d).transpose(1, 2))
    ref = (ref * d ** -0.5).softmax(-1).mean(1)
    got = attention_probs(q, k, heads, [1, 3, 6])
    torch.testing.assert_close(got, ref[..., [1, 3, 6]])
    torch.testing.assert_close(attention_probs(q, k, heads, list(range(7))).sum(-1), torch.ones(2, 10))
    # the (B, heads, L, d) form the DiT path uses, with few heads per block so the chunking is exercised
    from editkit.attention import maps as M
    q4, k4 = q.view(2, 10, heads, d).transpose(1, 2), k.view(2, 7, heads, d).transpose(1, 2)
    old_block, M._PROB_BLOCK_BYTES = M._PROB_BLOCK_BYTES, 2 * 10 * 7 * 4
    try:
        torch.testing.assert_close(M.attention_probs_heads(q4, k4, [1, 3, 6]), ref[..., [1, 3, 6]])
    finally:
        M._PROB_BLOCK_BYTES = old_block


def test_capture_is_bit_identical_and_maps_are_real(tiny_eps, tiny_clip, encode):
    pos, neg = encode(PROMPT), encode("")
    lat = torch.zeros(1, 4, 16, 16)
    plain = sample_ksampler(tiny_eps, pos, neg, lat, steps=4)
    m, store = capture(tiny_eps, tiny_clip)
    out = sample_ksampler(m, pos, neg, lat, steps=4)
    assert torch.equal(out, plain)
    maps = store.maps()
    assert maps.shape == (1, 2, 16, 16)                    # finest captured level = latent resolution
    assert maps.min() >= 0 and maps.max() <= 1
    assert all(maps[0, j].std() > 0.05 for j in range(2))  # not uniform
    assert not torch.allclose(maps[0, 0], maps[0, 1])      # different words, different maps
    assert store.steps_seen == {0, 1, 2, 3}
    assert set(store.sums) == {1, 2}
    # one sum per selected site per step, cond branch only
    sites = attention_layout(tiny_eps).sites
    assert sum(store.counts.values()) == len(sites) * 4


def test_memory_does_not_grow_with_steps(tiny_eps, tiny_clip, encode):
    pos, neg = encode(PROMPT), encode("")
    lat = torch.zeros(1, 4, 16, 16)
    m, store = capture(tiny_eps, tiny_clip)
    sample_ksampler(m, pos, neg, lat, steps=2)
    small = store.nbytes
    sample_ksampler(m, pos, neg, lat, steps=8)
    assert store.nbytes == small and store.nbytes < 16 * 1024  # words x levels, not steps
    assert store.steps_seen == set(range(8))  # the second run replaced the first (no accumulation)
    assert store.runs == 2


def test_levels_and_step_range(tiny_eps, tiny_clip, encode):
    pos, neg = encode(PROMPT), encode("")
    m, store = capture(tiny_eps, tiny_clip, levels="coarsest", start=0.5, end=1.0)
    sample_ksampler(m, pos, neg, torch.zeros(1, 4, 16, 16), steps=4)
    assert set(store.sums) == {2} and store.steps_seen == {2, 3}
    assert store.maps().shape == (1, 2, 8, 8)


def test_batch_and_show_node(tiny_eps, tiny_clip, tiny_vae, encode):
    pos, neg = encode(PROMPT), encode("")
    m, store = capture(tiny_eps, tiny_clip, words="circle, yellow background")
    lat = sample_ksampler(m, pos, neg, torch.zeros(2, 4, 8, 8), steps=3)
    maps = store.maps()
    assert maps.shape[:2] == (2, 2) and not torch.allclose(maps[0], maps[1])
    image = tiny_vae.decode(lat)
    grid, raw = node_out(AttentionMapsShow.execute(store, image, 0.6, "inferno"))
    h, w = image.shape[1:3]
    assert grid.shape == (2, h, 3 * w + 2 * 4, 3)
    assert raw.shape == (4, h, w)
    assert 0 <= float(grid.min()) and float(grid.max()) <= 1


def test_errors(tiny_eps, tiny_clip, tiny_flux, tiny_vae):
    with pytest.raises(ValueError, match=r"input 'words'.*'green'.*not in the prompt"):
        capture(tiny_eps, tiny_clip, words="red, green")
    with pytest.raises(ValueError, match=r"input 'words'"):
        capture(tiny_eps, tiny_clip, words=" , ")
    with pytest.raises(ValueError, match=r"input 'words'.*'green'"):
        capture(tiny_flux, tiny_clip, words="green")
    _, store = capture(tiny_eps, tiny_clip)
    with pytest.raises(ValueError, match=r"EditKitShowAttentionMaps: input 'attention_maps'"):
        AttentionMapsShow.execute(store, torch.zeros(1, 64, 64, 3), 0.5, "jet")


def test_chains_with_another_attn2_patch(tiny_eps, tiny_clip, encode):
    """Another pack's attn2 replace keeps working under capture (and capture still sees the layer)."""
    from editkit.core.patches import default_attention
    calls = []
    other = tiny_eps.clone()
    for s in attention_layout(tiny_eps).sites:
        other.set_model_attn2_replace(lambda q, k, v, e: (calls.append(1), default_attention(q, k, v, e) * 0.5)[1],
                                      s.block, s.number)
    pos, neg = encode(PROMPT), encode("")
    lat = torch.zeros(1, 4, 8, 8)
    theirs = sample_ksampler(other, pos, neg, lat, steps=2)
    m, store = capture(other, tiny_clip)
    both = sample_ksampler(m, pos, neg, lat, steps=2)
    assert calls and torch.equal(both, theirs) and store.sums


@pytest.mark.slow
def test_sd15_full_capture_attaches_to_expected_layers(sd15_full):
    from editkit.builtin_models.fullsize import sd15_conditioning
    import editkit.attention.maps as maps_mod

    store = maps_mod.CrossAttentionMapStore({"w": [1, 2]}, frozenset({1, 2, 4, 8}))
    m = sd15_full.clone()
    sites = maps_mod.install_capture(m, store)
    assert sorted({(s.block, s.number) for s in sites}) == sorted(
        [("input", i) for i in (1, 2, 4, 5, 7, 8)] + [("middle", 0)] + [("output", i) for i in range(3, 12)])
    plain = sample_ksampler(sd15_full, sd15_conditioning(), sd15_conditioning(seed=1), torch.zeros(1, 4, 32, 32), steps=1, cfg=1.0)
    out = sample_ksampler(m, sd15_conditioning(), sd15_conditioning(seed=1), torch.zeros(1, 4, 32, 32), steps=1, cfg=1.0)
    assert torch.equal(out, plain)
    assert sum(store.counts.values()) == 16 and store.maps().shape == (1, 1, 32, 32)


def test_both_branches_side_by_side(tiny_eps, tiny_clip, tiny_vae, encode):
    """An edit batch (row 0 source, row 1 target): each row is read with its own prompt's token positions."""
    from editkit.nodes.attention_control import PromptBatch, PromptToPromptNode
    src, tgt = "a red circle on a white background", "a blue circle on a white background"
    cond, lat = node_out(PromptBatch.execute(tiny_clip, src, tgt, 64, 64))
    model = node_out(PromptToPromptNode.execute(tiny_eps, tiny_clip, src, tgt, "auto", 0.8, 0.4, "", "", 0.3))[0]
    m, store = node_out(AttentionMapsCapture.execute(model, tiny_clip, src, "red, blue, circle", "all", 0.0, 1.0, tgt))
    out = sample_ksampler(m, cond, encode(""), lat["samples"], steps=3)
    assert store.words == ["red", "blue", "circle"] and store.pairs == [(1, 0)]
    raw = store.raw(1)
    assert raw.shape[:2] == (2, 3)
    assert float(raw[0, 1].abs().max()) == 0 and float(raw[1, 0].abs().max()) == 0     # 'blue' not in the source, 'red' not in the target
    assert raw[0, 0].std() > 0 and raw[1, 1].std() > 0 and raw[0, 2].std() > 0 and raw[1, 2].std() > 0
    # the same word at the same position in both prompts, read from each row's own queries
    plain_store = node_out(AttentionMapsCapture.execute(model, tiny_clip, src, "circle", "all", 0.0, 1.0))[1]
    image = tiny_vae.decode(out)
    grid, maps = node_out(AttentionMapsShow.execute(store, image, 0.6, "inferno"))
    h, w = image.shape[1:3]
    assert grid.shape == (1, h, 2 * (4 * w + 3 * 4) + 16, 3)                              # source panels | target panels
    assert maps.shape == (6, h, w)
    with pytest.raises(ValueError, match=r"input 'words'.*'green'.*neither"):
        AttentionMapsCapture.execute(model, tiny_clip, src, "green", "all", 0.0, 1.0, tgt)
    assert plain_store.words == ["circle"]


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_dit_capture_at_the_token_grid(arch, tiny_flux, tiny_clip, tiny_vae, encode):
    """SD3/Flux: image-to-text maps of every joint block at the token grid (latent / patch 2), one capture per
    block per step on the conditional branch, and the sample bit-identical to plain sampling."""
    from editkit.builtin_models.tiny import tiny_sd3
    model = tiny_flux if arch == "flux" else tiny_sd3(depth=2)
    g = torch.Generator().manual_seed(0)
    if arch == "flux":
        pos, neg = encode(PROMPT), encode("")
    else:   # SD3 wants a pooled output of adm_in_channels; the tiny CLIP's context fits the tiny MMDiT
        pos = [[encode(PROMPT)[0][0], {"pooled_output": torch.randn(1, 32, generator=g)}]]
        neg = [[encode("")[0][0], {"pooled_output": torch.zeros(1, 32)}]]
    lat = torch.zeros(1, 16, 8, 8)
    plain = sample_ksampler(model, pos, neg, lat, steps=3)
    m, store = capture(model, tiny_clip, words="red, square")
    out = sample_ksampler(m, pos, neg, lat, steps=3)
    assert torch.equal(out, plain)
    maps = store.maps()
    assert maps.shape == (1, 2, 4, 4) and set(store.sums) == {1}
    assert store.steps_seen == {0, 1, 2}
    assert store.counts[1] == (4 if arch == "flux" else 2) * 3          # joint blocks x steps
    assert all(maps[0, j].std() > 0.01 for j in range(2)) and not torch.allclose(maps[0, 0], maps[0, 1])
