"""The compact vocabulary keeps zero-shot class words distinct, as full BPE does."""
from pathlib import Path

import pytest

from orchestrator.config.schema import load_config

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


@pytest.mark.skipif(not FASHION.exists(), reason="Debian's dataset-fashion-mnist is not installed (make test installs it)")
def test_unseen_class_words_keep_their_own_ids(emoji_shards, tmp_path):
    from llip_core.tokenizer import UNK, build_tokenizer
    from orchestrator.data.evalsets import write_fashion_mnist
    from orchestrator.training.tokenization import run_tokenizer_spec

    fm = tmp_path / "fashion_mnist"
    write_fashion_mnist(str(fm), limit=20)
    base = load_config(ROOT / "experiments" / "smoke.yaml").with_overrides(
        {"data.train": str(emoji_shards / "train"), "data.eval": None, "eval.sets": []})
    plain = build_tokenizer(run_tokenizer_spec(base))
    with_eval = build_tokenizer(run_tokenizer_spec(base.with_overrides({"eval.sets": [str(fm)]})))

    # "pullover" (one BPE token) and "trousers" are in no emoji name: unknown ids without the prompts
    rows = plain.rows(["pullover", "trousers"])
    assert rows[0][1:-1] == [UNK] and UNK in rows[1]
    rows = with_eval.rows(["pullover", "trousers"])
    assert rows[0] != rows[1] and UNK not in rows[0] + rows[1]
    # every training word keeps its own id, and only ids were added
    assert with_eval.vocab_size > plain.vocab_size
    assert set(plain.seen_ids) <= set(with_eval.seen_ids)


def test_held_out_caption_words_keep_their_own_ids(emoji_shards):
    """Held-out emoji names (data.eval) are distinguishable as under full BPE."""
    from llip_core.tokenizer import UNK, build_tokenizer
    from orchestrator.data.evalsets import inspect_set, iter_targets
    from orchestrator.training.tokenization import run_tokenizer_spec

    base = load_config(ROOT / "experiments" / "smoke.yaml").with_overrides(
        {"data.train": str(emoji_shards / "train"), "data.eval": None, "eval.sets": []})
    plain = build_tokenizer(run_tokenizer_spec(base))
    full = build_tokenizer(run_tokenizer_spec(base.with_overrides({"data.eval": str(emoji_shards / "eval")})))
    caps = [c for *_, cs in iter_targets(inspect_set(str(emoji_shards / "eval"), "", scan=False)) for c in cs]
    assert len(caps) > 400
    assert sum(UNK in r for r in plain.rows(caps)) > 50  # many held-out names hold unseen words
    assert not any(UNK in r for r in full.rows(caps))
    # as many distinct captions as under full BPE
    assert len({tuple(r) for r in full.rows(caps)}) == len({tuple(r) for r in full.base.rows(caps)})
