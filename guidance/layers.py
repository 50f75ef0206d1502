"""Layer selection and per-branch attention perturbation for PAG and SAG, on UNets and DiTs.

Sites come from `core.introspect.attention_layout(model)`: UNet self-attention (attn1) sites, or
DiT blocks (Flux double/single, SD3 joint). A perturbation is installed on a *copy* of the run's
model_options for one model call and acts only on the batch chunks whose `cond_or_uncond` index
names the perturbed branch, so a perturbed branch is evaluated in the same batched call as cond
and uncond. Whatever occupied the hook before (another pack's attn1 replace, an attention
override, a DiT block replace) still runs for the other chunks, and sees only those chunks.

* UNet: an attn1 replace per chosen site (chained to the previous occupant).
* DiT: a "dit" block replace per chosen block marks transformer_options for the duration of the
  block; the attention override acts only inside marked blocks (Flux and SD3 alike: SD3 sets no
  block_index, so the marker is the only reliable way to know the block).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..core.introspect import AttnSite, DitBlock, Layout, attention_layout
from ..core.patches import SharedPatch

MARK = "editkit_guidance_blocks"


@dataclass(frozen=True)
class Site:
    """A chosen layer: a UNet attn1 site or a DiT block."""
    arch: str                 # "unet" | "flux" | "mmdit" | ...
    unet: Optional[AttnSite] = None
    dit: Optional[DitBlock] = None

    @property
    def name(self) -> str:
        if self.unet is not None:
            s = self.unet
            return f"{s.block} {s.number}" + (f".{s.depth}" if s.depth else "")
        kind = "double" if self.dit.kind == "double_block" else "single"
        return f"{kind} {self.dit.index}"


def available(layout: Layout) -> list[str]:
    if layout.sites:
        return [Site(layout.architecture, unet=s).name for s in layout.sites]
    return [Site(layout.architecture, dit=b).name for b in layout.dit_blocks]


def parse_layers(layout: Layout, spec: str) -> list[Site]:
    """Resolve a layer spec against a model layout.

    "auto": the UNet middle block (the PAG/SAG papers' choice), or the middle DiT block by depth.
    "all": every site. Otherwise comma-separated names: "middle", "input 4", "output 1.2"
    (block number, optional depth inside the transformer), "double 3", "single 7" (DiT), or
    "#5" (the fifth site in execution order, 0-based). Raises ValueError naming what exists.
    """
    arch = layout.architecture
    if layout.sites:
        all_sites = [Site(arch, unet=s) for s in layout.sites]
    elif layout.dit_blocks:
        all_sites = [Site(arch, dit=b) for b in layout.dit_blocks]
    else:
        raise ValueError(f"this model ({arch}) has no attention layers EditKit knows how to perturb")
    spec = (spec or "").strip().lower()
    if spec in ("", "auto"):
        if layout.sites:
            mid = [s for s in all_sites if s.unet.block == "middle"]
            if mid:
                return mid
            coarsest = max(s.unet.downsample for s in all_sites)
            return [s for s in all_sites if s.unet.downsample == coarsest]
        return [all_sites[len(all_sites) // 2]]
    if spec == "all":
        return all_sites
    chosen: list[Site] = []
    for token in [t.strip() for t in spec.split(",") if t.strip()]:
        found = _match(all_sites, token)
        if not found:
            raise ValueError(f"no layer '{token}' in this model; it has: {', '.join(available(layout))}")
        for s in found:
            if s not in chosen:
                chosen.append(s)
    return chosen


def _match(sites: list[Site], token: str) -> list[Site]:
    m = re.fullmatch(r"#\s*(\d+)", token)
    if m:
        i = int(m.group(1))
        return [sites[i]] if i < len(sites) else []
    m = re.fullmatch(r"(input|middle|output|double|single)(?:\s*(\d+)(?:\.(\d+))?)?", token)
    if not m:
        return []
    kind, num, depth = m.group(1), m.group(2), m.group(3)
    out = []
    for s in sites:
        if s.unet is not None and kind in ("input", "middle", "output"):
            u = s.unet
            if u.block == kind and (num is None or int(num) == u.number) and (depth is None or int(depth) == u.depth):
                out.append(s)
        elif s.dit is not None and kind in ("double", "single"):
            b = s.dit
            if b.kind == f"{kind}_block" and (num is None or int(num) == b.index):
                out.append(s)
    return out


def resolve(model, spec: str) -> tuple[Site, ...]:
    return tuple(parse_layers(attention_layout(model), spec))


# ---------------------------------------------------------------------------------------------
# Row helpers: a batched call holds len(cond_or_uncond) equal chunks
# ---------------------------------------------------------------------------------------------

def _rows(cou: list, keep: Callable[[int], bool], batch: int) -> torch.Tensor:
    chunk = batch // len(cou)
    idx = [i * chunk + j for i, c in enumerate(cou) if keep(c) for j in range(chunk)]
    return torch.tensor(idx, dtype=torch.long)


def _sub_extra(extra: dict, cou: list, keep: Callable[[int], bool]) -> dict:
    sub = dict(extra)
    sub["cond_or_uncond"] = [c for c in cou if keep(c)]
    if "uuids" in extra and len(extra["uuids"]) == len(cou):
        sub["uuids"] = [u for u, c in zip(extra["uuids"], cou) if keep(c)]
    return sub


def _heads_first(t: torch.Tensor, heads: int, skip_reshape: bool) -> torch.Tensor:
    """q/k/v in any layout ComfyUI's attention accepts -> (B, H, L, d)."""
    if skip_reshape:                      # (B, H, L, d)
        return t
    if t.ndim == 4:                       # (B, L, H, d), e.g. SD3's joint blocks
        return t.transpose(1, 2)
    b, l, hd = t.shape                    # (B, L, H*d)
    return t.reshape(b, l, heads, hd // heads).transpose(1, 2)


def _identity_attention(v: torch.Tensor, heads: int, skip_reshape: bool, skip_output_reshape: bool) -> torch.Tensor:
    """What attention returns when every query attends only to itself: its own value."""
    vh = _heads_first(v, heads, skip_reshape)
    if skip_output_reshape:
        return vh
    b, h, l, d = vh.shape
    return vh.transpose(1, 2).reshape(b, l, h * d)


def received_attention(q: torch.Tensor, k: torch.Tensor, heads: int, skip_reshape: bool,
                       query_slice: slice, key_slice: slice) -> torch.Tensor:
    """Head-averaged attention each key receives, summed over queries: (B, L_keys), float32.

    Softmax runs over all keys; the sum is restricted to the given query and key token ranges.
    """
    qh = _heads_first(q, heads, skip_reshape).float()
    kh = _heads_first(k, heads, skip_reshape).float()
    d = qh.shape[-1]
    probs = (qh[:, :, query_slice] @ kh.transpose(-1, -2) * d ** -0.5).softmax(-1)
    return probs[..., key_slice].mean(1).sum(1)


# ---------------------------------------------------------------------------------------------
# Perturbation plan for one model call
# ---------------------------------------------------------------------------------------------

class Perturb:
    """What happens at one chosen site for one batch chunk index: identity attention (PAG) or a
    recorded attention map (SAG, no change to the output)."""
    IDENTITY, RECORD = "identity", "record"


class _Plan(SharedPatch):
    """Per-call plan: for each site, {chunk index: action}; recorded maps land in `maps`."""

    def __init__(self, per_site: dict, grid_for: Callable):
        self.per_site = per_site          # Site -> {branch index: action}
        self.grid_for = grid_for          # Site, L_tokens -> (h, w) image grid or None
        self.maps: dict = {}              # (Site, branch) -> (B, h, w) received-attention map
        self.sites_hit: list = []         # (Site, action, branch) per perturbed call (diagnostics)


class _UNetAttn1(SharedPatch):
    def __init__(self, plan: _Plan, site: Site, prev):
        self.plan, self.site, self.prev = plan, site, prev

    def __call__(self, q, k, v, extra):
        from ..core.patches import call_attention
        actions = self.plan.per_site.get(self.site, {})
        cou = list(extra.get("cond_or_uncond", [0]))
        ident = {c for c, a in actions.items() if a == Perturb.IDENTITY and c in cou}
        rec = [c for c, a in actions.items() if a == Perturb.RECORD and c in cou]
        for c in rec:
            rows = _rows(cou, lambda x, c=c: x == c, q.shape[0]).to(q.device)
            m = received_attention(q[rows], k[rows], extra["n_heads"], False, slice(None), slice(None))
            h, w = self.plan.grid_for(self.site, m.shape[-1])
            self.plan.maps[(self.site, c)] = m.reshape(-1, h, w)
            self.plan.sites_hit.append((self.site, Perturb.RECORD, c))
        if not ident:
            return call_attention(self.prev, q, k, v, extra)
        for c in ident:
            self.plan.sites_hit.append((self.site, Perturb.IDENTITY, c))
        keep = lambda x: x not in ident  # noqa: E731
        out = _identity_attention(v, extra["n_heads"], False, False).clone()
        if any(keep(c) for c in cou):
            rows = _rows(cou, keep, q.shape[0]).to(q.device)
            out[rows] = call_attention(self.prev, q[rows], k[rows], v[rows], _sub_extra(extra, cou, keep)).to(out.dtype)
        return out


class _DitMarker(SharedPatch):
    """DiT block replace: mark transformer_options while this block runs, then run the block (or the previous patch)."""

    def __init__(self, site: Site, prev):
        self.site, self.prev = site, prev

    def __call__(self, args, extra):
        from ..core.patches import call_dit_block
        args = dict(args)
        to = dict(args.get("transformer_options") or {})
        to[MARK] = to.get(MARK, ()) + (self.site,)
        args["transformer_options"] = to
        return call_dit_block(self.prev, args, extra)


class _DitOverride(SharedPatch):
    """Attention override acting only inside marked DiT blocks, on the perturbed chunks."""

    def __init__(self, plan: _Plan, n_img: int, prev):
        self.plan, self.n_img, self.prev = plan, n_img, prev

    def __call__(self, func, *args, **kwargs):
        from ..core.patches import next_attention
        run = next_attention(self.prev, func)
        to = kwargs.get("transformer_options") or {}
        sites = to.get(MARK, ())
        if not sites:
            return run(*args, **kwargs)
        actions: dict = {}
        for s in sites:
            actions.update(self.plan.per_site.get(s, {}))
        site = sites[-1]
        cou = list(to.get("cond_or_uncond", [0]))
        q, k, v = args[0], args[1], args[2]
        heads = args[3] if len(args) > 3 else kwargs.get("heads")
        skip_reshape = bool(kwargs.get("skip_reshape", False))
        skip_out = bool(kwargs.get("skip_output_reshape", False))
        rec = [c for c, a in actions.items() if a == Perturb.RECORD and c in cou]
        for c in rec:
            rows = _rows(cou, lambda x, c=c: x == c, q.shape[0]).to(q.device)
            length = _heads_first(q, heads, skip_reshape).shape[2]
            img = slice(length - self.n_img, length)
            m = received_attention(q[rows], k[rows], heads, skip_reshape, img, img)
            m = m / m.mean(-1, keepdim=True).clamp_min(1e-12)   # mean 1, as self-attention maps are in a UNet
            h, w = self.plan.grid_for(site, m.shape[-1])
            self.plan.maps[(site, c)] = m.reshape(-1, h, w)
            self.plan.sites_hit.append((site, Perturb.RECORD, c))
        ident = {c for c, a in actions.items() if a == Perturb.IDENTITY and c in cou}
        if not ident:
            return run(*args, **kwargs)
        for c in ident:
            self.plan.sites_hit.append((site, Perturb.IDENTITY, c))
        keep = lambda x: x not in ident  # noqa: E731
        out = _identity_attention(v, heads, skip_reshape, skip_out).clone()
        if any(keep(c) for c in cou):
            rows = _rows(cou, keep, q.shape[0]).to(q.device)
            sub_args = (q[rows], k[rows], v[rows]) + tuple(args[3:])
            sub_kwargs = dict(kwargs)
            mask = sub_kwargs.get("mask")
            if torch.is_tensor(mask) and mask.ndim >= 1 and mask.shape[0] == q.shape[0]:
                sub_kwargs["mask"] = mask[rows]
            sub_kwargs["transformer_options"] = _sub_extra(to, cou, keep)
            out[rows] = run(*sub_args, **sub_kwargs).to(out.dtype)
        return out


def _patch_size(model) -> int:
    p = getattr(model.model.diffusion_model, "patch_size", 2) or 2
    return int(p[-1] if isinstance(p, (tuple, list)) else p)


def latent_grid(model, site: Site, latent_hw: tuple[int, int], tokens: int) -> tuple[int, int]:
    """Spatial grid (h, w) of a site's image tokens for a latent of size latent_hw."""
    lh, lw = latent_hw
    if site.unet is not None:
        h, w = site.unet.resolution(lh, lw)
        if h * w == tokens:
            return h, w
    else:
        p = _patch_size(model)
        h, w = math.ceil(lh / p), math.ceil(lw / p)
        if h * w == tokens:
            return h, w
    # fall back to the factorisation closest to the latent's aspect ratio (as ComfyUI's SAG does)
    best = None
    for a in range(1, tokens + 1):
        if tokens % a == 0:
            err = abs(a / (tokens // a) - lh / lw)
            if best is None or err < best[0]:
                best = (err, a)
    return best[1], tokens // best[1]


def image_tokens(model, latent_hw: tuple[int, int]) -> int:
    p = _patch_size(model)
    return math.ceil(latent_hw[0] / p) * math.ceil(latent_hw[1] / p)


def install(model_options: dict, model, per_site: dict, latent_hw: tuple[int, int]) -> tuple[dict, _Plan]:
    """A copy of model_options with the perturbations of `per_site` installed; returns it and the plan."""
    import comfy.model_patcher
    plan = _Plan(per_site, lambda site, tokens: latent_grid(model, site, latent_hw, tokens))
    mo = dict(model_options)
    mo["transformer_options"] = dict(model_options.get("transformer_options", {}))
    dit = False
    for site in per_site:
        to = mo["transformer_options"]
        table = to.get("patches_replace", {})
        if site.unet is not None:
            key = site.unet.key
            attn1 = table.get("attn1", {})
            prev = attn1.get(key, attn1.get(key[:2]))
            comfy.model_patcher.set_model_options_patch_replace(mo, _UNetAttn1(plan, site, prev), "attn1", key[0], key[1], key[2])
        else:
            dit = True
            prev = table.get("dit", {}).get((site.dit.kind, site.dit.index))
            comfy.model_patcher.set_model_options_patch_replace(mo, _DitMarker(site, prev), "dit", site.dit.kind, site.dit.index)
    if dit:
        to = dict(mo["transformer_options"])
        to["optimized_attention_override"] = _DitOverride(plan, image_tokens(model, latent_hw), to.get("optimized_attention_override"))
        mo["transformer_options"] = to
    return mo, plan
