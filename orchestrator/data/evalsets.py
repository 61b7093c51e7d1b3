"""Evaluation sets in clip_benchmark's WebDataset layout (`wds_*` sets), local or s3://.

    ROOT/dataset_type.txt                      "classification" or "retrieval" (optional)
    ROOT/classnames.txt                        one class name per line (classification)
    ROOT/zeroshot_classification_templates.txt one prompt template per line, "{c}" = class name
    ROOT/<split>/nshards.txt                   n; the shards are <split>/0.tar ... <split>/{n-1}.tar
    sample members: KEY.webp | KEY.png | KEY.jpg (KEY.jpeg) and KEY.cls (the class index as text)
                    or KEY.txt (captions, one per line)

This is what clip_benchmark's `build_wds_dataset` reads and `clip_benchmark_export_wds` writes, so a
set downloaded from the clip-benchmark hub works unchanged (point `eval.sets` at its folder).
Kind, as clip_benchmark decides it: dataset_type.txt if present; otherwise classification when
classnames.txt exists or samples carry `cls`, retrieval when they carry captions. Without
nshards.txt every .tar under <split>/ is read; a folder that holds .tar files itself (our own
`llip shards` output, e.g. data/emoji/eval, with `json` caption lists) is read as a retrieval set.

Reading is plain tar streaming (no Ray): sets are small and rank 0 keeps them decoded in memory.
S3 goes through orchestrator.storage.s3 (the same endpoint and credential resolution as the data plane).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import re
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from orchestrator.config.schema import default_name
from orchestrator.data.sources import (FASHION_MNIST_CLASSES, FASHION_MNIST_TEMPLATES, BadInput, emoji_splits,
                                       fashion_mnist, gray_png)
from orchestrator.data.tars import tar_bytes
from orchestrator.errors import UserError
from orchestrator.storage.paths import Destination

CLASSNAMES = "classnames.txt"
TEMPLATES = "zeroshot_classification_templates.txt"
DATASET_TYPE = "dataset_type.txt"
NSHARDS = "nshards.txt"
IMAGE_EXTS = ("webp", "png", "jpg", "jpeg")
CLASSIFICATION, RETRIEVAL = "classification", "retrieval"
DEFAULT_TEMPLATES = ["a photo of a {c}."]  # clip_benchmark's "dummy" set; used when the file is missing


# --------------------------------------------------------------------------------------------
# storage: a local folder or an s3:// prefix, read through pyarrow's filesystem interface
# --------------------------------------------------------------------------------------------
class _Store:
    def __init__(self, root: str, s3cfg=None):
        import pyarrow.fs as pafs

        from orchestrator.storage import s3

        self.url = root.rstrip("/")
        if s3.is_s3_url(root):
            region = s3.check_reachable(self.url, s3cfg, must_exist=True)
            self.fs = s3.arrow_filesystem(s3cfg, region=region)
            self.base = self.url[len("s3://"):]
        else:
            p = Path(root)
            if not p.exists():
                raise UserError(f"eval set {root}: folder does not exist; write one with "
                                f"`llip shards fashion-mnist --out {root}` or fix the path")
            if not p.is_dir():
                raise UserError(f"eval set {root}: not a folder; give the set's root folder (with classnames.txt "
                                "or <split>/*.tar)")
            self.fs = pafs.LocalFileSystem()
            self.base = str(p.resolve())

    def path(self, rel: str) -> str:
        return f"{self.base}/{rel}" if rel else self.base

    def read_text(self, rel: str) -> Optional[str]:
        import pyarrow.fs as pafs

        if self.fs.get_file_info(self.path(rel)).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read().decode("utf-8", errors="replace")

    def tars(self, rel: str) -> list[str]:
        """Names of the .tar files directly in rel, in natural order (2.tar before 10.tar)."""
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.path(rel), allow_not_found=True))
        names = [i.base_name for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".tar")]
        return sorted(names, key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)])

    def open(self, rel: str):
        return self.fs.open_input_stream(self.path(rel))


# --------------------------------------------------------------------------------------------
# what a set is (resolved once by the driver, shipped to rank 0 as a dict)
# --------------------------------------------------------------------------------------------
@dataclass
class SetInfo:
    name: str  # "" for data.eval, whose metrics keep their top-level names (eval/recall1)
    path: str  # as given (local paths made absolute: Ray workers run in another directory)
    kind: str
    split_dir: str  # relative to the root: "test", or "" for a folder of .tar files
    shards: list[str]
    classnames: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=list)
    max_samples: Optional[int] = None
    samples: int = 0  # readable samples counted by the preflight (after max_samples)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SetInfo":
        return cls(**d)


def _lines(text: Optional[str]) -> list[str]:
    return [ln.strip() for ln in (text or "").splitlines() if ln.strip()]


def inspect_set(path: str, name: Optional[str] = None, split: str = "test", max_samples: Optional[int] = None,
                s3cfg=None, scan: bool = True) -> SetInfo:
    """Resolve a set's layout and kind, and (scan=True) read every sample's label or captions once
    without decoding images, so bad sets fail here, before training, in one line naming the folder:
    missing classnames.txt, class index out of range, zero readable samples."""
    store = _Store(path, s3cfg)
    where = f"eval set {path}"
    nshards = store.read_text(f"{split}/{NSHARDS}")
    if nshards is not None:
        try:
            n = int(nshards.strip())
        except ValueError:
            raise UserError(f"{where}: {split}/{NSHARDS} should hold the number of shards, found {nshards.strip()[:40]!r}") from None
        present = set(store.tars(split))
        shards = [f"{i}.tar" for i in range(n)]
        missing = [s for s in shards if s not in present]
        if missing:
            raise UserError(f"{where}: {split}/{NSHARDS} says {n} shards but {split}/{missing[0]} is missing")
        split_dir = split
    elif store.tars(split):
        split_dir, shards = split, store.tars(split)
    elif store.tars(""):
        split_dir, shards = "", store.tars("")
    else:
        raise UserError(f"{where}: no shards: expected {split}/{NSHARDS} and {split}/0.tar ... (clip_benchmark "
                        f"layout) or .tar files in the folder; build one with `llip shards fashion-mnist --out {path}`")

    dtype = (store.read_text(DATASET_TYPE) or "").strip().lower() or None
    if dtype not in (None, CLASSIFICATION, RETRIEVAL):
        raise UserError(f"{where}: {DATASET_TYPE} says {dtype!r}; only classification and retrieval sets are supported")
    classnames = _lines(store.read_text(CLASSNAMES))
    templates = _lines(store.read_text(TEMPLATES))
    kind = dtype
    if kind is None:
        if classnames:
            kind = CLASSIFICATION
        else:
            first = next(_iter_samples(store, split_dir, shards[:1]), None)
            kind = CLASSIFICATION if first is not None and first[2] == "cls" else RETRIEVAL
    if kind == CLASSIFICATION and not classnames:
        raise UserError(f"{where}: classification set without {CLASSNAMES} (one class name per line, line i = class i); "
                        "add it, or mark the set as retrieval in dataset_type.txt")
    info = SetInfo(name=name if name is not None else default_name(path),
                   path=store.url if store.url.startswith("s3://") else store.base, kind=kind,
                   split_dir=split_dir, shards=shards, classnames=classnames,
                   templates=templates or (list(DEFAULT_TEMPLATES) if kind == CLASSIFICATION else []),
                   max_samples=max_samples)
    if scan:
        n = 0
        for _key, _img, what, target in iter_targets(info, s3cfg, store=store):
            if kind == CLASSIFICATION and not 0 <= target < len(classnames):
                raise UserError(f"{where}: class index {target} out of range: {CLASSNAMES} lists "
                                f"{len(classnames)} classes (0..{len(classnames) - 1})")
            n += 1
        if n == 0:
            want = "an image and a cls label" if kind == CLASSIFICATION else "an image and a caption (txt)"
            raise UserError(f"{where}: zero readable samples in {len(shards)} shard(s); every sample needs {want}")
        info.samples = n
    return info


def _iter_samples(store: _Store, split_dir: str, shards: Sequence[str]
                  ) -> Iterator[tuple[str, Optional[bytes], Optional[str], object]]:
    """(key, image bytes or None, "cls" | "txt" | None, class index or caption list) per sample.

    WebDataset grouping: a member's key is its name up to the first dot of the base name, and a
    sample's members are contiguous. Damaged tars end their sample stream early (counted as
    unreadable by callers simply by the samples missing)."""
    for shard in shards:
        rel = f"{split_dir}/{shard}" if split_dir else shard
        cur_key, cur = None, {}
        try:
            with store.open(rel) as raw, tarfile.open(fileobj=raw, mode="r|*") as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    d, _, base = m.name.rpartition("/")
                    if "." not in base:
                        continue
                    stem, ext = base.split(".", 1)
                    key = f"{d}/{stem}" if d else stem
                    if key != cur_key:
                        if cur_key is not None:
                            yield _sample(cur_key, cur)
                        cur_key, cur = key, {}
                    f = tf.extractfile(m)
                    cur[ext.lower()] = f.read() if f is not None else b""
                if cur_key is not None:
                    yield _sample(cur_key, cur)
        except (tarfile.TarError, EOFError, OSError, gzip.BadGzipFile):
            if cur_key is not None and cur:
                yield _sample(cur_key, cur)


def _sample(key: str, members: dict) -> tuple[str, Optional[bytes], Optional[str], object]:
    image = next((members[e] for e in IMAGE_EXTS if e in members), None)
    if "cls" in members:
        try:
            return key, image, "cls", int(members["cls"].decode("utf-8", errors="replace").strip())
        except ValueError:
            return key, image, None, None
    caps: list[str] = []
    if "json" in members:  # our own shards: {"captions": [...]} holds every caption
        try:
            obj = json.loads(members["json"])
            lst = obj.get("captions") if isinstance(obj, dict) else obj
            # Perspectives such as an emoji's group ("activities") caption many images alike: they
            # are training signal, not a description to retrieve. Evaluate the "default" captions.
            default = obj.get("default") if isinstance(obj, dict) else None
            if isinstance(lst, list) and isinstance(default, list):
                lst = [lst[i] for i in default if isinstance(i, int) and 0 <= i < len(lst)]
            if isinstance(lst, list):
                caps = [str(c).strip() for c in lst if c is not None and str(c).strip()]
        except (ValueError, UnicodeDecodeError):
            caps = []
    if not caps and "txt" in members:
        caps = _lines(members["txt"].decode("utf-8", errors="replace"))
    return key, image, ("txt" if caps else None), caps


def iter_targets(info: SetInfo, s3cfg=None, store: Optional[_Store] = None):
    """Usable samples (with an image and the set kind's target), at most info.max_samples."""
    store = store or _Store(info.path, s3cfg)
    want = "cls" if info.kind == CLASSIFICATION else "txt"
    n = 0
    for key, image, what, target in _iter_samples(store, info.split_dir, info.shards):
        if info.max_samples is not None and n >= info.max_samples:
            return
        if image is None or what != want:
            continue
        n += 1
        yield key, image, what, target


# --------------------------------------------------------------------------------------------
# loading for evaluation: decoded at the model's image size, kept as uint8
# --------------------------------------------------------------------------------------------
@dataclass
class LoadedSet:
    info: SetInfo
    images: np.ndarray  # uint8 (N, S, S, 3), center-cropped as CLIP evaluates
    labels: Optional[np.ndarray] = None  # classification: (N,) int64
    captions: Optional[list[list[str]]] = None  # retrieval: captions per image
    skipped: int = 0  # samples whose image did not decode


def load_set(info: SetInfo, image_size: int, s3cfg=None) -> LoadedSet:
    from llip_core.preprocess import CorruptImageError, load_rgb, transform

    imgs, labels, caps, skipped = [], [], [], 0
    for _key, data, _what, target in iter_targets(info, s3cfg):
        try:
            imgs.append(transform(load_rgb(data, draft_size=image_size), image_size))
        except CorruptImageError:
            skipped += 1
            continue
        (labels if info.kind == CLASSIFICATION else caps).append(target)
    if not imgs:
        raise UserError(f"eval set {info.path}: zero readable samples ({skipped} images did not decode)")
    images = np.stack(imgs)
    if info.kind == CLASSIFICATION:
        return LoadedSet(info, images, labels=np.asarray(labels, dtype=np.int64), skipped=skipped)
    return LoadedSet(info, images, captions=caps, skipped=skipped)


# --------------------------------------------------------------------------------------------
# writing the layout (`llip shards fashion-mnist`, `llip shards emoji-heldout`)
# --------------------------------------------------------------------------------------------
def write_eval_set(out: str, samples: Iterable[tuple[bytes, str, object]], kind: str, *, split: str = "test",
                   classnames: Sequence[str] = (), templates: Sequence[str] = (), samples_per_shard: int = 10_000,
                   s3cfg=None, log: Callable[[str], None] = lambda s: None, source: str = "") -> dict:
    """Write samples (image bytes, image extension, class index or caption list) in clip_benchmark's
    layout under `out` (a folder or s3://bucket/prefix). Returns a manifest (also written as
    manifest.json beside the layout files; clip_benchmark ignores it)."""
    if kind not in (CLASSIFICATION, RETRIEVAL):
        raise ValueError(kind)
    if samples_per_shard < 1:
        raise UserError(f"--samples-per-shard {samples_per_shard}: must be at least 1")
    dest = Destination(out, s3cfg)
    shards: list[dict] = []
    pending: list[list[tuple[str, bytes]]] = []
    count = 0

    def flush():
        data = tar_bytes(pending)
        name = f"{len(shards)}.tar"
        dest.put(f"{split}/{name}", data)
        shards.append({"name": name, "samples": len(pending), "sha1": hashlib.sha1(data).hexdigest()})
        log(f"  {dest.url(split + '/' + name)}: {len(pending)} samples")
        pending.clear()

    for image, ext, target in samples:
        key = f"s{count:07d}"
        if kind == CLASSIFICATION:
            tgt = ("cls", str(int(target)).encode())
        else:
            lines = [" ".join(str(c).split()) for c in target if str(c).strip()]
            tgt = ("txt", "\n".join(lines).encode("utf-8"))
        pending.append([(f"{key}.{ext}", image), (f"{key}.{tgt[0]}", tgt[1])])
        count += 1
        if len(pending) >= samples_per_shard:
            flush()
    if pending:
        flush()
    if count == 0:
        raise UserError(f"{out}: no samples to write")
    stale = re.compile(r"^\d+\.tar$")
    for name in dest.list(split):
        if stale.match(name) and int(name[:-4]) >= len(shards):
            dest.delete(f"{split}/{name}")
    dest.put(f"{split}/{NSHARDS}", f"{len(shards)}\n".encode())
    dest.put(DATASET_TYPE, f"{kind}\n".encode())
    if classnames:
        dest.put(CLASSNAMES, ("\n".join(classnames) + "\n").encode("utf-8"))
    if templates:
        dest.put(TEMPLATES, ("\n".join(templates) + "\n").encode("utf-8"))
    fp = hashlib.sha1("".join(s["sha1"] for s in shards).encode()).hexdigest()[:16]
    manifest = {"format": "clip_benchmark-wds", "source": source, "kind": kind, "split": split, "samples": count,
                "num_shards": len(shards), "shards": shards, "fingerprint": fp}
    dest.put("manifest.json", (json.dumps(manifest, indent=1) + "\n").encode())
    return manifest


def write_fashion_mnist(out: str, limit: Optional[int] = None, samples_per_shard: int = 10_000, s3cfg=None,
                        log: Callable[[str], None] = lambda s: None) -> dict:
    """Fashion-MNIST's 10,000 test images (or the first `limit`) as a zero-shot classification set."""
    images, labels = fashion_mnist("test")
    n = len(labels) if limit is None else min(limit, len(labels))
    samples = ((gray_png(images[i]), "png", int(labels[i])) for i in range(n))
    return write_eval_set(out, samples, CLASSIFICATION, classnames=FASHION_MNIST_CLASSES,
                          templates=FASHION_MNIST_TEMPLATES, samples_per_shard=samples_per_shard, s3cfg=s3cfg,
                          log=log, source="fashion-mnist:t10k")


def write_emoji_heldout(out: str, seed: int = 0, holdout: float = 0.1, aliases: bool = True,
                        limit: Optional[int] = None, samples_per_shard: int = 10_000, s3cfg=None,
                        log: Callable[[str], None] = lambda s: None) -> dict:
    """The emoji concepts `llip shards emoji` holds out (same seed and fraction) as a retrieval set,
    every caption of an image on its own line."""
    splits, _meta = emoji_splits(seed=seed, holdout=holdout, aliases=aliases, limit=limit)

    def gen():
        for s in sorted(splits["eval"], key=lambda s: s.key_hint):
            try:
                data, ext = s.load()
            except (BadInput, OSError) as e:
                log(f"  skipped {s.key_hint}: {e}")
                continue
            yield data, ext, s.captions

    return write_eval_set(out, gen(), RETRIEVAL, samples_per_shard=samples_per_shard, s3cfg=s3cfg, log=log,
                          source=f"emoji-heldout:seed={seed},holdout={holdout}")
