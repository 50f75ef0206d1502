"""Which floating-point dtype this host computes fast: bf16 only where the CPU has it natively.

CPUs with AVX512-BF16 or AMX run bf16 matmuls and convolutions faster than fp32; AVX2-only CPUs
emulate bf16 in software, where a bf16 convolution is ~300x slower than the same one in fp32. Big
models built in code (the full-size test UNets, benchmark fixtures) therefore store their weights in
bf16 (half the memory) and compute either natively in bf16 or in fp32 through ComfyUI's manual cast
(weights cast per layer, the way ComfyUI itself runs a bf16 checkpoint on such a CPU).

The choice is made once per process from the CPU capability and a millisecond-scale probe;
EDITKIT_COMPUTE_DTYPE=bf16|fp32 forces it (both paths can be exercised on one host).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import platform
import time

import torch

ENV = "EDITKIT_COMPUTE_DTYPE"
NAMES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# bf16 counts as native when the probe runs it at most this many times slower than fp32 (native
# hosts measure ~0.2-0.6x; emulating hosts 30-300x).
MAX_NATIVE_RATIO = 2.0


@dataclasses.dataclass(frozen=True)
class ComputeChoice:
    dtype: torch.dtype            # the dtype matmuls/convs run in
    weight_dtype: torch.dtype     # the dtype big weights are stored in
    reason: str                   # why (printed in test headers and benchmark tables)

    @property
    def name(self) -> str:
        return "bf16" if self.dtype == torch.bfloat16 else "fp32"

    @property
    def manual_cast_dtype(self):
        """ComfyUI's manual_cast dtype for a model stored in `weight_dtype` (None: compute as stored)."""
        return None if self.dtype == self.weight_dtype else self.dtype

    def describe(self) -> str:
        store = "bf16 weights" if self.weight_dtype == torch.bfloat16 else "fp32 weights"
        how = "native" if self.manual_cast_dtype is None else "ComfyUI manual cast"
        return f"compute {self.name} ({store}, {how}; {self.reason})"


def cpu_capability() -> str:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # older torch
        return "unknown"


def _cpu_has_bf16_units() -> bool:
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(torch.cpu, name, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:
            pass
    return False


def _best_time(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def probe_ratio() -> float:
    """Time of a small bf16 matmul + 3x3 conv over the same work in fp32 (a few ms in all).

    One thread, whatever the process uses: on a busy 2-core machine a second thread makes small
    fp32 ops orders of magnitude slower and the comparison meaningless."""
    def work(dtype):
        a = torch.randn(192, 192).to(dtype)
        x = torch.randn(1, 32, 24, 24).to(dtype)
        w = torch.randn(32, 32, 3, 3).to(dtype)

        def run():
            a @ a
            torch.nn.functional.conv2d(x, w, padding=1)
        run()  # the first call pays one-off kernel selection
        return run
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            fp32, bf16 = work(torch.float32), work(torch.bfloat16)
            t32 = min(_best_time(fp32, 1) for _ in range(5))
            t16 = min(_best_time(bf16, 1) for _ in range(5))
    finally:
        torch.set_num_threads(threads)
    return t16 / max(t32, 1e-9)


def _decide_cpu() -> ComputeChoice:
    cap = cpu_capability()
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
    if x86 and "AVX512" not in cap.upper() and "AMX" not in cap.upper():
        # ATen's CPU kernels dispatch to AVX2 (or less): bf16 goes through conversion loops.
        return ComputeChoice(torch.float32, torch.bfloat16, f"CPU capability {cap}: bf16 is emulated")
    if x86 and not _cpu_has_bf16_units():
        return ComputeChoice(torch.float32, torch.bfloat16, f"CPU capability {cap} without AVX512-BF16/AMX")
    ratio = probe_ratio()  # other architectures (and a last check on x86): measure
    if ratio > MAX_NATIVE_RATIO:
        return ComputeChoice(torch.float32, torch.bfloat16, f"CPU capability {cap}, probe bf16/fp32 {ratio:.1f}x")
    return ComputeChoice(torch.bfloat16, torch.bfloat16, f"CPU capability {cap}, probe bf16/fp32 {ratio:.2f}x")


def _decide_device(device) -> ComputeChoice:
    import comfy.model_management as mm
    if mm.should_use_bf16(device):
        return ComputeChoice(torch.bfloat16, torch.bfloat16, f"{device} runs bf16")
    if mm.should_use_fp16(device):
        return ComputeChoice(torch.float16, torch.float16, f"{device} runs fp16")
    return ComputeChoice(torch.float32, torch.float32, f"{device}: fp32")


@functools.lru_cache(maxsize=None)
def choice() -> ComputeChoice:
    """The process-wide choice (cached): forced by EDITKIT_COMPUTE_DTYPE, else measured."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced and forced != "auto":
        if forced not in NAMES:
            raise ValueError(f"{ENV}={forced!r}: use one of {sorted(NAMES)} or 'auto'")
        return ComputeChoice(NAMES[forced], torch.bfloat16, f"forced by {ENV}={forced}")
    try:
        import comfy.model_management as mm
        device = mm.get_torch_device()
    except Exception:
        device = torch.device("cpu")
    if torch.device(device).type != "cpu":
        return _decide_device(device)
    return _decide_cpu()


def emulated_dtypes() -> frozenset:
    """Dtypes this host would emulate in software: no big fixture may compute in them."""
    return frozenset() if choice().dtype == torch.bfloat16 else frozenset({torch.bfloat16})
