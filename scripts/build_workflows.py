"""Regenerate workflows/*.json (UI format) from the node definitions.

    .venv/bin/python scripts/build_workflows.py

Each workflow is described here once, by node type, widget values and links; widget order and
socket types come from the live node definitions, so the files load on the canvas as saved ones do.
"""
import importlib.util
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("editkit_boot", os.path.join(ROOT, "runner", "boot.py"))
boot = importlib.util.module_from_spec(spec)
spec.loader.exec_module(boot)
boot.boot(threads=1)

import nodes  # noqa: E402  (ComfyUI's, after boot)
from editkit.runner.uibuild import WorkflowBuilder  # noqa: E402

# The model every shipped workflow runs on: the best one the repository has.
MODEL_LOADER = ("EditKitTinyModelLoader", {"parameterization": "eps", "seed": 0})
SOURCE_PROMPT = "a red circle on a white background"


def model_loader(b, pos=(20, 200)):
    cls, widgets = MODEL_LOADER
    return b.add(cls, pos, size=(300, 120), **widgets)


def sdedit():
    b = WorkflowBuilder(nodes.NODE_CLASS_MAPPINGS)
    ld = model_loader(b)
    src_txt = b.add("CLIPTextEncode", (380, 40), title="Source prompt", text=SOURCE_PROMPT, size=(320, 110))
    tgt_txt = b.add("CLIPTextEncode", (380, 190), title="Edit prompt", text="a blue circle on a white background", size=(320, 110))
    neg_txt = b.add("CLIPTextEncode", (380, 340), title="Negative prompt", text="", size=(320, 100))
    for t in (src_txt, tgt_txt, neg_txt):
        b.connect(ld.out("clip"), t, "clip")
    empty = b.add("EmptyLatentImage", (380, 480), width=128, height=128, batch_size=1, size=(320, 110))
    ks = b.add("KSampler", (760, 40), title="Source image (txt2img)", seed=1, steps=12, cfg=5.0,
               sampler_name="euler", scheduler="normal", denoise=1.0, size=(300, 270))
    b.connect(ld.out("model"), ks, "model")
    b.connect(src_txt.out(0), ks, "positive")
    b.connect(neg_txt.out(0), ks, "negative")
    b.connect(empty.out(0), ks, "latent_image")
    sd = b.add("EditKitSDEdit", (760, 360), strength=0.6, steps=8, scheduler="normal", seed=7, size=(300, 190))
    b.connect(ld.out("model"), sd, "model")
    b.connect(ks.out(0), sd, "latent")
    guider = b.add("CFGGuider", (1100, 300), cfg=5.0, size=(260, 100))
    b.connect(ld.out("model"), guider, "model")
    b.connect(tgt_txt.out(0), guider, "positive")
    b.connect(neg_txt.out(0), guider, "negative")
    ksel = b.add("KSamplerSelect", (1100, 440), sampler_name="euler", size=(260, 60))
    sca = b.add("SamplerCustomAdvanced", (1400, 300), size=(260, 130))
    b.connect(sd.out(0), sca, "noise")
    b.connect(guider.out(0), sca, "guider")
    b.connect(ksel.out(0), sca, "sampler")
    b.connect(sd.out(2), sca, "sigmas")
    b.connect(sd.out(1), sca, "latent_image")
    for latent, pos, prefix in ((ks.out(0), (1100, 40), "editkit_sdedit_source"), (sca.out(0), (1700, 300), "editkit_sdedit_edit")):
        dec = b.add("VAEDecode", pos, size=(200, 50))
        b.connect(latent, dec, "samples")
        b.connect(ld.out("vae"), dec, "vae")
        save = b.add("SaveImage", (pos[0] + 240, pos[1]), filename_prefix=prefix, size=(260, 280))
        b.connect(dec.out(0), save, "images")
    return b.build()


def attention_maps():
    b = WorkflowBuilder(nodes.NODE_CLASS_MAPPINGS)
    ld = model_loader(b)
    text = b.add("PrimitiveStringMultiline", (20, 360), title="Prompt", value=SOURCE_PROMPT, size=(300, 100))
    pos_txt = b.add("CLIPTextEncode", (380, 40), title="Positive prompt", size=(300, 100))
    neg_txt = b.add("CLIPTextEncode", (380, 180), title="Negative prompt", text="", size=(300, 100))
    b.connect(ld.out("clip"), pos_txt, "clip")
    b.connect(ld.out("clip"), neg_txt, "clip")
    b.connect(text.out(0), pos_txt, "text")
    cap = b.add("EditKitAttentionMaps", (380, 320), words="red, circle, background", levels="coarsest two",
                start_percent=0.0, end_percent=1.0, size=(320, 230))
    b.connect(ld.out("model"), cap, "model")
    b.connect(ld.out("clip"), cap, "clip")
    b.connect(text.out(0), cap, "prompt")
    empty = b.add("EmptyLatentImage", (380, 590), width=128, height=128, batch_size=1, size=(300, 110))
    ks = b.add("KSampler", (760, 40), seed=1, steps=12, cfg=5.0, sampler_name="euler", scheduler="normal",
               denoise=1.0, size=(300, 270))
    b.connect(cap.out(0), ks, "model")
    b.connect(pos_txt.out(0), ks, "positive")
    b.connect(neg_txt.out(0), ks, "negative")
    b.connect(empty.out(0), ks, "latent_image")
    dec = b.add("VAEDecode", (1100, 40), size=(200, 50))
    b.connect(ks.out(0), dec, "samples")
    b.connect(ld.out("vae"), dec, "vae")
    show = b.add("EditKitShowAttentionMaps", (1100, 160), opacity=0.6, colormap="inferno", size=(300, 130))
    b.connect(cap.out(1), show, "attention_maps")
    b.connect(dec.out(0), show, "image")
    save = b.add("SaveImage", (1450, 40), filename_prefix="editkit_attention_maps", size=(400, 300))
    b.connect(show.out(0), save, "images")
    return b.build()


WORKFLOWS = {"sdedit.json": sdedit, "attention_maps.json": attention_maps}

if __name__ == "__main__":
    out_dir = os.path.join(ROOT, "workflows")
    os.makedirs(out_dir, exist_ok=True)
    for name, fn in WORKFLOWS.items():
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(fn(), f, indent=1)
            f.write("\n")
        print("wrote", os.path.join("workflows", name))
