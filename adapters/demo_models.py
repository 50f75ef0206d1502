"""Small adapter models with random weights, and loaders for files ComfyUI cannot size by itself.

ComfyUI's CLIPVisionLoader recognises CLIP vision files by their layer count (ViT-L/H/bigG, SigLIP,
DINOv2: 23+ layers) and its ControlNet loader assumes 64-dim attention heads, so a tiny CLIP
vision or a ControlNet for a 32-channel UNet cannot be loaded by core. EditKit's generated files
carry their config as JSON in the safetensors metadata; the loaders here read it and build ComfyUI's
own objects (comfy.clip_vision.ClipVisionModel, comfy.controlnet.ControlNet), and hand any other
file to ComfyUI's loaders.
"""
from __future__ import annotations

import json
import os
import tempfile
import types

import torch

CLIP_VISION_KEY = "editkit_clip_vision"
CONTROLNET_KEY = "editkit_controlnet"

# A ViT small enough to run everywhere (224 px, 32 px patches: 49 + 1 positions).
TINY_CLIP_VISION = {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": 64,
                    "image_size": 224, "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 128,
                    "layer_norm_eps": 1e-05, "model_type": "clip_vision_model", "num_attention_heads": 2,
                    "num_channels": 3, "num_hidden_layers": 2, "patch_size": 32, "projection_dim": 64}


# What a file's declared config may say (checked with its tensors' shapes BEFORE a constructor allocates).
CLIP_VISION_BOUNDS = {"hidden_size": 1664, "intermediate_size": 8192, "num_hidden_layers": 48, "num_attention_heads": 32,
                      "image_size": 448, "patch_size": 32, "projection_dim": 1664, "num_channels": 3}
CONTROLNET_BOUNDS = {"model_channels": 448, "in_channels": 16, "context_dim": 4096, "hint_channels": 16,
                     "image_size": 512}


def check_declared(kind: str, declared, from_shapes: dict, bounds: dict) -> None:
    """Refuse a declared config that is not an object, exceeds `bounds` or disagrees with the shapes."""
    if not isinstance(declared, dict):
        raise ValueError(f"its {kind} config metadata is not an object")
    for key, hi in bounds.items():
        v = declared.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= hi:
            raise ValueError(f"its metadata declares {kind} {key} = {v!r} (allowed 1..{hi})")
    for key, v in from_shapes.items():
        if key in declared and declared[key] != v:
            raise ValueError(f"its metadata declares {kind} {key} = {declared[key]!r} but its tensors have {v}")


def _init(module, seed, std=0.02):
    from ..builtin_models.tiny import init_weights
    return init_weights(module, seed, std)


def _read(path: str) -> tuple[dict, dict]:
    import comfy.utils
    if path.lower().endswith((".safetensors", ".sft")):
        sd, meta = comfy.utils.load_torch_file(path, safe_load=True, return_metadata=True)
        return sd, dict(meta or {})
    return comfy.utils.load_torch_file(path, safe_load=True), {}


def _metadata(path: str) -> dict:
    """The safetensors header metadata only (no tensor is read); {} for other formats."""
    if not path.lower().endswith((".safetensors", ".sft")):
        return {}
    import safetensors
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # not a readable safetensors file: let ComfyUI's loader report it
        return {}


# ---------------------------------------------------------------------------------------------
# CLIP vision
# ---------------------------------------------------------------------------------------------

def clip_vision_config_from_shapes(sd: dict) -> dict | None:
    """A ClipVisionModel config for a transformers-format CLIP vision state dict, from its shapes."""
    pre = "vision_model."
    if f"{pre}encoder.layers.0.layer_norm1.weight" not in sd:
        return None
    layers = 0
    while f"{pre}encoder.layers.{layers}.layer_norm1.weight" in sd:
        layers += 1
    hidden = int(sd[f"{pre}encoder.layers.0.layer_norm1.weight"].shape[0])
    patch = int(sd[f"{pre}embeddings.patch_embedding.weight"].shape[-1])
    positions = int(sd[f"{pre}embeddings.position_embedding.weight"].shape[0])
    side = int(round((positions - 1) ** 0.5))
    cfg = dict(TINY_CLIP_VISION, hidden_size=hidden, num_hidden_layers=layers, patch_size=patch, image_size=side * patch,
               intermediate_size=int(sd[f"{pre}encoder.layers.0.mlp.fc1.weight"].shape[0]),
               num_attention_heads=max(hidden // 64, 1))
    if "visual_projection.weight" in sd:
        cfg["projection_dim"] = int(sd["visual_projection.weight"].shape[0])
    else:
        cfg.pop("projection_dim")
    return cfg


def clip_vision_from_state_dict(sd: dict, config: dict):
    """ComfyUI's ClipVisionModel built from an explicit config (its constructor reads a JSON file)."""
    import comfy.clip_vision
    fd, path = tempfile.mkstemp(suffix=".json", prefix="editkit-clip-vision-")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(config, f)
        cv = comfy.clip_vision.ClipVisionModel(path)
    finally:
        os.unlink(path)
    missing, unexpected = cv.load_sd(sd)
    if missing:
        raise ValueError(f"CLIP vision weights missing for {len(missing)} tensors, e.g. {sorted(missing)[:4]}")
    return cv


def load_clip_vision(path: str):
    """EditKit's small CLIP vision files (config in metadata or from shapes); other files via ComfyUI."""
    import comfy.clip_vision
    meta = _metadata(path)
    if CLIP_VISION_KEY in meta:
        sd, _ = _read(path)
        declared = json.loads(meta[CLIP_VISION_KEY])
        shapes = clip_vision_config_from_shapes(sd) or {}
        shapes = {k: shapes[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "patch_size",
                                         "image_size", "projection_dim") if k in shapes}
        check_declared("CLIP vision", declared, shapes, CLIP_VISION_BOUNDS)
        return clip_vision_from_state_dict(sd, declared)
    core = comfy.clip_vision.load(path)
    if core is not None:
        return core
    sd, _ = _read(path)
    cfg = clip_vision_config_from_shapes(sd)
    if cfg is None:
        return None
    return clip_vision_from_state_dict(sd, cfg)


def make_clip_vision(config: dict = TINY_CLIP_VISION, seed: int = 11) -> tuple[dict, dict]:
    """(state dict, metadata) of a random-weight CLIP vision model in transformers key format."""
    import comfy.clip_model
    import comfy.ops
    model = comfy.clip_model.CLIPVisionModelProjection(config, torch.float32, "cpu", comfy.ops.disable_weight_init)
    _init(model, seed)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    return sd, {CLIP_VISION_KEY: json.dumps(config)}


# ---------------------------------------------------------------------------------------------
# ControlNet
# ---------------------------------------------------------------------------------------------

def controlnet_config(unet_config: dict, hint_channels: int = 3) -> dict:
    """comfy.cldm.cldm.ControlNet kwargs mirroring a UNet config (its residuals fit that UNet)."""
    cfg = {k: v for k, v in unet_config.items() if k not in ("out_channels", "transformer_depth_output", "dtype", "device",
                                                              "operations")}
    cfg.setdefault("num_heads", -1)
    cfg.setdefault("num_head_channels", -1)
    cfg["hint_channels"] = hint_channels
    return cfg


def controlnet_from_state_dict(sd: dict, config: dict):
    """ComfyUI's ControlNet (CONTROL_NET) around a cldm.ControlNet built from an explicit config."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.model_management as mm
    import comfy.ops
    weights = [v for v in sd.values() if torch.is_tensor(v) and v.is_floating_point()]
    dtype = weights[0].dtype if weights else torch.float32
    load_device = mm.get_torch_device()
    manual_cast = mm.unet_manual_cast(dtype, load_device)
    ops = comfy.ops.manual_cast if manual_cast is not None else comfy.ops.disable_weight_init
    model = comfy.cldm.cldm.ControlNet(**config, operations=ops, dtype=dtype, device=mm.unet_offload_device())
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing:
        raise ValueError(f"ControlNet weights missing for {len(missing)} tensors, e.g. {sorted(missing)[:4]}")
    return comfy.controlnet.ControlNet(model, load_device=load_device, manual_cast_dtype=manual_cast)


def load_controlnet(path: str, model=None):
    """EditKit's generated ControlNets (config in metadata); any other file via ComfyUI's loader."""
    import comfy.controlnet
    meta = _metadata(path)
    if CONTROLNET_KEY in meta:
        sd, _ = _read(path)
        declared = json.loads(meta[CONTROLNET_KEY])
        shapes = {}
        w = sd.get("input_blocks.0.0.weight")
        if torch.is_tensor(w) and w.ndim == 4:
            shapes = {"model_channels": int(w.shape[0]), "in_channels": int(w.shape[1])}
        h = sd.get("input_hint_block.0.weight")
        if torch.is_tensor(h) and h.ndim == 4:
            shapes["hint_channels"] = int(h.shape[1])
        check_declared("ControlNet", declared, shapes, CONTROLNET_BOUNDS)
        return controlnet_from_state_dict(sd, declared)
    return comfy.controlnet.load_controlnet(path, model=model) if model is not None else comfy.controlnet.load_controlnet(path)


def build_controlnet(unet_config: dict, seed: int = 13, dtype=torch.float32, std: float = 0.02, ops=None):
    """A random-weight cldm.ControlNet for a UNet config (zero convs random too, so residuals are non-zero)."""
    import comfy.cldm.cldm
    import comfy.ops
    cfg = controlnet_config(unet_config)
    model = comfy.cldm.cldm.ControlNet(**cfg, operations=ops or comfy.ops.disable_weight_init, dtype=dtype, device="cpu")
    _init(model, seed, std)
    return model, cfg


def make_controlnet(unet_config: dict, seed: int = 13) -> tuple[dict, dict]:
    model, cfg = build_controlnet(unet_config, seed)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    return sd, {CONTROLNET_KEY: json.dumps(cfg)}


def controlnet_object(unet_config: dict, seed: int = 13, dtype=torch.float32, std: float = 0.02, compute_dtype=None):
    """ComfyUI's ControlNet (CONTROL_NET) with random weights stored in `dtype`, built in memory (tests).

    compute_dtype=None computes as ComfyUI would (its manual cast: fp32 for bf16 weights on CPU);
    otherwise in that dtype (same as `dtype`: natively; else cast per layer), like the full-size test
    UNets, whose dtype `builtin_models.fullsize.compute_dtype_of(model)` tells."""
    import comfy.controlnet
    import comfy.model_management as mm
    import comfy.ops
    load_device = mm.get_torch_device()
    if compute_dtype is None:
        manual_cast = mm.unet_manual_cast(dtype, load_device)
    else:
        manual_cast = None if compute_dtype == dtype else compute_dtype
    ops = comfy.ops.manual_cast if manual_cast is not None else comfy.ops.disable_weight_init
    model, _ = build_controlnet(unet_config, seed, dtype, std, ops)
    return comfy.controlnet.ControlNet(model, load_device=load_device, manual_cast_dtype=manual_cast)


# ---------------------------------------------------------------------------------------------
# IP-Adapter
# ---------------------------------------------------------------------------------------------

def unet_cross_sites(unet_config: dict):
    """Cross-attention sites of a UNet config in IP-Adapter file order, without allocating weights."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    from .ipadapter import cross_sites
    cfg = {k: v for k, v in unet_config.items() if k not in ("dtype", "device", "operations")}
    unet = UNetModel(**cfg, device="meta", dtype=torch.float32, operations=comfy.ops.disable_weight_init)
    return cross_sites(types.SimpleNamespace(diffusion_model=unet))


def make_ipadapter(unet_config: dict, kind: str = "base", clip_dim: int = 64, tokens: int = 4, seed: int = 17,
                   dim_head: int = 16, std: float = 0.02, dtype=torch.float32) -> tuple[dict, dict]:
    """(state dict with the real file's key names, metadata) of a random IP-Adapter for a UNet config.

    kind "base": linear projection of `clip_dim` image embeds to `tokens` tokens; "plus": a resampler
    (depth 2, 16-dim heads) over `clip_dim` hidden states with `tokens` queries.
    """
    from .ipadapter import IPAdapterModel, Variant
    sites = unet_cross_sites(unet_config)
    ctx = int(unet_config["context_dim"])
    dims = tuple(s.heads * s.dim_head for s in sites)
    keys = tuple(2 * i + 1 for i in range(len(sites)))
    if kind == "base":
        v = Variant("base", "demo", ctx, clip_dim, "image_embeds", tokens, len(sites), "demo", (), dims, keys)
    elif kind == "plus":
        v = Variant("plus", "demo", ctx, clip_dim, "penultimate_hidden_states", tokens, len(sites), "demo",
                    (ctx, 2, max(ctx // dim_head, 1), dim_head, 2), dims, keys)
    else:
        raise ValueError(kind)
    module = _init(IPAdapterModel(v, dtype=dtype), seed, std)
    sd = {}
    for k, t in module.state_dict().items():
        if k.startswith("image_proj."):
            sd[k] = t.contiguous()
        else:                                   # ip_layers.<n>.to_k_ip.weight -> ip_adapter.<n>.to_k_ip.weight
            sd["ip_adapter." + k[len("ip_layers."):]] = t.contiguous()
    from .ipadapter import METADATA_KEY
    return sd, {METADATA_KEY: json.dumps({"dim_head": dim_head})}
