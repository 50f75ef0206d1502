"""Prior preservation (DreamBooth): class images the model itself generates for the class prompt, cached.

The cache holds the latents of the last few requests, keyed by the model object and its patches, the
class conditioning's tensors, count, size, steps, CFG and seed; a new model or prompt misses it."""
from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch

_CACHE: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_CACHE_SIZE = 4


def _digest(cond) -> str:
    h = hashlib.sha1()
    for c in cond:
        t = c[0].detach().float().cpu().contiguous()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def cache_key(model, positive, negative, shape, n, steps, cfg, seed) -> tuple:
    patches = tuple(sorted((k, len(v)) for k, v in model.patches.items()))
    return (id(model.model), patches, _digest(positive), _digest(negative), tuple(shape), int(n), int(steps),
            float(cfg), int(seed))


def class_latents(model, positive, negative, shape, n: int, steps: int = 30, cfg: float = 7.5, seed: int = 0,
                  sampler: str = "euler", scheduler: str = "normal") -> tuple[torch.Tensor, bool]:
    """(n latents in LATENT space (what VAE Encode gives), cache hit?) sampled with ComfyUI's sampler."""
    key = cache_key(model, positive, negative, shape, n, steps, cfg, seed)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key].clone(), True
    import comfy.sample
    out = []
    for i in range(int(n)):
        latent = torch.zeros((1,) + tuple(shape))
        noise = comfy.sample.prepare_noise(latent, int(seed) + i)
        out.append(comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, positive, negative, latent,
                                       denoise=1.0, seed=int(seed) + i).float().cpu())
    lat = torch.cat(out)
    _CACHE[key] = lat
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return lat.clone(), False
