"""Workflows of the editing nodes."""
from .common import EDIT_PROMPT, SOURCE_PROMPT, builder, decode_and_save, model_loader


def sdedit():
    b = builder()
    ld = model_loader(b)
    src_txt = b.add("CLIPTextEncode", (380, 40), title="Source prompt", text=SOURCE_PROMPT, size=(320, 110))
    tgt_txt = b.add("CLIPTextEncode", (380, 190), title="Edit prompt", text=EDIT_PROMPT, size=(320, 110))
    neg_txt = b.add("CLIPTextEncode", (380, 340), title="Negative prompt", text="", size=(320, 100))
    for t in (src_txt, tgt_txt, neg_txt):
        b.connect(ld.out("clip"), t, "clip")
    empty = b.add("EmptyLatentImage", (380, 480), width=128, height=128, batch_size=1, size=(320, 110))
    ks = b.add("KSampler", (760, 40), title="Source image (txt2img)", seed=1, steps=12, cfg=5.0,
               sampler_name="euler", scheduler="normal", denoise=1.0, size=(300, 270))
    b.connect(ld.out("model"), ks, "model")
    b.connect(src_txt.out(0), ks, "positive")
    b.connect(neg_txt.out(0), ks, "negative")
    b.connect(empty.out(0), ks, "latent_image")
    sd = b.add("EditKitSDEdit", (760, 360), strength=0.6, steps=8, scheduler="normal", seed=7, size=(300, 190))
    b.connect(ld.out("model"), sd, "model")
    b.connect(ks.out(0), sd, "latent")
    guider = b.add("CFGGuider", (1100, 300), cfg=5.0, size=(260, 100))
    b.connect(ld.out("model"), guider, "model")
    b.connect(tgt_txt.out(0), guider, "positive")
    b.connect(neg_txt.out(0), guider, "negative")
    ksel = b.add("KSamplerSelect", (1100, 440), sampler_name="euler", size=(260, 60))
    sca = b.add("SamplerCustomAdvanced", (1400, 300), size=(260, 130))
    b.connect(sd.out(0), sca, "noise")
    b.connect(guider.out(0), sca, "guider")
    b.connect(ksel.out(0), sca, "sampler")
    b.connect(sd.out(2), sca, "sigmas")
    b.connect(sd.out(1), sca, "latent_image")
    decode_and_save(b, ks.out(0), ld.out("vae"), (1100, 40), "editkit_sdedit_source")
    decode_and_save(b, sca.out(0), ld.out("vae"), (1700, 300), "editkit_sdedit_edit")
    return b.build()


WORKFLOWS = {"sdedit.json": sdedit}
