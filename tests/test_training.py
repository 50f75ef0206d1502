"""The training core (training/): the diffusion loss equals an independent computation for EPS, v and flow
models, training lowers the loss on a fixed batch, an interrupted run resumes exactly where it stopped, the
user's model is untouched, and the trained LoRA saved in ComfyUI's key layout loads with core's loader as
exactly the trained delta."""
import math

import pytest
import torch

from editkit.builtin_models import tiny
from editkit.training import lora as TL
from editkit.training import loop as T
from editkit.training import objective as O
from editkit.core import gradients as G


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _variant(model):
    import comfy.model_base as MB
    return {MB.ModelType.EPS: tiny.EPS, MB.ModelType.V_PREDICTION: tiny.V_PREDICTION,
            MB.ModelType.FLOW: tiny.FLOW}[model.model.model_type]


def test_loss_equals_an_independent_computation(tiny_any, encode):
    """Per-row loss through the gradient clone == mean((network(c_in x_t, t, ctx) - target)^2), with the
    noisy latent, input scaling and target written out here for each parameterization."""
    cond = encode("a red circle")
    x0 = torch.randn(3, 4, 8, 8, generator=_gen(0))
    eps = torch.randn(3, 4, 8, 8, generator=_gen(1))
    ms = tiny_any.model.model_sampling
    sig = ms.sigmas[torch.tensor([50, 400, 900])].float()
    s = sig.view(-1, 1, 1, 1)
    kind = _variant(tiny_any)
    if kind == tiny.FLOW:
        x_t, c_in, tgt = (1 - s) * x0 + s * eps, torch.ones_like(s), eps - x0
    else:
        x_t, c_in = x0 + s * eps, 1 / torch.sqrt(s ** 2 + 1)
        tgt = eps if kind == tiny.EPS else (eps - s * x0) / torch.sqrt(1 + s ** 2)
    with torch.no_grad():
        raw = tiny_any.model.diffusion_model(x_t * c_in, ms.timestep(sig).float(), context=cond[0][0].expand(3, -1, -1))
    ref = (raw - tgt).square().flatten(1).mean(1)

    def program(env):
        with G.autograd():
            pred = env.denoise(G.leaf(O.noisy_latent(env.model_sampling, x0, eps, sig)), sig)
            return O.per_row_loss(pred, x0).detach()

    sigmas = torch.tensor([float(ms.sigma_max), 0.0])
    got = G.run_with_gradients(tiny_any, {"positive": cond}, program, sigmas, x0.shape)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
    assert ref.min() > 1e-3                      # a real, non-trivial loss


def _setup(model, encode, n=2, seed=0):
    conds = {"c0": encode("a photo of sks circle"), "c1": encode("a photo of a circle")}
    ex = [T.Example(torch.randn(4, 8, 8, generator=_gen(10 + i)) * 0.8, f"c{i % 2}") for i in range(n)]
    lo = TL.TrainableLora(model, TL.target_keys(model), rank=4, seed=seed)
    return conds, ex, lo


def _snapshot(model):
    import comfy.model_management
    comfy.model_management.unload_all_models()   # a LoRA clone an earlier test sampled leaves its patch in place
    dm = model.model.diffusion_model
    return ({n: p.detach().clone() for n, p in dm.named_parameters()}, dict(model.weight_wrapper_patches),
            dict(model.object_patches), dict(model.patches))


def _assert_untouched(model, snap):
    dm = model.model.diffusion_model
    params, ww, op, pt = snap
    assert all(torch.equal(p, params[n]) for n, p in dm.named_parameters())
    assert all(p.grad is None for p in dm.parameters())
    assert (dict(model.weight_wrapper_patches), dict(model.object_patches), dict(model.patches)) == (ww, op, pt)


def test_training_lowers_the_fixed_batch_loss_and_leaves_the_model_alone(tiny_eps, encode):
    conds, ex, lo = _setup(tiny_eps, encode)
    snap = _snapshot(tiny_eps)
    before = T.evaluate(tiny_eps, conds, ex, install=lo.install)
    seen = []
    res = T.train(tiny_eps, conds, ex, lo.parameters(), T.Settings(steps=24, learning_rate=1e-2, batch_size=2),
                  install=lo.install, on_step=lambda i, l: seen.append((i, l)), stop=lambda: False)
    after = T.evaluate(tiny_eps, conds, ex, install=lo.install)
    assert after < 0.98 * before, (before, after)   # 1.011 -> 0.96 after 40 steps here
    assert [i for i, _ in seen] == list(range(1, 25)) and len(res.losses) == 24
    assert all(math.isfinite(v) for v in res.losses)
    assert max(float(lo.delta(k).abs().max()) for k in lo.adapters) > 1e-4     # the LoRA moved
    _assert_untouched(tiny_eps, snap)


def test_interrupt_checkpoint_and_resume_equal_an_uninterrupted_run(tiny_v, encode, tmp_path):
    """EMA and gradient accumulation on; stop before step 3 -> checkpoint -> resume gives the same
    parameters as 6 steps in one go."""
    settings = T.Settings(steps=6, learning_rate=1e-2, batch_size=2, grad_accumulation=2, ema_decay=0.9, seed=3)
    conds, ex, full = _setup(tiny_v, encode, n=3)
    T.train(tiny_v, conds, ex, full.parameters(), settings, install=full.install, stop=lambda: False)
    _, _, part = _setup(tiny_v, encode, n=3)
    ck = str(tmp_path / "ck.pt")
    calls = iter(range(100))
    with pytest.raises(T.TrainingInterrupted) as err:
        T.train(tiny_v, conds, ex, part.parameters(), settings, install=part.install,
                checkpoint_path=ck, stop=lambda: next(calls) == 3)
    assert err.value.step == 3 and err.value.path == ck
    _, _, resumed = _setup(tiny_v, encode, n=3)
    res = T.train(tiny_v, conds, ex, resumed.parameters(), settings, install=resumed.install, resume=ck,
                  stop=lambda: False)
    assert res.resumed_from == 3 and len(res.losses) == 6
    for a, b in zip(full.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # a checkpoint from other settings is refused
    with pytest.raises(ValueError, match="other settings"):
        T.train(tiny_v, conds, ex, resumed.parameters(), T.Settings(steps=7), install=resumed.install, resume=ck,
                stop=lambda: False)


def test_saved_lora_loads_with_core_loader_as_the_trained_delta(tiny_flow, encode):
    import comfy.lora
    conds, ex, lo = _setup(tiny_flow, encode)
    T.train(tiny_flow, conds, ex, lo.parameters(), T.Settings(steps=5, learning_rate=1e-2), install=lo.install,
            stop=lambda: False)
    sd = lo.state_dict()
    assert all(k.startswith("diffusion_model.") for k in sd)
    loaded, _ = TL.apply_saved(tiny_flow, None, sd, 1.0, 0.0)
    assert set(loaded.patches) == set(lo.adapters)
    dm = tiny_flow.model.diffusion_model
    for key in lo.adapters:
        w = dm.get_parameter(key[len("diffusion_model."):]).detach().float()
        patched = comfy.lora.calculate_weight(loaded.patches[key], w.clone(), key)
        torch.testing.assert_close(patched - w, lo.delta(key).reshape(w.shape), rtol=1e-4, atol=1e-7)
    # and the loaded model predicts what the trained wrappers predicted
    from editkit.core import denoiser as D
    x = torch.randn(1, 4, 8, 8, generator=_gen(5))
    s = float(tiny_flow.model.model_sampling.sigmas[500])
    trained = tiny_flow.clone()
    lo.install(trained)
    torch.testing.assert_close(D.predict_x0(loaded, x, s, conds["c0"]), D.predict_x0(trained, x, s, conds["c0"]),
                               rtol=1e-4, atol=1e-6)
    assert not torch.allclose(D.predict_x0(tiny_flow, x, s, conds["c0"]), D.predict_x0(loaded, x, s, conds["c0"]),
                              atol=1e-6)


def test_preview_fires_every_n_steps_and_leaves_training_unchanged(tiny_eps, encode):
    """Preview every 2 of 5 steps: the callback fires at steps 2 and 4, the trained LoRA, losses and EMA are
    bitwise those of the same run without previews, and the preview at step 4 is what ComfyUI's own sampler
    (euler, simple schedule, CFG against the empty prompt, same noise) draws with the weights of step 4."""
    import comfy.model_management
    import comfy.sample
    settings = T.Settings(steps=5, learning_rate=1e-2, batch_size=2, ema_decay=0.5, seed=4)
    conds, ex, plain = _setup(tiny_eps, encode)
    ref = T.train(tiny_eps, conds, ex, plain.parameters(), settings, install=plain.install, stop=lambda: False)
    seen, at4 = [], {}
    _, _, lo = _setup(tiny_eps, encode)

    def on_latent(step, x0):
        seen.append((step, x0))
        if step == 4:
            at4["sd"] = {k: v.clone() for k, v in lo.state_dict().items()}
    neg = encode("")
    pv = T.Preview(every=2, steps=4, seed=7, cfg=3.0, negative=neg, on_latent=on_latent)
    res = T.train(tiny_eps, conds, ex, lo.parameters(), settings, install=lo.install, stop=lambda: False, preview=pv)
    assert [s for s, _ in seen] == [2, 4]
    assert res.losses == ref.losses
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), lo.parameters()))
    assert all(torch.isfinite(x).all() and x.shape == (1, 4, 8, 8) for _, x in seen)
    assert not torch.allclose(seen[0][1], seen[1][1])          # the weights changed between previews
    # the step-4 preview == core sampling with the step-4 LoRA (ddim_step == euler step on EPS models)
    loaded, _ = TL.apply_saved(tiny_eps, None, at4["sd"], 1.0, 0.0)
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(7))
    got = comfy.sample.sample(loaded, noise, 4, 3.0, "euler", "simple", conds["c0"], neg, torch.zeros(1, 4, 8, 8),
                              seed=7)
    comfy.model_management.unload_all_models()                # restore the shared fixture's weights
    torch.testing.assert_close(tiny_eps.model.process_latent_out(seen[1][1]), got, rtol=1e-4, atol=1e-4)


def _lycoris_delta(sd: dict, n: str, kind: str) -> torch.Tensor:
    """The LyCORIS formulas on the saved tensors (written out here, not ComfyUI's code)."""
    f = lambda name: sd[f"{n}.{name}"].double()
    alpha = float(sd[f"{n}.alpha"])
    if kind == "lora":
        up, down = f("lora_up.weight"), f("lora_down.weight")
        return alpha / down.shape[0] * up @ down
    if kind == "loha":
        w1b = f("hada_w1_b")
        return alpha / w1b.shape[0] * (f("hada_w1_a") @ w1b) * (f("hada_w2_a") @ f("hada_w2_b"))
    return torch.kron(f("lokr_w1"), f("lokr_w2"))          # full Kronecker factors: scale 1


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr"])
def test_adapter_file_loads_with_core_loader_and_editkit_merge_as_its_lycoris_delta(tiny_any, encode, tmp_path, kind):
    """DreamBooth with adapter lora / loha / lokr: the saved file, loaded from disk by core's loader
    (comfy.sd.load_lora_for_models, what Load LoRA calls), changes every trained weight by exactly the delta the
    LyCORIS formula gives from the saved tensors; EditKit's LoRA reader (lora/formats, used by the merge nodes)
    reads the same delta."""
    _check_adapter_file(tiny_any, encode, tmp_path, kind, TL.ATTENTION)


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr"])
def test_all_weights_recipe_adds_conv_adapters_that_load_as_their_delta(tiny_eps, encode, tmp_path, kind):
    """targets "all" (every Linear and Conv weight): conv weights get adapters too, stored flattened, and the file
    still loads through core's loader and EditKit's reader as exactly the LyCORIS delta, reshaped to the kernel."""
    lo = _check_adapter_file(tiny_eps, encode, tmp_path, kind, TL.ALL)
    convs = [k for k, shape in lo.shapes.items() if len(shape) == 4]
    assert convs and set(TL.target_keys(tiny_eps, TL.ATTENTION)) < set(lo.adapters)


def _check_adapter_file(tiny_any, encode, tmp_path, kind, targets):
    import comfy.lora
    import comfy.utils

    from editkit.lora import formats, st_io
    from editkit.training import dreambooth
    lat = torch.randn(2, 4, 8, 8, generator=_gen(3)) * 0.8
    lo, res = dreambooth.train(tiny_any, lat, encode("a photo of sks circle"),
                               T.Settings(steps=3, learning_rate=1e-2, seed=1), rank=4, stop=lambda: False, adapter=kind,
                               targets=targets)
    assert lo.kind == kind and len(res.losses) == 3
    path = str(tmp_path / f"{kind}.safetensors")
    st_io.save(lo.state_dict(), path, {})
    sd = comfy.utils.load_torch_file(path, safe_load=True)
    loaded, _ = TL.apply_saved(tiny_any, None, sd, 1.0, 0.0)
    assert set(loaded.patches) == set(lo.adapters)
    resolver = formats.KeyResolver(tiny_any)
    parsed = formats.parse(sd, resolver, kind)
    assert {m.kind for m in parsed.modules.values()} == {kind} and len(parsed.modules) == len(lo.adapters)
    dm = tiny_any.model.diffusion_model
    moved = 0.0
    for key in lo.adapters:
        w = dm.get_parameter(key[len("diffusion_model."):]).detach().float()
        ref = _lycoris_delta(sd, key[:-len(".weight")], kind).float().reshape(w.shape)
        patched = comfy.lora.calculate_weight(loaded.patches[key], w.clone(), key)
        torch.testing.assert_close(patched - w, ref, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(lo.delta(key), ref, rtol=1e-4, atol=1e-6)       # what training used
        torch.testing.assert_close(formats.dense(parsed.modules[key], sd, resolver), ref, rtol=1e-4, atol=1e-6)
        moved = max(moved, float(ref.abs().max()))
    assert moved > 1e-4                                    # the adapter was trained (all start at a zero delta)
    return lo


def test_dreambooth_text_encoder_lora_loads_on_the_clip_through_core_loader(tiny_eps, tiny_clip, encode):
    """train_text_encoder: after a few steps the saved file holds lora_te_* keys; core's loader
    (comfy.sd.load_lora_for_models, what Load LoRA calls) applies them to the CLIP, which then encodes the
    caption differently, and changes a chosen layer's weight by exactly alpha / rank * up @ down of the saved
    tensors. The user's CLIP is untouched."""
    import comfy.lora

    from editkit.training import dreambooth
    caption = "a photo of sks circle"
    before = encode(caption)[0][0].clone()
    lat = torch.randn(2, 4, 8, 8, generator=_gen(3)) * 0.8
    lo, res = dreambooth.train(tiny_eps, lat, encode(caption), T.Settings(steps=3, learning_rate=1e-2, seed=1),
                               rank=4, stop=lambda: False, text_encoder=(tiny_clip, caption, "", 1e-2))
    te = lo.text_encoder
    assert te is not None and len(res.losses) == 3
    te_sd = te.state_dict()
    assert te_sd and all(k.startswith("lora_te_text_model_encoder_layers_") for k in te_sd)
    sd = dict(lo.state_dict(), **te_sd)
    _, loaded_clip = TL.apply_saved(tiny_eps, tiny_clip, sd, 1.0, 1.0)
    assert set(loaded_clip.patcher.patches) == set(te.lora.adapters)      # every trained TE weight, on the CLIP
    key = "clip_l.transformer.text_model.encoder.layers.1.self_attn.v_proj.weight"
    n = "lora_te_text_model_encoder_layers_1_self_attn_v_proj"
    w = tiny_clip.cond_stage_model.get_parameter(key).detach().float()
    patched = comfy.lora.calculate_weight(loaded_clip.patcher.patches[key], w.clone(), key)
    up, down = sd[f"{n}.lora_up.weight"].double(), sd[f"{n}.lora_down.weight"].double()
    ref = (float(sd[f"{n}.alpha"]) / down.shape[0] * up @ down).float()
    assert float(ref.abs().max()) > 1e-4                                  # the TE LoRA was trained
    torch.testing.assert_close(patched - w, ref, rtol=1e-4, atol=1e-6)
    after = tiny.encode(loaded_clip, caption)[0][0]
    assert (after - before).abs().max() > 1e-4                            # the CLIP's output for the caption changed
    torch.testing.assert_close(encode(caption)[0][0], before)             # the user's CLIP did not


def test_text_encoder_file_keys_are_the_kohya_names_core_maps_back():
    """One encoder (SD1): lora_te_*; two (SDXL's clip_l + clip_g): lora_te1_* / lora_te2_*; each maps back to its
    weight through ComfyUI's own CLIP key map (what Load LoRA uses)."""
    import types

    import comfy.lora

    from editkit.training import dreambooth
    layer = "transformer.text_model.encoder.layers.{}.self_attn.{}.weight"

    def fake_clip(encoders):
        keys = [f"{e}.{layer.format(i, p)}" for e in encoders for i in range(2) for p in ("q_proj", "out_proj")]
        model = types.SimpleNamespace(state_dict=lambda: {k: torch.zeros(1) for k in keys})
        return types.SimpleNamespace(cond_stage_model=model), keys

    for encoders, prefixes in ((["clip_l"], {"clip_l": "lora_te_"}),
                               (["clip_l", "clip_g"], {"clip_l": "lora_te1_", "clip_g": "lora_te2_"})):
        clip, keys = fake_clip(encoders)
        got = dreambooth.text_encoder_keys(clip)
        assert set(got) == set(keys)
        back = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
        for patch_key, file_key in got.items():
            assert file_key.startswith(prefixes[patch_key.split(".")[0]]) and back[file_key] == patch_key
