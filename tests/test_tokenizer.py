import importlib.util
import random
import string
from pathlib import Path

import numpy as np
import pytest
import torch

from llip_core import tokenizer as T
from llip_core.tokenizer import (
    EOT, PAD, SOT, UNK, ClipBpeTokenizer, CompactVocab, TokenizerError, WordHashTokenizer, build_compact_spec,
    build_tokenizer, eot_positions, tokenizer_spec,
)


@pytest.fixture(scope="module")
def open_clip_tok():
    """open_clip's own tokenizer.py, loaded by file path (importing open_clip needs torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    path = Path(spec.submodule_search_locations[0]) / "tokenizer.py"
    mod_spec = importlib.util.spec_from_file_location("_open_clip_tokenizer_ref", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


def _varied_captions(n: int = 1500, seed: int = 0) -> list[str]:
    """Emoji names and aliases, raw emoji, punctuation, accents, CJK/Arabic/Cyrillic, HTML entities,
    mojibake (ftfy repairs it), odd whitespace, digits, contractions, and long captions."""
    import emoji

    rng = random.Random(seed)
    names, chars = [], []
    for ch, info in emoji.EMOJI_DATA.items():
        chars.append(ch)
        names.append(info["en"].strip(":").replace("_", " "))
        names += [a.strip(":").replace("_", " ") for a in info.get("alias", [])]
    names.sort()
    rng.shuffle(names)
    extras = [
        "café naïve coöperate", "Ünïcödé ÀÉÎÕÜ ß æ ø å", "日本語のキャプション", "中文 标题 测试", "مرحبا بالعالم",
        "Привет, мир!", "Ελληνικά κείμενα", "עברית", "हिन्दी पाठ", "한국어 문장", "ﬁne ligature", "Ｆｕｌｌｗｉｄｔｈ",
        "Tom &amp; Jerry &lt;3 &amp;amp;", "&quot;quoted&quot; &#39;single&#39;", "Ã©tÃ© mojibake", "â€œsmart quotesâ€\x9d",
        "tabs\tand\nnewlines\r\n here", "non\u00a0breaking\u3000ideographic space", "zero\u200bwidth", "e\u0301 combining",
        "I'm, you're, they've, we'll, he'd, it's, don't", "IT'S SHOUTING'S", "1234567890 3.14159 1,000,000",
        "http://example.com/a?b=c&d=e#f", "user@example.com", "C++ / C# / F#", "$100 €50 £20 ¥1000", "50% off!!!",
        "<start_of_text> inside", "a <end_of_text> b", "((nested [brackets] {braces}))", "...---...", "🙂🙃😉", "👨‍👩‍👧‍👦 family",
        "🇬🇧 flag", "☃️ snowman", "x²+y³=z⁴", "½ ¾ ⅓", "—–-‐ dashes", "«guillemets» „quotes“", "", "   ", "!!!",
    ]
    punct = list(string.punctuation) + ["…", "—", "“", "”", "‘", "’", "•", "·", "¿", "¡"]
    out = list(extras)
    while len(out) < n:
        kind = rng.random()
        if kind < 0.45:
            out.append(names[len(out) % len(names)])
        elif kind < 0.6:  # name with punctuation and case noise
            w = rng.choice(names)
            w = "".join(c.upper() if rng.random() < 0.3 else c for c in w)
            out.append(f"{rng.choice(punct)}{w}{rng.choice(punct)}{rng.choice(punct)} {rng.choice(chars)}")
        elif kind < 0.7:  # raw emoji runs
            out.append(" ".join(rng.choice(chars) for _ in range(rng.randint(1, 6))))
        elif kind < 0.85:  # long captions, truncated at 77 and at smaller contexts
            out.append(" ".join(rng.choice(names) for _ in range(rng.randint(10, 40))))
        else:  # mixtures of the hand-written extras
            out.append(" ".join(rng.choice(extras) for _ in range(rng.randint(2, 5))))
    return out


def test_bpe_matches_open_clip_token_for_token(open_clip_tok):
    caps = _varied_captions()
    assert len(caps) >= 1000
    ours = ClipBpeTokenizer(77)(caps)
    ref = open_clip_tok.tokenize(caps, context_length=77).numpy()
    bad = [caps[i] for i in np.flatnonzero((ours != ref).any(1))]
    assert not bad, f"{len(bad)} captions differ, e.g. {bad[:3]}"
    # the set is varied: many captions were truncated, and non-ASCII ids (above the byte range) occur
    assert (ref[:, -1] == T.CLIP_EOT).sum() > 100
    assert len(np.unique(ref)) > 1500


@pytest.mark.parametrize("ctx", [16, 5, 2])
def test_truncation_as_open_clip_at_short_contexts(open_clip_tok, ctx):
    caps = _varied_captions(300, seed=1)
    ours = ClipBpeTokenizer(ctx)(caps)
    ref = open_clip_tok.tokenize(caps, context_length=ctx).numpy()
    np.testing.assert_array_equal(ours, ref)
    assert (ours[:, 0] == T.CLIP_SOT).all()
    long = ours[(ours != 0).sum(1) == ctx]
    assert len(long) and (long[:, -1] == T.CLIP_EOT).all()  # EOT kept last, never an error


def test_bpe_layout_and_known_ids(open_clip_tok):
    tok = ClipBpeTokenizer(8)
    out = tok(["a photo of a dog!", ""])
    assert out.dtype == np.int64 and out.shape == (2, 8)
    assert out[0, 0] == 49406 and list(out[1, :3]) == [49406, 49407, 0]
    assert tok.vocab_size == 49408 == len(open_clip_tok.SimpleTokenizer().encoder)
    # "!" is id 0, the same as padding: pooling must find EOT by position, not by "last non-pad id 0"
    assert tok.encode("!~") == [0, 349] and eot_positions(tok(["dog !~"]))[0] == 4


def test_compact_vocab_keeps_seen_words_distinct_and_maps_unseen_to_unk():
    base = ClipBpeTokenizer(16)
    train = ["pointing left", "pointing right", "red apple", "green apple", "algeria", "snake", "!~ ?"]
    spec = build_compact_spec(tokenizer_spec("clip_bpe", 16, 49408, "compact"), train)
    tok = build_tokenizer(spec)
    assert isinstance(tok, CompactVocab) and tok.vocab_size == 4 + len(spec["ids"]) < 30
    full, small = base(train), tok(train)
    # a bijection between full and compact ids on everything seen in training (pad/SOT/EOT included)
    real = np.arange(16)[None] <= eot_positions(full)[:, None]  # not padding
    pairs = {(int(a), int(b)) for a, b in zip(full[real], small[real])}
    assert len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs})
    assert (small[:, 0] == SOT).all() and (small.max() < tok.vocab_size)
    # "!" before another symbol is BPE id 0, the padding id; in the compact table it is not padding
    assert 0 in spec["ids"] and tok(["!~"])[0, 1] not in (PAD, UNK)
    unseen = tok(["banana pointing"])[0]
    assert unseen[1] == UNK and unseen[2] != UNK and unseen[3] == EOT
    np.testing.assert_array_equal(eot_positions(small), eot_positions(full))


def test_word_hash_layout_padding_truncation_and_eot():
    tok = WordHashTokenizer(vocab_size=1000, context_length=6)
    out = tok(["Dog face", "a b c d e f g", ""])
    assert out.dtype == np.int64 and out.shape == (3, 6)
    assert list(out[0, :4]) == [SOT, tok.word_id("dog"), tok.word_id("face"), EOT] and list(out[0, 4:]) == [PAD, PAD]
    assert out[1, 0] == SOT and out[1, -1] == EOT  # truncated, EOT kept
    assert list(out[2, :2]) == [SOT, EOT]
    assert list(eot_positions(out)) == [3, 5, 1]
    assert eot_positions(torch.from_numpy(out)).tolist() == [3, 5, 1]


def test_word_hash_ids_are_stable_case_insensitive_and_in_range():
    tok = WordHashTokenizer(vocab_size=64, context_length=32)
    ids = tok(["Red APPLE: grinning face with big eyes"])[0]
    assert (ids < 64).all() and (ids >= 0).all()
    assert tok.word_id("apple") == WordHashTokenizer(64, 8).word_id("apple")  # crc32, not hash()
    assert tok(["red apple"])[0, 1] == tok(["RED apple"])[0, 1]
    assert build_tokenizer(tokenizer_spec("word_hash", 32, 64))(["red apple"]).tolist() == tok(["red apple"]).tolist()


def test_eot_positions_first_eot_like_open_clip_argmax():
    rows = np.array([[49406, 5, 49407, 0], [49406, 49407, 7, 49407], [1, 9, 9, 2]])
    assert eot_positions(rows).tolist() == [2, 1, 3]
    assert eot_positions(torch.from_numpy(rows)).tolist() == [2, 1, 3]


def test_bad_names_and_missing_vocabulary_are_one_line(monkeypatch):
    with pytest.raises(TokenizerError, match="unknown tokenizer 'bpe'; choose one of clip_bpe, word_hash"):
        tokenizer_spec("bpe", 77, 49408)
    with pytest.raises(TokenizerError, match="unknown vocab 'tiny'"):
        tokenizer_spec("clip_bpe", 77, 49408, "tiny")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "open_clip" else real(name, *a))
    with pytest.raises(TokenizerError) as e:
        T.clip_vocab_path()
    assert "pip install --no-deps open_clip_torch==3.3.0" in str(e.value) and "\n" not in str(e.value)


def test_bpe_matches_open_clip_on_arbitrary_unicode(open_clip_tok):
    from hypothesis import given, settings
    from hypothesis import strategies as st

    ours = ClipBpeTokenizer(24)

    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(st.text(max_size=80))
    def check(text):
        np.testing.assert_array_equal(ours([text]), open_clip_tok.tokenize([text], context_length=24).numpy())

    check()


def _cfg(tmp_path, train, **model):
    from orchestrator.config.schema import parse_config

    return parse_config({"name": "t", "model": {"size": "tiny", **model}, "storage_path": str(tmp_path / "runs"),
                         "data": {"train": str(train), "eval": None}})


def test_run_compact_vocab_from_real_shards(emoji_shards, tmp_path):
    from orchestrator.data.reading import resolve_shards
    from orchestrator.training.tokenization import resolve, shard_captions

    cfg, spec = resolve(_cfg(tmp_path, emoji_shards / "train"))
    assert spec["name"] == "clip_bpe" and spec["vocab"] == "compact"
    tok = build_tokenizer(spec)
    assert cfg.resolved_model().vocab_size == tok.vocab_size == 4 + len(spec["ids"]) < 4096
    caps = list(shard_captions(*resolve_shards(str(emoji_shards / "train"), cfg.data.s3, "data.train")))
    assert len(caps) > 3000
    full, small = ClipBpeTokenizer(16)(caps), tok(caps)
    assert not (small == UNK).any()  # every training id has its own row
    # same partition of captions into distinct token sequences as full BPE: nothing merged
    assert len({r.tobytes() for r in full}) == len({r.tobytes() for r in small})
    # while the word-hash tokenizer at the old tiny size merges some distinct captions
    wh = WordHashTokenizer(4096, 16)(caps)
    assert len({r.tobytes() for r in wh}) < len({r.tobytes() for r in small})


def test_relaunch_uses_the_checkpoint_tokenizer_and_a_mismatch_is_one_line(emoji_shards, tmp_path):
    import json

    from orchestrator.errors import UserError
    from orchestrator.storage.checkpoints import TOKENIZER_FILE
    from orchestrator.training.tokenization import run_tokenizer_spec

    ckpt = tmp_path / "runs" / "myrun" / "checkpoint_000003"
    ckpt.mkdir(parents=True)
    (ckpt / "state.pt").write_bytes(b"x")
    stored = tokenizer_spec("clip_bpe", 16, 49408, "compact", ids=[5, 320, 1929])
    (ckpt / TOKENIZER_FILE).write_text(json.dumps(stored))
    # the same kind of tokenizer: the checkpoint's compact table wins over a fresh one from the shards
    assert run_tokenizer_spec(_cfg(tmp_path, emoji_shards / "train"), "myrun") == stored
    with pytest.raises(UserError) as e:
        run_tokenizer_spec(_cfg(tmp_path, emoji_shards / "train", tokenizer="word_hash", vocab="full"), "myrun")
    msg = str(e.value)
    assert "\n" not in msg and "clip_bpe/compact" in msg and "word_hash(4096)" in msg
    # an unknown name fails at config load, naming it and the choices
    from orchestrator.config.schema import ConfigError

    with pytest.raises(ConfigError, match="unknown tokenizer 'bpe'; choose one of clip_bpe, word_hash"):
        _cfg(tmp_path, emoji_shards / "train", tokenizer="bpe")
