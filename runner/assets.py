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
