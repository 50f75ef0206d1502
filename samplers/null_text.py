"""Null-text inversion (Mokady et al., CVPR 2023).

1. Invert with guidance 1 and the source prompt (the pivot trajectory z*_t; samplers/inversion.py).
2. For each sampling step i (high noise first), optimise the unconditional cross-attention context
   phi_i so that one guided step (source prompt, phi_i, cfg, default 7.5) from the current latent lands
   on z*_{i+1}; then take that step with phi_i. Paper defaults: Adam, 10 inner iterations, learning
   rate 1e-2 * (1 - i / 100), early stop when the loss < 1e-5 + i * 2e-5, phi_i initialised from phi_{i-1}.
3. Editing replays the phi_i as the unconditional context of every step (samplers/replay.py).

The loss is the MSE of the latent in unit (VP-like) scale, so the paper's thresholds keep their meaning
on EPS, v-prediction and flow models. ComfyUI runs nodes under torch.inference_mode and model weights
are inference tensors: the gradient runs through core/gradients.py (a *clone* of the model whose weights
pass through a weight wrapper, outside inference mode; comfy-integration §2.8), never on the user's model.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..core.gradients import GradWeight, gradient_clone, run_with_gradients  # noqa: F401 (GradWeight, gradient_clone: API)
from .branch_guider import BranchSpec
from .inversion import _prepare, _progress, _sig, euler_step, invert, vp_scale
from .trajectory import EditKitInversion, to_storage


def base_context(conditioning) -> torch.Tensor:
    """The cross-attention context of a single-entry CONDITIONING (what NTI optimises)."""
    return conditioning[0][0]


def null_text_program(pivot: list, cfg: float, inner: int, lr: float, early_stop: float, record: dict,
                      uncond_init: torch.Tensor, pbar=None):

    def program(env):
        guider, sigmas, mo, ms, dev = env.guider, env.sigmas, env.model_options, env.model_sampling, env.device
        n = len(sigmas) - 1
        with torch.inference_mode(False):
            x = pivot[0].to(dev, torch.float32).clone()
            b = x.shape[0]
            phi = uncond_init.to(dev, torch.float32).clone()
            if phi.shape[0] != b:
                phi = phi[:1].repeat(b, 1, 1)
            spec = BranchSpec("positive", "negative", float(cfg))
            pos = guider.conds["positive"]
            phis, used, losses, first = [], [], [], []
            for i in range(n):
                s, s_next = _sig(sigmas, i, x).clone(), _sig(sigmas, i + 1, x).clone()
                ts = s.reshape(1).expand(b).clone()
                target = pivot[i + 1].to(dev, torch.float32).clone()
                scale = vp_scale(ms, float(s_next))
                with torch.no_grad():
                    cond_pred = guider.predict(x, ts, pos, None, mo)[0].detach()
                phi = phi.detach().clone().requires_grad_(True)
                opt = torch.optim.Adam([phi], lr=lr * (1.0 - i / 100.0))
                iters, loss_v = 0, float("nan")
                for _ in range(inner):
                    with torch.enable_grad():
                        neg = guider.cond_list("negative", phi)
                        uncond_pred = guider.predict(x, ts, None, neg, mo)[1]
                        den = guider.combine(spec, cond_pred, uncond_pred, x, ts, mo, pos, neg)
                        prev = euler_step(x, den, s, s_next)
                        loss = torch.nn.functional.mse_loss(prev * scale, target * scale)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                    opt.step()
                    iters += 1
                    loss_v = float(loss.detach())
                    if iters == 1:
                        first.append(loss_v)
                    if loss_v < early_stop + i * 2e-5:
                        break
                phi = phi.detach()
                with torch.no_grad():
                    neg = guider.cond_list("negative", phi)
                    uncond_pred = guider.predict(x, ts, None, neg, mo)[1]
                    den = guider.combine(spec, cond_pred, uncond_pred, x, ts, mo, pos, neg)
                    x = euler_step(x, den, s, s_next).detach()
                phis.append(phi.clone())
                used.append(iters)
                losses.append(loss_v)
                if pbar is not None:
                    pbar.update(1, den)
        with torch.inference_mode():
            record["null_embeddings"] = [to_storage(p) for p in phis]
            record["final"] = to_storage(x)
        record.update(iterations=used, losses=losses, first_losses=first, nfe=getattr(guider, "evaluations", 0))
        return x

    return program


def null_text_inversion(model, latent: torch.Tensor, positive, negative, cfg: float, sigmas: torch.Tensor,
                        inner: int = 10, lr: float = 1e-2, early_stop: float = 1e-5, fixed_point: int = 0,
                        settings: Optional[dict] = None) -> EditKitInversion:
    """Pivot inversion at guidance 1, then per-step null-text optimisation for guidance `cfg`."""
    pivot_inv = invert(model, latent, positive, None, 1.0, sigmas, "ddim", fixed_point=fixed_point)
    n = len(sigmas) - 1
    record: dict = {}
    pbar = _progress(n, model)
    program = null_text_program(pivot_inv.latents, cfg, inner, lr, early_stop, record, base_context(negative), pbar)
    x0 = _prepare(model, latent)
    run_with_gradients(model, {"positive": positive, "negative": negative}, program, sigmas, tuple(x0.shape), cfg=cfg)
    stats = {"nfe": pivot_inv.stats["nfe"] + int(record.get("nfe", 0)), "pivot_nfe": pivot_inv.stats["nfe"],
             "iterations": list(record["iterations"]), "iterations_total": int(sum(record["iterations"])),
             "iteration_budget": n * inner, "final_losses": list(record["losses"]),
             "first_losses": list(record["first_losses"])}
    return pivot_inv.with_changes(method="nti", negative=negative, cfg=float(cfg), settings=dict(settings or {}),
                                  null_embeddings=record["null_embeddings"], stats=stats)
