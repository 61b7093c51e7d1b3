"""`llip shards` and reading shards back without a cluster: real Twemoji data, held-out concepts,
WebDataset layout readable by the `webdataset` library and by Ray's datasource, folder and table
sources, per-epoch randomness of the decode stage, and local preflight errors."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from orchestrator.cli import main as llip_main
from orchestrator.errors import UserError
from orchestrator.data.sources import emoji_records, emoji_splits
from orchestrator.data.shards import write_emoji_shards


@pytest.fixture(scope="module")
def small_emoji(tmp_path_factory):
    out = tmp_path_factory.mktemp("emoji-small")
    m = write_emoji_shards(str(out), samples_per_shard=20, seed=0, limit=100)
    return out, m


def tar_members(path: Path) -> list[str]:
    with tarfile.open(path) as tf:
        return [m.name for m in tf.getmembers()]


def png(color=(200, 10, 10), size=(16, 12), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# emoji: the real demo data
# --------------------------------------------------------------------------------------------
def test_emoji_records_are_twemoji_pngs_named_by_unicode():
    recs = emoji_records()
    assert len(recs) > 3500
    by_name = {r["captions"][0]: r for r in recs}
    assert "dog face" in by_name and "red apple" in by_name
    assert Path(by_name["dog face"]["path"]).name == "1f436.png"
    # skin-tone variants share their base emoji's concept
    thumbs = [r for r in recs if r["captions"][0].startswith("thumbs up")]
    assert len(thumbs) == 6 and len({r["concept"] for r in thumbs}) == 1
    assert any(len(r["captions"]) > 1 for r in recs)  # aliases give real multi-caption samples


def test_emoji_holdout_is_fixed_seeded_and_by_concept():
    a, meta = emoji_splits(seed=0)
    b, _ = emoji_splits(seed=0)
    c, _ = emoji_splits(seed=1)
    names = lambda split: {s.captions[0] for s in split}  # noqa: E731
    assert names(a["eval"]) == names(b["eval"]) and names(a["eval"]) != names(c["eval"])
    assert meta["heldout_concepts"] == round(0.1 * meta["concepts"])
    concept = {r["code"]: r["concept"] for r in emoji_records()}
    train_c = {concept[s.key_hint] for s in a["train"]}
    eval_c = {concept[s.key_hint] for s in a["eval"]}
    assert not train_c & eval_c
    assert 0.07 < len(a["eval"]) / (len(a["train"]) + len(a["eval"])) < 0.15


def test_emoji_shards_layout_manifest_and_determinism(small_emoji, tmp_path):
    out, m = small_emoji
    assert m["splits"]["train"]["samples"] == 90 and m["splits"]["eval"]["samples"] == 10
    assert [s["samples"] for s in m["splits"]["train"]["shards"]] == [20, 20, 20, 20, 10]
    assert json.loads((out / "manifest.json").read_text()) == m
    assert sorted(p.name for p in (out / "train").iterdir()) == [f"train-{i:05d}.tar" for i in range(5)]
    # samples contiguous: image, txt, then json when there are several captions
    names = tar_members(out / "train" / "train-00000.tar")
    keys = [n.split(".", 1)[0] for n in names]
    assert all(keys.index(k) + keys.count(k) - 1 == max(i for i, x in enumerate(keys) if x == k) for k in set(keys))
    assert names[0].endswith(".png") and names[1].endswith(".txt")
    # byte-identical on rewrite: same fingerprint
    m2 = write_emoji_shards(str(tmp_path / "again"), samples_per_shard=20, seed=0, limit=100)
    assert m2["fingerprint"] == m["fingerprint"]


def test_rewrite_with_fewer_shards_removes_stale_ones(tmp_path):
    write_emoji_shards(str(tmp_path), samples_per_shard=5, seed=0, limit=40)
    assert len(list((tmp_path / "train").glob("*.tar"))) == 8
    (tmp_path / "train" / "mine.tar").write_bytes(b"")  # not ours: left alone
    write_emoji_shards(str(tmp_path), samples_per_shard=20, seed=0, limit=40)
    assert sorted(p.name for p in (tmp_path / "train").glob("*.tar")) == ["mine.tar", "train-00000.tar", "train-00001.tar"]


def test_webdataset_library_reads_the_shards(small_emoji):
    import webdataset as wds

    out, m = small_emoji
    urls = sorted(str(p) for p in (out / "train").glob("*.tar"))
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert len(samples) == 90
    assert all(isinstance(s["txt"], str) and s["txt"] for s in samples)
    assert all(s["png"].size == (72, 72) for s in samples)
    multi = [s for s in samples if "json" in s]
    assert multi and all(s["json"]["captions"][0] == s["txt"] and len(s["json"]["captions"]) > 1 for s in multi)


def test_ray_datasource_reads_the_shards_without_a_cluster(small_emoji):
    from orchestrator.data.tars import read_tar_stream  # what the pipeline's datasource reads each tar with

    out, _ = small_emoji
    path = str(out / "train" / "train-00000.tar")
    with open(path, "rb") as f:
        tables = list(read_tar_stream(f, path))
    rows = [r for t in tables for r in t.to_pylist()]
    assert len(rows) == 20 and all(r["image"].startswith(b"\x89PNG") and r["txt"] and r["error"] is None for r in rows)


# --------------------------------------------------------------------------------------------
# folder and table sources through the real CLI
# --------------------------------------------------------------------------------------------
def test_folder_source_with_sidecar_captions(tmp_path, capsys):
    src = tmp_path / "imgs"
    (src / "sub").mkdir(parents=True)
    for i in range(6):
        (src / f"im{i}.png").write_bytes(png((i * 40, 0, 0)))
        (src / f"im{i}.txt").write_text(f"a red square {i}\n")
    (src / "sub" / "photo.jpg").write_bytes(png(fmt="JPEG"))
    (src / "sub" / "photo.txt").write_text("first caption\n\nsecond caption\n")
    (src / "sub" / "anim.gif").write_bytes(png(fmt="GIF"))
    (src / "sub" / "anim.txt").write_text("a gif\n")
    (src / "nocap.png").write_bytes(png())  # no sidecar: skipped and counted
    out = tmp_path / "out"
    assert llip_main(["shards", str(src), "--out", str(out), "--samples-per-shard", "4", "-q"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["splits"]["train"]["samples"] == 8 and m["splits"]["eval"]["samples"] == 0
    assert m["skipped"] == {"no_caption": 1}
    assert "skipped 1" in capsys.readouterr().out
    members = [n for p in sorted((out / "train").glob("*.tar")) for n in tar_members(p)]
    assert sum(n.endswith(".jpg") for n in members) == 1 and sum(n.endswith(".png") for n in members) == 7
    assert sum(n.endswith(".json") for n in members) == 1


def test_table_sources_csv_and_parquet(tmp_path):
    import pandas as pd

    (tmp_path / "img").mkdir()
    for i in range(4):
        (tmp_path / "img" / f"{i}.png").write_bytes(png((0, i * 50, 0)))
    csv = tmp_path / "pairs.csv"
    pd.DataFrame({"image_path": ["img/0.png", "img/1.png", "img/1.png", "img/2.png", "img/3.png", "img/9.png"],
                  "caption": ["zero", "one", "uno", "two", None, "missing file"]}).to_csv(csv, index=False)
    assert llip_main(["shards", str(csv), "--out", str(tmp_path / "a"), "-q"]) == 0
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert m["splits"]["train"]["samples"] == 3 and m["skipped"] == {"no_caption": 1, "missing_image": 1}
    pq = tmp_path / "pairs.parquet"
    pd.DataFrame({"file": ["img/0.png", "img/1.png"], "texts": [["a", "b"], ["c"]]}).to_parquet(pq)
    assert llip_main(["shards", str(pq), "--out", str(tmp_path / "b"), "--caption-col", "texts", "-q"]) == 0
    names = tar_members(tmp_path / "b" / "train" / "train-00000.tar")
    assert len([n for n in names if n.endswith(".json")]) == 1


def test_holdout_for_folder_is_stable_per_file(tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    for i in range(40):
        (src / f"{i}.png").write_bytes(png((i, i, i)))
        (src / f"{i}.txt").write_text(f"grey {i}")
    assert llip_main(["shards", str(src), "--out", str(tmp_path / "o"), "--holdout", "0.25", "-q"]) == 0
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert 4 <= m["splits"]["eval"]["samples"] <= 16
    assert m["splits"]["train"]["samples"] + m["splits"]["eval"]["samples"] == 40


@pytest.mark.parametrize("args, needle", [
    (["shards", "/no/such/place", "--out", "X"], "/no/such/place: no such file or folder"),
    (["shards", "emoji", "--out", "X", "--holdout", "1.5"], "--holdout 1.5"),
])
def test_cli_errors_are_one_line(args, needle, tmp_path, capsys):
    args = [a if a != "X" else str(tmp_path / "o") for a in args]
    assert llip_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_table_with_unknown_column_is_one_line(tmp_path, capsys):
    csv = tmp_path / "t.csv"
    csv.write_text("image,caption\na.png,hi\n")
    assert llip_main(["shards", str(csv), "--out", str(tmp_path / "o"), "--image-col", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no column 'nope'" in err[0] and "--image-col" in err[0]


# --------------------------------------------------------------------------------------------
# the decode stage and the read order, without a cluster
# --------------------------------------------------------------------------------------------
def _raw_batch(samples):
    cols = {k: [] for k in ("key", "url", "image", "txt", "json", "error")}
    for key, image, caps in samples:
        cols["key"].append(key)
        cols["url"].append("/x/train-00000.tar")
        cols["image"].append(image)
        cols["txt"].append(caps[0].encode() if caps else None)
        cols["json"].append(json.dumps({"captions": caps}).encode() if len(caps) > 1 else None)
        cols["error"].append(None)
    return {k: np.array(v, dtype=object) for k, v in cols.items()}


def test_decoder_epoch_seeded_captions_and_augmentation(monkeypatch):
    import orchestrator.data.decode as data
    from llip_core.tokenizer import WordHashTokenizer

    rng = np.random.default_rng(0)
    img = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(img, format="PNG")
    caps = ["alpha", "beta", "gamma", "delta"]
    batch = _raw_batch([(f"k{i}", img.getvalue(), caps) for i in range(32)])
    dec = data.Decoder(image_size=16, vocab_size=512, context_length=8, augment=True, seed=0, stats=None)
    tok = WordHashTokenizer(512, 8)
    outs = {}
    for epoch in (0, 1, 0):
        monkeypatch.setattr(data, "current_epoch", lambda e=epoch: e)
        outs.setdefault(epoch, []).append(dec(batch))
    a, b, a2 = outs[0][0], outs[1][0], outs[0][1]
    np.testing.assert_array_equal(a["image"], a2["image"])  # same (seed, epoch, sample): same view
    np.testing.assert_array_equal(a["tokens"], a2["tokens"])
    assert not np.allclose(a["image"], b["image"])  # another epoch: other crops
    chosen = lambda out: [next(c for c in caps if (tok([c])[0] == t).all()) for t in out["tokens"]]  # noqa: E731
    assert chosen(a) != chosen(b) and len(set(chosen(a))) > 1  # one caption per sample per epoch
    ev = data.Decoder(image_size=16, vocab_size=512, context_length=8, augment=False, seed=0, stats=None,
                      with_caption=True)(batch)
    assert data.decode_captions(ev["caption"]) == ["alpha"] * 32  # eval: the first caption, no augmentation


def test_decoder_skips_and_counts_bad_samples():
    import orchestrator.data.decode as data
    from orchestrator.data.reading import check_bad_fraction

    counted = []

    class FakeStats:
        def add(self, c):
            counted.append(c)

    good = png()
    batch = _raw_batch([("a", good, ["ok"]), ("b", b"junk", ["corrupt"]), ("c", good, []), ("d", None, ["x"])])
    out = data.Decoder(16, 512, 8, augment=False, seed=0, stats=FakeStats())(batch)
    assert out["image"].shape == (1, 3, 16, 16) and out["tokens"].shape == (1, 8)
    assert len(counted) == 1 and counted[0].pop("data/decode_cpu_ms", 0) >= 0  # CPU time: any value
    assert counted == [{"data/seen": 4, "data/skipped": 3, "data/skipped_corrupt_image": 1,
                        "data/skipped_no_image": 1, "data/skipped_no_caption": 1, "data/decoded": 1}]
    check_bad_fraction({"data/seen": 100, "data/skipped": 1}, 0.01)
    with pytest.raises(UserError):
        check_bad_fraction({"data/seen": 100, "data/skipped": 2}, 0.01)


def test_shard_order_is_reshuffled_per_epoch_and_seeded(small_emoji):
    # The pipeline passes FileShuffleConfig(seed=cfg.seed) to Ray's file-based datasource, which
    # orders files with this function and the dataset's execution index (one per epoch). Constructing
    # the datasource itself needs a cluster; the 2-worker S3 test checks the same end to end.
    from ray.data.datasource import FileShuffleConfig
    from ray.data.datasource.file_based_datasource import _shuffle_file_metadata

    out, _ = small_emoji
    paths = sorted(str(p) for p in (out / "train").glob("*.tar"))

    def order(seed, epoch):
        return _shuffle_file_metadata(paths, [None] * len(paths), FileShuffleConfig(seed=seed), epoch)[0]

    assert order(0, 0) == order(0, 0) and sorted(order(0, 0)) == paths
    assert order(0, 0) != order(0, 1) or order(0, 1) != order(0, 2)
    assert order(0, 1) != order(1, 1) or order(0, 2) != order(1, 2)


def test_truncated_tar_yields_good_prefix_and_a_marker(tmp_path, small_emoji):
    from orchestrator.data.tars import read_tar_stream

    out, _ = small_emoji
    data = (out / "train" / "train-00000.tar").read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        members = tf.getmembers()
    fifth_png = [m for m in members if m.name.endswith(".png")][5]
    bad = tmp_path / "cut.tar"
    bad.write_bytes(data[: fifth_png.offset_data + fifth_png.size // 2])
    with open(bad, "rb") as f:
        rows = [r for t in read_tar_stream(f, str(bad)) for r in t.to_pylist()]
    # the five samples before the damage, then one marker row the decode stage counts
    assert len(rows) == 6 and all(r["error"] is None for r in rows[:5]) and rows[5]["error"]


def test_local_preflight_errors_name_the_path(tmp_path):
    from orchestrator.data.reading import resolve_shards

    with pytest.raises(UserError, match=r"data.train: .*nope does not exist; create demo shards"):
        resolve_shards(str(tmp_path / "nope"), None, "data.train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"holds no .tar shards"):
        resolve_shards(str(tmp_path / "empty"), None, "data.train")
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(UserError, match=r"is not a .tar shard"):
        resolve_shards(str(tmp_path / "x.txt"), None, "data.eval")
