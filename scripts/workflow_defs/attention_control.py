"""Workflows of the attention-control nodes, each on a generated pair (EditKit Prompt Batch: row 0 the
source prompt, row 1 the target prompt, one seed) and on your photo (EditKit Invert -> attention control
-> EditKit Inversion Sampler, whose source branch is the reconstruction)."""
from .common import (EDIT_PROMPT, SOURCE_PROMPT, builder, checkpoint, decode_and_save, native, note, photo, photo_step,
                     text)

PAIR_STEP = ("**Source prompt** and **Target prompt**: one image per prompt from the same noise; the target "
             "keeps what the technique carries over from the source.")
PHOTO_PROMPTS = ("**Source prompt**: describe your photo; **Target prompt**: the picture you want (a few words "
                 "changed).")


def _prompts(b, src=SOURCE_PROMPT, tgt=EDIT_PROMPT):
    s = b.add("PrimitiveStringMultiline", title="Source prompt", col=0, value=src)
    t = b.add("PrimitiveStringMultiline", title="Target prompt", col=0, value=tgt)
    return s, t


def _pair(b, ld, s, t, family):
    """Prompt batch (source + target, one seed) and an empty negative."""
    res = native(family)
    pb = b.add("EditKitPromptBatch", width=res, height=res)
    b.connect(ld.out("clip"), pb, "clip")
    b.connect(s.out(0), pb, "source_prompt")
    b.connect(t.out(0), pb, "target_prompts")
    neg = text(b, ld.out("clip"), "", "Negative prompt")
    return {"ld": ld, "src": s, "tgt": t, "batch": pb, "neg": neg}


def _sample_pair(b, p, model, prefix):
    ks = b.add("KSampler", title="Source (row 0) + target (row 1), one seed", seed=1, steps=50, cfg=7.5,
               sampler_name="euler", scheduler="normal", denoise=1.0)
    b.connect(model, ks, "model")
    b.connect(p["batch"].out(0), ks, "positive")
    b.connect(p["neg"].out(0), ks, "negative")
    b.connect(p["batch"].out(1), ks, "latent_image")
    dec, _ = decode_and_save(b, ks.out(0), p["ld"].out("vae"), prefix, title="Decode source + target")
    return ks, dec


def _real_image(b, ld, src_text, family, invert=True):
    """Your photo, its latent, the source prompt and (invert) its DDIM inversion."""
    img = photo(b, ld.out("vae"), family)
    src_enc = b.add("CLIPTextEncode", title="Encode the source prompt")
    b.connect(ld.out("clip"), src_enc, "clip")
    b.connect(src_text.out(0), src_enc, "text")
    neg = text(b, ld.out("clip"), "", "Negative prompt")
    out = {"neg": neg, "latent": img["latent"], "image": img["image"], "src_enc": src_enc}
    if invert:
        inv = b.add("EditKitInvert", cfg=1.0, steps=50, scheduler="normal", fixed_point_iterations=1)
        b.connect(ld.out("model"), inv, "model")
        b.connect(img["latent"].out(0), inv, "latent")
        b.connect(src_enc.out(0), inv, "positive")
        out["inversion"] = inv
    return out


def _inverted(b, ld, s, t, model, prefix, family):
    """EditKit Inversion Sampler (source branch = the inverted photo) with the patched model."""
    r = _real_image(b, ld, s, family)
    tgt_enc = b.add("CLIPTextEncode", title="Encode the target prompt")
    b.connect(ld.out("clip"), tgt_enc, "clip")
    b.connect(t.out(0), tgt_enc, "text")
    smp = b.add("EditKitInversionSampler", cfg=7.5, output="source + target")
    b.connect(model, smp, "model")
    b.connect(r["inversion"].out(1), smp, "inversion")
    b.connect(tgt_enc.out(0), smp, "positive")
    b.connect(r["neg"].out(0), smp, "negative")
    sca = b.add("SamplerCustomAdvanced", title="Sample reconstruction + edit")
    for i, name in enumerate(("noise", "guider", "sampler", "sigmas", "latent_image")):
        b.connect(smp.out(i), sca, name)
    decode_and_save(b, sca.out(0), ld.out("vae"), prefix, title="Decode reconstruction + edit")
    return r


# ---------------------------------------------------------------------------------------------
# Prompt-to-Prompt
# ---------------------------------------------------------------------------------------------

P2P_WIDGETS = dict(mode="auto", cross_replace_steps=0.8, self_replace_steps=0.4, reweight="", local_blend_words="red, blue",
                   blend_threshold=0.3)
P2P_DEFAULTS = "50 steps, CFG 7.5, cross-attention replaced for 80 % of the steps, self-attention 40 % (Hertz et al. 2023)."


def _p2p(b, ld, s, t):
    p2p = b.add("EditKitPromptToPrompt", **P2P_WIDGETS)
    b.connect(ld.out("model"), p2p, "model")
    b.connect(ld.out("clip"), p2p, "clip")
    b.connect(s.out(0), p2p, "source_prompt")
    b.connect(t.out(0), p2p, "target_prompt")
    return p2p


def p2p_pair(family="sd15"):
    b = builder()
    note(b, family, "Prompt-to-Prompt on a generated pair, with the word maps of both branches",
         [PAIR_STEP, "**local_blend_words**: the words whose region may change (here red, blue)."], P2P_DEFAULTS)
    ld = checkpoint(b, family)
    s, t = _prompts(b)
    p = _pair(b, ld, s, t, family)
    p2p = _p2p(b, ld, s, t)
    cap = b.add("EditKitAttentionMaps", title="Word maps of both branches", words="red, blue, circle",
                levels="coarsest two", start_percent=0.0, end_percent=1.0)
    b.connect(p2p.out(0), cap, "model")
    b.connect(ld.out("clip"), cap, "clip")
    b.connect(s.out(0), cap, "prompt")
    b.connect(t.out(0), cap, "target_prompt")
    ks, dec = _sample_pair(b, p, cap.out(0), "editkit_p2p")
    show = b.add("EditKitShowAttentionMaps", opacity=0.6, colormap="inferno")
    b.connect(cap.out(1), show, "attention_maps")
    b.connect(dec.out(0), show, "image")
    return b.build()


def p2p_inverted(family="sd15"):
    b = builder()
    note(b, family, "Prompt-to-Prompt on your photo (inversion + word swap)",
         [photo_step(family), PHOTO_PROMPTS, "**local_blend_words**: the words whose region may change."],
         P2P_DEFAULTS + " Inversion: 50 DDIM steps, 1 fixed-point iteration.")
    ld = checkpoint(b, family)
    s, t = _prompts(b)
    p2p = _p2p(b, ld, s, t)
    _inverted(b, ld, s, t, p2p.out(0), "editkit_p2p_inverted", family)
    return b.build()


# ---------------------------------------------------------------------------------------------
# MasaCtrl, Plug-and-Play, StyleAligned, reference attention
# ---------------------------------------------------------------------------------------------

def _masactrl(b, ld):
    n = b.add("EditKitMasaCtrl", start_step=4, start_layer=-1, end_step=-1, mask_words="", mask_threshold=0.1)
    b.connect(ld.out("model"), n, "model")
    return n


def _pnp(b, ld):
    n = b.add("EditKitPlugAndPlay", feature_injection=0.8, attention_injection=0.5, feature_block=-1, attention_block=-1)
    b.connect(ld.out("model"), n, "model")
    return n


def _style(b, ld):
    n = b.add("EditKitStyleAligned", adain_queries=True, adain_keys=True, adain_values=False, share_group_norm=False,
              start_layer=0, end_layer=-1, start_percent=0.0, end_percent=1.0, shared_score_shift=0.0)
    b.connect(ld.out("model"), n, "model")
    return n


def _reference(b, ld):
    n = b.add("EditKitReferenceAttention", weight=1.0, start_percent=0.0, end_percent=0.8, start_layer=0, end_layer=-1,
              cond_only=False, seed=0)
    b.connect(ld.out("model"), n, "model")
    return n


MASA_TARGET = "a red circle on the left of a white background"
STYLE_TARGET = "a blue square on a white background"
TECHNIQUES = {
    "masactrl": ("MasaCtrl (mutual self-attention)", _masactrl, MASA_TARGET, "sd15",
                 "50 steps, CFG 7.5, source keys/values from step 4 in the decoder's later layers (Cao et al. 2023)."),
    "pnp": ("Plug-and-Play (features and self-attention)", _pnp, EDIT_PROMPT, "sd15",
            "50 steps, CFG 7.5, decoder features injected for 80 % and self-attention for 50 % of the steps (Tumanyan et al. 2023)."),
    "style_aligned": ("StyleAligned (shared attention)", _style, STYLE_TARGET, "sdxl",
                      "SDXL at 1024 px, 50 steps, CFG 7.5, AdaIN on queries and keys in every layer (Hertz et al. 2024)."),
    "reference": ("Reference attention", _reference, STYLE_TARGET, "sd15",
                  "50 steps, CFG 7.5, the reference's self-attention keys/values for the first 80 % of the steps."),
}


def _pair_workflow(key):
    what, make, tgt, family0, defaults = TECHNIQUES[key]

    def fn(family=family0):
        b = builder()
        note(b, family, f"{what} on a generated pair", [PAIR_STEP], defaults)
        ld = checkpoint(b, family)
        s, t = _prompts(b, tgt=tgt)
        p = _pair(b, ld, s, t, family)
        _sample_pair(b, p, make(b, ld).out(0), f"editkit_{key}")
        return b.build()
    return fn


def _inverted_workflow(key):
    what, make, tgt, family0, defaults = TECHNIQUES[key]

    def fn(family=family0):
        b = builder()
        note(b, family, f"{what} on your photo", [photo_step(family), PHOTO_PROMPTS],
             defaults + " Inversion: 50 DDIM steps, 1 fixed-point iteration.")
        ld = checkpoint(b, family)
        s, t = _prompts(b, tgt=tgt)
        _inverted(b, ld, s, t, make(b, ld).out(0), f"editkit_{key}_inverted", family)
        return b.build()
    return fn


def masactrl_mask_pair(family="sd15"):
    """MasaCtrl's mask-guided mode: the object attends to the source's object, the background to its background."""
    b = builder()
    note(b, family, "MasaCtrl, mask-guided: object and background attend separately",
         [PAIR_STEP, "**mask_words**: the object whose region is matched (its cross-attention map is the mask)."],
         TECHNIQUES["masactrl"][4])
    ld = checkpoint(b, family)
    s, t = _prompts(b, tgt=MASA_TARGET)
    p = _pair(b, ld, s, t, family)
    n = b.add("EditKitMasaCtrl", start_step=4, start_layer=-1, end_step=-1, mask_words="circle", mask_threshold=0.1)
    b.connect(ld.out("model"), n, "model")
    b.connect(ld.out("clip"), n, "clip")
    b.connect(p["src"].out(0), n, "source_prompt")
    b.connect(p["tgt"].out(0), n, "target_prompt")
    _sample_pair(b, p, n.out(0), "editkit_masactrl_mask")
    return b.build()


def reference_latent(family="sd15"):
    """Reference attention from a reference LATENT (FABRIC style): a new prompt generated while reading the
    image's self-attention keys/values (the image noised to each step's level and run alongside)."""
    b = builder()
    note(b, family, "Reference attention from your photo: a new image that reads its self-attention",
         [photo_step(family), "**Target prompt**: the new image; **weight** and **end_percent**: how much of the "
          "reference it keeps."], TECHNIQUES["reference"][4])
    ld = checkpoint(b, family)
    s, t = _prompts(b, tgt=STYLE_TARGET)
    r = _real_image(b, ld, s, family, invert=False)
    ref = _reference(b, ld)
    b.connect(r["latent"].out(0), ref, "reference")
    tgt_enc = b.add("CLIPTextEncode", title="Encode the target prompt")
    b.connect(ld.out("clip"), tgt_enc, "clip")
    b.connect(t.out(0), tgt_enc, "text")
    empty = b.add("EmptyLatentImage", width=native(family), height=native(family), batch_size=1)
    ks = b.add("KSampler", title="New image reading the reference", seed=2, steps=50, cfg=7.5,
               sampler_name="euler", scheduler="normal", denoise=1.0)
    b.connect(ref.out(0), ks, "model")
    b.connect(tgt_enc.out(0), ks, "positive")
    b.connect(r["neg"].out(0), ks, "negative")
    b.connect(empty.out(0), ks, "latent_image")
    decode_and_save(b, ks.out(0), ld.out("vae"), "editkit_reference_latent", title="Decode the new image")
    return b.build()


WORKFLOWS = {
    "attention_p2p": ("Attention - Prompt-to-Prompt (generated pair)", p2p_pair),
    "attention_p2p_inverted": ("Attention - Prompt-to-Prompt (photo)", p2p_inverted),
    "attention_masactrl": ("Attention - MasaCtrl (generated pair)", _pair_workflow("masactrl")),
    "attention_masactrl_mask": ("Attention - MasaCtrl mask-guided (generated pair)", masactrl_mask_pair),
    "attention_masactrl_inverted": ("Attention - MasaCtrl (photo)", _inverted_workflow("masactrl")),
    "attention_pnp": ("Attention - Plug-and-Play (generated pair)", _pair_workflow("pnp")),
    "attention_pnp_inverted": ("Attention - Plug-and-Play (photo)", _inverted_workflow("pnp")),
    "attention_style_aligned": ("Attention - StyleAligned (generated pair)", _pair_workflow("style_aligned")),
    "attention_style_aligned_inverted": ("Attention - StyleAligned (photo)", _inverted_workflow("style_aligned")),
    "attention_reference": ("Attention - Reference attention (generated pair)", _pair_workflow("reference")),
    "attention_reference_inverted": ("Attention - Reference attention (photo)", _inverted_workflow("reference")),
    "attention_reference_latent": ("Attention - Reference attention (reference latent)", reference_latent),
    "toy_p2p_inverted": ("Toy model - Prompt-to-Prompt (photo)", lambda: p2p_inverted("toy")),
}
