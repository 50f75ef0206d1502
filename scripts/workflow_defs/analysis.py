"""Workflows of the analysis nodes."""
from .common import SOURCE_PROMPT, builder, model_loader


def attention_maps():
    b = builder()
    ld = model_loader(b)
    text = b.add("PrimitiveStringMultiline", (20, 360), title="Prompt", value=SOURCE_PROMPT, size=(300, 100))
    pos_txt = b.add("CLIPTextEncode", (380, 40), title="Positive prompt", size=(300, 100))
    neg_txt = b.add("CLIPTextEncode", (380, 180), title="Negative prompt", text="", size=(300, 100))
    b.connect(ld.out("clip"), pos_txt, "clip")
    b.connect(ld.out("clip"), neg_txt, "clip")
    b.connect(text.out(0), pos_txt, "text")
    cap = b.add("EditKitAttentionMaps", (380, 320), words="red, circle, background", levels="coarsest two",
                start_percent=0.0, end_percent=1.0, size=(320, 230))
    b.connect(ld.out("model"), cap, "model")
    b.connect(ld.out("clip"), cap, "clip")
    b.connect(text.out(0), cap, "prompt")
    empty = b.add("EmptyLatentImage", (380, 590), width=128, height=128, batch_size=1, size=(300, 110))
    ks = b.add("KSampler", (760, 40), seed=1, steps=12, cfg=5.0, sampler_name="euler", scheduler="normal",
               denoise=1.0, size=(300, 270))
    b.connect(cap.out(0), ks, "model")
    b.connect(pos_txt.out(0), ks, "positive")
    b.connect(neg_txt.out(0), ks, "negative")
    b.connect(empty.out(0), ks, "latent_image")
    dec = b.add("VAEDecode", (1100, 40), size=(200, 50))
    b.connect(ks.out(0), dec, "samples")
    b.connect(ld.out("vae"), dec, "vae")
    show = b.add("EditKitShowAttentionMaps", (1100, 160), opacity=0.6, colormap="inferno", size=(300, 130))
    b.connect(cap.out(1), show, "attention_maps")
    b.connect(dec.out(0), show, "image")
    save = b.add("SaveImage", (1450, 40), filename_prefix="editkit_attention_maps", size=(400, 300))
    b.connect(show.out(0), save, "images")
    return b.build()


WORKFLOWS = {"attention_maps.json": attention_maps}
