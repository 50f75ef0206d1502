"""LoRA files the shipped workflows name, generated for the workflows' default model (runner/assets.py).

The default model is the one `scripts/workflow_defs/common.py` names in MODEL_LOADER (read, not
imported); its keys are discovered from the loaded model and CLIP (ComfyUI's key maps), so the
files keep fitting when the default model changes. A file is rewritten only when the loader it was
made for (recorded in its metadata) differs.
"""
from __future__ import annotations

import ast
import json
import os

STYLE = "editkit_demo_style.safetensors"      # kohya LoRA, rank 8, UNet attention + text encoder
DETAIL = "editkit_demo_detail.safetensors"    # kohya LoCon, rank 4, UNet attention + resnet convs
LOHA = "editkit_demo_loha.safetensors"        # LyCORIS LoHa, rank 4, UNet attention
VERSION = 1
_FALLBACK = ("EditKitTinyModelLoader", {"parameterization": "eps", "seed": 0})
_FILES = [(STYLE, "kohya", ("attn", "te"), 8, 11), (DETAIL, "locon", ("attn", "conv"), 4, 12),
          (LOHA, "loha", ("attn",), 4, 13)]


def default_loader() -> tuple[str, dict]:
    """MODEL_LOADER from scripts/workflow_defs/common.py, or the tiny model if that file is absent."""
    pack = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(pack, "scripts", "workflow_defs", "common.py")
    try:
        tree = ast.parse(open(path, encoding="utf-8").read())
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "MODEL_LOADER" for t in node.targets):
                cls, widgets = ast.literal_eval(node.value)
                return str(cls), dict(widgets)
    except (OSError, SyntaxError, ValueError):
        pass
    return _FALLBACK


def load_default_model():
    """(model, clip) of the default loader, run through its node class."""
    import nodes
    cls_name, widgets = default_loader()
    cls = nodes.NODE_CLASS_MAPPINGS.get(cls_name)
    if cls is None:
        cls_name, widgets = _FALLBACK
        cls = nodes.NODE_CLASS_MAPPINGS[cls_name]
    if hasattr(cls, "define_schema"):
        out = cls.execute(**widgets)
        result = out.result if hasattr(out, "result") else out
    else:
        obj = cls()
        result = getattr(obj, cls.FUNCTION)(**widgets)
    return result[0], result[1], (cls_name, widgets)


def make(models_dir: str) -> list[str]:
    import torch

    from . import st_io, synthetic
    from .formats import KeyResolver
    folder = os.path.join(models_dir, "loras")
    os.makedirs(folder, exist_ok=True)
    stamp = json.dumps({"loader": list(default_loader()), "version": VERSION}, sort_keys=True)
    paths = [os.path.join(folder, name) for name, *_ in _FILES]
    fresh = all(os.path.isfile(p) and st_io.read_metadata(p).get("editkit.demo") == stamp for p in paths)
    if fresh:
        return paths
    model, clip, _ = load_default_model()
    resolver = KeyResolver(model, clip)
    with torch.inference_mode():
        for (name, fmt, kinds, rank, seed), path in zip(_FILES, paths):
            targets = synthetic.select_targets(resolver, kinds)
            sd = synthetic.make_lora(resolver, targets, fmt, rank=rank, seed=seed, scale=0.02, dtype=torch.float16)
            st_io.save(sd, path, {"editkit.demo": stamp, "ss_network_dim": str(rank),
                                  "ss_network_module": "networks.lora" if fmt != "loha" else "lycoris.kohya"})
    return paths
