"""Shared pieces of the workflow definitions: the builder, the user's checkpoint and photo, notes.

A shipped workflow is the one a user runs on their own checkpoint and photo (DEVELOPERS.md, "Adding a
workflow"): `checkpoint(b, family)` is a Load Checkpoint with a common file name at the family's native
resolution, `photo(b, vae, family)` a Load Image of a shipped example image scaled to that resolution
and encoded, `note(b, ...)` says on the canvas what to change. `editkit-run --model toy` (and so every
test) runs the same graph on the toy model (runner/substitute.py); `family="toy"` builds the toy-model
demos (their own workflows, "Toy model - ...").
"""
import os
import tomllib

import nodes  # ComfyUI's (the builder runs after boot)

from editkit.runner import substitute
from editkit.runner.uibuild import WorkflowBuilder

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The model the toy substitution loads (read by lora/demo_assets.py: the demo LoRAs are made for it).
MODEL_LOADER = ("EditKitToyModelLoader", {"weights": "toy.safetensors"})
SOURCE_PROMPT = "a red circle on a white background"
EDIT_PROMPT = "a blue circle on a white background"
EXAMPLE = "editkit_example.png"        # web/examples/ (toyworld/examples.py): SOURCE_PROMPT at 512 px
EXAMPLE_2 = "editkit_example_2.png"    # "a blue square on a yellow background"

# family -> (checkpoint file name users commonly have, native resolution, what to pick)
FAMILIES = {
    "sd15": ("v1-5-pruned-emaonly.safetensors", 512, "an SD1.5 checkpoint"),
    "sdxl": ("sd_xl_base_1.0.safetensors", 1024, "an SDXL checkpoint"),
    "sd3": ("sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors", 1024,
            "an SD3 / SD3.5 checkpoint with its text encoders included (a rectified-flow model)"),
    "toy": ("toy.safetensors", 128, "EditKit's toy model (ships with the pack)"),
}


def _pack() -> tuple[str, str]:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    return project["name"], project["version"]


def builder() -> WorkflowBuilder:
    import comfyui_version
    return WorkflowBuilder(nodes.NODE_CLASS_MAPPINGS, pack=_pack(), core_version=comfyui_version.__version__)


def native(family: str) -> int:
    return FAMILIES[family][1]


def checkpoint(b, family: str = "sd15", title: str | None = None, toy_weights: str | None = None):
    """The model, CLIP and VAE: Load Checkpoint (the user's file), or the toy model for family 'toy'.
    toy_weights: which toy file `--model toy` loads here (e.g. the weak UNet of AutoGuidance)."""
    name, res, _ = FAMILIES[family]
    if family == "toy":
        return b.add(MODEL_LOADER[0], title=title, col=0, weights=toy_weights or name)
    hint = {}
    if res != substitute.DEFAULT_RESOLUTION:
        hint["resolution"] = res
    if family == "sd3":  # no toy flow model: the tiny flow UNet stands in (random weights)
        hint.update(type="EditKitTinyModelLoader", inputs={"parameterization": "flow", "seed": 0},
                    slots={"0": 0, "1": 1, "2": 2})
    if toy_weights:
        hint.update(type=MODEL_LOADER[0], inputs={"weights": toy_weights}, slots={"0": 0, "1": 1, "2": 2})
    return b.add("CheckpointLoaderSimple", title=title or "Load Checkpoint", col=0, toy=hint or None, ckpt_name=name)


def photo(b, vae, family: str = "sd15", image: str = EXAMPLE, label: str = "your photo", encode=True):
    """Load Image -> Image Scale to the native resolution (center crop) [-> VAE Encode], grouped in column 0.
    Returns {"load", "image" (the scaled image), "latent" (the VAE Encode node, when encode)}."""
    res = native(family)
    load = b.add("LoadImage", title=f"Load Image ({label})", col=0, image=image)
    scale = b.add("ImageScale", title=f"Scale {label} to {res}x{res}", col=0, upscale_method="lanczos", width=res,
                  height=res, crop="center")
    b.connect(load.out(0), scale, "image")
    members = [load, scale]
    out = {"load": load, "image": scale}
    if encode:
        enc = b.add("VAEEncode", title=f"VAE Encode ({label})", col=0)
        b.connect(scale.out(0), enc, "pixels")
        b.connect(vae, enc, "vae")
        members.append(enc)
        out["latent"] = enc
    b.group(label[0].upper() + label[1:], members)
    return out


def empty_latent(b, family: str = "sd15", title: str | None = None, batch_size: int = 1, col=None):
    res = native(family)
    return b.add("EmptyLatentImage", title=title, col=col, width=res, height=res, batch_size=batch_size)


def text(b, clip, value: str, title: str):
    t = b.add("CLIPTextEncode", title=title, text=value)
    b.connect(clip, t, "clip")
    return t


def photo_step(family: str = "sd15") -> str:
    res = native(family)
    return f"**Load Image**: upload your photo (any size: Image Scale crops it to {res}x{res})."


def note(b, family: str, what: str, steps=(), defaults: str = ""):
    """The canvas note (column 0, top): what the workflow does, what to change, where the settings come from."""
    _, res, pick = FAMILIES[family]
    lines = [f"## {what}", ""]
    if family == "toy":
        lines += ["Runs on **EditKit's toy model** (ships with the pack: 128 px shapes on plain backgrounds), no "
                  "download. For your own checkpoint, open the workflow of the same name without \"Toy model\".", ""]
        items = list(steps)
    else:
        items = [f"**Load Checkpoint**: pick {pick} (native {res}x{res})."] + list(steps)
    lines += [f"{i}. {s}" for i, s in enumerate(items, 1)]
    if defaults:
        lines += ["", f"Settings: {defaults}"]
    lines += ["", "Results appear on the nodes that make them: images, heat maps, measurements."]
    return b.note("\n".join(lines), title="Read me")


def decode_and_save(b, latent, vae, prefix, title="Decode", save_title=None):
    dec = b.add("VAEDecode", title=title)
    b.connect(latent, dec, "samples")
    b.connect(vae, dec, "vae")
    save = b.add("SaveImage", title=save_title, filename_prefix=prefix)
    b.connect(dec.out(0), save, "images")
    return dec, save
