"""Speed nodes: DeepCache, Block Cache, ToDo, TGATE (library: cache/)."""
from __future__ import annotations

from .api import io
from .base import EditKitNode
from . import feedback

from ..cache import blockcache, deepcache, tgate, todo
from ..cache.schedule import SCHEDULES, UNIFORM, check_interval, check_window, key_steps
from ..core.errors import EditKitInputError, require
from ..core.introspect import attention_layout, require_architecture

CATEGORY = "EditKit/speed"


class DeepCache(EditKitNode):
    EDITKIT_SHOWS = ("text",)

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitDeepCache",
            display_name="DeepCache (reuse deep UNet features)",
            category=CATEGORY,
            description="DeepCache (Ma et al. 2024): run the whole UNet only on key steps (every cache_interval-th) and "
                        "reuse its deep features in between, recomputing only the shallow blocks. Caches are kept per "
                        "branch and per run, so it composes with EditKit's attention control, inversion samplers and "
                        "guider. UNets (SD1.x, SD2.x, SDXL).",
            inputs=[
                io.Model.Input("model", tooltip="A UNet model (SD1.x, SD2.x, SDXL). The output is a patched clone."),
                io.Int.Input("cache_interval", default=3, min=1, max=1000,
                             tooltip="N: the whole UNet runs every N-th step, the N-1 steps between reuse its deep "
                                     "features (the paper uses 3-5; 1 = plain sampling). Must not exceed the step count."),
                io.Int.Input("cache_branch", default=0, min=0, max=64,
                             tooltip="Skip branch (input block index) at which the shallow pass rejoins the cached "
                                     "deep features: 0 = the shallowest, fastest (paper default)."),
                io.Combo.Input("schedule", options=list(SCHEDULES), default=UNIFORM,
                               tooltip="uniform: key steps every N; non-uniform: the same number of key steps packed "
                                       "where features change fastest (paper section 3.3)."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Cache only from this fraction of the run on (earlier steps run in full)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Cache only before this fraction of the run (later steps run in full)."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The clone with DeepCache installed.")],
        )

    @classmethod
    def execute(cls, model, cache_interval, cache_branch, schedule, start_percent, end_percent) -> io.NodeOutput:
        node = "EditKitDeepCache"
        require_architecture(model, {"unet"}, node, what="DeepCache (UNet skip branches; use EditKit Block Cache for SD3/Flux)")
        check_interval(node, cache_interval)
        require(schedule in SCHEDULES, node, "schedule", f"unknown schedule {schedule!r}", f"use one of {', '.join(SCHEDULES)}")
        check_window(node, start_percent, end_percent)
        n_in, n_out, _ = deepcache.deep_blocks(model, 0)
        if cache_branch > min(n_in, n_out) - 2:
            raise EditKitInputError(node, "cache_branch", f"branch {cache_branch} leaves no deep blocks to cache "
                                    f"(this UNet has {n_in} input blocks)", f"use 0..{min(n_in, n_out) - 2}")
        m = model.clone()
        deepcache.install(m, deepcache.DeepCacheConfig(cache_interval, cache_branch, schedule, start_percent, end_percent))
        k20 = sorted(key_steps(20, cache_interval, schedule))
        text = (f"DeepCache: whole UNet on {len(k20)} of 20 steps ({', '.join(map(str, k20))}); the others run input "
                f"blocks 0..{cache_branch} and output blocks {n_out - 1 - cache_branch}..{n_out - 1}.")
        return io.NodeOutput(m, ui=feedback.show(cls, text=text))


class BlockCacheNode(EditKitNode):
    EDITKIT_SHOWS = ("text",)

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitBlockCache",
            display_name="Block Cache (reuse DiT block residuals)",
            category=CATEGORY,
            description="Block caching for DiTs (Delta-DiT, Chen et al. 2024; First-Block-Cache / TeaCache-style "
                        "threshold): the first transformer block always runs; when its residual changed little since "
                        "the last full step (or on a fixed schedule) the other blocks are skipped and the residual they "
                        "added then is reused. Caches are kept per branch and per run. DiTs (SD3, Flux); for UNets "
                        "use EditKit DeepCache.",
            inputs=[
                io.Model.Input("model", tooltip="A DiT model (SD3 / SD3.5, Flux). The output is a patched clone."),
                io.Combo.Input("mode", options=list(blockcache.MODES), default=blockcache.THRESHOLD,
                               tooltip="threshold: skip while the first block's residual changed less than threshold "
                                       "(adaptive, First-Block-Cache); uniform / non-uniform: a full step every "
                                       "cache_interval steps (Delta-DiT style fixed schedule)."),
                io.Float.Input("threshold", default=0.08, min=0.0, max=1.0, step=0.01,
                               tooltip="threshold mode: relative mean change of the first block's residual below "
                                       "which the cached residual is reused (0 = plain sampling; 0.05-0.12 typical, "
                                       "larger = faster, further from plain)."),
                io.Int.Input("cache_interval", default=2, min=1, max=1000,
                             tooltip="uniform / non-uniform modes: every N-th step runs all blocks (1 = plain). Must "
                                     "not exceed the step count."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Reuse only from this fraction of the run on (earlier steps run in full)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Reuse only before this fraction of the run (later steps run in full)."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The clone with block caching installed.")],
        )

    @classmethod
    def execute(cls, model, mode, threshold, cache_interval, start_percent, end_percent) -> io.NodeOutput:
        node = "EditKitBlockCache"
        require_architecture(model, {"flux", "mmdit"}, node,
                             what="Block Cache (DiT blocks; use EditKit DeepCache for SD1.x / SD2.x / SDXL UNets)")
        require(mode in blockcache.MODES, node, "mode", f"unknown mode {mode!r}", f"use one of {', '.join(blockcache.MODES)}")
        require(0.0 <= threshold <= 1.0, node, "threshold", f"{threshold} is outside [0, 1]",
                "use 0 (plain) to 1; 0.05-0.12 is typical")
        check_interval(node, cache_interval)
        check_window(node, start_percent, end_percent)
        blocks = attention_layout(model).dit_blocks
        require(len(blocks) >= 2, node, "model", f"this DiT has {len(blocks)} block(s): nothing to cache",
                "connect a DiT with two or more transformer blocks")
        m = model.clone()
        blockcache.install(m, blockcache.BlockCacheConfig(mode, float(threshold), cache_interval, start_percent, end_percent))
        if mode == blockcache.THRESHOLD:
            text = (f"Block Cache: {len(blocks)} blocks; the first always runs, the other {len(blocks) - 1} are skipped "
                    f"while its residual changes by less than {threshold:g} (relative).")
        else:
            k20 = sorted(key_steps(20, cache_interval, mode))
            text = (f"Block Cache: all {len(blocks)} blocks on {len(k20)} of 20 steps ({', '.join(map(str, k20))}); "
                    f"the others run the first block and reuse the rest's residual.")
        return io.NodeOutput(m, ui=feedback.show(cls, text=text))


class ToDoNode(EditKitNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitToDo",
            display_name="ToDo (downsample self-attention keys/values)",
            category=CATEGORY,
            description="ToDo (Smith et al. 2024): self-attention at the finest UNet levels attends to a downsampled "
                        "grid of keys/values (queries keep every token), keeping ComfyUI's fast attention. Largest "
                        "gain at high resolution. UNets (SD1.x, SD2.x, SDXL). With attention-control nodes that read "
                        "self-attention maps, the maps are over the downsampled keys.",
            inputs=[
                io.Model.Input("model", tooltip="A UNet model. The output is a patched clone."),
                io.Int.Input("downsample_factor", default=2, min=1, max=8,
                             tooltip="Per-side factor at the finest level (paper: 2, i.e. 4x fewer keys; 1 = off)."),
                io.Int.Input("downsample_factor_level_2", default=1, min=1, max=8,
                             tooltip="Per-side factor at the next coarser level (paper: 1 = untouched)."),
                io.Combo.Input("method", options=list(todo.METHODS), default="nearest",
                               tooltip="How the key/value grid is reduced (paper: nearest)."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The clone with ToDo installed.")],
        )

    @classmethod
    def execute(cls, model, downsample_factor, downsample_factor_level_2, method) -> io.NodeOutput:
        node = "EditKitToDo"
        require_architecture(model, {"unet"}, node, what="ToDo (UNet self-attention sites)")
        require(downsample_factor >= 1, node, "downsample_factor", f"{downsample_factor} is below 1", "use 1 (off) to 8; paper: 2")
        require(downsample_factor_level_2 >= 1, node, "downsample_factor_level_2", f"{downsample_factor_level_2} is below 1",
                "use 1 (off) to 8")
        require(method in todo.METHODS, node, "method", f"unknown method {method!r}", f"use one of {', '.join(todo.METHODS)}")
        m = model.clone()
        todo.install(m, todo.ToDoConfig(downsample_factor, downsample_factor_level_2, method))
        return io.NodeOutput(m)


class TGateNode(EditKitNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitTGATE",
            display_name="TGATE (cache cross-attention after the gate step)",
            category=CATEGORY,
            description="TGATE (Zhang et al. 2024): cross-attention runs in full only up to gate_step; afterwards each "
                        "layer reuses its cached output (per branch and row) and, where cond and uncond then coincide, "
                        "the uncond half of the batch is copied instead of computed. UNets (SD1.x, SD2.x, SDXL).",
            inputs=[
                io.Model.Input("model", tooltip="A UNet model. The output is a patched clone."),
                io.Int.Input("gate_step", default=10, min=1, max=1000,
                             tooltip="Steps with full cross-attention (paper: 10 of 25). Must not exceed the step count."),
                io.Boolean.Input("average_cond_uncond", default=True,
                                 tooltip="Cache the mean of the cond and uncond cross-attention outputs (paper); off "
                                         "keeps each row's own output (CFG still acts, no uncond skipping)."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The clone with TGATE installed.")],
        )

    @classmethod
    def execute(cls, model, gate_step, average_cond_uncond) -> io.NodeOutput:
        node = "EditKitTGATE"
        require_architecture(model, {"unet"}, node, what="TGATE (UNet cross-attention sites)")
        check_interval(node, gate_step, name="gate_step")
        m = model.clone()
        tgate.install(m, tgate.TGateConfig(gate_step, bool(average_cond_uncond)))
        return io.NodeOutput(m)


NODES = [DeepCache, BlockCacheNode, ToDoNode, TGateNode]
