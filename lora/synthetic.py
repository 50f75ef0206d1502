"""Deterministic random LoRAs with real key names, in every format EditKit reads.

Targets are chosen from the model's own weights (what kohya trains by default: transformer
linears / 1x1 projections, optionally resnet convs, and the CLIP attention/MLP linears); names come
from ComfyUI's key map for that model (`KeyResolver`), so a file made for a model loads on it.
"""
from __future__ import annotations

import re
import zlib

import torch

from .formats import KeyResolver

FORMATS = ["kohya", "peft", "locon", "loha", "lokr", "comfy"]
_TE = re.compile(r"\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc1|mlp\.fc2)\.weight$")
_BLOCK = re.compile(r"^diffusion_model\.(input_blocks|middle_block|output_blocks|double_blocks|single_blocks|joint_blocks)\.")


def select_targets(resolver: KeyResolver, kinds=("attn", "te")) -> list[str]:
    """Weight keys a LoRA of these kinds would patch: attn (transformer linears and 1x1 projections),
    conv (UNet resnet/sampler convs and skips), te (text-encoder attention and MLP linears)."""
    out = []
    for key, shape in resolver.shapes.items():
        if not key.endswith(".weight") or len(shape) < 2:
            continue
        try:
            resolver.name_for(key)
        except KeyError:
            continue
        if key in resolver.clip_keys:
            if "te" in kinds and _TE.search(key):
                out.append(key)
            continue
        if not _BLOCK.match(key):
            continue
        is_unet = ".input_blocks." in key or ".middle_block." in key or ".output_blocks." in key
        in_transformer = ".transformer_blocks." in key or key.endswith((".proj_in.weight", ".proj_out.weight"))
        if is_unet:
            one_by_one = len(shape) == 2 or all(s == 1 for s in shape[2:])
            if "attn" in kinds and in_transformer and one_by_one and ".norm" not in key:
                out.append(key)
            elif "conv" in kinds and not in_transformer and len(shape) == 4:
                out.append(key)
        elif "attn" in kinds and len(shape) == 2 and ".norm" not in key and "_norm" not in key:
            out.append(key)
    return out


def lora_name(resolver: KeyResolver, key: str, fmt: str) -> str:
    if fmt == "comfy":
        return ("text_encoders." if key in resolver.clip_keys else "") + key[:-len(".weight")]
    if fmt == "peft":
        names = resolver.names_for(key)
        for pref in ("unet.", "text_encoder.", "text_encoder_2.", "transformer."):
            c = sorted(n for n in names if n.startswith(pref) and ".processor." not in n and "base_model" not in n)
            if c:
                return c[0]
    return resolver.name_for(key)


def _gen(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 62))


def _split(n: int) -> tuple[int, int]:
    """n = a * b with a small (LoKr's first factor)."""
    for a in (4, 8, 2, 16, 3, 5, 6, 10):
        if n % a == 0 and n // a >= 1:
            return a, n // a
    return 1, n


def make_lora(resolver: KeyResolver, targets: list[str], fmt: str = "kohya", rank: int = 4, seed: int = 0,
              scale: float = 0.01, dtype=torch.float32, alpha_ratio: float = 0.5) -> dict:
    """A LoRA state dict patching `targets` (dense delta entries of magnitude ~ `scale`)."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} not in {FORMATS}")
    sd: dict = {}
    for key in targets:
        shape = resolver.shapes[key]
        out, in_ch = shape[0], shape[1]
        ks = tuple(shape[2:])
        name = lora_name(resolver, key, fmt)
        g = _gen(seed, name)
        r = max(1, min(rank, out, in_ch))
        alpha = torch.tensor(float(max(1.0, r * alpha_ratio)))

        def rn(*s, std=1.0):
            return (torch.randn(*s, generator=g) * std).to(dtype)

        if fmt in ("kohya", "comfy", "peft") or (fmt == "locon" and not any(k > 1 for k in ks)):
            up_std = scale / r ** 0.5 * (r / alpha.item() if fmt != "peft" else 1.0)
            up = rn(out, r, *([1] * len(ks)), std=up_std)
            down = rn(r, in_ch, *ks)
            if fmt == "peft":
                sd[f"{name}.lora_B.weight"], sd[f"{name}.lora_A.weight"] = up, down
            else:
                sd[f"{name}.lora_up.weight"], sd[f"{name}.lora_down.weight"] = up, down
                sd[f"{name}.alpha"] = alpha.to(dtype)
        elif fmt == "locon":                          # Tucker conv: up (out,r,1,1), mid (r,r,kh,kw), down (r,in,1,1)
            up_std = scale / r ** 0.5 * (r / alpha.item()) / (ks[0] * ks[1]) ** 0.5
            sd[f"{name}.lora_up.weight"] = rn(out, r, 1, 1, std=up_std)
            sd[f"{name}.lora_mid.weight"] = rn(r, r, *ks, std=r ** -0.5)
            sd[f"{name}.lora_down.weight"] = rn(r, in_ch, 1, 1)
            sd[f"{name}.alpha"] = alpha.to(dtype)
        elif fmt == "loha":
            in_flat = in_ch
            for k in ks:
                in_flat *= k
            std = (scale * r / alpha.item()) ** 0.5 / r ** 0.5
            sd[f"{name}.hada_w1_a"] = rn(out, r, std=std)
            sd[f"{name}.hada_w1_b"] = rn(r, in_flat)
            sd[f"{name}.hada_w2_a"] = rn(out, r, std=std)
            sd[f"{name}.hada_w2_b"] = rn(r, in_flat)
            sd[f"{name}.alpha"] = alpha.to(dtype)
        elif fmt == "lokr":
            o1, o2 = _split(out)
            i1, i2 = _split(in_ch)
            in2 = i2
            for k in ks:
                in2 *= k
            r2 = max(1, min(rank, o2, in2))
            sd[f"{name}.lokr_w1"] = rn(o1, i1, std=0.5)
            sd[f"{name}.lokr_w2_a"] = rn(o2, r2, std=scale / r2 ** 0.5 * (r2 / alpha.item()) * 2)
            sd[f"{name}.lokr_w2_b"] = rn(r2, in2)
            sd[f"{name}.alpha"] = alpha.to(dtype)
    return sd

