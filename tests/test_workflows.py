"""Every shipped workflow: valid UI format, only EditKit and core nodes (or nodes named in its README
row), no absolute paths, the user's checkpoint and photo (Load Checkpoint, Load Image of a shipped
example) or clearly a toy-model demo, a note, unique titles, registry properties, a clean layout, model
files the toy substitution provides, and it runs headless on the toy model (`--model toy`)."""
import glob
import json
import os
import re
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS = sorted(glob.glob(os.path.join(ROOT, "workflows", "*.json")))
IDS = [os.path.basename(p) for p in WORKFLOWS]
MODEL_EXT = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".sft", ".onnx")
VIRTUAL = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
# The Templates browser shows file names: "<Area> - <technique>", areas in this order (alphabetical).
AREAS = ["Adapters", "Analysis", "Attention", "Editing", "Guidance", "Inversion", "Layout", "LoRA", "Speed", "Toy model", "Training"]
TOY_LOADERS = {"EditKitToyModelLoader", "EditKitTinyModelLoader"}
USER_LOADERS = {"CheckpointLoaderSimple", "CheckpointLoader", "UNETLoader"}


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


def load(path):
    return json.load(open(path, encoding="utf-8"))


def is_toy_demo(path):
    return os.path.basename(path).startswith("Toy model - ")


def test_there_are_workflows():
    assert len(WORKFLOWS) >= 30


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_workflow_is_clean_ui_format(path):
    from editkit.runner import workflow
    data = load(path)
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


def test_template_names_are_readable_titles_grouped_by_area():
    """The Templates browser lists custom-node workflows by file name: "<Area> - <technique>", so sorting
    by name groups them by area; every file has a stable id (extra.editkit.id) that tools use."""
    from editkit.runner import shipped
    seen = {}
    for path in WORKFLOWS:
        name = os.path.basename(path)[:-5]
        area, sep, technique = name.partition(" - ")
        assert sep and area in AREAS and technique, f"{name!r} is not '<Area> - <technique>' (areas: {AREAS})"
        assert re.fullmatch(r"[A-Za-z0-9 ()+,.\-]+", name) and "_" not in name, f"{name!r}: not a readable title"
        wid = load(path)["extra"]["editkit"]["id"]
        assert re.fullmatch(r"[a-z0-9_]+", wid) and wid not in seen, (name, wid)
        seen[wid] = path
    assert {k: os.path.basename(v) for k, v in seen.items()} == {k: os.path.basename(v) for k, v in shipped.index().items()}
    areas = [os.path.basename(p).partition(" - ")[0] for p in WORKFLOWS]
    assert areas == sorted(areas, key=AREAS.index), "file names sort into area groups"


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_workflow_is_the_one_a_user_runs(path):
    """Load Checkpoint of the user's model (toy demos: the toy model), Load Image of a shipped example where
    it edits a photo, a note saying what to change; native resolution (the toy run scales it)."""
    from editkit.runner import assets
    data = load(path)
    types = [n["type"] for n in data["nodes"]]
    notes = [n for n in data["nodes"] if n["type"] in ("MarkdownNote", "Note")]
    assert notes and all(len(n["widgets_values"][0]) > 80 for n in notes), "no note on the canvas saying what to change"
    if is_toy_demo(path):
        assert "EditKitToyModelLoader" in types and not USER_LOADERS & set(types)
        return
    assert USER_LOADERS & set(types), "no Load Checkpoint: the user cannot pick their model"
    assert not TOY_LOADERS & set(types), "a user workflow loads a built-in model (toy demos are 'Toy model - ...')"
    for n in data["nodes"]:
        if n["type"] == "LoadImage":
            assert n["widgets_values"][0] in assets.example_images(), "Load Image names no shipped example image"
        if n["type"] in ("EmptyLatentImage", "ImageScale", "EditKitPromptBatch"):
            size = [v for v in n["widgets_values"] if isinstance(v, int) and not isinstance(v, bool)][:2]
            assert min(size) >= 512, f"node {n['id']} ({n['type']}): {size} is below the model's native resolution"
    photo = re.search(r"\(photo\)|^(Inversion|Editing) - ", os.path.basename(path))
    if photo:
        assert "LoadImage" in types, "a photo workflow without Load Image"


def test_every_technique_area_has_a_photo_workflow():
    names = [os.path.basename(p) for p in WORKFLOWS]
    for area in ("Attention", "Editing", "Inversion"):
        assert any(n.startswith(area) and "LoadImage" in {x["type"] for x in load(p)["nodes"]}
                   for n, p in zip(names, WORKFLOWS)), area


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_titles_and_registry_properties(path, comfy_nodes):
    """As the front end saves: unique titles (API clients find nodes by _meta.title), cnr_id/ver on nodes
    (EditKit's registry id and version; comfy-core for core nodes) so the front end asks no registry."""
    from editkit.runner import workflow
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    data = load(path)
    api = workflow.ui_to_api(data, comfy_nodes.NODE_CLASS_MAPPINGS)
    titles = [v["_meta"]["title"] for v in api.values()]
    assert all(titles) and len(titles) == len(set(titles)), f"titles not unique: {sorted(titles)}"
    for n in data["nodes"]:
        if n["type"] in VIRTUAL:
            continue
        assert api[str(n["id"])]["_meta"]["title"] == (n.get("title") or workflow.display_name(n["type"], comfy_nodes.NODE_CLASS_MAPPINGS))
        props = n["properties"]
        if n["type"].startswith("EditKit"):
            assert (props.get("cnr_id"), props.get("ver")) == (project["name"], project["version"]), (n["id"], props)
        else:
            assert props.get("cnr_id") == "comfy-core" and props.get("ver"), (n["id"], props)


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_layout_has_no_overlaps_or_hidden_group_titles(path):
    from editkit.runner import layout
    data = load(path)
    assert not layout.check(data), layout.check(data)
    # sizes leave room for what the nodes show after a run (previews, measurements)
    import nodes
    for n in data["nodes"]:
        if n["type"] in VIRTUAL:
            continue
        need = layout.estimate_size(n, nodes.NODE_CLASS_MAPPINGS)
        assert n["size"][1] >= need[1], f"node {n['id']} ({n['type']}): height {n['size'][1]} < {need[1]}"


def test_layout_check_finds_overlaps_and_covered_group_titles():
    """Negative control for the check above."""
    from editkit.runner import layout
    a = {"id": 1, "type": "A", "pos": [0, 100], "size": [200, 100]}
    b = {"id": 2, "type": "B", "pos": [150, 180], "size": [200, 100]}    # its title bar overlaps a
    c = {"id": 3, "type": "C", "pos": [600, 100], "size": [200, 100]}
    assert layout.check({"nodes": [a, b]}) and not layout.check({"nodes": [a, c]})
    group = {"title": "G", "bounding": [580, 40, 240, 200], "font_size": 24}     # c's title bar in the band
    assert layout.check({"nodes": [c], "groups": [group]})
    group["bounding"] = [580, 0, 240, 240]
    assert not layout.check({"nodes": [c], "groups": [group]})


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_model_files_are_the_users_or_provided_on_the_toy_model(path, comfy_nodes):
    """Every model file the toy run names is one the demo setup writes (runner/assets.py): the user's
    file names (Load Checkpoint, IP-Adapter, LoRAs) are all substituted by `--model toy`."""
    import editkit_boot

    from editkit.runner import substitute, workflow
    models = os.path.join(editkit_boot.base_dir(), "models")
    provided = {os.path.relpath(os.path.join(d, f), models).split(os.sep, 1)[-1]
                for d, _, files in os.walk(models) for f in files}
    data = load(path)
    prompt = workflow.ui_to_api(data, comfy_nodes.NODE_CLASS_MAPPINGS)
    toy = substitute.apply(prompt, substitute.plan(prompt, substitute.hints(data)))
    for nid, v in toy.items():
        for name, value in v["inputs"].items():
            if isinstance(value, str) and value.lower().endswith(MODEL_EXT):
                assert value.replace("\\", "/") in provided, \
                    f"node {nid} ({v['class_type']}).{name} = {value!r} on the toy model: no demo file provides it"


def test_example_images_are_made_by_the_pack():
    """web/examples/ holds exactly what toyworld/examples.py renders (no downloaded or hand-edited file)."""
    import numpy as np
    from PIL import Image

    from editkit.runner import assets
    from editkit.toyworld import examples
    assert sorted(assets.example_images()) == sorted(examples.EXAMPLES)
    for name, path in assets.example_images().items():
        assert os.path.getsize(path) < 64 * 1024, f"{name} is not small"
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), examples.render(name)), name


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_workflow_runs_headless_on_the_toy_model(path, run_workflow, output_dir):
    """The shipped graph on the toy model, step counts capped by the tests' speed knob (TEST_MAX_STEPS)."""
    from ek_server import TEST_MAX_STEPS
    result = run_workflow(path, model="toy", max_steps=TEST_MAX_STEPS)
    assert result.success, (result.error, result.node_errors)
    files = result.files(output_dir)
    assert files and all(os.path.getsize(f) > 0 for f in files)
    # feedback on the node: what each node declares it shows (EDITKIT_SHOWS, nodes/feedback.py) arrived
    import nodes
    for nid, v in result.prompt.items():
        shows = getattr(nodes.NODE_CLASS_MAPPINGS[v["class_type"]], "EDITKIT_SHOWS", ())
        ui = result.ui_outputs.get(nid) or {}
        if "text" in shows:
            assert ui.get("text") and ui["text"][0].strip(), (nid, v["class_type"], ui)
        if "image" in shows:
            assert ui.get("images") and all(i["type"] == "temp" for i in ui["images"]), (nid, v["class_type"], ui)


@pytest.mark.parametrize("wid", ["sdedit", "attention_p2p_inverted"])
def test_workflow_runs_with_the_papers_step_counts(wid, run_workflow, output_dir):
    """No speed knob: the shipped step counts (50) run as they are."""
    from editkit.runner import shipped
    data = load(shipped.path(wid))
    steps = [v for n in data["nodes"] for v in n.get("widgets_values") or [] if v == 50]
    assert steps, "the workflow no longer ships 50 steps"
    result = run_workflow(shipped.path(wid), model="toy")
    assert result.success, (result.error, result.node_errors)
    assert result.files(output_dir)


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_thumbnail_is_the_toy_run_of_this_workflow(path, comfy_nodes):
    """workflows/<name>.jpg: what the Templates browser shows, made by scripts/build_thumbnails.py from the
    toy run of this very graph (its comment records the graph's hash: a changed graph needs a new one)."""
    import sys

    import numpy as np
    from PIL import Image
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import build_thumbnails
    jpg = path[:-5] + ".jpg"
    assert os.path.exists(jpg), "no thumbnail: run scripts/build_thumbnails.py"
    img = Image.open(jpg)
    assert img.format == "JPEG" and img.size == (build_thumbnails.SIZE,) * 2 and os.path.getsize(jpg) < 48 * 1024
    assert build_thumbnails.read_key(jpg) == build_thumbnails.thumbnail_key(load(path), comfy_nodes.NODE_CLASS_MAPPINGS), \
        "the thumbnail shows an older version of this workflow: run scripts/build_thumbnails.py"
    assert np.asarray(img.convert("L")).std() > 5, "a blank thumbnail"
