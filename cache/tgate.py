"""TGATE (Zhang et al. 2024): cross-attention matters only in the first (semantic) steps.

Up to the gate step every cross-attention runs and its output is kept per site and per row
(cache/store.py keys, so branches never mix); after it, the output of each site is the kept one
(by default the mean of a row's cond and uncond outputs, as the paper caches), and the attention
itself runs on a single text token so its cost disappears (attn2_patch shrinks the context,
attn2_output_patch puts the cached output back; ComfyUI's own attention and other packs' attn2
patches stay). When the cached outputs make a row's cond and uncond calls identical (same latent,
same timestep, no other per-row conditioning), the uncond rows are copied from the cond rows
instead of being computed: the CFG half of the cost is dropped too, as in the paper.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.patches import SharedPatch, chain_unet_wrapper
from .store import current_step, install_run_state, row_cache, row_keys, run_space

_PAST = "editkit_tgate_past"


@dataclass(frozen=True)
class TGateConfig:
    gate_step: int = 10          # steps with full cross-attention (paper: 10 of 25)
    average: bool = True         # cache the mean of cond and uncond (paper) instead of each row's own
    skip_uncond: bool = True     # after the gate, copy uncond rows from cond rows when they are provably equal


class TGate(SharedPatch):
    def __init__(self, cfg: TGateConfig):
        self.cfg = cfg

    def install(self, m) -> None:
        m.set_model_attn2_patch(_Shrink(self))
        m.set_model_attn2_output_patch(_Output(self))
        chain_unet_wrapper(m, lambda call_next: _Batch(self, call_next))
        install_run_state(m, self, "tgate", self._check)

    def _check(self, steps: int) -> None:
        from ..core.errors import EditKitInputError
        if self.cfg.gate_step > steps:
            raise EditKitInputError("EditKitTGATE", "gate_step", f"{self.cfg.gate_step} is above the number of "
                                    f"sampling steps ({steps})", f"use a value between 1 and {steps}")

    def past_gate(self, to: dict) -> bool:
        step, _ = current_step(to)
        return step is not None and step >= self.cfg.gate_step and run_space(to, self) is not None

    def cached(self, to: dict, site, rows: int, shape):
        space = run_space(to, self)
        if space is None:
            return None
        keys = row_keys(to, rows)
        rc = row_cache(space, site)
        if not self.cfg.average:
            return rc.get(keys, shape)
        mates = [[k] + [(c,) + k[1:] for c in (0, 1) if c != k[0] and (c,) + k[1:] in rc.rows] for k in keys]
        outs = []
        for group in mates:
            t = rc.get(group, shape)
            if t is None:
                return None
            outs.append(t.mean(0, keepdim=True))
        return torch.cat(outs)


def _site(extra: dict):
    return ("tgate",) + tuple(extra.get("block") or ()) + (extra.get("block_index", 0),)


class _Shrink(SharedPatch):
    """attn2_patch: past the gate (with every row cached) attend to one token only; the output is replaced."""

    def __init__(self, tg: TGate):
        self.tg = tg

    def __call__(self, n, context, value, extra):
        if self.tg.past_gate(extra) and self.tg.cached(extra, _site(extra), n.shape[0], n.shape[1:]) is not None:
            extra[_PAST] = True
            context = context[:, :1]
            value = context if value is None else value[:, :1]
        else:
            extra.pop(_PAST, None)
        return n, context, value


class _Output(SharedPatch):
    def __init__(self, tg: TGate):
        self.tg = tg

    def __call__(self, n, extra):
        site = _site(extra)
        if extra.pop(_PAST, False):
            c = self.tg.cached(extra, site, n.shape[0], n.shape[1:])
            if c is not None:
                return c.to(n.device, n.dtype)
        space = run_space(extra, self.tg)
        step, _ = current_step(extra)
        if space is not None and step is not None and step < self.tg.cfg.gate_step:
            row_cache(space, site).put(row_keys(extra, n.shape[0]), n)
        return n


class _Batch(SharedPatch):
    """model_function_wrapper: past the gate, compute only the cond rows when the uncond rows are equal inputs."""

    def __init__(self, tg: TGate, call_next):
        self.tg, self.call_next = tg, call_next

    def __call__(self, apply_model, args):
        c = args["c"]
        to = c.get("transformer_options") or {}
        cou = list(args.get("cond_or_uncond") or [])
        x = args["input"]
        if not (self.tg.cfg.skip_uncond and self.tg.cfg.average and self.tg.past_gate(to)) or sorted(cou) != [0, 1] \
                or x.shape[0] % 2 or c.get("control") is not None:
            return self.call_next(apply_model, args)
        half = x.shape[0] // 2
        ci, ui = cou.index(0), cou.index(1)
        rows = lambda i: slice(i * half, (i + 1) * half)
        t = args["timestep"]
        equal = torch.equal(x[rows(ci)], x[rows(ui)]) and torch.equal(t[rows(ci)], t[rows(ui)])
        small = {}
        for k, v in c.items():
            if k in ("transformer_options", "c_crossattn"):
                continue
            if torch.is_tensor(v) and v.ndim and v.shape[0] == x.shape[0]:
                equal = equal and torch.equal(v[rows(ci)], v[rows(ui)])
                small[k] = v[rows(ci)]
            elif v is not None and not torch.is_tensor(v):
                equal = False
        ctx = c.get("c_crossattn")
        if not equal or ctx is None or ctx.shape[0] != x.shape[0]:
            return self.call_next(apply_model, args)
        to2 = dict(to)
        to2["cond_or_uncond"] = [0]
        for key in ("uuids",):
            if isinstance(to.get(key), list) and len(to[key]) == 2:
                to2[key] = [to[key][ci]]
        # the cond rows' cached outputs are already the cond/uncond means: one half gives both
        c2 = {**c, **small, "c_crossattn": ctx[rows(ci)], "transformer_options": to2}
        out = self.call_next(apply_model, {**args, "input": x[rows(ci)], "timestep": t[rows(ci)], "c": c2,
                                           "cond_or_uncond": [0]})
        full = torch.empty((x.shape[0],) + tuple(out.shape[1:]), dtype=out.dtype, device=out.device)
        full[rows(ci)] = out
        full[rows(ui)] = out
        return full


def install(m, cfg: TGateConfig) -> TGate:
    tg = TGate(cfg)
    tg.install(m)
    return tg
