"""Block caching for DiTs (Delta-DiT, Chen et al. 2024; First-Block-Cache / TeaCache-style threshold).

The DiT's block stack (SD3 joint blocks; Flux double then single blocks, in execution order from
core/introspect's layout) is split into the first block and the rest. On a full call every block runs and
the residual the rest adds to the image tokens (output of the last block minus output of the first) is
kept per row (cache/store.py keys). On a cached call the first block runs, the others pass their input
through, and the last one adds the stored residual.

When to reuse:
  threshold  the relative mean absolute change of the first block's residual (its output minus its input)
             against the one stored at the last full call is below `threshold` for every row of the call
             (0 = never: plain sampling, bit for bit);
  uniform / non-uniform  a fixed schedule of full steps (cache/schedule.py key_steps, every `interval`-th).
Only inside [start_percent, end_percent) of the run. A call with ControlNet residuals (added between
blocks by ComfyUI) always runs in full: the stored residual already holds them.

Hooks: one chained "dit" replace patch per block (core/patches.chain_dit_block_replace) plus an
APPLY_MODEL wrapper that opens the per-call state; the per-run state lives in cache/store.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.introspect import attention_layout
from ..core.patches import SharedPatch, add_wrapper, call_dit_block, chain_dit_block_replace
from .schedule import SCHEDULES, key_steps
from .store import current_step, install_run_state, row_cache, row_keys, run_space

THRESHOLD = "threshold"
MODES = (THRESHOLD,) + SCHEDULES
_CALL = "editkit_blockcache_call"


@dataclass(frozen=True)
class BlockCacheConfig:
    mode: str = THRESHOLD
    threshold: float = 0.08      # relative change of the first block's residual below which the rest is reused
    interval: int = 2            # fixed schedules: a full step every `interval` steps
    start_percent: float = 0.0
    end_percent: float = 1.0


def rel_change(now: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """Per row: mean |now - before| / mean |before| (First-Block-Cache's similarity measure)."""
    d = (now.float() - before.float()).abs().flatten(1).mean(1)
    return d / before.float().abs().flatten(1).mean(1).clamp_min(1e-12)


class BlockCache(SharedPatch):
    def __init__(self, cfg: BlockCacheConfig, blocks: tuple):
        self.cfg = cfg
        self.blocks = tuple((b.kind, b.index) for b in sorted(blocks, key=lambda b: b.order))

    def install(self, m) -> None:
        import comfy.patcher_extension as pe
        first, last = self.blocks[0], self.blocks[-1]
        for kind, index in self.blocks:
            role = "first" if (kind, index) == first else "last" if (kind, index) == last else "middle"
            chain_dit_block_replace(m, kind, index, lambda prev, role=role, kind=kind: _Block(self, prev, role, kind))
        add_wrapper(m, pe.WrappersMP.APPLY_MODEL, f"blockcache.{id(self)}", self._apply_model)
        install_run_state(m, self, "blockcache", self._check if cfg_is_schedule(self.cfg) else None)

    def _check(self, steps: int) -> None:
        from ..core.errors import EditKitInputError
        if self.cfg.interval > steps:
            raise EditKitInputError("EditKitBlockCache", "cache_interval",
                                    f"{self.cfg.interval} is above the number of sampling steps ({steps})",
                                    f"use a value between 1 and {steps}")

    def _apply_model(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                     **kwargs):
        to = transformer_options
        state = None
        if to is not None and not control:
            state = self._plan(to, x.shape[0])
        if to is not None:
            to[_CALL] = state          # None: this call runs in full without touching the cache
        try:
            return executor(x, t, c_concat, c_crossattn, control, to, **kwargs)
        finally:
            if to is not None:
                to.pop(_CALL, None)

    def _plan(self, to: dict, batch: int):
        step, steps = current_step(to)
        space = run_space(to, self)
        if step is None or space is None:
            return None
        p = step / steps
        allowed = self.cfg.start_percent <= p < self.cfg.end_percent
        if self.cfg.mode != THRESHOLD:
            allowed = allowed and self.cfg.interval > 1 and step not in key_steps(steps, self.cfg.interval, self.cfg.mode)
        return {"space": space, "keys": row_keys(to, batch), "allowed": allowed, "skip": False, "h1": None}


def cfg_is_schedule(cfg: BlockCacheConfig) -> bool:
    return cfg.mode != THRESHOLD


class _Block(SharedPatch):
    """The replace patch of one block: first (decides), middle (passes through when skipping), last (adds)."""

    def __init__(self, cache: BlockCache, prev, role: str, kind: str):
        self.cache, self.prev, self.role, self.kind = cache, prev, role, kind

    def __call__(self, args: dict, extra: dict):
        state = (args.get("transformer_options") or {}).get(_CALL)
        if state is None:
            return call_dit_block(self.prev, args, extra)
        if self.role == "first":
            return self._first(state, args, extra)
        if state["skip"]:
            if self.role == "middle":
                return _passthrough(args)
            return _add(_passthrough(args), state["residual"], state["h1"], state["reuse"])
        out = call_dit_block(self.prev, args, extra)
        if self.role == "last":
            reuse, h1 = state["reuse"], state["h1"]
            img = out["img"]
            res = img[:, img.shape[1] - h1.shape[1]:] - h1
            fresh = [i for i, r in enumerate(reuse) if not r]
            keys = state["keys"]
            row_cache(state["space"], "residual").put([keys[i] for i in fresh], res[fresh])
            state["space"]["full_calls"] = state["space"].get("full_calls", 0) + 1
            if any(reuse):   # rows that chose to reuse get exactly what they would alone: first block + their residual
                out = dict(out, img=img.clone())
                out = _add(out, state["residual"], h1, reuse, replace=True)
        return out

    def _first(self, state: dict, args: dict, extra: dict):
        x_in = args["img"]
        out = call_dit_block(self.prev, args, extra)
        img = out["img"]
        r0 = img - x_in if img.shape == x_in.shape else img
        space, keys, cfg = state["space"], state["keys"], self.cache.cfg
        first, resid = row_cache(space, "first"), row_cache(space, "residual")
        reuse, residual = [], []
        for i, k in enumerate(keys):     # each row decides alone: a row never depends on its batch partners
            stored = first.get([k], shape=r0.shape[1:])
            res = resid.get([k], shape=img.shape[1:])
            ok = state["allowed"] and stored is not None and res is not None
            if ok and cfg.mode == THRESHOLD:
                ok = bool(rel_change(r0[i:i + 1], stored.to(r0.device))[0] < cfg.threshold)
            reuse.append(ok)
            residual.append(res.to(img.device, img.dtype) if ok else torch.zeros_like(img[i:i + 1]))
        fresh = [i for i, r in enumerate(reuse) if not r]
        first.put([keys[i] for i in fresh], r0[fresh])
        state.update(reuse=reuse, residual=torch.cat(residual), h1=img, skip=all(reuse))
        if state["skip"]:
            space["cached_calls"] = space.get("cached_calls", 0) + 1
        return out


def _add(out: dict, residual: torch.Tensor, h1: torch.Tensor, rows: list, replace: bool = False) -> dict:
    """The image tokens (the trailing ones: Flux single blocks carry the text tokens first) of `rows` become
    first-block output + residual (replace) or get the residual added (the pass-through of a skipped call)."""
    img = out["img"]
    n = residual.shape[1]
    head, tail = img[:, :img.shape[1] - n], img[:, img.shape[1] - n:]
    sel = torch.tensor(rows, device=img.device).view(-1, 1, 1)
    new = (h1 + residual) if replace else (tail + residual)
    tail = torch.where(sel, new, tail)
    out = dict(out)
    out["img"] = torch.cat([head, tail], dim=1) if head.shape[1] else tail
    return out


def _passthrough(args: dict) -> dict:
    out = {"img": args["img"]}
    if "txt" in args:
        out["txt"] = args["txt"]
    return out


def install(m, cfg: BlockCacheConfig) -> BlockCache:
    """Install block caching on the clone m (a DiT with at least two blocks)."""
    cache = BlockCache(cfg, attention_layout(m).dit_blocks)
    cache.install(m)
    return cache
