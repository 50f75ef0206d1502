"""Step-time ratio of sampling with EditKitAttentionMaps capture vs plain sampling, full-size SD1.5, 32x32 latent, host compute dtype."""
import torch

from common import interleaved, sd15

TITLE = "Attention-map capture vs plain sampling (SD1.5 architecture, random weights, host dtype, 32x32 latent)"


def run():
    import nodes
    from editkit.attention.maps import CrossAttentionMapStore, install_capture, select_levels
    from editkit.builtin_models.fullsize import sd15_conditioning
    from editkit.core.introspect import attention_layout
    model = sd15()
    store = CrossAttentionMapStore({"word": [2, 3]}, select_levels(attention_layout(model), "coarsest two"))
    patched = model.clone()
    install_capture(patched, store)
    pos, neg = sd15_conditioning(), sd15_conditioning(seed=1)
    lat = {"samples": torch.zeros(1, 4, 32, 32)}
    steps = 2

    def sample(m):
        with torch.inference_mode():
            nodes.common_ksampler(m, 0, steps, 5.0, "euler", "normal", pos, neg, lat, disable_noise=False)
    t = interleaved({"plain": lambda: sample(model), "capture": lambda: sample(patched)}, repeats=3)
    ratio = t["capture"] / t["plain"]
    return [{"technique": "EditKitAttentionMaps (coarsest two levels)", "step-time ratio": f"{ratio:.3f}",
             "goal": "<= 1.10", "met": "yes" if ratio <= 1.10 else "NO", "maps memory": f"{store.nbytes / 1024:.1f} KiB"}]
