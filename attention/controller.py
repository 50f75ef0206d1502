"""The attention controller: the one mechanism every EditKit attention technique uses.

A technique (Prompt-to-Prompt, MasaCtrl, Plug-and-Play, StyleAligned, reference attention, map
capture) is a `Technique` object installed on a model clone by `install()`. The controller:

* patches only the layers the technique asks for: attn1/attn2 replace patches on UNets (keyed by
  `core.introspect.AttnSite`), the attention override on DiTs (SD3, Flux: one joint attention per
  block, text tokens first). Every other layer keeps ComfyUI's optimized attention untouched;
* tells the technique, per call, the step (index, count, progress), the layer (site or DiT block,
  execution order, token grid) and which batch row is which branch (`Chunk`: cond/uncond chunk,
  source rows, (target, source) pairs), following the EditKit branch contract (core/branches.py,
  re-exported here): with the branch names declared each cond_or_uncond chunk holds the branches
  stacked in that order; without them ("generated pair") row 0 of each chunk is the source;
* runs the technique's edit with ComfyUI's attention (`attend`), never a hand-written softmax,
  unless a technique explicitly needs probabilities (map capture);
* chains to the previous occupant of the slot: with no previous patch the edited rows are computed
  directly; with one (another pack's IP-Adapter, another EditKit technique) the previous patch
  runs on the original inputs and the technique's change is added on the rows it edits
  (out = prev(q, k, v) + attend(edited) - attend(original)). Unedited calls go straight to the
  previous occupant / ComfyUI, so a technique that edits nothing is bit-identical to no patch;
* resets per-run state in an OUTER_SAMPLE wrapper and lets the technique post-process the result.

Patch objects are `SharedPatch`es, immutable after install; per-run state lives behind a lock.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..core import denoiser
from ..core.branches import branch_layout, branches_of, chunks_of  # noqa: F401  (branch_layout: old import path)
from ..core.features import DIT_KINDS, UNET_HOOKS, install_hook
from ..core.introspect import AttnSite, attention_layout, dit_tokens
from ..core.patches import SharedPatch, add_wrapper, chain_attention_override, chain_attn_replace, default_attention
from .bias import bias_augment

_DIT_KEY = "editkit_dit_call"


# ---------------------------------------------------------------------------------------------
# What a technique sees per call, and what it returns
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DitSite:
    """A DiT attention layer: block kind/index and execution order (layer)."""
    kind: str          # "double_block" | "single_block" | "joint_block"
    index: int
    order: int


@dataclass
class Call:
    kind: str                  # "self" / "cross" (UNet attn1 / attn2), "joint" (DiT txt+img), "image" (DiT img-only)
    site: object               # AttnSite | DitSite
    layer: int                 # execution order of the layer
    n_layers: int
    step: int
    n_steps: int
    progress: float            # step / n_steps, 0 at the first step
    chunks: list
    heads: int
    hw: Optional[tuple]        # token grid (h, w) of the image part
    extra: dict
    txt: int = 0               # DiT: number of text tokens before the image tokens
    img: int = 0               # DiT: number of image tokens
    func: Optional[Callable] = None      # DiT: attention function for the rest of the chain
    kwargs: dict = field(default_factory=dict)
    backend: Optional[Callable] = None   # DiT: ComfyUI's attention function itself (helper computations)

    @property
    def is_dit(self) -> bool:
        return self.kind in ("joint", "image")

    def img_slice(self) -> slice:
        return slice(self.txt, self.txt + self.img) if self.kind == "joint" else slice(0, self.img)

    def in_window(self, start: float, end: float) -> bool:
        return start <= self.progress < end or (end >= 1.0 and self.progress >= start)


@dataclass
class Replace:
    """Same-shape edit: the whole batch's q/k/v with the edited rows changed (one attention call)."""
    rows: list
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


@dataclass
class Rows:
    """Explicit outputs for some rows (computed by the technique with `attend`)."""
    rows: list
    out: torch.Tensor


# ---------------------------------------------------------------------------------------------
# Attention with ComfyUI's kernels (+ an exact per-key logit bias without a materialized mask)
# ---------------------------------------------------------------------------------------------

def attend(q, k, v, extra: dict, bias: Optional[torch.Tensor] = None):
    """ComfyUI's optimized attention on projected (B, L, heads*dim) tensors, optional per-key logit bias."""
    if bias is None:
        return default_attention(q, k, v, extra)
    heads = extra["n_heads"]
    b, lq, inner = q.shape
    d = inner // heads
    qa, ka, va = bias_augment(q.reshape(b, lq, heads, d), k.reshape(b, k.shape[1], heads, d),
                              v.reshape(b, v.shape[1], heads, d), bias)
    out = default_attention(qa.reshape(b, lq, -1), ka.reshape(b, k.shape[1], -1), va.reshape(b, v.shape[1], -1), extra)
    return out.reshape(b, lq, heads, qa.shape[-1])[..., :d].reshape(b, lq, inner)


def attend_dit(call: Call, q, k, v, bias: Optional[torch.Tensor] = None):
    """The DiT chain's attention on (B, heads, L, d) tensors; returns what the model expects."""
    kwargs = dict(call.kwargs)
    kwargs["skip_reshape"] = True
    if bias is None:
        return call.func(q, k, v, call.heads, **kwargs)
    d = q.shape[-1]
    t = lambda x: x.transpose(1, 2)  # (B, L, H, d)
    qa, ka, va = bias_augment(t(q), t(k), t(v), bias, kwargs.get("scale"))
    kwargs["skip_output_reshape"] = True
    out = call.func(t(qa), t(ka), t(va), call.heads, **kwargs)   # (B, H, L, d + pad)
    out = out[..., :d]
    if call.kwargs.get("skip_output_reshape"):
        return out
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


def _dit_rows_format(call: Call, x: torch.Tensor) -> torch.Tensor:
    """Convert DiT inputs that are not already (B, heads, L, d) (SD3 passes them unreshaped)."""
    if call.kwargs.get("skip_reshape"):
        return x
    return x.reshape(x.shape[0], x.shape[1], call.heads, -1).transpose(1, 2)   # (B, L, H*d) or SD3's (B, L, H, d) values


# ---------------------------------------------------------------------------------------------
# Techniques
# ---------------------------------------------------------------------------------------------

class Technique(SharedPatch):
    """Base class. Subclasses set `name` and override the hooks they need; config is set in __init__
    and never changed afterwards; per-run state is created in begin_run() under self.lock."""

    name = "technique"
    uses_dit = False          # supports DiT joint attention through the override

    def __init__(self):
        self.lock = threading.Lock()
        self.runs = 0

    # --- which layers -------------------------------------------------------------------------
    def attn1_sites(self, layout) -> list:
        return []

    def attn2_sites(self, layout) -> list:
        return []

    def feature_hooks(self, layout) -> list:
        """Optional [(core.features.Hook, fn(tensors, transformer_options) -> dict | None)]: features the
        technique reads or replaces between blocks (installed with core.features.install_hook)."""
        return []

    def post_cfg(self, args: dict):
        """Optional post-CFG hook; return the denoised batch (None: not used)."""
        return None

    # --- per run --------------------------------------------------------------------------------
    def begin_run(self):
        with self.lock:
            self.runs += 1

    def end_run(self, samples, branches=None):
        return samples

    # --- per call -------------------------------------------------------------------------------
    def attention(self, call: Call, q, k, v):
        """Return None (no change), a Replace or a Rows edit."""
        return None

    def wants_dit_call(self, call: Call) -> bool:
        return True


# ---------------------------------------------------------------------------------------------
# Step / layer helpers
# ---------------------------------------------------------------------------------------------

def step_of(extra: dict) -> tuple[int, int, float]:
    sched = extra.get("sample_sigmas")
    sig = extra.get("sigmas")
    if sched is None or sig is None:
        return 0, 1, 0.0
    n = max(len(sched) - 1, 1)
    i = denoiser.step_index(sched, sig)
    return i, n, i / n


def token_grid(extra: dict, site: AttnSite, lq: int):
    shape = extra.get("activations_shape")
    if shape is not None and len(shape) == 4 and shape[2] * shape[3] == lq:
        return int(shape[2]), int(shape[3])
    orig = extra.get("original_shape")
    if orig is not None and len(orig) >= 4:
        h, w = site.resolution(int(orig[-2]), int(orig[-1]))
        if h * w == lq:
            return h, w
    r = int(round(math.sqrt(lq)))
    return (r, r) if r * r == lq else None


def compose(edit, prev: Optional[Callable], q, k, v, extra: dict, run_default: Callable, run_edit: Callable):
    """Apply an edit chaining the previous occupant (see module docstring)."""
    if edit is None:
        return prev(q, k, v, extra) if prev is not None else run_default(q, k, v)
    if isinstance(edit, Replace):
        if prev is None:
            return run_edit(edit.q, edit.k, edit.v)
        out = prev(q, k, v, extra)
        r = list(edit.rows)
        if r:
            delta = run_edit(edit.q[r], edit.k[r], edit.v[r]) - run_default(q[r], k[r], v[r])
            out[r] = out[r] + delta.to(out.dtype)
        return out
    r = list(edit.rows)
    if prev is None:
        others = [i for i in range(q.shape[0]) if i not in set(r)]
        out_r = edit.out
        if not others:
            return out_r
        base = run_default(q[others], k[others], v[others])
        out = base.new_empty((q.shape[0],) + tuple(base.shape[1:]))
        out[others] = base
        out[r] = out_r.to(base.dtype)
        return out
    out = prev(q, k, v, extra)
    out[r] = out[r] + (edit.out - run_default(q[r], k[r], v[r])).to(out.dtype)
    return out


# ---------------------------------------------------------------------------------------------
# Patch objects
# ---------------------------------------------------------------------------------------------

class _UnetAttn(SharedPatch):
    """attn1/attn2 replace patch for one UNet site."""

    def __init__(self, tech: Technique, kind: str, site: AttnSite, n_layers: int, prev):
        self.tech, self.kind, self.site, self.n_layers, self.prev = tech, kind, site, n_layers, prev

    def __call__(self, q, k, v, extra):
        step, n, p = step_of(extra)
        chunks = chunks_of(extra, q.shape[0])
        call = Call("self" if self.kind == "attn1" else "cross", self.site, self.site.order, self.n_layers,
                    step, n, p, chunks, extra["n_heads"], token_grid(extra, self.site, q.shape[1]), extra)
        edit = self.tech.attention(call, q, k, v)
        run = lambda a, b, c: default_attention(a, b, c, extra)
        return compose(edit, self.prev, q, k, v, extra, run, run)


class _DitCall:
    """Per-forward facts for the attention override (set by a DIFFUSION_MODEL wrapper)."""

    def __init__(self, txt: int, img: int, hw, n_layers: int):
        self.txt, self.img, self.hw, self.n_layers = txt, img, hw, n_layers
        self.counter = 0
        self.layer = -1


class _DitOverride(SharedPatch):
    """optimized_attention_override: sees every attention call of a DiT forward."""

    def __init__(self, tech: Technique, prev):
        self.tech, self.prev = tech, prev

    def __call__(self, func, *args, **kwargs):
        to = kwargs.get("transformer_options") or {}
        calls = to.get(_DIT_KEY)
        dc = calls.get(id(self.tech)) if isinstance(calls, dict) else None
        rest = func if self.prev is None else (lambda *a, **kw: self.prev(func, *a, **kw))
        heads = args[3] if len(args) > 3 else kwargs.get("heads")
        if dc is None or len(args) < 3 or len(args) > 4 or heads is None or kwargs.get("mask") is not None:
            return rest(*args, **kwargs)   # not ours, or masked attention (left alone)
        q, k, v = args[0], args[1], args[2]
        skip = kwargs.get("skip_reshape", False)
        lq = q.shape[2] if skip else q.shape[1]
        if lq >= dc.txt + dc.img and dc.txt > 0:     # extra tokens after the image (Flux Kontext references) stay untouched
            kind = "joint"
            bt, bi = to.get("block_type"), to.get("block_index")
            if bt is not None and bi is not None:
                layer = bi if bt == "double" else to.get("editkit_n_double", 0) + bi
            else:
                layer = dc.counter
            dc.layer = layer
            dc.counter += 1
        elif lq == dc.img:
            kind, layer = "image", max(dc.layer, 0)
        else:
            return rest(*args, **kwargs)
        kw = {k2: v2 for k2, v2 in kwargs.items() if k2 not in ("heads", "mask")}
        step, n, p = step_of(to)
        chunks = chunks_of(to, q.shape[0])
        call = Call(kind, DitSite("block", layer, layer), layer, dc.n_layers, step, n, p, chunks, heads, dc.hw, to,
                    dc.txt if kind == "joint" else 0, dc.img, rest, kw, func)
        if not self.tech.wants_dit_call(call):
            return rest(*args, **kwargs)
        q4, k4, v4 = (_dit_rows_format(call, x) for x in (q, k, v))
        edit = self.tech.attention(call, q4, k4, v4)
        if edit is None:
            return rest(*args, **kwargs)
        if isinstance(edit, Replace):
            return attend_dit(call, edit.q, edit.k, edit.v)
        r = list(edit.rows)
        others = [i for i in range(q4.shape[0]) if i not in set(r)]
        if not others:
            return edit.out
        base = attend_dit(call, q4[others], k4[others], v4[others])
        out = base.new_empty((q4.shape[0],) + tuple(base.shape[1:]))
        out[others] = base
        out[r] = edit.out.to(base.dtype)
        return out


def _dit_wrapper(tech: Technique, layout):
    """APPLY_MODEL wrapper: records the text/image token counts of this forward for the override."""
    n_double = sum(1 for b in layout.dit_blocks if b.kind == "double_block")
    n_layers = len(layout.dit_blocks)

    def wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
        txt, hw = dit_tokens(executor.class_obj.diffusion_model, x, c_crossattn)
        if transformer_options is not None:
            calls = dict(transformer_options.get(_DIT_KEY, {}))
            calls[id(tech)] = _DitCall(txt, hw[0] * hw[1], hw, n_layers)
            transformer_options[_DIT_KEY] = calls
            transformer_options["editkit_n_double"] = n_double
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    return wrapper


# ---------------------------------------------------------------------------------------------
# Install
# ---------------------------------------------------------------------------------------------

def install(m, tech: Technique) -> dict:
    """Install `tech` on the model clone `m`. Returns what was patched (for tests and reports)."""
    import comfy.patcher_extension as pe
    layout = attention_layout(m)
    patched = {"attn1": [], "attn2": [], "dit": False, "output_block": False}
    if layout.architecture == "unet":
        n_layers = len(layout.sites)
        for site in tech.attn1_sites(layout):
            chain_attn_replace(m, "attn1", site.key, lambda prev, s=site: _UnetAttn(tech, "attn1", s, n_layers, prev))
            patched["attn1"].append(site)
        for site in tech.attn2_sites(layout):
            if not site.cross:
                continue
            chain_attn_replace(m, "attn2", site.key, lambda prev, s=site: _UnetAttn(tech, "attn2", s, n_layers, prev))
            patched["attn2"].append(site)
        for hook, fn in tech.feature_hooks(layout):
            if hook.kind in UNET_HOOKS:
                install_hook(m, hook, fn)
                patched["output_block"] = True
    elif layout.dit_blocks and tech.uses_dit:
        chain_attention_override(m, lambda prev: _DitOverride(tech, prev))
        add_wrapper(m, pe.WrappersMP.APPLY_MODEL, f"attention_control.dit.{id(tech)}", _dit_wrapper(tech, layout))
        patched["dit"] = True
        for hook, fn in tech.feature_hooks(layout):
            if hook.kind in DIT_KINDS:
                install_hook(m, hook, fn)
                patched.setdefault("dit_blocks", []).append((hook.kind, hook.index))
    if type(tech).post_cfg is not Technique.post_cfg:
        m.set_model_sampler_post_cfg_function(lambda args: _post_cfg(tech, args))

    def outer_sample(executor, *args, **kwargs):
        tech.begin_run()
        out = executor(*args, **kwargs)
        guider = getattr(executor, "class_obj", None)
        to = getattr(guider, "model_options", {}).get("transformer_options", {}) if guider is not None else {}
        return tech.end_run(out, branches_of(to))

    add_wrapper(m, pe.WrappersMP.OUTER_SAMPLE, f"attention_control.{tech.name}.{id(tech)}", outer_sample)
    return patched


def _post_cfg(tech: Technique, args: dict):
    out = tech.post_cfg(args)
    return args["denoised"] if out is None else out


def default_start_layer(n_layers: int, fraction: float = 10 / 16) -> int:
    """MasaCtrl-style 'layer L of N' default: SD1.5 10 of 16, SDXL 44 of 70, DiTs the same fraction."""
    return int(round(n_layers * fraction))


def layers_of(model) -> int:
    layout = attention_layout(model)
    return len(layout.sites) if layout.architecture == "unet" else len(layout.dit_blocks)


def adain(x: torch.Tensor, ref: torch.Tensor, dim: int = -2, eps: float = 1e-5) -> torch.Tensor:
    """Normalise x per channel over tokens (dim) and give it ref's mean and std (StyleAligned's AdaIN)."""
    xf, rf = x.float(), ref.float()
    xm, xs = xf.mean(dim, keepdim=True), (xf.var(dim, keepdim=True) + eps).sqrt()
    rm, rs = rf.mean(dim, keepdim=True), (rf.var(dim, keepdim=True) + eps).sqrt()
    return ((xf - xm) / xs * rs + rm).to(x.dtype)
