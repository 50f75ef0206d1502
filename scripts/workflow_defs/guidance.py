"""Workflows of the guidance nodes."""
from .common import SOURCE_PROMPT, builder, decode_and_save, model_loader


def prompt_pair(b, ld, negative="blurry, dark"):
    pos = b.add("CLIPTextEncode", (380, 40), title="Positive prompt", text=SOURCE_PROMPT, size=(300, 100))
    neg = b.add("CLIPTextEncode", (380, 180), title="Negative prompt", text=negative, size=(300, 100))
    b.connect(ld.out("clip"), pos, "clip")
    b.connect(ld.out("clip"), neg, "clip")
    return pos, neg


def sample_with_guider(b, ld, guider, prefix, steps=12):
    """12 Euler steps from a 128x128 empty latent through SamplerCustomAdvanced with `guider`, decoded and
    saved; returns the BasicScheduler node (its sigmas also feed plots)."""
    sched = b.add("BasicScheduler", (720, 220), scheduler="normal", steps=steps, denoise=1.0, size=(280, 110))
    b.connect(ld.out("model"), sched, "model")
    ksel = b.add("KSamplerSelect", (720, 370), sampler_name="euler", size=(280, 60))
    noise = b.add("RandomNoise", (720, 470), noise_seed=1, size=(280, 80))
    empty = b.add("EmptyLatentImage", (720, 590), width=128, height=128, batch_size=1, size=(280, 110))
    sca = b.add("SamplerCustomAdvanced", (1040, 40), size=(260, 130))
    b.connect(noise.out(0), sca, "noise")
    b.connect(guider.out(0), sca, "guider")
    b.connect(ksel.out(0), sca, "sampler")
    b.connect(sched.out(0), sca, "sigmas")
    b.connect(empty.out(0), sca, "latent_image")
    decode_and_save(b, sca.out(0), ld.out("vae"), (1340, 40), prefix)
    return sched


def guidance_stack():
    """CFG ramp x guidance interval, APG and PAG stacked in one EditKitGuider, plus the plot of the scales."""
    b = builder()
    ld = model_loader(b)
    pos, neg = prompt_pair(b, ld)
    ramp = b.add("EditKitGuidanceSchedule", (20, 420), title="CFG ramp (increasing)", kind="linear", start_value=0.6,
                 end_value=1.2, start_percent=0.0, end_percent=1.0, over="progress", size=(300, 250))
    interval = b.add("EditKitGuidanceSchedule", (20, 700), title="Guidance interval", kind="interval", start_value=1.0,
                     sigma_low=0.28, sigma_high=5.42, size=(300, 250))
    b.connect(ramp.out(0), interval, "previous")
    cfg_term = b.add("EditKitGuidanceTermCFG", (380, 420), size=(280, 60))
    b.connect(interval.out(0), cfg_term, "schedule")
    apg = b.add("EditKitGuidanceTermAPG", (380, 520), eta=0.0, norm_threshold=15.0, momentum=-0.5, size=(280, 130))
    b.connect(cfg_term.out(0), apg, "previous")
    pag = b.add("EditKitGuidanceTermPAG", (380, 690), scale=2.0, layers="auto", size=(280, 110))
    b.connect(apg.out(0), pag, "previous")
    guider = b.add("EditKitGuider", (720, 40), cfg=6.0, size=(280, 140))
    b.connect(ld.out("model"), guider, "model")
    b.connect(pos.out(0), guider, "positive")
    b.connect(neg.out(0), guider, "negative")
    b.connect(pag.out(0), guider, "terms")
    sched = sample_with_guider(b, ld, guider, "editkit_guidance_stack")
    plot = b.add("EditKitGuidancePlot", (1040, 380), cfg=6.0, size=(280, 100))
    b.connect(sched.out(0), plot, "sigmas")
    b.connect(pag.out(0), plot, "terms")
    save = b.add("SaveImage", (1340, 380), filename_prefix="editkit_guidance_plot", size=(400, 260))
    b.connect(plot.out(0), save, "images")
    return b.build()


def cfg_schedule_ksampler():
    """The guidance interval as a MODEL patch for KSampler: the unconditional pass is skipped outside it."""
    b = builder()
    ld = model_loader(b)
    pos, neg = prompt_pair(b, ld)
    interval = b.add("EditKitGuidanceSchedule", (20, 420), title="Guidance interval", kind="interval", start_value=1.0,
                     sigma_low=0.28, sigma_high=5.42, size=(300, 250))
    patch = b.add("EditKitCFGSchedule", (380, 320), size=(280, 60))
    b.connect(ld.out("model"), patch, "model")
    b.connect(interval.out(0), patch, "schedule")
    empty = b.add("EmptyLatentImage", (380, 440), width=128, height=128, batch_size=1, size=(300, 110))
    ks = b.add("KSampler", (720, 40), seed=1, steps=12, cfg=6.0, sampler_name="euler", scheduler="normal",
               denoise=1.0, size=(300, 270))
    b.connect(patch.out(0), ks, "model")
    b.connect(pos.out(0), ks, "positive")
    b.connect(neg.out(0), ks, "negative")
    b.connect(empty.out(0), ks, "latent_image")
    decode_and_save(b, ks.out(0), ld.out("vae"), (1060, 40), "editkit_cfg_schedule")
    return b.build()


def _compare(prefix, cfg, add_terms, sampler="euler", cfgpp=False, steps=12, seed=3, negative="", plain_cfg=None):
    """Plain CFG (core CFGGuider) and EditKit's version side by side from one noise, one image batch:
    left the plain sample, right the sample with the technique. `add_terms(b, ld, pos, neg)` returns the
    last node of a term chain (or None); `cfgpp` swaps the sampler for EditKitSamplerCFGPP."""
    b = builder()
    ld = model_loader(b)
    pos, neg = prompt_pair(b, ld, negative=negative)
    noise = b.add("RandomNoise", (720, 40), noise_seed=seed, size=(280, 80))
    sched = b.add("BasicScheduler", (720, 160), scheduler="normal", steps=steps, denoise=1.0, size=(280, 110))
    b.connect(ld.out("model"), sched, "model")
    empty = b.add("EmptyLatentImage", (720, 310), width=128, height=128, batch_size=1, size=(280, 110))
    plain_sampler = b.add("KSamplerSelect", (720, 460), sampler_name=sampler, size=(280, 60))
    plain = b.add("CFGGuider", (720, 560), title="Plain CFG", cfg=cfg if plain_cfg is None else plain_cfg,
                  size=(280, 100))
    for node in (plain,):
        b.connect(ld.out("model"), node, "model")
        b.connect(pos.out(0), node, "positive")
        b.connect(neg.out(0), node, "negative")
    if cfgpp:
        guider = b.add("CFGGuider", (380, 560), title="CFG++ scale (0-1.5)", cfg=cfg, size=(280, 100))
        b.connect(ld.out("model"), guider, "model")
        ours_sampler = b.add("EditKitSamplerCFGPP", (380, 700), solver=sampler, size=(280, 60))
    else:
        last = add_terms(b, ld, pos, neg)
        guider = b.add("EditKitGuider", (380, 700), cfg=cfg, size=(280, 140))
        b.connect(ld.out("model"), guider, "model")
        if last is not None:
            b.connect(last.out(0), guider, "terms")
        ours_sampler = plain_sampler
    b.connect(pos.out(0), guider, "positive")
    b.connect(neg.out(0), guider, "negative")
    outs = []
    for i, (g, smp, title) in enumerate(((plain, plain_sampler, "plain"), (guider, ours_sampler, "with the technique"))):
        sca = b.add("SamplerCustomAdvanced", (1040, 40 + 260 * i), title=f"Sample ({title})", size=(260, 130))
        b.connect(noise.out(0), sca, "noise")
        b.connect(g.out(0), sca, "guider")
        b.connect(smp.out(0), sca, "sampler")
        b.connect(sched.out(0), sca, "sigmas")
        b.connect(empty.out(0), sca, "latent_image")
        dec = b.add("VAEDecode", (1340, 40 + 260 * i), size=(200, 50))
        b.connect(sca.out(0), dec, "samples")
        b.connect(ld.out("vae"), dec, "vae")
        outs.append(dec)
    both = b.add("ImageBatch", (1580, 40), title="Left: plain, right: with the technique", size=(220, 60))
    b.connect(outs[0].out(0), both, "image1")
    b.connect(outs[1].out(0), both, "image2")
    save = b.add("SaveImage", (1580, 160), filename_prefix=prefix, size=(400, 280))
    b.connect(both.out(0), save, "images")
    return b.build()


def _cfg_then(term_type, **widgets):
    def add(b, ld, pos, neg):
        cfg_term = b.add("EditKitGuidanceTermCFG", (380, 320), size=(280, 60))
        term = b.add(term_type, (380, 420), size=(280, 200), **widgets)
        b.connect(cfg_term.out(0), term, "previous")
        return term
    return add


def rescale():
    """Rescale CFG (phi 0.7) at a high CFG: the guided prediction keeps the conditional one's std."""
    return _compare("editkit_guidance_rescale", 12.0, _cfg_then("EditKitGuidanceTermRescale", phi=0.7))


def dynamic_threshold():
    """Dynamic thresholding at CFG 10, keeping the value range of CFG 5. (On the toy model a too-high CFG fails
    by overshooting at the first steps, which thresholding does not cure: 20 steps keep CFG 10 workable.)"""
    return _compare("editkit_guidance_dynamic_threshold", 10.0,
                    _cfg_then("EditKitGuidanceTermDynamicThreshold", percentile=0.995, mimic_scale=5.0), steps=20)


def perp_neg():
    """Perp-Neg: only the part of the negative prompt perpendicular to the positive is guided away from."""
    def add(b, ld, pos, neg):
        empty = b.add("CLIPTextEncode", (20, 420), title="Empty prompt", text="", size=(300, 100))
        b.connect(ld.out("clip"), empty, "clip")
        term = b.add("EditKitGuidanceTermPerpNeg", (380, 420), neg_scale=1.0, size=(280, 120))
        b.connect(empty.out(0), term, "empty_conditioning")
        return term
    # the negative overlaps the positive (red, white background): plain CFG fights it, Perp-Neg does not
    return _compare("editkit_guidance_perp_neg", 5.0, add, negative="a red square on a white background")


def sag():
    """Self-attention guidance on top of CFG."""
    return _compare("editkit_guidance_sag", 5.0, _cfg_then("EditKitGuidanceTermSAG", scale=0.5, blur_sigma=2.0, layers="auto"))


def cads():
    """CADS: condition annealing (noise on the text embedding early in sampling) at a high CFG."""
    return _compare("editkit_guidance_cads", 9.0,
                    _cfg_then("EditKitGuidanceTermCADS", noise_scale=0.25, tau1=0.6, tau2=0.9, psi=1.0,
                              noise_negative=False, seed=0))


def cfgpp():
    """CFG++ (Euler, scale 0.8) against plain Euler at CFG 5."""
    return _compare("editkit_guidance_cfgpp", 0.8, None, cfgpp=True, plain_cfg=5.0)


WORKFLOWS = {"guidance_stack.json": guidance_stack, "cfg_schedule_ksampler.json": cfg_schedule_ksampler,
             "guidance_rescale.json": rescale, "guidance_dynamic_threshold.json": dynamic_threshold,
             "guidance_perp_neg.json": perp_neg, "guidance_sag.json": sag, "guidance_cads.json": cads,
             "guidance_cfgpp.json": cfgpp}
