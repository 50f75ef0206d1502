"""Feedback on the node: measurements and saved paths as text, heat maps and plots as previews on the
node that made them (still IMAGE outputs), latent previews during EditKit's own sampling loops, and output
tooltips everywhere."""
import os

import pytest
import torch

from ek_inversion_helpers import latent


def _ui(out):
    return out.ui if hasattr(out, "ui") else None


def test_reconstruction_error_shows_psnr_ssim_and_the_heat_map_on_the_node():
    import folder_paths

    from editkit.nodes.inversion import ReconstructionError
    a = torch.rand(1, 32, 32, 3)
    b = (a + 0.05 * torch.randn_like(a)).clamp(0, 1)
    out = ReconstructionError.execute(a, b)
    ui = _ui(out)
    assert ui["text"][0].startswith("PSNR ") and "SSIM" in ui["text"][0]
    psnr = out.result[0]
    assert f"{psnr:.2f} dB" in ui["text"][0], "the text shows the node's own PSNR output"
    img = ui["images"][0]
    assert img["type"] == "temp" and os.path.exists(os.path.join(folder_paths.get_temp_directory(), img["subfolder"], img["filename"]))
    assert out.result[4].shape == (1, 32, 32, 3), "the heat map is still an IMAGE output"
    assert ReconstructionError.EDITKIT_SHOWS == ("image", "text")


def test_every_feedback_node_is_in_a_shipped_workflow(comfy_nodes):
    """The headless run of every shipped workflow (test_workflows.py) asserts that each node's ui carries
    what its EDITKIT_SHOWS declares; here: every node that declares feedback is in one of those runs."""
    import glob
    import json

    from editkit.nodes import node_list
    used = set()
    for p in glob.glob(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows", "*.json")):
        used |= {n["type"] for n in json.load(open(p, encoding="utf-8"))["nodes"]}
    declaring = {c.GET_SCHEMA().node_id for c in node_list() if getattr(c, "EDITKIT_SHOWS", ())}
    assert {"EditKitReconstructionError", "EditKitNullTextInversion", "EditKitLoraMerge", "EditKitLoraSave",
            "EditKitLoraBlockWeight", "EditKitGuidancePlot", "EditKitShowAttentionMaps"} <= declaring
    assert declaring <= used, declaring - used


@pytest.mark.parametrize("method", ["ddim", "edict", "ddpm"])
def test_inversion_loops_send_latent_previews(method, tiny_eps, encode):
    """EditKit's own loops drive ComfyUI's progress bar with a latent preview per update, as KSampler does,
    when the user enabled previews (--preview-method); the bar reaches its total."""
    import comfy.utils
    from comfy.cli_args import LatentPreviewMethod, args

    from editkit.nodes.inversion import DDPMInversion, EDICT, Invert
    calls = []
    previous_hook, previous_method = comfy.utils.PROGRESS_BAR_HOOK, args.preview_method
    comfy.utils.set_progress_bar_global_hook(lambda v, t, p, prompt_id=None, node_id=None: calls.append((v, t, p)))
    args.preview_method = LatentPreviewMethod.Latent2RGB
    try:
        lat, pos = {"samples": latent(0, 4, 16)}, encode("a red circle")
        if method == "ddim":
            Invert.execute(tiny_eps, lat, pos, 1.0, 4, "normal", 1)
        elif method == "edict":
            EDICT.execute(tiny_eps, lat, pos, 1.0, 0.93, 4, "normal")
        else:
            DDPMInversion.execute(tiny_eps, lat, pos, 1.0, 4, "normal", 0, 0)
    finally:
        comfy.utils.set_progress_bar_global_hook(previous_hook)
        args.preview_method = previous_method
    assert calls and calls[-1][0] == calls[-1][1], calls[-3:]
    previews = [p for _, _, p in calls if p is not None]
    assert len(previews) == len(calls), "an update without a preview"
    fmt, image, _ = previews[-1]
    assert fmt == "JPEG" and image.size == (16, 16)


def test_no_preview_work_when_previews_are_off(tiny_eps, encode):
    import comfy.utils
    from comfy.cli_args import LatentPreviewMethod, args

    from editkit.nodes.inversion import Invert
    calls = []
    previous_hook, previous_method = comfy.utils.PROGRESS_BAR_HOOK, args.preview_method
    comfy.utils.set_progress_bar_global_hook(lambda v, t, p, prompt_id=None, node_id=None: calls.append(p))
    args.preview_method = LatentPreviewMethod.NoPreviews
    try:
        Invert.execute(tiny_eps, {"samples": latent(0, 4, 16)}, encode("a red circle"), 1.0, 3, "normal", 0)
    finally:
        comfy.utils.set_progress_bar_global_hook(previous_hook)
        args.preview_method = previous_method
    assert calls and all(p is None for p in calls)


def test_every_output_has_a_tooltip(comfy_nodes):
    """Every input and every output of every EditKit node has a tooltip (what /object_info serves)."""
    from editkit.nodes import node_list
    missing = []
    for cls in node_list():
        info = cls.GET_NODE_INFO_V1()
        names = info.get("output_name") or []
        tips = info.get("output_tooltips") or [None] * len(names)
        missing += [f"{info['name']}.{n}" for n, t in zip(names, tips) if not t]
    assert not missing, missing
