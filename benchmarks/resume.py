"""Resume cost: how long until a worker has its first batch after resuming mid-epoch.

A resumed worker builds its stream from the checkpoint's position (orchestrator/data/plan.py): it
reads the shuffle window that holds that position, then carries on. This measures, on one worker
with the training decoder (uint8 images, CLIP BPE over the shards' compact vocabulary):
  start    first batch at the start of an epoch (the cost of any epoch's first batch)
  resume   first batch at positions inside the epoch (25%, 50%, 90%, each mid-window)
  replay   what resuming by replaying the epoch's stream up to the position would cost (the
           baseline: Ray Data's iterator has no resume, Ray issue 37633), at the 50% position
Each figure is the median of --repeats fresh streams. The epoch is the Twemoji demo shards
(data/emoji/train when present, else built here), its shard list taken --repeat times.

    python benchmarks/resume.py [--shards DIR] [--batch-size 64] [--repeats 3]

Last line: one JSON object with `resume_first_batch_s`, `start_first_batch_s`, `replay_s` and
`resume_vs_start` / `replay_vs_resume` ratios.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", default=None)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--shuffle-buffer", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode-concurrency", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=4, help="passes over the shard list per epoch (a longer epoch)")
    args = ap.parse_args()

    import ray

    from benchmarks.ingest import make_decoder
    from orchestrator.data.plan import EpochStream, TrainSource
    from orchestrator.data.sizes import shard_counts

    root = Path(__file__).resolve().parents[1]
    shard_dir = Path(args.shards) if args.shards else root / "data" / "emoji" / "train"
    if not shard_dir.exists():
        from orchestrator.data.shards import write_emoji_shards

        out = tempfile.mkdtemp(prefix="llip-resume-")
        write_emoji_shards(out, samples_per_shard=256, seed=0)
        shard_dir = Path(out) / "train"
    paths = sorted(str(p) for p in shard_dir.glob("*.tar")) * args.repeat
    counts = shard_counts(str(shard_dir), paths, None)
    decoder = make_decoder(32, True, paths)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    src = TrainSource(location=str(shard_dir), paths=tuple(paths), counts=tuple(counts), fs=None, seed=0,
                      window=args.shuffle_buffer, decoder=decoder, concurrency=args.decode_concurrency, num_cpus=0.5)
    plan = src.plan(0)
    size = plan.size
    print(f"resume: {len(paths)} shards, {size} samples, {len(plan.windows)} shuffle windows of >= "
          f"{args.shuffle_buffer}, batch {args.batch_size}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
          flush=True)

    def first_batch(pos: int) -> float:
        t0 = time.perf_counter()
        stream = EpochStream(src, 0, [(pos, size)], args.batch_size)
        assert stream.next_batch() is not None
        return time.perf_counter() - t0

    def replay(pos: int) -> float:
        """The epoch from its start, skipping `pos` samples before the first batch trained on."""
        t0 = time.perf_counter()
        stream = EpochStream(src, 0, [(0, size)], args.batch_size)
        while stream.next_pos < pos:
            assert stream.next_batch() is not None
        assert stream.next_batch() is not None
        return time.perf_counter() - t0

    def mid_window(frac: float) -> int:
        p = int(size * frac)
        w = next(w for w in plan.windows if w.start <= p < w.start + w.size)
        return w.start + w.size // 2

    first_batch(0)  # warm-up: Ray Data's first execution in this process
    start = statistics.median(first_batch(0) for _ in range(args.repeats))
    resume = {f: statistics.median(first_batch(mid_window(f)) for _ in range(args.repeats)) for f in (0.25, 0.5, 0.9)}
    rep = statistics.median(replay(mid_window(0.5)) for _ in range(args.repeats))
    ray.shutdown()
    for f, t in resume.items():
        print(f"  first batch resuming at {int(f * 100)}% of the epoch: {t:.2f} s")
    print(f"  first batch at the epoch start: {start:.2f} s")
    print(f"  replaying the stream to 50% instead: {rep:.2f} s")
    worst = max(resume.values())
    print(json.dumps({"resume_first_batch_s": round(worst, 3), "start_first_batch_s": round(start, 3),
                      "replay_s": round(rep, 3), "resume_vs_start": round(worst / start, 3),
                      "replay_vs_resume": round(rep / resume[0.5], 2), "samples": size,
                      "window": args.shuffle_buffer, "batch_size": args.batch_size,
                      "load_average": round(os.getloadavg()[0], 1)}))


if __name__ == "__main__":
    main()
