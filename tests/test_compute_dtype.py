"""The host's compute dtype (core.compute_dtype): bf16 only where the CPU runs it natively, fp32 through
ComfyUI's manual cast elsewhere; the environment override; the guard that keeps emulated bf16 out of
the suite; and the full-size builders computing in what they were told, with bf16 weights either way."""
import os
import subprocess
import sys

import pytest
import torch

from editkit.builtin_models import fullsize
from editkit.core import compute_dtype as CD
import ek_dtype_guard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _choice_in_subprocess(**env):
    """choice() in a fresh process (it is decided once per process), loading only the module itself."""
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('cd', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); sys.modules['cd'] = m; spec.loader.exec_module(m); "
            "c = m.choice(); print(c.name, c.manual_cast_dtype, '|', c.reason)")
    proc = subprocess.run([sys.executable, "-c", code, os.path.join(ROOT, "core", "compute_dtype.py")],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    return proc


def test_environment_forces_either_choice():
    bf16 = _choice_in_subprocess(EDITKIT_COMPUTE_DTYPE="bf16")
    fp32 = _choice_in_subprocess(EDITKIT_COMPUTE_DTYPE="fp32")
    assert bf16.stdout.startswith("bf16 None |") and "forced" in bf16.stdout, bf16.stderr
    assert fp32.stdout.startswith("fp32 torch.float32 |") and "forced" in fp32.stdout, fp32.stderr
    bad = _choice_in_subprocess(EDITKIT_COMPUTE_DTYPE="fp8")
    assert bad.returncode != 0 and "EDITKIT_COMPUTE_DTYPE='fp8'" in bad.stderr and "bf16" in bad.stderr


def test_aten_avx2_dispatch_means_fp32():
    """An AVX2 ATen dispatch (what an AVX2-only CPU gets) is decided without trusting the hardware flags."""
    proc = _choice_in_subprocess(EDITKIT_COMPUTE_DTYPE="auto", ATEN_CPU_CAPABILITY="avx2")
    assert proc.stdout.startswith("fp32 torch.float32 |") and "AVX2" in proc.stdout, (proc.stdout, proc.stderr)


def test_decision_rules(monkeypatch):
    monkeypatch.setattr(CD.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(CD, "cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(CD, "probe_ratio", lambda: pytest.fail("AVX2 needs no probe"))
    assert CD._decide_cpu().dtype == torch.float32
    monkeypatch.setattr(CD, "cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(CD, "_cpu_has_bf16_units", lambda: False)   # e.g. Skylake-X: AVX512 but no bf16 units
    assert CD._decide_cpu().dtype == torch.float32
    monkeypatch.setattr(CD, "_cpu_has_bf16_units", lambda: True)
    monkeypatch.setattr(CD, "probe_ratio", lambda: 35.0)          # emulated after all (e.g. capped oneDNN)
    slow = CD._decide_cpu()
    assert slow.dtype == torch.float32 and slow.weight_dtype == torch.bfloat16 and slow.manual_cast_dtype == torch.float32
    monkeypatch.setattr(CD, "probe_ratio", lambda: 0.6)
    fast = CD._decide_cpu()
    assert fast.dtype == torch.bfloat16 and fast.manual_cast_dtype is None and "0.60x" in fast.describe()
    monkeypatch.setattr(CD.platform, "machine", lambda: "aarch64")    # no x86 flags to read: the probe decides
    monkeypatch.setattr(CD, "cpu_capability", lambda: "SVE256")
    assert CD._decide_cpu().dtype == torch.bfloat16


def test_probe_is_fast_and_leaves_thread_count():
    import time
    threads = torch.get_num_threads()
    t = time.perf_counter()
    ratio = CD.probe_ratio()
    assert time.perf_counter() - t < 2.0 and ratio > 0 and torch.get_num_threads() == threads


def test_guard_flags_emulated_compute_only(_emulated_dtype_guard):
    import comfy.ops
    lin = comfy.ops.disable_weight_init.Linear(8, 8)   # ComfyUI's op (a torch.nn.Linear), as pack code uses
    with _emulated_dtype_guard.paused():   # the session guard (active on emulating hosts) stays out of the way
        with ek_dtype_guard.EmulatedComputeGuard(emulated={torch.bfloat16}) as guard:
            lin(torch.randn(2, 8))                                       # fp32: fine
            with pytest.raises(ek_dtype_guard.EmulatedComputeError, match="emulates in software"):
                lin.to(torch.bfloat16)(torch.randn(2, 8, dtype=torch.bfloat16))
        assert len(guard.violations) == 1 and "bfloat16 input (2, 8)" in guard.violations[0]
        lin(torch.randn(2, 8, dtype=torch.bfloat16))                   # guard removed: no hook left behind
    assert not _emulated_dtype_guard.violations


def test_guard_is_on_exactly_where_bf16_is_emulated(_emulated_dtype_guard):
    expected = set() if CD.choice().dtype == torch.bfloat16 else {torch.bfloat16}
    assert set(_emulated_dtype_guard.emulated) == expected


# A small model of the SD1.5 layout (same blocks, 64 channels): the manual-cast mechanics of the full-size
# builders without their build time.
SMALL = {**fullsize.SD15_UNET, "model_channels": 64, "context_dim": 64, "num_heads": 4}


def _small(compute_dtype):
    import comfy.supported_models
    return fullsize._build(comfy.supported_models.SD15, SMALL, 0, torch.bfloat16, compute_dtype)


def test_builders_store_bf16_and_compute_as_told():
    import comfy.ldm.modules.diffusionmodules.openaimodel  # noqa: F401
    native, cast = _small(torch.bfloat16), _small(torch.float32)
    for m, dt in ((native, torch.bfloat16), (cast, torch.float32)):
        weights = {p.dtype for p in m.model.diffusion_model.parameters()}
        assert weights == {torch.bfloat16}, weights            # memory-saving storage in both
        assert fullsize.compute_dtype_of(m) == dt
    x = torch.randn(1, 4, 16, 16)
    ctx = torch.randn(1, 7, 64)
    sigma = torch.tensor([2.0])
    seen = []
    hook = cast.model.diffusion_model.input_blocks[0][0].register_forward_pre_hook(lambda mod, a: seen.append(a[0].dtype))
    try:
        out32 = cast.model.apply_model(x, sigma, c_crossattn=ctx)
    finally:
        hook.remove()
    assert seen == [torch.float32]                           # the first conv really ran in fp32
    if CD.choice().dtype == torch.bfloat16:                  # bf16 compute only where the host runs it natively
        out16 = native.model.apply_model(x, sigma, c_crossattn=ctx)
        err = (out16.float() - out32.float()).abs().max() / out32.abs().max()
        assert err < 0.05, float(err)                        # same weights, two compute dtypes: bf16 rounding apart


@pytest.mark.slow
def test_full_size_fixture_computes_in_the_host_dtype(sd15_full):
    assert fullsize.compute_dtype_of(sd15_full) == CD.choice().dtype
    assert next(sd15_full.model.diffusion_model.parameters()).dtype == torch.bfloat16
