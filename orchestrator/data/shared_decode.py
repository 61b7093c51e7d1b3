"""Sweeps decode once: one shared read+decode pass per data setting, consumed by every trial.

Why it works: the training stream is a plan (orchestrator/data/plan.py), so what a worker trains on
is a function of (shards, seed, epoch, window, decoder) alone. Trials with the same data settings
therefore need the very same decoded rows; a sweep over K, tau or the loss decodes each window once
and every trial reads it back, and trials see identical batches in identical order (common random
numbers: comparisons between trials are less noisy).

Parts
  key       `data_key(source)`: a fingerprint of what determines the decoded rows (shard paths and
            counts, seed, window, the Decoder's fields except its stats and epoch). A swept data.*
            key or model.image_size changes it, and such trials get a pass of their own.
  files     `<root>/<key>/e<epoch:04d>/w<window:06d>.npz`: one plan window's decoded rows in plan
            order (pos, image uint8, tokens, sample_id[, caption_mask]) and the decode counts
            (seen/skipped...). Local: written to a temporary name and renamed; S3: one object, which
            appears whole or not at all.
  producer  `DataPass`, one Ray actor per sweep and key, started by the sweep's registry actor
            (itself owned by the sweep driver, so a crashing trial takes neither down). It runs the
            same read+decode code as a trial's pipeline, one Ray task per window with
            data.decode_cpus each, at most data.decode_concurrency at once: that is its CPU
            reservation, and trials attached to it reserve no data CPUs of their own. It is demand
            driven: it decodes a window only when a trial's reader asks for it (plus the next
            `decode_concurrency` windows), so when no trial asks any more (ASHA stopped them, all
            finished) it decodes nothing more.
  consumer  `cache_batches`: what `batches(epoch, intervals, ...)` gives for the CachedTrainSource
            that `attach` makes of a trial's TrainSource: a thread in the training process asks
            the producer for each window overlapping the worker's positions, in plan order (the
            ask waits for the window's file), reads the file, keeps the worker's positions and
            cuts batches; the batches equal the decode path's (tests/test_datacache.py compares
            ids, pixels and tokens). It runs `decode_concurrency` windows ahead of training, no
            more. If the producer is gone or failed on that window, the thread decodes the window
            itself, with the same code.

Why plain Ray tasks under an actor and not one Ray Data execution per epoch: Ray Data's streaming
executor paces itself by its consumer's iteration, and here the consumers are other processes that
come and go; a small scheduler that launches the same read+decode function per demanded window is
what makes "stopped trials release their share" true at window granularity.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import shutil
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from orchestrator.data.plan import TrainSource
from orchestrator.errors import UserError
from orchestrator.storage.paths import exists, read_bytes, write_file

FORMAT = 1  # bump when the file layout changes: old caches then get other keys
COLUMNS = ("pos", "image", "tokens", "sample_id", "caption_mask")
WAIT_S = 5.0  # a reader's ask waits at most this long for its window, then asks again


# --------------------------------------------------------------------------------------------
# the data-settings key and the estimate of what a cache holds
# --------------------------------------------------------------------------------------------
def data_key(source) -> str:
    """Fingerprint of everything that determines a TrainSource's decoded rows."""
    dec = source.decoder
    fields = {f.name: getattr(dec, f.name) for f in dataclasses.fields(dec) if f.name not in ("stats", "epoch")}
    payload = {"format": FORMAT, "location": source.location, "paths": list(source.paths),
               "counts": [int(c) for c in source.counts], "seed": int(source.seed), "window": int(source.window),
               "decoder": fields}
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def row_bytes(image_size: int, context_length: int, captions: int) -> int:
    """One decoded row: uint8 image, int64 tokens per caption, sample id and position, caption mask."""
    return 3 * image_size * image_size + 8 * context_length * captions + 16 + captions


def bytes_per_sample(cfg) -> int:
    m = cfg.resolved_model()
    return row_bytes(m.image_size, m.context_length, cfg.data.max_captions if cfg.data.captions == "all" else 1)


def epochs_needed(cfg, plan_size: int) -> int:
    """Epochs a run of train.steps steps reaches (each worker drops its last partial batch)."""
    n = cfg.scaling.num_workers
    per_epoch = (plan_size // n) // max(1, cfg.data.batch_size // n)
    return max(1, math.ceil(cfg.train.steps / per_epoch)) if per_epoch else 1


def cache_bytes(cfg, plan_size: int) -> int:
    return epochs_needed(cfg, plan_size) * plan_size * bytes_per_sample(cfg)


def _gb(b: float) -> str:
    return f"{b / 1e9:.2f} GB"


# --------------------------------------------------------------------------------------------
# where the files live
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CacheSpec:
    """Picklable: what a trial's readers need to find a key's windows and its producer."""
    root: str  # local directory, or "bucket/prefix" for `fs` (pyarrow S3)
    key: str
    fs: Any = None  # pyarrow S3FileSystem, or None: local
    producer: Optional[str] = None  # the DataPass actor's name
    namespace: Optional[str] = None

    def path(self, epoch: int, w: int) -> str:
        return f"{self.root}/{self.key}/e{epoch:04d}/w{w:06d}.npz"


def split_root(root: str, s3cfg=None) -> tuple[str, Any]:
    """A cache root as (path for the filesystem, pyarrow filesystem or None for local)."""
    if root.startswith("s3://"):
        from orchestrator.storage import s3

        bucket, prefix = s3.split_url(root)
        return f"{bucket}/{prefix}".rstrip("/"), s3.arrow_filesystem(s3cfg)
    if "://" in root:
        raise UserError(f"sweep.shared_data.cache: {root}: give a local folder or s3://bucket/prefix")
    return os.path.abspath(root), None


def encode_window(rows: dict, counts: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, counts=np.array(json.dumps(counts)), **{k: rows[k] for k in COLUMNS if k in rows})
    return buf.getvalue()


def decode_window(data: bytes) -> tuple[dict, dict]:
    z = np.load(io.BytesIO(data), allow_pickle=False)
    return {k: z[k] for k in COLUMNS if k in z.files}, json.loads(str(z["counts"]))


# --------------------------------------------------------------------------------------------
# decoding one window (the producer's task, and a reader's fallback)
# --------------------------------------------------------------------------------------------
class _Tally:
    """Stands in for DataStats inside one task: the window's counts go into its file as well."""

    def __init__(self):
        self.c: dict[str, float] = {}

    def add(self, counts: dict) -> None:
        for k, v in counts.items():
            self.c[k] = self.c.get(k, 0) + v


def decode_window_rows(source, epoch: int, w: int, intervals: Optional[Sequence] = None, stats=None) -> dict:
    """Window w of `epoch` (the part inside `intervals`, default all of it) read and decoded by the
    same code as a trial's pipeline: rows in plan order. Counts (with read and decode CPU
    milliseconds) go to `stats`."""
    from ray.data.block import BlockAccessor

    from orchestrator.data.decode import decode_batch_rows
    from orchestrator.data.plan import timed_read, window_tables

    plan = source.plan(epoch)
    win = plan.windows[w]
    dec = dataclasses.replace(source.decoder, epoch=epoch, stats=stats)
    tables = window_tables(plan, w, intervals or [(win.start, win.start + win.size)], source.fs,
                            decode_batch_rows(dec.image_size))
    parts = [dec(BlockAccessor.for_block(t).to_batch_format("numpy")) for t in timed_read(tables, stats)]
    if not parts:
        return {}
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def produce_window(source, spec: CacheSpec, epoch: int, w: int, stats) -> dict:
    """The producer's task: decode window w of `epoch`, write its file, return small metadata."""
    tally = _Tally()
    rows = decode_window_rows(source, epoch, w, stats=tally)
    counts = {k: v for k, v in tally.c.items() if not k.endswith("_cpu_ms") and k != "data/decoded"}
    t0 = time.thread_time()
    data = encode_window(rows, counts) if rows else encode_window({"pos": np.zeros(0, np.int64)}, counts)
    write_file(spec.fs, spec.path(epoch, w), data)
    tally.c["data/cache_write_cpu_ms"] = int(1000 * (time.thread_time() - t0))
    if stats is not None:
        stats.add(tally.c)
    return {"epoch": epoch, "window": w, "rows": int(len(rows.get("pos", ()))), "bytes": len(data)}


# --------------------------------------------------------------------------------------------
# the producer: one actor per sweep and key
# --------------------------------------------------------------------------------------------
def _data_pass_cls():
    import ray

    @ray.remote(num_cpus=0, max_concurrency=64)
    class DataPass:
        """Decodes the windows trials ask for, each once, `concurrency` tasks at a time."""

        def __init__(self, source, spec: CacheSpec, stats):
            self.source, self.spec, self.stats = source, spec, stats
            self.task = ray.remote(produce_window).options(num_cpus=source.num_cpus, max_retries=1)
            self.cv = threading.Condition()
            self.state: dict[tuple[int, int], str] = {}  # "done" | "running" | "failed: ..."
            self.queue: dict[tuple[int, int], tuple[int, int]] = {}  # waiting -> (priority, order)
            self.order = 0
            self.plans: dict[int, Any] = {}
            self.produced = {"windows": 0, "rows": 0, "bytes": 0}
            threading.Thread(target=self._run, daemon=True).start()

        def _plan(self, epoch: int):
            if epoch not in self.plans:
                self.plans[epoch] = self.source.plan(epoch)
            return self.plans[epoch]

        def need(self, epoch: int, windows: Sequence[int], wait_s: float = 0.0) -> dict[int, str]:
            """A reader needs these windows of `epoch` (in its plan order): their states, after
            waiting up to `wait_s` for all of them to be done or failed. The next `concurrency`
            windows of the epoch are queued behind them as read-ahead."""
            n = len(self._plan(epoch).windows)
            ahead = max(1, self.source.concurrency)
            with self.cv:
                for w in windows:
                    self._enqueue(epoch, w, 0)
                if windows:
                    for w in range(max(windows) + 1, min(n, max(windows) + 1 + ahead)):
                        self._enqueue(epoch, w, 1)
                self.cv.notify_all()

                def states():
                    return {w: self.state.get((epoch, w), "pending") for w in windows}

                if wait_s > 0:
                    self.cv.wait_for(lambda: all(v not in ("pending", "running") for v in states().values()),
                                     timeout=wait_s)
                return states()

        def _enqueue(self, epoch: int, w: int, prio: int) -> None:
            k = (epoch, w)
            if k in self.state:
                return
            if k in self.queue:
                if prio < self.queue[k][0]:  # read-ahead became a demand
                    self.queue[k] = (prio, self.queue[k][1])
                return
            self.order += 1
            self.queue[k] = (prio, self.order)

        def summary(self) -> dict:
            with self.cv:
                return {**self.produced, "failed": sum(1 for s in self.state.values() if s.startswith("failed"))}

        def _run(self) -> None:
            running: dict[Any, tuple[int, int]] = {}
            while True:
                with self.cv:
                    while not self.queue and not running:
                        self.cv.wait()
                    while self.queue and len(running) < max(1, self.source.concurrency):
                        k = min(self.queue, key=lambda x: (self.queue[x], x))
                        del self.queue[k]
                        if exists(self.spec.fs, self.spec.path(*k)):  # an earlier sweep or pass wrote it
                            self.state[k] = "done"
                            self.cv.notify_all()
                            continue
                        self.state[k] = "running"
                        running[self.task.remote(self.source, self.spec, k[0], k[1], self.stats)] = k
                if not running:
                    continue
                ready, _ = ray.wait(list(running), num_returns=1, timeout=0.2)
                for ref in ready:
                    k = running.pop(ref)
                    try:
                        meta = ray.get(ref)
                        with self.cv:
                            self.state[k] = "done"
                            self.produced["windows"] += 1
                            self.produced["rows"] += meta["rows"]
                            self.produced["bytes"] += meta["bytes"]
                            self.cv.notify_all()
                    except Exception as e:  # readers of this window decode it themselves
                        from orchestrator.errors import one_line

                        with self.cv:
                            self.state[k] = f"failed: {one_line(e)}"
                            self.cv.notify_all()

    return DataPass


# --------------------------------------------------------------------------------------------
# the registry: one actor per sweep, owned by the sweep driver; producers per key
# --------------------------------------------------------------------------------------------
def _registry_cls():
    import ray

    @ray.remote(num_cpus=0, max_concurrency=16)
    class SharedDataRegistry:
        def __init__(self, run_name: str, root: str, fs, max_bytes: float):
            self.run_name, self.root, self.fs, self.max_bytes = run_name, root, fs, max_bytes
            self.lock = threading.Lock()
            self.passes: dict[str, dict] = {}  # key -> {"actor", "name", "stats", "bytes"}

        def attach(self, key: str, source, need_bytes: int) -> tuple[Optional[CacheSpec], str]:
            """This trial's producer (created on first use), or None and why the trial decodes
            its own data (the cache would outgrow sweep.shared_data.max_gb or the disk)."""
            from orchestrator.data.reading import DataStats

            with self.lock:
                p = self.passes.get(key)
                grow = max(0, need_bytes - (p["bytes"] if p else 0))
                used = sum(q["bytes"] for q in self.passes.values())
                if grow and used + grow > self.max_bytes:
                    return None, (f"cache for data key {key} would reach {_gb(used + grow)}, above "
                                  f"sweep.shared_data.max_gb {_gb(self.max_bytes)}")
                free = free_bytes(self.root) if self.fs is None else None
                if grow and free is not None and grow > free:
                    return None, f"{self.root} has {_gb(free)} free, the cache needs {_gb(grow)} more"
                if p is None:
                    name = f"llip-datapass-{self.run_name}-{key}"
                    spec = CacheSpec(self.root, key, self.fs, name, ray.get_runtime_context().namespace)
                    stats = DataStats.create()
                    actor = _data_pass_cls().options(name=name).remote(source, spec, stats)
                    p = self.passes[key] = {"actor": actor, "spec": spec, "stats": stats, "bytes": 0}
                p["bytes"] += grow
                return p["spec"], ""

        def summary(self) -> dict:
            out = {}
            for key, p in self.passes.items():
                try:
                    out[key] = {**ray.get(p["actor"].summary.remote(), timeout=30), **p["stats"].snapshot()}
                except Exception as e:
                    out[key] = {"error": type(e).__name__}
            return out

    return SharedDataRegistry


def free_bytes(path: str) -> Optional[int]:
    p = os.path.abspath(path)
    while p and not os.path.exists(p):
        p = os.path.dirname(p)
    try:
        return shutil.disk_usage(p or "/").free
    except OSError:
        return None


# --------------------------------------------------------------------------------------------
# sweep-driver side
# --------------------------------------------------------------------------------------------
@dataclass
class SharedData:
    """The sweep's handle on its shared data pass."""
    registry: Any
    name: str
    root: str
    fs: Any
    default_root: bool
    cpus: float  # what the producer's tasks hold at most

    def meta(self) -> dict:
        return {"registry": self.name, "cpus": self.cpus}

    def finish(self, client, parent_id: str, remove: bool) -> dict:
        """Log what the shared pass did on the sweep's parent run, stop it, and (the default
        location, sweep complete) delete its files."""
        import ray

        try:
            summary = ray.get(self.registry.summary.remote(), timeout=60)
        except Exception:
            summary = {}
        tot: dict[str, float] = {}
        for s in summary.values():
            for k, v in s.items():
                if isinstance(v, (int, float)):
                    tot[k] = tot.get(k, 0) + v
        metrics = {"data_shared/keys": float(len(summary))}
        for k in ("windows", "rows", "bytes", "failed"):
            metrics[f"data_shared/{k}"] = float(tot.get(k, 0))
        for k in ("data/decoded", "data/seen", "data/skipped", "data/read_cpu_ms", "data/decode_cpu_ms",
                  "data/cache_write_cpu_ms"):
            metrics["data_shared/" + k.split("/", 1)[1]] = float(tot.get(k, 0))
        try:
            from orchestrator.tracking.store import log_metrics

            log_metrics(client, parent_id, metrics)
            client.set_tag(parent_id, "llip.shared_data", json.dumps(summary, sort_keys=True)[:5000])
        except Exception as e:
            print(f"[llip] warning: could not log the shared data pass: {type(e).__name__}", flush=True)
        try:
            ray.kill(self.registry)  # its producers and stats actors go with it (it owns them)
        except Exception:
            pass
        if remove and self.default_root:
            try:
                if self.fs is None:
                    shutil.rmtree(self.root, ignore_errors=True)
                else:
                    self.fs.delete_dir(self.root)
            except Exception:
                pass
        return metrics


def off_line(why: str) -> str:
    return f"[llip] shared data pass off: {why}; trials decode their own data"


# --------------------------------------------------------------------------------------------
# is it worth it? (sweep.shared_data.enabled: auto)
# --------------------------------------------------------------------------------------------
PROBE_SAMPLES = 64
CPU_FLOPS_GUESS = 20e9  # FLOP/s of one CPU thread on a training step, to skip probing huge models


def _probe_spec(cfg) -> dict:
    """The trials' tokenizer without a compact table (the table maps ids; the cost is the same)."""
    from llip_core.tokenizer import tokenizer_spec

    m = cfg.resolved_model()
    vocab = 49408 if m.tokenizer == "clip_bpe" else m.vocab_size
    return tokenizer_spec(m.tokenizer, m.context_length, vocab, "full")


def decode_seconds_per_sample(cfg, n: int = PROBE_SAMPLES) -> float:
    """Thread CPU seconds per sample of the trials' own Decoder (read, decode, augment, tokenize) on
    the first n samples of the first shard, in this process."""
    import dataclasses

    import pyarrow as pa

    from orchestrator.data.plan import build_train_source
    from orchestrator.data.sizes import open_shard
    from orchestrator.data.tars import read_tar_stream

    source = build_train_source(cfg, _probe_spec(cfg))
    rows: list[pa.Table] = []
    for path in source.paths:
        with open_shard(path, source.fs) as f:
            for t in read_tar_stream(f, path, chunk_rows=n):
                rows.append(t)
                if sum(len(r) for r in rows) >= n:
                    break
        if sum(len(r) for r in rows) >= n:
            break
    table = pa.concat_tables(rows).slice(0, n)
    batch = {k: np.asarray(table.column(k).to_pylist(), dtype=object) for k in table.column_names}
    dec = dataclasses.replace(source.decoder, stats=None, epoch=0)
    dec(batch)  # warm: imports, the tokenizer's tables, the image codec
    t0 = time.thread_time()
    dec(batch)
    return (time.thread_time() - t0) / max(1, len(table))


def train_seconds_per_sample(cfg, batch: Optional[int] = None, steps: int = 2) -> float:
    """CPU seconds per sample of a training step (forward, backward, AdamW) of the trials' model on
    the CPUs one worker holds, in this process, at a worker's batch size (at most 64: the pairwise
    losses cost more a sample in bigger batches); estimated from FLOPs for a model too big to probe."""
    import torch

    from llip_core.flops import train_step_flops
    from llip_core.optim import build_optimizer
    from llip_core.task import build_task
    from llip_core.tokenizer import eot_id

    m = cfg.resolved_model()
    batch = batch or max(2, min(64, cfg.data.batch_size // cfg.scaling.num_workers))
    guess = train_step_flops(m, batch) / batch / CPU_FLOPS_GUESS
    if guess > 0.25:
        return guess
    threads = cfg.torch_threads()  # as the trial's worker sets them
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        task = build_task(m, cfg.loss.type, multi_caption=cfg.data.captions == "all")
        opt = build_optimizer(task, 1e-4, (0.9, 0.95), 1e-6, 0.0)
        images = torch.randn(batch, 3, m.image_size, m.image_size, generator=g)
        tokens = torch.randint(4, m.vocab_size, (batch, m.context_length), generator=g)
        tokens[:, -1] = eot_id(m.tokenizer, m.vocab)  # full-length captions: the costliest case
        if cfg.data.captions == "all":
            tokens = tokens[:, None].expand(batch, cfg.data.max_captions, m.context_length).contiguous()
        mask = torch.ones(batch, cfg.data.max_captions, dtype=torch.bool) if cfg.data.captions == "all" else None

        def step():
            loss = (task(images, tokens, mask) if mask is not None else task(images, tokens))["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        step()  # warm
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        return (time.perf_counter() - t0) / steps / batch
    finally:
        torch.set_num_threads(old)


def decode_share(cfg) -> tuple[float, Optional[float], float]:
    """(decode s/sample, train s/sample or None on GPU trials, decode share of a sample's work)."""
    d = decode_seconds_per_sample(cfg)
    if cfg.scaling.use_gpu:
        return d, None, 1.0  # GPU trials: the CPUs' decoding is what feeds them; sharing it pays
    t = train_seconds_per_sample(cfg)
    return d, t, d / (d + t)


def start_shared_data(cfg, run_name: str) -> Optional[SharedData]:
    """The sweep's shared pass, or None (after one line saying why) when it is off, when `auto` finds
    decoding too small a share of a trial's work to pay for the cache, or when the base config's
    cache would not fit sweep.shared_data.max_gb or the disk. Called after Ray is up."""
    from orchestrator.data.plan import build_train_source
    from orchestrator.storage.paths import storage_path

    sd = cfg.sweep.shared_data
    if sd.enabled is False:
        return None
    if sd.enabled == "auto":
        d, t, share = decode_share(cfg)
        work = (f"decoding {1e3 * d:.2f} ms of CPU a sample against {1e3 * t:.2f} ms of training, measured"
                if t is not None else f"decoding {1e3 * d:.2f} ms of CPU a sample for GPU trials")
        if share < sd.min_decode_share:
            print(off_line(f"decoding is {share:.0%} of a trial's work here ({work}), under "
                           f"sweep.shared_data.min_decode_share {sd.min_decode_share:g}, so one shared decode would "
                           "save less than its cache costs (sweep.shared_data.enabled: true forces it)"), flush=True)
            return None
        print(f"[llip] shared data pass: decoding is {share:.0%} of a trial's work here ({work})", flush=True)
    default_root = sd.cache is None
    url = sd.cache or f"{storage_path(cfg).rstrip('/')}/{run_name}/data_cache"
    root, fs = split_root(url, cfg.data.s3)
    size = int(sum(build_train_source(cfg, None).counts))
    need, budget = cache_bytes(cfg, size), sd.max_gb * 1e9
    if need > budget:
        print(off_line(f"{epochs_needed(cfg, size)} epochs x {size} samples x {bytes_per_sample(cfg)} B = "
                       f"{_gb(need)} exceed sweep.shared_data.max_gb {sd.max_gb:g}"), flush=True)
        return None
    free = free_bytes(root) if fs is None else None
    if free is not None and need > free:
        print(off_line(f"the cache needs {_gb(need)} and {root} has {_gb(free)} free"), flush=True)
        return None
    name = f"llip-data-{run_name}"
    registry = _registry_cls().options(name=name).remote(run_name, root, fs, budget)
    cpus = cfg.data.decode_concurrency * cfg.data.decode_cpus
    print(f"[llip] shared data pass on: trials with the same data settings read one decode "
          f"({_gb(need)} estimated, {cpus:g} CPUs) from {url}", flush=True)
    return SharedData(registry, name, root, fs, default_root, cpus)


# --------------------------------------------------------------------------------------------
# trial side
# --------------------------------------------------------------------------------------------
def attach(source, cfg, shared: Optional[dict]):
    """`source` reading from the sweep's shared pass, or unchanged (one line) when it declines."""
    if not shared:
        return source
    import ray

    registry = ray.get_actor(shared["registry"])
    bare = dataclasses.replace(source, decoder=dataclasses.replace(source.decoder, stats=None), cache=None)
    spec, why = ray.get(registry.attach.remote(data_key(source), bare, cache_bytes(cfg, sum(source.counts))),
                        timeout=120)
    if spec is None:
        print(off_line(why), flush=True)
        return source
    fields = {f.name: getattr(source, f.name) for f in dataclasses.fields(source)}
    return CachedTrainSource(**{**fields, "cache": spec, "cpu_limit": None})


@dataclass
class CachedTrainSource(TrainSource):
    """A TrainSource whose batches are the sweep's shared decode read back (the decode path's very
    rows), in the training process itself: no Ray Data execution, no read tasks."""

    def dataset(self, epoch: int, intervals: Sequence):
        raise TypeError("a CachedTrainSource streams through batches(); it has no Ray dataset")

    def batches(self, epoch: int, intervals: Sequence, batch_size: int, dtypes: dict):
        return cache_batches(self, epoch, intervals, batch_size, dtypes)


def _producer(spec: CacheSpec):
    import ray

    try:
        return ray.get_actor(spec.producer, namespace=spec.namespace)
    except ValueError:
        return None


def _cached_window(source, producer, epoch: int, w: int, mine: Sequence, owns_start: bool) -> tuple[dict, Any]:
    """Window w's rows cut to `mine`, once the producer has written its file (asking for it is what
    makes the producer decode it); decoded here, by the same code, if the producer is gone or failed
    on it. Returns (rows, the producer or None once it is gone)."""
    import ray

    spec, stats = source.cache, source.decoder.stats
    rows, why = None, None
    while rows is None:
        try:
            state = (ray.get(producer.need.remote(epoch, [w], WAIT_S), timeout=WAIT_S + 60)[w]
                     if producer is not None else "gone")
        except Exception as e:  # the producer died: its files may still be there
            state, producer = f"gone ({type(e).__name__})", None
        if state == "done" or (producer is None and exists(spec.fs, spec.path(epoch, w))):
            t0 = time.thread_time()
            rows, counts = decode_window(read_bytes(spec.fs, spec.path(epoch, w)))
            if stats is not None:
                stats.add({"data/cache_read_cpu_ms": int(1000 * (time.thread_time() - t0)),
                           **({k: v for k, v in counts.items() if v} if owns_start else {})})
        elif state not in ("pending", "running"):
            why = state
            break
    if rows is None:  # decode it here, with the same code: the stream stays the same
        print(f"[llip] shared data pass: window {w} of epoch {epoch} unavailable ({why}); decoding it in this trial",
              flush=True)
        return decode_window_rows(source, epoch, w, mine, stats=stats), producer
    pos = rows["pos"]
    keep = np.zeros(len(pos), dtype=bool)
    for a, b in mine:
        keep |= (pos >= a) & (pos < b)
    return {k: v[keep] for k, v in rows.items()}, producer


def cache_batches(source, epoch: int, intervals: Sequence, batch_size: int, dtypes: dict):
    """The batches `iter_torch_batches(batch_size, drop_last=True, dtypes=...)` gives on the decode
    path's dataset, read from the shared pass's files by a thread of this process.

    Why not Ray Data here: reading a window back costs about a tenth of decoding it, and a Ray
    Data execution per epoch, with a zero-CPU read task per window, cost the trial more than
    that: its scheduling loop, the blocks' trip through the object store, and (tasks that hold no
    CPU) Ray starting fresh worker processes for them and stopping them again when idle.

    Demand stays honest: the thread runs at most `concurrency` windows ahead of the batch being
    trained on, and asks the producer for a window only when it starts on it, so a trial that
    stops (ASHA) stops asking."""
    import queue
    import threading

    import torch

    plan = source.plan(epoch)
    ws = plan.windows_overlapping(intervals)
    ahead = queue.Queue(maxsize=max(1, source.concurrency))
    stop = threading.Event()
    END = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ahead.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        producer = _producer(source.cache)
        try:
            for w in ws:
                if stop.is_set():
                    return
                rows, producer = _cached_window(source, producer, epoch, w, plan.clip(w, intervals),
                                                plan.owns_start(w, intervals))
                if rows and not put(rows):
                    return
            put(END)
        except BaseException as e:  # noqa: BLE001 - raised on the training thread
            put(e)

    def to_batch(rows: dict, a: int, b: int) -> dict:
        out = {}
        for k, v in rows.items():
            t = torch.from_numpy(np.ascontiguousarray(v[a:b]))
            out[k] = t.to(dtypes[k]) if k in dtypes and t.dtype != dtypes[k] else t
        return out

    thread = threading.Thread(target=read, name=f"llip-cache-reader-e{epoch}", daemon=True)
    thread.start()
    try:
        left: Optional[dict] = None  # rows of the last window not yet batched
        while True:
            item = ahead.get()
            if item is END:
                return  # drop_last: a partial batch at the end is not trained on
            if isinstance(item, BaseException):
                raise item
            rows = item if left is None else {k: np.concatenate([left[k], item[k]]) for k in item}
            n, i = len(rows["pos"]), 0
            while n - i >= batch_size:
                yield to_batch(rows, i, i + batch_size)
                i += batch_size
            left = {k: v[i:] for k, v in rows.items()} if i < n else None
    finally:
        stop.set()
