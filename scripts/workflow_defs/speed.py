"""Workflows of the speed nodes (DeepCache, Block Cache, ToDo, TGATE): the same seed sampled plainly and with the
cache, saved side by side (first image plain, second cached) so the cost of the speed-up is visible."""
from .common import FAMILIES, builder, checkpoint, empty_latent, note, text

PROMPT = "a photo of a red apple on a wooden table, soft daylight"


# Block Cache serves DiTs only: its toy run loads the tiny SD3 transformer (and its 16-channel VAE) built in
# code instead of the toy UNet, with random weights (the run checks the graph, its images are noise).
DIT_TOY = {"type": "EditKitTinyModelLoader", "inputs": {"parameterization": "sd3 (MMDiT)", "seed": 0},
           "slots": {"0": 0, "1": 1, "2": 2}, "resolution": 1024}


def _loader(b, family):
    if family == "sd3-dit":
        return b.add("CheckpointLoaderSimple", title="Load Checkpoint", col=0, toy=DIT_TOY, ckpt_name=FAMILIES["sd3"][0])
    return checkpoint(b, family)


def _compare(family, node, widgets, what, steps_text, defaults, prefix, steps, cfg, sampler="euler"):
    b = builder()
    dit = family == "sd3-dit"
    family = "sd3" if dit else family
    note(b, family, what, steps_text, defaults)
    ld = _loader(b, "sd3-dit" if dit else family)
    pos = text(b, ld.out("clip"), PROMPT, "Prompt")
    neg = text(b, ld.out("clip"), "", "Negative prompt")
    lat = empty_latent(b, family, title="Empty Latent")
    fast = b.add(node, **widgets)
    b.connect(ld.out("model"), fast, "model")
    images = []
    for label, model in (("plain", ld.out("model")), ("cached", fast.out(0))):
        ks = b.add("KSampler", title=f"Sample ({label})", seed=7, steps=steps, cfg=cfg,
                   sampler_name=sampler, scheduler="normal", denoise=1.0)
        b.connect(model, ks, "model")
        b.connect(pos.out(0), ks, "positive")
        b.connect(neg.out(0), ks, "negative")
        b.connect(lat.out(0), ks, "latent_image")
        dec = b.add("VAEDecode", title=f"Decode ({label})")
        b.connect(ks.out(0), dec, "samples")
        b.connect(ld.out("vae"), dec, "vae")
        images.append(dec)
    both = b.add("ImageBatch", title="Plain | cached")
    b.connect(images[0].out(0), both, "image1")
    b.connect(images[1].out(0), both, "image2")
    save = b.add("SaveImage", title="Save plain and cached", filename_prefix=prefix)
    b.connect(both.out(0), save, "images")
    return b.build()


def deepcache(family="sd15"):
    return _compare(family, "EditKitDeepCache", dict(cache_interval=3, cache_branch=0, schedule="uniform",
                                                     start_percent=0.0, end_percent=1.0),
                    "DeepCache: reuse the UNet's deep features between key steps",
                    ["**Prompt**: anything; both samplers use the same seed.",
                     "**cache_interval** N: the whole UNet runs every N-th step (larger = faster, further from plain).",
                     "Compare the two saved images (plain first) and the run times in the console."],
                    "N = 3, branch 0, uniform; 50 steps, CFG 7.5 (Ma et al. 2024).", "editkit_deepcache", 50, 7.5)


def blockcache(family="sd3-dit"):
    return _compare(family, "EditKitBlockCache", dict(mode="threshold", threshold=0.08, cache_interval=2,
                                                      start_percent=0.0, end_percent=1.0),
                    "Block Cache: reuse the DiT's block residuals where they change little",
                    ["**Prompt**: anything; both samplers use the same seed. Works on SD3 / SD3.5 and Flux "
                     "(for SD1.5 / SDXL UNets use DeepCache).",
                     "**threshold**: larger = more steps reuse the cached residual (faster, further from plain); "
                     "or pick mode uniform and a cache_interval for a fixed schedule.",
                     "Compare the two saved images (plain first) and the run times in the console."],
                    "threshold 0.08 on the first block's residual (First-Block-Cache); 28 steps, CFG 4.5.",
                    "editkit_blockcache", 28, 4.5)


def todo(family="sd15"):
    return _compare(family, "EditKitToDo", dict(downsample_factor=2, downsample_factor_level_2=1, method="nearest"),
                    "ToDo: cheaper self-attention by downsampling its keys and values",
                    ["**Prompt**: anything; both samplers use the same seed.",
                     "Gains grow with resolution: try 1024 px or more on SD1.5 / 2048 px on SDXL.",
                     "Compare the two saved images (plain first)."],
                    "factor 2 at the finest level, nearest; 25 steps, CFG 7.5 (Smith et al. 2024).", "editkit_todo", 25, 7.5)


def tgate(family="sd15"):
    return _compare(family, "EditKitTGATE", dict(gate_step=10, average_cond_uncond=True),
                    "TGATE: cache cross-attention after the semantic phase",
                    ["**Prompt**: anything; both samplers use the same seed.",
                     "**gate_step**: steps with full cross-attention (must not exceed the sampler's steps).",
                     "Compare the two saved images (plain first)."],
                    "gate step 10 of 25, CFG 7.5 (Zhang et al. 2024).", "editkit_tgate", 25, 7.5)


WORKFLOWS = {
    "deepcache": ("Speed - DeepCache", deepcache),
    "blockcache": ("Speed - Block cache", blockcache),
    "todo": ("Speed - ToDo", todo),
    "tgate": ("Speed - TGATE", tgate),
}
