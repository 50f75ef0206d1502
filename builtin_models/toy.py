"""The toy text-to-image model: trained on the toy world (EditKit's `toyworld`), shipped in models/toy/.

Every part is a ComfyUI-native architecture, so core nodes and every EditKit patch treat it as
they treat an SD1.5 checkpoint:
  * UNet: ComfyUI's `UNetModel` (SD-style, EPS, the SD1 discrete noise schedule) with self- and
    cross-attention at the 16x16 and 8x8 levels and in the middle block;
  * text encoder: ComfyUI's SD1 CLIP text model (small) with the bundled SD1 tokenizer, so prompts
    are tokenised exactly as for SD1.5;
  * VAE: a small AutoencoderKL (8x downscale, 4 latent channels) loaded by `comfy.sd.VAE` with an
    explicit config; 128x128 images <-> 16x16 latents.

The single weights file carries its configs and the latent statistics (scale and per-channel shift)
in its safetensors metadata; `ToyLatentFormat` declares them, so latents seen by the UNet have
roughly zero mean and unit variance. The functions with `seed` build untrained models (for
training); `load_toy()` loads the shipped weights.

`toy_weak.safetensors` is a UNet-only file: a smaller, briefly trained UNet of the same family for
AutoGuidance (Karras et al. 2024). Its metadata names its companion (`toy.safetensors`), whose CLIP
text encoder it was trained on (frozen) and whose VAE and latent format it shares; `load_toy()` on
it returns the weak UNet with the companion's CLIP and VAE.
"""
from __future__ import annotations

import json
import logging
import os

import torch

from .tiny import _patcher, init_weights

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PATH = os.path.join(PACK_DIR, "models", "toy", "toy.safetensors")
WEAK_PATH = os.path.join(PACK_DIR, "models", "toy", "toy_weak.safetensors")
FORMAT_VERSION = 1
METADATA_KEY = "editkit_toy"

CONTEXT_DIM = 64
UNET_CONFIG = dict(image_size=16, in_channels=4, out_channels=4, model_channels=64, num_res_blocks=[1, 1, 1],
                   channel_mult=[1, 2, 2], transformer_depth=[1, 1, 0], transformer_depth_output=[1, 1, 1, 1, 0, 0],
                   transformer_depth_middle=1, context_dim=CONTEXT_DIM, num_heads=4, num_head_channels=-1,
                   use_linear_in_transformer=True, use_spatial_transformer=True, legacy=False, adm_in_channels=None,
                   use_checkpoint=False, use_temporal_attention=False, use_temporal_resblock=False)
CLIP_CONFIG = {"hidden_size": CONTEXT_DIM, "intermediate_size": 256, "num_attention_heads": 4, "num_hidden_layers": 4,
               "projection_dim": CONTEXT_DIM}
VAE_CONFIG = {"embed_dim": 4, "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 128, "in_channels": 3,
                                           "out_ch": 3, "ch": 32, "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1,
                                           "attn_resolutions": [], "dropout": 0.0}}


def _latent_format_class(scale: float, shift, rgb_factors=None, rgb_bias=None):
    import comfy.latent_formats

    class ToyLatentFormat(comfy.latent_formats.LatentFormat):
        """VAE latent -> UNet space: (z - shift) * scale, per channel (like SD3's format, with a per-channel shift)."""
        scale_factor = float(scale)
        shift_factor = [float(s) for s in shift]
        latent_channels = 4
        latent_rgb_factors = rgb_factors
        latent_rgb_factors_bias = rgb_bias

        def _shift(self, latent):
            return torch.tensor(self.shift_factor, dtype=latent.dtype, device=latent.device).view(1, -1, 1, 1)

        def process_in(self, latent):
            return (latent - self._shift(latent)) * self.scale_factor

        def process_out(self, latent):
            return latent / self.scale_factor + self._shift(latent)

    return ToyLatentFormat


def _config_class(latent_format):
    import comfy.model_base
    import comfy.supported_models_base as smb

    class ToySD(smb.BASE):
        unet_config = {"context_dim": CONTEXT_DIM, "model_channels": 64}   # only used by matches(): never auto-detected
        unet_extra_config = {"num_heads": 4, "num_head_channels": -1}
        memory_usage_factor = 1.0
        supported_inference_dtypes = [torch.float32, torch.bfloat16, torch.float16]

        def model_type(self, state_dict, prefix=""):
            return comfy.model_base.ModelType.EPS

    ToySD.latent_format = latent_format
    return ToySD


def build_unet(latent_stats: dict | None = None, seed: int = 0, dtype=torch.float32, config: dict | None = None):
    """The toy UNet as a ModelPatcher with seeded placeholder weights (tiny.init_weights; scripts/train_toy.py
    re-initialises them for training)."""
    stats = latent_stats or {"scale": 1.0, "shift": [0.0] * 4}
    fmt = _latent_format_class(stats["scale"], stats["shift"], stats.get("rgb_factors"), stats.get("rgb_bias"))
    cfg = _config_class(fmt)(dict(config or UNET_CONFIG))
    cfg.set_inference_dtype(dtype, None)
    base = cfg.get_model({})
    init_weights(base.diffusion_model, seed)
    return _patcher(base)


def build_clip(seed: int = 2, dtype=None, config: dict | None = None):
    """The toy CLIP text encoder (SD1 architecture and tokenizer, small), seeded initial weights."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base as smb
    target = smb.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    opts = {"clip_l_model_config": dict(config or CLIP_CONFIG)}
    if dtype is not None:
        opts["dtype"] = dtype
    clip = comfy.sd.CLIP(target, model_options=opts)
    init_weights(clip.cond_stage_model, seed)
    return clip


def build_vae(sd: dict | None = None, seed: int = 1, config: dict | None = None, dtype=None):
    """The toy AutoencoderKL through comfy.sd.VAE with an explicit config; seeded weights when sd is None."""
    import comfy.sd
    root = logging.getLogger()
    level = root.level
    if not sd:
        root.setLevel(logging.ERROR)  # an empty state dict makes ComfyUI list every key as missing
    try:
        vae = comfy.sd.VAE(sd=dict(sd or {}), config={"params": json.loads(json.dumps(config or VAE_CONFIG))}, dtype=dtype)
    finally:
        root.setLevel(level)
    if not sd:
        init_weights(vae.first_stage_model, seed)
    return vae


# ---------------------------------------------------------------------------------------------
# The weights file: one safetensors with three prefixes and the configs in its metadata.

UNET_PREFIX, CLIP_PREFIX, VAE_PREFIX = "unet.", "text_encoder.", "vae."


def save_toy(path: str, unet_sd: dict, clip_sd: dict, vae_sd: dict, meta: dict, dtype=torch.float16) -> int:
    """Write the three state dicts (stored as `dtype`) and `meta` (JSON) to one safetensors file; returns its size."""
    from safetensors.torch import save_file
    tensors = {}
    for prefix, sd in ((UNET_PREFIX, unet_sd), (CLIP_PREFIX, clip_sd), (VAE_PREFIX, vae_sd)):
        for k, v in sd.items():
            v = v.detach().cpu()
            tensors[prefix + k] = (v.to(dtype) if v.is_floating_point() else v).contiguous()
    meta = dict(meta, format_version=FORMAT_VERSION, unet_config=meta.get("unet_config", UNET_CONFIG),
                clip_config=meta.get("clip_config", CLIP_CONFIG), vae_config=meta.get("vae_config", VAE_CONFIG))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata={METADATA_KEY: json.dumps(meta)})
    os.replace(tmp, path)
    os.chmod(path, 0o644)
    return os.path.getsize(path)


def save_toy_unet(path: str, unet_sd: dict, meta: dict, dtype=torch.float16) -> int:
    """Write a UNet-only toy file (e.g. the weak model): the UNet state dict under `unet.` and `meta`, which
    must name the `companion` file that supplies the CLIP text encoder and VAE. Returns the file's size."""
    from safetensors.torch import save_file
    if not meta.get("companion"):
        raise ValueError("a UNet-only toy file needs meta['companion'] (the file with its CLIP and VAE)")
    tensors = {UNET_PREFIX + k: (v.detach().cpu().to(dtype) if v.is_floating_point() else v.detach().cpu()).contiguous()
               for k, v in unet_sd.items()}
    meta = dict(meta, format_version=FORMAT_VERSION, parts=["unet"], unet_config=meta.get("unet_config", UNET_CONFIG))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata={METADATA_KEY: json.dumps(meta)})
    os.replace(tmp, path)
    os.chmod(path, 0o644)
    return os.path.getsize(path)


def read_metadata(path: str = DEFAULT_PATH) -> dict:
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        md = f.metadata() or {}
    if METADATA_KEY not in md:
        raise ValueError(f"{path} is not an EditKit toy model (no '{METADATA_KEY}' metadata)")
    return json.loads(md[METADATA_KEY])


def available(path: str = DEFAULT_PATH) -> bool:
    return os.path.isfile(path)


def _split(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def companion_name(meta: dict) -> str | None:
    """For a UNet-only file (the weak model): the file name of the toy model supplying its CLIP and VAE."""
    return meta.get("companion")


def _check_companion(path: str, meta: dict, companion_path: str, companion_meta: dict) -> None:
    """The weak UNet must live in the companion's latent space (same latent format)."""
    want, have = meta.get("latent", {}), companion_meta.get("latent", {})
    same = (want.get("scale") is not None and have.get("scale") is not None
            and abs(float(want["scale"]) - float(have["scale"])) <= 1e-6 * abs(float(have["scale"]))
            and len(want.get("shift", [])) == len(have.get("shift", []))
            and all(abs(float(x) - float(y)) <= 1e-6 for x, y in zip(want["shift"], have["shift"])))
    if not same:
        raise ValueError(f"{os.path.basename(path)} was trained in a different latent space than "
                         f"{os.path.basename(companion_path)} (latent scale/shift differ): retrain it with "
                         "`scripts/train_toy.py --phase weak` after the toy model")


# Bounds on what a toy file may declare (the shipped model: 64 channels, 4-layer 64-d CLIP, 32-channel VAE).
# Checked with the file's header shapes BEFORE any constructor allocates (a file declaring 512 channels
# once allocated 1.4 GB before a raw size-mismatch error).
CONFIG_BOUNDS = {
    "unet_config": {"model_channels": 256, "in_channels": 16, "out_channels": 16, "context_dim": 1024,
                    "image_size": 64, "num_heads": 16},
    "clip_config": {"hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 16,
                    "num_hidden_layers": 12, "projection_dim": 512},
}
VAE_BOUNDS = {"ch": 128, "z_channels": 16, "in_channels": 4, "out_ch": 4, "resolution": 512}


def _bounded(where: str, cfg, bounds: dict) -> None:
    if not isinstance(cfg, dict):
        raise ValueError(f"its metadata has no {where} object")
    for key, hi in bounds.items():
        v = cfg.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or not (0 < v <= hi):
            raise ValueError(f"its metadata declares {where}.{key} = {v!r} (a toy model allows 1..{hi})")
    for key in ("num_res_blocks", "channel_mult", "transformer_depth", "transformer_depth_output", "ch_mult"):
        v = cfg.get(key)
        if isinstance(v, list) and (len(v) > 8 or any(not isinstance(x, int) or isinstance(x, bool) or not 0 <= x <= 8 for x in v)):
            raise ValueError(f"its metadata declares {where}.{key} = {v!r} (at most 8 entries of 0..8)")


def check_declared(path: str, meta: dict, with_unet: bool = True, with_rest: bool = True) -> None:
    """Refuse a toy file whose declared configs exceed CONFIG_BOUNDS or disagree with its tensors' shapes
    (read from the safetensors header only; nothing is allocated). Raises ValueError saying which."""
    from safetensors import safe_open
    name = os.path.basename(path)
    try:
        if with_unet:
            _bounded("unet_config", meta.get("unet_config"), CONFIG_BOUNDS["unet_config"])
        if with_rest:
            _bounded("clip_config", meta.get("clip_config"), CONFIG_BOUNDS["clip_config"])
            vae = meta.get("vae_config")
            _bounded("vae_config", vae, {"embed_dim": 16})
            _bounded("vae_config.ddconfig", (vae or {}).get("ddconfig"), VAE_BOUNDS)
    except ValueError as e:
        raise ValueError(f"{name} is not a valid toy model file: {e}") from None
    expect = {}
    if with_unet:
        u = meta["unet_config"]
        expect[UNET_PREFIX + "input_blocks.0.0.weight"] = [u.get("model_channels"), u.get("in_channels"), 3, 3]
        expect[UNET_PREFIX + "out.2.weight"] = [u.get("out_channels"), u.get("model_channels"), 3, 3]
    if with_rest:
        c, d = meta["clip_config"], meta["vae_config"]["ddconfig"]
        expect[CLIP_PREFIX + "text_model.embeddings.position_embedding.weight"] = [77, c.get("hidden_size")]
        expect[CLIP_PREFIX + "text_model.encoder.layers.0.mlp.fc1.weight"] = [c.get("intermediate_size"), c.get("hidden_size")]
        expect[VAE_PREFIX + "encoder.conv_in.weight"] = [d.get("ch"), d.get("in_channels"), 3, 3]
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
        for key, shape in expect.items():
            if key not in keys:
                raise ValueError(f"{name} is not a valid toy model file: tensor {key!r} is missing")
            got = list(f.get_slice(key).get_shape())
            if got != shape:
                raise ValueError(f"{name} is not a valid toy model file: its metadata implies {key} of shape {shape}, "
                                 f"the file holds {got}")


def load_unet(path: str, meta: dict | None = None, sd: dict | None = None, dtype=torch.float32):
    """The MODEL stored under `unet.` in a toy file (full or UNet-only), with its config and latent format."""
    import comfy.utils
    meta = meta if meta is not None else read_metadata(path)
    check_declared(path, meta, with_unet=True, with_rest=False)
    sd = sd if sd is not None else comfy.utils.load_torch_file(path)
    model = build_unet(meta["latent"], dtype=dtype, config=meta["unet_config"])
    unet_sd = {k: v.to(dtype) for k, v in _split(sd, UNET_PREFIX).items()}
    missing, unexpected = model.model.diffusion_model.load_state_dict(unet_sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"toy UNet weights in {os.path.basename(path)} do not match its config: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    return model


def load_toy(path: str = DEFAULT_PATH, dtype=torch.float32, companion_path: str | None = None):
    """(MODEL, CLIP, VAE) from the shipped weights, as ComfyUI's checkpoint loader returns them.

    For a UNet-only file (toy_weak.safetensors) the MODEL is its UNet and CLIP/VAE come from the companion
    file its metadata names, looked up next to it unless `companion_path` is given."""
    if not available(path):
        raise FileNotFoundError(f"no toy model at {path}: run `make toy-model` (or check out models/toy/ from git)")
    meta = read_metadata(path)
    comp = companion_name(meta)
    if comp:
        companion_path = companion_path or os.path.join(os.path.dirname(os.path.abspath(path)), comp)
        if not available(companion_path):
            raise FileNotFoundError(f"{os.path.basename(path)} holds only a UNet; its CLIP and VAE come from {comp}, "
                                    f"which is not at {companion_path}")
        comp_meta = read_metadata(companion_path)
        if companion_name(comp_meta):
            raise ValueError(f"the companion {comp} of {os.path.basename(path)} is itself UNet-only")
        _check_companion(path, meta, companion_path, comp_meta)
        if meta.get("companion_sha256") and meta["companion_sha256"] != file_sha256(companion_path):
            logging.warning("EditKit: %s was trained with a different %s than the one at %s (checksum differs); its "
                            "CLIP and VAE are used anyway, but AutoGuidance assumes the weak model read the same text "
                            "embeddings: retrain it with `scripts/train_toy.py --phase weak`", os.path.basename(path),
                            comp, companion_path)
        model = load_unet(path, meta, dtype=dtype)
        _, clip, vae = _load_full(companion_path, comp_meta, dtype, with_unet=False)
        return model, clip, vae
    return _load_full(path, meta, dtype)


def load_toy_weak(path: str = WEAK_PATH, dtype=torch.float32, companion_path: str | None = None):
    """(weak MODEL, CLIP, VAE): the weak UNet of toy_weak.safetensors with its companion's (toy.safetensors)
    text encoder and VAE."""
    if available(path) and not companion_name(read_metadata(path)):
        raise ValueError(f"{path} is a full toy model, not a UNet-only weak model")
    return load_toy(path, dtype, companion_path)


def file_sha256(path: str) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _load_full(path: str, meta: dict, dtype, with_unet: bool = True):
    import comfy.utils
    check_declared(path, meta, with_unet=with_unet, with_rest=True)
    sd = comfy.utils.load_torch_file(path)
    model = load_unet(path, meta, sd, dtype) if with_unet else None
    clip = build_clip(config=meta["clip_config"])
    missing, unexpected = clip.load_sd(_split(sd, CLIP_PREFIX))
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing:
        raise ValueError(f"toy text-encoder weights incomplete: missing {missing[:3]}")
    vae_sd = {k: v.float() for k, v in _split(sd, VAE_PREFIX).items()}
    vae = build_vae(vae_sd, config=meta["vae_config"])
    return model, clip, vae


_CACHE: dict = {}


def load_toy_cached(path: str = DEFAULT_PATH, dtype=torch.float32):
    """load_toy() once per (path, mtime, dtype); callers must clone() before patching, as with any MODEL."""
    key = (os.path.abspath(path), os.path.getmtime(path) if available(path) else None, str(dtype))
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = load_toy(path, dtype)
    return _CACHE[key]


# The sizes the toy UNet serves: trained at 128x128 px (16x16 latents); three levels need sides that are
# multiples of 4 latents. A sampler given anything else fails at once (an 8192x8192 latent once took
# 11 GB with the sampler stuck at step 0).
LATENT_SIDES = (4, 64)


def check_latent_size(shape, node: str = "EditKitToyModelLoader") -> None:
    from ..core.errors import EditKitInputError
    h, w = int(shape[-2]), int(shape[-1])
    lo, hi = LATENT_SIDES
    if not (lo <= h <= hi and lo <= w <= hi) or h % 4 or w % 4:
        raise EditKitInputError(node, "weights", f"the toy model was given a {w * 8}x{h * 8} px latent ({w}x{h}); it serves "
                                f"{lo * 8}..{hi * 8} px sides in steps of 32 and was trained at 128x128",
                                "use an Empty Latent Image / Image Scale of 128x128")


def install_size_guard(model) -> None:
    """OUTER_SAMPLE wrapper on the toy MODEL: check the latent size before the sampler allocates anything."""
    import comfy.patcher_extension as pe

    def guard(executor, noise, latent_image, *args, **kwargs):
        check_latent_size(latent_image.shape)
        return executor(noise, latent_image, *args, **kwargs)
    model.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, "editkit.toy_size_guard", guard)


def encode(clip, text: str):
    """CONDITIONING for a prompt, as CLIPTextEncode builds it."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))
