"""Workflows of the layout nodes: regional prompts by boxes (regional attention) and a panorama with
region prompts (MultiDiffusion), txt2img on your checkpoint, with the regions drawn over the result."""
from .common import builder, checkpoint, decode_and_save, native, note, text

GLOBAL = "a red circle and a blue square on a white background"
LEFT, RIGHT = "a red circle on a white background", "a blue square on a white background"


def _region(b, clip, prompt, label, x, y, w, h, previous=None):
    enc = text(b, clip, prompt, f"Prompt: {label}")
    r = b.add("EditKitRegion", title=f"Region: {label}", x=x, y=y, width=w, height=h, weight=1.0, label=label)
    b.connect(enc.out(0), r, "conditioning")
    if previous is not None:
        b.connect(previous.out(0), r, "regions")
    return r


def _sample(b, ld, model, latent, pos, prefix, steps=50, cfg=7.5):
    neg = text(b, ld.out("clip"), "", "Negative prompt")
    ks = b.add("KSampler", title="Sample", seed=1, steps=steps, cfg=cfg, sampler_name="euler", scheduler="normal", denoise=1.0)
    b.connect(model, ks, "model")
    b.connect(pos.out(0), ks, "positive")
    b.connect(neg.out(0), ks, "negative")
    b.connect(latent.out(0), ks, "latent_image")
    dec, _ = decode_and_save(b, ks.out(0), ld.out("vae"), prefix)
    return dec


def regional_attention(family="sd15"):
    res = native(family)
    b = builder()
    note(b, family, "Regional prompting in one pass: each prompt inside its box",
         ["**Global prompt**: the whole picture; **Prompt: left / right**: what goes in each box.",
          "**Region** nodes: move the boxes (pixels) or connect a MASK instead; chain one per prompt.",
          "**Regional Attention** mode: masked (fast) or dense_diffusion (DenseDiffusion's modulation).",
          "**Regions (show)** draws the boxes over the result."],
         "50 steps, CFG 7.5; masked cross-attention at every step, global prompt kept inside the regions; "
         "DenseDiffusion strength 1.0 x (t/T)^5 (Kim et al. 2023).")
    ld = checkpoint(b, family)
    pos = text(b, ld.out("clip"), GLOBAL, "Global prompt")
    left = _region(b, ld.out("clip"), LEFT, "left", 0, 0, res // 2, res)
    right = _region(b, ld.out("clip"), RIGHT, "right", res // 2, 0, res // 2, res, previous=left)
    ra = b.add("EditKitRegionalAttention", mode="masked", strength=1.0, global_prompt_in_regions=True,
               start_percent=0.0, end_percent=1.0)
    b.connect(ld.out("model"), ra, "model")
    b.connect(right.out(0), ra, "regions")
    lat = b.add("EmptyLatentImage", width=res, height=res, batch_size=1)
    dec = _sample(b, ld, ra.out(0), lat, pos, "editkit_regional_attention")
    show = b.add("EditKitShowRegions", opacity=0.35)
    b.connect(dec.out(0), show, "image")
    b.connect(right.out(0), show, "regions")
    return b.build()


def multidiffusion(family="sd15"):
    res = native(family)
    b = builder()
    note(b, family, "A panorama three windows wide (MultiDiffusion), with a prompt per region",
         ["**Global prompt**: the scene; **Prompt: left / right**: what goes in the outer thirds.",
          "**Empty Latent Image**: any size of at least one window (here 3:1).",
          "**MultiDiffusion**: the window is the model's native size; a smaller stride blends more (slower)."],
         "50 steps, CFG 7.5, window = native size, stride 8 latent pixels (Bar-Tal et al. 2023); "
         "uniform weights (gaussian: Mixture of Diffusers).")
    ld = checkpoint(b, family)
    pos = text(b, ld.out("clip"), GLOBAL, "Global prompt")
    left = _region(b, ld.out("clip"), LEFT, "left", 0, 0, res, res)
    right = _region(b, ld.out("clip"), RIGHT, "right", 2 * res, 0, res, res, previous=left)
    md = b.add("EditKitMultiDiffusion", window_width=res, window_height=res, stride=64, weighting="uniform",
               toy={"inputs": {"window_width": 128, "window_height": 128, "stride": 16}})
    b.connect(ld.out("model"), md, "model")
    b.connect(right.out(0), md, "regions")
    lat = b.add("EmptyLatentImage", width=3 * res, height=res, batch_size=1)
    dec = _sample(b, ld, md.out(0), lat, pos, "editkit_multidiffusion")
    show = b.add("EditKitShowRegions", opacity=0.35)
    b.connect(dec.out(0), show, "image")
    b.connect(right.out(0), show, "regions")
    return b.build()


WORKFLOWS = {
    "regional_attention": ("Layout - Regional attention", regional_attention),
    "multidiffusion": ("Layout - MultiDiffusion panorama", multidiffusion),
}
