"""LoRA merge: time and peak memory to merge three SDXL-layout rank-32 LoRAs with each method (CPU).

The three LoRAs (UNet attention + both text encoders, kohya names, fp16, ~217 MB each, like a
kohya rank-32 SDXL LoRA) are generated on the real SDXL layout (meta device: keys and shapes only).
Each method runs in a fresh subprocess; its peak memory is the process's peak RSS during the
merge (VmHWM reset through /proc/self/clear_refs just before it) minus the RSS before it. Inputs
are read tensor by tensor and the output is streamed to disk, so neither is mapped into the process.

Memory goal (issue 9): peak <= 2 x the largest input LoRA + one weight tensor (the largest target
weight as a float32 dense delta).

  .venv/bin/python bench/run.py lora                 (all methods)
  LORA_BENCH_METHODS=concat,svd .venv/bin/python bench/run.py lora
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SLOW = True  # several minutes: three SDXL-layout LoRAs per method
TITLE = "LoRA merge: three SDXL-layout rank-32 LoRAs, per method (CPU, streaming, one thread)"
RANK = 32
N_LORAS = 3


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _make_inputs(folder: str) -> tuple[list[str], int]:
    import torch

    from editkit.lora import formats, layouts, st_io, synthetic
    model, clip = layouts.sdxl()
    r = formats.KeyResolver(model, clip)
    targets = synthetic.select_targets(r, ("attn", "te"))
    paths = []
    for i in range(N_LORAS):
        p = os.path.join(folder, f"sdxl_r{RANK}_{i}.safetensors")
        if not os.path.exists(p):
            sd = synthetic.make_lora(r, targets, "kohya", rank=RANK, seed=100 + i, dtype=torch.float16)
            st_io.save(sd, p)
            del sd
        paths.append(p)
    largest_weight = max(torch.Size(r.shapes[k]).numel() for k in targets) * 4
    return paths, largest_weight


def _child(method: str, out_path: str, paths: list[str]) -> dict:
    """Runs in the subprocess: one merge, measured."""
    import torch

    from editkit.lora import formats, layouts, merge
    from editkit.lora.st_io import SafetensorsFile
    model, clip = layouts.sdxl()
    resolver = formats.KeyResolver(model, clip)
    parsed = [formats.parse(SafetensorsFile(p), resolver, os.path.basename(p)) for p in paths]
    params = merge.MergeParams(method=method, rank=RANK, density=0.5, drop_rate=0.5, seed=0, dtype=torch.float16)
    anon_peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            anon_peak[0] = max(anon_peak[0], _status("RssAnon"))
            time.sleep(0.002)

    with torch.inference_mode():
        import gc
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            hwm_reset = True
        except OSError:
            hwm_reset = False
        base_rss, base_anon = _status("VmRSS"), _status("RssAnon")
        th = threading.Thread(target=sample, daemon=True)
        th.start()
        t0, c0 = time.perf_counter(), time.process_time()
        report = merge.merge_to_file(parsed, [1.0, 0.8, 0.6], resolver, params, out_path)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        stop.set()
        th.join()
        peak = _status("VmHWM") - base_rss if hwm_reset else anon_peak[0] - base_anon
    return {"method": method, "wall_s": wall, "cpu_s": cpu, "peak": peak, "peak_anon_sampled": anon_peak[0] - base_anon,
            "out_bytes": os.path.getsize(out_path), "energy_kept": report.energy_kept(), "hwm_reset": hwm_reset}


def run() -> list[dict]:
    methods = os.environ.get("LORA_BENCH_METHODS", "concat,svd,ties,dare,dare_ties,magnitude_prune").split(",")
    folder = os.environ.get("LORA_BENCH_DIR") or os.path.join(tempfile.gettempdir(), "editkit_lora_bench")
    os.makedirs(folder, exist_ok=True)
    paths, largest_weight = _make_inputs(folder)
    largest_lora = max(os.path.getsize(p) for p in paths)
    goal = 2 * largest_lora + largest_weight
    rows = []
    for method in methods:
        out = os.path.join(folder, f"merged_{method}.safetensors")
        cmd = [sys.executable, os.path.abspath(__file__), "--child", method, out] + paths
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not line:
            rows.append({"method": method, "error": (proc.stderr or proc.stdout)[-400:]})
            continue
        res = json.loads(line[-1])
        rows.append({
            "method": method,
            "wall s": round(res["wall_s"], 1),
            "cpu s": round(res["cpu_s"], 1),
            "peak MB": round(res["peak"] / 2**20),
            "goal MB": round(goal / 2**20),
            "peak/goal": round(res["peak"] / goal, 2),
            "within goal": "yes" if res["peak"] <= goal else "NO",
            "output MB": round(res["out_bytes"] / 2**20),
            "energy kept %": round(100 * res["energy_kept"], 1),
        })
        os.remove(out)
    rows.append({"method": f"(inputs: {N_LORAS} x {largest_lora / 2**20:.0f} MB, largest weight as fp32 "
                           f"{largest_weight / 2**20:.0f} MB)"})
    return rows


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        sys.path.insert(0, HERE)
        from common import boot
        import importlib.util
        spec = importlib.util.spec_from_file_location("editkit_boot", os.path.join(os.path.dirname(HERE), "runner", "boot.py"))
        b = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(b)
        sys.modules["editkit_boot"] = b
        b.boot(threads=int(os.environ.get("TORCH_THREADS", "1")), assets=False)
        print(json.dumps(_child(sys.argv[2], sys.argv[3], sys.argv[4:])))
    else:
        sys.path.insert(0, HERE)
        from common import boot, print_table
        boot()
        print_table(TITLE, run())
