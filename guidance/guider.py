"""EditKit's guidance composer: a CFGGuider whose guidance is a list of independent, scheduled terms.

x0 = CFG(cond, uncond) at the scheduled scale, reshaped by Perp-Neg / APG, through the model's
own CFG function and post-CFG functions, rescaled, plus the extra-branch terms (PAG, SAG,
AutoGuidance), dynamically thresholded (order and formulas in `terms.py`).

Model calls: cond, uncond, the Perp-Neg empty prompt and every PAG branch run in ONE batched
calc_cond_batch call (a PAG branch is the cond chunk with identity self-attention at the chosen
layers; see `layers.py`); a branch whose term has weight 0 at this step is not evaluated, and the
uncond pass is skipped when the effective CFG scale is 1 (e.g. outside a guidance interval) and
no active term needs it. SAG needs a second call (it depends on the first); AutoGuidance one call
of the weak model. With only constant CFG the computation is ComfyUI's sampling_function.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import comfy.model_patcher
import comfy.samplers

from ..core import denoiser
from . import layers, terms as T
from .schedules import fractional_index, step_info


def gaussian_blur(img: torch.Tensor, sigma: float, kernel_size: int = 9) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding, per channel (SAG's degradation)."""
    half = (kernel_size - 1) * 0.5
    xs = torch.linspace(-half, half, steps=kernel_size)
    pdf = torch.exp(-0.5 * (xs / sigma).pow(2))
    k1 = (pdf / pdf.sum()).to(device=img.device, dtype=img.dtype)
    k2 = torch.mm(k1[:, None], k1[None, :]).expand(img.shape[-3], 1, kernel_size, kernel_size)
    pad = kernel_size // 2
    return F.conv2d(F.pad(img, [pad, pad, pad, pad], mode="reflect"), k2, groups=img.shape[-3])


def sag_mask(maps: list[torch.Tensor], latent_hw: tuple[int, int], threshold: float = 1.0) -> torch.Tensor:
    """Salient-region mask (B, 1, H, W): attention received above the mean, averaged over the chosen layers."""
    up = [F.interpolate(m.unsqueeze(1).float(), latent_hw) for m in maps]
    return (torch.stack(up).mean(0) > threshold).float()


def _anneal_conds(conds, fn):
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


class GuidanceGuider(comfy.samplers.CFGGuider):
    """GUIDER for SamplerCustomAdvanced composing `terms` (a tuple of guidance.terms.Term)."""

    def __init__(self, model_patcher, guidance_terms=(), sites=None):
        self.terms = tuple(guidance_terms)
        self.sites = dict(sites or {})              # term index -> tuple of layers.Site
        weak = [t.weak_model for t in self.terms if t.kind == "autoguidance"]
        if weak:
            model_patcher = model_patcher.clone()
            model_patcher.set_additional_models("editkit.autoguidance", weak)
        super().__init__(model_patcher)
        self.stats: list[dict] = []
        self._reset()

    def _reset(self):
        self._apg_running = None
        self._prev_sigma = None
        self._weak = {}
        self.stats = []

    # -- conds ---------------------------------------------------------------------------------
    def set_conds(self, positive, negative):
        conds = {"positive": positive, "negative": negative}
        for t in self.terms:
            if t.kind == "perpneg":
                import node_helpers
                conds["empty_negative_prompt"] = node_helpers.conditioning_set_values(t.empty, {"prompt_type": "negative"})
        self.inner_set_conds(conds)

    # -- run lifecycle -------------------------------------------------------------------------
    def sample(self, *args, **kwargs):
        self._reset()  # APG momentum and stats belong to one sampling run
        return super().sample(*args, **kwargs)

    def inner_sample(self, noise, latent_image, device, sampler, sigmas, denoise_mask, callback, disable_pbar, seed, *args, **kwargs):
        for i, t in enumerate(self.terms):
            if t.kind != "autoguidance":
                continue
            weak = t.weak_model
            li = latent_image
            if li is not None and torch.count_nonzero(li) > 0:
                li = weak.model.process_latent_in(li)
            conds = {"positive": [c.copy() for c in self.original_conds["positive"]]}
            conds = comfy.samplers.process_conds(weak.model, noise, conds, device, li, denoise_mask, seed)
            mo = comfy.model_patcher.create_model_options_clone(weak.model_options)
            comfy.sampler_helpers.prepare_model_patcher(weak, conds, mo)
            mo.setdefault("transformer_options", {})["sample_sigmas"] = sigmas
            weak.pre_run()
            self._weak[i] = (weak, conds["positive"], mo)
        return super().inner_sample(noise, latent_image, device, sampler, sigmas, denoise_mask, callback, disable_pbar, seed, *args, **kwargs)

    # -- one model call ------------------------------------------------------------------------
    def predict_noise(self, x, timestep, model_options={}, seed=None):
        to = model_options.get("transformer_options", {})
        sample_sigmas = to.get("sample_sigmas")
        info = step_info(sample_sigmas, timestep)
        wts = [t.schedule.weight(info) for t in self.terms]
        kinds = [t.kind for t in self.terms]

        def active(kind):
            return [(i, self.terms[i], wts[i]) for i in range(len(self.terms)) if kinds[i] == kind and wts[i] != 0]

        s_cfg = 1.0
        for i, k in enumerate(kinds):
            if k == "cfg":
                s_cfg *= wts[i]
        w = T.cfg_scale(self.cfg, s_cfg)
        perp = active("perpneg")
        need_uncond = (not math.isclose(w, 1.0)) or bool(model_options.get("disable_cfg1_optimization", False)) or bool(perp)

        pos = self.conds.get("positive")
        neg = self.conds.get("negative")
        for i, t, wt in active("cads"):
            gamma = T.cads_gamma(1.0 - info.progress, t.tau1, t.tau2)
            step = int(round(fractional_index(sample_sigmas, info.sigma) * 100)) if sample_sigmas is not None else 0
            base_seed = (int(seed or 0) * 1000003 + t.seed * 7919 + step) % (2 ** 63)

            def anneal(y, j, gamma=gamma, t=t, wt=wt, base_seed=base_seed):
                g = torch.Generator().manual_seed(base_seed + 31 * j)
                n = torch.randn(y.shape, generator=g, dtype=torch.float32).to(y.device)
                return T.cads_anneal(y, gamma, t.noise_scale * wt, t.psi, n)
            pos = _anneal_conds(pos, anneal)
            if t.noise_negative and neg is not None:
                neg = _anneal_conds(neg, lambda y, j, f=anneal: f(y, j + 1000))

        uncond_ = neg if need_uncond else None
        conds = [pos, uncond_]
        branch = ["cond", "uncond" if need_uncond else None]
        e_idx = None
        if perp:
            conds.append(self.conds.get("empty_negative_prompt"))
            branch.append("empty")
            e_idx = len(conds) - 1
        pag_idx = {}
        for i, t, wt in active("pag"):
            conds.append(pos)
            branch.append(f"pag{i}")
            pag_idx[i] = len(conds) - 1
        sag = active("sag")
        per_site: dict = {}
        for i, idx in pag_idx.items():
            for site in self.sites.get(i, ()):
                per_site.setdefault(site, {})[idx] = layers.Perturb.IDENTITY
        sag_branch = 1 if need_uncond else 0
        for i, t, wt in sag:
            for site in self.sites.get(i, ()):
                per_site.setdefault(site, {}).setdefault(sag_branch, layers.Perturb.RECORD)

        mo, plan = model_options, None
        if per_site:
            mo, plan = layers.install(model_options, self.model_patcher, per_site, tuple(x.shape[-2:]))

        if "sampler_calc_cond_batch_function" in mo:
            out = mo["sampler_calc_cond_batch_function"]({"conds": conds, "input": x, "sigma": timestep,
                                                          "model": self.inner_model, "model_options": mo})
        else:
            out = comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, mo)
        for fn in model_options.get("sampler_pre_cfg_function", []):
            out = fn({"conds": conds, "conds_out": out, "cond_scale": w, "timestep": timestep, "input": x,
                      "sigma": timestep, "model": self.inner_model, "model_options": model_options})

        c = out[0]
        u = out[1] if need_uncond else c
        base, c_mod, base_cond = u, c, uncond_
        for i, t, wt in perp:
            e = out[e_idx]
            base, base_cond = e, self.conds.get("empty_negative_prompt")
            c_mod = c - (wt * t.neg_scale) * T.perp_component(u - e, c - e)
        sigma0 = float(timestep.flatten()[0])
        if self._prev_sigma is not None and sigma0 > self._prev_sigma:
            self._apg_running = None   # a new run with the same guider (ComfyUI's APG does the same)
        self._prev_sigma = sigma0
        for i, t, wt in active("apg"):
            if need_uncond and not math.isclose(w, 1.0) and w != 0:
                delta = c_mod - base
                direction, self._apg_running = T.apg_direction(c_mod, base, t.eta, t.norm_threshold, t.momentum, self._apg_running)
                if wt != 1.0:
                    direction = delta + wt * (direction - delta)
                target = c_mod + (w - 1.0) * direction
                c_mod = T.cond_for_scale(c_mod, base, w, target)

        guided = comfy.samplers.cfg_function(self.inner_model, c_mod, base, w, x, timestep,
                                             model_options=model_options, cond=pos, uncond=base_cond)

        flow = denoiser.space(self.inner_model.model_sampling) == "flow"
        for i, t, wt in active("rescale"):
            guided = T.rescale(x, timestep, guided, c, t.phi * wt, flow)

        for i, idx in pag_idx.items():
            t, wt = self.terms[i], wts[i]
            guided = guided + (t.scale * wt) * (c - out[idx])

        extra_calls = 0
        for i, t, wt in sag:
            src, src_cond = (u, neg) if need_uncond else (c, pos)
            maps = [plan.maps[(s, sag_branch)] for s in self.sites.get(i, ()) if plan and (s, sag_branch) in plan.maps]
            if not maps or min(x.shape[-2:]) <= 4:
                continue
            mask = sag_mask(maps, tuple(x.shape[-2:])).to(src.dtype)
            degraded = gaussian_blur(src, t.blur_sigma) * mask + src * (1 - mask)
            if flow:
                ms = self.inner_model.model_sampling
                noised = denoiser.add_noise(ms, degraded, denoiser.to_eps(ms, x, src, timestep), timestep)
            else:
                noised = degraded + x - src
            (sag_pred,) = comfy.samplers.calc_cond_batch(self.inner_model, [src_cond], noised, timestep, model_options)
            extra_calls += 1
            guided = guided + (t.scale * wt) * (degraded - sag_pred)

        for i, t, wt in active("autoguidance"):
            weak, wconds, wmo = self._weak[i]
            (weak_pred,) = comfy.samplers.calc_cond_batch(weak.model, [wconds], x, timestep, wmo)
            extra_calls += 1
            guided = guided + (t.scale * wt) * (c - weak_pred)

        for i, t, wt in active("dynthresh"):
            mimic = base + t.mimic_scale * (c - base)
            thr = T.dynamic_threshold(guided, mimic, t.percentile)
            guided = thr if wt == 1.0 else guided + wt * (thr - guided)

        self.stats.append({"sigma": info.sigma, "progress": info.progress, "cfg": w,
                           "branches": [b for b, cc in zip(branch, conds) if cc is not None],
                           "extra_calls": extra_calls,
                           "sites": [(s.name, a, b) for s, a, b in (plan.sites_hit if plan else [])]})
        return guided
