"""Thin V3 nodes, one file per area. Each node validates, clones the model, installs patches, returns."""
import importlib

# One line per area module (keeps merges of new areas conflict-free).
AREAS = (
    "loaders",
    "editing",
    "analysis",
    "guidance",
    "adapters",
    "toy",
    "inversion",
    "attention_control",
    "lora",
    "drag",
    "training",
    "cache",
    "layout",
)


def node_list() -> list:
    nodes = []
    for name in AREAS:
        nodes.extend(importlib.import_module(f"{__name__}.{name}").NODES)
    return nodes
