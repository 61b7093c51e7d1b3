"""The WebDataset tar format, both ways: a sample's members (`encode_sample`) and whole tars
(`tar_bytes`) for writing; `read_tar_stream` for reading one tar into pyarrow tables of raw bytes.

A sample's members are contiguous: KEY.png|KEY.jpg, KEY.txt (first caption), and KEY.json
({"captions": [...]}) when there are several; a source with perspectives (emoji) writes
{"captions": [...], "perspectives": [label per caption], "default": [indices]}: `data.captions: one`
draws from "default" only, `data.captions: all` passes every caption in stored order. Member
metadata is fixed (mtime 0, uid 0), so the same input gives byte-identical tars.
"""
from __future__ import annotations

import io
import json
import tarfile
import zlib
from typing import Iterable, Iterator, Optional, Sequence


# -- writing ------------------------------------------------------------------------------------------
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
    captions} (orchestrator/data/decode.py draws the one-caption pick from "default"). Order: the first default
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


# -- reading: tolerant of truncated tars, fixed schema of bytes -------------------------------------
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
READ_CHUNK_ROWS = 512


def arrow_schema():
    import pyarrow as pa

    return pa.schema([("key", pa.string()), ("url", pa.string()), ("image", pa.binary()),
                      ("txt", pa.binary()), ("json", pa.binary()), ("error", pa.string())])


def read_tar_stream(stream, path: str, chunk_rows: int = READ_CHUNK_ROWS) -> Iterator:
    """One tar (a file-like stream) -> pyarrow tables of raw samples {key, url, image, txt, json,
    error}. Members are grouped by key as WebDataset does (Ray's own grouping code). A tar that
    ends early or is damaged yields the samples before the damage and then one row with `error`
    set, which the decode stage counts, instead of failing the whole read (and with it the run)."""
    import pyarrow as pa
    from ray.data._internal.datasource.webdataset_datasource import _group_by_keys, _tar_file_iterator

    schema = arrow_schema()
    damage: list[str] = []

    def members():
        try:
            yield from _tar_file_iterator(stream)
        except (tarfile.TarError, EOFError, zlib.error) as e:
            damage.append(f"{type(e).__name__}: {e}")

    rows: list[dict] = []
    try:
        for s in _group_by_keys(members(), meta={"__url__": path}):
            image = next((s[k] for k in IMAGE_KEYS if k in s), None)
            rows.append({"key": s["__key__"], "url": path, "image": image, "txt": s.get("txt"),
                         "json": s.get("json"), "error": None})
            if len(rows) >= chunk_rows:
                yield pa.Table.from_pylist(rows, schema=schema)
                rows = []
    except ValueError as e:  # non-contiguous or duplicate members: the rest of the tar is unusable
        damage.append(f"ValueError: {e}")
    if damage:
        rows.append({"key": "__damaged__", "url": path, "image": None, "txt": None, "json": None,
                     "error": damage[0][:300]})
    if rows:
        yield pa.Table.from_pylist(rows, schema=schema)
