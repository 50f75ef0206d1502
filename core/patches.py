"""Patch composition: install EditKit patches on a model clone without evicting whoever was there.

ComfyUI has one-slot hooks (an attn1/attn2 replace per block key, the attention override, the CFG
function, the UNet function wrapper). Every helper here reads the previous occupant and hands it
to the new patch as `prev`, so EditKit and other packs stack. Patch objects are immutable after
install: ComfyUI 0.3.x deep-copies them on clone and ComfyUI >= 0.4 shares them between clones.
"""
from __future__ import annotations

from typing import Callable, Optional


class SharedPatch:
    """Base for patch objects: never copied (0.3.x deep-copies model_options on clone) and device-moves are no-ops."""

    def __deepcopy__(self, memo):
        return self

    def to(self, *args, **kwargs):
        return self


def default_attention(q, k, v, extra: dict, mask=None):
    """ComfyUI's own optimized attention on projected (B, L, heads*dim) q/k/v, as the unpatched layer calls it."""
    from comfy.ldm.modules.attention import optimized_attention, optimized_attention_masked
    fn = optimized_attention if mask is None else optimized_attention_masked
    kwargs = {"attn_precision": extra.get("attn_precision"), "transformer_options": extra}
    if mask is not None:
        return fn(q, k, v, extra["n_heads"], mask, **kwargs)
    return fn(q, k, v, extra["n_heads"], **kwargs)


def call_attention(prev: Optional[Callable], q, k, v, extra: dict):
    """Run the rest of an attn replace chain: the previous occupant if any, else ComfyUI's attention."""
    if prev is not None:
        return prev(q, k, v, extra)
    return default_attention(q, k, v, extra)


def _transformer_options(m) -> dict:
    return m.model_options.setdefault("transformer_options", {})


def previous_attn_replace(m, kind: str, key: tuple):
    """The replace patch ComfyUI would call for this layer now (3-tuple key first, then the 2-tuple)."""
    table = _transformer_options(m).get("patches_replace", {}).get(kind, {})
    if len(key) == 3 and key in table:
        return table[key]
    return table.get(tuple(key[:2]))


def chain_attn_replace(m, kind: str, key: tuple, make: Callable[[Optional[Callable]], Callable]) -> None:
    """Install make(prev) as the `kind` ("attn1"/"attn2") replace patch at key (block, number, depth)."""
    prev = previous_attn_replace(m, kind, key)
    fn = make(prev)
    setter = m.set_model_attn1_replace if kind == "attn1" else m.set_model_attn2_replace
    if len(key) == 3:
        setter(fn, key[0], key[1], key[2])
    else:
        setter(fn, key[0], key[1])


def chain_attention_override(m, make: Callable[[Optional[Callable]], Callable]) -> None:
    """Install an attention override (every attention call of any model, incl. DiTs), chaining the previous one.

    The override has ComfyUI's signature fn(func, q, k, v, heads, **kwargs). `prev` has the same
    signature; call `next_attention(prev, func)` to get a plain attention callable for the rest of the chain.
    """
    to = _transformer_options(m)
    prev = to.get("optimized_attention_override")
    to["optimized_attention_override"] = make(prev)


def next_attention(prev: Optional[Callable], func: Callable) -> Callable:
    if prev is None:
        return func

    def run(*args, **kwargs):
        return prev(func, *args, **kwargs)
    return run


def chain_dit_block_replace(m, kind: str, index: int, make: Callable[[Optional[Callable]], Callable]) -> None:
    """Install a DiT ("dit" double_block/single_block) replace patch chaining the previous one.

    ComfyUI calls patch(args, {"original_block": fn}); make(prev) receives the previous patch (or
    None) and should call `call_dit_block(prev, args, extra)` for the default behaviour.
    """
    table = _transformer_options(m).get("patches_replace", {}).get("dit", {})
    prev = table.get((kind, index))
    m.set_model_patch_replace(make(prev), "dit", kind, index)


def call_dit_block(prev: Optional[Callable], args: dict, extra: dict):
    if prev is not None:
        return prev(args, extra)
    return extra["original_block"](args)


def default_cfg(args: dict):
    """ComfyUI's CFG in the "x - denoised" space that sampler_cfg_function works in."""
    return args["uncond"] + (args["cond"] - args["uncond"]) * args["cond_scale"]


def chain_cfg_function(m, make: Callable[[Optional[Callable]], Callable], disable_cfg1_optimization: bool = False) -> None:
    """Install make(prev) as the sampler CFG function; `prev(args)` (or default_cfg) is the rest of the chain."""
    prev = m.model_options.get("sampler_cfg_function")
    m.set_model_sampler_cfg_function(make(prev), disable_cfg1_optimization=disable_cfg1_optimization)


def call_cfg(prev: Optional[Callable], args: dict):
    return prev(args) if prev is not None else default_cfg(args)


def chain_unet_wrapper(m, make: Callable[[Callable], Callable]) -> None:
    """Install a model_function_wrapper; make(call_next) returns fn(apply_model, args).

    call_next(apply_model, args) runs the previous wrapper if there was one, else the model itself.
    """
    prev = m.model_options.get("model_function_wrapper")

    def call_next(apply_model, args):
        if prev is not None:
            return prev(apply_model, args)
        return apply_model(args["input"], args["timestep"], **args["c"])

    m.set_model_unet_function_wrapper(make(call_next))


def add_wrapper(m, wrapper_type: str, key: str, fn: Callable) -> None:
    """Keyed wrappers chain natively in ComfyUI; this only namespaces the key."""
    m.add_wrapper_with_key(wrapper_type, f"editkit.{key}", fn)


def add_callback(m, call_type: str, key: str, fn: Callable) -> None:
    m.add_callback_with_key(call_type, f"editkit.{key}", fn)
