"""Model files for the shipped workflows (runner/assets.py contract): the trained toy model.

The weights are committed in models/toy/ (toy.safetensors and its weak UNet toy_weak.safetensors);
this links every one of them (or copies them where links are not allowed) to <models_dir>/toy/ so
the workflows' file names resolve like any other model file.
"""
from __future__ import annotations

import os
import shutil


def make(models_dir: str) -> list[str]:
    from ..builtin_models import toy
    if not toy.available():
        return []
    folder = os.path.join(models_dir, "toy")
    os.makedirs(folder, exist_ok=True)
    src_dir = os.path.dirname(toy.DEFAULT_PATH)
    written = []
    for name in sorted(os.listdir(src_dir)):
        if not name.endswith(".safetensors"):
            continue
        src, dst = os.path.join(src_dir, name), os.path.join(folder, name)
        if not os.path.exists(dst):
            try:
                os.symlink(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
        written.append(dst)
    return written
