"""Editing nodes: SDEdit, DiffEdit's automatic mask, blended latents for any sampler, LEDITS++."""
from __future__ import annotations

import comfy.sample
import comfy.samplers
import comfy.utils
import torch
from . import feedback
from .api import io
from .base import EditKitNode
from .inversion import Inversion

from ..core import denoiser
from ..core.errors import EditKitInputError, require
from ..core import imaging
from ..core.introspect import model_sampling
from ..local import diffedit, ledits
from ..local.masks import DOWNSCALE
from ..samplers.sdedit import PreparedNoise, sdedit_sigmas, sdedit_start


class SDEdit(EditKitNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitSDEdit",
            display_name="SDEdit (noise a guide image)",
            category="EditKit/editing",
            description="SDEdit (Meng et al. 2022): noise an image latent to time t0 and hand SamplerCustomAdvanced "
                        "the noisy latent and the remaining schedule. Connect noise, latent and sigmas to "
                        "SamplerCustomAdvanced; t0 = 1 is plain txt2img.",
            inputs=[
                io.Model.Input("model", tooltip="The model that will denoise; its own noise schedule defines t0."),
                io.Latent.Input("latent", tooltip="The guide image as a latent (VAE Encode). Batches are supported."),
                io.Float.Input("strength", default=0.6, min=0.0, max=1.0, step=0.01,
                               tooltip="t0 in (0, 1]: how far the guide is pushed into noise. Low keeps the image, "
                                       "high follows the prompt more (the paper uses 0.3-0.6). 1 = txt2img."),
                io.Int.Input("steps", default=20, min=1, max=10000,
                             tooltip="Denoising steps actually run from t0 to the clean image."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal",
                               tooltip="Shape of the sigma schedule (as in KSampler)."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="Seed of the noise added to the guide (same noise as KSampler with this seed)."),
            ],
            outputs=[
                io.Noise.Output("noise", display_name="noise", tooltip="Connect to SamplerCustomAdvanced 'noise' (the latent already carries the noise)."),
                io.Latent.Output(display_name="latent", tooltip="The guide noised to t0; connect to SamplerCustomAdvanced 'latent_image'. "
                                                   "Also resumable by KSamplerAdvanced with add_noise disabled."),
                io.Sigmas.Output("sigmas", display_name="sigmas", tooltip="The remaining schedule from sigma(t0) to 0; connect to 'sigmas'."),
                io.Float.Output("denoise", display_name="denoise", tooltip="For KSampler users: KSampler with this denoise, the same steps, "
                                                   "scheduler and seed runs the same schedule (its first sigma on the grid)."),
            ],
        )

    @classmethod
    def execute(cls, model, latent, strength, steps, scheduler, seed) -> io.NodeOutput:
        node = "EditKitSDEdit"
        require(0.0 < strength <= 1.0, node, "strength", f"{strength} is outside (0, 1]",
                "use a value above 0 (0.3-0.6 edits, 1 = txt2img)")
        samples = latent["samples"]
        if "noise_mask" in latent:
            raise EditKitInputError(node, "latent", "the latent carries a noise mask (SetLatentNoiseMask)",
                                    "SDEdit noises the whole image; remove the mask or use an inpainting node")
        ms = model_sampling(model)
        base = model.model
        samples = comfy.sample.fix_empty_latent_channels(model, samples)
        expected = base.latent_format.latent_channels
        if samples.ndim != 4 or samples.shape[1] != expected:
            raise EditKitInputError(node, "latent", f"a latent with shape {tuple(samples.shape)} does not fit this model "
                                    f"({expected} latent channels)", "encode the image with this model's VAE")
        noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
        sigmas = sdedit_sigmas(ms, lambda n: comfy.samplers.calculate_sigmas(ms, scheduler, n).cpu(), steps, strength)
        start = sdedit_start(base.process_latent_in, base.process_latent_out, ms, samples.float(), noise.float(), float(sigmas[0]))
        out = {k: v for k, v in latent.items() if k != "samples"}
        out["samples"] = start.noised.to(samples.dtype)
        return io.NodeOutput(PreparedNoise(start.sampler_noise, seed), out, sigmas, float(strength))


def _mask_overlay(image, mask):
    """The mask over the image (red tint) for the node's preview; without an image, the mask itself."""
    heat = torch.zeros(*mask.shape, 3)
    heat[..., 0] = 1.0
    if image is None:
        return mask.unsqueeze(-1).expand(*mask.shape, 3).clone()
    img = image[..., :3].float().cpu()
    if img.shape[0] != mask.shape[0]:
        img = img[:1].expand(mask.shape[0], -1, -1, -1)
    alpha = 0.55 * mask.unsqueeze(-1)
    return (img * (1 - alpha) + heat * alpha).clamp(0, 1)


class DiffEditMask(EditKitNode):
    EDITKIT_SHOWS = ("image", "text")

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitDiffEditMask",
            display_name="DiffEdit Mask (where the prompts differ)",
            category="EditKit/editing",
            description="DiffEdit (Couairon et al. 2023): a MASK of the region an edit changes, from the difference of "
                        "the model's noise predictions under a reference prompt (the image as it is) and a query "
                        "prompt (the edit), averaged over n noise draws at the encode ratio, rescaled to [0, 1] and "
                        "thresholded. Feed it to EditKit Inversion Sampler's mask for DiffEdit's masked decoding. "
                        "EPS, v-prediction and flow models (SD1.x, SDXL, SD3, Flux).",
            inputs=[
                io.Model.Input("model", tooltip="The model that will edit (its noise predictions make the mask)."),
                io.Latent.Input("latent", tooltip="The image as a latent (VAE Encode with this model's VAE). Batches are supported."),
                io.Conditioning.Input("reference", tooltip="Reference prompt: the image as it is (the source prompt)."),
                io.Conditioning.Input("query", tooltip="Query prompt: the image after the edit (the edit prompt)."),
                io.Image.Input("image", optional=True,
                               tooltip="Optional: the same image in pixels, for the preview (mask over the image)."),
                io.Int.Input("n", default=diffedit.PAPER_N, min=1, max=100,
                             tooltip="Noise draws averaged (the paper: 10). Each costs one model call holding both prompts."),
                io.Float.Input("encode_ratio", default=diffedit.PAPER_RATIO, min=0.01, max=1.0, step=0.01,
                               tooltip="Diffusion time the image is noised to, in (0, 1] (the paper: 0.5). Use the "
                                       "same ratio for the inversion that the masked edit starts from."),
                io.Float.Input("threshold", default=diffedit.PAPER_THRESHOLD, min=0.0, max=1.0, step=0.01,
                               tooltip="Binarisation of the rescaled difference (the paper: 0.5). Lower = larger mask."),
                io.Int.Input("dilate", default=0, min=0, max=256,
                             tooltip="Grow the mask by this many pixels (cover the edited object's border)."),
                io.Float.Input("blur", default=0.0, min=0.0, max=64.0, step=0.5,
                               tooltip="Gaussian blur of the mask (std in pixels): soft edges act as a per-pixel "
                                       "edit strength in masked decoding. 0 = a binary mask."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="Seed of the noise draws."),
            ],
            outputs=[io.Mask.Output("mask", display_name="mask",
                                    tooltip="The edit region at the image's size (1 = edit, 0 = keep; soft with blur).")],
        )

    @classmethod
    def execute(cls, model, latent, reference, query, n, encode_ratio, threshold, dilate, blur, seed,
                image=None) -> io.NodeOutput:
        node = "EditKitDiffEditMask"
        require(0.0 < float(encode_ratio) <= 1.0, node, "encode_ratio", f"{encode_ratio} is outside (0, 1]",
                "use a diffusion time above 0 and at most 1 (the paper: 0.5)")
        require(int(n) >= 1, node, "n", f"{n} noise draws", "use at least 1 (the paper: 10)")
        require(0.0 <= float(threshold) <= 1.0, node, "threshold", f"{threshold} is outside [0, 1]",
                "the difference is rescaled to [0, 1]; the paper thresholds at 0.5")
        if not isinstance(latent, dict) or "samples" not in latent:
            raise EditKitInputError(node, "latent", "not a LATENT", "connect a VAE Encode output")
        samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
        expected = model.model.latent_format.latent_channels
        if samples.ndim != 4 or samples.shape[1] != expected:
            raise EditKitInputError(node, "latent", f"a latent with shape {tuple(samples.shape)} does not fit this model "
                                    f"({expected} latent channels)", "encode the image with this model's VAE")
        for name, cond in (("reference", reference), ("query", query)):
            if not isinstance(cond, list) or not cond or not isinstance(cond[0], (list, tuple)):
                raise EditKitInputError(node, name, "not a CONDITIONING", "connect a CLIP Text Encode output")
        b, h, w = samples.shape[0], samples.shape[-2], samples.shape[-1]
        size = (h * DOWNSCALE, w * DOWNSCALE)
        if image is not None:
            if image.ndim != 4 or tuple(image.shape[1:3]) != size or image.shape[0] not in (1, b):
                raise EditKitInputError(node, "image", f"an image of shape {tuple(image.shape)} is not the latent's image "
                                        f"(expected {b} x {size[0]} x {size[1]} pixels for a {w}x{h} latent)",
                                        "connect the image that was VAE-encoded into 'latent'")
        bar = comfy.utils.ProgressBar(int(n))
        dmap = diffedit.noise_difference(model, samples, reference, query, int(n), float(encode_ratio), int(seed),
                                         progress=lambda done, total: bar.update_absolute(done, total))
        if float(dmap.raw.max()) <= 0.0:
            raise EditKitInputError(node, "query", "the reference and query prompts give the same predictions: nothing to edit",
                                    "write the edit into the query prompt (e.g. 'a blue square' for 'a red square')")
        mask = diffedit.make_mask(dmap.normalized, size, threshold, dilate, blur)
        if float(mask.max()) <= 0.0:
            raise EditKitInputError(node, "threshold", f"no pixel reaches the threshold {threshold}: nothing to edit",
                                    "lower the threshold")
        area = float(mask.mean()) * 100
        text = (f"mask: {area:.1f} % of the image; encode ratio {float(encode_ratio):g} (sigma {dmap.sigma:.4g}); "
                f"{int(n)} draws = {2 * int(n)} model evaluations in {dmap.evaluations} batched calls")
        return io.NodeOutput(mask, ui=feedback.show(cls, text=text, images=_mask_overlay(image, mask)))


def _concept_positions(clip, edit, family, node, line):
    """Token positions of an edit's mask words in its own concept prompt (all its content tokens by default)."""
    from ..attention import alignment
    if edit.words:
        pos = alignment.positions(clip, edit.concept, list(edit.words), family, node, "edits", f"concept of edit {line}")
        return sorted({p for ps in pos.values() for p in ps})
    tk = alignment.Tokens(clip, edit.concept, family)
    pos = [i for i, t in enumerate(tk.ids) if t not in tk.specials and t != -1]
    if not pos:
        raise EditKitInputError(node, "edits", f"edit {line} ('{edit.concept}') has no tokens in this CLIP's tokenizer",
                                "write the concept in words")
    return pos


class LEDITS(EditKitNode):
    EDITKIT_SHOWS = ("image", "text")

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitLEDITS",
            display_name="LEDITS++ (several edits, implicit masks)",
            category="EditKit/editing",
            description="LEDITS++ (Brack et al. 2024): edit an image inverted with EditKit DDPM Inversion by several "
                        "concepts at once (add or remove, each with its scale), each guided SEGA-style only inside "
                        "its implicit mask: the concept's cross-attention map intersected with its noise-difference "
                        "mask (top 1 - threshold of each). The inversion's own guidance is the base, so scale 0 "
                        "reconstructs the image exactly. All concepts run in one batched model call per step.",
            inputs=[
                io.Model.Input("model", tooltip="The model the DDPM inversion was made with."),
                io.Clip.Input("clip", tooltip="The CLIP of that model: encodes each edit concept and finds its tokens."),
                Inversion.Input("inversion", tooltip="From EditKit Edit-friendly DDPM Inversion (its skip sets where "
                                                     "the edit starts)."),
                io.String.Input("edits", multiline=True, default="+ a blue square",
                                tooltip="One edit per line: '+ concept' adds, '- concept' removes; optional "
                                        "'[word, word]' = the words whose attention map makes the mask (default: the "
                                        "whole concept) and ': scale' (default: the scale input). E.g. "
                                        "'+ a blue square [square] : 7' and '- a red circle'."),
                io.Float.Input("scale", default=ledits.PAPER_SCALE, min=0.0, max=ledits.MAX_SCALE, step=0.1,
                               tooltip="Edit guidance scale of edits without their own ': scale' (diffusers' default 5). "
                                       "0 = the exact reconstruction."),
                io.Float.Input("threshold", default=ledits.PAPER_THRESHOLD, min=0.0, max=0.999, step=0.01,
                               tooltip="lambda: each implicit mask keeps the top (1 - threshold) of the attention map "
                                       "and of the noise difference (paper: 0.9). Lower = larger masks."),
                io.Int.Input("warmup", default=0, min=0, max=1000,
                             tooltip="Steps of the replay before the edits start (diffusers' default 0)."),
                io.Combo.Input("masks", options=list(ledits.MODES), default="intersect",
                               tooltip="intersect: attention map AND noise difference (LEDITS++); attention or noise: "
                                       "one of the two masks alone."),
                io.Combo.Input("output", options=["target", "source + target"], default="target",
                               tooltip="The edit, or the reconstruction and the edit as a batch (source first)."),
            ],
            outputs=[io.Latent.Output(display_name="latent", tooltip="The edited latent (VAE Decode it)."),
                     io.Mask.Output("implicit_masks", display_name="implicit masks",
                                    tooltip="Each edit's implicit mask averaged over the edited steps (one mask per "
                                            "edit and image, edit-major), at the image's size.")],
        )

    @classmethod
    def execute(cls, model, clip, inversion, edits, scale, threshold, warmup, masks, output) -> io.NodeOutput:
        from ..attention.maps import CrossAttentionMapStore, blend_level, install_capture
        from ..core.introspect import attention_layout, model_family
        from ..core.progress import StepProgress
        from ..samplers.replay import make_edit_guider, replay
        from ..samplers.trajectory import EditKitInversion
        node = "EditKitLEDITS"
        if not isinstance(inversion, EditKitInversion):
            raise EditKitInputError(node, "inversion", "not an EditKit inversion", "connect EditKit DDPM Inversion")
        if inversion.method != "ddpm":
            raise EditKitInputError(node, "inversion", f"LEDITS++ edits an edit-friendly DDPM inversion, not {inversion.label()}",
                                    "invert the image with 'Edit-friendly DDPM Inversion'")
        inversion.check_model(model, node)
        require(clip is not None, node, "clip", "not connected", "connect the checkpoint's CLIP")
        require(masks in ledits.MODES, node, "masks", f"unknown mask mode {masks!r}", "use " + ", ".join(ledits.MODES))
        require(0.0 <= float(threshold) < 1.0, node, "threshold", f"{threshold} is outside [0, 1)", "use 0.9 (the paper)")
        items = ledits.parse_edits(edits, scale, node)
        family = model_family(model)
        layout = attention_layout(model)
        store, level = None, None
        m = model.clone()
        if masks != "noise":
            if not any(s.cross for s in layout.sites) and not layout.dit_blocks:
                raise EditKitInputError(node, "masks", "this model has no cross-attention layers to read maps from",
                                        "use masks 'noise'")
            words = {f"edit{i}": _concept_positions(clip, e, family, node, i + 1) for i, e in enumerate(items)}
            level = blend_level(layout)
            store = CrossAttentionMapStore(words, frozenset({level}), per_step=True)
            install_capture(m, store)
        encode = lambda t: clip.encode_from_tokens_scheduled(clip.tokenize(t))
        conds = {ledits.edit_cond_name(i): encode(e.concept) for i, e in enumerate(items)}
        has_uncond = inversion.negative is not None and abs(inversion.cfg - 1.0) > 1e-9
        if not has_uncond:
            conds[ledits.UNCOND] = inversion.negative if inversion.negative is not None else encode("")
        hook = ledits.LEditsGuidance(items, threshold, warmup, masks, store, level, None if has_uncond else ledits.UNCOND)
        guider = make_edit_guider(m, inversion, inversion.positive, inversion.negative, inversion.cfg, extra_conds=conds)
        k0 = inversion.start_index
        bar = StepProgress(model, inversion.steps - k0)

        def program(g, sigmas, extra_args, callback, noise, latent, disable_pbar):
            return replay(g, inversion, k0, extra_args["model_options"], lambda pos, x0, x, total: bar.update(1, x0),
                          output, hooks=(hook,))
        out = guider.run(program, inversion.sigmas[k0:], inversion.batch_shape)
        b, _, h, w = inversion.batch_shape
        recorded = guider.replay_stats.get("ledits_masks", [])
        avg = (torch.stack([r[1] for r in recorded]).mean(0) if recorded
               else torch.zeros(len(items), b, h, w))
        mask = torch.nn.functional.interpolate(avg.reshape(-1, 1, h, w), scale_factor=DOWNSCALE, mode="nearest")[:, 0]
        rows = 2 + len(items) + (0 if has_uncond else 1)
        text = (f"{len(items)} edit(s): " + "; ".join(f"{e.label} (scale {e.scale:g}): mask {float(avg[i].mean()) * 100:.0f} %"
                                                    for i, e in enumerate(items))
                + f"\n{len(recorded)} edited steps of {inversion.steps - k0}; {guider.evaluations} batched calls of "
                  f"{rows} branches ({'x2 with the unconditional rows' if has_uncond else 'no unconditional rows'})")
        return io.NodeOutput({"samples": out}, mask, ui=feedback.show(cls, text=text, images=_mask_overlay(None, mask)))


class BlendedLatent(EditKitNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitBlendedLatent",
            display_name="Blended Latent (masked img2img, any sampler)",
            category="EditKit/editing",
            description="Blended Latent Diffusion (Avrahami et al. 2023) as a model patch for KSampler / "
                        "SamplerCustomAdvanced img2img: outside the mask the model predicts the source latent, so "
                        "the sampler keeps the latent there on the source noised to the current sigma and the "
                        "result there IS the source; inside the mask the prompt edits. Soft masks are a per-pixel "
                        "strength (a pixel of strength s is edited during the last s of the steps, "
                        "Differential-Diffusion style). Sample from the same source latent (KSampler denoise < 1).",
            inputs=[
                io.Model.Input("model", tooltip="The model to patch (any family: EPS, v-prediction, flow)."),
                io.Latent.Input("source", tooltip="The image as a latent (VAE Encode): what stays outside the mask. "
                                                  "Also connect it as the sampler's latent_image."),
                io.Mask.Input("mask", tooltip="Where to edit (1) and where to keep the source (0); soft values = "
                                              "per-pixel strength. Image or latent size; e.g. EditKit DiffEdit Mask."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The patched model: connect it to KSampler / "
                                                                    "BasicGuider / CFGGuider.")],
        )

    @classmethod
    def execute(cls, model, source, mask) -> io.NodeOutput:
        from ..core.patches import chain_unet_wrapper
        from ..local import masks as local_masks
        from ..local.blend import BlendedLatent as Patch
        node = "EditKitBlendedLatent"
        if not isinstance(source, dict) or "samples" not in source:
            raise EditKitInputError(node, "source", "not a LATENT", "connect a VAE Encode output")
        samples = comfy.sample.fix_empty_latent_channels(model, source["samples"])
        expected = model.model.latent_format.latent_channels
        if samples.ndim != 4 or samples.shape[1] != expected:
            raise EditKitInputError(node, "source", f"a latent with shape {tuple(samples.shape)} does not fit this model "
                                    f"({expected} latent channels)", "encode the image with this model's VAE")
        strength = local_masks.to_latent(mask, samples.shape, node, "mask")
        m = model.clone()
        chain_unet_wrapper(m, Patch(model.model.process_latent_in(samples.float()), strength).make)
        return io.NodeOutput(m)


class RePaint(EditKitNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitRePaint",
            display_name="RePaint Resampling (masked inversion edit)",
            category="EditKit/editing",
            description="RePaint resampling (Lugmayr et al. 2022) for a masked EditKit Inversion Sampler: the replay "
                        "runs its steps in blocks of 'jump length' and runs every block 'resamples' times; before each "
                        "rerun the edit is re-noised back to the block's start with fresh noise while the source stays "
                        "on its stored latent, so the edit inside the mask blends with the kept source outside it. "
                        "Costs 'resamples' times the model calls. Put it between the sampler's SAMPLER output and "
                        "SamplerCustomAdvanced.",
            inputs=[
                io.Sampler.Input("sampler", tooltip="The 'sampler' output of an EditKit Inversion Sampler that has a mask "
                                                    "connected."),
                io.Int.Input("jump_length", default=10, min=1, max=1000,
                             tooltip="Steps per block (the paper's jump length, 10)."),
                io.Int.Input("resamples", default=10, min=1, max=100,
                             tooltip="How often each block runs (the paper's 10; 1 = no resampling). The edit costs "
                                     "this many times the model calls."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the fresh noise of the jumps back."),
            ],
            outputs=[io.Sampler.Output(display_name="sampler", tooltip="Connect to SamplerCustomAdvanced 'sampler' "
                                                                       "(with the same node's guider).")],
        )

    @classmethod
    def execute(cls, sampler, jump_length, resamples, seed) -> io.NodeOutput:
        from ..local.blend import MaskedDecoding, RePaint as Hook
        from ..samplers.replay import InversionReplaySampler
        node = "EditKitRePaint"
        if not isinstance(sampler, InversionReplaySampler):
            raise EditKitInputError(node, "sampler", "not the sampler of an EditKit Inversion Sampler",
                                    "connect the 'sampler' output of EditKit Inversion Sampler")
        if not any(isinstance(h, MaskedDecoding) for h in sampler.hooks):
            raise EditKitInputError(node, "sampler", "RePaint needs masked decoding and the Inversion Sampler has no mask",
                                    "connect a MASK (e.g. EditKit DiffEdit Mask) to the Inversion Sampler's 'mask'")
        if any(isinstance(h, Hook) for h in sampler.hooks):
            raise EditKitInputError(node, "sampler", "the sampler already resamples (two RePaint nodes in a row)",
                                    "keep one RePaint node")
        require(jump_length >= 1, node, "jump_length", f"{jump_length} is below 1", "use 1 or more")
        require(resamples >= 1, node, "resamples", f"{resamples} is below 1", "use 1 (off) or more")
        hooks = sampler.hooks + (Hook(jump_length, resamples, seed),)
        return io.NodeOutput(InversionReplaySampler(sampler.inv, sampler.output, hooks))


NODES = [SDEdit, DiffEditMask, BlendedLatent, RePaint, LEDITS]
