"""Workflows of the adapter nodes: IP-Adapter (plain and two masked regions) and a ControlNet schedule.

They run on the default model with EditKit's generated adapter files (random weights, written by
adapters/demo_assets.py for each built-in model); for real use, swap in the real files (README).
"""
from editkit.adapters import demo_assets

from .common import MODEL_LOADER, builder, decode_and_save, model_loader

RED, BLUE = 0xD03020, 0x2040D0


def _demo_model() -> str:
    """Which built-in model the demo adapter files must fit."""
    return "toy" if "Toy" in MODEL_LOADER[0] else "tiny"


def _prompts(b, ld, text):
    pos = b.add("CLIPTextEncode", (380, 40), title="Positive prompt", text=text, size=(300, 100))
    neg = b.add("CLIPTextEncode", (380, 180), title="Negative prompt", text="", size=(300, 100))
    b.connect(ld.out("clip"), pos, "clip")
    b.connect(ld.out("clip"), neg, "clip")
    return pos, neg


def _sample(b, model, pos, neg, x=1060, seed=1):
    empty = b.add("EmptyLatentImage", (x, 420), width=128, height=128, batch_size=1, size=(280, 110))
    ks = b.add("KSampler", (x, 40), seed=seed, steps=12, cfg=5.0, sampler_name="euler", scheduler="normal", denoise=1.0,
               size=(300, 270))
    b.connect(model, ks, "model")
    b.connect(pos.out(0), ks, "positive")
    b.connect(neg.out(0), ks, "negative")
    b.connect(empty.out(0), ks, "latent_image")
    return ks


def _adapter(b, kind, pos):
    return b.add("EditKitIPAdapterLoader", pos, ipadapter_file=demo_assets.ipadapter_file(_demo_model(), kind),
                 size=(320, 60))


def _clip_vision(b, pos):
    return b.add("EditKitTinyCLIPVisionLoader", pos, clip_name=demo_assets.CLIP_VISION_FILE, size=(320, 60))


def ipadapter():
    """Image prompt + text: a red image steers the sample through IP-Adapter (weight 0.8, all steps)."""
    b = builder()
    ld = model_loader(b)
    pos, neg = _prompts(b, ld, "a circle on a white background")
    ipa = _adapter(b, "base", (20, 360))
    cv = _clip_vision(b, (20, 450))
    image = b.add("EmptyImage", (20, 540), title="Image prompt (red)", width=128, height=128, batch_size=1, color=RED,
                  size=(300, 130))
    apply = b.add("EditKitIPAdapterApply", (700, 40), weight=0.8, weight_type="linear", combine_images="average",
                  start_percent=0.0, end_percent=1.0, size=(320, 260))
    b.connect(ld.out("model"), apply, "model")
    b.connect(ipa.out(0), apply, "ipadapter")
    b.connect(cv.out(0), apply, "clip_vision")
    b.connect(image.out(0), apply, "image")
    ks = _sample(b, apply.out(0), pos, neg)
    decode_and_save(b, ks.out(0), ld.out("vae"), (1400, 40), "editkit_ipadapter")
    return b.build()


def ipadapter_masked():
    """Two image prompts in two regions: red on the left half, blue on the right (stacked applications)."""
    b = builder()
    ld = model_loader(b)
    pos, neg = _prompts(b, ld, "two circles on a white background")
    ipa = _adapter(b, "plus", (20, 360))
    cv = _clip_vision(b, (20, 450))
    red = b.add("EmptyImage", (20, 540), title="Image prompt (red)", width=128, height=128, batch_size=1, color=RED,
                size=(300, 130))
    blue = b.add("EmptyImage", (20, 700), title="Image prompt (blue)", width=128, height=128, batch_size=1, color=BLUE,
                 size=(300, 130))
    empty = b.add("SolidMask", (380, 320), title="Empty mask", value=0.0, width=128, height=128, size=(260, 110))
    half = b.add("SolidMask", (380, 460), title="Half", value=1.0, width=64, height=128, size=(260, 110))
    left = b.add("MaskComposite", (380, 600), title="Left half", x=0, y=0, operation="add", size=(260, 130))
    b.connect(empty.out(0), left, "destination")
    b.connect(half.out(0), left, "source")
    right = b.add("InvertMask", (380, 760), title="Right half", size=(260, 50))
    b.connect(left.out(0), right, "mask")
    first = b.add("EditKitIPAdapterApply", (700, 40), title="IP-Adapter: red, left", weight=0.8, weight_type="linear",
                  combine_images="average", start_percent=0.0, end_percent=1.0, size=(320, 260))
    second = b.add("EditKitIPAdapterApply", (700, 340), title="IP-Adapter: blue, right", weight=0.8,
                   weight_type="linear", combine_images="average", start_percent=0.0, end_percent=1.0, size=(320, 260))
    b.connect(ld.out("model"), first, "model")
    b.connect(first.out(0), second, "model")
    for node, img, mask in ((first, red, left), (second, blue, right)):
        b.connect(ipa.out(0), node, "ipadapter")
        b.connect(cv.out(0), node, "clip_vision")
        b.connect(img.out(0), node, "image")
        b.connect(mask.out(0), node, "attn_mask")
    ks = _sample(b, second.out(0), pos, neg)
    decode_and_save(b, ks.out(0), ld.out("vae"), (1400, 40), "editkit_ipadapter_masked")
    return b.build()


def control_schedule():
    """A ControlNet fading from 1.0 to 0.3 over the steps, soft block weights, restricted to the hint's square."""
    b = builder()
    ld = model_loader(b)
    pos, neg = _prompts(b, ld, "a red square on a white background")
    empty = b.add("SolidMask", (20, 360), title="Black", value=0.0, width=128, height=128, size=(260, 110))
    square = b.add("SolidMask", (20, 500), title="Square", value=1.0, width=64, height=64, size=(260, 110))
    comp = b.add("MaskComposite", (20, 640), title="Square in the middle", x=32, y=32, operation="add", size=(260, 130))
    b.connect(empty.out(0), comp, "destination")
    b.connect(square.out(0), comp, "source")
    hint = b.add("MaskToImage", (20, 800), title="Control hint", size=(220, 50))
    b.connect(comp.out(0), hint, "mask")
    loader = b.add("EditKitTinyControlNetLoader", (380, 320),
                   control_net_name=demo_assets.controlnet_file(_demo_model()), size=(320, 60))
    sched = b.add("EditKitControlSchedule", (380, 420), schedule="linear", schedule_start=1.0, schedule_end=0.3,
                  keyframes="0:1.0, 1:1.0", block_weights="soft (ControlNet code)", soft_ratio=0.825, custom_weights="",
                  cond_only=False, combine="sum", size=(320, 330))
    b.connect(loader.out(0), sched, "control_net")
    b.connect(comp.out(0), sched, "mask")
    apply = b.add("ControlNetApplyAdvanced", (720, 40), strength=1.0, start_percent=0.0, end_percent=1.0, size=(300, 170))
    b.connect(pos.out(0), apply, "positive")
    b.connect(neg.out(0), apply, "negative")
    b.connect(sched.out(0), apply, "control_net")
    b.connect(hint.out(0), apply, "image")
    empty_lat = b.add("EmptyLatentImage", (1060, 420), width=128, height=128, batch_size=1, size=(280, 110))
    ks = b.add("KSampler", (1060, 40), seed=1, steps=12, cfg=5.0, sampler_name="euler", scheduler="normal", denoise=1.0,
               size=(300, 270))
    b.connect(ld.out("model"), ks, "model")
    b.connect(apply.out(0), ks, "positive")
    b.connect(apply.out(1), ks, "negative")
    b.connect(empty_lat.out(0), ks, "latent_image")
    decode_and_save(b, ks.out(0), ld.out("vae"), (1400, 40), "editkit_control_schedule")
    return b.build()


WORKFLOWS = {"ipadapter.json": ipadapter, "ipadapter_masked.json": ipadapter_masked,
             "control_schedule.json": control_schedule}
