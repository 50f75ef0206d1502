"""The pack as ComfyUI sees it: loader, node registry, tooltips, web extension, packaging metadata."""
import os
import re
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def editkit_nodes(comfy_nodes):
    return {k: v for k, v in comfy_nodes.NODE_CLASS_MAPPINGS.items() if getattr(v, "RELATIVE_PYTHON_MODULE", "").endswith("EditKit")}


def test_loader_registered_every_node(comfy_nodes):
    from editkit.nodes import node_list
    ids = {n.GET_SCHEMA().node_id for n in node_list()}
    assert ids and ids <= set(comfy_nodes.NODE_CLASS_MAPPINGS)
    assert set(editkit_nodes(comfy_nodes)) == ids


def test_ids_categories_and_tooltips(comfy_nodes):
    for node_id, cls in editkit_nodes(comfy_nodes).items():
        assert node_id.startswith("EditKit"), node_id
        assert re.fullmatch(r"EditKit/[a-z][a-z_ -]*", cls.CATEGORY), (node_id, cls.CATEGORY)
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, value in (spec.get(section) or {}).items():
                opts = value[1] if len(value) > 1 else {}
                assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert cls.DESCRIPTION, f"{node_id} has no description"


def test_web_directory_is_served(comfy_nodes):
    dirs = {os.path.realpath(v) for v in comfy_nodes.EXTENSION_WEB_DIRS.values()}
    assert os.path.realpath(os.path.join(ROOT, "web")) in dirs
    assert any(f.endswith(".js") for f in os.listdir(os.path.join(ROOT, "web")))


def test_requirements_never_pin_torch_or_comfy():
    reqs = [l.split("#")[0].strip() for l in open(os.path.join(ROOT, "requirements.txt"))]
    names = {re.split(r"[<>=!~\[ ]", r)[0].lower() for r in reqs if r}
    assert not names & {"torch", "torchvision", "torchaudio", "comfyui", "diffusers", "mergekit"}


def test_pyproject_registry_metadata():
    data = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))
    assert data["project"]["name"] and data["project"]["version"]
    comfy = data["tool"]["comfy"]
    for key in ("PublisherId", "DisplayName", "Icon", "includes"):
        assert key in comfy


def test_import_is_light():
    """Loading the pack into a booted ComfyUI imports no third-party module ComfyUI had not imported already."""
    import subprocess
    import sys
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('b', {os.path.join(ROOT, 'runner', 'boot.py')!r})\n"
        "b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b)\n"
        "b.boot(threads=1, load_pack=False)\n"
        "before = {k.split('.')[0] for k in sys.modules}\n"
        "b.load()\n"
        "new = {k.split('.')[0] for k in sys.modules} - before\n"
        "print(sorted(n for n in new if not n.startswith('/') and n not in ('editkit', 'editkit_boot') and n not in sys.stdlib_module_names))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_every_node_has_a_readme_row_and_a_workflow(comfy_nodes):
    """A technique is done when its node, its workflow and its README row exist."""
    import glob
    import json
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    used = set()
    for path in glob.glob(os.path.join(ROOT, "workflows", "*.json")):
        used |= {n["type"] for n in json.load(open(path, encoding="utf-8"))["nodes"]}
    ids = sorted(k for k in comfy_nodes.NODE_CLASS_MAPPINGS if k.startswith("EditKit"))
    assert [i for i in ids if f"`{i}`" not in readme] == []
    assert [i for i in ids if i not in used] == []


def test_v3_api_is_the_pinned_version():
    """Nodes use comfy_api.v0_0_2 (stable across 0.3.75 and current ComfyUI), `latest` only for missing names."""
    import glob
    import comfy_api.v0_0_2 as pinned
    from editkit.nodes import api
    assert api.PINNED == "comfy_api.v0_0_2" and api.io is pinned.io and api.ComfyExtension is pinned.ComfyExtension
    assert api.FALLBACKS == []      # 0.3.75's v0_0_2 has every name
    for path in glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True):
        rel = os.path.relpath(path, ROOT)
        if rel.startswith((".venv", ".comfyui")) or rel == os.path.join("nodes", "api.py"):
            continue
        assert "comfy_api.latest" not in open(path).read() or rel.startswith("tests"), f"{rel} imports comfy_api.latest"
