"""Workflows of the guidance nodes."""
from .common import SOURCE_PROMPT, builder, decode_and_save, model_loader


def _prompts(b, ld, negative="blurry, dark"):
    pos = b.add("CLIPTextEncode", (380, 40), title="Positive prompt", text=SOURCE_PROMPT, size=(300, 100))
    neg = b.add("CLIPTextEncode", (380, 180), title="Negative prompt", text=negative, size=(300, 100))
    b.connect(ld.out("clip"), pos, "clip")
    b.connect(ld.out("clip"), neg, "clip")
    return pos, neg


def guidance_stack():
    """CFG ramp x guidance interval, APG and PAG stacked in one EditKitGuider, plus the plot of the scales."""
    b = builder()
    ld = model_loader(b)
    pos, neg = _prompts(b, ld)
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
    sched = b.add("BasicScheduler", (720, 220), scheduler="normal", steps=12, denoise=1.0, size=(280, 110))
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
    decode_and_save(b, sca.out(0), ld.out("vae"), (1340, 40), "editkit_guidance_stack")
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
    pos, neg = _prompts(b, ld)
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


WORKFLOWS = {"guidance_stack.json": guidance_stack, "cfg_schedule_ksampler.json": cfg_schedule_ksampler}
