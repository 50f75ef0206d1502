"""Trainable LoRA in ComfyUI's own weight-adapter format.

Each trained weight gets ComfyUI's own training adapter (`comfy.weight_adapter.LoRAAdapter.create_train`:
a `LoraDiff`, W + alpha/rank * up @ down with fp32 factors, up random, down zero so training starts at the
base model) as a weight wrapper on the gradient clone. The saved file uses the plain key layout ComfyUI's
loader maps itself (`diffusion_model.<module>.lora_up.weight` / `.lora_down.weight` / `.alpha`, as core's
TrainLoraNode writes), so core Load LoRA and EditKit's merge nodes apply it: the loaded weight is
W + alpha/rank * up @ down, exactly the trained delta.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..core.introspect import _base

# Which projections each recipe trains (by the parameter's own name; layouts differ per architecture).
ATTENTION = "attention"           # every attention projection (DreamBooth-LoRA: q, k, v, out)
CROSS_KV = "cross_kv"             # cross-attention key/value projections (Custom Diffusion)


def _is_attention(name: str) -> bool:
    parts = name.split(".")
    return any("attn" in p for p in parts[:-1])


def _is_cross_kv(name: str) -> bool:
    return ".attn2.to_k." in name or ".attn2.to_v." in name


def target_keys(model, recipe: str = ATTENTION, include: Optional[Callable[[str], bool]] = None) -> list[str]:
    """ComfyUI weight keys ("diffusion_model.<module>.weight") of the 2-D (Linear) weights a recipe trains."""
    dm = _base(model).diffusion_model
    test = include or {ATTENTION: _is_attention, CROSS_KV: _is_cross_kv}[recipe]
    out = []
    for name, p in dm.named_parameters():
        if name.endswith(".weight") and p.ndim == 2 and test(name):
            out.append("diffusion_model." + name)
    return out


def frozen_weights_reason(model) -> Optional[str]:
    """Why gradients cannot pass through this model's weights (quantized / fp8 storage), or None."""
    dm = _base(model).diffusion_model
    for name, p in dm.named_parameters():
        if p.dtype in (torch.int8, torch.uint8) or "float8" in str(p.dtype):
            return f"weight {name} is stored as {p.dtype}"
        if not p.dtype.is_floating_point:
            return f"weight {name} is stored as {p.dtype}"
    return None


class TrainableLora:
    """LoRA factors for a set of weight keys (ComfyUI's LoraDiff modules), installable on a clone."""

    def __init__(self, model, keys: list[str], rank: int = 4, alpha: float | None = None, seed: int = 0):
        from comfy.weight_adapter.lora import LoRAAdapter
        dm = _base(model).diffusion_model
        self.rank = int(rank)
        self.alpha = float(rank if alpha is None else alpha)
        self.adapters = {}
        with torch.inference_mode(False), torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            for key in keys:
                w = dm.get_parameter(key[len("diffusion_model."):])
                ad = LoRAAdapter.create_train(torch.empty(w.shape, device=w.device), rank=self.rank, alpha=self.alpha)
                ad.requires_grad_(False)
                for p in (ad.lora_up.weight, ad.lora_down.weight):
                    p.requires_grad_(True)
                self.adapters[key] = ad

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for ad in self.adapters.values() for p in (ad.lora_up.weight, ad.lora_down.weight)]

    def install(self, clone) -> None:
        for key, ad in self.adapters.items():
            clone.add_weight_wrapper(key, ad)

    def delta(self, key: str) -> torch.Tensor:
        ad = self.adapters[key]
        with torch.no_grad():
            return (ad.alpha / ad.rank) * (ad.lora_up.weight @ ad.lora_down.weight)

    def state_dict(self, dtype=torch.float32) -> dict:
        """The LoRA file's tensors in ComfyUI's plain key layout."""
        out = {}
        for key, ad in self.adapters.items():
            n = key[:-len(".weight")]
            out[f"{n}.lora_up.weight"] = ad.lora_up.weight.detach().to("cpu", dtype).contiguous()
            out[f"{n}.lora_down.weight"] = ad.lora_down.weight.detach().to("cpu", dtype).contiguous()
            out[f"{n}.alpha"] = torch.tensor(float(ad.alpha))
        return out


def apply_saved(model, clip, lora_sd: dict, strength_model: float = 1.0, strength_clip: float = 1.0):
    """The model (and clip) as core Load LoRA returns them for this LoRA state dict."""
    import comfy.sd
    return comfy.sd.load_lora_for_models(model, clip, lora_sd, strength_model, strength_clip)
