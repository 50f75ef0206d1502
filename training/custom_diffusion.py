"""Custom Diffusion (Kumari et al., CVPR 2023): fine-tune only the cross-attention key/value projections
(full-rank deltas) together with a new modifier token's embedding, with prior preservation on class images.

Saved for the core loaders: the K/V deltas as a LoRA file of ComfyUI's full-delta form
(`diffusion_model.<module>.diff`, applied by core Load LoRA as W + diff) and the token as an embedding file
(`embedding:<name>`)."""
from __future__ import annotations

from typing import Optional

import torch

from . import loop, lora as TL
from . import textual_inversion as TI

CLASS = "class"


class WeightDiff(torch.nn.Module):
    """Weight wrapper W + D with an fp32 trainable D (starts at 0)."""

    def __init__(self, shape, device=None):
        super().__init__()
        self.diff = torch.nn.Parameter(torch.zeros(shape, device=device, dtype=torch.float32))

    def __call__(self, w):
        return w + self.diff.to(w.dtype)


class TrainableDiffs:
    def __init__(self, model, keys: list[str]):
        from ..core.introspect import _base
        dm = _base(model).diffusion_model
        with torch.inference_mode(False):
            self.adapters = {k: WeightDiff(dm.get_parameter(k[len("diffusion_model."):]).shape) for k in keys}

    def parameters(self):
        return [a.diff for a in self.adapters.values()]

    def install(self, clone) -> None:
        for k, a in self.adapters.items():
            clone.add_weight_wrapper(k, a)

    def state_dict(self) -> dict:
        return {k[:-len(".weight")] + ".diff": a.diff.detach().float().cpu().contiguous() for k, a in self.adapters.items()}


def train(model, clip, latents, captions, placeholder: str, init_word: str, settings: loop.Settings,
          class_latents=None, class_cond=None, prior_weight: float = 1.0, checkpoint_path: Optional[str] = None,
          resume: Optional[str] = None, node_id: Optional[str] = None, stop=None, preview=None):
    """(TI.Concept, TrainableDiffs, loop.Result)."""
    keys = TL.target_keys(model, TL.CROSS_KV)
    if not keys:
        raise TI.CaptionError("model", "this model has no cross-attention key/value projections (attn2.to_k/to_v)",
                              "Custom Diffusion needs an SD-style UNet; use DreamBooth-LoRA for DiT models")
    concept = TI.Concept(clip, captions, placeholder, init_word, 1)
    diffs = TrainableDiffs(model, keys)
    conds = dict(concept.conds)
    examples = [loop.Example(x, n) for x, n in zip(latents, concept.names)]
    if class_latents is not None and prior_weight > 0:
        conds[CLASS] = class_cond
        examples += [loop.Example(x, CLASS, float(prior_weight)) for x in class_latents]
    res = loop.train(model, conds, examples, concept.params + diffs.parameters(), settings, install=diffs.install,
                     context=concept.context, checkpoint_path=checkpoint_path, resume=resume, node_id=node_id, stop=stop, preview=preview)
    return concept, diffs, res
