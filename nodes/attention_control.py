"""Attention-control nodes: Prompt-to-Prompt, MasaCtrl, Plug-and-Play, StyleAligned, reference
attention, and the prompt batch that makes a generated source/target pair from one seed.

Batch order everywhere: row 0 is the source, rows 1.. the targets (EditKitPromptBatch), or the
branches an EditKit sampler declares (the branch contract, core/branches.py).
"""
from __future__ import annotations

import torch
from .api import io
from .base import EditKitNode

from ..attention import alignment
from ..attention.controller import default_start_layer, install, layers_of
from ..attention.maps import CrossAttentionMapStore, blend_level
from ..core.errors import EditKitInputError, require
from ..core.introspect import attention_layout, model_family, require_architecture
from ..core.tokens import split_words

CATEGORY = "EditKit/attention"
ORDER_NOTE = ("Sample a batch whose row 0 is the source and rows 1.. the targets (EditKit Prompt Batch), or use an "
              "EditKit inversion sampler (source branch = the inverted image).")


def _targets(text: str) -> list[str]:
    return [t.strip() for t in (text or "").splitlines() if t.strip()]


def _layer_range(node: str, model, start: int, end: int, name_start="start_layer", name_end="end_layer") -> tuple[int, int]:
    n = layers_of(model)
    require(n > 0, node, "model", "this model has no attention layers EditKit can reach", "use an SD1.x/SDXL UNet, SD3 or Flux")
    if start >= n:
        raise EditKitInputError(node, name_start, f"layer {start} does not exist: this model has {n} attention layers (0..{n - 1})",
                                f"use a value below {n}")
    if end >= n:
        raise EditKitInputError(node, name_end, f"layer {end} does not exist: this model has {n} attention layers (0..{n - 1})",
                                f"use -1 (the last layer) or a value below {n}")
    if end >= 0 and end < start:
        raise EditKitInputError(node, name_end, f"end_layer {end} is before start_layer {start}", "make end_layer >= start_layer or -1")
    return start, end


def _window(node: str, start: float, end: float):
    require(start <= end, node, "start_percent", "start_percent is after end_percent", "make start_percent <= end_percent")


# ---------------------------------------------------------------------------------------------
# Prompt batch
# ---------------------------------------------------------------------------------------------

def encode_batch(clip, prompts: list[str], node: str = "EditKitPromptBatch"):
    """One CONDITIONING of batch len(prompts), rows in prompt order."""
    encoded = []
    for p in prompts:
        c = clip.encode_from_tokens_scheduled(clip.tokenize(p))
        encoded.append(c[0])
    lengths = [e[0].shape[1] for e in encoded]
    if len(set(lengths)) > 1:
        raise EditKitInputError(node, "target_prompts", f"the prompts encode to different lengths ({', '.join(map(str, lengths))} tokens), "
                                "so they cannot share one batch", "shorten the longer prompt(s) to the same number of 75-token chunks")
    cond = torch.cat([e[0] for e in encoded])
    opts = dict(encoded[0][1])
    for key, val in encoded[0][1].items():
        if torch.is_tensor(val) and val.ndim > 0 and val.shape[0] == 1 and all(
                torch.is_tensor(e[1].get(key)) and e[1][key].shape == val.shape for e in encoded):
            opts[key] = torch.cat([e[1][key] for e in encoded])
    return [[cond, opts]]


class PromptBatch(EditKitNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitPromptBatch",
            display_name="Prompt Batch (source + targets, one seed)",
            category=CATEGORY,
            description="Encode a source prompt and one or more target prompts into ONE conditioning batch (row 0 = source, "
                        "rows 1.. = targets in order) and an empty latent of the same batch whose rows all get the same "
                        "initial noise from the sampler's seed. Feed both to KSampler through an attention-control node to "
                        "edit a generated image (Prompt-to-Prompt, MasaCtrl, ...).",
            inputs=[
                io.Clip.Input("clip", tooltip="The text encoder of the model."),
                io.String.Input("source_prompt", multiline=True, default="", tooltip="The source prompt (batch row 0)."),
                io.String.Input("target_prompts", multiline=True, default="",
                                tooltip="One target prompt per line (batch rows 1, 2, ...)."),
                io.Int.Input("width", default=512, min=16, max=16384, step=8, tooltip="Image width in pixels."),
                io.Int.Input("height", default=512, min=16, max=16384, step=8, tooltip="Image height in pixels."),
            ],
            outputs=[
                io.Conditioning.Output("conditioning", display_name="positive", tooltip="Batch of 1 + number of targets."),
                io.Latent.Output("latent", display_name="latent", tooltip="Empty latent of the same batch; every row gets the same noise."),
            ],
        )

    @classmethod
    def execute(cls, clip, source_prompt, target_prompts, width, height) -> io.NodeOutput:
        node = "EditKitPromptBatch"
        require(clip is not None, node, "clip", "no CLIP connected", "connect the checkpoint's CLIP")
        require(bool(source_prompt.strip()), node, "source_prompt", "the source prompt is empty", "type the source prompt")
        targets = _targets(target_prompts)
        require(bool(targets), node, "target_prompts", "no target prompt", "type one target prompt per line")
        cond = encode_batch(clip, [source_prompt.strip()] + targets, node)
        import comfy.model_management
        n = 1 + len(targets)
        lat = torch.zeros([n, 4, height // 8, width // 8], device=comfy.model_management.intermediate_device())
        return io.NodeOutput(cond, {"samples": lat, "batch_index": [0] * n})


# ---------------------------------------------------------------------------------------------
# Prompt-to-Prompt
# ---------------------------------------------------------------------------------------------

P2P_MODES = ["auto", "replace", "refine"]


def build_prompt_to_prompt(model, clip, source_prompt, target_prompt, mode, cross_replace_steps, self_replace_steps,
                           reweight, local_blend_words, blend_threshold, node="EditKitPromptToPrompt"):
    from ..attention.prompt_to_prompt import PromptToPrompt, make_plan
    arch = require_architecture(model, {"unet", "flux", "mmdit"}, node, what="Prompt-to-Prompt")
    require(clip is not None, node, "clip", "no CLIP connected", "connect the CLIP that encoded the prompts")
    require(bool(source_prompt.strip()), node, "source_prompt", "the source prompt is empty", "give the prompt of batch row 0")
    targets = _targets(target_prompt)
    require(bool(targets), node, "target_prompt", "no target prompt", "give the target prompt (one per line for several)")
    family = model_family(model)
    src = source_prompt.strip()
    src_len = len(alignment.Tokens(clip, src, family))
    weights = alignment.parse_weights(reweight, node, "reweight")
    plans = []
    for tgt in targets:
        n = len(alignment.Tokens(clip, tgt, family))
        if n != src_len:
            raise EditKitInputError(node, "target_prompt", f"the target prompt has {n} tokens and the source {src_len}",
                                    "keep both prompts within the same number of 75-token chunks")
        m = mode
        if m == "auto":
            m = "replace" if len(src.split()) == len(tgt.split()) else "refine"
        if m == "replace":
            g, alpha = alignment.replace_mapper(clip, src, tgt, family, node), None
        else:
            g, alpha = alignment.refine_mapper(clip, src, tgt, family)
        w = alignment.reweight_vector(clip, tgt, weights, family, node, "reweight") if weights else None
        plans.append(make_plan(g, alpha, w, n))
    layout = attention_layout(model)
    blend = None
    level = blend_level(layout)
    words = split_words(local_blend_words)
    if words:
        sw = alignment.positions(clip, src, words, family, node, "local_blend_words", "source prompt", allow_missing=True)
        tws = [alignment.positions(clip, t, words, family, node, "local_blend_words", "target prompt", allow_missing=True) for t in targets]
        for w in words:
            if not sw[w] and not any(tw[w] for tw in tws):
                raise EditKitInputError(node, "local_blend_words", f"the word '{w}' is in neither the source prompt \"{src[:80]}\" "
                                        f"nor the target prompt(s)", "use words of the source or target prompt (comma-separated)")
        blend = CrossAttentionMapStore(sw, frozenset({level}), target_words=tws)
    self_levels = frozenset(sorted({s.downsample for s in layout.sites})[1:]) if arch == "unet" else frozenset()
    return PromptToPrompt(plans, cross_replace_steps, self_replace_steps, self_levels, blend, level, blend_threshold)


class PromptToPromptNode(EditKitNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitPromptToPrompt",
            display_name="Prompt-to-Prompt",
            category=CATEGORY,
            description="Prompt-to-Prompt (Hertz et al.): edit an image by editing its prompt while the target keeps the "
                        "source's cross-attention maps (word swap, refinement with added words, re-weighting of words), "
                        "optionally its self-attention maps, and with local blend only the words' region changes. "
                        + ORDER_NOTE + " SD1.x/SDXL: everything; SD3/Flux: the image-to-text (cross) and image-to-image (self) parts "
                        "of the joint attention, and local blend.",
            inputs=[
                io.Model.Input("model", tooltip="The model to sample with."),
                io.Clip.Input("clip", tooltip="The CLIP that encoded the prompts; its tokenizer aligns the prompts token by token."),
                io.String.Input("source_prompt", multiline=True, default="",
                                tooltip="The source prompt exactly as encoded for batch row 0 / the source branch."),
                io.String.Input("target_prompt", multiline=True, default="",
                                tooltip="The target prompt exactly as encoded (one per line when the batch has several targets)."),
                io.Combo.Input("mode", options=P2P_MODES, default="auto",
                               tooltip="replace: word swap (same number of words); refine: added/removed words, aligned "
                                       "token by token; auto: replace when the word counts match, else refine."),
                io.Float.Input("cross_replace_steps", default=0.8, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps (from the start) in which the target uses the source's cross-attention maps."),
                io.Float.Input("self_replace_steps", default=0.4, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps in which the target uses the source's self-attention maps "
                                       "(UNets: all levels but the finest; SD3/Flux: the image-to-image part of every joint attention). "
                                       "Higher keeps more of the source's structure."),
                io.String.Input("reweight", default="",
                                tooltip="Scale words' cross-attention maps in the target, e.g. 'fluffy:2, red:0.5' (words of the target prompt)."),
                io.String.Input("local_blend_words", default="",
                                tooltip="Words whose region may change, e.g. 'cat, dog' (each from the source and/or target "
                                        "prompt); outside it the target keeps the source. Empty: no local blend."),
                io.Float.Input("blend_threshold", default=0.3, min=0.0, max=1.0, step=0.01,
                               tooltip="Local blend mask threshold on the normalised word maps."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with Prompt-to-Prompt installed.")],
        )

    @classmethod
    def execute(cls, model, clip, source_prompt, target_prompt, mode, cross_replace_steps, self_replace_steps,
                reweight, local_blend_words, blend_threshold) -> io.NodeOutput:
        tech = build_prompt_to_prompt(model, clip, source_prompt, target_prompt, mode, cross_replace_steps,
                                      self_replace_steps, reweight, local_blend_words, blend_threshold)
        m = model.clone()
        install(m, tech)
        return io.NodeOutput(m)


# ---------------------------------------------------------------------------------------------
# MasaCtrl
# ---------------------------------------------------------------------------------------------

class MasaCtrlNode(EditKitNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitMasaCtrl",
            display_name="MasaCtrl (mutual self-attention)",
            category=CATEGORY,
            description="MasaCtrl (Cao et al.): from step S and layer L on, the target's self-attention queries read the "
                        "source's keys and values, so a new pose or layout keeps the source's content and identity. "
                        "Optional mask-guided mode from the cross-attention maps of given words. " + ORDER_NOTE
                        + " SD1.x/SDXL, SD3 and Flux (image part of the joint attention).",
            inputs=[
                io.Model.Input("model", tooltip="The model to sample with."),
                io.Int.Input("start_step", default=4, min=0, max=10000,
                             tooltip="First step with mutual self-attention (paper: 4 of 50)."),
                io.Int.Input("start_layer", default=-1, min=-1, max=1000,
                             tooltip="First attention layer in execution order; -1: the paper's default for the family "
                                     "(SD1.5: 10 of 16, SDXL: 44 of 70, DiTs: the same fraction of their blocks)."),
                io.Int.Input("end_step", default=-1, min=-1, max=10000, tooltip="Stop before this step; -1: run to the end."),
                io.String.Input("mask_words", default="",
                                tooltip="Mask-guided mode (UNets, SD3, Flux): object word(s) of the prompts, e.g. 'cat'; the object "
                                        "attends to the source's object, the background to its background. Empty: off."),
                io.Float.Input("mask_threshold", default=0.1, min=0.0, max=1.0, step=0.01,
                               tooltip="Threshold of the normalised word maps for the masks."),
                io.Clip.Input("clip", optional=True, tooltip="Mask-guided mode only: the CLIP that encoded the prompts."),
                io.String.Input("source_prompt", multiline=True, default="", optional=True,
                                tooltip="Mask-guided mode only: the source prompt as encoded."),
                io.String.Input("target_prompt", multiline=True, default="", optional=True,
                                tooltip="Mask-guided mode only: the target prompt(s) as encoded, one per line."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with MasaCtrl installed.")],
        )

    @classmethod
    def execute(cls, model, start_step, start_layer, end_step, mask_words, mask_threshold, clip=None,
                source_prompt="", target_prompt="") -> io.NodeOutput:
        from ..attention.masactrl import MasaCtrl
        node = "EditKitMasaCtrl"
        arch = require_architecture(model, {"unet", "flux", "mmdit"}, node, what="MasaCtrl")
        n = layers_of(model)
        layer = default_start_layer(n) if start_layer < 0 else start_layer
        _layer_range(node, model, layer, -1)
        if end_step >= 0:
            require(end_step > start_step, node, "end_step", f"end_step {end_step} is not after start_step {start_step}",
                    "use -1 or a later step")
        masks, level = None, 1
        words = split_words(mask_words)
        if words:
            require(clip is not None, node, "clip", "mask_words needs the CLIP", "connect the CLIP that encoded the prompts")
            require(bool((source_prompt or "").strip()), node, "source_prompt", "mask_words needs the source prompt", "give the source prompt")
            targets = _targets(target_prompt)
            require(bool(targets), node, "target_prompt", "mask_words needs the target prompt", "give the target prompt")
            family = model_family(model)
            sw = alignment.positions(clip, source_prompt.strip(), words, family, node, "mask_words", "source prompt")
            tws = [alignment.positions(clip, t, words, family, node, "mask_words", "target prompt") for t in targets]
            level = blend_level(attention_layout(model))
            masks = CrossAttentionMapStore(sw, frozenset({level}), target_words=tws, per_step=True)
        tech = MasaCtrl(start_step, end_step, layer, -1, masks, level, mask_threshold)
        m = model.clone()
        install(m, tech)
        return io.NodeOutput(m)


# ---------------------------------------------------------------------------------------------
# Plug-and-Play
# ---------------------------------------------------------------------------------------------

class PlugAndPlayNode(EditKitNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitPlugAndPlay",
            display_name="Plug-and-Play features",
            category=CATEGORY,
            description="Plug-and-Play (Tumanyan et al.): the target is generated from the source's structure by injecting "
                        "the source's decoder residual features (early steps) and its decoder self-attention queries/keys. "
                        + ORDER_NOTE + " SD1.x/SDXL UNets; SD3/Flux by block-output injection (see the inputs).",
            inputs=[
                io.Model.Input("model", tooltip="A UNet model (SD1.x, SD2.x, SDXL), SD3 or Flux."),
                io.Float.Input("feature_injection", default=0.8, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps (from the start) with residual-feature injection (paper: 0.8)."),
                io.Float.Input("attention_injection", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps with self-attention Q/K injection (paper: 0.5)."),
                io.Int.Input("feature_block", default=-1, min=-1, max=100,
                             tooltip="Decoder (output) block whose features are injected; -1: the paper's layer 4 "
                                     "(SD1.5 output block 4; the same position for other UNets). SD3/Flux: the double "
                                     "block whose image-token output the target takes from the source; -1: the middle one."),
                io.Int.Input("attention_block", default=-1, min=-1, max=100,
                             tooltip="Q/K injection in decoder blocks from this one on; -1: from the feature block (SD1.5: 4-11). "
                                     "SD3/Flux: image queries/keys of the joint attention from this block on (double, "
                                     "then single blocks in execution order); -1: from the feature block."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with Plug-and-Play installed.")],
        )

    @classmethod
    def execute(cls, model, feature_injection, attention_injection, feature_block, attention_block) -> io.NodeOutput:
        from ..attention.pnp import PlugAndPlay, default_blocks, default_dit_block
        node = "EditKitPlugAndPlay"
        arch = require_architecture(model, {"unet", "flux", "mmdit"}, node, what="Plug-and-Play")
        layout = attention_layout(model)
        if arch == "unet":
            fb, ab = default_blocks(layout)
            n_fb = n_ab = len(model.get_model_object("diffusion_model").output_blocks)
            what_fb = what_ab = "output block"
        else:
            fb = default_dit_block(layout)
            n_fb = sum(1 for b in layout.dit_blocks if b.kind == "double_block")
            ab = fb   # layers in execution order start with the double blocks
            n_ab = len(layout.dit_blocks)
            what_fb, what_ab = "double block", "block (double, then single, in execution order)"
        fb = fb if feature_block < 0 else feature_block
        ab = ab if attention_block < 0 else attention_block
        if fb >= n_fb:
            raise EditKitInputError(node, "feature_block", f"{what_fb} {fb} does not exist (this model has {n_fb})", f"use -1 or 0..{n_fb - 1}")
        if ab >= n_ab:
            raise EditKitInputError(node, "attention_block", f"{what_ab} {ab} does not exist (this model has {n_ab})", f"use -1 or 0..{n_ab - 1}")
        m = model.clone()
        install(m, PlugAndPlay(fb, feature_injection, ab, attention_injection))
        return io.NodeOutput(m)


# ---------------------------------------------------------------------------------------------
# StyleAligned
# ---------------------------------------------------------------------------------------------

class StyleAlignedNode(EditKitNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitStyleAligned",
            display_name="StyleAligned (shared attention)",
            category=CATEGORY,
            description="StyleAligned (Hertz et al.): every target shares self-attention with the reference (row 0 of the "
                        "batch, or the source branch, e.g. an inverted reference image) with AdaIN of queries and keys, so "
                        "a batch comes out in one style. " + ORDER_NOTE + " SD1.x/SDXL, SD3 and Flux.",
            inputs=[
                io.Model.Input("model", tooltip="The model to sample with."),
                io.Boolean.Input("adain_queries", default=True, tooltip="AdaIN the target's queries to the reference's."),
                io.Boolean.Input("adain_keys", default=True, tooltip="AdaIN the target's keys to the reference's."),
                io.Boolean.Input("adain_values", default=False, tooltip="AdaIN the target's values to the reference's."),
                io.Boolean.Input("share_group_norm", default=False,
                                 tooltip="UNets: normalise each target with its and the reference's GroupNorm statistics "
                                         "together. (LayerNorm works per token, so sharing it would change nothing.)"),
                io.Int.Input("start_layer", default=0, min=0, max=1000, tooltip="First self-attention layer (execution order) to share."),
                io.Int.Input("end_layer", default=-1, min=-1, max=1000, tooltip="Last layer to share; -1: the last."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01, tooltip="Share from this fraction of the steps."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01, tooltip="Share up to this fraction of the steps."),
                io.Float.Input("shared_score_shift", default=0.0, min=-5.0, max=5.0, step=0.01,
                               tooltip="Logit bias on the reference's keys (log scale; the reference code uses log 2 = 0.69 "
                                       "with inverted references). 0: none."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with StyleAligned installed.")],
        )

    @classmethod
    def execute(cls, model, adain_queries, adain_keys, adain_values, share_group_norm, start_layer, end_layer,
                start_percent, end_percent, shared_score_shift) -> io.NodeOutput:
        from ..attention.style_aligned import StyleAligned, install_shared_group_norm
        node = "EditKitStyleAligned"
        arch = require_architecture(model, {"unet", "flux", "mmdit"}, node, what="StyleAligned")
        _layer_range(node, model, start_layer, end_layer)
        _window(node, start_percent, end_percent)
        if share_group_norm:
            require(arch == "unet", node, "share_group_norm", "DiT models have no GroupNorm to share", "turn share_group_norm off")
        tech = StyleAligned(adain_queries, adain_keys, adain_values, start_layer, end_layer, start_percent, end_percent,
                            shared_score_shift, share_group_norm)
        m = model.clone()
        install(m, tech)
        if share_group_norm:
            install_shared_group_norm(m, tech)
        return io.NodeOutput(m)


# ---------------------------------------------------------------------------------------------
# Reference attention
# ---------------------------------------------------------------------------------------------

class ReferenceAttentionNode(EditKitNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitReferenceAttention",
            display_name="Reference attention (K/V concat)",
            category=CATEGORY,
            description="Reference self-attention (FABRIC / Visual Style Prompting): the generated image's self-attention "
                        "also reads a reference's keys and values, with a weight and a step range. The reference is the "
                        "source row of the batch (row 0, or the source branch of an EditKit inversion sampler), or a "
                        "reference LATENT that is noised and run alongside at every step. SD1.x/SDXL, SD3 and Flux.",
            inputs=[
                io.Model.Input("model", tooltip="The model to sample with."),
                io.Float.Input("weight", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="Multiplies the attention paid to the reference's tokens (1: like the image's own; 0: off)."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01, tooltip="From this fraction of the steps."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01, tooltip="Up to this fraction of the steps."),
                io.Int.Input("start_layer", default=0, min=0, max=1000, tooltip="First self-attention layer (execution order)."),
                io.Int.Input("end_layer", default=-1, min=-1, max=1000, tooltip="Last layer; -1: the last."),
                io.Boolean.Input("cond_only", default=False,
                                 tooltip="Only in the conditional pass (FABRIC's positive feedback); off: both passes."),
                io.Latent.Input("reference", optional=True,
                                tooltip="Optional reference latent (e.g. VAE Encode of an image). Without it the batch's source row is the reference."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Noise seed of the reference latent's pass."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with reference attention installed.")],
        )

    @classmethod
    def execute(cls, model, weight, start_percent, end_percent, start_layer, end_layer, cond_only, reference=None,
                seed=0) -> io.NodeOutput:
        import comfy.patcher_extension as pe
        from ..attention.reference import ReferenceAttention, ReferencePass
        from ..core.patches import add_wrapper
        node = "EditKitReferenceAttention"
        require_architecture(model, {"unet", "flux", "mmdit"}, node, what="reference attention")
        _layer_range(node, model, start_layer, end_layer)
        _window(node, start_percent, end_percent)
        latent = None
        if reference is not None:
            latent = reference["samples"]
            require(latent.ndim == 4, node, "reference", f"expected an image latent (B, C, H, W), got shape {tuple(latent.shape)}",
                    "connect a LATENT from VAE Encode")
        tech = ReferenceAttention(weight, start_percent, end_percent, start_layer, end_layer, cond_only, latent, seed)
        m = model.clone()
        if latent is not None:
            add_wrapper(m, pe.WrappersMP.APPLY_MODEL, f"reference.pass.{id(tech)}", ReferencePass(tech))
        install(m, tech)
        return io.NodeOutput(m)


NODES = [PromptBatch, PromptToPromptNode, MasaCtrlNode, PlugAndPlayNode, StyleAlignedNode, ReferenceAttentionNode]
