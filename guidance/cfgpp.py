"""CFG++ samplers (Chung et al. 2024): step with the guided x0, renoise with the unconditional prediction.

Written once for every parameterization through the half-log-SNR form: with alpha = 1 ("ve"
models) or 1 - sigma (flow models),
  Euler CFG++:    x' = alpha' D + sigma' eps_u,  eps_u = (x - alpha D_u) / sigma
  DPM++(2M) CFG++: x' = alpha' D + (sigma'/sigma)(x - alpha D_u) - alpha' expm1(-h) (D - D_u,prev) / (2r)
where D is the guided prediction, D_u the unconditional one, h = lambda' - lambda,
lambda = log(alpha/sigma), r = h_prev / h. For "ve" models these are ComfyUI's euler_cfg_pp and
dpmpp_2m_cfg_pp. The unconditional prediction is read through a post-CFG function, so the
samplers work with CFGGuider and EditKitGuider alike; on a step without an unconditional pass
(cfg 1, or outside a guidance interval) the conditional prediction stands in, which makes the
step a plain Euler / DPM++(2M) step.
"""
from __future__ import annotations

import math

import torch

SOLVERS = ["euler", "dpmpp_2m"]


def _alpha(flow: bool, sigma: float) -> float:
    return 1.0 - sigma if flow else 1.0


def _lambda(flow: bool, sigma: float) -> float:
    a = _alpha(flow, sigma)
    if sigma <= 0:
        return math.inf
    if a <= 0:
        return -math.inf
    return math.log(a) - math.log(sigma)


@torch.no_grad()
def sample_cfg_pp(model, x, sigmas, extra_args=None, callback=None, disable=None, solver="euler"):
    import comfy.model_patcher
    from tqdm.auto import trange   # newer ComfyUI's k-diffusion module no longer guarantees its own trange

    from ..core import denoiser
    extra_args = dict(extra_args or {})
    ms = model.inner_model.model_patcher.get_model_object("model_sampling")
    flow = denoiser.space(ms) == "flow"
    captured = {}

    def post_cfg(args):
        uncond = args.get("uncond_denoised")
        captured["uncond"] = uncond if (args.get("uncond") is not None and uncond is not None) else args["cond_denoised"]
        return args["denoised"]

    mo = dict(extra_args.get("model_options", {}))
    extra_args["model_options"] = comfy.model_patcher.set_model_options_post_cfg_function(mo, post_cfg)
    s_in = x.new_ones([x.shape[0]])
    old_u = None
    for i in trange(len(sigmas) - 1, disable=disable):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        captured.clear()
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        u = captured.get("uncond", denoised)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if s_next == 0:
            x = denoised
            old_u = u
            continue
        a, a_next = _alpha(flow, s), _alpha(flow, s_next)
        x_new = a_next * denoised + (s_next / s) * (x - a * u)
        if solver == "dpmpp_2m" and old_u is not None and i > 0:
            lam, lam_next, lam_prev = _lambda(flow, s), _lambda(flow, s_next), _lambda(flow, float(sigmas[i - 1]))
            h, h_last = lam_next - lam, lam - lam_prev
            if all(math.isfinite(v) for v in (h, h_last)) and h != 0 and h_last != 0:
                r = h_last / h
                x_new = x_new - a_next * math.expm1(-h) * (1.0 / (2.0 * r)) * (denoised - old_u)
        x = x_new
        old_u = u
    return x


def sampler(solver: str):
    import comfy.samplers
    if solver not in SOLVERS:
        raise ValueError(f"unknown CFG++ solver {solver!r}; use one of {SOLVERS}")
    return comfy.samplers.KSAMPLER(sample_cfg_pp, extra_options={"solver": solver})
