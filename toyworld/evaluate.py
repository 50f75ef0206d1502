"""Evaluation on the toy world: batched txt2img through ComfyUI's sampler and accuracy against captions
(the model card's position-free reading). Scoring and image metrics: toyworld/scoring.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import checker, scoring, world


def encode_batch(clip, prompts: list[str]):
    """CONDITIONING for a batch of prompts (one (B, 77, C) tensor), as CLIPTextEncode builds per prompt."""
    conds = []
    for p in prompts:
        c = clip.encode_from_tokens_scheduled(clip.tokenize(p))
        conds.append(c[0][0])
    return [[torch.cat(conds), {}]]


def seed_noise(shape, seeds: list[int]) -> torch.Tensor:
    """Per-sample noise identical to KSampler's with `seed` on a batch of one."""
    import comfy.sample
    return torch.cat([comfy.sample.prepare_noise(torch.zeros((1,) + tuple(shape)), int(s)) for s in seeds])


def txt2img(model, clip, vae, prompts: list[str], seeds: list[int], steps: int = 20, cfg: float = 5.0,
            sampler: str = "euler", scheduler: str = "normal", negative: str = "", batch: int = 16,
            size: int = world.IMAGE_SIZE, terms=None) -> torch.Tensor:
    """(N, H, W, 3) images; image i is what KSampler(seed=seeds[i]) makes of prompts[i] at batch size 1.

    With `terms` (a tuple of guidance.terms.Term, possibly empty) sampling goes through EditKitGuider's
    GuidanceGuider instead, as SamplerCustomAdvanced with BasicScheduler and RandomNoise(seed) would run it."""
    import comfy.model_management
    import comfy.sample
    import comfy.samplers
    assert len(prompts) == len(seeds)
    out = []
    lat_shape = (4, size // 8, size // 8)
    for i in range(0, len(prompts), batch):
        ps, ss = prompts[i:i + batch], seeds[i:i + batch]
        pos = encode_batch(clip, ps)
        neg = encode_batch(clip, [negative] * len(ps))
        noise = seed_noise(lat_shape, ss)
        latent = torch.zeros_like(noise)
        if terms is None:
            samples = comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, pos, neg, latent,
                                          disable_pbar=True, seed=int(ss[0]))
        else:
            from ..guidance.guider import GuidanceGuider
            guider = GuidanceGuider(model, tuple(terms))
            guider.set_conds(pos, neg)
            guider.set_cfg(cfg)
            sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).cpu()
            samples = guider.sample(noise, latent, comfy.samplers.sampler_object(sampler), sigmas, disable_pbar=True,
                                    seed=int(ss[0]))
            samples = samples.to(comfy.model_management.intermediate_device())
        out.append(vae.decode(samples).float().cpu())
    return torch.cat(out)


@dataclass
class Accuracy:
    n: int
    color: float
    shape: float
    background: float
    count: float
    all: float

    def row(self) -> dict:
        return {"n": self.n, "color": self.color, "shape": self.shape, "background": self.background,
                "count": self.count, "all": self.all}


def accuracy(images, captions: list[str]) -> Accuracy:
    vs = [checker.check(images[i], c) for i, c in enumerate(captions)]
    n = len(vs)
    return Accuracy(n, sum(v.colors_ok for v in vs) / n, sum(v.shapes_ok for v in vs) / n,
                    sum(v.background_ok for v in vs) / n, sum(v.count_ok for v in vs) / n, sum(v.ok for v in vs) / n)


def eval_prompts(kind: str, n: int, seed0: int = 10_000) -> tuple[list[str], list[int]]:
    """Fixed evaluation sets: 'heldout' (single-object triples never trained), 'single' (trained
    single-object triples), 'pair' (two-object captions). Returns prompts and sampler seeds."""
    prompts, seeds = [], []
    if kind == "heldout":
        triples = world.held_out_triples()
        for i in range(n):
            c, s, bg = triples[i % len(triples)]
            prompts.append(world.caption_for(bg, [(c, s)]))
            seeds.append(seed0 + i)
        return prompts, seeds
    for i in range(n):
        sc = world.sample_scene(seed0 + 7919 * i + 3, n_objects=1 if kind == "single" else 2, split="train")
        prompts.append(sc.caption)
        seeds.append(seed0 + i)
    return prompts, seeds


def evaluate_txt2img(model, clip, vae, n_heldout: int = 120, n_single: int = 96, n_pair: int = 48, **kw) -> dict:
    """Accuracy rows for the model card: held-out single-object, trained single-object, two-object captions."""
    res = {}
    for kind, n in (("heldout", n_heldout), ("single", n_single), ("pair", n_pair)):
        if n <= 0:
            continue
        prompts, seeds = eval_prompts(kind, n)
        imgs = txt2img(model, clip, vae, prompts, seeds, **kw)
        res[kind] = accuracy(imgs, prompts).row()
    return res


# Image metrics live with the scorer (numpy only); re-exported here for existing callers.
psnr = scoring.psnr
dilate = scoring.dilate
