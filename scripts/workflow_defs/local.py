"""Workflows of local editing: DiffEdit (automatic mask + inversion to the encode ratio + masked decoding), SEGA,
LEDITS++."""
from .common import EDIT_PROMPT, SOURCE_PROMPT, builder, checkpoint, decode_and_save, note, photo, photo_step, text


def photo_prompts_and_mask(b, family):
    """Load Checkpoint, your photo, the source / edit / negative prompts and the DiffEdit mask (paper defaults:
    n 10, encode ratio 0.5, threshold 0.5) where the two prompts disagree."""
    ld = checkpoint(b, family)
    img = photo(b, ld.out("vae"), family)
    src = text(b, ld.out("clip"), SOURCE_PROMPT, "Source prompt (describes your photo)")
    tgt = text(b, ld.out("clip"), EDIT_PROMPT, "Edit prompt")
    neg = text(b, ld.out("clip"), "", "Negative prompt")
    mask = b.add("EditKitDiffEditMask", n=10, encode_ratio=0.5, threshold=0.5, dilate=0, blur=0.0, seed=0)
    b.connect(ld.out("model"), mask, "model")
    b.connect(img["latent"].out(0), mask, "latent")
    b.connect(src.out(0), mask, "reference")
    b.connect(tgt.out(0), mask, "query")
    b.connect(img["image"].out(0), mask, "image")
    return ld, img, src, tgt, neg, mask


def diffedit(family="sd15", repaint=False):
    b = builder()
    steps = ["**RePaint** reruns every block of 10 steps 3 times, re-noising the edit back to the block's start "
             "each time, so the edit blends with the kept source (3x the edit's model calls; the paper uses 10 "
             "resamples)."] if repaint else []
    note(b, family, "DiffEdit + RePaint resampling: harmonise a masked edit" if repaint else
         "DiffEdit: change one thing, keep the rest",
         [photo_step(family),
          "**Source prompt**: describe your photo; **Edit prompt**: the same sentence with the words you want "
          "changed (here red -> blue).",
          "**DiffEdit Mask** finds where the two prompts disagree (its preview shows the mask over your photo); "
          "lower its threshold or dilate it if the mask misses part of the object.",
          "**Invert** runs only to the encode ratio (SplitSigmasDenoise 0.5 = the last half of the schedule); "
          "**EditKit Inversion Sampler** edits inside the mask and keeps the source outside it."] + steps,
         "mask: n = 10 noise draws, encode ratio 0.5, threshold 0.5; DDIM inversion (CFG 1) to ratio 0.5 of "
         "50 steps, edit CFG 5 (Couairon et al. 2023)." + (" RePaint: jump length 10, resamples 3 "
                                                           "(paper: 10; Lugmayr et al. 2022)." if repaint else ""))
    ld, img, src, tgt, neg, mask = photo_prompts_and_mask(b, family)
    sched = b.add("BasicScheduler", scheduler="normal", steps=50, denoise=1.0)
    b.connect(ld.out("model"), sched, "model")
    split = b.add("SplitSigmasDenoise", title="Encode ratio (last half of the schedule)", denoise=0.5)
    b.connect(sched.out(0), split, "sigmas")
    inv = b.add("EditKitInvert", cfg=1.0, steps=50, scheduler="normal", fixed_point_iterations=0)
    b.connect(ld.out("model"), inv, "model")
    b.connect(img["latent"].out(0), inv, "latent")
    b.connect(src.out(0), inv, "positive")
    b.connect(split.out(1), inv, "sigmas")
    smp = b.add("EditKitInversionSampler", cfg=5.0, output="target")
    b.connect(ld.out("model"), smp, "model")
    b.connect(inv.out(1), smp, "inversion")
    b.connect(tgt.out(0), smp, "positive")
    b.connect(neg.out(0), smp, "negative")
    b.connect(mask.out(0), smp, "mask")
    sampler = smp.out(2)
    if repaint:
        rp = b.add("EditKitRePaint", jump_length=10, resamples=3, seed=0)
        b.connect(sampler, rp, "sampler")
        sampler = rp.out(0)
    sca = b.add("SamplerCustomAdvanced", title="Sample the masked edit")
    for i, name in enumerate(("noise", "guider", "sampler", "sigmas", "latent_image")):
        b.connect(sampler if name == "sampler" else smp.out(i), sca, name)
    decode_and_save(b, sca.out(0), ld.out("vae"), "editkit_diffedit_repaint" if repaint else "editkit_diffedit",
                    title="Decode the edit")
    return b.build()


def sega():
    from .guidance import _compare

    def add(b, ld, pos, neg):
        cfg_term = b.add("EditKitGuidanceTermCFG")
        last = cfg_term
        for concept, direction in (("a blue square", "add"), ("a white background", "remove")):
            c = text(b, ld.out("clip"), concept, f"SEGA concept ({direction})")
            term = b.add("EditKitGuidanceTermSEGA", title=f"SEGA: {direction} '{concept}'", direction=direction,
                         scale=5.0, warmup=10, threshold=0.95, momentum_scale=0.3, momentum_beta=0.6)
            b.connect(c.out(0), term, "concept")
            b.connect(last.out(0), term, "previous")
            last = term
        return last
    return _compare("editkit_guidance_sega", 7.5, add,
                    "SEGA: add one concept and remove another in the same sampling run",
                    "30 steps, CFG 7.5; per concept scale 5, warm-up 10 steps, threshold 0.95, momentum 0.3 / "
                    "beta 0.6 (Brack et al. 2023).")


LEDITS_EDITS = "- a red circle [circle]\n+ a blue circle [circle]"


def ledits(family="sd15"):
    b = builder()
    note(b, family, "LEDITS++: several edits in one pass, each inside its implicit mask",
         [photo_step(family),
          "**Source prompt**: describe your photo (the DDPM inversion's guidance; an empty prompt works too).",
          "**LEDITS++ edits**: one edit per line, '+ concept' adds and '- concept' removes; '[word]' picks the "
          "words whose attention map makes the mask, ': 7' sets that edit's scale. Here the red circle is "
          "removed and a blue one added in the same pass.",
          "The node's preview shows each edit's implicit mask (cross-attention map AND noise difference); "
          "lower **threshold** for larger masks, raise **scale** for stronger edits, raise the inversion's "
          "**skip** to keep more of the layout."],
         "edit-friendly DDPM inversion 50 steps, skip 8, CFG 3.5; edit scale 5, threshold 0.9, no warm-up "
         "(Brack et al. 2024; diffusers' LEditsPP defaults).")
    ld = checkpoint(b, family)
    img = photo(b, ld.out("vae"), family)
    src = text(b, ld.out("clip"), SOURCE_PROMPT, "Source prompt (describes your photo)")
    neg = text(b, ld.out("clip"), "", "Negative prompt")
    inv = b.add("EditKitDDPMInversion", cfg=3.5, steps=50, scheduler="normal", skip=8, seed=0)
    b.connect(ld.out("model"), inv, "model")
    b.connect(img["latent"].out(0), inv, "latent")
    b.connect(src.out(0), inv, "positive")
    b.connect(neg.out(0), inv, "negative")
    led = b.add("EditKitLEDITS", edits=LEDITS_EDITS, scale=5.0, threshold=0.9, warmup=0, masks="intersect",
                output="target")
    b.connect(ld.out("model"), led, "model")
    b.connect(ld.out("clip"), led, "clip")
    b.connect(inv.out(1), led, "inversion")
    decode_and_save(b, led.out(0), ld.out("vae"), "editkit_ledits", title="Decode the edit")
    return b.build()


def blended_latent(family="sd15"):
    b = builder()
    note(b, family, "Blended latents: a masked img2img edit with a plain KSampler",
         [photo_step(family),
          "**Source prompt** / **Edit prompt**: DiffEdit Mask finds where they disagree (or connect your own MASK).",
          "**Blended Latent** patches the model: outside the mask it keeps your photo (the latent follows the photo "
          "noised to each step's level), inside it the KSampler edits with the edit prompt.",
          "**KSampler** denoise sets how far the edit may go (img2img from the photo's latent)."],
         "mask: DiffEdit n 10, ratio 0.5, threshold 0.5; KSampler Euler 30 steps, CFG 7.5, denoise 0.7 "
         "(Blended Latent Diffusion, Avrahami et al. 2023).")
    ld, img, src, tgt, neg, mask = photo_prompts_and_mask(b, family)
    blend = b.add("EditKitBlendedLatent")
    b.connect(ld.out("model"), blend, "model")
    b.connect(img["latent"].out(0), blend, "source")
    b.connect(mask.out(0), blend, "mask")
    ks = b.add("KSampler", seed=0, steps=30, cfg=7.5, sampler_name="euler", scheduler="normal", denoise=0.7)
    b.connect(blend.out(0), ks, "model")
    b.connect(tgt.out(0), ks, "positive")
    b.connect(neg.out(0), ks, "negative")
    b.connect(img["latent"].out(0), ks, "latent_image")
    decode_and_save(b, ks.out(0), ld.out("vae"), "editkit_blended_latent", title="Decode the edit")
    return b.build()


def diffedit_repaint(family="sd15"):
    return diffedit(family, repaint=True)


WORKFLOWS = {"diffedit": ("Editing - DiffEdit", diffedit),
             "diffedit_repaint": ("Editing - DiffEdit + RePaint", diffedit_repaint),
             "blended_latent": ("Editing - Blended Latent (KSampler)", blended_latent),
             "ledits": ("Editing - LEDITS++", ledits),
             "guidance_sega": ("Guidance - SEGA", sega)}
