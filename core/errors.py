"""User-facing input errors.

ComfyUI shows the message of an exception raised by a node; a ValueError that names the node
input and says what to change is what a user can act on.
"""


class EditKitInputError(ValueError):
    """A bad node input, with the input's name and what to change."""

    # ComfyUI shows module + qualname as the exception type; the module ComfyUI's loader gives this file
    # is its path ("/.../custom_nodes/EditKit.core.errors"), so name it plainly.
    __module__ = "EditKit"

    def __init__(self, node: str, input_name: str, problem: str, fix: str = ""):
        self.node, self.input_name = node, input_name
        msg = f"{node}: input '{input_name}': {problem}"
        if fix:
            msg += f" — {fix}"
        super().__init__(msg)


def require(condition: bool, node: str, input_name: str, problem: str, fix: str = "") -> None:
    if not condition:
        raise EditKitInputError(node, input_name, problem, fix)
