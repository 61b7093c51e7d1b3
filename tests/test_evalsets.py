"""Eval sets in clip_benchmark's WebDataset layout: Fashion-MNIST from Debian's package, a set written
the way clip_benchmark_export_wds writes one (webp + cls, nshards.txt), retrieval sets with several
captions per image, S3 through the real moto server, and the bad-input lines."""
from __future__ import annotations

import gzip
import io
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from orchestrator.cli import main as llip_main
from orchestrator.errors import UserError
from orchestrator.data.evalsets import CLASSIFICATION, RETRIEVAL, inspect_set, load_set, write_eval_set
from orchestrator.data.sources import FASHION_MNIST_CLASSES, fashion_mnist, read_idx

try:
    from tests.s3server import moto_s3  # noqa: F401  (fixture)
except ImportError:
    from s3server import moto_s3  # noqa: F401

FM = "/usr/share/datasets/fashion-mnist"
needs_fm = pytest.mark.skipif(not Path(FM, "t10k-images-idx3-ubyte.gz").is_file(),
                              reason="Debian's dataset-fashion-mnist is not installed (make sysdeps)")


def _idx_reference(path):
    """IDX parsed with struct, independently of evalsets.read_idx."""
    with gzip.open(path, "rb") as f:
        zero, dtype, ndim = struct.unpack(">HBB", f.read(4))
        dims = struct.unpack(">" + "I" * ndim, f.read(4 * ndim))
        return np.frombuffer(f.read(), dtype=np.uint8).reshape(dims)


@needs_fm
def test_fashion_mnist_reader_on_the_package():
    images, labels = fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10  # the test split is balanced
    assert labels[0] == 9  # the first test image is an ankle boot
    np.testing.assert_array_equal(images, _idx_reference(f"{FM}/t10k-images-idx3-ubyte.gz"))
    np.testing.assert_array_equal(read_idx(f"{FM}/t10k-labels-idx1-ubyte.gz"),
                                  _idx_reference(f"{FM}/t10k-labels-idx1-ubyte.gz"))


@needs_fm
def test_llip_shards_fashion_mnist_writes_the_clip_benchmark_layout(tmp_path):
    out = tmp_path / "fashion_mnist"
    rc = llip_main(["shards", "fashion-mnist", "--out", str(out), "--limit", "300", "--samples-per-shard", "128", "-q"])
    assert rc == 0
    # exactly the files clip_benchmark's build_wds_dataset reads
    assert (out / "test" / "nshards.txt").read_text().strip() == "3"
    assert sorted(p.name for p in (out / "test").glob("*.tar")) == ["0.tar", "1.tar", "2.tar"]
    assert (out / "dataset_type.txt").read_text().strip() == "classification"
    assert (out / "classnames.txt").read_text().splitlines() == FASHION_MNIST_CLASSES
    templates = (out / "zeroshot_classification_templates.txt").read_text().splitlines()
    assert len(templates) >= 3 and all("{c}" in t for t in templates)
    # members as webdataset groups them: KEY.png + KEY.cls, class index as text
    with tarfile.open(out / "test" / "0.tar") as tf:
        names = tf.getnames()
        assert names[:4] == ["s0000000.png", "s0000000.cls", "s0000001.png", "s0000001.cls"]
        assert tf.extractfile("s0000000.cls").read() == b"9"
    # read back through our reader: labels in order, pixels losslessly equal to the package's
    info = inspect_set(str(out))
    assert (info.kind, info.samples, info.name, info.shards) == (CLASSIFICATION, 300, "fashion_mnist",
                                                                 ["0.tar", "1.tar", "2.tar"])
    loaded = load_set(info, image_size=28)
    images, labels = fashion_mnist("test")
    np.testing.assert_array_equal(loaded.labels, labels[:300])
    np.testing.assert_array_equal(loaded.images[..., 0], images[:300])
    assert inspect_set(str(out), max_samples=50).samples == 50


def _webp(color, size=20):
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="webp", lossless=True)
    return buf.getvalue()


def _write_tar(path: Path, members):
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def _clip_benchmark_classification(root: Path, labels, classnames=("cat", "dog", "bird"), per_shard=4):
    """A set as clip_benchmark_export_wds writes it: s%07d keys, lossless webp, cls, nshards.txt."""
    shards = [list(range(i, min(i + per_shard, len(labels)))) for i in range(0, len(labels), per_shard)]
    for n, idx in enumerate(shards):
        _write_tar(root / "test" / f"{n}.tar",
                   [m for i in idx for m in ((f"s{i:07d}.webp", _webp((30 * i % 255, 0, 0))),
                                             (f"s{i:07d}.cls", str(labels[i]).encode()))])
    (root / "test" / "nshards.txt").write_text(f"{len(shards)}\n")
    if classnames is not None:
        (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na drawing of a {c}.\n")


def test_clip_benchmark_layout_reader(tmp_path):
    root = tmp_path / "wds_toy"
    labels = [0, 2, 1, 1, 0, 2, 2, 1, 0, 1]
    _clip_benchmark_classification(root, labels)
    info = inspect_set(str(root))
    assert info.kind == CLASSIFICATION and info.shards == ["0.tar", "1.tar", "2.tar"] and info.samples == 10
    assert info.classnames == ["cat", "dog", "bird"]
    assert info.templates == ["a photo of a {c}.", "a drawing of a {c}."]
    loaded = load_set(info, image_size=16)
    assert loaded.labels.tolist() == labels
    assert loaded.images.shape == (10, 16, 16, 3)
    assert loaded.images[3, 8, 8, 0] == 90  # lossless webp of colour (30 * 3, 0, 0)


def test_retrieval_layout_with_several_captions_per_image(tmp_path):
    root = tmp_path / "wds_captions"
    caps = [["a red square", "red"], ["a blue square"], ["a green square", "green", "lime"]]
    samples = [(_webp(c), "webp", t) for c, t in zip([(255, 0, 0), (0, 0, 255), (0, 255, 0)], caps)]
    m = write_eval_set(str(root), samples, RETRIEVAL, samples_per_shard=2)
    assert m["num_shards"] == 2 and (root / "dataset_type.txt").read_text().strip() == "retrieval"
    with tarfile.open(root / "test" / "1.tar") as tf:
        assert tf.extractfile("s0000002.txt").read().decode().splitlines() == caps[2]
    info = inspect_set(str(root))
    loaded = load_set(info, image_size=8)
    assert info.kind == RETRIEVAL and loaded.captions == caps


def test_our_own_shard_folder_reads_as_retrieval_with_json_captions(emoji_shards):
    info = inspect_set(str(emoji_shards / "eval"))
    assert info.kind == RETRIEVAL and info.split_dir == "" and info.name == f"{emoji_shards.name}_eval"
    loaded = load_set(info, image_size=16)
    assert len(loaded.captions) == info.samples > 100
    assert any(len(c) > 1 for c in loaded.captions)  # aliases: several captions per emoji


def test_emoji_heldout_source_holds_the_same_concepts_as_emoji_eval(tmp_path, emoji_shards):
    out = tmp_path / "emoji_eval"
    assert llip_main(["shards", "emoji-heldout", "--out", str(out), "-q"]) == 0
    mine = load_set(inspect_set(str(out)), image_size=8).captions
    theirs = load_set(inspect_set(str(emoji_shards / "eval")), image_size=8).captions
    assert sorted(map(tuple, mine)) == sorted(map(tuple, theirs))


# ---------------------------------------------------------------------------------------------
# bad input: one line naming the folder and the problem
# ---------------------------------------------------------------------------------------------
def test_missing_classnames_is_one_line_naming_the_folder(tmp_path):
    root = tmp_path / "no_names"
    _clip_benchmark_classification(root, [0, 1, 0], classnames=None)
    with pytest.raises(UserError, match=rf"eval set {root}: classification set without classnames.txt"):
        inspect_set(str(root))


def test_class_index_out_of_range(tmp_path):
    root = tmp_path / "bad_label"
    _clip_benchmark_classification(root, [0, 1, 3, 2])
    with pytest.raises(UserError, match=rf"eval set {root}: class index 3 out of range: classnames.txt lists 3"):
        inspect_set(str(root))


def test_zero_readable_samples_is_an_error_not_a_metric(tmp_path):
    root = tmp_path / "empty"
    _write_tar(root / "test" / "0.tar", [("s0000000.cls", b"1"), ("s0000001.cls", b"0")])  # labels, no images
    (root / "classnames.txt").write_text("a\nb\n")
    with pytest.raises(UserError, match=rf"eval set {root}: zero readable samples in 1 shard"):
        inspect_set(str(root))
    with pytest.raises(UserError, match="folder does not exist"):
        inspect_set(str(tmp_path / "nowhere"))
    (tmp_path / "notars").mkdir()
    with pytest.raises(UserError, match="no shards"):
        inspect_set(str(tmp_path / "notars"))


def test_nshards_pointing_past_the_files(tmp_path):
    root = tmp_path / "short"
    _clip_benchmark_classification(root, [0, 1, 2, 0, 1])
    (root / "test" / "nshards.txt").write_text("3\n")
    with pytest.raises(UserError, match=r"nshards.txt says 3 shards but test/2.tar is missing"):
        inspect_set(str(root))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_eval_set_on_s3_written_and_read_through_the_s3_code_path(moto_s3, tmp_path):  # noqa: F811
    moto_s3.create_bucket("evalsets")
    url = "s3://evalsets/sets/toy"
    labels = [2, 0, 1, 1, 2]
    samples = [(_webp((40 * i, 0, 0)), "webp", lab) for i, lab in enumerate(labels)]
    write_eval_set(url, samples, CLASSIFICATION, classnames=["a", "b", "c"], templates=["{c}"], samples_per_shard=2)
    keys = sorted(o["Key"] for o in moto_s3.client().list_objects_v2(Bucket="evalsets")["Contents"])
    assert "sets/toy/test/nshards.txt" in keys and "sets/toy/test/2.tar" in keys
    info = inspect_set(url)
    assert (info.kind, info.samples, info.name, info.path) == (CLASSIFICATION, 5, "toy", url)
    assert load_set(info, image_size=8).labels.tolist() == labels
    with pytest.raises(UserError, match="s3://evalsets/sets/none"):
        inspect_set("s3://evalsets/sets/none")
