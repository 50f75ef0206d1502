"""Prompt-to-Prompt (Hertz et al. 2022) on the attention controller.

Target cross-attention maps are edited from the source branch's maps, per target row:
    P_t' = P_s G + P_t diag(d)      (G: word swap / refinement mapper, d = 1 - alpha for refinement)
    P_t' = P_t' diag(w)             (re-weighting)
inside the cross-attention window (default the first 80% of steps); outside it only the
re-weighting applies, to the target's own maps. Because out = P' v, every term is ComfyUI's own
attention with modified queries/keys/values: P_s G v_t = attention(q_s, k_s, G v_t),
P_t diag(w) v_t = attention(q_t, k_t, w * v_t). No probability matrix is materialised for the
output. Self-attention replacement (default the first 40%) gives the target the source's self-
attention maps on every level but the finest: attention(q_s, k_s, v_t).

Local blend (P2P): the maps of the blend words (source words in the source row, target words in
the target row) are accumulated at the blend level; mask = threshold(normalised max-pooled maps of
source OR target); outside it the target's prediction is the source's at every step (post-CFG) and
the final latent is blended exactly once more with the last mask.

Like the reference implementation, edits apply to the conditional branch only.

DiTs (SD3, Flux): a joint softmax over [text, image] keys is m_txt * (its distribution restricted
to the text keys) + m_img * (restricted to the image keys). On the image queries, the target's
restricted text distribution is replaced by the source's (aligned, re-weighted) inside the cross
window, and its restricted image distribution by the source's inside the self window, each with the
target's own mass:
    out_t = A_t + m_txt * (attention(q_s, k_s,txt, G w v_t,txt) - attention(q_t, k_t,txt, v_t,txt))
                + m_img * (attention(q_s, k_s,img, v_t,img) - attention(q_t, k_t,img, v_t,img))
Text queries and any extra tokens after the image (Flux Kontext references) keep their attention.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..core import denoiser
from ..core.branches import SOURCE, branches_of, current_branch, latent_layout
from .controller import Call, Replace, Rows, Technique, attend, attend_dit
from .maps import CrossAttentionMapStore

BLEND_START = 0.2      # P2P starts local blending after 20% of the steps
log = logging.getLogger("editkit")


@dataclass(frozen=True)
class Plan:
    """How one target prompt's maps are built from the source's."""
    g: Optional[torch.Tensor]        # (T_src, T_tgt) mapper; None = identity
    d: Optional[torch.Tensor]        # (T_tgt,) weight of the target's own maps (refinement); None = 0
    w: Optional[torch.Tensor]        # (T_tgt,) re-weighting; None = 1
    length: int

    def mapped_v(self, v: torch.Tensor, tokens_dim: int = -2) -> torch.Tensor:
        """G (w * v) along the token dimension."""
        x = v
        if self.w is not None:
            x = x * _col(self.w, x, tokens_dim)
        if self.g is not None:
            g = self.g.to(device=x.device, dtype=x.dtype)
            x = torch.movedim(torch.matmul(g, torch.movedim(x, tokens_dim, -2)), -2, tokens_dim)
        return x

    def own_v(self, v: torch.Tensor, tokens_dim: int = -2) -> Optional[torch.Tensor]:
        """(d * w) * v, or None when the target keeps none of its own maps."""
        if self.d is None:
            return None
        s = self.d if self.w is None else self.d * self.w
        return v * _col(s, v, tokens_dim)


def _col(vec: torch.Tensor, like: torch.Tensor, tokens_dim: int) -> torch.Tensor:
    shape = [1] * like.ndim
    shape[tokens_dim] = -1
    return vec.to(device=like.device, dtype=like.dtype).reshape(shape)


def make_plan(g, alpha, w, length: int) -> Plan:
    ident = g is not None and g.shape[0] == g.shape[1] and torch.equal(g, torch.eye(g.shape[0]))
    d = None
    if alpha is not None and bool((alpha < 1).any()):
        d = 1.0 - alpha
    if w is not None and bool((w == 1).all()):
        w = None
    return Plan(None if ident else g, d, w, length)


class PromptToPrompt(Technique):
    name = "prompt_to_prompt"
    uses_dit = True

    def __init__(self, plans: list[Plan], cross_steps: float, self_steps: float, self_levels: frozenset,
                 blend: Optional[CrossAttentionMapStore] = None, blend_level: int = 1, threshold: float = 0.3):
        super().__init__()
        self.plans, self.cross_steps, self.self_steps = plans, cross_steps, self_steps
        self.self_levels = self_levels
        self.blend, self.blend_level, self.threshold = blend, blend_level, threshold
        self.last_mask = None        # (B, 1, H, W) bool of the latent batch, per run
        self.mismatch = False
        self.applied: dict = {}      # (kind, layer) -> steps edited (this run)
        self._source_den = None      # (sigma, source x0 prediction) of the step being guided
        self.run_branches = None

    # --- layers ---------------------------------------------------------------------------------
    def attn2_sites(self, layout):
        return [s for s in layout.sites if s.cross]

    def attn1_sites(self, layout):
        if self.self_steps <= 0:
            return []
        return [s for s in layout.sites if s.downsample in self.self_levels]

    def begin_run(self):
        super().begin_run()
        with self.lock:
            self.last_mask = None
            self.mismatch = False
            self.applied = {}
            self._source_den = None
            self.run_branches = None
        if self.blend is not None:
            self.blend.begin_run()

    def _plan(self, j: int) -> Plan:
        return self.plans[min(max(j, 0), len(self.plans) - 1)]

    def _note(self, kind: str, call: Call):
        with self.lock:
            self.applied.setdefault((kind, call.layer), set()).add(call.step)

    def _pairs(self, call: Call):
        return [p for c in call.chunks if c.cond for p in c.pairs]

    def _check_length(self, plan: Plan, n: int) -> bool:
        if plan.length == n:
            return True
        if not self.mismatch:
            log.warning("EditKitPromptToPrompt: the conditioning has %d tokens but the prompts given to the node have %d; "
                        "not editing (give the node the prompts that were encoded)", n, plan.length)
            self.mismatch = True
        return False

    # --- attention ------------------------------------------------------------------------------
    def attention(self, call: Call, q, k, v):
        if call.is_dit:
            return self._joint(call, q, k, v)
        if call.kind == "self":
            return self._self(call, q, k, v)
        return self._cross(call, q, k, v)

    def _self(self, call, q, k, v):
        if not call.in_window(0.0, self.self_steps) or call.site.downsample not in self.self_levels:
            return None
        pairs = self._pairs(call)
        if not pairs:
            return None
        t, s = [p[0] for p in pairs], [p[1] for p in pairs]
        q2, k2 = q.clone(), k.clone()
        q2[t], k2[t] = q[s], k[s]
        self._note("self", call)
        return Replace(t, q2, k2, v)

    def _cross(self, call, q, k, v):
        if self.blend is not None and call.site.downsample == self.blend_level:
            self.blend.capture(q, k, call.extra, call.site, call)
        pairs = self._pairs(call)
        if not pairs:
            return None
        inside = call.in_window(0.0, self.cross_steps)
        rows, need_rows = [], False
        q2, k2, v2 = None, None, None
        extra_terms = {}
        for t, s, j in pairs:
            plan = self._plan(j)
            if not self._check_length(plan, k.shape[1]):
                continue
            if not inside and plan.w is None:
                continue
            if q2 is None:
                q2, k2, v2 = q.clone(), k.clone(), v.clone()
            if inside:
                q2[t], k2[t], v2[t] = q[s], k[s], plan.mapped_v(v[t])
                own = plan.own_v(v[t])
                if own is not None:
                    extra_terms[t] = own
                    need_rows = True
            else:
                v2[t] = v[t] * _col(plan.w, v[t], -2)
            rows.append(t)
        if not rows:
            return None
        self._note("cross", call)
        if not need_rows:
            return Replace(rows, q2, k2, v2)
        out = attend(q2[rows], k2[rows], v2[rows], call.extra)
        own_rows = [t for t in rows if t in extra_terms]
        if own_rows:
            own = attend(q[own_rows], k[own_rows], torch.stack([extra_terms[t] for t in own_rows]), call.extra)
            idx = [rows.index(t) for t in own_rows]
            out[idx] = out[idx] + own
        return Rows(rows, out)

    def wants_dit_call(self, call: Call) -> bool:
        return call.kind == "joint"

    def _joint(self, call, q4, k4, v4):
        """q4/k4/v4: (B, heads, txt + img, d)."""
        if self.blend is not None:
            self.blend.capture_dit(q4, k4, call)
        pairs = self._pairs(call)
        if not pairs:
            return None
        inside = call.in_window(0.0, self.cross_steps)
        self_on = self.self_steps > 0 and call.in_window(0.0, self.self_steps)
        T, I = call.txt, slice(call.txt, call.txt + call.img)
        sel = []
        for t, s, j in pairs:
            plan = self._plan(j)
            if not self._check_length(plan, T):
                continue
            cross = inside or plan.w is not None
            if cross or self_on:
                sel.append((t, s, plan, cross))
        if not sel:
            return None
        self._note("joint", call)
        if self_on:
            self._note("joint_self", call)
        rows = [t for t, *_ in sel]
        base = attend_dit(call, q4[rows], k4[rows], v4[rows])              # (n, L, H*d)
        raw = lambda a, b, c: call.backend(a, b, c, call.heads, **{**call.kwargs, "skip_reshape": True, "skip_output_reshape": True})
        corr_txt, corr_img = [], []
        for t, s, plan, cross in sel:
            qt, kt, vt = q4[t:t + 1, :, I], k4[t:t + 1, :, :T], v4[t:t + 1, :, :T]
            old = raw(qt, kt, vt)
            if not cross:
                new = old
            elif inside:
                new = raw(q4[s:s + 1, :, I], k4[s:s + 1, :, :T], plan.mapped_v(vt))
                own = plan.own_v(vt)
                if own is not None:
                    new = new + raw(qt, kt, own)
            else:
                new = raw(qt, kt, vt * _col(plan.w, vt, -2))
            corr_txt.append(new - old)
            if self_on:
                vi = v4[t:t + 1, :, I]
                corr_img.append(raw(q4[s:s + 1, :, I], k4[s:s + 1, :, I], vi) - raw(qt, k4[t:t + 1, :, I], vi))
        # share of each image query's joint softmax on the text keys (column 0) and on the image keys (1)
        ind = torch.zeros(v4[rows].shape[:-1] + (8,), device=v4.device, dtype=v4.dtype)
        ind[:, :, :T, 0] = 1.0
        ind[:, :, I, 1] = 1.0
        mass = raw(q4[rows][:, :, I], k4[rows], ind)                            # (n, H, img, 8)
        corr = torch.cat(corr_txt) * mass[..., :1]                                # (n, H, img, d)
        if corr_img:
            corr = corr + torch.cat(corr_img) * mass[..., 1:2]
        delta = corr.transpose(1, 2).reshape(len(rows), call.img, -1)
        out = base.clone()
        out[:, I] = out[:, I] + delta.to(out.dtype)
        return Rows(rows, out)

    # --- local blend ----------------------------------------------------------------------------
    def blend_mask(self, batch: int, hw: tuple, branches=None) -> Optional[torch.Tensor]:
        """(batch, 1, H, W) bool: True where a target may differ from its source (sources: all True)."""
        if self.blend is None:
            return None
        maps = self.blend.raw(self.blend_level)
        if maps is None or maps.shape[0] != batch:
            return None
        m = maps.float().sum(1, keepdim=True)
        m = F.max_pool2d(m, 3, 1, padding=1)
        m = F.interpolate(m, size=hw, mode="nearest")
        m = m / m.flatten(1).amax(1).clamp_min(1e-12).reshape(-1, 1, 1, 1)
        m = m > self.threshold
        layout = latent_layout(batch, branches)
        out = torch.ones_like(m)
        for t, s, _ in layout.pairs:
            out[t] = m[t] | m[s]
        return out

    def _apply_blend(self, x, mask, branches):
        layout = latent_layout(x.shape[0], branches)
        x = x.clone()
        mk = mask.to(device=x.device, dtype=x.dtype)
        for t, s, _ in layout.pairs:
            x[t] = x[s] + mk[t] * (x[t] - x[s])
        return x

    def post_cfg(self, args):
        if self.blend is None:
            return None
        den = args["denoised"]
        to = args.get("model_options", {}).get("transformer_options", {})
        sched = to.get("sample_sigmas")
        branches = branches_of(to)
        if branches:
            return self._post_cfg_branch(den, args, branches, sched)
        if sched is not None and denoiser.progress(sched, args["sigma"]) < BLEND_START:
            return None
        mask = self.blend_mask(den.shape[0], tuple(den.shape[-2:]), None)
        if mask is None:
            return None
        with self.lock:
            self.last_mask = mask
        return self._apply_blend(den, mask, None)

    def _post_cfg_branch(self, den, args, branches, sched):
        """An EditKit branch sampler guides each branch separately (source first) and names the branch
        it guides (core.branches.current_branch): keep the source's prediction, blend the target's with it."""
        sig = float(torch.as_tensor(args["sigma"]).flatten()[0])
        role = current_branch(args)
        with self.lock:
            if role == SOURCE:
                self._source_den = (sig, den)
            st = self._source_den
            self.run_branches = branches
        if role is None or role == SOURCE or role not in branches:
            return None
        src = st[1] if st is not None and st[0] == sig else None
        if src is None or src.shape != den.shape:
            return None
        if sched is not None and denoiser.progress(sched, sig) < BLEND_START:
            return None
        n, b = len(branches), den.shape[0]
        mask = self.blend_mask(n * b, tuple(den.shape[-2:]), branches)
        if mask is None:
            return None
        bi = branches.index(role)
        m = mask[bi * b:(bi + 1) * b].to(device=den.device, dtype=den.dtype)
        with self.lock:
            self.last_mask = mask
        return src + m * (den - src)

    def end_run(self, samples, branches=None):
        if self.blend is None or not torch.is_tensor(samples) or samples.ndim != 4:
            return samples
        branches = branches or getattr(self, "run_branches", None)
        if branches:
            n = len(branches)
            maps = self.blend.raw(self.blend_level)
            if maps is None or maps.shape[0] != samples.shape[0] or samples.shape[0] % n:
                return samples        # the sampler returned only the target branch: blended at every step already
        mask = self.blend_mask(samples.shape[0], tuple(samples.shape[-2:]), branches)
        if mask is None:
            return samples
        with self.lock:
            self.last_mask = mask
        return self._apply_blend(samples, mask, branches)
