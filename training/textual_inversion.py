"""Textual inversion (Gal et al., ICLR 2023): a new pseudo-word's embedding vector(s), initialised from an
init word, optimized through the frozen text encoder and diffusion model so that captions with the
placeholder reconstruct the concept images. The diffusion loss and loop are the training core's; the
trainable vectors enter ComfyUI's own tokens as embedding tensors (as `embedding:NAME` does), encoded by a
gradient clone of the CLIP (core.gradients.gradient_clip). Saved as an embedding file ComfyUI's tokenizer
loads by `embedding:NAME` ({"clip_l": (n, dim)}, plus "clip_g" for SDXL's second encoder)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..core import gradients as G
from . import loop


class CaptionError(ValueError):
    def __init__(self, input_name: str, problem: str, fix: str):
        self.input_name, self.problem, self.fix = input_name, problem, fix
        super().__init__(f"{input_name}: {problem} - {fix}")


def _content_tokens(clip, text: str) -> dict:
    """{encoder key: [token ids of `text` without start/end/pad]}."""
    out = {}
    for key, chunks in clip.tokenize(text).items():
        enc = getattr(clip.tokenizer, "clip_" + key, None)
        special = set()
        if enc is not None:
            special = {t for t in (getattr(enc, "start_token", None), getattr(enc, "end_token", None),
                                   getattr(enc, "pad_token", None)) if t is not None}
        ids = [int(t[0]) for c in chunks for t in c if isinstance(t[0], int)]
        out[key] = [t for t in ids if t not in special]
    return out


def encoders(clip) -> dict:
    """{token key: the encoder's input embedding table} for each text encoder of this CLIP."""
    out = {}
    for key in clip.tokenize("a").keys():
        enc = getattr(clip.cond_stage_model, "clip_" + key)
        out[key] = enc.transformer.get_input_embeddings().weight
    return out


def check_placeholder(clip, placeholder: str) -> None:
    ids = _content_tokens(clip, placeholder)
    if any(len(v) == 1 for v in ids.values()):
        raise CaptionError("placeholder", f"{placeholder!r} is already a word of the text encoder's vocabulary",
                           "use a new pseudo-word such as <my-concept>")


def init_vectors(clip, init_word: str, n_vectors: int) -> dict:
    ids = _content_tokens(clip, init_word)
    if not init_word.strip() or any(len(v) != 1 for v in ids.values()):
        raise CaptionError("init_word", f"{init_word!r} is not a single token of the vocabulary",
                           "use one common word describing the concept, e.g. dog")
    tables = encoders(clip)
    return {k: tables[k][ids[k][0]].detach().float().cpu().clone().expand(n_vectors, -1).clone() for k in tables}


@dataclass
class Caption:
    tokens: dict            # {key: chunks}, placeholder positions hold the init tokens
    positions: dict         # {key: [(chunk, index), ...]} of the placeholder's vectors


def prepare_caption(clip, caption: str, placeholder: str, init_word: str, n_vectors: int) -> Caption:
    if placeholder not in caption:
        raise CaptionError("captions", f"{caption!r} does not contain the placeholder {placeholder!r}",
                           f"write e.g. 'a photo of {placeholder}'")
    pre = caption.split(placeholder, 1)[0]
    words = " ".join([init_word] * n_vectors)
    text = caption.replace(placeholder, words, 1).replace(placeholder, init_word)
    toks = clip.tokenize(text)
    n_pre = _content_tokens(clip, pre) if pre.strip() else {k: [] for k in toks}
    positions = {}
    for key, chunks in toks.items():
        flat = [(ci, ti) for ci, c in enumerate(chunks) for ti in range(len(c))]
        # the start token, then the caption's content before the placeholder
        first = 1 + len(n_pre[key])
        positions[key] = [flat[first + j] for j in range(n_vectors)]
    return Caption(toks, positions)


def tokens_with(caption: Caption, vectors: dict) -> dict:
    out = {}
    for key, chunks in caption.tokens.items():
        chunks = [list(c) for c in chunks]
        for j, (ci, ti) in enumerate(caption.positions[key]):
            chunks[ci][ti] = (vectors[key][j],) + tuple(chunks[ci][ti][1:])
        out[key] = chunks
    return out


def embedding_file(vectors: dict) -> dict:
    return {"clip_" + k: v.detach().float().cpu().contiguous() for k, v in vectors.items()}


class Concept:
    """The trainable word: fp32 vectors per encoder, the captions' conds (named caption_<i>) and the
    differentiable context of each caption."""

    def __init__(self, clip, captions: list[str], placeholder: str, init_word: str, n_vectors: int = 1):
        check_placeholder(clip, placeholder)
        init = init_vectors(clip, init_word, n_vectors)
        self.keys = list(init)
        self.params = loop.master_parameters([init[k] for k in self.keys])
        self.vectors = dict(zip(self.keys, self.params))
        caps = [prepare_caption(clip, c, placeholder, init_word, n_vectors) for c in captions]
        self.names = [f"caption_{i}" for i in range(len(captions))]
        self.conds = {n: clip.encode_from_tokens_scheduled(cap.tokens) for n, cap in zip(self.names, caps)}
        self._caps = dict(zip(self.names, caps))
        self._clip = G.gradient_clip(clip)

    def context(self, name):
        """The caption's cross-attention context with the trainable vectors (None for other conds)."""
        cap = self._caps.get(name)
        if cap is None:
            return None
        dev = self.params[0].device
        return self._clip.encode_from_tokens(tokens_with(cap, {k: v.to(dev) for k, v in self.vectors.items()}))

    def file(self) -> dict:
        return embedding_file(self.vectors)


def train(model, clip, latents: torch.Tensor, captions: list[str], placeholder: str, init_word: str,
          settings: loop.Settings, n_vectors: int = 1, checkpoint_path: Optional[str] = None,
          resume: Optional[str] = None, node_id: Optional[str] = None, stop=None, preview=None):
    """(vectors {key: (n, dim) fp32}, loop.Result). latents: sampler space (N, C, H, W), one caption each."""
    concept = Concept(clip, captions, placeholder, init_word, n_vectors)
    examples = [loop.Example(x, n) for x, n in zip(latents, concept.names)]
    res = loop.train(model, concept.conds, examples, concept.params, settings, context=concept.context,
                     checkpoint_path=checkpoint_path, resume=resume, node_id=node_id, stop=stop, preview=preview)
    return {k: v.detach() for k, v in concept.vectors.items()}, res
