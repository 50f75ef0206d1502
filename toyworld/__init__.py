"""The toy world: a seeded generator of simple captioned scenes with exact ground truth, a checker that
reads generated images back against captions, and evaluation helpers (txt2img accuracy, PSNR).

Library code only (no node classes). `world` and `checker` need only numpy/scipy; `evaluate` needs ComfyUI.
"""
from . import checker, world  # noqa: F401
