"""EditKit: diffusion image-editing and personalization papers as ComfyUI nodes.

ComfyUI loads this package from custom_nodes/ and calls comfy_entrypoint(); the node modules are
imported then, and they import only torch, comfy and EditKit's own small modules.
"""
from .nodes.api import ComfyExtension

WEB_DIRECTORY = "./web"


class EditKitExtension(ComfyExtension):
    async def get_node_list(self):
        from .nodes import node_list
        return node_list()


async def comfy_entrypoint() -> EditKitExtension:
    return EditKitExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
