"""Workflows of the drag-editing nodes on your photo: SDE-Drag, DragDiffusion, DragonDiffusion, DiffEditor."""
import json

from .common import SOURCE_PROMPT, builder, checkpoint, decode_and_save, native, note, photo, photo_step, text

# The shipped example (a red circle, centre (256, 256), radius 120, at 512 px) dragged right and down;
# the editable region covers the circle at both places. On another size the points scale with the image.
def example_points(res: int = 512) -> str:
    f = res / 512.0
    d = {"version": 1, "width": res, "height": res,
         "points": [{"handle": [256 * f, 256 * f], "target": [336 * f, 304 * f]}],
         "mask": {"strokes": [[256 * f, 256 * f, 136 * f, 1], [336 * f, 304 * f, 136 * f, 1]]}}
    return json.dumps(d)


def sde_drag(family="sd15"):
    b = builder()
    res = native(family)
    note(b, family, "SDE-Drag: drag a point of your photo, the object follows (no backpropagation)",
         [photo_step(family),
          "**EditKit Drag Points**: click a handle on the object, then where it should go; paint the region that "
          "may change (or edit the JSON: pixels of the scaled image).",
          "**Photo prompt**: describe the photo. **radius** (px): the patch that moves; **sub_moves** splits a long "
          "drag into equal moves."],
         "t0 0.6, 50-step schedule (30 SDE steps run), CFG 1 (Nie et al. 2024, SDE editing with SDEdit-style noising).")
    ld = checkpoint(b, family)
    src = photo(b, ld.out("vae"), family)
    pts = b.add("EditKitDragPoints", title="Drag points", points=example_points(res))
    b.connect(src["image"].out(0), pts, "image")
    pos = text(b, ld.out("clip"), SOURCE_PROMPT, "Photo prompt")
    drag = b.add("EditKitSDEDrag", title="SDE-Drag", t0=0.6, steps=50, cfg=1.0, sub_moves=1, radius=128.0,
                 scheduler="normal", seed=7)
    b.connect(ld.out("model"), drag, "model")
    b.connect(pos.out(0), drag, "positive")
    b.connect(src["latent"].out(0), drag, "latent")
    b.connect(pts.out(0), drag, "drag")
    decode_and_save(b, drag.out(0), ld.out("vae"), "editkit_sde_drag", title="Decode the drag")
    return b.build()


def drag_diffusion(family="sd15"):
    b = builder()
    res = native(family)
    note(b, family, "DragDiffusion: drag a point of your photo (latent optimisation)",
         [photo_step(family),
          "**EditKit Drag Points**: click a handle on the object, then its target; paint the region that may change.",
          "**Photo prompt**: describe the photo. For the paper's identity LoRA, apply a LoRA trained on the photo to the model."],
         "50 steps, invert 35, 80 motion-supervision steps, lr 0.01, lambda 0.1, CFG 1 (Shi et al. 2024).")
    ld = checkpoint(b, family)
    src = photo(b, ld.out("vae"), family)
    pts = b.add("EditKitDragPoints", title="Drag points", points=example_points(res))
    b.connect(src["image"].out(0), pts, "image")
    pos = text(b, ld.out("clip"), SOURCE_PROMPT, "Photo prompt")
    dd = b.add("EditKitDragDiffusion", title="DragDiffusion", toy={"inputs": {"steps": 12, "inversion_steps": 8, "iterations": 4}}, steps=50,
               inversion_steps=35, iterations=80, lr=0.01, mask_weight=0.1, cfg=1.0, reference_control=True, seed=0)
    b.connect(ld.out("model"), dd, "model")
    b.connect(pos.out(0), dd, "positive")
    b.connect(src["latent"].out(0), dd, "latent")
    b.connect(pts.out(0), dd, "drag")
    decode_and_save(b, dd.out(0), ld.out("vae"), "editkit_drag_diffusion", title="Decode the drag")
    return b.build()


def _energy_drag(family, node_type, title, headline, extra_steps, paper, extra_inputs):
    b = builder()
    res = native(family)
    note(b, family, headline,
         [photo_step(family),
          "**EditKit Drag Points**: click a handle on the object, then its target; paint the region that may change.",
          "**Photo prompt**: describe the photo. **energy_scale** sets how hard the object is pulled; raise "
          "**w_content** if the rest of the photo changes."] + extra_steps, paper)
    ld = checkpoint(b, family)
    src = photo(b, ld.out("vae"), family)
    pts = b.add("EditKitDragPoints", title="Drag points", points=example_points(res))
    b.connect(src["image"].out(0), pts, "image")
    pos = text(b, ld.out("clip"), SOURCE_PROMPT, "Photo prompt")
    neg = text(b, ld.out("clip"), "", "Negative prompt")
    dn = b.add(node_type, title=title, toy={"inputs": {"steps": 12, "inversion_steps": 8, "cfg": 1.0, "energy_scale": 1.0}},
               steps=50, inversion_steps=50, cfg=4.0, energy_scale=2.0, w_edit=4.0, w_content=6.0, w_inpaint=0.2,
               guide_until=0.6, visual_cross_attention=True, seed=42, **extra_inputs)
    b.connect(ld.out("model"), dn, "model")
    b.connect(pos.out(0), dn, "positive")
    b.connect(neg.out(0), dn, "negative")
    b.connect(src["latent"].out(0), dn, "latent")
    b.connect(pts.out(0), dn, "drag")
    decode_and_save(b, dn.out(0), ld.out("vae"), "editkit_" + title.lower(), title="Decode the drag")
    return b.build()


def dragon_diffusion(family="sd15"):
    return _energy_drag(family, "EditKitDragonDiffusion", "DragonDiffusion",
                        "DragonDiffusion: drag a point of your photo (energy guidance, no optimisation)", [],
                        "50 DDIM steps from the full inversion, CFG 4, energy scale 2 (x1e3), w_edit 4, w_content 6, "
                        "w_inpaint 0.2, guidance in the first 30 steps (Mou et al. 2024, the authors' drag defaults).", {})


def diffeditor(family="sd15"):
    return _energy_drag(family, "EditKitDiffEditor", "DiffEditor",
                        "DiffEditor: drag a point of your photo (regional guidance, regional SDE, time travel)",
                        ["For the paper's image prompt, put EditKit's IP-Adapter (with your IP-Adapter files) on the model "
                         "before this node."],
                        "As DragonDiffusion, plus regional SDE strength 0.4 (steps 10-20) and time travel (3 passes on every "
                        "other step of 20-30) (Mou et al., CVPR 2024).", {"sde_strength": 0.4, "time_travel": 2})


WORKFLOWS = {
    "sde_drag": ("Editing - SDE-Drag", sde_drag),
    "drag_diffusion": ("Editing - DragDiffusion", drag_diffusion),
    "dragon_diffusion": ("Editing - DragonDiffusion", dragon_diffusion),
    "diffeditor": ("Editing - DiffEditor", diffeditor),
}
