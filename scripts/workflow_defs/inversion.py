"""Workflows of the inversion nodes: image -> invert -> edit with a new prompt -> decode, plus the
reconstruction error. The "real image" is made inside the workflow (txt2img, decode, encode) so the files
run anywhere; replace the 'Source image' group by LoadImage + VAE Encode for a photo."""
from .common import EDIT_PROMPT, SOURCE_PROMPT, builder, decode_and_save, model_loader

X0, X1, X2, X3 = 20, 380, 760, 1140


def _scaffold(b, loader=None):
    """Loader, prompts, the source image (txt2img -> decode -> encode). Returns a dict of handles."""
    ld = loader or model_loader(b)
    src_txt = b.add("CLIPTextEncode", (X1, 40), title="Source prompt (describes the image)", text=SOURCE_PROMPT, size=(320, 110))
    tgt_txt = b.add("CLIPTextEncode", (X1, 190), title="Edit prompt", text=EDIT_PROMPT, size=(320, 110))
    neg_txt = b.add("CLIPTextEncode", (X1, 340), title="Negative / null text", text="", size=(320, 100))
    for t in (src_txt, tgt_txt, neg_txt):
        b.connect(ld.out("clip"), t, "clip")
    empty = b.add("EmptyLatentImage", (X1, 480), width=128, height=128, batch_size=1, size=(320, 110))
    ks = b.add("KSampler", (X2, 40), title="Source image (txt2img stand-in for a photo)", seed=1, steps=12, cfg=5.0,
               sampler_name="euler", scheduler="normal", denoise=1.0, size=(300, 270))
    b.connect(ld.out("model"), ks, "model")
    b.connect(src_txt.out(0), ks, "positive")
    b.connect(neg_txt.out(0), ks, "negative")
    b.connect(empty.out(0), ks, "latent_image")
    dec = b.add("VAEDecode", (X2, 340), title="Source image", size=(200, 50))
    b.connect(ks.out(0), dec, "samples")
    b.connect(ld.out("vae"), dec, "vae")
    enc = b.add("VAEEncode", (X2, 420), title="Encode the image to invert", size=(200, 50))
    b.connect(dec.out(0), enc, "pixels")
    b.connect(ld.out("vae"), enc, "vae")
    save = b.add("SaveImage", (X2, 520), filename_prefix="editkit_inversion_source", size=(260, 280))
    b.connect(dec.out(0), save, "images")
    b.group("Source image (swap for LoadImage + VAE Encode)", (X2 - 10, 0, 320, 820))
    return {"ld": ld, "src": src_txt, "tgt": tgt_txt, "neg": neg_txt, "image": dec, "latent": enc}


def _edit_and_measure(b, s, inversion_out, prefix, cfg, negative=True, x=X3 + 360):
    """EditKitInversionSampler (source + target) -> SamplerCustomAdvanced -> decode, + reconstruction error."""
    smp = b.add("EditKitInversionSampler", (x, 40), cfg=cfg, output="source + target", size=(320, 200))
    b.connect(s["ld"].out("model"), smp, "model")
    b.connect(inversion_out, smp, "inversion")
    b.connect(s["tgt"].out(0), smp, "positive")
    if negative:
        b.connect(s["neg"].out(0), smp, "negative")
    sca = b.add("SamplerCustomAdvanced", (x, 300), size=(260, 130))
    for i, name in enumerate(("noise", "guider", "sampler", "sigmas", "latent_image")):
        b.connect(smp.out(i), sca, name)
    decode_and_save(b, sca.out(0), s["ld"].out("vae"), (x + 340, 40), f"{prefix}_reconstruction_and_edit")
    rec = b.add("LatentFromBatch", (x, 480), title="Reconstruction (source branch)", batch_index=0, length=1, size=(260, 100))
    b.connect(sca.out(0), rec, "samples")
    rec_dec = b.add("VAEDecode", (x, 620), size=(200, 50))
    b.connect(rec.out(0), rec_dec, "samples")
    b.connect(s["ld"].out("vae"), rec_dec, "vae")
    err = b.add("EditKitReconstructionError", (x + 340, 400), size=(300, 160))
    b.connect(s["image"].out(0), err, "image")
    b.connect(rec_dec.out(0), err, "reconstruction")
    b.connect(s["latent"].out(0), err, "latent")
    b.connect(rec.out(0), err, "reconstruction_latent")
    save = b.add("SaveImage", (x + 680, 400), filename_prefix=f"{prefix}_difference", size=(260, 280))
    b.connect(err.out(4), save, "images")
    return smp


def _inputs(b, s, node, negative=False):
    b.connect(s["ld"].out("model"), node, "model")
    b.connect(s["latent"].out(0), node, "latent")
    b.connect(s["src"].out(0), node, "positive")
    if negative:
        b.connect(s["neg"].out(0), node, "negative")


def ddim():
    b = builder()
    s = _scaffold(b)
    inv = b.add("EditKitInvert", (X3, 40), cfg=1.0, steps=12, scheduler="normal", fixed_point_iterations=2, size=(320, 230))
    _inputs(b, s, inv)
    _edit_and_measure(b, s, inv.out(1), "editkit_inversion_ddim", cfg=2.0)
    return b.build()


def direct():
    b = builder()
    s = _scaffold(b)
    inv = b.add("EditKitInvert", (X3, 40), cfg=1.0, steps=12, scheduler="normal", fixed_point_iterations=0, size=(320, 230))
    _inputs(b, s, inv)
    di = b.add("EditKitDirectInversion", (X3, 320), size=(320, 60))
    b.connect(inv.out(1), di, "inversion")
    _edit_and_measure(b, s, di.out(0), "editkit_inversion_direct", cfg=7.5)
    return b.build()


def null_text():
    b = builder()
    s = _scaffold(b)
    # Paper settings are 50 steps and 10 iterations; fewer here so the example runs in seconds on a CPU.
    # lr 5e-2: the toy model's 64-d text embeddings need a larger step than the paper's 1e-2 for SD's 768-d.
    inv = b.add("EditKitNullTextInversion", (X3, 40), cfg=7.5, steps=10, scheduler="normal", inner_iterations=5,
                learning_rate=0.05, early_stop=1e-5, fixed_point_iterations=0, size=(320, 300))
    _inputs(b, s, inv, negative=True)
    _edit_and_measure(b, s, inv.out(1), "editkit_inversion_null_text", cfg=7.5)
    return b.build()


def negative_prompt():
    b = builder()
    s = _scaffold(b)
    inv = b.add("EditKitNegativePromptInversion", (X3, 40), steps=12, scheduler="normal", fixed_point_iterations=1,
                proximal="l0", quantile=0.7, size=(320, 230))
    _inputs(b, s, inv)
    _edit_and_measure(b, s, inv.out(1), "editkit_inversion_npi", cfg=7.5, negative=False)
    return b.build()


def edict():
    b = builder()
    s = _scaffold(b)
    inv = b.add("EditKitEDICT", (X3, 40), cfg=3.0, mix=0.93, steps=12, scheduler="normal", size=(320, 230))
    _inputs(b, s, inv, negative=True)
    _edit_and_measure(b, s, inv.out(1), "editkit_inversion_edict", cfg=3.0)
    return b.build()


def ddpm():
    b = builder()
    s = _scaffold(b)
    inv = b.add("EditKitDDPMInversion", (X3, 40), cfg=3.5, steps=20, scheduler="normal", skip=7, seed=0, size=(320, 260))
    _inputs(b, s, inv, negative=True)
    _edit_and_measure(b, s, inv.out(1), "editkit_inversion_ddpm", cfg=10.0)
    return b.build()


def rf_inversion():
    b = builder()
    # RF-Inversion needs a rectified-flow model (SD3 / Flux); the built-in tiny flow UNet stands in for one.
    ld = b.add("EditKitTinyModelLoader", (20, 200), title="Flow model (SD3 / Flux in real use)",
               parameterization="flow", seed=0, size=(300, 120))
    s = _scaffold(b, loader=ld)
    inv = b.add("EditKitRFInversion", (X3, 40), steps=12, scheduler="simple", gamma=0.5, seed=0, eta=0.9, start=0.0,
                stop=0.25, size=(320, 300))
    b.connect(s["ld"].out("model"), inv, "model")
    b.connect(s["latent"].out(0), inv, "latent")
    b.connect(s["neg"].out(0), inv, "positive")          # the paper inverts with an empty prompt
    _edit_and_measure(b, s, inv.out(1), "editkit_inversion_rf", cfg=2.0)
    return b.build()


WORKFLOWS = {
    "inversion_ddim.json": ddim,
    "inversion_direct.json": direct,
    "inversion_null_text.json": null_text,
    "inversion_negative_prompt.json": negative_prompt,
    "inversion_edict.json": edict,
    "inversion_ddpm.json": ddpm,
    "inversion_rf.json": rf_inversion,
}
