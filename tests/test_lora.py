"""LoRA merge / block weights / save: exact merges, reference implementations written here, ComfyUI round trips."""
import os

import numpy as np
import pytest
import torch

from editkit.core.errors import EditKitInputError
from editkit.lora import blocks, formats, merge, st_io, synthetic
from editkit.nodes.lora import LoraBlockWeight, LoraMerge, LoraSave
from ek_helpers import node_out


# ---------------------------------------------------------------------------------------------
# Independent references (textbook formulas on the raw tensors; nothing from editkit.lora)
# ---------------------------------------------------------------------------------------------

def textbook_delta(sd, name, shape):
    """The delta a LoRA module applies, from the format definitions (float64)."""
    f = {k[len(name) + 1:]: v.double() for k, v in sd.items() if k.startswith(name + ".")}
    alpha = float(f["alpha"]) if "alpha" in f else None
    if "lora_up.weight" in f or "lora_B.weight" in f:
        up = f.get("lora_up.weight", f.get("lora_B.weight"))
        down = f.get("lora_down.weight", f.get("lora_A.weight"))
        r = down.shape[0]
        if "lora_mid.weight" in f:   # Tucker LoCon: W[o,i,y,x] = sum_ab up[o,a] mid[a,b,y,x] down[b,i]
            d = torch.einsum("oa,abyx,bi->oiyx", up[:, :, 0, 0], f["lora_mid.weight"], down[:, :, 0, 0])
        else:
            d = (up.reshape(up.shape[0], -1) @ down.reshape(r, -1)).reshape(shape)
        return d * (alpha / r if alpha is not None else 1.0)
    if "hada_w1_a" in f:             # LoHa: Hadamard product of two low-rank products
        d = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])
        return d.reshape(shape) * (alpha / f["hada_w1_b"].shape[0])
    if "lokr_w1" in f:               # LoKr: Kronecker product
        d = torch.kron(f["lokr_w1"], f["lokr_w2_a"] @ f["lokr_w2_b"])
        return d.reshape(shape) * (alpha / f["lokr_w2_b"].shape[0])
    raise KeyError(name)


def ties_reference(deltas, weights, density):
    """TIES-Merging, element by element with numpy loops."""
    trimmed = []
    for d in deltas:
        a = d.double().numpy().ravel()
        k = int(round(density * a.size))
        keep = np.zeros(a.size, bool)
        if k > 0:
            thr = np.sort(np.abs(a))[::-1][k - 1]
            keep = np.abs(a) >= thr
        trimmed.append(np.where(keep, a, 0.0))
    out = np.zeros_like(trimmed[0])
    for j in range(out.size):
        contrib = [w * t[j] for w, t in zip(weights, trimmed)]
        s = np.sign(sum(contrib))
        agree = [c for c in contrib if c != 0 and np.sign(c) == s]
        out[j] = sum(agree) / len(agree) if agree else 0.0
    return torch.from_numpy(out.reshape(deltas[0].shape))


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def lora_dir(tmp_path_factory):
    import folder_paths
    d = str(tmp_path_factory.mktemp("loras"))
    folder_paths.add_model_folder_path("loras", d)
    return d


@pytest.fixture(scope="session")
def tiny_pair():
    from editkit.builtin_models import tiny
    return tiny.tiny_unet(tiny.EPS, seed=0), tiny.tiny_clip()


@pytest.fixture(scope="session")
def resolver(tiny_pair):
    return formats.KeyResolver(*tiny_pair)


@pytest.fixture(scope="session")
def targets(resolver):
    return synthetic.select_targets(resolver, ("attn", "te", "conv"))


def write(lora_dir, name, sd):
    st_io.save(sd, os.path.join(lora_dir, name))
    return name


def comfy_deltas(model_patcher, keys):
    """What ComfyUI applies to each key: its calculate_weight over the patcher's patch list, on zeros."""
    import comfy.lora
    out = {}
    for k in keys:
        shape = model_patcher.model.state_dict()[k].shape if hasattr(model_patcher, "model") else None
        out[k] = comfy.lora.calculate_weight(model_patcher.patches[k], torch.zeros(shape), k)
    return out


def merged_delta(lora, resolver, target):
    """Dense delta of one target of a LoRA state dict through ComfyUI's own loader."""
    import comfy.lora
    patches = comfy.lora.load_lora(lora, resolver.key_map, log_missing=False)
    return comfy.lora.calculate_weight([(1.0, patches[target], 1.0, None, None)],
                                       torch.zeros(resolver.shape(target)), target)


# ---------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", synthetic.FORMATS)
def test_every_format_reads_as_textbook_and_as_comfy(fmt, resolver, targets):
    import comfy.lora
    sd = synthetic.make_lora(resolver, targets, fmt, rank=4, seed=3)
    parsed = formats.parse(sd, resolver, fmt)
    assert set(parsed.modules) == set(targets)
    patches = comfy.lora.load_lora(sd, resolver.key_map, log_missing=False)
    for t, mod in parsed.modules.items():
        mine = formats.dense(mod, sd, resolver).double()
        ref = textbook_delta(sd, mod.prefix, resolver.shape(t))
        comfy_ref = comfy.lora.calculate_weight([(1.0, patches[t], 1.0, None, None)],
                                                torch.zeros(resolver.shape(t)), t).double()
        scale = ref.abs().max()
        assert (mine - ref).abs().max() <= 1e-5 * scale, (fmt, t)
        assert (comfy_ref - ref).abs().max() <= 1e-5 * scale, (fmt, t)


def test_unknown_keys_error_lists_them(tiny_pair, lora_dir, resolver, targets):
    model, clip = tiny_pair
    sd = synthetic.make_lora(resolver, targets[:3], "kohya", rank=2, seed=1)
    sd["lora_unet_not_a_block_to_q.lora_up.weight"] = torch.zeros(4, 2)
    sd["something.completely.else"] = torch.zeros(1)
    write(lora_dir, "bad_keys.safetensors", sd)
    with pytest.raises(EditKitInputError) as e:
        LoraMerge.execute(model=model, clip=clip, method="concat", rank=0, density=0.5, drop_rate=0.5, seed=0,
                          dtype="fp32", lora_1="bad_keys.safetensors", weight_1=1.0)
    msg = str(e.value)
    assert "lora_unet_not_a_block_to_q.lora_up.weight" in msg and "something.completely.else" in msg
    assert "lora_1" in msg
    with pytest.raises(EditKitInputError) as e2:
        LoraBlockWeight.execute(model=model, clip=clip, lora_name="bad_keys.safetensors", strength_model=1.0,
                                strength_clip=1.0, preset="ALL", block_weights="")
    assert "something.completely.else" in str(e2.value)


def test_text_encoder_keys_need_clip(tiny_pair, lora_dir, resolver, targets):
    model, _ = tiny_pair
    write(lora_dir, "with_te.safetensors", synthetic.make_lora(resolver, targets, "kohya", rank=2, seed=2))
    with pytest.raises(EditKitInputError, match="CLIP"):
        LoraMerge.execute(model=model, method="concat", rank=0, density=0.5, drop_rate=0.5, seed=0, dtype="fp32",
                          lora_1="with_te.safetensors", weight_1=1.0)
    # applying model-only skips the text-encoder part, as core LoraLoaderModelOnly does
    m, c, _ = node_out(LoraBlockWeight.execute(model=model, lora_name="with_te.safetensors", strength_model=1.0,
                                               strength_clip=1.0, preset="ALL", block_weights=""))
    assert c is None and len(m.patches) > 0


# ---------------------------------------------------------------------------------------------
# Merge methods
# ---------------------------------------------------------------------------------------------

def test_concat_is_the_exact_weighted_sum(tiny_pair, lora_dir, resolver, targets):
    a = synthetic.make_lora(resolver, targets, "kohya", rank=4, seed=5)
    b = synthetic.make_lora(resolver, targets, "kohya", rank=3, seed=6)
    write(lora_dir, "cat_a.safetensors", a)
    write(lora_dir, "cat_b.safetensors", b)
    model, clip = tiny_pair
    lora, _img, summary = node_out(LoraMerge.execute(
        model=model, clip=clip, method="concat", rank=0, density=0.5, drop_rate=0.5, seed=0, dtype="fp32",
        lora_1="cat_a.safetensors", weight_1=0.7, lora_2="cat_b.safetensors", weight_2=-1.3))
    assert "energy kept=100.00%" in summary
    for key in targets:
        name = resolver.name_for(key)
        ra, rb = a[f"{name}.lora_down.weight"].shape[0], b[f"{name}.lora_down.weight"].shape[0]
        sa, sb = float(a[f"{name}.alpha"]) / ra, float(b[f"{name}.alpha"]) / rb
        up = torch.cat([a[f"{name}.lora_up.weight"].flatten(1) * (sa * 0.7),
                        b[f"{name}.lora_up.weight"].flatten(1) * (sb * -1.3)], dim=1)
        down = torch.cat([a[f"{name}.lora_down.weight"].flatten(1), b[f"{name}.lora_down.weight"].flatten(1)])
        # ranks stack: the stored factors are the inputs' factors, bit for bit
        assert torch.equal(lora[f"{name}.lora_down.weight"].flatten(1), down)
        assert torch.equal(lora[f"{name}.lora_up.weight"].flatten(1), up)
        assert float(lora[f"{name}.alpha"]) == ra + rb
        got = merged_delta(lora, resolver, key).double()
        want = 0.7 * textbook_delta(a, name, resolver.shape(key)) - 1.3 * textbook_delta(b, name, resolver.shape(key))
        assert (got - want).abs().max() <= 1e-6 * want.abs().max()


def test_concat_of_lycoris_formats_is_exact(resolver, targets):
    srcs = {f: synthetic.make_lora(resolver, targets, f, rank=3, seed=i) for i, f in enumerate(["locon", "loha", "lokr", "peft"])}
    weights = {"locon": 0.5, "loha": 1.0, "lokr": -0.75, "peft": 2.0}
    parsed = [formats.parse(sd, resolver, f) for f, sd in srcs.items()]
    path = os.path.join(str(os.environ.get("TMPDIR", "/tmp")), "editkit_test_concat_lyco.safetensors")
    merge.merge_to_file(parsed, list(weights.values()), resolver, merge.MergeParams("concat", dtype=torch.float32), path)
    out = st_io.load_mapped(path)
    for key in targets:
        want = sum(w * textbook_delta(srcs[f], synthetic.lora_name(resolver, key, f), resolver.shape(key))
                   for f, w in weights.items())
        got = merged_delta(out, resolver, key).double()
        assert (got - want).abs().max() <= 2e-5 * want.abs().max(), key
    os.remove(path)


def test_svd_rerank_error_is_the_singular_value_tail():
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(96, 24, generator=g), torch.randn(24, 80, generator=g)
    full = (up.double() @ down.double())
    s = torch.linalg.svdvals(full)
    for k in (1, 5, 12, 23):
        lr = merge.svd_factors(up, down, k)
        err = ((lr.up.double() @ lr.down.double()) - full).pow(2).sum()
        tail = s[k:].pow(2).sum()
        assert float(err) == pytest.approx(float(tail), rel=1e-4, abs=1e-6 * float(s[0] ** 2))
        assert lr.kept == pytest.approx(float(s[:k].pow(2).sum()), rel=1e-6)
        dn = merge.svd_dense(full.float(), k, exact=True)   # the Gram-eigen route of the element-wise methods
        err_d = ((dn.up.double() @ dn.down.double()) - full).pow(2).sum()
        assert float(err_d) == pytest.approx(float(tail), rel=2e-3, abs=1e-5 * float(s[0] ** 2))


def test_svd_merge_is_best_rank_k_of_the_weighted_sum(resolver, targets):
    a = synthetic.make_lora(resolver, targets, "kohya", rank=4, seed=11)
    b = synthetic.make_lora(resolver, targets, "loha", rank=2, seed=12)
    parsed = [formats.parse(a, resolver, "a"), formats.parse(b, resolver, "b")]
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), "editkit_test_svd.safetensors")
    rep = merge.merge_to_file(parsed, [1.0, 0.5], resolver, merge.MergeParams("svd", rank=3, dtype=torch.float32), path)
    out = st_io.load_mapped(path)
    for key in targets[::7]:
        shape = resolver.shape(key)
        total = (textbook_delta(a, synthetic.lora_name(resolver, key, "kohya"), shape)
                 + 0.5 * textbook_delta(b, synthetic.lora_name(resolver, key, "loha"), shape)).reshape(shape[0], -1)
        s = torch.linalg.svdvals(total)
        got = merged_delta(out, resolver, key).double().reshape(shape[0], -1)
        err = (got - total).pow(2).sum()
        assert float(err) == pytest.approx(float(s[3:].pow(2).sum()), rel=1e-3, abs=1e-9 * float(s[0] ** 2))
    assert 0 < rep.energy_kept() < 1
    os.remove(path)


def test_randomized_rerank_is_near_optimal_and_deterministic():
    g = torch.Generator().manual_seed(3)
    deltas = [torch.randn(400, 8, generator=g) @ torch.randn(8, 1500, generator=g) for _ in range(3)]
    merged = merge.combine_dense(deltas, [1.0, 0.8, 0.6], "ties", density=0.5)     # full rank, slowly decaying
    s = torch.linalg.svdvals(merged.double())
    fast = merge.svd_dense(merged, 16)
    assert fast.up.shape == (400, 16) and fast.down.shape == (16, 1500)
    err = float(((fast.up.double() @ fast.down.double()) - merged.double()).pow(2).sum())
    opt = float(s[16:].pow(2).sum())
    assert opt <= err <= 1.02 * opt
    assert fast.kept == pytest.approx(fast.energy - err, rel=1e-4)
    again = merge.svd_dense(merged, 16)
    assert torch.equal(fast.up, again.up) and torch.equal(fast.down, again.down)


def _hand_deltas():
    d1 = torch.tensor([[0.5, -0.2, 0.0, 0.9], [0.1, 0.3, -0.7, 0.2], [-0.4, 0.05, 0.6, -0.6]])
    d2 = torch.tensor([[-0.6, 0.2, 0.3, 0.1], [0.8, -0.3, -0.1, 0.0], [0.4, 0.5, -0.2, -0.6]])
    d3 = torch.tensor([[0.2, -0.9, -0.3, 0.4], [-0.1, 0.3, 0.7, -0.2], [0.4, -0.05, 0.1, 0.6]])
    return [d1, d2, d3]


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_matches_reference(density):
    weights = [1.0, 0.7, -0.4]
    ref = ties_reference(_hand_deltas(), weights, density)
    got = merge.combine_dense([d.clone() for d in _hand_deltas()], weights, "ties", density=density)
    assert torch.allclose(got.double(), ref, atol=1e-7)


def test_ties_on_random_deltas_matches_reference():
    g = torch.Generator().manual_seed(4)
    deltas = [torch.randn(9, 13, generator=g) for _ in range(4)]
    weights = [1.0, 1.0, 0.5, 2.0]
    ref = ties_reference(deltas, weights, 0.3)
    got = merge.combine_dense([d.clone() for d in deltas], weights, "ties", density=0.3)
    assert torch.allclose(got.double(), ref, atol=1e-6)
    # magnitude prune = the same trim, plain weighted sum
    trimmed = []
    for d in deltas:
        a = d.abs().flatten()
        k = int(round(0.3 * a.numel()))
        thr = a.sort(descending=True).values[k - 1]
        trimmed.append(torch.where(d.abs() >= thr, d, torch.zeros_like(d)))
    want = sum(w * t for w, t in zip(weights, trimmed))
    got_p = merge.combine_dense([d.clone() for d in deltas], weights, "magnitude_prune", density=0.3)
    assert torch.allclose(got_p, want, atol=1e-6)


def test_dare_matches_reference_and_is_reproducible():
    g = torch.Generator().manual_seed(1)
    deltas = [torch.randn(40, 30, generator=g) for _ in range(3)]
    weights, p = [1.0, -0.5, 2.0], 0.6

    def gens(seed):
        return [merge.dare_generator(seed, "k", i) for i in range(3)]

    masks = [merge.dare_keep_mask(d.numel(), p, gg).reshape(d.shape) for d, gg in zip(deltas, gens(7))]
    ref = sum(w * torch.where(m, d / (1 - p), torch.zeros_like(d)) for w, d, m in zip(weights, deltas, masks))
    got = merge.combine_dense([d.clone() for d in deltas], weights, "dare", drop_rate=p, generators=gens(7))
    assert torch.allclose(got, ref, atol=1e-6)
    again = merge.combine_dense([d.clone() for d in deltas], weights, "dare", drop_rate=p, generators=gens(7))
    assert torch.equal(got, again)
    other = merge.combine_dense([d.clone() for d in deltas], weights, "dare", drop_rate=p, generators=gens(8))
    assert not torch.equal(got, other)
    kept = torch.stack(masks).float().mean()
    assert abs(float(kept) - (1 - p)) < 0.03
    # DARE-TIES: the same dropped/rescaled deltas through TIES's election and disjoint mean (density 1 = no trim)
    dropped = [torch.where(m, d / (1 - p), torch.zeros_like(d)) for d, m in zip(deltas, masks)]
    ref_dt = ties_reference(dropped, weights, 1.0)
    got_dt = merge.combine_dense([d.clone() for d in deltas], weights, "dare_ties", drop_rate=p, generators=gens(7))
    assert torch.allclose(got_dt.double(), ref_dt, atol=1e-5)


def test_dare_is_unbiased():
    g = torch.Generator().manual_seed(2)
    deltas = [torch.randn(6, 5, generator=g) for _ in range(2)]
    weights = [1.0, 0.5]
    runs = [merge.combine_dense([d.clone() for d in deltas], weights, "dare", drop_rate=0.5,
                                generators=[merge.dare_generator(s, "k", i) for i in range(2)]) for s in range(1500)]
    mean = torch.stack(runs).mean(0)
    want = deltas[0] + 0.5 * deltas[1]
    assert (mean - want).abs().max() < 0.12


def test_merge_node_methods_end_to_end(tiny_pair, lora_dir, resolver, targets):
    a = synthetic.make_lora(resolver, targets, "kohya", rank=4, seed=21)
    b = synthetic.make_lora(resolver, targets, "lokr", rank=2, seed=22)
    write(lora_dir, "m_a.safetensors", a)
    write(lora_dir, "m_b.safetensors", b)
    model, clip = tiny_pair
    key = next(k for k in targets if "attn2.to_k" in k)
    name_a, name_b = synthetic.lora_name(resolver, key, "kohya"), synthetic.lora_name(resolver, key, "lokr")
    shape = resolver.shape(key)
    da, db = textbook_delta(a, name_a, shape).float(), textbook_delta(b, name_b, shape).float()
    for method in ("ties", "dare", "dare_ties", "magnitude_prune"):
        args = dict(model=model, clip=clip, method=method, rank=0, density=0.4, drop_rate=0.3, seed=9, dtype="fp32",
                    lora_1="m_a.safetensors", weight_1=1.0, lora_2="m_b.safetensors", weight_2=0.6)
        lora, img, summary = node_out(LoraMerge.execute(**args))
        assert img.shape[0] == 1 and img.shape[-1] == 3 and img.shape[1] > 100
        gens = [merge.dare_generator(9, key, i) for i in range(2)]
        expect = merge.combine_dense([da.clone().reshape(shape[0], -1), db.clone().reshape(shape[0], -1)], [1.0, 0.6],
                                     method, density=0.4, drop_rate=0.3, generators=gens)
        k = 8      # rank 0 = the inputs' largest rank: kohya 4; LoKr kron(4x4 full, rank 2) = 8
        best = merge.svd_dense(expect, k, exact="lapack")
        got = merged_delta(lora, resolver, key).reshape(shape[0], -1)
        want = best.up @ best.down
        assert torch.allclose(got, want, atol=1e-5 * float(want.abs().max()) + 1e-7), method
        again = node_out(LoraMerge.execute(**args))[0]
        assert all(torch.equal(lora[n], again[n]) for n in lora), method


def test_save_then_core_loraloader_patches_the_expected_weights(lora_dir, resolver, targets):
    import comfy.model_management
    import folder_paths
    import nodes
    from editkit.builtin_models import tiny
    model, clip = tiny.tiny_unet(tiny.EPS, seed=0), tiny.tiny_clip()      # private: weights get patched
    a = synthetic.make_lora(resolver, targets, "kohya", rank=4, seed=31)
    b = synthetic.make_lora(resolver, targets, "loha", rank=2, seed=32)
    write(lora_dir, "s_a.safetensors", a)
    write(lora_dir, "s_b.safetensors", b)
    lora, _, _ = node_out(LoraMerge.execute(model=model, clip=clip, method="concat", rank=0, density=0.5,
                                            drop_rate=0.5, seed=0, dtype="fp32", lora_1="s_a.safetensors",
                                            weight_1=1.0, lora_2="s_b.safetensors", weight_2=0.25))
    res = LoraSave.execute(lora=lora, filename_prefix="editkit_test_merged")
    (name,) = node_out(res)
    path = folder_paths.get_full_path("loras", name)
    assert name.startswith("editkit/") and path.startswith(folder_paths.get_folder_paths("loras")[0])
    meta = st_io.read_metadata(path)
    assert meta["editkit.method"] == "concat" and "s_a.safetensors" in meta["editkit.sources"]
    assert meta["editkit.weights"] == "[1.0, 0.25]"
    assert name in folder_paths.get_filename_list("loras")
    m2, c2 = nodes.LoraLoader().load_lora(model, clip, name, 1.0, 1.0)
    unet_keys = [k for k in targets if k.startswith("diffusion_model.")]
    te_keys = [k for k in targets if not k.startswith("diffusion_model.")]
    before = {k: v.clone() for k, v in model.model.state_dict().items() if k in unet_keys}
    before_te = {k: v.clone() for k, v in clip.cond_stage_model.state_dict().items() if k in te_keys}
    comfy.model_management.load_models_gpu([m2])
    after = {k: v.clone() for k, v in m2.model.state_dict().items() if k in unet_keys}
    m2.unpatch_model()
    comfy.model_management.load_models_gpu([c2.patcher])
    after_te = {k: v.clone() for k, v in c2.cond_stage_model.state_dict().items() if k in te_keys}
    c2.patcher.unpatch_model()
    for k in targets:
        shape = resolver.shape(k)
        want = (textbook_delta(a, synthetic.lora_name(resolver, k, "kohya"), shape)
                + 0.25 * textbook_delta(b, synthetic.lora_name(resolver, k, "loha"), shape)).float()
        w0, w1 = (before[k], after[k]) if k in after else (before_te[k], after_te[k])
        # W + delta rounded to the weight's dtype (the tiny CLIP runs in fp16 on CPU)
        tol = 2e-6 if w0.dtype == torch.float32 else 4 * float(torch.finfo(w0.dtype).eps) * float(w0.abs().max() + want.abs().max())
        assert torch.allclose((w1.float() - w0.float()), want, atol=tol), k
    # unpatched again: the merge never touched the shared model
    assert all(torch.equal(model.model.state_dict()[k], before[k]) for k in unet_keys)


def test_lora_model_objects_merge(tiny_pair, resolver, targets):
    model, clip = tiny_pair
    core_style = synthetic.make_lora(resolver, targets, "comfy", rank=2, seed=41)   # keys as core's TrainLoraNode
    peft = synthetic.make_lora(resolver, targets, "peft", rank=2, seed=42)
    lora, _, summary = node_out(LoraMerge.execute(model=model, clip=clip, method="svd", rank=2, density=0.5,
                                                  drop_rate=0.5, seed=0, dtype="fp16", lora_model_a=core_style,
                                                  weight_a=1.0, lora_model_b=peft, weight_b=1.0))
    assert "method=svd" in summary and all(v.dtype in (torch.float16, torch.float32) for v in lora.values())
    assert float(lora[f"{resolver.name_for(targets[0])}.alpha"]) == 2.0


# ---------------------------------------------------------------------------------------------
# Block weights
# ---------------------------------------------------------------------------------------------

def test_block_layout_comes_from_the_model(tiny_pair):
    from editkit.lora import layouts
    sd15, _ = layouts.sd15()
    sdxl, _ = layouts.sdxl()
    assert {k: len(v) for k, v in blocks.layout(sd15).forms().items()} == {"attention": 17, "full": 26, "lycoris": 27}
    assert {k: len(v) for k, v in blocks.layout(sdxl).forms().items()} == {"attention": 12, "full": 20, "lycoris": 21}
    assert blocks.layout(sd15).forms()["attention"][:4] == ["BASE", "IN01", "IN02", "IN04"]
    assert blocks.layout(sdxl).forms()["attention"] == ["BASE", "IN04", "IN05", "IN07", "IN08", "MID"] + \
        [f"OUT{i:02d}" for i in range(6)]
    lay = blocks.layout(sd15)
    bw = blocks.parse("SD-OUTALL", lay)
    assert bw.weights["BASE"] == 1 and bw.weights["IN04"] == 0 and bw.weights["OUT03"] == 1 and bw.weights["M1"] == 0
    assert bw.weights["OUT00"] == 1    # no slot in the 17-value form: follows the next slotted block (OUT03)
    v = [0.0] * 17
    v[3] = 0.5                                   # IN04
    bw = blocks.parse(",".join(map(str, v)), lay)
    assert bw.weights["IN04"] == 0.5 and bw.weights["IN05"] == 0 and bw.weights["IN06"] == 0.0
    bw = blocks.parse("IN:" + ",".join(map(str, v)), lay)     # preset-file line syntax
    assert bw.weights["IN04"] == 0.5
    v = [0.0] * 17
    v[2] = 0.25                                  # IN02 -> IN03 (downsample, no attention) follows it
    assert blocks.parse(",".join(map(str, v)), lay).weights["IN03"] == 0.25
    bw = blocks.parse("DEFAULT=0, IN=1, IN04-IN05=0.5, OUT11=2, BASE=0.3", lay)
    assert (bw.weights["IN01"], bw.weights["IN04"], bw.weights["IN05"], bw.weights["OUT11"], bw.weights["BASE"],
            bw.weights["M0"]) == (1, 0.5, 0.5, 2, 0.3, 0)
    with pytest.raises(ValueError, match="17 values"):
        blocks.parse("1,1,1", lay)
    with pytest.raises(ValueError, match="0..11"):
        blocks.parse("IN12=1", lay)
    with pytest.raises(ValueError, match="17-value"):
        blocks.parse("SD-INS", blocks.layout(sdxl))
    tiny_lay = blocks.layout(tiny_pair[0])
    assert len(tiny_lay.forms()["attention"]) == 1 + len(tiny_lay.attn_input) + 1 + len(tiny_lay.attn_output)


def test_zero_block_weight_leaves_exactly_those_weights_untouched(lora_dir, resolver, targets):
    import comfy.model_management
    from editkit.builtin_models import tiny
    model, clip = tiny.tiny_unet(tiny.EPS, seed=0), tiny.tiny_clip()
    sd = synthetic.make_lora(resolver, targets, "locon", rank=4, seed=51)
    write(lora_dir, "bw.safetensors", sd)
    m2, c2, text = node_out(LoraBlockWeight.execute(
        model=model, clip=clip, lora_name="bw.safetensors", strength_model=1.0, strength_clip=1.0, preset="custom",
        block_weights="DEFAULT=1, IN=0, OUT02=0.5, BASE=0"))
    assert "IN00=0" in text and "OUT02=0.5" in text
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    comfy.model_management.load_models_gpu([m2])
    after = {k: v.clone() for k, v in m2.model.state_dict().items()}
    m2.unpatch_model()
    touched_in = 0
    for k in targets:
        if not k.startswith("diffusion_model."):
            continue
        unit = blocks.unit_of(k)
        if unit.startswith("IN"):
            assert torch.equal(after[k], before[k]), k             # zero block: bit-for-bit untouched
            touched_in += 1
        else:
            want = textbook_delta(sd, resolver.name_for(k), resolver.shape(k)).float() * (0.5 if unit == "OUT02" else 1.0)
            assert torch.allclose(after[k] - before[k], want, atol=2e-6), k
    assert touched_in > 0
    # every weight without a LoRA module is untouched too
    for k in before:
        if k not in targets:
            assert torch.equal(after[k], before[k]), k
    assert len(c2.patcher.patches) == 0        # BASE=0: text encoder untouched


def test_presets_and_dit_blocks(tiny_flux, lora_dir):
    r = formats.KeyResolver(tiny_flux)
    tg = synthetic.select_targets(r, ("attn",))
    assert any(".double_blocks." in k for k in tg) and any(".single_blocks." in k for k in tg)
    sd = synthetic.make_lora(r, tg, "kohya", rank=2, seed=61)
    assert any(k.startswith("lora_unet_double_blocks_0_") for k in sd)      # kohya Flux naming
    write(lora_dir, "flux_dit.safetensors", sd)
    lay = blocks.layout(tiny_flux)
    assert lay.forms()["dit"] == ["BASE", "D00", "D01", "S00", "S01"]
    m2, _, text = node_out(LoraBlockWeight.execute(model=tiny_flux, lora_name="flux_dit.safetensors",
                                                   strength_model=2.0, strength_clip=1.0, preset="custom",
                                                   block_weights="1, 0, 0.5, 1, 0.25"))
    for k in tg:
        unit = blocks.unit_of(k)
        w = {"D00": 0.0, "D01": 0.5, "S00": 1.0, "S01": 0.25}[unit]
        if w == 0:
            assert k not in m2.patches
        else:
            assert [p[0] for p in m2.patches[k]] == [2.0 * w], k
    m3, _, _ = node_out(LoraBlockWeight.execute(model=tiny_flux, lora_name="flux_dit.safetensors", strength_model=1.0,
                                                strength_clip=1.0, preset="SINGLE BLOCKS", block_weights=""))
    assert all((".single_blocks." in k) for k in m3.patches)
    with pytest.raises(EditKitInputError, match="UNet"):
        LoraBlockWeight.execute(model=tiny_flux, lora_name="flux_dit.safetensors", strength_model=1.0,
                                strength_clip=1.0, preset="INPUT", block_weights="")
    with pytest.raises(EditKitInputError, match="dit form"):
        LoraBlockWeight.execute(model=tiny_flux, lora_name="flux_dit.safetensors", strength_model=1.0,
                                strength_clip=1.0, preset="custom", block_weights="1,1,1")


def test_demo_assets_are_deterministic_and_fit_the_default_model(tmp_path):
    import nodes
    from editkit.lora import demo_assets
    d1, d2 = tmp_path / "a", tmp_path / "b"
    p1 = demo_assets.make(str(d1))
    p2 = demo_assets.make(str(d2))
    for x, y in zip(p1, p2):
        assert open(x, "rb").read() == open(y, "rb").read()
    mtimes = [os.path.getmtime(p) for p in p1]
    assert demo_assets.make(str(d1)) == p1 and [os.path.getmtime(p) for p in p1] == mtimes   # idempotent
    model, clip, _ = demo_assets.load_default_model()
    r = formats.KeyResolver(model, clip)
    for p in p1:
        parsed = formats.parse(st_io.SafetensorsFile(p), r, os.path.basename(p))
        assert len(parsed.modules) > 10
    _ = nodes


def test_streaming_writer_roundtrip_and_alignment(tmp_path):
    import safetensors.torch
    tensors = {"a": torch.arange(7, dtype=torch.float16), "b": torch.randn(3, 5), "c": torch.tensor(2.0),
               "d": torch.arange(5, dtype=torch.bfloat16), "e": torch.zeros(0, 4)}
    path = str(tmp_path / "x.safetensors")
    st_io.save(tensors, path, {"k": "v"})
    ref = safetensors.torch.load_file(path)
    lazy = st_io.SafetensorsFile(path)
    mapped = st_io.load_mapped(path)
    for k, v in tensors.items():
        assert torch.equal(ref[k], v) and torch.equal(lazy[k], v) and torch.equal(mapped[k], v)
    assert st_io.read_metadata(path) == {"k": "v"}
    safetensors.torch.save_file(dict(mapped), str(tmp_path / "y.safetensors"))   # core SaveLoRA's call works


def test_flux_merge_with_diffusers_slices(tiny_flux):
    """Flux: kohya keys on whole weights plus diffusers q/k/v keys on slices of the fused qkv weight."""
    import comfy.lora
    import comfy.sd
    r = formats.KeyResolver(tiny_flux)
    tg = synthetic.select_targets(r, ("attn",))
    a = synthetic.make_lora(r, tg, "kohya", rank=2, seed=71)
    g = torch.Generator().manual_seed(72)
    b = {"transformer.transformer_blocks.0.attn.to_k.lora_A.weight": torch.randn(3, 64, generator=g),
         "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": torch.randn(64, 3, generator=g) * 0.01}
    pa, pb = formats.parse(a, r, "a"), formats.parse(b, r, "b")
    assert list(pb.modules) == [("diffusion_model.double_blocks.0.img_attn.qkv.weight", (0, 64, 64))]
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), "editkit_test_flux.safetensors")
    merge.merge_to_file([pa, pb], [1.0, 2.0], r, merge.MergeParams("concat", dtype=torch.float32), path)
    out = st_io.load_mapped(path)
    m2, _ = comfy.sd.load_lora_for_models(tiny_flux, None, out, 1.0, 0.0)
    key = "diffusion_model.double_blocks.0.img_attn.qkv.weight"
    got = comfy.lora.calculate_weight(m2.patches[key], torch.zeros(r.shapes[key]), key).double()
    want = textbook_delta(a, r.name_for(key), r.shapes[key])
    want[64:128] += 2.0 * (b["transformer.transformer_blocks.0.attn.to_k.lora_B.weight"].double()
                           @ b["transformer.transformer_blocks.0.attn.to_k.lora_A.weight"].double())
    assert (got - want).abs().max() <= 1e-6 * want.abs().max()
    other = next(k for k in tg if ".single_blocks.1." in k)
    got_o = comfy.lora.calculate_weight(m2.patches[other], torch.zeros(r.shapes[other]), other).double()
    assert (got_o - textbook_delta(a, r.name_for(other), r.shapes[other])).abs().max() <= 1e-6 * got_o.abs().max()
    os.remove(path)


def test_dora_merges_as_its_effective_delta(tiny_pair, resolver, targets):
    """A weight-dependent format (DoRA): merged as what ComfyUI's adapter does to the model's weight."""
    import comfy.lora
    unet = [k for k in targets if k.startswith("diffusion_model.") and len(resolver.shape(k)) == 2][:4]
    sd = synthetic.make_lora(resolver, unet, "kohya", rank=2, seed=81)
    g = torch.Generator().manual_seed(82)
    for k in unet:
        sd[f"{resolver.name_for(k)}.dora_scale"] = 1.0 + 0.1 * torch.rand(resolver.shape(k)[0], 1, generator=g)
    parsed = formats.parse(sd, resolver, "dora")
    original = {k: resolver.weight(k).clone() for k in unet}
    # another clone of the same model is loaded with a LoRA: the shared module holds patched weights now
    import comfy.model_management
    import comfy.sd
    busy, _ = comfy.sd.load_lora_for_models(tiny_pair[0], None, synthetic.make_lora(resolver, unet, "kohya", seed=83), 1.0, 0)
    comfy.model_management.load_models_gpu([busy])
    try:
        assert not torch.equal(tiny_pair[0].model.state_dict()[unet[0]], original[unet[0]])
        assert all(torch.equal(resolver.weight(k), original[k]) for k in unet)   # merges read the unpatched weight
    finally:
        busy.unpatch_model()
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), "editkit_test_dora.safetensors")
    merge.merge_to_file([parsed], [1.0], resolver, merge.MergeParams("concat", dtype=torch.float32), path)
    out = st_io.load_mapped(path)
    patches = comfy.lora.load_lora(sd, resolver.key_map, log_missing=False)
    for k in unet:
        w = resolver.weight(k).float()
        want = comfy.lora.calculate_weight([(1.0, patches[k], 1.0, None, None)], w.clone(), k) - w
        got = merged_delta(out, resolver, k)
        assert torch.allclose(got, want, atol=1e-5 * float(want.abs().max())), k
    os.remove(path)


def test_topk_threshold_is_exact_on_large_tensors():
    g = torch.Generator().manual_seed(5)
    big = (torch.randn(1280, 40, generator=g) @ torch.randn(40, 3600, generator=g))   # low-rank, 4.6M values
    big[0, :100] = 0.0
    n = big.numel()
    for density in (0.01, 0.2, 0.5, 0.97, 1.0 - 1.0 / n):
        k = int(round(density * n))
        want = float(big.abs().flatten().kthvalue(n - k + 1).values)
        assert merge.topk_threshold(big, density) == want, density


def _meta_sd3():
    from editkit.builtin_models.tiny import tiny_sd3
    return tiny_sd3(depth=3, device="meta")


def test_sd3_joint_blocks(lora_dir):
    model = _meta_sd3()
    r = formats.KeyResolver(model)
    lay = blocks.layout(model)
    assert lay.forms()["dit"] == ["BASE", "D00", "D01", "D02"]
    tg = synthetic.select_targets(r, ("attn",))
    kohya = synthetic.make_lora(r, tg, "kohya", rank=2, seed=91)
    assert any(k.startswith("lora_unet_joint_blocks_1_") for k in kohya)
    g = torch.Generator().manual_seed(92)
    diffusers = {"transformer.transformer_blocks.2.attn.to_v.lora_A.weight": torch.randn(2, 192, generator=g),
                 "transformer.transformer_blocks.2.attn.to_v.lora_B.weight": torch.randn(192, 2, generator=g)}
    parsed = formats.parse(diffusers, r, "d")
    (target,) = parsed.modules
    assert target[0] == "diffusion_model.joint_blocks.2.x_block.attn.qkv.weight" and target[1] == (0, 384, 192)
    write(lora_dir, "sd3_kohya.safetensors", kohya)
    m2, _, text = node_out(LoraBlockWeight.execute(model=model, lora_name="sd3_kohya.safetensors", strength_model=1.0,
                                                   strength_clip=1.0, preset="custom", block_weights="D00=0, D02=0.5"))
    for k in tg:
        unit = blocks.unit_of(k)
        if unit == "D00":
            assert k not in m2.patches
        elif unit in ("D01", "D02"):
            assert [p[0] for p in m2.patches[k]] == [1.0 if unit == "D01" else 0.5], k


@pytest.mark.parametrize("kind", ["oft", "boft"])
def test_oft_and_boft_merge_as_their_effective_delta(resolver, targets, kind):
    """LyCORIS OFT / BOFT (orthogonal block rotations of the weight): merged as what ComfyUI's own adapter does to
    the model's weight, and a merged file reloads through ComfyUI's loader with that delta."""
    import comfy.lora
    unet = [k for k in targets if k.startswith("diffusion_model.") and len(resolver.shape(k)) == 2
            and resolver.shape(k)[0] % 8 == 0][:3]
    assert unet
    g = torch.Generator().manual_seed(91)
    sd = {}
    for k in unet:
        out_dim = resolver.shape(k)[0]
        block = 8
        shape = (out_dim // block, block, block) if kind == "oft" else (2, out_dim // block, block, block)
        sd[f"{resolver.name_for(k)}.oft_blocks"] = 0.05 * torch.randn(shape, generator=g)
        sd[f"{resolver.name_for(k)}.alpha"] = torch.tensor(0.0)
        if kind == "oft":
            sd[f"{resolver.name_for(k)}.rescale"] = 1.0 + 0.1 * torch.rand(out_dim, 1, generator=g)
    parsed = formats.parse(sd, resolver, kind)
    patches = comfy.lora.load_lora(sd, resolver.key_map, log_missing=False)
    assert set(unet) <= set(patches) and type(patches[unet[0]]).__name__.lower().startswith(kind)
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"editkit_test_{kind}.safetensors")
    merge.merge_to_file([parsed], [1.0], resolver, merge.MergeParams("concat", dtype=torch.float32), path)
    out = st_io.load_mapped(path)
    for k in unet:
        w = resolver.weight(k).float()
        want = comfy.lora.calculate_weight([(1.0, patches[k], 1.0, None, None)], w.clone(), k) - w
        assert float(want.abs().max()) > 0
        got = merged_delta(out, resolver, k)
        assert torch.allclose(got, want, atol=1e-5 * float(want.abs().max())), k
    os.remove(path)
