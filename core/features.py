"""Features at chosen blocks of UNets and DiTs: hooks to read or replace them, and a recorder that
keeps them (per row, with or without gradients, optionally with the block's self-attention q/k/v).

Hooks (`Hook`) are the places ComfyUI hands features over between blocks, the only ones a patch can
reach without touching a module:
  UNet "input_exit" n     input_block_patch    {"h": the output of input block n}
  UNet "output_entry" n   output_block_patch   {"h": the output of the block before output block n
                                                (the middle block for n = 0), "hsp": its skip input}
  DiT  "double_block" i / "single_block" i    "dit" replace patch    the block's output dict
`install_hook(m, hook, fn)` calls fn(tensors, transformer_options) there; fn returns None (nothing
changes) or the entries to replace. Plug-and-Play injects through it, `FeatureCapture` records.

A `FeaturePoint` names a block's *output*: UNet ("input", n), ("middle", 0), ("output", n) (read
where the next block starts, so the last output block, which feeds the output layer directly, has
none) and DiT ("double_block", i), ("single_block", i): the image tokens laid out on their grid.
`decoder_point(layout, k)` is "the k-th decoder block" from the discovered layout: the output of UNet
decoder level k (an "up block": SD1.x has 4, SDXL 3; negative k counts from the finest), or for a
DiT the block at the same relative depth (see its docstring). DragDiffusion's features are
`decoder_point(layout, -2)`: SD1.x output block 8 (640 channels at latent resolution), SDXL block 5.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional, Sequence, Union

import torch

from .branches import branches_of
from .denoiser import step_index
from .introspect import Layout, attention_layout, dit_tokens
from .patches import SharedPatch, add_wrapper, call_attention, call_dit_block, chain_attention_override, \
    chain_attn_replace, chain_dit_block_replace

UNET_HOOKS = ("input_exit", "output_entry")
DIT_KINDS = ("double_block", "single_block")
_STATE_KEY = "editkit_features"


# ---------------------------------------------------------------------------------------------
# Hooks
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Hook:
    kind: str      # "input_exit" | "output_entry" | "double_block" | "single_block"
    index: int


class _InputExit(SharedPatch):
    def __init__(self, index: int, fn):
        self.index, self.fn = index, fn

    def __call__(self, h, transformer_options):
        if transformer_options.get("block") != ("input", self.index):
            return h
        r = self.fn({"h": h}, transformer_options)
        return h if r is None else r.get("h", h)


class _OutputEntry(SharedPatch):
    def __init__(self, index: int, fn):
        self.index, self.fn = index, fn

    def __call__(self, h, hsp, transformer_options):
        block = transformer_options.get("block")
        if block is None or block[0] != "output" or block[1] != self.index:
            return h, hsp
        r = self.fn({"h": h, "hsp": hsp}, transformer_options)
        return (h, hsp) if r is None else (r.get("h", h), r.get("hsp", hsp))


class _DitExit(SharedPatch):
    def __init__(self, prev, fn, enter=None):
        self.prev, self.fn, self.enter = prev, fn, enter

    def __call__(self, args, extra):
        to = args.get("transformer_options") or {}
        if self.enter is None:
            out = call_dit_block(self.prev, args, extra)
        else:
            self.enter(to, True)
            try:
                out = call_dit_block(self.prev, args, extra)
            finally:
                self.enter(to, False)
        r = self.fn(out, to)
        return out if r is None else {**out, **r}


def install_hook(m, hook: Hook, fn: Callable, enter: Optional[Callable] = None) -> None:
    """Install fn(tensors, transformer_options) -> dict | None at `hook` on the model clone m.

    UNet hooks append to ComfyUI's block-patch lists; DiT hooks chain the block's replace patch
    (the previous occupant runs the block). enter(transformer_options, inside) is told when a DiT
    block starts (True) and ends (False)."""
    if hook.kind == "input_exit":
        m.set_model_input_block_patch(_InputExit(hook.index, fn))
    elif hook.kind == "output_entry":
        m.set_model_output_block_patch(_OutputEntry(hook.index, fn))
    elif hook.kind in DIT_KINDS:
        chain_dit_block_replace(m, hook.kind, hook.index, lambda prev: _DitExit(prev, fn, enter))
    else:
        raise ValueError(f"EditKit: unknown feature hook {hook.kind!r}")


# ---------------------------------------------------------------------------------------------
# Points
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FeaturePoint:
    """The output of one block, as a feature map."""
    block: str            # "input" | "middle" | "output" (UNet) | "double_block" | "single_block" (DiT)
    index: int
    downsample: int = 1   # latent pixels per feature pixel
    channels: int = 0

    @property
    def key(self) -> tuple:
        return (self.block, self.index)

    @property
    def is_dit(self) -> bool:
        return self.block in DIT_KINDS

    def hook(self) -> Hook:
        if self.block == "input":
            return Hook("input_exit", self.index)
        if self.block == "middle":
            return Hook("output_entry", 0)
        if self.block == "output":
            return Hook("output_entry", self.index + 1)
        return Hook(self.block, self.index)


def _layout(model_or_layout) -> Layout:
    return model_or_layout if isinstance(model_or_layout, Layout) else attention_layout(model_or_layout)


def feature_point(model_or_layout, block: str, index: int = 0) -> FeaturePoint:
    """The FeaturePoint of block (block, index), checked against the model's layout."""
    lay = _layout(model_or_layout)
    if lay.architecture == "unet":
        b = lay.unet_block(block, index)
        if b is None:
            raise ValueError(f"EditKit: this UNet has no block ({block!r}, {index})")
        n_out = sum(1 for u in lay.unet_blocks if u.block == "output")
        if block == "output" and index == n_out - 1:
            raise ValueError(f"EditKit: the output of the last UNet block (output {index}) feeds the output layer "
                             "directly and cannot be read; choose an earlier block")
        return FeaturePoint(block, index, b.out_downsample, b.channels)
    if any((d.kind, d.index) == (block, index) for d in lay.dit_blocks):
        return FeaturePoint(block, index, lay.dit_patch or 1, lay.dit_hidden)
    if lay.dit_blocks:
        raise ValueError(f"EditKit: this DiT has no block ({block!r}, {index}); it has "
                         + ", ".join(f"{k} 0-{n - 1}" for k, n in _dit_counts(lay).items()))
    raise _no_layout()


def _no_layout() -> ValueError:
    return ValueError("EditKit: this model has no block layout EditKit can read features from "
                      "(UNets: SD1.x, SD2.x, SDXL; DiTs: SD3, Flux)")


def _dit_counts(lay: Layout) -> dict:
    counts: dict = {}
    for d in lay.dit_blocks:
        counts[d.kind] = counts.get(d.kind, 0) + 1
    return counts


def decoder_point(model_or_layout, k: int, levels: int = 4) -> FeaturePoint:
    """"The k-th decoder block": for UNets the output of decoder level k (0 = coarsest, negative k counts
    from the finest; the finest level feeds the output layer and cannot be read). DiTs have no decoder:
    their second half (execution order) stands in for one of `levels` levels (SD1.x's count), and the
    point is the block that ends level k, at the same relative depth as in that UNet (SD1.x level 2 of
    4 ends 7/8 through the network; Flux: single block 30 of 38, SD3 medium: joint block 20 of 24)."""
    lay = _layout(model_or_layout)
    if lay.architecture == "unet":
        lv = lay.decoder_levels()
        n = len(lv)
        kk = k + n if k < 0 else k
        if not 0 <= kk < n:
            raise ValueError(f"EditKit: decoder level {k} does not exist: this UNet has {n} (0..{n - 1}, or -{n}..-1)")
        if kk == n - 1:
            raise ValueError(f"EditKit: decoder level {k} is the finest, whose output feeds the output layer directly "
                             f"and cannot be read; choose a level from 0 to {n - 2}")
        return feature_point(lay, "output", lv[kk][-1])
    if lay.dit_blocks:
        kk = k + levels if k < 0 else k
        if not 0 <= kk < levels:
            raise ValueError(f"EditKit: decoder level {k} of {levels} does not exist")
        blocks = sorted(lay.dit_blocks, key=lambda b: b.order)
        start = len(blocks) // 2
        end = start + math.ceil((len(blocks) - start) * (kk + 1) / levels) - 1
        b = blocks[max(end, start)]
        return feature_point(lay, b.kind, b.index)
    raise _no_layout()


# ---------------------------------------------------------------------------------------------
# Recording
# ---------------------------------------------------------------------------------------------

@dataclass
class Captured:
    """Features of one point in one model call."""
    point: FeaturePoint
    step: int                       # index into the run's schedule (0 outside a sampling run)
    sigma: float
    cond_or_uncond: tuple           # the call's chunks (0 = cond, 1 = uncond), as ComfyUI batches them
    branches: Optional[tuple]       # the call's branch names (core.branches), if it had branches
    rows: tuple                     # which rows of the call's batch these are
    features: torch.Tensor          # (len(rows), C, H, W)
    qkv: tuple = ()                 # ((q, k, v), ...) per self-attention layer of the block, (rows, heads, L, d)
    txt: int = 0                    # DiT: text tokens before the image tokens in those q/k/v

    def upsampled(self, size, mode: str = "bilinear") -> torch.Tensor:
        """The features resized to `size` (h, w), as DragDiffusion reads them at the latent's resolution."""
        return torch.nn.functional.interpolate(self.features, size=tuple(size), mode=mode)


class _Forward:
    """Per-model-call facts, created by the capture's APPLY_MODEL wrapper."""

    def __init__(self, txt: int = 0, hw=None):
        self.txt, self.hw = txt, hw
        self.pending: dict = {}       # point key -> [(q, k, v), ...] waiting for the block's output
        self.active = None            # DiT: the captured block running now


def _heads_first(x: torch.Tensor, heads: int, skip_reshape: bool) -> torch.Tensor:
    """(B, heads, L, d) from ComfyUI's (B, L, heads*d) (or SD3's (B, L, heads, d)) attention inputs."""
    return x if skip_reshape else x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


Rows = Union[None, Sequence[int], Callable[[dict, int], Sequence[int]]]


class FeatureCapture(SharedPatch):
    """Records the features of `points` in every model call of a clone it is installed on.

    rows: None (every row), a list of batch rows, or fn(transformer_options, batch) -> rows (e.g. the
    cond rows of one branch). grad: keep the features in the autograd graph (drag editing's motion
    supervision) instead of detached copies. qkv: also keep each point block's self-attention inputs.
    Records are reset when a sampling run starts (OUTER_SAMPLE) and by clear(); a gradient loop
    clears between its own forwards, since records with grad=True hold their graphs."""

    def __init__(self, points: Sequence[FeaturePoint], rows: Rows = None, grad: bool = False, qkv: bool = False):
        self.points = tuple(points)
        self.rows, self.grad, self.qkv = rows, bool(grad), bool(qkv)
        self.lock = threading.Lock()
        self._records: list = []

    # -- reading ------------------------------------------------------------------------------
    def clear(self) -> None:
        with self.lock:
            self._records = []

    def captured(self, point: Optional[FeaturePoint] = None) -> list:
        with self.lock:
            return [r for r in self._records if point is None or r.point.key == point.key]

    def last(self, point: FeaturePoint) -> Captured:
        recs = self.captured(point)
        if not recs:
            raise RuntimeError(f"EditKit: no features were captured at {point.key}")
        return recs[-1]

    # -- install --------------------------------------------------------------------------------
    def install(self, m) -> None:
        """Install on the model clone m (the caller clones; the user's model never gets these patches)."""
        import comfy.patcher_extension as pe
        lay = attention_layout(m)
        dit = lay.architecture != "unet"
        for p in self.points:
            enter = (lambda to, inside, key=p.key: self._enter(to, key, inside)) if dit and self.qkv else None
            install_hook(m, p.hook(), lambda tensors, to, p=p: self._on_features(p, tensors, to), enter)
        if self.qkv and not dit:
            for p in self.points:
                for site in (s for s in lay.sites if (s.block, s.number) == p.key):
                    chain_attn_replace(m, "attn1", site.key, lambda prev, p=p: _UnetQKV(self, p.key, prev))
        if self.qkv and dit:
            chain_attention_override(m, lambda prev: _DitQKV(self, prev))
        add_wrapper(m, pe.WrappersMP.APPLY_MODEL, f"features.{id(self)}", partial(self._forward_wrapper, dit))
        add_wrapper(m, pe.WrappersMP.OUTER_SAMPLE, f"features.run.{id(self)}", self._outer_sample)

    # -- patches' callbacks -----------------------------------------------------------------------
    def _outer_sample(self, executor, *args, **kwargs):
        self.clear()
        return executor(*args, **kwargs)

    def _forward_wrapper(self, dit: bool, executor, x, t, c_concat=None, c_crossattn=None, control=None,
                         transformer_options=None, **kwargs):
        if transformer_options is not None:
            txt, hw = dit_tokens(executor.class_obj.diffusion_model, x, c_crossattn) if dit else (0, None)
            calls = dict(transformer_options.get(_STATE_KEY, {}))
            calls[id(self)] = _Forward(txt, hw)
            transformer_options[_STATE_KEY] = calls
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    def _state(self, to: dict) -> Optional[_Forward]:
        calls = to.get(_STATE_KEY)
        return calls.get(id(self)) if isinstance(calls, dict) else None

    def _rows(self, to: dict, batch: int) -> list:
        if self.rows is None:
            return list(range(batch))
        if callable(self.rows):
            return list(self.rows(to, batch))
        return list(self.rows)

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.grad else t.detach().clone()

    def _enter(self, to: dict, key: tuple, inside: bool) -> None:
        state = self._state(to)
        if state is not None:
            state.active = key if inside else None

    def _record_qkv(self, to: dict, key: tuple, q, k, v, heads: int, skip_reshape: bool) -> None:
        state = self._state(to)
        if state is None:
            return
        rows = self._rows(to, q.shape[0])
        qkv = tuple(self._keep(_heads_first(t, heads, skip_reshape)[rows]) for t in (q, k, v))
        state.pending.setdefault(key, []).append(qkv)

    def _on_features(self, point: FeaturePoint, tensors: dict, to: dict):
        state = self._state(to)
        if point.is_dit:
            img = tensors["img"]
            hw = state.hw if state is not None else None
            if hw is None:
                return None
            start = state.txt if point.block == "single_block" else 0   # single blocks carry text first
            tokens = img[:, start:start + hw[0] * hw[1]]
            fmap = tokens.reshape(img.shape[0], hw[0], hw[1], img.shape[-1]).permute(0, 3, 1, 2)
        else:
            fmap = tensors["h"]
        rows = self._rows(to, fmap.shape[0])
        sched, sig = to.get("sample_sigmas"), to.get("sigmas")
        step = step_index(sched, sig) if sched is not None and sig is not None else 0
        sigma = float(torch.as_tensor(sig).flatten()[0]) if sig is not None else float("nan")
        qkv = tuple(state.pending.pop(point.key, ())) if state is not None else ()
        branches = branches_of(to)
        rec = Captured(point, step, sigma, tuple(to.get("cond_or_uncond") or ()), branches,
                       tuple(rows), self._keep(fmap[rows]), qkv, state.txt if state is not None else 0)
        with self.lock:
            self._records.append(rec)
        return None


class _UnetQKV(SharedPatch):
    """attn1 replace patch: keeps q/k/v of a captured block's self-attention, then attends as before."""

    def __init__(self, cap: FeatureCapture, key: tuple, prev):
        self.cap, self.key, self.prev = cap, key, prev

    def __call__(self, q, k, v, extra):
        self.cap._record_qkv(extra, self.key, q, k, v, extra["n_heads"], False)
        return call_attention(self.prev, q, k, v, extra)


class _DitQKV(SharedPatch):
    """Attention override: keeps q/k/v of the attention calls inside a captured DiT block."""

    def __init__(self, cap: FeatureCapture, prev):
        self.cap, self.prev = cap, prev

    def __call__(self, func, *args, **kwargs):
        to = kwargs.get("transformer_options") or {}
        state = self.cap._state(to)
        heads = args[3] if len(args) > 3 else kwargs.get("heads")
        if state is not None and state.active is not None and len(args) >= 3 and heads is not None:
            self.cap._record_qkv(to, state.active, args[0], args[1], args[2], heads, kwargs.get("skip_reshape", False))
        if self.prev is None:
            return func(*args, **kwargs)
        return self.prev(func, *args, **kwargs)
