"""MetaCLIP curation (Xu et al. 2023) as pure functions over strings and numpy arrays.

Matching follows the reference `metaclip/metaclip1/substr_matching.py` exactly: case-sensitive; the
caption is padded with a space on each side, `, . ; : ? ! `` ` get a space on each side and tab,
newline and carriage return become spaces; entry e matches when " e " is a substring. The literal
loop costs O(entries) substring scans per caption; an Aho-Corasick automaton over the spaced entries
gives the same set in one pass over the caption.

Balancing: an entry matched by count_e pairs keeps each of them with p_e = t / max(count_e, t), one
coin per (pair, entry); a pair is kept if any of its coins lands, i.e. with 1 - prod_e (1 - p_e).
A record with several captions is one pair whose entry set is the union of its captions' matches, so
it is counted once per entry and emitted at most once (the reference `balancing.py` appends a record
once per passing caption).

Coins are hashed from (seed, sample key, entry id) or (seed, sample key, epoch) rather than drawn
from a stream, so which pairs survive does not depend on block boundaries, worker count or order.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

PUNCTS_TO_WRAP = (",", ".", ";", ":", "?", "!", "`")
CHARS_TO_SPACE = ("\t", "\n", "\r")


def spacing(text: str) -> str:
    """The caption as the reference matcher sees it (see the module docstring)."""
    s = f" {text} "
    for p in PUNCTS_TO_WRAP:
        s = s.replace(p, f" {p} ")
    for c in CHARS_TO_SPACE:
        s = s.replace(c, " ")
    return s


def literal_match(entries: Sequence[str], caption: str) -> list[int]:
    """The reference loop over entries: the baseline the automaton is measured and tested against."""
    text = spacing(caption)
    return [i for i, e in enumerate(entries) if f" {e} " in text]


class Matcher:
    """Substring matcher over a metadata list; `.match(caption)` -> sorted entry ids, each once.

    Picklable: it travels as its entry list and rebuilds the automaton where it lands (pickled
    automata of 500k entries are larger than the list and version-bound)."""

    def __init__(self, entries: Sequence[str]):
        import ahocorasick

        self.entries = list(entries)
        auto = ahocorasick.Automaton(ahocorasick.STORE_INTS)
        first: dict[str, int] = {}
        # A metadata list may repeat an entry; the literal loop reports every position, so the
        # automaton keys the first one and `_dups` expands it.
        self._dups: dict[int, list[int]] = {}
        for i, e in enumerate(self.entries):
            key = f" {e} "
            j = first.get(key)
            if j is None:
                first[key] = i
                auto.add_word(key, i)
            else:
                self._dups.setdefault(j, [j]).append(i)
        if first:
            auto.make_automaton()
        self._auto = auto if first else None

    def __len__(self) -> int:
        return len(self.entries)

    def __getstate__(self):
        return {"entries": self.entries}

    def __setstate__(self, state):
        self.__init__(state["entries"])

    def _ids(self, text: str) -> set[int]:
        if self._auto is None:
            return set()
        return {v for _, v in self._auto.iter(text)}

    def _finish(self, ids: set[int]) -> list[int]:
        if self._dups:
            for j in [j for j in ids if j in self._dups]:
                ids.update(self._dups[j])
        return sorted(ids)

    def match(self, caption: str) -> list[int]:
        return self._finish(self._ids(spacing(caption)))

    def match_record(self, captions: Iterable[str]) -> list[int]:
        """One pair's entries: the union over its captions (see the module docstring)."""
        ids: set[int] = set()
        for c in captions:
            ids |= self._ids(spacing(c))
        return self._finish(ids)

    def match_many(self, records: Iterable[Iterable[str]]) -> tuple[np.ndarray, np.ndarray]:
        """Matches of many records in CSR form: (ids int32, offsets int64 of length n + 1)."""
        flat: list[int] = []
        offsets = [0]
        for caps in records:
            flat.extend(self.match_record(caps))
            offsets.append(len(flat))
        return np.asarray(flat, dtype=np.int32), np.asarray(offsets, dtype=np.int64)


def build_matcher(entries: Sequence[str]) -> Matcher:
    return Matcher(entries)


# ------------------------------------------------------------------------------------------------
# balancing
# ------------------------------------------------------------------------------------------------
def entry_counts(ids: np.ndarray, n_entries: int) -> np.ndarray:
    """count_e over a CSR id array whose rows hold each id once: one count per (pair, entry)."""
    return np.bincount(np.asarray(ids, dtype=np.int64), minlength=n_entries).astype(np.int64)


def entry_probabilities(counts: np.ndarray, t: float) -> np.ndarray:
    """p_e = t / max(count_e, t): entries under t keep every pair, the head is cut to about t."""
    if not t > 0:
        raise ValueError(f"t must be positive, got {t}")
    c = np.asarray(counts, dtype=np.float64)
    return t / np.maximum(c, float(t))


def _rows(offsets: np.ndarray) -> np.ndarray:
    offsets = np.asarray(offsets, dtype=np.int64)
    return np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))


def keep_probabilities(ids: np.ndarray, offsets: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Per pair 1 - prod_{e in E} (1 - p_e); 0 for pairs that matched nothing."""
    n = len(offsets) - 1
    ids = np.asarray(ids, dtype=np.int64)
    with np.errstate(divide="ignore"):  # p_e = 1 gives log 0 = -inf, i.e. certain keep
        log_miss = np.log1p(-np.asarray(probs, dtype=np.float64)[ids])
    total = np.bincount(_rows(offsets), weights=log_miss, minlength=n)
    return -np.expm1(total)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
OFFLINE_STREAM, ONLINE_STREAM = 1, 2  # coins of the two modes never coincide


def _splitmix(x: np.ndarray) -> np.ndarray:
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def unit_uniform(seed: int, keys, *salts) -> np.ndarray:
    """Uniforms in [0, 1) fixed by (seed, key, *salts), elementwise over broadcast arrays: a
    counter-based generator (splitmix64 chained over the inputs)."""
    with np.errstate(over="ignore"):
        h = _splitmix(np.asarray([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
        h = _splitmix(h ^ np.asarray(keys, dtype=np.int64).astype(np.uint64))
        for s in salts:
            h = _splitmix(h ^ np.asarray(s, dtype=np.int64).astype(np.uint64))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def sample_offline(keys: np.ndarray, ids: np.ndarray, offsets: np.ndarray, probs: np.ndarray,
                   seed: int) -> np.ndarray:
    """Which pairs offline curation keeps (bool per pair): one coin per (pair, entry) with
    P(heads) = p_e, kept if any lands. Pairs without entries are never kept."""
    keys = np.asarray(keys, dtype=np.int64)
    ids = np.asarray(ids, dtype=np.int64)
    rows = _rows(offsets)
    heads = unit_uniform(seed, keys[rows], ids, OFFLINE_STREAM) < np.asarray(probs, dtype=np.float64)[ids]
    return np.bincount(rows, weights=heads, minlength=len(offsets) - 1) > 0


def sample_epoch(keys: np.ndarray, keep_prob: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """Online curation: pair kept in this epoch with its stored keep probability. One coin for the
    pair stands in for its per-entry coins: P(any entry coin lands) is that probability."""
    return unit_uniform(seed, keys, epoch, ONLINE_STREAM) < np.asarray(keep_prob, dtype=np.float64)


# ------------------------------------------------------------------------------------------------
# summary figures
# ------------------------------------------------------------------------------------------------
def balance_summary(before: np.ndarray, after: np.ndarray, t: float) -> dict:
    """Entry-level figures of a curation: how many entries exceeded t, and the share of all matches
    held by those head entries before and after (tail share = 1 - head share)."""
    before = np.asarray(before, dtype=np.float64)
    after = np.asarray(after, dtype=np.float64)
    head = before > t
    tb, ta = before.sum(), after.sum()
    hb = float(before[head].sum() / tb) if tb else 0.0
    ha = float(after[head].sum() / ta) if ta else 0.0
    return {
        "entries": int(len(before)),
        "entries_matched": int((before > 0).sum()),
        "entries_over_t": int(head.sum()),
        "matches_before": float(tb),
        "matches_after": float(ta),
        "head_share_before": hb,
        "head_share_after": ha,
        "tail_share_before": 1.0 - hb if tb else 0.0,
        "tail_share_after": 1.0 - ha if ta else 0.0,
    }
