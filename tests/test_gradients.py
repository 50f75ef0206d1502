"""The gradient core (core/gradients.py): gradients w.r.t. a latent through the tiny UNet and tiny Flux
agree with finite differences, gradient checkpointing changes memory but not the gradient, the
prediction carries every parameterization, and the user's model is untouched and samples identically."""
import math

import pytest
import torch

from editkit.core import denoiser as D
from editkit.core import gradients as G
from editkit.core import introspect as I
from ek_helpers import sample_ksampler


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _latent_gradient(model, cond, lat, weights, direction, checkpointing=False, eps=1e-2):
    """(analytic directional derivative, central finite difference) of L(x) = sum((x0(x) * w)^2) at step 1."""
    sigmas = D.schedule(model, "normal", 4)

    def program(env):
        x = G.leaf(lat.to(env.device))
        w, u = G.leaf(weights, False), direction.to(env.device)
        s = env.sigmas[1]
        with G.autograd():
            loss = (env.denoise(x, s).x0 * w).square().sum()
            loss.backward()
        with torch.no_grad():
            plus = (env.denoise(x.detach() + eps * u, s).x0 * w).square().sum()
            minus = (env.denoise(x.detach() - eps * u, s).x0 * w).square().sum()
        return float((x.grad * u).sum()), float((plus - minus) / (2 * eps)), x.grad.detach()

    return G.run_with_gradients(model, {"positive": cond}, program, sigmas, lat.shape, checkpointing=checkpointing)


@pytest.mark.parametrize("arch", ["unet", "flux"])
def test_latent_gradient_matches_finite_differences(arch, tiny_v, tiny_flux, encode):
    model, ch = (tiny_v, 4) if arch == "unet" else (tiny_flux, 16)
    lat, w, u = (torch.randn(1, ch, 8, 8, generator=_gen(s)) for s in (0, 1, 2))
    cond = encode("a red circle")
    analytic, numeric, grad = _latent_gradient(model, cond, lat, w, u)
    assert abs(numeric) > 1.0 and grad.abs().mean() > 1e-2          # a real, non-vanishing gradient
    assert abs(analytic - numeric) <= 1e-2 * abs(numeric), (analytic, numeric)
    # checkpointing recomputes instead of storing, the gradient is the same
    _, _, grad2 = _latent_gradient(model, cond, lat, w, u, checkpointing=True)
    torch.testing.assert_close(grad2, grad, rtol=1e-4, atol=1e-6)


def _saved_bytes(model, cond, lat, checkpointing):
    """Bytes autograd keeps for backward of one differentiable prediction (what checkpointing cuts)."""
    sigmas = D.schedule(model, "normal", 4)
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    def program(env):
        x = G.leaf(lat.to(env.device))
        with G.autograd(copy_saved=False), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = env.denoise(x, env.sigmas[1]).x0.square().sum()
        out.backward()
        return x.grad.detach()

    grad = G.run_with_gradients(model, {"positive": cond}, program, sigmas, lat.shape, checkpointing=checkpointing)
    return total[0], grad


def test_checkpointing_keeps_less_for_backward(tiny_eps, encode):
    cond, lat = encode("a red circle"), torch.randn(1, 4, 16, 16, generator=_gen(3))
    full, g_full = _saved_bytes(tiny_eps, cond, lat, False)
    ckpt, g_ckpt = _saved_bytes(tiny_eps, cond, lat, True)
    assert ckpt < 0.5 * full, (ckpt, full)
    torch.testing.assert_close(g_ckpt, g_full, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ["unet", "flux"])
def test_gradient_run_leaves_the_users_model_alone(arch, tiny_eps, tiny_flux, encode):
    """Flux also takes the per-clone parameter copies (its RMSNorm scales bypass weight wrappers)."""
    model, ch = (tiny_eps, 4) if arch == "unet" else (tiny_flux, 16)
    pos, neg = encode("a red circle"), encode("")
    lat = torch.zeros(1, ch, 8, 8)
    before = sample_ksampler(model, pos, neg, lat, steps=3)
    state = (dict(model.weight_wrapper_patches), dict(model.object_patches), repr(model.model_options),
             dict(model.wrappers))
    params = {n: p.detach().clone() for n, p in model.model.diffusion_model.named_parameters()}
    _latent_gradient(model, pos, torch.randn(1, ch, 8, 8, generator=_gen(0)), torch.ones(1, ch, 8, 8),
                     torch.ones(1, ch, 8, 8), checkpointing=True)
    assert (dict(model.weight_wrapper_patches), dict(model.object_patches), repr(model.model_options),
            dict(model.wrappers)) == state
    dm = model.model.diffusion_model
    assert all(p.grad is None for p in dm.parameters())             # no gradient ever lands on the user's weights
    assert all(torch.equal(p, params[n]) for n, p in dm.named_parameters())
    after = sample_ksampler(model, pos, neg, lat, steps=3)
    assert torch.equal(before, after)
    # the checkpointing copies were the clone's object patches: with the user's model loaded, its tree is its own
    assert not any("forward" in vars(mod) or type(vars(mod)["_parameters"]) is not dict for mod in dm.modules())


def test_prediction_in_every_parameterization(tiny_any, encode):
    """denoise() is the sampler's prediction (same x0 as the no-grad path), and its eps / velocity /
    native output follow the model's own parameterization (closed forms computed here)."""
    cond = encode("a blue square")
    x = torch.randn(2, 4, 8, 8, generator=_gen(4))
    sigmas = D.schedule(tiny_any, "normal", 4)
    s = float(sigmas[1])
    ref = D.predict_x0(tiny_any, x, s, cond)

    def program(env):
        with G.autograd():
            p = env.denoise(G.leaf(x.to(env.device)), s)
        return {k: getattr(p, k).detach() for k in ("x0", "eps", "velocity", "native")}

    p = G.run_with_gradients(tiny_any, {"positive": cond}, program, sigmas, x.shape)
    torch.testing.assert_close(p["x0"], ref, rtol=1e-5, atol=1e-6)
    ms = tiny_any.model.model_sampling
    flow = D.space(ms) == "flow"
    eps = (x - (1 - s) * p["x0"]) / s if flow else (x - p["x0"]) / s
    torch.testing.assert_close(p["eps"], eps, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(p["velocity"], eps - p["x0"] if flow else eps, rtol=1e-4, atol=1e-5)
    native = {I.EPS: eps, I.FLOW: eps - p["x0"],
              I.V_PREDICTION: (eps - s * p["x0"]) / math.sqrt(1 + s * s)}[I.parameterization(tiny_any)]
    torch.testing.assert_close(p["native"], native, rtol=1e-4, atol=1e-5)


def test_grad_weight_copies_only_what_autograd_cannot_save():
    wrap = G.GradWeight()
    with torch.inference_mode():
        inf = torch.randn(3, 3)
    with torch.inference_mode(False):
        leaf = torch.nn.Parameter(torch.randn(3, 3))
        plain = torch.randn(3, 3)
        with torch.no_grad():
            assert wrap(inf) is inf                            # nothing recorded: no copy
        with torch.enable_grad():
            c = wrap(inf)
            assert not c.is_inference() and not c.requires_grad and torch.equal(c, inf)
            copied = leaf.to(copy=True)                        # what ComfyUI's cast hands the wrappers
            for w in (leaf, copied):
                d = wrap(w)
                assert not d.requires_grad and d.data_ptr() == w.data_ptr()     # detached, not copied
            assert wrap(plain) is plain


def test_autograd_context_is_restored():
    with torch.inference_mode():
        with G.autograd():
            assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
            t = G.leaf(torch.ones(2))
            assert t.requires_grad and not t.is_inference()
        assert torch.is_inference_mode_enabled()
