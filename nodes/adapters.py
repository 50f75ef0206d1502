"""Adapter nodes: IP-Adapter (load, apply) and ControlNet / T2I-Adapter control schedules."""
from __future__ import annotations

import folder_paths
import torch
from .api import io
from .base import EditKitNode

from ..adapters import control as C
from ..adapters import demo_models
from ..adapters import ipadapter as IPA
from ..core import files
from ..core.errors import EditKitInputError, require
from ..core.introspect import require_architecture

IPAdapterType = io.Custom("EDITKIT_IPADAPTER")

IPA.register_folder()   # models/ipadapter (+ extra_model_paths.yaml "ipadapter:" entries); no file is read here


def _files(folder: str) -> list[str]:
    try:
        return folder_paths.get_filename_list(folder)
    except KeyError:
        return []


def _path(node: str, input_name: str, folder: str, name: str) -> str:
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        raise EditKitInputError(node, input_name, f"file {name!r} not found in the '{folder}' models folder",
                                f"put it in ComfyUI/models/{folder}/ (or a '{folder}:' path of extra_model_paths.yaml)")
    return path


def _mask(mask, node: str, input_name: str):
    if mask is None:
        return None
    m = mask.float()
    if m.ndim == 2:
        m = m.unsqueeze(0)
    require(m.ndim == 3, node, input_name, f"a mask of shape {tuple(mask.shape)}", "connect a MASK (H x W or B x H x W)")
    return m.clamp(0.0, 1.0).cpu()


class IPAdapterLoader(EditKitNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitIPAdapterLoader",
            display_name="IP-Adapter Loader",
            category="EditKit/adapters",
            description="Load an IP-Adapter weight file (.safetensors or the older .bin) from the 'ipadapter' models "
                        "folder. The variant (SD1.5 / SDXL; base, plus, plus-face, full-face) is detected from the "
                        "file's keys and shapes, not its name.",
            inputs=[
                io.Combo.Input("ipadapter_file", options=_files(IPA.FOLDER),
                               tooltip="A file in ComfyUI/models/ipadapter/ (see the README for which files to download)."),
            ],
            outputs=[IPAdapterType.Output("ipadapter", display_name="ipadapter",
                                          tooltip="The adapter; connect to 'IP-Adapter Apply'.")],
        )

    @classmethod
    def execute(cls, ipadapter_file) -> io.NodeOutput:
        node = "EditKitIPAdapterLoader"
        path = _path(node, "ipadapter_file", IPA.FOLDER, ipadapter_file)
        with files.loader_errors(node, "ipadapter_file", ipadapter_file):
            try:
                adapter = IPA.load(path)
            except IPA.UnknownAdapter as e:
                raise EditKitInputError(node, "ipadapter_file", f"{ipadapter_file} is not an IP-Adapter EditKit knows: {e}",
                                        "use an SD1.5 / SDXL IP-Adapter base, plus, plus-face or full-face file") from None
        return io.NodeOutput(adapter)


class TinyCLIPVisionLoader(EditKitNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitTinyCLIPVisionLoader",
            display_name="Load CLIP Vision (small / config in file)",
            category="EditKit/loaders",
            description="Load a CLIP vision file that ComfyUI's 'Load CLIP Vision' cannot size by itself (it only "
                        "knows ViT-L/H/bigG, SigLIP and DINOv2), e.g. EditKit's generated demo encoder. Returns "
                        "ComfyUI's own CLIP_VISION. Real files (ViT-H, ViT-bigG) load here too, but the core node is "
                        "the usual choice for them.",
            inputs=[
                io.Combo.Input("clip_name", options=_files("clip_vision"),
                               tooltip="A file in ComfyUI/models/clip_vision/."),
            ],
            outputs=[io.ClipVision.Output("clip_vision", display_name="clip_vision",
                                          tooltip="ComfyUI's CLIP_VISION (encode_image works as for core files).")],
        )

    @classmethod
    def execute(cls, clip_name) -> io.NodeOutput:
        node = "EditKitTinyCLIPVisionLoader"
        with files.loader_errors(node, "clip_name", clip_name):
            cv = demo_models.load_clip_vision(_path(node, "clip_name", "clip_vision", clip_name))
        if cv is None:
            raise EditKitInputError(node, "clip_name", f"{clip_name} is not a CLIP vision model",
                                    "pick a CLIP vision .safetensors file")
        return io.NodeOutput(cv)


class IPAdapterApply(EditKitNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitIPAdapterApply",
            display_name="IP-Adapter Apply",
            category="EditKit/adapters",
            description="Image prompt (IP-Adapter, Ye et al. 2023): every cross-attention layer adds weight x "
                        "attention over the image's tokens to the text attention. Chains to attention patches "
                        "already on the model (EditKit's and other packs'); apply several times to stack images, "
                        "each with its own weight, mask and step range.",
            inputs=[
                io.Model.Input("model", tooltip="A UNet model (SD1.x, SD2.x, SDXL) matching the adapter."),
                IPAdapterType.Input("ipadapter", tooltip="From 'IP-Adapter Loader'."),
                io.ClipVision.Input("clip_vision", tooltip="The image encoder the adapter was trained with (ViT-H for "
                                                           "SD1.5 and *_vit-h files, ViT-bigG for ip-adapter_sdxl)."),
                io.Image.Input("image", tooltip="The image prompt; a batch is averaged or concatenated (see combine_images)."),
                io.Float.Input("weight", default=1.0, min=-1.0, max=5.0, step=0.01,
                               tooltip="lambda: scale of the image attention (the paper uses 1.0; 0.5-0.8 leaves the text more say)."),
                io.Combo.Input("weight_type", options=IPA.WEIGHT_TYPES, default="linear",
                               tooltip="How the weight varies over the layers: linear (same everywhere); ease in / "
                                       "out (strong at the first / last layers); style only, composition only, style "
                                       "and composition (InstantStyle's blocks: SDXL up-block 0.1 / down-block 2.1, the "
                                       "same-position blocks on other UNets)."),
                io.Combo.Input("combine_images", options=IPA.COMBINE, default="average",
                               tooltip="Several images: average their CLIP embeddings, or concatenate their tokens."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="First fraction of the sampling steps with the image prompt (step i of N runs it when start <= i/N < end)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="End of the step range (1 = up to the last step)."),
                io.Mask.Input("attn_mask", optional=True,
                              tooltip="Optional: restrict the image prompt to this region (white = image prompt applies)."),
                io.Image.Input("image_negative", optional=True,
                               tooltip="Optional: the unconditional image prompt. Default: a zero embedding (base) "
                                       "or a neutral image's encoding (plus), as in the IP-Adapter code."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with the image prompt installed.")],
        )

    @classmethod
    def execute(cls, model, ipadapter, clip_vision, image, weight, weight_type, combine_images, start_percent,
                end_percent, attn_mask=None, image_negative=None) -> io.NodeOutput:
        node = "EditKitIPAdapterApply"
        require_architecture(model, {"unet"}, node, what="IP-Adapter")
        require(isinstance(ipadapter, IPA.IPAdapter), node, "ipadapter", "not an EditKit IP-Adapter",
                "connect 'IP-Adapter Loader' (EditKit), not another pack's loader")
        require(start_percent <= end_percent, node, "start_percent", "start_percent is after end_percent",
                "make start_percent <= end_percent")
        pairs = IPA.match_layers(model, ipadapter, node)
        mask = _mask(attn_mask, node, "attn_mask")
        if weight == 0.0 or start_percent >= end_percent:
            return io.NodeOutput(model)
        cond, uncond = IPA.image_tokens(ipadapter, clip_vision, image, combine_images, node, negative=image_negative)
        app = IPA.Application(ipadapter, cond, uncond, float(weight), float(start_percent), float(end_percent), mask)
        weights = IPA.layer_weights([s for s, _ in pairs], weight_type)
        m = model.clone()
        IPA.install(m, app, pairs, weights)
        return io.NodeOutput(m)


class TinyControlNetLoader(EditKitNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitTinyControlNetLoader",
            display_name="Load ControlNet (small / config in file)",
            category="EditKit/loaders",
            description="Load a ControlNet whose config ComfyUI cannot infer from its shapes (it assumes 64-dim "
                        "attention heads), e.g. EditKit's generated demo ControlNets. Any other file goes to "
                        "ComfyUI's own ControlNet loader. Returns ComfyUI's CONTROL_NET.",
            inputs=[
                io.Combo.Input("control_net_name", options=_files("controlnet"),
                               tooltip="A file in ComfyUI/models/controlnet/."),
            ],
            outputs=[io.ControlNet.Output("control_net", display_name="control_net",
                                          tooltip="ComfyUI's CONTROL_NET: connect to 'Control Schedule' or ControlNetApplyAdvanced.")],
        )

    @classmethod
    def execute(cls, control_net_name) -> io.NodeOutput:
        node = "EditKitTinyControlNetLoader"
        with files.loader_errors(node, "control_net_name", control_net_name):
            cn = demo_models.load_controlnet(_path(node, "control_net_name", "controlnet", control_net_name))
        if cn is None:
            raise EditKitInputError(node, "control_net_name", f"{control_net_name} is not a ControlNet ComfyUI can read",
                                    "pick a ControlNet / T2I-Adapter / Control-LoRA file")
        return io.NodeOutput(cn)


class ControlSchedule(EditKitNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitControlSchedule",
            display_name="Control Schedule (ControlNet / T2I-Adapter)",
            category="EditKit/adapters",
            description="Wrap a ControlNet, T2I-Adapter or Control-LoRA with a strength schedule over the steps, "
                        "per-block weights (incl. the ControlNet paper's soft / resolution weighting), a spatial "
                        "mask, cond-only application and max-variance fusion with earlier controls. Connect the "
                        "output to ComfyUI's Apply ControlNet (Advanced); neutral settings change nothing.",
            inputs=[
                io.ControlNet.Input("control_net", tooltip="From ComfyUI's ControlNet loaders (or EditKit's)."),
                io.Combo.Input("schedule", options=C.SCHEDULES, default="constant",
                               tooltip="Strength multiplier over the sampling progress: constant 1; linear or cosine "
                                       "from schedule_start to schedule_end; or keyframes."),
                io.Float.Input("schedule_start", default=1.0, min=0.0, max=10.0, step=0.01,
                               tooltip="Multiplier at the first step (linear / cosine)."),
                io.Float.Input("schedule_end", default=1.0, min=0.0, max=10.0, step=0.01,
                               tooltip="Multiplier at the last step (linear / cosine)."),
                io.String.Input("keyframes", default="0:1.0, 1:1.0",
                                tooltip="For schedule = keyframes: progress:multiplier pairs, linearly interpolated, "
                                        "e.g. '0:1.0, 0.4:1.0, 0.6:0.3, 1:0'."),
                io.Combo.Input("block_weights", options=C.BLOCK_WEIGHTS, default="uniform",
                               tooltip="Per-block residual weights: uniform; soft = ratio^(N-i) over input block i "
                                       "(N = number of input blocks, middle = 1; the ControlNet code's guess mode, "
                                       "ratio 0.825); resolution = block size of the deepest block / block size (the "
                                       "paper's w_i = 64/h_i, normalised); custom list."),
                io.Float.Input("soft_ratio", default=C.SOFT_RATIO, min=0.0, max=1.0, step=0.005,
                               tooltip="Ratio of the soft weighting (0.825 in the ControlNet code; 7/8 = 0.875 is a "
                                       "gentler variant)."),
                io.String.Input("custom_weights", default="",
                                tooltip="For block_weights = custom: one weight per input block (0 first) and the "
                                        "middle block last, comma-separated (13 for SD1.5, 10 for SDXL), or one value."),
                io.Boolean.Input("cond_only", default=False,
                                 tooltip="Apply the control to the conditional branch only (the paper's choice with an "
                                         "empty prompt; combine with soft weights)."),
                io.Combo.Input("combine", options=C.COMBINE, default="sum",
                               tooltip="With controls applied earlier to the same conditioning: sum the residuals "
                                       "(ComfyUI), or keep per location the one with the larger relative standard "
                                       "deviation (MaxFusion)."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Optional: control only this region (Local-Control / MGPF); residuals outside are zero."),
            ],
            outputs=[io.ControlNet.Output(display_name="control_net",
                                          tooltip="The wrapped control: connect to Apply ControlNet (Advanced).")],
        )

    @classmethod
    def execute(cls, control_net, schedule, schedule_start, schedule_end, keyframes, block_weights, soft_ratio,
                custom_weights, cond_only, combine, mask=None) -> io.NodeOutput:
        node = C.NODE
        require(hasattr(control_net, "get_control") and hasattr(control_net, "copy"), node, "control_net",
                "not a ComfyUI control object", "connect a ControlNet / T2I-Adapter loader")
        frames = C.parse_keyframes(keyframes, node) if schedule == "keyframes" else ()
        weights = ()
        if block_weights == "custom":
            try:
                weights = tuple(float(x) for x in custom_weights.replace(";", ",").split(",") if x.strip())
            except ValueError:
                raise EditKitInputError(node, "custom_weights", f"cannot read {custom_weights!r}",
                                        "write comma-separated numbers, e.g. '0.2, 0.3, ..., 1.0'") from None
            require(bool(weights), node, "custom_weights", "no weights given",
                    "write one weight per input block plus the middle block, or pick another block_weights")
        settings = C.ControlSettings(C.Schedule(schedule, float(schedule_start), float(schedule_end), frames),
                                     block_weights, float(soft_ratio), weights, _mask(mask, node, "mask"),
                                     bool(cond_only), combine)
        return io.NodeOutput(C.make_scheduled(control_net.copy(), settings))


NODES = [IPAdapterLoader, IPAdapterApply, TinyCLIPVisionLoader, ControlSchedule, TinyControlNetLoader]
