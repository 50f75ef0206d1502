"""AutoGuidance workflow: the toy model guided away from its weak UNet (toy_weak.safetensors)."""
from .common import MODEL_LOADER, builder, model_loader
from .guidance import prompt_pair, sample_with_guider

WEAK_WEIGHTS = "toy_weak.safetensors"


def guidance_autoguidance():
    """CFG + AutoGuidance (Karras et al. 2024) in one EditKitGuider: + scale x (cond - weak cond) per step, the weak
    model being the toy model's smaller, briefly trained UNet (loaded with the toy model's CLIP and VAE)."""
    b = builder()
    ld = model_loader(b)
    cls, _ = MODEL_LOADER
    weak = b.add(cls, (20, 360), title="Weak model (AutoGuidance)", size=(300, 120), weights=WEAK_WEIGHTS)
    pos, neg = prompt_pair(b, ld, negative="")
    cfg_term = b.add("EditKitGuidanceTermCFG", (380, 320), size=(280, 60))
    ag = b.add("EditKitGuidanceTermAutoGuidance", (380, 420), scale=1.0, size=(280, 110))
    b.connect(cfg_term.out(0), ag, "previous")
    b.connect(weak.out("model"), ag, "weak_model")
    guider = b.add("EditKitGuider", (720, 40), cfg=3.0, size=(280, 140))
    b.connect(ld.out("model"), guider, "model")
    b.connect(pos.out(0), guider, "positive")
    b.connect(neg.out(0), guider, "negative")
    b.connect(ag.out(0), guider, "terms")
    sample_with_guider(b, ld, guider, "editkit_guidance_autoguidance")
    return b.build()


WORKFLOWS = {"guidance_autoguidance.json": guidance_autoguidance}
