"""Workflows of the drag-editing nodes: SDE-Drag on your photo."""
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


WORKFLOWS = {
    "sde_drag": ("Editing - SDE-Drag", sde_drag),
    "drag_diffusion": ("Editing - DragDiffusion", drag_diffusion),
}
