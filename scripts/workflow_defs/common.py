"""Shared pieces of the workflow definitions: the default model and the builder."""
import nodes  # ComfyUI's (the builder runs after boot)

from editkit.runner.uibuild import WorkflowBuilder

# The model every shipped workflow runs on: the best one the repository has.
MODEL_LOADER = ("EditKitToyModelLoader", {"weights": "toy.safetensors"})
SOURCE_PROMPT = "a red circle on a white background"
EDIT_PROMPT = "a blue circle on a white background"


def builder() -> WorkflowBuilder:
    return WorkflowBuilder(nodes.NODE_CLASS_MAPPINGS)


def model_loader(b, pos=(20, 200)):
    cls, widgets = MODEL_LOADER
    return b.add(cls, pos, size=(300, 120), **widgets)


def decode_and_save(b, latent, vae, pos, prefix):
    dec = b.add("VAEDecode", pos, size=(200, 50))
    b.connect(latent, dec, "samples")
    b.connect(vae, dec, "vae")
    save = b.add("SaveImage", (pos[0] + 240, pos[1]), filename_prefix=prefix, size=(260, 280))
    b.connect(dec.out(0), save, "images")
    return dec, save
