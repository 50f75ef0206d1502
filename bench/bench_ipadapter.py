"""Step-time ratio of sampling with one IP-Adapter vs plain sampling, full-size SD1.5, 32x32 latent, host compute dtype.

The adapter has the real ip-adapter_sd15 layout (4 tokens from a 1024-dim ViT-H embedding, 16
to_k_ip / to_v_ip pairs, fp16 weights as shipped) with random values; the plus layout (16 tokens)
is measured too.
"""
import torch

from common import interleaved, sd15

TITLE = "IP-Adapter vs plain sampling (SD1.5 architecture, random weights, host dtype, 32x32 latent)"


def run():
    import nodes
    from editkit.adapters import demo_models as DM
    from editkit.adapters import ipadapter as IPA
    from editkit.builtin_models.fullsize import SD15_UNET, sd15_conditioning
    model = sd15()
    pos, neg = sd15_conditioning(), sd15_conditioning(seed=1)
    lat = {"samples": torch.zeros(1, 4, 32, 32)}
    steps = 2
    patched = {}
    with torch.inference_mode():
        for kind, clip_dim, tokens in (("base", 1024, 4), ("plus", 1280, 16)):
            sd, meta = DM.make_ipadapter(SD15_UNET, kind, clip_dim=clip_dim, tokens=tokens, seed=3, dim_head=64,
                                         dtype=torch.float16)
            adapter = IPA.from_state_dict(sd, {"dim_head": 64})
            feats = torch.randn(2, clip_dim) if kind == "base" else torch.randn(2, 257, clip_dim)
            toks = IPA.project(adapter, feats)
            app = IPA.Application(adapter, toks[:1], toks[1:], 1.0)
            pairs = IPA.match_layers(model, adapter, "bench")
            m = model.clone()
            IPA.install(m, app, pairs, IPA.layer_weights([s for s, _ in pairs], "linear"))
            patched[kind] = m

    def sample(m):
        with torch.inference_mode():
            nodes.common_ksampler(m, 0, steps, 5.0, "euler", "normal", pos, neg, lat, disable_noise=False)
    t = interleaved({"plain": lambda: sample(model), "base": lambda: sample(patched["base"]),
                     "plus": lambda: sample(patched["plus"])}, repeats=3)
    rows = []
    for kind, label in (("base", "EditKitIPAdapterApply (SD1.5 base layout, 4 tokens)"),
                        ("plus", "EditKitIPAdapterApply (SD1.5 plus layout, 16 tokens)")):
        ratio = t[kind] / t["plain"]
        rows.append({"technique": label, "step-time ratio": f"{ratio:.3f}", "goal": "<= 1.10",
                     "met": "yes" if ratio <= 1.10 else "NO"})
    return rows
