"""Schedules: how strongly a guidance term acts at each sampling step.

A schedule maps the current step to a weight (usually in [0, 1]) that multiplies the term's
strength. Positions are measured on the run's own sigma schedule (`sample_sigmas`), so the same
schedule means the same thing for 10 or 50 steps and for any sampler:

* progress p in [0, 1]: 0 at the first model call, 1 at the last step (sigmas between two grid
  points, as second-order samplers use, get a fractional position, interpolated in log sigma);
* "sigma" position in [0, 1]: where log(sigma) lies between the first and the last nonzero
  sigma of the run (0 at the first, 1 at the last).

Kinds: constant, linear and cosine ramps (over progress or sigma), a step window (on inside
[start, end], off outside), the guidance interval of Kynkäänniemi et al. 2024 (on for
sigma_low < sigma <= sigma_high; the guider skips the unconditional pass where the CFG weight
is 0) and early-only (on for p < end). Schedules compose by multiplication (`then`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

CONSTANT, LINEAR, COSINE, STEP, INTERVAL, EARLY = "constant", "linear", "cosine", "step", "interval", "early_only"
KINDS = [CONSTANT, LINEAR, COSINE, STEP, INTERVAL, EARLY]
PROGRESS, SIGMA = "progress", "sigma"
OVER = [PROGRESS, SIGMA]


@dataclass(frozen=True)
class StepInfo:
    """Where a model call sits in the run: progress and sigma position in [0, 1], and sigma itself."""
    progress: float
    sigma_pos: float
    sigma: float


def _sched(sample_sigmas) -> list[float]:
    return [float(s) for s in torch.as_tensor(sample_sigmas).flatten().cpu()]


def fractional_index(sample_sigmas, sigma: float) -> float:
    """Position of sigma on a descending schedule as a fractional step index (log-sigma interpolation)."""
    sched = _sched(sample_sigmas)
    if not sched:
        return 0.0
    if sigma >= sched[0]:
        return 0.0
    for j in range(len(sched) - 1):
        hi, lo = sched[j], sched[j + 1]
        if hi >= sigma >= lo:
            if hi == lo:
                return float(j)
            if lo > 0 and sigma > 0:
                frac = (math.log(hi) - math.log(sigma)) / (math.log(hi) - math.log(lo))
            else:
                frac = (hi - sigma) / (hi - lo)
            return j + frac
    return float(len(sched) - 1)


def step_info(sample_sigmas, sigma) -> StepInfo:
    """Progress and sigma position of a model call at `sigma` within the run's schedule."""
    sig = float(torch.as_tensor(sigma).flatten()[0])
    if sample_sigmas is None:
        return StepInfo(0.0, 0.0, sig)
    sched = _sched(sample_sigmas)
    n_steps = max(len(sched) - 1, 1)
    idx = fractional_index(sched, sig)
    progress = min(max(idx / max(n_steps - 1, 1), 0.0), 1.0) if n_steps > 1 else 0.0
    nonzero = [s for s in sched if s > 0]
    if len(nonzero) >= 2 and sig > 0 and nonzero[0] > nonzero[-1]:
        lhi, llo = math.log(nonzero[0]), math.log(nonzero[-1])
        sigma_pos = min(max((lhi - math.log(sig)) / (lhi - llo), 0.0), 1.0)
    else:
        sigma_pos = progress
    return StepInfo(progress, sigma_pos, sig)


@dataclass(frozen=True)
class Schedule:
    """A weight over the sampling run. Immutable; `then` multiplies two schedules."""
    kind: str = CONSTANT
    start_value: float = 1.0
    end_value: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0
    sigma_low: float = 0.0
    sigma_high: float = float("inf")
    over: str = PROGRESS
    previous: Optional["Schedule"] = None

    def then(self, other: Optional["Schedule"]) -> "Schedule":
        """This schedule multiplied by `other` (other is evaluated first)."""
        if other is None:
            return self
        prev = self.previous.then(other) if self.previous is not None else other
        return Schedule(self.kind, self.start_value, self.end_value, self.start_percent, self.end_percent,
                        self.sigma_low, self.sigma_high, self.over, prev)

    def _own(self, info: StepInfo) -> float:
        k = self.kind
        if k == CONSTANT:
            return self.start_value
        p = info.sigma_pos if self.over == SIGMA else info.progress
        if k in (LINEAR, COSINE):
            a, b = self.start_percent, self.end_percent
            if b <= a:
                t = 0.0 if p < a else 1.0
            else:
                t = min(max((p - a) / (b - a), 0.0), 1.0)
            if k == COSINE:
                t = (1.0 - math.cos(math.pi * t)) / 2.0
            return self.start_value + (self.end_value - self.start_value) * t
        if k == STEP:
            return self.start_value if self.start_percent <= p <= self.end_percent else 0.0
        if k == EARLY:
            return self.start_value if p < self.end_percent else 0.0
        if k == INTERVAL:
            return self.start_value if self.sigma_low < info.sigma <= self.sigma_high else 0.0
        raise ValueError(f"unknown schedule kind {k!r}")

    def weight(self, info: StepInfo) -> float:
        w = self._own(info)
        if self.previous is not None:
            w *= self.previous.weight(info)
        return w

    def describe(self) -> str:
        k = self.kind
        if k == CONSTANT:
            own = f"{self.start_value:g}"
        elif k in (LINEAR, COSINE):
            own = f"{k} {self.start_value:g}->{self.end_value:g} over {self.over} [{self.start_percent:g}, {self.end_percent:g}]"
        elif k == STEP:
            own = f"{self.start_value:g} on {self.over} [{self.start_percent:g}, {self.end_percent:g}]"
        elif k == EARLY:
            own = f"{self.start_value:g} until {self.over} {self.end_percent:g}"
        else:
            own = f"{self.start_value:g} for sigma in ({self.sigma_low:g}, {self.sigma_high:g}]"
        return own if self.previous is None else f"{own} x {self.previous.describe()}"


CONSTANT_ONE = Schedule()


def weights_over(schedule: Schedule, sigmas) -> list[float]:
    """The schedule's weight at every model call of a run with these sigmas (one per step)."""
    sched = _sched(sigmas)
    return [schedule.weight(step_info(sched, s)) for s in sched[:-1]]
