"""Full-size SD1.5 / SDXL models and text encoders on the `meta` device: the real module trees,
state-dict keys and shapes (what LoRA key maps, block layouts and merges need) with no weights."""
from __future__ import annotations

import logging

import torch

META = torch.device("meta")


def _unet(config_cls, unet_config, dtype=torch.float16):
    import comfy.model_patcher
    cfg = config_cls(dict(unet_config))
    cfg.set_inference_dtype(dtype, None)
    base = cfg.get_model({}, device=META)
    return comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def _clip(target, dtype=torch.float16):
    import comfy.sd
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        return comfy.sd.CLIP(target, model_options={"initial_device": META, "dtype": dtype,
                                                    "load_device": torch.device("cpu"),
                                                    "offload_device": torch.device("cpu")})
    finally:
        root.setLevel(level)


def sd15(dtype=torch.float16):
    """(MODEL, CLIP) with SD1.5's UNet and CLIP-L layouts, no weights."""
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.supported_models_base as smb
    from ..builtin_models.fullsize import SD15_UNET
    model = _unet(comfy.supported_models.SD15, SD15_UNET, dtype)
    clip = _clip(smb.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel), dtype)
    return model, clip


def sdxl(dtype=torch.float16):
    """(MODEL, CLIP) with SDXL base's UNet and CLIP-L + CLIP-G layouts, no weights."""
    import comfy.sdxl_clip
    import comfy.supported_models
    import comfy.supported_models_base as smb
    from ..builtin_models.fullsize import SDXL_UNET
    model = _unet(comfy.supported_models.SDXL, SDXL_UNET, dtype)
    clip = _clip(smb.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel), dtype)
    return model, clip
