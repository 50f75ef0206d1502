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


def _encoder_key(tokens: dict) -> str:
    # The keys of clip.tokenize(): SD1 {"l"}, SDXL {"g","l"} (same positions), Flux {"l","t5xxl"}.
    for key in ("l", "g", "t5xxl"):
        if key in tokens:
            return key
    return next(iter(tokens))


def _sub_tokenizer(clip, key):
    tok = clip.tokenizer
    return getattr(tok, f"clip_{key}", None) or getattr(tok, key, None)


def _ids(clip, text: str, key: str) -> list[int]:
    toks = clip.tokenize(text)
    return [t[0] for batch in toks[key] for t in batch]


def token_positions(clip, prompt: str, words: list[str], node: str, input_name: str = "words") -> dict[str, list[int]]:
    """Map each word (or phrase) to every position of its tokens in the tokenized prompt."""
    toks = clip.tokenize(prompt)
    key = _encoder_key(toks)
    seq = [t[0] for batch in toks[key] for t in batch]
    sub = _sub_tokenizer(clip, key)
    specials = {getattr(sub, a, None) for a in ("start_token", "end_token", "pad_token")} - {None}
    out: dict[str, list[int]] = {}
    for word in words:
        wid = [t for t in _ids(clip, word, key) if t not in specials and not isinstance(t, (list, tuple))]
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
