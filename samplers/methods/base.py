"""What an inversion method and a replay hook implement, and the registry that maps the name stored in
`EditKitInversion.method` to its method object.

An `InversionMethod` is one small stateless object:

  Params        frozen dataclass of its typed settings; its fields are the keys it stores in
                `EditKitInversion.settings` (`params(inv)` reads them back, with the defaults).
  invert        run(InversionRun, params) -> InversionResult: the inversion loop, inside a BranchGuider
                sampling context (`make` wraps it: latent in, guider, progress bar, EditKitInversion out).
  branch_specs  [source BranchSpec, target BranchSpec] of one replay step (prompts, cfg, uncond context).
  start / replay_step
                the replay: the state at the first edited step, and one step (ReplayState in, ReplayState
                and the target's x0 prediction out), evaluating the model through `ctx.predict`.
  hooks         the method's own ReplayHooks (Direct Inversion's snap, RF-Inversion's pull toward the source).

A `ReplayHook` changes a replay without a branch in the driver (samplers/replay.py `run_replay`):

  plan(ctx, steps)                       which step indices to run, in order (default: k0 .. N-1);
                                         a plan that revisits or skips steps (RePaint) must implement
  on_jump(ctx, state, level, to_level)   bring the state from latent level `level` to `to_level` before
                                         the step at `to_level` runs (e.g. re-noise it);
  on_denoised(ctx, step, source, target) the x0 predictions of each branch, before the method steps
                                         with them (RF-Inversion's pull toward the source image);
  on_step(ctx, step, state)              the state after every step (Direct Inversion's snap of the source
                                         branch onto the stored trajectory; masked decoding);
  branches(ctx, step) + on_branches(ctx, step, target, target_x0, preds)
                                         extra branches evaluated at the target latent in the same batched
                                         call, and the target x0 made from their raw predictions (LEDITS++).

Hooks are immutable configuration (a sampler node may hand the same hook to several runs); per-run
state lives in `ctx.scratch` / `ctx.stats` of the run's ReplayContext.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from ...core.branches import DEFAULT_BRANCHES, TARGET
from ..branch_guider import BranchGuider, BranchSpec, make_guider
from ..steps import prepare_latent, progress_bar, sigma_at
from ..trajectory import EditKitInversion, model_identity, to_storage, work_dtype


# ---------------------------------------------------------------------------------------------
# Typed parameters
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Params:
    """Base of a method's typed settings (no fields: the method has no settings of its own)."""

    @classmethod
    def from_settings(cls, settings: dict):
        """Read the fields from an EditKitInversion.settings dict (missing keys: the defaults)."""
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in settings:
                values[f.name] = _coerce(f.default, settings[f.name])
        return cls(**values)

    def as_settings(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(default, value):
    if default is None:
        return value or None
    if isinstance(default, bool):
        return bool(value)
    if isinstance(default, (int, float)):
        return type(default)(value)
    return value


# ---------------------------------------------------------------------------------------------
# Inversion
# ---------------------------------------------------------------------------------------------

@dataclass
class InversionRun:
    """What an inversion loop gets: the guider, the schedule, the source latent and prompt."""
    guider: BranchGuider
    sigmas: torch.Tensor                  # descending sampling schedule (as handed to the sampler)
    x0: torch.Tensor                      # the image latent, sampler space, work dtype, on the model's device
    spec: BranchSpec                      # the source prompt's guidance
    model_options: dict
    noise: Optional[torch.Tensor] = None  # RF-Inversion's noise target (sampler space, work dtype)
    pbar: object = None

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def model_sampling(self):
        return self.guider.inner_model.model_sampling

    def sigma(self, i: int, like: torch.Tensor) -> torch.Tensor:
        return sigma_at(self.sigmas, i, like)

    def denoise(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """x0 of the source prompt at level sigma (guided with spec), in x's dtype."""
        return self.guider.x0(x, sigma, self.spec, self.model_options)

    def tick(self, evaluations: int = 1, x0=None):
        """Advance the progress bar; x0 (the latest clean-latent estimate) becomes ComfyUI's preview."""
        if self.pbar is not None:
            self.pbar.update(evaluations, x0)


@dataclass
class InversionResult:
    """What an inversion loop returns (storage tensors, see EditKitInversion for the fields)."""
    latents: list
    pair: Optional[list] = None
    residuals: Optional[list] = None
    noise_std: Optional[list] = None
    start_index: int = 0


# ---------------------------------------------------------------------------------------------
# Replay
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Step:
    """One replay step: from sigmas[index] to sigmas[index + 1]."""
    index: int
    position: int            # steps already taken in this run
    total: int               # steps of this run
    sigma: torch.Tensor      # work dtype, on the device
    sigma_next: torch.Tensor


@dataclass(frozen=True)
class ReplayState:
    """The latents of both branches (work dtype, device). target is None when only the source runs."""
    source: torch.Tensor
    target: Optional[torch.Tensor]
    source_pair: Optional[torch.Tensor] = None    # EDICT: the coupled y sequences
    target_pair: Optional[torch.Tensor] = None

    def replace(self, **changes) -> "ReplayState":
        return dataclasses.replace(self, **changes)


class ReplayContext:
    """Everything one replay run shares with its method and hooks (created per run by the driver)."""

    def __init__(self, guider: BranchGuider, inv: EditKitInversion, k0: int, model_options: dict,
                 hooks=(), source_only: bool = False):
        self.guider, self.inv, self.k0, self.model_options = guider, inv, k0, model_options
        self.method = get_method(inv.method)
        self.params = self.method.params(inv)
        self.source_only = source_only
        self.device = guider.model_patcher.load_device
        self.dtype = work_dtype(self.device)
        self.sigmas = inv.sigmas.to(self.device).to(self.dtype)
        self.n = inv.steps
        self.model_sampling = guider.inner_model.model_sampling
        self.hooks = tuple(self.method.hooks(inv, self.params)) + tuple(hooks)
        self.stats: dict = {"source_drift": 0.0}
        self.scratch: dict = {}           # per-run state of hooks, keyed by the hook

    def load(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, self.dtype)

    def latent(self, i: int) -> torch.Tensor:
        """The stored source latent at level i."""
        return self.load(self.inv.latents[i])

    def step(self, index: int, position: int, total: int) -> Step:
        return Step(index, position, total, self.sigmas[index], self.sigmas[index + 1])

    def predict(self, step: Step, source: torch.Tensor, target: Optional[torch.Tensor]):
        """(source x0, target x0) of the method's branch specs, both branches in one batched model call
        (the source alone when target is None), then through every hook's on_denoised."""
        specs = self.method.branch_specs(self, step.index)
        mo = self.model_options
        extra = [] if target is None else [(h, list(h.branches(self, step))) for h in self.hooks]
        extra = [(h, ss) for h, ss in extra if ss]
        if target is None:
            den = (self.guider.evaluate([source], step.sigma, specs[:1], mo)[0].to(self.dtype), None)
        elif not extra:
            den = tuple(d.to(self.dtype) for d in self.guider.evaluate([source, target], step.sigma, specs, mo))
        else:
            flat = [s for _, ss in extra for s in ss]
            names = DEFAULT_BRANCHES + tuple(f"{TARGET}.extra{k}" for k in range(len(flat)))
            preds = self.guider.evaluate([source, target] + [target] * len(flat), step.sigma, specs + flat, mo,
                                         names=names, raw=True)
            den, k = (preds[0].x0.to(self.dtype), preds[1].x0.to(self.dtype)), 2
            for h, ss in extra:
                own = preds[:2] + preds[k:k + len(ss)]
                den = (den[0], h.on_branches(self, step, target, den[1], own).to(self.dtype))
                k += len(ss)
        for h in self.hooks:
            den = h.on_denoised(self, step, *den)
        return den


class ReplayHook:
    """Base class of replay hooks (see the module docstring); every method defaults to 'no change'."""

    def plan(self, ctx: ReplayContext, steps: list) -> list:
        return steps

    def on_jump(self, ctx: ReplayContext, state: ReplayState, level: int, to_level: int) -> ReplayState:
        return state

    def on_denoised(self, ctx: ReplayContext, step: Step, source: torch.Tensor, target: Optional[torch.Tensor]):
        return source, target

    def on_step(self, ctx: ReplayContext, step: Step, state: ReplayState) -> ReplayState:
        return state

    def branches(self, ctx: ReplayContext, step: Step) -> list:
        """Extra BranchSpecs evaluated at the target latent in the step's batched model call (after the
        source and target branches; LEDITS++'s edit concepts)."""
        return []

    def on_branches(self, ctx: ReplayContext, step: Step, target: torch.Tensor, target_x0: torch.Tensor,
                    preds: list) -> torch.Tensor:
        """The target's x0 from the call's BranchPredictions [source, target, *this hook's branches] (raw
        cond / uncond x0 each) and the target latent; called only when `branches` gave some."""
        return target_x0


class SnapSource(ReplayHook):
    """The source branch back onto the stored trajectory after every step: Direct Inversion's correction;
    for EDICT and DDPM (exact by construction) it only removes the rounding of the batched evaluation.
    Not applied to a source-only replay (reconstruct), which measures the method itself."""

    def on_step(self, ctx, step, state):
        if ctx.source_only:
            return state
        stored = ctx.latent(step.index + 1)
        ctx.stats["source_drift"] = max(ctx.stats["source_drift"], float((state.source - stored).abs().max()))
        pair = ctx.load(ctx.inv.pair[step.index + 1]) if state.source_pair is not None else None
        return state.replace(source=stored, source_pair=pair)


# ---------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------

class InversionMethod:
    """Base class (see the module docstring). Subclasses set name/label/Params and implement invert and
    replay_step; the defaults suit a deterministic method replayed like DDIM."""

    name = ""
    label = ""
    Params = Params
    direct_inversion = False     # Direct Inversion can correct its replay onto its stored trajectory
    own_target_uncond = False    # the target's unconditional prediction comes from the method (NPI, NTI)

    # --- parameters ---------------------------------------------------------------------------
    def params(self, inv: EditKitInversion):
        return self.Params.from_settings(inv.settings)

    def make_params(self, params=None, **values):
        p = params if params is not None else self.Params()
        return dataclasses.replace(p, **values) if values else p

    # --- inversion ----------------------------------------------------------------------------
    def evaluations(self, steps: int, p) -> int:
        """Model evaluations of the inversion (its progress bar)."""
        return steps

    def invert(self, run: InversionRun, p) -> InversionResult:
        raise NotImplementedError

    def make(self, model, latent: torch.Tensor, positive, negative, cfg: float, sigmas: torch.Tensor, p,
             noise: Optional[torch.Tensor] = None, settings: Optional[dict] = None) -> EditKitInversion:
        """Invert `latent` (user space, B x C x H x W) along `sigmas`; settings: extra display entries
        (steps, scheduler) stored before the method's own parameters."""
        x0 = prepare_latent(model, latent)
        spec = BranchSpec("positive", "negative" if negative is not None else None, float(cfg))
        pbar = progress_bar(self.evaluations(len(sigmas) - 1, p), model)
        guider = make_guider(model, {"positive": positive, "negative": negative}, cfg)

        def loop(g, sig, extra_args, latent_image):
            dev = latent_image.device
            wd = work_dtype(dev)
            y1 = noise.to(dev, wd) if noise is not None else None
            return self.invert(InversionRun(g, sig, x0.to(dev, wd), spec, extra_args["model_options"], y1, pbar), p)

        res = guider.call(loop, sigmas, tuple(x0.shape))
        return EditKitInversion(
            method=self.name, sigmas=sigmas.detach().float().cpu().clone(), latents=res.latents, positive=positive,
            negative=negative, cfg=float(cfg), identity=model_identity(model),
            settings={**(settings or {}), **p.as_settings()}, start_index=res.start_index,
            pair=res.pair, residuals=res.residuals, noise_std=res.noise_std,
            noise=to_storage(noise) if noise is not None else None,
            stats={"nfe": int(getattr(guider, "evaluations", 0))})

    # --- replay -------------------------------------------------------------------------------
    def branch_specs(self, ctx: ReplayContext, step: int) -> list:
        """[source spec, target spec]: the source with the inversion's prompt and cfg, the target with the
        sampler's (negative: the sampler's, else the inversion's)."""
        g = ctx.guider
        src_neg = "source_negative" if g.has("source_negative") else None
        tgt_neg = "negative" if g.has("negative") else src_neg
        return [BranchSpec("source_positive", src_neg, ctx.inv.cfg), BranchSpec("positive", tgt_neg, float(g.cfg))]

    def start(self, ctx: ReplayContext) -> ReplayState:
        x = ctx.latent(ctx.k0)
        return ReplayState(x, None if ctx.source_only else x.clone())

    def replay_step(self, ctx: ReplayContext, step: Step, state: ReplayState):
        raise NotImplementedError

    def hooks(self, inv: EditKitInversion, p) -> list:
        return [SnapSource()] if inv.direct else []


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

_REGISTRY: dict = {}


def register(cls):
    """Class decorator: register one instance of an InversionMethod subclass under its name."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"EditKit: inversion method name {cls.name!r} is empty or taken")
    _REGISTRY[cls.name] = cls()
    return cls


def get_method(name: str) -> InversionMethod:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"EditKit: unknown inversion method {name!r} (known: {', '.join(_REGISTRY)})") from None


def method_names() -> tuple:
    return tuple(_REGISTRY)
