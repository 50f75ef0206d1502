"""Workflows of the adapter nodes: IP-Adapter (plain and two masked regions) and a ControlNet schedule.

They name the files users download (README, IP-Adapter section); `--model toy` swaps in EditKit's generated
demo files (random weights, adapters/demo_assets.py) that fit the toy model.
"""
from .common import EXAMPLE, EXAMPLE_2, builder, checkpoint, decode_and_save, empty_latent, native, note, photo, text

IPADAPTER = "ip-adapter_sd15.safetensors"
IPADAPTER_PLUS = "ip-adapter-plus_sd15.safetensors"
CLIP_VISION = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
CONTROLNET = "control_v11p_sd15_canny_fp16.safetensors"
FILES_STEP = ("**IP-Adapter Loader** / **Load CLIP Vision**: the IP-Adapter file in models/ipadapter/ and its "
              "image encoder (ViT-H for the SD1.5 files) in models/clip_vision/.")


def _prompts(b, ld, value):
    return text(b, ld.out("clip"), value, "Positive prompt"), text(b, ld.out("clip"), "", "Negative prompt")


def _sample(b, model, pos, neg, family, seed=1):
    empty = empty_latent(b, family)
    ks = b.add("KSampler", seed=seed, steps=30, cfg=7.5, sampler_name="euler", scheduler="normal", denoise=1.0)
    b.connect(model, ks, "model")
    b.connect(pos.out(0), ks, "positive")
    b.connect(neg.out(0), ks, "negative")
    b.connect(empty.out(0), ks, "latent_image")
    return ks


def _adapter(b, name, toy_file=None):
    return b.add("EditKitIPAdapterLoader", toy={"inputs": {"ipadapter_file": toy_file}} if toy_file else None,
                 ipadapter_file=name)


def _clip_vision(b):
    return b.add("CLIPVisionLoader", clip_name=CLIP_VISION)


def _apply(b, title=None):
    return b.add("EditKitIPAdapterApply", title=title, weight=0.8, weight_type="linear", combine_images="average",
                 start_percent=0.0, end_percent=1.0)


def ipadapter(family="sd15"):
    """Image prompt + text: your image steers the sample through IP-Adapter (weight 0.8, all steps)."""
    b = builder()
    note(b, family, "IP-Adapter: an image prompt next to the text",
         [FILES_STEP, "**Load Image**: the image prompt (any picture).", "**Positive prompt**: the text part."],
         "30 steps, CFG 7.5, IP-Adapter weight 0.8 for all steps (Ye et al. 2023).")
    ld = checkpoint(b, family)
    pos, neg = _prompts(b, ld, "a circle on a white background")
    ipa = _adapter(b, IPADAPTER)
    cv = _clip_vision(b)
    img = photo(b, None, family, label="image prompt", encode=False)
    apply = _apply(b)
    b.connect(ld.out("model"), apply, "model")
    b.connect(ipa.out(0), apply, "ipadapter")
    b.connect(cv.out(0), apply, "clip_vision")
    b.connect(img["image"].out(0), apply, "image")
    ks = _sample(b, apply.out(0), pos, neg, family)
    decode_and_save(b, ks.out(0), ld.out("vae"), "editkit_ipadapter")
    return b.build()


def ipadapter_masked(family="sd15"):
    """Two image prompts in two regions: the first on the left half, the second on the right (stacked)."""
    b = builder()
    res = native(family)
    note(b, family, "IP-Adapter in two regions: one image prompt on the left, another on the right",
         [FILES_STEP + " The plus adapter reads more of each image.", "**Load Image** x2: the two image prompts.",
          "**Left half** / **Right half**: the regions (any MASK works, e.g. from a painted mask)."],
         "30 steps, CFG 7.5, weight 0.8 per region.")
    ld = checkpoint(b, family)
    pos, neg = _prompts(b, ld, "two shapes on a white background")
    ipa = _adapter(b, IPADAPTER_PLUS, toy_file="editkit-demo-ipadapter-plus-toy.safetensors")
    cv = _clip_vision(b)
    first = photo(b, None, family, image=EXAMPLE, label="left image prompt", encode=False)
    second = photo(b, None, family, image=EXAMPLE_2, label="right image prompt", encode=False)
    empty = b.add("SolidMask", title="Empty mask", value=0.0, width=res, height=res)
    half = b.add("SolidMask", title="Half", value=1.0, width=res // 2, height=res)
    left = b.add("MaskComposite", title="Left half", x=0, y=0, operation="add")
    b.connect(empty.out(0), left, "destination")
    b.connect(half.out(0), left, "source")
    right = b.add("InvertMask", title="Right half")
    b.connect(left.out(0), right, "mask")
    a1 = _apply(b, "IP-Adapter: left")
    a2 = _apply(b, "IP-Adapter: right")
    b.connect(ld.out("model"), a1, "model")
    b.connect(a1.out(0), a2, "model")
    for node, img, mask in ((a1, first, left), (a2, second, right)):
        b.connect(ipa.out(0), node, "ipadapter")
        b.connect(cv.out(0), node, "clip_vision")
        b.connect(img["image"].out(0), node, "image")
        b.connect(mask.out(0), node, "attn_mask")
    ks = _sample(b, a2.out(0), pos, neg, family)
    decode_and_save(b, ks.out(0), ld.out("vae"), "editkit_ipadapter_masked")
    return b.build()


def control_schedule(family="sd15"):
    """A Canny ControlNet fading from 1.0 to 0.3 over the steps, soft block weights, restricted to a square."""
    b = builder()
    res = native(family)
    note(b, family, "ControlNet with a strength schedule, soft block weights and a mask",
         ["**Load ControlNet Model**: a Canny ControlNet for your model (models/controlnet/).",
          "**Load Image**: the picture whose edges guide the layout.",
          "**Control Schedule**: strength over the steps (here 1.0 -> 0.3) and where it applies (the mask)."],
         "30 steps, CFG 7.5, soft block weights 0.825 (ControlNet's own soft mode).")
    ld = checkpoint(b, family)
    pos, neg = _prompts(b, ld, "a red square on a white background")
    img = photo(b, None, family, label="image whose edges to follow", encode=False)
    edges = b.add("Canny", low_threshold=0.4, high_threshold=0.8)
    b.connect(img["image"].out(0), edges, "image")
    empty = b.add("SolidMask", title="Black", value=0.0, width=res, height=res)
    square = b.add("SolidMask", title="Square", value=1.0, width=res // 2, height=res // 2)
    comp = b.add("MaskComposite", title="Square in the middle", x=res // 4, y=res // 4, operation="add")
    b.connect(empty.out(0), comp, "destination")
    b.connect(square.out(0), comp, "source")
    loader = b.add("ControlNetLoader", control_net_name=CONTROLNET)
    sched = b.add("EditKitControlSchedule", schedule="linear", schedule_start=1.0, schedule_end=0.3,
                  keyframes="0:1.0, 1:1.0", block_weights="soft (ControlNet code)", soft_ratio=0.825, custom_weights="",
                  cond_only=False, combine="sum")
    b.connect(loader.out(0), sched, "control_net")
    b.connect(comp.out(0), sched, "mask")
    apply = b.add("ControlNetApplyAdvanced", strength=1.0, start_percent=0.0, end_percent=1.0)
    b.connect(pos.out(0), apply, "positive")
    b.connect(neg.out(0), apply, "negative")
    b.connect(sched.out(0), apply, "control_net")
    b.connect(edges.out(0), apply, "image")
    empty_lat = empty_latent(b, family)
    ks = b.add("KSampler", seed=1, steps=30, cfg=7.5, sampler_name="euler", scheduler="normal", denoise=1.0)
    b.connect(ld.out("model"), ks, "model")
    b.connect(apply.out(0), ks, "positive")
    b.connect(apply.out(1), ks, "negative")
    b.connect(empty_lat.out(0), ks, "latent_image")
    decode_and_save(b, ks.out(0), ld.out("vae"), "editkit_control_schedule")
    return b.build()


WORKFLOWS = {
    "ipadapter": ("Adapters - IP-Adapter", ipadapter),
    "ipadapter_masked": ("Adapters - IP-Adapter in two regions", ipadapter_masked),
    "control_schedule": ("Adapters - ControlNet schedule", control_schedule),
}
