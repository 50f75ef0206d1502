"""Shared test utilities (imported by test modules as `helpers`)."""
import torch


def sample_ksampler(model, positive, negative, latent, seed=1, steps=6, cfg=5.0, sampler="euler", scheduler="normal", denoise=1.0):
    import nodes
    return nodes.common_ksampler(model, seed, steps, cfg, sampler, scheduler, positive, negative, {"samples": latent},
                                 denoise=denoise, disable_noise=False)[0]["samples"]


def sample_custom(model, positive, negative, noise_obj, latent_dict, sigmas, cfg=5.0, sampler="euler"):
    """SamplerCustomAdvanced's path: CFGGuider + sampler + sigmas + NOISE."""
    import comfy.samplers
    import comfy.sample
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    latent = comfy.sample.fix_empty_latent_channels(model, latent_dict["samples"])
    noise = noise_obj.generate_noise({**latent_dict, "samples": latent})
    return guider.sample(noise, latent, comfy.samplers.sampler_object(sampler), sigmas, seed=noise_obj.seed)


def node_out(result):
    """The output tuple of a V3 node's execute()."""
    return result.result if hasattr(result, "result") else result


def flow_cond(batch=1, tokens=7, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, tokens, dim, generator=g), {"pooled_output": torch.randn(batch, dim, generator=g)}]]


def flux_pair_run(model, clip, src, tgt, steps=3):
    """A source/target prompt pair sampled together on a 16-channel 8x8 latent (tiny Flux), cfg 1."""
    import nodes
    from editkit.nodes.attention_control import encode_batch
    cond = encode_batch(clip, [src, tgt])
    lat = {"samples": torch.zeros(2, 16, 8, 8), "batch_index": [0, 0]}
    return nodes.common_ksampler(model, 1, steps, 1.0, "euler", "simple", cond, cond, lat)[0]["samples"]
