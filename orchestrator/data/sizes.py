"""Samples per shard, which every epoch plan needs, and `llip sizes LOCATION`, which counts the samples
of existing WebDataset shards once and writes them beside the shards as sizes.json, open_clip's format ({shard file name: samples}, one file per folder), local
or s3://. A run needs every shard's count for its epoch plan: with a llip manifest, a sizes.json or
img2dataset's `<shard>_stats.json` it reads them; otherwise it reads every tar at start-up, each time."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from orchestrator.data.shards import read_manifest
from orchestrator.data.tars import read_tar_stream
from orchestrator.storage.paths import read_json_at

SIZES = "sizes.json"  # open_clip's convention: {shard file name: samples} in the shards' folder


def count_tar_samples(stream) -> int:
    """Samples in one tar, members grouped by key as the reader groups them (reads the tar once)."""
    return sum(int(sum(1 for e in t.column("error").to_pylist() if e is None))
               for t in read_tar_stream(stream, "count"))


def open_shard(path: str, fs):
    """A shard's bytes as a stream, through `fs` (pyarrow S3) or the local filesystem (None)."""
    return fs.open_input_stream(path) if fs is not None else open(path, "rb")


def read_counts(paths: Sequence[str], fs) -> list[int]:
    """Samples per shard by reading each tar once, in parallel threads."""
    def one(p: str) -> int:
        with open_shard(p, fs) as f:
            return count_tar_samples(f)

    with ThreadPoolExecutor(max_workers=max(1, min(16, len(paths)))) as ex:
        return list(ex.map(one, paths))


def by_folder(paths: Sequence[str], fs) -> dict[str, list[str]]:
    """Shard paths grouped by folder, as read_json_at takes one (s3://bucket/prefix or a local folder)."""
    out: dict[str, list[str]] = {}
    for p in paths:
        folder = p.rsplit("/", 1)[0]
        out.setdefault(f"s3://{folder}" if fs is not None else folder, []).append(p)
    return out


def _name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def written_counts(location: str, paths: Sequence[str], fs, s3cfg=None) -> dict[str, int]:
    """Sample counts written down beside the shards, by shard path: llip's manifest (matched by file
    name), open_clip's sizes.json in each shard folder, img2dataset's `<shard>_stats.json`
    ("successes": the samples it wrote)."""
    loc = location.rstrip("/")
    root = loc.rsplit("/", 1)[0] if "/" in loc else loc
    by_name: dict[str, int] = {}
    for r in dict.fromkeys([root, loc]):
        man = read_manifest(r, s3cfg) or {}
        for split_ in (man.get("splits") or {}).values():
            for sh in split_.get("shards") or []:
                if isinstance(sh, dict) and "name" in sh and "samples" in sh:
                    by_name[str(sh["name"])] = int(sh["samples"])
    out = {p: by_name[_name(p)] for p in paths if _name(p) in by_name}
    for folder, ps in by_folder([p for p in paths if p not in out], fs).items():
        sizes = read_json_at(folder, SIZES, s3cfg)
        if isinstance(sizes, dict):
            for p in ps:
                n = sizes.get(_name(p))
                if isinstance(n, (int, float)) and not isinstance(n, bool):
                    out[p] = int(n)
    todo = [(folder, p) for folder, ps in by_folder([p for p in paths if p not in out], fs).items() for p in ps]

    def stats(item: tuple[str, str]):
        folder, p = item
        st = read_json_at(folder, _name(p)[:-len(".tar")] + "_stats.json", s3cfg)
        n = st.get("successes") if isinstance(st, dict) else None
        return int(n) if isinstance(n, int) and not isinstance(n, bool) else None

    # img2dataset writes one per shard: look for all of them only when the first one is there
    if todo and stats(todo[0]) is not None:
        with ThreadPoolExecutor(max_workers=min(16, len(todo))) as ex:
            out.update({p: n for (_, p), n in zip(todo, ex.map(stats, todo)) if n is not None})
    return out


def shard_counts(location: str, paths: Sequence[str], fs, s3cfg=None, say=print) -> list[int]:
    """Samples per shard: where written down beside the shards (written_counts), else by reading
    each such tar once (in parallel threads), with one line saying so and how to skip it next time."""
    import time

    known = written_counts(location, paths, fs, s3cfg)
    todo = [p for p in paths if p not in known]
    if todo:
        t0 = time.perf_counter()
        known.update(zip(todo, read_counts(todo, fs)))
        say(f"[llip] counted the samples of {len(todo)} of {len(paths)} shards at {location} by reading them "
            f"({time.perf_counter() - t0:.1f} s); `llip sizes {location}` writes them to a {SIZES} there once "
            "(open_clip's format), so later runs skip this")
    return [known[p] for p in paths]


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def add_args(p) -> None:
    p.add_argument("location", metavar="LOCATION",
                   help="a folder of .tar shards (searched recursively) or s3://bucket/prefix (endpoint: "
                        "AWS_ENDPOINT_URL, as for `llip shards`)")


def cli(args) -> int:
    import time

    from orchestrator.data.reading import resolve_shards
    from orchestrator.storage.paths import Destination

    paths, fs = resolve_shards(args.location, None, "LOCATION")  # S3 endpoint: AWS_ENDPOINT_URL
    t0 = time.perf_counter()
    count = dict(zip(paths, read_counts(paths, fs)))
    for folder, ps in by_folder(paths, fs).items():
        sizes = {p.rsplit("/", 1)[-1]: count[p] for p in ps}
        Destination(folder).put(SIZES, (json.dumps(dict(sorted(sizes.items())), indent=1) + "\n").encode())
        print(f"wrote {folder}/{SIZES}: {len(sizes)} shards, {sum(sizes.values())} samples")
    print(f"counted {sum(count.values())} samples in {len(paths)} shards in {time.perf_counter() - t0:.1f} s")
    return 0
