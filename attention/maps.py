"""Cross-attention map capture (DAAM-style heat maps) with bounded memory and no effect on the output.

Each selected attn2 layer still runs the previous patch or ComfyUI's optimized attention for its
output; the probabilities of the chosen tokens are computed on the side, for the conditional
branch only, head-averaged, and accumulated as a running sum per resolution level. Memory is
batch x words x (sum of level areas) floats, whatever the number of steps.
"""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from ..core import denoiser
from ..core.introspect import AttnSite, attention_layout
from ..core.patches import SharedPatch, add_wrapper, call_attention, chain_attn_replace

# Peak bytes of one probability block computed on the side; larger blocks are split over heads.
_PROB_BLOCK_BYTES = 64 << 20


def attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int, columns: list[int]) -> torch.Tensor:
    """Head-averaged softmax(q k^T / sqrt(d)) restricted to key columns: (B, Lq, len(columns)), float32."""
    b, lq, inner = q.shape
    d = inner // heads
    qh = q.reshape(b, lq, heads, d).transpose(1, 2).float()
    kh = k.reshape(b, k.shape[1], heads, d).transpose(1, 2).float()
    per_head = b * lq * k.shape[1] * 4
    chunk = max(1, min(heads, _PROB_BLOCK_BYTES // max(per_head, 1)))
    acc = None
    for h0 in range(0, heads, chunk):
        logits = qh[:, h0:h0 + chunk] @ kh[:, h0:h0 + chunk].transpose(-1, -2) * d ** -0.5
        p = logits.softmax(dim=-1)[..., columns].sum(dim=1)
        acc = p if acc is None else acc + p
    return acc / heads


class CrossAttentionMapStore(SharedPatch):
    """Running sums of word maps per resolution level, for the last sampling run of the patched model."""

    def __init__(self, words: dict[str, list[int]], levels: frozenset, start: float = 0.0, end: float = 1.0):
        self.words = list(words)
        self.positions = [list(words[w]) for w in self.words]
        self.columns = sorted({p for ps in self.positions for p in ps})
        self.levels = levels
        self.start, self.end = start, end
        self._lock = threading.Lock()  # ComfyUI >= 0.4 may run cond batches on several threads
        self.runs = 0
        self._clear()

    def _clear(self):
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = {}
        self.steps_seen: set[int] = set()
        self.latent_hw = None

    def begin_run(self):
        with self._lock:
            self._clear()
            self.runs += 1

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.sums.values())

    def wants(self, extra: dict) -> bool:
        sched = extra.get("sample_sigmas")
        if sched is None or "sigmas" not in extra:
            return True
        p = denoiser.progress(sched, extra["sigmas"])
        return self.start <= p <= self.end

    def capture(self, q, k, extra: dict, site: AttnSite):
        cou = list(extra.get("cond_or_uncond", [0]))
        idx = [i for i, c in enumerate(cou) if c == 0]
        if not idx:
            return
        b = q.shape[0] // len(cou)
        if max(self.columns) >= k.shape[1]:
            return  # a context shorter than the prompt (another conditioning); nothing to read
        shape = extra.get("activations_shape")
        orig = extra.get("original_shape")
        if shape is not None and len(shape) == 4 and shape[2] * shape[3] == q.shape[1]:
            h, w = int(shape[2]), int(shape[3])
        elif orig is not None:
            h, w = site.resolution(int(orig[2]), int(orig[3]))
        else:
            return
        qc = torch.stack([q[i * b:(i + 1) * b] for i in idx]).mean(0) if len(idx) > 1 else q[idx[0] * b:(idx[0] + 1) * b]
        kc = k[idx[0] * b:(idx[0] + 1) * b]
        probs = attention_probs(qc, kc, extra["n_heads"], self.columns)          # (b, hw, ncols)
        col = {c: j for j, c in enumerate(self.columns)}
        per_word = torch.stack([probs[..., [col[p] for p in ps]].sum(-1) for ps in self.positions], dim=1)
        per_word = per_word.reshape(b, len(self.words), h, w)
        step = denoiser.step_index(extra["sample_sigmas"], extra["sigmas"]) if "sample_sigmas" in extra else -1
        with self._lock:
            if orig is not None:
                self.latent_hw = (int(orig[2]), int(orig[3]))
            key = site.downsample
            if key in self.sums and self.sums[key].shape == per_word.shape:
                self.sums[key] += per_word.to(self.sums[key].device)
                self.counts[key] += 1
            else:
                self.sums[key] = per_word.clone()
                self.counts[key] = 1
            self.steps_seen.add(step)

    def maps(self, size: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, words, H, W) maps averaged over captured layers and steps, each normalised to [0, 1]."""
        with self._lock:
            if not self.sums:
                raise RuntimeError("no attention maps were captured: sample with the model from EditKitAttentionMaps first")
            if size is None:
                finest = min(self.sums)
                size = tuple(self.sums[finest].shape[-2:])
            total = None
            for key, s in self.sums.items():
                m = F.interpolate((s / self.counts[key]).float().cpu(), size=size, mode="bilinear", align_corners=False)
                total = m if total is None else total + m
        total = total / len(self.sums)
        flat = total.flatten(2)
        lo, hi = flat.min(-1, keepdim=True).values, flat.max(-1, keepdim=True).values
        return ((flat - lo) / (hi - lo).clamp_min(1e-12)).reshape(total.shape)


class _CaptureAttn2(SharedPatch):
    """attn2 replace: output from the previous occupant (or ComfyUI), maps recorded on the side."""

    def __init__(self, store: CrossAttentionMapStore, site: AttnSite, prev):
        self.store, self.site, self.prev = store, site, prev

    def __call__(self, q, k, v, extra):
        out = call_attention(self.prev, q, k, v, extra)
        if self.store.wants(extra):
            self.store.capture(q, k, extra, self.site)
        return out


def select_levels(layout, mode: str) -> frozenset:
    levels = sorted({s.downsample for s in layout.sites if s.cross})
    if not levels:
        return frozenset()
    if mode == "all":
        return frozenset(levels)
    if mode == "coarsest":
        return frozenset(levels[-1:])
    return frozenset(levels[-2:])  # "coarsest two": 16x16 and 8x8 on SD1.5 at 512 px


def install_capture(m, store: CrossAttentionMapStore) -> list[AttnSite]:
    """Patch the clone `m` to record into `store`; returns the sites patched."""
    layout = attention_layout(m)
    sites = [s for s in layout.sites if s.cross and s.downsample in store.levels]
    for site in sites:
        chain_attn_replace(m, "attn2", site.key, lambda prev, site=site: _CaptureAttn2(store, site, prev))

    def outer_sample(executor, *args, **kwargs):
        store.begin_run()  # a new sampling run replaces the previous run's maps
        return executor(*args, **kwargs)

    import comfy.patcher_extension
    add_wrapper(m, comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, f"attention_maps.{id(store)}", outer_sample)
    return sites
