"""Tiny models built in code, with ComfyUI's real architectures and deterministic weights.

They return the objects ComfyUI's loaders return (ModelPatcher, CLIP, VAE), so every EditKit
patch and every core node works on them as on a checkpoint. ComfyUI's layers skip weight
initialisation (torch.empty), so weights are initialised here explicitly from a seed.
"""
from __future__ import annotations

import torch

EPS, V_PREDICTION, FLOW = "eps", "v_prediction", "flow"
VARIANTS = [EPS, V_PREDICTION, FLOW]
SD3_DIT = "sd3 (MMDiT)"   # the loader's DiT option: tiny_sd3 + the 16-channel tiny VAE (DiT-only nodes' toy runs)
CONTEXT_DIM = 32


def init_weights(module: torch.nn.Module, seed: int = 0, std: float = 0.02) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_((torch.randn(p.shape, generator=g) * std).to(p.dtype))
            elif name.endswith("weight") or name.endswith("scale"):
                p.fill_(1.0)  # norm gains (LayerNorm/GroupNorm weight, Flux RMSNorm scale)
            else:
                p.zero_()
    return module


def _patcher(base):
    import comfy.model_management as mm
    import comfy.model_patcher
    return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


TINY_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=[1, 1], channel_mult=[1, 2],
                 transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1,
                 context_dim=CONTEXT_DIM, use_linear_in_transformer=True, use_spatial_transformer=True, legacy=False,
                 adm_in_channels=None, use_checkpoint=False, use_temporal_attention=False, use_temporal_resblock=False)


def _tiny_config_class(variant: str):
    import comfy.latent_formats
    import comfy.model_base
    import comfy.supported_models_base as smb

    class TinySD(smb.BASE):
        unet_config = {"context_dim": CONTEXT_DIM, "model_channels": 32}
        unet_extra_config = {"num_heads": 2, "num_head_channels": -1}
        latent_format = comfy.latent_formats.SD15
        memory_usage_factor = 1.0
        supported_inference_dtypes = [torch.float32, torch.bfloat16, torch.float16]

        def __init__(self, unet_config):
            super().__init__(unet_config)
            if variant == FLOW:
                self.sampling_settings = dict(self.sampling_settings, shift=3.0, multiplier=1000)

        def model_type(self, state_dict, prefix=""):
            return {EPS: comfy.model_base.ModelType.EPS, V_PREDICTION: comfy.model_base.ModelType.V_PREDICTION,
                    FLOW: comfy.model_base.ModelType.FLOW}[variant]

    TinySD.__name__ = TinySD.__qualname__ = f"TinySD_{variant}"
    return TinySD


def tiny_unet(variant: str = EPS, seed: int = 0, dtype=torch.float32, config: dict | None = None):
    """A ~1M-parameter SD-style UNet (attention at 2 levels + middle) as a ModelPatcher."""
    cfg = _tiny_config_class(variant)(dict(config or TINY_UNET))
    cfg.set_inference_dtype(dtype, None)
    base = cfg.get_model({})
    init_weights(base.diffusion_model, seed)
    return _patcher(base)


def tiny_flux(seed: int = 0, dtype=torch.float32):
    """A tiny Flux-architecture DiT (2 double + 2 single blocks, 16 latent channels)."""
    import comfy.supported_models

    class TinyFlux(comfy.supported_models.FluxSchnell):
        pass

    fc = TinyFlux(dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=CONTEXT_DIM,
                       hidden_size=64, mlp_ratio=2.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[8, 12, 12],
                       theta=10000, patch_size=2, qkv_bias=True, guidance_embed=False))
    fc.set_inference_dtype(dtype, None)
    base = fc.get_model({})
    init_weights(base.diffusion_model, seed)
    return _patcher(base)


def tiny_sd3(seed: int = 0, depth: int = 2, dtype=torch.float32, x_block_self_attn: bool = False, qk_norm=None,
             device=None):
    """A tiny SD3 MMDiT (joint attention; 16 latent channels, patch 2, hidden 64 x depth, 2 x depth heads).

    `x_block_self_attn` adds SD3.5's extra image self-attention to every block; `device="meta"` builds
    the layout without weights (for key-mapping tests). pos_embed is a torch.empty buffer that
    init_weights (parameters only) would leave as is, so buffers are filled from the seed too.
    """
    import comfy.supported_models
    hidden = 64 * depth
    unet_config = dict(in_channels=16, patch_size=2, depth=depth, num_patches=256, pos_embed_max_size=16,
                       adm_in_channels=CONTEXT_DIM, pos_embed_scaling_factor=None,
                       context_embedder_config={"target": "torch.nn.Linear",
                                                "params": {"in_features": CONTEXT_DIM, "out_features": hidden}})
    if x_block_self_attn:
        unet_config["x_block_self_attn"] = True
    if qk_norm:
        unet_config["qk_norm"] = qk_norm
    cfg = comfy.supported_models.SD3(unet_config)
    cfg.set_inference_dtype(dtype, None)
    if device is not None:
        import comfy.model_patcher
        base = cfg.get_model({}, device=torch.device(device))
        return comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    base = cfg.get_model({})
    init_weights(base.diffusion_model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, buf in base.diffusion_model.named_buffers():
            if buf.is_floating_point():
                buf.copy_((torch.randn(buf.shape, generator=g) * 0.02).to(buf.dtype))
    return _patcher(base)


def tiny_vae(seed: int = 1, channels: int = 4):
    """An AutoencoderKL with the standard 8x downscale and 4 latent channels (16 for SD3/Flux latents), 32 base channels."""
    import logging

    import comfy.sd
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # ComfyUI lists every key of an empty state dict as missing
    try:
        vae = comfy.sd.VAE(sd={}, config={"params": {"embed_dim": channels, "ddconfig": {
        "double_z": True, "z_channels": channels, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
        "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}})
    finally:
        root.setLevel(level)
    init_weights(vae.first_stage_model, seed)
    return vae


def tiny_clip(seed: int = 2):
    """A 2-layer CLIP text encoder (hidden 32) with ComfyUI's bundled SD1 tokenizer (real SD1.5 tokens)."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base as smb
    target = smb.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    clip = comfy.sd.CLIP(target, model_options={"clip_l_model_config": {
        "hidden_size": CONTEXT_DIM, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2,
        "projection_dim": CONTEXT_DIM}})
    init_weights(clip.cond_stage_model, seed)
    return clip


def encode(clip, text: str):
    """CONDITIONING for a prompt, as CLIPTextEncode builds it."""
    tokens = clip.tokenize(text)
    return clip.encode_from_tokens_scheduled(tokens)
