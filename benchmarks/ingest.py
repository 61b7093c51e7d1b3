"""Ingest throughput: the Ray Data pipeline vs a plain `webdataset` + torch DataLoader loader.

Both read the same WebDataset shards (real Twemoji data, built here unless --shards is given) and
run the SAME decode + preprocessing + tokenization code (orchestrator.data.decode.Decoder, which calls
llip_core.preprocess, with the tokenizer a real run of the tiny size builds: CLIP BPE over the compact
vocabulary of these shards' captions) with the same number of parallel decode workers, and both hand
out torch batches. Both are measured at each of --workers (default 1 and 2 decode tasks) so scaling is
visible; the headline ratio is at the last count. The figure is samples/s over whole epochs after
one warm-up epoch (which absorbs Ray's and the DataLoader's worker start-up). An "epoch" is the shard list --repeat times (default 4:
~14k Twemoji samples), so the per-epoch start-up cost is amortised about as in a real epoch;
--repeat 1 measures a single pass. Epochs alternate between the two loaders so that load from
other processes on the machine hits both alike; the ratio is the median of the per-pair ratios.
Ray's workers run at the same OS priority as the DataLoader's (RAY_worker_niceness=0; Ray's
default of 15 only matters on a machine shared with other work, as this one may be).

    python benchmarks/ingest.py [--image-size 32] [--workers 1 2] [--epochs 3] [--repeat 4] [--shards DIR]

Last line: one JSON object with the headline figures, including `ray_vs_plain_ratio`
(target >= 0.8 on one machine).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_shards(samples_per_shard: int) -> Path:
    from orchestrator.data.shards import write_emoji_shards

    out = Path(tempfile.mkdtemp(prefix="llip-ingest-"))
    write_emoji_shards(str(out), samples_per_shard=samples_per_shard, seed=0)
    return out / "train"


def make_decoder(image_size: int, augment: bool, urls: list[str]):
    """The decoder a real run of the tiny size builds: CLIP BPE with the compact vocabulary read from
    these shards' captions (orchestrator.training.tokenization, as the driver does before training)."""
    from llip_core.config import SIZES
    from llip_core.tokenizer import build_compact_spec, build_tokenizer, tokenizer_spec
    from orchestrator.data.decode import Decoder
    from orchestrator.training.tokenization import shard_captions

    tiny = SIZES["tiny"]
    spec = build_compact_spec(tokenizer_spec(tiny.tokenizer, tiny.context_length, tiny.vocab_size, tiny.vocab),
                              shard_captions(sorted(set(urls))))
    return Decoder(image_size=image_size, vocab_size=build_tokenizer(spec).vocab_size,
                   context_length=tiny.context_length, augment=augment, seed=0, stats=None, tokenizer=spec,
                   uint8=True)  # as training decodes: uint8 images, normalized on the worker


# ---- plain loader: webdataset + DataLoader workers -------------------------------------------
def _to_raw(samples):
    """webdataset samples (bytes, decoder-less) -> the raw column batch the Decoder takes."""
    cols = {"key": [], "url": [], "image": [], "txt": [], "json": [], "error": []}
    for s in samples:
        cols["key"].append(s["__key__"])
        cols["url"].append(s["__url__"])
        cols["image"].append(s.get("png") or s.get("jpg"))
        cols["txt"].append(s.get("txt"))
        cols["json"].append(s.get("json"))
        cols["error"].append(None)
    return {k: np.array(v, dtype=object) for k, v in cols.items()}


def plain_loader(urls: list[str], decoder, batch_size: int, workers: int):
    import torch
    import webdataset as wds

    def decode(raw):
        out = decoder(raw)
        return {k: torch.from_numpy(v) for k, v in out.items()}

    ds = (wds.WebDataset(urls, shardshuffle=False, workersplitter=wds.split_by_worker, empty_check=False)
          .batched(batch_size, collation_fn=_to_raw, partial=True)
          .map(decode))
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                                       prefetch_factor=2 if workers > 0 else None)


# ---- Ray Data pipeline: what each training worker builds per epoch (orchestrator/data/plan.py) ----
def ray_dataset(urls: list[str], decoder, workers: int, decode_cpus: float, window: int = 2048):
    """The whole epoch's plan (one worker): read tasks per shuffle window of `window` samples, in
    plan order, fused with the decoder."""
    from orchestrator.data.plan import TrainSource
    from orchestrator.data.sizes import shard_counts

    counts = shard_counts(str(Path(urls[0]).parent), urls, None)
    src = TrainSource(location="bench", paths=tuple(urls), counts=tuple(counts), fs=None, seed=0, window=window,
                      decoder=decoder, concurrency=workers, num_cpus=decode_cpus)
    return src.dataset(0, [(0, sum(counts))])


def timed_epoch(batches) -> tuple[int, float]:
    t0 = time.perf_counter()
    n = 0
    for b in batches:
        n += int(b["image"].shape[0])
    return n, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", default=None, help="directory of .tar shards (default: build Twemoji shards)")
    ap.add_argument("--image-size", type=int, default=32, help="32: the demo's tiny model")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                    help="parallel decode workers (both loaders), one measurement per count; the last is the headline")
    ap.add_argument("--decode-cpus", type=float, default=0.5, help="Ray: CPUs reserved per read/decode task")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs per loader (after one warm-up each)")
    ap.add_argument("--samples-per-shard", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=4, help="passes over the shard list per epoch")
    ap.add_argument("--no-augment", action="store_true")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    args = ap.parse_args()

    import ray

    shard_dir = Path(args.shards) if args.shards else build_shards(args.samples_per_shard)
    urls = sorted(str(p) for p in shard_dir.rglob("*.tar")) * args.repeat
    decoder = make_decoder(args.image_size, not args.no_augment, urls)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(address="local", num_cpus=args.num_cpus or os.cpu_count(), include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"ingest: {len(urls) // args.repeat} shards x {args.repeat} per epoch, image {args.image_size}px, "
          f"augment={not args.no_augment}, tokenizer {decoder.tokenizer['name']}/{decoder.tokenizer['vocab']} "
          f"({decoder.vocab_size} ids), batch {args.batch_size}, {os.cpu_count()} CPUs visible, "
          f"load average {load:.1f} at start", flush=True)

    results = {}
    for workers in args.workers:
        ds = ray_dataset(urls, decoder, workers, args.decode_cpus)
        ray_batches = lambda: ds.iter_torch_batches(batch_size=args.batch_size, prefetch_batches=2)  # noqa: E731
        plain = plain_loader(urls, decoder, args.batch_size, workers)
        n_ray, t = timed_epoch(ray_batches())
        print(f"  {workers} decode task(s)  warm-up  ray   {n_ray} samples {t:.2f} s", flush=True)
        n_plain, t = timed_epoch(plain)
        print(f"  {workers} decode task(s)  warm-up  plain {n_plain} samples {t:.2f} s", flush=True)
        rates = {"ray": [], "plain": []}
        for e in range(args.epochs):
            # alternate which loader goes first, so a burst of outside load hits both alike
            order = (("ray", ray_batches), ("plain", lambda: plain))
            for name, make in (order if e % 2 == 0 else order[::-1]):
                n, t = timed_epoch(make())
                rates[name].append(n / t)
                print(f"  {workers} decode task(s)  epoch {e}  {name:<5} {n} samples {t:.2f} s  "
                      f"{n / t:8.1f} samples/s", flush=True)
        del plain  # its persistent worker processes go with it
        ratio = statistics.median(r / q for r, q in zip(rates["ray"], rates["plain"]))
        results[workers] = {
            "ray_samples_per_s": round(statistics.median(rates["ray"]), 1),
            "plain_samples_per_s": round(statistics.median(rates["plain"]), 1),
            "ray_vs_plain_ratio": round(ratio, 3),
            "ray_epoch_rates": [round(r, 1) for r in rates["ray"]],
            "plain_epoch_rates": [round(r, 1) for r in rates["plain"]],
            "samples_per_epoch": n_ray, "plain_samples_per_epoch": n_plain,
        }
    ray.shutdown()
    print("decode tasks   ray data samples/s   plain samples/s   ray / plain (median of interleaved pairs)")
    for workers, r in results.items():
        print(f"{workers:>12}   {r['ray_samples_per_s']:>18.1f}   {r['plain_samples_per_s']:>15.1f}   "
              f"{r['ray_vs_plain_ratio']:.2f}")
    head = results[args.workers[-1]]
    print(f"headline ({args.workers[-1]} decode tasks): ray / plain = {head['ray_vs_plain_ratio']:.2f} (target >= 0.8); "
          f"load average {os.getloadavg()[0]:.1f} at the end", flush=True)
    print(json.dumps({
        "ray_samples_per_s": head["ray_samples_per_s"], "plain_samples_per_s": head["plain_samples_per_s"],
        "ray_vs_plain_ratio": head["ray_vs_plain_ratio"], "decode_workers": args.workers[-1],
        "by_decode_tasks": {str(k): v for k, v in results.items()},
        "image_size": args.image_size, "epochs": args.epochs, "augment": not args.no_augment,
        "tokenizer": f"{decoder.tokenizer['name']}/{decoder.tokenizer['vocab']}", "cpus": os.cpu_count(),
        "repeat": args.repeat, "load_average_start": round(load, 1),
    }))


if __name__ == "__main__":
    main()
