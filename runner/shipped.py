"""The workflows shipped in workflows/, found by their stable id (extra.editkit.id in each file).

File names are the titles the Templates browser shows ("Inversion - DDIM.json") and may change; the ids
("inversion_ddim") do not. Tests, benchmarks and scripts find a workflow with path(id).
"""
from __future__ import annotations

import glob
import json
import os

WORKFLOWS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows")


def index() -> dict[str, str]:
    """{id: path} of every shipped workflow."""
    out = {}
    for p in sorted(glob.glob(os.path.join(WORKFLOWS_DIR, "*.json"))):
        with open(p, encoding="utf-8") as f:
            wid = ((json.load(f).get("extra") or {}).get("editkit") or {}).get("id")
        if wid:
            out[wid] = p
    return out


def path(wid: str) -> str:
    found = index()
    if wid not in found:
        raise KeyError(f"no shipped workflow with id {wid!r}; ids: {', '.join(sorted(found))}")
    return found[wid]
