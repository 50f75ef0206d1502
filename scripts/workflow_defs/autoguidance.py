"""AutoGuidance workflow: the toy model guided away from its weak UNet (toy_weak.safetensors)."""
from .common import MODEL_LOADER, SOURCE_PROMPT, builder, decode_and_save, model_loader

WEAK_WEIGHTS = "toy_weak.safetensors"


def guidance_autoguidance():
    """CFG + AutoGuidance (Karras et al. 2024) in one EditKitGuider: + scale x (cond - weak cond) per step, the weak
    model being the toy model's smaller, briefly trained UNet (loaded with the toy model's CLIP and VAE)."""
    b = builder()
    ld = model_loader(b)
    cls, _ = MODEL_LOADER
    weak = b.add(cls, (20, 360), title="Weak model (AutoGuidance)", size=(300, 120), weights=WEAK_WEIGHTS)
    pos = b.add("CLIPTextEncode", (380, 40), title="Positive prompt", text=SOURCE_PROMPT, size=(300, 100))
    neg = b.add("CLIPTextEncode", (380, 180), title="Negative prompt", text="", size=(300, 100))
    b.connect(ld.out("clip"), pos, "clip")
    b.connect(ld.out("clip"), neg, "clip")
    cfg_term = b.add("EditKitGuidanceTermCFG", (380, 320), size=(280, 60))
    ag = b.add("EditKitGuidanceTermAutoGuidance", (380, 420), scale=1.0, size=(280, 110))
    b.connect(cfg_term.out(0), ag, "previous")
    b.connect(weak.out("model"), ag, "weak_model")
    guider = b.add("EditKitGuider", (720, 40), cfg=3.0, size=(280, 140))
    b.connect(ld.out("model"), guider, "model")
    b.connect(pos.out(0), guider, "positive")
    b.connect(neg.out(0), guider, "negative")
    b.connect(ag.out(0), guider, "terms")
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
    decode_and_save(b, sca.out(0), ld.out("vae"), (1340, 40), "editkit_guidance_autoguidance")
    return b.build()


WORKFLOWS = {"guidance_autoguidance.json": guidance_autoguidance}
