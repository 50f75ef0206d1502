"""StyleAligned: shared self-attention with a reference (Hertz et al. 2024) on the attention controller.

In the chosen self-attention layers and steps, every target row attends to its own keys/values and
to the reference row's (the source: batch row 0 in a generated batch, or the source branch, e.g. an
inverted reference image): keys [AdaIN(k_t, k_ref), k_ref], values [v_t, v_ref], queries
AdaIN(q_t, q_ref) (AdaIN: per-channel mean/std over tokens from the reference). An optional logit
shift on the reference keys strengthens the reference (the reference code's shared_score_shift).
The reference rows themselves are left untouched (reconstructed exactly).

Shared group norm (optional): every GroupNorm of the UNet normalises a target row with the
statistics of the target and the reference together. It is installed as per-clone object patches
(copies of the GroupNorm modules sharing their parameters), never by changing ComfyUI's modules.
Sharing LayerNorm is not offered: LayerNorm normalises each token on its own, so concatenating the
reference's tokens (as the reference code does) changes nothing.

DiTs (SD3, Flux): the same in the joint attention of the chosen blocks, on the image tokens:
target image queries/keys AdaIN'd to the reference's image tokens, the reference's image keys and
values appended to the target's.
"""
from __future__ import annotations

import copy
import threading

import torch

from ..core.patches import SharedPatch
from ..core.branches import pairs_of
from .controller import Call, Rows, Technique, adain, attend, attend_dit, step_of


class StyleAligned(Technique):
    name = "style_aligned"
    uses_dit = True

    def __init__(self, adain_queries: bool, adain_keys: bool, adain_values: bool, start_layer: int, end_layer: int,
                 start: float, end: float, shift: float = 0.0, share_group_norm: bool = False):
        super().__init__()
        self.aq, self.ak, self.av = adain_queries, adain_keys, adain_values
        self.start_layer, self.end_layer = start_layer, end_layer
        self.start, self.end = start, end
        self.shift = shift
        self.share_group_norm = share_group_norm
        self.applied: dict = {}
        self.local = threading.local()

    def begin_run(self):
        super().begin_run()
        with self.lock:
            self.applied = {}

    def _layer_ok(self, layer: int) -> bool:
        return layer >= self.start_layer and (self.end_layer < 0 or layer <= self.end_layer)

    def attn1_sites(self, layout):
        return [s for s in layout.sites if self._layer_ok(s.order)]

    def wants_dit_call(self, call: Call) -> bool:
        return self._layer_ok(call.layer) and call.in_window(self.start, self.end)

    def _bias(self, n_own: int, n_ref: int, like: torch.Tensor):
        if not self.shift:
            return None
        b = torch.zeros(1, n_own + n_ref, device=like.device, dtype=like.dtype)
        b[:, n_own:] = self.shift
        return b

    def attention(self, call: Call, q, k, v):
        if call.kind == "cross" or not self._layer_ok(call.layer) or not call.in_window(self.start, self.end):
            return None
        pairs = [p for c in call.chunks for p in c.pairs]
        if not pairs:
            return None
        t, s = [p[0] for p in pairs], [p[1] for p in pairs]
        with self.lock:
            self.applied.setdefault(call.layer, set()).add(call.step)
        if call.is_dit:
            return self._dit(call, q, k, v, t, s)
        qt, kt, vt = q[t], k[t], v[t]
        qr, kr, vr = q[s], k[s], v[s]
        if self.aq:
            qt = adain(qt, qr)
        if self.ak:
            kt = adain(kt, kr)
        if self.av:
            vt = adain(vt, vr)
        keys, vals = torch.cat([kt, kr], 1), torch.cat([vt, vr], 1)
        return Rows(t, attend(qt, keys, vals, call.extra, self._bias(kt.shape[1], kr.shape[1], q)))

    def _dit(self, call: Call, q, k, v, t, s):
        img = call.img_slice()
        qt, kt, vt = q[t].clone(), k[t].clone(), v[t].clone()
        qr, kr, vr = q[s][:, :, img], k[s][:, :, img], v[s][:, :, img]
        if self.aq:
            qt[:, :, img] = adain(qt[:, :, img], qr)
        if self.ak:
            kt[:, :, img] = adain(kt[:, :, img], kr)
        if self.av:
            vt[:, :, img] = adain(vt[:, :, img], vr)
        keys, vals = torch.cat([kt, kr], 2), torch.cat([vt, vr], 2)
        return Rows(t, attend_dit(call, qt, keys, vals, self._bias(kt.shape[2], kr.shape[2], q)))

    # --- shared group norm ------------------------------------------------------------------------
    def set_rows(self, pairs):
        self.local.pairs = pairs

    def rows(self):
        return getattr(self.local, "pairs", None)


def _group_norm_forward(tech: StyleAligned, module, orig_forward):
    def forward(x):
        out = orig_forward(x)
        pairs = tech.rows()
        if not pairs or x.ndim < 3:
            return out
        t, s = [p[0] for p in pairs], [p[1] for p in pairs]
        g = module.num_groups
        xs = x.float().reshape(x.shape[0], g, -1)
        mean = xs.mean(-1, keepdim=True)
        sq = (xs * xs).mean(-1, keepdim=True)
        m = (mean[t] + mean[s]) / 2
        var = ((sq[t] + sq[s]) / 2 - m * m).clamp_min(0)
        y = ((xs[t] - m) / torch.sqrt(var + module.eps)).reshape((len(t),) + tuple(x.shape[1:]))
        if module.affine and module.weight is not None:
            shape = (1, -1) + (1,) * (x.ndim - 2)
            y = y * module.weight.to(device=y.device, dtype=y.dtype).reshape(shape) + \
                module.bias.to(device=y.device, dtype=y.dtype).reshape(shape)
        out = out.clone()
        out[t] = y.to(out.dtype)
        return out
    return forward


class _RowsWrapper(SharedPatch):
    """APPLY_MODEL wrapper: tells the shared group norms which rows are targets for this forward."""

    def __init__(self, tech: StyleAligned):
        self.tech = tech

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
        to = transformer_options or {}
        _, _, p = step_of(to)
        pairs = None
        if self.tech.start <= p < self.tech.end or (self.tech.end >= 1.0 and p >= self.tech.start):
            pairs = pairs_of(to, x.shape[0]) or None
        self.tech.set_rows(pairs)
        try:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        finally:
            self.tech.set_rows(None)


def install_shared_group_norm(m, tech: StyleAligned) -> int:
    """Object-patch every GroupNorm of a UNet clone with a row-sharing copy; returns how many."""
    import comfy.patcher_extension as pe
    from ..core.patches import add_wrapper
    dm = m.get_model_object("diffusion_model")
    n = 0
    for name, mod in list(dm.named_modules()):
        if isinstance(mod, torch.nn.GroupNorm):
            key = f"diffusion_model.{name}"
            cur = m.get_model_object(key)
            new = copy.copy(cur)                     # shares the parameters (same Parameter objects)
            new.forward = _group_norm_forward(tech, new, type(cur).forward.__get__(new))
            m.add_object_patch(key, new)
            n += 1
    add_wrapper(m, pe.WrappersMP.APPLY_MODEL, f"style_aligned.rows.{id(tech)}", _RowsWrapper(tech))
    return n
