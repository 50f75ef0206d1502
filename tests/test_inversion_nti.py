"""Null-text inversion: CFG 7.5 sampling with the optimised null embeddings retraces the inversion, the
gradient runs outside inference mode on a weight-wrapped clone, and the user's model is untouched.

The >= 10x claim is asserted on the analytic denoiser (ek_inversion_helpers): on the random tiny UNets
the text context barely moves the prediction (cond - uncond ~ 1e-3), so no null embedding can steer them;
there the test checks that the optimisation runs through the real UNet and lowers its loss.
"""
import pytest
import torch

from editkit.builtin_models import tiny
from editkit.core import denoiser as D
from editkit.nodes.inversion import Invert, NullTextInversion
from editkit.samplers.inversion import invert
from editkit.samplers.replay import reconstruct
from ek_inversion_helpers import analytic_model, edit, latent, node_out, sampler_space_error

SOURCE = "a red circle on a white background"


def _nti(model, lat, pos, neg, steps, cfg=7.5, inner=10):
    return node_out(NullTextInversion.execute(model, {"samples": lat}, pos, neg, cfg, steps, "normal", inner, 0.01, 1e-5, 0))


@pytest.mark.parametrize("variant", tiny.VARIANTS)
def test_nti_beats_ddim_at_cfg_7_5(variant, encode):
    model = analytic_model(tiny.tiny_unet(variant))
    pos, neg = encode(SOURCE), encode("")
    lat = latent(0)
    steps = 50
    _, inv, used = _nti(model, lat, pos, neg, steps)
    nti_err = sampler_space_error(model, reconstruct(model, inv), lat)
    # baseline 1: the guidance-1 DDIM inversion NTI starts from, sampled at cfg 7.5
    sig = D.schedule(model, "normal", steps)
    pivot = invert(model, lat, pos, None, 1.0, sig).with_changes(negative=neg, cfg=7.5)
    ddim_err = sampler_space_error(model, reconstruct(model, pivot), lat)
    assert nti_err * 10 <= ddim_err, (nti_err, ddim_err)
    # baseline 2: DDIM inversion and sampling both at cfg 7.5
    ddim75 = node_out(Invert.execute(model, {"samples": lat}, pos, 7.5, steps, "normal", 0, negative=neg))[1]
    ddim75_err = sampler_space_error(model, reconstruct(model, ddim75), lat)
    if variant != tiny.FLOW:
        assert nti_err * 10 <= ddim75_err, (nti_err, ddim75_err)
    else:
        # on the flow analytic model guided Euler inversion is already accurate (~0.04); NTI is comparable
        assert nti_err < 2 * ddim75_err
    # early stopping: fewer iterations than the paper's budget, and the count is reported
    assert used == inv.stats["iterations_total"] == sum(inv.stats["iterations"]) < steps * 10
    assert len(inv.null_embeddings) == steps and inv.null_embeddings[0].shape == neg[0][0].shape
    # the edit sampler replays the same thing as the source branch (target prompt = source prompt)
    out, _ = edit(model, inv, pos, None, cfg=7.5)
    assert sampler_space_error(model, out[:1], lat) < 2 * nti_err + 1e-4
    torch.testing.assert_close(out[:1], out[1:])


def test_nti_runs_through_the_unet_and_leaves_the_model_alone(tiny_v, encode):
    pos, neg = encode(SOURCE), encode("")
    lat = latent(1)
    x = tiny_v.model.process_latent_in(lat)
    before = D.predict_x0(tiny_v, x, 2.0, pos)
    wrappers_before = dict(tiny_v.weight_wrapper_patches)
    assert torch.is_inference_mode_enabled()
    _, inv, used = _nti(tiny_v, lat, pos, neg, 4, inner=4)
    assert torch.is_inference_mode_enabled()
    first, last = inv.stats["first_losses"], inv.stats["final_losses"]
    assert used == 16
    assert all(b <= a for a, b in zip(first, last)) and any(b < a for a, b in zip(first, last))
    # the optimised embeddings moved away from the null text
    assert not torch.allclose(inv.null_embeddings[-1], neg[0][0])
    assert tiny_v.weight_wrapper_patches == wrappers_before
    after = D.predict_x0(tiny_v, x, 2.0, pos)
    torch.testing.assert_close(before, after, atol=0, rtol=0)


def test_nti_needs_one_null_text_entry(tiny_eps, encode):
    pos, neg = encode(SOURCE), encode("")
    with pytest.raises(ValueError, match="EditKitNullTextInversion: input 'negative'"):
        _nti(tiny_eps, latent(), pos, neg + neg, 2)


def test_nti_beats_ddim_on_the_trained_toy_model():
    """The paper's claim on a real trained UNet + CLIP (the toy model), where the null text does steer the
    prediction: cfg-7.5 reconstruction >= 10x closer than DDIM inversion at cfg 7.5 (measured ~100x). The toy
    text encoder is 64-d; lr 5e-2 rather than the paper's 1e-2 (tuned on SD's 768-d embeddings) cuts the
    remaining error ~5x here (0.22 vs 1.1 max), as the node's tooltip says."""
    from editkit.builtin_models import toy
    from editkit.toyworld import world
    model, clip, vae = toy.load_toy()
    scene = world.sample_scene(3)
    lat = vae.encode(torch.from_numpy(scene.render())[None])
    pos, neg = tiny.encode(clip, scene.caption), tiny.encode(clip, "")
    steps = 12
    _, inv, used = node_out(NullTextInversion.execute(model, {"samples": lat}, pos, neg, 7.5, steps, "normal", 10,
                                                      0.05, 1e-5, 0))
    nti_err = sampler_space_error(model, reconstruct(model, inv), lat)
    ddim75 = node_out(Invert.execute(model, {"samples": lat}, pos, 7.5, steps, "normal", 0, negative=neg))[1]
    ddim75_err = sampler_space_error(model, reconstruct(model, ddim75), lat)
    assert nti_err * 10 <= ddim75_err, (nti_err, ddim75_err)
    assert used <= steps * 10


def test_gradient_clone_leaves_the_dynamic_vram_patcher(tiny_eps):
    """Newer ComfyUI (dynamic VRAM) wraps only large modules' weights; NTI's gradient clone asks for the classic
    patcher there (clone(disable_dynamic=True)), and every diffusion-model weight gets the gradient wrapper."""
    from editkit.samplers.null_text import GradWeight, gradient_clone

    class DynamicPatcher(type(tiny_eps)):
        asked = []

        def is_dynamic(self):
            return True

        def clone(self, disable_dynamic=False, **kw):
            DynamicPatcher.asked.append(disable_dynamic)
            return tiny_eps.clone()

    dyn = tiny_eps.clone()
    dyn.__class__ = DynamicPatcher
    m = gradient_clone(dyn)
    assert DynamicPatcher.asked == [True]
    names = {n for n, _ in tiny_eps.model.diffusion_model.named_parameters()}
    wrapped = {k.removeprefix("diffusion_model.") for k, v in m.weight_wrapper_patches.items()
               if any(isinstance(w, GradWeight) for w in v)}
    assert wrapped == names
    assert not tiny_eps.weight_wrapper_patches                     # the user's model is untouched
