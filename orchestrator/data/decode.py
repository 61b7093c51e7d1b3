"""Decoding in Ray Data tasks, on any node: raw rows -> training or evaluation rows.

`Decoder`, the map_batches UDF: decode + augment (llip_core.preprocess) + pick a caption +
tokenize (llip_core.tokenizer). Bad samples (undecodable image, no caption, truncated
tar) are dropped here and counted in a small named actor (`DataStats`).
Read and decode get the same num_cpus (data.decode_cpus) and concurrency
(data.decode_concurrency), so Ray fuses them into one task per group of tars: raw bytes
never cross the object store (2x faster than two stages in benchmarks/ingest.py).

Randomness is per (cfg.seed, epoch, sample): the crop, the flip and the caption chosen for a
multi-caption sample are drawn from a Generator seeded by those three, so they differ between
epochs, do not depend on which task or worker handles the sample, and repeat across reruns.

Scaling the CPU stage onto other nodes
  Ray Data schedules `map_batches` tasks on any node with free CPUs, not only where the trainers
  run, so the decode stage scales by adding CPU capacity to the cluster:
  - raise `data.decode_concurrency` (the maximum number of read+decode tasks in flight per
    training worker) and size `data.decode_cpus` (CPUs reserved per task) so that
    num_workers x decode_concurrency x decode_cpus roughly matches the CPUs you want decoding;
  - give the cluster CPU-only worker types in cluster.yaml (e.g. a `cpu_decode` node type with
    min_workers/max_workers and no GPUs); the autoscaler adds them when decode tasks are
    pending, and GPU nodes keep their CPUs for the trainers;
  - shards must then live where every node can read them: s3:// (or a shared filesystem).
    A local path is read by whichever node runs the read task.
  Ray Data's backpressure keeps the read/decode stages at most a few blocks ahead of the
  trainers, so memory stays bounded however many decode tasks run.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import numpy as np

from orchestrator.data.reading import STATS_KEYS, DataStats, sample_id

if TYPE_CHECKING:  # pragma: no cover
    import ray.data

CAPTION_BYTES = 128  # eval rows carry the caption as UTF-8 bytes, zero-padded (tensors can't hold str)
# Read/decode output block target: image blocks of ~32 MB keep the object store and the
# streaming executor's backpressure effective at any image size.
TARGET_BLOCK_BYTES = 32 << 20


def parse_captions(txt: Optional[bytes], js: Optional[bytes]) -> list[str]:
    if js is not None:
        try:
            obj = json.loads(js)
            caps = obj.get("captions") if isinstance(obj, dict) else obj
            if isinstance(caps, list):
                caps = [str(c).strip() for c in caps if c is not None and str(c).strip()]
                if caps:
                    return caps
        except (ValueError, UnicodeDecodeError):
            pass
    if txt is not None:
        t = txt.decode("utf-8", errors="replace").strip()
        if t:
            return [t]
    return []


def default_captions(caps: list[str], js: Optional[bytes]) -> list[str]:
    """The captions the one-caption draw picks from: the json's "default" indices into its "captions"
    (so the emoji source's group/subgroup perspectives do not change the demo's task), else all."""
    if js is None:
        return caps
    try:
        obj = json.loads(js)
        idx, raw = obj.get("default"), obj.get("captions")
        pool = [str(raw[j]).strip() for j in idx if isinstance(j, int) and 0 <= j < len(raw) and raw[j] is not None]
        pool = [c for c in pool if c]
    except (ValueError, UnicodeDecodeError, AttributeError, TypeError):
        return caps
    return pool or caps


def caption_slots(per_sample: list[list[str]], slots: int) -> tuple[list[str], np.ndarray]:
    """Several captions per sample -> a flat image-major list of n * slots captions ("" in padded slots,
    which tokenizes to start/end tokens only) and the (n, slots) bool mask of the real ones."""
    flat, mask = [], np.zeros((len(per_sample), slots), dtype=bool)
    for i, caps in enumerate(per_sample):
        caps = caps[:slots]
        mask[i, : len(caps)] = True
        flat += caps + [""] * (slots - len(caps))
    return flat, mask


def encode_captions(captions: list[str], width: int = CAPTION_BYTES) -> np.ndarray:
    out = np.zeros((len(captions), width), dtype=np.uint8)
    for i, c in enumerate(captions):
        b = c.encode("utf-8")[:width]
        out[i, : len(b)] = np.frombuffer(b, dtype=np.uint8)
    return out


def decode_captions(arr) -> list[str]:
    """Eval rows' `caption` (uint8 array or tensor, (N, CAPTION_BYTES)) -> strings."""
    a = np.asarray(arr.cpu() if hasattr(arr, "cpu") else arr, dtype=np.uint8)
    return [bytes(row).rstrip(b"\0").decode("utf-8", errors="ignore") for row in a]


def current_epoch() -> int:
    """Which execution (epoch) of the dataset this task belongs to (0 outside Ray Data)."""
    try:
        from ray.data.context import DataContext

        return int(getattr(DataContext.get_current(), "_execution_idx", 0))
    except Exception:
        return 0


@dataclass
class Decoder:
    """The map_batches UDF: raw byte rows -> {"image", "tokens", "sample_id"[, "caption"]}."""
    image_size: int
    vocab_size: int
    context_length: int
    augment: bool
    seed: int
    stats: Optional[DataStats]
    with_caption: bool = False
    # "one": each epoch draws one caption per sample (seeded) from its default list; "all": the first
    # max_captions captions in stored order as tokens (n, max_captions, L) plus "caption_mask" (n, M)
    captions: str = "one"
    max_captions: int = 1
    # Online MetaCLIP curation: keep each sample this epoch with the keep_prob `llip curate` stored
    # in its json (coins hashed from this seed, the sample and the epoch); None: keep everything.
    curation_seed: Optional[int] = None
    # llip_core.tokenizer spec (orchestrator.training.tokenization decides it per run); None: word hash over
    # vocab_size buckets
    tokenizer: Optional[dict] = None
    hflip: bool = False  # flip half the training views, never a sample whose captions name a direction
    # the epoch whose views to draw; None: Ray Data's execution index (one execution per epoch)
    epoch: Optional[int] = None
    # images as uint8 HWC (4x less to move; the training worker normalizes them on its device)
    uint8: bool = False

    def __call__(self, batch: dict) -> dict:
        import time

        from llip_core.preprocess import CorruptImageError, load_rgb, normalize, transform
        from llip_core.tokenizer import cached_tokenizer, tokenizer_spec

        cpu0 = time.thread_time()  # decode CPU per task (data/decode_cpu_ms): what a sweep's shared pass saves
        epoch = current_epoch() if self.epoch is None else self.epoch
        has_pos = "pos" in batch
        n = len(batch["key"])
        counts = {k: 0 for k in STATS_KEYS}
        counts["data/seen"] = n
        images = np.empty((n, self.image_size, self.image_size, 3), dtype=np.uint8)
        chosen, ids, pos = [], [], []
        m = 0
        for i in range(n):
            err = batch["error"][i]
            if err is not None:
                counts["data/truncated_shards"] += 1
                counts["data/skipped"] += 1
                continue
            data = batch["image"][i]
            caps = parse_captions(batch["txt"][i], batch["json"][i])
            if data is None:
                counts["data/skipped_no_image"] += 1
                counts["data/skipped"] += 1
                continue
            if not caps:
                counts["data/skipped_no_caption"] += 1
                counts["data/skipped"] += 1
                continue
            sid = sample_id(str(batch["url"][i]), str(batch["key"][i]))
            if self.curation_seed is not None and not _kept_online(batch["json"][i], sid, self.curation_seed, epoch):
                counts["data/curated_out"] = counts.get("data/curated_out", 0) + 1  # not bad data: not "skipped"
                continue
            pool = default_captions(caps, batch["json"][i])
            rng = np.random.default_rng([sid, epoch, self.seed]) if self.augment or len(pool) > 1 else None
            try:
                img = load_rgb(bytes(data), draft_size=self.image_size)
                images[m] = transform(img, self.image_size, rng, self.augment, hflip=self.hflip, captions=caps)
            except CorruptImageError:
                counts["data/skipped_corrupt_image"] += 1
                counts["data/skipped"] += 1
                continue
            if self.captions == "all" and not self.with_caption:
                chosen.append(caps[: self.max_captions])
            else:
                chosen.append(pool[int(rng.integers(len(pool)))] if len(pool) > 1 and not self.with_caption else caps[0])
            ids.append(sid)
            if has_pos:
                pos.append(int(batch["pos"][i]))
            m += 1
        tok = cached_tokenizer(self.tokenizer or tokenizer_spec("word_hash", self.context_length, self.vocab_size))
        multi = self.captions == "all" and not self.with_caption
        if multi:
            chosen, mask = caption_slots(chosen, self.max_captions)
        out = {
            "image": images[:m] if self.uint8 else normalize(images[:m]),
            "tokens": tok(chosen) if chosen else np.zeros((0, self.context_length), dtype=np.int64),
            "sample_id": np.asarray(ids, dtype=np.int64),
        }
        if multi:
            out["tokens"] = out["tokens"].reshape(m, self.max_captions, out["tokens"].shape[-1])
            out["caption_mask"] = mask
        if self.with_caption:
            out["caption"] = encode_captions(chosen)
        if has_pos:
            out["pos"] = np.asarray(pos, dtype=np.int64)
        if self.stats is not None:
            counts["data/decoded"] = m
            counts["data/decode_cpu_ms"] = int(1000 * (time.thread_time() - cpu0))
            self.stats.add({k: v for k, v in counts.items() if v})
        return out


def _kept_online(js: Optional[bytes], sid: int, seed: int, epoch: int) -> bool:
    from llip_core.curation import sample_epoch

    try:
        p = float(json.loads(js)["keep_prob"])
    except (TypeError, ValueError, KeyError):
        return True  # not written by online curation: nothing to resample
    return bool(sample_epoch(np.asarray([sid]), np.asarray([p]), seed, epoch)[0])


def decode_batch_rows(image_size: int) -> int:
    """Samples per read block / decode batch: ~TARGET_BLOCK_BYTES of float32 images, 16..512."""
    return int(min(512, max(16, TARGET_BLOCK_BYTES // (3 * image_size * image_size * 4))))


def decode_dataset(raw: "ray.data.Dataset", decoder: Decoder, concurrency: int, num_cpus: float) -> "ray.data.Dataset":
    """Decode each read block as one batch. With the read given the same num_cpus and
    concurrency (as `TrainSource.dataset` does), Ray fuses read and decode into one task: raw bytes never go
    through the object store and each task streams its tars straight into decoded blocks, which
    measured about twice as fast as separate read and decode stages at 32 px
    (benchmarks/ingest.py)."""
    import ray.data

    # compute= rather than the deprecated concurrency= (same pool size, so the read still fuses)
    return raw.map_batches(decoder, batch_size=None, batch_format="numpy", num_cpus=num_cpus,
                           compute=ray.data.TaskPoolStrategy(size=concurrency), zero_copy_batch=True)
