"""DreamBooth with LoRA (Ruiz et al. 2023; LoRA: Hu et al. 2022): the instance images under a prompt with a
rare identifier, plus prior preservation -- the model's own samples of the class prompt trained under the
class prompt with weight `prior_weight` -- on LoRA (or LoHa / LoKr) factors of every attention projection of the
UNet/DiT."""
from __future__ import annotations

from typing import Optional

import torch

from . import loop, lora as TL

INSTANCE, CLASS = "instance", "class"


def examples(instance_latents: torch.Tensor, class_latents: Optional[torch.Tensor], prior_weight: float) -> list:
    """Training examples from sampler-space latents (instance first, then class images)."""
    ex = [loop.Example(x, INSTANCE, 1.0) for x in instance_latents]
    if class_latents is not None and prior_weight > 0:
        ex += [loop.Example(x, CLASS, float(prior_weight)) for x in class_latents]
    return ex


def train(model, instance_latents, instance_cond, settings: loop.Settings, rank: int = 4,
          class_latents=None, class_cond=None, prior_weight: float = 1.0, checkpoint_path: Optional[str] = None,
          resume: Optional[str] = None, node_id: Optional[str] = None, stop=None, preview=None,
          adapter: str = "lora"):
    """(TrainableLora, loop.Result). Latents in sampler space, (N, C, H, W). adapter: lora | loha | lokr (ComfyUI's
    weight-adapter formats; rank is LoKr's factor)."""
    lo = TL.TrainableLora(model, TL.target_keys(model, TL.ATTENTION), rank=rank, seed=settings.seed, kind=adapter)
    conds = {INSTANCE: instance_cond}
    if class_latents is not None and prior_weight > 0:
        conds[CLASS] = class_cond
    ex = examples(instance_latents, class_latents, prior_weight)
    res = loop.train(model, conds, ex, lo.parameters(), settings, install=lo.install, checkpoint_path=checkpoint_path,
                     resume=resume, node_id=node_id, stop=stop, preview=preview)
    return lo, res
