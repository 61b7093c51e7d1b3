"""Reading WebDataset shards (local or s3://): where they are, what they hold, what went wrong.

  locate   `resolve_shards`: one shard location preflighted, in one line naming it and the fix when
           missing, empty or unreachable.
  read     Ray's WebDataset datasource over a shard list, each tar read with
           `orchestrator.data.tars.read_tar_stream` (bytes only, tolerant of truncated tars):
           `read_shards` serves curation; training reads through the epoch plan
           (orchestrator/data/plan.py).
  count    `DataStats`, a small named actor counting samples seen and skipped (undecodable image,
           no caption, truncated tar) across epochs and nodes; `check_bad_fraction` stops a run
           whose skipped share exceeds data.max_bad_fraction.
Decoding the rows read here is orchestrator/data/decode.py.
"""
from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

from orchestrator.data.tars import READ_CHUNK_ROWS, read_tar_stream
from orchestrator.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    import ray.data

READ_TASKS_PER_SLOT = 4  # read+decode tasks per data.decode_concurrency slot (read_shards)

STATS_KEYS = ("data/seen", "data/skipped", "data/skipped_corrupt_image", "data/skipped_no_image",
              "data/skipped_no_caption", "data/truncated_shards")


# --------------------------------------------------------------------------------------------
# bad-data accounting
# --------------------------------------------------------------------------------------------
def _stats_actor_cls():
    import ray

    @ray.remote(num_cpus=0, max_restarts=-1)
    class _DataStatsActor:
        def __init__(self):
            self.c = {k: 0 for k in STATS_KEYS}

        def add(self, counts: dict) -> None:
            for k, v in counts.items():
                self.c[k] = self.c.get(k, 0) + int(v)

        def snapshot(self) -> dict:
            return dict(self.c)

    return _DataStatsActor


@dataclass
class DataStats:
    """Counts of samples seen and skipped by the decode stage, across epochs and nodes.

    Picklable (it wraps a named actor's handle), so decode tasks add to it and training workers
    read it: `snapshot()` -> {"data/seen": n, "data/skipped": n, ...reasons}."""
    handle: Any
    name: str

    @classmethod
    def create(cls) -> "DataStats":
        name = f"llip-data-stats-{uuid.uuid4().hex[:10]}"
        return cls(_stats_actor_cls().options(name=name).remote(), name)

    def add(self, counts: dict) -> None:
        self.handle.add.remote(counts)  # fire and forget: decode never waits on bookkeeping

    def snapshot(self, timeout: float = 30.0) -> dict[str, float]:
        import ray

        return {k: float(v) for k, v in ray.get(self.handle.snapshot.remote(), timeout=timeout).items()}


def check_bad_fraction(stats, max_fraction: float) -> None:
    """Raise UserError when the skipped fraction of the samples seen so far exceeds max_fraction.

    `stats`: a DataStats or a snapshot dict."""
    snap = stats if isinstance(stats, dict) else stats.snapshot()
    seen, skipped = float(snap.get("data/seen", 0)), float(snap.get("data/skipped", 0))
    if seen <= 0 or skipped / seen <= max_fraction:
        return
    reasons = ", ".join(f"{k.split('/', 1)[1]}={int(v)}" for k, v in snap.items()
                        if k.startswith(("data/skipped_", "data/truncated")) and v)
    raise UserError(f"{int(skipped)} of {int(seen)} samples ({skipped / seen:.1%}) were unreadable ({reasons}), "
                    f"above data.max_bad_fraction={max_fraction}; repair or rewrite the shards "
                    "(llip shards ...) or raise data.max_bad_fraction")


# --------------------------------------------------------------------------------------------
# reading: Ray's WebDataset datasource over tars read by orchestrator.data.tars
# --------------------------------------------------------------------------------------------
def _datasource_cls():
    from ray.data._internal.datasource.webdataset_datasource import WebDatasetDatasource

    class TolerantWebDatasetDatasource(WebDatasetDatasource):
        """Ray's WebDataset datasource (file listing, per-epoch file shuffle, read tasks), reading
        each tar with `read_tar_stream`: bytes only, and tolerant of truncated tars."""

        chunk_rows = READ_CHUNK_ROWS

        def _read_stream(self, stream, path: str) -> Iterator:
            return read_tar_stream(stream, path, self.chunk_rows)

    return TolerantWebDatasetDatasource


def resolve_shards(location: str, s3cfg, what: str) -> tuple[list[str], Any]:
    """Preflight one shard location; returns (shard paths, pyarrow filesystem or None).

    Fails with one line naming the location and the fix when it is missing, holds no .tar, or
    (S3) the endpoint/bucket/prefix is unreachable or absent."""
    from orchestrator.storage import s3

    if s3.is_s3_url(location):
        region = s3.check_reachable(location, s3cfg, must_exist=True)
        paths = s3.list_tars(location, s3cfg)
        if not paths:
            raise UserError(f"{what}: {location} holds no .tar shards; write some with "
                            f"`llip shards SOURCE --out {location.rsplit('/', 1)[0]}` or fix {what}")
        return paths, s3.arrow_filesystem(s3cfg, region=region)
    p = Path(location)
    if not p.exists():
        source = "emoji-scenes --out data/scenes" if "scenes" in location else "emoji --out data/emoji"
        raise UserError(f"{what}: {location} does not exist; create demo shards with "
                        f"`llip shards {source}` or point {what} at a shard directory")
    if p.is_file():
        if p.suffix != ".tar":
            raise UserError(f"{what}: {location} is not a .tar shard or a directory of them; fix {what}")
        return [str(p.resolve())], None
    paths = sorted(str(q.resolve()) for q in p.rglob("*.tar") if q.is_file())
    if not paths:
        raise UserError(f"{what}: {location} holds no .tar shards; write some with "
                        f"`llip shards SOURCE --out {p.parent}` or fix {what}")
    return paths, None


def read_shards(paths: list[str], filesystem=None, *, num_cpus: float = 0.25, concurrency: Optional[int] = None,
                chunk_rows: int = READ_CHUNK_ROWS) -> "ray.data.Dataset":
    """Raw samples {key, url, image, txt, json, error} (bytes) in blocks of <= chunk_rows, in shard
    order (curation's reader; training reads through orchestrator/data/plan.py)."""
    import ray.data

    ds_cls = _datasource_cls()
    source = ds_cls(paths, decoder=None, filesystem=filesystem, file_extensions=["tar"])
    source.chunk_rows = int(chunk_rows)
    # Ray's default is one read task per shard; a task's fixed cost (scheduling, shipping the decoder)
    # then rivals a small shard's decode work. READ_TASKS_PER_SLOT tasks per concurrent slot keep the
    # slots balanced at an epoch's end and measured 1.33x the samples/s (benchmarks/ingest.py, 112 shards).
    tasks = min(len(paths), concurrency * READ_TASKS_PER_SLOT) if concurrency else None
    return ray.data.read_datasource(source, num_cpus=num_cpus, concurrency=concurrency, override_num_blocks=tasks)


def sample_id(url: str, key: str) -> int:
    """A stable 63-bit id per sample (shard file name + key), the same locally and on S3."""
    name = url.rsplit("/", 1)[-1]
    return int.from_bytes(hashlib.blake2b(f"{name}/{key}".encode(), digest_size=8).digest(), "big") >> 1
