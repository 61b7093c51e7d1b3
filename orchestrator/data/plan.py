"""The training stream as a plan: every epoch's sample order is a function of (seed, epoch, shards),
so a checkpoint can say where in the epoch it was and a restart continues from there.

Why not Ray Data's streaming_split and a local shuffle buffer: the split deals blocks to whichever
worker asks first and the buffer's contents are lost with the process, so neither can be restored
(Ray issue 37633). Here the order is computed, and Ray Data only does the parallel work (read and
decode tasks, backpressure, scheduling on any node), in order (preserve_order).

The plan of one epoch
  shards    reshuffled per epoch: a permutation seeded by (seed, epoch).
  windows   consecutive shards of that order grouped until a group holds at least
            `data.shuffle_buffer` samples (one shard alone when a shard is that big). Each window's
            samples are permuted, seeded by (seed, epoch, window). This plays the shuffle buffer's
            part: a sample moves anywhere within at least shuffle_buffer neighbours. A read task
            holds one window's raw bytes.
  positions the windows' permuted samples concatenated: position p in [0, L) names one sample.
  workers   worker r of N takes the r-th of N contiguous, equal (+-1) runs of positions, so each
            reads about 1/N of the windows. Ranks step in lockstep: the epoch ends for all when one
            of them has no full batch left (samples dropped as unreadable make runs uneven).

The data position (`DataPosition`, in every checkpoint) is the epoch and, per worker, the positions
it had not yet consumed. A restart with the same number of workers gives each its own remainder,
so the sample sequence after the resume equals an uninterrupted run's; with another number of
workers (elastic) the remainder is dealt out again in contiguous equal runs, so every remaining
sample of the epoch is still seen once. Sample counts per shard come from the shards' manifest
(`llip shards` writes one), else from reading each tar's headers once.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from orchestrator.data.sizes import open_shard, shard_counts
from orchestrator.errors import UserError

Interval = tuple[int, int]  # [start, end) in an epoch's positions
_SHARD_SALT, _WINDOW_SALT = 0x5A4D, 0x317D  # keep the two permutations' streams apart


# --------------------------------------------------------------------------------------------
# intervals
# --------------------------------------------------------------------------------------------
def total(intervals: Sequence[Interval]) -> int:
    return int(sum(b - a for a, b in intervals))


def after(intervals: Sequence[Interval], nxt: int) -> list[Interval]:
    """The part of `intervals` at or after position `nxt`."""
    return [(max(a, nxt), b) for a, b in intervals if b > max(a, nxt)]


def split(intervals: Sequence[Interval], n: int) -> list[list[Interval]]:
    """`intervals` (ascending, disjoint) cut into n contiguous runs whose sizes differ by at most one."""
    size = total(intervals)
    bounds = [size * r // n for r in range(n + 1)]
    out: list[list[Interval]] = [[] for _ in range(n)]
    seen = 0  # positions before the current interval, counted over `intervals`
    for a, b in intervals:
        for r in range(n):
            lo, hi = max(bounds[r], seen), min(bounds[r + 1], seen + b - a)
            if lo < hi:
                out[r].append((a + lo - seen, a + hi - seen))
        seen += b - a
    return out


# --------------------------------------------------------------------------------------------
# shard sample counts
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# the epoch plan
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Window:
    start: int  # first position
    shards: tuple[int, ...]  # indices into the plan's paths, in read order
    size: int


@dataclass(frozen=True)
class EpochPlan:
    paths: tuple[str, ...]
    counts: tuple[int, ...]
    seed: int
    epoch: int
    window: int  # data.shuffle_buffer; 0 or 1: no permutation inside windows

    @cached_property
    def shard_order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch, _SHARD_SALT]).permutation(len(self.paths))

    @cached_property
    def windows(self) -> tuple[Window, ...]:
        out, cur, size, start = [], [], 0, 0
        for s in self.shard_order.tolist():
            cur.append(s)
            size += self.counts[s]
            if size >= max(1, self.window):
                out.append(Window(start, tuple(cur), size))
                start, cur, size = start + size, [], 0
        if cur:
            out.append(Window(start, tuple(cur), size))
        return tuple(w for w in out if w.size > 0)

    @property
    def size(self) -> int:
        return int(sum(self.counts))

    def permutation(self, w: int) -> np.ndarray:
        """perm[o] = which sample of window w (in read order) sits at offset o."""
        win = self.windows[w]
        if self.window <= 1:
            return np.arange(win.size)
        return np.random.default_rng([self.seed, self.epoch, w, _WINDOW_SALT]).permutation(win.size)

    def clip(self, w: int, intervals: Sequence[Interval]) -> list[Interval]:
        """The parts of `intervals` inside window w."""
        win = self.windows[w]
        end = win.start + win.size
        return [(max(a, win.start), min(b, end)) for a, b in intervals if a < end and b > win.start]

    def owns_start(self, w: int, intervals: Sequence[Interval]) -> bool:
        """Whether `intervals` hold window w's first position: that worker alone counts the window's
        damaged shards, however many workers share the window."""
        return any(a <= self.windows[w].start < b for a, b in intervals)

    def windows_overlapping(self, intervals: Sequence[Interval]) -> list[int]:
        return [w for w in range(len(self.windows)) if self.clip(w, intervals)]

    def worker_intervals(self, num_workers: int) -> list[list[Interval]]:
        return split([(0, self.size)], num_workers)

    def positions(self, intervals: Sequence[Interval]) -> list[tuple[int, int, int]]:
        """(position, shard index, ordinal in the shard) for every position in `intervals`, in
        order: the reference the read tasks are tested against."""
        out = []
        for w in self.windows_overlapping(intervals):
            win, perm = self.windows[w], self.permutation(w)
            refs = [(s, k) for s in win.shards for k in range(self.counts[s])]
            for o in range(win.size):
                p = win.start + o
                if any(a <= p < b for a, b in intervals):
                    out.append((p, *refs[perm[o]]))
        return out


# --------------------------------------------------------------------------------------------
# the data position stored in checkpoints
# --------------------------------------------------------------------------------------------
@dataclass
class DataPosition:
    """Where an epoch stands: per worker, the positions it has not consumed yet."""
    epoch: int
    remaining: list[list[Interval]]  # one list per worker of the run that wrote it

    def to_json(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "remaining": [[list(iv) for iv in r] for r in self.remaining]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "DataPosition":
        return cls(int(d["epoch"]), [[(int(a), int(b)) for a, b in r] for r in d["remaining"]])

    def for_workers(self, n: int) -> list[list[Interval]]:
        """Same worker count: each keeps its own remainder (the stream continues as if never
        stopped). Otherwise the union is dealt out again in contiguous equal runs."""
        if n == len(self.remaining):
            return [list(r) for r in self.remaining]
        union = sorted(iv for r in self.remaining for iv in r)
        return split(union, n)


# --------------------------------------------------------------------------------------------
# Ray Data: read tasks that follow the plan
# --------------------------------------------------------------------------------------------
def window_tables(plan: EpochPlan, w: int, intervals: Sequence[Interval], fs, chunk_rows: int) -> Iterator:
    """One window's samples inside `intervals`, in plan order, as pyarrow tables of raw bytes with a
    `pos` column. Reads the window's shards whole (their raw bytes are held until emitted); a
    damaged shard's marker row goes out first so the decoder counts it."""
    import pyarrow as pa

    from orchestrator.data.tars import arrow_schema, read_tar_stream

    win = plan.windows[w]
    rows: list[Optional[dict]] = []
    markers: list[dict] = []
    for s in win.shards:
        path, got = plan.paths[s], []
        with open_shard(path, fs) as f:
            for t in read_tar_stream(f, path, chunk_rows=1 << 30):
                for row in t.to_pylist():
                    (markers if row["error"] is not None else got).append(row)
        # a shard shorter than its count (truncated since it was counted) leaves holes, not a shift
        rows += got[: plan.counts[s]] + [None] * max(0, plan.counts[s] - len(got))
    perm = plan.permutation(w)
    schema = arrow_schema().append(pa.field("pos", pa.int64()))
    batch: list[dict] = [{**m, "pos": -1} for m in markers] if plan.owns_start(w, intervals) else []
    for lo, hi in plan.clip(w, intervals):
        for p in range(lo, hi):
            row = rows[perm[p - win.start]]
            if row is None:
                continue
            batch.append({**row, "pos": p})
            if len(batch) >= chunk_rows:
                yield pa.Table.from_pylist(batch, schema=schema)
                batch = []
    if batch:
        yield pa.Table.from_pylist(batch, schema=schema)


def timed_read(tables: Iterator, stats) -> Iterator:
    """`tables` passed through, adding the CPU time spent producing them (reading and grouping
    tars) to `stats` as data/read_cpu_ms. Thread CPU time inside next() only: what the consumer
    of each table does in between is not counted."""
    import time

    ms = 0.0
    while True:
        t0 = time.thread_time()
        t = next(tables, None)
        ms += 1000 * (time.thread_time() - t0)
        if t is None:
            break
        yield t
    if stats is not None:
        stats.add({"data/read_cpu_ms": int(ms)})


def _plan_datasource(plan: EpochPlan, intervals: Sequence[Interval], fs, chunk_rows: int, stats=None):
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class PlanDatasource(Datasource):
        """One read task per window overlapping the worker's positions, in plan order."""

        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None):
            tasks = []
            for w in plan.windows_overlapping(intervals):
                mine = plan.clip(w, intervals)
                meta = BlockMetadata(num_rows=total(mine), size_bytes=None, exec_stats=None,
                                     input_files=tuple(plan.paths[s] for s in plan.windows[w].shards))
                tasks.append(ReadTask(
                    lambda w=w, mine=mine: timed_read(window_tables(plan, w, mine, fs, chunk_rows), stats), meta))
            return tasks

    return PlanDatasource()


@dataclass
class TrainSource:
    """Everything a worker needs to build any epoch's stream: picklable, built once by the driver."""
    location: str
    paths: tuple[str, ...]
    counts: tuple[int, ...]
    fs: Any
    seed: int
    window: int
    decoder: Any  # orchestrator.data.decode.Decoder (its epoch is set per epoch)
    concurrency: int
    num_cpus: float
    cpu_limit: Optional[float] = None  # this worker's share of the run's data CPUs
    # orchestrator.data.shared_decode.CacheSpec, set by its `attach`, whose CachedTrainSource reads the
    # sweep's shared decode instead of decoding (same rows)
    cache: Any = None

    def plan(self, epoch: int) -> EpochPlan:
        return EpochPlan(tuple(self.paths), tuple(self.counts), self.seed, epoch, self.window)

    def dataset(self, epoch: int, intervals: Sequence[Interval]):
        """The Ray dataset of this worker's positions of `epoch`: decoded rows in plan order with
        their `pos`."""
        import dataclasses

        import ray.data

        from orchestrator.data.decode import decode_batch_rows, decode_dataset

        plan = self.plan(epoch)
        src = _plan_datasource(plan, intervals, self.fs, decode_batch_rows(self.decoder.image_size),
                               self.decoder.stats)
        n_tasks = max(1, len(plan.windows_overlapping(intervals)))
        raw = ray.data.read_datasource(src, num_cpus=self.num_cpus, concurrency=self.concurrency,
                                       override_num_blocks=n_tasks)
        ds = decode_dataset(raw, dataclasses.replace(self.decoder, epoch=epoch), self.concurrency, self.num_cpus)
        opts = ds.context.execution_options
        opts.preserve_order = True  # the plan's order is the order trained on
        if self.cpu_limit:
            from ray.data import ExecutionResources

            opts.resource_limits = ExecutionResources(cpu=self.cpu_limit)
        from orchestrator.data.pacing import paced

        return paced(ds)

    def batches(self, epoch: int, intervals: Sequence[Interval], batch_size: int, dtypes: dict):
        """This worker's full batches of `epoch` as torch tensors, in plan order (the last partial
        batch dropped)."""
        return self.dataset(epoch, intervals).iter_torch_batches(batch_size=batch_size, drop_last=True,
                                                                 dtypes=dtypes, prefetch_batches=2)


def build_train_source(cfg, tokenizer: Optional[dict], stats=None, cpu_limit: Optional[float] = None,
                       num_workers: Optional[int] = None) -> TrainSource:
    """Driver side: resolve the training shards (preflight), count their samples, set up the decoder."""
    from orchestrator.data.decode import Decoder
    from orchestrator.data.reading import resolve_shards

    d, m = cfg.data, cfg.model.resolve()
    loc = cfg.train_location()
    paths, fs = resolve_shards(loc, d.s3, "data.train")
    counts = shard_counts(loc, paths, fs, d.s3)
    if sum(counts) == 0:
        raise UserError(f"data.train: the shards at {loc} hold no samples; rewrite them with `llip shards ...`")
    online = cfg.curation is not None and cfg.curation.mode == "online"
    dec = Decoder(image_size=m.image_size, vocab_size=m.vocab_size, context_length=m.context_length,
                  augment=d.augment, seed=cfg.seed, stats=stats, captions=d.captions, max_captions=d.max_captions,
                  curation_seed=cfg.curation.seed if online else None, tokenizer=tokenizer,
                  hflip=d.hflip and d.augment, uint8=True)
    n = num_workers or cfg.scaling.num_workers
    return TrainSource(location=loc, paths=tuple(paths), counts=tuple(counts), fs=fs, seed=cfg.seed,
                       window=d.shuffle_buffer, decoder=dec, concurrency=d.decode_concurrency, num_cpus=d.decode_cpus,
                       cpu_limit=(cpu_limit / n) if cpu_limit else None)


# --------------------------------------------------------------------------------------------
# worker side
# --------------------------------------------------------------------------------------------
class EpochStream:
    """One worker's batches of one epoch, tracking the positions it has consumed.

    `remaining()` is what this worker has not trained on yet (for the checkpoint); `next_batch()`
    returns the next full batch or None at the end (the caller agrees on the end with the other
    ranks)."""

    def __init__(self, source: TrainSource, epoch: int, intervals: Sequence[Interval], local_batch_size: int,
                 multi_caption: bool = False):
        import torch

        self.epoch, self.intervals, self.next_pos = epoch, list(intervals), -1
        dtypes = {"image": torch.uint8, "tokens": torch.int64, "sample_id": torch.int64, "pos": torch.int64,
                  **({"caption_mask": torch.bool} if multi_caption else {})}
        self._it = (iter(source.batches(epoch, self.intervals, local_batch_size, dtypes))
                    if total(self.intervals) else iter(()))
        self._early: Optional[tuple[Any, dict]] = None  # (thread, box) while the first batch is fetched ahead

    def prefetch(self) -> "EpochStream":
        """Start now: the Ray Data execution, the first window's read and the first batch, in a
        thread, so that the batch is ready when the previous epoch ends (the train loop starts
        the next epoch's stream near the end of the current one)."""
        import threading

        if self._early is None and self.next_pos < 0:
            box: dict = {}

            def first():
                try:
                    box["batch"] = next(self._it, None)
                except BaseException as e:  # noqa: BLE001 - raised in next_batch, on the caller's thread
                    box["error"] = e

            t = threading.Thread(target=first, name=f"llip-prefetch-epoch{self.epoch}", daemon=True)
            t.start()
            self._early = (t, box)
        return self

    def next_batch(self) -> Optional[dict]:
        if self._early is not None:
            t, box = self._early
            t.join()
            self._early = None
            if "error" in box:
                raise box["error"]
            b = box.get("batch")
        else:
            b = next(self._it, None)
        if b is not None:
            self.next_pos = int(b["pos"][-1]) + 1
        return b

    def remaining(self) -> list[Interval]:
        return after(self.intervals, self.next_pos) if self.next_pos >= 0 else list(self.intervals)


def gather_remaining(mine: list[Interval], world: int) -> list[list[Interval]]:
    """Every rank's remainder on every rank (a collective: all ranks call it at the same step)."""
    if world == 1:
        return [list(mine)]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, [list(iv) for iv in mine])
    return [[(int(a), int(b)) for a, b in r] for r in out]


def describe(pos: Optional[DataPosition]) -> str:
    if pos is None:
        return "start of the epoch"
    return f"epoch {pos.epoch}, {sum(total(r) for r in pos.remaining)} positions left"
