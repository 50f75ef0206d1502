"""SDE-Drag (Nie et al., ICLR 2024, "The Blessing of Randomness: SDE Beats ODE in General Diffusion-based
Image Editing"): no backpropagation. Noise the image latent to t0, copy the noisy latent patch around each
handle to its target, refill the place it left with fresh noise, and denoise with an SDE (DDPM posterior
sampling, eta = 1): the added noise shrinks the mismatch between the manipulated latent and the prior,
which an ODE would keep. A long drag is split into `sub_moves` equal moves along the segment, each its own
noise -> copy -> denoise cycle.

EditKit's regional form: outside the drag's footprint (the moved patch at its old and new places, dilated
one latent pixel) the latent follows the source noised with the same noise at every level, so the rest of
the image comes back exactly (the DiffEditor / masked-decoding idea); the paper's Cycle-SDE reconstruction
is not used. Patches move by whole latent pixels (8 image px on SD/SDXL/SD3/Flux): the drag is rounded to
the latent grid, at most 4 px per axis off.

Every model space (EPS, v-prediction, flow) through core/denoiser and samplers/steps.ddpm_posterior.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core import denoiser
from ..samplers.steps import ddpm_posterior, prepare_latent
from .points import DragPoints

LATENT_FACTOR = 8     # image px per latent px (every family EditKit supports)


@dataclass(frozen=True)
class Move:
    """One copy-paste on the latent grid: the patch `source` (h, w) bool moved by (dy, dx) latent px."""
    source: torch.Tensor
    dy: int
    dx: int

    @property
    def target(self) -> torch.Tensor:
        return shift(self.source, self.dy, self.dx)


@dataclass
class DragInfo:
    moves: list               # per sub-move: [Move, ...]
    sigma0: float
    steps: int                # denoising steps per sub-move
    evaluations: int

    def describe(self) -> str:
        mv = ", ".join(f"({m.dx * LATENT_FACTOR:+d}, {m.dy * LATENT_FACTOR:+d}) px" for m in self.moves[0]) if self.moves else "-"
        return (f"SDE-Drag: {len(self.moves)} sub-move(s) of {mv}, t0 sigma {self.sigma0:.3f}, "
                f"{self.steps} SDE steps each, {self.evaluations} model calls")


def shift(m: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """m (..., h, w) moved by (dy, dx) pixels; what leaves the grid is dropped, what enters is zero."""
    out = torch.zeros_like(m)
    h, w = m.shape[-2:]
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    if abs(dy) < h and abs(dx) < w:
        out[..., yd, xd] = m[..., ys, xs]
    return out


def dilate(m: torch.Tensor, r: int = 1) -> torch.Tensor:
    if r <= 0:
        return m
    f = torch.nn.functional.max_pool2d(m[None, None].float(), 2 * r + 1, stride=1, padding=r)[0, 0]
    return f > 0.5


def source_patches(drag: DragPoints, h: int, w: int, radius: float) -> list[torch.Tensor]:
    """Per pair, the latent pixels that move: a disk of `radius` image px around the handle, inside the
    editable region when the drag has one; with several pairs each pixel belongs to its nearest handle."""
    fy, fx = drag.height / h, drag.width / w
    yy, xx = torch.meshgrid((torch.arange(h, dtype=torch.float32) + 0.5) * fy,
                            (torch.arange(w, dtype=torch.float32) + 0.5) * fx, indexing="ij")
    dist = torch.stack([torch.hypot(xx - hx, yy - hy) for (hx, hy), _ in drag.pairs])
    nearest = dist.argmin(0)
    region = drag.region()
    reg = None
    if region is not None:
        reg = torch.nn.functional.interpolate(region[None, None], size=(h, w), mode="area")[0, 0] >= 0.3
    out = []
    for i in range(len(drag.pairs)):
        m = (dist[i] <= radius) & (nearest == i)
        if reg is not None:
            m = m & reg
        # the handle's own latent pixel always moves
        (hx, hy), _ = drag.pairs[i]
        m[min(int(hy / fy), h - 1), min(int(hx / fx), w - 1)] = True
        out.append(m)
    return out


def plan_moves(drag: DragPoints, h: int, w: int, radius: float, sub_moves: int) -> list[list[Move]]:
    """The copy-pastes of each sub-move (cumulative displacement rounded to the latent grid)."""
    fy, fx = drag.height / h, drag.width / w
    patches = source_patches(drag, h, w, radius)
    plan = []
    prev = [(0, 0)] * len(drag.pairs)
    for k in range(1, sub_moves + 1):
        moves, now = [], []
        for i, ((hx, hy), (tx, ty)) in enumerate(drag.pairs):
            dy, dx = int(round((ty - hy) * k / sub_moves / fy)), int(round((tx - hx) * k / sub_moves / fx))
            py, px = prev[i]
            moves.append(Move(shift(patches[i], py, px), dy - py, dx - px))
            now.append((dy, dx))
        prev = now
        plan.append(moves)
    return plan


def copy_paste(x_t: torch.Tensor, fill: torch.Tensor, moves: list[Move]) -> tuple[torch.Tensor, torch.Tensor]:
    """The manipulated latent and the edit footprint (h, w) bool. Every target patch takes the noisy latent
    of its source patch; source pixels no target covers take `fill` (fresh noise)."""
    out = x_t.clone()
    vacated = torch.zeros(x_t.shape[-2:], dtype=torch.bool, device=x_t.device)
    covered = torch.zeros_like(vacated)
    for mv in moves:
        vacated |= mv.source.to(x_t.device)
        covered |= mv.target.to(x_t.device)
    left = vacated & ~covered
    out = torch.where(left, fill, out)
    for mv in moves:
        t = mv.target.to(x_t.device)
        out = torch.where(t, shift(x_t, mv.dy, mv.dx), out)
    return out, dilate(vacated | covered, 1)


def fresh_fill(ms, x0: torch.Tensor, keep: torch.Tensor, eps: torch.Tensor, eps2: torch.Tensor, sigma) -> torch.Tensor:
    """Noise at level sigma over a clean latent with no content: per-channel mean and std of the kept
    (unedited) area plus noise, so the model redraws the vacated place from its surroundings."""
    k = keep.to(x0.device)
    if int(k.sum()) < 2:
        k = torch.ones_like(k)
    vals = x0[..., k]                                   # (B, C, n)
    mean, std = vals.mean(-1)[..., None, None], vals.std(-1)[..., None, None]
    return denoiser.add_noise(ms, mean + std * eps2, eps, sigma)


def sde_drag(model, positive, negative, samples: torch.Tensor, drag: DragPoints, t0: float = 0.6, steps: int = 50,
             cfg: float = 1.0, seed: int = 0, sub_moves: int = 1, radius: float = 48.0, scheduler: str = "normal",
             progress=None) -> tuple[torch.Tensor, DragInfo]:
    """The dragged latent (user space, same shape) and what was done. `drag` must already fit the latent
    (drag.fit(w * 8, h * 8)); radius in the drag's pixels. progress(n, x0) is called after each step."""
    import comfy.sample
    import comfy.samplers
    from ..samplers.branch_guider import BranchSpec, make_guider
    from ..samplers.sdedit import sdedit_sigmas

    ms = model.get_model_object("model_sampling")
    b, c, h, w = samples.shape
    run_steps = max(1, int(round(steps * t0)))
    sigmas = sdedit_sigmas(ms, lambda n: comfy.samplers.calculate_sigmas(ms, scheduler, n).cpu(), run_steps, t0)
    plan = plan_moves(drag, h, w, radius, sub_moves)
    info = DragInfo(plan, float(sigmas[0]), len(sigmas) - 1, 0)
    spec = BranchSpec("positive", "negative" if negative is not None else None, cfg)
    guider = make_guider(model, {"positive": positive, "negative": negative}, cfg)
    gen = torch.Generator().manual_seed(int(seed) + 1)

    def program(g, sig, extra_args, _callback, _noise, latent, _disable_pbar):
        x0 = prepare_latent(model, samples).to(latent.device)
        mo = extra_args["model_options"]
        for moves in plan:
            eps = comfy.sample.prepare_noise(samples, seed).float().to(x0.device)
            s0 = sig[0]
            x_t = denoiser.add_noise(ms, x0, eps, s0)
            keep_probe = torch.zeros((h, w), dtype=torch.bool)
            for mv in moves:
                keep_probe |= mv.source | mv.target
            eps2 = torch.randn(x0.shape, generator=gen).to(x0.device)
            eps3 = torch.randn(x0.shape, generator=gen).to(x0.device)
            fill = fresh_fill(ms, x0, ~dilate(keep_probe, 1), eps3, eps2, s0)
            x, edit = copy_paste(x_t, fill, moves)
            edit = edit.to(x.device)
            for i in range(len(sig) - 1):
                s, s_next = float(sig[i]), float(sig[i + 1])
                den = g.x0(x, sig[i], spec, mo)
                info.evaluations += 1
                mean, std = ddpm_posterior(ms, x, den, s, s_next)
                x = mean + std * torch.randn(x.shape, generator=gen).to(x.device) if std > 0 else mean
                ref = denoiser.add_noise(ms, x0, eps, s_next) if s_next > 0 else x0
                x = torch.where(edit, x, ref)
                if progress is not None:
                    progress(1, den)
            x0 = x
        return x0

    out = guider.run(program, sigmas, samples.shape, seed=seed)
    return out.to(samples.dtype), info
