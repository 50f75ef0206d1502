"""Drag editing nodes: the point editor's value (EditKit Drag Points), SDE-Drag, DragDiffusion, DragonDiffusion and
DiffEditor."""
from __future__ import annotations

import comfy.samplers
from .api import io
from .base import EditKitNode

from ..core.errors import EditKitInputError, require
from ..core.progress import StepProgress
from ..drag.points import DragError, DragPoints
from ..drag.sde_drag import LATENT_FACTOR, sde_drag
from . import feedback

Drag = io.Custom("EDITKIT_DRAG")

EXAMPLE_POINTS = '{"version": 1, "width": 512, "height": 512, "points": []}'


def drag_input_error(node: str, input_name: str, e: DragError) -> EditKitInputError:
    return EditKitInputError(node, input_name, f"{e.field}: {e.problem}", e.fix)


class DragPointsNode(EditKitNode):
    EDITKIT_SHOWS = ("text", "editor")      # "editor": the point editor on the node (web/editkit_drag.js)

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitDragPoints",
            display_name="EditKit Drag Points",
            category="EditKit/drag",
            description="Handle -> target point pairs for drag editing, in pixels of the image, with an optional "
                        "editable region. The value is JSON (saved with the workflow, accepted by the API): "
                        '{"width": W, "height": H, "points": [{"handle": [x, y], "target": [x, y]}], '
                        '"mask": {"strokes": [[x, y, radius, 1]]}}.',
            inputs=[
                io.String.Input("points", default=EXAMPLE_POINTS, multiline=True,
                                tooltip="The drag as JSON: image size, handle/target pairs in pixels (x right, y down), "
                                        "optional brush strokes of the editable region."),
                io.Image.Input("image", optional=True,
                               tooltip="The image the points are placed on: gives the size when the JSON has none; at another size of "
                                       "the same aspect ratio the points scale with it."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Editable region (white = may change); replaces the JSON's brush strokes."),
            ],
            outputs=[Drag.Output(display_name="drag", tooltip="The drag (EDITKIT_DRAG) for the drag-editing nodes.")],
        )

    @classmethod
    def execute(cls, points, image=None, mask=None) -> io.NodeOutput:
        node = "EditKitDragPoints"
        w = h = None
        if image is not None:
            h, w = int(image.shape[1]), int(image.shape[2])
        try:
            drag = DragPoints.from_json(points, w, h)
        except DragError as e:
            raise drag_input_error(node, "points", e) from None
        if image is not None and (drag.width, drag.height) != (w, h):
            try:     # the same picture at another size (Image Scale, --model toy): the points scale with it
                drag = drag.fit(w, h)
            except DragError:
                raise EditKitInputError(node, "image", f"the image is {w}x{h} px, the points were placed on "
                                        f"{drag.width}x{drag.height} (another aspect ratio)",
                                        "place the points on this image (or fix width/height)") from None
        try:
            drag = drag.with_mask(mask).validate()
        except DragError as e:
            raise drag_input_error(node, "mask" if e.field == "mask" else "points", e) from None
        return io.NodeOutput(drag, ui=feedback.show(cls, text=drag.describe()))


def fit_drag(node: str, drag: DragPoints, samples, model=None) -> DragPoints:
    """The drag on the latent's image size (same aspect ratio), validated; with `model`, the latent is first
    checked to be one of that model's (4-D, its latent channels)."""
    if model is not None:
        expected = model.model.latent_format.latent_channels
        if samples.ndim != 4 or samples.shape[1] != expected:
            raise EditKitInputError(node, "latent", f"a latent with shape {tuple(samples.shape)} does not fit this model "
                                    f"({expected} latent channels)", "encode the image with this model's VAE")
    h, w = int(samples.shape[-2]) * LATENT_FACTOR, int(samples.shape[-1]) * LATENT_FACTOR
    if not isinstance(drag, DragPoints):
        raise EditKitInputError(node, "drag", "is not an EDITKIT_DRAG value", "connect EditKit Drag Points")
    try:
        return drag.fit(w, h).validate()
    except DragError as e:
        raise drag_input_error(node, "drag", e) from None


class SDEDrag(EditKitNode):
    EDITKIT_SHOWS = ("text",)

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitSDEDrag",
            display_name="SDE-Drag (fast drag editing)",
            category="EditKit/drag",
            description="SDE-Drag (Nie et al., ICLR 2024): noise the latent to t0, copy the noisy patch around each "
                        "handle to its target, refill the vacated place with fresh noise, denoise with an SDE. No "
                        "backpropagation. Outside the moved patch the image is kept exactly.",
            inputs=[
                io.Model.Input("model", tooltip="The model that denoises (SD1.x, SD2.x, SDXL, SD3, Flux)."),
                io.Conditioning.Input("positive", tooltip="A prompt describing the photo."),
                io.Conditioning.Input("negative", optional=True, tooltip="Negative prompt (used when cfg > 1)."),
                io.Latent.Input("latent", tooltip="The photo as a latent (VAE Encode). Every batch row is dragged alike."),
                Drag.Input("drag", tooltip="Handle/target points from EditKit Drag Points (placed on this image, or one "
                                           "of the same aspect ratio: the points scale with it)."),
                io.Float.Input("t0", default=0.6, min=0.05, max=1.0, step=0.01,
                               tooltip="Diffusion time the copy-paste happens at (0.6 in SDEdit-style SDE editing): "
                                       "higher lets the model repair more, lower keeps more detail."),
                io.Int.Input("steps", default=50, min=1, max=1000,
                             tooltip="Steps of the full schedule; t0 * steps of them run after each copy-paste."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=30.0, step=0.1,
                               tooltip="Classifier-free guidance scale (1 = the prompt alone)."),
                io.Int.Input("sub_moves", default=1, min=1, max=16,
                             tooltip="Split each drag into this many equal moves (the paper's m for long drags)."),
                io.Float.Input("radius", default=48.0, min=1.0, max=4096.0, step=1.0,
                               tooltip="Radius in pixels (of the image the points were placed on) of the patch that "
                                       "moves; inside the editable region when the drag has one."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal",
                               tooltip="Shape of the sigma schedule (as in KSampler)."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="Seed of the noise (forward noise, refill and SDE steps)."),
            ],
            outputs=[io.Latent.Output(display_name="latent", tooltip="The dragged latent; decode it with the VAE.")],
        )

    @classmethod
    def execute(cls, model, positive, latent, drag, t0, steps, cfg, sub_moves, radius, scheduler, seed,
                negative=None) -> io.NodeOutput:
        node = "EditKitSDEDrag"
        require(0.0 < t0 <= 1.0, node, "t0", f"{t0} is outside (0, 1]", "use 0.3-0.8 (0.6 is the usual choice)")
        require(steps >= 1, node, "steps", f"{steps} steps cannot denoise", "use at least 1 (50 is usual)")
        require(sub_moves >= 1, node, "sub_moves", f"{sub_moves} is below 1", "use 1 or more")
        require(radius > 0, node, "radius", f"{radius} px moves nothing", "use a radius covering the dragged part")
        samples = latent["samples"]
        d = fit_drag(node, drag, samples, model)
        run_steps = max(1, int(round(steps * t0)))
        bar = StepProgress(model, run_steps * sub_moves)
        out, info = sde_drag(model, positive, negative, samples, d, t0, steps, cfg, seed, sub_moves,
                             radius * d.width / drag.width, scheduler, progress=bar.update)
        res = {k: v for k, v in latent.items() if k not in ("samples", "noise_mask")}
        res["samples"] = out
        return io.NodeOutput(res, ui=feedback.show(cls, text=d.describe() + "\n" + info.describe()))


class DragDiffusion(EditKitNode):
    EDITKIT_SHOWS = ("text",)

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitDragDiffusion",
            display_name="DragDiffusion (optimised drag editing)",
            category="EditKit/drag",
            description="DragDiffusion (Shi et al., CVPR 2024): DDIM-invert to one step, optimise that latent with motion "
                        "supervision on decoder features and point tracking (inside the editable region), denoise with "
                        "the source's self-attention keys/values. For the paper's identity LoRA, connect a model with a "
                        "LoRA trained on the photo.",
            inputs=[
                io.Model.Input("model", tooltip="UNet models (SD1.x, SD2.x, SDXL) and DiTs (SD3, Flux: the block at the same relative depth)."),
                io.Conditioning.Input("positive", tooltip="A prompt describing the photo."),
                io.Conditioning.Input("negative", optional=True, tooltip="Negative prompt (used when cfg > 1)."),
                io.Latent.Input("latent", tooltip="The photo as a latent (VAE Encode); the first row is dragged."),
                Drag.Input("drag", tooltip="Handle/target points and editable region from EditKit Drag Points."),
                io.Int.Input("steps", default=50, min=2, max=1000, tooltip="DDIM schedule length (paper 50)."),
                io.Int.Input("inversion_steps", default=35, min=1, max=1000,
                             tooltip="Invert this many steps of the schedule and optimise there (paper 35 of 50)."),
                io.Int.Input("iterations", default=80, min=1, max=1000, tooltip="Motion-supervision steps (paper 80)."),
                io.Float.Input("lr", default=0.01, min=0.0001, max=1.0, step=0.001, tooltip="Adam learning rate of the latent (paper 0.01)."),
                io.Float.Input("mask_weight", default=0.1, min=0.0, max=100.0, step=0.01,
                               tooltip="lambda: keeps the latent outside the editable region (paper 0.1)."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=30.0, step=0.1, tooltip="Guidance of the final denoise (paper 1)."),
                io.Boolean.Input("reference_control", default=True,
                                 tooltip="Decoder self-attention also attends to the source's keys/values while denoising."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, tooltip="Seed of the reference noise."),
            ],
            outputs=[io.Latent.Output(display_name="latent", tooltip="The dragged latent; decode it with the VAE.")],
        )

    @classmethod
    def execute(cls, model, positive, latent, drag, steps, inversion_steps, iterations, lr, mask_weight, cfg,
                reference_control, seed, negative=None) -> io.NodeOutput:
        from ..core.features import decoder_point
        from ..drag.drag_diffusion import drag_diffusion
        node = "EditKitDragDiffusion"
        require(1 <= inversion_steps <= steps, node, "inversion_steps", f"{inversion_steps} is not within 1..steps ({steps})",
                "use e.g. 35 of 50")
        require(iterations >= 1, node, "iterations", f"{iterations} steps cannot move anything", "use 40-80")
        require(0.0 < lr <= 1.0, node, "lr", f"{lr} cannot work", "use 0.01 (the paper's)")
        try:
            decoder_point(model, -2)
        except ValueError as e:
            raise EditKitInputError(node, "model", f"this model has no decoder features to read ({e})",
                                    "use a UNet (SD1.x, SD2.x, SDXL) or a DiT (SD3, Flux)") from None
        samples = latent["samples"][:1]
        d = fit_drag(node, drag, samples, model)
        bar = StepProgress(model, iterations + inversion_steps)
        out, info = drag_diffusion(model, positive, negative, samples, d, steps, inversion_steps, iterations, lr,
                                   lam=mask_weight, cfg=cfg, reference=reference_control, seed=seed, progress=bar.update)
        res = {k: v for k, v in latent.items() if k not in ("samples", "noise_mask", "batch_index")}
        res["samples"] = out
        return io.NodeOutput(res, ui=feedback.show(cls, text=d.describe() + "\n" + info.describe()))


def _dragon_inputs(extra: list) -> list:
    """Inputs of the energy-guided drag nodes (DragonDiffusion, DiffEditor): the authors' drag defaults."""
    return [
        io.Model.Input("model", tooltip="UNet models (SD1.x, SD2.x, SDXL; features of decoder levels 2 and 3) and DiTs (SD3, "
                                        "Flux: the blocks at the same relative depth). An IP-Adapter applied to the model works."),
        io.Conditioning.Input("positive", tooltip="A prompt describing the photo."),
        io.Conditioning.Input("negative", optional=True, tooltip="Negative prompt (needed when cfg != 1; an empty prompt is usual)."),
        io.Latent.Input("latent", tooltip="The photo as a latent (VAE Encode); the first row is dragged."),
        Drag.Input("drag", tooltip="Handle/target points and editable region from EditKit Drag Points (without a region, a "
                                   "small area around the points may change)."),
        io.Int.Input("steps", default=50, min=2, max=1000, tooltip="DDIM schedule length (paper 50)."),
        io.Int.Input("inversion_steps", default=50, min=1, max=1000,
                     tooltip="Invert this many steps of the schedule and sample back from there (paper: all of them; fewer "
                             "keeps more of the photo on weak models)."),
        io.Float.Input("cfg", default=4.0, min=0.0, max=30.0, step=0.1, tooltip="Classifier-free guidance of the edit (paper 4)."),
        io.Float.Input("energy_scale", default=2.0, min=0.0, max=100.0, step=0.1,
                       tooltip="Strength of the energy guidance, in the authors' units (x 1e3; paper 2 for drags). 0 = plain "
                               "reconstruction."),
        io.Float.Input("w_edit", default=4.0, min=0.0, max=100.0, step=0.1,
                       tooltip="Weight of the editing energy: features at the target should match the source's at the handle (4)."),
        io.Float.Input("w_content", default=6.0, min=0.0, max=100.0, step=0.1,
                       tooltip="Weight of the consistency energy outside the editable region (6)."),
        io.Float.Input("w_inpaint", default=0.2, min=0.0, max=100.0, step=0.1,
                       tooltip="Weight pushing the handle's old place away from its old content (0.2)."),
        io.Float.Input("guide_until", default=0.6, min=0.0, max=1.0, step=0.01,
                       tooltip="Guide the first part of the schedule (paper 30 of 50 steps = 0.6)."),
        io.Boolean.Input("visual_cross_attention", default=True,
                         tooltip="Decoder self-attention of the edit also attends to the source's keys/values at the same "
                                 "step (the memory bank)."),
    ] + extra + [
        io.Int.Input("seed", default=42, min=0, max=0xffffffffffffffff, tooltip="Seed of the regional SDE noise (42)."),
    ]


def _dragon_execute(cls, node: str, model, positive, latent, drag, steps, inversion_steps, cfg, energy_scale, w_edit,
                    w_content, w_inpaint, guide_until, visual_cross_attention, seed, negative=None, **extra):
    from ..drag.dragon import dragon_drag, feature_points
    require(steps >= 2, node, "steps", f"{steps} steps cannot edit", "use 50 (the paper's)")
    require(1 <= inversion_steps <= steps, node, "inversion_steps", f"{inversion_steps} is not within 1..steps ({steps})",
            "use steps (the paper) or a little fewer")
    require(energy_scale >= 0, node, "energy_scale", f"{energy_scale} is negative", "use 0-10 (2 is the paper's)")
    require(0.0 <= guide_until <= 1.0, node, "guide_until", f"{guide_until} is outside [0, 1]", "use 0.6")
    if negative is None and cfg != 1.0:
        raise EditKitInputError(node, "negative", f"cfg {cfg:g} needs a negative prompt", "connect an (empty) negative prompt, or set cfg 1")
    try:
        feature_points(model)
    except ValueError as e:
        raise EditKitInputError(node, "model", f"this model has no decoder features to read ({e})",
                                "use a UNet (SD1.x, SD2.x, SDXL) or a DiT (SD3, Flux)") from None
    samples = latent["samples"][:1]
    d = fit_drag(node, drag, samples, model)
    bar = StepProgress(model, inversion_steps)
    out, info = dragon_drag(model, positive, negative, samples, d, steps, inversion_steps, cfg, energy_scale, w_edit, w_content,
                            w_inpaint, guide_until, visual_cross_attention, seed=seed, progress=bar.update, **extra)
    res = {k: v for k, v in latent.items() if k not in ("samples", "noise_mask", "batch_index")}
    res["samples"] = out
    return io.NodeOutput(res, ui=feedback.show(cls, text=d.describe() + "\n" + info.describe()))


class DragonDiffusion(EditKitNode):
    EDITKIT_SHOWS = ("text",)

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitDragonDiffusion",
            display_name="DragonDiffusion (energy-guided drag editing)",
            category="EditKit/drag",
            description="DragonDiffusion (Mou et al., ICLR 2024): DDIM-invert the photo (the memory bank), then sample with "
                        "energy guidance: the gradient of a feature-correspondence energy (decoder features at the target vs "
                        "the source's at the handle, local + global, plus consistency outside the editable region) is added "
                        "to the predicted noise; the edit's decoder self-attention also attends to the source's keys/values. "
                        "No weights or latents are optimised.",
            inputs=_dragon_inputs([]),
            outputs=[io.Latent.Output(display_name="latent", tooltip="The dragged latent; decode it with the VAE.")],
        )

    @classmethod
    def execute(cls, model, positive, latent, drag, steps, inversion_steps, cfg, energy_scale, w_edit, w_content, w_inpaint,
                guide_until, visual_cross_attention, seed, negative=None) -> io.NodeOutput:
        return _dragon_execute(cls, "EditKitDragonDiffusion", model, positive, latent, drag, steps, inversion_steps, cfg,
                               energy_scale, w_edit, w_content, w_inpaint, guide_until, visual_cross_attention, seed, negative)


class DiffEditor(EditKitNode):
    EDITKIT_SHOWS = ("text",)

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitDiffEditor",
            display_name="DiffEditor (drag editing with regional SDE)",
            category="EditKit/drag",
            description="DiffEditor (Mou et al., CVPR 2024): DragonDiffusion's energy guidance, applied regionally (the "
                        "editing energy's gradient inside the editable region, the consistency energy's outside), a regional "
                        "SDE (fresh noise inside the region in the middle steps) and time travel (roll a guided step back and "
                        "guide it again). The paper's trained image-prompt encoder is not available: apply EditKit's "
                        "IP-Adapter to the model (with your IP-Adapter files) to add an image prompt.",
            inputs=_dragon_inputs([
                io.Float.Input("sde_strength", default=0.4, min=0.0, max=1.0, step=0.05,
                               tooltip="eta of the regional SDE inside the editable region (paper 0.4; 0 = deterministic)."),
                io.Int.Input("time_travel", default=2, min=0, max=10,
                             tooltip="Extra guided passes after rolling a step back, in the last third of the guided steps "
                                     "(paper: 3 passes = 2 extra)."),
            ]),
            outputs=[io.Latent.Output(display_name="latent", tooltip="The dragged latent; decode it with the VAE.")],
        )

    @classmethod
    def execute(cls, model, positive, latent, drag, steps, inversion_steps, cfg, energy_scale, w_edit, w_content, w_inpaint,
                guide_until, visual_cross_attention, sde_strength, time_travel, seed, negative=None) -> io.NodeOutput:
        require(time_travel >= 0, "EditKitDiffEditor", "time_travel", f"{time_travel} is negative", "use 0-3 (2 is the paper's)")
        return _dragon_execute(cls, "EditKitDiffEditor", model, positive, latent, drag, steps, inversion_steps, cfg,
                               energy_scale, w_edit, w_content, w_inpaint, guide_until, visual_cross_attention, seed, negative,
                               diffeditor=True, sde_strength=sde_strength, time_travel=time_travel)


NODES = [DragPointsNode, SDEDrag, DragDiffusion, DragonDiffusion, DiffEditor]
