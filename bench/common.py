"""Benchmark helpers: boot ComfyUI + EditKit once, cached full-size models, interleaved timing.

Times are reported as ratios against a baseline measured in the same run (interleaved, median of
repeats), never as absolute numbers to compare across machines.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def boot(load_pack=True):
    if "editkit_boot" in sys.modules:
        b = sys.modules["editkit_boot"]
    else:
        spec = importlib.util.spec_from_file_location("editkit_boot", os.path.join(ROOT, "runner", "boot.py"))
        b = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(b)
        sys.modules["editkit_boot"] = b
    b.boot(threads=int(os.environ.get("TORCH_THREADS", "1")), load_pack=load_pack)
    return b


@functools.lru_cache(maxsize=None)
def sd15():
    from editkit.builtin_models.fullsize import sd15_unet
    return sd15_unet()


def interleaved(fns: dict, repeats: int = 3, warmup: int = 1) -> dict:
    """Median wall time of each callable, run in interleaved rounds so drift hits all equally."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def host_line() -> str:
    """The compute dtype the full-size fixtures use on this host (both arms of every ratio use it)."""
    from editkit.core.compute_dtype import choice
    return f"host: {choice().describe()}; torch threads {__import__('torch').get_num_threads()}"


def print_table(title: str, rows: list[dict]) -> None:
    if not rows:
        return
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    print(f"\n## {title}")
    print("| " + " | ".join(c.ljust(widths[c]) for c in cols) + " |")
    print("|" + "|".join("-" * (widths[c] + 2) for c in cols) + "|")
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols) + " |")
    print(f"\n{host_line()}")


def write_cases(path: str, records: list[dict], fieldnames=None) -> None:
    """One row per case (the per-case file a table's numbers trace to); the folder is created."""
    import csv
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fieldnames or sorted({k for r in records for k in r}))
        w.writeheader()
        w.writerows(records)


def replace_block(path: str, begin: str, end: str, body: str) -> None:
    """Rewrite the text between the markers `begin` and `end` of a file (the README's generated tables);
    without the markers the block is appended."""
    text = open(path).read()
    block = begin + "\n" + body + "\n" + end
    if begin in text:
        a, b = text.index(begin), text.index(end) + len(end)
        text = text[:a] + block + text[b:]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    open(path, "w").write(text)


def _rss_bytes() -> int | None:
    """This process's resident set size now (Linux /proc; psutil elsewhere; None if neither)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import psutil
        return psutil.Process().memory_info().rss
    except Exception:   # noqa: BLE001 - no way to read RSS: the caller reports None
        return None


def _max_rss_bytes() -> int:
    import resource
    import sys as _sys
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if _sys.platform == "darwin" else r * 1024


class PeakRSS:
    """Peak resident memory of one benchmark row above the row's own start, whatever ran before it:

        with PeakRSS() as m:
            run_the_row()
        m.peak_mb

    The process-wide max RSS (getrusage) cannot do this: after a heavier row it does not rise again, so a
    lighter row read ~0. Here freed heap is first handed back to the OS (gc + glibc malloc_trim, so the
    start is not inflated by an earlier row's free memory), a background thread samples the current RSS
    every `interval` s, and if the process-wide max rose during the row it is the row's exact peak."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.start = self.peak = None
        self.peak_mb: float | None = None

    @staticmethod
    def _trim() -> None:
        import gc
        gc.collect()
        try:
            import ctypes
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            r = _rss_bytes()
            if r is not None and r > self.peak:
                self.peak = r

    def __enter__(self):
        import threading
        self._trim()
        self.start = _rss_bytes()
        self._max0 = _max_rss_bytes()
        if self.start is not None:
            self.peak = self.start
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.start is None:   # no current-RSS reading on this OS: only the process-wide max is known
            self.peak_mb = (_max_rss_bytes() - self._max0) / 2**20
            return False
        self._stop.set()
        self._thread.join()
        r = _rss_bytes()
        self.peak = max(self.peak, r or 0)
        max1 = _max_rss_bytes()
        if max1 > self._max0:      # the row set a new process-wide high: that is its peak, exactly
            self.peak = max(self.peak, max1)
        self.peak_mb = max(0.0, (self.peak - self.start) / 2**20)
        return False
