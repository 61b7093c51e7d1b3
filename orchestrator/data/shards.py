"""`llip shards SOURCE --out DEST`: write WebDataset tar shards (local dir or s3://bucket/prefix).

SOURCE is one of orchestrator/data/sources.py's (emoji, a folder, a table); eval sets in
clip_benchmark's layout are orchestrator/data/evalsets.py's.

Layout: DEST/train/train-00000.tar ..., DEST/eval/eval-00000.tar ..., DEST/manifest.json.
In each tar a sample's members are contiguous: KEY.png|KEY.jpg, KEY.txt (first caption), and
KEY.json ({"captions": [...]}) when there are several; a source with perspectives (emoji) writes
{"captions": [...], "perspectives": [label per caption], "default": [indices]}: `data.captions: one`
draws from "default" only (name and aliases: the demo's task), `data.captions: all` passes every
caption in stored order (orchestrator/data/tars.py, `encode_sample`). Member metadata is fixed (mtime 0, uid 0),
so the same input gives byte-identical shards and the manifest's fingerprint identifies content.
Samples are shuffled (seeded) before sharding so that a folder sorted by class still mixes.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from orchestrator.data.sources import (DEFAULT_EMOJI_HOLDOUT, BadInput, Sample, emoji_splits, folder_samples,
                                       split_by_key, table_samples)
from orchestrator.data.tars import encode_sample, tar_bytes
from orchestrator.errors import UserError
from orchestrator.storage.paths import Destination, read_json_at

MANIFEST = "manifest.json"
FORMAT = "llip-webdataset/1"
DEFAULT_SAMPLES_PER_SHARD = 256


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------
@dataclass
class SplitResult:
    samples: int = 0
    shards: list[dict] = field(default_factory=list)


def write_split(dest: Destination, split: str, samples: Sequence[Sample], samples_per_shard: int, seed: int,
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
        except (BadInput, OSError) as e:
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
    dest = Destination(out, s3cfg)
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


def write_emoji_scenes(out: str, opts, samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD, s3cfg=None,
                       log: Callable[[str], None] = lambda s: None) -> dict:
    """Scenes of several Twemoji (orchestrator/data/scenes.py): training shards under out/train, the
    eval sets (out/eval: new combinations of the training concepts; out/eval_heldout: scenes with
    held-out concepts) in clip_benchmark's retrieval layout, every object's caption on its own line.
    The manifest (written last) names the options, the concepts and each eval set's fingerprint."""
    from orchestrator.data import evalsets
    from orchestrator.data.scenes import scene_splits

    splits, meta = scene_splits(opts)
    root = out.rstrip("/")
    evals = {}
    for name in (n for n in splits if n != "train"):
        gen = ((*smp.load(), smp.captions) for smp in splits[name])
        m = evalsets.write_eval_set(f"{root}/{name}", gen, evalsets.RETRIEVAL, s3cfg=s3cfg, log=log,
                                    source=f"emoji-scenes:{name},seed={opts.seed}")
        evals[name] = {"samples": m["samples"], "fingerprint": m["fingerprint"]}
    meta["scenes"]["eval_sets"] = evals
    return write_splits(out, {"train": splits["train"]}, samples_per_shard=samples_per_shard, seed=opts.seed,
                        source="emoji-scenes", meta=meta, s3cfg=s3cfg, log=log)


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
                        "for retrieval, every caption of an image); 'emoji-scenes': grids of several Twemoji, "
                        "one caption per object, training shards plus eval sets of new combinations")
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
    from orchestrator.data.scenes import DEFAULTS

    g = p.add_argument_group("emoji-scenes", "scenes of several Twemoji, one caption (the name) per object")
    g.add_argument("--grid", type=int, default=DEFAULTS["grid"], metavar="G",
                   help=f"G x G cells per scene (default {DEFAULTS['grid']})")
    g.add_argument("--cell", type=int, default=DEFAULTS["cell"], metavar="PX",
                   help=f"cell size in px; the image is G x PX (default {DEFAULTS['cell']})")
    g.add_argument("--min-objects", type=int, default=DEFAULTS["min_objects"], metavar="N")
    g.add_argument("--max-objects", type=int, default=DEFAULTS["max_objects"], metavar="N",
                   help=f"objects per scene, at most one per cell (default {DEFAULTS['min_objects']}.."
                        f"{DEFAULTS['max_objects']})")
    g.add_argument("--concepts", type=int, default=DEFAULTS["concepts"], metavar="N",
                   help=f"emoji concepts the scenes are composed from (default {DEFAULTS['concepts']})")
    g.add_argument("--heldout-concepts", type=int, default=DEFAULTS["heldout_concepts"], metavar="N",
                   help="further concepts no training scene shows, evaluated in DEST/eval_heldout (default 0)")
    g.add_argument("--train-scenes", type=int, default=DEFAULTS["train_scenes"], metavar="N",
                   help=f"default {DEFAULTS['train_scenes']}")
    g.add_argument("--eval-scenes", type=int, default=DEFAULTS["eval_scenes"], metavar="N",
                   help=f"per eval set, balanced over the number of objects (default {DEFAULTS['eval_scenes']})")


def cli(args) -> int:
    from orchestrator.config.schema import S3Section

    s3cfg = S3Section(endpoint_url=args.endpoint_url, region=args.region, profile=args.profile)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    holdout = args.holdout
    if holdout is not None and not 0 <= holdout < 1:
        raise UserError(f"--holdout {holdout}: must be in [0, 1)")
    if args.source in EVAL_SET_SOURCES:
        return _eval_set_cli(args, s3cfg, log, holdout)
    if args.source == "emoji-scenes":
        return _scenes_cli(args, s3cfg, log)
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
        splits = split_by_key(samples, holdout or 0.0, args.seed)
        m = write_splits(args.out, splits, samples_per_shard=args.samples_per_shard, seed=args.seed,
                         source=f"{kind}:{src.name}", meta={"holdout_fraction": holdout or 0.0},
                         counts=counts, s3cfg=s3cfg, log=log)
    parts = [f"{s['samples']} {name} samples in {s['num_shards']} shards" for name, s in m["splits"].items()]
    skipped = sum(m["skipped"].values())
    print(f"wrote {', '.join(parts)} to {args.out.rstrip('/')} (manifest {MANIFEST}, fingerprint {m['fingerprint']}"
          + (f", skipped {skipped}: {m['skipped']}" if skipped else "") + ")")
    return 0


# Eval sets in clip_benchmark's layout (orchestrator/data/evalsets.py): DEST/test/{0..n-1}.tar,
# nshards.txt, dataset_type.txt, classnames.txt and templates.
EVAL_SET_SOURCES = ("fashion-mnist", "emoji-heldout")


def _eval_set_cli(args, s3cfg, log, holdout) -> int:
    from orchestrator.data import evalsets

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


def _scenes_cli(args, s3cfg, log) -> int:
    from orchestrator.data.scenes import SceneOptions

    for flag, given in (("--holdout", args.holdout), ("--limit", args.limit)):
        if given is not None:
            raise UserError(f"{flag}: not an emoji-scenes option; scenes hold out whole concepts with "
                            "--heldout-concepts N and are counted with --train-scenes / --eval-scenes")
    opts = SceneOptions(grid=args.grid, cell=args.cell, min_objects=args.min_objects, max_objects=args.max_objects,
                        concepts=args.concepts, heldout_concepts=args.heldout_concepts,
                        train_scenes=args.train_scenes, eval_scenes=args.eval_scenes, seed=args.seed)
    opts.check()
    m = write_emoji_scenes(args.out, opts, args.samples_per_shard, s3cfg=s3cfg, log=log)
    sc = m["scenes"]
    evals = ", ".join(f"{e['samples']} in {args.out.rstrip('/')}/{name}" for name, e in sc["eval_sets"].items())
    print(f"wrote {m['splits']['train']['samples']} training scenes ({sc['image_size']} px, {sc['grid']}x{sc['grid']} "
          f"cells of {sc['cell']} px, {sc['min_objects']}-{sc['max_objects']} objects, {len(sc['concepts'])} concepts) "
          f"in {m['splits']['train']['num_shards']} shards to {args.out.rstrip('/')}/train, eval scenes {evals} "
          f"(clip_benchmark layout; manifest fingerprint {m['fingerprint']})")
    return 0
