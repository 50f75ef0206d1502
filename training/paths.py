"""Output files of training nodes, kept inside their ComfyUI folder (loras/, embeddings/)."""
from __future__ import annotations

import os
import re

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\- ]*$")


class OutputNameError(ValueError):
    def __init__(self, problem: str, fix: str):
        self.problem, self.fix = problem, fix
        super().__init__(f"{problem} - {fix}")


def folder(kind: str) -> str:
    """The first folder ComfyUI lists for `kind` (where its loaders look by default)."""
    import folder_paths
    return folder_paths.get_folder_paths(kind)[0]


def output_file(kind: str, name: str, ext: str = ".safetensors") -> tuple[str, str]:
    """(absolute path, name as ComfyUI's loaders list it) for a file `name` in the `kind` folder.

    Refuses names with folders, '..', absolute paths or drive letters: nothing may leave the folder."""
    raw = (name or "").strip()
    if raw.lower().endswith(ext):
        raw = raw[: -len(ext)]
    if not raw:
        raise OutputNameError("the name is empty", "type a file name such as my_concept")
    if not _NAME.match(raw) or ".." in raw:
        raise OutputNameError(f"{name!r} is not a plain file name (no folders, '..' or special characters)",
                              "use letters, digits, '_', '-', '.' and spaces")
    root = os.path.realpath(folder(kind))
    path = os.path.realpath(os.path.join(root, raw + ext))
    if os.path.dirname(path) != root:
        raise OutputNameError(f"{name!r} would be written outside the {kind} folder", "use a plain file name")
    return path, raw + ext


def checkpoint_file(kind: str, name: str) -> str:
    """Where an interrupted training run of output `name` keeps its checkpoint (output/editkit_training/)."""
    import folder_paths
    base = os.path.join(folder_paths.get_output_directory(), "editkit_training")
    return os.path.join(base, f"{kind}_{os.path.splitext(name)[0]}.pt")
