"""Helpers of the inversion tests (no tests here): an analytic denoiser with known behaviour, latents, errors.

Random-weight tiny UNets are not smooth denoisers (the EPS one in particular amplifies input changes by
orders of magnitude at high noise, and none of them lets the text context move its prediction much), so
the approximate-inversion properties (DDIM error falls with steps and fixed-point iterations, NTI beats
DDIM at cfg 7.5) are asserted on `analytic_model`: a tiny model clone whose forward pass is replaced by the
exact posterior-mean denoiser of Gaussian data whose mean depends on the text context through fixed
"attention maps". It is smooth, prompt-dependent and exactly known, in the sampler space of each
parameterization (EPS / v-prediction: x = x0 + sigma * eps; flow: x = (1 - sigma) x0 + sigma * eps).
"""
import torch

from editkit.core import denoiser as D
from editkit.core.patches import SharedPatch


class AnalyticDenoiser(SharedPatch):
    """x0 = mu(c) + a(sigma) (x_ve - mu(c)): Gaussian data N(mu(c), s_data^2) per pixel, where
    mu(c)[ch, pixel] = sum_t maps[t, pixel] * (A c_t)[ch] for the context tokens c_t."""

    def __init__(self, flow: bool, channels=4, dim=32, tokens=77, hw=(8, 8), s_data=1.0, seed=0, maps_scale=1.0):
        g = torch.Generator().manual_seed(seed)
        self.flow = flow
        self.s2 = s_data ** 2
        with torch.inference_mode(False):   # ordinary tensors: null-text inversion differentiates through them
            self.A = torch.randn(channels, dim, generator=g) / dim ** 0.5
            self.maps = torch.randn(tokens, hw[0] * hw[1], generator=g) * maps_scale / tokens ** 0.5
        self.hw = hw

    def mean(self, ctx):
        b, t, _ = ctx.shape
        proj = ctx.float() @ self.A.T.to(ctx.device)                 # (B, T, C)
        mu = torch.einsum("btc,tp->bcp", proj, self.maps[:t].to(ctx.device))
        return mu.reshape(b, -1, *self.hw)

    def __call__(self, apply_model, args):
        x, sigma, c = args["input"], args["timestep"], args["c"]
        s = sigma.to(x.dtype).view(-1, 1, 1, 1)
        mu = self.mean(c["c_crossattn"]).to(x.dtype)
        if self.flow:
            ve = s / (1 - s).clamp(min=1e-12)
            x_ve = x / (1 - s).clamp(min=1e-12)
            a = torch.where(s >= 1, torch.zeros_like(s), self.s2 / (self.s2 + ve * ve))
            return mu + a * torch.where(s >= 1, torch.zeros_like(x), x_ve - mu)
        a = self.s2 / (self.s2 + s * s)
        return mu + a * (x - mu)


def analytic_model(tiny_model, **kw):
    """A clone of a tiny model (any parameterization) whose prediction is AnalyticDenoiser's."""
    m = tiny_model.clone()
    flow = D.space(m.get_model_object("model_sampling")) == "flow"
    m.set_model_unet_function_wrapper(AnalyticDenoiser(flow, **kw))
    return m


def latent(seed=0, channels=4, hw=8, batch=1, scale=1.0):
    return torch.randn(batch, channels, hw, hw, generator=torch.Generator().manual_seed(seed)) * scale


def sampler_space_error(model, a, b):
    """Max abs difference of two user-space latents in the model's sampler space."""
    pin = model.model.process_latent_in
    return float((pin(a.float()) - pin(b.float())).abs().max())


def node_out(result):
    return result.result if hasattr(result, "result") else result


def edit(model, inv, positive, negative=None, cfg=1.0, output="source + target", sigmas_tail=None, latent_override=None):
    """EditKitInversionSampler -> SamplerCustomAdvanced, as a graph wires them; returns (output latent, guider)."""
    from comfy_extras.nodes_custom_sampler import SamplerCustomAdvanced
    from editkit.nodes.inversion import InversionSampler
    noise, guider, sampler, sigmas, lat = node_out(InversionSampler.execute(model, inv, positive, cfg, output, negative=negative))
    if sigmas_tail is not None:
        sigmas = sigmas[-(sigmas_tail + 1):]
    if latent_override is not None:
        lat = latent_override
    out = node_out(SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, lat))[0]["samples"]
    return out, guider
