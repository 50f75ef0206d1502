"""Workflows of the inversion nodes: your photo -> invert -> edit with a new prompt -> decode, with the
reconstruction error (PSNR/SSIM and the difference heat map on the node)."""
from .common import EDIT_PROMPT, SOURCE_PROMPT, builder, checkpoint, decode_and_save, note, photo, photo_step, text

PROMPTS = ("**Source prompt**: describe your photo; **Edit prompt**: the same sentence with the words you "
           "want changed (here red -> blue).")
OUTPUT = ("The saved image holds the reconstruction (left: how well the inversion reproduces your photo) and "
          "the edit (right); Reconstruction Error shows PSNR/SSIM and a heat map of the difference.")


def _scaffold(b, family, what, steps_text, defaults):
    note(b, family, what, [photo_step(family), PROMPTS, steps_text, OUTPUT], defaults)
    ld = checkpoint(b, family)
    img = photo(b, ld.out("vae"), family)
    src = text(b, ld.out("clip"), SOURCE_PROMPT, "Source prompt (describes your photo)")
    tgt = text(b, ld.out("clip"), EDIT_PROMPT, "Edit prompt")
    neg = text(b, ld.out("clip"), "", "Negative / null text")
    return {"ld": ld, "src": src, "tgt": tgt, "neg": neg, "image": img["image"], "latent": img["latent"]}


def _edit_and_measure(b, s, inversion_out, prefix, cfg, negative=True):
    """EditKitInversionSampler (source + target) -> SamplerCustomAdvanced -> decode, + reconstruction error."""
    smp = b.add("EditKitInversionSampler", cfg=cfg, output="source + target")
    b.connect(s["ld"].out("model"), smp, "model")
    b.connect(inversion_out, smp, "inversion")
    b.connect(s["tgt"].out(0), smp, "positive")
    if negative:
        b.connect(s["neg"].out(0), smp, "negative")
    sca = b.add("SamplerCustomAdvanced", title="Sample reconstruction + edit")
    for i, name in enumerate(("noise", "guider", "sampler", "sigmas", "latent_image")):
        b.connect(smp.out(i), sca, name)
    decode_and_save(b, sca.out(0), s["ld"].out("vae"), f"{prefix}_reconstruction_and_edit",
                    title="Decode reconstruction + edit")
    rec = b.add("LatentFromBatch", title="Reconstruction (source branch)", batch_index=0, length=1)
    b.connect(sca.out(0), rec, "samples")
    rec_dec = b.add("VAEDecode", title="Decode the reconstruction")
    b.connect(rec.out(0), rec_dec, "samples")
    b.connect(s["ld"].out("vae"), rec_dec, "vae")
    err = b.add("EditKitReconstructionError")
    b.connect(s["image"].out(0), err, "image")
    b.connect(rec_dec.out(0), err, "reconstruction")
    b.connect(s["latent"].out(0), err, "latent")
    b.connect(rec.out(0), err, "reconstruction_latent")
    return smp


def _inputs(b, s, node, negative=False):
    b.connect(s["ld"].out("model"), node, "model")
    b.connect(s["latent"].out(0), node, "latent")
    b.connect(s["src"].out(0), node, "positive")
    if negative:
        b.connect(s["neg"].out(0), node, "negative")


def ddim(family="sd15"):
    b = builder()
    s = _scaffold(b, family, "DDIM inversion, then edit", "**EditKit Invert**: more fixed-point iterations "
                  "reconstruct more exactly (0 = plain DDIM inversion).",
                  "50 steps, inversion CFG 1 with 2 fixed-point iterations (ReNoise / AIDI style), edit CFG 2.")
    inv = b.add("EditKitInvert", cfg=1.0, steps=50, scheduler="normal", fixed_point_iterations=2)
    _inputs(b, s, inv)
    _edit_and_measure(b, s, inv.out(1), "editkit_inversion_ddim", cfg=2.0)
    return b.build()


def direct(family="sd15"):
    b = builder()
    s = _scaffold(b, family, "Direct Inversion (PnP-Inversion): exact source branch, free edit branch",
                  "**EditKit Direct Inversion** puts the reconstruction branch back on the inversion path at every "
                  "step, so the edit can use a high CFG.", "50 steps, edit CFG 7.5 (Ju et al. 2024).")
    inv = b.add("EditKitInvert", cfg=1.0, steps=50, scheduler="normal", fixed_point_iterations=0)
    _inputs(b, s, inv)
    di = b.add("EditKitDirectInversion")
    b.connect(inv.out(1), di, "inversion")
    _edit_and_measure(b, s, di.out(0), "editkit_inversion_direct", cfg=7.5)
    return b.build()


def null_text(family="sd15"):
    b = builder()
    s = _scaffold(b, family, "Null-text inversion (NTI), then edit at CFG 7.5",
                  "**EditKit Null-Text Inversion** optimises the unconditional embedding per step (minutes on a "
                  "GPU for 50 x 10; fewer inner iterations are quicker and still close).",
                  "50 steps x 10 inner iterations, learning rate 1e-2, early stop 1e-5, CFG 7.5 (Mokady et al. 2023).")
    # On the toy model (64-d text embeddings) the step must be larger than the paper's 1e-2 for SD's 768-d.
    inv = b.add("EditKitNullTextInversion", toy={"inputs": {"learning_rate": 0.05}}, cfg=7.5, steps=50,
                scheduler="normal", inner_iterations=10, learning_rate=0.01, early_stop=1e-5, fixed_point_iterations=0)
    _inputs(b, s, inv, negative=True)
    _edit_and_measure(b, s, inv.out(1), "editkit_inversion_null_text", cfg=7.5)
    return b.build()


def negative_prompt(family="sd15"):
    b = builder()
    s = _scaffold(b, family, "Negative-prompt inversion + ProxEdit, then edit",
                  "No optimisation: the source prompt stands in for the null text; ProxEdit's l0 proximal "
                  "guidance keeps the edit local.", "50 steps, CFG 7.5, l0 proximal at quantile 0.7 (Miyake et al. 2023; Han et al. 2024).")
    inv = b.add("EditKitNegativePromptInversion", steps=50, scheduler="normal", fixed_point_iterations=1,
                proximal="l0", quantile=0.7)
    _inputs(b, s, inv)
    _edit_and_measure(b, s, inv.out(1), "editkit_inversion_npi", cfg=7.5, negative=False)
    return b.build()


def edict(family="sd15"):
    b = builder()
    s = _scaffold(b, family, "EDICT: exact inversion with coupled latents, then edit",
                  "**EditKit EDICT**: mix p = 0.93 (the paper's); reconstruction is exact up to float error.",
                  "50 steps, CFG 3, p 0.93 (Wallace et al. 2023).")
    inv = b.add("EditKitEDICT", cfg=3.0, mix=0.93, steps=50, scheduler="normal")
    _inputs(b, s, inv, negative=True)
    _edit_and_measure(b, s, inv.out(1), "editkit_inversion_edict", cfg=3.0)
    return b.build()


def ddpm(family="sd15"):
    b = builder()
    s = _scaffold(b, family, "Edit-friendly DDPM inversion, then edit",
                  "**EditKit DDPM Inversion** stores one noise map per step; **skip** the first steps to keep more "
                  "of the photo's layout.", "100 steps, T_skip 36, inversion CFG 3.5, edit CFG 15 (Huberman-Spiegelglas et al. 2024).")
    inv = b.add("EditKitDDPMInversion", cfg=3.5, steps=100, scheduler="normal", skip=36, seed=0)
    _inputs(b, s, inv, negative=True)
    _edit_and_measure(b, s, inv.out(1), "editkit_inversion_ddpm", cfg=15.0)
    return b.build()


def rf_inversion(family="sd3"):
    b = builder()
    s = _scaffold(b, family, "RF-Inversion (rectified-flow models: SD3, Flux), then edit",
                  "**EditKit RF-Inversion**: gamma pulls the inversion towards the photo, eta the edit towards the "
                  "inverted path for the first quarter of the steps.",
                  "28 steps, gamma 0.5, eta 0.9 from 0 to 0.25, edit CFG 2 (Rout et al. 2025). Flux: swap Load "
                  "Checkpoint for Load Diffusion Model + DualCLIPLoader + Load VAE.")
    inv = b.add("EditKitRFInversion", steps=28, scheduler="simple", gamma=0.5, seed=0, eta=0.9, start=0.0, stop=0.25)
    b.connect(s["ld"].out("model"), inv, "model")
    b.connect(s["latent"].out(0), inv, "latent")
    b.connect(s["neg"].out(0), inv, "positive")          # the paper inverts with an empty prompt
    _edit_and_measure(b, s, inv.out(1), "editkit_inversion_rf", cfg=2.0)
    return b.build()


WORKFLOWS = {
    "inversion_ddim": ("Inversion - DDIM", ddim),
    "inversion_direct": ("Inversion - Direct Inversion", direct),
    "inversion_null_text": ("Inversion - Null-text inversion", null_text),
    "inversion_negative_prompt": ("Inversion - Negative-prompt inversion", negative_prompt),
    "inversion_edict": ("Inversion - EDICT", edict),
    "inversion_ddpm": ("Inversion - Edit-friendly DDPM", ddpm),
    "inversion_rf": ("Inversion - RF-Inversion (SD3)", rf_inversion),
}
