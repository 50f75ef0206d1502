"""Model files the shipped workflows name, generated deterministically (random weights) at test/demo time.

No model hub is reachable, so workflows that load files (LoRAs, adapters, CLIP vision, ...) run on
files EditKit writes itself. Contract for an area that needs files: a module
`<area>/demo_assets.py` (in any library folder of the pack) with

    def make(models_dir: str) -> list[str]:
        '''Write the files under models_dir/<comfy folder name>/<file name the workflows use>; return paths.'''

It must be deterministic, idempotent (skip files that exist) and fast. prepare() calls every such
module and registers each models_dir/<folder> with ComfyUI's folder_paths.
"""
from __future__ import annotations

import importlib
import os
import pkgutil


PACK = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Example images the shipped workflows' Load Image nodes name. They are served with the front-end
# extension (web/examples/), which uploads one into ComfyUI's input folder when a workflow that names it
# is opened and the file is not there yet; editkit-run does the same (a copy in-process, an upload on a server).
EXAMPLES_DIR = os.path.join(PACK, "web", "examples")


def example_images() -> dict[str, str]:
    """{file name: path} of the shipped example images."""
    if not os.path.isdir(EXAMPLES_DIR):
        return {}
    return {f: os.path.join(EXAMPLES_DIR, f) for f in sorted(os.listdir(EXAMPLES_DIR)) if f.lower().endswith(".png")}


def examples_used(prompt: dict) -> list[str]:
    """Shipped example images an API prompt's Load Image nodes name."""
    shipped = example_images()
    names = {v["inputs"].get("image") for v in prompt.values() if v.get("class_type") == "LoadImage"}
    return sorted(n for n in names if isinstance(n, str) and n in shipped)


def copy_examples(prompt: dict, input_dir: str) -> list[str]:
    """Copy the example images the prompt needs into input_dir when they are missing there."""
    import shutil
    written = []
    for name in examples_used(prompt):
        dest = os.path.join(input_dir, name)
        if not os.path.exists(dest):
            os.makedirs(input_dir, exist_ok=True)
            shutil.copyfile(example_images()[name], dest)
            written.append(dest)
    return written


def _areas():
    import editkit
    for info in pkgutil.iter_modules(editkit.__path__):
        if info.ispkg and os.path.isfile(os.path.join(editkit.__path__[0], info.name, "demo_assets.py")):
            yield info.name


def register(models_dir: str) -> None:
    import folder_paths
    if not os.path.isdir(models_dir):
        return
    for name in sorted(os.listdir(models_dir)):
        path = os.path.join(models_dir, name)
        if os.path.isdir(path):
            # First in the list, so files a workflow saves (e.g. a merged LoRA) land in the run's folder.
            folder_paths.add_model_folder_path(name, path, is_default=True)


def prepare(models_dir: str) -> list[str]:
    os.makedirs(models_dir, exist_ok=True)
    written = []
    for area in _areas():
        mod = importlib.import_module(f"editkit.{area}.demo_assets")
        written += list(mod.make(models_dir) or [])
    register(models_dir)
    return written
