"""Latent updates from cross-attention losses: Attend-and-Excite, attribute binding and box constraints.

Attend-and-Excite (Chefer et al., SIGGRAPH 2023): during the early steps the latent is moved down the
gradient of a loss on the cross-attention maps of the subject tokens, so that every subject gets a
strong peak somewhere (the paper: the maps of the 16x16 layers averaged over layers and heads, a
softmax over the prompt's tokens without SOT (x100), Gaussian smoothing (3x3, sigma 0.5),
L = max_k (1 - max A_k), z <- z - alpha_t grad L with alpha_t = 20 sqrt(linspace(1, 0.5)), the first 25
of 50 steps, and iterative refinement at steps 0/10/20 until every max reaches 0.05/0.5/0.8, at most 20
updates each). Options on the same machinery:

* attribute binding (in the spirit of Rassin et al. 2023 "Linguistic Binding"): an attribute's map
  should overlap its object's map and not the other objects' maps; overlap(p, q) = sum min(p, q) of
  the maps normalised to sum 1, loss = mean_i (1 - ov(a_i, o_i)) + mean_{i != j} ov(a_i, o_j);
* box constraints (BoxDiff, Xie et al. 2023): inner-box 1 - mean top-P(A M), outer-box mean
  top-P(A (1 - M)), and the corner constraint |proj(A) - proj(M)| at the box edges (max-projection
  of the map onto each axis), per subject with a box.

How the update reaches any sampler: a model wrapper (ComfyUI's model_function_wrapper, chained) runs
the gradient forward on the conditional rows of the step (`core.gradients`: the node's model is a
`gradient_clone`, the forward runs under `autograd()` on a `leaf` copy), then predicts from the moved
latent x' and returns D(x') + (x' - x) s_next / (s - s_next). For Euler / DDIM (and every first-order
step x_next = x + (x - D)(s_next - s) / s) that is exactly "move the latent, then take the step";
multistep and ancestral samplers see the same shifted prediction (an approximation there). The
unconditional rows get the same shift, so CFG keeps it. Maps come from an attn2 replace patch that
records only while the gradient forward runs (a key in transformer_options); otherwise it hands the
call to the previous occupant untouched. Per-run state (the shift per step, the log) is reset in an
OUTER_SAMPLE wrapper.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..attention.maps import attention_probs, blend_level
from ..core import denoiser
from ..core.errors import EditKitInputError
from ..core.gradients import autograd, leaf
from ..core.introspect import attention_layout
from ..core.patches import SharedPatch, add_wrapper, call_attention, chain_attn_replace, chain_unet_wrapper
from .regions import Region, at_grid, latent_grid

RECORD = "editkit_attend_excite_record"
PAPER_REFINE = ((0.0, 0.05), (0.2, 0.5), (0.4, 0.8))     # (fraction of steps, threshold): steps 0/10/20 of 50


# ---------------------------------------------------------------------------------------------
# losses on maps (pure functions; the tests compare them with an independent computation)
# ---------------------------------------------------------------------------------------------

def gaussian_kernel(size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    ax = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-ax ** 2 / (2 * sigma ** 2))
    k = g[:, None] * g[None, :]
    return (k / k.sum()).float()


def smooth(maps: torch.Tensor, size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """(B, N, h, w) maps, each smoothed by a Gaussian (reflect padding, as the paper's code)."""
    b, n, h, w = maps.shape
    k = gaussian_kernel(size, sigma).to(maps)[None, None]
    pad = size // 2
    x = maps.reshape(b * n, 1, h, w)
    if h > pad and w > pad:
        x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    else:
        x = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    return F.conv2d(x, k).reshape(b, n, h, w)


def text_softmax(probs: torch.Tensor, last: int) -> torch.Tensor:
    """(B, L, T) head- and layer-averaged attention -> softmax(100 p) over the prompt's tokens 1..last-1
    (SOT and EOT/padding dropped): (B, L, last - 1); column j is token j + 1."""
    return torch.softmax(probs[..., 1:last] * 100.0, dim=-1)


def subject_maps(text: torch.Tensor, hw: tuple, positions: list) -> torch.Tensor:
    """(B, L, last-1) text-softmaxed maps -> (B, N, h, w): each subject's tokens averaged."""
    b = text.shape[0]
    cols = [text[..., [p - 1 for p in ps]].mean(-1) for ps in positions]
    return torch.stack(cols, dim=1).reshape(b, len(positions), hw[0], hw[1])


def excite_loss(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attend-and-Excite on smoothed subject maps (B, N, h, w): (loss (B,), max per subject (B, N))."""
    mx = maps.flatten(2).amax(-1)
    return (1.0 - mx).clamp_min(0).amax(-1), mx


def overlap(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sum min(p / sum p, q / sum q) over the last two axes."""
    pn = p / p.flatten(-2).sum(-1)[..., None, None].clamp_min(1e-12)
    qn = q / q.flatten(-2).sum(-1)[..., None, None].clamp_min(1e-12)
    return torch.minimum(pn, qn).flatten(-2).sum(-1)


def binding_loss(attrs: torch.Tensor, objs: torch.Tensor) -> torch.Tensor:
    """attrs, objs (B, P, h, w) (pair i: attribute i of object i): (B,) mean_i (1 - ov(a_i, o_i)) +
    mean_{i != j} ov(a_i, o_j)."""
    p = attrs.shape[1]
    pos = (1.0 - overlap(attrs, objs)).mean(-1)
    if p < 2:
        return pos
    neg = torch.stack([overlap(attrs[:, i], objs[:, j]) for i in range(p) for j in range(p) if i != j], -1).mean(-1)
    return pos + neg


def box_loss(maps: torch.Tensor, masks: torch.Tensor, top: float = 0.2, corner: float = 1.0) -> torch.Tensor:
    """BoxDiff's constraints: maps (B, N, h, w), masks (B or 1, N, h, w) in {0, 1}: (B,) summed over subjects.

    inner 1 - mean top-P(A M) (P = top x box area), outer mean top-P(A (1 - M)) (P = top x outside area),
    corner: mean |max_y A - max_y M| over the columns at the box's left/right edges and the same for rows."""
    b, n, h, w = maps.shape
    masks = masks.to(maps).expand(b, n, h, w)
    total = maps.new_zeros(b)
    for k in range(n):
        a, m = maps[:, k].flatten(1), masks[:, k].flatten(1)
        p_in = max(1, int(round(top * float(m[0].sum()))))
        p_out = max(1, int(round(top * float((1 - m[0]).sum()))))
        inner = 1.0 - (a * m).topk(p_in, dim=-1).values.mean(-1)
        outer = (a * (1 - m)).topk(p_out, dim=-1).values.mean(-1) if p_out <= a.shape[1] and float((1 - m[0]).sum()) > 0 else 0.0
        total = total + inner + outer
        if corner > 0:
            total = total + corner * corner_loss(maps[:, k], masks[:, k])
    return total


def _edges(indicator: torch.Tensor) -> list[int]:
    idx = torch.nonzero(indicator > 0.5).flatten().tolist()
    if not idx:
        return []
    lo, hi, n = idx[0], idx[-1], indicator.shape[0]
    return sorted({i for i in (lo - 1, lo, hi, hi + 1) if 0 <= i < n})


def corner_loss(a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """a, m (B, h, w): mean |proj(a) - proj(m)| at the box edges, over x (max over rows) and y."""
    px, mx = a.amax(-2), m.amax(-2)
    py, my = a.amax(-1), m.amax(-1)
    ex, ey = _edges(mx[0]), _edges(my[0])
    terms = []
    if ex:
        terms.append((px[:, ex] - mx[:, ex]).abs().mean(-1))
    if ey:
        terms.append((py[:, ey] - my[:, ey]).abs().mean(-1))
    return sum(terms) / len(terms) if terms else a.new_zeros(a.shape[0])


# ---------------------------------------------------------------------------------------------
# the objective and the patch
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Objective:
    """What the latent update minimises. positions: token positions per subject; last: the EOT position.
    binding: ((attribute positions, subject index), ...); boxes: a Region per subject (None: no box)."""
    positions: tuple
    last: int
    excite: float = 1.0
    binding: tuple = ()
    binding_weight: float = 0.0
    boxes: tuple = ()
    box_top: float = 0.2
    corner: float = 1.0
    node: str = "EditKitAttendAndExcite"

    def __call__(self, probs: torch.Tensor, hw: tuple, lat_hw: tuple, downscale: int) -> tuple[torch.Tensor, torch.Tensor]:
        """probs (B, L, T) averaged attention -> (loss (B,), max per subject (B, N))."""
        text = text_softmax(probs, self.last)
        maps = smooth(subject_maps(text, hw, list(self.positions)))
        loss, mx = excite_loss(maps)
        loss = loss * self.excite
        if self.binding and self.binding_weight > 0:
            attrs = smooth(subject_maps(text, hw, [a for a, _ in self.binding]))
            objs = maps[:, [j for _, j in self.binding]]
            loss = loss + self.binding_weight * binding_loss(attrs, objs)
        if self.boxes:
            idx = [k for k, r in enumerate(self.boxes) if r is not None]
            masks = torch.stack([(at_grid(latent_grid(self.node, self.boxes[k], lat_hw[0], lat_hw[1], downscale, k),
                                          hw[0], hw[1])[:1] > 0.5).float() for k in idx], dim=1)
            loss = loss + box_loss(maps[:, idx], masks, self.box_top, self.corner)
        return loss, mx


class _RunState:
    def __init__(self):
        self.lock = threading.Lock()
        self.reset()

    def reset(self):
        self.shift: dict[int, torch.Tensor] = {}
        self.log: list[dict] = []


class LatentUpdate(SharedPatch):
    """The installed update (immutable configuration; per-run state in `run`, reset per sample)."""

    def __init__(self, objective: Objective, scale: float = 20.0, end_percent: float = 0.5, refine=PAPER_REFINE,
                 max_refine: int = 20, level: Optional[int] = None, downscale: int = 8):
        self.objective, self.scale, self.end_percent = objective, float(scale), float(end_percent)
        self.refine, self.max_refine, self.level, self.downscale = tuple(refine), int(max_refine), level, downscale
        self.run = _RunState()

    # -- the map recorder (attn2 replace at the chosen level) ------------------------------------------
    def recorder(self, prev):
        def attn2(q, k, v, extra):
            rec = extra.get(RECORD)
            if rec is not None:
                probs = attention_probs(q, k, extra["n_heads"], list(range(k.shape[1])))
                rec.append(probs)
            return call_attention(prev, q, k, v, extra)
        return attn2

    # -- schedule -----------------------------------------------------------------------------------
    def n_alter(self, n_steps: int) -> int:
        return int(math.floor(self.end_percent * n_steps + 1e-9))

    def step_size(self, i: int, n_steps: int) -> float:
        na = max(self.n_alter(n_steps), 1)
        frac = torch.linspace(1.0, 0.5, na)[min(i, na - 1)].item()
        return self.scale * math.sqrt(frac)

    def threshold(self, i: int, n_steps: int) -> Optional[float]:
        for frac, thr in self.refine:
            if int(round(frac * n_steps)) == i:
                return float(thr)
        return None

    # -- one evaluation of the loss with its gradient ------------------------------------------------
    def evaluate(self, apply_model, z: torch.Tensor, t: torch.Tensor, c: dict, grad: bool = True):
        """(loss (B,), max per subject (B, N), d loss / d z or None) at latent z (conditional rows only)."""
        rec: list = []
        to = dict(c.get("transformer_options", {}))
        to[RECORD] = rec
        to["cond_or_uncond"] = [0]
        cc = {k: (leaf(v, False) if isinstance(v, torch.Tensor) else v) for k, v in c.items()}
        cc["transformer_options"] = to
        with autograd(copy_saved=False):
            zl = leaf(z, grad)
            apply_model(zl, leaf(t, False), **cc)
            if not rec:
                raise RuntimeError("EditKit latent update: no cross-attention maps were recorded")
            lq = rec[0].shape[1]
            probs = torch.stack([r for r in rec if r.shape[1] == lq]).mean(0)
            hw = _grid(z.shape[-2], z.shape[-1], lq)
            loss, mx = self.objective(probs, hw, (z.shape[-2], z.shape[-1]), self.downscale)
            g = torch.autograd.grad(loss.sum(), zl)[0] if grad else None
        return loss.detach(), mx.detach(), (g.detach() if g is not None else None)

    def update(self, apply_model, x: torch.Tensor, t: torch.Tensor, c: dict, i: int, n_steps: int, sigma: float, ms):
        """The moved conditional latent: refinement (at the paper's steps) then one gradient step."""
        cin2 = 1.0 if ms is None else float(ms.calculate_input(torch.tensor([sigma]), torch.ones(1, 1, 1, 1)).flatten()[0]) ** 2
        alpha = self.step_size(i, n_steps) / max(cin2, 1e-12)     # the paper's step in z = c_in x
        thr = self.threshold(i, n_steps)
        z = x.detach().clone()
        iters = 0
        loss, mx, g = self.evaluate(apply_model, z, t, c)
        first = (loss.clone(), mx.clone())
        if thr is not None:
            while iters < self.max_refine and bool((loss > 1.0 - thr).any()):
                z = z - alpha * g
                iters += 1
                loss, mx, g = self.evaluate(apply_model, z, t, c)
        z = z - alpha * g
        with self.run.lock:
            self.run.log.append({"step": i, "sigma": sigma, "loss": first[0].tolist(), "max": first[1].tolist(),
                                 "refine_iterations": iters, "loss_after_refine": loss.tolist()})
        return (z - x).to(x.dtype)

    # -- the model wrapper ---------------------------------------------------------------------------
    def wrapper(self, call_next):
        def fn(apply_model, args):
            x, t, c = args["input"], args["timestep"], args["c"]
            to = c.get("transformer_options", {})
            sched = to.get("sample_sigmas")
            if self.scale == 0 or sched is None:
                return call_next(apply_model, args)
            n = len(sched) - 1
            i = denoiser.step_index(sched, t)
            if i >= self.n_alter(n) or i >= n:
                return call_next(apply_model, args)
            cou = list(args.get("cond_or_uncond") or [0])
            b = x.shape[0] // len(cou)
            with self.run.lock:
                shift = self.run.shift.get(i)
            if shift is None and 0 in cou:
                j = cou.index(0)
                rows = slice(j * b, (j + 1) * b)
                cc = {k: (v[rows] if isinstance(v, torch.Tensor) and v.shape[:1] == x.shape[:1] else v) for k, v in c.items()}
                ms = apply_model.__self__.model_sampling if hasattr(apply_model, "__self__") else None
                shift = self.update(apply_model, x[rows], t[rows], cc, i, n, float(sched[i]), ms)
                with self.run.lock:
                    self.run.shift[i] = shift
            if shift is None or shift.shape[0] != b or shift.shape[1:] != x.shape[1:]:
                return call_next(apply_model, args)     # a call of another shape this step (area conds): unmoved
            d = shift.to(x).repeat(len(cou), 1, 1, 1)
            out = call_next(apply_model, {**args, "input": x + d})
            s, sn = float(sched[i]), float(sched[i + 1])
            k = sn / (s - sn) if s > sn else 0.0
            return out + d * k
        return fn

    def outer_sample(self, executor, *args, **kwargs):
        with self.run.lock:
            self.run.reset()
        return executor(*args, **kwargs)


def _grid(lat_h: int, lat_w: int, tokens: int) -> tuple:
    from .regions import layer_grid
    return layer_grid(lat_h, lat_w, tokens)


def map_sites(model, level: Optional[int] = None) -> list:
    """The cross-attention sites whose maps the loss reads: the input/output blocks' level `level`
    (default the coarsest of them: 16x16 for SD1.5 at 512 px, the paper's), never the middle block."""
    lay = attention_layout(model)
    lv = blend_level(lay) if level is None else level
    return [s for s in lay.sites if s.cross and s.downsample == lv and s.block != "middle"]


def install(m, patch: LatentUpdate) -> int:
    """Install on a gradient clone `m`: the recorders, the model wrapper, the per-run reset. Returns the site count."""
    import comfy.patcher_extension as pe
    sites = map_sites(m, patch.level)
    for s in sites:
        chain_attn_replace(m, "attn2", s.key, patch.recorder)
    chain_unet_wrapper(m, patch.wrapper)
    add_wrapper(m, pe.WrappersMP.OUTER_SAMPLE, f"layout.latent_update.{id(patch)}", patch.outer_sample)
    return len(sites)


def eot_position(clip, prompt: str) -> int:
    """Position of the end-of-text token in the tokenized prompt (the paper's `last_idx`)."""
    from ..core.tokens import stream_key, sub_tokenizer, token_ids
    key = stream_key(clip.tokenize(prompt))
    seq = token_ids(clip, prompt, key)
    end = getattr(sub_tokenizer(clip, key), "end_token", None)
    for p in range(1, len(seq)):
        if seq[p] == end:
            return p
    return len(seq)


def check_subjects(node: str, positions: dict, last: int, input_name: str = "subjects") -> None:
    for w, ps in positions.items():
        if max(ps) >= last:
            raise EditKitInputError(node, input_name, f"'{w}' lies beyond the prompt's first 75 tokens",
                                    "shorten the prompt or use a word near its start")


def box_regions(node: str, regions, words: list[str]) -> tuple:
    """One Region per subject word (matched by the region's label); None where a word has no region."""
    by_label = {}
    for r in regions or ():
        lab = (r.label or "").strip()
        if not lab:
            raise EditKitInputError(node, "regions", f"a region has no label ({r.describe()})",
                                    "set each EditKit Region's label to the prompt word it boxes")
        by_label[lab] = r
    missing = [lab for lab in by_label if lab not in words]
    if missing:
        raise EditKitInputError(node, "regions", f"region label '{missing[0]}' is not one of the subjects {words}",
                                "label each region with a word from the subjects input")
    return tuple(by_label.get(w) for w in words)
