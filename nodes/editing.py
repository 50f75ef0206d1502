"""Editing nodes: SDEdit."""
from __future__ import annotations

import comfy.sample
import comfy.samplers
from .api import io
from .base import EditKitNode

from ..core import denoiser
from ..core.errors import EditKitInputError, require
from ..core.introspect import model_sampling
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


NODES = [SDEdit]
