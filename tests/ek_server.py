"""One real ComfyUI server per test session, shared by tests/test_server.py and tests/test_browser.py.

The server gets EditKit in custom_nodes/ (a link to this checkout), the model files the shipped
workflows name (runner/assets.py, written by the in-process boot of conftest) and a temporary
--base-directory; it is stopped by its own PID when the session ends, also after failures.
"""
import atexit
import glob
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS = sorted(glob.glob(os.path.join(ROOT, "workflows", "*.json")))
# The tests' speed knob (editkit-run --max-steps, runner/substitute.py): the shipped workflows carry the papers'
# step counts (50, 100); every workflow runs headless and on the server at most this many steps, a few at full length.
TEST_MAX_STEPS = 12
_STATE = {}


def shared_server(tmp_path_factory):
    """Start the session's server on first use (reused afterwards); the caller registers stop()."""
    if "server" in _STATE:
        return _STATE["server"]
    if "error" in _STATE:
        pytest.fail(f"the ComfyUI server did not start (see the first failure): {_STATE['error']}")
    from editkit.runner import assets
    from editkit.runner.server import ComfyServer
    boot = sys.modules["editkit_boot"]
    models = os.path.join(boot.base_dir(), "models")
    assets.prepare(models)  # idempotent: the files the shipped workflows load
    srv = ComfyServer(base_dir=str(tmp_path_factory.mktemp("comfy-server")), models_from=models)
    atexit.register(srv.stop)
    try:
        srv.start()
    except RuntimeError as e:
        _STATE["error"] = str(e)[:3000]
        raise
    _STATE["server"] = srv
    return srv


def stop_shared_server():
    srv = _STATE.pop("server", None)
    if srv is not None:
        srv.stop()
