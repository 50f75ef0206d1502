"""Personalization table on the toy world: `bench/quality.py --only personalization`, or

    .venv/bin/python bench/quality_personalization.py [--methods ti,db,core,cd] [--steps-ti N] [--steps-lora N]
        [--lora-targets attention|all] [--rank R] [--n-eval 4] [--write-readme]   (--fusion-only: the merge rows)

The concept is a shape the toy model never saw: an orange five-pointed star (`world.BASE.with_shape("star",
...)`; the toy model's training data has circles, squares and triangles only). Six rendered images of it
(0.65-0.80 of the frame: smaller stars do not survive the toy VAE) on three training backgrounds teach it,
captioned "an orange <token> on a <bg> background", to textual inversion, DreamBooth-LoRA and Custom Diffusion
(the training core, on the trained toy model), and to core ComfyUI's TrainLoraNode (same images, captions and
steps). Concept accuracy: `scoring.score_prompt` with the extended vocabulary of "an orange star on a <bg>
background" over held-out backgrounds (never in the training images), n = backgrounds x seeds. Prior
preservation: the base model's held-out single-object accuracy (world.held_out_triples) without and with the
trained weights loaded. Training time is wall time on this host; peak memory is the row's own peak RSS above its
start (bench/common.PeakRSS). The fusion rows merge two colour concepts (see FIRST_COLOR).

Results: bench/results/quality/personalization.json and cases/personalization*.csv (a --methods subset replaces
only its own rows); --write-readme rewrites the README between <!-- bench-quality-personalization:begin --> and
<!-- ...:end -->.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from common import PeakRSS, boot, replace_block, write_cases  # noqa: E402

boot()

from editkit.builtin_models import toy  # noqa: E402
from editkit.toyworld import scoring, world  # noqa: E402

RESULTS = os.path.join(HERE, "results", "quality")
README = os.path.join(ROOT, "README.md")
MARK_BEGIN, MARK_END = "<!-- bench-quality-personalization:begin -->", "<!-- bench-quality-personalization:end -->"
CONCEPT_COLOR, CONCEPT_SHAPE = "orange", "star"
TRAIN_BACKGROUNDS = ("white", "blue", "black")
EVAL_BACKGROUNDS = ("green", "purple", "yellow", "red")
PLACEHOLDER, IDENTIFIER, INIT_WORD = "<star>", "sks", "circle"
# The token takes the shape word's place in the toy world's caption grammar ("a <colour> <shape> on a <bg>
# background"): "a <token> on a <bg> background" alone leaves the toy model without its colour slot and it
# misreads the background too (measured: 0/16 for every method).
PHRASE_A = "an orange {token}"
# The star's size as a fraction of the frame. The toy VAE (8x downsampling, 16x16 latents) rounds smaller stars
# off: a rendered star of 0.45-0.65 of the frame reads back as a star after encode/decode in 10/28 cases (as a
# circle or triangle otherwise); 0.65-0.80 in 28/28. Larger than the toy world's own single objects (0.30-0.60).
STAR_SIZE = (0.65, 0.80)


def star_inside(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A five-pointed star inscribed in the unit box (point up): crossing-number test on its 10 vertices."""
    k = np.arange(10)
    r = np.where(k % 2 == 0, 0.5, 0.2)
    ang = -np.pi / 2 + k * np.pi / 5
    px, py = 0.5 + r * np.cos(ang), 0.55 + r * np.sin(ang)
    inside = np.zeros(np.broadcast(u, v).shape, dtype=bool)
    for i in range(10):
        x1, y1, x2, y2 = px[i], py[i], px[(i + 1) % 10], py[(i + 1) % 10]
        cond = (y1 > v) != (y2 > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            xint = x1 + (v - y1) * (x2 - x1) / (y2 - y1)
        inside ^= cond & (u < xint)
    return inside


VOCAB = world.BASE.with_shape(CONCEPT_SHAPE, star_inside)


def training_scenes(n: int = 6, seed: int = 0, size: tuple = STAR_SIZE) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        s = int(round(rng.uniform(*size) * world.IMAGE_SIZE))
        x = int(rng.integers(world.MARGIN, world.IMAGE_SIZE - world.MARGIN - s + 1))
        y = int(rng.integers(world.MARGIN, world.IMAGE_SIZE - world.MARGIN - s + 1))
        obj = world.ToyObject(CONCEPT_SHAPE, CONCEPT_COLOR, x, y, s)
        out.append(world.Scene(TRAIN_BACKGROUNDS[i % len(TRAIN_BACKGROUNDS)], (obj,), i, world.IMAGE_SIZE, VOCAB))
    return out


def _sample(model, clip, vae, conds, seeds, steps, cfg):
    import comfy.sample
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    imgs = []
    for cond, seed in zip(conds, seeds):
        lat = torch.zeros(1, 4, world.IMAGE_SIZE // 8, world.IMAGE_SIZE // 8)
        noise = comfy.sample.prepare_noise(lat, seed)
        out = comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", cond, neg, lat, denoise=1.0, seed=seed,
                                  disable_pbar=True)
        imgs.append(vae.decode(out)[0].float().cpu().numpy())
    return imgs


def concept_accuracy(model, clip, vae, encode_prompt, n_seeds, steps, cfg, name):
    records = []
    for bg in EVAL_BACKGROUNDS:
        seeds = [1000 + i for i in range(n_seeds)]
        cond = encode_prompt(bg)
        for seed, img in zip(seeds, _sample(model, clip, vae, [cond] * n_seeds, seeds, steps, cfg)):
            spec = world.CaptionSpec(bg, ((CONCEPT_COLOR, CONCEPT_SHAPE),))
            sc = scoring.score_prompt(img, spec, vocab=VOCAB)
            records.append({"method": name, "background": bg, "seed": seed, **sc.record(), "ok": sc.ok, "why": sc.why})
    return records


def prior_accuracy(model, clip, vae, n, steps, cfg, name):
    triples = world.held_out_triples()[:n]
    prompts = [world.caption_for(bg, [(c, s)]) for c, s, bg in triples]
    conds = [clip.encode_from_tokens_scheduled(clip.tokenize(p)) for p in prompts]
    seeds = [2000 + i for i in range(len(prompts))]
    records = []
    for p, seed, img in zip(prompts, seeds, _sample(model, clip, vae, conds, seeds, steps, cfg)):
        sc = scoring.score_prompt(img, p)
        records.append({"method": name, "prompt": p, "seed": seed, **sc.record(), "ok": sc.ok, "why": sc.why})
    return records


def core_train_lora(model, clip, vae, images, captions, steps: int, lr: float, rank: int):
    """Core ComfyUI's `TrainLoraNode` (comfy_extras/nodes_train.py) as a graph runs it: its V3 execute with every
    input as a list (the node declares is_input_list), latents from the toy VAE's encode (ComfyUI applies
    process_latent_in itself), one CONDITIONING per caption from the toy CLIP, its defaults for what EditKit
    has no counterpart of (AdamW, MSE, bf16 training and LoRA dtypes, gradient checkpointing; it wraps every
    weight and bias of the UNet, LoRA alpha 1). The LoRA it outputs is applied by core's LoraModelLoader.

    Returns (model with the LoRA, losses, note). A single latent batch (one VAE Encode of the image batch)
    fails inside the node in 0.3.75 (its `multi_res` flag is only set for list inputs); the note says so and
    the row then passes the latents as a list of one-image latents, as a list-producing loader would."""
    from comfy_extras import nodes_train as NT
    with torch.inference_mode():
        lat = vae.encode(images)
    pos = [clip.encode_from_tokens_scheduled(clip.tokenize(c)) for c in captions]
    common = dict(model=[model], positive=pos, batch_size=[1], steps=[int(steps)], grad_accumulation_steps=[1],
                  learning_rate=[float(lr)], rank=[int(rank)], optimizer=["AdamW"], loss_function=["MSE"], seed=[0],
                  training_dtype=["bf16"], lora_dtype=["bf16"], algorithm=[list(NT.adapter_maps)[0]],
                  gradient_checkpointing=[True], existing_lora=["[None]"])
    note = ""
    try:
        NT.TrainLoraNode.execute(latents=[{"samples": lat}], **{**common, "steps": [1]})
    except Exception as e:     # noqa: BLE001 -- the row reports core's own error
        note = f"one latent batch: {type(e).__name__}: {e}; run with a list of {len(lat)} latents"
    out = NT.TrainLoraNode.execute(latents=[{"samples": x[None]} for x in lat], **common)
    _, lora, loss_map, _ = out.result
    trained = NT.LoraModelLoader.execute(model, lora, 1.0).result[0]
    return trained, list(loss_map["loss"]), note


def dreambooth_lora(model, conds: dict, examples: list, a):
    """(TrainableLora, loop result): the DreamBooth-LoRA rows' recipe (lora_keys(a.lora_targets), rank a.rank, a.steps_lora AdamW steps at a.lr_lora, seed 0)."""
    from editkit.training import lora as TL
    from editkit.training import loop
    lo = TL.TrainableLora(model, lora_keys(model, a.lora_targets), rank=a.rank, seed=0)
    res = loop.train(model, conds, examples, lo.parameters(),
                     loop.Settings(steps=a.steps_lora, learning_rate=a.lr_lora, seed=0), install=lo.install,
                     stop=lambda: False)
    return lo, res


def lora_keys(model, targets: str) -> list[str]:
    """The weights a DreamBooth-LoRA trains: the training core's recipe "attention" or "all" (every Linear and
    Conv weight of the UNet, as core's TrainLoraNode wraps)."""
    from editkit.training import lora as TL
    return TL.target_keys(model, targets)

def _loss_span(losses) -> list:
    return [round(float(np.mean(losses[:10])), 4), round(float(np.mean(losses[-10:])), 4)]


def run(a) -> dict:
    import comfy.utils
    from editkit.training import custom_diffusion as CD
    from editkit.training import loop
    from editkit.training import lora as TL
    from editkit.training import textual_inversion as TI
    comfy.utils.set_progress_bar_enabled(False)
    model, clip, vae = toy.load_toy()
    scenes = training_scenes(a.images)
    with torch.inference_mode():
        imgs = torch.from_numpy(np.stack([s.render() for s in scenes])).float()
        x0 = model.model.process_latent_in(vae.encode(imgs))
    rows, cases = [], []
    prior_n, steps, cfg = a.n_prior, a.sample_steps, a.cfg
    with torch.inference_mode():
        base_prior = prior_accuracy(model, clip, vae, prior_n, steps, cfg, "base")
    cases += base_prior
    base_rate = scoring.rate(r["ok"] for r in base_prior)
    only = set(a.methods.split(","))

    def caption(token, bg):
        return f"{PHRASE_A.format(token=token)} on a {bg} background"

    def ti_prompt(bg, vectors):
        cap = TI.prepare_caption(clip, caption(PLACEHOLDER, bg), PLACEHOLDER, INIT_WORD, 1)
        return clip.encode_from_tokens_scheduled(TI.tokens_with(cap, vectors))

    def id_prompt(bg):
        return clip.encode_from_tokens_scheduled(clip.tokenize(caption(IDENTIFIER, bg)))

    def add_row(method, settings, recs, prior, seconds, mem, losses, note=""):
        nonlocal cases
        cases += recs + (prior or [])
        rows.append({"method": method, "settings": settings, "concept": str(scoring.rate(r["ok"] for r in recs)),
                     "prior": (f"{scoring.rate(r['ok'] for r in prior)} vs base {base_rate}" if prior
                               else f"{base_rate} (model unchanged)"),
                     "train_seconds": round(seconds, 1), "peak_rss_mb": round(mem, 1), "loss": _loss_span(losses),
                     "note": note})
        print(json.dumps(rows[-1]), flush=True)

    caps = [caption(PLACEHOLDER, s.background) for s in scenes]
    inst = [caption(IDENTIFIER, s.background) for s in scenes]
    if "ti" in only:      # --- textual inversion
        with PeakRSS() as mem, torch.inference_mode():
            t0 = time.perf_counter()
            vectors, res = TI.train(model, clip, x0, caps, PLACEHOLDER, INIT_WORD,
                                    loop.Settings(steps=a.steps_ti, learning_rate=a.lr_ti, weight_decay=0.0, seed=0))
            seconds = time.perf_counter() - t0
        with torch.inference_mode():
            recs = concept_accuracy(model, clip, vae, lambda bg: ti_prompt(bg, vectors), a.n_eval, steps, cfg,
                                    "textual inversion")
        add_row("textual inversion", f"{a.steps_ti} steps, lr {a.lr_ti:g}, 1 vector from '{INIT_WORD}'", recs, None,
                seconds, mem.peak_mb, res.losses)

    def evaluate_lora(lo, label):
        """Concept accuracy and prior with a trained LoRA loaded as core Load LoRA would (the row's columns)."""
        trained, _ = TL.apply_saved(model, None, lo.state_dict(), 1.0, 0.0)
        with torch.inference_mode():
            return (concept_accuracy(trained, clip, vae, id_prompt, a.n_eval, steps, cfg, label),
                    prior_accuracy(trained, clip, vae, prior_n, steps, cfg, label + " prior"))

    if "db" in only:      # --- DreamBooth-LoRA (no class images: the prior column measures what that costs)
        conds = {f"c{i}": clip.encode_from_tokens_scheduled(clip.tokenize(c)) for i, c in enumerate(inst)}
        with PeakRSS() as mem, torch.inference_mode():
            t0 = time.perf_counter()
            lo, res = dreambooth_lora(model, conds, [loop.Example(x, f"c{i}") for i, x in enumerate(x0)], a)
            seconds = time.perf_counter() - t0
        recs, prior = evaluate_lora(lo, "DreamBooth-LoRA")
        add_row("DreamBooth-LoRA", f"{a.steps_lora} steps, lr {a.lr_lora:g}, rank {a.rank}, {a.lora_targets} "
                f"{'weights' if a.lora_targets == 'all' else 'projections'}, identifier '{IDENTIFIER}', no class images",
                recs, prior, seconds, mem.peak_mb, res.losses)

    if "dbp" in only:     # --- DreamBooth-LoRA with prior preservation: the model's own samples of other prompts
        from editkit.training import prior as TP
        neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        class_caps = [world.sample_scene(100 + i, 1, split="train").caption for i in range(a.class_images)]
        conds = {f"c{i}": clip.encode_from_tokens_scheduled(clip.tokenize(c)) for i, c in enumerate(inst)}
        conds.update({f"p{i}": clip.encode_from_tokens_scheduled(clip.tokenize(c)) for i, c in enumerate(class_caps)})
        with PeakRSS() as mem, torch.inference_mode():
            t0 = time.perf_counter()
            ex = [loop.Example(x, f"c{i}") for i, x in enumerate(x0)]
            for i in range(a.class_images):
                lat, _ = TP.class_latents(model, conds[f"p{i}"], neg, tuple(x0.shape[1:]), 1, steps, cfg, seed=500 + i)
                ex.append(loop.Example(model.model.process_latent_in(lat)[0], f"p{i}"))
            lo, res = dreambooth_lora(model, conds, ex, a)
            seconds = time.perf_counter() - t0
        recs, prior = evaluate_lora(lo, "DreamBooth-LoRA + class images")
        add_row("DreamBooth-LoRA + class images", f"as above + {a.class_images} class images (the model's own samples "
                "of training-split prompts, prior weight 1)", recs, prior, seconds, mem.peak_mb, res.losses)

    if "core" in only:    # --- core ComfyUI TrainLoraNode on the same images, captions and steps
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            try:
                core_model, losses, note = core_train_lora(model, clip, vae, imgs, inst, a.steps_lora, a.lr_lora, a.rank)
                err = None
            except Exception as e:    # noqa: BLE001 -- the row says why core cannot train this model
                err = f"{type(e).__name__}: {e}"
            seconds = time.perf_counter() - t0
        settings = (f"{a.steps_lora} steps, lr {a.lr_lora:g}, rank {a.rank} (alpha 1), every weight and bias, "
                    f"bf16, AdamW, MSE on x0, identifier '{IDENTIFIER}'")
        if err:
            rows.append({"method": "core TrainLoraNode", "settings": settings, "concept": f"cannot train: {err}",
                         "prior": "-", "train_seconds": round(seconds, 1), "peak_rss_mb": round(mem.peak_mb, 1),
                         "loss": [float("nan")] * 2, "note": err})
            print(json.dumps(rows[-1]), flush=True)
        else:
            with torch.inference_mode():
                recs = concept_accuracy(core_model, clip, vae, id_prompt, a.n_eval, steps, cfg, "core TrainLoraNode")
                prior = prior_accuracy(core_model, clip, vae, prior_n, steps, cfg, "core TrainLoraNode prior")
            add_row("core TrainLoraNode", settings, recs, prior, seconds, mem.peak_mb, losses, note)

    if "cd" in only:      # --- Custom Diffusion (cross-attention K/V + the token)
        with PeakRSS() as mem, torch.inference_mode():
            t0 = time.perf_counter()
            concept, diffs, res = CD.train(model, clip, x0, caps, PLACEHOLDER, INIT_WORD,
                                           loop.Settings(steps=a.steps_cd, learning_rate=a.lr_cd, seed=0),
                                           stop=lambda: False)
            seconds = time.perf_counter() - t0
        cd_model, _ = TL.apply_saved(model, None, diffs.state_dict(), 1.0, 0.0)
        cd_vec = {k: v.detach() for k, v in concept.vectors.items()}
        with torch.inference_mode():
            recs = concept_accuracy(cd_model, clip, vae, lambda bg: ti_prompt(bg, cd_vec), a.n_eval, steps, cfg,
                                    "Custom Diffusion")
            prior = prior_accuracy(cd_model, clip, vae, prior_n, steps, cfg, "Custom Diffusion prior")
        add_row("Custom Diffusion", f"{a.steps_cd} steps, lr {a.lr_cd:g}, K/V + token from '{INIT_WORD}', "
                "no class images", recs, prior, seconds, mem.peak_mb, res.losses)
    from common import host_line
    data = {"rows": rows, "images": a.images, "eval": len(EVAL_BACKGROUNDS) * a.n_eval, "prior_n": prior_n,
            "sample_steps": steps, "cfg": cfg, "host": host_line()}
    return data, cases


# Fusion: two new colours (the star cannot take part: at the toy world's two-object sizes, 0.25-0.42 of the frame,
# the toy VAE turns a rendered star into a blob in 28/28 cases, so no merge could show it). Each identifier takes
# the colour word's place ("a zwx square").
FIRST_COLOR, FIRST_SHAPE, FIRST_ID = "pink", "circle", "vrk"
SECOND_COLOR, SECOND_SHAPE, SECOND_ID = "teal", "square", "zwx"
VOCAB2 = world.BASE.with_color(FIRST_COLOR, (255, 120, 200)).with_color(SECOND_COLOR, (0, 150, 150))
PHRASE_1 = f"a {FIRST_ID} {FIRST_SHAPE}"
PHRASE_B = f"a {SECOND_ID} {SECOND_SHAPE}"


def colour_scenes(color: str, shape: str, n: int = 6, seed: int = 1) -> list:
    """A concept of a colour the toy model never saw, on one of its shapes, at its own single-object sizes."""
    return [world.Scene(s.background, (world.ToyObject(shape, color, *s.objects[0].box[:2], s.objects[0].size),),
                        s.seed, s.size, VOCAB2)
            for s in training_scenes(n, seed, size=world.SINGLE_SIZE)]


def _train_db(model, x0, captions, clip, a):
    from editkit.training import loop
    conds = {f"c{i}": clip.encode_from_tokens_scheduled(clip.tokenize(c)) for i, c in enumerate(captions)}
    lo, _ = dreambooth_lora(model, conds, [loop.Example(x, f"c{i}") for i, x in enumerate(x0)], a)
    return lo.state_dict()


def run_fusion(a) -> dict:
    """Two concepts trained separately (DreamBooth-LoRA each), merged three ways, scored on one two-object
    prompt per held-out background: both concepts must appear (scoring.score_prompt, extended vocabulary)."""
    import tempfile

    import comfy.sd
    import comfy.utils
    from editkit.lora import formats, fusion, merge
    comfy.utils.set_progress_bar_enabled(False)
    a = argparse.Namespace(**{**vars(a), "steps_lora": a.fusion_steps, "rank": a.fusion_rank,
                              "lora_targets": a.fusion_targets})
    model, clip, vae = toy.load_toy()
    sets = [(colour_scenes(FIRST_COLOR, FIRST_SHAPE, a.images, seed=2), PHRASE_1),
            (colour_scenes(SECOND_COLOR, SECOND_SHAPE, a.images, seed=1), PHRASE_B)]
    loras, t_train = [], []
    for scenes, phrase in sets:
        with torch.inference_mode():
            imgs = torch.from_numpy(np.stack([s.render() for s in scenes])).float()
            x0 = model.model.process_latent_in(vae.encode(imgs))
            t0 = time.perf_counter()
            caps = [f"{phrase} on a {s.background} background" for s in scenes]
            loras.append((_train_db(model, x0, caps, clip, a), caps))
            t_train.append(time.perf_counter() - t0)
    resolver = formats.KeyResolver(model)
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    tmp = tempfile.mkdtemp()
    merged, info = {}, {}
    with torch.inference_mode():
        concepts = [fusion.Concept(ident, sd, formats.parse(sd, resolver, ident),
                                   [(clip.encode_from_tokens_scheduled(clip.tokenize(c)), neg) for c in caps])
                    for (sd, caps), ident in zip(loras, (FIRST_ID, SECOND_ID))]
        t0 = time.perf_counter()
        rep = fusion.fuse_to_file(model, concepts, resolver,
                                  fusion.Capture(torch.zeros(1, 4, world.IMAGE_SIZE // 8, world.IMAGE_SIZE // 8),
                                                 steps=a.sample_steps, cfg=a.cfg), os.path.join(tmp, "fused.safetensors"),
                                  rank=0, dtype=torch.float32)
        info["ConceptFusion (Mix-of-Show, full rank)"] = (f"{time.perf_counter() - t0:.1f} s; output error "
                                                         + ", ".join(f"{100 * r:.1f} %" for r in rep.relative("fusion")))
        merged["ConceptFusion (Mix-of-Show, full rank)"] = comfy.utils.load_torch_file(rep.path)
        for method in ("concat", "ties"):
            path = os.path.join(tmp, f"{method}.safetensors")
            merge.merge_to_file([c.parsed for c in concepts], [1.0, 1.0], resolver,
                                       merge.MergeParams(method=method, dtype=torch.float32), path)
            merged[f"LoRA Merge {method}"] = comfy.utils.load_torch_file(path)
            info[f"LoRA Merge {method}"] = "output error " + ", ".join(f"{100 * r:.1f} %" for r in rep.relative(method))
        def score(m, name, text, objects, seed0):
            recs = []
            for bg in EVAL_BACKGROUNDS:
                seeds = [seed0 + i for i in range(a.n_eval)]
                cond = clip.encode_from_tokens_scheduled(clip.tokenize(text.format(bg=bg)))
                for seed, img in zip(seeds, _sample(m, clip, vae, [cond] * len(seeds), seeds, a.sample_steps, a.cfg)):
                    sc = scoring.score_prompt(img, world.CaptionSpec(bg, objects), vocab=VOCAB2)
                    recs.append({"method": name, "background": bg, "seed": seed, **sc.record(), "ok": sc.ok,
                                 "why": sc.why})
            return recs

        rows, cases = [], []
        pair = ((FIRST_COLOR, FIRST_SHAPE), (SECOND_COLOR, SECOND_SHAPE))
        for name, sd in merged.items():
            m, _ = comfy.sd.load_lora_for_models(model, None, sd, 1.0, 0.0)
            recs = score(m, name, f"{PHRASE_1} and {PHRASE_B} on a {{bg}} background", pair, 3000)
            cases += recs
            rows.append({"method": name, "both": str(scoring.rate(r["ok"] for r in recs)), "info": info[name]})
            print(json.dumps(rows[-1]), flush=True)
        # controls: each concept's own LoRA on its one-object prompt; the base model on a two-object prompt of
        # colours it knows (same shapes): what a merge could reach at best on this toy model
        for (sd, _), phrase, obj in zip(loras, (PHRASE_1, PHRASE_B), pair):
            m, _ = comfy.sd.load_lora_for_models(model, None, sd, 1.0, 0.0)
            name = f"control: the {obj[0]} {obj[1]} LoRA alone, \"{phrase} on a <bg> background\""
            recs = score(m, name, f"{phrase} on a {{bg}} background", (obj,), 3000)
            cases += recs
            rows.append({"method": name, "both": str(scoring.rate(r["ok"] for r in recs)), "info": "one concept"})
            print(json.dumps(rows[-1]), flush=True)
        known = (("white", FIRST_SHAPE), ("black", SECOND_SHAPE))
        name = "control: base model, \"a white circle and a black square on a <bg> background\""
        recs = score(model, name, world.caption_for("BG", list(known)).replace("BG", "{bg}"), known, 3000)
        cases += recs
        rows.append({"method": name, "both": str(scoring.rate(r["ok"] for r in recs)), "info": "no LoRA, known colours"})
        print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows, "train_seconds": [round(t, 1) for t in t_train], "eval": len(EVAL_BACKGROUNDS) * a.n_eval,
            "steps_lora": a.steps_lora, "prompt": f"{PHRASE_1} and {PHRASE_B} on a <bg> background",
            "concepts": f"pink circle `{FIRST_ID}`, teal square `{SECOND_ID}`",
            "recipe": f"lr {a.lr_lora:g}, rank {a.rank}, {a.lora_targets} weights"}, cases


def fusion_table(f: dict) -> str:
    lines = ["", f"Two concepts ({f.get('concepts', '')}), each a DreamBooth-LoRA of {f['steps_lora']} steps "
             f"({f.get('recipe', '')}; trained in {f['train_seconds'][0]} s / {f['train_seconds'][1]} s), merged; "
             f"\"{f.get('prompt', '')}\" over {f['eval']} samples on held-out backgrounds; "
             "output error = each concept's relative layer-output error on its own recorded activations", "",
             "| merge | both concepts correct | notes |", "|---|---|---|"]
    for r in f["rows"]:
        lines.append(f"| {r['method']} | {r['both']} | {r['info']} |")
    return "\n".join(lines)


DEFAULT_METHODS = "ti,db,dbp,core,cd"
ROW_ORDER = ("textual inversion", "DreamBooth-LoRA", "DreamBooth-LoRA + class images", "core TrainLoraNode",
             "Custom Diffusion")


def merge_rows(old: list, new: list) -> list:
    """The saved rows with those of the methods just run replaced (table order)."""
    by = {r["method"]: r for r in old}
    by.update({r["method"]: r for r in new})
    return sorted(by.values(), key=lambda r: ROW_ORDER.index(r["method"]) if r["method"] in ROW_ORDER else 99)


def table(data: dict) -> str:
    lines = [f"Personalization on the toy world: a new shape (orange star), captions \"{PHRASE_A.format(token='<token>')} on a <bg> "
             f"background\", {data['images']} training images on "
             f"{', '.join(TRAIN_BACKGROUNDS)} backgrounds; concept accuracy over {data['eval']} samples on held-out "
             f"backgrounds ({', '.join(EVAL_BACKGROUNDS)}); prior = held-out single-object accuracy "
             f"(n = {data['prior_n']}); {data['sample_steps']} steps, CFG {data['cfg']:g}; {data.get('host', '')}", "",
             "| method | settings | concept accuracy | prior (with / base) | training time | peak RSS + (MB, this row) | loss first 10 -> last 10 |",
             "|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['method']} | {r['settings']} | {r['concept']} | {r['prior']} | {r['train_seconds']} s | "
                     f"{r['peak_rss_mb']} | {r['loss'][0]} -> {r['loss'][1]} |")
    notes = [f"{r['method']}: {r['note']}" for r in data["rows"] if r.get("note")]
    if notes:
        lines += [""] + notes
    if data.get("fusion"):
        lines.append(fusion_table(data["fusion"]))
    return "\n".join(lines)


def write_readme(data: dict, path: str = README) -> None:
    replace_block(path, MARK_BEGIN, MARK_END, table(data))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=6)
    p.add_argument("--methods", default=DEFAULT_METHODS, help="rows to run: ti, db, dbp (with class images), core (TrainLoraNode), cd")
    p.add_argument("--steps-ti", type=int, default=1000)
    p.add_argument("--lr-ti", type=float, default=5e-4)
    p.add_argument("--lora-targets", choices=("attention", "all"), default="all")
    p.add_argument("--steps-lora", type=int, default=2400)
    p.add_argument("--steps-cd", type=int, default=1200)
    p.add_argument("--lr-lora", type=float, default=1e-3)
    p.add_argument("--lr-cd", type=float, default=5e-4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--class-images", type=int, default=6, help="class images of the dbp row")
    p.add_argument("--fusion-steps", type=int, default=800, help="steps of each fusion concept's LoRA")
    p.add_argument("--fusion-rank", type=int, default=8)
    p.add_argument("--fusion-targets", choices=("attention", "all"), default="all")
    p.add_argument("--n-eval", type=int, default=4, help="seeds per held-out background")
    p.add_argument("--n-prior", type=int, default=12, help="held-out single-object prompts for the prior column")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--results", default=RESULTS)
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--write-readme", action="store_true")
    p.add_argument("--readme", action="store_true", help="only rewrite the README table from the saved results")
    p.add_argument("--fusion-only", action="store_true",
                   help="only the two-concept fusion rows (kept next to the saved single-concept rows)")
    a = p.parse_args(argv)
    path = os.path.join(a.results, "personalization.json")
    if a.readme:
        write_readme(json.load(open(path)))
        return 0
    if a.fusion_only:
        f, cases = run_fusion(a)
        data = json.load(open(path)) if os.path.exists(path) else {"rows": [], "images": a.images, "eval": 0,
                                                                     "prior_n": 0, "sample_steps": a.sample_steps, "cfg": a.cfg}
        data["fusion"] = f
        print(fusion_table(f))
        if not a.no_save:
            os.makedirs(a.results, exist_ok=True)
            with open(path, "w") as fh:
                json.dump(data, fh, indent=1)
            write_cases(os.path.join(a.results, "cases", "personalization-fusion.csv"), cases)
            if a.write_readme:
                write_readme(data)
        return 0
    data, cases = run(a)
    print(table(data))
    if not a.no_save:
        os.makedirs(a.results, exist_ok=True)
        if os.path.exists(path):      # keep the fusion rows of an earlier --fusion-only run
            old = json.load(open(path))
            if old.get("fusion"):
                data["fusion"] = old["fusion"]
            if a.methods != DEFAULT_METHODS:    # a partial run (--methods) replaces only its own rows
                data["rows"] = merge_rows(old.get("rows", []), data["rows"])
        with open(path, "w") as f:
            json.dump(data, f, indent=1)
        suffix = "" if a.methods == DEFAULT_METHODS else "-" + a.methods.replace(",", "-")
        write_cases(os.path.join(a.results, "cases", f"personalization{suffix}.csv"), cases)
        if a.write_readme:
            write_readme(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
