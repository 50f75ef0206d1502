"""A before/after demo on the toy model: generate a captioned scene, edit it with the strongest technique
available (DDIM inversion + Prompt-to-Prompt word swap when those nodes exist, else SDEdit), capture the
cross-attention maps of the edit, and save a labelled grid plus the edit metrics the checker reads.

    from editkit.toyworld import demo
    result = demo.run("out/")          # {"grid": path, "technique": ..., "metrics": {...}, ...}

Every step goes through the nodes by id (editbench.call_node), as a workflow would run them.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from . import editbench

SOURCE = "a red circle on a white background"
TARGET = "a blue circle on a white background"
WORDS = "red, blue, circle"


def _available(*node_ids) -> bool:
    import nodes
    return all(n in nodes.NODE_CLASS_MAPPINGS for n in node_ids)


def run(out_dir: str, source: str = SOURCE, target: str = TARGET, seed: int = 1, steps: int = 20, cfg: float = 5.0,
        model_triple=None) -> dict:
    from ..builtin_models import toy
    from ..core import imaging
    call = editbench.call_node
    model, clip, vae = model_triple or toy.load_toy()
    enc = lambda text: call("CLIPTextEncode", clip=clip, text=text)[0]  # noqa: E731
    neg = enc("")
    with torch.inference_mode():
        latent = call("EmptyLatentImage", width=128, height=128, batch_size=1)[0]
        src_lat = call("KSampler", model=model, seed=seed, steps=steps, cfg=cfg, sampler_name="euler", scheduler="normal",
                       positive=enc(source), negative=neg, latent_image=latent, denoise=1.0)[0]
        src_img = call("VAEDecode", samples=src_lat, vae=vae)[0]
        # The "real image" to edit: the generated one, encoded again (as LoadImage + VAE Encode would).
        lat = call("VAEEncode", pixels=src_img, vae=vae)[0]
        maps = None
        if _available("EditKitInvert", "EditKitPromptToPrompt", "EditKitInversionSampler"):
            technique = "DDIM inversion + Prompt-to-Prompt (word swap, local blend)"
            inv = call("EditKitInvert", model=model, latent=lat, positive=enc(source), cfg=1.0, steps=steps,
                       fixed_point_iterations=0)[1]
            words = editbench.changed_words(source, target)
            edit_model = call("EditKitPromptToPrompt", model=model, clip=clip, source_prompt=source, target_prompt=target,
                              local_blend_words=", ".join(words))[0]
            if _available("EditKitAttentionMaps"):
                edit_model, maps = call("EditKitAttentionMaps", model=edit_model, clip=clip, prompt=source, words=WORDS,
                                        target_prompt=target)
            noise, guider, sampler, sigmas, start = call("EditKitInversionSampler", model=edit_model, inversion=inv,
                                                         positive=enc(target), negative=neg, cfg=cfg,
                                                         output="source + target")
            out = call("SamplerCustomAdvanced", noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                       latent_image=start)[0]
            both = call("VAEDecode", samples=out, vae=vae)[0]
            recon, edited = both[0:1], both[1:2]
        else:
            technique = "SDEdit (t0=0.7)"
            noise, start, sigmas, _ = call("EditKitSDEdit", model=model, latent=lat, strength=0.7,
                                           steps=round(steps * 0.7), scheduler="normal", seed=seed)
            guider = call("CFGGuider", model=model, positive=enc(target), negative=neg, cfg=cfg)[0]
            sampler = call("KSamplerSelect", sampler_name="euler")[0]
            out = call("SamplerCustomAdvanced", noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                       latent_image=start)[0]
            edited = call("VAEDecode", samples=out, vae=vae)[0]
            recon = None
        metrics = editbench.measure_edit(src_img[0], edited[0], target)
        if recon is not None:
            from . import evaluate
            metrics["reconstruction_psnr"] = evaluate.psnr(recon[0], src_img[0])
        panels = [imaging.label(src_img[0], "before"), imaging.label(edited[0], "after")]
        heat_path = None
        if maps is not None and _available("EditKitShowAttentionMaps"):
            heat = call("EditKitShowAttentionMaps", attention_maps=maps, image=both, opacity=0.6, colormap="inferno")[0]
            heat_path = _save(heat[-1], out_dir, "editkit_toy_demo_attention.png")
    os.makedirs(out_dir, exist_ok=True)
    grid_path = _save(imaging.hstack(panels), out_dir, "editkit_toy_demo_before_after.png")
    return {"technique": technique, "source": source, "target": target, "grid": grid_path, "attention": heat_path,
            "metrics": metrics}


def _save(image: torch.Tensor, out_dir: str, name: str) -> str:
    from PIL import Image
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    arr = (image.clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    Image.fromarray(arr).resize((arr.shape[1] * 2, arr.shape[0] * 2), Image.NEAREST).save(path)
    return path
