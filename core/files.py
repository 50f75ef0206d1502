"""Files EditKit reads and writes: weight files loaded safely with errors that name the input, and save
paths kept inside their target folder (one owner; every loader and saver goes through here).

* `load_weights`: ComfyUI's loader with `safe_load=True` (pickles with weights_only=True). A file it
  cannot read -- a pickle with code in it, a truncated or lying safetensors header, not a weights file
  at all -- becomes an EditKitInputError naming the node input. PyTorch's own message suggests
  re-running with weights_only=False, which would execute the file's code: that text never reaches
  the user.
* `save_path`: a user-given file name prefix -> a path inside `root`; '..', absolute paths, NUL bytes
  and over-long names are refused with an error naming the input.
"""
from __future__ import annotations

import os
import re

from .errors import EditKitInputError

SAFE_HINT = "use a .safetensors file from a source you trust"
MAX_NAME = 200   # characters of one path component (most file systems allow 255 bytes)


def _describe(e: Exception) -> str:
    """A short, safe description of why a weights file could not be read (no unsafe advice)."""
    text = str(e)
    name = type(e).__name__
    if "weights_only" in text or "Unpickling" in name or "Unpickl" in text or "pickle" in text.lower():
        return ("it is a pickle file with content that is not plain tensor data; EditKit loads pickles only in "
                "PyTorch's safe mode and does not run code from model files")
    if "HeaderTooLarge" in text or "header" in text.lower() or "SafetensorError" in name or "safetensors" in text.lower():
        return "its safetensors header is damaged or lies about its contents"
    if isinstance(e, (EOFError,)) or "EOF" in text or "truncated" in text.lower() or "zip" in text.lower():
        return "the file is truncated or not a weights file"
    first = text.strip().splitlines()[0] if text.strip() else name
    first = re.sub(r"weights_only\S*", "", first)
    return f"it could not be read ({name}: {first[:160]})"


def load_weights(path: str, node: str, input_name: str, metadata: bool = False):
    """comfy.utils.load_torch_file(path, safe_load=True) (+ metadata for safetensors) or EditKitInputError."""
    import comfy.utils
    name = os.path.basename(path)
    try:
        if metadata and path.lower().endswith((".safetensors", ".sft")):
            sd, meta = comfy.utils.load_torch_file(path, safe_load=True, return_metadata=True)
            out = (sd, dict(meta or {}))
        elif metadata:
            out = (comfy.utils.load_torch_file(path, safe_load=True), {})
        else:
            out = comfy.utils.load_torch_file(path, safe_load=True)
    except MemoryError:
        raise EditKitInputError(node, input_name, f"{name!r} is too large to load into memory", SAFE_HINT) from None
    except Exception as e:  # noqa: BLE001 - every reader error becomes the input's error
        raise EditKitInputError(node, input_name, f"{name!r} cannot be loaded: {_describe(e)}", SAFE_HINT) from None
    sd = out[0] if metadata else out
    if not isinstance(sd, dict):
        raise EditKitInputError(node, input_name, f"{name!r} holds no state dict of tensors", SAFE_HINT)
    return out


def check_name(name: str, node: str, input_name: str) -> None:
    if not isinstance(name, str) or not name.strip():
        raise EditKitInputError(node, input_name, "the file name is empty", "give a name such as 'editkit/my_lora'")
    if "\x00" in name:
        raise EditKitInputError(node, input_name, "the file name contains a NUL byte", "remove the \\x00 character")
    for part in re.split(r"[\\/]", name):
        if len(part.encode("utf-8")) > MAX_NAME:
            raise EditKitInputError(node, input_name, f"a part of the file name is {len(part.encode('utf-8'))} bytes long "
                                    f"(at most {MAX_NAME})", "use a shorter name")


def save_path(root: str, prefix: str, node: str, input_name: str) -> str:
    """The path `prefix` names inside `root` (sub-folders allowed); a prefix leaving root is refused."""
    check_name(prefix, node, input_name)
    if os.path.isabs(prefix) or re.match(r"^[A-Za-z]:", prefix) or prefix.startswith(("\\", "/", "~")):
        raise EditKitInputError(node, input_name, f"{prefix!r} is an absolute path",
                                f"give a name relative to the target folder ({os.path.basename(root)}/), e.g. 'editkit/my_lora'")
    parts = re.split(r"[\\/]", prefix)
    if any(p == ".." for p in parts):
        raise EditKitInputError(node, input_name, f"{prefix!r} would leave the target folder ({os.path.basename(root)}/)",
                                "remove '..' from the name")
    root_real = os.path.realpath(root)
    full = os.path.realpath(os.path.join(root_real, *[p for p in parts if p not in ("", ".")]))
    if os.path.commonpath([root_real, full]) != root_real:
        raise EditKitInputError(node, input_name, f"{prefix!r} would leave the target folder ({os.path.basename(root)}/)",
                                "give a name inside the folder")
    return full


class loader_errors:
    """`with loader_errors(node, input_name, file_name):` around reading a model file: any error of the
    readers and constructors (except EditKit's own input errors and ComfyUI's interrupt) becomes an
    EditKitInputError naming the input, with a safe description (never PyTorch's weights_only advice)."""

    def __init__(self, node: str, input_name: str, name: str, fix: str = SAFE_HINT):
        self.node, self.input_name, self.name, self.fix = node, input_name, name, fix

    def __enter__(self):
        return self

    def __exit__(self, typ, e, tb):
        if e is None or isinstance(e, EditKitInputError) or not isinstance(e, Exception):
            return False
        if type(e).__name__ == "InterruptProcessingException":
            return False
        if isinstance(e, MemoryError):
            problem = "it is too large to load into memory"
        elif isinstance(e, ValueError) and "weights_only" not in str(e):
            problem = str(e).strip().splitlines()[0][:300] if str(e).strip() else _describe(e)
        else:
            problem = _describe(e)
        raise EditKitInputError(self.node, self.input_name, f"{self.name!r} cannot be loaded: {problem}", self.fix) from None
