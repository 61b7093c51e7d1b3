"""Storage: local paths and s3:// prefixes, one module for every stage that reads or writes files.

  run storage   `storage_path` (local or s3://) holds each run's checkpoints (storage_path/RUN) and
                each sweep's Tune state (storage_path/SWEEP); `run_folder` and `storage_filesystem`
                give the pyarrow filesystem and path Ray Train and Tune are handed.
  shards        `Destination` writes shards and small files under a folder or an s3:// prefix
                (atomic renames locally; an S3 object appears whole or not at all); `read_json_at`
                reads the small JSON files that lie beside shards (manifests, sizes, curation stats).
  whole files   `write_file`, `exists`, `read_bytes` through a pyarrow filesystem (the sweep's shared
                decode), `read_url` by URL (checkpoints given on the command line).

S3 endpoints and credentials resolve in orchestrator.storage.s3, the same way for AWS and any
S3-compatible store.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from orchestrator.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from orchestrator.config.schema import ExperimentConfig


# -- where a run keeps its checkpoints (Ray Train) and a sweep its state (Ray Tune) ----------------
def storage_path(cfg: ExperimentConfig) -> str:
    """The experiment's storage_path, absolute when local (Ray workers run in other folders)."""
    p = cfg.storage_path
    return p if "://" in p else str(Path(p).resolve())


def ray_storage(cfg: ExperimentConfig) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) as Ray Train's and Tune's RunConfig take them: an s3://
    storage_path goes with our S3 filesystem (the endpoint and credentials of data.s3 / the AWS chain)
    and then, as pyarrow wants, without its scheme ("bucket/prefix"); a local one is absolute."""
    fs = storage_filesystem(cfg)
    path = storage_path(cfg)
    return (path[len("s3://"):] if fs is not None else path), fs


def run_folder(cfg: ExperimentConfig, run_name: str):
    """(pyarrow filesystem, path) of a run's or a sweep's folder in storage_path: storage_path/NAME,
    where Ray Train keeps a run's checkpoints and Ray Tune a sweep's state."""
    import pyarrow.fs as pafs

    root = storage_path(cfg)
    root = root[len("s3://"):] if root.startswith("s3://") else root
    return storage_filesystem(cfg) or pafs.LocalFileSystem(), f"{root.rstrip('/')}/{run_name}"


def storage_filesystem(cfg: ExperimentConfig):
    if cfg.storage_path.startswith("s3://"):
        from orchestrator.storage.s3 import arrow_filesystem

        return arrow_filesystem(cfg.data.s3)
    return None


# -- writing under a local folder or an s3:// prefix --------------------------------------------------
class Destination:
    """A local directory or an s3://bucket/prefix, with the few operations sharding needs."""

    def __init__(self, out: str, s3cfg=None):
        self.out = out.rstrip("/")
        self.s3cfg = s3cfg
        self.is_s3 = self.out.startswith("s3://")
        if self.is_s3:
            from orchestrator.storage import s3

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


def read_json_at(root: str, name: str, s3cfg=None) -> Optional[dict]:
    """A small JSON file under a shard root (local or s3), or None when absent or unreadable."""
    try:
        if root.startswith("s3://"):
            from orchestrator.storage import s3

            bucket, key = s3.split_url(root.rstrip("/") + "/" + name)
            body = s3.client(s3cfg, connect_timeout=3, max_attempts=2).get_object(Bucket=bucket, Key=key)["Body"].read()
            return json.loads(body)
        return json.loads((Path(root) / name).read_text())
    except Exception:
        return None


# -- whole files through a pyarrow filesystem (None: local) ------------------------------------------
def write_file(fs, path: str, data: bytes) -> None:
    if fs is None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # readers see the whole file or none
    else:
        with fs.open_output_stream(path) as f:  # an S3 object appears only once complete
            f.write(data)


def exists(fs, path: str) -> bool:
    if fs is None:
        return os.path.isfile(path)
    import pyarrow.fs as pafs

    return fs.get_file_info(path).type == pafs.FileType.File


def read_bytes(fs, path: str) -> bytes:
    if fs is None:
        with open(path, "rb") as f:
            return f.read()
    with fs.open_input_stream(path) as f:
        return f.read()


def read_url(url: str) -> bytes:
    """A whole file by URL (s3://bucket/key through the default S3 settings, else a local path)."""
    import pyarrow.fs as pafs

    if url.startswith("s3://"):
        from orchestrator.storage import s3

        fs, path = s3.arrow_filesystem(None), url[len("s3://"):]
    else:
        fs, path = pafs.LocalFileSystem(), str(Path(url).resolve())
    # compression=None: pyarrow would otherwise gunzip a *.gz file (an export's BPE merges) on the way
    with fs.open_input_stream(path, compression=None) as f:
        return f.read()
