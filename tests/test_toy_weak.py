"""The toy model's weak UNet (models/toy/toy_weak.safetensors, AutoGuidance's weak model): it loads through
EditKitToyModelLoader with the toy model's own CLIP and VAE, a missing companion file is a clear input error,
and AutoGuidance on the toy model with it computes the paper's formula and still draws the prompt."""
import shutil

import pytest
import torch

from editkit.builtin_models import toy
from editkit.core.errors import EditKitInputError
from editkit.core.introspect import architecture, parameterization
from editkit.nodes.toy import ToyModelLoader
from editkit.toyworld import checker, evaluate
from ek_helpers import node_out

PROMPT = "a red circle on a white background"


@pytest.fixture(scope="module")
def toy_model():
    return node_out(ToyModelLoader.execute("toy.safetensors"))


@pytest.fixture(scope="module")
def weak_model():
    assert toy.available(toy.WEAK_PATH), f"{toy.WEAK_PATH} missing: it is committed; `scripts/train_toy.py --phase weak` rebuilds it"
    return node_out(ToyModelLoader.execute("toy_weak.safetensors"))


def _n_params(model):
    return sum(p.numel() for p in model.model.diffusion_model.parameters())


def test_weak_loads_with_the_toy_clip_and_vae(toy_model, weak_model):
    model, clip, vae = toy_model
    weak, wclip, wvae = weak_model
    meta = toy.read_metadata(toy.WEAK_PATH)
    assert meta["companion"] == "toy.safetensors" and meta["unet_config"]["model_channels"] < toy.UNET_CONFIG["model_channels"]
    assert architecture(weak) == "unet" and parameterization(weak) == "eps"
    assert weak.model is not model.model
    assert _n_params(weak) < 0.5 * _n_params(model)
    # same latent format (scale, per-channel shift) and the same context width
    fa, fb = model.model.latent_format, weak.model.latent_format
    assert fa.scale_factor == fb.scale_factor and fa.shift_factor == fb.shift_factor
    x = torch.randn(1, 4, 16, 16)
    assert torch.equal(weak.model.process_latent_in(x), model.model.process_latent_in(x))
    # the CLIP and VAE are the toy model's: identical weights, identical encodings
    for a, b in ((clip.cond_stage_model, wclip.cond_stage_model), (vae.first_stage_model, wvae.first_stage_model)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(toy.encode(clip, PROMPT)[0][0], toy.encode(wclip, PROMPT)[0][0])
    # the weak UNet reads those embeddings and returns a latent-shaped prediction
    cond = toy.encode(wclip, PROMPT)[0][0]
    out = weak.model.apply_model(torch.randn(1, 4, 16, 16), torch.tensor([5.0]), c_crossattn=cond)
    assert out.shape == (1, 4, 16, 16) and torch.isfinite(out).all()


def test_missing_companion_is_a_clear_error(tmp_path, monkeypatch):
    import folder_paths
    shutil.copyfile(toy.WEAK_PATH, tmp_path / "toy_weak.safetensors")
    # only the weak file where the loader looks: EditKit's toy folder and ComfyUI's "toy" model folder
    monkeypatch.setattr(toy, "DEFAULT_PATH", str(tmp_path / "toy.safetensors"))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "toy", ([str(tmp_path)], {".safetensors"}))
    monkeypatch.delitem(folder_paths.filename_list_cache, "toy", raising=False)
    with pytest.raises(EditKitInputError) as e:
        ToyModelLoader.execute("toy_weak.safetensors")
    msg = str(e.value)
    assert "EditKitToyModelLoader" in msg and "weights" in msg and "toy.safetensors" in msg and "only a UNet" in msg
    with pytest.raises(FileNotFoundError, match="toy.safetensors"):
        toy.load_toy(str(tmp_path / "toy_weak.safetensors"))


def test_autoguidance_step_is_the_papers_formula(toy_model, weak_model):
    """On a recorded step of a real run: guider output == u + cfg (c - u) + scale (c - w), with c, u, w computed
    here by calling the two UNets directly."""
    import comfy.samplers
    from editkit.guidance import schedules, terms
    from editkit.guidance.guider import GuidanceGuider
    model, clip, _ = toy_model
    weak = weak_model[0]
    cfg, scale = 3.0, 2.0
    pos, neg = toy.encode(clip, PROMPT), toy.encode(clip, "")
    rec = {}

    def euler_recording(m, x, sigmas, extra_args=None, callback=None, disable=None):
        s_in = x.new_ones([x.shape[0]])
        for i in range(len(sigmas) - 1):
            d = m(x, sigmas[i] * s_in, **(extra_args or {}))
            if i == 2:
                rec.update(x=x.clone(), sigma=sigmas[i] * s_in, denoised=d.clone())
            x = x + (x - d) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        return x

    guider = GuidanceGuider(model, (terms.CFGTerm(schedules.CONSTANT_ONE), terms.AutoGuidanceTerm(schedules.CONSTANT_ONE, weak, scale)))
    guider.set_conds(pos, neg)
    guider.set_cfg(cfg)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 6).cpu()
    noise = evaluate.seed_noise((4, 16, 16), [7])
    guider.sample(noise, torch.zeros_like(noise), comfy.samplers.KSAMPLER(euler_recording), sigmas, disable_pbar=True, seed=7)
    assert guider.stats[2]["extra_calls"] == 1
    x, sigma = rec["x"], rec["sigma"]
    c = model.model.apply_model(x, sigma, c_crossattn=pos[0][0])
    u = model.model.apply_model(x, sigma, c_crossattn=neg[0][0])
    w = weak.model.apply_model(x, sigma, c_crossattn=pos[0][0])
    expected = u + cfg * (c - u) + scale * (c - w)
    assert (c - w).abs().mean() > 0.05 * c.abs().mean()           # the weak model really differs
    torch.testing.assert_close(rec["denoised"], expected, atol=2e-4, rtol=1e-4)
    cfg_only = u + cfg * (c - u)
    assert (rec["denoised"] - cfg_only).abs().mean() > 0.1 * (expected - cfg_only).abs().mean()


def test_autoguided_red_circles(toy_model, weak_model):
    """CFG 3 + AutoGuidance 1 away from the weak UNet, 12 steps, 6 seeds: the checker reads the prompt in >= 5."""
    from editkit.guidance import schedules, terms
    model, clip, vae = toy_model
    ag = (terms.CFGTerm(schedules.CONSTANT_ONE), terms.AutoGuidanceTerm(schedules.CONSTANT_ONE, weak_model[0], 1.0))
    imgs = evaluate.txt2img(model, clip, vae, [PROMPT] * 6, list(range(6)), steps=12, cfg=3.0, terms=ag)
    ok = [checker.check(imgs[i], PROMPT).ok for i in range(6)]
    assert sum(ok) >= 5, ok
