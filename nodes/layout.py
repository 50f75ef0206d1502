"""Layout nodes: regions (a prompt placed by a MASK or a box), regional attention, MultiDiffusion, and the
preview of the regions over a result. Regions chain: each EditKit Region adds one to the list before it."""
from __future__ import annotations

import torch
from .api import io
from .base import EditKitNode

from . import feedback
from ..core.errors import require
from ..core.introspect import model_sampling, require_architecture
from ..layout import multidiffusion, regional_attention
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
                io.Conditioning.Input("conditioning", tooltip="The region's prompt (CLIP Text Encode), e.g. 'a red circle'."),
                io.Int.Input("x", default=0, min=0, max=16384, step=8, tooltip="Box left edge in image pixels (used without a mask)."),
                io.Int.Input("y", default=0, min=0, max=16384, step=8, tooltip="Box top edge in image pixels (used without a mask)."),
                io.Int.Input("width", default=256, min=0, max=16384, step=8, tooltip="Box width in pixels (used without a mask)."),
                io.Int.Input("height", default=512, min=0, max=16384, step=8, tooltip="Box height in pixels (used without a mask)."),
                io.Float.Input("weight", default=1.0, min=0.01, max=10.0, step=0.05,
                               tooltip="MultiDiffusion: the region's weight where regions overlap (regional attention ignores it)."),
                io.String.Input("label", default="", tooltip="A name for the preview and messages (optional)."),
                io.Mask.Input("mask", optional=True, tooltip="Optional MASK (white = the region), any resolution with the image's "
                                                             "aspect ratio; a batch of masks gives one per image. Replaces the box."),
                Regions.Input("regions", optional=True, tooltip="Regions made before this one (chain them)."),
            ],
            outputs=[Regions.Output("regions_out", display_name="regions", tooltip="The regions so far, this one last.")],
        )

    @classmethod
    def execute(cls, conditioning, x, y, width, height, weight, label, mask=None, regions=None) -> io.NodeOutput:
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
                        "attention patches (Prompt-to-Prompt, IP-Adapter). UNet models (SD1.x, SD2.x, SDXL).",
            inputs=[
                io.Model.Input("model", tooltip="A UNet model (SD1.x, SD2.x, SDXL)."),
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
        require_architecture(model, {"unet"}, node, what="regional attention")
        regs = _regions(node, regions, model)
        require(end_percent > start_percent, node, "end_percent", "end_percent must be after start_percent", "raise end_percent")
        ms = model_sampling(model)
        s0 = float("inf") if start_percent <= 0 else float(ms.percent_to_sigma(start_percent))
        s1 = 0.0 if end_percent >= 1 else float(ms.percent_to_sigma(end_percent))
        m = model.clone()
        patch = regional_attention.RegionalAttention(node, regs, mode=mode, strength=strength,
                                                     global_in_regions=global_prompt_in_regions, sigma_start=s0,
                                                     sigma_end=s1, downscale=downscale_of(model), model_sampling=ms)
        n = regional_attention.install(m, patch)
        text = f"{len(regs)} regions, {mode}, {n} cross-attention layers patched"
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


NODES = [Region, RegionalAttention, MultiDiffusion, ShowRegions]
