"""Per-run, per-branch storage shared by every EditKit cache (the one owner of cache keying).

A cache entry belongs to ONE row of ONE branch: the key of a row is (cond_or_uncond of its chunk,
which chunk of that kind, branch name, index inside the branch), read through the branch contract
(core/branches.py: chunks_of / branches_of). Rows never share entries, so the source and the target
of an edit (Prompt-to-Prompt pairs, the inversion sampler's branches, guider extra chunks) never read
each other's cached features, and a call whose batch is composed differently from the one that
filled the cache (CFG-1 optimisation, guidance interval, extra guider branches) still finds each
row's own entry or recomputes.

Run state: `RunCaches` is created when a sampling run starts, by an OUTER_SAMPLE wrapper
(`install_run_state`), put into the run's own (cloned) transformer_options and dropped when the run
ends; the patch objects themselves are never mutated.
"""
from __future__ import annotations

import threading
from typing import Optional

import torch

from ..core.branches import SOURCE, TARGET, branches_of, chunks_of
from ..core.denoiser import step_index
from ..core.patches import add_wrapper

RUN_KEY = "editkit_cache_run"


class RunCaches:
    """Per-run state of every EditKit cache on a model: one namespace (dict) per cache object."""

    def __init__(self):
        self.lock = threading.Lock()
        self.spaces: dict = {}

    def space(self, owner) -> dict:
        with self.lock:
            return self.spaces.setdefault(id(owner), {})


def install_run_state(m, owner, key: str, check=None) -> None:
    """OUTER_SAMPLE wrapper: a fresh RunCaches for each sampling run of the clone m (shared by all caches).

    check(steps) is called first with the run's step count (raise EditKitInputError to refuse it)."""
    import comfy.patcher_extension as pe

    def outer_sample(executor, *args, **kwargs):
        sigmas = args[3] if len(args) > 3 else kwargs.get("sigmas")
        if check is not None and sigmas is not None:
            check(max(int(sigmas.shape[-1]) - 1, 1))
        guider = getattr(executor, "class_obj", None)
        to = getattr(guider, "model_options", None)
        if isinstance(to, dict):
            to = to.setdefault("transformer_options", {})
            if not isinstance(to.get(RUN_KEY), RunCaches):
                to[RUN_KEY] = RunCaches()
        try:
            return executor(*args, **kwargs)
        finally:
            if isinstance(to, dict):
                to.pop(RUN_KEY, None)

    add_wrapper(m, pe.WrappersMP.OUTER_SAMPLE, f"cache.run.{key}.{id(owner)}", outer_sample)


def run_space(transformer_options: Optional[dict], owner) -> Optional[dict]:
    """The per-run dict of `owner` in this call (None outside a sampling run: no caching then)."""
    run = (transformer_options or {}).get(RUN_KEY)
    return run.space(owner) if isinstance(run, RunCaches) else None


def row_keys(transformer_options: Optional[dict], batch: int) -> list[tuple]:
    """One key per batch row: (cond_or_uncond, chunk occurrence, branch, index in branch)."""
    to = transformer_options or {}
    cou = list(to.get("cond_or_uncond") or [0])
    chunks = chunks_of(to, batch)
    names = branches_of(to)
    keys: list = [None] * batch
    seen: dict = {}
    for ci, ch in enumerate(chunks):
        c = cou[ci] if len(cou) == len(chunks) else 0
        occ = seen.get(c, 0)
        seen[c] = occ + 1
        if names and len(names) > 1 and ch.size % len(names) == 0:
            per = ch.size // len(names)
            for r in range(ch.size):
                keys[ch.start + r] = (c, occ, names[r // per], r % per)
        else:
            for r in range(ch.size):
                keys[ch.start + r] = (c, occ, SOURCE if r == 0 else TARGET, r - 1 if r else 0)
    return keys


def current_step(transformer_options: Optional[dict]) -> tuple[Optional[int], int]:
    """(step index in the run's schedule or None, number of steps)."""
    to = transformer_options or {}
    sched, sig = to.get("sample_sigmas"), to.get("sigmas")
    if sched is None or sig is None:
        return None, 0
    return step_index(sched, sig), max(len(sched) - 1, 1)


class RowCache:
    """Tensors stored per row key (inside a run space)."""

    def __init__(self):
        self.rows: dict = {}

    def put(self, keys: list, t: torch.Tensor, tag=None) -> None:
        for i, k in enumerate(keys):
            self.rows[k] = (tag, t[i:i + 1].detach())

    def get(self, keys: list, shape=None, tag=None) -> Optional[torch.Tensor]:
        """The stacked entries of `keys`, or None if one is missing (or has another shape / tag)."""
        out = []
        for k in keys:
            e = self.rows.get(k)
            if e is None or (tag is not None and e[0] != tag):
                return None
            if shape is not None and tuple(e[1].shape[1:]) != tuple(shape):
                return None
            out.append(e[1])
        return torch.cat(out) if out else None


def row_cache(space: dict, name: str) -> RowCache:
    rc = space.get(name)
    if rc is None:
        rc = space[name] = RowCache()
    return rc
