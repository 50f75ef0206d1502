"""The ComfyUI V3 node API EditKit codes against, in one place.

Pinned to `comfy_api.v0_0_2` (in ComfyUI 0.3.75 and in current releases); `comfy_api.latest`
declares itself unstable, so it is used only for a name the pinned version lacks (older releases
whose v0_0_2 did not re-export `io`/`ui`/`ComfyExtension`). `FALLBACKS` records which names came
from `latest` in this runtime (shown by the pack test).
"""
import importlib

PINNED = "comfy_api.v0_0_2"
NAMES = ("io", "ui", "ComfyExtension")
FALLBACKS: list[str] = []


def _load():
    try:
        pinned = importlib.import_module(PINNED)
    except ImportError:
        pinned = None
    latest = None
    found = {}
    for name in NAMES:
        value = getattr(pinned, name, None) if pinned is not None else None
        if value is None:
            if latest is None:
                latest = importlib.import_module("comfy_api.latest")
            value = getattr(latest, name)
            FALLBACKS.append(name)
        found[name] = value
    return found


_api = _load()
io = _api["io"]
ui = _api["ui"]
ComfyExtension = _api["ComfyExtension"]

__all__ = ["io", "ui", "ComfyExtension", "FALLBACKS", "PINNED"]
