"""Every input format with real key names on the full SD1.5 and SDXL layouts: load, merge, save, reload
through core LoraLoader, and the weights it patches equal the expected deltas.

The layouts are built on the meta device (real module trees, keys and shapes, no weights); what
ComfyUI would add to each weight is its own `calculate_weight` over the patch list LoraLoader built,
evaluated on zeros. LoRA weights are random (synthetic), key names are the real ones.
"""
import os

import pytest
import torch

from editkit.lora import formats, layouts, st_io, synthetic
from editkit.nodes.lora import LoraMerge, LoraSave
from ek_helpers import node_out
from test_lora import textbook_delta

pytestmark = pytest.mark.slow

FAMILIES = {"sd15": layouts.sd15, "sdxl": layouts.sdxl}
KINDS = {"kohya": ("attn", "te"), "peft": ("attn", "te"), "locon": ("attn", "conv"), "loha": ("attn", "te"),
         "lokr": ("attn",)}


@pytest.fixture(scope="module")
def family_cache():
    return {}


def family(cache, name):
    if name not in cache:
        model, clip = FAMILIES[name]()
        cache[name] = (model, clip, formats.KeyResolver(model, clip))
    return cache[name]


@pytest.fixture(scope="module")
def loras_dir(tmp_path_factory):
    import folder_paths
    d = str(tmp_path_factory.mktemp("loras_full"))
    folder_paths.add_model_folder_path("loras", d)
    return d


def _sample(keys, n=24):
    step = max(1, len(keys) // n)
    return keys[::step] + keys[-1:]


def _patched_delta(patcher, key, shape):
    import comfy.lora
    return comfy.lora.calculate_weight(patcher.patches[key], torch.zeros(shape), key).double()


@pytest.mark.parametrize("fam", ["sd15", "sdxl"])
@pytest.mark.parametrize("fmt", list(KINDS))
def test_format_merge_save_reload(fam, fmt, family_cache, loras_dir):
    import nodes
    model, clip, r = family(family_cache, fam)
    targets = synthetic.select_targets(r, KINDS[fmt])
    assert len(targets) > 40
    lora_a = synthetic.make_lora(r, targets, fmt, rank=4, seed=1, dtype=torch.float16)
    base_targets = synthetic.select_targets(r, ("attn", "te"))
    lora_b = synthetic.make_lora(r, base_targets, "kohya", rank=2, seed=2, dtype=torch.float16)
    # real key names of each format
    first = next(iter(lora_a))
    prefix = {"kohya": "lora_unet_", "peft": "unet.", "locon": "lora_unet_", "loha": "lora_unet_", "lokr": "lora_unet_"}[fmt]
    assert first.startswith(prefix) or first.startswith(("lora_te", "text_encoder")), first
    name_a, name_b = f"{fam}_{fmt}_a.safetensors", f"{fam}_b.safetensors"
    st_io.save(lora_a, os.path.join(loras_dir, name_a))
    if not os.path.exists(os.path.join(loras_dir, name_b)):
        st_io.save(lora_b, os.path.join(loras_dir, name_b))

    merged, _img, summary = node_out(LoraMerge.execute(
        model=model, clip=clip, method="concat", rank=0, density=0.5, drop_rate=0.5, seed=0, dtype="fp32",
        lora_1=name_a, weight_1=1.0, lora_2=name_b, weight_2=0.5))
    assert "energy kept=100.00%" in summary
    (saved,) = node_out(LoraSave.execute(lora=merged, filename_prefix=f"full_{fam}_{fmt}"))
    m2, c2 = nodes.LoraLoader().load_lora(model, clip, saved, 1.0, 1.0)
    every = sorted(set(targets) | set(base_targets))
    patched = set(m2.patches) | set(c2.patcher.patches)
    assert set(every) <= patched, sorted(set(every) - patched)[:5]
    for key in _sample(every):
        shape = r.shape(key)
        want = torch.zeros(shape, dtype=torch.float64)
        if key in targets:
            want += textbook_delta(lora_a, synthetic.lora_name(r, key, fmt), shape)
        if key in base_targets:
            want += 0.5 * textbook_delta(lora_b, synthetic.lora_name(r, key, "kohya"), shape)
        got = _patched_delta(m2 if key in m2.patches else c2.patcher, key, shape)
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), key


@pytest.mark.parametrize("fam", ["sd15", "sdxl"])
def test_ties_merge_on_full_layout_loads(fam, family_cache, loras_dir):
    """An element-wise method on the full layout: every key merged, re-ranked, loadable by core LoraLoader."""
    import nodes
    model, clip, r = family(family_cache, fam)
    targets = synthetic.select_targets(r, ("attn",))[::25]         # a spread of real keys of every block
    a = synthetic.make_lora(r, targets, "kohya", rank=4, seed=7)
    b = synthetic.make_lora(r, targets, "loha", rank=2, seed=8)
    st_io.save(a, os.path.join(loras_dir, f"{fam}_t_a.safetensors"))
    st_io.save(b, os.path.join(loras_dir, f"{fam}_t_b.safetensors"))
    merged, img, summary = node_out(LoraMerge.execute(
        model=model, clip=clip, method="ties", rank=4, density=0.3, drop_rate=0.5, seed=0, dtype="fp16",
        lora_1=f"{fam}_t_a.safetensors", weight_1=1.0, lora_2=f"{fam}_t_b.safetensors", weight_2=1.0))
    assert img.shape[2] > 300 and len(summary.splitlines()) > 3
    (saved,) = node_out(LoraSave.execute(lora=merged, filename_prefix=f"ties_{fam}"))
    m2, _ = nodes.LoraLoader().load_lora(model, clip, saved, 1.0, 1.0)
    assert set(targets) <= set(m2.patches)
    for key in _sample(targets, 6):
        name = r.name_for(key)
        up, down = merged[f"{name}.lora_up.weight"], merged[f"{name}.lora_down.weight"]
        assert up.shape[1] == down.shape[0] == 4                      # re-ranked to `rank`
        got = _patched_delta(m2, key, r.shape(key))
        want = (up.double().flatten(1) @ down.double().flatten(1)).reshape(got.shape)
        assert float(got.abs().max()) > 0 and (got - want).abs().max() <= 1e-6 * want.abs().max()
