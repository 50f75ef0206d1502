"""Generic validation of a node's widget inputs against its own V3 schema (one owner).

ComfyUI 0.3.75 does not check combo values of V3 nodes sent through the API (their type is the string
"COMBO", not a list) and other callers (in-process runs, newer releases, direct calls) may skip its
range checks, so every EditKit node checks its own inputs before it runs: combo values must be one of
the schema's options, INT inputs whole numbers, INT/FLOAT inputs finite and inside the schema's
min/max, STRING inputs strings without NUL bytes. The error names the node and the input and says
what to change (core.errors.EditKitInputError).
"""
from __future__ import annotations

import functools
import inspect
import math

from .errors import EditKitInputError

MAX_STRING = 100_000  # characters; a prompt or word list longer than this is a mistake, not an input


def _options(inp) -> list | None:
    opts = getattr(inp, "options", None)
    if opts is None:
        return None
    return list(opts)


def check_value(node: str, inp, value) -> None:
    """Raise EditKitInputError if value does not fit the schema input `inp` (a V3 io.*.Input)."""
    name = inp.id
    kind = {"COMBO": "Combo", "INT": "Int", "FLOAT": "Float", "STRING": "String", "BOOLEAN": "Boolean"}.get(
        inp.get_io_type() if hasattr(inp, "get_io_type") else getattr(inp, "io_type", None))
    if value is None:
        return
    if kind in ("Combo",) and not getattr(inp, "multiselect", False):
        opts = _options(inp)
        if opts is not None and value not in opts:
            shown = ", ".join(repr(o) for o in opts[:12]) + (" ..." if len(opts) > 12 else "")
            raise EditKitInputError(node, name, f"{value!r} not found among the choices",
                                    f"pick one of {shown}" if opts else "add a file to the model folder and pick it")
        return
    if kind == "Int":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise EditKitInputError(node, name, f"{value!r} is not a whole number", "give an integer")
        if isinstance(value, float) and (not math.isfinite(value) or value != int(value)):
            raise EditKitInputError(node, name, f"{value!r} is not a whole number", "give an integer")
        _range(node, name, inp, value)
        return
    if kind == "Float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise EditKitInputError(node, name, f"{value!r} is not a number", "give a number")
        if not math.isfinite(value):
            raise EditKitInputError(node, name, f"{value!r} is not a finite number", "give a finite number")
        _range(node, name, inp, value)
        return
    if kind == "String":
        if not isinstance(value, str):
            raise EditKitInputError(node, name, f"{type(value).__name__} given where text is expected", "give text")
        if "\x00" in value:
            raise EditKitInputError(node, name, "the text contains a NUL byte", "remove the NUL (\\x00) character")
        if len(value) > MAX_STRING:
            raise EditKitInputError(node, name, f"the text is {len(value)} characters long (at most {MAX_STRING})",
                                    "shorten it")
        return
    if kind == "Boolean":
        if not isinstance(value, (bool, int)) or (isinstance(value, int) and value not in (0, 1)):
            raise EditKitInputError(node, name, f"{value!r} is not true or false", "give true or false")


def _range(node, name, inp, value):
    lo, hi = getattr(inp, "min", None), getattr(inp, "max", None)
    if lo is not None and value < lo:
        raise EditKitInputError(node, name, f"{value} is below the minimum {lo}", f"use a value in [{lo}, {hi}]")
    if hi is not None and value > hi:
        raise EditKitInputError(node, name, f"{value} is above the maximum {hi}", f"use a value in [{lo}, {hi}]")


def check_inputs(schema, values: dict) -> None:
    """Check every widget input of `schema` present in `values` (linked inputs are not widgets)."""
    for inp in schema.inputs:
        if inp.id in values:
            check_value(schema.node_id, inp, values[inp.id])


def checked(fn, schema_of):
    """Wrap a node's execute(cls, ...) so its inputs are checked against cls's schema first."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def execute(cls, *args, **kwargs):
        bound = sig.bind_partial(cls, *args, **kwargs)
        values = {}
        for k, v in bound.arguments.items():
            if k == "cls":
                continue
            if sig.parameters[k].kind is inspect.Parameter.VAR_KEYWORD:
                values.update(v)
            else:
                values[k] = v
        check_inputs(schema_of(cls), values)
        return fn(cls, *args, **kwargs)
    execute.__editkit_checked__ = True
    return execute
