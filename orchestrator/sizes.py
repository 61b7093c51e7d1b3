"""`llip sizes LOCATION`: count the samples of existing WebDataset shards once and write them beside
the shards as sizes.json, open_clip's format ({shard file name: samples}, one file per folder), local
or s3://. A run needs every shard's count for its epoch plan: with a llip manifest, a sizes.json or
img2dataset's `<shard>_stats.json` it reads them; otherwise it reads every tar at start-up, each time."""
from __future__ import annotations

import json


def add_args(p) -> None:
    p.add_argument("location", metavar="LOCATION",
                   help="a folder of .tar shards (searched recursively) or s3://bucket/prefix (endpoint: "
                        "AWS_ENDPOINT_URL, as for `llip shards`)")


def cli(args) -> int:
    import time

    from orchestrator.data import resolve_shards
    from orchestrator.dataplan import SIZES, by_folder, read_counts
    from orchestrator.shards import _Dest

    paths, fs = resolve_shards(args.location, None, "LOCATION")  # S3 endpoint: AWS_ENDPOINT_URL
    t0 = time.perf_counter()
    count = dict(zip(paths, read_counts(paths, fs)))
    for folder, ps in by_folder(paths, fs).items():
        sizes = {p.rsplit("/", 1)[-1]: count[p] for p in ps}
        _Dest(folder).put(SIZES, (json.dumps(dict(sorted(sizes.items())), indent=1) + "\n").encode())
        print(f"wrote {folder}/{SIZES}: {len(sizes)} shards, {sum(sizes.values())} samples")
    print(f"counted {sum(count.values())} samples in {len(paths)} shards in {time.perf_counter() - t0:.1f} s")
    return 0
