"""Guidance terms: immutable descriptions, each taking part in the guider's phases through its hooks.

A term list is a tuple of these objects; `EditKitGuidanceGuider` evaluates them (the protocol is
in `protocol.py`, the formulas in `formulas.py`). Within one model call, each step weighted by its
term's schedule (the `order` of the terms gives this order inside a phase):
  1. CADS anneals the conditioning before the model runs;
  2. the model's own pre-CFG functions; then Perp-Neg and APG reshape the guidance direction;
  3. the CFG combination itself, through the model's sampler_cfg_function and post-CFG
     functions (so core patches like RescaleCFG, PAG or CFG++ samplers keep working);
  4. rescale (Lin et al.) toward the conditional prediction's std;
  5. extra-branch terms are added: PAG, SAG, AutoGuidance;
  6. dynamic thresholding of the result.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

import comfy.model_patcher
import comfy.sampler_helpers
import comfy.samplers

from ..core import denoiser
from . import formulas as F, layers
from .protocol import COND, UNCOND, Momentum, Term, TermError


def _resolve_layers(term, model):
    try:
        return layers.resolve(model, term.layers)
    except ValueError as e:
        raise TermError(f"{term.title} layers '{term.layers}': {e}", "fix 'layers' on that term node") from None


@dataclass(frozen=True, eq=False)
class CFGTerm(Term):
    kind, title = "cfg", "CFG"

    def label(self) -> str:
        return "CFG scale"

    def cfg_factor(self, weight: float) -> float:
        return weight


@dataclass(frozen=True, eq=False)
class CADSTerm(Term):
    noise_scale: float = 0.25
    tau1: float = 0.6
    tau2: float = 0.9
    psi: float = 1.0
    noise_negative: bool = False
    seed: int = 0
    kind, title, unique, order = "cads", "CADS noise", True, 10

    def strength(self) -> float:
        return self.noise_scale

    def anneal(self, call, i, weight):
        gamma = F.cads_gamma(1.0 - call.info.progress, self.tau1, self.tau2)
        step = int(round(call.step * 100)) if call.step is not None else 0
        base_seed = (int(call.seed or 0) * 1000003 + self.seed * 7919 + step) % (2 ** 63)

        def anneal(y, j):
            g = torch.Generator().manual_seed(base_seed + 31 * j)
            n = torch.randn(y.shape, generator=g, dtype=torch.float32).to(y.device)
            return F.cads_anneal(y, gamma, self.noise_scale * weight, self.psi, n)
        call.pos = _anneal_conds(call.pos, anneal)
        if self.noise_negative and call.neg is not None:
            call.neg = _anneal_conds(call.neg, lambda y, j: anneal(y, j + 1000))


def _anneal_conds(conds, fn):
    """The conds with fn(cross-attention context, cond index) in place of each context."""
    out = []
    for j, c in enumerate(conds or []):
        mc = c.get("model_conds", {})
        if "c_crossattn" in mc:
            c = c.copy()
            mc = mc.copy()
            mc["c_crossattn"] = mc["c_crossattn"]._copy_with(fn(mc["c_crossattn"].cond, j))
            c["model_conds"] = mc
        out.append(c)
    return out


@dataclass(frozen=True, eq=False)
class PerpNegTerm(Term):
    empty: Any = None                 # CONDITIONING of the empty prompt
    neg_scale: float = 1.0
    kind, title, unique, order, needs_uncond = "perpneg", "Perp-Neg", True, 20, True
    CONDS = "empty_negative_prompt"

    def strength(self) -> float:
        return self.neg_scale

    def extra_conds(self) -> dict:
        import node_helpers
        return {self.CONDS: node_helpers.conditioning_set_values(self.empty, {"prompt_type": "negative"})}

    def plan(self, call, i, weight):
        call.add_branch("empty", call.named_conds(self.CONDS))

    def direction(self, call, i, weight):
        c, u, e = call.cond, call.uncond, call.prediction("empty")
        call.base, call.base_cond = e, call.named_conds(self.CONDS)
        call.cond_mod = c - (weight * self.neg_scale) * F.perp_component(u - e, c - e)


@dataclass(frozen=True, eq=False)
class APGTerm(Term):
    eta: float = 0.0
    norm_threshold: float = 15.0
    momentum: float = -0.5
    kind, title, unique, order = "apg", "APG", True, 30

    def start(self, guider, run, i):
        return Momentum(run)   # the running average of Algorithm 1, per run

    def direction(self, call, i, weight):
        w = call.cfg
        if not call.need_uncond or math.isclose(w, 1.0) or w == 0:
            return
        c_mod, base, running = call.cond_mod, call.base, call.state(i)
        delta = c_mod - base
        direction, new = F.apg_direction(c_mod, base, self.eta, self.norm_threshold, self.momentum, running.get())
        running.set(new)
        if weight != 1.0:
            direction = delta + weight * (direction - delta)
        call.cond_mod = F.cond_for_scale(c_mod, base, w, c_mod + (w - 1.0) * direction)


@dataclass(frozen=True, eq=False)
class RescaleTerm(Term):
    phi: float = 0.7
    kind, title, order = "rescale", "rescale phi", 40

    def strength(self) -> float:
        return self.phi

    def post_cfg(self, call, i, weight, guided):
        return F.rescale(call.x, call.sigma, guided, call.cond, self.phi * weight, call.flow)


@dataclass(frozen=True, eq=False)
class PAGTerm(Term):
    scale: float = 3.0
    layers: str = "auto"
    kind, title, order = "pag", "PAG", 50

    def strength(self) -> float:
        return self.scale

    def label(self) -> str:
        return f"PAG ({self.layers})"

    def resolve(self, model):
        return _resolve_layers(self, model)

    def plan(self, call, i, weight):
        # the cond chunk again, with identity self-attention at the chosen layers
        b = call.add_branch(f"pag{i}", call.pos)
        for site in call.resolved(i, ()):
            call.perturb(site, b, layers.Perturb.IDENTITY)

    def post_cfg(self, call, i, weight, guided):
        return guided + (self.scale * weight) * (call.cond - call.prediction(f"pag{i}"))


@dataclass(frozen=True, eq=False)
class SAGTerm(Term):
    scale: float = 0.5
    blur_sigma: float = 2.0
    layers: str = "auto"
    kind, title, order = "sag", "SAG", 60

    def strength(self) -> float:
        return self.scale

    def label(self) -> str:
        return f"SAG ({self.layers})"

    def resolve(self, model):
        return _resolve_layers(self, model)

    @staticmethod
    def _source(call) -> int:
        return UNCOND if call.need_uncond else COND

    def plan(self, call, i, weight):
        # record the self-attention of the branch SAG degrades (uncond, or cond when uncond is skipped)
        for site in call.resolved(i, ()):
            call.perturb(site, self._source(call), layers.Perturb.RECORD, replace=False)

    def post_cfg(self, call, i, weight, guided):
        b, x, lp = self._source(call), call.x, call.layer_plan
        src, src_cond = (call.uncond, call.neg) if b == UNCOND else (call.cond, call.pos)
        maps = [lp.maps[(s, b)] for s in call.resolved(i, ()) if lp and (s, b) in lp.maps]
        if not maps or min(x.shape[-2:]) <= 4:
            return guided
        mask = F.sag_mask(maps, tuple(x.shape[-2:])).to(src.dtype)
        degraded = F.gaussian_blur(src, self.blur_sigma) * mask + src * (1 - mask)
        if call.flow:
            ms = call.model.model_sampling
            noised = denoiser.add_noise(ms, degraded, denoiser.to_eps(ms, x, src, call.sigma), call.sigma)
        else:
            noised = degraded + x - src
        (sag_pred,) = call.extra_call(call.model, [src_cond], noised)
        return guided + (self.scale * weight) * (degraded - sag_pred)


@dataclass(frozen=True, eq=False)
class AutoGuidanceTerm(Term):
    weak_model: Any = None            # a ModelPatcher
    scale: float = 1.0
    kind, title, order = "autoguidance", "AutoGuidance", 70

    def strength(self) -> float:
        return self.scale

    def resolve(self, model):
        weak = self.weak_model
        if weak.model is model.model:
            raise TermError("the AutoGuidance weak model is the same network as the model",
                            "load a separate, weaker checkpoint of the same family")
        ch = lambda m: m.model.latent_format.latent_channels  # noqa: E731
        if ch(weak) != ch(model):
            raise TermError(f"the AutoGuidance weak model has {ch(weak)} latent channels, the model {ch(model)}",
                            "use a weak model of the same family")
        return None

    def additional_models(self) -> dict:
        return {"editkit.autoguidance": [self.weak_model]}

    def start(self, guider, run, i):
        """The weak model prepared for this run as CFGGuider prepares the main one: (patcher, conds, options)."""
        weak = self.weak_model
        li = run.latent_image
        if li is not None and torch.count_nonzero(li) > 0:
            li = weak.model.process_latent_in(li)
        conds = {"positive": [c.copy() for c in guider.original_conds["positive"]]}
        conds = comfy.samplers.process_conds(weak.model, run.noise, conds, run.device, li, run.denoise_mask, run.seed)
        mo = comfy.model_patcher.create_model_options_clone(weak.model_options)
        comfy.sampler_helpers.prepare_model_patcher(weak, conds, mo)
        mo.setdefault("transformer_options", {})["sample_sigmas"] = run.sigmas
        weak.pre_run()
        return weak, conds["positive"], mo

    def post_cfg(self, call, i, weight, guided):
        weak, conds, mo = call.state(i)
        (weak_pred,) = call.extra_call(weak.model, [conds], call.x, mo)
        return guided + (self.scale * weight) * (call.cond - weak_pred)


@dataclass(frozen=True, eq=False)
class DynamicThresholdTerm(Term):
    percentile: float = 0.995
    mimic_scale: float = 7.0
    kind, title, order = "dynthresh", "dynamic threshold", 80

    def threshold(self, call, i, weight, guided):
        mimic = call.base + self.mimic_scale * (call.cond - call.base)
        thr = F.dynamic_threshold(guided, mimic, self.percentile)
        return thr if weight == 1.0 else guided + weight * (thr - guided)


def add_term(previous, term: Term) -> tuple:
    """A new immutable term list: previous terms (or none) followed by `term`."""
    return tuple(previous or ()) + (term,)


def describe(terms) -> str:
    return ", ".join(f"{t.label()} [{t.schedule.describe()}]" for t in terms) or "plain CFG"


@dataclass(frozen=True, eq=False)
class SEGATerm(Term):
    """SEGA (Brack et al. 2023), one concept: eps = CFG + gamma, gamma from (eps_concept - eps_uncond) with the
    concept's own branch in the batched call. The guidance lives in the noise (eps / velocity) space of
    k-diffusion, d = (x - x0) / sigma, the same for every parameterization; the x0 result is x0 - sigma * gamma.
    Momentum accumulates from the first step; the concept is applied after `warmup` steps."""
    concept: Any = None               # CONDITIONING of the concept
    reverse: bool = False             # remove the concept (guide away from it)
    scale: float = 5.0
    warmup: int = 10
    edit_threshold: float = 0.95
    momentum_scale: float = 0.3
    momentum_beta: float = 0.6
    kind, title, order, needs_uncond = "sega", "SEGA", 65, True

    def strength(self) -> float:
        return self.scale

    def label(self) -> str:
        return f"SEGA ({'remove' if self.reverse else 'add'})"

    @property
    def conds_name(self) -> str:
        return f"editkit_sega_{id(self):x}"

    def extra_conds(self) -> dict:
        return {self.conds_name: self.concept}

    def start(self, guider, run, i):
        return Momentum(run)

    def plan(self, call, i, weight):
        call.add_branch(f"sega{i}", call.named_conds(self.conds_name))

    def post_cfg(self, call, i, weight, guided):
        x, s = call.x, F._bview(call.sigma, call.x)
        diff = (call.uncond - call.prediction(f"sega{i}")) / s      # d_concept - d_uncond, d = (x - x0) / s
        direction = F.sega_direction(diff, self.scale * weight, self.edit_threshold, self.reverse)
        velocity = call.state(i)
        gamma, new = F.sega_momentum(direction, velocity.get(), self.momentum_scale, self.momentum_beta)
        velocity.set(new)
        step = call.step
        if step is not None and step < self.warmup:
            return guided
        return guided - s * gamma
