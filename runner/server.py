"""Start and stop a real ComfyUI server (main.py) with EditKit in custom_nodes/, for tests and tooling.

Standalone (stdlib only, no ComfyUI import): the server runs in its own process, on a free port on
127.0.0.1, with a temporary --base-directory (custom_nodes/EditKit -> this checkout, models/, input/,
output/), an in-memory database and no API nodes. It is stopped by its own PID, and on Linux also by the
kernel when the thread that started it dies (a killed pytest worker must not leave its server running).

    with ComfyServer(models_from="/path/to/models") as srv:
        print(srv.url)
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def comfy_dir() -> str:
    path = os.environ.get("COMFYUI_PATH") or os.path.join(PACK_DIR, ".comfyui")
    if not os.path.isfile(os.path.join(path, "main.py")):
        raise RuntimeError(f"no ComfyUI at {path}: run `make setup` (or set COMFYUI_PATH)")
    return os.path.abspath(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """preexec_fn: ask Linux to SIGTERM the child when the parent thread exits (PR_SET_PDEATHSIG).

    A no-op elsewhere. Without it an OOM-killed or SIGKILLed test worker orphans its server, which then
    holds a port and a few hundred MB until someone kills it by hand.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _write_model_paths(base: str, models_dir: str) -> str | None:
    """An --extra-model-paths-config naming every folder under models_dir (also non-standard ones)."""
    if not models_dir or not os.path.isdir(models_dir):
        return None
    folders = sorted(d for d in os.listdir(models_dir) if os.path.isdir(os.path.join(models_dir, d)))
    if not folders:
        return None
    path = os.path.join(base, "editkit_model_paths.yaml")
    with open(path, "w") as f:  # YAML; JSON strings are valid YAML scalars
        f.write("editkit:\n")
        f.write(f"  base_path: {json.dumps(os.path.abspath(models_dir))}\n")
        for d in folders:
            f.write(f"  {d}: {json.dumps(d)}\n")
    return path


class ComfyServer:
    """A ComfyUI server process. start() blocks until GET / answers 200 (or raises with the log tail)."""

    def __init__(self, base_dir: str | None = None, models_from: str | None = None, port: int | None = None,
                 threads: int = 1, extra_args: list[str] | None = None, startup_timeout: float = 240.0):
        self._own_base = base_dir is None
        self.base = base_dir or tempfile.mkdtemp(prefix="editkit-server-")
        self.models_from = models_from
        self.port = port
        self.threads = threads
        self.extra_args = list(extra_args or [])
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(self.base, "server.log")
        self._log = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _prepare_base(self) -> list[str]:
        for sub in ("custom_nodes", "models", "input", "output", "temp", "user"):
            os.makedirs(os.path.join(self.base, sub), exist_ok=True)
        link = os.path.join(self.base, "custom_nodes", "EditKit")
        if not os.path.lexists(link):
            os.symlink(PACK_DIR, link)
        args = []
        cfg = _write_model_paths(self.base, self.models_from)
        if cfg:
            args += ["--extra-model-paths-config", cfg]
        return args

    def command(self) -> list[str]:
        return [sys.executable, os.path.join(comfy_dir(), "main.py"), "--cpu", "--listen", "127.0.0.1",
                "--port", str(self.port), "--disable-auto-launch", "--disable-api-nodes",
                "--base-directory", self.base, "--database-url", "sqlite:///:memory:"]

    def start(self) -> "ComfyServer":
        extra = self._prepare_base()
        self.port = self.port or free_port()
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(self.threads))
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command() + extra + self.extra_args, cwd=comfy_dir(), env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_tail()
                self.stop()
                raise RuntimeError(f"ComfyUI server exited with code {self.proc.returncode} during startup:\n{tail}")
            try:
                with urllib.request.urlopen(self.url + "/", timeout=5) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        tail = self.log_tail()
        self.stop()
        raise RuntimeError(f"ComfyUI server not ready after {self.startup_timeout:.0f} s:\n{tail}")

    def log_tail(self, chars: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")[-chars:]
        except OSError:
            return ""

    def get_json(self, path: str, timeout: float = 60):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        """Stop the server by its own PID (SIGTERM, then SIGKILL after 15 s). Idempotent."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
        if self._log is not None:
            self._log.close()
            self._log = None

    def cleanup(self) -> None:
        self.stop()
        if self._own_base:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.cleanup()
