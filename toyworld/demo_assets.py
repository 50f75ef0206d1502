"""Model files for the shipped workflows (runner/assets.py contract): the trained toy model.

The weights are committed in models/toy/; this links them (or copies them where links are not
allowed) to <models_dir>/toy/ so the workflows' file names resolve like any other model file.
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
    dst = os.path.join(folder, os.path.basename(toy.DEFAULT_PATH))
    if not os.path.exists(dst):
        try:
            os.symlink(toy.DEFAULT_PATH, dst)
        except OSError:
            shutil.copyfile(toy.DEFAULT_PATH, dst)
    return [dst]
