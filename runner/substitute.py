"""Model substitution: run a workflow made for a real checkpoint on EditKit's toy model.

    editkit-run "workflows/Inversion - DDIM.json" --model toy

The shipped workflows load the user's checkpoint (Load Checkpoint) and image (Load Image) at the model's
native resolution. `--model toy` runs that same graph on the toy model that ships with EditKit, which is
how the tests, `make demo` and the template thumbnails run every workflow without a download:

* loader nodes are swapped for built-in ones (LOADERS): Load Checkpoint -> EditKit Toy Model Loader,
  Load CLIP Vision / Load ControlNet Model -> EditKit's small demo files; outputs keep their meaning
  (a split UNET / CLIP / VAE loader maps to the matching output of one toy loader);
* file inputs that name the user's files get the demo files that fit the toy model (FILE_INPUTS);
* pixel sizes (INT inputs named width/height/x/y, e.g. Empty Latent Image, Image Scale, Solid Mask) are
  scaled by toy resolution / the workflow's native resolution (128 / 512 for SD1.5), so the latents
  have the toy model's size; images from Load Image go through the workflow's own Image Scale node;
* a node's UI property "editkit_toy" overrides the defaults for that node:
  {"type": "...", "inputs": {...}} replaces it, {"inputs": {...}} sets inputs, {"resolution": 1024}
  on a loader gives the workflow's native resolution (default 512).

A speed knob for tests, explicit and separate (`--max-steps N`, `plan(..., max_steps=N)`): a node whose
`steps` exceeds N runs N steps, and the inputs of the same node that count steps (STEP_COUNTS: T_skip,
MasaCtrl's start step, ...) are scaled with it. Without it the shipped step counts (the papers') run.

`plan()` returns the changes as data (the browser test applies the same list to the live canvas);
`apply()` makes them on an API prompt. Everything else in the graph is left exactly as shipped.
"""
from __future__ import annotations

import copy

HINT = "editkit_toy"
TOY_RESOLUTION = 128
DEFAULT_RESOLUTION = 512
TOY_MODEL = ("EditKitToyModelLoader", {"weights": "toy.safetensors"})
# Demo files written by adapters/demo_assets.py and lora/demo_assets.py for the toy model.
CLIP_VISION_FILE = "editkit-demo-clip-vision.safetensors"
CONTROLNET_FILE = "editkit-demo-controlnet-toy.safetensors"
IPADAPTER_FILE = "editkit-demo-ipadapter-toy.safetensors"
LORA_FILES = ("editkit_demo_style.safetensors", "editkit_demo_detail.safetensors")

# node type -> (new type, fixed inputs, {old output slot: new output slot})
LOADERS = {
    "CheckpointLoaderSimple": (TOY_MODEL[0], TOY_MODEL[1], {0: 0, 1: 1, 2: 2}),
    "CheckpointLoader": (TOY_MODEL[0], TOY_MODEL[1], {0: 0, 1: 1, 2: 2}),
    "UNETLoader": (TOY_MODEL[0], TOY_MODEL[1], {0: 0}),
    "CLIPLoader": (TOY_MODEL[0], TOY_MODEL[1], {0: 1}),
    "DualCLIPLoader": (TOY_MODEL[0], TOY_MODEL[1], {0: 1}),
    "VAELoader": (TOY_MODEL[0], TOY_MODEL[1], {0: 2}),
    "CLIPVisionLoader": ("EditKitTinyCLIPVisionLoader", {"clip_name": CLIP_VISION_FILE}, {0: 0}),
    "ControlNetLoader": ("EditKitTinyControlNetLoader", {"control_net_name": CONTROLNET_FILE}, {0: 0}),
}
# (node type, input) -> the demo file used on the toy model
FILE_INPUTS = {
    ("EditKitIPAdapterLoader", "ipadapter_file"): IPADAPTER_FILE,
    ("LoraLoader", "lora_name"): LORA_FILES[0],
    ("LoraLoaderModelOnly", "lora_name"): LORA_FILES[0],
    ("EditKitLoraBlockWeight", "lora_name"): LORA_FILES[0],
    ("EditKitLoraMerge", "lora_1"): LORA_FILES[0],
    ("EditKitLoraMerge", "lora_2"): LORA_FILES[1],
    ("EditKitConceptFusion", "lora_1"): LORA_FILES[0],
    ("EditKitConceptFusion", "lora_2"): LORA_FILES[1],
}
SIZE_INPUTS = ("width", "height")       # multiples of 8 (latent pixels)
STEP_COUNTS = ("skip", "start_step", "end_step")   # step indices that follow `steps` under max_steps
POSITION_INPUTS = ("x", "y")


def hints(workflow: dict) -> dict:
    """{node id (str): its "editkit_toy" property} of a UI-format workflow (API prompts carry none)."""
    out = {}
    for node in workflow.get("nodes") or [] if isinstance(workflow, dict) else []:
        h = (node.get("properties") or {}).get(HINT)
        if isinstance(h, dict):
            out[str(node["id"])] = h
    return out


def _scale_size(v: int, f: float) -> int:
    return max(8, int(round(v * f / 8.0)) * 8)


def _cap_steps(inputs: dict, max_steps: int) -> dict:
    steps = inputs.get("steps")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps <= max_steps:
        return {}
    f = max_steps / steps
    out = {"steps": int(max_steps)}
    for name in STEP_COUNTS:
        v = inputs.get(name)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            out[name] = min(max_steps - 1, max(1, int(round(v * f))))
    return out


def plan(prompt: dict, node_hints: dict | None = None, model: str | None = "toy",
         max_steps: int | None = None) -> list[dict]:
    """The changes that put `prompt` on the toy model (and, with max_steps, cap its step counts), one dict
    per changed node: {"node": id, "type": new type or None, "inputs": {name: value}, "slots": {old: new} or None}."""
    if model is None:
        return [{"node": nid, "type": None, "inputs": c, "slots": None}
                for nid, v in prompt.items() if (c := _cap_steps(v.get("inputs") or {}, max_steps or 10 ** 9))]
    if model != "toy":
        raise ValueError(f"unknown model {model!r}: the only substitute is 'toy'")
    node_hints = node_hints or {}
    resolution = DEFAULT_RESOLUTION
    for nid, v in prompt.items():
        r = (node_hints.get(nid) or {}).get("resolution")
        if r:
            resolution = int(r)
    f = TOY_RESOLUTION / float(resolution)
    changes = []
    for nid, v in prompt.items():
        ctype, inputs = v["class_type"], v.get("inputs") or {}
        hint = node_hints.get(nid) or {}
        change = {"node": nid, "type": None, "inputs": {}, "slots": None}
        if hint.get("type"):
            change["type"] = hint["type"]
            change["slots"] = {int(k): int(s) for k, s in (hint.get("slots") or {}).items()} or None
        elif ctype in LOADERS:
            change["type"], fixed, slots = LOADERS[ctype]
            change["inputs"].update(fixed)
            change["slots"] = dict(slots)
        for name, value in inputs.items():
            if isinstance(value, list) or isinstance(value, bool) or not isinstance(value, (int, float)):
                if (ctype, name) in FILE_INPUTS and not isinstance(value, list):
                    change["inputs"][name] = FILE_INPUTS[(ctype, name)]
                continue
            if change["type"]:
                continue
            if name in SIZE_INPUTS:
                change["inputs"][name] = _scale_size(int(value), f)
            elif name in POSITION_INPUTS:
                change["inputs"][name] = int(round(value * f))
        change["inputs"].update(hint.get("inputs") or {})
        if max_steps and not change["type"]:
            change["inputs"].update(_cap_steps({**inputs, **change["inputs"]}, max_steps))
        if change["type"] or change["inputs"]:
            changes.append(change)
    return changes


def apply(prompt: dict, changes: list[dict]) -> dict:
    """A new API prompt with `changes` made: replaced nodes get their new type and inputs, links out of
    them follow the slot map."""
    out = copy.deepcopy(prompt)
    slot_maps = {}
    for c in changes:
        entry = out[c["node"]]
        if c["type"]:
            entry["class_type"] = c["type"]
            entry["inputs"] = dict(c["inputs"])   # loaders: no links in, only the new loader's settings
            if c["slots"]:
                slot_maps[c["node"]] = c["slots"]
        else:
            entry["inputs"].update(c["inputs"])
    for entry in out.values():
        for name, value in entry["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and str(value[0]) in slot_maps:
                src, slot = str(value[0]), int(value[1])
                entry["inputs"][name] = [value[0], slot_maps[src].get(slot, slot)]
    return out


def to_toy(prompt: dict, node_hints: dict | None = None) -> dict:
    return apply(prompt, plan(prompt, node_hints))
