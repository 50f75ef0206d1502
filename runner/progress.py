"""A progress bar over nodes and sampler steps, on stderr (stdout stays machine-readable JSON).

Fed by the same events in both modes: in-process from the executor's send_sync plus ComfyUI's
global progress-bar hook, in server mode from the websocket (`executing`, `execution_cached`,
`progress`).
"""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, prompt: dict, stream=None, enabled: bool = True, width: int = 24):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.width = width
        self.names = {str(k): (v.get("_meta") or {}).get("title") or v.get("class_type", "?") for k, v in prompt.items()}
        self.total = len(prompt)
        self.seen: set = set()
        self.node = None
        self.t0 = time.perf_counter()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_line = ""
        self._last_step_print = 0.0

    def _emit(self, line: str, final: bool = False) -> None:
        if not self.enabled:
            return
        if self.tty:
            pad = max(0, len(self._last_line) - len(line))
            self.stream.write("\r" + line + " " * pad + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self._last_line = "" if final else line

    def _bar(self, frac: float) -> str:
        full = int(round(frac * self.width))
        return "#" * full + "." * (self.width - full)

    def _prefix(self) -> str:
        return f"[{len(self.seen):>{len(str(self.total))}}/{self.total}]"

    def event(self, event: str, data) -> None:
        data = data if isinstance(data, dict) else {}
        if event == "execution_cached":
            self.seen.update(str(n) for n in data.get("nodes") or [])
        elif event == "executing":
            node = data.get("node")
            if node is None:
                return
            self.node = str(node)
            self.seen.add(self.node)
            self._emit(f"{self._prefix()} {self._bar(len(self.seen) / max(1, self.total))} "
                       f"{self.names.get(self.node, self.node)} (node {self.node})")
        elif event == "progress":
            value, total = data.get("value", 0), data.get("max", 0) or 1
            node = str(data.get("node") or self.node)
            now = time.perf_counter()
            # On a terminal every step; in a log one line per second at most, plus the last step.
            if self.tty or value >= total or now - self._last_step_print >= 1.0:
                self._last_step_print = now
                self._emit(f"{self._prefix()} {self._bar(value / total)} {self.names.get(node, node)} (node {node}) "
                           f"step {value}/{total}")

    def finish(self, ok: bool) -> None:
        if self.enabled:
            if self.tty and self._last_line:
                self.stream.write("\n")
            self.stream.write(f"{'done' if ok else 'FAILED'} in {time.perf_counter() - self.t0:.1f} s\n")
            self.stream.flush()
