"""Settings of the shipped workflows, read at run time so the benchmark measures what a user runs.

A setting is named by workflow file, node type and input name, never by position or constant:

    SDEDIT = {"strength": Setting("sdedit.json", "EditKitSDEdit", "strength"),
              "cfg": Setting("sdedit.json", "CFGGuider", "cfg")}
    read_settings(SDEDIT)  ->  {"strength": 0.6, "cfg": 5.0}

The UI-format file is converted with runner.workflow.to_api (the front end's own widget rules), so the
value is the one the graph runs with, whether typed into the widget or wired from a primitive node.
Anything missing (the file, the node type, the input) raises ShippedSettingError naming it: a
benchmark must not silently fall back to a default when a workflow changes under it.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any, Callable

WORKFLOWS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows")
PRIMITIVE_INPUTS = ("value", "string", "int", "float", "boolean")


class ShippedSettingError(ValueError):
    pass


@dataclass(frozen=True)
class Setting:
    workflow: str                      # file name under workflows/
    node_type: str                     # class_type of the node holding the setting
    input: str                         # its input (widget) name
    convert: Callable[[Any], Any] | None = None   # e.g. bool for "is local blend on"
    title: str | None = None           # pick one node by its title when the workflow has several of the type


@functools.lru_cache(maxsize=None)
def _api(path: str, mtime: float) -> dict:
    import nodes
    from ..runner import workflow
    try:
        return workflow.to_api(workflow.load(path), nodes.NODE_CLASS_MAPPINGS)
    except workflow.WorkflowError as e:
        raise ShippedSettingError(f"shipped workflow {path} cannot be read: {e}") from None


def _find(wid: str, workflows_dir: str | None) -> str | None:
    """The file of the shipped workflow with stable id `wid` (extra.editkit.id; file names are titles)."""
    import glob
    import json
    for p in sorted(glob.glob(os.path.join(workflows_dir or WORKFLOWS_DIR, "*.json"))):
        with open(p, encoding="utf-8") as f:
            if ((json.load(f).get("extra") or {}).get("editkit") or {}).get("id") == wid:
                return p
    return None


def file_title(name: str, workflows_dir: str | None = None) -> str:
    """The file name a user sees for the shipped workflow `name` ("sdedit.json" or id "sdedit")."""
    found = _find(name[:-5] if name.endswith(".json") else name, workflows_dir)
    return os.path.basename(found) if found else name


def load_api(name: str, workflows_dir: str | None = None) -> dict:
    """A shipped workflow, by its stable id (e.g. "sdedit"), as an API prompt {id: {"class_type", "inputs", "_meta"}}."""
    wid = name[:-5] if name.endswith(".json") else name
    direct = os.path.join(workflows_dir or WORKFLOWS_DIR, name)
    path = direct if name.endswith(".json") and os.path.isfile(direct) else _find(wid, workflows_dir)
    if path is None:
        raise ShippedSettingError(f"the benchmark reads its shipped settings from the workflow with id {wid!r}, "
                                  f"which does not ship in workflows/; update the Setting table in bench/quality.py "
                                  f"to the workflow that ships this technique")
    return _api(path, os.path.getmtime(path))


def read_setting(s: Setting, workflows_dir: str | None = None):
    prompt = load_api(s.workflow, workflows_dir)
    found = [(nid, n) for nid, n in prompt.items() if n["class_type"] == s.node_type
             and (s.title is None or (n.get("_meta") or {}).get("title") == s.title)]
    where = f"workflows/{s.workflow}"
    if not found:
        what = f"{s.node_type} node" + (f" titled {s.title!r}" if s.title else "")
        raise ShippedSettingError(f"{where} has no {what}; the benchmark reads {s.node_type}.{s.input} there "
                                  f"(update the Setting table in bench/quality.py)")
    values = []
    for nid, n in found:
        if s.input not in n["inputs"]:
            raise ShippedSettingError(f"{where}: node {nid} ({s.node_type}) has no input {s.input!r} "
                                      f"(inputs: {', '.join(sorted(n['inputs']))})")
        values.append(_resolve(prompt, n["inputs"][s.input], where, nid, s.input))
    if any(v != values[0] for v in values[1:]):
        raise ShippedSettingError(f"{where} has {len(found)} {s.node_type} nodes with different {s.input} "
                                  f"({values}); give the Setting a title to pick one")
    return s.convert(values[0]) if s.convert else values[0]


def _resolve(prompt: dict, value, where: str, nid: str, name: str):
    """A widget value, or the value of a primitive node wired into it."""
    if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)):
        return value
    src = prompt.get(value[0])
    ins = (src or {}).get("inputs") or {}
    keys = [k for k in PRIMITIVE_INPUTS if k in ins and not isinstance(ins[k], list)]
    if src is None or len(ins) != 1 or not keys:
        kind = src["class_type"] if src else "a missing node"
        raise ShippedSettingError(f"{where}: input {name!r} of node {nid} is wired from {kind}, not a value the "
                                  f"benchmark can read")
    return ins[keys[0]]


def read_settings(spec: dict[str, Setting], workflows_dir: str | None = None) -> dict:
    """{name: value} for a {name: Setting} table."""
    return {k: read_setting(s, workflows_dir) for k, s in spec.items()}


def sources(spec: dict[str, Setting]) -> list[str]:
    """The workflow files a table reads, in first-use order."""
    out = []
    for s in spec.values():
        if s.workflow not in out:
            out.append(s.workflow)
    return out
