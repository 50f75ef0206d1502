"""Workflows of the attention-control nodes, each on a generated pair (EditKit Prompt Batch: row 0 the
source prompt, row 1 the target prompt, one seed) and on an inverted real image (EditKit Invert ->
attention control -> EditKit Inversion Sampler, whose source branch is the reconstruction). The "real
image" is made inside the workflow (txt2img, decode, encode) so the files run anywhere; swap that group
for LoadImage + VAE Encode to edit a photo."""
from .common import EDIT_PROMPT, SOURCE_PROMPT, builder, decode_and_save, model_loader

X0, X1, X2, X3, X4 = 20, 380, 760, 1140, 1520
SIZE = 128


def _prompts(b, src=SOURCE_PROMPT, tgt=EDIT_PROMPT):
    s = b.add("PrimitiveStringMultiline", (X0, 380), title="Source prompt", value=src, size=(300, 90))
    t = b.add("PrimitiveStringMultiline", (X0, 500), title="Target prompt", value=tgt, size=(300, 90))
    return s, t


def _pair(b, ld, src=SOURCE_PROMPT, tgt=EDIT_PROMPT):
    """Prompt batch (source + target, one seed) and an empty negative."""
    s, t = _prompts(b, src, tgt)
    pb = b.add("EditKitPromptBatch", (X1, 40), width=SIZE, height=SIZE, size=(320, 200))
    b.connect(ld.out("clip"), pb, "clip")
    b.connect(s.out(0), pb, "source_prompt")
    b.connect(t.out(0), pb, "target_prompts")
    neg = b.add("CLIPTextEncode", (X1, 280), title="Negative prompt", text="", size=(320, 100))
    b.connect(ld.out("clip"), neg, "clip")
    return {"ld": ld, "src": s, "tgt": t, "batch": pb, "neg": neg}


def _sample_pair(b, p, model, prefix, x=X3):
    ks = b.add("KSampler", (x, 40), title="Source (row 0) + target (row 1), one seed", seed=1, steps=12, cfg=5.0,
               sampler_name="euler", scheduler="normal", denoise=1.0, size=(300, 270))
    b.connect(model, ks, "model")
    b.connect(p["batch"].out(0), ks, "positive")
    b.connect(p["neg"].out(0), ks, "negative")
    b.connect(p["batch"].out(1), ks, "latent_image")
    dec, _ = decode_and_save(b, ks.out(0), p["ld"].out("vae"), (x + 340, 40), prefix)
    return ks, dec


def _real_image(b, ld, src_text, invert=True):
    """Source prompt encoding, a txt2img stand-in for a photo, its latent, and the inversion."""
    src_enc = b.add("CLIPTextEncode", (X1, 420), title="Source prompt (describes the image)", size=(320, 100))
    b.connect(ld.out("clip"), src_enc, "clip")
    b.connect(src_text.out(0), src_enc, "text")
    neg = b.add("CLIPTextEncode", (X1, 560), title="Negative prompt", text="", size=(320, 100))
    b.connect(ld.out("clip"), neg, "clip")
    empty = b.add("EmptyLatentImage", (X1, 700), width=SIZE, height=SIZE, batch_size=1, size=(320, 110))
    ks = b.add("KSampler", (X2, 420), title="Source image (txt2img stand-in for a photo)", seed=1, steps=12, cfg=5.0,
               sampler_name="euler", scheduler="normal", denoise=1.0, size=(300, 270))
    b.connect(ld.out("model"), ks, "model")
    b.connect(src_enc.out(0), ks, "positive")
    b.connect(neg.out(0), ks, "negative")
    b.connect(empty.out(0), ks, "latent_image")
    dec = b.add("VAEDecode", (X2, 720), title="Source image", size=(200, 50))
    b.connect(ks.out(0), dec, "samples")
    b.connect(ld.out("vae"), dec, "vae")
    enc = b.add("VAEEncode", (X2, 800), title="Encode the image to invert", size=(200, 50))
    b.connect(dec.out(0), enc, "pixels")
    b.connect(ld.out("vae"), enc, "vae")
    b.group("Source image (swap for LoadImage + VAE Encode)", (X2 - 10, 380, 320, 500))
    if not invert:
        return {"neg": neg, "latent": enc, "image": dec}
    inv = b.add("EditKitInvert", (X3, 420), cfg=1.0, steps=12, scheduler="normal", fixed_point_iterations=1, size=(320, 230))
    b.connect(ld.out("model"), inv, "model")
    b.connect(enc.out(0), inv, "latent")
    b.connect(src_enc.out(0), inv, "positive")
    return {"neg": neg, "inversion": inv, "image": dec, "latent": enc}


def _inverted(b, ld, s, t, model, prefix, x=X4):
    """EditKit Inversion Sampler (source branch = the inverted image) with the patched model."""
    r = _real_image(b, ld, s)
    tgt_enc = b.add("CLIPTextEncode", (X1, 280), title="Target prompt", size=(320, 100))
    b.connect(ld.out("clip"), tgt_enc, "clip")
    b.connect(t.out(0), tgt_enc, "text")
    smp = b.add("EditKitInversionSampler", (x, 40), cfg=5.0, output="source + target", size=(320, 200))
    b.connect(model, smp, "model")
    b.connect(r["inversion"].out(1), smp, "inversion")
    b.connect(tgt_enc.out(0), smp, "positive")
    b.connect(r["neg"].out(0), smp, "negative")
    sca = b.add("SamplerCustomAdvanced", (x, 300), size=(260, 130))
    for i, name in enumerate(("noise", "guider", "sampler", "sigmas", "latent_image")):
        b.connect(smp.out(i), sca, name)
    decode_and_save(b, sca.out(0), ld.out("vae"), (x + 360, 40), prefix)
    return r


# ---------------------------------------------------------------------------------------------
# Prompt-to-Prompt
# ---------------------------------------------------------------------------------------------

P2P_WIDGETS = dict(mode="auto", cross_replace_steps=0.8, self_replace_steps=0.4, reweight="", local_blend_words="red, blue",
                   blend_threshold=0.3)


def _p2p(b, ld, s, t, pos=(X2, 40)):
    p2p = b.add("EditKitPromptToPrompt", pos, size=(320, 330), **P2P_WIDGETS)
    b.connect(ld.out("model"), p2p, "model")
    b.connect(ld.out("clip"), p2p, "clip")
    b.connect(s.out(0), p2p, "source_prompt")
    b.connect(t.out(0), p2p, "target_prompt")
    return p2p


def p2p_pair():
    b = builder()
    ld = model_loader(b)
    p = _pair(b, ld)
    p2p = _p2p(b, ld, p["src"], p["tgt"])
    cap = b.add("EditKitAttentionMaps", (X2, 420), title="Word maps of both branches", words="red, blue, circle",
                levels="coarsest two", start_percent=0.0, end_percent=1.0, size=(320, 260))
    b.connect(p2p.out(0), cap, "model")
    b.connect(ld.out("clip"), cap, "clip")
    b.connect(p["src"].out(0), cap, "prompt")
    b.connect(p["tgt"].out(0), cap, "target_prompt")
    ks, dec = _sample_pair(b, p, cap.out(0), "editkit_p2p")
    show = b.add("EditKitShowAttentionMaps", (X3, 360), opacity=0.6, colormap="inferno", size=(300, 130))
    b.connect(cap.out(1), show, "attention_maps")
    b.connect(dec.out(0), show, "image")
    save = b.add("SaveImage", (X3 + 340, 360), filename_prefix="editkit_p2p_maps", size=(400, 300))
    b.connect(show.out(0), save, "images")
    return b.build()


def p2p_inverted():
    b = builder()
    ld = model_loader(b)
    s, t = _prompts(b)
    p2p = _p2p(b, ld, s, t)
    _inverted(b, ld, s, t, p2p.out(0), "editkit_p2p_inverted")
    return b.build()


# ---------------------------------------------------------------------------------------------
# MasaCtrl, Plug-and-Play, StyleAligned, reference attention
# ---------------------------------------------------------------------------------------------

def _masactrl(b, ld):
    n = b.add("EditKitMasaCtrl", (X2, 40), start_step=3, start_layer=-1, end_step=-1, mask_words="", mask_threshold=0.1,
              size=(320, 230))
    b.connect(ld.out("model"), n, "model")
    return n


def _pnp(b, ld):
    n = b.add("EditKitPlugAndPlay", (X2, 40), feature_injection=0.8, attention_injection=0.5, feature_block=-1,
              attention_block=-1, size=(320, 200))
    b.connect(ld.out("model"), n, "model")
    return n


def _style(b, ld):
    n = b.add("EditKitStyleAligned", (X2, 40), adain_queries=True, adain_keys=True, adain_values=False,
              share_group_norm=False, start_layer=0, end_layer=-1, start_percent=0.0, end_percent=1.0,
              shared_score_shift=0.0, size=(320, 330))
    b.connect(ld.out("model"), n, "model")
    return n


def _reference(b, ld):
    n = b.add("EditKitReferenceAttention", (X2, 40), weight=1.0, start_percent=0.0, end_percent=0.8, start_layer=0,
              end_layer=-1, cond_only=False, seed=0, size=(320, 270))
    b.connect(ld.out("model"), n, "model")
    return n


MASA_TARGET = "a red circle on the left of a white background"
STYLE_TARGET = "a blue square on a white background"


def _pair_workflow(make, prefix, tgt=EDIT_PROMPT):
    def fn():
        b = builder()
        ld = model_loader(b)
        p = _pair(b, ld, tgt=tgt)
        _sample_pair(b, p, make(b, ld).out(0), prefix)
        return b.build()
    return fn


def _inverted_workflow(make, prefix, tgt=EDIT_PROMPT):
    def fn():
        b = builder()
        ld = model_loader(b)
        s, t = _prompts(b, tgt=tgt)
        _inverted(b, ld, s, t, make(b, ld).out(0), prefix)
        return b.build()
    return fn


def masactrl_mask_pair():
    """MasaCtrl's mask-guided mode: the object attends to the source's object, the background to its background."""
    b = builder()
    ld = model_loader(b)
    p = _pair(b, ld, tgt=MASA_TARGET)
    n = b.add("EditKitMasaCtrl", (X2, 40), start_step=3, start_layer=-1, end_step=-1, mask_words="circle", mask_threshold=0.1,
              size=(320, 300))
    b.connect(ld.out("model"), n, "model")
    b.connect(ld.out("clip"), n, "clip")
    b.connect(p["src"].out(0), n, "source_prompt")
    b.connect(p["tgt"].out(0), n, "target_prompt")
    _sample_pair(b, p, n.out(0), "editkit_masactrl_mask")
    return b.build()


def reference_latent():
    """Reference attention from a reference LATENT (FABRIC style): a new prompt generated while reading the
    image's self-attention keys/values (the image noised to each step's level and run alongside)."""
    b = builder()
    ld = model_loader(b)
    s, t = _prompts(b, tgt=STYLE_TARGET)
    r = _real_image(b, ld, s, invert=False)
    ref = _reference(b, ld)
    b.connect(r["latent"].out(0), ref, "reference")
    tgt_enc = b.add("CLIPTextEncode", (X1, 280), title="Target prompt", size=(320, 100))
    b.connect(ld.out("clip"), tgt_enc, "clip")
    b.connect(t.out(0), tgt_enc, "text")
    empty = b.add("EmptyLatentImage", (X3, 420), width=SIZE, height=SIZE, batch_size=1, size=(320, 110))
    ks = b.add("KSampler", (X3, 40), title="New image reading the reference", seed=2, steps=12, cfg=5.0,
               sampler_name="euler", scheduler="normal", denoise=1.0, size=(300, 270))
    b.connect(ref.out(0), ks, "model")
    b.connect(tgt_enc.out(0), ks, "positive")
    b.connect(r["neg"].out(0), ks, "negative")
    b.connect(empty.out(0), ks, "latent_image")
    decode_and_save(b, ks.out(0), ld.out("vae"), (X4, 40), "editkit_reference_latent")
    return b.build()


WORKFLOWS = {
    "attention_p2p.json": p2p_pair,
    "attention_p2p_inverted.json": p2p_inverted,
    "attention_masactrl.json": _pair_workflow(_masactrl, "editkit_masactrl", MASA_TARGET),
    "attention_masactrl_mask.json": masactrl_mask_pair,
    "attention_masactrl_inverted.json": _inverted_workflow(_masactrl, "editkit_masactrl_inverted", MASA_TARGET),
    "attention_pnp.json": _pair_workflow(_pnp, "editkit_pnp"),
    "attention_pnp_inverted.json": _inverted_workflow(_pnp, "editkit_pnp_inverted"),
    "attention_style_aligned.json": _pair_workflow(_style, "editkit_style_aligned", STYLE_TARGET),
    "attention_style_aligned_inverted.json": _inverted_workflow(_style, "editkit_style_aligned_inverted", STYLE_TARGET),
    "attention_reference.json": _pair_workflow(_reference, "editkit_reference", STYLE_TARGET),
    "attention_reference_inverted.json": _inverted_workflow(_reference, "editkit_reference_inverted", STYLE_TARGET),
    "attention_reference_latent.json": reference_latent,
}
