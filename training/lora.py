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
ALL = "all"                       # every Linear and Conv weight of the diffusion model (core TrainLoraNode's set;
                                  # the toy table: only this learns a new *shape*, attention alone learns colour)
RECIPES = (ATTENTION, ALL)        # what a DreamBooth user may choose


def _is_attention(name: str) -> bool:
    parts = name.split(".")
    return any("attn" in p for p in parts[:-1])


def _is_cross_kv(name: str) -> bool:
    return ".attn2.to_k." in name or ".attn2.to_v." in name


def target_keys(model, recipe: str = ATTENTION, include: Optional[Callable[[str], bool]] = None) -> list[str]:
    """ComfyUI weight keys ("diffusion_model.<module>.weight") a recipe trains: the 2-D (Linear) weights of the
    attention / cross-K/V recipes, or every Linear and Conv weight (ndim >= 2) for ALL. Conv adapters are stored
    flattened (out, in*kh*kw), which core's loader reshapes to the weight."""
    dm = _base(model).diffusion_model
    test = include or {ATTENTION: _is_attention, CROSS_KV: _is_cross_kv, ALL: lambda name: True}[recipe]
    min_ndim_ok = (lambda p: p.ndim >= 2) if recipe == ALL and include is None else (lambda p: p.ndim == 2)
    out = []
    for name, p in dm.named_parameters():
        if name.endswith(".weight") and min_ndim_ok(p) and test(name):
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


ADAPTERS = ("lora", "loha", "lokr")


def _adapter_class(kind: str):
    from comfy.weight_adapter.loha import LoHaAdapter
    from comfy.weight_adapter.lokr import LoKrAdapter
    from comfy.weight_adapter.lora import LoRAAdapter
    return {"lora": LoRAAdapter, "loha": LoHaAdapter, "lokr": LoKrAdapter}[kind]


class TrainableLora:
    """Trainable adapters of one of ComfyUI's own weight-adapter formats (kind: lora | loha | lokr, created by
    the adapter's own `create_train`: LoraDiff, LohaDiff, LokrDiff, each starting at a zero delta) for a set of
    weight keys, installable on a clone as weight wrappers.

    keys are the patch keys ComfyUI's patcher uses; each weight is `root.get_parameter(key)` (root: the model's
    BaseModel by default, so "diffusion_model.<module>.weight"; a CLIP's cond_stage_model for text-encoder keys).
    file_key(key) names the module in the saved file (default: the key without ".weight", ComfyUI's plain
    layout). The saved tensors are the adapter's own parameters under its own names (lora_up.weight /
    lora_down.weight, hada_w1_a / hada_w1_b / hada_w2_a / hada_w2_b, lokr_w1 / lokr_w2) plus alpha: what
    comfy.weight_adapter's loaders read back."""

    def __init__(self, model, keys: list[str], rank: int = 4, alpha: float | None = None, seed: int = 0,
                 kind: str = "lora", root=None, file_key: Optional[Callable[[str], str]] = None):
        if kind not in ADAPTERS:
            raise ValueError(f"adapter {kind!r} is not one of {ADAPTERS}")
        adapter = _adapter_class(kind)
        root = root if root is not None else _base(model)
        self.kind, self.rank = kind, int(rank)
        self.alpha = float(rank if alpha is None else alpha)
        self.file_key = file_key or (lambda k: k[:-len(".weight")] if k.endswith(".weight") else k)
        self.adapters, self.shapes = {}, {}
        self.text_encoder = None        # the text encoder's adapters trained with these (DreamBooth), if any
        with torch.inference_mode(False), torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            for key in keys:
                w = root.get_parameter(key)
                self.shapes[key] = tuple(w.shape)
                ad = adapter.create_train(torch.empty(w.shape, device=w.device), rank=self.rank, alpha=self.alpha)
                for name, p in ad.named_parameters():
                    p.requires_grad_(name != "alpha")
                self.adapters[key] = ad

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for ad in self.adapters.values() for p in ad.parameters() if p.requires_grad]

    def install(self, clone) -> None:
        for key, ad in self.adapters.items():
            clone.add_weight_wrapper(key, ad)

    def delta(self, key: str) -> torch.Tensor:
        """The adapter's current weight delta (fp32, the weight's shape): its own forward at W = 0."""
        ad = self.adapters[key]
        device = next(ad.parameters()).device
        with torch.no_grad():
            return ad(torch.zeros(self.shapes[key], dtype=torch.float32, device=device))

    def state_dict(self, dtype=torch.float32) -> dict:
        """The file's tensors in ComfyUI's key layout for this adapter kind."""
        out = {}
        for key, ad in self.adapters.items():
            n = self.file_key(key)
            for name, p in ad.named_parameters():
                if name == "alpha":
                    out[f"{n}.alpha"] = torch.tensor(float(p))
                else:
                    out[f"{n}.{name}"] = p.detach().to("cpu", dtype).contiguous()
        return out


def apply_saved(model, clip, lora_sd: dict, strength_model: float = 1.0, strength_clip: float = 1.0):
    """The model (and clip) as core Load LoRA returns them for this LoRA state dict."""
    import comfy.sd
    return comfy.sd.load_lora_for_models(model, clip, lora_sd, strength_model, strength_clip)
