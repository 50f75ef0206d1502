"""Loader node for EditKit's trained toy text-to-image model (models/toy/, see its MODEL_CARD.md)."""
from __future__ import annotations

import os

from .api import io
from .base import EditKitNode

from ..builtin_models import toy
from ..core.errors import EditKitInputError

NODE = "EditKitToyModelLoader"


def _folder_paths_files() -> list[str]:
    """Files in ComfyUI's "toy" model folder, when one is registered (e.g. by EditKit's demo setup)."""
    import folder_paths
    if "toy" not in folder_paths.folder_names_and_paths:
        return []
    return [f for f in folder_paths.get_filename_list("toy") if f.endswith(".safetensors")]


def weight_files() -> list[str]:
    d = os.path.dirname(toy.DEFAULT_PATH)
    files = set(f for f in os.listdir(d) if f.endswith(".safetensors")) if os.path.isdir(d) else set()
    files |= set(_folder_paths_files())
    default = os.path.basename(toy.DEFAULT_PATH)
    # the shipped model first (the dropdown's default), whatever else sorts before it
    return sorted(files, key=lambda f: (f != default, f)) or [default]


def resolve(name: str) -> str | None:
    path = os.path.join(os.path.dirname(toy.DEFAULT_PATH), os.path.basename(name))
    if os.path.isfile(path):
        return path
    if name in _folder_paths_files():
        import folder_paths
        return folder_paths.get_full_path("toy", name)
    return None


class ToyModelLoader(EditKitNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE,
            display_name="Toy Model Loader (trained, ships with EditKit)",
            category="EditKit/loaders",
            description="EditKit's small trained text-to-image model (UNet, CLIP text encoder, VAE) for the toy world: "
                        "128x128 images of one or two shapes (circle, square, triangle) in eight colours on a "
                        "plain background, prompted like \"a red circle on a white background\". Use a 128x128 "
                        "empty latent. Real edits and measurable results with no download. toy_weak.safetensors is "
                        "a smaller, briefly trained UNet of the same family (AutoGuidance's weak model): it loads "
                        "with the CLIP and VAE of toy.safetensors.",
            inputs=[
                io.Combo.Input("weights", options=weight_files(), default=weight_files()[0],
                               tooltip="Weights file in EditKit's models/toy/ folder or in a 'toy' model folder registered "
                                       "with ComfyUI. toy.safetensors is the shipped model; toy_weak.safetensors is its "
                                       "weak UNet for EditKitGuidanceTermAutoGuidance's weak_model (its clip and vae "
                                       "outputs are those of toy.safetensors, which must be present too)."),
            ],
            outputs=[io.Model.Output("model", display_name="model", tooltip="The toy UNet (EPS, SD1 noise schedule; the weak "
                                                                              "UNet for toy_weak.safetensors)."),
                     io.Clip.Output("clip", display_name="clip", tooltip="The toy CLIP text encoder (4 layers, 64-d)."),
                     io.Vae.Output("vae", display_name="vae", tooltip="The toy VAE (4 latent channels, 8x downscale).")],
        )

    @classmethod
    def execute(cls, weights) -> io.NodeOutput:
        path = resolve(weights)
        if path is None:
            raise EditKitInputError(NODE, "weights", f"no file {weights!r} in EditKit's models/toy/ or ComfyUI's toy "
                                    "model folder", "restore models/toy/ from git or run `make toy-model`")
        try:
            meta = toy.read_metadata(path)
        except Exception as e:  # not a safetensors file, or not one of EditKit's toy files
            raise EditKitInputError(NODE, "weights", f"{weights!r} is not an EditKit toy model file ({e})",
                                    "choose toy.safetensors or toy_weak.safetensors") from None
        companion = toy.companion_name(meta)
        companion_path = None
        if companion:
            beside = os.path.join(os.path.dirname(path), os.path.basename(companion))
            companion_path = beside if os.path.isfile(beside) else resolve(companion)
            if companion_path is None:
                raise EditKitInputError(NODE, "weights", f"{weights!r} holds only a UNet (a weak model for AutoGuidance); "
                                        f"its CLIP and VAE come from {companion!r}, which is in neither EditKit's "
                                        "models/toy/ nor ComfyUI's toy model folder",
                                        f"put {companion} next to it (restore models/toy/ from git or run `make toy-model`)")
        try:
            model, clip, vae = toy.load_toy(path, companion_path=companion_path)
        except ValueError as e:
            raise EditKitInputError(NODE, "weights", str(e), "restore models/toy/ from git or run `make toy-model`") from None
        model = model.clone()
        toy.install_size_guard(model)
        return io.NodeOutput(model, clip, vae)


NODES = [ToyModelLoader]
