"""The example images shipped with the pack (web/examples/): toy-world scenes rendered at SD1.5's
native 512 px, so one file serves the toy model (scaled to 128 px by the workflow's Image Scale node)
and a real checkpoint alike. Deterministic: scripts/build_workflows.py writes them, a test re-renders
and compares."""
from __future__ import annotations

import numpy as np

from .world import Scene, ToyObject

SIZE = 512
# file name -> (background, ((shape, colour, x, y, side), ...)); the captions are the workflows' source prompts
EXAMPLES = {
    "editkit_example.png": ("white", (("circle", "red", 136, 136, 240),)),     # "a red circle on a white background"
    "editkit_example_2.png": ("yellow", (("square", "blue", 152, 152, 208),)),  # "a blue square on a yellow background"
}


def scene(name: str) -> Scene:
    background, objects = EXAMPLES[name]
    return Scene(background, tuple(ToyObject(s, c, x, y, side) for s, c, x, y, side in objects), -1, SIZE)


def render(name: str) -> np.ndarray:
    """(H, W, 3) uint8."""
    return (np.clip(scene(name).render(supersample=4), 0, 1) * 255 + 0.5).astype(np.uint8)


def write(folder: str) -> list[str]:
    import os

    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    paths = []
    for name in EXAMPLES:
        path = os.path.join(folder, name)
        Image.fromarray(render(name)).save(path, optimize=True)
        paths.append(path)
    return paths
