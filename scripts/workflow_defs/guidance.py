"""Workflows of the guidance nodes (txt2img on your checkpoint at its native resolution)."""
from .common import SOURCE_PROMPT, builder, checkpoint, decode_and_save, empty_latent, note, text

PROMPT_STEP = "**Positive / Negative prompt**: your prompt."
COMPARE = "The saved image shows plain CFG (left) and the technique (right) from the same noise."


def prompt_pair(b, ld, negative="blurry, dark"):
    return text(b, ld.out("clip"), SOURCE_PROMPT, "Positive prompt"), text(b, ld.out("clip"), negative, "Negative prompt")


def sample_with_guider(b, ld, guider, prefix, family="sd15", steps=30):
    """Euler steps from an empty latent through SamplerCustomAdvanced with `guider`, decoded and saved;
    returns the BasicScheduler node (its sigmas also feed plots)."""
    sched = b.add("BasicScheduler", scheduler="normal", steps=steps, denoise=1.0)
    b.connect(ld.out("model"), sched, "model")
    ksel = b.add("KSamplerSelect", sampler_name="euler")
    noise = b.add("RandomNoise", noise_seed=1)
    empty = empty_latent(b, family)
    sca = b.add("SamplerCustomAdvanced", title="Sample")
    b.connect(noise.out(0), sca, "noise")
    b.connect(guider.out(0), sca, "guider")
    b.connect(ksel.out(0), sca, "sampler")
    b.connect(sched.out(0), sca, "sigmas")
    b.connect(empty.out(0), sca, "latent_image")
    decode_and_save(b, sca.out(0), ld.out("vae"), prefix)
    return sched


def guidance_stack(family="sd15"):
    """CFG ramp x guidance interval, APG and PAG stacked in one EditKitGuider, plus the plot of the scales."""
    b = builder()
    note(b, family, "Composable guidance: a CFG ramp inside the guidance interval, APG and PAG in one guider",
         [PROMPT_STEP, "Each **Guidance Term** adds to the one before; **Guidance Plot** draws the scales per step."],
         "30 steps, CFG 6 ramped 0.6 -> 1.2, interval sigma 0.28-5.42 (Kynkäänniemi et al. 2024), APG eta 0 "
         "(Sadat et al. 2025), PAG scale 2 (Ahn et al. 2024).")
    ld = checkpoint(b, family)
    pos, neg = prompt_pair(b, ld)
    ramp = b.add("EditKitGuidanceSchedule", title="CFG ramp (increasing)", kind="linear", start_value=0.6,
                 end_value=1.2, start_percent=0.0, end_percent=1.0, over="progress")
    interval = b.add("EditKitGuidanceSchedule", title="Guidance interval", kind="interval", start_value=1.0,
                     sigma_low=0.28, sigma_high=5.42)
    b.connect(ramp.out(0), interval, "previous")
    cfg_term = b.add("EditKitGuidanceTermCFG")
    b.connect(interval.out(0), cfg_term, "schedule")
    apg = b.add("EditKitGuidanceTermAPG", eta=0.0, norm_threshold=15.0, momentum=-0.5)
    b.connect(cfg_term.out(0), apg, "previous")
    pag = b.add("EditKitGuidanceTermPAG", scale=2.0, layers="auto")
    b.connect(apg.out(0), pag, "previous")
    guider = b.add("EditKitGuider", cfg=6.0)
    b.connect(ld.out("model"), guider, "model")
    b.connect(pos.out(0), guider, "positive")
    b.connect(neg.out(0), guider, "negative")
    b.connect(pag.out(0), guider, "terms")
    sched = sample_with_guider(b, ld, guider, "editkit_guidance_stack", family)
    plot = b.add("EditKitGuidancePlot", cfg=6.0)
    b.connect(sched.out(0), plot, "sigmas")
    b.connect(pag.out(0), plot, "terms")
    return b.build()


def cfg_schedule_ksampler(family="sd15"):
    """The guidance interval as a MODEL patch for KSampler: the unconditional pass is skipped outside it."""
    b = builder()
    note(b, family, "Guidance interval on a plain KSampler (CFG only where it helps)",
         [PROMPT_STEP, "**Guidance interval**: the sigma range where CFG applies; outside it the unconditional "
          "pass is skipped (faster)."], "30 steps, CFG 6, interval sigma 0.28-5.42 (Kynkäänniemi et al. 2024).")
    ld = checkpoint(b, family)
    pos, neg = prompt_pair(b, ld)
    interval = b.add("EditKitGuidanceSchedule", title="Guidance interval", kind="interval", start_value=1.0,
                     sigma_low=0.28, sigma_high=5.42)
    patch = b.add("EditKitCFGSchedule")
    b.connect(ld.out("model"), patch, "model")
    b.connect(interval.out(0), patch, "schedule")
    empty = empty_latent(b, family)
    ks = b.add("KSampler", seed=1, steps=30, cfg=6.0, sampler_name="euler", scheduler="normal", denoise=1.0)
    b.connect(patch.out(0), ks, "model")
    b.connect(pos.out(0), ks, "positive")
    b.connect(neg.out(0), ks, "negative")
    b.connect(empty.out(0), ks, "latent_image")
    decode_and_save(b, ks.out(0), ld.out("vae"), "editkit_cfg_schedule")
    return b.build()


def _compare(prefix, cfg, add_terms, what, defaults, sampler="euler", cfgpp=False, steps=30, seed=3, negative="",
             plain_cfg=None, family="sd15"):
    """Plain CFG (core CFGGuider) and EditKit's version side by side from one noise, one image batch:
    left the plain sample, right the sample with the technique. `add_terms(b, ld, pos, neg)` returns the
    last node of a term chain (or None); `cfgpp` swaps the sampler for EditKitSamplerCFGPP."""
    b = builder()
    note(b, family, what, [PROMPT_STEP, COMPARE], defaults)
    ld = checkpoint(b, family)
    pos, neg = prompt_pair(b, ld, negative=negative)
    noise = b.add("RandomNoise", noise_seed=seed)
    sched = b.add("BasicScheduler", scheduler="normal", steps=steps, denoise=1.0)
    b.connect(ld.out("model"), sched, "model")
    empty = empty_latent(b, family)
    plain_sampler = b.add("KSamplerSelect", sampler_name=sampler)
    plain = b.add("CFGGuider", title="Plain CFG", cfg=cfg if plain_cfg is None else plain_cfg)
    b.connect(ld.out("model"), plain, "model")
    b.connect(pos.out(0), plain, "positive")
    b.connect(neg.out(0), plain, "negative")
    if cfgpp:
        guider = b.add("CFGGuider", title="CFG++ scale (0-1.5)", cfg=cfg)
        b.connect(ld.out("model"), guider, "model")
        ours_sampler = b.add("EditKitSamplerCFGPP", solver=sampler)
    else:
        last = add_terms(b, ld, pos, neg)
        guider = b.add("EditKitGuider", cfg=cfg)
        b.connect(ld.out("model"), guider, "model")
        if last is not None:
            b.connect(last.out(0), guider, "terms")
        ours_sampler = plain_sampler
    b.connect(pos.out(0), guider, "positive")
    b.connect(neg.out(0), guider, "negative")
    outs = []
    for g, smp, title in ((plain, plain_sampler, "plain"), (guider, ours_sampler, "with the technique")):
        sca = b.add("SamplerCustomAdvanced", title=f"Sample ({title})")
        b.connect(noise.out(0), sca, "noise")
        b.connect(g.out(0), sca, "guider")
        b.connect(smp.out(0), sca, "sampler")
        b.connect(sched.out(0), sca, "sigmas")
        b.connect(empty.out(0), sca, "latent_image")
        dec = b.add("VAEDecode", title=f"Decode ({title})")
        b.connect(sca.out(0), dec, "samples")
        b.connect(ld.out("vae"), dec, "vae")
        outs.append(dec)
    both = b.add("ImageBatch", title="Left: plain, right: with the technique")
    b.connect(outs[0].out(0), both, "image1")
    b.connect(outs[1].out(0), both, "image2")
    save = b.add("SaveImage", filename_prefix=prefix)
    b.connect(both.out(0), save, "images")
    return b.build()


def _cfg_then(term_type, **widgets):
    def add(b, ld, pos, neg):
        cfg_term = b.add("EditKitGuidanceTermCFG")
        term = b.add(term_type, **widgets)
        b.connect(cfg_term.out(0), term, "previous")
        return term
    return add


def rescale():
    return _compare("editkit_guidance_rescale", 12.0, _cfg_then("EditKitGuidanceTermRescale", phi=0.7),
                    "Rescale CFG at a high CFG: the guided prediction keeps the conditional one's spread",
                    "30 steps, CFG 12, phi 0.7 (Lin et al. 2024).")


def dynamic_threshold():
    return _compare("editkit_guidance_dynamic_threshold", 10.0,
                    _cfg_then("EditKitGuidanceTermDynamicThreshold", percentile=0.995, mimic_scale=5.0),
                    "Dynamic thresholding: CFG 10 with the value range of CFG 5",
                    "30 steps, CFG 10, percentile 0.995, mimic scale 5 (Saharia et al. 2022).")


def perp_neg():
    def add(b, ld, pos, neg):
        empty = text(b, ld.out("clip"), "", "Empty prompt")
        term = b.add("EditKitGuidanceTermPerpNeg", neg_scale=1.0)
        b.connect(empty.out(0), term, "empty_conditioning")
        return term
    # the negative overlaps the positive (red, white background): plain CFG fights it, Perp-Neg does not
    return _compare("editkit_guidance_perp_neg", 5.0, add,
                    "Perp-Neg: only the part of the negative prompt perpendicular to the positive is avoided",
                    "30 steps, CFG 5, negative scale 1 (Armandpour et al. 2023).",
                    negative="a red square on a white background")


def sag():
    return _compare("editkit_guidance_sag", 5.0, _cfg_then("EditKitGuidanceTermSAG", scale=0.5, blur_sigma=2.0, layers="auto"),
                    "Self-attention guidance (SAG) on top of CFG", "30 steps, CFG 5, SAG scale 0.5, blur sigma 2 (Hong et al. 2023).")


def cads():
    return _compare("editkit_guidance_cads", 9.0,
                    _cfg_then("EditKitGuidanceTermCADS", noise_scale=0.25, tau1=0.6, tau2=0.9, psi=1.0,
                              noise_negative=False, seed=0),
                    "CADS: condition annealing (noise on the text embedding early in sampling) at a high CFG",
                    "30 steps, CFG 9, noise 0.25, tau1 0.6, tau2 0.9, psi 1 (Sadat et al. 2024).")


def cfgpp():
    return _compare("editkit_guidance_cfgpp", 0.8, None, "CFG++ (Euler, scale 0.8) next to plain Euler at CFG 5",
                    "30 steps, CFG++ scale 0.8 (Chung et al. 2025), plain CFG 5.", cfgpp=True, plain_cfg=5.0)


WORKFLOWS = {
    "guidance_stack": ("Guidance - Composable stack (CFG ramp, interval, APG, PAG)", guidance_stack),
    "cfg_schedule_ksampler": ("Guidance - Guidance interval on KSampler", cfg_schedule_ksampler),
    "guidance_rescale": ("Guidance - Rescale CFG", rescale),
    "guidance_dynamic_threshold": ("Guidance - Dynamic thresholding", dynamic_threshold),
    "guidance_perp_neg": ("Guidance - Perp-Neg", perp_neg),
    "guidance_sag": ("Guidance - SAG", sag),
    "guidance_cads": ("Guidance - CADS", cads),
    "guidance_cfgpp": ("Guidance - CFG++", cfgpp),
}
