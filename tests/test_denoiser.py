"""The denoiser toolkit against ComfyUI's own model_sampling, for EPS, v-prediction and flow models."""
import torch
import pytest

from editkit.core import denoiser as D
from editkit.core.introspect import model_sampling


@pytest.fixture
def ms_any(tiny_any):
    return model_sampling(tiny_any)


def test_add_noise_matches_comfy_noise_scaling(ms_any):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for sigma in (0.3, 0.7):
        sig = D.sigma_at(ms_any, sigma)
        ours = D.add_noise(ms_any, x0, eps, sig)
        comfy = ms_any.noise_scaling(torch.tensor(sig), eps, x0, max_denoise=False)
        torch.testing.assert_close(ours, comfy, rtol=0, atol=1e-6)


def test_eps_x0_roundtrip(ms_any):
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    sig = D.sigma_at(ms_any, 0.5)
    x = D.add_noise(ms_any, x0, eps, sig)
    torch.testing.assert_close(D.to_eps(ms_any, x, x0, sig), eps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(D.to_x0(ms_any, x, eps, sig), x0, atol=1e-5, rtol=1e-5)


def test_ddim_step_is_euler_and_exact_for_true_x0(ms_any):
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    s, sn = D.sigma_at(ms_any, 0.8), D.sigma_at(ms_any, 0.4)
    x = D.add_noise(ms_any, x0, eps, s)
    euler = x + D.derivative(x, x0, s) * (sn - s)
    step = D.ddim_step(ms_any, x, x0, s, sn)
    torch.testing.assert_close(step, euler, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step, D.add_noise(ms_any, x0, eps, sn), atol=1e-5, rtol=1e-5)
    # and backwards (inversion direction) with the true x0 lands exactly on the trajectory
    torch.testing.assert_close(D.ddim_step(ms_any, step, x0, sn, s), x, atol=1e-5, rtol=1e-5)


def test_flow_velocity_is_eps_minus_x0(tiny_flow):
    ms = model_sampling(tiny_flow)
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    s = D.sigma_at(ms, 0.6)
    x = D.add_noise(ms, x0, eps, s)
    torch.testing.assert_close(D.velocity(ms, x, x0, s), eps - x0, atol=1e-5, rtol=1e-5)
    assert D.space(ms) == "flow" and D.sigma_at(ms, 1.0) == pytest.approx(1.0)


def test_resumable_latent_roundtrips_through_noise_scaling(ms_any):
    """ComfyUI resumes a partial latent with zero noise: noise_scaling(s, 0, stored) must give x back."""
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    s = D.sigma_at(ms_any, 0.5)
    stored = D.to_resumable(ms_any, x, s)
    back = ms_any.noise_scaling(torch.tensor(s), torch.zeros_like(x), stored, max_denoise=False)
    torch.testing.assert_close(back, x, atol=1e-5, rtol=1e-5)


def test_step_index_and_progress(tiny_eps):
    sig = D.schedule(tiny_eps, "normal", 10)
    assert D.step_index(sig, sig[3]) == 3 and D.progress(sig, sig[5]) == pytest.approx(0.5)
    assert D.step_index(sig, sig[3:4] * torch.ones(2)) == 3


def test_predict_x0_matches_sampler_denoised(tiny_any, encode):
    """predict_x0 (outside a sampling loop) equals the x0 ComfyUI's sampler computes at the same point."""
    import comfy.samplers
    cond = encode("a red circle")
    ms = model_sampling(tiny_any)
    sigmas = D.schedule(tiny_any, "normal", 4)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5)) * float(sigmas[1])
    ours = D.predict_x0(tiny_any, x, sigmas[1], cond)
    seen = {}

    def sampler_fn(model, x_in, sigmas_in, extra_args=None, callback=None, disable=None):
        seen["x0"] = model(x_in, sigmas_in[0] * x_in.new_ones([1]), **extra_args)
        return x_in
    guider = comfy.samplers.CFGGuider(tiny_any)
    guider.set_conds(cond, cond)
    guider.set_cfg(1.0)
    lat = D.to_resumable(ms, x, sigmas[1]) / 1.0
    guider.sample(torch.zeros_like(x), tiny_any.model.process_latent_out(lat), comfy.samplers.KSAMPLER(sampler_fn),
                  sigmas[1:2].clone(), seed=0)
    torch.testing.assert_close(ours, seen["x0"], atol=1e-4, rtol=1e-4)
