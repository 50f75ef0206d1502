"""Loader nodes for the models EditKit builds in code (no download)."""
from __future__ import annotations

from .api import io
from .base import EditKitNode

from ..builtin_models import tiny


class TinyModelLoader(EditKitNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitTinyModelLoader",
            display_name="Tiny Model Loader (built in code)",
            category="EditKit/loaders",
            description="A ~1M-parameter SD-style UNet, CLIP and VAE with random weights, built in code. For "
                        "testing graphs and patches without a checkpoint: it runs everywhere, its images are noise.",
            inputs=[
                io.Combo.Input("parameterization", options=tiny.VARIANTS + [tiny.SD3_DIT], default=tiny.EPS,
                               tooltip="eps (SD1.5-like), v_prediction (SD2-like) or flow (SD3/Flux-like) UNet; "
                                       "'sd3 (MMDiT)': a tiny SD3 transformer with a 16-channel VAE (DiT-only nodes)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seed of the random weights."),
            ],
            outputs=[io.Model.Output("model", display_name="model", tooltip="The tiny UNet (or SD3 DiT) with random weights."),
                     io.Clip.Output("clip", display_name="clip", tooltip="The tiny CLIP text encoder (random weights)."),
                     io.Vae.Output("vae", display_name="vae", tooltip="The tiny VAE (random weights, 8x downscale).")],
        )

    @classmethod
    def execute(cls, parameterization, seed) -> io.NodeOutput:
        if parameterization == tiny.SD3_DIT:
            return io.NodeOutput(tiny.tiny_sd3(seed), tiny.tiny_clip(seed + 2), tiny.tiny_vae(seed + 1, channels=16))
        return io.NodeOutput(tiny.tiny_unet(parameterization, seed), tiny.tiny_clip(seed + 2), tiny.tiny_vae(seed + 1))


NODES = [TinyModelLoader]
