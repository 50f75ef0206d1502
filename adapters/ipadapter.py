"""IP-Adapter (Ye et al. 2023): decoupled cross-attention for image prompts.

Z = Attn(Q, K_text, V_text) + lambda * Attn(Q, K_img, V_img) in every cross-attention layer, with
K_img / V_img projected from image-prompt tokens by the adapter's to_k_ip / to_v_ip, and the tokens
made by the adapter's image projection from a CLIP vision encoding:

  * base     (ip-adapter_sd15, _sdxl, _sdxl_vit-h, light): linear projection of the pooled image
              embedding to 4 tokens, then LayerNorm;
  * plus     (ip-adapter-plus_*, plus-face_*): a Perceiver resampler over the penultimate hidden
              states, 16 learned queries;
  * full     (ip-adapter-full-face_sd15): an MLP applied to every penultimate hidden state.

The variant is detected from the weight file's keys and shapes, never from its name. The patch is
an attn2 replace on every cross-attention layer that runs the previous occupant of the slot for the
text term (EditKit's attention control, other packs) and adds the image term; the adapter weights
live in their own ModelPatcher that ComfyUI loads with the model (additional models), and nothing
is mutated after install.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..core import denoiser
from ..core.errors import EditKitInputError
from ..core.introspect import AttnSite, attention_layout
from ..core.patches import SharedPatch, call_attention, chain_attn_replace

FOLDER = "ipadapter"
METADATA_KEY = "editkit_ipadapter"   # optional JSON in safetensors metadata (EditKit's generated files)
ADDITIONAL_MODELS_KEY = "editkit.ipadapter"
DEFAULT_DIM_HEAD = 64                # the official resamplers use 64-dim heads

WEIGHT_TYPES = ["linear", "ease in", "ease out", "ease in-out", "reverse in-out",
                "style only", "composition only", "style and composition"]
COMBINE = ["average", "concat"]


# ---------------------------------------------------------------------------------------------
# Variant detection
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    kind: str            # "base" | "plus" | "full"
    family: str          # "SD1.5", "SDXL", "SD2.x" or "custom (...)"
    cross_dim: int       # text-context width the ip layers read (UNet context_dim)
    clip_dim: int        # width of the CLIP vision output the projection reads
    clip_input: str      # "image_embeds" | "penultimate_hidden_states"
    tokens: int          # image-prompt tokens per image (0: one per encoder position)
    layers: int          # number of cross-attention layers the file has weights for
    encoder: str         # the CLIP vision model the file was trained with
    resampler: tuple = ()    # (dim, depth, heads, dim_head, ff_mult) for "plus"
    layer_dims: tuple = ()   # inner width of each ip layer, in the file's layer order
    layer_keys: tuple = ()   # the file's layer numbers (1, 3, 5, ...)

    @property
    def name(self) -> str:
        label = {"base": "base", "plus": "plus / plus-face", "full": "full-face"}[self.kind]
        return f"{self.family} {label} ({self.encoder})"

    def describe(self) -> str:
        toks = f"{self.tokens} tokens" if self.tokens else "one token per CLIP position"
        return f"{self.name}: {toks}, {self.layers} cross-attention layers, {self.cross_dim}-dim context"


def _encoder_name(dim: int, source: str) -> str:
    pooled = {768: "CLIP ViT-L/14", 1024: "CLIP ViT-H/14", 1280: "CLIP ViT-bigG/14"}
    hidden = {1024: "CLIP ViT-L/14", 1280: "CLIP ViT-H/14", 1664: "CLIP ViT-bigG/14"}
    table = pooled if source == "image_embeds" else hidden
    what = "image embeds" if source == "image_embeds" else "hidden states"
    return table.get(dim, f"a CLIP vision model with {dim}-dim {what}")


def _family(cross_dim: int, layers: int) -> str:
    known = {(768, 16): "SD1.5", (2048, 70): "SDXL", (1024, 16): "SD2.x"}
    return known.get((cross_dim, layers), f"custom ({cross_dim}-dim context, {layers} layers)")


def split_state_dict(sd: dict) -> tuple[dict, dict]:
    """(image_proj, ip_adapter) sub-dicts from a flat safetensors dict or the older nested .bin."""
    if isinstance(sd.get("image_proj"), dict) and isinstance(sd.get("ip_adapter"), dict):
        return sd["image_proj"], sd["ip_adapter"]
    proj = {k[len("image_proj."):]: v for k, v in sd.items() if k.startswith("image_proj.")}
    ip = {k[len("ip_adapter."):]: v for k, v in sd.items() if k.startswith("ip_adapter.")}
    return proj, ip


def _summary(sd: dict, limit: int = 12) -> str:
    keys = sorted(sd)
    shown = ", ".join(f"{k} {tuple(sd[k].shape)}" for k in keys[:limit] if hasattr(sd[k], "shape"))
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return shown + more if shown else "no tensors"


class UnknownAdapter(ValueError):
    pass


def detect(sd: dict, meta: Optional[dict] = None) -> Variant:
    """The IP-Adapter variant of a weight file, from its keys and shapes (raises UnknownAdapter)."""
    meta = meta or {}
    proj, ip = split_state_dict(sd)
    flat_keys = [k for k in sd if not isinstance(sd[k], dict)]
    if not proj or not ip:
        raise UnknownAdapter("no 'image_proj' and 'ip_adapter' weights (found: " + _summary(
            {k: sd[k] for k in flat_keys} if flat_keys else {}) + ")")
    if any("faceid" in k.lower() or k.startswith("perceiver_resampler") for k in proj) or \
            any(k.endswith("to_k_lora.down.weight") for k in ip):
        raise UnknownAdapter("this is an IP-Adapter FaceID file (InsightFace embeddings + LoRA); "
                             "EditKit supports base, plus, plus-face and full-face files")
    # ip layers: "<n>.to_k_ip.weight" / "<n>.to_v_ip.weight", n = 1, 3, 5, ... (cross-attention processors)
    nums = sorted({int(m.group(1)) for k in ip for m in [re.match(r"^(\d+)\.to_k_ip\.weight$", k)] if m})
    if not nums:
        raise UnknownAdapter("no to_k_ip weights in 'ip_adapter' (found: " + _summary(ip) + ")")
    dims, cross = [], None
    for n in nums:
        kw, vw = ip.get(f"{n}.to_k_ip.weight"), ip.get(f"{n}.to_v_ip.weight")
        if vw is None or kw.shape != vw.shape or kw.ndim != 2:
            raise UnknownAdapter(f"ip layer {n}: to_k_ip / to_v_ip missing or of different shapes")
        if cross is None:
            cross = int(kw.shape[1])
        elif int(kw.shape[1]) != cross:
            raise UnknownAdapter(f"ip layer {n} reads a {kw.shape[1]}-dim context, layer {nums[0]} a {cross}-dim one")
        dims.append(int(kw.shape[0]))
    layers = len(nums)
    if "latents" in proj:
        lat = proj["latents"]
        dim, tokens = int(lat.shape[-1]), int(lat.shape[-2])
        depth = len({k.split(".")[1] for k in proj if re.match(r"^layers\.\d+\.0\.to_q\.weight$", k)})
        for k in ("proj_in.weight", "proj_out.weight", "norm_out.weight"):
            if k not in proj:
                raise UnknownAdapter(f"resampler without '{k}' (found: {_summary(proj)})")
        clip_dim = int(proj["proj_in.weight"].shape[1])
        out_dim = int(proj["proj_out.weight"].shape[0])
        inner = int(proj["layers.0.0.to_q.weight"].shape[0])
        ff_mult = int(proj["layers.0.1.1.weight"].shape[0]) // dim
        dim_head = int(meta.get("dim_head", DEFAULT_DIM_HEAD))
        if inner % dim_head:
            raise UnknownAdapter(f"resampler width {inner} is not a multiple of the head size {dim_head}")
        if out_dim != cross:
            raise UnknownAdapter(f"resampler outputs {out_dim}-dim tokens but the ip layers read {cross}-dim ones")
        source = "penultimate_hidden_states"
        return Variant("plus", _family(cross, layers), cross, clip_dim, source, tokens, layers,
                       _encoder_name(clip_dim, source), (dim, depth, inner // dim_head, dim_head, ff_mult),
                       tuple(dims), tuple(nums))
    if "proj.0.weight" in proj and "proj.2.weight" in proj and "proj.3.weight" in proj:
        clip_dim = int(proj["proj.0.weight"].shape[1])
        if int(proj["proj.2.weight"].shape[0]) != cross:
            raise UnknownAdapter("MLP projection width differs from the ip layers' context width")
        source = "penultimate_hidden_states"
        return Variant("full", _family(cross, layers), cross, clip_dim, source, 0, layers,
                       _encoder_name(clip_dim, source), (), tuple(dims), tuple(nums))
    if "proj.weight" in proj and "norm.weight" in proj:
        out, clip_dim = (int(s) for s in proj["proj.weight"].shape)
        norm = int(proj["norm.weight"].shape[0])
        if norm != cross or out % cross:
            raise UnknownAdapter(f"linear projection to {out} values does not split into {cross}-dim tokens")
        source = "image_embeds"
        return Variant("base", _family(cross, layers), cross, clip_dim, source, out // cross, layers,
                       _encoder_name(clip_dim, source), (), tuple(dims), tuple(nums))
    raise UnknownAdapter("unknown image projection (found: " + _summary(proj) + ")")


# ---------------------------------------------------------------------------------------------
# Modules (built with ComfyUI's manual_cast ops: weights are cast to the input's device and dtype)
# ---------------------------------------------------------------------------------------------

def _ops():
    import comfy.ops
    return comfy.ops.manual_cast


class LinearProjection(torch.nn.Module):
    def __init__(self, clip_dim, cross_dim, tokens, ops, dtype=None, device=None):
        super().__init__()
        self.tokens, self.cross_dim = tokens, cross_dim
        self.proj = ops.Linear(clip_dim, tokens * cross_dim, dtype=dtype, device=device)
        self.norm = ops.LayerNorm(cross_dim, dtype=dtype, device=device)

    def forward(self, x):                       # (B, clip_dim) -> (B, tokens, cross_dim)
        return self.norm(self.proj(x).reshape(-1, self.tokens, self.cross_dim))


class MLPProjection(torch.nn.Module):
    def __init__(self, clip_dim, cross_dim, ops, dtype=None, device=None):
        super().__init__()
        self.proj = torch.nn.Sequential(ops.Linear(clip_dim, clip_dim, dtype=dtype, device=device), torch.nn.GELU(),
                                        ops.Linear(clip_dim, cross_dim, dtype=dtype, device=device),
                                        ops.LayerNorm(cross_dim, dtype=dtype, device=device))

    def forward(self, x):                       # (B, L, clip_dim) -> (B, L, cross_dim)
        return self.proj(x)


class PerceiverAttention(torch.nn.Module):
    """Latent queries attend to [image features, latents] (Flamingo-style), no biases."""

    def __init__(self, dim, heads, dim_head, ops, dtype=None, device=None):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm1 = ops.LayerNorm(dim, dtype=dtype, device=device)
        self.norm2 = ops.LayerNorm(dim, dtype=dtype, device=device)
        self.to_q = ops.Linear(dim, inner, bias=False, dtype=dtype, device=device)
        self.to_kv = ops.Linear(dim, inner * 2, bias=False, dtype=dtype, device=device)
        self.to_out = ops.Linear(inner, dim, bias=False, dtype=dtype, device=device)

    def forward(self, x, latents):
        x, latents = self.norm1(x), self.norm2(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        b = q.shape[0]

        def heads(t):
            return t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2).float()
        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v)).to(q.dtype)
        return self.to_out(out.transpose(1, 2).reshape(b, q.shape[1], -1))


class Resampler(torch.nn.Module):
    def __init__(self, dim, depth, heads, dim_head, tokens, clip_dim, out_dim, ff_mult, ops, dtype=None, device=None):
        super().__init__()
        self.latents = torch.nn.Parameter(torch.zeros(1, tokens, dim, dtype=dtype, device=device))
        self.proj_in = ops.Linear(clip_dim, dim, dtype=dtype, device=device)
        self.proj_out = ops.Linear(dim, out_dim, dtype=dtype, device=device)
        self.norm_out = ops.LayerNorm(out_dim, dtype=dtype, device=device)
        self.layers = torch.nn.ModuleList()
        for _ in range(depth):
            ff = torch.nn.Sequential(ops.LayerNorm(dim, dtype=dtype, device=device),
                                     ops.Linear(dim, dim * ff_mult, bias=False, dtype=dtype, device=device),
                                     torch.nn.GELU(),
                                     ops.Linear(dim * ff_mult, dim, bias=False, dtype=dtype, device=device))
            self.layers.append(torch.nn.ModuleList([PerceiverAttention(dim, heads, dim_head, ops, dtype, device), ff]))

    def forward(self, x):                       # (B, L, clip_dim) -> (B, tokens, out_dim)
        import comfy.ops
        latents = comfy.ops.cast_to_input(self.latents, x).repeat(x.shape[0], 1, 1)
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class IPLayer(torch.nn.Module):
    def __init__(self, cross_dim, inner, ops, dtype=None, device=None):
        super().__init__()
        self.to_k_ip = ops.Linear(cross_dim, inner, bias=False, dtype=dtype, device=device)
        self.to_v_ip = ops.Linear(cross_dim, inner, bias=False, dtype=dtype, device=device)


class IPAdapterModel(torch.nn.Module):
    def __init__(self, variant: Variant, dtype=None, device=None):
        super().__init__()
        ops, v = _ops(), variant
        if v.kind == "base":
            self.image_proj = LinearProjection(v.clip_dim, v.cross_dim, v.tokens, ops, dtype, device)
        elif v.kind == "full":
            self.image_proj = MLPProjection(v.clip_dim, v.cross_dim, ops, dtype, device)
        else:
            dim, depth, heads, dim_head, ff_mult = v.resampler
            self.image_proj = Resampler(dim, depth, heads, dim_head, v.tokens, v.clip_dim, v.cross_dim, ff_mult,
                                        ops, dtype, device)
        self.ip_layers = torch.nn.ModuleDict({str(n): IPLayer(v.cross_dim, d, ops, dtype, device)
                                              for n, d in zip(v.layer_keys, v.layer_dims)})


class IPAdapter:
    """A loaded IP-Adapter: its variant, module and the ModelPatcher ComfyUI loads it with."""

    def __init__(self, variant: Variant, module: IPAdapterModel, name: str = ""):
        import comfy.model_management as mm
        import comfy.model_patcher
        self.variant, self.module, self.name = variant, module, name
        self.patcher = comfy.model_patcher.ModelPatcher(module, load_device=mm.get_torch_device(),
                                                        offload_device=mm.unet_offload_device())

    def __repr__(self):
        return f"IPAdapter({self.name!r}, {self.variant.describe()})"


def from_state_dict(sd: dict, meta: Optional[dict] = None, name: str = "") -> IPAdapter:
    variant = detect(sd, meta)
    proj, ip = split_state_dict(sd)
    # Built on the meta device and filled by assignment: the file's tensors become the weights (no second copy).
    module = IPAdapterModel(variant, device="meta")
    state = {f"image_proj.{k}": v for k, v in proj.items()}
    state.update({f"ip_layers.{k.split('.', 1)[0]}.{k.split('.', 1)[1]}": v for k, v in ip.items()})
    missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise UnknownAdapter(f"looks like {variant.name} but the weights do not fit: missing "
                             f"{sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}")
    module.eval()
    return IPAdapter(variant, module, name)


def read_file(path: str) -> tuple[dict, dict]:
    import comfy.utils
    if path.lower().endswith((".safetensors", ".sft")):
        sd, meta = comfy.utils.load_torch_file(path, safe_load=True, return_metadata=True)
    else:
        sd, meta = comfy.utils.load_torch_file(path, safe_load=True), None
    extra = {}
    if meta and METADATA_KEY in meta:
        try:
            extra = json.loads(meta[METADATA_KEY])
        except ValueError:
            extra = {}
    return sd, extra


def load(path: str) -> IPAdapter:
    sd, meta = read_file(path)
    return from_state_dict(sd, meta, os.path.basename(path))


# ---------------------------------------------------------------------------------------------
# Layer order and per-layer weights
# ---------------------------------------------------------------------------------------------

def cross_sites(model) -> list[AttnSite]:
    """Cross-attention sites in the order IP-Adapter files number them: down blocks, up blocks, middle.

    (diffusers' attn_processors order; layer i of that order is the file's key 2 * i + 1.)
    """
    sites = [s for s in attention_layout(model).sites if s.cross]
    rank = {"input": 0, "output": 1, "middle": 2}
    return sorted(sites, key=lambda s: (rank[s.block], s.order))


def _context_dim(model, site: AttnSite) -> Optional[int]:
    dm = getattr(model, "model", model).diffusion_model
    blocks = {"input": dm.input_blocks, "output": dm.output_blocks}
    container = blocks[site.block][site.number] if site.block in blocks else dm.middle_block
    from comfy.ldm.modules.attention import SpatialTransformer
    for sub in container:
        if isinstance(sub, SpatialTransformer):
            return int(sub.transformer_blocks[site.depth].attn2.to_k.in_features)
    return None


def match_layers(model, adapter: IPAdapter, node: str) -> list[tuple[AttnSite, str]]:
    """Pair each cross-attention site of the model with the adapter's ip layer (raises on mismatch)."""
    v = adapter.variant
    sites = cross_sites(model)
    if not sites:
        raise EditKitInputError(node, "model", "this model has no UNet cross-attention layers",
                                "IP-Adapter works on SD1.x / SD2.x / SDXL-style UNets")
    ctx = _context_dim(model, sites[0])
    if len(sites) != v.layers or ctx != v.cross_dim:
        raise EditKitInputError(node, "ipadapter", f"the adapter is {v.describe()}, but the model has "
                                f"{len(sites)} cross-attention layers with a {ctx}-dim context",
                                "load the IP-Adapter file made for this model family (SD1.5 files for SD1.5 "
                                "models, *_sdxl files for SDXL)")
    pairs = []
    for site, key, dim in zip(sites, v.layer_keys, v.layer_dims):
        if site.heads * site.dim_head != dim:
            raise EditKitInputError(node, "ipadapter", f"ip layer {key} is {dim} wide but the model's layer "
                                    f"{site.key} is {site.heads * site.dim_head} wide",
                                    "load the IP-Adapter file made for this model family")
        pairs.append((site, str(key)))
    return pairs


def _deepest_blocks(sites: list[AttnSite], block: str) -> list[int]:
    chosen = [s for s in sites if s.block == block]
    if not chosen:
        return []
    deepest = max(s.downsample for s in chosen)
    return sorted({s.number for s in chosen if s.downsample == deepest})


def style_and_composition_blocks(sites: list[AttnSite]) -> tuple[Optional[tuple], Optional[tuple]]:
    """InstantStyle's blocks: style = the 2nd up block at the deepest attention level (SDXL: output 1),
    composition = the 2nd down block there (SDXL: input 8); the same rule on other UNets."""
    ins, outs = _deepest_blocks(sites, "input"), _deepest_blocks(sites, "output")
    comp = ("input", ins[1] if len(ins) > 1 else ins[-1]) if ins else None
    style = ("output", outs[1] if len(outs) > 1 else outs[0]) if outs else None
    return style, comp


def layer_weights(sites: list[AttnSite], weight_type: str) -> dict[tuple, float]:
    """Multiplier of the adapter weight per site key, for a weight type (cubiq's curve conventions:
    'ease in' is strong at the first layers, 'ease out' at the last, over the execution order)."""
    ordered = sorted(sites, key=lambda s: s.order)
    n = max(len(ordered) - 1, 1)
    out = {}
    style, comp = style_and_composition_blocks(ordered)
    for i, s in enumerate(ordered):
        t = i / n
        if weight_type == "linear":
            f = 1.0
        elif weight_type == "ease in":
            f = 0.05 + 0.95 * (1.0 - t)
        elif weight_type == "ease out":
            f = 0.05 + 0.95 * t
        elif weight_type == "ease in-out":
            f = 0.05 + 0.95 * (1.0 - abs(t - 0.5) / 0.5)
        elif weight_type == "reverse in-out":
            f = 0.05 + 0.95 * (abs(t - 0.5) / 0.5)
        elif weight_type == "style only":
            f = 1.0 if (s.block, s.number) == style else 0.0
        elif weight_type == "composition only":
            f = 1.0 if (s.block, s.number) == comp else 0.0
        elif weight_type == "style and composition":
            f = 1.0 if (s.block, s.number) in (style, comp) else 0.0
        else:
            raise ValueError(f"unknown weight type {weight_type!r}")
        out[s.key] = f
    return out


# ---------------------------------------------------------------------------------------------
# Image-prompt tokens
# ---------------------------------------------------------------------------------------------

def neutral_image(clip_vision, batch: int = 1, size: int = 224) -> torch.Tensor:
    """An image whose CLIP preprocessing is (up to 8-bit rounding) all zeros: the encoder's mean colour.
    IP-Adapter-plus uses the hidden states of a zero pixel tensor as the unconditional image."""
    mean = getattr(clip_vision, "image_mean", [0.48145466, 0.4578275, 0.40821073])
    size = int(getattr(clip_vision, "image_size", size))
    return torch.tensor(mean, dtype=torch.float32).view(1, 1, 1, 3).expand(batch, size, size, 3).contiguous()


def clip_features(clip_vision, image: torch.Tensor, variant: Variant, node: str, input_name: str) -> torch.Tensor:
    out = clip_vision.encode_image(image, crop=True)
    feats = out[variant.clip_input]
    if feats is None or feats.shape[-1] != variant.clip_dim:
        got = None if feats is None else int(feats.shape[-1])
        raise EditKitInputError(node, "clip_vision", f"the adapter ({variant.name}) reads {variant.clip_dim}-dim "
                                f"{variant.clip_input.replace('_', ' ')} but this CLIP vision model gives {got}",
                                f"load {variant.encoder} (see the README: which files go where)")
    return feats.float()


def project(adapter: IPAdapter, feats: torch.Tensor) -> torch.Tensor:
    """Image features -> image-prompt tokens (B, T, cross_dim), on the intermediate device, float32."""
    import comfy.model_management as mm
    mm.load_models_gpu([adapter.patcher])
    dev = adapter.patcher.load_device
    with torch.no_grad():
        toks = adapter.module.image_proj(feats.to(dev))
    return toks.float().to(mm.intermediate_device())


def _combine(feats: torch.Tensor, combine: str) -> torch.Tensor:
    return feats.mean(dim=0, keepdim=True) if combine == "average" else feats


def image_tokens(adapter: IPAdapter, clip_vision, image: torch.Tensor, combine: str, node: str,
                 negative: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond) tokens, each (1, T, cross_dim).

    Several images are averaged (in CLIP space, before the projection) or concatenated (their tokens
    side by side). The unconditional tokens come from the negative image when given, else from a
    zero embedding (base) or the encoding of a zero image (plus / full), as the IP-Adapter code does.
    """
    v = adapter.variant
    feats = clip_features(clip_vision, image, v, node, "image")
    cond = project(adapter, _combine(feats, combine))
    cond = cond.reshape(1, -1, cond.shape[-1])
    if negative is not None:
        nfeats = clip_features(clip_vision, negative, v, node, "image_negative")
    elif v.clip_input == "image_embeds":
        nfeats = torch.zeros_like(feats[:1])
    else:
        nfeats = clip_features(clip_vision, neutral_image(clip_vision), v, node, "image")
    nfeats = nfeats if (combine == "concat" and nfeats.shape[0] == feats.shape[0]) else nfeats.mean(0, keepdim=True)
    uncond = project(adapter, nfeats).reshape(1, -1, cond.shape[-1])
    if uncond.shape[1] != cond.shape[1]:
        reps = cond.shape[1] // uncond.shape[1]
        uncond = uncond.repeat(1, reps, 1)
    return cond, uncond


# ---------------------------------------------------------------------------------------------
# The attention patch
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Application:
    """One application of an adapter: everything its layer patches share. Immutable."""
    adapter: IPAdapter
    cond: torch.Tensor                 # (1, T, cross_dim)
    uncond: torch.Tensor               # (1, T, cross_dim)
    weight: float
    start: float = 0.0
    end: float = 1.0
    mask: Optional[torch.Tensor] = None   # (1 or B, H, W) in [0, 1]

    def active(self, extra: dict) -> bool:
        """Sampling step i of N runs the adapter when start <= i / N < end (end = 1 includes the last step)."""
        if self.start <= 0.0 and self.end >= 1.0:
            return True
        sched = extra.get("sample_sigmas")
        if sched is None or "sigmas" not in extra:
            return True
        p = denoiser.progress(sched, extra["sigmas"])
        return self.start <= p and (p < self.end or self.end >= 1.0)

    def tokens(self, like: torch.Tensor) -> torch.Tensor:
        """cond and uncond tokens stacked, (2, T, cross_dim), on the query's device and dtype."""
        return torch.cat([self.cond, self.uncond]).to(device=like.device, dtype=like.dtype)

    def mask_for(self, q: torch.Tensor, extra: dict, site: AttnSite, chunks: int) -> Optional[torch.Tensor]:
        if self.mask is None:
            return None
        hw = layer_hw(q, extra, site)
        if hw is None:
            return None
        m = self.mask.to(device=q.device, dtype=torch.float32).unsqueeze(1)
        m = F.interpolate(m, size=hw, mode="bilinear", align_corners=False) if tuple(m.shape[-2:]) != hw else m
        m = m.reshape(m.shape[0], hw[0] * hw[1], 1).to(q.dtype)
        b = q.shape[0] // chunks
        if m.shape[0] == b:
            return m.repeat(chunks, 1, 1)
        return m[:1]


def layer_hw(q: torch.Tensor, extra: dict, site: AttnSite) -> Optional[tuple[int, int]]:
    shape = extra.get("activations_shape")
    if shape is not None and len(shape) == 4 and int(shape[2]) * int(shape[3]) == q.shape[1]:
        return int(shape[2]), int(shape[3])
    orig = extra.get("original_shape")
    if orig is not None:
        h, w = site.resolution(int(orig[2]), int(orig[3]))
        if h * w == q.shape[1]:
            return h, w
    return None


def ip_attention(q: torch.Tensor, k_ip: torch.Tensor, v_ip: torch.Tensor, extra: dict) -> torch.Tensor:
    """ComfyUI's attention on the image tokens (no transformer_options: attention overrides that
    record or edit the text attention never see this second call)."""
    from comfy.ldm.modules.attention import optimized_attention
    return optimized_attention(q, k_ip, v_ip, extra["n_heads"], attn_precision=extra.get("attn_precision"))


class IPAdapterAttn2(SharedPatch):
    """attn2 replace: the previous occupant (or ComfyUI) for the text term, plus weight * image term."""

    def __init__(self, app: Application, site: AttnSite, layer_key: str, layer_weight: float, prev):
        self.app, self.site, self.layer_key, self.prev = app, site, layer_key, prev
        self.layer_weight = float(layer_weight)
        self.weight = float(app.weight) * self.layer_weight

    def __call__(self, q, k, v, extra):
        out = call_attention(self.prev, q, k, v, extra)
        app = self.app
        if self.weight == 0.0 or not app.active(extra):
            return out
        cou = list(extra.get("cond_or_uncond", [0]))
        chunks = max(len(cou), 1)
        b = q.shape[0] // chunks
        toks = app.tokens(q)
        layer = app.adapter.module.ip_layers[self.layer_key]
        k_ip, v_ip = layer.to_k_ip(toks), layer.to_v_ip(toks)                   # (2, T, inner)
        sel = torch.tensor([0 if c == 0 else 1 for c in cou], device=q.device).repeat_interleave(b)
        term = ip_attention(q, k_ip[sel], v_ip[sel], extra)
        mask = app.mask_for(q, extra, self.site, chunks)
        if mask is not None:
            term = term * mask
        return out + term * self.weight

    def to(self, *args, **kwargs):
        """ComfyUI moves patches with the model: hand the move on to the previous occupant (new object if it changed)."""
        prev = self.prev
        if prev is not None and hasattr(prev, "to"):
            moved = prev.to(*args, **kwargs)
            if moved is not prev:
                return IPAdapterAttn2(self.app, self.site, self.layer_key, self.layer_weight, moved)
        return self

    def models(self):
        return list(self.prev.models()) if self.prev is not None and hasattr(self.prev, "models") else []


def install(m, app: Application, pairs: list[tuple[AttnSite, str]], weights: dict[tuple, float]) -> None:
    """Install the adapter on every paired layer of a (cloned) model, chaining each previous occupant,
    and register the adapter's weights as an additional model loaded with it."""
    for site, key in pairs:
        lw = weights.get(site.key, 1.0)

        def make(prev, site=site, key=key, lw=lw):
            return IPAdapterAttn2(app, site, key, lw, prev)
        chain_attn_replace(m, "attn2", site.key, make)
    existing = list(m.get_additional_models_with_key(ADDITIONAL_MODELS_KEY))
    if not any(p is app.adapter.patcher for p in existing):
        existing.append(app.adapter.patcher)
    m.set_additional_models(ADDITIONAL_MODELS_KEY, existing)


def register_folder() -> None:
    """The `ipadapter` models folder (models/ipadapter plus any extra_model_paths.yaml entries)."""
    import folder_paths
    default = os.path.join(folder_paths.models_dir, FOLDER)
    exts = set(folder_paths.supported_pt_extensions)
    if FOLDER in folder_paths.folder_names_and_paths:
        paths, old = folder_paths.folder_names_and_paths[FOLDER]
        if default not in paths:
            paths.append(default)
        folder_paths.folder_names_and_paths[FOLDER] = (paths, set(old) | exts)
    else:
        folder_paths.folder_names_and_paths[FOLDER] = ([default], exts)

