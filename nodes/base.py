"""EditKitNode: the base of every EditKit node. Its execute checks the node's widget inputs against
the node's own schema first (core/validate.py: combo values, whole numbers, ranges, text), so a
value ComfyUI let through (V3 combos over the API) gives an error naming the input, never a silently
different run."""
from .api import io
from ..core import validate


def _fresh_schema(cls):
    # define_schema, not GET_SCHEMA: the class ComfyUI executes is a locked clone (no SCHEMA writes), and
    # file dropdowns must list the files present now
    return cls.define_schema()


class EditKitNode(io.ComfyNode):
    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("execute")
        if isinstance(own, classmethod) and not getattr(own.__func__, "__editkit_checked__", False):
            cls.execute = classmethod(validate.checked(own.__func__, _fresh_schema))
