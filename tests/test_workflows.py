"""Every shipped workflow: valid UI format, only EditKit and core nodes, no absolute paths, runs headless."""
import glob
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS = sorted(glob.glob(os.path.join(ROOT, "workflows", "*.json")))


def core_node_types():
    import nodes
    return {k for k, v in nodes.NODE_CLASS_MAPPINGS.items() if not str(getattr(v, "RELATIVE_PYTHON_MODULE", "")).startswith("custom_nodes")}


def test_there_are_workflows():
    assert len(WORKFLOWS) >= 2


@pytest.mark.parametrize("path", WORKFLOWS, ids=[os.path.basename(p) for p in WORKFLOWS])
def test_workflow_is_clean_ui_format(path):
    data = json.load(open(path))
    assert isinstance(data.get("nodes"), list) and isinstance(data.get("links"), list)
    allowed = core_node_types() | {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
    for node in data["nodes"]:
        assert node["type"].startswith("EditKit") or node["type"] in allowed, node["type"]
    text = json.dumps(data)
    assert "/work/" not in text and "/home/" not in text and ":\\\\" not in text


@pytest.mark.parametrize("path", WORKFLOWS, ids=[os.path.basename(p) for p in WORKFLOWS])
def test_workflow_runs_headless(path, run_workflow, output_dir):
    result = run_workflow(path)
    assert result.success, result.error
    files = result.files(output_dir)
    assert files and all(os.path.getsize(f) > 0 for f in files)
