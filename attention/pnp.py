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
from ..core.features import Hook
from ..core.patches import SharedPatch
from .controller import Call, Replace, Technique, step_of


def default_blocks(layout) -> tuple[int, int]:
    """(feature block, first Q/K block) from the layout."""
    out = [s for s in layout.sites if s.block == "output"]
    if not out:
        return -1, -1
    coarsest = max(s.downsample for s in out)
    level = sorted({s.number for s in out if s.downsample == coarsest})
    fb = level[len(level) // 2]
    return fb, fb


def default_dit_block(layout) -> int:
    """The middle double block of a DiT."""
    n = sum(1 for b in layout.dit_blocks if b.kind == "double_block")
    return n // 2 if n else -1


def _source_pairs(transformer_options, batch: int):
    chunks = branch_layout(transformer_options.get("cond_or_uncond"), batch, transformer_options.get(BRANCHES_KEY))
    return [pr for c in chunks for pr in c.pairs]


class _Inject(SharedPatch):
    """Feature hook (core.features): the target rows get the source rows' `names` entries."""

    def __init__(self, tech: "PlugAndPlay", names: tuple):
        self.tech, self.names = tech, names

    def __call__(self, tensors: dict, transformer_options: dict):
        tech = self.tech
        step, _, p = step_of(transformer_options)
        if not p < tech.feature_fraction:
            return None
        pairs = _source_pairs(transformer_options, tensors[self.names[0]].shape[0])
        if not pairs:
            return None
        t, s = [pr[0] for pr in pairs], [pr[1] for pr in pairs]
        out = {}
        for name in self.names:
            x = tensors[name].clone()
            x[t] = tensors[name][s]
            out[name] = x
        with tech.lock:
            tech.applied.setdefault(("features", tech.feature_block), set()).add(step)
        return out


class PlugAndPlay(Technique):
    name = "plug_and_play"
    uses_dit = True

    def __init__(self, feature_block: int, feature_fraction: float, attention_block: int, attention_fraction: float):
        super().__init__()
        self.feature_block, self.feature_fraction = feature_block, feature_fraction
        self.attention_block, self.attention_fraction = attention_block, attention_fraction
        self.applied: dict = {}

    def begin_run(self):
        super().begin_run()
        with self.lock:
            self.applied = {}

    def attn1_sites(self, layout):
        if self.attention_fraction <= 0 or self.attention_block < 0:
            return []
        return [s for s in layout.sites if s.block == "output" and s.number >= self.attention_block]

    def feature_hooks(self, layout):
        # UNet: the inputs of decoder block feature_block (previous block's output + skip), so its ResBlock
        # computes the source's residual features; DiT: the image tokens leaving double block feature_block.
        if self.feature_fraction <= 0 or self.feature_block < 0:
            return []
        if layout.architecture == "unet":
            return [(Hook("output_entry", self.feature_block), _Inject(self, ("h", "hsp")))]
        return [(Hook("double_block", self.feature_block), _Inject(self, ("img",)))]

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
