"""`llip sizes LOCATION`: count the samples of existing WebDataset shards once and write them beside
the shards as sizes.json, open_clip's format ({shard file name: samples}, one file per folder), local
or s3://. A run needs every shard's count for its epoch plan: with a llip manifest, a sizes.json or
img2dataset's `<shard>_stats.json` it reads them; otherwise it reads every tar at start-up, each time."""
from __future__ import annotations

import json
from collections import defaultdict


def add_args(p) -> None:
    p.add_argument("location", metavar="LOCATION",
                   help="a folder of .tar shards (searched recursively) or s3://bucket/prefix (endpoint: "
                        "AWS_ENDPOINT_URL, as for `llip shards`)")


def cli(args) -> int:
    import time

    from orchestrator.data import resolve_shards
    from orchestrator.dataplan import SIZES, _folder_of, read_counts
    from orchestrator.shards import _Dest

    s3cfg = None
    paths, fs = resolve_shards(args.location, s3cfg, "LOCATION")
    t0 = time.perf_counter()
    counts = read_counts(paths, fs)
    by_folder: dict[str, dict[str, int]] = defaultdict(dict)
    for p, n in zip(paths, counts):
        by_folder[_folder_of(p, fs)][p.rsplit("/", 1)[-1]] = n
    for folder, sizes in by_folder.items():
        _Dest(folder, s3cfg).put(SIZES, (json.dumps(dict(sorted(sizes.items())), indent=1) + "\n").encode())
        print(f"wrote {folder}/{SIZES}: {len(sizes)} shards, {sum(sizes.values())} samples")
    print(f"counted {sum(counts)} samples in {len(paths)} shards in {time.perf_counter() - t0:.1f} s")
    return 0
