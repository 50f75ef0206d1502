"""Added ComfyUI start-up time: how long ComfyUI's loader takes to load EditKit (goal <= 0.3 s)."""
import os
import statistics
import subprocess
import sys

from common import ROOT

TITLE = "Pack import (ComfyUI start-up time added by EditKit)"
CODE = f"""
import importlib.util, time
spec = importlib.util.spec_from_file_location('b', {os.path.join(ROOT, 'runner', 'boot.py')!r})
b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b)
b.boot(threads=1, load_pack=False)
import asyncio, nodes
path = b.pack_link(b.comfy_dir())
# only what ComfyUI itself does at start-up (b.load() also imports every submodule and writes demo model files)
t = time.perf_counter(); ok = asyncio.run(nodes.load_custom_node(path)); dt = time.perf_counter() - t
assert ok, 'ComfyUI failed to load EditKit'
print('LOAD', dt)
"""


def run():
    times = []
    for _ in range(3):  # fresh processes: the cost a user pays once per ComfyUI start
        out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, cwd=ROOT)
        line = [l for l in out.stdout.splitlines() if l.startswith("LOAD")]
        if not line:
            raise RuntimeError(out.stderr[-2000:])
        times.append(float(line[-1].split()[1]))
    med = statistics.median(times)
    return [{"measure": "load_custom_node(EditKit), median of 3 fresh processes", "seconds": f"{med:.3f}",
             "goal": "<= 0.300", "met": "yes" if med <= 0.3 else "NO"}]
