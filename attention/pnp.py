"""Plug-and-Play diffusion features (Tumanyan et al. 2023) on the attention controller (UNets).

For the first `feature_fraction` of the steps the target rows of the decoder block `feature_block`
receive the source rows' input features (the previous block's output and the skip connection);
the block's ResBlock therefore produces exactly the source's residual features (the paper's
injected f_t^4: in SD1.5 the timestep embedding is shared by both branches). For the first
`attention_fraction` the target's self-attention in decoder blocks >= `attention_block` uses the
source's queries and keys (the source's self-attention maps): attention(q_s, k_s, v_t).
Both cond and uncond chunks are injected, each from its own source row.

Defaults come from the layout: the feature block is the middle decoder block of the coarsest
decoder level with attention (SD1.5: output block 4, the paper's "layer 4"; SDXL: output block 1),
and Q/K injection covers every decoder attention block from there on (SD1.5: 4-11).

DiTs (SD3, Flux) have no decoder; the same idea as block-output injection: the target rows leave
double block `feature_block` (default: the middle one) with the source rows' image tokens (their
text tokens stay their own), and from layer `attention_block` on (execution order: double, then
single blocks; default: the feature block) the target's image queries and keys in the joint
attention are the source's: its image-to-image maps are the source's, its text is its own.
"""
from __future__ import annotations

from ..core.branches import BRANCHES_KEY, branch_layout
from .controller import Call, Replace, Technique, step_of
from ..core.patches import SharedPatch, call_dit_block


def default_blocks(layout) -> tuple[int, int]:
    """(feature block, first Q/K block) from the layout."""
    out = [s for s in layout.sites if s.block == "output"]
    if not out:
        return -1, -1
    coarsest = max(s.downsample for s in out)
    level = sorted({s.number for s in out if s.downsample == coarsest})
    fb = level[len(level) // 2]
    return fb, fb


class _FeaturePatch(SharedPatch):
    """output_block_patch: hands the target rows the source rows' block inputs."""

    def __init__(self, tech: "PlugAndPlay"):
        self.tech = tech

    def __call__(self, h, hsp, transformer_options):
        tech = self.tech
        block = transformer_options.get("block")
        if block is None or block[0] != "output" or block[1] != tech.feature_block:
            return h, hsp
        step, _, p = step_of(transformer_options)
        if not p < tech.feature_fraction:
            return h, hsp
        chunks = branch_layout(transformer_options.get("cond_or_uncond"), h.shape[0], transformer_options.get(BRANCHES_KEY))
        pairs = [pr for c in chunks for pr in c.pairs]
        if not pairs:
            return h, hsp
        t, s = [pr[0] for pr in pairs], [pr[1] for pr in pairs]
        h2, hsp2 = h.clone(), hsp.clone()
        h2[t], hsp2[t] = h[s], hsp[s]
        with tech.lock:
            tech.applied.setdefault(("features", tech.feature_block), set()).add(step)
        return h2, hsp2


def default_dit_block(layout) -> int:
    """The middle double block of a DiT."""
    n = sum(1 for b in layout.dit_blocks if b.kind == "double_block")
    return n // 2 if n else -1


def _source_pairs(transformer_options, batch: int):
    chunks = branch_layout(transformer_options.get("cond_or_uncond"), batch, transformer_options.get(BRANCHES_KEY))
    return [pr for c in chunks for pr in c.pairs]


class _DitFeaturePatch(SharedPatch):
    """DiT double-block replace: the target rows leave the block with the source rows' image tokens."""

    def __init__(self, tech: "PlugAndPlay", prev):
        self.tech, self.prev = tech, prev

    def __call__(self, args, extra):
        out = call_dit_block(self.prev, args, extra)
        tech = self.tech
        to = args.get("transformer_options") or {}
        step, _, p = step_of(to)
        if not p < tech.feature_fraction:
            return out
        pairs = _source_pairs(to, out["img"].shape[0])
        if not pairs:
            return out
        t, s = [pr[0] for pr in pairs], [pr[1] for pr in pairs]
        img = out["img"].clone()
        img[t] = out["img"][s]
        with tech.lock:
            tech.applied.setdefault(("features", tech.feature_block), set()).add(step)
        return {**out, "img": img}


class PlugAndPlay(Technique):
    name = "plug_and_play"
    uses_dit = True

    def __init__(self, feature_block: int, feature_fraction: float, attention_block: int, attention_fraction: float):
        super().__init__()
        self.feature_block, self.feature_fraction = feature_block, feature_fraction
        self.attention_block, self.attention_fraction = attention_block, attention_fraction
        self.applied: dict = {}
        self._feature = _FeaturePatch(self)

    def begin_run(self):
        super().begin_run()
        with self.lock:
            self.applied = {}

    def attn1_sites(self, layout):
        if self.attention_fraction <= 0 or self.attention_block < 0:
            return []
        return [s for s in layout.sites if s.block == "output" and s.number >= self.attention_block]

    def output_block_patch(self):
        return self._feature if self.feature_fraction > 0 and self.feature_block >= 0 else None

    def dit_block_patches(self, layout):
        if self.feature_fraction <= 0 or self.feature_block < 0:
            return []
        return [("double_block", self.feature_block, lambda prev: _DitFeaturePatch(self, prev))]

    def wants_dit_call(self, call: Call) -> bool:
        return (self.attention_fraction > 0 and 0 <= self.attention_block <= call.layer
                and call.progress < self.attention_fraction)

    def attention(self, call: Call, q, k, v):
        if call.kind not in ("self", "joint", "image") or not call.progress < self.attention_fraction:
            return None
        if call.is_dit and not self.wants_dit_call(call):
            return None
        pairs = [p for c in call.chunks for p in c.pairs]
        if not pairs:
            return None
        t, s = [p[0] for p in pairs], [p[1] for p in pairs]
        q2, k2 = q.clone(), k.clone()
        if call.kind == "joint":        # image queries/keys only: the text stays the target's
            img = call.img_slice()
            q2[t, :, img], k2[t, :, img] = q[s, :, img], k[s, :, img]
        else:
            q2[t], k2[t] = q[s], k[s]
        key = (call.kind, call.layer) if call.is_dit else ("attn1",) + tuple(call.site.key)
        with self.lock:
            self.applied.setdefault(key, set()).add(call.step)
        return Replace(t, q2, k2, v)
