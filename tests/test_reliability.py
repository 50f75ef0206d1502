"""Issue 20 fixes 1-8, each on the case that broke: P2P word swap over 75 tokens, SDEdit with a tiny
strength, sizes the toy model cannot serve, pickle files given to loaders, combo/range values checked
by the nodes themselves, save paths and temporary merge files, declared configs and safetensors
headers checked before allocating, the exception type users see, the toy loader's default."""
import gc
import json
import os
import pickle
import struct
import time

import pytest
import torch

from editkit.core import validate
from editkit.core.errors import EditKitInputError
from ek_helpers import node_out

LONG_SRC = "red circle white background square " * 15 + "red"
LONG_TGT = "blue" + LONG_SRC[3:]


# -- 1. Prompt-to-Prompt word swap over 75 tokens -------------------------------------------------

def test_p2p_word_swap_over_75_tokens_maps_token_to_token(tiny_clip, tiny_eps):
    from editkit.attention import alignment
    from editkit.nodes.attention_control import PromptToPromptNode
    ts, tt = alignment.Tokens(tiny_clip, LONG_SRC, "sd15"), alignment.Tokens(tiny_clip, LONG_TGT, "sd15")
    assert len(ts) == len(tt) == 154  # two 77-token chunks: the word alignment crosses a chunk boundary
    g = alignment.replace_mapper(tiny_clip, LONG_SRC, LONG_TGT, "sd15")
    # red -> blue is one token each and every other word is equal: the mapper is exactly the identity
    assert torch.equal(g, torch.eye(len(ts)))
    # the swapped word is at the position the tokenizer put it, in chunk 0; the last "red" is in chunk 1
    assert tt.ids[1] != ts.ids[1] and tt.ids[1:2] == tt.word_ids("blue")
    assert ts.find("red")[-1] > 77
    (m,) = node_out(PromptToPromptNode.execute(tiny_eps, tiny_clip, LONG_SRC, LONG_TGT, "replace", 0.8, 0.4, "", "", 0.3))
    assert m is not tiny_eps


def test_p2p_word_swap_across_the_boundary_with_a_longer_word(tiny_clip):
    """A swapped word with a different token count in chunk 1: its tokens spread the source token."""
    from editkit.attention import alignment
    src = LONG_SRC
    tgt = LONG_SRC[: -len("red")] + "turquoise"
    ts, tt = alignment.Tokens(tiny_clip, src, "sd15"), alignment.Tokens(tiny_clip, tgt, "sd15")
    if len(ts) != len(tt):
        pytest.skip("tokenizer put the words in different chunk counts")
    g = alignment.replace_mapper(tiny_clip, src, tgt, "sd15")
    i = ts.find("red")[-1]
    js = tt.find("turquoise")
    assert js and min(js) > 77
    for j in js:
        assert g[i, j] == pytest.approx(1.0 / len(js))
    assert torch.allclose(g[:, :77], torch.eye(len(ts))[:, :77])


# -- 2. SDEdit schedule bounded; EditKit's loops check the interrupt flag -------------------------

@pytest.mark.parametrize("strength", [1e-6, 1e-9, 1e-12])
def test_sdedit_tiny_strength_is_bounded_and_quick(tiny_eps, strength):
    from editkit.nodes.editing import SDEdit
    from editkit.samplers.sdedit import MAX_FULL_SCHEDULE
    t = time.perf_counter()
    _noise, out, sigmas, _d = node_out(SDEdit.execute(tiny_eps, {"samples": torch.zeros(1, 4, 8, 8)}, strength, 8, "normal", 0))
    assert time.perf_counter() - t < 5.0
    assert 2 <= len(sigmas) <= 9 and float(sigmas[-1]) == 0.0
    assert bool((sigmas[1:] < sigmas[:-1]).all()), sigmas  # strictly descending
    from editkit.core import denoiser
    from editkit.core.introspect import model_sampling
    assert float(sigmas[0]) == pytest.approx(denoiser.sigma_at(model_sampling(tiny_eps), strength), rel=1e-4)
    assert MAX_FULL_SCHEDULE <= 10_000


def test_editkit_loops_stop_on_interrupt(tiny_eps, encode):
    import comfy.model_management as mm

    from editkit.samplers.branch_guider import BranchGuider
    from editkit.core.progress import check_interrupt
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            check_interrupt()
    finally:
        mm.interrupt_current_processing(False)
    # BranchGuider.predict (every inversion / replay / null-text model call) checks it first
    import inspect
    assert "check_interrupt()" in inspect.getsource(BranchGuider.predict)


# -- 3. sizes the toy model cannot serve fail at once ------------------------------------------------

def test_toy_model_refuses_a_huge_latent_before_sampling():
    import nodes
    from editkit.builtin_models import toy
    from editkit.nodes.toy import ToyModelLoader
    if not toy.available():
        pytest.skip("no toy model")
    model, clip, _vae = node_out(ToyModelLoader.execute("toy.safetensors"))
    cond = toy.encode(clip, "a red circle on a white background")
    t = time.perf_counter()
    with pytest.raises(EditKitInputError) as e:
        nodes.common_ksampler(model, 0, 2, 1.0, "euler", "normal", cond, cond, {"samples": torch.zeros(1, 4, 1024, 1024)})
    assert time.perf_counter() - t < 10
    assert "'weights'" in str(e.value) and "8192x8192" in str(e.value) and "128x128" in str(e.value)
    out = nodes.common_ksampler(model, 0, 1, 1.0, "euler", "normal", cond, cond, {"samples": torch.zeros(1, 4, 16, 16)})
    assert out[0]["samples"].shape == (1, 4, 16, 16)


# -- 4. pickle files: input named, never the weights_only=False advice -------------------------------

class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/editkit_pwned",))


def _pickle_file(path):
    torch.save({"x": _Payload()}, path)
    return path


def test_loaders_name_the_input_for_a_pickle_with_code(tmp_path):
    from editkit.core import files
    p = _pickle_file(str(tmp_path / "evil.bin"))
    with pytest.raises(EditKitInputError) as e:
        files.load_weights(p, "EditKitIPAdapterLoader", "ipadapter_file")
    msg = str(e.value)
    assert "ipadapter_file" in msg and "evil.bin" in msg and "weights_only" not in msg
    assert not os.path.exists("/tmp/editkit_pwned")
    with pytest.raises(EditKitInputError) as e:
        with files.loader_errors("EditKitTinyControlNetLoader", "control_net_name", "evil.bin"):
            import comfy.utils
            comfy.utils.load_torch_file(p, safe_load=True)
    assert "control_net_name" in str(e.value) and "weights_only" not in str(e.value)


def test_ipadapter_loader_with_pickle_file(tmp_path):
    import folder_paths

    from editkit.adapters import ipadapter as IPA
    from editkit.nodes.adapters import IPAdapterLoader
    d = tmp_path / "ipa"
    d.mkdir()
    _pickle_file(str(d / "evil_adapter.bin"))
    folder_paths.add_model_folder_path(IPA.FOLDER, str(d))
    with pytest.raises(EditKitInputError) as e:
        IPAdapterLoader.execute("evil_adapter.bin")
    msg = str(e.value)
    assert "'ipadapter_file'" in msg and "weights_only" not in msg and "False" not in msg


# -- 5. combo values and ranges checked by the nodes themselves --------------------------------------

def test_every_node_checks_its_combos_and_ranges():
    from editkit.nodes import node_list
    for cls in node_list():
        assert getattr(cls.execute, "__editkit_checked__", False), cls.__name__


def test_bad_combo_values_name_the_input(tiny_eps, tiny_clip):
    from editkit.nodes.attention_control import PromptToPromptNode
    src, tgt = "a red circle", "a blue circle"
    with pytest.raises(EditKitInputError, match="input 'mode'.*'nonexistent' not found among the choices"):
        PromptToPromptNode.execute(tiny_eps, tiny_clip, src, tgt, "nonexistent", 0.8, 0.4, "", "", 0.3)
    with pytest.raises(EditKitInputError, match="input 'cross_replace_steps'.*above the maximum"):
        PromptToPromptNode.execute(tiny_eps, tiny_clip, src, tgt, "replace", 7.0, 0.4, "", "", 0.3)
    with pytest.raises(EditKitInputError, match="not a finite number"):
        PromptToPromptNode.execute(tiny_eps, tiny_clip, src, tgt, "replace", float("nan"), 0.4, "", "", 0.3)
    with pytest.raises(EditKitInputError, match="NUL"):
        PromptToPromptNode.execute(tiny_eps, tiny_clip, src + "\x00", tgt, "replace", 0.8, 0.4, "", "", 0.3)


def test_validate_helper_on_each_kind():
    from editkit.nodes.api import io
    schema = io.Schema(node_id="EditKitX", inputs=[
        io.Combo.Input("c", options=["a", "b"]), io.Int.Input("i", min=1, max=5), io.Float.Input("f", min=0.0, max=1.0),
        io.String.Input("s"), io.Boolean.Input("b")])
    validate.check_inputs(schema, {"c": "a", "i": 3, "f": 0.5, "s": "x", "b": True})
    validate.check_inputs(schema, {"i": 3.0})  # an integral float is a whole number
    for bad, match in [({"c": "z"}, "input 'c'"), ({"i": 2.7}, "whole number"), ({"i": 9}, "maximum 5"),
                       ({"f": -1.0}, "minimum 0.0"), ({"f": "x"}, "not a number"), ({"s": 3}, "text is expected"),
                       ({"b": 7}, "true or false"), ({"i": True}, "whole number")]:
        with pytest.raises(EditKitInputError, match=match):
            validate.check_inputs(schema, bad)


# -- 6. save paths, NUL / long names, temporary merge files ------------------------------------------

@pytest.fixture(scope="module")
def saved_lora(tmp_path_factory):
    import folder_paths
    d = str(tmp_path_factory.mktemp("rel_loras"))
    folder_paths.add_model_folder_path("loras", d, is_default=True)
    from editkit.lora.st_io import LoraDict
    lora = LoraDict({"lora_unet_x.lora_up.weight": torch.zeros(4, 2), "lora_unet_x.lora_down.weight": torch.zeros(2, 4)})
    return d, lora


@pytest.mark.parametrize("prefix,match", [("../x", "leave the target folder"), ("a/../../x", "leave the target folder"),
                                          ("/tmp/x", "absolute path"), ("x\x00y", "NUL"), ("y" * 300, "bytes long"),
                                          ("~/x", "absolute path")])
def test_lora_save_refuses_paths_leaving_its_folder(saved_lora, prefix, match):
    from editkit.nodes.lora import LoraSave
    d, lora = saved_lora
    before = sorted(os.listdir(d))
    with pytest.raises(EditKitInputError, match=match) as e:
        LoraSave.execute(lora=lora, filename_prefix=prefix)
    assert "'filename_prefix'" in str(e.value)
    assert sorted(os.listdir(d)) == before


def test_lora_save_stays_inside_loras_editkit(saved_lora):
    import folder_paths

    from editkit.nodes.lora import LoraSave
    d, lora = saved_lora
    (name,) = node_out(LoraSave.execute(lora=lora, filename_prefix="sub/ok"))
    path = folder_paths.get_full_path("loras", name)
    root = os.path.realpath(os.path.join(folder_paths.get_folder_paths("loras")[0], "editkit"))
    assert name.startswith("editkit/sub/ok") and os.path.realpath(path).startswith(root + os.sep)


def test_merge_temp_file_removed_when_unreferenced(tiny_pair_lora):
    import folder_paths

    from editkit.nodes.lora import LoraMerge
    model, clip, name = tiny_pair_lora
    folder = os.path.join(folder_paths.get_temp_directory(), "editkit_lora")
    before = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    lora, _img, _s = node_out(LoraMerge.execute(model=model, clip=clip, method="concat", rank=0, density=0.5,
                                                drop_rate=0.5, seed=0, dtype="fp32", lora_1=name, weight_1=1.0))
    new = set(os.listdir(folder)) - before
    assert len(new) == 1 and len(lora) > 0
    path = os.path.join(folder, new.pop())
    assert os.path.exists(path)
    del lora, _img
    gc.collect()
    assert not os.path.exists(path)


@pytest.fixture(scope="module")
def tiny_pair_lora(tmp_path_factory):
    import folder_paths

    from editkit.builtin_models import tiny
    from editkit.lora import formats, st_io, synthetic
    model, clip = tiny.tiny_unet(tiny.EPS, seed=0), tiny.tiny_clip()
    d = str(tmp_path_factory.mktemp("rel_loras_src"))
    folder_paths.add_model_folder_path("loras", d)
    resolver = formats.KeyResolver(model, clip)
    targets = synthetic.select_targets(resolver, ("attn",))
    st_io.save(synthetic.make_lora(resolver, targets[:4], "kohya", rank=2, seed=1), os.path.join(d, "rel_a.safetensors"))
    return model, clip, "rel_a.safetensors"


def test_dtype_combo_checked_before_lookup(tiny_pair_lora):
    from editkit.nodes.lora import LoraMerge
    model, clip, name = tiny_pair_lora
    with pytest.raises(EditKitInputError, match="input 'dtype'"):
        LoraMerge.execute(model=model, clip=clip, method="concat", rank=0, density=0.5, drop_rate=0.5, seed=0,
                          dtype="bogus", lora_1=name, weight_1=1.0)


# -- 7. declared configs and safetensors headers checked before allocating ---------------------------

def _write_st(path, header: dict, data: bytes):
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("entry,match", [
    ({"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}, "ends at byte 64"),       # beyond the file
    ({"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 16]}, "declares shape"),  # lying shape
    ({"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 4]}, "invalid data offsets"),
    ({"dtype": "F32", "shape": [-1, 2], "data_offsets": [0, 16]}, "invalid shape"),
    ({"dtype": "X9", "shape": [2, 2], "data_offsets": [0, 16]}, "unsupported"),
])
def test_st_io_header_checked_against_file(tmp_path, entry, match):
    from editkit.lora import st_io
    p = str(tmp_path / "lying.safetensors")
    _write_st(p, {"lora_unet_x.lora_up.weight": entry}, b"\0" * 16)
    with pytest.raises(ValueError, match=match):
        st_io.read_header(p)


def test_lying_lora_blames_its_own_input(tiny_pair_lora, tmp_path):
    import folder_paths

    from editkit.nodes.lora import LoraMerge
    model, clip, _ = tiny_pair_lora
    d = tmp_path / "lying"
    d.mkdir()
    _write_st(str(d / "lying.safetensors"), {"lora_unet_x.lora_up.weight": {"dtype": "F32", "shape": [4096, 4096],
                                                                           "data_offsets": [0, 64]}}, b"\0" * 64)
    folder_paths.add_model_folder_path("loras", str(d))
    with pytest.raises(EditKitInputError) as e:
        LoraMerge.execute(model=model, clip=clip, method="concat", rank=0, density=0.5, drop_rate=0.5, seed=0,
                          dtype="fp32", lora_1="lying.safetensors", weight_1=1.0)
    assert "input 'lora_1'" in str(e.value) and "declares shape" in str(e.value)


def test_toy_file_declaring_a_huge_config_is_refused_before_allocating(tmp_path):
    from safetensors.torch import save_file

    from editkit.builtin_models import toy
    if not toy.available():
        pytest.skip("no toy model")
    meta = toy.read_metadata()
    from safetensors import safe_open
    with safe_open(toy.DEFAULT_PATH, "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    for cfg_change, match in [({"model_channels": 512}, "allows 1..256"), ({"model_channels": 128}, "implies")]:
        m = json.loads(json.dumps(meta))
        m["unet_config"].update(cfg_change)
        p = str(tmp_path / f"big_{cfg_change['model_channels']}.safetensors")
        save_file(sd, p, metadata={toy.METADATA_KEY: json.dumps(m)})
        import psutil
        rss = psutil.Process().memory_info().rss
        with pytest.raises(ValueError, match=match):
            toy.load_toy(p)
        assert psutil.Process().memory_info().rss - rss < 200 * 2**20


def test_declared_clip_vision_and_controlnet_configs_are_bounded():
    from editkit.adapters import demo_models as dm
    with pytest.raises(ValueError, match="hidden_size = 100000"):
        dm.check_declared("CLIP vision", {"hidden_size": 100000}, {}, dm.CLIP_VISION_BOUNDS)
    with pytest.raises(ValueError, match="but its tensors have 64"):
        dm.check_declared("ControlNet", {"model_channels": 320}, {"model_channels": 64}, dm.CONTROLNET_BOUNDS)
    with pytest.raises(ValueError, match="not an object"):
        dm.check_declared("ControlNet", [1, 2], {}, dm.CONTROLNET_BOUNDS)


# -- 8. the exception type users see; the toy loader's default ----------------------------------------

def test_exception_type_is_shown_plainly():
    import execution
    name = execution.full_type_name(EditKitInputError)
    assert name == "EditKit.EditKitInputError" and "/" not in name


def test_toy_loader_default_is_the_shipped_model(tmp_path, monkeypatch):
    from editkit.builtin_models import toy
    from editkit.nodes import toy as toy_node
    monkeypatch.setattr(toy_node, "_folder_paths_files", lambda: ["aaa_first.safetensors", "0.safetensors"])
    files = toy_node.weight_files()
    assert files[0] == os.path.basename(toy.DEFAULT_PATH) == "toy.safetensors"
    assert toy_node.ToyModelLoader.GET_SCHEMA().inputs[0].default == "toy.safetensors"
