"""Regional attention on DiT joint attention (SD3, Flux): the text part.

Each region's prompt tokens are appended to the model's text context (an APPLY_MODEL wrapper, so every
block's own text projections, norms and modulation process them like prompt tokens; Flux gives them
text position ids like the prompt's), and every joint attention call (double and single blocks, through
the attention controller's override) gets the masked-cross-attention bias of
`regional_attention.masked_factors` (the one owner of that mask, shared with the UNet path):

* image token p sees region r's tokens only inside region r; the global prompt everywhere (or only outside
  every region); image -> image attention unchanged;
* text -> image / text -> text rows: the global prompt's tokens never see region tokens (they stay what
  they would be without regions given the same image tokens, so a region prompt reaches image tokens
  outside its region only indirectly, through the image tokens inside it); region r's tokens see the global
  prompt, themselves and every image token (only image tokens inside region r read them);
* uncond rows: image rows never see region tokens (the negative prompt is unchanged).

The bias is rank (regions + 2) and rides on extra channels of q/k (`lowrank_augment`), so the call goes
through ComfyUI's optimized attention; no attention matrix is formed. DenseDiffusion mode is UNet-only.
"""
from __future__ import annotations

import torch

from ..attention import controller
from ..core.errors import EditKitInputError
from ..core.introspect import dit_patch_size
from ..core.patches import add_wrapper
from ..attention.bias import lowrank_augment
from .regional_attention import RegionalAttention, masked_factors

MARK = "editkit_regional_joint"


class RegionalJoint(controller.Technique):
    name = "regional_joint"
    uses_dit = True

    def __init__(self, regional: RegionalAttention):
        super().__init__()
        self.regional = regional

    def wants_dit_call(self, call) -> bool:
        return call.kind == "joint" and MARK in call.extra

    def attention(self, call, q, k, v):
        mark = call.extra.get(MARK)
        reg = self.regional
        if mark is None or not reg.active(call.extra):
            return None
        base, lens, shape = mark
        txt = base + sum(lens)
        b, heads, lq, d = q.shape
        if lq <= txt or k.shape[2] != lq:
            return None
        img = lq - txt
        ex = {"original_shape": shape, "cond_or_uncond": call.extra.get("cond_or_uncond")}
        m, _ = reg.query_masks(ex, b, img, q.device, torch.float32)
        starts = [base + sum(lens[:i]) for i in range(len(lens))]
        qf, kf = masked_factors((m > 0.5).float(), base, starts, lens, lq, reg.global_in_regions, q_text=txt)
        t = lambda x: x.transpose(1, 2)
        kw = dict(call.kwargs)
        qa, ka, va = lowrank_augment(t(q), t(k), t(v), qf, kf, kw.get("scale"))
        kw["skip_reshape"] = True
        kw["skip_output_reshape"] = True
        out = call.func(t(qa), t(ka), t(va), heads, **kw)[..., :d]        # (B, H, L, d)
        if not call.kwargs.get("skip_output_reshape"):
            out = out.transpose(1, 2).reshape(b, lq, heads * d)
        return controller.Rows(list(range(b)), out)


def _context_wrapper(regional: RegionalAttention, patch: int):
    def wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
        if c_crossattn is None or transformer_options is None or not regional.active(transformer_options):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        if kwargs.get("attention_mask") is not None:
            raise EditKitInputError(regional.node, "model", "this model's text prompt carries an attention mask (e.g. "
                                    "Chroma-style padding masks), which regional attention on joint attention does not "
                                    "extend to the region prompts", "use the model without its text attention mask")
        dm = executor.class_obj.diffusion_model
        b = c_crossattn.shape[0]
        toks = [r.context.to(device=c_crossattn.device, dtype=c_crossattn.dtype).expand(b, -1, -1) for r in regional.regions]
        base = c_crossattn.shape[1] + (getattr(dm, "register_length", 0) or 0)
        h, w = x.shape[-2], x.shape[-1]
        # the region masks at the image-token grid: a "latent" of the token grid's size times the patch
        shape = (b, x.shape[1], -(-h // patch) * patch, -(-w // patch) * patch)
        transformer_options[MARK] = (base, tuple(t_.shape[1] for t_ in toks), shape)
        ctx = torch.cat([c_crossattn, *toks], dim=1)
        try:
            return executor(x, t, c_concat, ctx, control, transformer_options, **kwargs)
        finally:
            transformer_options.pop(MARK, None)
    return wrapper


def install(m, regional: RegionalAttention) -> dict:
    """Install on a DiT clone: the context wrapper (outermost, so the controller sees the full text) and the
    joint-attention bias through the attention controller."""
    import comfy.patcher_extension as pe
    patch = dit_patch_size(m.model.diffusion_model)
    add_wrapper(m, pe.WrappersMP.APPLY_MODEL, f"regional_joint.context.{id(regional)}", _context_wrapper(regional, patch))
    return controller.install(m, RegionalJoint(regional))
