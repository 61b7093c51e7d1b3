"""MetaCLIP curation math (llip_core.curation) against references written here from the rules in
docs/architecture.md section 4, plus metadata files and the config section. No Ray."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llip_core import curation as cur
from orchestrator.cli import main as llip_main
from orchestrator.config.schema import ConfigError, parse_config
from orchestrator.errors import UserError
from orchestrator.curation.metadata import build_metadata, load_metadata


# -- independent references -----------------------------------------------------------------
def ref_spaced(text: str) -> str:
    out = " "
    for ch in text:
        if ch in ",.;:?!`":
            out += f" {ch} "
        elif ch in "\t\n\r":
            out += " "
        else:
            out += ch
    return out + " "


def ref_match(entries, caption):
    t = ref_spaced(caption)
    return [i for i, e in enumerate(entries) if (" " + e + " ") in t]


def ref_keep_prob(ids, counts, t):
    miss = 1.0
    for e in ids:
        miss *= 1.0 - t / max(counts[e], t)
    return 1.0 - miss if len(ids) else 0.0


# -- matching ---------------------------------------------------------------------------------
ALPHABET = st.sampled_from(list("ab c") + list(",.;:?!`") + ["\t", "\n", "\r", "é", "日", "A", " "])
words = st.text(ALPHABET, min_size=0, max_size=6)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=st.lists(words, min_size=1, max_size=25), captions=st.lists(st.text(ALPHABET, max_size=30), max_size=8))
def test_matcher_equals_literal_loop(entries, captions):
    m = cur.build_matcher(entries)
    for c in captions:
        assert m.match(c) == ref_match(entries, c)


@pytest.mark.parametrize("caption,expect", [
    ("a dog face", ["dog", "dog face", "face", "a"]),
    ("Dog face", ["face"]),                      # case-sensitive
    ("dog,face", ["dog", "face"]),               # punctuation separates
    ("hot-dog", []),                             # '-' is not spaced: no word boundary
    ("dog dog dog", ["dog"]),                    # each id once
    ("a.b", ["a", "."]),                         # 'a.b' can never match; '.' can
    ("dog\tface", ["dog", "dog face", "face"]),  # tab is a space
    ("", [""]),                                  # the padded empty caption holds "  "
])
def test_matcher_examples(caption, expect):
    entries = ["dog", "dog face", "face", "a", "a.b", ".", "", "hot"]
    got = [entries[i] for i in cur.build_matcher(entries).match(caption)]
    assert sorted(got) == sorted(expect)
    assert cur.build_matcher(entries).match(caption) == sorted(cur.build_matcher(entries).match(caption))


def test_duplicate_entries_report_every_position():
    entries = ["cat", "dog", "cat"]
    assert cur.build_matcher(entries).match("a cat") == [0, 2] == ref_match(entries, "a cat")


def test_matcher_pickles_and_records_union():
    import pickle

    m = pickle.loads(pickle.dumps(cur.build_matcher(["dog", "face", "cat"])))
    assert m.match_record(["dog face", "dog", "a cat"]) == [0, 1, 2]
    ids, off = m.match_many([["dog"], ["zzz"], ["dog face", "face"]])
    assert off.tolist() == [0, 1, 1, 3] and ids.tolist() == [0, 0, 1]


# -- balancing --------------------------------------------------------------------------------
def _pool(rng, n_pairs, n_entries, zipf_a=1.3, max_per_pair=3):
    """A Zipf pool: each pair matches 1..max_per_pair distinct entries drawn with Zipf weights."""
    w = 1.0 / np.arange(1, n_entries + 1) ** zipf_a
    w /= w.sum()
    rows = []
    for _ in range(n_pairs):
        k = rng.integers(1, max_per_pair + 1)
        rows.append(sorted(set(rng.choice(n_entries, size=k, p=w).tolist())))
    ids = np.asarray([e for r in rows for e in r], dtype=np.int32)
    off = np.cumsum([0] + [len(r) for r in rows])
    return rows, ids, off


def test_counts_and_keep_probabilities_match_the_equations():
    rng = np.random.default_rng(0)
    rows, ids, off = _pool(rng, 500, 40)
    counts = cur.entry_counts(ids, 40)
    ref_counts = np.zeros(40, int)
    for r in rows:
        for e in r:
            ref_counts[e] += 1
    assert counts.tolist() == ref_counts.tolist()
    t = 7
    probs = cur.entry_probabilities(counts, t)
    got = cur.keep_probabilities(ids, off, probs)
    want = [ref_keep_prob(r, ref_counts, t) for r in rows]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    # pairs matching nothing get 0
    assert cur.keep_probabilities(np.zeros(0, np.int32), np.array([0, 0]), probs).tolist() == [0.0]


def test_entry_probabilities_rejects_nonpositive_t():
    with pytest.raises(ValueError, match="positive"):
        cur.entry_probabilities(np.array([3, 4]), 0)


def test_offline_sampling_is_seeded_and_independent_of_blocks_and_order():
    rng = np.random.default_rng(1)
    _, ids, off = _pool(rng, 2000, 60)
    keys = rng.integers(0, 2**62, size=2000)
    probs = cur.entry_probabilities(cur.entry_counts(ids, 60), 20)
    whole = cur.sample_offline(keys, ids, off, probs, seed=3)
    assert np.array_equal(whole, cur.sample_offline(keys, ids, off, probs, seed=3))
    assert not np.array_equal(whole, cur.sample_offline(keys, ids, off, probs, seed=4))
    # Two blocks, as two workers would see them
    h = 700
    a = cur.sample_offline(keys[:h], ids[: off[h]], off[: h + 1], probs, seed=3)
    b = cur.sample_offline(keys[h:], ids[off[h]:], off[h:] - off[h], probs, seed=3)
    assert np.array_equal(np.concatenate([a, b]), whole)
    # reversed order
    rows = [ids[off[i]:off[i + 1]] for i in range(2000)][::-1]
    roff = np.cumsum([0] + [len(r) for r in rows])
    rev = cur.sample_offline(keys[::-1], np.concatenate(rows), roff, probs, seed=3)
    assert np.array_equal(rev[::-1], whole)


def _kept_counts(rows, ids, off, n_entries, t, seed=0):
    keys = np.arange(len(rows), dtype=np.int64) * 7919 + 11
    counts = cur.entry_counts(ids, n_entries)
    kept = cur.sample_offline(keys, ids, off, cur.entry_probabilities(counts, t), seed=seed)
    return counts, kept, cur.entry_counts(ids[np.repeat(kept, np.diff(off))], n_entries)


def test_kept_counts_per_entry_near_min_count_t_on_zipf_pool():
    """One entry per pair: kept_e ~ Binomial(count_e, min(1, t/count_e)), i.e. min(count_e, t) on average."""
    n_entries, t = 300, 60
    rows, ids, off = _pool(np.random.default_rng(2), 30000, n_entries, zipf_a=1.2, max_per_pair=1)
    counts, kept, kc = _kept_counts(rows, ids, off, n_entries, t)
    tail, head = (counts > 0) & (counts <= t), counts > t
    assert tail.sum() > 50 and (counts > 10 * t).sum() >= 5
    assert np.array_equal(kc[tail], counts[tail])  # p = 1 under t: every pair kept
    sd = np.sqrt(t * (1 - t / counts[head]))
    assert (np.abs(kc[head] - t) <= 5 * sd + 1).all(), (kc[head], counts[head])
    assert abs(kc[head].mean() / t - 1) < 0.05
    assert kept.sum() == pytest.approx(np.minimum(counts, t).sum(), rel=0.03)


def test_kept_counts_with_several_entries_per_pair_follow_the_keep_probability():
    """Several entries per pair: a head entry also keeps the pairs that another entry's coin kept,
    so its expected kept count is sum over its pairs of 1 - prod(1 - p_e), checked within 5 sigma."""
    n_entries, t = 200, 60
    rows, ids, off = _pool(np.random.default_rng(3), 20000, n_entries, zipf_a=1.2, max_per_pair=3)
    counts, kept, kc = _kept_counts(rows, ids, off, n_entries, t)
    kp = np.array([ref_keep_prob(r, counts, t) for r in rows])
    for e in np.flatnonzero(counts > 5 * t):
        member = np.array([e in r for r in rows])
        mean, var = kp[member].sum(), (kp[member] * (1 - kp[member])).sum()
        assert abs(kc[e] - mean) <= 5 * np.sqrt(var) + 1, (e, kc[e], mean)
        assert kc[e] < counts[e] / 2
    tail = (counts > 0) & (counts <= t)
    assert np.array_equal(kc[tail], counts[tail])
    assert abs(kept.sum() - kp.sum()) < 5 * np.sqrt((kp * (1 - kp)).sum())


def test_online_epoch_sampling_rate_and_freshness():
    keys = np.arange(20000, dtype=np.int64)
    p = np.full(20000, 0.3)
    e0, e1 = cur.sample_epoch(keys, p, 5, 0), cur.sample_epoch(keys, p, 5, 1)
    assert abs(e0.mean() - 0.3) < 0.02 and abs(e1.mean() - 0.3) < 0.02
    assert np.array_equal(e0, cur.sample_epoch(keys, p, 5, 0))
    assert (e0 != e1).mean() > 0.3  # independent across epochs: 2 * 0.3 * 0.7 = 0.42
    assert not cur.sample_epoch(keys, np.zeros(20000), 5, 0).any()
    assert cur.sample_epoch(keys, np.ones(20000), 5, 0).all()


def test_decoder_online_keep_reads_stored_probability():
    from orchestrator.data.decode import _kept_online

    js1 = json.dumps({"captions": ["x"], "keep_prob": 1.0}).encode()
    js0 = json.dumps({"captions": ["x"], "keep_prob": 0.0}).encode()
    assert _kept_online(js1, 123, 0, 4) and not _kept_online(js0, 123, 0, 4)
    assert _kept_online(None, 123, 0, 4)  # uncurated shards pass through
    half = json.dumps({"captions": ["x"], "keep_prob": 0.5}).encode()
    rate = np.mean([_kept_online(half, 99, 0, ep) for ep in range(400)])
    assert 0.4 < rate < 0.6


def test_balance_summary_by_hand():
    before = np.array([100, 10, 5, 0])
    after = np.array([20, 10, 5, 0])
    s = cur.balance_summary(before, after, t=20)
    assert s["entries_over_t"] == 1 and s["entries_matched"] == 3
    assert s["head_share_before"] == pytest.approx(100 / 115)
    assert s["head_share_after"] == pytest.approx(20 / 35)
    assert s["tail_share_after"] == pytest.approx(15 / 35)


# -- metadata files ---------------------------------------------------------------------------
@pytest.mark.parametrize("content,msg", [
    ("not json", "not valid JSON"),
    ('{"a": 1}', "not a list"),
    ("[]", "empty list"),
    ('["dog", 3]', "item 1 is 3"),
])
def test_bad_metadata_one_line(tmp_path, content, msg):
    f = tmp_path / "meta.json"
    f.write_text(content)
    with pytest.raises(UserError) as ei:
        load_metadata(f)
    text = str(ei.value)
    assert msg in text and str(f) in text and "JSON list of strings" in text and "\n" not in text


def test_missing_metadata(tmp_path):
    with pytest.raises(UserError, match="not found.*llip metadata build"):
        load_metadata(tmp_path / "nope.json")


def test_metadata_build_from_wordnet_files_and_word_lists(tmp_path):
    wn = tmp_path / "wn"
    wn.mkdir()
    (wn / "index.noun").write_text("  1 This software is licensed\n"
                                   "dog n 1 0 1 0 02084071\nhot_dog n 1 0 1 0 1\na.d. n 1 0 1 0 1\n")
    (wn / "index.verb").write_text("dog v 1 0 1 0 01\nrun v 1 0 1 0 1\n")
    extra = tmp_path / "extra.txt"
    extra.write_text("skin tone\n\ndog\n!\n")
    out = tmp_path / "m.json"
    rc = llip_main(["metadata", "build", "--out", str(out), "--wordnet", str(wn), "--pos", "noun,verb",
                    "--words", str(extra), "--no-numbers"])
    assert rc == 0
    entries, sha = load_metadata(out)
    assert entries == ["dog", "hot dog", "run", "skin tone"]  # deduplicated, 'a.d.' and '!' unmatchable
    assert len(sha) == 64


def test_metadata_build_real_wordnet(tmp_path):
    s = build_metadata(str(tmp_path / "w.json"))
    entries, _ = load_metadata(tmp_path / "w.json")
    assert s["entries"] == len(entries) > 100000 and "dog" in entries and entries[:3] == ["0", "1", "2"]
    assert len(set(entries)) == len(entries)


# -- config -----------------------------------------------------------------------------------
def _cfg(**cur_):
    return parse_config({"name": "c", "curation": {"metadata": "m.json", "out": "o", **cur_}})


@pytest.mark.parametrize("t", [0, -5, 2.5, "many"])
def test_bad_t_names_the_key(t):
    with pytest.raises(ConfigError) as ei:
        _cfg(t=t)
    assert "curation.t" in str(ei.value) and "positive" in str(ei.value)


def test_curation_changes_where_training_reads():
    c = _cfg(t=10)
    assert c.train_location() == "o/train" and c.data.train == "data/emoji/train"
    assert c.flat()["curation.t"] == 10 and c.flat()["curation.mode"] == "offline"
    with pytest.raises(ConfigError, match="curation.mode"):
        _cfg(t=10, mode="sometimes")


def test_curate_without_curation_section_says_what_to_add(tmp_path, capsys):
    f = tmp_path / "e.yaml"
    f.write_text("name: plain\n")
    assert llip_main(["curate", str(f)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no curation: section" in err[0] and "curated_demo.yaml" in err[0]
