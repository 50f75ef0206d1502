"""DreamBooth with LoRA (Ruiz et al. 2023; LoRA: Hu et al. 2022): the instance images under a prompt with a
rare identifier, plus prior preservation -- the model's own samples of the class prompt trained under the
class prompt with weight `prior_weight` -- on LoRA (or LoHa / LoKr) factors of every attention projection of the
UNet/DiT."""
from __future__ import annotations

from typing import Optional

import torch

from ..core import gradients as G
from . import loop, lora as TL

INSTANCE, CLASS = "instance", "class"


def examples(instance_latents: torch.Tensor, class_latents: Optional[torch.Tensor], prior_weight: float) -> list:
    """Training examples from sampler-space latents (instance first, then class images)."""
    ex = [loop.Example(x, INSTANCE, 1.0) for x in instance_latents]
    if class_latents is not None and prior_weight > 0:
        ex += [loop.Example(x, CLASS, float(prior_weight)) for x in class_latents]
    return ex


def text_encoder_keys(clip) -> dict:
    """{CLIP patch key: file key} for the text-encoder weights core's LoRA loader maps to the CLIP
    (comfy.lora.model_lora_keys_clip): kohya's names, lora_te_ on one-encoder CLIPs, lora_te1_ (clip_l) and
    lora_te2_ (clip_g) on SDXL-style two-encoder CLIPs."""
    import comfy.lora
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
    encoders = {v.split(".", 1)[0] for v in key_map.values()}
    two = {"clip_l", "clip_g"} <= encoders

    def prefix(patch_key):
        if not two:
            return "lora_te_"
        return "lora_te1_" if patch_key.startswith("clip_l.") else "lora_te2_"
    out = {}
    for file_key, patch_key in sorted(key_map.items()):
        if file_key.startswith(prefix(patch_key)):
            out.setdefault(patch_key, file_key)
    return out


class TextEncoderLora:
    """Trainable adapters on the text encoder (same kind and rank as the UNet's): installed on a gradient clone
    of the CLIP, which encodes each named prompt differentiably (the loop's `context`). The user's CLIP is
    untouched; the saved keys are those core Load LoRA applies to the CLIP (text_encoder_keys)."""

    def __init__(self, clip, prompts: dict, rank: int, seed: int, kind: str = "lora"):
        keys = text_encoder_keys(clip)
        if not keys:
            raise ValueError("this CLIP has no text-encoder weights core's LoRA loader maps")
        self.lora = TL.TrainableLora(None, list(keys), rank=rank, seed=seed, kind=kind, root=clip.cond_stage_model,
                                     file_key=keys.get)
        self._clip = G.gradient_clip(clip)
        self.lora.install(self._clip.patcher)
        self._tokens = {name: clip.tokenize(text) for name, text in prompts.items()}

    def parameters(self):
        return self.lora.parameters()

    def context(self, name):
        tokens = self._tokens.get(name)
        return None if tokens is None else self._clip.encode_from_tokens(tokens)

    def state_dict(self, dtype=torch.float32) -> dict:
        return self.lora.state_dict(dtype)


def train(model, instance_latents, instance_cond, settings: loop.Settings, rank: int = 4,
          class_latents=None, class_cond=None, prior_weight: float = 1.0, checkpoint_path: Optional[str] = None,
          resume: Optional[str] = None, node_id: Optional[str] = None, stop=None, preview=None,
          adapter: str = "lora", text_encoder: Optional[tuple] = None, targets: str = TL.ATTENTION):
    """(TrainableLora, loop.Result). Latents in sampler space, (N, C, H, W). adapter: lora | loha | lokr (ComfyUI's
    weight-adapter formats; rank is LoKr's factor). text_encoder: (clip, instance prompt, class prompt, learning
    rate) to train the text encoder's adapters too (at that rate); they are returned as the LoRA's
    `text_encoder` (a TextEncoderLora, else None). targets: TL.ATTENTION (the paper's recipe) or TL.ALL (every
    Linear and Conv weight)."""
    lo = TL.TrainableLora(model, TL.target_keys(model, targets), rank=rank, seed=settings.seed, kind=adapter)
    conds = {INSTANCE: instance_cond}
    if class_latents is not None and prior_weight > 0:
        conds[CLASS] = class_cond
    ex = examples(instance_latents, class_latents, prior_weight)
    te, groups, context = None, (), None
    if text_encoder is not None:
        clip, inst_prompt, class_prompt, te_lr = text_encoder
        prompts = {INSTANCE: inst_prompt} if CLASS not in conds else {INSTANCE: inst_prompt, CLASS: class_prompt}
        te = TextEncoderLora(clip, prompts, rank, settings.seed + 1, adapter)
        groups, context = [(te.parameters(), float(te_lr))], te.context
    lo.text_encoder = te
    res = loop.train(model, conds, ex, lo.parameters(), settings, install=lo.install, checkpoint_path=checkpoint_path,
                     resume=resume, node_id=node_id, stop=stop, preview=preview, groups=groups, context=context)
    return lo, res
