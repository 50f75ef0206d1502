"""Boot ComfyUI in-process and load EditKit through ComfyUI's own custom-node loader.

Standalone on purpose (no package-relative imports): the test harness, the workflow runner and
the benchmarks load this file by path before EditKit itself is importable. After boot(), the pack
is importable as `editkit` (an alias of the module ComfyUI loaded, so classes are identical).
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
import tempfile

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_STATE: dict = {}


def comfy_dir() -> str:
    path = os.environ.get("COMFYUI_PATH") or os.path.join(PACK_DIR, ".comfyui")
    if not os.path.isfile(os.path.join(path, "main.py")):
        raise SystemExit(f"no ComfyUI at {path}: run `make setup` (or set COMFYUI_PATH)")
    return os.path.abspath(path)


def pack_link(cdir: str) -> str:
    """The pack as ComfyUI sees it: its entry in custom_nodes/ (falls back to the checkout)."""
    link = os.path.join(cdir, "custom_nodes", "EditKit")
    return link if os.path.exists(os.path.join(link, "__init__.py")) else PACK_DIR


def _alias(module) -> None:
    """Make the pack importable as `editkit` (and its loaded submodules as editkit.x)."""
    name = module.__name__
    sys.modules["editkit"] = module
    for key, mod in list(sys.modules.items()):
        if key.startswith(name + "."):
            sys.modules["editkit" + key[len(name):]] = mod


def _import_all(module) -> None:
    """Import every submodule of the pack under ComfyUI's name for it, so the `editkit` aliases cover
    them all (a later `import editkit.x` must find the very module the nodes use, not a second copy)."""
    import importlib
    import pkgutil
    for info in pkgutil.walk_packages(module.__path__, module.__name__ + "."):
        try:
            importlib.import_module(info.name)
        except Exception as e:  # an optional dependency missing must not stop tests of the rest
            logging.warning("EditKit: could not import %s: %s", info.name, e)


def boot(threads: int | None = None, sdpa: bool = True, base_dir: str | None = None, quiet: bool = True,
         extra_nodes: bool = True, load_pack: bool = True, assets: bool = True):
    """Import ComfyUI (CPU unless a GPU is present), init its nodes, load EditKit. Idempotent."""
    if "editkit" in _STATE:
        return _STATE["editkit"]
    if quiet:
        logging.basicConfig(level=logging.WARNING)
    cdir = comfy_dir()
    if cdir not in sys.path:
        sys.path.insert(0, cdir)
    import comfy.options
    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    args = comfy.cli_args.args
    import torch
    if not torch.cuda.is_available() and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        args.cpu = True
    if sdpa:
        args.use_pytorch_cross_attention = True
    if threads:
        torch.set_num_threads(threads)
    base = base_dir or os.environ.get("EDITKIT_RUN_DIR")
    if not base:
        import atexit
        import shutil
        base = tempfile.mkdtemp(prefix="editkit-run-")
        atexit.register(shutil.rmtree, base, True)
    import folder_paths
    for sub in ("output", "temp", "input"):
        os.makedirs(os.path.join(base, sub), exist_ok=True)
    folder_paths.set_output_directory(os.path.join(base, "output"))
    folder_paths.set_temp_directory(os.path.join(base, "temp"))
    folder_paths.set_input_directory(os.path.join(base, "input"))
    import utils.extra_config  # noqa: F401  (must precede `import nodes`: ComfyUI's utils vs comfy/utils.py)
    import nodes
    if extra_nodes:
        root = logging.getLogger()
        level = root.level
        if quiet:  # ComfyUI logs every optional comfy_extras module it cannot import (no torchaudio here)
            root.setLevel(logging.ERROR)
        try:
            asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        finally:
            root.setLevel(level)
    _STATE.update(base_dir=base, nodes=nodes, assets=assets)
    if not load_pack:
        return None
    return load(cdir)


def load(cdir: str | None = None):
    """Load EditKit through ComfyUI's custom-node loader (after boot(load_pack=False))."""
    import nodes
    cdir = cdir or comfy_dir()
    path = pack_link(cdir)
    if not asyncio.run(nodes.load_custom_node(path)):
        raise RuntimeError(f"ComfyUI failed to load EditKit from {path} (see the log above)")
    module = sys.modules[path.replace(".", "_x_")]
    _import_all(module)
    _alias(module)
    _STATE.update(editkit=module, nodes=nodes)
    if _STATE.get("assets", True):
        # Model files the shipped workflows name (random weights, see runner/assets.py).
        from editkit.runner import assets
        assets.prepare(os.path.join(_STATE["base_dir"], "models"))
    return module


def base_dir() -> str:
    return _STATE["base_dir"]
