"""Training nodes: DreamBooth-LoRA writes a LoRA core Load LoRA applies exactly as the node's own output
model, caches its class images, and refuses bad input (naming it) without writing anything."""
import os

import pytest
import torch

from editkit.core import denoiser as D
from editkit.core.errors import EditKitInputError
from editkit.nodes.training import DreamBoothLoRATrain
from ek_helpers import node_out

ARGS = dict(instance_prompt="a photo of sks circle", identifier="sks", class_prompt="a photo of circle",
            steps=3, learning_rate=1e-3, rank=2, batch_size=1, prior_loss_weight=1.0, class_images=2,
            class_steps=2, seed=0, resume=False)


def _latent(n=2):
    return {"samples": torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(7))}


def _loras():
    import folder_paths
    d = folder_paths.get_folder_paths("loras")[0]
    return set(os.listdir(d)) if os.path.isdir(d) else set()


def test_dreambooth_lora_file_loads_with_core_lora_loader(tiny_eps, tiny_clip, encode):
    import folder_paths
    import nodes
    model, name, report, clip_out = node_out(DreamBoothLoRATrain.execute(model=tiny_eps, clip=tiny_clip, latent=_latent(),
                                                               name="ek_test_db", **ARGS))
    assert name == "ek_test_db.safetensors" and "saved models/loras/ek_test_db.safetensors" in report
    assert "(cached)" not in report
    path = folder_paths.get_full_path("loras", name)
    assert path and os.path.exists(path)
    loaded, _ = nodes.LoraLoader().load_lora(tiny_eps, tiny_clip, name, 1.0, 1.0)
    assert set(loaded.patches) == set(model.patches) and len(loaded.patches) > 0
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    s, c = float(tiny_eps.model.model_sampling.sigmas[600]), encode("a photo of sks circle")
    torch.testing.assert_close(D.predict_x0(loaded, x, s, c), D.predict_x0(model, x, s, c), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(D.predict_x0(tiny_eps, x, s, c), D.predict_x0(loaded, x, s, c), atol=1e-7)
    assert not tiny_eps.patches                                  # the input model stays as it was
    assert clip_out is tiny_clip                                 # train_text_encoder off: the CLIP passes through
    # the class images come from the cache the second time
    _, _, report2, _ = node_out(DreamBoothLoRATrain.execute(model=tiny_eps, clip=tiny_clip, latent=_latent(),
                                                         name="ek_test_db", **ARGS))
    assert "(cached)" in report2
    os.remove(path)


def test_dreambooth_text_encoder_lora_through_the_node_and_core_lora_loader(tiny_eps, tiny_clip):
    """train_text_encoder: the file core Load LoRA loads gives the CLIP the node returns (same encoding of the
    prompt, different from the base CLIP's)."""
    import folder_paths
    import nodes
    from editkit.builtin_models import tiny
    kw = dict(ARGS, class_images=0, learning_rate=1e-2)
    _, name, report, clip_out = node_out(DreamBoothLoRATrain.execute(
        model=tiny_eps, clip=tiny_clip, latent=_latent(), name="ek_test_db_te", train_text_encoder=True,
        text_encoder_lr=1e-2, **kw))
    assert "text encoder" in report
    path = folder_paths.get_full_path("loras", name)
    _, loaded_clip = nodes.LoraLoader().load_lora(tiny_eps, tiny_clip, name, 1.0, 1.0)
    prompt = "a photo of sks circle"
    base, got, ref = (tiny.encode(c, prompt)[0][0] for c in (tiny_clip, loaded_clip, clip_out))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert (got - base).abs().max() > 1e-4
    os.remove(path)


@pytest.mark.parametrize("change, input_name", [
    (dict(latent={"samples": torch.zeros(0, 4, 8, 8)}), "latent"),
    (dict(instance_prompt="a photo of a circle"), "instance_prompt"),
    (dict(learning_rate=0.0), "learning_rate"),
    (dict(train_text_encoder=True, text_encoder_lr=0.0), "text_encoder_lr"),
    (dict(name="../../evil"), "name"),
    (dict(name="sub/evil"), "name"),
    (dict(class_prompt=" "), "class_prompt"),
    (dict(adapter="bogus"), "adapter"),          # the API does not check combo values
    (dict(targets="bogus"), "targets"),
])
def test_dreambooth_bad_input_names_the_input_and_writes_nothing(tiny_eps, tiny_clip, change, input_name):
    before = _loras()
    kw = dict(ARGS, latent=_latent(), name="ek_test_bad")
    kw.update(change)
    with pytest.raises(EditKitInputError) as err:
        DreamBoothLoRATrain.execute(model=tiny_eps, clip=tiny_clip, **kw)
    assert err.value.input_name == input_name, str(err.value)
    assert _loras() == before


def test_interrupt_leaves_a_checkpoint_and_no_lora_then_resume_finishes(tiny_eps, tiny_clip):
    import comfy.model_management as mm
    from editkit.training import paths
    kw = dict(ARGS, latent=_latent(), name="ek_test_int", class_images=0)
    before = _loras()
    import comfy.utils

    def press_stop_after_two_steps(value, total, *a, **k):      # the user presses Cancel during step 3
        if total == kw["steps"] and value >= 2:
            mm.interrupt_current_processing(True)
    old = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(press_stop_after_two_steps)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            DreamBoothLoRATrain.execute(model=tiny_eps, clip=tiny_clip, **kw)
    finally:
        comfy.utils.set_progress_bar_global_hook(old)
        mm.interrupt_current_processing(False)
    ck = paths.checkpoint_file("lora", "ek_test_int.safetensors")
    assert os.path.exists(ck) and _loras() == before and not tiny_eps.patches
    _, name, report, _ = node_out(DreamBoothLoRATrain.execute(model=tiny_eps, clip=tiny_clip, **dict(kw, resume=True)))
    assert "resumed at step 2" in report and not os.path.exists(ck)
    import folder_paths
    os.remove(folder_paths.get_full_path("loras", name))


TI_ARGS = dict(captions="a photo of <ek-concept>", placeholder="<ek-concept>", init_word="circle", num_vectors=1,
               steps=6, learning_rate=5e-2, batch_size=1, seed=0, resume=False)


def test_textual_inversion_embedding_is_picked_up_by_comfys_tokenizer(tiny_eps, tiny_clip):
    """The file lands in the embeddings folder; ComfyUI's own tokenizer turns embedding:NAME into the trained
    vector, which differs from the init word's (the optimizer moved it) and encodes to a different context."""
    import comfy.sd1_clip
    import folder_paths
    from editkit.nodes.training import TextualInversionTrain
    from editkit.training import textual_inversion as TI
    token, report = node_out(TextualInversionTrain.execute(model=tiny_eps, clip=tiny_clip, latent=_latent(),
                                                           name="ek_test_ti", **TI_ARGS))
    assert token == "embedding:ek_test_ti" and "6 steps" in report
    path = folder_paths.get_full_path("embeddings", "ek_test_ti.safetensors")
    assert path and os.path.exists(path)
    tok = comfy.sd1_clip.SDTokenizer(embedding_directory=folder_paths.get_folder_paths("embeddings"),
                                     embedding_size=32, embedding_key="clip_l")
    pairs = tok.tokenize_with_weights("a photo of embedding:ek_test_ti")
    vecs = [t[0] for t in pairs[0] if torch.is_tensor(t[0])]
    assert len(vecs) == 1
    from safetensors.torch import load_file
    saved = load_file(path)["clip_l"]
    torch.testing.assert_close(vecs[0].float().reshape(saved.shape), saved)
    init = TI.init_vectors(tiny_clip, "circle", 1)["l"]
    assert float((saved - init).abs().max()) > 1e-3
    with_emb = tiny_clip.encode_from_tokens({"l": pairs})
    with_init = tiny_clip.encode_from_tokens(tiny_clip.tokenize("a photo of circle"))
    assert not torch.allclose(with_emb, with_init, atol=1e-5)
    os.remove(path)


@pytest.mark.parametrize("change, input_name", [
    (dict(captions="a photo of a circle"), "captions"),
    (dict(captions="a photo of <ek-concept>\nand <ek-concept>\nthird <ek-concept>"), "captions"),
    (dict(placeholder="circle", captions="a photo of circle"), "placeholder"),
    (dict(init_word="two words"), "init_word"),
    (dict(learning_rate=-1.0), "learning_rate"),
    (dict(name="/etc/evil"), "name"),
])
def test_textual_inversion_bad_input(tiny_eps, tiny_clip, change, input_name):
    from editkit.nodes.training import TextualInversionTrain
    kw = dict(TI_ARGS, latent=_latent(), name="ek_test_ti_bad")
    kw.update(change)
    with pytest.raises(EditKitInputError) as err:
        TextualInversionTrain.execute(model=tiny_eps, clip=tiny_clip, **kw)
    assert err.value.input_name == input_name, str(err.value)
    import folder_paths
    assert folder_paths.get_full_path("embeddings", "ek_test_ti_bad.safetensors") is None


def test_custom_diffusion_trains_only_cross_kv_and_loads_with_core_loaders(tiny_eps, tiny_clip, encode):
    """The LoRA file holds full K/V deltas of attn2 only (core LoraLoader applies them exactly as the node's model),
    the embedding file is read by ComfyUI's tokenizer."""
    import comfy.sd1_clip
    import folder_paths
    import nodes
    from safetensors.torch import load_file
    from editkit.nodes.training import CustomDiffusionTrain
    model, lora_name, token, report = node_out(CustomDiffusionTrain.execute(
        model=tiny_eps, clip=tiny_clip, latent=_latent(), captions="photo of a <ek-new1> circle",
        placeholder="<ek-new1>", init_word="circle", class_prompt="photo of a circle", name="ek_test_cd", steps=4,
        learning_rate=1e-2, batch_size=1, prior_loss_weight=1.0, class_images=1, class_steps=2, seed=0, resume=False))
    lpath = folder_paths.get_full_path("loras", lora_name)
    sd = load_file(lpath)
    assert sd and all(k.endswith(".diff") and (".attn2.to_k" in k or ".attn2.to_v" in k) for k in sd)
    assert max(float(v.abs().max()) for v in sd.values()) > 1e-4
    loaded, _ = nodes.LoraLoader().load_lora(tiny_eps, tiny_clip, lora_name, 1.0, 1.0)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    s, c = float(tiny_eps.model.model_sampling.sigmas[300]), encode("photo of a circle")
    torch.testing.assert_close(D.predict_x0(loaded, x, s, c), D.predict_x0(model, x, s, c), rtol=1e-5, atol=1e-7)
    tok = comfy.sd1_clip.SDTokenizer(embedding_directory=folder_paths.get_folder_paths("embeddings"),
                                     embedding_size=32, embedding_key="clip_l")
    pairs = tok.tokenize_with_weights("photo of a " + token + " circle")
    assert sum(torch.is_tensor(t[0]) for t in pairs[0]) == 1
    os.remove(lpath)
    os.remove(folder_paths.get_full_path("embeddings", "ek_test_cd.safetensors"))
