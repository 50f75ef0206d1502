"""Cross-attention map capture (DAAM-style heat maps) with bounded memory and no effect on the output.

Each selected layer still runs the previous patch or ComfyUI's optimized attention for its output;
the probabilities of the chosen tokens are computed on the side, for the conditional branch only,
head-averaged, and accumulated as a running sum per resolution level. Memory is
batch x words x (sum of level areas) floats, whatever the number of steps.

Rows can follow the EditKit branch layout (attention/controller.py): the source rows use the
source prompt's word positions, each target row its target prompt's, so both branches' maps of the
same words can be shown side by side. A word absent from a row's prompt gives an all-zero map.

UNets: attn2 of the chosen levels. DiTs (SD3, Flux): the image-query x text-key block of every
joint attention, normalised over the text keys.
"""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from ..core.introspect import AttnSite
from ..core.branches import SOURCE, TARGET, chunks_of, latent_layout
from .controller import Call, Technique, install

# Peak bytes of one probability block computed on the side; larger blocks are split over heads.
_PROB_BLOCK_BYTES = 64 << 20


def attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int, columns: list[int]) -> torch.Tensor:
    """Head-averaged softmax(q k^T / sqrt(d)) restricted to key columns: (B, Lq, len(columns)), float32."""
    b, lq, inner = q.shape
    d = inner // heads
    qh = q.reshape(b, lq, heads, d).transpose(1, 2)
    kh = k.reshape(b, k.shape[1], heads, d).transpose(1, 2)
    return attention_probs_heads(qh, kh, columns)


def attention_probs_heads(qh: torch.Tensor, kh: torch.Tensor, columns: list[int]) -> torch.Tensor:
    """Same on (B, heads, L, d) tensors."""
    b, heads, lq, d = qh.shape
    qh, kh = qh.float(), kh.float()
    per_head = b * lq * kh.shape[2] * 4
    chunk = max(1, min(heads, _PROB_BLOCK_BYTES // max(per_head, 1)))
    acc = None
    for h0 in range(0, heads, chunk):
        logits = qh[:, h0:h0 + chunk] @ kh[:, h0:h0 + chunk].transpose(-1, -2) * d ** -0.5
        p = logits.softmax(dim=-1)[..., columns].sum(dim=1)
        acc = p if acc is None else acc + p
    return acc / heads


class CrossAttentionMapStore:
    """Running sums of word maps per resolution level, for the last sampling run of the patched model.

    words: word -> token positions in the (source) prompt. target_words: optional, one such dict per
    target prompt; then rows follow the branch layout (row 0 / the source branch: `words`).
    per_step: also keep the maps of the current and the previous step (MasaCtrl masks).
    """

    def __init__(self, words: dict[str, list[int]], levels: frozenset, start: float = 0.0, end: float = 1.0,
                 target_words: list[dict] | None = None, per_step: bool = False):
        names = list(words)
        for tw in target_words or []:
            names += [w for w in tw if w not in names]
        self.words = names
        self.source_positions = [list(words.get(w, [])) for w in names]
        self.target_positions = [[list(tw.get(w, [])) for w in names] for tw in (target_words or [])]
        self.branched = target_words is not None
        self.positions = self.source_positions           # legacy attribute
        cols = {p for ps in self.source_positions for p in ps}
        for tp in self.target_positions:
            cols |= {p for ps in tp for p in ps}
        self.columns = sorted(cols)
        self.levels = levels
        self.start, self.end = start, end
        self.per_step = per_step
        self._lock = threading.Lock()  # ComfyUI >= 0.4 may run cond batches on several threads
        self.runs = 0
        self._clear()

    def __deepcopy__(self, memo):
        return self

    def _clear(self):
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = {}
        self.steps_seen: set[int] = set()
        self.latent_hw = None
        self.roles: list = []
        self.pairs: list = []          # (target row, source row) within a chunk, from the last capture
        self.step_sums: dict[int, torch.Tensor] = {}
        self.step_counts: dict[int, int] = {}
        self.last_sums: dict[int, torch.Tensor] = {}
        self.last_counts: dict[int, int] = {}
        self.step_id = None

    def begin_run(self):
        with self._lock:
            self._clear()
            self.runs += 1

    @property
    def nbytes(self) -> int:
        ts = list(self.sums.values()) + list(self.step_sums.values()) + list(self.last_sums.values())
        return sum(t.numel() * t.element_size() for t in ts)

    def wants_progress(self, progress: float) -> bool:
        return self.start <= progress <= self.end

    def wants(self, extra: dict) -> bool:
        from .controller import step_of
        if extra.get("sample_sigmas") is None or "sigmas" not in extra:
            return True
        return self.wants_progress(step_of(extra)[2])

    # --- rows -----------------------------------------------------------------------------------
    def _row_positions(self, b: int, chunk) -> tuple[list, list]:
        """Per row of a cond chunk: (role, target index) and the per-word position lists."""
        if not self.branched:
            return [(SOURCE, -1)] * b, [self.source_positions] * b
        roles = [(SOURCE, -1)] * b
        for t, s, j in chunk.pairs:
            roles[t - chunk.start] = (TARGET, j)
        pos = []
        for role, j in roles:
            if role == SOURCE or not self.target_positions:
                pos.append(self.source_positions)
            else:
                pos.append(self.target_positions[min(max(j, 0), len(self.target_positions) - 1)])
        return roles, pos

    def _per_word(self, probs: torch.Tensor, row_pos: list) -> torch.Tensor:
        """probs (b, L, ncols) -> (b, words, L)."""
        b = probs.shape[0]
        col = {c: i for i, c in enumerate(self.columns)}
        sel = torch.zeros(b, len(self.columns), len(self.words), dtype=probs.dtype, device=probs.device)
        for i in range(b):
            for j, ps in enumerate(row_pos[i]):
                for p in ps:
                    sel[i, col[p], j] = 1.0
        return torch.einsum("blc,bcw->bwl", probs, sel)

    # --- capture --------------------------------------------------------------------------------
    def capture(self, q, k, extra: dict, site: AttnSite, call: Call | None = None):
        """UNet attn2: q (B, Lq, heads*d), k (B, T, heads*d)."""
        if not self.columns:
            return
        from .controller import step_of, token_grid
        chunks = call.chunks if call is not None else chunks_of(extra, q.shape[0])
        conds = [c for c in chunks if c.cond]
        if not conds:
            return
        b = conds[0].size
        if max(self.columns) >= k.shape[1]:
            return  # a context shorter than the prompt (another conditioning); nothing to read
        hw = call.hw if call is not None else token_grid(extra, site, q.shape[1])
        if hw is None:
            return
        qs = [q[c.start:c.start + b] for c in conds]
        qc = torch.stack(qs).mean(0) if len(qs) > 1 else qs[0]
        kc = k[conds[0].start:conds[0].start + b]
        probs = attention_probs(qc, kc, extra["n_heads"], self.columns)          # (b, hw, ncols)
        orig = extra.get("original_shape")
        step = step_of(extra)[0] if "sample_sigmas" in extra else -1
        self._add(probs, conds[0], hw, site.downsample, step, (int(orig[-2]), int(orig[-1])) if orig is not None else None)

    def capture_dit(self, q4, k4, call: Call):
        """DiT joint attention: q4, k4 (B, heads, L, d), text tokens first."""
        if not self.columns or call.kind != "joint" or max(self.columns) >= call.txt or call.hw is None:
            return
        conds = [c for c in call.chunks if c.cond]
        if not conds:
            return
        c0 = conds[0]
        rows = slice(c0.start, c0.start + c0.size)
        qi = q4[rows, :, call.txt:call.txt + call.img]
        kt = k4[rows, :, :call.txt]
        probs = attention_probs_heads(qi, kt, self.columns)
        self._add(probs, c0, call.hw, 1, call.step, None)

    def _add(self, probs, chunk, hw, level, step, latent_hw):
        b = probs.shape[0]
        roles, row_pos = self._row_positions(b, chunk)
        per_word = self._per_word(probs, row_pos).reshape(b, len(self.words), hw[0], hw[1])
        with self._lock:
            if latent_hw is not None:
                self.latent_hw = latent_hw
            self.roles = roles
            self.pairs = [(t - chunk.start, src - chunk.start) for t, src, _ in chunk.pairs]
            if level in self.sums and self.sums[level].shape == per_word.shape:
                self.sums[level] += per_word.to(self.sums[level].device)
                self.counts[level] += 1
            else:
                self.sums[level] = per_word.clone()
                self.counts[level] = 1
            self.steps_seen.add(step)
            if self.per_step:
                if step != self.step_id:
                    if self.step_sums:
                        self.last_sums, self.last_counts = self.step_sums, self.step_counts
                    self.step_sums, self.step_counts, self.step_id = {}, {}, step
                if level in self.step_sums and self.step_sums[level].shape == per_word.shape:
                    self.step_sums[level] += per_word
                    self.step_counts[level] += 1
                else:
                    self.step_sums[level] = per_word.clone()
                    self.step_counts[level] = 1

    # --- read -----------------------------------------------------------------------------------
    def raw(self, level: int | None = None, current_step: bool = False):
        """Un-normalised (b, words, h, w) average at one level (default: the coarsest captured), or None."""
        with self._lock:
            if current_step:
                sums, counts = (self.step_sums, self.step_counts) if self.step_sums else (self.last_sums, self.last_counts)
            else:
                sums, counts = self.sums, self.counts
            if not sums:
                return None
            key = level if level in sums else max(sums)
            return sums[key] / counts[key]

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


class CaptureTechnique(Technique):
    """Records maps into a store; never edits (the output is bit-identical to no capture)."""

    name = "attention_maps"
    uses_dit = True

    def __init__(self, store: CrossAttentionMapStore):
        super().__init__()
        self.store = store

    def attn2_sites(self, layout):
        return [s for s in layout.sites if s.cross and s.downsample in self.store.levels]

    def begin_run(self):
        super().begin_run()
        self.store.begin_run()

    def wants_dit_call(self, call):
        return call.kind == "joint" and call.chunks and any(c.cond for c in call.chunks) and self.store.wants_progress(call.progress)

    def attention(self, call: Call, q, k, v):
        if call.is_dit:
            self.store.capture_dit(q, k, call)
        elif self.store.wants_progress(call.progress):
            self.store.capture(q, k, call.extra, call.site, call)
        return None


def select_levels(layout, mode: str) -> frozenset:
    levels = sorted({s.downsample for s in layout.sites if s.cross})
    if not levels:
        return frozenset({1}) if layout.dit_blocks else frozenset()
    if mode == "all":
        return frozenset(levels)
    if mode == "coarsest":
        return frozenset(levels[-1:])
    return frozenset(levels[-2:])  # "coarsest two": 16x16 and 8x8 on SD1.5 at 512 px


def blend_level(layout) -> int:
    """The level Prompt-to-Prompt reads word maps at: the coarsest level of the input/output blocks
    (16x16 for SD1.5 at 512 px, 32x32 for SDXL at 1024 px); 1 (the token grid) for DiTs."""
    levels = sorted({s.downsample for s in layout.sites if s.cross and s.block != "middle"})
    return levels[-1] if levels else 1


def install_capture(m, store: CrossAttentionMapStore) -> list[AttnSite]:
    """Patch the clone `m` to record into `store`; returns the UNet sites patched."""
    return install(m, CaptureTechnique(store))["attn2"]


def latent_roles(batch: int, branches=None) -> list:
    c = latent_layout(batch, branches)
    roles = [(SOURCE, -1)] * batch
    for t, s, j in c.pairs:
        roles[t] = (TARGET, j)
    return roles
