"""Layout nodes: regions (a prompt placed by a MASK or a box), regional attention, MultiDiffusion, and the
preview of the regions over a result. Regions chain: each EditKit Region adds one to the list before it."""
from __future__ import annotations

import torch
from .api import io
from .base import EditKitNode

from . import feedback
from ..core.errors import require
from ..core.introspect import model_sampling, require_architecture
from ..core.gradients import gradient_clone
from ..core.tokens import split_words, token_positions
from ..layout import attend_excite, multidiffusion, regional_attention, regional_joint
from ..layout.regions import check_context, downscale_of, latent_grid, make_region, model_context_dim

CATEGORY = "EditKit/layout"
Regions = io.Custom("EDITKIT_REGIONS")
COLORS = [(1.0, 0.25, 0.2), (0.2, 0.45, 1.0), (0.2, 0.8, 0.3), (1.0, 0.8, 0.1), (0.8, 0.3, 0.9), (0.1, 0.8, 0.8)]


def _regions(node: str, regions, model) -> tuple:
    require(bool(regions), node, "regions", "no regions given", "connect an EditKit Region (chain one per prompt)")
    check_context(node, regions, model_context_dim(model))
    return tuple(regions)


class Region(EditKitNode):
    EDITKIT_SHOWS = ("text",)

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitRegion",
            display_name="Region (prompt + mask or box)",
            category=CATEGORY,
            description="Place a prompt: inside a MASK or a box (pixels of the image). Chain several; the list goes to "
                        "Regional Attention or MultiDiffusion. Overlaps: regional attention lets a pixel see every "
                        "region prompt covering it, MultiDiffusion averages them by weight.",
            inputs=[
                io.Conditioning.Input("conditioning", optional=True,
                                      tooltip="The region's prompt (CLIP Text Encode), e.g. 'a red circle'; needed by Regional "
                                              "Attention and MultiDiffusion, not by Box Guidance (which reads the box and label)."),
                io.Int.Input("x", default=0, min=0, max=16384, step=8, tooltip="Box left edge in image pixels (used without a mask)."),
                io.Int.Input("y", default=0, min=0, max=16384, step=8, tooltip="Box top edge in image pixels (used without a mask)."),
                io.Int.Input("width", default=256, min=0, max=16384, step=8, tooltip="Box width in pixels (used without a mask)."),
                io.Int.Input("height", default=512, min=0, max=16384, step=8, tooltip="Box height in pixels (used without a mask)."),
                io.Float.Input("weight", default=1.0, min=0.01, max=10.0, step=0.05,
                               tooltip="MultiDiffusion: the region's weight where regions overlap (regional attention ignores it)."),
                io.String.Input("label", default="", tooltip="A name for the preview and messages (optional); for Box Guidance "
                                                             "the prompt word the box is for, e.g. 'circle'."),
                io.Mask.Input("mask", optional=True, tooltip="Optional MASK (white = the region), any resolution with the image's "
                                                             "aspect ratio; a batch of masks gives one per image. Replaces the box."),
                Regions.Input("regions", optional=True, tooltip="Regions made before this one (chain them)."),
            ],
            outputs=[Regions.Output("regions_out", display_name="regions", tooltip="The regions so far, this one last.")],
        )

    @classmethod
    def execute(cls, x, y, width, height, weight, label, conditioning=None, mask=None, regions=None) -> io.NodeOutput:
        prev = tuple(regions or ())
        r = make_region("EditKitRegion", conditioning, mask=mask, box=None if mask is not None else (x, y, width, height),
                        weight=weight, label=label or f"region {len(prev) + 1}")
        out = prev + (r,)
        return io.NodeOutput(out, ui=feedback.show(cls, text="\n".join(x.describe() for x in out)))


class RegionalAttention(EditKitNode):
    EDITKIT_SHOWS = ("text",)

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitRegionalAttention",
            display_name="Regional Attention",
            category=CATEGORY,
            description="One-pass regional prompting in the cross-attention layers: each region's prompt is seen only "
                        "inside its region (masked cross-attention, CAC/NoiseCollage), or raised there and lowered "
                        "outside (DenseDiffusion, Kim et al. 2023). Works with every sampler; composes with other "
                        "attention patches (Prompt-to-Prompt, IP-Adapter). UNets (SD1.x, SD2.x, SDXL) and the text part of "
                        "SD3/Flux joint attention (masked mode).",
            inputs=[
                io.Model.Input("model", tooltip="A UNet (SD1.x, SD2.x, SDXL) or an SD3/Flux model (masked mode)."),
                Regions.Input("regions", tooltip="From EditKit Region (one per prompt)."),
                io.Combo.Input("mode", options=list(regional_attention.MODES), default="masked",
                               tooltip="masked: region prompts only inside their regions (fast attention kept). "
                                       "dense_diffusion: DenseDiffusion's logit modulation (computes those layers' "
                                       "attention explicitly, slower)."),
                io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="dense_diffusion: the modulation weight (the paper's cross-attention 1.0), times (t/T)^5."),
                io.Boolean.Input("global_prompt_in_regions", default=True,
                                 tooltip="The sampler's positive prompt stays visible inside the regions (off: only outside them)."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01, tooltip="Active from this fraction of sampling."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01, tooltip="Active up to this fraction of sampling."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with regional attention; sample it with the global prompt as positive.")],
        )

    @classmethod
    def execute(cls, model, regions, mode, strength, global_prompt_in_regions, start_percent, end_percent) -> io.NodeOutput:
        node = "EditKitRegionalAttention"
        arch = require_architecture(model, {"unet", "flux", "mmdit"}, node, what="regional attention")
        regs = _regions(node, regions, model)
        require(end_percent > start_percent, node, "end_percent", "end_percent must be after start_percent", "raise end_percent")
        ms = model_sampling(model)
        s0 = float("inf") if start_percent <= 0 else float(ms.percent_to_sigma(start_percent))
        s1 = 0.0 if end_percent >= 1 else float(ms.percent_to_sigma(end_percent))
        m = model.clone()
        patch = regional_attention.RegionalAttention(node, regs, mode=mode, strength=strength,
                                                     global_in_regions=global_prompt_in_regions, sigma_start=s0,
                                                     sigma_end=s1, downscale=downscale_of(model), model_sampling=ms)
        if arch == "unet":
            n = regional_attention.install(m, patch)
            text = f"{len(regs)} regions, {mode}, {n} cross-attention layers patched"
        else:
            require(mode == "masked", node, "mode", "DenseDiffusion modulation is implemented for UNets only",
                    "use mode 'masked' on SD3/Flux")
            regional_joint.install(m, patch)
            text = f"{len(regs)} regions, masked, every joint attention (text part) patched"
        return io.NodeOutput(m, ui=feedback.show(cls, text=text))


class MultiDiffusion(EditKitNode):
    EDITKIT_SHOWS = ("text",)

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitMultiDiffusion",
            display_name="MultiDiffusion (windows, regions)",
            category=CATEGORY,
            description="MultiDiffusion (Bar-Tal et al. 2023): every model call on a latent larger than the window is "
                        "made window by window and averaged per pixel (panoramas), optionally with Gaussian weights "
                        "(Mixture of Diffusers) and per-region prompts. A model wrapper: works with every sampler.",
            inputs=[
                io.Model.Input("model", tooltip="Any diffusion model."),
                io.Int.Input("window_width", default=512, min=64, max=8192, step=8,
                             tooltip="Window width in pixels: the model's native size (SD1.5 512, SDXL 1024)."),
                io.Int.Input("window_height", default=512, min=64, max=8192, step=8, tooltip="Window height in pixels."),
                io.Int.Input("stride", default=64, min=8, max=8192, step=8,
                             tooltip="Pixels between window starts (the paper: 8 latent pixels = 64 px)."),
                io.Combo.Input("weighting", options=list(multidiffusion.WEIGHTINGS), default="uniform",
                               tooltip="uniform (MultiDiffusion) or gaussian around each window centre (Mixture of Diffusers)."),
                Regions.Input("regions", optional=True, tooltip="Optional region prompts (EditKit Region); the sampler's positive "
                                                               "prompt fills the rest."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model sampling window by window.")],
        )

    @classmethod
    def execute(cls, model, window_width, window_height, stride, weighting, regions=None) -> io.NodeOutput:
        node = "EditKitMultiDiffusion"
        ds = downscale_of(model)
        for name, v in (("window_width", window_width), ("window_height", window_height), ("stride", stride)):
            require(v % ds == 0, node, name, f"{v} px is not a multiple of the latent factor {ds}", f"use a multiple of {ds}")
        regs = tuple(regions or ())
        if regs:
            check_context(node, regs, model_context_dim(model))
        m = model.clone()
        multidiffusion.install(m, multidiffusion.MultiDiffusion(node, (window_height // ds, window_width // ds), stride // ds,
                                                                weighting, regs, ds))
        text = f"window {window_width}x{window_height} px, stride {stride} px, {weighting}, {len(regs)} regions"
        return io.NodeOutput(m, ui=feedback.show(cls, text=text))


class ShowRegions(EditKitNode):
    EDITKIT_SHOWS = ("image",)

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitShowRegions",
            display_name="Regions (show)",
            category=CATEGORY,
            description="Draw the regions (masks or boxes, one colour each) over the result to check the layout.",
            inputs=[
                io.Image.Input("image", tooltip="The decoded result (or any image at the generation size)."),
                Regions.Input("regions", tooltip="The regions used for it."),
                io.Float.Input("opacity", default=0.35, min=0.0, max=1.0, step=0.05, tooltip="Fill opacity of each region."),
            ],
            outputs=[io.Image.Output("preview", display_name="preview", tooltip="The image with the regions drawn over it.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, image, regions, opacity) -> io.NodeOutput:
        node = "EditKitShowRegions"
        require(bool(regions), node, "regions", "no regions given", "connect an EditKit Region")
        out = image.clone().float()
        h, w = out.shape[1:3]
        for i, r in enumerate(regions):
            g = latent_grid(node, r, h, w, 1, i)                       # (Bm, h, w) at the image's pixels
            g = g[torch.arange(out.shape[0]) % g.shape[0]].to(out.device)
            col = torch.tensor(COLORS[i % len(COLORS)], device=out.device)
            a = (g * opacity)[..., None]
            edge = (g > 0.5).float()
            border = edge + torch.nn.functional.max_pool2d(-edge[:, None], 3, 1, 1)[:, 0]   # edge minus its erosion
            out = out * (1 - a) + col * a
            out = torch.where(border[..., None] > 0, col.expand_as(out), out)
        return io.NodeOutput(out.clamp(0, 1), ui=feedback.show(cls, images=out.clamp(0, 1)))


def _encode(clip, prompt: str):
    return clip.encode_from_tokens_scheduled(clip.tokenize(prompt))


def _latent_update(node: str, model, clip, prompt: str, words: list, scale: float, end_percent: float, refine: bool,
                   max_refine: int, **objective) -> tuple:
    """Validate, build the objective, install it on a gradient clone; returns (model, conditioning, text)."""
    require_architecture(model, {"unet"}, node, what="cross-attention latent updates")
    require(bool(prompt.strip()), node, "prompt", "the prompt is empty", "type the prompt (the same text the sampler uses)")
    positions = token_positions(clip, prompt, words, node, objective.pop("words_input", "subjects"))
    last = attend_excite.eot_position(clip, prompt)
    attend_excite.check_subjects(node, positions, last)
    binding = tuple((tuple(token_positions(clip, prompt, [a], node, "binding")[a]), words.index(o))
                    for a, o in objective.pop("pairs", ()))
    obj = attend_excite.Objective(tuple(tuple(positions[w]) for w in words), last, binding=binding, node=node, **objective)
    m = gradient_clone(model)
    patch = attend_excite.LatentUpdate(obj, scale=scale, end_percent=end_percent,
                                       refine=attend_excite.PAPER_REFINE if refine else (), max_refine=max_refine,
                                       downscale=downscale_of(model))
    n = attend_excite.install(m, patch)
    text = (f"subjects {', '.join(f'{w} (tokens {positions[w]})' for w in words)}; {n} cross-attention layers read; "
            f"scale {scale:g} over the first {end_percent:.0%} of steps" + (", iterative refinement" if refine else ""))
    return m, _encode(clip, prompt), text


def _pairs(node: str, binding: str, words: list) -> tuple:
    out = []
    for phrase in split_words(binding):
        parts = phrase.split()
        require(len(parts) >= 2, node, "binding", f"'{phrase}' is not 'attribute object'", "write pairs like 'red circle, blue square'")
        obj, attr = parts[-1], " ".join(parts[:-1])
        require(obj in words, node, "binding", f"the object '{obj}' of '{phrase}' is not one of the subjects {words}",
                "add it to subjects or fix the pair")
        out.append((attr, obj))
    return tuple(out)


_UPDATE_INPUTS = lambda scale_tip: [  # noqa: E731
    io.Float.Input("scale", default=20.0, min=0.0, max=1000.0, step=0.5,
                   tooltip=scale_tip + " 0 = plain sampling (bit-identical)."),
    io.Float.Input("end_percent", default=0.5, min=0.0, max=1.0, step=0.01,
                   tooltip="Update the latent during this first fraction of the steps (the paper: 25 of 50 = 0.5)."),
    io.Boolean.Input("iterative_refinement", default=True,
                     tooltip="At 0 %, 20 % and 40 % of the steps repeat the update until every subject's peak attention "
                             "reaches 0.05 / 0.5 / 0.8 (the paper's steps 0/10/20 of 50)."),
    io.Int.Input("max_refine", default=20, min=0, max=100, tooltip="At most this many extra updates per refinement step (the paper: 20)."),
]


class AttendAndExcite(EditKitNode):
    EDITKIT_SHOWS = ("text",)

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitAttendAndExcite",
            display_name="Attend-and-Excite",
            category=CATEGORY,
            description="Attend-and-Excite (Chefer et al. 2023): during the early steps the latent is moved by gradient "
                        "descent so that every subject word gets a strong cross-attention peak (no subject left out); "
                        "optionally an attribute-binding loss keeps each attribute's map on its object's (Rassin et al. "
                        "2023-style). A model wrapper: works with every sampler (exact for Euler/DDIM-type steps). "
                        "UNet models (SD1.x, SD2.x, SDXL); each updated step costs about 3 extra model passes.",
            inputs=[
                io.Model.Input("model", tooltip="A UNet model (SD1.x, SD2.x, SDXL)."),
                io.Clip.Input("clip", tooltip="The text encoder: finds the subject words' tokens and encodes the prompt."),
                io.String.Input("prompt", multiline=True, default="a red circle and a blue square on a white background",
                                tooltip="The prompt; use the positive output as the sampler's positive."),
                io.String.Input("subjects", default="circle, square",
                                tooltip="Comma-separated words of the prompt that must each appear (the paper's subject tokens)."),
                *_UPDATE_INPUTS("Step size of the latent update (the paper: 20, times sqrt of 1 -> 0.5 over the steps)."),
                io.String.Input("binding", default="",
                                tooltip="Optional attribute binding: comma-separated 'attribute object' pairs, e.g. "
                                        "'red circle, blue square' (each object one of the subjects)."),
                io.Float.Input("binding_weight", default=1.0, min=0.0, max=100.0, step=0.1,
                               tooltip="Weight of the attribute-binding loss (used when binding is set)."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with the latent update; sample with the positive below."),
                     io.Conditioning.Output(display_name="positive", tooltip="The prompt encoded (the sampler's positive).")],
        )

    @classmethod
    def execute(cls, model, clip, prompt, subjects, scale, end_percent, iterative_refinement, max_refine, binding,
                binding_weight) -> io.NodeOutput:
        node = "EditKitAttendAndExcite"
        words = split_words(subjects)
        require(bool(words), node, "subjects", "no subject words given", "list the prompt's subject words, e.g. 'circle, square'")
        pairs = _pairs(node, binding, words)
        m, pos, text = _latent_update(node, model, clip, prompt, words, scale, end_percent, iterative_refinement, max_refine,
                                      pairs=pairs, binding_weight=binding_weight if pairs else 0.0)
        if pairs:
            text += f"; binding {', '.join(f'{a}->{o}' for a, o in pairs)} (weight {binding_weight:g})"
        return io.NodeOutput(m, pos, ui=feedback.show(cls, text=text))


class BoxGuidance(EditKitNode):
    EDITKIT_SHOWS = ("text",)

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitBoxGuidance",
            display_name="Box Guidance (BoxDiff)",
            category=CATEGORY,
            description="BoxDiff (Xie et al. 2023), training-free box-constrained generation: during the early steps the "
                        "latent is moved so that each boxed word's cross-attention map peaks inside its box (inner-box), "
                        "stays low outside (outer-box) and reaches the box edges (corner constraint). Boxes are EditKit "
                        "Regions whose label is the word. A model wrapper: works with every sampler. UNet models.",
            inputs=[
                io.Model.Input("model", tooltip="A UNet model (SD1.x, SD2.x, SDXL)."),
                io.Clip.Input("clip", tooltip="The text encoder: finds the boxed words' tokens and encodes the prompt."),
                io.String.Input("prompt", multiline=True, default="a red circle and a blue square on a white background",
                                tooltip="The prompt; use the positive output as the sampler's positive."),
                Regions.Input("regions", tooltip="One EditKit Region per boxed word, its label = the word (e.g. 'circle'); "
                                                 "a box or a mask. The regions' own prompts are not used here."),
                *_UPDATE_INPUTS("Step size of the latent update (BoxDiff uses Attend-and-Excite's 20)."),
                io.Float.Input("top_fraction", default=0.2, min=0.01, max=1.0, step=0.01,
                               tooltip="P of the inner/outer constraints: the mean of the top P x area attention values."),
                io.Float.Input("corner_weight", default=1.0, min=0.0, max=10.0, step=0.1, tooltip="Weight of the corner constraint."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with the box-guided latent update."),
                     io.Conditioning.Output(display_name="positive", tooltip="The prompt encoded (the sampler's positive).")],
        )

    @classmethod
    def execute(cls, model, clip, prompt, regions, scale, end_percent, iterative_refinement, max_refine, top_fraction,
                corner_weight) -> io.NodeOutput:
        node = "EditKitBoxGuidance"
        require(bool(regions), node, "regions", "no regions given", "connect EditKit Regions labelled with the prompt's words")
        words = [(r.label or "").strip() for r in regions]
        boxes = attend_excite.box_regions(node, regions, words)
        m, pos, text = _latent_update(node, model, clip, prompt, words, scale, end_percent, iterative_refinement, max_refine,
                                      words_input="regions", boxes=boxes, box_top=top_fraction, corner=corner_weight)
        return io.NodeOutput(m, pos, ui=feedback.show(cls, text=text + "; boxes: " + "; ".join(r.describe() for r in regions)))


NODES = [Region, RegionalAttention, MultiDiffusion, ShowRegions, AttendAndExcite, BoxGuidance]
