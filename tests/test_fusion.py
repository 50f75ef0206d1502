"""Mix-of-Show concept fusion (lora/fusion.py, EditKitConceptFusion): the fused LoRA equals an independent
least-squares solution over activations recorded here with plain forward hooks, reproduces each LoRA's
outputs on its own activations far better than concat and TIES, a single LoRA fuses to itself, the saved
file applies through core LoraLoader exactly as fused, and bad input names the input."""
import os

import pytest
import torch

from editkit.core.errors import EditKitInputError
from editkit.lora import formats, fusion
from editkit.training import lora as TL
from ek_helpers import node_out

STEPS = 3


@pytest.fixture(autouse=True)
def _unpatched_afterwards():
    """Sampling a LoRA clone leaves its weights patched into the shared (session) model until another clone
    loads, as in ComfyUI; later test files snapshot the raw weights, so leave them as they were."""
    yield
    import comfy.model_management
    comfy.model_management.unload_all_models()


def _lora(model, seed, scale=0.3, rank=2):
    """A random LoRA in ComfyUI's plain key layout on every attention projection of the model."""
    g = torch.Generator().manual_seed(seed)
    dm = model.model.diffusion_model
    sd = {}
    for key in TL.target_keys(model):
        w = dm.get_parameter(key[len("diffusion_model."):])
        n = key[:-len(".weight")]
        sd[f"{n}.lora_up.weight"] = torch.randn(w.shape[0], rank, generator=g) * scale
        sd[f"{n}.lora_down.weight"] = torch.randn(rank, w.shape[1], generator=g) * scale
        sd[f"{n}.alpha"] = torch.tensor(float(rank))
    return sd


def _concepts(model, encode, prompts_per=(("a red circle", "a red circle on a blue background"),
                                          ("a green square", "a green square on a white background")), seeds=(1, 2)):
    resolver = formats.KeyResolver(model)
    neg = encode("")
    out = []
    for i, (prompts, seed) in enumerate(zip(prompts_per, seeds)):
        sd = _lora(model, seed)
        out.append(fusion.Concept(f"c{i}", sd, formats.parse(sd, resolver, f"c{i}"),
                                  [(encode(p), neg) for p in prompts]))
    return resolver, out


def _capture():
    return fusion.Capture(torch.zeros(1, 4, 8, 8), steps=STEPS, cfg=5.0, seed=3, samples=1)


def _reference_rows(model, concept, keys, capture):
    """Each layer's raw input rows while the LoRA'd model samples the concept's prompts (forward hooks,
    removed afterwards): an independent recording of X_i."""
    import comfy.sample
    import comfy.sd
    m, _ = comfy.sd.load_lora_for_models(model, None, concept.lora, 1.0, 0.0)
    rows = {k: [] for k in keys}
    handles = []
    base = model.model
    for k in keys:
        mod = base.get_submodule(k[:-len(".weight")])
        handles.append(mod.register_forward_pre_hook(lambda _m, args, k=k: rows[k].append(
            args[0].detach().reshape(-1, args[0].shape[-1]).double().clone())))
    try:
        for pos, neg in concept.prompts:
            noise = comfy.sample.prepare_noise(capture.latent, capture.seed)
            comfy.sample.sample(m, noise, capture.steps, capture.cfg, "euler", "normal", pos, neg, capture.latent,
                                denoise=1.0, seed=capture.seed, disable_pbar=True)
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in rows.items()}


def test_fusion_is_the_least_squares_solution_and_beats_concat_and_ties(tiny_eps, encode, tmp_path):
    resolver, concepts = _concepts(tiny_eps, encode)
    cap = _capture()
    ridge = 1e-6
    rep = fusion.fuse_to_file(tiny_eps, concepts, resolver, cap, str(tmp_path / "f.safetensors"), rank=0,
                              ridge=ridge, dtype=torch.float32, keep_deltas=True)
    keys = fusion.linear_targets(tiny_eps, [c.parsed for c in concepts])
    assert rep.n_linear == len(keys) == len(TL.target_keys(tiny_eps)) > 0
    xs = [_reference_rows(tiny_eps, c, keys, cap) for c in concepts]
    deltas = [{k: formats.dense(c.parsed.modules[k], c.lora).double() for k in keys} for c in concepts]
    err = {"fusion": [0.0, 0.0], "concat": [0.0, 0.0], "ref": [0.0, 0.0]}
    own = [0.0, 0.0]
    for k in keys:
        # independent reference: ridge least squares as one augmented lstsq over the stacked, per-concept
        # normalised rows: [X_i / sqrt(n_i); sqrt(lam) I] D^T = [X_i D_i^T / sqrt(n_i); 0]
        a = torch.cat([x[k] / x[k].shape[0] ** 0.5 for x in xs])
        b = torch.cat([x[k] @ d[k].t() / x[k].shape[0] ** 0.5 for x, d in zip(xs, deltas)])
        dim = a.shape[1]
        lam = ridge * float(a.square().sum()) / dim
        a_aug = torch.cat([a, lam ** 0.5 * torch.eye(dim, dtype=a.dtype)])
        b_aug = torch.cat([b, torch.zeros(dim, b.shape[1], dtype=b.dtype)])
        ref = torch.linalg.lstsq(a_aug, b_aug, driver="gelsd").solution.t()
        fused = rep.deltas[k].double()
        concat = deltas[0][k] + deltas[1][k]
        for i, (x, d) in enumerate(zip(xs, deltas)):
            n = x[k].shape[0]
            own[i] += float((x[k] @ d[k].t()).square().sum()) / n
            for name, m in (("fusion", fused), ("concat", concat), ("ref", ref)):
                err[name][i] += float((x[k] @ (m - d[k]).t()).square().sum()) / n
        # the fused delta gives the reference's outputs on both concepts' activations
        out_f, out_r = a @ fused.t(), a @ ref.t()
        assert float((out_f - out_r).norm()) <= 1e-3 * float(out_r.norm()) + 1e-9, k
    # its error on each concept equals the reference's, is far below concat's, and matches the report
    for i in range(2):
        assert err["fusion"][i] == pytest.approx(err["ref"][i], rel=1e-3, abs=1e-9)
        assert err["fusion"][i] < 0.5 * err["concat"][i]
        assert rep.relative("fusion")[i] == pytest.approx(err["fusion"][i] / own[i], rel=1e-3, abs=1e-9)
        assert rep.relative("concat")[i] == pytest.approx(err["concat"][i] / own[i], rel=1e-3)
        assert rep.relative("fusion")[i] < rep.relative("ties")[i]
        assert rep.relative("fusion")[i] < rep.relative("concat")[i]
    assert "fusion" in rep.summary() and "ties" in rep.summary()


def test_a_single_lora_fuses_to_itself(tiny_eps, encode, tmp_path):
    resolver, concepts = _concepts(tiny_eps, encode)
    one = concepts[:1]
    # enough activation rows (4 prompts) for every layer's Gram matrix to have full rank
    neg = encode("")
    one[0].prompts = [(encode(p), neg) for p in ("a red circle", "two blue squares", "a white triangle on black",
                                                 "a yellow star on a green background")]
    rep = fusion.fuse_to_file(tiny_eps, one, resolver, _capture(), str(tmp_path / "one.safetensors"), rank=0,
                              ridge=1e-10, dtype=torch.float32, keep_deltas=True)
    xs = _reference_rows(tiny_eps, one[0], list(rep.deltas), _capture())
    for k, fused in rep.deltas.items():
        # the same layer outputs on the concept's activations (the weight itself is only determined on
        # the span of the activations: LayerNorm outputs leave a null direction)
        d = formats.dense(one[0].parsed.modules[k], one[0].lora).double()
        got, want = xs[k] @ fused.double().t(), xs[k] @ d.t()
        assert float((got - want).norm()) <= 1e-4 * float(want.norm()), k
    assert rep.relative("fusion")[0] < 1e-8


def _write_loras(model, names):
    import folder_paths
    from editkit.lora import st_io
    d = folder_paths.get_folder_paths("loras")[0]
    os.makedirs(d, exist_ok=True)
    for i, name in enumerate(names):
        st_io.save(_lora(model, 10 + i), os.path.join(d, name))
    return d


NODE_ARGS = dict(prompts_1="a red circle\na red circle on a blue background", lora_3="None", prompts_3="",
                 lora_4="None", prompts_4="", rank=4, ridge=1e-8, steps=STEPS, cfg=5.0, samples=1, seed=0,
                 dtype="fp32", name="ek_test_fused")


def test_node_writes_one_lora_core_loader_applies(tiny_eps, tiny_clip, encode):
    import folder_paths
    import nodes
    from editkit.core import denoiser as D
    from editkit.nodes.training import ConceptFusion
    d = _write_loras(tiny_eps, ["ek_fuse_a.safetensors", "ek_fuse_b.safetensors"])
    try:
        model, name, report = node_out(ConceptFusion.execute(
            model=tiny_eps, clip=tiny_clip, latent={"samples": torch.zeros(1, 4, 8, 8)},
            lora_1="ek_fuse_a.safetensors", lora_2="ek_fuse_b.safetensors",
            prompts_2="a green square\na green square on a white background", **NODE_ARGS))
        assert name == "ek_test_fused.safetensors" and "saved models/loras/ek_test_fused.safetensors" in report
        assert "concat" in report and "ties" in report
        loaded, _ = nodes.LoraLoader().load_lora(tiny_eps, tiny_clip, name, 1.0, 1.0)
        assert set(loaded.patches) == set(model.patches) == set(TL.target_keys(tiny_eps))
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        s, c = float(tiny_eps.model.model_sampling.sigmas[600]), encode("a red circle")
        torch.testing.assert_close(D.predict_x0(loaded, x, s, c), D.predict_x0(model, x, s, c), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(D.predict_x0(tiny_eps, x, s, c), D.predict_x0(loaded, x, s, c), atol=1e-6)
        assert not tiny_eps.patches and not tiny_eps.object_patches
        # rank 4 low-rank form: every layer stored as lora_up/lora_down of rank <= 4
        from editkit.lora.st_io import SafetensorsFile
        f = SafetensorsFile(os.path.join(d, name))
        ups = [k for k in f.keys() if k.endswith("lora_up.weight")]
        assert len(ups) == len(TL.target_keys(tiny_eps)) and all(f.shape(k)[1] <= 4 for k in ups)
        os.remove(os.path.join(d, name))
    finally:
        for n in ("ek_fuse_a.safetensors", "ek_fuse_b.safetensors"):
            p = os.path.join(d, n)
            if os.path.exists(p):
                os.remove(p)


@pytest.mark.parametrize("change, input_name", [
    (dict(lora_2="None"), "lora_2"),                       # fewer than two LoRAs
    (dict(prompts_2="  \n "), "prompts_2"),                  # a LoRA without prompts
    (dict(lora_2="ek_fuse_other.safetensors"), "lora_2"),    # a LoRA made for another model
    (dict(name="../evil"), "name"),
])
def test_node_bad_input_names_the_input_and_writes_nothing(tiny_eps, tiny_clip, change, input_name):
    import folder_paths
    from editkit.lora import st_io
    from editkit.nodes.training import ConceptFusion
    d = _write_loras(tiny_eps, ["ek_fuse_a.safetensors", "ek_fuse_b.safetensors"])
    st_io.save({"diffusion_model.nonexistent.block.lora_up.weight": torch.zeros(4, 2),
                "diffusion_model.nonexistent.block.lora_down.weight": torch.zeros(2, 4)},
               os.path.join(d, "ek_fuse_other.safetensors"))
    before = set(os.listdir(d))
    args = dict(NODE_ARGS, lora_1="ek_fuse_a.safetensors", lora_2="ek_fuse_b.safetensors", prompts_2="a green square")
    args.update(change)
    try:
        with pytest.raises(EditKitInputError) as e:
            ConceptFusion.execute(model=tiny_eps, clip=tiny_clip, latent={"samples": torch.zeros(1, 4, 8, 8)}, **args)
        assert e.value.input_name == input_name
        assert set(os.listdir(d)) == before
    finally:
        for n in ("ek_fuse_a.safetensors", "ek_fuse_b.safetensors", "ek_fuse_other.safetensors"):
            p = os.path.join(d, n)
            if os.path.exists(p):
                os.remove(p)
