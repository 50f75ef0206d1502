"""Regional attention: one-pass regional prompting at the UNet's cross-attention layers.

Each region's prompt tokens are appended to the layer's text context (an `attn2_patch`, ComfyUI's
own hook, so the layer's own to_k/to_v project them); the attn2 replace patch then restricts them:

* "masked" (CAC / NoiseCollage-style masked cross-attention): a query pixel attends to region r's tokens
  only inside region r's mask; the global prompt's tokens stay visible everywhere (or, with
  `global_in_regions=False`, only outside every region). The mask is a logit bias of rank
  (regions + 2) that ComfyUI's fast attention computes exactly through extra channels
  (softmax(q k^T / sqrt(d) + a(p) b(j)^T) v), never a materialized attention matrix;
* "dense_diffusion" (Kim et al. 2023, cross-attention modulation): logits of region tokens are raised
  inside the region and lowered outside, M = lambda_t R (max S - S)(1 - area) - lambda_t (1 - R)(S - min S)(1 - area),
  lambda_t = strength (t / T)^5 (the paper code's schedule); this needs the logits, so those layers
  compute attention explicitly.

Uncond rows never see the region tokens (they are masked out entirely: the negative prompt is unchanged).
A previous occupant of the attn2 slot (Prompt-to-Prompt, IP-Adapter, another pack) runs on the original
tokens; the regional change is added: out = prev(q, k, v) + regional(q, k+, v+) - attention(q, k, v).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ..attention.bias import lowrank_augment
from ..core.introspect import attention_layout
from ..core.patches import SharedPatch, call_attention, chain_attn_replace, default_attention
from .regions import at_grid, latent_grid, layer_grid, rows_per_sample

MARK = "editkit_regional_tokens"
BLOCK = 1000.0        # logit penalty of a blocked token: exp(-1000) is 0 in every float type
MODES = ("masked", "dense_diffusion")


def lowrank_bias_attention(q, k, v, extra: dict, qf: torch.Tensor, kf: torch.Tensor):
    """softmax(q k^T / sqrt(d) + qf kf^T) v per head with ComfyUI's attention kernels.

    q, k, v: (B, L, heads * d) projected tensors; qf (B, Lq, r), kf (B, Lk, r): the bias factors.
    """
    heads = extra["n_heads"]
    b, lq, inner = q.shape
    lk = k.shape[1]
    d = inner // heads
    qa, ka, va = lowrank_augment(q.reshape(b, lq, heads, d), k.reshape(b, lk, heads, d), v.reshape(b, lk, heads, d), qf, kf)
    out = default_attention(qa.reshape(b, lq, -1), ka.reshape(b, lk, -1), va.reshape(b, lk, -1), extra)
    return out.reshape(b, lq, heads, -1)[..., :d].reshape(b, lq, inner)


def masked_factors(m: torch.Tensor, base: int, starts, lens, lk: int, global_in_regions: bool = True,
                   q_text: int = 0):
    """The masked-cross-attention logit bias as rank-(R + 2) factors (qf (B, Lq, R+2), kf (B, Lk, R+2)).

    m: (B, Lq_img, R) hard region masks of the image queries (zero on uncond rows); keys [0, base) are the
    global prompt, region r's tokens are keys [starts[r], starts[r] + lens[r]). Image query p sees region
    r's tokens only where m[p, r] = 1; the global tokens everywhere (global_in_regions) or only outside every
    region. DiT joint attention (q_text > 0: the first q_text queries are the text tokens, in key order):
    the global prompt's text rows never see region tokens (so the region prompts reach the rest of the image
    only through the image tokens inside their region), region r's text rows see the global prompt, their own
    tokens and every image token (they are read only inside region r).
    """
    b, lqi, R = m.shape
    lq = q_text + lqi
    kf = torch.zeros(b, lk, R + 2, device=m.device)
    qf = torch.zeros(b, lq, R + 2, device=m.device)
    qf[..., R] = 1.0
    kf[:, base:base + sum(lens), R] = -BLOCK                # region tokens blocked ...
    for r, (s, n) in enumerate(zip(starts, lens)):
        qf[:, q_text:, r] = m[..., r]
        if q_text:
            qf[:, s:s + n, r] = 1.0                          # (DiT) the region's own text rows
        kf[:, s:s + n, r] = BLOCK                            # ... except inside their region
    if not global_in_regions:                                # global tokens only outside every region
        qf[:, q_text:, R + 1] = m.amax(dim=-1)
        kf[:, :base, R + 1] = -BLOCK
    return qf, kf


class RegionTokens(SharedPatch):
    """attn2_patch: append every region's prompt tokens to the cross-attention context while active."""

    def __init__(self, regional: "RegionalAttention"):
        self.regional = regional

    def __call__(self, n, context, value, extra):
        reg = self.regional
        if context is None or not reg.active(extra):
            return n, context, value
        b = context.shape[0]
        toks = [r.context.to(device=context.device, dtype=context.dtype).expand(b, -1, -1) for r in reg.regions]
        extra[MARK] = (context.shape[1], tuple(t.shape[1] for t in toks))
        ctx = torch.cat([context, *toks], dim=1)
        if value is context:
            return n, ctx, ctx
        if value is None:
            return n, ctx, None
        return n, ctx, torch.cat([value, *toks], dim=1)


class RegionalAttention(SharedPatch):
    """Configuration shared by the context patch and the per-layer replace patches (immutable)."""

    def __init__(self, node: str, regions, mode: str = "masked", strength: float = 1.0, global_in_regions: bool = True,
                 sigma_start: float = float("inf"), sigma_end: float = 0.0, downscale: int = 8, model_sampling=None):
        self.node, self.regions, self.mode, self.strength = node, tuple(regions), mode, float(strength)
        self.global_in_regions = bool(global_in_regions)
        self.sigma_start, self.sigma_end, self.downscale = sigma_start, sigma_end, downscale
        self.ms = model_sampling
        self._masks: dict = {}      # geometry -> (masks, cond rows): derived data only, never configuration

    def active(self, extra: dict) -> bool:
        sig = extra.get("sigmas")
        if sig is None:
            return True
        s = float(sig.max())
        return self.sigma_end <= s <= self.sigma_start

    def lam(self, extra: dict) -> float:
        """DenseDiffusion's time weight strength * (t / T)^5."""
        sig = extra.get("sigmas")
        if sig is None or self.ms is None:
            return self.strength
        t = float(self.ms.timestep(sig.max().reshape(1).to(torch.float32).cpu()))
        tmax = float(self.ms.timestep(self.ms.sigma_max.reshape(1).float().cpu()))
        return self.strength * (max(t, 0.0) / max(tmax, 1e-8)) ** 5

    # --- per call geometry ------------------------------------------------------------------------
    def query_masks(self, extra: dict, b: int, lq: int, device, dtype) -> torch.Tensor:
        """(B, Lq, R) region coverage per query row: zero on uncond rows (cached per geometry: the same for
        every layer of a resolution and every step)."""
        shape = extra.get("original_shape")
        lat_h, lat_w = int(shape[-2]), int(shape[-1])
        cou = list(extra.get("cond_or_uncond") or [0])
        key = (lat_h, lat_w, b, lq, tuple(cou), str(device), dtype, torch.is_inference_mode_enabled())
        hit = self._masks.get(key)
        if hit is None:
            hit = self._query_masks(lat_h, lat_w, cou, b, lq, device, dtype)
            if len(self._masks) > 64:
                self._masks.clear()
            self._masks[key] = hit
        return hit

    def _query_masks(self, lat_h, lat_w, cou, b, lq, device, dtype):
        h, w = layer_grid(lat_h, lat_w, lq)
        rows = []
        for i, r in enumerate(self.regions):
            g = at_grid(latent_grid(self.node, r, lat_h, lat_w, self.downscale, i), h, w).reshape(-1, lq)
            idx = rows_per_sample(g.shape[0], b, len(cou))
            rows.append(g[idx])
        m = torch.stack(rows, dim=-1).to(device=device, dtype=dtype)    # (B, Lq, R)
        per = max(b // len(cou), 1)
        cond = torch.tensor([cou[min(i // per, len(cou) - 1)] == 0 for i in range(b)], device=device, dtype=dtype)
        return m * cond[:, None, None], cond

    def key_layout(self, mark, lk: int):
        base, lens = mark
        starts, s = [], base
        for n in lens:
            starts.append(s)
            s += n
        return base, starts, lens, s

    def replace(self, prev: Optional[Callable]) -> Callable:
        def attn2(q, k, v, extra):
            mark = extra.get(MARK)
            if mark is None:
                return call_attention(prev, q, k, v, extra)
            base, starts, lens, end = self.key_layout(mark, k.shape[1])
            if self.mode == "dense_diffusion":
                out = self.dense(q, k, v, extra, base, starts, lens, end)
            else:
                out = self.masked(q, k, v, extra, base, starts, lens, end)
            if prev is None:
                return out
            k0 = torch.cat([k[:, :base], k[:, end:]], dim=1)
            v0 = torch.cat([v[:, :base], v[:, end:]], dim=1)
            return prev(q, k0, v0, extra) + (out - default_attention(q, k0, v0, extra))
        return attn2

    def masked(self, q, k, v, extra, base, starts, lens, end):
        b, lq, lk = q.shape[0], q.shape[1], k.shape[1]
        m, _ = self.query_masks(extra, b, lq, q.device, torch.float32)
        m = (m > 0.5).float()                                   # hard regions at this layer's grid
        qf, kf = masked_factors(m, base, starts, lens, lk, self.global_in_regions)
        return lowrank_bias_attention(q, k, v, extra, qf, kf)

    def dense(self, q, k, v, extra, base, starts, lens, end):
        heads = extra["n_heads"]
        b, lq, inner = q.shape
        lk = k.shape[1]
        d = inner // heads
        m, cond = self.query_masks(extra, b, lq, q.device, torch.float32)
        qh = q.reshape(b, lq, heads, d).transpose(1, 2).float()
        kh = k.reshape(b, lk, heads, d).transpose(1, 2).float()
        vh = v.reshape(b, lk, heads, d).transpose(1, 2).float()
        s = qh @ kh.transpose(-1, -2) / math.sqrt(d)            # (B, H, Lq, Lk)
        smax, smin = s.amax(-1, keepdim=True), s.amin(-1, keepdim=True)
        lam = self.lam(extra)
        mod = torch.zeros_like(s)
        for r, (st, n) in enumerate(zip(starts, lens)):
            R = m[..., r][:, None, :, None]                     # (B, 1, Lq, 1)
            area = m[..., r].mean(dim=1)[:, None, None, None]   # (B, 1, 1, 1)
            sl = s[..., st:st + n]
            mod[..., st:st + n] = lam * (1 - area) * (R * (smax - sl) - (1 - R) * (sl - smin))
        unc = (cond == 0)[:, None, None, None]
        mod[..., base:end] = torch.where(unc, torch.full_like(mod[..., base:end], -BLOCK * 50), mod[..., base:end])
        p = torch.softmax(s + mod, dim=-1)
        out = (p @ vh).transpose(1, 2).reshape(b, lq, inner)
        return out.to(q.dtype)


def install(m, regional: RegionalAttention) -> int:
    """Install on a clone: the context patch and a replace on every cross-attention site. Returns the site count."""
    layout = attention_layout(m)
    sites = [s for s in layout.sites if s.cross]
    m.set_model_attn2_patch(RegionTokens(regional))
    for site in sites:
        chain_attn_replace(m, "attn2", site.key, regional.replace)
    return len(sites)
