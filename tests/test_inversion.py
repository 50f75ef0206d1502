"""DDIM/Euler inversion, negative-prompt inversion (+ ProxEdit), the trajectory object, the source/target
branch contract of EditKitInversionSampler, reconstruction metrics, and the full-size SD1.5 layout path.

Monotonicity is asserted on the random tiny v-pred and flow UNets (where it holds) and on an analytic
denoiser wrapped as a ComfyUI model for all three parameterizations (ek_inversion_helpers): the random
EPS UNet amplifies input changes at high noise by orders of magnitude, so DDIM inversion on it is neither
accurate nor monotone in the number of steps (its error is 20-50 in latent units whatever the steps).
"""
import math

import pytest
import torch

from editkit.builtin_models import tiny
from editkit.core import denoiser as D
from editkit.nodes.inversion import (DirectInversion, Invert, InversionSampler, NegativePromptInversion,
                                     ReconstructionError)
from editkit.samplers import metrics
from editkit.samplers.branch_guider import BRANCH_KEY, prox
from editkit.samplers.inversion import invert
from editkit.samplers.replay import reconstruct
from editkit.samplers.trajectory import EditKitInversion
from ek_inversion_helpers import analytic_model, edit, latent, node_out, sampler_space_error

SOURCE, TARGET = "a red circle on a white background", "a blue square on a black background"


def _ddim_error(model, pos, lat, steps, fp=0, node=Invert):
    if node is Invert:
        inv = node_out(Invert.execute(model, {"samples": lat}, pos, 1.0, steps, "normal", fp))[1]
    else:
        inv = node_out(NegativePromptInversion.execute(model, {"samples": lat}, pos, steps, "normal", fp, "none", 0.7))[1]
    return sampler_space_error(model, reconstruct(model, inv), lat)


def _strictly_falling(values):
    return all(a > b for a, b in zip(values, values[1:]))


# ---------------------------------------------------------------------------------------------
# Approximate inversion: error falls with steps and with fixed-point iterations
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", tiny.VARIANTS)
def test_ddim_error_monotone_analytic(variant, encode):
    model = analytic_model(tiny.tiny_unet(variant))
    pos, lat = encode(SOURCE), latent(0)
    by_steps = [_ddim_error(model, pos, lat, s) for s in (5, 10, 20, 40)]
    by_fp = [_ddim_error(model, pos, lat, 10, fp) for fp in (0, 1, 2, 4)]
    assert _strictly_falling(by_steps), by_steps
    assert _strictly_falling(by_fp), by_fp
    assert by_fp[-1] < 0.1 * by_fp[0]        # fixed-point refinement approaches exact inversion


@pytest.mark.parametrize("variant", [tiny.V_PREDICTION, tiny.FLOW])
def test_ddim_error_monotone_tiny_unet(variant, encode):
    model = tiny.tiny_unet(variant)
    pos, lat = encode(SOURCE), latent(0)
    assert _strictly_falling([_ddim_error(model, pos, lat, s) for s in (5, 10, 20, 40)])
    assert _strictly_falling([_ddim_error(model, pos, lat, 20, fp) for fp in (0, 1, 2, 4)])


def test_npi_error_monotone_analytic(encode):
    model = analytic_model(tiny.tiny_unet(tiny.EPS))
    pos, lat = encode(SOURCE), latent(1)
    assert _strictly_falling([_ddim_error(model, pos, lat, s, node=NegativePromptInversion) for s in (5, 10, 20)])
    assert _strictly_falling([_ddim_error(model, pos, lat, 10, fp, node=NegativePromptInversion) for fp in (0, 1, 3)])


def test_ddim_inversion_matches_reference_loop(tiny_v, encode):
    """The stored trajectory is classic DDIM inversion, computed independently here with predict_x0."""
    pos, lat = encode(SOURCE), latent(2)
    sig = D.schedule(tiny_v, "normal", 4)
    inv = invert(tiny_v, lat, pos, None, 1.0, sig)
    x = tiny_v.model.process_latent_in(lat)
    for k in range(3, -1, -1):
        den = D.predict_x0(tiny_v, x, float(sig[k]), pos)
        x = x + (x - den) / sig[k] * (sig[k] - sig[k + 1])
        torch.testing.assert_close(inv.latents[k].float(), x, atol=1e-5, rtol=1e-5)
    assert inv.stats["nfe"] == 4 and len(inv.latents) == 5


# ---------------------------------------------------------------------------------------------
# NPI / ProxEdit
# ---------------------------------------------------------------------------------------------

def test_npi_reconstructs_at_any_cfg(tiny_any, encode):
    pos = encode(SOURCE)
    lat = latent(3)
    inv = node_out(NegativePromptInversion.execute(tiny_any, {"samples": lat}, pos, 6, "normal", 0, "none", 0.7))[1]
    plain = node_out(Invert.execute(tiny_any, {"samples": lat}, pos, 1.0, 6, "normal", 0))[1]
    ref = reconstruct(tiny_any, plain)          # DDIM at guidance 1
    for cfg in (1.0, 7.5, 15.0):
        out, _ = edit(tiny_any, inv, pos, None, cfg=cfg)
        # target prompt == source prompt: guided target == unguided source, bit for bit
        assert torch.equal(out[:1], out[1:])
        assert sampler_space_error(tiny_any, out[:1], ref) < 1e-4     # batched vs single-branch rounding


def test_prox_operators():
    delta = torch.linspace(-1, 1, 201).view(1, 1, 201, 1)
    hard, soft = prox(delta, "l0", 0.7), prox(delta, "l1", 0.7)
    thr = float(torch.quantile(delta.abs().flatten(), 0.7))
    kept = delta.abs() > thr
    assert torch.equal(hard, torch.where(kept, delta, torch.zeros_like(delta)))
    torch.testing.assert_close(soft, torch.sign(delta) * (delta.abs() - thr).clamp(min=0))
    assert 0.25 < float(kept.float().mean()) < 0.35


def test_proxedit_quantile_one_keeps_source(tiny_eps, encode):
    """With the threshold at the largest difference nothing of the edit direction survives (l0)."""
    pos, tgt = encode(SOURCE), encode(TARGET)
    lat = latent(4)
    inv = node_out(NegativePromptInversion.execute(tiny_eps, {"samples": lat}, pos, 4, "normal", 0, "l0", 1.0))[1]
    out, _ = edit(tiny_eps, inv, tgt, None, cfg=7.5)
    torch.testing.assert_close(out[1:], out[:1])
    inv_free = inv.with_changes(settings={**inv.settings, "proximal": None})
    free, _ = edit(tiny_eps, inv_free, tgt, None, cfg=7.5)
    assert not torch.allclose(free[1:], free[:1])


# ---------------------------------------------------------------------------------------------
# The trajectory object and model identity
# ---------------------------------------------------------------------------------------------

def test_trajectory_fields(tiny_eps, encode):
    pos, neg = encode(SOURCE), encode("")
    lat = latent(5, batch=2)
    noise, inv = node_out(Invert.execute(tiny_eps, {"samples": lat}, pos, 2.0, 5, "karras", 1, negative=neg))
    assert isinstance(inv, EditKitInversion) and inv.method == "ddim" and inv.steps == 5
    assert inv.sigmas.shape == (6,) and float(inv.sigmas[-1]) == 0.0 and bool(torch.all(inv.sigmas[1:] < inv.sigmas[:-1]))
    assert len(inv.latents) == 6 and all(t.shape == (2, 4, 8, 8) for t in inv.latents)
    torch.testing.assert_close(inv.source.float(), tiny_eps.model.process_latent_in(lat))
    torch.testing.assert_close(tiny_eps.model.process_latent_in(noise["samples"]), inv.latents[0].float())
    assert inv.positive is pos and inv.negative is neg and inv.cfg == 2.0
    assert inv.settings["fixed_point_iterations"] == 1 and inv.stats["nfe"] == 10
    assert inv.identity.parameterization == "eps" and inv.identity.latent_channels == 4
    assert inv.nbytes >= 6 * 2 * 4 * 8 * 8 * 4


def test_trajectory_with_other_model_is_an_error(tiny_eps, tiny_v, tiny_flux, encode):
    pos = encode(SOURCE)
    inv = node_out(Invert.execute(tiny_eps, {"samples": latent()}, pos, 1.0, 2, "normal", 0))[1]
    with pytest.raises(ValueError, match="EditKitInversionSampler: input 'model'.*flux.*16-channel"):
        InversionSampler.execute(tiny_flux, inv, pos, 1.0, "target")
    with pytest.raises(ValueError, match="EditKitInversionSampler: input 'model'.*eps.*v_prediction"):
        InversionSampler.execute(tiny_v, inv, pos, 1.0, "target")
    # same model, another latent size at sampling time
    with pytest.raises(ValueError, match="latent shape"):
        edit(tiny_eps, inv, pos, None, 1.0, latent_override={"samples": torch.zeros(1, 4, 16, 16)})


def test_sampler_rejects_foreign_sigmas_and_guider(tiny_eps, encode):
    from comfy_extras.nodes_custom_sampler import SamplerCustomAdvanced
    import comfy.samplers
    pos = encode(SOURCE)
    inv = node_out(Invert.execute(tiny_eps, {"samples": latent()}, pos, 1.0, 4, "normal", 0))[1]
    noise, guider, sampler, sigmas, lat = node_out(InversionSampler.execute(tiny_eps, inv, pos, 1.0, "target"))
    with pytest.raises(ValueError, match="input 'sigmas'"):
        SamplerCustomAdvanced.execute(noise, guider, sampler, D.schedule(tiny_eps, "karras", 4), lat)
    other = comfy.samplers.CFGGuider(tiny_eps)
    other.set_conds(pos, pos)
    with pytest.raises(ValueError, match="input 'guider'"):
        SamplerCustomAdvanced.execute(noise, other, sampler, sigmas, lat)


def test_bad_inputs_name_the_input(tiny_eps, tiny_flux, encode):
    pos = encode(SOURCE)
    with pytest.raises(ValueError, match="EditKitInvert: input 'negative'"):
        Invert.execute(tiny_eps, {"samples": latent()}, pos, 5.0, 4, "normal", 0)
    with pytest.raises(ValueError, match="EditKitInvert: input 'latent'.*channels"):
        Invert.execute(tiny_flux, {"samples": latent()}, pos, 1.0, 4, "normal", 0)
    with pytest.raises(ValueError, match="EditKitInvert: input 'sigmas'.*descending"):
        Invert.execute(tiny_eps, {"samples": latent()}, pos, 1.0, 4, "normal", 0, sigmas=torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="noise mask"):
        Invert.execute(tiny_eps, {"samples": latent(), "noise_mask": torch.ones(1, 8, 8)}, pos, 1.0, 4, "normal", 0)


# ---------------------------------------------------------------------------------------------
# Source + target branches in one batch (contract with the attention-control nodes)
# ---------------------------------------------------------------------------------------------

def test_branch_layout_contract(tiny_eps, encode):
    import comfy.patcher_extension as pe
    pos, neg, tgt = encode(SOURCE), encode(""), encode(TARGET)
    lat = latent(6, batch=2)
    inv = node_out(Invert.execute(tiny_eps, {"samples": lat}, pos, 1.0, 3, "normal", 0))[1]
    inv = node_out(DirectInversion.execute(inv))[0]
    calls = []

    def record(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kw):
        calls.append((x.clone(), c_crossattn.clone(), list(transformer_options["cond_or_uncond"]),
                      transformer_options.get(BRANCH_KEY)))
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kw)

    m = tiny_eps.clone()
    m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "test.record", record)
    edit(m, inv, tgt, neg, cfg=4.0)
    assert len(calls) == 3                                    # one batched call per step
    src_ctx, tgt_ctx, neg_ctx = pos[0][0], tgt[0][0], neg[0][0]
    for i, (x, ctx, cou, branches) in enumerate(calls):
        assert branches == ("source", "target")
        assert sorted(cou) == [0, 1] and x.shape[0] == 2 * 2 * len(cou)
        for j, kind in enumerate(cou):
            chunk_x, chunk_c = x[4 * j:4 * j + 4], ctx[4 * j:4 * j + 4]
            # source rows first, then target rows, each branch with its own context (a source without a
            # negative prompt and cfg 1 carries its prompt in the unconditional chunk; that output is unused)
            assert torch.equal(chunk_c[0], src_ctx[0])
            assert torch.equal(chunk_c[2], (tgt_ctx if kind == 0 else neg_ctx)[0])
            # the source rows are the stored (Direct-corrected) trajectory latents
            torch.testing.assert_close(chunk_x[:2], inv.latents[i].float())
        if i:
            assert not torch.allclose(x[:2], x[2:4])


def test_plain_guider_use_is_cfg_guider(tiny_eps, encode):
    """The GUIDER output with an ordinary sampler guides like CFGGuider with the target prompt."""
    import comfy.samplers
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise, SamplerCustomAdvanced
    pos, neg = encode(SOURCE), encode("")
    inv = node_out(Invert.execute(tiny_eps, {"samples": latent()}, pos, 1.0, 3, "normal", 0))[1]
    _, guider, _, sigmas, lat = node_out(InversionSampler.execute(tiny_eps, inv, pos, 3.0, "target", negative=neg))
    ref = comfy.samplers.CFGGuider(tiny_eps)
    ref.set_conds(pos, neg)
    ref.set_cfg(3.0)
    euler = comfy.samplers.sampler_object("euler")
    a = node_out(SamplerCustomAdvanced.execute(Noise_RandomNoise(1), guider, euler, sigmas, lat))[0]["samples"]
    b = node_out(SamplerCustomAdvanced.execute(Noise_RandomNoise(1), ref, euler, sigmas, lat))[0]["samples"]
    torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# Reconstruction metrics
# ---------------------------------------------------------------------------------------------

def test_metrics_known_values():
    img = torch.rand(2, 24, 24, 3, generator=torch.Generator().manual_seed(0))
    assert metrics.psnr(img, img) == math.inf and metrics.ssim(img, img) == pytest.approx(1.0, abs=1e-5)
    noisy = (img + 0.1).clamp(0, 1)
    mse = float(((noisy - img) ** 2).flatten(1).mean(1)[0])
    assert metrics.psnr(img[:1], noisy[:1]) == pytest.approx(10 * math.log10(1 / mse), rel=1e-5)
    assert metrics.ssim(img, noisy) < 0.999


def test_reconstruction_error_node(encode):
    img = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(1))
    rec = img.clone()
    rec[:, 8:16, 8:16] = 0.0
    lat, lat2 = latent(1), latent(1) + 0.25
    res = ReconstructionError.execute(img, rec, latent={"samples": lat}, reconstruction_latent={"samples": lat2})
    p, s, lmax, lmean, heat = node_out(res)
    assert 5 < p < 40 and s < 1.0 and lmax == pytest.approx(0.25, abs=1e-6) and lmean == pytest.approx(0.25, abs=1e-6)
    assert heat.shape == (1, 32, 32, 3)
    inside, outside = heat[0, 10:14, 10:14].mean(), heat[0, 24:30, 24:30].mean()
    assert inside > outside       # the changed square is hot
    assert "PSNR" in res.ui["text"][0] and res.ui["images"], res.ui   # shown on the node (nodes/feedback.py)
    p2, s2, lmax2, _, _ = node_out(ReconstructionError.execute(img, img))
    assert p2 == math.inf and lmax2 == -1.0
    with pytest.raises(ValueError, match="input 'reconstruction'"):
        ReconstructionError.execute(img, torch.rand(1, 16, 16, 3))


# ---------------------------------------------------------------------------------------------
# Full-size SD1.5 layout (random weights, bf16, 32x32, 1-2 steps): every node runs
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sd15_full_every_node(sd15_full):
    import time
    import comfy.model_sampling as cms
    from editkit.builtin_models.fullsize import sd15_conditioning
    from editkit.nodes.inversion import DDPMInversion, EDICT, NullTextInversion, RFInversion
    pos, neg, tgt = sd15_conditioning(), sd15_conditioning(seed=1), sd15_conditioning(seed=2)
    lat = {"samples": latent(7, hw=32)}
    t0 = time.perf_counter()
    invs = {
        "ddim": node_out(Invert.execute(sd15_full, lat, pos, 1.0, 1, "normal", 0))[1],
        "npi": node_out(NegativePromptInversion.execute(sd15_full, lat, pos, 1, "normal", 0, "l1", 0.7))[1],
        "edict": node_out(EDICT.execute(sd15_full, lat, pos, 1.0, 0.93, 1, "normal"))[1],
        "ddpm": node_out(DDPMInversion.execute(sd15_full, lat, pos, 1.0, 2, "normal", 1, 0))[1],
    }
    invs["direct"] = node_out(DirectInversion.execute(invs["ddim"]))[0]
    for name, inv in invs.items():
        out, _ = edit(sd15_full, inv, tgt, None, cfg=1.0)
        assert out.shape == (2, 4, 32, 32) and torch.isfinite(out).all(), name
    # null-text: one step, one Adam iteration through the full UNet (gradient path in bf16)
    nti = node_out(NullTextInversion.execute(sd15_full, lat, pos, neg, 7.5, 1, "normal", 1, 0.01, 1e-5, 0))[1]
    assert nti.stats["iterations_total"] == 1 and torch.isfinite(nti.null_embeddings[0]).all()
    out, _ = edit(sd15_full, nti, tgt, None, cfg=7.5)
    assert torch.isfinite(out).all()
    # RF-Inversion: the same UNet layout under a rectified-flow schedule
    flow = sd15_full.clone()

    class FlowSampling(cms.ModelSamplingDiscreteFlow, cms.CONST):
        pass
    ms = FlowSampling(sd15_full.model.model_config)
    ms.set_parameters(shift=3.0, multiplier=1000)
    flow.add_object_patch("model_sampling", ms)
    rf = node_out(RFInversion.execute(flow, lat, pos, 1, "simple", 0.5, 0, 0.9, 0.0, 1.0))[1]
    out, _ = edit(flow, rf, tgt, None, cfg=1.0)
    assert torch.isfinite(out).all()
    print(f"sd15 full inversion layout check: {time.perf_counter() - t0:.1f}s")
