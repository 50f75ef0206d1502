"""Patch composition: two patches on one single-slot hook both take effect; the input model is untouched."""
import copy

import torch

from editkit.core import patches as P
from editkit.core.introspect import attention_layout
from ek_helpers import sample_ksampler


def _options_snapshot(m):
    to = m.model_options.get("transformer_options", {})
    return (sorted(to.get("patches_replace", {}).get("attn2", {})), "optimized_attention_override" in to,
            m.model_options.get("sampler_cfg_function"), m.model_options.get("model_function_wrapper"))


def test_two_attn2_replace_patches_both_run(tiny_eps, encode):
    key = attention_layout(tiny_eps).sites[0].key
    before = _options_snapshot(tiny_eps)
    calls = []

    def make(tag, scale):
        def mk(prev):
            def fn(q, k, v, extra):
                calls.append(tag)
                return P.call_attention(prev, q, k, v, extra) * scale
            return fn
        return mk

    # "another pack" patches first (2-tuple key, as many packs do), EditKit chains on top (3-tuple key)
    other = tiny_eps.clone()
    other.set_model_attn2_replace(make("other", 1.0)(None), key[0], key[1])
    ours = other.clone()
    P.chain_attn_replace(ours, "attn2", key, make("editkit", 1.0))
    lat = torch.zeros(1, 4, 8, 8)
    pos, neg = encode("a red circle"), encode("")
    out = sample_ksampler(ours, pos, neg, lat, steps=2)
    assert "other" in calls and "editkit" in calls
    assert calls.index("editkit") < calls.index("other")  # ours wraps theirs
    # identity patches leave the result bit-identical to no patch at all
    plain = sample_ksampler(tiny_eps, pos, neg, lat, steps=2)
    assert torch.equal(out, plain)
    # and scaling in both patches multiplies: both really take effect
    calls.clear()
    other2 = tiny_eps.clone()
    other2.set_model_attn2_replace(make("other", 0.5)(None), key[0], key[1])
    ours2 = other2.clone()
    P.chain_attn_replace(ours2, "attn2", key, make("editkit", 0.0))
    only_theirs = sample_ksampler(other2, pos, neg, lat, steps=2)
    both = sample_ksampler(ours2, pos, neg, lat, steps=2)
    assert not torch.equal(both, only_theirs) and not torch.equal(only_theirs, plain)
    assert _options_snapshot(tiny_eps) == before


def test_attention_override_chain(tiny_flux):
    import comfy.samplers
    from ek_helpers import flow_cond
    seen = []

    def make(tag):
        def mk(prev):
            def override(func, *args, **kwargs):
                seen.append(tag)
                return P.next_attention(prev, func)(*args, **kwargs)
            return override
        return mk
    m = tiny_flux.clone()
    P.chain_attention_override(m, make("first"))
    m2 = m.clone()
    P.chain_attention_override(m2, make("second"))
    g = comfy.samplers.CFGGuider(m2)
    c = flow_cond()
    g.set_conds(c, c)
    g.set_cfg(1.0)
    lat = torch.zeros(1, 16, 8, 8)
    sig = comfy.samplers.calculate_sigmas(m2.get_model_object("model_sampling"), "simple", 1)
    g.sample(torch.randn_like(lat), lat, comfy.samplers.sampler_object("euler"), sig, seed=0)
    assert seen[:2] == ["second", "first"] and seen.count("first") == seen.count("second")
    assert "optimized_attention_override" not in tiny_flux.model_options["transformer_options"]


def test_cfg_function_and_unet_wrapper_chain(tiny_eps, encode):
    seen = []
    m = tiny_eps.clone()
    m.set_model_sampler_cfg_function(lambda args: (seen.append("theirs"), P.default_cfg(args))[1])

    def mk(prev):
        def cfg(args):
            seen.append("ours")
            return P.call_cfg(prev, args)
        return cfg
    P.chain_cfg_function(m, mk)

    def mkw(call_next):
        def wrapper(apply_model, args):
            seen.append("wrap")
            return call_next(apply_model, args)
        return wrapper
    m.set_model_unet_function_wrapper(lambda apply_model, args: (seen.append("theirwrap"), apply_model(args["input"], args["timestep"], **args["c"]))[1])
    P.chain_unet_wrapper(m, mkw)
    pos, neg = encode("a red circle"), encode("")
    lat = torch.zeros(1, 4, 8, 8)
    out = sample_ksampler(m, pos, neg, lat, steps=2)
    assert {"theirs", "ours", "wrap", "theirwrap"} <= set(seen)
    assert torch.equal(out, sample_ksampler(tiny_eps, pos, neg, lat, steps=2))
    assert "sampler_cfg_function" not in tiny_eps.model_options


def test_shared_patch_survives_clone_without_copy():
    class Holder(P.SharedPatch):
        def __init__(self):
            self.t = torch.zeros(3)
    h = Holder()
    assert copy.deepcopy({"x": [h]})["x"][0] is h
