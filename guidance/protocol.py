"""The guidance-term protocol: what a term declares, the per-run state and the per-call context.

`GuidanceGuider.predict_noise` runs one model call in fixed phases; a term takes part in a phase by
overriding that phase's hook (every hook is a no-op on `Term`). In every phase the active terms
(schedule weight != 0 at this step) run by `order`, then by their position in the term list:

  1. anneal(call, i, w)               change `call.pos` / `call.neg` before the model runs (CADS)
  2. plan(call, i, w)                 add branches to the ONE batched call (`call.add_branch`) and
                                      per-layer actions on branches (`call.perturb`: PAG, SAG)
  3. (the batched call, then the model's own pre-CFG functions)
  4. direction(call, i, w)            reshape what CFG combines: `call.cond_mod`, `call.base`,
                                      `call.base_cond` (Perp-Neg, APG)
  5. (CFG through the model's sampler_cfg_function and post-CFG functions)
  6. post_cfg(call, i, w, guided)     return the new x0: rescale, branch terms (PAG, SAG, AutoGuidance)
  7. threshold(call, i, w, guided)    return the new x0, after every post-CFG step (dynamic thresholding)

Setup hooks: `resolve(model)` (model-bound data such as layers, checked when the guider node runs;
raise TermError), `extra_conds()` (named CONDITIONING that ComfyUI prepares with the prompts),
`additional_models()` (models ComfyUI loads for the run), `start(guider, run, i)` (this term's
per-run state, e.g. a `Momentum`), `cfg_factor(w)` (a factor of the CFG scale: CFG schedules) and
`needs_uncond` (evaluate the unconditional branch even where the CFG scale is 1).

Per-run state lives in one `Run`, created when a sampling run starts and dropped when it ends, so
nothing leaks from one run into the next, nor between guiders sharing a model. Terms themselves
are immutable descriptions (frozen dataclasses): never store state on them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Optional

import torch

import comfy.samplers

from ..core import denoiser
from .formulas import cfg_scale
from .schedules import CONSTANT_ONE, Schedule, StepInfo, fractional_index, step_info

COND, UNCOND = 0, 1          # branch indices of the conditional and unconditional predictions


class TermError(ValueError):
    """A term that cannot work with this model; the guider node reports it on its 'terms' input."""

    def __init__(self, problem: str, fix: str = ""):
        self.problem, self.fix = problem, fix
        super().__init__(problem + (f" — {fix}" if fix else ""))


@dataclass(frozen=True, eq=False)
class Term:
    """A guidance term: an immutable description plus the hooks of the phases it takes part in."""
    schedule: Schedule = CONSTANT_ONE
    kind = "term"
    title = "term"
    unique = False          # at most one such term per guider
    order = 100             # position within every phase (lower first); ties keep the list order
    needs_uncond = False    # when active, evaluate the unconditional branch even at CFG scale 1

    def label(self) -> str:
        return self.title

    def strength(self) -> float:
        """The term's own scale, times which the schedule weight gives the plotted effective scale."""
        return 1.0

    # -- setup -----------------------------------------------------------------------------------
    def resolve(self, model) -> Any:
        """Model-bound data the phases read back with `call.resolved(i)`; None for none. Raise TermError."""
        return None

    def extra_conds(self) -> dict:
        """{name: CONDITIONING} prepared by ComfyUI like the prompts; read with `call.named_conds(name)`."""
        return {}

    def additional_models(self) -> dict:
        """{key: [ModelPatcher]}: models ComfyUI loads for the run (e.g. AutoGuidance's weak model)."""
        return {}

    def start(self, guider, run: "Run", i: int) -> Any:
        """This term's per-run state (`call.state(i)`), created when a sampling run starts."""
        return None

    def cfg_factor(self, weight: float) -> float:
        """A factor of the CFG scale's schedule weight (every term, active or not)."""
        return 1.0

    # -- phases of one model call (see the module docstring) --------------------------------------
    def anneal(self, call: "Call", i: int, weight: float) -> None:
        pass

    def plan(self, call: "Call", i: int, weight: float) -> None:
        pass

    def direction(self, call: "Call", i: int, weight: float) -> None:
        pass

    def post_cfg(self, call: "Call", i: int, weight: float, guided: torch.Tensor) -> torch.Tensor:
        return guided

    def threshold(self, call: "Call", i: int, weight: float, guided: torch.Tensor) -> torch.Tensor:
        return guided


class Run:
    """The state of one sampling run: what the run started with, each term's state, the per-call stats.

    `segment` counts restarts: a call at a higher sigma than the previous one begins a new run of
    the schedule (restart samplers, a guider reused by a wrapper), and momentum-like state resets.
    """

    def __init__(self, noise, latent_image, device, sigmas, denoise_mask, seed):
        self.noise, self.latent_image, self.device = noise, latent_image, device
        self.sigmas, self.denoise_mask, self.seed = sigmas, denoise_mask, seed
        self.state: dict[int, Any] = {}
        self.stats: list[dict] = []
        self.calls = 0
        self.segment = 0
        self._prev_sigma: Optional[float] = None

    def observe(self, sigma: float) -> None:
        if self._prev_sigma is not None and sigma > self._prev_sigma:
            self.segment += 1
        self._prev_sigma = sigma
        self.calls += 1


class Momentum:
    """A running buffer owned by one run; it reads as None again after the run restarts."""

    def __init__(self, run: Run):
        self.run = run
        self._value: Optional[torch.Tensor] = None
        self._segment = run.segment

    def get(self) -> Optional[torch.Tensor]:
        return self._value if self._segment == self.run.segment else None

    def set(self, value: Optional[torch.Tensor]) -> None:
        self._value, self._segment = value, self.run.segment


class Call:
    """One model call of a guider: the step, the branches of the batched call, their predictions and
    what CFG combines. The guider fills it phase by phase; terms read it and write the fields their
    phase documents."""

    def __init__(self, guider, run: Run, x: torch.Tensor, sigma: torch.Tensor, model_options: dict, seed):
        self.guider, self.run = guider, run
        self.x, self.sigma, self.model_options, self.seed = x, sigma, model_options, seed
        self.sample_sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
        self.info: StepInfo = step_info(self.sample_sigmas, sigma)
        terms = guider.terms
        self.weights = [t.schedule.weight(self.info) for t in terms]
        self.active = sorted(((i, t, w) for i, (t, w) in enumerate(zip(terms, self.weights)) if w != 0),
                             key=lambda a: (a[1].order, a[0]))
        s_cfg = 1.0
        for t, w in zip(terms, self.weights):
            s_cfg *= t.cfg_factor(w)
        self.cfg = cfg_scale(guider.cfg, s_cfg)           # the effective CFG scale of this call
        self.need_uncond = (not math.isclose(self.cfg, 1.0)) or bool(model_options.get("disable_cfg1_optimization", False)) \
            or any(t.needs_uncond for _, t, _ in self.active)
        self.pos = guider.conds.get("positive")            # anneal: the conds the branches use
        self.neg = guider.conds.get("negative")
        self.names: list[str] = []                         # plan: the batched call's branches
        self.conds: list = []
        self.per_site: dict = {}                           # plan: layers.Site -> {branch index: action}
        self.out: list = []                                # the batched call's predictions, by branch
        self.layer_plan = None                             # layers._Plan of the call (recorded maps), if any
        self.cond: Optional[torch.Tensor] = None           # the conditional prediction
        self.uncond: Optional[torch.Tensor] = None         # the unconditional one (= cond when skipped)
        self.cond_mod: Optional[torch.Tensor] = None       # direction: CFG combines cond_mod ...
        self.base: Optional[torch.Tensor] = None           # ... against base,
        self.base_cond = None                              # whose conditioning the cfg functions see
        self.extra_calls = 0

    # -- context ---------------------------------------------------------------------------------
    @property
    def model(self):
        """The run's inner model (comfy BaseModel)."""
        return self.guider.inner_model

    @cached_property
    def flow(self) -> bool:
        return denoiser.space(self.model.model_sampling) == "flow"

    @property
    def step(self) -> Optional[float]:
        """Fractional index of this sigma in the run's schedule (None without one)."""
        return None if self.sample_sigmas is None else fractional_index(self.sample_sigmas, self.info.sigma)

    def state(self, i: int) -> Any:
        return self.run.state.get(i)

    def resolved(self, i: int, default: Any = None) -> Any:
        """What term i's `resolve(model)` returned when the guider was built."""
        return self.guider.sites.get(i, default)

    def named_conds(self, name: str):
        """Conditioning prepared for the run under `name` (a term's `extra_conds`)."""
        return self.guider.conds.get(name)

    # -- plan ------------------------------------------------------------------------------------
    def add_branch(self, name: str, conds) -> int:
        """Add a branch (a conditioning list; None = not evaluated) to the batched call; returns its index."""
        if name in self.names:
            raise ValueError(f"two guidance branches named {name!r}")
        self.names.append(name)
        self.conds.append(conds)
        return len(self.conds) - 1

    def perturb(self, site, branch: int, action: str, replace: bool = True) -> None:
        """Act at layer `site` on batch chunk `branch` (layers.Perturb); replace=False keeps an earlier action."""
        actions = self.per_site.setdefault(site, {})
        if replace or branch not in actions:
            actions[branch] = action

    # -- predictions -----------------------------------------------------------------------------
    def prediction(self, name: str) -> torch.Tensor:
        return self.out[self.names.index(name)]

    def extra_call(self, model, conds: list, x: torch.Tensor, model_options: Optional[dict] = None) -> list:
        """A model call outside the batch (it depends on the batch's results); counted in the stats."""
        self.extra_calls += 1
        return comfy.samplers.calc_cond_batch(model, conds, x, self.sigma,
                                              self.model_options if model_options is None else model_options)

    def summary(self) -> dict:
        lp = self.layer_plan
        return {"sigma": self.info.sigma, "progress": self.info.progress, "cfg": self.cfg,
                "branches": [b for b, cc in zip(self.names, self.conds) if cc is not None],
                "extra_calls": self.extra_calls,
                "sites": [(s.name, a, b) for s, a, b in (lp.sites_hit if lp else [])]}
