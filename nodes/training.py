"""Training nodes: teach the model a concept from a few images (DreamBooth-LoRA, textual inversion).

The training itself is the training core (training/loop.py) on a gradient clone; the node validates,
prepares the data, trains, writes the file into ComfyUI's own folder and returns the model as core's
loaders would load that file."""
from __future__ import annotations

import os

from . import feedback
from .api import io
from .base import EditKitNode

from ..core.errors import EditKitInputError, require

DB_NODE = "EditKitDreamBoothLoRATrain"


def _resume_input():
    # every trainer resumes the same way (training.loop checkpoints), so one input definition
    return io.Boolean.Input("resume", default=False,
                            tooltip="Continue from the checkpoint an interrupted run with the same settings left.")


PREVIEW_STEPS, PREVIEW_CFG = 8, 5.0


def _preview_input():
    return io.Int.Input("preview_every", default=100, min=0, max=100000,
                        tooltip=f"Every N steps, sample a small preview with the current weights ({PREVIEW_STEPS} "
                                f"steps, CFG {PREVIEW_CFG:g}, fixed seed) and show it on the progress bar "
                                "(needs a preview method in ComfyUI's settings). 0: off.")


def _preview(node, every, clip, seed):
    """The training core's Preview for a node's preview_every (None when off)."""
    from ..training import loop
    require(every >= 0, node, "preview_every", f"{every} is negative", "use 0 (off) or a step count such as 100")
    if not every:
        return None
    return loop.Preview(every=int(every), steps=PREVIEW_STEPS, seed=int(seed), cfg=PREVIEW_CFG,
                        negative=clip.encode_from_tokens_scheduled(clip.tokenize("")))


def _settings(node, steps, learning_rate, batch_size, seed, grad_accumulation=1, weight_decay=1e-2):
    from ..training import loop
    require(learning_rate > 0, node, "learning_rate", f"{learning_rate} is not > 0", "use e.g. 1e-4")
    require(steps >= 1, node, "steps", "at least one step is needed")
    return loop.Settings(steps=int(steps), learning_rate=float(learning_rate), batch_size=int(batch_size),
                         grad_accumulation=int(grad_accumulation), weight_decay=float(weight_decay), seed=int(seed))


def _output(node, kind, name):
    from ..training import paths
    try:
        return paths.output_file(kind, name)
    except paths.OutputNameError as e:
        raise EditKitInputError(node, "name", e.problem, e.fix) from None


def _check_trainable(node, model):
    from ..training import lora as TL
    why = TL.frozen_weights_reason(model)
    require(why is None, node, "model", f"its weights cannot take gradients ({why})",
            "load the checkpoint in fp16/bf16/fp32 (not a quantized or fp8 file) to train")


def _latents(node, model, latent):
    samples = latent["samples"] if isinstance(latent, dict) else None
    require(samples is not None and samples.shape[0] > 0, node, "latent", "the image batch is empty",
            "connect VAE Encode of 4-8 images of the concept")
    require(samples.ndim == 4, node, "latent", f"expected an image latent batch (N, C, H, W), got {tuple(samples.shape)}")
    # One LATENT batch always has one size; images of different sizes must be scaled to one size first.
    return model.model.process_latent_in(samples.float())


def _interrupted(err, node):
    import comfy.model_management as mm
    mm.throw_exception_if_processing_interrupted()
    raise err


def _loss_text(res, steps):
    ls = res.losses
    first, last = sum(ls[:5]) / max(len(ls[:5]), 1), sum(ls[-5:]) / max(len(ls[-5:]), 1)
    text = f"{steps} steps, loss {first:.4f} (first 5) -> {last:.4f} (last 5)"
    if res.resumed_from:
        text += f"; resumed at step {res.resumed_from}"
    return text


class DreamBoothLoRATrain(EditKitNode):
    EDITKIT_SHOWS = ("text",)

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=DB_NODE,
            display_name="DreamBooth LoRA Train",
            category="EditKit/training",
            description="DreamBooth (Ruiz et al. 2023) with LoRA: learn a subject from a few images under a prompt "
                        "with a rare identifier (\"a photo of sks dog\"), with prior preservation on class images "
                        "the model itself generates (cached). Trains LoRA, LoHa or LoKr factors of every attention "
                        "projection (optionally also of the text encoder) on gradient clones (your model and CLIP are "
                        "untouched), writes models/loras/<name>.safetensors in ComfyUI's own adapter format (core "
                        "Load LoRA loads it) and returns the model and CLIP with it loaded. A preview sample every "
                        "preview_every steps shows on the progress bar. "
                        "Interrupting saves a checkpoint that resume continues from.",
            inputs=[
                io.Model.Input("model", tooltip="The checkpoint's model to personalize (not changed)."),
                io.Clip.Input("clip", tooltip="The checkpoint's text encoder (encodes the prompts; not trained)."),
                io.Latent.Input("latent", tooltip="VAE Encode of the 4-8 concept images (one size; scale them first)."),
                io.String.Input("instance_prompt", default="a photo of sks dog",
                                tooltip="Prompt of the concept images; must contain the identifier."),
                io.String.Input("identifier", default="sks",
                                tooltip="The rare token that will name the concept in prompts."),
                io.String.Input("class_prompt", default="a photo of dog",
                                tooltip="Prompt of the concept's class (prior preservation images)."),
                io.String.Input("name", default="editkit_dreambooth",
                                tooltip="File name of the LoRA inside models/loras/ (no folders)."),
                io.Int.Input("steps", default=500, min=1, max=100000, tooltip="Optimizer steps."),
                io.Float.Input("learning_rate", default=1e-4, min=0.0, max=1.0, step=1e-5,
                               tooltip="AdamW learning rate (LoRA DreamBooth: 1e-4)."),
                io.Int.Input("rank", default=4, min=1, max=128,
                             tooltip="Rank of the LoRA / LoHa factors; for LoKr the Kronecker factor size."),
                io.Combo.Input("adapter", options=["lora", "loha", "lokr"], default="lora",
                               tooltip="Adapter format (ComfyUI's own weight adapters; core Load LoRA and EditKit's "
                                       "merge nodes read all three): lora = up @ down; loha = Hadamard product of two "
                                       "low-rank pairs (LyCORIS LoHa, rank up to rank^2 with the same size); lokr = "
                                       "Kronecker product of two small factors (LyCORIS LoKr)."),
                io.Combo.Input("targets", options=["attention", "all"], default="attention",
                               tooltip="Which UNet/DiT weights get adapters: attention = every attention projection "
                                       "(the DreamBooth-LoRA recipe; learns a subject's look, colour, style); all = "
                                       "every Linear and Conv weight (as core's Train LoRA; several times the "
                                       "parameters, needed for a new shape on the toy world: see README)."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Images per optimizer step."),
                io.Boolean.Input("train_text_encoder", default=False,
                                 tooltip="Also train adapters (same format and rank) on the text encoder's attention "
                                         "and MLP weights, saved under the lora_te_ keys core Load LoRA applies to "
                                         "the CLIP; use the clip output to encode prompts."),
                io.Float.Input("text_encoder_lr", default=5e-5, min=0.0, max=1.0, step=1e-6,
                               tooltip="AdamW learning rate of the text-encoder adapters (used when "
                                       "train_text_encoder is on; DreamBooth-LoRA: 5e-5)."),
                io.Float.Input("prior_loss_weight", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="Weight of the class-image loss (0: no prior preservation)."),
                io.Int.Input("class_images", default=100, min=0, max=1000,
                             tooltip="How many class images the model generates for the prior (cached)."),
                io.Int.Input("class_steps", default=30, min=1, max=200,
                             tooltip="Sampling steps of each class image."),
                io.Int.Input("seed", default=0, min=0, max=2 ** 31 - 1, tooltip="Seed of batches, noise and init."),
                _preview_input(),
                _resume_input(),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with the trained LoRA loaded (as Load LoRA would)."),
                io.String.Output(display_name="lora_name", tooltip="The LoRA file's name as Load LoRA lists it."),
                io.String.Output(display_name="report", tooltip="Steps, loss at the start and the end, file written."),
                io.Clip.Output(display_name="clip", tooltip="The CLIP with the trained text-encoder adapters loaded "
                                                            "(as Load LoRA would); the input CLIP when "
                                                            "train_text_encoder is off."),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, latent, instance_prompt, identifier, class_prompt, name, steps, learning_rate,
                rank, batch_size, prior_loss_weight, class_images, class_steps, seed, resume,
                preview_every=0, adapter="lora", train_text_encoder=False, text_encoder_lr=5e-5,
                targets="attention") -> io.NodeOutput:
        from ..lora import st_io
        from ..training import dreambooth, loop, paths, prior
        from ..training import lora as TL
        node = DB_NODE
        settings = _settings(node, steps, learning_rate, batch_size, seed)
        require(adapter in ("lora", "loha", "lokr"), node, "adapter", f"{adapter!r} is not lora, loha or lokr",
                "pick one from the list")
        require(targets in TL.RECIPES, node, "targets", f"{targets!r} is not {' or '.join(TL.RECIPES)}",
                "pick one from the list")
        require(not train_text_encoder or text_encoder_lr > 0, node, "text_encoder_lr", f"{text_encoder_lr} is not > 0",
                "use e.g. 5e-5, or turn train_text_encoder off")
        require(not train_text_encoder or bool(dreambooth.text_encoder_keys(clip)), node, "train_text_encoder",
                "this CLIP has no text-encoder weights core's LoRA loader maps", "turn train_text_encoder off")
        ident = (identifier or "").strip()
        require(bool(ident), node, "identifier", "the identifier is empty", "use a rare token such as sks")
        require(ident in (instance_prompt or "").split(), node, "instance_prompt",
                f"does not contain the identifier {ident!r}", f"write e.g. 'a photo of {ident} dog'")
        use_prior = prior_loss_weight > 0 and class_images > 0
        require(not use_prior or bool((class_prompt or "").strip()), node, "class_prompt",
                "prior preservation needs the class prompt", "write e.g. 'a photo of dog', or set class_images to 0")
        path, lora_name = _output(node, "loras", name)
        _check_trainable(node, model)
        x0 = _latents(node, model, latent)
        enc = lambda t: clip.encode_from_tokens_scheduled(clip.tokenize(t))
        inst = enc(instance_prompt)
        cls_lat, cls_cond, hit = None, None, False
        if use_prior:
            cls_cond = enc(class_prompt)
            raw, hit = prior.class_latents(model, cls_cond, enc(""), x0.shape[1:], class_images, class_steps,
                                           7.5, seed)
            cls_lat = model.model.process_latent_in(raw)
        ckpt = paths.checkpoint_file("lora", lora_name)
        try:
            lo, res = dreambooth.train(model, x0, inst, settings, rank, cls_lat, cls_cond, prior_loss_weight,
                                       checkpoint_path=ckpt, resume=ckpt if resume and os.path.exists(ckpt) else None,
                                       node_id=getattr(getattr(cls, "hidden", None), "unique_id", None),
                                       preview=_preview(node, preview_every, clip, seed), adapter=adapter,
                                       text_encoder=(clip, instance_prompt, class_prompt, text_encoder_lr)
                                       if train_text_encoder else None, targets=targets)
        except loop.TrainingInterrupted as e:
            _interrupted(e, node)
        sd = lo.state_dict()
        if lo.text_encoder is not None:
            sd.update(lo.text_encoder.state_dict())
        st_io.save(sd, path, {"editkit_training": "dreambooth_lora", "instance_prompt": instance_prompt,
                              "class_prompt": class_prompt if use_prior else "", "steps": str(steps),
                              "rank": str(rank), "adapter": adapter, "targets": targets, "learning_rate": str(learning_rate),
                              "text_encoder_lr": str(text_encoder_lr) if train_text_encoder else ""})
        if os.path.exists(ckpt):
            os.remove(ckpt)
        te = lo.text_encoder is not None
        out_model, out_clip = TL.apply_saved(model, clip if te else None, sd, 1.0, 1.0 if te else 0.0)
        text = (_loss_text(res, steps) + f"\nclass images: {class_images if use_prior else 0}"
                + (" (cached)" if hit else "") + f"\nsaved models/loras/{lora_name} ({adapter}"
                + (f", UNet + text encoder: {len(lo.text_encoder.lora.adapters)} CLIP weights" if te else "") + ")")
        return io.NodeOutput(out_model, lora_name, text, out_clip if te else clip, ui=feedback.show(cls, text=text))


TI_NODE = "EditKitTextualInversionTrain"


def _captions(node, text, n):
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    require(bool(lines), node, "captions", "no caption", "write one caption with the placeholder, e.g. 'a photo of <my-concept>'")
    if len(lines) == 1:
        return lines * n
    require(len(lines) == n, node, "captions", f"{len(lines)} captions for {n} images",
            "write one caption per image (one per line) or a single caption for all")
    return lines


class TextualInversionTrain(EditKitNode):
    EDITKIT_SHOWS = ("text",)

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=TI_NODE,
            display_name="Textual Inversion Train",
            category="EditKit/training",
            description="Textual inversion (Gal et al. 2023): learn a new word's embedding from a few images of a "
                        "concept through the frozen model (gradient clones; your model and CLIP are untouched). "
                        "Writes models/embeddings/<name>.safetensors: type embedding:<name> in any prompt box "
                        "(ComfyUI's own tokenizer loads it). Interrupting saves a checkpoint that resume continues from.",
            inputs=[
                io.Model.Input("model", tooltip="The checkpoint's model (not changed)."),
                io.Clip.Input("clip", tooltip="The checkpoint's text encoder (not changed)."),
                io.Latent.Input("latent", tooltip="VAE Encode of the 3-5 concept images (one size; scale them first)."),
                io.String.Input("captions", default="a photo of <my-concept>", multiline=True,
                                tooltip="One caption per image (one per line) or one for all; each contains the placeholder."),
                io.String.Input("placeholder", default="<my-concept>",
                                tooltip="The pseudo-word standing for the concept in the captions (not a vocabulary word)."),
                io.String.Input("init_word", default="object",
                                tooltip="One word describing the concept's class; the embedding starts from it."),
                io.String.Input("name", default="editkit_concept",
                                tooltip="File name inside models/embeddings/ (prompts use embedding:<name>)."),
                io.Int.Input("num_vectors", default=1, min=1, max=16, tooltip="Embedding vectors of the new word."),
                io.Int.Input("steps", default=3000, min=1, max=100000, tooltip="Optimizer steps."),
                io.Float.Input("learning_rate", default=5e-3, min=0.0, max=1.0, step=1e-4,
                               tooltip="AdamW learning rate (paper: 5e-3)."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Images per optimizer step."),
                io.Int.Input("seed", default=0, min=0, max=2 ** 31 - 1, tooltip="Seed of batches and noise."),
                _preview_input(),
                _resume_input(),
            ],
            outputs=[
                io.String.Output(display_name="embedding", tooltip="What to type in a prompt: embedding:<name>."),
                io.String.Output(display_name="report", tooltip="Steps, loss at the start and the end, file written."),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, latent, captions, placeholder, init_word, name, num_vectors, steps,
                learning_rate, batch_size, seed, resume, preview_every=0) -> io.NodeOutput:
        from ..lora import st_io
        from ..training import loop, paths
        from ..training import textual_inversion as TI
        node = TI_NODE
        settings = _settings(node, steps, learning_rate, batch_size, seed, weight_decay=0.0)
        ph = (placeholder or "").strip()
        require(bool(ph) and " " not in ph, node, "placeholder", f"{placeholder!r} is not one pseudo-word",
                "use e.g. <my-concept>")
        path, file_name = _output(node, "embeddings", name)
        _check_trainable(node, model)
        x0 = _latents(node, model, latent)
        caps = _captions(node, captions, x0.shape[0])
        ckpt = paths.checkpoint_file("embedding", file_name)
        try:
            vectors, res = TI.train(model, clip, x0, caps, ph, (init_word or "").strip(), settings, int(num_vectors),
                                    checkpoint_path=ckpt, resume=ckpt if resume and os.path.exists(ckpt) else None,
                                    node_id=getattr(getattr(cls, "hidden", None), "unique_id", None),
                                    preview=_preview(node, preview_every, clip, seed))
        except TI.CaptionError as e:
            raise EditKitInputError(node, e.input_name, e.problem, e.fix) from None
        except loop.TrainingInterrupted as e:
            _interrupted(e, node)
        st_io.save(TI.embedding_file(vectors), path, {"editkit_training": "textual_inversion", "placeholder": ph,
                                                      "init_word": init_word, "steps": str(steps)})
        if os.path.exists(ckpt):
            os.remove(ckpt)
        token = "embedding:" + os.path.splitext(file_name)[0]
        text = _loss_text(res, steps) + f"\nsaved models/embeddings/{file_name}\nuse it in a prompt as {token}"
        return io.NodeOutput(token, text, ui=feedback.show(cls, text=text))


CD_NODE = "EditKitCustomDiffusionTrain"


class CustomDiffusionTrain(EditKitNode):
    EDITKIT_SHOWS = ("text",)

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=CD_NODE,
            display_name="Custom Diffusion Train",
            category="EditKit/training",
            description="Custom Diffusion (Kumari et al. 2023): fine-tune only the cross-attention key/value "
                        "projections plus a new modifier token, with prior preservation on class images the model "
                        "generates (cached). Writes models/loras/<name>.safetensors (the K/V deltas, core Load LoRA "
                        "applies them) and models/embeddings/<name>.safetensors (type embedding:<name>); returns the "
                        "model with the deltas loaded. Your model and CLIP are untouched.",
            inputs=[
                io.Model.Input("model", tooltip="The checkpoint's model (an SD-style UNet; not changed)."),
                io.Clip.Input("clip", tooltip="The checkpoint's text encoder (not changed)."),
                io.Latent.Input("latent", tooltip="VAE Encode of the 4-8 concept images (one size; scale them first)."),
                io.String.Input("captions", default="photo of a <new1> dog", multiline=True,
                                tooltip="One caption per image (one per line) or one for all; each contains the placeholder."),
                io.String.Input("placeholder", default="<new1>",
                                tooltip="The modifier token V* in the captions (not a vocabulary word)."),
                io.String.Input("init_word", default="dog", tooltip="One word the token's embedding starts from."),
                io.String.Input("class_prompt", default="photo of a dog",
                                tooltip="Prompt of the concept's class (prior preservation images)."),
                io.String.Input("name", default="editkit_custom_diffusion",
                                tooltip="File name of the LoRA (models/loras/) and embedding (models/embeddings/)."),
                io.Int.Input("steps", default=250, min=1, max=100000, tooltip="Optimizer steps."),
                io.Float.Input("learning_rate", default=1e-5, min=0.0, max=1.0, step=1e-6,
                               tooltip="AdamW learning rate (paper: 1e-5 per image of the batch)."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Images per optimizer step."),
                io.Float.Input("prior_loss_weight", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="Weight of the class-image loss (0: no prior preservation)."),
                io.Int.Input("class_images", default=200, min=0, max=1000,
                             tooltip="How many class images the model generates for the prior (cached)."),
                io.Int.Input("class_steps", default=30, min=1, max=200, tooltip="Sampling steps of each class image."),
                io.Int.Input("seed", default=0, min=0, max=2 ** 31 - 1, tooltip="Seed of batches and noise."),
                _preview_input(),
                _resume_input(),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with the K/V deltas loaded (as Load LoRA would)."),
                io.String.Output(display_name="lora_name", tooltip="The K/V delta file as Load LoRA lists it."),
                io.String.Output(display_name="embedding", tooltip="What to type in a prompt: embedding:<name>."),
                io.String.Output(display_name="report", tooltip="Steps, loss at the start and the end, files written."),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, latent, captions, placeholder, init_word, class_prompt, name, steps,
                learning_rate, batch_size, prior_loss_weight, class_images, class_steps, seed, resume,
                preview_every=0) -> io.NodeOutput:
        from ..lora import st_io
        from ..training import custom_diffusion as CD
        from ..training import lora as TL
        from ..training import loop, paths, prior
        from ..training import textual_inversion as TI
        node = CD_NODE
        settings = _settings(node, steps, learning_rate, batch_size, seed, weight_decay=1e-2)
        ph = (placeholder or "").strip()
        require(bool(ph) and " " not in ph, node, "placeholder", f"{placeholder!r} is not one pseudo-word",
                "use e.g. <new1>")
        use_prior = prior_loss_weight > 0 and class_images > 0
        require(not use_prior or bool((class_prompt or "").strip()), node, "class_prompt",
                "prior preservation needs the class prompt", "write e.g. 'photo of a dog', or set class_images to 0")
        lora_path, lora_name = _output(node, "loras", name)
        emb_path, emb_name = _output(node, "embeddings", name)
        _check_trainable(node, model)
        x0 = _latents(node, model, latent)
        caps = _captions(node, captions, x0.shape[0])
        cls_lat, cls_cond, hit = None, None, False
        if use_prior:
            cls_cond = clip.encode_from_tokens_scheduled(clip.tokenize(class_prompt))
            neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
            raw, hit = prior.class_latents(model, cls_cond, neg, x0.shape[1:], class_images, class_steps, 7.5, seed)
            cls_lat = model.model.process_latent_in(raw)
        ckpt = paths.checkpoint_file("custom_diffusion", lora_name)
        try:
            concept, diffs, res = CD.train(model, clip, x0, caps, ph, (init_word or "").strip(), settings, cls_lat,
                                           cls_cond, prior_loss_weight, checkpoint_path=ckpt,
                                           resume=ckpt if resume and os.path.exists(ckpt) else None,
                                           node_id=getattr(getattr(cls, "hidden", None), "unique_id", None),
                                           preview=_preview(node, preview_every, clip, seed))
        except TI.CaptionError as e:
            raise EditKitInputError(node, e.input_name, e.problem, e.fix) from None
        except loop.TrainingInterrupted as e:
            _interrupted(e, node)
        meta = {"editkit_training": "custom_diffusion", "placeholder": ph, "steps": str(steps)}
        sd = diffs.state_dict()
        st_io.save(sd, lora_path, meta)
        st_io.save(concept.file(), emb_path, meta)
        if os.path.exists(ckpt):
            os.remove(ckpt)
        out_model, _ = TL.apply_saved(model, None, sd, 1.0, 0.0)
        token = "embedding:" + os.path.splitext(emb_name)[0]
        text = (_loss_text(res, steps) + f"\nclass images: {class_images if use_prior else 0}" + (" (cached)" if hit else "")
                + f"\nsaved models/loras/{lora_name} (K/V deltas) and models/embeddings/{emb_name}"
                + f"\nprompt with {token}")
        return io.NodeOutput(out_model, lora_name, token, text, ui=feedback.show(cls, text=text))


FUSION_NODE = "EditKitConceptFusion"
N_CONCEPTS = 4


def _prompt_lines(text) -> list[str]:
    return [ln.strip() for ln in (text or "").splitlines() if ln.strip()]


class ConceptFusion(EditKitNode):
    EDITKIT_SHOWS = ("text",)

    @classmethod
    def define_schema(cls):
        from .lora import _lora_names
        names = _lora_names()
        inputs = [
            io.Model.Input("model", tooltip="The checkpoint's model the concept LoRAs were trained on (not changed)."),
            io.Clip.Input("clip", tooltip="The checkpoint's text encoder (encodes each concept's prompts)."),
            io.Latent.Input("latent", tooltip="An Empty Latent Image at the size you generate at: the concepts' "
                                              "prompts are sampled at this size to record the activations."),
        ]
        for i in range(1, N_CONCEPTS + 1):
            inputs.append(io.Combo.Input(f"lora_{i}", options=names, default="None",
                                         tooltip=f"Concept LoRA {i} from the loras folder (None = unused; at least two)."))
            inputs.append(io.String.Input(f"prompts_{i}", default="", multiline=True,
                                          tooltip=f"Prompts of concept {i}, one per line, with its token as it was "
                                                  f"trained (e.g. 'a photo of sks dog'); its LoRA samples them to "
                                                  f"record the activations the fused weights must reproduce."))
        inputs += [
            io.Int.Input("rank", default=0, min=0, max=1024,
                         tooltip="Rank of the fused LoRA (truncated SVD of each fused delta). 0: the exact fused "
                                 "delta in ComfyUI's full .diff form (larger file, no approximation)."),
            io.Float.Input("ridge", default=1e-8, min=0.0, max=1.0, step=1e-9,
                           tooltip="Ridge term, relative to the mean activation energy: directions no concept's "
                                   "activations excite stay at the base weight. Keep it tiny (attention outputs "
                                   "have many weak directions the concepts rely on)."),
            io.Int.Input("steps", default=20, min=1, max=200,
                         tooltip="Sampling steps of each prompt while the activations are recorded."),
            io.Float.Input("cfg", default=7.5, min=0.0, max=30.0, step=0.1,
                           tooltip="CFG of the recording samples (cond and uncond passes are both recorded)."),
            io.Int.Input("samples", default=1, min=1, max=64, tooltip="Samples (seeds) per prompt."),
            io.Int.Input("seed", default=0, min=0, max=2 ** 31 - 1, tooltip="Seed of the recording samples."),
            io.Combo.Input("dtype", options=["fp16", "bf16", "fp32"], default="fp16",
                           tooltip="Precision of the fused LoRA's tensors."),
            io.String.Input("name", default="editkit_fused",
                            tooltip="File name of the fused LoRA inside models/loras/ (no folders)."),
        ]
        return io.Schema(
            node_id=FUSION_NODE,
            display_name="Concept Fusion (Mix-of-Show)",
            category="EditKit/training",
            description="Mix-of-Show gradient fusion (Gu et al., NeurIPS 2023): merge 2-4 concept LoRAs into one "
                        "whose every linear layer reproduces each concept LoRA's outputs on that concept's own "
                        "activations (recorded while its LoRA samples its prompts, on a clone), solved per layer in "
                        "closed form (ridge least squares). Other weights are summed (concat); text-encoder keys are "
                        "left out. Writes models/loras/<name>.safetensors (core Load LoRA applies it), returns the "
                        "model with it loaded and reports each concept's output error for the fusion next to "
                        "EditKit's concat and TIES merges of the same LoRAs.",
            inputs=inputs,
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with the fused LoRA loaded (as Load LoRA would)."),
                io.String.Output(display_name="lora_name", tooltip="The fused LoRA's file name as Load LoRA lists it."),
                io.String.Output(display_name="report",
                                 tooltip="Relative output error per concept for fusion, concat and TIES; file written."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, latent, rank, ridge, steps, cfg, samples, seed, dtype, name, **per) -> io.NodeOutput:
        import comfy.utils
        import folder_paths

        from ..core import files
        from ..lora import formats, fusion
        from .lora import _torch_dtype
        node = FUSION_NODE
        chosen = [(i, per.get(f"lora_{i}", "None"), per.get(f"prompts_{i}", "")) for i in range(1, N_CONCEPTS + 1)]
        chosen = [(i, f, p) for i, f, p in chosen if f and f != "None"]
        require(len(chosen) >= 2, node, "lora_2" if len(chosen) == 1 else "lora_1",
                f"{len(chosen)} LoRA selected; fusion needs at least two", "pick two or more concept LoRAs")
        require(ridge >= 0, node, "ridge", f"{ridge} is negative", "use e.g. 1e-8")
        samples_t = latent.get("samples") if isinstance(latent, dict) else None
        require(samples_t is not None and samples_t.ndim >= 4 and samples_t.shape[0] > 0, node, "latent",
                "not an image latent", "connect an Empty Latent Image")
        path, lora_name = _output(node, "loras", name)
        resolver = formats.KeyResolver(model)
        neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        concepts = []
        for i, fname, text in chosen:
            lines = _prompt_lines(text)
            require(bool(lines), node, f"prompts_{i}", f"no prompt for {fname}",
                    "write the concept's prompts, one per line, e.g. 'a photo of sks dog'")
            full = folder_paths.get_full_path("loras", fname)
            require(full is not None, node, f"lora_{i}", f"{fname!r} is not in the loras folder",
                    "pick a file from the list (refresh after adding files)")
            sd = files.load_weights(full, node, f"lora_{i}")
            try:
                parsed = formats.parse(sd, resolver, fname, skip_text_encoder=True)
            except formats.LoraFormatError as e:
                raise EditKitInputError(node, f"lora_{i}", str(e), "use LoRAs trained on this model") from None
            require(len(parsed.modules) > 0, node, f"lora_{i}", f"{fname!r} patches none of the model's weights",
                    "use a LoRA with model (UNet/DiT) weights")
            prompts = [(clip.encode_from_tokens_scheduled(clip.tokenize(t)), neg) for t in lines]
            concepts.append(fusion.Concept(fname, sd, parsed, prompts))
        capture = fusion.Capture(samples_t[:1].float(), steps=int(steps), cfg=float(cfg), seed=int(seed),
                                 samples=int(samples))
        bar = comfy.utils.ProgressBar(len(concepts) + 1)
        try:
            report = fusion.fuse_to_file(model, concepts, resolver, capture, path, rank=int(rank), ridge=float(ridge),
                                         dtype=_torch_dtype(dtype), progress=lambda a, b: bar.update_absolute(a, b))
        except ValueError as e:
            raise EditKitInputError(node, "lora_1", str(e), "use LoRAs trained on this model") from None
        sd = comfy.utils.load_torch_file(path, safe_load=True)
        from ..training import lora as TL
        out_model, _ = TL.apply_saved(model, None, sd, 1.0, 0.0)
        text = report.summary() + f"\nsaved models/loras/{lora_name}"
        return io.NodeOutput(out_model, lora_name, text, ui=feedback.show(cls, text=text))


NODES = [DreamBoothLoRATrain, TextualInversionTrain, CustomDiffusionTrain, ConceptFusion]
