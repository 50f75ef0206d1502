"""DeepCache (Ma et al., CVPR 2024): reuse the UNet's deep features between key steps.

On a key step the whole UNet runs and the feature entering output block j0 (the upsampled deep
branch, where the skip of input block `branch` joins) is kept per row (cache/store.py keys). On the
other steps only input blocks 0..branch and output blocks j0..end run: fresh shallow features plus
the cached deep ones. branch 0 (the paper's default) is the shallowest skip, the largest speed-up.

The shallow pass mirrors ComfyUI's UNetModel._forward for those blocks (time embedding and emb
patches, input/output block patches, ControlNet residuals of the blocks that run, attention patches
inside the blocks), so attention control and other patches on the same clone keep working; it is
installed as a DIFFUSION_MODEL wrapper, the full pass is ComfyUI's own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..core.features import Hook, install_hook
from ..core.introspect import attention_layout
from ..core.patches import SharedPatch, add_wrapper
from .schedule import UNIFORM, key_steps
from .store import current_step, install_run_state, row_cache, row_keys, run_space

_ACTIVE = "editkit_deepcache_full"


@dataclass(frozen=True)
class DeepCacheConfig:
    interval: int = 3            # N: a key step every N steps (1 = plain)
    branch: int = 0              # skip branch (input block index) whose partner output block starts the shallow pass
    schedule: str = UNIFORM
    start_percent: float = 0.0   # cache only inside [start, end) of the run
    end_percent: float = 1.0


def deep_blocks(model, branch: int) -> tuple[int, int, int]:
    """(number of input blocks, number of output blocks, output block j0 that the cached feature enters)."""
    dm = model.get_model_object("diffusion_model") if hasattr(model, "get_model_object") else model
    n_in, n_out = len(dm.input_blocks), len(dm.output_blocks)
    return n_in, n_out, n_out - 1 - branch


class DeepCache(SharedPatch):
    def __init__(self, cfg: DeepCacheConfig, n_in: int, n_out: int):
        self.cfg, self.n_in, self.n_out = cfg, n_in, n_out
        self.j0 = n_out - 1 - cfg.branch

    # -- install ------------------------------------------------------------------------------
    def install(self, m) -> None:
        import comfy.patcher_extension as pe
        install_hook(m, Hook("output_entry", self.j0), self._capture)
        self.hook = m.model_options["transformer_options"]["patches"]["output_block_patch"][-1]
        add_wrapper(m, pe.WrappersMP.DIFFUSION_MODEL, f"deepcache.{id(self)}", self._wrapper)
        install_run_state(m, self, "deepcache", self._check)

    def _check(self, steps: int) -> None:
        from ..core.errors import EditKitInputError
        if self.cfg.interval > steps:
            raise EditKitInputError("EditKitDeepCache", "cache_interval",
                                    f"{self.cfg.interval} is above the number of sampling steps ({steps})",
                                    f"use a value between 1 and {steps}")

    # -- per call -------------------------------------------------------------------------------
    def _plan(self, to: dict):
        step, steps = current_step(to)
        if step is None or self.cfg.interval <= 1:
            return None
        space = run_space(to, self)
        if space is None:
            return None
        p = step / steps
        if p < self.cfg.start_percent or p >= self.cfg.end_percent:
            return space, step, True
        key = step in key_steps(steps, self.cfg.interval, self.cfg.schedule)
        return space, step, key

    def _capture(self, tensors: dict, to: dict):
        space = to.get(_ACTIVE)
        if space is not None:
            h = tensors["h"]
            row_cache(space, "deep").put(row_keys(to, h.shape[0]), h)
        return None

    def _wrapper(self, executor, x, timesteps=None, context=None, y=None, control=None, transformer_options=None, **kwargs):
        to = transformer_options if transformer_options is not None else {}
        plan = self._plan(to)
        if plan is not None and not plan[2]:
            space = plan[0]
            keys = row_keys(to, x.shape[0])
            cached = row_cache(space, "deep").get(keys)
            if cached is not None and cached.shape[-2:] == _deep_hw(x, self, executor.class_obj):
                space["cached_calls"] = space.get("cached_calls", 0) + 1
                return self._shallow(executor.class_obj, x, timesteps, context, y, control, to,
                                     cached.to(x.device), **kwargs)
        if plan is not None:
            to[_ACTIVE] = plan[0]
            plan[0]["full_calls"] = plan[0].get("full_calls", 0) + 1
        try:
            return executor(x, timesteps, context, y, control, to, **kwargs)
        finally:
            to.pop(_ACTIVE, None)

    # -- the shallow pass (mirrors UNetModel._forward for the blocks that run) --------------------
    def _shallow(self, dm, x, timesteps, context, y, control, to, cached_h, **kwargs):
        from comfy.ldm.modules.diffusionmodules.openaimodel import forward_timestep_embed
        from comfy.ldm.modules.diffusionmodules.util import timestep_embedding
        to["original_shape"] = list(x.shape)
        to["transformer_index"] = 0
        patches = to.get("patches", {})
        extra = dict(time_context=kwargs.get("time_context"),
                     num_video_frames=kwargs.get("num_video_frames", getattr(dm, "default_num_video_frames", None)),
                     image_only_indicator=kwargs.get("image_only_indicator"))
        t_emb = timestep_embedding(timesteps, dm.model_channels, repeat_only=False).to(x.dtype)
        emb = dm.time_embed(t_emb)
        for p in patches.get("emb_patch", []):
            emb = p(emb, dm.model_channels, to)
        if dm.num_classes is not None:
            emb = emb + dm.label_emb(y)
        hs, h = [], x
        for i in range(self.cfg.branch + 1):
            to["block"] = ("input", i)
            h = forward_timestep_embed(dm.input_blocks[i], h, emb, context, to, **extra)
            h = _control(h, control, "input", i)
            for p in patches.get("input_block_patch", []):
                h = p(h, to)
            hs.append(h)
            for p in patches.get("input_block_patch_after_skip", []):
                h = p(h, to)
        to["transformer_index"] = _transformers_before(dm, self.cfg.branch + 1, self.j0)
        h = cached_h.to(x.dtype)
        for j in range(self.j0, self.n_out):
            to["block"] = ("output", j)
            hsp = _control(hs.pop(), control, "output", j)
            for p in patches.get("output_block_patch", []):
                if p is self.hook:
                    continue
                h, hsp = p(h, hsp, to)
            h = torch.cat([h, hsp], dim=1)
            del hsp
            out_shape = hs[-1].shape if hs else None
            h = forward_timestep_embed(dm.output_blocks[j], h, emb, context, to, out_shape, **extra)
        h = h.type(x.dtype)
        if getattr(dm, "predict_codebook_ids", False):
            return dm.id_predictor(h)
        return dm.out(h)


def _control(h, control, name: str, index: int):
    """ControlNet residual of block `index` without consuming the list (ComfyUI pops from the end)."""
    if not control or name not in control or not control[name]:
        return h
    lst = control[name]
    i = len(lst) - 1 - index
    if 0 <= i < len(lst) and lst[i] is not None:
        try:
            return h + lst[i]
        except RuntimeError:
            return h
    return h


def _transformers_before(dm, first_skipped_input: int, j0: int) -> int:
    from comfy.ldm.modules.attention import SpatialTransformer
    count = lambda mod: sum(isinstance(s, SpatialTransformer) for s in mod)
    n = sum(count(dm.input_blocks[i]) for i in range(len(dm.input_blocks)))
    n += count(dm.middle_block) if dm.middle_block is not None else 0
    n += sum(count(dm.output_blocks[j]) for j in range(j0))
    return n


def _deep_hw(x, cache: DeepCache, dm) -> tuple:
    """Spatial size of the feature entering output block j0 for the latent x (the skip it joins)."""
    h, w = x.shape[-2], x.shape[-1]
    for i in range(cache.cfg.branch + 1):
        from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample
        if any(isinstance(s, Downsample) for s in dm.input_blocks[i]):
            h, w = (h + 1) // 2, (w + 1) // 2
    return (h, w)


def install(m, cfg: DeepCacheConfig) -> DeepCache:
    """Install DeepCache on the clone m (a UNet)."""
    n_in, n_out, _ = deep_blocks(m, cfg.branch)
    cache = DeepCache(cfg, n_in, n_out)
    cache.install(m)
    return cache
