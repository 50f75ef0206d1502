"""LoRA nodes: merge several LoRAs (concat, SVD, TIES, DARE, ...), apply one with per-block strengths, save."""
from __future__ import annotations

import os
import uuid
import weakref

import folder_paths
from . import feedback
from .api import io
from .base import EditKitNode

from ..core import files
from ..core.errors import EditKitInputError, require

LoraModel = io.Custom("LORA_MODEL")   # core's type (TrainLoraNode, LoraModelLoader, SaveLoRA)
NONE = "None"
N_FILES = 4
DTYPES = ["fp16", "bf16", "fp32"]

_METHOD_HELP = ("concat: exact, ranks stack (result = weighted sum of the deltas). svd: best rank-`rank` "
                "approximation of the weighted sum. ties: trim each LoRA to its top-`density` magnitudes, elect "
                "a sign per weight, average the agreeing values. dare: drop values with probability `drop_rate`, "
                "rescale by 1/(1-p), weighted sum (seeded). dare_ties: DARE then TIES's sign election. "
                "magnitude_prune: weighted sum of the top-`density` magnitudes of each LoRA.")


def _lora_names() -> list[str]:
    try:
        return [NONE] + folder_paths.get_filename_list("loras")
    except KeyError:  # pragma: no cover - a ComfyUI without a loras folder
        return [NONE]


def _torch_dtype(name):
    import torch
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _open_lora_file(node: str, input_name: str, name: str):
    """A LoRA file from the loras folder: safetensors are read lazily, other formats loaded whole."""
    path = folder_paths.get_full_path("loras", name)
    if path is None:
        raise EditKitInputError(node, input_name, f"LoRA file {name!r} is not in the loras folder",
                                "pick a file from the list (refresh after adding files)")
    if path.endswith(".safetensors"):
        from ..lora.st_io import SafetensorsFile
        try:
            return SafetensorsFile(path)
        except (ValueError, OSError) as e:
            raise EditKitInputError(node, input_name, f"{name!r} cannot be read: {e}", files.SAFE_HINT) from None
    return files.load_weights(path, node, input_name)


class LoraMerge(EditKitNode):
    EDITKIT_SHOWS = ("image", "text")   # the merge chart and statistics (nodes/feedback.py)
    @classmethod
    def define_schema(cls):
        names = _lora_names()
        inputs = [
            io.Model.Input("model", tooltip="The model the LoRAs are for. Its weight names and shapes decide which "
                                            "LoRA keys are valid; the merge runs on the CPU, one weight at a time."),
            io.Clip.Input("clip", optional=True,
                          tooltip="The text encoder the LoRAs are for. Needed when the LoRAs patch the text encoder."),
            io.Combo.Input("method", options=["concat", "svd", "ties", "dare", "dare_ties", "magnitude_prune"],
                           default="ties", tooltip=_METHOD_HELP),
        ]
        for i in range(1, N_FILES + 1):
            inputs.append(io.Combo.Input(f"lora_{i}", options=names, default=NONE,
                                         tooltip=f"LoRA file {i} from the loras folder (kohya/A1111, diffusers/PEFT, "
                                                 f"LyCORIS LoCon/LoHa/LoKr). None = unused."))
            inputs.append(io.Float.Input(f"weight_{i}", default=1.0, min=-10.0, max=10.0, step=0.01,
                                         tooltip=f"Strength of LoRA {i} in the merge (its delta is multiplied by it)."))
        inputs += [
            io.Int.Input("rank", default=0, min=0, max=1024,
                         tooltip="Rank of the merged LoRA for svd and the element-wise methods (0 = the largest rank "
                                 "among the inputs, per weight). concat ignores it: its rank is the sum of the ranks."),
            io.Float.Input("density", default=0.5, min=0.0, max=1.0, step=0.01,
                           tooltip="ties / magnitude_prune: fraction of each LoRA's values kept (largest magnitudes). "
                                   "The TIES paper keeps 0.2 of a full fine-tune's delta."),
            io.Float.Input("drop_rate", default=0.5, min=0.0, max=0.99, step=0.01,
                           tooltip="dare / dare_ties: probability p of dropping each value (kept values are scaled by 1/(1-p))."),
            io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff,
                         tooltip="Seed of DARE's random drops (the same seed gives the same merged LoRA)."),
            io.Combo.Input("dtype", options=DTYPES, default="fp16", tooltip="Precision of the merged LoRA's tensors."),
            io.Boolean.Input("exact_svd", default=False,
                             tooltip="Re-rank the element-wise methods' results with the optimal (exact) truncated SVD. "
                                     "Off: randomized subspace iteration on large weights, within ~1% of the optimal "
                                     "error and several times faster."),
            LoraModel.Input("lora_model_a", optional=True,
                            tooltip="An extra LoRA given as a LORA_MODEL (e.g. from Train LoRA or another merge)."),
            io.Float.Input("weight_a", default=1.0, min=-10.0, max=10.0, step=0.01, optional=True,
                           tooltip="Strength of lora_model_a."),
            LoraModel.Input("lora_model_b", optional=True, tooltip="A second extra LORA_MODEL."),
            io.Float.Input("weight_b", default=1.0, min=-10.0, max=10.0, step=0.01, optional=True,
                           tooltip="Strength of lora_model_b."),
        ]
        return io.Schema(
            node_id="EditKitLoraMerge",
            display_name="LoRA Merge (concat / SVD / TIES / DARE)",
            category="EditKit/lora",
            description="Merge up to four LoRA files and two LORA_MODELs into one LoRA, weight by weight (streaming, so "
                        "large SDXL LoRAs stay within memory). Methods: concat (exact), SVD re-rank, TIES, DARE, "
                        "DARE-TIES, magnitude prune. Outputs a LORA_MODEL (connect to LoRA Save, LoRA Block Weight or "
                        "core Load LoRA Model) and a chart of the per-block delta norm and SVD energy kept.",
            inputs=inputs,
            outputs=[
                LoraModel.Output("lora", display_name="lora", tooltip="The merged LoRA (kohya key names)."),
                io.Image.Output("stats", display_name="stats",
                                tooltip="Per-block norm of the merged delta (bars) and SVD energy kept (dots)."),
                io.String.Output("summary", display_name="summary", tooltip="The same statistics as text."),
            ],
        )

    @classmethod
    def execute(cls, model, method, rank, density, drop_rate, seed, dtype, exact_svd=False, clip=None,
                lora_model_a=None, weight_a=1.0, lora_model_b=None, weight_b=1.0, **files) -> io.NodeOutput:
        import comfy.utils

        from ..lora import formats, merge, stats
        from ..lora.st_io import load_mapped
        node = "EditKitLoraMerge"
        sources = []
        for i in range(1, N_FILES + 1):
            name, w = files.get(f"lora_{i}", NONE), float(files.get(f"weight_{i}", 1.0))
            if name and name != NONE:
                sources.append((f"lora_{i}", name, _open_lora_file(node, f"lora_{i}", name), w))
        for inp, obj, w in (("lora_model_a", lora_model_a, weight_a), ("lora_model_b", lora_model_b, weight_b)):
            if obj is not None:
                label = os.path.basename(obj.path) if getattr(obj, "path", None) else inp
                sources.append((inp, label, obj, float(w)))
        require(len(sources) > 0, node, "lora_1", "no LoRA selected", "pick at least one LoRA file or connect a LORA_MODEL")
        params = merge.MergeParams(method=method, rank=int(rank), density=float(density), drop_rate=float(drop_rate),
                                   seed=int(seed), dtype=_torch_dtype(dtype), exact_svd=bool(exact_svd))
        try:
            params.check()
        except ValueError as e:
            raise EditKitInputError(node, "method", str(e)) from None
        resolver = formats.KeyResolver(model, clip)
        parsed = []
        for inp, label, src, _w in sources:
            try:
                parsed.append(formats.parse(src, resolver, label))
            except formats.LoraFormatError as e:
                raise EditKitInputError(node, inp, str(e), "use LoRAs made for this model (and connect its CLIP for "
                                        "text-encoder keys)") from None
        folder = os.path.join(folder_paths.get_temp_directory(), "editkit_lora")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"merge_{uuid.uuid4().hex[:12]}.safetensors")
        n_keys = len({t for p in parsed for t in p.modules})
        bar = comfy.utils.ProgressBar(max(1, n_keys))
        try:
            report = merge.merge_to_file(parsed, [s[3] for s in sources], resolver, params, path,
                                         progress=lambda i, n: bar.update_absolute(i, n))
        except merge.MergeError as e:
            where = sources[e.index][0] if e.index is not None else "method"
            raise EditKitInputError(node, where, str(e), "use LoRAs made for this model") from None
        lora = load_mapped(path)
        # the temp file lives as long as the LORA_MODEL mapping it (ComfyUI's cache drops it: file removed)
        weakref.finalize(lora, _remove_quietly, path)
        title = (f"{method}, energy kept {100 * report.energy_kept():.1f}%, {len(report.stats)} weights\n" +
                 ", ".join(f"{s[1]} (w={s[3]:g})" for s in sources))
        image = stats.draw(report.per_block(), title)
        summary = report.summary()
        return io.NodeOutput(lora, image, summary, ui=feedback.show(cls, text=summary, images=image))


class LoraBlockWeight(EditKitNode):
    EDITKIT_SHOWS = ("text",)
    @classmethod
    def define_schema(cls):
        from ..lora.blocks import PRESETS
        return io.Schema(
            node_id="EditKitLoraBlockWeight",
            display_name="LoRA Block Weight",
            category="EditKit/lora",
            description="Apply a LoRA with a strength per block (UNet input/middle/output blocks, DiT double/single "
                        "blocks) and for the text encoder (BASE). The block list comes from the model; the vector "
                        "syntax is the LoRA Block Weight one (17 values on SD1.5, 12 on SDXL), or NAME=value items "
                        "such as 'BASE=1, IN=0, MID=1, OUT04-OUT06=0.5'. A block at 0 is left exactly untouched.",
            inputs=[
                io.Model.Input("model", tooltip="The model to patch (a clone is patched)."),
                io.Clip.Input("clip", optional=True, tooltip="The text encoder to patch (BASE strength); leave "
                                                             "unconnected to apply the LoRA to the model only."),
                io.Combo.Input("lora_name", options=_lora_names(), default=NONE,
                               tooltip="LoRA file from the loras folder (ignored when `lora` is connected)."),
                io.Float.Input("strength_model", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Overall strength on the model; each block's weight multiplies it."),
                io.Float.Input("strength_clip", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Overall strength on the text encoder; BASE multiplies it."),
                io.Combo.Input("preset", options=["custom"] + PRESETS, default="custom",
                               tooltip="A named preset, or custom to use block_weights. SD-* presets are the 17-value "
                                       "LoRA Block Weight vectors (SD1.5); the others adapt to the model's blocks."),
                io.String.Input("block_weights", default="BASE=1, IN=1, MID=1, OUT=1", multiline=True,
                                tooltip="Used when preset is custom. Either one value per slot (the 'blocks' output lists "
                                        "the slots of this model, e.g. BASE,IN01,IN02,IN04,...,OUT11 on SD1.5), or "
                                        "NAME=value items: BASE, DEFAULT, IN, INnn, MID, Mn, OUT, OUTnn, D, Dnn, S, "
                                        "Snn and ranges like OUT03-OUT05 (real block indices; later items win)."),
                LoraModel.Input("lora", optional=True, tooltip="A LORA_MODEL (e.g. from LoRA Merge); overrides lora_name."),
            ],
            outputs=[
                io.Model.Output("model_out", display_name="model", tooltip="A clone of the model with the LoRA applied per block."),
                io.Clip.Output("clip_out", display_name="clip", tooltip="A clone of the text encoder with the LoRA at the BASE strength "
                                                                        "(the input clip unchanged when none is connected)."),
                io.String.Output("blocks", display_name="blocks",
                                 tooltip="This model's block slots and the weight each block got."),
            ],
        )

    @classmethod
    def execute(cls, model, lora_name, strength_model, strength_clip, preset, block_weights, clip=None,
                lora=None) -> io.NodeOutput:
        import comfy.utils

        from ..lora import blocks, formats
        node = "EditKitLoraBlockWeight"
        if lora is None:
            require(bool(lora_name) and lora_name != NONE, node, "lora_name", "no LoRA selected",
                    "pick a LoRA file or connect a LORA_MODEL to `lora`")
            path = folder_paths.get_full_path("loras", lora_name)
            require(path is not None, node, "lora_name", f"{lora_name!r} is not in the loras folder")
            sd = files.load_weights(path, node, "lora_name")
        else:
            sd = lora
        lay = blocks.layout(model)
        spec = block_weights if preset == "custom" else preset
        bw = blocks.parse_for_node(spec, lay, node, "block_weights" if preset == "custom" else "preset")
        resolver = formats.KeyResolver(model, clip)
        try:
            patched_model, patched_clip, _ = blocks.apply(sd, resolver, model, clip, bw.weight,
                                                          strength_model, strength_clip)
        except formats.LoraFormatError as e:
            raise EditKitInputError(node, "lora" if lora is not None else "lora_name", str(e),
                                    "use a LoRA made for this model") from None
        forms = "; ".join(f"{k} form ({len(v)} values): {','.join(v)}" for k, v in lay.forms().items())
        text = f"weights: {bw.text()}\n{forms or 'no numbered blocks'}"
        return io.NodeOutput(patched_model, patched_clip, text, ui=feedback.show(cls, text=text))


class LoraSave(EditKitNode):
    EDITKIT_SHOWS = ("text",)
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EditKitLoraSave",
            display_name="LoRA Save",
            category="EditKit/lora",
            description="Write a LORA_MODEL (e.g. a merge) as safetensors into ComfyUI's loras folder (subfolder "
                        "editkit/) with its merge metadata (sources, weights, method, rank); Load LoRA lists it after a refresh.",
            inputs=[
                LoraModel.Input("lora", tooltip="The LoRA to save."),
                io.String.Input("filename_prefix", default="editkit_merged",
                                tooltip="File name prefix inside models/loras/editkit/ (a counter is appended)."),
            ],
            outputs=[io.String.Output("lora_name", display_name="lora_name",
                                      tooltip="The saved file's name as Load LoRA lists it.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, lora, filename_prefix) -> io.NodeOutput:
        from ..lora import st_io
        node = "EditKitLoraSave"
        require(len(lora) > 0, node, "lora", "the LoRA is empty")
        prefix = (filename_prefix or "editkit_merged").strip()
        # The first loras folder is where Load LoRA looks by default (models/loras, or extra_model_paths' default).
        loras_dir = folder_paths.get_folder_paths("loras")[0]
        # inside models/loras/editkit/ only: '..', absolute paths, NUL bytes, over-long names are refused
        files.save_path(os.path.join(loras_dir, "editkit"), prefix, node, "filename_prefix")
        try:
            folder, filename, counter, _sub, _ = folder_paths.get_save_image_path(os.path.join("editkit", prefix), loras_dir)
            os.makedirs(folder, exist_ok=True)
        except Exception as e:
            raise EditKitInputError(node, "filename_prefix", f"cannot save under {prefix!r} ({type(e).__name__})",
                                    "use a plain file name such as 'editkit_merged'") from None
        path = os.path.join(folder, f"{filename}_{counter:05}_.safetensors")
        meta = dict(getattr(lora, "info", None) or {})
        try:
            st_io.save(lora, path, meta)
        except OSError as e:
            raise EditKitInputError(node, "filename_prefix", f"cannot write {os.path.basename(path)!r} ({e.strerror or e})",
                                    "use a shorter plain file name") from None
        name = os.path.relpath(path, loras_dir).replace(os.sep, "/")
        return io.NodeOutput(name, ui=feedback.show(cls, text=f"saved models/loras/{name}\n(Load LoRA lists it as {name})"))


NODES = [LoraMerge, LoraBlockWeight, LoraSave]
