"""AutoGuidance workflow: your model guided away from a weaker version of itself."""
from .common import builder, checkpoint, note
from .guidance import prompt_pair, sample_with_guider

WEAK_WEIGHTS = "toy_weak.safetensors"   # what --model toy loads for the weak model (the toy model's weak UNet)


def guidance_autoguidance(family="sd15"):
    """CFG + AutoGuidance (Karras et al. 2024) in one EditKitGuider: + scale x (cond - weak cond) per step."""
    b = builder()
    note(b, family, "AutoGuidance: guide your model away from a weaker version of itself",
         ["**Load Checkpoint (weak model)**: a smaller or less trained model of the same family (the paper uses "
          "an early, small version of the main model).", "**Positive / Negative prompt**: your prompt."],
         "30 steps, CFG 3 + AutoGuidance 1 (Karras et al. 2024; on the toy model this lifts two-object accuracy 76 -> 86 %).")
    ld = checkpoint(b, family)
    weak = checkpoint(b, family, title="Load Checkpoint (weak model)", toy_weights=WEAK_WEIGHTS)
    pos, neg = prompt_pair(b, ld, negative="")
    cfg_term = b.add("EditKitGuidanceTermCFG")
    ag = b.add("EditKitGuidanceTermAutoGuidance", scale=1.0)
    b.connect(cfg_term.out(0), ag, "previous")
    b.connect(weak.out("model"), ag, "weak_model")
    guider = b.add("EditKitGuider", cfg=3.0)
    b.connect(ld.out("model"), guider, "model")
    b.connect(pos.out(0), guider, "positive")
    b.connect(neg.out(0), guider, "negative")
    b.connect(ag.out(0), guider, "terms")
    sample_with_guider(b, ld, guider, "editkit_guidance_autoguidance", family)
    return b.build()


WORKFLOWS = {
    "guidance_autoguidance": ("Guidance - AutoGuidance", guidance_autoguidance),
    "toy_autoguidance": ("Toy model - AutoGuidance", lambda: guidance_autoguidance("toy")),
}
