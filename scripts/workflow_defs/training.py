"""Workflows of the training nodes: teach the model a concept from a few photos, then prompt it."""
from .common import EXAMPLE, EXAMPLE_2, builder, checkpoint, decode_and_save, empty_latent, native, note, text



def _concept_images(b, vae, family):
    """Two Load Image -> Image Scale, batched (Image Batch) -> VAE Encode: the concept images."""
    res = native(family)
    members, scaled = [], []
    for i, name in enumerate((EXAMPLE, EXAMPLE_2), 1):
        load = b.add("LoadImage", title=f"Load Image (concept photo {i})", col=0, image=name)
        scale = b.add("ImageScale", title=f"Scale concept photo {i} to {res}x{res}", col=0, upscale_method="lanczos",
                      width=res, height=res, crop="center")
        b.connect(load.out(0), scale, "image")
        members += [load, scale]
        scaled.append(scale)
    batch = b.add("ImageBatch", title="Batch the concept photos", col=0)
    b.connect(scaled[0].out(0), batch, "image1")
    b.connect(scaled[1].out(0), batch, "image2")
    enc = b.add("VAEEncode", title="VAE Encode (concept photos)", col=0)
    b.connect(batch.out(0), enc, "pixels")
    b.connect(vae, enc, "vae")
    b.group("Concept photos", members + [batch, enc])
    return enc


def dreambooth_lora(family="sd15"):
    b = builder()
    note(b, family, "DreamBooth-LoRA: teach the model your subject from a few photos",
         ["**Load Image**: 4-8 photos of the subject (add Load Image + Image Batch nodes for more; any size: "
          "Image Scale crops them to one size).",
          "**DreamBooth LoRA Train**: the identifier (a rare token, `sks`) in the instance prompt and the class "
          "(`dog`) in the class prompt; the model generates the class images for prior preservation once "
          "(cached). The LoRA goes to models/loras/<name>.safetensors (core Load LoRA loads it).",
          "**Prompt**: use the identifier with the class: `a photo of sks dog in the snow`."],
         "500 steps, AdamW lr 1e-4, LoRA rank 4 on every attention projection, prior weight 1 with 100 class "
         "images (Ruiz et al. 2023 with LoRA, the diffusers DreamBooth-LoRA defaults).")
    ld = checkpoint(b, family)
    enc = _concept_images(b, ld.out("vae"), family)
    tr = b.add("EditKitDreamBoothLoRATrain", title="DreamBooth LoRA Train",
               toy={"inputs": {"class_images": 2, "class_steps": 2, "preview_every": 6}},
               instance_prompt="a photo of sks dog", identifier="sks", class_prompt="a photo of dog",
               name="editkit_dreambooth", steps=500, learning_rate=1e-4, rank=4, adapter="lora", batch_size=1,
               train_text_encoder=False, text_encoder_lr=5e-5, prior_loss_weight=1.0, class_images=100, class_steps=30, seed=0, preview_every=100, resume=False)
    b.connect(ld.out("model"), tr, "model")
    b.connect(ld.out("clip"), tr, "clip")
    b.connect(enc.out(0), tr, "latent")
    pos = text(b, tr.out(3), "a photo of sks dog in the snow", "Prompt with the identifier (the trained CLIP)")
    neg = text(b, ld.out("clip"), "", "Negative prompt")
    ks = b.add("KSampler", seed=1, steps=30, cfg=7.5, sampler_name="euler", scheduler="normal", denoise=1.0)
    b.connect(tr.out(0), ks, "model")
    b.connect(pos.out(0), ks, "positive")
    b.connect(neg.out(0), ks, "negative")
    b.connect(empty_latent(b, family).out(0), ks, "latent_image")
    decode_and_save(b, ks.out(0), ld.out("vae"), "editkit_dreambooth")
    return b.build()


def textual_inversion(family="sd15"):
    b = builder()
    note(b, family, "Textual inversion: a new word for your concept, learned from a few photos",
         ["**Load Image**: 3-5 photos of the concept (add Load Image + Image Batch nodes for more; any size: "
          "Image Scale crops them to one size).",
          "**Textual Inversion Train**: a caption with the placeholder (`<my-concept>`), one word of its class as "
          "init word. It writes models/embeddings/<name>.safetensors.",
          "**Prompt**: any prompt box takes `embedding:<name>` (here built from the node's output, so the "
          "prompt is encoded after training)."],
         "3000 steps, AdamW lr 5e-3, one vector initialised from the init word (Gal et al. 2023).")
    ld = checkpoint(b, family)
    enc = _concept_images(b, ld.out("vae"), family)
    tr = b.add("EditKitTextualInversionTrain", title="Textual Inversion Train", toy={"inputs": {"steps": 200, "preview_every": 100}},
               captions="a photo of <my-concept>", placeholder="<my-concept>", init_word="dog",
               name="editkit_concept", num_vectors=1, steps=3000, learning_rate=5e-3, batch_size=1, seed=0,
               preview_every=500, resume=False)
    b.connect(ld.out("model"), tr, "model")
    b.connect(ld.out("clip"), tr, "clip")
    b.connect(enc.out(0), tr, "latent")
    prompt = b.add("StringConcatenate", title="Prompt with the new word", string_a="a photo of", string_b="",
                   delimiter=" ")
    b.connect(tr.out(0), prompt, "string_b")
    pos = b.add("CLIPTextEncode", title="Encode the prompt", text="")
    b.connect(ld.out("clip"), pos, "clip")
    b.connect(prompt.out(0), pos, "text")
    neg = text(b, ld.out("clip"), "", "Negative prompt")
    ks = b.add("KSampler", seed=1, steps=30, cfg=7.5, sampler_name="euler", scheduler="normal", denoise=1.0)
    b.connect(ld.out("model"), ks, "model")
    b.connect(pos.out(0), ks, "positive")
    b.connect(neg.out(0), ks, "negative")
    b.connect(empty_latent(b, family).out(0), ks, "latent_image")
    decode_and_save(b, ks.out(0), ld.out("vae"), "editkit_textual_inversion")
    return b.build()


def custom_diffusion(family="sd15"):
    b = builder()
    note(b, family, "Custom Diffusion: teach the model your subject through its cross-attention K/V and a new token",
         ["**Load Image**: 4-8 photos of the subject (add Load Image + Image Batch nodes for more).",
          "**Custom Diffusion Train**: captions with the modifier token (`<new1>`) before the class word, the class "
          "prompt for prior preservation (class images generated once, cached). It writes the K/V deltas to "
          "models/loras/<name>.safetensors and the token to models/embeddings/<name>.safetensors.",
          "**Prompt**: `embedding:<name>` before the class word (built from the node's output here)."],
         "250 steps, AdamW lr 1e-5, K/V of every cross-attention + the token, prior weight 1 with 200 class "
         "images (Kumari et al. 2023).")
    ld = checkpoint(b, family)
    enc = _concept_images(b, ld.out("vae"), family)
    tr = b.add("EditKitCustomDiffusionTrain", title="Custom Diffusion Train",
               toy={"inputs": {"steps": 60, "class_images": 2, "class_steps": 2}},
               captions="photo of a <new1> dog", placeholder="<new1>", init_word="dog", class_prompt="photo of a dog",
               name="editkit_custom_diffusion", steps=250, learning_rate=1e-5, batch_size=1, prior_loss_weight=1.0,
               class_images=200, class_steps=30, seed=0, preview_every=50, resume=False)
    b.connect(ld.out("model"), tr, "model")
    b.connect(ld.out("clip"), tr, "clip")
    b.connect(enc.out(0), tr, "latent")
    prompt = b.add("StringConcatenate", title="Prompt with the new token", string_a="photo of a", string_b="",
                   delimiter=" ")
    b.connect(tr.out(2), prompt, "string_b")
    suffix = b.add("StringConcatenate", title="Prompt suffix", string_a="", string_b="dog in the snow", delimiter=" ")
    b.connect(prompt.out(0), suffix, "string_a")
    pos = b.add("CLIPTextEncode", title="Encode the prompt", text="")
    b.connect(ld.out("clip"), pos, "clip")
    b.connect(suffix.out(0), pos, "text")
    neg = text(b, ld.out("clip"), "", "Negative prompt")
    ks = b.add("KSampler", seed=1, steps=30, cfg=7.5, sampler_name="euler", scheduler="normal", denoise=1.0)
    b.connect(tr.out(0), ks, "model")
    b.connect(pos.out(0), ks, "positive")
    b.connect(neg.out(0), ks, "negative")
    b.connect(empty_latent(b, family).out(0), ks, "latent_image")
    decode_and_save(b, ks.out(0), ld.out("vae"), "editkit_custom_diffusion")
    return b.build()


def concept_fusion(family="sd15"):
    b = builder()
    note(b, family, "Concept fusion (Mix-of-Show): two concept LoRAs -> one LoRA that keeps both",
         ["**Concept Fusion**: pick the concept LoRAs (trained on this checkpoint, e.g. with DreamBooth LoRA "
          "Train) and write each one's prompts with its token, one per line. Each LoRA samples its own prompts "
          "(on a clone) to record its layers' activations; every linear layer of the fused LoRA is the least-"
          "squares weight that reproduces each LoRA's outputs on its own activations. The report compares it "
          "with concat and TIES merges of the same LoRAs.",
          "**Prompt**: both tokens in one prompt: `a photo of sks dog and zwx cat`."],
         "Closed-form per-layer fusion (Gu et al., NeurIPS 2023), activations from 20-step samples at CFG 7.5, "
         "full-rank fused deltas (rank 0).")
    ld = checkpoint(b, family)
    lat = empty_latent(b, family, title="Empty Latent (recording size)")
    fu = b.add("EditKitConceptFusion", title="Concept Fusion", toy={"inputs": {"steps": 4}},
               lora_1="concept_a_lora.safetensors", prompts_1="a photo of sks dog\na photo of sks dog on the beach",
               lora_2="concept_b_lora.safetensors", prompts_2="a photo of zwx cat\na photo of zwx cat on a sofa",
               lora_3="None", prompts_3="", lora_4="None", prompts_4="", rank=0, ridge=1e-8, steps=20, cfg=7.5,
               samples=1, seed=0, dtype="fp16", name="editkit_fused")
    b.connect(ld.out("model"), fu, "model")
    b.connect(ld.out("clip"), fu, "clip")
    b.connect(lat.out(0), fu, "latent")
    pos = text(b, ld.out("clip"), "a photo of sks dog and zwx cat", "Prompt with both concepts")
    neg = text(b, ld.out("clip"), "", "Negative prompt")
    ks = b.add("KSampler", seed=1, steps=30, cfg=7.5, sampler_name="euler", scheduler="normal", denoise=1.0)
    b.connect(fu.out(0), ks, "model")
    b.connect(pos.out(0), ks, "positive")
    b.connect(neg.out(0), ks, "negative")
    b.connect(empty_latent(b, family).out(0), ks, "latent_image")
    decode_and_save(b, ks.out(0), ld.out("vae"), "editkit_concept_fusion")
    return b.build()


WORKFLOWS = {"concept_fusion": ("Training - Concept fusion", concept_fusion),
             "custom_diffusion": ("Training - Custom Diffusion", custom_diffusion),
             "dreambooth_lora": ("Training - DreamBooth-LoRA", dreambooth_lora),
             "textual_inversion": ("Training - Textual inversion", textual_inversion)}
