"""bench/common.PeakRSS: each benchmark row reports its own peak memory, also after a heavier row (the
process-wide max RSS the drag table used before read ~0 there)."""
import importlib.util
import os
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _common():
    spec = importlib.util.spec_from_file_location("editkit_bench_common", os.path.join(ROOT, "bench", "common.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(mb: int, hold: float = 0.05) -> None:
    a = np.ones(mb * 2**20 // 8)          # touched: resident
    time.sleep(hold)
    del a


def test_a_lighter_row_after_a_heavier_one_reports_its_own_peak():
    PeakRSS = _common().PeakRSS
    with PeakRSS() as heavy:
        _row(240)
    with PeakRSS() as light:               # freed before the row ends: only the sampler sees it
        _row(80)
    with PeakRSS() as idle:
        time.sleep(0.05)
    assert heavy.peak_mb >= 200, heavy.peak_mb
    assert 60 <= light.peak_mb <= 200, light.peak_mb
    assert idle.peak_mb < 20, idle.peak_mb
