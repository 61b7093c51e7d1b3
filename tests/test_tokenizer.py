import numpy as np
import torch

from llip_core.tokenizer import EOT, PAD, SOT, WordHashTokenizer, eot_positions


def test_layout_padding_truncation_and_eot():
    tok = WordHashTokenizer(vocab_size=1000, context_length=6)
    out = tok(["Dog face", "a b c d e f g", ""])
    assert out.dtype == np.int64 and out.shape == (3, 6)
    assert list(out[0, :4]) == [SOT, tok.word_id("dog"), tok.word_id("face"), EOT] and list(out[0, 4:]) == [PAD, PAD]
    assert out[1, 0] == SOT and out[1, -1] == EOT  # truncated, EOT kept
    assert list(out[2, :2]) == [SOT, EOT]
    assert list(eot_positions(out)) == [3, 5, 1]
    assert eot_positions(torch.from_numpy(out)).tolist() == [3, 5, 1]


def test_ids_are_stable_case_insensitive_and_in_range():
    tok = WordHashTokenizer(vocab_size=64, context_length=32)
    ids = tok(["Red APPLE: grinning face with big eyes"])[0]
    assert (ids < 64).all() and (ids >= 0).all()
    # the same word always maps to the same id (stable across processes: crc32, not hash())
    assert tok.word_id("apple") == WordHashTokenizer(64, 8).word_id("apple")
    assert tok(["red apple"])[0, 1] == tok(["RED apple"])[0, 1]
