"""Workflows of the editing nodes: SDEdit on your photo."""
from .common import EDIT_PROMPT, builder, checkpoint, decode_and_save, note, photo, photo_step, text


def sdedit(family="sd15"):
    b = builder()
    note(b, family, "SDEdit: redraw your photo after a new prompt",
         [photo_step(family), "**Edit prompt**: describe the picture you want; **strength** (0.3-0.6 in the paper) "
          "trades faithfulness to the photo for following the prompt."],
         "strength 0.6, 50 steps (30 run from t0), CFG 7.5 (Meng et al. 2022).")
    ld = checkpoint(b, family)
    src = photo(b, ld.out("vae"), family)
    tgt = text(b, ld.out("clip"), EDIT_PROMPT, "Edit prompt")
    neg = text(b, ld.out("clip"), "", "Negative prompt")
    sd = b.add("EditKitSDEdit", strength=0.6, steps=50, scheduler="normal", seed=7)
    b.connect(ld.out("model"), sd, "model")
    b.connect(src["latent"].out(0), sd, "latent")
    guider = b.add("CFGGuider", cfg=7.5)
    b.connect(ld.out("model"), guider, "model")
    b.connect(tgt.out(0), guider, "positive")
    b.connect(neg.out(0), guider, "negative")
    ksel = b.add("KSamplerSelect", sampler_name="euler")
    sca = b.add("SamplerCustomAdvanced", title="Sample the edit")
    b.connect(sd.out(0), sca, "noise")
    b.connect(guider.out(0), sca, "guider")
    b.connect(ksel.out(0), sca, "sampler")
    b.connect(sd.out(2), sca, "sigmas")
    b.connect(sd.out(1), sca, "latent_image")
    decode_and_save(b, sca.out(0), ld.out("vae"), "editkit_sdedit", title="Decode the edit")
    return b.build()


WORKFLOWS = {
    "sdedit": ("Editing - SDEdit", sdedit),
    "toy_sdedit": ("Toy model - SDEdit", lambda: sdedit("toy")),
}
