"""scripts/train_toy.py trains on the training core (training/objective.py loss, training/loop.Optimizer AdamW +
clipping + EMA): its one loop (`train_diffusion`, used by the toy UNet + text encoder phase and the weak UNet
phase) equals, to float tolerance, the hand-written loop the script held before (VP-form noisy latent, eps
target, min-SNR-5, AdamW, clipping, warm-up EMA), and a run resumed from its checkpoint equals an
uninterrupted one bitwise. Tiny models, a few steps (seconds)."""
import contextlib
import importlib.util
import math
import os
from types import SimpleNamespace

import pytest
import torch

from editkit.builtin_models import tiny, toy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, BATCH, LR, EMA, WARMUP, DROP, STREAM = 4, 3, 1e-3, 0.9, 2, 0.3, 77


@pytest.fixture(scope="module")
def tt():
    spec = importlib.util.spec_from_file_location("editkit_train_toy", os.path.join(ROOT, "scripts", "train_toy.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _data():
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(6, 4, 8, 8, generator=g)
    caps = [f"a {c} circle" for c in ("red", "blue", "green", "white", "black", "yellow")]
    return x0, caps


def _models(tt):
    """A tiny UNet and a tiny CLIP text encoder, trainable as the toy phase trains its own."""
    model = tiny.tiny_unet(tiny.EPS, seed=0)
    clip = toy.build_clip(dtype=torch.float32, config={     # fp32, as the toy phase builds its own (toy size: 64)
        "hidden_size": tiny.CONTEXT_DIM, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2,
        "projection_dim": tiny.CONTEXT_DIM})
    te = clip.cond_stage_model.clip_l
    tt.make_clip_trainable(te)
    for p in list(model.model.diffusion_model.parameters()) + list(te.transformer.parameters()):
        p.requires_grad_(True)

    def context(texts):
        ctx, _ = te([tt.token_ids(clip, s) for s in texts])
        return ctx.float()
    return model, te, context


def _reference(tt, model, te, context, x0_all, captions, steps):
    """The loop scripts/train_toy.py held before it used the training core, written out."""
    unet = model.model.diffusion_model
    alphas = 1.0 / (1.0 + model.model.model_sampling.sigmas.float() ** 2)
    snr = alphas / (1 - alphas)
    params = list(unet.parameters()) + list(te.transformer.parameters())
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.99), weight_decay=0.01)
    emas = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in (unet, te.transformer)]
    losses = []
    for step in range(steps):
        g = torch.Generator().manual_seed(STREAM + step)
        idx = torch.randint(0, len(x0_all), (BATCH,), generator=g)
        x0 = x0_all[idx]
        texts = ["" if torch.rand((), generator=g).item() < DROP else captions[i] for i in idx.tolist()]
        t = torch.randint(0, len(alphas), (BATCH,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        ac = alphas[t].view(-1, 1, 1, 1)
        xt = ac.sqrt() * x0 + (1 - ac).sqrt() * eps
        w = torch.clamp(snr[t], max=5.0) / snr[t]
        lr = LR * (step + 1) / WARMUP if step < WARMUP else LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(
            math.pi * min(1.0, (step - WARMUP) / max(1, steps - WARMUP)))))
        for grp in opt.param_groups:
            grp["lr"] = lr
        pred = unet(xt, timesteps=t.float(), context=context(texts)).float()
        loss = (w * ((pred - eps) ** 2).mean(dim=(1, 2, 3))).mean()
        losses.append(float(loss.detach()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(EMA, (2 + step) / (11 + step))
        with torch.no_grad():
            for m, ema in zip((unet, te.transformer), emas):
                for k, v in m.state_dict().items():
                    if v.is_floating_point():
                        ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
    return emas, losses


def _run(tt, model, te, context, x0_all, captions, steps, ckpt=None, losses=None):
    a = SimpleNamespace(ckpt_every=1, adaptive_threads=False)
    out = tt.train_diffusion(model, [("unet", "ema_u", model.model.diffusion_model), ("te", "ema_t", te.transformer)],
                             context, x0_all, captions, steps=steps, batch=BATCH, lr=LR, ema=EMA, warmup=WARMUP,
                             cfg_dropout=DROP, stream=STREAM, ckpt=ckpt, a=a, autocast=contextlib.nullcontext,
                             on_step=None if losses is None else lambda s, loss, _e: losses.append(loss))
    return [out["ema_u"], out["ema_t"]]


def _mostly_equal(sd_a, sd_b, bound):
    """Every entry within Adam's own bound on the run's total update; all but 0.1 % equal to float tolerance.
    Adam normalizes each entry's gradient, so an entry whose gradient is analytically zero (a bias feeding a
    GroupNorm) or cancels to rounding level takes a full lr-sized step of arbitrary sign in either run."""
    n = bad = 0
    for k in sd_a:
        a, b = sd_a[k].float(), sd_b[k].float()
        d = (a - b).abs()
        assert d.max() <= bound, k
        bad += int((d > 1e-6 + 1e-4 * b.abs()).sum())
        n += a.numel()
    assert bad <= n // 1000, f"{bad} of {n} entries differ"


def _close(sd_a, sd_b, atol=2e-6):
    for k in sd_a:
        torch.testing.assert_close(sd_a[k], sd_b[k], rtol=1e-4, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def test_train_toy_loss_equals_the_former_vp_form(tt):
    """One batch: the training core's objective (sigma space, model_sampling's input scaling and target,
    min-SNR weights from model_sampling) gives the loss of the former VP formulas: x_t = sqrt(a) x0 +
    sqrt(1 - a) eps at timestep t, eps target, min(SNR, 5) / SNR."""
    x0_all, _ = _data()
    model = tiny.tiny_unet(tiny.EPS, seed=0)
    unet, ms = model.model.diffusion_model, model.model.model_sampling
    g = torch.Generator().manual_seed(5)
    ctx = torch.randn(3, 7, tiny.CONTEXT_DIM, generator=g)
    x0, sigma, eps, _ = tt.diffusion_batch(torch.Generator().manual_seed(9), x0_all, ["x"] * 6, ms, 3, 0.0)
    got, rows = tt.diffusion_loss(unet, ms, x0, sigma, eps, ctx, contextlib.nullcontext)
    alphas = 1.0 / (1.0 + ms.sigmas.float() ** 2)
    t = ms.timestep(sigma)                       # the drawn schedule indices
    ac = alphas[t].view(-1, 1, 1, 1)
    snr = alphas[t] / (1 - alphas[t])
    pred = unet(ac.sqrt() * x0 + (1 - ac).sqrt() * eps, timesteps=t.float(), context=ctx)
    ref_rows = ((pred - eps) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(rows, ref_rows, rtol=1e-5, atol=0)
    torch.testing.assert_close(got, (torch.clamp(snr, max=5.0) / snr * ref_rows).mean(), rtol=1e-5, atol=0)
    assert torch.equal(ms.sigmas[t], sigma)


def test_train_toy_loop_equals_the_hand_written_loop(tt):
    x0, caps = _data()
    losses = []
    with torch.inference_mode(False):
        m1, te1, ctx1 = _models(tt)
        init = {k: v.detach().clone() for k, v in m1.model.diffusion_model.state_dict().items()}
        got = _run(tt, m1, te1, ctx1, x0, caps, STEPS, losses=losses)
        m2, te2, ctx2 = _models(tt)
        ref, ref_losses = _reference(tt, m2, te2, ctx2, x0, caps, STEPS)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
    bound = 2 * LR * STEPS
    _mostly_equal(m1.model.diffusion_model.state_dict(), m2.model.diffusion_model.state_dict(), bound)
    _mostly_equal(te1.transformer.state_dict(), te2.transformer.state_dict(), bound)
    _mostly_equal(got[0], ref[0], bound)
    _mostly_equal(got[1], ref[1], bound)
    moved = max((v - init[k]).abs().max().item() for k, v in m1.model.diffusion_model.state_dict().items())
    assert moved > 1e-4                          # the loop really trained


def test_train_toy_loop_resumes_from_its_checkpoint(tt, tmp_path):
    x0, caps = _data()
    ck = str(tmp_path / "unet.pt")
    with torch.inference_mode(False):
        m1, te1, ctx1 = _models(tt)
        _run(tt, m1, te1, ctx1, x0, caps, STEPS - 2, ckpt=ck)      # "interrupted" after 2 steps, checkpoint written
        m2, te2, ctx2 = _models(tt)
        resumed = _run(tt, m2, te2, ctx2, x0, caps, STEPS, ckpt=ck)
        m3, te3, ctx3 = _models(tt)
        straight = _run(tt, m3, te3, ctx3, x0, caps, STEPS)
    assert torch.load(ck, weights_only=False)["step"] == STEPS
    _close(m2.model.diffusion_model.state_dict(), m3.model.diffusion_model.state_dict(), atol=0)
    _close(resumed[0], straight[0], atol=0)
