"""Test harness: boots the real ComfyUI (CPU) once, loads EditKit through ComfyUI's loader, and
provides tiny models built in code, full-size random-weight UNets and a workflow runner.

Tests import the pack as `editkit` (an alias of the module ComfyUI loaded).
"""
import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("editkit_boot", os.path.join(ROOT, "runner", "boot.py"))
boot = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(boot)
sys.modules["editkit_boot"] = boot
# One thread by default: two threads on a shared core slow small ops down by orders of magnitude.
boot.boot(threads=int(os.environ.get("TORCH_THREADS", "1")))

# The checkout holds the pack's __init__.py, so pytest sets up the checkout as a package and imports that file
# before the first test. In a folder whose name is not a Python identifier (a clone into mktemp's "tmp.XXXX")
# pytest imports it as a lone module named "__init__", where its relative imports fail; hand pytest the pack
# ComfyUI loaded (the same file, through custom_nodes/EditKit) under that name instead.
if not os.path.basename(ROOT).isidentifier():
    sys.modules.setdefault("__init__", sys.modules["editkit"])

import torch  # noqa: E402

from editkit.builtin_models import fullsize, tiny  # noqa: E402

import ek_dtype_guard as dtype_guard  # noqa: E402


def pytest_sessionstart(session):
    # The test header (printed under -q too): which dtype the full-size fixtures compute in here.
    from editkit.core.compute_dtype import ENV, choice
    line = f"EditKit full-size fixtures: {choice().describe()} (set {ENV}=bf16|fp32 to force)"
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(line)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: full-size architectures or long runs (still part of `make test`)")
    config.addinivalue_line("markers", "browser: needs chromium (skipped when missing)")


@pytest.fixture(scope="session", autouse=True)
def _emulated_dtype_guard():
    """Fail any test whose layers compute in a dtype this host emulates in software (bf16 on AVX2-only
    CPUs: ~300x slower than fp32), so a fixture can never bring that trap back."""
    with dtype_guard.EmulatedComputeGuard() as guard:
        yield guard


@pytest.fixture(autouse=True)
def _no_emulated_compute(_emulated_dtype_guard):
    _emulated_dtype_guard.violations.clear()
    yield
    if _emulated_dtype_guard.violations:
        pytest.fail(_emulated_dtype_guard.message(), pytrace=False)


@pytest.fixture(autouse=True)
def _inference_mode():
    # ComfyUI runs every node under inference mode; tests do the same.
    with torch.inference_mode():
        yield


@pytest.fixture(scope="session")
def comfy_nodes():
    import nodes
    return nodes


@pytest.fixture(scope="session")
def tiny_eps():
    return tiny.tiny_unet(tiny.EPS, seed=0)


@pytest.fixture(scope="session")
def tiny_v():
    return tiny.tiny_unet(tiny.V_PREDICTION, seed=0)


@pytest.fixture(scope="session")
def tiny_flow():
    return tiny.tiny_unet(tiny.FLOW, seed=0)


@pytest.fixture(scope="session", params=[tiny.EPS, tiny.V_PREDICTION, tiny.FLOW])
def tiny_any(request):
    return tiny.tiny_unet(request.param, seed=0)


@pytest.fixture(scope="session")
def tiny_flux():
    return tiny.tiny_flux(seed=0)


@pytest.fixture(scope="session")
def tiny_clip():
    return tiny.tiny_clip()


@pytest.fixture(scope="session")
def tiny_vae():
    return tiny.tiny_vae()


@pytest.fixture(scope="session")
def sd15_full():
    return fullsize.sd15_unet()


@pytest.fixture(scope="session")
def sdxl_full():
    m = fullsize.sdxl_unet()
    yield m
    del m


@pytest.fixture
def encode(tiny_clip):
    def enc(text):
        return tiny.encode(tiny_clip, text)
    return enc


@pytest.fixture(scope="session")
def run_workflow():
    """Run a workflow file or dict (UI or API format) through ComfyUI's PromptExecutor; returns a RunResult."""
    import nodes
    from editkit.runner import execute, workflow

    def run(wf, overrides=None, model=None, max_steps=None):
        """model="toy": the shipped graph on the toy model (editkit-run --model toy); max_steps: the speed knob."""
        import folder_paths

        from editkit.runner import assets, substitute
        data = workflow.load(wf) if isinstance(wf, (str, os.PathLike)) else wf
        prompt = workflow.to_api(data, nodes.NODE_CLASS_MAPPINGS)
        if model or max_steps:
            prompt = substitute.apply(prompt, substitute.plan(prompt, substitute.hints(data), model, max_steps))
        for (node_id, name), value in (overrides or {}).items():
            prompt[str(node_id)]["inputs"][name] = value
        assets.copy_examples(prompt, folder_paths.get_input_directory())
        return execute.run_prompt(prompt)
    return run


@pytest.fixture(scope="session")
def output_dir():
    import folder_paths
    return folder_paths.get_output_directory()
