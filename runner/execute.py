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


def validate(prompt: dict):
    import execution
    pid = str(uuid.uuid4())
    ok, err, outputs, node_errors = asyncio.run(execution.validate_prompt(pid, prompt, None))
    return ok, err, outputs, node_errors


def run_prompt(prompt: dict, on_event=None, keep_outputs: bool = True) -> RunResult:
    import execution
    ok, err, outputs, node_errors = validate(prompt)
    if not ok:
        return RunResult(False, prompt, {}, {}, {}, 0.0, error={"validation": err, "node_errors": node_errors})
    server = HeadlessServer(on_event)
    ex = execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC,
                                  cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
    t0 = time.perf_counter()
    ex.execute(prompt, str(uuid.uuid4()), extra_data={"client_id": "editkit-run"}, execute_outputs=outputs)
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
            if event == "execution_error":
                error = {k: data.get(k) for k in ("node_id", "node_type", "exception_type", "exception_message", "traceback")}
    history = getattr(ex, "history_result", {}) or {}
    return RunResult(ex.success, prompt, history.get("outputs", {}), node_outputs, dict(server.node_times), total,
                     error=error, events=server.events)
