"""Guard against layers computing in a dtype the host emulates (bf16 on AVX2-only CPUs).

A global forward pre-hook on linear and convolution layers (test harness only): when a layer's
input arrives in an emulated dtype, the violation is recorded (the test fails in teardown, even if
the code under test swallowed the error) and raised at once, so the slow op never runs.
"""
from __future__ import annotations

import contextlib

import torch
from editkit.core.compute_dtype import ENV, choice, emulated_dtypes

GUARDED = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


class EmulatedComputeError(RuntimeError):
    pass


class EmulatedComputeGuard:
    def __init__(self, emulated=None):
        self.emulated = frozenset(emulated_dtypes() if emulated is None else emulated)
        self.violations: list[str] = []
        self._handle = None

    def _hook(self, module, args):
        if not isinstance(module, GUARDED) or not args or not isinstance(args[0], torch.Tensor):
            return None
        if args[0].dtype not in self.emulated:
            return None
        what = (f"{type(module).__name__}(weight {tuple(module.weight.shape)}, {module.weight.dtype}) called with a "
                f"{args[0].dtype} input {tuple(args[0].shape)}")
        self.violations.append(what)
        raise EmulatedComputeError(self.message())

    def message(self) -> str:
        first = self.violations[0] if self.violations else "?"
        return (f"a layer computed in a dtype this host emulates in software ({sorted(map(str, self.emulated))}; "
                f"{choice().describe()}): {first} [{len(self.violations)} call(s)]. Build big models through "
                f"editkit.builtin_models.fullsize (weights bf16, compute from core.compute_dtype.choice()) or "
                f"compute in fp32; {ENV}=bf16 forces bf16 if you really mean it.")

    def __enter__(self):
        if self.emulated:
            self._handle = torch.nn.modules.module.register_module_forward_pre_hook(self._hook)
        return self

    @contextlib.contextmanager
    def paused(self):
        """Switch this guard off for a block (a test of the guard itself)."""
        saved, self.emulated = self.emulated, frozenset()
        try:
            yield self
        finally:
            self.emulated = saved

    def __exit__(self, *exc):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        return False
