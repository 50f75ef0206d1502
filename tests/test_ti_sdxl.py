"""An SDXL textual-inversion embedding as EditKit writes it (training.textual_inversion.embedding_file: one
tensor per text encoder, "clip_l" (n, 768) and "clip_g" (n, 1280)) is picked up by ComfyUI's own SDXL
tokenizer as `embedding:NAME` for both encoders, each encoder getting its own vectors in order."""
import torch

from editkit.training import textual_inversion as TI


def test_sdxl_tokenizer_reads_both_encoders_vectors(tmp_path):
    import comfy.sdxl_clip
    from safetensors.torch import save_file
    gen = torch.Generator().manual_seed(0)
    vectors = {"l": torch.randn(2, 768, generator=gen), "g": torch.randn(2, 1280, generator=gen)}
    save_file(TI.embedding_file(vectors), str(tmp_path / "ek_sdxl_concept.safetensors"))
    tok = comfy.sdxl_clip.SDXLTokenizer(embedding_directory=str(tmp_path))
    out = tok.tokenize_with_weights("a photo of embedding:ek_sdxl_concept on a table")
    assert set(out) == {"g", "l"}
    for key, dim in (("l", 768), ("g", 1280)):
        pairs = out[key][0]
        found = [i for i, t in enumerate(pairs) if torch.is_tensor(t[0])]
        assert len(found) == 2 and found[1] == found[0] + 1          # the two vectors, in place of the word
        got = torch.stack([pairs[i][0].float().reshape(-1) for i in found])
        assert got.shape == (2, dim)
        torch.testing.assert_close(got, vectors[key])
        # the words around the embedding stay ordinary tokens of that encoder's vocabulary
        assert isinstance(pairs[found[0] - 1][0], int) and isinstance(pairs[found[1] + 1][0], int)
