"""Full-size SD1.5 and SDXL UNets with random weights: the real module layout and state-dict keys,
for layout and weight-format compatibility checks.

Weights are stored in bf16 (half the memory); they compute in the dtype this host runs fast
(`core.compute_dtype`): natively in bf16 where the CPU has it, else in fp32 through ComfyUI's
manual cast, since an AVX2-only CPU emulates bf16 ~300x slower than fp32.
"""
from __future__ import annotations

import torch

from .tiny import _patcher, init_weights

# The UNet configs ComfyUI's model detection derives for these checkpoints (comfy/model_detection.py).
SD15_UNET = {'use_checkpoint': False, 'image_size': 32, 'out_channels': 4, 'use_spatial_transformer': True, 'legacy': False,
             'adm_in_channels': None, 'in_channels': 4, 'model_channels': 320, 'num_res_blocks': [2, 2, 2, 2],
             'transformer_depth': [1, 1, 1, 1, 1, 1, 0, 0], 'channel_mult': [1, 2, 4, 4], 'transformer_depth_middle': 1,
             'use_linear_in_transformer': False, 'context_dim': 768, 'num_heads': 8,
             'transformer_depth_output': [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
             'use_temporal_attention': False, 'use_temporal_resblock': False}
SDXL_UNET = {'use_checkpoint': False, 'image_size': 32, 'out_channels': 4, 'use_spatial_transformer': True, 'legacy': False,
             'num_classes': 'sequential', 'adm_in_channels': 2816, 'in_channels': 4, 'model_channels': 320,
             'num_res_blocks': [2, 2, 2], 'transformer_depth': [0, 0, 2, 2, 10, 10], 'channel_mult': [1, 2, 4],
             'transformer_depth_middle': 10, 'use_linear_in_transformer': True, 'context_dim': 2048, 'num_head_channels': 64,
             'transformer_depth_output': [0, 0, 0, 2, 2, 2, 10, 10, 10],
             'use_temporal_attention': False, 'use_temporal_resblock': False}


def _build(config_cls, unet, seed, weight_dtype=None, compute_dtype=None):
    from ..core.compute_dtype import choice
    host = choice()
    weight_dtype = weight_dtype or host.weight_dtype
    compute_dtype = compute_dtype or host.dtype
    cfg = config_cls(dict(unet))
    cfg.set_inference_dtype(weight_dtype, None if compute_dtype == weight_dtype else compute_dtype)
    base = cfg.get_model({})
    init_weights(base.diffusion_model, seed)
    return _patcher(base)


def sd15_unet(seed: int = 0, weight_dtype=None, compute_dtype=None):
    """SD1.5 UNet; weight/compute dtypes default to the host's choice (core.compute_dtype.choice())."""
    import comfy.supported_models
    return _build(comfy.supported_models.SD15, SD15_UNET, seed, weight_dtype, compute_dtype)


def sdxl_unet(seed: int = 0, weight_dtype=None, compute_dtype=None):
    import comfy.supported_models
    return _build(comfy.supported_models.SDXL, SDXL_UNET, seed, weight_dtype, compute_dtype)


def compute_dtype_of(patcher) -> "torch.dtype":
    """The dtype a ComfyUI model's layers compute in (its manual-cast dtype, else its weight dtype)."""
    base = patcher.model
    return getattr(base, "manual_cast_dtype", None) or base.get_dtype()


def sdxl_conditioning(batch: int = 1, tokens: int = 77, seed: int = 0, width: int = 1024, height: int = 1024):
    """Random SDXL conditioning with the pooled output and size keys the model's extra_conds read."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, tokens, 2048, generator=g),
             {"pooled_output": torch.randn(batch, 1280, generator=g), "width": width, "height": height,
              "crop_w": 0, "crop_h": 0, "target_width": width, "target_height": height}]]


def sd15_conditioning(batch: int = 1, tokens: int = 77, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, tokens, 768, generator=g), {}]]
