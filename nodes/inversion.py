"""Inversion nodes: DDIM/Euler (+ fixed point), null-text, negative-prompt (ProxEdit), EDICT, Direct
Inversion, edit-friendly DDPM, RF-Inversion, the inversion sampler and reconstruction metrics."""
from __future__ import annotations

import comfy.sample
import comfy.samplers
import torch
from . import feedback
from .api import io
from .base import EditKitNode

from ..core import introspect
from ..core.errors import EditKitInputError, require
from ..local import masks as local_masks
from ..local.blend import MaskedDecoding
from ..samplers import metrics
from ..samplers.inversion import invert, latent_out
from ..samplers.methods import get_method
from ..samplers.methods.exact import DDPMParams, EDICTParams
from ..samplers.methods.ode import DDIMParams, NPIParams, NTIParams, RFParams
from ..samplers.replay import OUTPUTS, InversionReplaySampler, ZeroNoise, make_edit_guider
from ..samplers.trajectory import EditKitInversion

Inversion = io.Custom("EDITKIT_INVERSION")
CATEGORY = "EditKit/inversion"
SCHEDULERS = comfy.samplers.KSampler.SCHEDULERS


# ---------------------------------------------------------------------------------------------
# Shared inputs and validation
# ---------------------------------------------------------------------------------------------

def _model_in():
    return io.Model.Input("model", tooltip="The model to invert with; the trajectory is only valid for this model.")


def _latent_in():
    return io.Latent.Input("latent", tooltip="The real image as a latent (VAE Encode with this model's VAE).")


def _positive_in(what="The source prompt: a description of the image being inverted."):
    return io.Conditioning.Input("positive", tooltip=what)


def _negative_in(optional=True, what="Negative / unconditional prompt, needed when cfg is not 1."):
    return io.Conditioning.Input("negative", optional=optional, tooltip=what)


def _steps_in(default=50):
    return io.Int.Input("steps", default=default, min=1, max=1000,
                        tooltip="Steps of the schedule; editing replays the same steps. Ignored when sigmas is connected.")


def _scheduler_in(default="normal"):
    return io.Combo.Input("scheduler", options=SCHEDULERS, default=default,
                          tooltip="Shape of the sigma schedule (as in KSampler). Ignored when sigmas is connected.")


def _sigmas_in():
    return io.Sigmas.Input("sigmas", optional=True,
                           tooltip="Optional explicit schedule (descending, ending at 0) instead of steps + scheduler.")


def _fixed_point_in():
    return io.Int.Input("fixed_point_iterations", default=0, min=0, max=50,
                        tooltip="Fixed-point refinement per step (AIDI / ReNoise style): each costs one more model "
                                "evaluation and brings the inversion closer to exact. 0 = plain DDIM inversion.")


def _outputs(noise_name="inverted noise"):
    return [io.Latent.Output("noise_latent", display_name=noise_name,
                             tooltip="The inverted latent at the top of the schedule (user space). Edit with "
                                     "EditKit Inversion Sampler; for EPS/v models KSamplerAdvanced with add_noise "
                                     "disabled also regenerates from it."),
            Inversion.Output("inversion", display_name="inversion",
                             tooltip="The EDITKIT_INVERSION trajectory: the latent at every step, sigmas, "
                                     "conditioning, settings and model identity.")]


def _samples(node, model, latent):
    if not isinstance(latent, dict) or "samples" not in latent:
        raise EditKitInputError(node, "latent", "not a LATENT", "connect a VAE Encode output")
    if "noise_mask" in latent:
        raise EditKitInputError(node, "latent", "the latent carries a noise mask (SetLatentNoiseMask)",
                                "inversion covers the whole image; remove the mask")
    samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    expected = model.model.latent_format.latent_channels
    if samples.ndim != 4 or samples.shape[1] != expected:
        raise EditKitInputError(node, "latent", f"a latent with shape {tuple(samples.shape)} does not fit this "
                                f"{introspect.describe(model)} model ({expected} latent channels)",
                                "encode the image with this model's VAE")
    return samples


def _schedule(node, model, steps, scheduler, sigmas):
    if sigmas is None:
        return comfy.samplers.calculate_sigmas(introspect.model_sampling(model), scheduler, steps).cpu().float()
    sig = torch.as_tensor(sigmas).flatten().cpu().float()
    require(len(sig) >= 2, node, "sigmas", "fewer than 2 sigmas", "connect a schedule with at least one step")
    require(bool(torch.all(sig[1:] < sig[:-1])), node, "sigmas", "the sigmas are not strictly descending",
            "connect a sampling schedule (BasicScheduler), not flipped sigmas: EditKit inverts it itself")
    require(float(sig[-1]) == 0.0, node, "sigmas", f"the schedule ends at {float(sig[-1]):.4g}, not 0",
            "inversion starts from the clean image: use a full schedule or the high part of a split ending in 0")
    return sig


def _conditioning(node, name, cond, required=True):
    if cond is None:
        if required:
            raise EditKitInputError(node, name, "not connected", "connect a CLIP Text Encode output")
        return None
    if not isinstance(cond, list) or not cond or not isinstance(cond[0], (list, tuple)):
        raise EditKitInputError(node, name, "not a CONDITIONING", "connect a CLIP Text Encode output")
    return cond


def _cfg_needs_negative(node, cfg, negative):
    if abs(float(cfg) - 1.0) > 1e-9 and negative is None:
        raise EditKitInputError(node, "negative", f"cfg {cfg} needs a negative prompt",
                                "connect a negative CLIP Text Encode (empty text is the usual choice) or set cfg to 1")


def _settings(**kw):
    return {k: v for k, v in kw.items()}


# ---------------------------------------------------------------------------------------------
# Nodes
# ---------------------------------------------------------------------------------------------

class Invert(EditKitNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitInvert",
            display_name="Invert Image (DDIM / Euler)",
            category=CATEGORY,
            description="Deterministic DDIM inversion (Euler for flow models) of an image latent under a prompt, "
                        "with optional fixed-point refinement per step (AIDI / ReNoise). Stores the latent of every "
                        "step for EditKit Inversion Sampler and attention control. Works for EPS, v-prediction "
                        "and flow models (SD1.x, SD2.x, SDXL, SD3, Flux).",
            inputs=[_model_in(), _latent_in(), _positive_in(), _negative_in(),
                    io.Float.Input("cfg", default=1.0, min=0.0, max=30.0, step=0.1,
                                   tooltip="Guidance during inversion. 1 (no guidance) reconstructs best; "
                                           "edit with a higher cfg through NTI/NPI or Direct Inversion."),
                    _steps_in(), _scheduler_in(), _fixed_point_in(), _sigmas_in()],
            outputs=_outputs(),
        )

    @classmethod
    def execute(cls, model, latent, positive, cfg, steps, scheduler, fixed_point_iterations,
                negative=None, sigmas=None) -> io.NodeOutput:
        node = "EditKitInvert"
        samples = _samples(node, model, latent)
        positive = _conditioning(node, "positive", positive)
        negative = _conditioning(node, "negative", negative, required=False)
        _cfg_needs_negative(node, cfg, negative)
        sig = _schedule(node, model, steps, scheduler, sigmas)
        inv = invert(model, samples, positive, negative, cfg, sig, "ddim", DDIMParams(fixed_point_iterations),
                     settings=_settings(steps=len(sig) - 1, scheduler=scheduler if sigmas is None else "custom"))
        return io.NodeOutput({"samples": latent_out(model, inv)}, inv)


class NullTextInversion(EditKitNode):
    EDITKIT_SHOWS = ("text",)
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitNullTextInversion",
            display_name="Null-text Inversion",
            category=CATEGORY,
            description="Null-text inversion (Mokady et al. 2023): DDIM-invert at guidance 1, then optimise one "
                        "unconditional embedding per step so that guided sampling (default cfg 7.5) retraces the "
                        "inversion. Paper defaults: Adam, 10 iterations, lr 1e-2 decaying per step, early stop "
                        "at 1e-5 + step-dependent epsilon. Needs gradients through the model (slow on CPU).",
            inputs=[_model_in(), _latent_in(), _positive_in(),
                    _negative_in(optional=False, what="The null text to start from: CLIP Text Encode of an empty prompt."),
                    io.Float.Input("cfg", default=7.5, min=1.0, max=30.0, step=0.1,
                                   tooltip="The guidance the null embeddings are optimised for (use the same when editing)."),
                    _steps_in(), _scheduler_in(),
                    io.Int.Input("inner_iterations", default=10, min=0, max=100,
                                 tooltip="Adam iterations per step at most (the paper's N = 10)."),
                    io.Float.Input("learning_rate", default=0.01, min=0.0, max=1.0, step=0.001, round=1e-6,
                                   tooltip="Adam learning rate at the first step; scaled by (1 - step/100). The paper's 1e-2 "
                                           "suits SD's 768-d text embeddings; small text encoders (EditKit's toy "
                                           "model, 64-d) want about 5e-2. Raise it when 'iterations used' is the "
                                           "whole budget and the reconstruction stays poor."),
                    io.Float.Input("early_stop", default=1e-5, min=0.0, max=1.0, step=1e-6, round=1e-8,
                                   tooltip="Stop a step's optimisation when the latent MSE is below this + step * 2e-5."),
                    _fixed_point_in(), _sigmas_in()],
            outputs=_outputs() + [io.Int.Output("iterations_used", display_name="iterations used",
                                                tooltip="Adam iterations actually run over all steps (early stopping).")],
        )

    @classmethod
    def execute(cls, model, latent, positive, negative, cfg, steps, scheduler, inner_iterations, learning_rate,
                early_stop, fixed_point_iterations, sigmas=None) -> io.NodeOutput:
        node = "EditKitNullTextInversion"
        samples = _samples(node, model, latent)
        positive = _conditioning(node, "positive", positive)
        negative = _conditioning(node, "negative", negative)
        if len(negative) != 1:
            raise EditKitInputError(node, "negative", f"{len(negative)} conditioning entries",
                                    "connect one CLIP Text Encode of an empty prompt (no Combine / area nodes)")
        if negative[0][0].ndim != 3:
            raise EditKitInputError(node, "negative", "this conditioning has no token sequence to optimise",
                                    "connect a text-encoder conditioning")
        sig = _schedule(node, model, steps, scheduler, sigmas)
        inv = invert(model, samples, positive, negative, cfg, sig, "nti",
                     NTIParams(inner_iterations, learning_rate, early_stop, fixed_point_iterations),
                     settings=_settings(steps=len(sig) - 1, scheduler=scheduler))
        used = int(inv.stats["iterations_total"])
        text = f"{used} of {inner_iterations * (len(sig) - 1)} Adam iterations used over {len(sig) - 1} steps"
        return io.NodeOutput({"samples": latent_out(model, inv)}, inv, used, ui=feedback.show(cls, text=text))


class NegativePromptInversion(EditKitNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitNegativePromptInversion",
            display_name="Negative-prompt Inversion (NPI / ProxEdit)",
            category=CATEGORY,
            description="Negative-prompt inversion (Miyake et al. 2023): DDIM-invert at guidance 1; when editing, "
                        "the source prompt stands in for the null embedding, so the source reconstructs at any cfg "
                        "with no optimisation. Optional ProxEdit proximal guidance (Han et al. 2023) thresholds "
                        "the edit direction to keep unedited regions.",
            inputs=[_model_in(), _latent_in(), _positive_in(), _steps_in(), _scheduler_in(), _fixed_point_in(),
                    io.Combo.Input("proximal", options=["none", "l0", "l1"], default="none",
                                   tooltip="ProxEdit proximal guidance on (target - source): l0 keeps only the "
                                           "largest differences (hard threshold), l1 shrinks them (soft threshold)."),
                    io.Float.Input("quantile", default=0.7, min=0.0, max=1.0, step=0.01,
                                   tooltip="Per-image quantile of |target - source| used as the threshold (ProxEdit: 0.7)."),
                    _sigmas_in()],
            outputs=_outputs(),
        )

    @classmethod
    def execute(cls, model, latent, positive, steps, scheduler, fixed_point_iterations, proximal, quantile,
                sigmas=None) -> io.NodeOutput:
        node = "EditKitNegativePromptInversion"
        samples = _samples(node, model, latent)
        positive = _conditioning(node, "positive", positive)
        sig = _schedule(node, model, steps, scheduler, sigmas)
        inv = invert(model, samples, positive, None, 1.0, sig, "npi",
                     NPIParams(fixed_point_iterations, None if proximal == "none" else proximal, quantile),
                     settings=_settings(steps=len(sig) - 1, scheduler=scheduler))
        return io.NodeOutput({"samples": latent_out(model, inv)}, inv)


class EDICT(EditKitNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitEDICT",
            display_name="EDICT Inversion",
            category=CATEGORY,
            description="EDICT (Wallace et al. 2023): two coupled latent sequences with mixing layers make the "
                        "sampler exactly invertible, even with guidance. Edit with EditKit Inversion Sampler and a "
                        "new prompt (two model evaluations per step).",
            inputs=[_model_in(), _latent_in(), _positive_in(), _negative_in(),
                    io.Float.Input("cfg", default=3.0, min=0.0, max=30.0, step=0.1,
                                   tooltip="Guidance of the source branch during inversion and reconstruction (paper: 3)."),
                    io.Float.Input("mix", default=0.93, min=0.5, max=0.999, step=0.001,
                                   tooltip="Mixing weight p of the coupling layers (paper: 0.93)."),
                    _steps_in(), _scheduler_in(), _sigmas_in()],
            outputs=_outputs(),
        )

    @classmethod
    def execute(cls, model, latent, positive, cfg, mix, steps, scheduler, negative=None, sigmas=None) -> io.NodeOutput:
        node = "EditKitEDICT"
        samples = _samples(node, model, latent)
        positive = _conditioning(node, "positive", positive)
        negative = _conditioning(node, "negative", negative, required=False)
        _cfg_needs_negative(node, cfg, negative)
        sig = _schedule(node, model, steps, scheduler, sigmas)
        inv = invert(model, samples, positive, negative, cfg, sig, "edict", EDICTParams(mix),
                     settings=_settings(steps=len(sig) - 1, scheduler=scheduler))
        return io.NodeOutput({"samples": latent_out(model, inv)}, inv)


class DirectInversion(EditKitNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitDirectInversion",
            display_name="Direct Inversion (PnP Inversion)",
            category=CATEGORY,
            description="Direct Inversion (Ju et al. 2024, 'PnP Inversion'): during editing the source branch is "
                        "put back onto the stored inversion latent after every step, so it reproduces the image "
                        "exactly at any cfg while the target branch is edited freely (attention-control nodes read "
                        "the corrected source). Costs nothing beyond evaluating the source branch.",
            inputs=[Inversion.Input("inversion", tooltip="From Invert Image, Negative-prompt Inversion or Null-text Inversion.")],
            outputs=[Inversion.Output("direct_inversion", display_name="inversion",
                                      tooltip="The same trajectory, marked for source-branch correction.")],
        )

    @classmethod
    def execute(cls, inversion) -> io.NodeOutput:
        node = "EditKitDirectInversion"
        if not isinstance(inversion, EditKitInversion):
            raise EditKitInputError(node, "inversion", "not an EditKit inversion", "connect an EditKit inversion node")
        if not get_method(inversion.method).direct_inversion:
            raise EditKitInputError(node, "inversion", f"{inversion.label()} is already exact or has no inversion "
                                    "trajectory to correct onto", "use it with Invert Image, NPI or NTI")
        return io.NodeOutput(inversion.with_changes(direct=True))


class DDPMInversion(EditKitNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitDDPMInversion",
            display_name="Edit-friendly DDPM Inversion",
            category=CATEGORY,
            description="Edit-friendly DDPM noise space (Huberman-Spiegelglas et al. 2024): noise the image "
                        "independently to every level, then extract the per-step noise maps that make DDPM "
                        "sampling reproduce it exactly; editing replays them with a new prompt from step skip.",
            inputs=[_model_in(), _latent_in(), _positive_in(), _negative_in(),
                    io.Float.Input("cfg", default=3.5, min=0.0, max=30.0, step=0.1,
                                   tooltip="Guidance of the source prompt when extracting the noise maps (paper: 3.5)."),
                    _steps_in(), _scheduler_in(),
                    io.Int.Input("skip", default=18, min=0, max=999,
                                 tooltip="T_skip: editing starts this many steps into the schedule (paper: 36 of 100); "
                                         "more keeps more of the image's layout."),
                    io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                                 tooltip="Seed of the independent noise at each level."),
                    _sigmas_in()],
            outputs=_outputs("start latent") + [io.Latent.Output("noise_maps", display_name="noise maps",
                                                                  tooltip="The per-step noise maps z_t (steps x batch latents; "
                                                                          "the last step's is its raw correction).")],
        )

    @classmethod
    def execute(cls, model, latent, positive, cfg, steps, scheduler, skip, seed, negative=None, sigmas=None) -> io.NodeOutput:
        node = "EditKitDDPMInversion"
        samples = _samples(node, model, latent)
        positive = _conditioning(node, "positive", positive)
        negative = _conditioning(node, "negative", negative, required=False)
        _cfg_needs_negative(node, cfg, negative)
        sig = _schedule(node, model, steps, scheduler, sigmas)
        n = len(sig) - 1
        require(skip < n, node, "skip", f"skip {skip} leaves no step of the {n}-step schedule", f"use 0..{n - 1}")
        inv = invert(model, samples, positive, negative, cfg, sig, "ddpm", DDPMParams(skip, seed),
                     settings=_settings(steps=n, scheduler=scheduler))
        maps = torch.cat([(r / s if s > 0 else r).float() for r, s in zip(inv.residuals, inv.noise_std)])
        return io.NodeOutput({"samples": latent_out(model, inv)}, inv, {"samples": maps})


class RFInversion(EditKitNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitRFInversion",
            display_name="RF-Inversion (flow models)",
            category=CATEGORY,
            description="RF-Inversion (Rout et al. 2025) for rectified-flow models (SD3, Flux, flow UNets): a "
                        "controlled forward ODE pulled toward a noise sample with strength gamma, and the matching "
                        "controlled reverse (eta between start and stop) that EditKit Inversion Sampler runs.",
            inputs=[_model_in(), _latent_in(),
                    _positive_in("Prompt of the forward ODE (the paper uses an empty prompt)."),
                    _steps_in(28), _scheduler_in("simple"),
                    io.Float.Input("gamma", default=0.5, min=0.0, max=1.0, step=0.01,
                                   tooltip="Controller strength of the forward ODE: 0 = plain flow inversion, "
                                           "1 = straight to the noise sample (more editable, less faithful)."),
                    io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                                 tooltip="Seed of the noise sample the forward ODE is steered toward."),
                    io.Float.Input("eta", default=0.9, min=0.0, max=1.0, step=0.01,
                                   tooltip="Reverse controller strength toward the source image (0 = plain sampling)."),
                    io.Float.Input("start", default=0.0, min=0.0, max=1.0, step=0.01,
                                   tooltip="Fraction of the steps where the reverse controller starts."),
                    io.Float.Input("stop", default=0.25, min=0.0, max=1.0, step=0.01,
                                   tooltip="Fraction of the steps where it stops (paper: about 7 of 28)."),
                    _sigmas_in()],
            outputs=_outputs(),
        )

    @classmethod
    def execute(cls, model, latent, positive, steps, scheduler, gamma, seed, eta, start, stop, sigmas=None) -> io.NodeOutput:
        node = "EditKitRFInversion"
        if introspect.parameterization(model) != introspect.FLOW:
            raise EditKitInputError(node, "model", f"RF-Inversion needs a rectified-flow model, not {introspect.describe(model)}",
                                    "use SD3 / Flux (or Invert Image / EDICT / DDPM inversion for this model)")
        samples = _samples(node, model, latent)
        positive = _conditioning(node, "positive", positive)
        require(start <= stop, node, "start", "start is after stop", "make start <= stop")
        sig = _schedule(node, model, steps, scheduler, sigmas)
        noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index")).float()
        inv = invert(model, samples, positive, None, 1.0, sig, "rf", RFParams(gamma, seed, eta, start, stop), noise=noise,
                     settings=_settings(steps=len(sig) - 1, scheduler=scheduler))
        return io.NodeOutput({"samples": latent_out(model, inv)}, inv)


class InversionSampler(EditKitNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitInversionSampler",
            display_name="EditKit Inversion Sampler",
            category=CATEGORY,
            description="Edit an inverted image with a new prompt: a GUIDER + SAMPLER pair (plus noise, sigmas and "
                        "latent) for SamplerCustomAdvanced that replays any EditKit inversion. The source branch "
                        "(reconstruction) and the target branch (edit) run in one batch, so attention-control "
                        "nodes can read the source.",
            inputs=[io.Model.Input("model", tooltip="The same model the inversion was made with (patched clones of it are fine)."),
                    Inversion.Input("inversion", tooltip="From any EditKit inversion node."),
                    io.Conditioning.Input("positive", tooltip="The target (edit) prompt. Use the source prompt to reconstruct."),
                    io.Conditioning.Input("negative", optional=True,
                                          tooltip="Target negative prompt (default: the inversion's). NPI uses the "
                                                  "source prompt and NTI its optimised null text instead."),
                    io.Float.Input("cfg", default=7.5, min=0.0, max=30.0, step=0.1, tooltip="Guidance of the target branch."),
                    io.Combo.Input("output", options=list(OUTPUTS), default="target",
                                   tooltip="Return the edit only, or the reconstruction and the edit as a batch (source first)."),
                    io.Mask.Input("mask", optional=True,
                                  tooltip="Optional: edit only here (masked decoding). Outside the mask the edit follows "
                                          "the stored source latent of every step; soft values are a per-pixel strength "
                                          "(edited during the last fraction of the steps). Image or latent size; "
                                          "e.g. from EditKit DiffEdit Mask."),
                    ],
            outputs=[io.Noise.Output("noise", display_name="noise", tooltip="Connect to SamplerCustomAdvanced 'noise' (unused: the trajectory holds it)."),
                     io.Guider.Output("guider", display_name="guider", tooltip="Connect to SamplerCustomAdvanced 'guider'."),
                     io.Sampler.Output("sampler", display_name="sampler", tooltip="Connect to SamplerCustomAdvanced 'sampler'."),
                     io.Sigmas.Output("sigmas", display_name="sigmas", tooltip="The inversion's schedule from its start step; "
                                                                               "a tail of it (SplitSigmas) starts the edit later."),
                     io.Latent.Output("latent", display_name="latent", tooltip="Connect to SamplerCustomAdvanced 'latent_image'.")],
        )

    @classmethod
    def execute(cls, model, inversion, positive, cfg, output, negative=None, mask=None) -> io.NodeOutput:
        node = "EditKitInversionSampler"
        if not isinstance(inversion, EditKitInversion):
            raise EditKitInputError(node, "inversion", "not an EditKit inversion", "connect an EditKit inversion node")
        inversion.check_model(model, node)
        positive = _conditioning(node, "positive", positive)
        negative = _conditioning(node, "negative", negative, required=False)
        if (abs(cfg - 1.0) > 1e-9 and negative is None and inversion.negative is None
                and not get_method(inversion.method).own_target_uncond):
            raise EditKitInputError(node, "negative", f"cfg {cfg} needs a negative prompt and the inversion has none",
                                    "connect a negative CLIP Text Encode or set cfg to 1")
        hooks = ()
        if mask is not None:
            hooks = (MaskedDecoding(local_masks.to_latent(mask, inversion.batch_shape, node, "mask")),)
        guider = make_edit_guider(model, inversion, positive, negative, cfg)
        sampler = InversionReplaySampler(inversion, output, hooks)
        sigmas = inversion.sigmas[inversion.start_index:].clone()
        latent = {"samples": torch.zeros(inversion.batch_shape)}
        return io.NodeOutput(ZeroNoise(), guider, sampler, sigmas, latent)


class ReconstructionError(EditKitNode):
    EDITKIT_SHOWS = ("image", "text")   # the heat map and PSNR/SSIM on the node (nodes/feedback.py)
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitReconstructionError",
            display_name="Reconstruction Error",
            category=CATEGORY,
            description="How close a reconstruction is to the original: PSNR and SSIM (kornia) of the images, max and "
                        "mean absolute error of the latents when connected, and a heat map of the difference.",
            inputs=[io.Image.Input("image", tooltip="The original image."),
                    io.Image.Input("reconstruction", tooltip="The reconstructed (decoded) image, same size."),
                    io.Latent.Input("latent", optional=True, tooltip="Optional: the original latent."),
                    io.Latent.Input("reconstruction_latent", optional=True, tooltip="Optional: the reconstructed latent.")],
            outputs=[io.Float.Output("psnr", display_name="PSNR (dB)", tooltip="Mean PSNR over the batch (inf if identical)."),
                     io.Float.Output("ssim", display_name="SSIM", tooltip="Mean SSIM over the batch."),
                     io.Float.Output("latent_max_error", display_name="latent max error", tooltip="Max |latent difference| (-1 when no latents are connected)."),
                     io.Float.Output("latent_mean_error", display_name="latent mean error", tooltip="Mean |latent difference| (-1 when no latents are connected)."),
                     io.Image.Output("heatmap", display_name="difference heat map", tooltip="Per-pixel |image - reconstruction|, scaled to its maximum.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, image, reconstruction, latent=None, reconstruction_latent=None) -> io.NodeOutput:
        node = "EditKitReconstructionError"
        if tuple(image.shape[1:3]) != tuple(reconstruction.shape[1:3]):
            raise EditKitInputError(node, "reconstruction", f"size {tuple(reconstruction.shape[1:3])} differs from the "
                                    f"image's {tuple(image.shape[1:3])}", "decode the reconstruction at the image's size")
        try:
            a, b = metrics.broadcast_pair(image, reconstruction)
        except ValueError as e:
            raise EditKitInputError(node, "reconstruction", str(e), "compare one image to one reconstruction, or equal batches")
        lmax = lmean = -1.0
        if (latent is None) != (reconstruction_latent is None):
            raise EditKitInputError(node, "latent", "only one of the two latents is connected", "connect both or neither")
        if latent is not None:
            la, lb = latent["samples"], reconstruction_latent["samples"]
            if tuple(la.shape[1:]) != tuple(lb.shape[1:]):
                raise EditKitInputError(node, "reconstruction_latent", f"shape {tuple(lb.shape)} differs from {tuple(la.shape)}",
                                        "connect the latent of the same image size and model")
            try:
                la, lb = metrics.broadcast_pair(la, lb)
            except ValueError as e:
                raise EditKitInputError(node, "reconstruction_latent", str(e), "use equal batches")
            lmax, lmean = metrics.latent_errors(la, lb)
        p, s = metrics.psnr(a, b), metrics.ssim(a, b)
        heat, _ = metrics.heatmap(a, b)
        text = f"PSNR {p:.2f} dB, SSIM {s:.4f}" + (f"\nlatent error: max {lmax:.3g}, mean {lmean:.3g}" if latent is not None else "")
        return io.NodeOutput(p, s, lmax, lmean, heat, ui=feedback.show(cls, text=text, images=heat))


NODES = [Invert, NullTextInversion, NegativePromptInversion, EDICT, DirectInversion, DDPMInversion, RFInversion,
         InversionSampler, ReconstructionError]
