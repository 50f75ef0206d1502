"""SDEdit: exact noise level for EPS and flow, strength 1 = txt2img, errors name the input."""
import pytest
import torch

from editkit.core import denoiser as D
from editkit.core.introspect import model_sampling
from editkit.nodes.editing import SDEdit
from ek_helpers import node_out, sample_custom, sample_ksampler


def run_sdedit(model, latent, strength=0.6, steps=6, seed=3, scheduler="normal"):
    return node_out(SDEdit.execute(model, {"samples": latent}, strength, steps, scheduler, seed))


def _latent(seed=0, channels=4, hw=16):
    return torch.randn(1, channels, hw, hw, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("strength", [0.25, 0.6, 0.95])
def test_noise_level_exact(tiny_any, strength):
    import comfy.sample
    ms = model_sampling(tiny_any)
    lat = _latent()
    noise_obj, out, sigmas, denoise = run_sdedit(tiny_any, lat, strength)
    sigma0 = D.sigma_at(ms, strength)
    assert float(sigmas[0]) == pytest.approx(sigma0, rel=1e-6) and float(sigmas[-1]) == 0.0
    assert torch.all(sigmas[1:] < sigmas[:-1]) and denoise == strength
    eps = comfy.sample.prepare_noise(lat, 3)
    x = tiny_any.model.process_latent_in(lat)
    expected = D.add_noise(ms, x, eps, sigma0)
    # what the sampler starts from: noise_scaling(sigma0, noise output, latent output)
    start = ms.noise_scaling(sigmas[0], noise_obj.generate_noise(out), tiny_any.model.process_latent_in(out["samples"]))
    torch.testing.assert_close(start, expected, atol=1e-5, rtol=1e-5)
    if D.space(ms) == "ve":
        torch.testing.assert_close(start, x + sigma0 * eps, atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(start, (1 - sigma0) * x + sigma0 * eps, atol=1e-5, rtol=1e-5)


def test_strength_one_is_txt2img(tiny_any, encode):
    pos, neg = encode("a red circle on a white background"), encode("")
    lat = _latent(hw=8)
    noise_obj, out, sigmas, _ = run_sdedit(tiny_any, lat, 1.0, steps=5, seed=11)
    edited = sample_custom(tiny_any, pos, neg, noise_obj, out, sigmas)
    txt2img = sample_ksampler(tiny_any, pos, neg, torch.zeros_like(lat), seed=11, steps=5)
    torch.testing.assert_close(edited, txt2img, atol=1e-4, rtol=1e-4)


def test_partial_strength_matches_ksampler_denoise_schedule(tiny_eps):
    import comfy.samplers
    _, _, sigmas, denoise = run_sdedit(tiny_eps, _latent(), 0.5, steps=6)
    ks = comfy.samplers.KSampler(tiny_eps, steps=6, device="cpu", scheduler="normal", denoise=denoise)
    assert len(ks.sigmas) == len(sigmas)
    torch.testing.assert_close(ks.sigmas[1:].cpu(), sigmas[1:])
    assert abs(float(ks.sigmas[0]) - float(sigmas[0])) < 0.25 * float(sigmas[0])


def test_edit_runs_and_stays_close_at_low_strength(tiny_eps, encode):
    pos, neg = encode("a blue circle"), encode("")
    lat = _latent(hw=8) * 0.2
    noise_obj, out, sigmas, _ = run_sdedit(tiny_eps, lat, 0.05, steps=4)
    res = sample_custom(tiny_eps, pos, neg, noise_obj, out, sigmas)
    far_noise_obj, far_out, far_sigmas, _ = run_sdedit(tiny_eps, lat, 0.9, steps=4)
    far = sample_custom(tiny_eps, pos, neg, far_noise_obj, far_out, far_sigmas)
    assert torch.isfinite(res).all()
    assert (res - lat).abs().mean() < (far - lat).abs().mean()


@pytest.mark.parametrize("strength", [0.0, 1.5, -0.1])
def test_bad_strength(tiny_eps, strength):
    with pytest.raises(ValueError, match="EditKitSDEdit: input 'strength'"):
        run_sdedit(tiny_eps, _latent(), strength)


def test_wrong_latent_for_model(tiny_flux):
    with pytest.raises(ValueError, match="EditKitSDEdit: input 'latent'.*channels"):
        run_sdedit(tiny_flux, _latent(channels=4) + 1)


def test_noise_mask_rejected(tiny_eps):
    with pytest.raises(ValueError, match="noise mask"):
        SDEdit.execute(tiny_eps, {"samples": _latent(), "noise_mask": torch.ones(1, 16, 16)}, 0.5, 4, "normal", 0)


def test_batch(tiny_eps, encode):
    lat = torch.cat([_latent(1, hw=8), _latent(2, hw=8)])
    noise_obj, out, sigmas, _ = run_sdedit(tiny_eps, lat, 0.5, steps=3)
    res = sample_custom(tiny_eps, encode("a red circle"), encode(""), noise_obj, out, sigmas)
    assert res.shape == lat.shape and not torch.equal(res[0], res[1])


@pytest.mark.slow
def test_sd15_full_one_step(sd15_full):
    from editkit.builtin_models.fullsize import sd15_conditioning
    lat = _latent(hw=32)
    noise_obj, out, sigmas, _ = run_sdedit(sd15_full, lat, 0.5, steps=1)
    res = sample_custom(sd15_full, sd15_conditioning(), sd15_conditioning(seed=1), noise_obj, out, sigmas, cfg=1.0)
    assert res.shape == (1, 4, 32, 32) and torch.isfinite(res).all()
