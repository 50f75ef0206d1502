"""Prompt words -> token positions in the conditioning, through the model's own tokenizer.

Positions index the token axis of the CONDITIONING tensor (BOS at 0), which is what the
cross-attention keys are built from, so a word's attention map is the columns at its positions.
"""
from __future__ import annotations

import re

from .errors import EditKitInputError


def split_words(text: str) -> list[str]:
    """'red, blue circle' -> ['red', 'blue circle'] (comma-separated; a phrase may span tokens)."""
    return [w.strip() for w in re.split(r"[,\n]", text or "") if w.strip()]


def stream_key(tokens: dict, family: str | None = None) -> str:
    """Which tokenizer stream the model's context is built from (keys of clip.tokenize()).

    SD1 {"l"}, SDXL {"g","l"} (same positions), SD3 {"l","g","t5xxl"} (CLIP first in the context),
    Flux {"l","t5xxl"} (the context is T5 alone).
    """
    if family == "flux" and "t5xxl" in tokens:
        return "t5xxl"
    for key in ("l", "g", "t5xxl"):
        if key in tokens:
            return key
    return next(iter(tokens))


def sub_tokenizer(clip, key):
    tok = clip.tokenizer
    return getattr(tok, f"clip_{key}", None) or getattr(tok, key, None)


def token_ids(clip, text: str, key: str) -> list:
    """Token ids of one stream, flattened over 77-token chunks (embedding tensors, if any, as -1)."""
    import torch
    toks = clip.tokenize(text)
    return [t[0] if not isinstance(t[0], torch.Tensor) else -1 for batch in toks[key] for t in batch]


def token_positions(clip, prompt: str, words: list[str], node: str, input_name: str = "words") -> dict[str, list[int]]:
    """Map each word (or phrase) to every position of its tokens in the tokenized prompt."""
    toks = clip.tokenize(prompt)
    key = stream_key(toks)
    seq = token_ids(clip, prompt, key)
    sub = sub_tokenizer(clip, key)
    specials = {getattr(sub, a, None) for a in ("start_token", "end_token", "pad_token")} - {None}
    out: dict[str, list[int]] = {}
    for word in words:
        wid = [t for t in token_ids(clip, word, key) if t not in specials]
        if not wid:
            raise EditKitInputError(node, input_name, f"'{word}' has no tokens", "remove it or use a real word")
        n, pos = len(wid), []
        for i in range(len(seq) - n + 1):
            if seq[i:i + n] == wid:
                pos.extend(range(i, i + n))
        if not pos:
            raise EditKitInputError(node, input_name, f"the word '{word}' is not in the prompt \"{prompt.strip()[:120]}\"",
                                    "use words that appear in the prompt (comma-separated)")
        out[word] = pos
    return out
