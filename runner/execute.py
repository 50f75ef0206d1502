"""Run an API prompt through ComfyUI's real PromptExecutor in this process (no server)."""
from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field


class HeadlessServer:
    """The parts of PromptServer that PromptExecutor talks to; records events and per-node times."""

    def __init__(self, on_event=None):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.events: list = []
        self.node_started: dict = {}
        self.node_times: dict = {}
        self._current = None
        self._on_event = on_event
        self.sockets_metadata = {}  # read by ComfyUI's progress handler for preview images

    @property
    def current_node(self):
        return self._current

    def send_sync(self, event, data, sid=None):
        now = time.perf_counter()
        self.events.append((event, data))
        if event == "executing":
            node = data.get("node") if isinstance(data, dict) else None
            if self._current is not None:
                self.node_times[self._current] = self.node_times.get(self._current, 0.0) + now - self.node_started[self._current]
            self._current = node
            if node is not None:
                self.node_started[node] = now
        if self._on_event:
            self._on_event(event, data)

    def queue_updated(self):
        pass

    def close(self):
        """Account the time of a node that never finished (the run failed in it)."""
        if self._current is not None:
            now = time.perf_counter()
            self.node_times[self._current] = self.node_times.get(self._current, 0.0) + now - self.node_started[self._current]
            self._current = None


@dataclass
class RunResult:
    success: bool
    prompt: dict
    ui_outputs: dict
    node_outputs: dict             # node id -> tuple of output values (from the executor's cache)
    node_times: dict
    total_time: float
    error: dict | None = None
    events: list = field(default_factory=list)
    node_errors: dict = field(default_factory=dict)   # validation errors of outputs that were left out

    def output(self, node_id, index: int = 0):
        vals = self.node_outputs[str(node_id)][index]
        return vals[0] if isinstance(vals, list) and len(vals) == 1 else vals

    def files(self, output_dir: str) -> list[str]:
        import os
        paths = []
        for node in self.ui_outputs.values():
            for item in node.get("images", []) if isinstance(node, dict) else []:
                base = output_dir if item.get("type") == "output" else None
                if base:
                    paths.append(os.path.join(base, item.get("subfolder", ""), item["filename"]))
        return paths


def validate(prompt: dict, quiet: bool = True):
    """ComfyUI's validate_prompt. quiet: no log lines (the caller reports node_errors itself)."""
    import logging
    import execution
    pid = str(uuid.uuid4())
    root = logging.getLogger()
    level = root.level
    if quiet:
        root.setLevel(logging.CRITICAL)
    try:
        ok, err, outputs, node_errors = asyncio.run(execution.validate_prompt(pid, prompt, None))
    finally:
        root.setLevel(level)
    return ok, err, outputs, node_errors


def _progress_hook(server: HeadlessServer):
    """A ComfyUI progress-bar hook that reports sampler steps as `progress` events (like main.py's)."""
    def hook(value, total, preview_image, prompt_id=None, node_id=None):
        try:
            from comfy_execution.utils import get_executing_context
            ctx = get_executing_context()
        except ImportError:  # older ComfyUI
            ctx = None
        if node_id is None:
            node_id = getattr(ctx, "node_id", None) or server.current_node
        server.send_sync("progress", {"value": value, "max": total, "node": node_id, "prompt_id": server.last_prompt_id})
    return hook


def run_prompt(prompt: dict, on_event=None, keep_outputs: bool = True) -> RunResult:
    """Validate and execute an API prompt. Outputs that fail validation are reported in
    node_errors (and make the run unsuccessful); the valid ones still run, as on the server."""
    import comfy.utils
    import execution
    ok, err, outputs, node_errors = validate(prompt)
    if not ok:
        return RunResult(False, prompt, {}, {}, {}, 0.0, error={"validation": err, "node_errors": node_errors},
                         node_errors=node_errors or {})
    server = HeadlessServer(on_event)
    ex = execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC,
                                  cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
    t0 = time.perf_counter()
    previous_hook = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(_progress_hook(server))
    try:
        prompt_id = str(uuid.uuid4())
        server.last_prompt_id = prompt_id
        ex.execute(prompt, prompt_id, extra_data={"client_id": "editkit-run"}, execute_outputs=outputs)
    finally:
        comfy.utils.set_progress_bar_global_hook(previous_hook)
        server.close()
    total = time.perf_counter() - t0
    node_outputs = {}
    if keep_outputs:
        for nid in prompt:
            entry = ex.caches.outputs.get(nid)
            if entry is None:
                continue
            node_outputs[nid] = getattr(entry, "outputs", entry)
    error = None
    if not ex.success:
        for event, data in ex.status_messages:
            if event in ("execution_error", "execution_interrupted"):
                error = {k: data.get(k) for k in ("node_id", "node_type", "exception_type", "exception_message", "traceback")}
                if event == "execution_interrupted":
                    error["exception_message"] = "interrupted"
    elif node_errors:
        error = {"validation": "some outputs failed validation and were not run", "node_errors": node_errors}
    history = getattr(ex, "history_result", {}) or {}
    return RunResult(bool(ex.success) and not node_errors, prompt, history.get("outputs", {}), node_outputs,
                     dict(server.node_times), total, error=error, events=server.events, node_errors=node_errors or {})
