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
    from editkit.runner import substitute, workflow
    used = set()
    for path in glob.glob(os.path.join(ROOT, "workflows", "*.json")):
        data = json.load(open(path, encoding="utf-8"))
        used |= {n["type"] for n in data["nodes"]}
        # loaders of built-in models appear in the toy run of the shipped graph (--model toy)
        prompt = workflow.ui_to_api(data, comfy_nodes.NODE_CLASS_MAPPINGS)
        used |= {v["class_type"] for v in substitute.to_toy(prompt, substitute.hints(data)).values()}
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


# ---------------------------------------------------------------------------------------------
# Packaging: registry metadata, the archive users get, comfy-cli's validation, the front-end lint
# ---------------------------------------------------------------------------------------------

def _tool(name):
    import shutil
    import sys
    path = shutil.which(name) or os.path.join(os.path.dirname(sys.executable), name)
    if not os.path.exists(path):   # requirements-dev.txt installs it; a packaging test that skips proves nothing
        pytest.fail(f"{name} is not installed: run `make setup` (requirements-dev.txt)")
    return path


def _run_tool(args, tmp_path, timeout=300):
    import subprocess
    env = dict(os.environ, HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path / ".config"), DO_NOT_TRACK="1")
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout, stdin=subprocess.DEVNULL)


def test_registry_name_and_classifiers():
    data = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))
    project = data["project"]
    assert "comfyui" not in project["name"].lower(), "the registry advises against 'ComfyUI' in the id"
    assert re.fullmatch(r"[a-z][a-z0-9_.-]*", project["name"]) and re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert "Operating System :: OS Independent" in project["classifiers"]
    assert {c for c in project["classifiers"] if c.startswith("Environment :: GPU")} >= {
        "Environment :: GPU :: NVIDIA CUDA", "Environment :: GPU :: AMD ROCm", "Environment :: GPU :: Apple Metal"}
    assert data["tool"]["comfy"]["requires-comfyui"].startswith(">=")


def test_comfy_node_validate_is_clean(tmp_path):
    """comfy-cli's publishing checks (pyproject parse + its ruff security rules), as `comfy node publish` runs them."""
    proc = _run_tool([_tool("comfy"), "--skip-prompt", "--no-enable-telemetry", "node", "validate"], tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "All validation checks passed" in out and "warning" not in out.lower(), out[-3000:]


def test_registry_archive_holds_what_users_need(tmp_path):
    """`comfy node pack` (git-tracked files minus .comfyignore, plus [tool.comfy].includes): the pack's code,
    web extension, example images, workflows with thumbnails and the toy model; no tests, benchmarks, CI
    or developer scripts; and nothing packaged imports what was left out."""
    import zipfile
    zip_path = os.path.join(ROOT, "node.zip")
    try:
        proc = _run_tool([_tool("comfy"), "--skip-prompt", "--no-enable-telemetry", "node", "pack"], tmp_path)
        assert proc.returncode == 0 and os.path.exists(zip_path), (proc.stdout + proc.stderr)[-3000:]
        with zipfile.ZipFile(zip_path) as z:
            names = z.namelist()
            sources = {n: z.read(n).decode("utf-8", "replace") for n in names if n.endswith(".py")}
        size = os.path.getsize(zip_path)
    finally:
        if os.path.exists(zip_path):
            os.remove(zip_path)
    tops = {n.split("/")[0] for n in names}
    assert not tops & {"tests", "bench", ".ci", "scripts", "docs", "Makefile", "requirements-dev.txt"}, sorted(tops)
    for need in ("__init__.py", "nodes/api.py", "core/errors.py", "samplers/inversion.py", "runner/cli.py",
                 "web/editkit.js", "web/examples/editkit_example.png", "models/toy/toy.safetensors",
                 "models/toy/toy_weak.safetensors", "requirements.txt", "pyproject.toml", "README.md"):
        assert need in names, need
    workflows = [n for n in names if n.startswith("workflows/")]
    jsons = {n[:-5] for n in workflows if n.endswith(".json")}
    assert jsons and jsons == {n[:-4] for n in workflows if n.endswith(".jpg")}, "a workflow without its thumbnail"
    for name, text in sources.items():
        assert not re.search(r"^\s*(from|import)\s+(tests|bench|scripts)\b|from \.\.(tests|bench|scripts)\b", text, re.M), name
    assert size < 40 * 1024 * 1024, f"archive is {size / 2**20:.1f} MB"


def test_front_end_extension_passes_comfy_test_lint(tmp_path):
    """comfy-test's static levels (front-end collision lint: no globals, extension names under the pack's
    namespace, no patches on shared objects; Python: cp1252-safe source, ComfyUI-native device/loading)."""
    import json
    proc = _run_tool([_tool("comfy-test"), "lint", ".", "--json", "--strict"], tmp_path)
    start = proc.stdout.find("{")
    report = json.loads(proc.stdout[start:]) if start >= 0 else {}
    assert proc.returncode == 0 and report.get("passed"), (proc.stdout + proc.stderr)[-3000:]
    js = report["results"]["javascript"]
    assert js.get("summary", {}).get("warnings", 0) == 0 and js.get("summary", {}).get("errors", 0) == 0, js
