"""`llip curate FILE.yaml`: MetaCLIP curation of data.train as a tracked Ray Data stage.

  pass 1  read the pool's shards (local or s3://) -> match every record against the metadata in
          actor tasks (each builds the Aho-Corasick automaton once) -> per-block partial counts
          -> `groupby("entry").sum("n")`: one distributed aggregation over all shards, so the
          counts are global however many nodes read. Pool tallies (pairs seen, matched, skipped)
          ride along under negative keys, so the same aggregation gives them.
  pass 2  read again, rematch, and decide per record with coins hashed from (seed, sample id,
          entry): the kept set does not depend on blocks, workers or order. Rematching costs less
          than shipping an inverted index back to the images (see benchmarks/curation.py).
  write   the driver streams the kept records, in input order, into tar shards under
          curation.out/train (same layout as `llip shards`, each sample with a json member holding
          its captions, matched entry ids and source), then curation_stats.json, the count plot
          and manifest.json last: its presence means the output is complete.

Offline mode keeps or drops each record once. Online mode writes every matched record with its
keep probability; the training stream (orchestrator/data/decode.py) then keeps it with that probability,
afresh each epoch. Everything is one MLflow run (tag llip.kind=curation); training runs on the
result carry its run id, metadata hash, t, mode and shard fingerprint (orchestrator/curation/provenance.py).
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from orchestrator.curation.provenance import STATS_FILE, STATS_FORMAT
from orchestrator.errors import UserError

PLOT_FILE = "curation_counts.png"
# Pool tallies carried through the count aggregation beside the entry ids.
POOL, MATCHED, NO_CAPTION, NO_IMAGE, DAMAGED = -1, -2, -3, -4, -5
_TALLY_NAMES = {POOL: "pool_size", MATCHED: "matched_pairs", NO_CAPTION: "skipped_no_caption",
                NO_IMAGE: "skipped_no_image", DAMAGED: "skipped_damaged_shard"}


def _image_ext(data: bytes) -> str:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:2] == b"\xff\xd8":
        return "jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "png"  # unknown: the decoder sniffs content, not names


def _valid_rows(batch: dict, tallies: dict) -> tuple[list[int], list[list[str]]]:
    """Indices of records with an image and a caption, and their captions; the rest tallied."""
    from orchestrator.data.decode import parse_captions

    rows, caps = [], []
    for i in range(len(batch["key"])):
        if batch["error"][i] is not None:
            tallies[DAMAGED] += 1
            continue
        if batch["image"][i] is None:
            tallies[NO_IMAGE] += 1
            continue
        c = parse_captions(batch["txt"][i], batch["json"][i])
        if not c:
            tallies[NO_CAPTION] += 1
            continue
        rows.append(i)
        caps.append(c)
    tallies[POOL] += len(rows)
    return rows, caps


def _source_json(js: Optional[bytes], caps: list[str]) -> dict:
    """The record's own json object (other keys, e.g. caption roles, pass through untouched), or
    {"captions": [...]} for a record that had only a txt caption."""
    try:
        obj = json.loads(js) if js is not None else None
    except (ValueError, UnicodeDecodeError):
        obj = None
    return dict(obj) if isinstance(obj, dict) and isinstance(obj.get("captions"), list) else {"captions": caps}


class CountUDF:
    """Pass 1 (a map_batches actor): a block of raw records -> {"entry", "n"} partial counts."""

    def __init__(self, entries: list[str]):
        from llip_core.curation import build_matcher

        self.matcher = build_matcher(entries)

    def __call__(self, batch: dict) -> dict:
        tallies = {k: 0 for k in _TALLY_NAMES}
        _, caps = _valid_rows(batch, tallies)
        ids, offsets = self.matcher.match_many(caps)
        tallies[MATCHED] = int((np.diff(offsets) > 0).sum())
        uniq, n = np.unique(ids, return_counts=True)
        return {"entry": np.concatenate([uniq.astype(np.int64), np.fromiter(tallies, np.int64)]),
                "n": np.concatenate([n.astype(np.int64), np.fromiter(tallies.values(), np.int64)])}


class SelectUDF:
    """Pass 2: raw records -> one row per valid record with the decision (`kept`), its keep
    probability and entry ids; the image and json travel only for kept records."""

    def __init__(self, entries: list[str], probs: np.ndarray, seed: int, mode: str):
        from llip_core.curation import build_matcher

        self.matcher = build_matcher(entries)
        self.probs, self.seed, self.mode = probs, seed, mode

    def __call__(self, batch: dict) -> dict:
        from llip_core.curation import keep_probabilities, sample_offline
        from orchestrator.data.reading import sample_id

        tallies = {k: 0 for k in _TALLY_NAMES}
        rows, caps = _valid_rows(batch, tallies)
        ids, offsets = self.matcher.match_many(caps)
        sids = np.asarray([sample_id(str(batch["url"][i]), str(batch["key"][i])) for i in rows], dtype=np.int64)
        keep_p = keep_probabilities(ids, offsets, self.probs)
        if self.mode == "offline":
            kept = sample_offline(sids, ids, offsets, self.probs, self.seed)
        else:
            kept = keep_p > 0
        images, jsons, id_bytes = [], [], []
        for j, i in enumerate(rows):
            e = ids[offsets[j]:offsets[j + 1]]
            id_bytes.append(e.astype(np.int32).tobytes())
            if not kept[j]:
                images.append(b"")
                jsons.append(b"")
                continue
            url = str(batch["url"][i])
            meta = _source_json(batch["json"][i], caps[j])
            meta.update({"entries": e.tolist(), "source": f"{url.rsplit('/', 1)[-1]}/{batch['key'][i]}"})
            if self.mode == "online":
                meta["keep_prob"] = float(keep_p[j])
            images.append(bytes(batch["image"][i]))
            jsons.append(json.dumps(meta, ensure_ascii=False).encode("utf-8"))
        return {"kept": kept.astype(bool), "keep_prob": keep_p.astype(np.float64),
                "ids": np.asarray(id_bytes, dtype=object), "image": np.asarray(images, dtype=object),
                "json": np.asarray(jsons, dtype=object)}


# --------------------------------------------------------------------------------------------
# the count plot
# --------------------------------------------------------------------------------------------
def _plot_counts(before: np.ndarray, after: np.ndarray, t: int, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for arr, label in ((before, "before"), (after, "after")):
        y = np.sort(np.asarray(arr, dtype=np.float64)[np.asarray(before) > 0])[::-1]
        if len(y):
            ax.loglog(np.arange(1, len(y) + 1), np.maximum(y, 0.5), label=f"{label} ({int(round(y.sum()))} matches)")
    ax.axhline(t, color="k", ls="--", lw=1, label=f"t = {t}")
    ax.set_xlabel("entry rank (each curve sorted by its own counts)")
    ax.set_ylabel("pairs matching the entry")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# the stage
# --------------------------------------------------------------------------------------------
def _log_metrics(mc, run_id: str, metrics: dict, step: int = 0) -> None:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    mc.log_batch(run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])


def _actors(c):
    import ray.data

    return ray.data.ActorPoolStrategy(size=c.concurrency)


def _aggregate_counts(raw, entries: list[str], c) -> tuple[np.ndarray, dict]:
    counted = raw.map_batches(CountUDF, fn_constructor_kwargs={"entries": entries}, batch_size=None,
                              batch_format="numpy", compute=_actors(c), num_cpus=c.task_cpus)
    # At most one row per entry reaches the reduce side: a few partitions suffice.
    df = counted.groupby("entry", num_partitions=max(2, c.concurrency)).sum("n").to_pandas()
    keys = df["entry"].to_numpy(dtype=np.int64)
    vals = df[[col for col in df.columns if col != "entry"][0]].to_numpy(dtype=np.int64)
    counts = np.zeros(len(entries), dtype=np.int64)
    counts[keys[keys >= 0]] = vals[keys >= 0]
    tallies = {name: int(vals[keys == k].sum()) for k, name in _TALLY_NAMES.items()}
    return counts, tallies


def run_curation(cfg, log: Callable[[str], None] = print, chunk_rows: Optional[int] = None) -> dict:
    """Curate cfg.data.train into cfg.curation.out; returns the stats written to curation_stats.json."""
    from orchestrator.curation.metadata import load_metadata
    from orchestrator.data.reading import resolve_shards
    from orchestrator.data.shards import read_manifest
    from orchestrator.data.tars import READ_CHUNK_ROWS
    from orchestrator.storage.paths import Destination
    from orchestrator.tracking import store as tracking

    c = cfg.curation
    if c is None:
        raise UserError(f"{cfg.name}: no curation: section; add one with metadata, t and out "
                        "(see experiments/curated_demo.yaml)")
    # Preflight: everything that can be wrong with the input fails before a run or a cluster exists.
    entries, meta_sha = load_metadata(c.metadata)
    paths, fs = resolve_shards(cfg.data.train, cfg.data.s3, "data.train")
    src, out = cfg.data.train.rstrip("/"), c.out.rstrip("/")
    if out == src or (src + "/").startswith(out + "/train/") or out.startswith(src + "/"):
        # writing into the pool would overwrite it, or add curated shards to the next read of it
        raise UserError(f"curation.out {c.out}: overlaps data.train {cfg.data.train}; choose a curation.out outside it")
    dest = Destination(c.out, cfg.data.s3)
    source_root = cfg.data.train.rstrip("/").rsplit("/", 1)[0]
    source_manifest = (read_manifest(source_root, cfg.data.s3) or {}).get("fingerprint")

    mc, uri, exp_id = tracking.open_experiment(cfg.mlflow.tracking_uri, cfg.mlflow.experiment or cfg.name)
    run = mc.create_run(exp_id, tags={"llip.kind": "curation", "llip.git_commit": tracking.git_commit(),
                                      "llip.config_fingerprint": cfg.fingerprint(),
                                      "llip.data_train": cfg.data.train,
                                      **({"llip.data_manifest": source_manifest} if source_manifest else {})})
    run_id = run.info.run_id
    run_name = f"curate-{cfg.name}-{run_id[:8]}"
    mc.set_tag(run_id, "mlflow.runName", run_name)
    tracking.log_params(mc, run_id, {**{f"curation.{k}": v for k, v in c.model_dump().items()},
                                     "curation.metadata_sha256": meta_sha, "curation.metadata_entries": len(entries),
                                     "data.train": cfg.data.train, "data.train_shards": len(paths)})
    log(f"[curate] MLflow run {run_name} ({run_id}) in {uri}")
    try:
        stats = _curate(cfg, entries, meta_sha, paths, fs, dest, source_manifest, mc, run_id, uri, log,
                        chunk_rows or READ_CHUNK_ROWS)
    except BaseException as e:
        mc.set_tag(run_id, "llip.error", f"{type(e).__name__}: {e}"[:5000])
        mc.log_text(run_id, "".join(traceback.format_exception(e)), "error.txt")
        mc.set_terminated(run_id, status="KILLED" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "FAILED")
        raise
    mc.set_terminated(run_id, status="FINISHED")
    return stats


def _curate(cfg, entries, meta_sha, paths, fs, dest, source_manifest, mc, run_id, uri, log, chunk_rows) -> dict:
    from ray.data import DataContext

    from llip_core.curation import balance_summary, entry_probabilities
    from orchestrator.cluster import init_ray
    from orchestrator.data.decode import parse_captions
    from orchestrator.data.reading import read_shards
    from orchestrator.data.shards import FORMAT, MANIFEST
    from orchestrator.data.tars import tar_bytes

    c = cfg.curation
    init_ray()
    ctx = DataContext.get_current()
    old_order, old_bars = ctx.execution_options.preserve_order, ctx.enable_progress_bars
    # Input order in, input order out: the shards written do not depend on task timing.
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = True
    try:
        t0 = time.perf_counter()
        log(f"[curate] pass 1/2: matching {len(paths)} shard(s) of {cfg.data.train} against "
            f"{len(entries)} entries of {c.metadata}")
        raw = read_shards(paths, fs, num_cpus=c.task_cpus, concurrency=c.concurrency, chunk_rows=chunk_rows)
        counts, tallies = _aggregate_counts(raw, entries, c)
        t1 = time.perf_counter()
        pool, matched = tallies["pool_size"], tallies["matched_pairs"]
        log(f"[curate] pass 1/2 done in {t1 - t0:.1f} s: {pool} pairs, {matched} matched at least one entry, "
            f"{int((counts > c.t).sum())} entries over t={c.t}")
        if pool == 0:
            raise UserError(f"data.train {cfg.data.train}: no readable image-caption pair in {len(paths)} shard(s) "
                            f"({tallies}); rewrite the shards with `llip shards`")
        if matched == 0:
            raise UserError(f"curation.metadata {c.metadata}: none of its {len(entries)} entries occurs in any of the "
                            f"{pool} captions of {cfg.data.train} (matching is case-sensitive, whole words); "
                            "use metadata in the captions' language and case")
        _log_metrics(mc, run_id, {"curate/pool_size": pool, "curate/matched_pairs": matched})
        probs = entry_probabilities(counts, c.t)

        log(f"[curate] pass 2/2: sampling ({c.mode}, seed {c.seed}) and writing to {c.out}/train")
        selected = read_shards(paths, fs, num_cpus=c.task_cpus, concurrency=c.concurrency, chunk_rows=chunk_rows) \
            .map_batches(SelectUDF, fn_constructor_kwargs={"entries": entries, "probs": probs, "seed": c.seed,
                                                           "mode": c.mode},
                         batch_size=None, batch_format="numpy", compute=_actors(c), num_cpus=c.task_cpus)
        after = np.zeros(len(entries), dtype=np.float64)
        expected_kept = 0.0
        processed, written = 0, 0
        shards: list[dict] = []
        pending: list[list[tuple[str, bytes]]] = []
        last_log = time.perf_counter()

        def flush():
            name = f"train-{len(shards):05d}.tar"
            data = tar_bytes(pending)
            dest.put(f"train/{name}", data)
            shards.append({"name": name, "samples": len(pending), "bytes": len(data),
                           "sha1": hashlib.sha1(data).hexdigest()})
            pending.clear()

        # Stale results must not be mistaken for this run's while it writes.
        dest.delete(MANIFEST)
        dest.delete(STATS_FILE)
        for batch in selected.iter_batches(batch_size=None, batch_format="numpy"):
            for j in range(len(batch["kept"])):
                e = np.frombuffer(batch["ids"][j], dtype=np.int32)
                p = float(batch["keep_prob"][j])
                expected_kept += p
                processed += 1
                if not batch["kept"][j]:
                    continue
                after[e] += p if c.mode == "online" else 1.0
                image = batch["image"][j]
                meta = batch["json"][j]
                key = f"train-{written:07d}"
                first = parse_captions(None, bytes(meta))[0]  # the txt member readers without json use
                pending.append([(f"{key}.{_image_ext(image)}", bytes(image)),
                                (f"{key}.txt", first.encode("utf-8")), (f"{key}.json", bytes(meta))])
                written += 1
                if len(pending) >= c.samples_per_shard:
                    flush()
            now = time.perf_counter()
            if now - last_log > 10:
                log(f"[curate]   {processed}/{pool} pairs ({processed / pool:.0%}), {written} written, "
                    f"{len(shards)} shard(s)")
                _log_metrics(mc, run_id, {"curate/processed": processed, "curate/written": written}, step=processed)
                last_log = now
        if written == 0:
            raise UserError(f"curation.t={c.t}: the curation kept none of {matched} matched pairs, so no shard was "
                            f"written; raise curation.t (entries hold up to {int(counts.max())} pairs)")
        if pending:
            flush()
        pat = re.compile(r"^train-\d{5}\.tar$")
        names = {s["name"] for s in shards}
        for name in dest.list("train"):
            if pat.match(name) and name not in names:
                dest.delete(f"train/{name}")
        t2 = time.perf_counter()

        fp = hashlib.sha1()
        for sh in shards:
            fp.update(f"train/{sh['name']}:{sh['sha1']}\n".encode())
        fingerprint = fp.hexdigest()[:16]
        summary = balance_summary(counts, after, c.t)
        order = np.argsort(-counts, kind="stable")[:20]
        kept_pairs = expected_kept if c.mode == "online" else float(written)
        stats = {
            "format": STATS_FORMAT, "mode": c.mode, "t": c.t, "seed": c.seed,
            "metadata": c.metadata, "metadata_sha256": meta_sha, "metadata_entries": len(entries),
            "source": cfg.data.train, "source_manifest": source_manifest, "out": c.out,
            "fingerprint": fingerprint, "mlflow_run_id": run_id, "mlflow_tracking_uri": uri,
            **tallies,
            "matched_fraction": matched / pool,
            "kept_pairs": kept_pairs,  # online: expected per epoch
            "kept_fraction": kept_pairs / pool,
            "written_pairs": written,
            **summary,
            "top_entries": [{"entry": entries[i], "before": int(counts[i]), "after": float(after[i])}
                            for i in order if counts[i] > 0],
            "seconds": {"count": round(t1 - t0, 2), "select_and_write": round(t2 - t1, 2)},
        }
        title = (f"{Path(c.metadata).name} on {cfg.data.train}: t={c.t}, {c.mode}; "
                 f"kept {kept_pairs:.0f} of {pool} pairs")
        png = _plot_counts(counts, after, c.t, title)
        dest.put(STATS_FILE, (json.dumps(stats, indent=1, ensure_ascii=False) + "\n").encode())
        dest.put(PLOT_FILE, png)
        manifest = {"format": FORMAT, "source": f"curation:{cfg.data.train}", "seed": c.seed,
                    "samples_per_shard": c.samples_per_shard,
                    "splits": {"train": {"samples": written, "num_shards": len(shards), "shards": shards}},
                    "skipped": {}, "curation": {k: stats[k] for k in ("mode", "t", "metadata_sha256", "mlflow_run_id")},
                    "fingerprint": fingerprint}
        dest.put(MANIFEST, (json.dumps(manifest, indent=1, ensure_ascii=False) + "\n").encode())

        _log_metrics(mc, run_id, {f"curate/{k}": float(v) for k, v in stats.items()
                                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("t", "seed")})
        mc.log_dict(run_id, stats, STATS_FILE)
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / PLOT_FILE).write_bytes(png)
            mc.log_artifact(run_id, str(Path(d) / PLOT_FILE), "plots")
        mc.set_tag(run_id, "llip.curation.fingerprint", fingerprint)
        mc.set_tag(run_id, "llip.curation.out", c.out)
        log(f"[curate] pass 2/2 done in {t2 - t1:.1f} s")
        return stats
    finally:
        ctx.execution_options.preserve_order = old_order
        ctx.enable_progress_bars = old_bars


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def add_args(p) -> None:
    p.add_argument("file", metavar="FILE.yaml", help="an experiment with a curation: section")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value by dotted path, e.g. --set curation.t=50 (repeatable)")


def cli(args) -> int:
    from orchestrator.config.schema import load_config, parse_overrides

    cfg = load_config(args.file)
    if args.overrides:
        cfg = cfg.with_overrides(parse_overrides(args.overrides))
    s = run_curation(cfg)
    kept = f"{s['kept_pairs']:.0f}" + (" expected per epoch" if s["mode"] == "online" else "")
    print(f"\n  pool {s['pool_size']} pairs; matched {s['matched_pairs']} ({s['matched_fraction']:.1%}); "
          f"kept {kept} ({s['kept_fraction']:.1%})\n"
          f"  {s['entries_over_t']} of {s['entries_matched']} matched entries over t={s['t']}; head share "
          f"{s['head_share_before']:.1%} -> {s['head_share_after']:.1%}\n"
          f"  wrote {s['written_pairs']} pairs to {s['out'].rstrip('/')}/train (fingerprint {s['fingerprint']}), "
          f"{STATS_FILE}, {PLOT_FILE}; MLflow run {s['mlflow_run_id']}")
    return 0
