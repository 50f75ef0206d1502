"""Workflows of the analysis nodes."""
from .common import SOURCE_PROMPT, builder, checkpoint, decode_and_save, empty_latent, note, text


def attention_maps(family="sd15"):
    b = builder()
    note(b, family, "Attention maps: where each word of the prompt lands",
         ["**Prompt**: your prompt; **words**: the words to map (comma separated).",
          "The heat maps appear on Show Attention Maps (one panel per word)."], "30 steps, CFG 7.5.")
    ld = checkpoint(b, family)
    prompt = b.add("PrimitiveStringMultiline", title="Prompt", col=0, value=SOURCE_PROMPT)
    pos = b.add("CLIPTextEncode", title="Encode the prompt")
    b.connect(ld.out("clip"), pos, "clip")
    b.connect(prompt.out(0), pos, "text")
    neg = text(b, ld.out("clip"), "", "Negative prompt")
    cap = b.add("EditKitAttentionMaps", words="red, circle, background", levels="coarsest two",
                start_percent=0.0, end_percent=1.0)
    b.connect(ld.out("model"), cap, "model")
    b.connect(ld.out("clip"), cap, "clip")
    b.connect(prompt.out(0), cap, "prompt")
    empty = empty_latent(b, family)
    ks = b.add("KSampler", seed=1, steps=30, cfg=7.5, sampler_name="euler", scheduler="normal", denoise=1.0)
    b.connect(cap.out(0), ks, "model")
    b.connect(pos.out(0), ks, "positive")
    b.connect(neg.out(0), ks, "negative")
    b.connect(empty.out(0), ks, "latent_image")
    dec, _ = decode_and_save(b, ks.out(0), ld.out("vae"), "editkit_attention_maps_image")
    show = b.add("EditKitShowAttentionMaps", opacity=0.6, colormap="inferno")
    b.connect(cap.out(1), show, "attention_maps")
    b.connect(dec.out(0), show, "image")
    return b.build()


WORKFLOWS = {"attention_maps": ("Analysis - Attention maps", attention_maps)}
