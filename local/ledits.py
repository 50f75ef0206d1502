"""LEDITS++ (Brack et al. 2024, "LEDITS++: Limitless Image Editing using Text-to-Image Models") on EditKit's
inversion replay: edit-friendly DDPM inversion (the registry's "ddpm" method, replayed unchanged) whose target
branch is guided by SEGA-style edit terms restricted to implicit masks, several edits in one pass.

Per replay step and edit i (concept c_i, scale s_i, add or remove), in the noise space d = (x - x0) / sigma of
k-diffusion (the same for EPS, v-prediction and flow models):

    gamma_i = +-s_i (d(x, c_i) - d(x, u))                     (guidance/formulas.sega_direction, threshold 0)
    M1_i    = smooth(A_i) >= quantile_lambda(smooth(A_i))     the concept's cross-attention map A_i (its tokens'
                                                              head-averaged probabilities at the attention level
                                                              of attention/maps.blend_level, this step, captured
                                                              by attention/maps.py), 3x3 Gaussian (std 0.5),
                                                              nearest-upsampled to the latent
    M2_i    = sum_ch |gamma_i| >= quantile_lambda(sum_ch |gamma_i|)     the noise-difference mask
    M_i     = M1_i * M2_i                                     (the implicit mask; "attention" / "noise" keep one)
    d_target = d_base + sum_i M_i gamma_i,  i.e.  x0_target = x0_base - sigma sum_i M_i gamma_i

u is the inversion's negative prompt (its unconditional prediction), or the empty prompt when the inversion
ran without one. The base d_base is the inversion's own guidance (source prompt, negative, cfg) at the target
latent, so with every scale 0 the edit replays the DDPM noise maps exactly: the reconstruction (diffusers
uses the unconditional prediction as the base, which equals this when the inversion prompt is empty at cfg 1).
All concepts are extra branches of the step's one batched model call (samplers/methods/base.ReplayHook
.branches). Edits start after `warmup` steps. No node classes here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..core.errors import EditKitInputError
from ..guidance import formulas
from ..samplers.branch_guider import BranchSpec
from ..samplers.methods.base import ReplayHook

PAPER_SCALE = 5.0          # edit_guidance_scale (diffusers' LEDITS++ default)
PAPER_THRESHOLD = 0.9      # lambda: the masks keep the top 10 % of the map
MAX_SCALE = 50.0
MODES = ("intersect", "attention", "noise")
UNCOND = "ledits_uncond"

_LINE = re.compile(r"^\s*([+-])\s*(.*?)\s*(?:\[([^\]]*)\])?\s*(?::\s*(\S+))?\s*$")


@dataclass(frozen=True)
class Edit:
    concept: str               # the edit concept's text (its own prompt)
    reverse: bool              # remove the concept
    scale: float
    words: tuple = ()          # words of the concept whose cross-attention maps make M1 (empty: all its tokens)

    @property
    def label(self) -> str:
        return f"{'-' if self.reverse else '+'} {self.concept}" + (f" [{', '.join(self.words)}]" if self.words else "")


def parse_edits(text: str, default_scale: float, node: str, input_name: str = "edits") -> list:
    """One edit per line: `+ concept` (add) or `- concept` (remove), optional `[word, word]` (the words whose
    attention maps make the mask; default: the whole concept) and `: scale` (default: default_scale)."""
    edits = []
    for n, line in enumerate((text or "").splitlines(), 1):
        if not line.strip() or line.strip().startswith("#"):
            continue
        m = _LINE.match(line)
        if m is None:
            raise EditKitInputError(node, input_name, f"line {n} \"{line.strip()[:80]}\" does not start with + or -",
                                    "write one edit per line: '+ a blue hat' adds, '- a cup' removes "
                                    "(optional '[hat]' mask words, ': 7' scale)")
        sign, concept, words, scale = m.groups()
        if not concept:
            raise EditKitInputError(node, input_name, f"line {n} has an empty concept",
                                    "write the concept after the sign, e.g. '+ a blue square'")
        if scale is None:
            value = float(default_scale)
        else:
            try:
                value = float(scale)
            except ValueError:
                raise EditKitInputError(node, input_name, f"line {n}: the scale '{scale}' is not a number",
                                        "write e.g. ': 5' after the concept") from None
        if not (0.0 <= value <= MAX_SCALE) or value != value:
            raise EditKitInputError(node, input_name, f"line {n}: scale {value:g} is outside [0, {MAX_SCALE:g}]",
                                    f"use 0-{MAX_SCALE:g} (the paper: about 5-10); '-' removes a concept")
        wl = tuple(w.strip() for w in (words or "").split(",") if w.strip())
        if words is not None and not wl:
            raise EditKitInputError(node, input_name, f"line {n}: the mask words '[]' are empty",
                                    "name words of the concept inside [ ], or drop the brackets")
        edits.append(Edit(concept, sign == "-", value, wl))
    if not edits:
        raise EditKitInputError(node, input_name, "no edit given", "write one edit per line, e.g. '+ a blue square'")
    return edits


def edit_cond_name(i: int) -> str:
    return f"ledits_edit{i}"


# ---------------------------------------------------------------------------------------------
# The implicit masks (plain tensor functions; the tests recompute them independently)
# ---------------------------------------------------------------------------------------------

def quantile_mask(m: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B, h, w) -> 1 where a value reaches its image's `threshold` quantile."""
    q = torch.quantile(m.flatten(1).float(), float(threshold), dim=1).view(-1, 1, 1)
    return (m.float() >= q).float()


def attention_mask(maps: torch.Tensor, threshold: float, latent_hw) -> torch.Tensor:
    """M1: (B, h', w') attention map -> smoothed (3x3 Gaussian, std 0.5), thresholded at its quantile,
    nearest-upsampled to the latent (B, h, w)."""
    sm = formulas.gaussian_blur(maps.float().unsqueeze(1), 0.5, 3)[:, 0]
    m = quantile_mask(sm, threshold)
    return F.interpolate(m.unsqueeze(1), size=tuple(latent_hw), mode="nearest")[:, 0]


def noise_mask(gamma: torch.Tensor, threshold: float) -> torch.Tensor:
    """M2: (B, C, h, w) edit guidance -> 1 where its channel-summed magnitude reaches the quantile."""
    return quantile_mask(gamma.abs().sum(dim=1), threshold)


def edit_guidance(x: torch.Tensor, sigma, uncond_x0: torch.Tensor, concept_x0: torch.Tensor, edit: Edit) -> torch.Tensor:
    """gamma = +-scale (d_concept - d_uncond) with d = (x - x0) / sigma: SEGA's direction without its threshold."""
    s = formulas._bview(sigma, x)
    return formulas.sega_direction((uncond_x0 - concept_x0) / s, edit.scale, 0.0, edit.reverse)


# ---------------------------------------------------------------------------------------------
# The replay hook
# ---------------------------------------------------------------------------------------------

class LEditsGuidance(ReplayHook):
    """Edit terms of LEDITS++ on the target branch (see the module docstring). `store` is the
    CrossAttentionMapStore (per_step) installed on the model that samples, one word per edit (its tokens in
    its own prompt), or None for mode "noise"; `uncond` names the unconditional CONDITIONING of the guider
    when the target branch has no unconditional row of its own (None: use the target's)."""

    def __init__(self, edits: list, threshold: float = PAPER_THRESHOLD, warmup: int = 0, mode: str = "intersect",
                 store=None, level: Optional[int] = None, uncond: Optional[str] = None):
        if mode not in MODES:
            raise ValueError(f"EditKit: LEDITS++ mask mode {mode!r} (known: {', '.join(MODES)})")
        self.edits = tuple(edits)
        self.threshold, self.warmup, self.mode = float(threshold), int(warmup), mode
        self.store, self.level, self.uncond = store, level, uncond

    def active(self, step) -> bool:
        return step.position >= self.warmup and any(e.scale > 0 for e in self.edits)

    def branches(self, ctx, step):
        if not self.active(step):
            return []
        specs = [BranchSpec(UNCOND, None, 1.0)] if self.uncond else []
        return specs + [BranchSpec(edit_cond_name(i), None, 1.0) for i in range(len(self.edits))]

    def attention_maps(self, i: int, rows: slice):
        raw = self.store.raw(self.level, current_step=True) if self.store is not None else None
        if raw is None:
            raise RuntimeError("EditKit LEDITS++: no cross-attention maps were captured this step "
                               "(a model without cross-attention: use masks 'noise')")
        return raw[rows, i]

    def on_branches(self, ctx, step, target, target_x0, preds):
        b = target.shape[0]
        extra = preds[2:]
        if self.uncond:
            u, concepts, first = extra[0].cond, extra[1:], 3
        else:
            u, concepts, first = preds[1].uncond, extra, 2
        u = u.to(target.dtype)
        total = torch.zeros_like(target)
        masks = []
        for i, (edit, p) in enumerate(zip(self.edits, concepts)):
            gamma = edit_guidance(target, step.sigma, u, p.cond.to(target.dtype), edit)
            m = torch.ones(b, *target.shape[-2:], dtype=target.dtype, device=target.device)
            if self.mode in ("intersect", "attention"):
                branch = first + i
                m = m * attention_mask(self.attention_maps(i, slice(branch * b, (branch + 1) * b)), self.threshold,
                                       target.shape[-2:]).to(m)
            if self.mode in ("intersect", "noise"):
                m = m * noise_mask(gamma, self.threshold).to(m)
            masks.append(m)
            total = total + m.unsqueeze(1) * gamma
        rec = ctx.stats.setdefault("ledits_masks", [])
        rec.append((step.index, torch.stack(masks).float().cpu()))
        return target_x0 - formulas._bview(step.sigma, target) * total
