"""Step-time ratios of the attention-control techniques against plain sampling of the same batch
(source + target, CFG on) on the full-size SD1.5 architecture (random weights, host dtype, 32x32 latent),
and the memory the stored word maps hold for a 64x64 latent (P2P local blend, MasaCtrl masks)."""
import torch

from common import interleaved, sd15

TITLE = "Attention control vs plain sampling (SD1.5 architecture, random weights, host dtype, 32x32 latent, batch source+target, cfg 5)"

# Goals from the issue (P2P and MasaCtrl step time, capture step time, stored-map memory at 64x64).
GOALS = {"p2p": 1.15, "masactrl": 1.10, "capture": 1.10}
MEMORY_GOAL = 200 << 20


def _techniques(model):
    from editkit.attention.controller import default_start_layer, install, layers_of
    from editkit.attention.maps import CaptureTechnique, CrossAttentionMapStore, blend_level, select_levels
    from editkit.attention.masactrl import MasaCtrl
    from editkit.attention.pnp import PlugAndPlay, default_blocks
    from editkit.attention.prompt_to_prompt import PromptToPrompt, make_plan
    from editkit.attention.reference import ReferenceAttention
    from editkit.attention.style_aligned import StyleAligned
    from editkit.core.introspect import attention_layout
    layout = attention_layout(model)
    T = 77
    g = torch.eye(T)
    w = torch.ones(T)
    w[5] = 2.0
    lvl = blend_level(layout)
    levels = sorted({s.downsample for s in layout.sites})
    out = {}

    def p2p():
        blend = CrossAttentionMapStore({"cat": [2]}, frozenset({lvl}), target_words=[{"cat": [2]}])
        return PromptToPrompt([make_plan(g, None, w, T)], 0.8, 0.4, frozenset(levels[1:]), blend, lvl, 0.3)
    fb, ab = default_blocks(layout)
    makers = {
        "p2p": p2p,
        "masactrl": lambda: MasaCtrl(0, -1, default_start_layer(layers_of(model)), -1),
        "capture": lambda: CaptureTechnique(CrossAttentionMapStore({"cat": [2, 3]}, select_levels(layout, "coarsest two"))),
        "pnp": lambda: PlugAndPlay(fb, 0.8, ab, 0.5),
        "style_aligned": lambda: StyleAligned(True, True, False, 0, -1, 0.0, 1.0),
        "reference": lambda: ReferenceAttention(1.0, 0.0, 1.0, 0, -1),
    }
    for name, make in makers.items():
        m = model.clone()
        tech = make()
        install(m, tech)
        out[name] = (m, tech)
    return out


def _map_memory(model):
    """Bytes held by stored maps after one step at a 64x64 latent (P2P local blend, MasaCtrl masks)."""
    import nodes
    from editkit.attention.controller import install
    from editkit.attention.maps import CrossAttentionMapStore, blend_level
    from editkit.attention.masactrl import MasaCtrl
    from editkit.attention.prompt_to_prompt import PromptToPrompt, make_plan
    from editkit.builtin_models.fullsize import sd15_conditioning
    from editkit.core.introspect import attention_layout
    layout = attention_layout(model)
    lvl = blend_level(layout)
    words = {"cat": [2], "hat": [5, 6]}
    blend = CrossAttentionMapStore(words, frozenset({lvl}), target_words=[words])
    p2p = PromptToPrompt([make_plan(torch.eye(77), None, None, 77)], 0.8, 0.4, frozenset(), blend, lvl, 0.3)
    masks = CrossAttentionMapStore(words, frozenset({lvl}), target_words=[words], per_step=True)
    masa = MasaCtrl(0, -1, 10, -1, masks, lvl, 0.1)
    rows = []
    pos = sd15_conditioning(batch=2)
    for name, tech, store in (("EditKitPromptToPrompt local blend", p2p, blend), ("EditKitMasaCtrl masks", masa, masks)):
        m = model.clone()
        install(m, tech)
        with torch.inference_mode():
            nodes.common_ksampler(m, 0, 1, 1.0, "euler", "normal", pos, pos,
                                  {"samples": torch.zeros(2, 4, 64, 64), "batch_index": [0, 0]}, disable_noise=False)
        rows.append((name, store.nbytes))
    return rows


def run():
    import nodes
    from editkit.builtin_models.fullsize import sd15_conditioning
    model = sd15()
    techs = _techniques(model)
    pos, neg = sd15_conditioning(batch=2), sd15_conditioning(seed=1)
    lat = {"samples": torch.zeros(2, 4, 32, 32), "batch_index": [0, 0]}
    steps = 2

    def sample(m):
        with torch.inference_mode():
            nodes.common_ksampler(m, 0, steps, 5.0, "euler", "normal", pos, neg, lat, disable_noise=False)
    fns = {"plain": lambda: sample(model)}
    for name, (m, _) in techs.items():
        fns[name] = (lambda m=m: sample(m))
    t = interleaved(fns, repeats=5)
    labels = {"p2p": "EditKitPromptToPrompt (replace+reweight, self 0.4, local blend)", "masactrl": "EditKitMasaCtrl (layers 10-15)",
              "capture": "EditKitAttentionMaps (coarsest two levels)", "pnp": "EditKitPlugAndPlay",
              "style_aligned": "EditKitStyleAligned (all layers)", "reference": "EditKitReferenceAttention (batch reference, all layers)"}
    rows = []
    for name, (m, tech) in techs.items():
        ratio = t[name] / t["plain"]
        goal = GOALS.get(name)
        rows.append({"technique": labels[name], "step-time ratio": f"{ratio:.3f}",
                     "goal": f"<= {goal:.2f}" if goal else "-", "met": ("yes" if ratio <= goal else "NO") if goal else "-",
                     "stored maps": "-"})
    for name, nbytes in _map_memory(model):
        rows.append({"technique": f"{name}, 64x64 latent", "step-time ratio": "-", "goal": "<= 200 MB",
                     "met": "yes" if nbytes <= MEMORY_GOAL else "NO", "stored maps": f"{nbytes / 1024:.1f} KiB"})
    return rows
