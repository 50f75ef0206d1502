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
    b.connect(pos, ks, "positive")
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
    dec = _sample(b, ld, ra.out(0), lat, pos.out(0), "editkit_regional_attention")
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
    dec = _sample(b, ld, md.out(0), lat, pos.out(0), "editkit_multidiffusion")
    show = b.add("EditKitShowRegions", opacity=0.35)
    b.connect(dec.out(0), show, "image")
    b.connect(right.out(0), show, "regions")
    return b.build()


def attend_and_excite(family="sd15"):
    res = native(family)
    b = builder()
    note(b, family, "Attend-and-Excite: every subject of the prompt appears (and keeps its colour)",
         ["**Attend-and-Excite**: type the prompt there (it encodes it for the sampler) and list its subject words; "
          "**binding** pairs each attribute with its object (optional).",
          "**scale** 0 gives plain sampling (compare); raise it if a subject still goes missing."],
         "50 steps, CFG 7.5; scale 20 over the first 25 steps, iterative refinement at steps 0/10/20 to peak attention "
         "0.05/0.5/0.8, at most 20 updates (Chefer et al. 2023); the 16x16 maps, Gaussian-smoothed.")
    ld = checkpoint(b, family)
    ae = b.add("EditKitAttendAndExcite", prompt=GLOBAL, subjects="circle, square", scale=20.0, end_percent=0.5,
               iterative_refinement=True, max_refine=20, binding="red circle, blue square", binding_weight=1.0,
               toy={"inputs": {"max_refine": 2}})
    b.connect(ld.out("model"), ae, "model")
    b.connect(ld.out("clip"), ae, "clip")
    lat = b.add("EmptyLatentImage", width=res, height=res, batch_size=1)
    _sample(b, ld, ae.out(0), lat, ae.out(1), "editkit_attend_and_excite")
    return b.build()


def _box(b, label, x, y, w, h, previous=None):
    r = b.add("EditKitRegion", title=f"Box: {label}", x=x, y=y, width=w, height=h, weight=1.0, label=label)
    if previous is not None:
        b.connect(previous.out(0), r, "regions")
    return r


def box_guidance(family="sd15"):
    res = native(family)
    b = builder()
    note(b, family, "Box guidance (BoxDiff): each boxed word inside its box",
         ["**Box** nodes: one per word, its **label** = the word of the prompt, x/y/width/height in pixels (or a MASK).",
          "**Box Guidance**: type the prompt there (it encodes it for the sampler).",
          "**Regions (show)** draws the boxes over the result."],
         "50 steps, CFG 7.5; inner-box, outer-box (top 20 % of the attention values) and corner constraints on the "
         "16x16 maps, Attend-and-Excite's update (scale 20, the first 25 steps, refinement) (Xie et al. 2023).")
    ld = checkpoint(b, family)
    left = _box(b, "circle", res // 16, res // 4, res * 3 // 8, res // 2)
    right = _box(b, "square", res * 9 // 16, res // 4, res * 3 // 8, res // 2, previous=left)
    bg = b.add("EditKitBoxGuidance", prompt=GLOBAL, scale=20.0, end_percent=0.5, iterative_refinement=True,
               max_refine=20, top_fraction=0.2, corner_weight=1.0, toy={"inputs": {"max_refine": 2}})
    b.connect(ld.out("model"), bg, "model")
    b.connect(ld.out("clip"), bg, "clip")
    b.connect(right.out(0), bg, "regions")
    lat = b.add("EmptyLatentImage", width=res, height=res, batch_size=1)
    dec = _sample(b, ld, bg.out(0), lat, bg.out(1), "editkit_box_guidance")
    show = b.add("EditKitShowRegions", opacity=0.35)
    b.connect(dec.out(0), show, "image")
    b.connect(right.out(0), show, "regions")
    return b.build()


WORKFLOWS = {
    "regional_attention": ("Layout - Regional attention", regional_attention),
    "multidiffusion": ("Layout - MultiDiffusion panorama", multidiffusion),
    "attend_and_excite": ("Layout - Attend-and-Excite", attend_and_excite),
    "box_guidance": ("Layout - Box guidance", box_guidance),
}
