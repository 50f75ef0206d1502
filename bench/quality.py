"""Edit-quality benchmark on EditKit's trained toy model: `make bench-quality`.

    make bench-quality                               # every available technique, 24 fixed cases
    make bench-quality BENCH_ARGS="--cases 48 --only 'SDEdit (t0=0.6)'"

Prints one Markdown row per technique (columns: toyworld/editbench.py) and writes
bench/results/quality.json. To add a technique, register a runner below:

    @register("My method", order=30)
    def my_method(ctx, case, target_prompt):
        # edit case.source_image() (a clean toy-world render) from case.source_prompt to target_prompt,
        # with ctx.model / ctx.clip / ctx.vae, ctx.steps sampling steps, ctx.cfg and noise seed case.seed
        return image          # (H, W, 3) in [0, 1]

Runners drive EditKit through its nodes' execute() (as ComfyUI does) or its library functions.
"""
import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import boot  # noqa: E402

boot()

from editkit.builtin_models import toy  # noqa: E402
from editkit.toyworld import editbench  # noqa: E402

register = editbench.register


def _guided_sample(ctx, positive, negative, noise_obj, latent_dict, sigmas):
    """SamplerCustomAdvanced's path: CFGGuider + KSamplerSelect sampler + SIGMAS + NOISE."""
    import comfy.sample
    import comfy.samplers
    guider = comfy.samplers.CFGGuider(ctx.model)
    guider.set_conds(positive, negative)
    guider.set_cfg(ctx.cfg)
    latent = comfy.sample.fix_empty_latent_channels(ctx.model, latent_dict["samples"])
    noise = noise_obj.generate_noise({**latent_dict, "samples": latent})
    out = guider.sample(noise, latent, comfy.samplers.sampler_object(ctx.sampler), sigmas, seed=noise_obj.seed,
                        disable_pbar=True)
    return out


@register("(reference) VAE round trip, no edit", order=0, reference=True)
def vae_round_trip(ctx, case, target_prompt):
    return ctx.decode(ctx.latent(case.source_image()))


def sdedit(strength):
    def run(ctx, case, target_prompt):
        from editkit.nodes.editing import SDEdit
        res = SDEdit.execute(ctx.model, {"samples": ctx.latent(case.source_image())}, strength,
                             max(1, round(ctx.steps * strength)), ctx.scheduler, case.seed)
        noise_obj, latent, sigmas, _ = res.result if hasattr(res, "result") else res
        out = _guided_sample(ctx, ctx.encode(target_prompt), ctx.encode(""), noise_obj, latent, sigmas)
        return ctx.decode(out)
    return run


for _s, _o in ((0.5, 10), (0.7, 11), (0.85, 12)):
    register(f"SDEdit (t0={_s})", order=_o)(sdedit(_s))


# ---------------------------------------------------------------------------------------------
# Inversion (+ attention control) techniques, run through their nodes as a workflow wires them:
# invert -> [attention control] -> EditKit Inversion Sampler -> SamplerCustomAdvanced.

call = editbench.call_node


def _has(*node_ids):
    def check():
        import nodes
        return all(n in nodes.NODE_CLASS_MAPPINGS for n in node_ids)
    return check


def _invert(kind, ctx, case, latent):
    src, neg = ctx.encode(case.source_prompt), ctx.encode("")
    if kind == "ddim":
        return call("EditKitInvert", model=ctx.model, latent=latent, positive=src, cfg=1.0, steps=ctx.steps,
                    fixed_point_iterations=0)[1]
    if kind == "direct":
        inv = call("EditKitInvert", model=ctx.model, latent=latent, positive=src, cfg=1.0, steps=ctx.steps,
                   fixed_point_iterations=0)[1]
        return call("EditKitDirectInversion", inversion=inv)[0]
    if kind == "nti":
        with torch.inference_mode(False):
            return call("EditKitNullTextInversion", model=ctx.model, latent=latent, positive=src, negative=neg,
                        cfg=ctx.cfg, steps=ctx.steps, learning_rate=0.05)[1]   # 64-d text embeddings: see the tooltip
    if kind == "npi":
        return call("EditKitNegativePromptInversion", model=ctx.model, latent=latent, positive=src, steps=ctx.steps)[1]
    if kind == "ddpm":
        return call("EditKitDDPMInversion", model=ctx.model, latent=latent, positive=src, negative=neg, cfg=ctx.cfg,
                    steps=ctx.steps, skip=round(ctx.steps * 18 / 50), seed=case.seed)[1]
    raise ValueError(kind)


def inversion_edit(kind: str, control: str | None = None):
    def run(ctx, case, target_prompt):
        latent = {"samples": ctx.latent(case.source_image())}
        inv = _invert(kind, ctx, case, latent)
        model = ctx.model
        if control == "p2p":
            words = editbench.changed_words(case.source_prompt, target_prompt)
            model = call("EditKitPromptToPrompt", model=ctx.model, clip=ctx.clip, source_prompt=case.source_prompt,
                         target_prompt=target_prompt, local_blend_words=", ".join(words))[0]
        noise, guider, sampler, sigmas, lat = call("EditKitInversionSampler", model=model, inversion=inv,
                                                   positive=ctx.encode(target_prompt), negative=ctx.encode(""),
                                                   cfg=ctx.cfg, output="source + target" if control else "target")
        out = call("SamplerCustomAdvanced", noise=noise, guider=guider, sampler=sampler, sigmas=sigmas, latent_image=lat)[0]
        return ctx.decode(out["samples"][-1:])
    return run


_INVERSION_NODES = {"ddim": ("EditKitInvert",), "direct": ("EditKitInvert", "EditKitDirectInversion"),
                    "nti": ("EditKitNullTextInversion",), "npi": ("EditKitNegativePromptInversion",),
                    "ddpm": ("EditKitDDPMInversion",)}
for _order, (_kind, _control, _label) in enumerate((
        ("ddim", None, "DDIM inversion, prompt swap"),
        ("ddpm", None, "DDPM (edit-friendly) inversion, prompt swap"),
        ("ddim", "p2p", "DDIM inversion + Prompt-to-Prompt"),
        ("nti", "p2p", "Null-text inversion + Prompt-to-Prompt"),
        ("npi", "p2p", "Negative-prompt inversion + Prompt-to-Prompt"),
        ("direct", "p2p", "Direct inversion + Prompt-to-Prompt"))):
    _nodes = _INVERSION_NODES[_kind] + ("EditKitInversionSampler",) + (("EditKitPromptToPrompt",) if _control else ())
    register(_label, order=20 + _order, available=_has(*_nodes))(inversion_edit(_kind, _control))


def main(argv=None):
    p = argparse.ArgumentParser(description="Edit-quality benchmark on the toy model.")
    p.add_argument("--cases", type=int, default=24, help="number of edit cases (2/3 colour, 1/3 shape)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps of a full txt2img (techniques scale theirs)")
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--only", action="append", help="technique name (repeatable)")
    p.add_argument("--weights", default=toy.DEFAULT_PATH, help="toy model file (default: the shipped one)")
    p.add_argument("--list", action="store_true", help="list the registered techniques and exit")
    a = p.parse_args(argv)
    if a.list:
        for t in sorted(editbench.TECHNIQUES.values(), key=lambda t: (t.order, t.name)):
            print(t.name)
        return 0
    if not toy.available(a.weights):
        raise SystemExit(f"no toy model at {a.weights}: run `make toy-model` or restore models/toy/ from git")
    n_shape = a.cases // 3
    cases = editbench.edit_cases(n_colour=a.cases - n_shape, n_shape=n_shape)
    model, clip, vae = toy.load_toy(a.weights)
    ctx = editbench.EditContext(model, clip, vae, steps=a.steps, cfg=a.cfg)
    with torch.inference_mode():
        rows = editbench.run_benchmark(ctx, cases, a.only)
    print(f"\n## Edit quality on the toy world ({len(cases)} fixed cases: {a.cases - n_shape} colour, {n_shape} shape; "
          f"{a.steps}-step euler, CFG {a.cfg}; source = clean renders)")
    print(editbench.format_table(rows))
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "quality.json"), "w") as f:
        json.dump({"settings": {"cases": a.cases, "steps": a.steps, "cfg": a.cfg}, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
