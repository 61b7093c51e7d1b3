"""Tokenizers: CLIP's byte-level BPE (the default, what every paper here trains with), a word-hash
tokenizer kept as a named option, and a compact-vocabulary wrapper for tiny models.

`ClipBpeTokenizer` gives the ids open_clip's `tokenize` gives (the `bpe_simple_vocab_16e6` merges,
49,408 ids, SOT 49406, EOT 49407, zero padding): captions are cleaned with ftfy and a double HTML
unescape, whitespace runs collapse to one space, text is lower-cased, split by CLIP's regex, each
piece's UTF-8 bytes are mapped to printable characters and merged pair by pair in merge-rank order.
A caption longer than the context is truncated as open_clip truncates (keep the first
context_length - 1 tokens, then EOT last), never an error. Nothing is downloaded: the merges file is
read from the installed open_clip_torch wheel, found without importing open_clip (its import needs
torchvision, which does not load beside the CPU torch wheel here).

`CompactVocab` keeps the embedding table of a tiny model small: only the base tokenizer's ids seen
in the training captions get a row (ids 4..), plus pad 0, SOT 1, EOT 2 and one unknown id 3 that
every id unseen in training maps to. Two words are distinguishable under it exactly when they are
distinguishable under the full vocabulary and were seen in training; unseen words all become UNK.

`WordHashTokenizer` lower-cases, splits words and punctuation, and hashes each word into a fixed
number of buckets with a stable hash (ids: 0 pad, 1 SOT, 2 EOT, 3.. words). Different words can
share a bucket, so prefer BPE for anything compared with published numbers.

Every tokenizer pads with 0 and puts EOT last, so the text tower pools at the EOT position,
found per row by `eot_positions` whatever the tokenizer's EOT id.

A tokenizer is rebuilt from a small JSON-able `spec` (`tokenizer_spec`, `build_tokenizer`), which is
what runs log, checkpoints store, and evaluation reloads.
"""
from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import os
import zlib
from typing import Iterable, Optional, Sequence

import numpy as np

TOKENIZERS = ("clip_bpe", "word_hash")
VOCABS = ("full", "compact")

# word-hash (and compact) layout
PAD, SOT, EOT = 0, 1, 2
UNK = 3  # compact vocabulary: every id not seen in the training captions

CLIP_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_VOCAB_SIZE = 49408
CLIP_SOT, CLIP_EOT = 49406, 49407
_INSTALL_HINT = "pip install --no-deps open_clip_torch==3.3.0"


class TokenizerError(ValueError):
    """A one-line problem with a tokenizer name, spec or vocabulary file."""


# ============================================================================ CLIP BPE
def clip_vocab_path() -> str:
    """The merges file inside the installed open_clip_torch wheel (found, not imported)."""
    spec = importlib.util.find_spec("open_clip")
    dirs = list(spec.submodule_search_locations or []) if spec is not None else []
    for d in dirs:
        path = os.path.join(d, CLIP_VOCAB_FILE)
        if os.path.isfile(path):
            return path
    raise TokenizerError(f"CLIP's BPE vocabulary {CLIP_VOCAB_FILE} is not installed; run: {_INSTALL_HINT}")


@functools.lru_cache(maxsize=None)
def _byte_symbols() -> tuple[str, ...]:
    """Byte value -> one printable character. Printable Latin-1 bytes stand for themselves; the others
    (controls, space, soft hyphen, ...) are moved above U+00FF in byte order, so no symbol is blank."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return tuple(table[b] for b in range(256))


@functools.lru_cache(maxsize=2)
def _clip_vocab(path: str) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    """(symbol string -> id, merge pair -> rank). Ids: the 256 byte symbols in the order
    `bytes_to_unicode` lists them (printable ones first), the same 256 with the end-of-word marker,
    one id per merge in rank order, then SOT and EOT."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    n_merges = CLIP_VOCAB_SIZE - 2 * 256 - 2
    merges = [tuple(line.split()) for line in lines[1:1 + n_merges]]  # line 0 is a version header
    if len(merges) != n_merges or any(len(m) != 2 for m in merges):
        raise TokenizerError(f"{path}: not CLIP's merges file ({len(merges)} merges); reinstall: {_INSTALL_HINT}")
    sym = _byte_symbols()
    order = [sym[b] for b in [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]]
    order += [s for s in sym if s not in set(order)]  # the remapped bytes, in byte order
    symbols = order + [s + "</w>" for s in order] + ["".join(m) for m in merges]
    symbols += ["<start_of_text>", "<end_of_text>"]
    ids = {s: i for i, s in enumerate(symbols)}
    return ids, {m: r for r, m in enumerate(merges)}


@functools.lru_cache(maxsize=1)
def _clip_pattern():
    import regex

    # special tokens first (a caption spelling "<end_of_text>" gets EOT, as in open_clip); then
    # contractions, letter runs, single digits, and runs of anything else that is not a space
    return regex.compile(
        r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        regex.IGNORECASE,
    )


def clip_clean(text: str) -> str:
    """ftfy repair, HTML unescaped twice, whitespace runs -> one space, stripped, lower-cased."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


class ClipBpeTokenizer:
    name = "clip_bpe"
    vocab_size = CLIP_VOCAB_SIZE
    sot_id, eot_id = CLIP_SOT, CLIP_EOT

    def __init__(self, context_length: int = 77, vocab_path: Optional[str] = None):
        """`vocab_path`: a copy of the merges file (an exported model carries one); None: the wheel's."""
        if context_length < 2:
            raise TokenizerError("context_length must be at least 2 (SOT and EOT)")
        self.context_length = context_length
        self._ids, self._ranks = _clip_vocab(vocab_path or clip_vocab_path())
        self._sym = _byte_symbols()
        self._pieces: dict[str, tuple[int, ...]] = {
            "<start_of_text>": (CLIP_SOT,), "<end_of_text>": (CLIP_EOT,)}

    def _merge(self, symbols: list[str]) -> list[str]:
        """Apply merges lowest rank first; each round merges every non-overlapping occurrence of the
        best pair, left to right."""
        ranks = self._ranks
        while len(symbols) > 1:
            best, best_rank = None, None
            for pair in zip(symbols, symbols[1:]):
                r = ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = pair, r
            if best is None:
                break
            out, i, n = [], 0, len(symbols)
            while i < n:
                if i + 1 < n and symbols[i] == best[0] and symbols[i + 1] == best[1]:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            symbols = out
        return symbols

    def _piece_ids(self, piece: str) -> tuple[int, ...]:
        ids = self._pieces.get(piece)
        if ids is None:
            symbols = [self._sym[b] for b in piece.encode("utf-8")]
            symbols[-1] += "</w>"
            ids = tuple(self._ids[s] for s in self._merge(symbols))
            self._pieces[piece] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """BPE ids of a caption, without SOT/EOT and untruncated."""
        out: list[int] = []
        for piece in _clip_pattern().findall(clip_clean(text)):
            out.extend(self._piece_ids(piece))
        return out

    def rows(self, texts: Sequence[str]) -> list[list[int]]:
        """[SOT, ids..., EOT] per caption, truncated to context_length with EOT kept last."""
        keep = self.context_length - 2
        return [[CLIP_SOT, *self.encode(t)[:keep], CLIP_EOT] for t in texts]

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """int64 (len(texts), context_length), zero-padded, as open_clip's `tokenize`."""
        return _pad(self.rows(texts), self.context_length)


# ============================================================================ word hash
class WordHashTokenizer:
    name = "word_hash"
    sot_id, eot_id = SOT, EOT

    def __init__(self, vocab_size: int, context_length: int):
        if vocab_size < 16:
            raise TokenizerError("vocab_size must be at least 16")
        if context_length < 3:
            raise TokenizerError("context_length must be at least 3 (SOT, one token, EOT)")
        self.vocab_size = vocab_size
        self.context_length = context_length

    def word_id(self, word: str) -> int:
        return 3 + zlib.crc32(word.encode("utf-8")) % (self.vocab_size - 3)

    def encode(self, text: str) -> list[int]:
        """Word ids of a caption, with SOT/EOT, truncated (kept for callers of the old API)."""
        return self.rows([text])[0]

    def rows(self, texts: Sequence[str]) -> list[list[int]]:
        import re

        keep = self.context_length - 2
        return [[SOT, *[self.word_id(w) for w in re.findall(r"[a-z0-9]+|[^\sa-z0-9]", t.lower())][:keep], EOT]
                for t in texts]

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """int64 array (len(texts), context_length), zero-padded; long captions are truncated."""
        return _pad(self.rows(texts), self.context_length)


# ============================================================================ compact vocabulary
class CompactVocab:
    """A base tokenizer whose ids are renumbered to the ones seen in training (see module doc)."""

    def __init__(self, base, seen_ids: Iterable[int]):
        self.base = base
        self.name = base.name
        self.context_length = base.context_length
        special = {base.sot_id, base.eot_id}
        self.seen_ids = sorted({int(i) for i in seen_ids} - special)
        bad = [i for i in self.seen_ids if not 0 <= i < base.vocab_size]
        if bad:
            raise TokenizerError(f"compact vocabulary holds ids outside {base.name}'s 0..{base.vocab_size - 1}: {bad[:3]}")
        table = np.full(base.vocab_size, UNK, dtype=np.int64)
        table[self.seen_ids] = np.arange(4, 4 + len(self.seen_ids))
        table[base.sot_id], table[base.eot_id] = SOT, EOT
        self._table = table
        self.vocab_size = 4 + len(self.seen_ids)
        self.sot_id, self.eot_id = SOT, EOT

    def rows(self, texts: Sequence[str]) -> list[list[int]]:
        return [self._table[np.asarray(r)].tolist() for r in self.base.rows(texts)]

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return _pad(self.rows(texts), self.context_length)


def seen_ids(base, captions: Iterable[str], batch: int = 1024) -> list[int]:
    """The base tokenizer's ids that occur in `captions` (truncated as in training), sorted."""
    seen: set[int] = set()
    buf: list[str] = []
    for c in captions:
        buf.append(c)
        if len(buf) == batch:
            seen.update(i for r in base.rows(buf) for i in r)
            buf = []
    seen.update(i for r in base.rows(buf) for i in r)
    return sorted(seen - {base.sot_id, base.eot_id})


# ============================================================================ specs
def tokenizer_spec(name: str, context_length: int, vocab_size: int, vocab: str = "full",
                   ids: Optional[Sequence[int]] = None) -> dict:
    """A JSON-able description that `build_tokenizer` turns back into the same tokenizer.
    `vocab_size`: the word-hash bucket count (ignored by clip_bpe); `ids`: compact vocabulary ids."""
    if name not in TOKENIZERS:
        raise TokenizerError(f"unknown tokenizer {name!r}; choose one of {', '.join(TOKENIZERS)}")
    if vocab not in VOCABS:
        raise TokenizerError(f"unknown vocab {vocab!r}; choose one of {', '.join(VOCABS)}")
    spec = {"name": name, "context_length": int(context_length), "vocab": vocab}
    if name == "word_hash":
        spec["buckets"] = int(vocab_size)
    if vocab == "compact":
        spec["ids"] = [int(i) for i in (ids or [])]
    return spec


def _base(spec: dict, vocab_path: Optional[str] = None):
    name = spec.get("name")
    if name == "clip_bpe":
        return ClipBpeTokenizer(spec["context_length"], vocab_path)
    if name == "word_hash":
        return WordHashTokenizer(spec["buckets"], spec["context_length"])
    raise TokenizerError(f"unknown tokenizer {name!r}; choose one of {', '.join(TOKENIZERS)}")


def build_tokenizer(spec: dict, vocab_path: Optional[str] = None):
    """The tokenizer a spec describes (full vocabulary, or compact over spec["ids"]); `vocab_path`:
    CLIP's merges file to use instead of the installed wheel's."""
    base = _base(spec, vocab_path)
    return CompactVocab(base, spec["ids"]) if spec.get("vocab") == "compact" else base


_BUILT: dict[str, object] = {}


def cached_tokenizer(spec: dict):
    """`build_tokenizer(spec)`, built once per process (data tasks call this for every batch; the
    word-piece cache of the BPE tokenizer then lives across batches)."""
    import json

    key = json.dumps(spec, sort_keys=True)
    tok = _BUILT.get(key)
    if tok is None:
        if len(_BUILT) >= 8:
            _BUILT.clear()
        tok = _BUILT[key] = build_tokenizer(spec)
    return tok


def build_compact_spec(spec: dict, captions: Iterable[str]) -> dict:
    """`spec` (vocab: compact) with ids filled from the training captions."""
    return {**spec, "ids": seen_ids(_base(spec), captions)}


def describe(spec: dict) -> str:
    """One-word-ish label for messages: "clip_bpe", "clip_bpe/compact", "word_hash(4096)"."""
    name = spec.get("name", "?")
    if name == "word_hash":
        name += f"({spec.get('buckets')})"
    return name + ("/compact" if spec.get("vocab") == "compact" else "")


def _pad(rows: list[list[int]], context_length: int) -> np.ndarray:
    out = np.zeros((len(rows), context_length), dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def eot_id(tokenizer: str, vocab: str) -> int:
    """The EOT id a model sees: CLIP's 49407 with the full BPE vocabulary, else 2 (word hash, compact)."""
    return CLIP_EOT if tokenizer == "clip_bpe" and vocab == "full" else EOT


def eot_positions(tokens, eot: Optional[int] = None) -> "np.ndarray":
    """Index of the first EOT in each row (numpy arrays or torch tensors), where open_clip pools
    (its argmax of ids finds the first EOT, CLIP's largest id; word-hash and compact EOT, 2, is not
    the largest id, hence no argmax here).

    `eot`: the EOT id (`eot_id`); None infers it per row: every tokenizer here pads with 0 and ends a
    row with its EOT, so the last non-zero entry holds it."""
    if eot is not None:
        return (tokens == eot).int().argmax(-1) if hasattr(tokens, "int") else (np.asarray(tokens) == eot).argmax(-1)
    if hasattr(tokens, "int"):  # torch
        import torch

        n = tokens.shape[-1]
        idx = torch.arange(n, device=tokens.device)
        last = torch.where(tokens != 0, idx, torch.zeros_like(idx)).amax(-1)
        eot = tokens.gather(-1, last[..., None])
        return (tokens == eot).int().argmax(-1)
    tokens = np.asarray(tokens)
    idx = np.arange(tokens.shape[-1])
    last = np.where(tokens != 0, idx, 0).max(-1)
    eot = np.take_along_axis(tokens, last[..., None], -1)
    return (tokens == eot).argmax(-1)
