"""Adapter files the shipped workflows name, generated deterministically with random weights.

    ipadapter/editkit-demo-ipadapter-<model>.safetensors       base: 4 tokens from the image embeds
    ipadapter/editkit-demo-ipadapter-plus-<model>.safetensors  plus: resampler over the hidden states
    clip_vision/editkit-demo-clip-vision.safetensors           a 2-layer ViT (64-dim)
    controlnet/editkit-demo-controlnet-<model>.safetensors     a ControlNet mirroring the UNet

<model> is each built-in model the workflows may run on ("tiny" and, when present, "toy"); the
files only fit that model's layout. Real files: see the README (IP-Adapter section).
"""
from __future__ import annotations

import os

CLIP_VISION_FILE = "editkit-demo-clip-vision.safetensors"


def ipadapter_file(model: str, kind: str = "base") -> str:
    return f"editkit-demo-ipadapter-{model}.safetensors" if kind == "base" else \
        f"editkit-demo-ipadapter-{kind}-{model}.safetensors"


def controlnet_file(model: str) -> str:
    return f"editkit-demo-controlnet-{model}.safetensors"


def demo_unets() -> dict[str, dict]:
    """UNet configs (with head counts) of the built-in models the workflows can run on."""
    from ..builtin_models import tiny
    out = {"tiny": dict(tiny.TINY_UNET, num_heads=2, num_head_channels=-1)}
    try:
        from ..builtin_models import toy
        cfg = getattr(toy, "UNET_CONFIG", None)
        if cfg is not None:
            out["toy"] = dict(cfg)
    except ImportError:
        pass
    return out


def _write(path: str, make) -> bool:
    if os.path.exists(path):
        return False
    import comfy.utils
    sd, meta = make()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    comfy.utils.save_torch_file(sd, tmp, metadata=meta)
    os.replace(tmp, path)
    return True


def make(models_dir: str) -> list[str]:
    from . import demo_models as dm
    written = []
    clip = os.path.join(models_dir, "clip_vision", CLIP_VISION_FILE)
    if _write(clip, lambda: dm.make_clip_vision(dm.TINY_CLIP_VISION, seed=11)):
        written.append(clip)
    dim = dm.TINY_CLIP_VISION["projection_dim"]
    hidden = dm.TINY_CLIP_VISION["hidden_size"]
    for name, cfg in demo_unets().items():
        jobs = [
            (os.path.join(models_dir, "ipadapter", ipadapter_file(name)),
             lambda cfg=cfg: dm.make_ipadapter(cfg, "base", clip_dim=dim, tokens=4, seed=17, std=0.2)),
            (os.path.join(models_dir, "ipadapter", ipadapter_file(name, "plus")),
             lambda cfg=cfg: dm.make_ipadapter(cfg, "plus", clip_dim=hidden, tokens=16, seed=19, std=0.2)),
            (os.path.join(models_dir, "controlnet", controlnet_file(name)),
             lambda cfg=cfg: dm.make_controlnet(cfg, seed=13)),
        ]
        for path, fn in jobs:
            if _write(path, fn):
                written.append(path)
    return written
