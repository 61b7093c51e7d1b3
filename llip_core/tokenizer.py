"""Tokenizers that need no downloaded vocabulary (nothing may be fetched at run time).

`WordHashTokenizer` lower-cases, splits words and punctuation, and hashes each word into a fixed
number of buckets with a stable hash, so unseen words still get ids and compositional captions
("cat face" after training on "cat" and "dog face") share tokens. Ids: 0 pad, 1 SOT, 2 EOT,
3.. words. The text tower pools at the EOT position, found as the first EOT in each row.
"""
from __future__ import annotations

import re
import zlib
from typing import Sequence

import numpy as np

PAD, SOT, EOT = 0, 1, 2
_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


class WordHashTokenizer:
    def __init__(self, vocab_size: int, context_length: int):
        if vocab_size < 16:
            raise ValueError("vocab_size must be at least 16")
        if context_length < 3:
            raise ValueError("context_length must be at least 3 (SOT, one token, EOT)")
        self.vocab_size = vocab_size
        self.context_length = context_length

    def word_id(self, word: str) -> int:
        return 3 + zlib.crc32(word.encode("utf-8")) % (self.vocab_size - 3)

    def encode(self, text: str) -> list[int]:
        words = _WORD.findall(text.lower())
        ids = [self.word_id(w) for w in words][: self.context_length - 2]
        return [SOT, *ids, EOT]

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """int64 array (len(texts), context_length), zero-padded; long captions are truncated."""
        out = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for i, t in enumerate(texts):
            ids = self.encode(t)
            out[i, : len(ids)] = ids
        return out


def eot_positions(tokens) -> "np.ndarray":
    """Index of the first EOT in each row (works on numpy arrays and torch tensors)."""
    return (tokens == EOT).int().argmax(-1) if hasattr(tokens, "int") else (tokens == EOT).argmax(-1)
