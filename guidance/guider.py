"""EditKit's guidance composer: a CFGGuider whose guidance is a list of independent, scheduled terms.

x0 = CFG(cond, uncond) at the scheduled scale, reshaped by Perp-Neg / APG, through the model's
own CFG function and post-CFG functions, rescaled, plus the extra-branch terms (PAG, SAG,
AutoGuidance), dynamically thresholded (order and formulas in `terms.py`).

`predict_noise` runs the phases of `protocol.py` (anneal conds -> plan branches -> one batched
call -> per-term directions -> CFG -> post-CFG/branch terms -> thresholding); terms plug in
through their hooks, so a new term never edits this file. The per-run state (momentum, the weak
model's prepared conds, stats) is one `protocol.Run`, created in `inner_sample` and dropped when
the run ends.

Model calls: cond, uncond, the Perp-Neg empty prompt and every PAG branch run in ONE batched
calc_cond_batch call (a PAG branch is the cond chunk with identity self-attention at the chosen
layers; see `layers.py`); a branch whose term has weight 0 at this step is not evaluated, and the
uncond pass is skipped when the effective CFG scale is 1 (e.g. outside a guidance interval) and
no active term needs it. SAG needs a second call (it depends on the first); AutoGuidance one call
of the weak model. With only constant CFG the computation is ComfyUI's sampling_function.
"""
from __future__ import annotations

import comfy.samplers

from . import layers
from .protocol import Call, Run


class GuidanceGuider(comfy.samplers.CFGGuider):
    """GUIDER for SamplerCustomAdvanced composing `terms` (a tuple of guidance.terms.Term).

    `sites`: {term index: what that term's `resolve(model)` returned} (PAG/SAG: their layers);
    `nodes.guidance.resolve_sites` builds it and reports bad terms on the node.
    """

    def __init__(self, model_patcher, guidance_terms=(), sites=None):
        self.terms = tuple(guidance_terms)
        self.sites = dict(sites or {})
        extra: dict = {}
        for t in self.terms:
            for key, models in t.additional_models().items():
                extra.setdefault(key, []).extend(models)
        if extra:
            model_patcher = model_patcher.clone()
            for key, models in extra.items():
                model_patcher.set_additional_models(key, models)
        super().__init__(model_patcher)
        self.stats: list[dict] = []     # one dict per model call of the latest run
        self._run = None                # the Run in progress (None between runs)

    # -- conds ---------------------------------------------------------------------------------
    def set_conds(self, positive, negative):
        conds = {"positive": positive, "negative": negative}
        for t in self.terms:
            conds.update(t.extra_conds())
        self.inner_set_conds(conds)

    # -- run lifecycle: the per-run state exists only inside inner_sample -----------------------
    def inner_sample(self, noise, latent_image, device, sampler, sigmas, denoise_mask, callback, disable_pbar, seed, *args, **kwargs):
        outer, run = self._run, Run(noise, latent_image, device, sigmas, denoise_mask, seed)
        self._run, self.stats = run, run.stats
        try:
            for i, t in enumerate(self.terms):
                run.state[i] = t.start(self, run, i)
            return super().inner_sample(noise, latent_image, device, sampler, sigmas, denoise_mask, callback, disable_pbar, seed, *args, **kwargs)
        finally:
            self._run = outer

    # -- one model call, phase by phase ------------------------------------------------------------
    def predict_noise(self, x, timestep, model_options={}, seed=None):
        if self._run is None:
            raise RuntimeError("GuidanceGuider.predict_noise outside a sampling run: sample through guider.sample()")
        self._run.observe(float(timestep.flatten()[0]))
        call = Call(self, self._run, x, timestep, model_options, seed)
        for i, t, w in call.active:
            t.anneal(call, i, w)
        self._plan(call)
        self._evaluate(call)
        for i, t, w in call.active:
            t.direction(call, i, w)
        guided = comfy.samplers.cfg_function(self.inner_model, call.cond_mod, call.base, call.cfg, x, timestep,
                                             model_options=model_options, cond=call.pos, uncond=call.base_cond)
        for i, t, w in call.active:
            guided = t.post_cfg(call, i, w, guided)
        for i, t, w in call.active:
            guided = t.threshold(call, i, w, guided)
        self._run.stats.append(call.summary())
        return guided

    def _plan(self, call: Call) -> None:
        """Branches of the batched call: cond, uncond (None when skipped), then the terms' own."""
        call.add_branch("cond", call.pos)
        call.add_branch("uncond", call.neg if call.need_uncond else None)
        for i, t, w in call.active:
            t.plan(call, i, w)

    def _evaluate(self, call: Call) -> None:
        """The one batched model call (with the planned layer actions), then the model's pre-CFG functions."""
        x, timestep, model_options = call.x, call.sigma, call.model_options
        mo = model_options
        if call.per_site:
            mo, call.layer_plan = layers.install(model_options, self.model_patcher, call.per_site, tuple(x.shape[-2:]))
        if "sampler_calc_cond_batch_function" in mo:
            out = mo["sampler_calc_cond_batch_function"]({"conds": call.conds, "input": x, "sigma": timestep,
                                                          "model": self.inner_model, "model_options": mo})
        else:
            out = comfy.samplers.calc_cond_batch(self.inner_model, call.conds, x, timestep, mo)
        for fn in model_options.get("sampler_pre_cfg_function", []):
            out = fn({"conds": call.conds, "conds_out": out, "cond_scale": call.cfg, "timestep": timestep, "input": x,
                      "sigma": timestep, "model": self.inner_model, "model_options": model_options})
        call.out = out
        call.cond = out[0]
        call.uncond = out[1] if call.need_uncond else call.cond
        call.cond_mod, call.base = call.cond, call.uncond
        call.base_cond = call.neg if call.need_uncond else None
