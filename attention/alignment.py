"""Prompt alignment for attention control, through the model's own tokenizer.

Positions index the token axis of the conditioning (what cross-attention keys are built from). The
stream is the one the model's context is made of: CLIP-L/G for SD1.x/SDXL (same positions), T5 for
Flux, CLIP then T5 for SD3 (the CLIP part is aligned; further positions map to themselves).

* `replace_mapper`: Prompt-to-Prompt word swap. The prompts have the same number of words; equal
  words and swapped words with equal token counts map token to token, a swapped word with a
  different token count spreads each source token evenly over the target word's tokens (P2P).
* `refine_mapper`: P2P refinement. Token sequences aligned (difflib); target tokens with a source
  counterpart take the source map (alpha 1), added tokens keep their own (alpha 0).
* `reweight_vector`: per-target-token weights from "word:weight, ..." (a word missing from the
  prompt is an error naming it).
"""
from __future__ import annotations

import difflib
import re

import torch

from ..core.errors import EditKitInputError
from ..core.tokens import stream_key as _stream_key, sub_tokenizer as _sub, token_ids as _ids


class Tokens:
    """The context-position token ids of one prompt."""

    def __init__(self, clip, prompt: str, family: str):
        toks = clip.tokenize(prompt)
        self.key = _stream_key(toks, family)
        self.prompt = prompt
        self.ids = _ids(clip, prompt, self.key)
        sub = _sub(clip, self.key)
        self.start = getattr(sub, "start_token", None) if getattr(sub, "start_token", None) is not None and getattr(sub, "has_start_token", True) else None
        self.specials = {getattr(sub, a, None) for a in ("start_token", "end_token", "pad_token")} - {None}
        self.clip = clip

    def __len__(self):
        return len(self.ids)

    def word_ids(self, word: str) -> list:
        return [t for t in _ids(self.clip, word, self.key) if t not in self.specials]

    def find(self, word: str) -> list[int]:
        wid = self.word_ids(word)
        n, out = len(wid), []
        if not n:
            return out
        for i in range(len(self.ids) - n + 1):
            if self.ids[i:i + n] == wid:
                out.extend(range(i, i + n))
        return out

    def content_start(self) -> int:
        return 1 if self.ids and self.start is not None and self.ids[0] == self.start else 0


def positions(clip, prompt: str, words: list[str], family: str, node: str, input_name: str, prompt_name: str,
              allow_missing: bool = False) -> dict[str, list[int]]:
    """word -> every token position of it in the prompt; a missing word is an error naming it."""
    tk = Tokens(clip, prompt, family)
    out = {}
    for w in words:
        pos = tk.find(w)
        if not tk.word_ids(w):
            raise EditKitInputError(node, input_name, f"'{w}' has no tokens", "remove it or use a real word")
        if not pos and not allow_missing:
            raise EditKitInputError(node, input_name, f"the word '{w}' is not in the {prompt_name} \"{prompt.strip()[:120]}\"",
                                    f"use words that appear in the {prompt_name} (comma-separated)")
        out[w] = pos
    return out


def _word_spans(tk: Tokens, words: list[str], node: str, prompt_name: str) -> list[list[int]]:
    """Token positions of each whitespace-separated word, walking the tokenized prompt.

    A prompt over 75 tokens continues in further 77-token chunks: the END/padding of one chunk and the
    START of the next are skipped (ComfyUI moves a word that does not fit into the next chunk, and
    splits only very long words, whose tokens are then found on both sides of the boundary)."""
    pos = tk.content_start()
    spans = []
    for w in words:
        wid = tk.word_ids(w)
        span = []
        for t in wid:
            while pos < len(tk.ids) and tk.ids[pos] != t and tk.ids[pos] in tk.specials:
                pos += 1
            if pos >= len(tk.ids) or tk.ids[pos] != t:
                span = None
                break
            span.append(pos)
            pos += 1
        if not wid or span is None:
            raise EditKitInputError(node, prompt_name, f"could not align the word '{w}' of the {prompt_name} with its tokens",
                                    "avoid prompt weighting syntax and embeddings here, or use mode 'refine'")
        spans.append(span)
    return spans


def replace_mapper(clip, source: str, target: str, family: str, node: str = "EditKitPromptToPrompt") -> torch.Tensor:
    """(T_src, T_tgt) matrix G with target maps = source maps @ G (word swap)."""
    ts, tt = Tokens(clip, source, family), Tokens(clip, target, family)
    ws, wt = source.split(), target.split()
    if len(ws) != len(wt):
        raise EditKitInputError(node, "target_prompt", f"a word swap needs prompts with the same number of words "
                                f"({len(ws)} in the source, {len(wt)} in the target)",
                                "use mode 'refine' for added words, or keep the prompts word-for-word")
    ss, st = _word_spans(ts, ws, node, "source_prompt"), _word_spans(tt, wt, node, "target_prompt")
    g = torch.zeros(len(ts), len(tt))
    if ts.content_start() and tt.content_start():
        g[0, 0] = 1.0
    for a, b in zip(ss, st):
        if len(a) == len(b):
            for i, j in zip(a, b):
                g[i, j] = 1.0
        else:
            for j in b:
                g[a, j] = 1.0 / len(b)
    # chunk boundaries before the last word (END, padding, the next chunk's START): to the same position
    # of the source when that is a special token too (both prompts have the same chunk count)
    covered = {j for b in st for j in b}
    last_t = st[-1][-1] if st else 0
    for j in range(1, last_t):
        if j not in covered and tt.ids[j] in tt.specials:
            i = j if j < len(ts) and ts.ids[j] in ts.specials else min(j, len(ts) - 1)
            g[i, j] = 1.0
    es = (ss[-1][-1] + 1) if ss else ts.content_start()
    et = (st[-1][-1] + 1) if st else tt.content_start()
    i, j = es, et
    while j < len(tt):
        g[min(i, len(ts) - 1), j] = 1.0
        i, j = i + 1, j + 1
    return g


def refine_mapper(clip, source: str, target: str, family: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, alpha): target token j takes source map G[:, j] where alpha_j = 1, its own where alpha_j = 0."""
    ts, tt = Tokens(clip, source, family), Tokens(clip, target, family)
    g = torch.zeros(len(ts), len(tt))
    alpha = torch.zeros(len(tt))
    sm = difflib.SequenceMatcher(None, ts.ids, tt.ids, autojunk=False)
    for a, b, n in sm.get_matching_blocks():
        for d in range(n):
            g[a + d, b + d] = 1.0
            alpha[b + d] = 1.0
    return g, alpha


def parse_weights(text: str, node: str, input_name: str) -> list[tuple[str, float]]:
    """'smiling:2, cat:0.5' -> [('smiling', 2.0), ('cat', 0.5)]."""
    out = []
    for item in [x.strip() for x in re.split(r"[,\n]", text or "") if x.strip()]:
        if ":" not in item:
            raise EditKitInputError(node, input_name, f"'{item}' has no weight", "write word:weight, e.g. 'smiling:2'")
        word, _, val = item.rpartition(":")
        try:
            w = float(val)
        except ValueError:
            raise EditKitInputError(node, input_name, f"'{val}' is not a number", "write word:weight, e.g. 'smiling:2'") from None
        if not word.strip():
            raise EditKitInputError(node, input_name, f"'{item}' has no word", "write word:weight")
        out.append((word.strip(), w))
    return out


def reweight_vector(clip, prompt: str, weights: list[tuple[str, float]], family: str, node: str, input_name: str,
                    prompt_name: str = "target prompt") -> torch.Tensor:
    tk = Tokens(clip, prompt, family)
    vec = torch.ones(len(tk))
    pos = positions(clip, prompt, [w for w, _ in weights], family, node, input_name, prompt_name)
    for word, w in weights:
        vec[pos[word]] = w
    return vec
