"""The real ComfyUI server (main.py --cpu) with EditKit in custom_nodes/: node definitions, web
extension, and every shipped workflow queued through `editkit-run --server`."""
import json
import os
import subprocess
import sys
import urllib.parse
import urllib.request

import pytest

from ek_server import ROOT, TEST_MAX_STEPS, WORKFLOWS, shared_server, stop_shared_server

RUNNER = [sys.executable, os.path.join(ROOT, "scripts", "editkit_run.py")]
TOY = ("--model", "toy", "--max-steps", str(TEST_MAX_STEPS))


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory, request):
    request.addfinalizer(stop_shared_server)
    return shared_server(tmp_path_factory)


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.get_json("/object_info", timeout=120)


def run_cli(*args, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(RUNNER + list(args), capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    summary = None
    if proc.stdout.strip().startswith("{"):
        summary = json.loads(proc.stdout)
    return proc, summary


def test_object_info_lists_every_editkit_node_with_tooltips(object_info, comfy_nodes):
    from editkit.nodes import node_list
    ids = {n.GET_SCHEMA().node_id for n in node_list()}
    served = {k for k, v in object_info.items() if k.startswith("EditKit")}
    assert ids and ids == served, f"missing on the server: {ids - served}; unexpected: {served - ids}"
    for node_id in sorted(ids):
        info = object_info[node_id]
        assert info.get("description"), f"{node_id}: no description"
        assert info["category"].startswith("EditKit/"), node_id
        assert "custom_nodes" in info.get("python_module", ""), (node_id, info.get("python_module"))
        for section in ("required", "optional"):
            for name, spec in (info["input"].get(section) or {}).items():
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                assert opts.get("tooltip"), f"{node_id}.{name}: no tooltip on the server"
        for i, name in enumerate(info.get("output_name") or []):
            assert name, f"{node_id} output {i} has no name"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[os.path.basename(p) for p in WORKFLOWS])
def test_object_info_and_node_classes_convert_alike(path, object_info, comfy_nodes):
    """Server mode converts with /object_info, in-process mode with the node classes: same prompt."""
    from editkit.runner import workflow
    data = workflow.load(path)
    assert workflow.ui_to_api(data, object_info) == workflow.ui_to_api(data, comfy_nodes.NODE_CLASS_MAPPINGS)


def test_web_extension_is_served(comfy_server):
    exts = comfy_server.get_json("/extensions")
    ours = [e for e in exts if e.startswith("/extensions/EditKit/")]
    assert "/extensions/EditKit/editkit.js" in ours, exts[-5:]
    with urllib.request.urlopen(comfy_server.url + "/extensions/EditKit/editkit.js", timeout=30) as r:
        assert r.status == 200 and b"registerExtension" in r.read()


@pytest.mark.parametrize("path", WORKFLOWS, ids=[os.path.basename(p) for p in WORKFLOWS])
def test_workflow_runs_on_the_server(path, comfy_server, tmp_path):
    proc, summary = run_cli(path, *TOY, "--server", comfy_server.url, "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:] + "\n--- server log ---\n" + comfy_server.log_tail(3000)
    assert summary["success"] and summary["mode"] == "server"
    assert summary["outputs"], "no output image came back"
    for f in summary["outputs"]:
        with open(f, "rb") as fh:
            head = fh.read(8)
        assert head == b"\x89PNG\r\n\x1a\n" and os.path.getsize(f) > 100, f
    assert summary["node_times"] and summary["total_time"] > 0
    # the progress bar went to stderr, nothing but the JSON to stdout
    assert "[" in proc.stderr and "done in" in proc.stderr


def test_server_node_errors_name_node_and_input(comfy_server, tmp_path):
    from editkit.runner import shipped
    wf = shipped.path("sdedit")
    proc, summary = run_cli(wf, *TOY, "--server", comfy_server.url, "--out", str(tmp_path), "--quiet",
                            "--set", "EditKitSDEdit.steps=abc")
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.startswith("editkit-run:")]
    assert len(lines) == 1 and "(EditKitSDEdit" in lines[0] and "input 'steps'" in lines[0], proc.stderr
    assert summary["success"] is False


def test_server_runtime_error_keeps_earlier_outputs(comfy_server, tmp_path):
    from editkit.runner import shipped
    wf = shipped.path("attention_maps")
    proc, summary = run_cli(wf, *TOY, "--server", comfy_server.url, "--out", str(tmp_path), "--quiet",
                            "--set", "EditKitAttentionMaps.words=")
    assert proc.returncode == 1, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.startswith("editkit-run:")]
    assert len(lines) == 1 and "EditKitAttentionMaps" in lines[0] and "'words'" in lines[0], proc.stderr
    assert summary["error"]["node_type"] == "EditKitAttentionMaps"


def test_templates_browser_lists_every_workflow_with_its_thumbnail(comfy_server):
    """What the front end's Templates browser reads: /workflow_templates (titles = file names) and one
    <name>.jpg thumbnail per workflow beside it (made from the toy run, scripts/build_thumbnails.py)."""
    listed = comfy_server.get_json("/workflow_templates")
    ours = listed.get("EditKit")
    names = sorted(os.path.basename(p)[:-5] for p in WORKFLOWS)
    assert ours and sorted(ours) == names, listed
    for name in names:
        url = comfy_server.url + "/api/workflow_templates/EditKit/" + urllib.parse.quote(name) + ".jpg"
        with urllib.request.urlopen(url, timeout=30) as r:
            assert r.status == 200 and r.read(3) == b"\xff\xd8\xff", name


def test_example_image_is_uploaded_when_the_server_lacks_it(comfy_server, tmp_path):
    """editkit-run --server uploads the shipped example image a Load Image names (as the front-end
    extension does when the workflow is opened) instead of failing on a fresh ComfyUI."""
    from editkit.runner import shipped
    target = os.path.join(comfy_server.base, "input", "editkit_example.png")
    if os.path.exists(target):
        os.remove(target)
    proc, summary = run_cli(shipped.path("sdedit"), *TOY, "--server", comfy_server.url, "--out", str(tmp_path), "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert os.path.exists(target)
    with urllib.request.urlopen(comfy_server.url + "/extensions/EditKit/examples/editkit_example.png", timeout=30) as r:
        assert r.read() == open(target, "rb").read()
