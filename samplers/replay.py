"""Editing from an EDITKIT_INVERSION: the SAMPLER/GUIDER pair behind EditKitInversionSampler.

The guider is a BranchGuider holding the target prompt ("positive"/"negative", cfg) and the
inversion's source prompt ("source_positive"/"source_negative"). The sampler runs the source and
target branches in one batch per model call (source first inside every cond_or_uncond chunk,
transformer_options["editkit_branches"] = ("source", "target")) and steps them with the method the
trajectory was made by:

  ddim / npi / nti  deterministic DDIM (Euler) steps from the inverted noise; NPI guides the target with
                    the source prompt as negative (and the source branch with no guidance at all), NTI
                    uses the optimised null-text context of every step for both branches;
  direct            (flag, with any of the three above) after every step the source branch is set to the
                    stored inversion latent of the next level (Direct Inversion / PnP Inversion);
  edict             EDICT's coupled, exactly invertible steps with mixing p;
  ddpm              DDPM posterior mean + the stored per-step residual noise (edit-friendly DDPM);
  rf                RF-Inversion's controlled reverse ODE: x0 pulled toward the source image with eta
                    for the steps in [start, stop).
"""
from __future__ import annotations

import comfy.samplers
import torch

from ..core.errors import EditKitInputError
from .branch_guider import BranchGuider, BranchSpec, make_guider
from .inversion import ddpm_posterior, euler_step
from .trajectory import EditKitInversion, work_dtype

NODE = "EditKitInversionSampler"
OUTPUTS = ("target", "source + target")


class ZeroNoise:
    """NOISE for SamplerCustomAdvanced: the replay starts from the stored trajectory, so no noise is added."""
    seed = 0

    def generate_noise(self, input_latent):
        s = input_latent["samples"]
        return torch.zeros(s.shape, dtype=torch.float32, device="cpu")


def make_edit_guider(model, inv: EditKitInversion, positive, negative, cfg: float) -> BranchGuider:
    g = make_guider(model, {"positive": positive, "negative": negative,
                            "source_positive": inv.positive, "source_negative": inv.negative}, cfg)
    g.inversion = inv
    return g


def branch_specs(guider: BranchGuider, inv: EditKitInversion, step: int) -> list:
    """[source spec, target spec] for one step."""
    cfg = float(guider.cfg)
    tgt_neg = "negative" if guider.has("negative") else ("source_negative" if guider.has("source_negative") else None)
    if inv.method == "npi":
        s = inv.settings
        return [BranchSpec("source_positive", None, 1.0),
                BranchSpec("positive", "source_positive", cfg, proximal=s.get("proximal") or None,
                           quantile=float(s.get("quantile", 0.7)))]
    if inv.method == "nti":
        ctx = inv.null_embeddings[step]
        return [BranchSpec("source_positive", "source_negative", inv.cfg, uncond_context=ctx),
                BranchSpec("positive", "source_negative", cfg, uncond_context=ctx)]
    return [BranchSpec("source_positive", "source_negative" if guider.has("source_negative") else None, inv.cfg),
            BranchSpec("positive", tgt_neg, cfg)]


def start_index(inv: EditKitInversion, sigmas: torch.Tensor) -> int:
    """Which stored step `sigmas` starts at: it must be a tail of the trajectory's schedule."""
    full = inv.sigmas.float()
    k = len(full) - len(sigmas)
    if k < 0 or len(sigmas) < 2 or not torch.allclose(full[k:], sigmas.detach().float().cpu(), rtol=1e-4, atol=1e-6):
        raise EditKitInputError(NODE, "sigmas",
                                f"the sigmas ({len(sigmas) - 1} steps) are not the inversion's schedule "
                                f"({inv.steps} steps, editing from step {inv.start_index})",
                                "connect the 'sigmas' output of EditKit Inversion Sampler (or a tail of it, e.g. SplitSigmas)")
    return k


class InversionReplaySampler(comfy.samplers.Sampler):
    """SAMPLER that edits from an inversion; needs the GUIDER of the same EditKitInversionSampler node."""

    def __init__(self, inv: EditKitInversion, output: str = "target"):
        self.inv = inv
        self.output = output

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        inv = self.inv
        if not isinstance(model_wrap, BranchGuider) or getattr(model_wrap, "inversion", None) is not inv:
            raise EditKitInputError(NODE, "guider", "this sampler needs the guider of the same EditKit Inversion Sampler node",
                                    "connect both its 'guider' and 'sampler' outputs to SamplerCustomAdvanced")
        if denoise_mask is not None:
            raise EditKitInputError(NODE, "latent", "the latent carries a noise mask",
                                    "inversion editing runs on the whole latent; remove SetLatentNoiseMask")
        if latent_image is not None:
            inv.check_latent(latent_image.shape, NODE, "latent")
        k0 = start_index(inv, sigmas)
        return replay(model_wrap, inv, k0, extra_args["model_options"], callback, self.output)


def replay(guider: BranchGuider, inv: EditKitInversion, k0: int, model_options: dict, callback=None,
           output: str = "target", source_only: bool = False) -> torch.Tensor:
    """Run the edit from step k0; returns the target (or source + target) latent in sampler space."""
    dev = guider.model_patcher.load_device
    guider.evaluations = 0          # per-run counters (the guider object may be reused by ComfyUI's cache)
    sig = inv.sigmas.to(dev)
    n = inv.steps
    total = n - k0

    wd = work_dtype(dev)
    sig = sig.to(wd)

    def load(t):
        return t.to(dev, wd)

    xs = load(inv.latents[k0])
    xt = xs.clone()
    ys = yt = None
    if inv.method == "edict":
        ys = load(inv.pair[k0])
        yt = ys.clone()
    p = float(inv.settings.get("mix", 0.93))
    ms = guider.inner_model.model_sampling
    y0 = load(inv.source) if inv.method == "rf" else None
    eta = float(inv.settings.get("eta", 0.0))
    lo = int(round(float(inv.settings.get("start", 0.0)) * n))
    hi = int(round(float(inv.settings.get("stop", 0.0)) * n))

    snap = (inv.direct or inv.method in ("edict", "ddpm")) and not source_only
    drift = 0.0

    def ev(a, b, s, specs):
        if source_only:
            return [guider.evaluate([a], s, specs[:1], model_options)[0].to(wd), None]
        return [d.to(wd) for d in guider.evaluate([a, b], s, specs, model_options)]

    for i in range(k0, n):
        s, s_next = sig[i], sig[i + 1]
        specs = branch_specs(guider, inv, i)
        if inv.method == "edict":
            dt = s_next - s
            d_s, d_t = ev(ys, yt, s, specs)
            xs_i = xs + (ys - d_s) / s * dt
            xt_i = xt + (yt - d_t) / s * dt if not source_only else None
            d_s, d_t = ev(xs_i, xt_i, s, specs)
            ys_i = ys + (xs_i - d_s) / s * dt
            xs = p * xs_i + (1 - p) * ys_i
            ys = p * ys_i + (1 - p) * xs
            if not source_only:
                yt_i = yt + (xt_i - d_t) / s * dt
                xt = p * xt_i + (1 - p) * yt_i
                yt = p * yt_i + (1 - p) * xt
            den_t = d_t
        else:
            den_s, den_t = ev(xs, xt, s, specs)
            if inv.method == "ddpm":
                r = load(inv.residuals[i])
                xs = ddpm_posterior(ms, xs, den_s, float(s), float(s_next))[0] + r
                if not source_only:
                    xt = ddpm_posterior(ms, xt, den_t, float(s), float(s_next))[0] + r
            else:
                if inv.method == "rf" and eta and lo <= i < hi:
                    den_s = (1 - eta) * den_s + eta * y0
                    if not source_only:
                        den_t = (1 - eta) * den_t + eta * y0
                xs = euler_step(xs, den_s, s, s_next)
                if not source_only:
                    xt = euler_step(xt, den_t, s, s_next)
        if snap:
            # The source branch back onto the stored trajectory: Direct Inversion's correction; for EDICT and
            # DDPM (exact by construction) it only removes the rounding of the batched evaluation.
            stored = load(inv.latents[i + 1])
            drift = max(drift, float((xs - stored).abs().max()))
            xs = stored
            if inv.method == "edict":
                ys = load(inv.pair[i + 1])
        if callback is not None:
            shown = den_t if den_t is not None else xs
            callback(i - k0, shown.float(), (xt if not source_only else xs).float(), total)
    guider.source_drift = drift
    if source_only:
        return xs.float()
    if output == OUTPUTS[1]:
        return torch.cat([xs, xt]).float()
    return xt.float()


def reconstruct(model, inv: EditKitInversion, k0: int | None = None) -> torch.Tensor:
    """Source-branch-only replay (the reconstruction), user-space latent. For tests and metrics."""
    guider = make_edit_guider(model, inv, inv.positive, inv.negative, inv.cfg)
    k = inv.start_index if k0 is None else k0

    def program(g, sigmas, extra_args, callback, noise, latent, disable_pbar):
        return replay(g, inv, k, extra_args["model_options"], source_only=True)
    return guider.run(program, inv.sigmas[k:], inv.batch_shape)
