"""Analysis nodes: cross-attention heat maps."""
from __future__ import annotations

import torch
from . import feedback
from .api import io
from .base import EditKitNode

from ..attention import alignment
from ..attention.maps import CrossAttentionMapStore, install_capture, select_levels
from ..core import imaging
from ..core.errors import EditKitInputError, require
from ..core.introspect import attention_layout, model_family, require_architecture
from ..core.tokens import split_words, token_positions

AttentionMaps = io.Custom("EDITKIT_ATTENTION_MAPS")
LEVELS = ["coarsest two", "coarsest", "all"]


class AttentionMapsCapture(EditKitNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitAttentionMaps",
            display_name="Attention Maps (capture)",
            category="EditKit/analysis",
            description="Record the cross-attention maps of chosen prompt words while sampling (heads averaged, "
                        "bounded memory). The sampled image is unchanged. Show them with 'Attention Maps (show)'.",
            inputs=[
                io.Model.Input("model", tooltip="A UNet model (SD1.x, SD2.x, SDXL or similar), SD3 or Flux."),
                io.Clip.Input("clip", tooltip="The CLIP that encodes the prompt, used to find each word's tokens."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="The positive prompt exactly as given to CLIP Text Encode (convert it to an "
                                        "input and share one text node to keep them equal)."),
                io.String.Input("words", default="",
                                tooltip="Comma-separated words or phrases of the prompt to map, e.g. 'cat, red hat'."),
                io.Combo.Input("levels", options=LEVELS, default="coarsest two",
                               tooltip="Which attention resolutions to average: the coarsest two levels "
                                       "(16x16 and 8x8 for SD1.5 at 512 px, the usual choice), only the coarsest, or all. "
                                       "SD3/Flux have one resolution (the token grid): every joint block is averaged."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Capture from this fraction of the sampling steps."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Capture up to this fraction of the sampling steps."),
                io.String.Input("target_prompt", multiline=True, default="", optional=True,
                                tooltip="Optional: the target prompt(s) of an edit batch (one per line). Then row 0 (or the "
                                        "source branch) is read with the prompt above and the targets with these, and "
                                        "'Attention Maps (show)' puts source and target side by side. A word may be in "
                                        "either prompt; where it is missing its map is empty."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with capture installed; sample with it."),
                AttentionMaps.Output("attention_maps", display_name="attention_maps", tooltip="The maps of the last sampling run of that model."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, prompt, words, levels, start_percent, end_percent, target_prompt="") -> io.NodeOutput:
        node = "EditKitAttentionMaps"
        arch = require_architecture(model, {"unet", "flux", "mmdit"}, node, what="attention-map capture")
        word_list = split_words(words)
        require(bool(word_list), node, "words", "no words given", "type one or more words of the prompt, comma-separated")
        require(start_percent <= end_percent, node, "start_percent", "start_percent is after end_percent",
                "make start_percent <= end_percent")
        targets = [t.strip() for t in (target_prompt or "").splitlines() if t.strip()]
        if targets:
            family = model_family(model)
            positions = alignment.positions(clip, prompt, word_list, family, node, "words", "prompt", allow_missing=True)
            target_words = [alignment.positions(clip, t, word_list, family, node, "words", "target prompt", allow_missing=True)
                            for t in targets]
            for w in word_list:
                if not positions[w] and not any(tw[w] for tw in target_words):
                    raise EditKitInputError(node, "words", f"the word '{w}' is in neither the prompt \"{prompt.strip()[:80]}\" "
                                            "nor the target prompt(s)", "use words that appear in one of the prompts (comma-separated)")
        elif arch != "unet":   # the DiT's text stream (T5 for Flux and SD3) through the shared aligner
            positions = alignment.positions(clip, prompt, word_list, model_family(model), node, "words", "prompt")
            target_words = None
        else:
            positions, target_words = token_positions(clip, prompt, word_list, node), None
        layout = attention_layout(model)
        # DiTs: the image-to-text part of every joint block, at the token grid (one level)
        lv = select_levels(layout, levels) if arch == "unet" else frozenset({1})
        if not lv:
            raise EditKitInputError(node, "model", "this model has no cross-attention layers", "use a text-conditioned UNet")
        store = CrossAttentionMapStore(positions, lv, start_percent, end_percent, target_words=target_words)
        m = model.clone()
        install_capture(m, store)
        return io.NodeOutput(m, store)


class AttentionMapsShow(EditKitNode):
    EDITKIT_SHOWS = ("image",)
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitShowAttentionMaps",
            display_name="Attention Maps (show)",
            category="EditKit/analysis",
            description="Draw captured word maps as heat maps over the decoded image: one row per image, "
                        "the image first and then one labelled panel per word. For maps captured with a target prompt "
                        "(an edit batch), one row per target: the source's image and word maps, then the target's.",
            inputs=[
                AttentionMaps.Input("attention_maps", tooltip="From 'Attention Maps (capture)'."),
                io.Image.Input("image", tooltip="The decoded result of the sampling run that captured the maps "
                                                "(this link also makes the maps wait for that run)."),
                io.Float.Input("opacity", default=0.6, min=0.0, max=1.0, step=0.05, tooltip="Heat map opacity over the image."),
                io.Combo.Input("colormap", options=imaging.COLORMAPS, default="inferno", tooltip="Colour map of the heat maps."),
            ],
            outputs=[
                io.Image.Output("heatmaps", display_name="heatmaps", tooltip="One grid row per image (the image and each word's heat map), or per target of an edit batch (source panels, then target panels)."),
                io.Mask.Output("maps", display_name="maps", tooltip="The raw maps in [0, 1] at image size, word-major per image (batch x words)."),
            ],
            is_output_node=True,   # the heat maps show on the node even with nothing connected
        )

    @classmethod
    def execute(cls, attention_maps, image, opacity, colormap) -> io.NodeOutput:
        node = "EditKitShowAttentionMaps"
        store: CrossAttentionMapStore = attention_maps
        if not store.sums:
            raise EditKitInputError(node, "attention_maps", "no maps were captured",
                                    "sample with the MODEL output of 'Attention Maps (capture)' before this node")
        maps = store.maps()
        b_img, h, w = image.shape[0], image.shape[1], image.shape[2]
        if maps.shape[0] != b_img:
            raise EditKitInputError(node, "image", f"{b_img} images but the maps are for a batch of {maps.shape[0]}",
                                    "connect the decoded output of the same sampling run")
        full = imaging.resize_maps(maps, h, w)                       # (B, N, H, W)

        def panels(i, tag):
            out = [imaging.label(image[i, ..., :3].float().cpu(), tag or "image")]
            for j, word in enumerate(store.words):
                heat = imaging.colorize(full[i, j], colormap)
                out.append(imaging.label(imaging.overlay(image[i].cpu(), heat, opacity), word))
            return out
        rows = []
        pairs = [(t, s) for t, s in store.pairs if t < b_img and s < b_img] if store.branched else []
        if pairs:
            for n, (t, s) in enumerate(pairs):
                tag = "target" if len(pairs) == 1 else f"target {n + 1}"
                rows.append(imaging.hstack([imaging.hstack(panels(s, "source")), imaging.hstack(panels(t, tag))], gap=16))
        else:
            for i in range(b_img):
                rows.append(imaging.hstack(panels(i, None)))
        grid = torch.stack(rows)
        return io.NodeOutput(grid, full.reshape(-1, h, w).contiguous(), ui=feedback.show(cls, images=grid))


NODES = [AttentionMapsCapture, AttentionMapsShow]
