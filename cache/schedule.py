"""Which steps compute everything (key steps) and which reuse a cache."""
from __future__ import annotations

import math

from ..core.errors import EditKitInputError

UNIFORM, NON_UNIFORM = "uniform", "non-uniform"
SCHEDULES = (UNIFORM, NON_UNIFORM)


def key_steps(steps: int, interval: int, schedule: str = UNIFORM, center: float = 0.12, power: float = 1.4) -> frozenset:
    """Steps (0-based) that run the whole network.

    uniform: every `interval`-th step (DeepCache's 1:N). non-uniform (DeepCache sec. 3.3): the same
    number of key steps, packed densely around `center` (fraction of the run; the paper's c = 120 of
    1000 timesteps, p = 1.4) where features change fastest and sparse elsewhere. Step 0 always computes."""
    steps, interval = int(steps), max(int(interval), 1)
    if interval == 1 or steps <= 1:
        return frozenset(range(max(steps, 1)))
    k = int(math.ceil(steps / interval))
    if schedule == UNIFORM:
        return frozenset(range(0, steps, interval))
    c = center * (steps - 1)
    lo, hi = -(c ** (1 / power)), (steps - 1 - c) ** (1 / power)
    keys = {0}
    for i in range(k):
        u = lo + (hi - lo) * i / max(k - 1, 1)
        keys.add(int(round(math.copysign(abs(u) ** power, u) + c)))
    keys = {min(max(s, 0), steps - 1) for s in keys}
    # keep the cost of the uniform schedule: fill gaps greedily where they are widest
    while len(keys) < k:
        ordered = sorted(keys) + [steps]
        gaps = [(b - a, a, b) for a, b in zip(ordered, ordered[1:])]
        w, a, b = max(gaps)
        if w <= 1:
            break
        keys.add((a + b) // 2)
    return frozenset(keys)


def check_interval(node: str, interval: int, steps_hint: int = 1000, name: str = "cache_interval") -> None:
    if interval < 1:
        raise EditKitInputError(node, name, f"{interval} is below 1", "use 1 or more")
    if interval > steps_hint:
        raise EditKitInputError(node, name, f"{interval} is above the number of sampling steps ({steps_hint})",
                                f"use a value between 1 and {steps_hint}")


def check_window(node: str, start_percent: float, end_percent: float) -> None:
    """The part of the run a cache may act in: a non-empty [start, end) inside [0, 1]."""
    if not 0.0 <= start_percent < end_percent <= 1.0:
        raise EditKitInputError(node, "start_percent",
                                f"the window [{start_percent}, {end_percent}) is empty or outside [0, 1]",
                                "make start_percent < end_percent")
