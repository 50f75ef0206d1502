"""Reference attention: a reference's self-attention keys/values added to the generated image's
(FABRIC, Visual Style Prompting, reference-only style) on the attention controller.

In the chosen self-attention layers and steps a row attends to [its own keys, the reference's
keys] with values [its own, the reference's]; `weight` multiplies the attention paid to the
reference (a logit bias log(weight) on the reference keys, computed exactly inside ComfyUI's
attention: weight 1 = the reference's tokens count like the image's own).

Where the reference comes from:
* batch (default): the source row of each chunk (row 0 of a generated batch, or the source branch
  of an EditKit inversion sampler, e.g. an inverted real image); the source rows are unchanged;
* a reference LATENT: before each model call, the reference is noised to the current sigma (fixed
  noise per run) and run through the model once (batch 1, the unconditional row's conditioning)
  while its keys/values are recorded; then every row of the real batch attends to them (FABRIC).

`cond_only` restricts the effect to the conditional chunk (FABRIC's positive feedback).
DiTs (SD3, Flux): the same on the image tokens of the joint attention.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..core import denoiser
from ..core.patches import SharedPatch
from .controller import Call, Rows, Technique, attend, attend_dit

_RECORD_KEY = "editkit_reference_record"
_KV_KEY = "editkit_reference_kv"


class ReferenceAttention(Technique):
    name = "reference_attention"
    uses_dit = True

    def __init__(self, weight: float, start: float, end: float, start_layer: int, end_layer: int,
                 cond_only: bool = False, latent: Optional[torch.Tensor] = None, seed: int = 0):
        super().__init__()
        self.weight, self.start, self.end = weight, start, end
        self.start_layer, self.end_layer = start_layer, end_layer
        self.cond_only = cond_only
        self.latent, self.seed = latent, seed
        self.applied: dict = {}
        self.ref_passes = 0
        self._noise = None

    def begin_run(self):
        super().begin_run()
        with self.lock:
            self.applied = {}
            self.ref_passes = 0
            self._noise = None

    def _layer_ok(self, layer: int) -> bool:
        return layer >= self.start_layer and (self.end_layer < 0 or layer <= self.end_layer)

    def attn1_sites(self, layout):
        return [s for s in layout.sites if self._layer_ok(s.order)]

    def wants_dit_call(self, call: Call) -> bool:
        return self._layer_ok(call.layer) and (id(self) in (call.extra.get(_RECORD_KEY) or {}) or call.in_window(self.start, self.end))

    def _bias(self, n_own, n_ref, like):
        if self.weight == 1.0:
            return None
        b = torch.zeros(1, n_own + n_ref, device=like.device, dtype=like.dtype)
        b[:, n_own:] = math.log(self.weight)
        return b

    def attention(self, call: Call, q, k, v):
        if call.kind == "cross" or not self._layer_ok(call.layer):
            return None
        rec = (call.extra.get(_RECORD_KEY) or {}).get(id(self))
        if rec is not None:                       # the reference pass: remember its keys/values
            if call.is_dit:
                img = call.img_slice()
                rec[call.layer] = (k[:, :, img].clone(), v[:, :, img].clone())
            else:
                rec[call.layer] = (k.clone(), v.clone())
            return None
        if self.weight <= 0 or not call.in_window(self.start, self.end):
            return None
        if self.latent is not None:
            stored = (call.extra.get(_KV_KEY) or {}).get(id(self), {}).get(call.layer)
            if stored is None:
                return None
            rows = [r for c in call.chunks if c.cond or not self.cond_only for r in range(c.start, c.start + c.size)]
            refs = [(r, None) for r in rows]
        else:
            refs = [(t, s) for c in call.chunks if c.cond or not self.cond_only for t, s, _ in c.pairs]
            stored = None
        if not refs:
            return None
        rows = [r for r, _ in refs]
        with self.lock:
            self.applied.setdefault(call.layer, set()).add(call.step)
        if call.is_dit:
            img = call.img_slice()
            if stored is not None:
                kr = stored[0].expand(len(rows), -1, -1, -1).to(k.dtype)
                vr = stored[1].expand(len(rows), -1, -1, -1).to(v.dtype)
            else:
                src = [s for _, s in refs]
                kr, vr = k[src][:, :, img], v[src][:, :, img]
            keys, vals = torch.cat([k[rows], kr], 2), torch.cat([v[rows], vr], 2)
            return Rows(rows, attend_dit(call, q[rows], keys, vals, self._bias(k.shape[2], kr.shape[2], q)))
        if stored is not None:
            kr = stored[0][:1].expand(len(rows), -1, -1).to(k.dtype)
            vr = stored[1][:1].expand(len(rows), -1, -1).to(v.dtype)
        else:
            src = [s for _, s in refs]
            kr, vr = k[src], v[src]
        keys, vals = torch.cat([k[rows], kr], 1), torch.cat([v[rows], vr], 1)
        return Rows(rows, attend(q[rows], keys, vals, call.extra, self._bias(k.shape[1], kr.shape[1], q)))

    # --- reference-latent pass --------------------------------------------------------------------
    def noise_for(self, shape, device, dtype):
        with self.lock:
            if self._noise is None or tuple(self._noise.shape) != tuple(shape):
                g = torch.Generator().manual_seed(self.seed)
                self._noise = torch.randn(shape, generator=g)
            return self._noise.to(device=device, dtype=dtype)


class ReferencePass(SharedPatch):
    """APPLY_MODEL wrapper: run the noised reference latent first and record its keys/values."""

    def __init__(self, tech: ReferenceAttention):
        self.tech = tech

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
        tech = self.tech
        to = transformer_options if transformer_options is not None else {}
        sched, sig = to.get("sample_sigmas"), t
        if tech.latent is None or tech.weight <= 0:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        p = denoiser.progress(sched, sig) if sched is not None else 0.0
        if not (tech.start <= p < tech.end or (tech.end >= 1.0 and p >= tech.start)):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        base = executor.class_obj
        ms = base.model_sampling
        ref = base.process_latent_in(tech.latent.to(device=x.device, dtype=x.dtype))
        if ref.shape[1] != x.shape[1]:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        ref = ref[:1]
        noise = tech.noise_for(ref.shape, x.device, x.dtype)
        xr = denoiser.add_noise(ms, ref, noise, t[:1])
        cou = list(to.get("cond_or_uncond") or [0])
        b = x.shape[0]
        chunk = b // max(len(cou), 1)
        i0 = cou.index(1) * chunk if 1 in cou else 0
        pick = lambda a: a[i0:i0 + 1] if torch.is_tensor(a) and a.ndim > 0 and a.shape[0] == b else a
        rec: dict = {}
        to_ref = dict(to)
        to_ref["cond_or_uncond"] = [cou[i0 // chunk] if cou else 0]
        to_ref[_RECORD_KEY] = {id(tech): rec}
        to_ref.pop(_KV_KEY, None)
        kw = {k2: pick(v2) for k2, v2 in kwargs.items()}
        executor(xr, t[:1], pick(c_concat), pick(c_crossattn), None, to_ref, **kw)
        with tech.lock:
            tech.ref_passes += 1
        kv = dict(to.get(_KV_KEY) or {})
        kv[id(tech)] = rec
        to[_KV_KEY] = kv
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
