"""MasaCtrl: mutual self-attention control (Cao et al. 2023) on the attention controller.

From step S and layer L onward, each target row's self-attention queries attend to its source
row's keys and values: out_t = attention(q_t, k_s, v_s), in the conditional and unconditional
chunks alike. ComfyUI's optimized attention computes it (one call per layer, same shapes).

Mask-guided mode (MasaCtrl's "mask auto"): the cross-attention maps of given words (source words in
the source row, target words in the target row) are captured at the P2P level during the current
step; thresholded, they give an object mask for the source keys and for the target queries.
Target object queries attend only to source object keys, background queries only to background
keys, and the two results are combined by the target mask.

DiTs (SD3, Flux): in the joint attention of the chosen blocks, the image part of the target's keys
and values is replaced by the source's (its text keys/values stay its own). Mask-guided mode reads
the words' image-to-text attention of every joint block at the token grid; the target's image
queries are split as above over the source's object / background image keys (text keys always
allowed); its text queries attend to all of them.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .controller import Call, Replace, Rows, Technique, attend, attend_dit
from .maps import CrossAttentionMapStore

_NEG = -3000.0   # logit bias that removes a key (exp(-3000) == 0) without inf arithmetic


class MasaCtrl(Technique):
    name = "masactrl"
    uses_dit = True

    def __init__(self, start_step: int, end_step: int, start_layer: int, end_layer: int,
                 masks: Optional[CrossAttentionMapStore] = None, mask_level: int = 1, threshold: float = 0.1):
        super().__init__()
        self.start_step, self.end_step = start_step, end_step
        self.start_layer, self.end_layer = start_layer, end_layer
        self.masks, self.mask_level, self.threshold = masks, mask_level, threshold
        self.applied: dict = {}          # layer -> set of steps (this run), for reports and tests

    def _layer_ok(self, layer: int) -> bool:
        return layer >= self.start_layer and (self.end_layer < 0 or layer <= self.end_layer)

    def _step_ok(self, step: int) -> bool:
        return step >= self.start_step and (self.end_step < 0 or step < self.end_step)

    def attn1_sites(self, layout):
        return [s for s in layout.sites if self._layer_ok(s.order)]

    def attn2_sites(self, layout):
        if self.masks is None:
            return []
        return [s for s in layout.sites if s.cross and s.downsample == self.mask_level]

    def begin_run(self):
        super().begin_run()
        with self.lock:
            self.applied = {}
        if self.masks is not None:
            self.masks.begin_run()

    def _note(self, call: Call):
        with self.lock:
            self.applied.setdefault(call.layer, set()).add(call.step)

    def wants_dit_call(self, call: Call) -> bool:
        if self.masks is not None and call.kind == "joint":
            return True           # every joint block contributes to the word maps
        return self._layer_ok(call.layer) and self._step_ok(call.step)

    def attention(self, call: Call, q, k, v):
        if call.kind == "cross":
            if self.masks is not None:
                self.masks.capture(q, k, call.extra, call.site, call)
            return None
        if call.kind == "joint" and self.masks is not None:
            self.masks.capture_dit(q, k, call)
        if not (self._layer_ok(call.layer) and self._step_ok(call.step)):
            return None
        pairs = [p for c in call.chunks for p in c.pairs]
        if not pairs:
            return None
        t, s = [p[0] for p in pairs], [p[1] for p in pairs]
        self._note(call)
        if call.kind == "joint":
            img = call.img_slice()
            k2, v2 = k.clone(), v.clone()
            k2[t, :, img], v2[t, :, img] = k[s, :, img], v[s, :, img]
            if self.masks is not None:   # k2/v2 already hold the source's image keys/values in the target rows
                edit = self._masked(call, q, lambda t, s: (k2[t:t + 1], v2[t:t + 1]),
                                    lambda a, b, c, bias=None: attend_dit(call, a, b, c, bias), img)
                if edit is not None:
                    return edit
            return Replace(t, q, k2, v2)
        if call.kind == "image":
            k2, v2 = k.clone(), v.clone()
            k2[t], v2[t] = k[s], v[s]
            return Replace(t, q, k2, v2)
        if self.masks is not None:
            edit = self._masked(call, q, lambda t, s: (k[s:s + 1], v[s:s + 1]),
                                lambda a, b, c, bias=None: attend(a, b, c, call.extra, bias))
            if edit is not None:
                return edit
        k2, v2 = k.clone(), v.clone()
        k2[t], v2[t] = k[s], v[s]
        return Replace(t, q, k2, v2)

    # --- mask-guided ------------------------------------------------------------------------------
    def _row_masks(self, call: Call) -> Optional[torch.Tensor]:
        """(chunk rows, Lq) bool object masks at this layer's resolution, from this step's maps."""
        if call.hw is None:
            return None
        maps = self.masks.raw(self.mask_level, current_step=True)
        if maps is None:
            return None
        m = maps.float().sum(1, keepdim=True)                                      # (b, 1, h, w)
        lo = m.flatten(1).amin(1).reshape(-1, 1, 1, 1)
        hi = m.flatten(1).amax(1).reshape(-1, 1, 1, 1)
        m = (m - lo) / (hi - lo).clamp_min(1e-12)
        m = F.interpolate(m, size=call.hw, mode="bilinear", align_corners=False)
        return (m > self.threshold).flatten(1)

    def _masked(self, call: Call, q, kv, attn, img: slice = slice(None)):
        """Target queries over the source's object / background keys, mixed by the target's mask.

        kv(t, s) gives the (1, ...) keys/values a target row reads, attn(q, k, v, bias=None) the layer's
        attention; `img` selects the image tokens among queries and keys (UNets: all of them)."""
        masks = self._row_masks(call)
        if masks is None:
            return None
        rows, outs = [], []
        for c in call.chunks:
            if masks.shape[0] != c.size:
                return None
            for t, s, _ in c.pairs:
                ms, mt = masks[s - c.start].to(q.device), masks[t - c.start].to(q.device)
                qr, (kr, vr) = q[t:t + 1], kv(t, s)
                if not bool(ms.any()) or bool(ms.all()):
                    out = attn(qr, kr, vr)
                else:
                    fg_bias = torch.zeros(1, kr.shape[-2], device=q.device, dtype=q.dtype)
                    bg_bias = torch.zeros(1, kr.shape[-2], device=q.device, dtype=q.dtype)
                    fg_bias[0, img] = torch.where(ms, 0.0, _NEG).to(q.dtype)
                    bg_bias[0, img] = torch.where(ms, _NEG, 0.0).to(q.dtype)
                    fg, bg = attn(qr, kr, vr, fg_bias), attn(qr, kr, vr, bg_bias)
                    w = mt.to(fg.dtype)[None, :, None]
                    mix = fg[:, img] * w + bg[:, img] * (1 - w)
                    if img == slice(None):
                        out = mix
                    else:   # the text queries keep the unmasked attention
                        out = attn(qr, kr, vr).clone()
                        out[:, img] = mix
                rows.append(t)
                outs.append(out)
        if not rows:
            return None
        return Rows(rows, torch.cat(outs))
