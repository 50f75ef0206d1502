"""The CFG schedule as a MODEL patch, for graphs that stay with KSampler.

Two hooks, both chaining whatever was there:
* a pre-CFG function (a list hook) turns KSampler's cfg w into the scheduled scale
  w_eff = 1 + (w - 1) * weight, by handing the CFG function cond' = u + (w_eff/w)(c - u), which
  linear CFG at w turns into u + w_eff (c - u);
* a sampler_calc_cond_batch_function (one slot; the previous occupant is called) drops the
  unconditional pass where the weight is 0 (outside a guidance interval, after early-only), and
  returns the conditional prediction in its place, so those steps cost one branch, not two.
"""
from __future__ import annotations

import comfy.samplers

from ..core.patches import SharedPatch
from .schedules import Schedule, step_info
from .formulas import cfg_scale


def _weight(schedule: Schedule, args: dict) -> float:
    to = args.get("model_options", {}).get("transformer_options", {})
    return schedule.weight(step_info(to.get("sample_sigmas"), args["sigma"]))


class ScheduledCalcCondBatch(SharedPatch):
    def __init__(self, schedule: Schedule, prev):
        self.schedule, self.prev = schedule, prev

    def __call__(self, args):
        conds = list(args["conds"])
        skip = len(conds) > 1 and conds[1] is not None and _weight(self.schedule, args) == 0 \
            and not args.get("model_options", {}).get("disable_cfg1_optimization", False)
        if skip:
            conds[1] = None
            args = dict(args, conds=conds)
        if self.prev is not None:
            out = self.prev(args)
        else:
            out = comfy.samplers.calc_cond_batch(args["model"], args["conds"], args["input"], args["sigma"], args["model_options"])
        if skip:
            out = list(out)
            out[1] = out[0]
        return out


class ScheduledPreCFG(SharedPatch):
    def __init__(self, schedule: Schedule):
        self.schedule = schedule

    def __call__(self, args):
        out = args["conds_out"]
        w = args["cond_scale"]
        if len(out) < 2 or w == 0 or w == 1:
            return out
        weight = _weight(self.schedule, args)
        if weight == 1.0:
            return out
        c, u = out[0], out[1]
        w_eff = cfg_scale(w, weight)
        return [u + (c - u) * (w_eff / w)] + list(out[1:])


def install_cfg_schedule(m, schedule: Schedule) -> None:
    """Patch the clone `m` with the CFG schedule (both hooks chain)."""
    prev = m.model_options.get("sampler_calc_cond_batch_function")
    m.set_model_sampler_calc_cond_batch_function(ScheduledCalcCondBatch(schedule, prev))
    m.set_model_sampler_pre_cfg_function(ScheduledPreCFG(schedule))
