"""Every shipped workflow: valid UI format, only EditKit and core nodes (or nodes named in its README
row), no absolute paths, model files the demo setup provides, and it runs headless."""
import glob
import json
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS = sorted(glob.glob(os.path.join(ROOT, "workflows", "*.json")))
IDS = [os.path.basename(p) for p in WORKFLOWS]
MODEL_EXT = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".sft", ".onnx")
VIRTUAL = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}


def core_node_types():
    import nodes
    return {k for k, v in nodes.NODE_CLASS_MAPPINGS.items() if not str(getattr(v, "RELATIVE_PYTHON_MODULE", "")).startswith("custom_nodes")}


def readme_row_nodes(name):
    """Node types named (in backticks) in the README row of this workflow."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    for line in text.splitlines():
        if line.startswith("|") and f"`{name}`" in line.split("|")[1]:
            return set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", line))
    return set()


def all_nodes(data):
    """Top-level nodes and the nodes of every subgraph definition."""
    subs = (data.get("definitions") or {}).get("subgraphs") or []
    return list(data["nodes"]) + [n for s in subs for n in s.get("nodes") or []], {s["id"] for s in subs}


def test_there_are_workflows():
    assert len(WORKFLOWS) >= 2


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_workflow_is_clean_ui_format(path):
    from editkit.runner import workflow
    data = json.load(open(path, encoding="utf-8"))
    assert workflow.is_ui_format(data), "not the UI format the canvas saves (nodes + links)"
    assert isinstance(data.get("nodes"), list) and isinstance(data.get("links"), list)
    ids = [n["id"] for n in data["nodes"]]
    assert len(ids) == len(set(ids)), "duplicate node ids"
    nodes, subgraph_ids = all_nodes(data)
    allowed = core_node_types() | VIRTUAL | subgraph_ids | readme_row_nodes(os.path.basename(path))
    for node in nodes:
        assert node["type"].startswith("EditKit") or node["type"] in allowed, \
            f"node {node['id']}: {node['type']} is neither EditKit, core, nor named in the README row"
    # links point at nodes that exist
    for link in data["links"]:
        lid, o, _, t = (link[0], link[1], link[2], link[3]) if isinstance(link, list) else \
            (link["id"], link["origin_id"], link["origin_slot"], link["target_id"])
        assert o in ids and t in ids, f"link {lid} points at a missing node"
    text = json.dumps(data)
    assert not re.search(r'"(/(work|home|root|tmp|Users|mnt)/|[A-Za-z]:\\\\)', text), "absolute path in the workflow"


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_workflow_model_files_are_provided(path):
    """Every model file a widget names is one the demo setup writes (runner/assets.py)."""
    import editkit_boot
    models = os.path.join(editkit_boot.base_dir(), "models")
    provided = {os.path.relpath(os.path.join(d, f), models).split(os.sep, 1)[-1]
                for d, _, files in os.walk(models) for f in files}
    nodes, _ = all_nodes(json.load(open(path, encoding="utf-8")))
    for node in nodes:
        values = node.get("widgets_values") or []
        for v in values.values() if isinstance(values, dict) else values:
            if isinstance(v, str) and v.lower().endswith(MODEL_EXT):
                assert v.replace("\\", "/") in provided, \
                    f"node {node['id']} ({node['type']}) names {v!r}, which no <area>/demo_assets.py provides"


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_workflow_runs_headless(path, run_workflow, output_dir):
    result = run_workflow(path)
    assert result.success, (result.error, result.node_errors)
    files = result.files(output_dir)
    assert files and all(os.path.getsize(f) > 0 for f in files)
