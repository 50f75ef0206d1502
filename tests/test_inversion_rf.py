"""RF-Inversion: gamma = 0 is plain flow (Euler) inversion, gamma = 1 lands on the noise sample, and the
controlled reverse at eta = 0 is ComfyUI's plain Euler sampling; the reverse controller pulls toward the
source image. Also runs on the tiny Flux DiT."""
import pytest
import torch

from editkit.nodes.inversion import Invert, RFInversion
from ek_inversion_helpers import edit, latent, node_out, sampler_space_error

SOURCE, TARGET = "a red circle on a white background", "a blue square on a black background"


def _rf(model, lat, pos, gamma, eta=0.0, start=0.0, stop=0.5, steps=8, seed=3):
    return node_out(RFInversion.execute(model, {"samples": lat}, pos, steps, "simple", gamma, seed, eta, start, stop))


def test_gamma_zero_is_plain_flow_inversion(tiny_flow, encode):
    pos, lat = encode(SOURCE), latent(0)
    _, rf = _rf(tiny_flow, lat, pos, 0.0)
    _, plain = node_out(Invert.execute(tiny_flow, {"samples": lat}, pos, 1.0, 8, "simple", 0))
    for a, b in zip(rf.latents, plain.latents):
        assert torch.equal(a, b)


def test_gamma_one_reaches_the_noise_sample(tiny_flow, encode):
    import comfy.sample
    pos, lat = encode(SOURCE), latent(1)
    _, rf = _rf(tiny_flow, lat, pos, 1.0, seed=9)
    y1 = comfy.sample.prepare_noise(lat, 9)
    torch.testing.assert_close(rf.latents[0].float(), y1, atol=1e-5, rtol=1e-5)
    _, half = _rf(tiny_flow, lat, pos, 0.5, seed=9)
    _, zero = _rf(tiny_flow, lat, pos, 0.0, seed=9)
    # the controller interpolates: gamma 0.5 ends closer to the noise sample than gamma 0
    assert (half.latents[0].float() - y1).norm() < (zero.latents[0].float() - y1).norm()


def test_eta_zero_reverse_is_plain_sampling(tiny_flow, encode):
    import comfy.samplers
    pos, neg, tgt = encode(SOURCE), encode(""), encode(TARGET)
    _, rf = _rf(tiny_flow, latent(2), pos, 0.5, eta=0.0)
    out, _ = edit(tiny_flow, rf, tgt, neg, cfg=3.0, output="target")
    g = comfy.samplers.CFGGuider(tiny_flow)
    g.set_conds(tgt, neg)
    g.set_cfg(3.0)
    noise = rf.latents[0].float()          # flow noise_scaling at sigma 1 is the noise itself
    ref = g.sample(noise, torch.zeros_like(noise), comfy.samplers.sampler_object("euler"), rf.sigmas.clone(), seed=0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_eta_pulls_toward_the_source(tiny_flow, encode):
    pos, neg, tgt = encode(SOURCE), encode(""), encode(TARGET)
    lat = latent(3)
    errs = []
    for eta in (0.0, 0.5, 1.0):
        _, rf = _rf(tiny_flow, lat, pos, 0.5, eta=eta, stop=1.0)
        out, _ = edit(tiny_flow, rf, tgt, neg, cfg=3.0, output="target")
        errs.append(sampler_space_error(tiny_flow, out, lat))
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 1e-5       # eta = 1 on every step: x0 is the source image itself


def test_rf_on_tiny_flux(tiny_flux):
    from ek_helpers import flow_cond
    pos, tgt = flow_cond(), flow_cond(seed=1)
    lat = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    _, rf = _rf(tiny_flux, lat, pos, 0.5, eta=0.9, steps=4)
    out, _ = edit(tiny_flux, rf, tgt, None, cfg=1.0)
    assert out.shape == (2, 16, 8, 8) and torch.isfinite(out).all()


def test_rf_needs_a_flow_model(tiny_eps, encode):
    with pytest.raises(ValueError, match="EditKitRFInversion: input 'model'.*rectified-flow"):
        _rf(tiny_eps, latent(), encode(SOURCE), 0.5)
