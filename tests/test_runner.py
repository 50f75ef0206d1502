"""editkit-run: UI->API conversion rules (checked against hand-written expectations; the browser test
checks them against the front end's own graphToPrompt) and the CLI's in-process behaviour."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = [sys.executable, os.path.join(ROOT, "scripts", "editkit_run.py")]


@pytest.fixture(scope="module")
def wf():
    from editkit.runner import workflow
    return workflow


@pytest.fixture(scope="module")
def classes():
    import nodes
    return nodes.NODE_CLASS_MAPPINGS


def node(nid, type_, widgets=None, inputs=None, outputs=None, mode=0, title=None, **extra):
    n = {"id": nid, "type": type_, "mode": mode, "inputs": inputs or [], "outputs": outputs or [],
         "widgets_values": widgets if widgets is not None else []}
    if title:
        n["title"] = title
    n.update(extra)
    return n


def ui(nodes, links):
    return {"nodes": nodes, "links": links, "version": 0.4}


def test_widgets_in_definition_order_with_seed_control(wf, classes):
    data = ui([node(1, "KSampler", [42, "randomize", 7, 6.5, "euler", "karras", 0.9])], [])
    p = wf.ui_to_api(data, classes)
    assert p["1"]["inputs"] == {"seed": 42, "steps": 7, "cfg": 6.5, "sampler_name": "euler", "scheduler": "karras", "denoise": 0.9}


def test_seed_without_control_value_and_by_name_rule(wf, classes):
    # a file written without the control value still maps (the front end adds one for INT "seed")
    p = wf.ui_to_api(ui([node(1, "KSampler", [42, 7, 6.5, "euler", "karras", 0.9])], []), classes)
    assert p["1"]["inputs"]["steps"] == 7 and p["1"]["inputs"]["denoise"] == 0.9
    from editkit.runner.workflow import InputDef
    assert InputDef("seed", "INT").has_control and InputDef("noise_seed", "INT").has_control
    assert not InputDef("seed", "INT", {"control_after_generate": False}).has_control
    assert not InputDef("steps", "INT").has_control


def test_links_reroute_primitive_bypass_and_mute(wf, classes):
    nodes = [
        node(1, "EmptyLatentImage", [64, 64, 1], outputs=[{"type": "LATENT", "links": [1]}]),
        node(2, "Reroute", inputs=[{"name": "", "type": "*", "link": 1}], outputs=[{"type": "LATENT", "links": [2]}]),
        # bypassed: LATENT in -> LATENT out passes through
        node(3, "LatentUpscaleBy", ["nearest-exact", 2.0], mode=4, inputs=[{"name": "samples", "type": "LATENT", "link": 2}],
             outputs=[{"type": "LATENT", "links": [3]}]),
        node(4, "PrimitiveNode", [5, "fixed"], outputs=[{"type": "INT", "links": [4], "widget": {"name": "amount"}}]),
        node(5, "RepeatLatentBatch", [1], inputs=[{"name": "samples", "type": "LATENT", "link": 3},
                                                  {"name": "amount", "type": "INT", "widget": {"name": "amount"}, "link": 4}],
             outputs=[{"type": "LATENT", "links": []}]),
        node(6, "Note", ["hello"]),
        node(7, "EmptyLatentImage", [8, 8, 1], mode=2),  # muted: dropped
    ]
    links = [[1, 1, 0, 2, 0, "LATENT"], [2, 2, 0, 3, 0, "LATENT"], [3, 3, 0, 5, 0, "LATENT"], [4, 4, 0, 5, 1, "INT"]]
    p = wf.ui_to_api(ui(nodes, links), classes)
    assert set(p) == {"1", "5"}
    assert p["5"]["inputs"] == {"samples": ["1", 0], "amount": 5}


def test_subgraph_is_flattened_with_front_end_ids(wf, classes):
    sg_id = "11111111-2222-3333-4444-555555555555"
    sub = {"id": sg_id, "name": "double", "inputs": [{"name": "samples", "type": "LATENT", "linkIds": [10]},
                                                     {"name": "amount", "type": "INT", "linkIds": [11]}],
           "outputs": [{"name": "LATENT", "type": "LATENT", "linkIds": [12]}],
           "nodes": [node(1, "RepeatLatentBatch", [1], inputs=[{"name": "samples", "type": "LATENT", "link": 10},
                                                              {"name": "amount", "type": "INT", "widget": {"name": "amount"}, "link": 11}])],
           "links": [{"id": 10, "origin_id": -10, "origin_slot": 0, "target_id": 1, "target_slot": 0, "type": "LATENT"},
                     {"id": 11, "origin_id": -10, "origin_slot": 1, "target_id": 1, "target_slot": 1, "type": "INT"},
                     {"id": 12, "origin_id": 1, "origin_slot": 0, "target_id": -20, "target_slot": 0, "type": "LATENT"}]}
    nodes = [node(1, "EmptyLatentImage", [64, 64, 1], outputs=[{"type": "LATENT", "links": [1]}]),
             node(7, sg_id, [3], inputs=[{"name": "samples", "type": "LATENT", "link": 1}],
                  outputs=[{"type": "LATENT", "links": [2]}], properties={"proxyWidgets": [["-1", "amount"]]}),
             node(3, "LatentUpscaleBy", ["nearest-exact", 1.5], inputs=[{"name": "samples", "type": "LATENT", "link": 2}])]
    data = ui(nodes, [[1, 1, 0, 7, 0, "LATENT"], [2, 7, 0, 3, 0, "LATENT"]])
    data["definitions"] = {"subgraphs": [sub]}
    p = wf.ui_to_api(data, classes)
    assert set(p) == {"1", "7:1", "3"}
    assert p["7:1"]["inputs"] == {"samples": ["1", 0], "amount": 3}
    assert p["3"]["inputs"]["samples"] == ["7:1", 0]


def test_unknown_nodes_are_named_before_running(wf, classes):
    data = ui([node(4, "NoSuchNode"), node(9, "AlsoMissing", mode=2)], [])
    with pytest.raises(wf.WorkflowError, match=r"NoSuchNode \(node 4\)") as e:
        wf.ui_to_api(data, classes)
    assert "AlsoMissing" not in str(e.value)  # muted nodes never run


def sdedit_path():
    from editkit.runner import shipped
    return shipped.path("sdedit")


TOY = ("--model", "toy", "--max-steps", "12")


def run_cli(*args, timeout=600):
    """The console script in a subprocess: the real entry point, a fresh ComfyUI boot."""
    proc = subprocess.run(RUNNER + list(args), capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=dict(os.environ, TORCH_THREADS="1"))
    summary = json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else None
    lines = [l for l in proc.stderr.splitlines() if l.startswith("editkit-run:")]
    return proc, summary, lines


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def cli(capsys):
    """editkit-run's main() in this (already booted) process: same code path, no second boot."""
    from editkit.runner import cli as cli_mod

    def run(*args):
        capsys.readouterr()
        code = cli_mod.main([str(a) for a in args])
        out = capsys.readouterr()
        summary = json.loads(out.out) if out.out.strip().startswith("{") else None
        lines = [l for l in out.err.splitlines() if l.startswith("editkit-run:")]
        return Result(code, out.out, out.err), summary, lines
    return run


def test_cli_rejects_a_file_that_is_not_a_workflow(tmp_path, cli):
    bad = tmp_path / "x.json"
    bad.write_text('{"hello": 1}')
    proc, summary, lines = cli(str(bad))
    assert proc.returncode == 2 and summary is None
    assert len(lines) == 1 and "not a ComfyUI workflow" in lines[0]
    bad.write_text("{not json")
    proc, _, lines = cli(str(bad))
    assert proc.returncode == 2 and len(lines) == 1 and "not a JSON file" in lines[0]


def test_cli_missing_model_file_names_node_and_input(tmp_path, cli):
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "no_such_model.safetensors"}},
              "2": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
              "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "kept"}},
              "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
              "5": {"class_type": "VAEDecode", "inputs": {"samples": ["4", 0], "vae": ["1", 2]}},
              "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "never"}}}
    f = tmp_path / "api.json"
    f.write_text(json.dumps(prompt))
    out = tmp_path / "out"
    proc, summary, lines = cli(str(f), "--out", str(out), "--quiet")
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "node 1 (CheckpointLoaderSimple)" in lines[0] and "input 'ckpt_name'" in lines[0], lines
    # the valid branch still ran and its output is kept
    assert summary["outputs"] and all(os.path.exists(p) for p in summary["outputs"])


def test_cli_wrong_type_and_unknown_input(tmp_path, cli):
    path = sdedit_path()
    proc, summary, lines = cli(path, *TOY, "--out", str(tmp_path), "--quiet", "--set", "EditKitSDEdit.steps=many")
    assert proc.returncode == 2 and len(lines) == 1
    assert "(EditKitSDEdit" in lines[0] and "input 'steps'" in lines[0]
    proc, _, lines = cli(path, *TOY, "--out", str(tmp_path), "--quiet", "--set", "KSamplerSelect.stepz=3")
    assert proc.returncode == 2 and len(lines) == 1 and "has no input 'stepz'" in lines[0]


def test_cli_runtime_error_keeps_earlier_outputs(tmp_path, cli):
    """A node that raises mid-run: one line with node and input, exit 1, files already written stay."""
    path = sdedit_path()
    (tmp_path / "earlier.png").write_bytes(b"kept")
    data = json.load(open(path))
    # make the edit branch fail at run time: SDEdit's latent from a latent of the wrong channel count
    ids = {n["type"]: n["id"] for n in data["nodes"]}
    assert "EditKitSDEdit" in ids, "the SDEdit workflow lost its EditKitSDEdit node"
    data["nodes"].append({"id": 99, "type": "EmptyHunyuanLatentVideo", "mode": 0, "inputs": [],
                          "outputs": [{"type": "LATENT", "links": [999]}], "widgets_values": [64, 64, 1, 1]})
    sd = next(n for n in data["nodes"] if n["type"] == "EditKitSDEdit")
    old = next(i for i in sd["inputs"] if i["name"] == "latent")
    data["links"] = [l for l in data["links"] if l[0] != old["link"]] + [[999, 99, 0, sd["id"], 1, "LATENT"]]
    for n in data["nodes"]:
        for o in n.get("outputs") or []:
            if o.get("links") and old["link"] in o["links"]:
                o["links"].remove(old["link"])
    old["link"] = 999
    f = tmp_path / "broken.json"
    f.write_text(json.dumps(data))
    proc, summary, lines = cli(str(f), *TOY, "--out", str(tmp_path))
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1 and f"node {sd['id']} (EditKitSDEdit" in lines[0] and "'latent'" in lines[0], lines
    assert (tmp_path / "earlier.png").read_bytes() == b"kept"
    assert summary["success"] is False and summary["error"]["node_type"] == "EditKitSDEdit"
    assert all(os.path.exists(p) for p in summary["outputs"])  # whatever ran before the failure is kept


def test_cli_summary_progress_seed_and_overrides(tmp_path, cli):
    path = sdedit_path()
    api = tmp_path / "api.json"
    proc, summary, _ = run_cli(path, *TOY, "--out", str(tmp_path / "o"), "--seed", "5", "--set", "Edit prompt.text=a green square",
                               "--set", "EditKitSDEdit.strength=0.3", "--save-api", str(api))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert summary["success"] and summary["mode"] == "in-process" and summary["total_time"] > 0
    assert summary["outputs"] and all(os.path.getsize(p) > 0 for p in summary["outputs"])
    prompt = json.loads(api.read_text())
    assert set(summary["node_times"]) <= set(prompt) and len(summary["node_times"]) == len(prompt)
    assert all(v["inputs"]["seed"] == 5 for v in prompt.values() if "seed" in v["inputs"])
    assert any(v["inputs"].get("text") == "a green square" for v in prompt.values())
    assert any(v["inputs"].get("strength") == 0.3 for v in prompt.values())
    # progress over nodes and sampler steps on stderr, not stdout
    assert "step 12/12" in proc.stderr or "step " in proc.stderr
    assert f"[{len(prompt)}/{len(prompt)}]" in proc.stderr and "done in" in proc.stderr
    # same seed -> same images
    proc2, summary2, _ = cli(path, *TOY, "--out", str(tmp_path / "o2"), "--seed", "5", "--set", "Edit prompt.text=a green square",
                                 "--set", "EditKitSDEdit.strength=0.3", "--quiet")
    assert proc2.returncode == 0 and proc2.stderr.count("[") == 0
    from PIL import Image
    import numpy as np
    for a, b in zip(sorted(summary["outputs"]), sorted(summary2["outputs"])):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


# ---------------------------------------------------------------------------------------------
# Model substitution (--model toy) and the speed knob (--max-steps)
# ---------------------------------------------------------------------------------------------

def test_substitution_swaps_loaders_keeps_output_meaning_and_scales_sizes():
    from editkit.runner import substitute
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5.safetensors"}},
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 768, "batch_size": 1}},
        "4": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["2", 0]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a 512 px cat"}},
        "6": {"class_type": "MaskComposite", "inputs": {"x": 256, "y": 100, "operation": "add",
                                                        "destination": ["7", 0], "source": ["7", 0]}},
        "7": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 512, "height": 512}},
    }
    out = substitute.to_toy(prompt)
    assert out["1"] == {"class_type": "EditKitToyModelLoader", "inputs": {"weights": "toy.safetensors"}}
    assert out["2"]["class_type"] == "EditKitToyModelLoader"
    assert out["4"]["inputs"]["vae"] == ["2", 2], "a VAE loader's output is the toy loader's VAE (slot 2)"
    assert out["5"]["inputs"] == {"clip": ["1", 1], "text": "a 512 px cat"}
    assert (out["3"]["inputs"]["width"], out["3"]["inputs"]["height"]) == (128, 192)
    assert (out["6"]["inputs"]["x"], out["6"]["inputs"]["y"], out["7"]["inputs"]["width"]) == (64, 25, 128)
    assert prompt["1"]["class_type"] == "CheckpointLoaderSimple", "the input prompt is left as it was"


def test_substitution_hints_and_native_resolution():
    from editkit.runner import substitute
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl.safetensors"}},
              "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "weak.safetensors"}},
              "3": {"class_type": "ImageScale", "inputs": {"width": 1024, "height": 1024, "image": ["9", 0]}},
              "4": {"class_type": "EditKitNullTextInversion", "inputs": {"learning_rate": 0.01, "steps": 50}}}
    hints = {"1": {"resolution": 1024},
             "2": {"type": "EditKitToyModelLoader", "inputs": {"weights": "toy_weak.safetensors"}},
             "4": {"inputs": {"learning_rate": 0.05}}}
    out = substitute.to_toy(prompt, hints)
    assert out["2"]["inputs"] == {"weights": "toy_weak.safetensors"}
    assert out["3"]["inputs"]["width"] == 128 and out["4"]["inputs"] == {"learning_rate": 0.05, "steps": 50}
    # hints are read from the UI file's node properties
    ui_data = {"nodes": [{"id": 4, "properties": {"editkit_toy": hints["4"]}}, {"id": 5, "properties": {}}]}
    assert substitute.hints(ui_data) == {"4": hints["4"]}


def test_max_steps_caps_steps_and_scales_step_indices():
    from editkit.runner import substitute
    prompt = {"1": {"class_type": "EditKitDDPMInversion", "inputs": {"steps": 100, "skip": 36, "cfg": 3.5}},
              "2": {"class_type": "EditKitMasaCtrl", "inputs": {"start_step": 4, "end_step": -1, "steps": 50}},
              "3": {"class_type": "KSampler", "inputs": {"steps": 8, "seed": 1}}}
    out = substitute.apply(prompt, substitute.plan(prompt, model=None, max_steps=12))
    assert out["1"]["inputs"] == {"steps": 12, "skip": 4, "cfg": 3.5}
    assert out["2"]["inputs"] == {"start_step": 1, "end_step": -1, "steps": 12}
    assert out["3"]["inputs"] == {"steps": 8, "seed": 1}


def test_cli_model_toy_saves_the_substituted_prompt_with_titles(tmp_path, cli):
    """--model toy on the shipped SDEdit workflow: the API prompt that ran has the toy loader, 128 px, and a
    _meta.title on every node (as the front end's Export (API) writes); the example image was provided."""
    import folder_paths
    api = tmp_path / "api.json"
    example = os.path.join(folder_paths.get_input_directory(), "editkit_example.png")
    if os.path.exists(example):
        os.remove(example)
    proc, summary, lines = cli(sdedit_path(), *TOY, "--out", str(tmp_path), "--quiet", "--save-api", str(api))
    assert proc.returncode == 0 and summary["success"], lines
    prompt = json.loads(api.read_text())
    assert all(v.get("_meta", {}).get("title") for v in prompt.values())
    types = {v["class_type"] for v in prompt.values()}
    assert "EditKitToyModelLoader" in types and "CheckpointLoaderSimple" not in types
    scale = next(v for v in prompt.values() if v["class_type"] == "ImageScale")
    assert (scale["inputs"]["width"], scale["inputs"]["height"]) == (128, 128)
    assert os.path.exists(example), "the example image was not copied into the input folder"


def test_api_titles_default_to_the_display_name(wf, classes):
    data = ui([node(1, "EmptyLatentImage", [64, 64, 1]), node(2, "EditKitSDEdit", [0.5, 10, "normal", 0, "fixed"]),
               node(3, "KSamplerSelect", ["euler"], title="My sampler")], [])
    api = wf.ui_to_api(data, classes)
    assert api["1"]["_meta"] == {"title": "Empty Latent Image"}
    assert api["2"]["_meta"] == {"title": "SDEdit (noise a guide image)"}
    assert api["3"]["_meta"] == {"title": "My sampler"}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_server_child_dies_with_a_killed_parent(tmp_path):
    """A SIGKILLed starter (say an OOM-killed pytest worker) takes the process ComfyServer spawned with it."""
    import signal
    import time
    pidfile = tmp_path / "child.pid"
    parent = f"""
import subprocess, sys, time
sys.path.insert(0, {os.path.dirname(ROOT)!r})
from importlib import util
spec = util.spec_from_file_location("ek_server_mod", {os.path.join(ROOT, "runner", "server.py")!r})
mod = util.module_from_spec(spec); spec.loader.exec_module(mod)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], preexec_fn=mod._die_with_parent)
open({str(pidfile)!r}, "w").write(str(child.pid))
time.sleep(120)
"""
    proc = subprocess.Popen([sys.executable, "-c", parent])
    try:
        deadline = time.monotonic() + 30
        while not (pidfile.exists() and pidfile.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        child = int(pidfile.read_text())
        os.kill(child, 0)  # alive while the parent lives
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(child, 0)
                with open(f"/proc/{child}/stat") as f:  # a zombie nobody reaps (PID 1 of a container) is dead too
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        break
            except (ProcessLookupError, FileNotFoundError):
                break
            time.sleep(0.05)
        else:
            os.kill(child, signal.SIGKILL)
            pytest.fail("the child outlived its SIGKILLed parent by 10 s")
    finally:
        if proc.poll() is None:
            proc.kill()
