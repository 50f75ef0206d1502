"""Guidance terms (immutable descriptions) and their formulas as plain tensor functions.

A term list is a tuple of these objects; `EditKitGuidanceGuider` evaluates them. Every formula
works on x0 ("denoised") predictions of shape (B, ...), per sample, for any latent rank.

Composition order within one model call (each step weighted by its term's schedule):
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
from typing import Any, Optional

import torch

from .schedules import CONSTANT_ONE, Schedule


def _dims(t: torch.Tensor) -> tuple:
    return tuple(range(1, t.ndim))


def _bview(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    s = torch.as_tensor(s, dtype=like.dtype, device=like.device).flatten()
    if s.numel() == 1:
        s = s.expand(like.shape[0])
    return s.reshape((-1,) + (1,) * (like.ndim - 1))


# ---------------------------------------------------------------------------------------------
# Formulas
# ---------------------------------------------------------------------------------------------

def cfg_scale(base_cfg: float, weight: float) -> float:
    """Effective CFG scale for a schedule weight: the guidance above the conditional prediction scales."""
    if weight == 1.0:
        return base_cfg
    return 1.0 + (base_cfg - 1.0) * weight


def cond_for_scale(cond: torch.Tensor, uncond: torch.Tensor, scale: float, target: torch.Tensor) -> torch.Tensor:
    """The conditional prediction that makes linear CFG at `scale` give `target`: u + (target - u) / scale."""
    return uncond + (target - uncond) / scale


def project(v: torch.Tensor, onto: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Components of v parallel and orthogonal to `onto`, per sample."""
    dims = _dims(v)
    unit = torch.nn.functional.normalize(onto.double(), dim=dims)
    par = (v.double() * unit).sum(dim=dims, keepdim=True) * unit
    return par.to(v.dtype), (v.double() - par).to(v.dtype)


def apg_direction(cond: torch.Tensor, uncond: torch.Tensor, eta: float, norm_threshold: float, momentum: float,
                  running: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """APG (Sadat et al. 2024, Algorithm 1): the guidance direction replacing cond - uncond.

    diff = cond - uncond; with momentum beta: running = beta * running + diff, diff = running;
    diff *= min(1, r / ||diff||); diff = diff_orth + eta * diff_par (relative to cond).
    The guided prediction is cond + (w - 1) * diff. Returns (direction, new running average).
    """
    diff = cond - uncond
    new_running = running
    if momentum != 0:
        new_running = diff if running is None else momentum * running + diff
        diff = new_running
    if norm_threshold > 0:
        norm = diff.pow(2).sum(dim=_dims(diff), keepdim=True).sqrt()
        diff = diff * torch.minimum(torch.ones_like(norm), norm_threshold / norm.clamp_min(1e-12))
    par, orth = project(diff, cond)
    return orth + eta * par, new_running


def perp_component(neg: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Perp-Neg (Armandpour et al. 2023): the part of `neg` orthogonal to `pos`, per sample."""
    dims = _dims(pos)
    coef = (neg * pos).sum(dim=dims, keepdim=True) / pos.pow(2).sum(dim=dims, keepdim=True).clamp_min(1e-12)
    return neg - coef * pos


def _v_space(x: torch.Tensor, sigma: torch.Tensor, x0: torch.Tensor, flow: bool) -> torch.Tensor:
    s = _bview(sigma, x)
    if flow:
        return (x - x0) / s
    return (x / (s * s + 1.0) - x0) * (s * s + 1.0) ** 0.5 / s


def _from_v_space(x: torch.Tensor, sigma: torch.Tensor, v: torch.Tensor, flow: bool) -> torch.Tensor:
    s = _bview(sigma, x)
    if flow:
        return x - v * s
    return x / (s * s + 1.0) - v * s / (s * s + 1.0) ** 0.5


def rescale(x: torch.Tensor, sigma, guided: torch.Tensor, cond: torch.Tensor, phi: float, flow: bool = False) -> torch.Tensor:
    """Rescale CFG (Lin et al. 2024): match the guided prediction's std to the conditional one's.

    Computed in v-prediction space for "ve" models, exactly as ComfyUI's RescaleCFG, and in
    velocity space for flow models: v_final = phi * v_g * std(v_c) / std(v_g) + (1 - phi) * v_g.
    """
    if phi == 0:
        return guided
    vg = _v_space(x, sigma, guided, flow)
    vc = _v_space(x, sigma, cond, flow)
    ro_pos = torch.std(vc, dim=_dims(vc), keepdim=True)
    ro_cfg = torch.std(vg, dim=_dims(vg), keepdim=True)
    v_final = phi * (vg * (ro_pos / ro_cfg)) + (1.0 - phi) * vg
    return _from_v_space(x, sigma, v_final, flow)


def dynamic_threshold(guided: torch.Tensor, mimic: torch.Tensor, percentile: float) -> torch.Tensor:
    """Dynamic thresholding (Saharia et al. 2022, latent form of sd-dynamic-thresholding).

    Per sample and channel: centre the guided prediction, take its `percentile` absolute value s,
    clamp to [-s', s'] with s' = max(s, M) and rescale to M, where M is the largest absolute
    centred value of the `mimic` prediction (CFG at a low "mimic" scale); then un-centre.
    """
    b, c = guided.shape[:2]
    g = guided.reshape(b, c, -1).float()
    mm = mimic.reshape(b, c, -1).float()
    mean = g.mean(-1, keepdim=True)
    centred = g - mean
    mim_max = (mm - mm.mean(-1, keepdim=True)).abs().max(-1, keepdim=True).values
    s = torch.quantile(centred.abs(), percentile, dim=-1, keepdim=True)
    s = torch.maximum(s, mim_max).clamp_min(1e-12)
    out = torch.maximum(torch.minimum(centred, s), -s) / s * mim_max + mean
    return out.reshape(guided.shape).to(guided.dtype)


def cads_gamma(t: float, tau1: float, tau2: float) -> float:
    """CADS annealing (Sadat et al. 2024) at diffusion time t (1 = noise): 1 for t <= tau1, 0 for t >= tau2, linear between."""
    if t <= tau1:
        return 1.0
    if t >= tau2:
        return 0.0
    return (tau2 - t) / (tau2 - tau1)


def cads_anneal(y: torch.Tensor, gamma: float, noise_scale: float, psi: float, noise: torch.Tensor) -> torch.Tensor:
    """y_hat = sqrt(g) y + s sqrt(1 - g) n, rescaled to y's per-sample mean/std, mixed by psi."""
    if gamma >= 1.0 or noise_scale == 0:
        return y
    yf = y.float()
    yh = math.sqrt(gamma) * yf + noise_scale * math.sqrt(1.0 - gamma) * noise.float()
    if psi > 0:
        dims = _dims(yf)
        y_mean, y_std = yf.mean(dim=dims, keepdim=True), yf.std(dim=dims, keepdim=True)
        h_mean, h_std = yh.mean(dim=dims, keepdim=True), yh.std(dim=dims, keepdim=True)
        rescaled = (yh - h_mean) / h_std.clamp_min(1e-12) * y_std + y_mean
        yh = psi * rescaled + (1.0 - psi) * yh
    return yh.to(y.dtype)


# ---------------------------------------------------------------------------------------------
# Terms
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Term:
    schedule: Schedule = CONSTANT_ONE
    kind = "term"
    title = "term"
    unique = False          # at most one such term per guider

    def label(self) -> str:
        return self.title

    def strength(self) -> float:
        """The term's own scale, times which the schedule weight gives the plotted effective scale."""
        return 1.0


@dataclass(frozen=True, eq=False)
class CFGTerm(Term):
    kind, title = "cfg", "CFG"

    def label(self) -> str:
        return "CFG scale"


@dataclass(frozen=True, eq=False)
class RescaleTerm(Term):
    phi: float = 0.7
    kind, title = "rescale", "rescale phi"

    def strength(self) -> float:
        return self.phi


@dataclass(frozen=True, eq=False)
class APGTerm(Term):
    eta: float = 0.0
    norm_threshold: float = 15.0
    momentum: float = -0.5
    kind, title, unique = "apg", "APG", True


@dataclass(frozen=True, eq=False)
class DynamicThresholdTerm(Term):
    percentile: float = 0.995
    mimic_scale: float = 7.0
    kind, title = "dynthresh", "dynamic threshold"


@dataclass(frozen=True, eq=False)
class PerpNegTerm(Term):
    empty: Any = None                 # CONDITIONING of the empty prompt
    neg_scale: float = 1.0
    kind, title, unique = "perpneg", "Perp-Neg", True

    def strength(self) -> float:
        return self.neg_scale


@dataclass(frozen=True, eq=False)
class PAGTerm(Term):
    scale: float = 3.0
    layers: str = "auto"
    kind, title = "pag", "PAG"

    def strength(self) -> float:
        return self.scale

    def label(self) -> str:
        return f"PAG ({self.layers})"


@dataclass(frozen=True, eq=False)
class SAGTerm(Term):
    scale: float = 0.5
    blur_sigma: float = 2.0
    layers: str = "auto"
    kind, title = "sag", "SAG"

    def strength(self) -> float:
        return self.scale

    def label(self) -> str:
        return f"SAG ({self.layers})"


@dataclass(frozen=True, eq=False)
class CADSTerm(Term):
    noise_scale: float = 0.25
    tau1: float = 0.6
    tau2: float = 0.9
    psi: float = 1.0
    noise_negative: bool = False
    seed: int = 0
    kind, title, unique = "cads", "CADS noise", True

    def strength(self) -> float:
        return self.noise_scale


@dataclass(frozen=True, eq=False)
class AutoGuidanceTerm(Term):
    weak_model: Any = None            # a ModelPatcher
    scale: float = 1.0
    kind, title = "autoguidance", "AutoGuidance"

    def strength(self) -> float:
        return self.scale


def add_term(previous, term: Term) -> tuple:
    """A new immutable term list: previous terms (or none) followed by `term`."""
    return tuple(previous or ()) + (term,)


def describe(terms) -> str:
    return ", ".join(f"{t.label()} [{t.schedule.describe()}]" for t in terms) or "plain CFG"
