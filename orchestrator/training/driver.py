"""`llip run`: the driver that builds a TorchTrainer for one experiment and ties it to one MLflow run.

Order matters for "nothing half-written": the config is validated and the data preflighted before
an MLflow run exists; once it exists, any failure marks it FAILED with the error as a tag.
"""
from __future__ import annotations

import math
import os
import traceback
from dataclasses import dataclass, field
from typing import Any, Optional

from orchestrator.cluster import init_ray
from orchestrator.config.schema import ExperimentConfig, load_config, parse_overrides
from orchestrator.errors import UserError, one_line
from orchestrator.storage.paths import ray_storage
from orchestrator.tracking.runs import start_mlflow_run


@dataclass
class RunResult:
    run_id: str
    run_name: str
    tracking_uri: str
    metrics: dict[str, Any] = field(default_factory=dict)
    checkpoint: Optional[str] = None


def add_args(p) -> None:
    p.add_argument("file", metavar="FILE.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value by dotted path, e.g. --set train.steps=50 (repeatable)")
    p.add_argument("--run-name", default=None,
                   help="name of the run; relaunching with an existing name resumes it from its latest checkpoint")


def cli(args) -> int:
    cfg = load_config(args.file)
    if args.overrides:
        cfg = cfg.with_overrides(parse_overrides(args.overrides))
    result = run_experiment(cfg, run_name=args.run_name)
    print_summary(cfg, result)
    return 0


def preflight(cfg: ExperimentConfig) -> list[dict]:
    """Every check that needs no cluster, before Ray starts (starting Ray costs ~10 s here, and a
    typo in a path should not): shard locations (local, or S3 reachability and listing) and the
    MLflow tracking store."""
    from orchestrator.data.reading import resolve_shards
    from orchestrator.tracking import store as tracking

    d = cfg.data
    if cfg.curation is not None:  # curated shards exist and match the config's curation: settings
        from orchestrator.curation.provenance import provenance

        provenance(cfg)
    for name, loc in (("train", cfg.train_location()), ("eval", d.eval)):
        if loc:
            resolve_shards(loc, d.s3, f"data.{name}")
    tracking.open_experiment(cfg.mlflow.tracking_uri, cfg.mlflow.experiment or cfg.name)
    # Eval sets: layout, class names, label range and readable samples, checked before training.
    from orchestrator.evaluation.runner import preflight as eval_preflight

    return eval_preflight(cfg)


def manifest_tags(cfg: ExperimentConfig) -> dict[str, str]:
    """MLflow tags naming the training data: the manifest fingerprint, the curation it came from, and
    (for S3) a redacted description of the endpoint. Never credentials."""
    from orchestrator.data.shards import read_manifest
    from orchestrator.storage import s3

    train = cfg.train_location().rstrip("/")
    root = train.rsplit("/", 1)[0] if train.endswith("/train") else train  # `llip shards` writes DEST/train
    tags = {"llip.data_train": cfg.train_location()}
    if cfg.curation is not None:  # the run leads back to its curation run and inputs
        from orchestrator.curation.provenance import provenance, provenance_tags

        tags.update(provenance_tags(provenance(cfg)))
        tags["llip.curation.source"] = cfg.data.train
    man = read_manifest(root, cfg.data.s3)
    if man and man.get("fingerprint"):
        tags["llip.data_manifest"] = str(man["fingerprint"])
    if s3.is_s3_url(train):
        tags["llip.data_s3"] = s3.redacted(cfg.data.s3)
    return tags


def run_experiment(cfg: ExperimentConfig, run_name: Optional[str] = None, parent_run_id: Optional[str] = None,
                   tags: Optional[dict[str, str]] = None, callbacks: Optional[list] = None,
                   data_cpu_limit: Optional[float] = None, shared_data: Optional[dict] = None) -> RunResult:
    """`callbacks`: Ray Train UserCallbacks for the trainer's RunConfig (a sweep passes its
    TuneReportCallback here so Tune sees the trial's metrics). `data_cpu_limit`: cap on the CPUs
    this run's Ray Data pipeline may hold (a sweep gives each trial its share; unset, Ray Data
    takes every free CPU and concurrent trials wait for it). `shared_data`: a sweep's shared data
    pass (orchestrator/data/shared_decode.py): the run reads its decoded windows instead of decoding."""
    eval_sets = preflight(cfg)  # before importing Ray Train, which alone takes seconds
    from orchestrator.training import initweights

    init = initweights.resolve(cfg)  # train.init_from: the source's config and tokenizer, before Ray
    resolved = None
    if init is not None:  # its tokenizer is the source's (no captions to scan): check the fit before Ray starts
        from orchestrator.training.tokenization import resolve as resolve_tokenizer

        resolved = resolve_tokenizer(cfg, run_name, init.tokenizer)
        initweights.check_fits(resolved[0], init)
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from orchestrator.data.plan import build_train_source
    from orchestrator.data.reading import DataStats
    from orchestrator.training.worker import train_loop_per_worker

    init_ray()
    # Where the workers can land decides which paths they can see: checked before any MLflow run.
    from orchestrator.storage.reach import check_nodes_reach_s3, check_shared_storage, worker_nodes
    from orchestrator.tracking.store import resolve_tracking_uri

    _, able, spread = worker_nodes(cfg)
    check_shared_storage(cfg, resolve_tracking_uri(cfg.mlflow.tracking_uri), spread,
                         also=(("train.init_from", init.location),) if init else ())
    check_nodes_reach_s3(cfg, able)
    from orchestrator.training.tokenization import resolve as resolve_tokenizer

    # once per run: the compact vocabulary from the training captions, or a relaunch's checkpoint's
    cfg, tokenizer = resolved or resolve_tokenizer(cfg, run_name)
    # the shards' sample counts and the decoder: every epoch's order follows from them and the seed
    # (fails in one line before any MLflow run exists); rank 0 reads the eval sets itself (evaluation.py)
    stats = DataStats.create()
    source = build_train_source(cfg, tokenizer, stats, cpu_limit=data_cpu_limit)
    if shared_data:
        from orchestrator.data.shared_decode import attach

        source = attach(source, cfg, shared_data)
    c, uri, run_id, run_name, resumed = start_mlflow_run(
        cfg, run_name, parent_run_id, {**manifest_tags(cfg), **initweights.tags(init), **(tags or {})})
    print(f"[llip] {'resuming' if resumed else 'starting'} run {run_name} (MLflow run {run_id} in {uri})", flush=True)
    c.log_dict(run_id, tokenizer, "config/tokenizer.json")  # what evaluation of this run must tokenize with

    from orchestrator.storage.reach import worker_request

    attempt_s, retries = placement_budget(cfg.scaling.placement_timeout_s)
    if attempt_s is not None:  # Ray Train passes this on to its controller, which waits that long per try
        os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = f"{attempt_s:g}"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "experiment": cfg.model_dump(mode="json"),
            "mlflow_run_id": run_id,
            "tracking_uri": uri,
            "data_stats": stats,
            "train_source": source,
            "eval_sets": eval_sets,
            "tokenizer_spec": tokenizer,
            "init_from": init.to_json() if init else None,
        },
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker=worker_request(cfg),
                                     placement_strategy=cfg.scaling.placement_strategy),
        run_config=RunConfig(
            name=run_name,
            storage_path=ray_storage(cfg)[0],
            storage_filesystem=ray_storage(cfg)[1],
            failure_config=FailureConfig(max_failures=cfg.scaling.max_failures, controller_failure_limit=retries),
            # Keep the best M by training loss (always present at checkpoint steps); Ray also keeps
            # the latest, which is what a relaunch or a restarted worker group resumes from.
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints,
                                               checkpoint_score_attribute="train/loss",
                                               checkpoint_score_order="min"),
            # Train's INFO lines repeat every report's metrics; our rank-0 progress lines say enough.
            logging_config=LoggingConfig(log_level="WARNING"),
            callbacks=callbacks,
        ),
    )
    try:
        result = trainer.fit()
        if getattr(result, "error", None):
            raise result.error
    except BaseException as e:
        msg = unplaced(e, cfg) or one_line(e)
        c.set_tag(run_id, "llip.error", msg[:5000])
        c.log_text(run_id, "".join(traceback.format_exception(e)), "error.txt")
        interrupted = isinstance(e, (KeyboardInterrupt, SystemExit))  # Ray turns Ctrl-C into SystemExit
        c.set_terminated(run_id, status="KILLED" if interrupted else "FAILED")
        if interrupted:
            raise
        raise UserError(f"run {run_name} failed: {msg} (MLflow run {run_id} marked FAILED)") from e

    ckpt = result.checkpoint.path if result.checkpoint else None
    if ckpt and cfg.storage_path.startswith("s3://") and not ckpt.startswith("s3://"):
        ckpt = f"s3://{ckpt}"  # Ray names it on its filesystem; users and `llip eval` need the URL
    if ckpt:
        c.set_tag(run_id, "llip.checkpoint", ckpt)
    _log_curves(c, run_id, dict(result.metrics or {}), cfg.resolved_model().tau)
    _log_final_table(c, run_id, dict(result.metrics or {}))
    _log_final_data_counts(c, run_id, stats, result.metrics or {})
    if ckpt and cfg.mlflow.log_model:
        _log_mlflow_model(c, uri, run_id, ckpt)
    c.set_terminated(run_id, status="FINISHED")
    return RunResult(run_id=run_id, run_name=run_name, tracking_uri=uri, metrics=dict(result.metrics or {}),
                     checkpoint=ckpt)


def placement_budget(timeout_s: Optional[float]) -> tuple[Optional[float], int]:
    """(seconds per placement try, tries after the first) that add up to `timeout_s`; Ray Train's
    controller retries an unplaceable worker group after each try (forever by default)."""
    if timeout_s is None:
        return None, -1
    attempt = min(60.0, float(timeout_s))
    return attempt, max(0, math.ceil(float(timeout_s) / attempt - 1e-9) - 1)


def unplaced(e: BaseException, cfg: ExperimentConfig) -> Optional[str]:
    """The one line for a worker group that no node could hold within scaling.placement_timeout_s,
    or None when `e` is something else."""
    seen, err = set(), e
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if type(err).__name__ == "WorkerGroupStartupTimeoutError":
            break
        err = getattr(err, "controller_failure", None) or getattr(err, "cause", None) or err.__cause__
    else:
        return None
    if err is None:
        return None
    from orchestrator.storage.reach import cluster_nodes, worker_request

    s = cfg.scaling
    want = ", ".join(f"{k}: {v:g}" for k, v in worker_request(cfg).items())
    try:
        nodes = "; ".join(f"{n['address']} " + ", ".join(f"{k}: {v:g}" for k, v in sorted(n["resources"].items())
                                                          if not k.startswith(("node:", "memory", "object_store")))
                          for n in cluster_nodes())
    except Exception:  # noqa: BLE001 - the message must not fail
        nodes = "unknown"
    return (f"scaling: {s.num_workers} training worker(s) of {{{want}}} ({s.placement_strategy}) could not be placed "
            f"within scaling.placement_timeout_s={s.placement_timeout_s:g} s; no node came up that holds them "
            f"(alive nodes: {nodes}); add or fix the node type that has them (cluster.yaml), raise "
            "scaling.placement_timeout_s, or ask for fewer or smaller workers")


def _log_mlflow_model(c, uri: str, run_id: str, ckpt: str) -> None:
    """The final checkpoint exported (llip layout) and logged as the run's MLflow model (a pyfunc);
    `llip register` and `llip sweep` register it. Rank 0 wrote the checkpoint before fit() returned."""
    import tempfile
    import time

    from orchestrator.models.export import export_checkpoint
    from orchestrator.models.mlflow_model import log_model
    from orchestrator.storage.checkpoints import checkpoint_file

    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="llip-export-") as d:
            export_checkpoint(checkpoint_file(ckpt), d, run=c.get_run(run_id), client=c)
            model_uri = log_model(uri, run_id, d)
        print(f"[llip] logged the model as {model_uri} in {time.perf_counter() - t0:.1f} s "
              f"(register it: llip register {run_id} --alias NAME)", flush=True)
    except Exception as e:  # the run trained and its checkpoint is there: bookkeeping must not fail it
        c.set_tag(run_id, "llip.mlflow_model_error", f"{type(e).__name__}: {str(e)[:500]}")
        print(f"[llip] warning: could not log the MLflow model: {type(e).__name__}: {str(e)[:200]} "
              f"(the checkpoint is fine: llip export {run_id} --out DIR)", flush=True)


def _log_final_data_counts(c, run_id: str, stats, metrics: dict[str, Any]) -> None:
    """The data counters as the run ends (data/decoded, read and decode CPU ms, ...), at the last
    step: the last report predates the decode tasks still running when training stopped."""
    try:
        from orchestrator.tracking.store import log_metrics

        snap = stats.snapshot(timeout=10)
        log_metrics(c, run_id, {k: v for k, v in snap.items() if k.startswith("data/")},
                    int(metrics.get("step", 0) or 0))
    except Exception as e:  # bookkeeping must never fail a finished run
        print(f"[llip] warning: could not log the final data counters: {type(e).__name__}", flush=True)


def _log_final_table(c, run_id: str, metrics: dict[str, Any]) -> None:
    """The final training and evaluation figures as eval/final.json and a Markdown table."""
    final = {k: v for k, v in sorted(metrics.items()) if isinstance(v, (int, float))}
    c.log_dict(run_id, final, "eval/final.json")
    rows = "\n".join(f"| {k} | {v:.6g} |" for k, v in final.items())
    c.log_text(run_id, f"| metric | value |\n|---|---|\n{rows}\n", "eval/final.md")


def _log_curves(c, run_id: str, final: Optional[dict] = None, tau: Optional[float] = None) -> None:
    """Loss and eval curves as one PNG artifact, so the MLflow UI shows them next to the run."""
    from orchestrator.tracking.plots import plot_run_curves

    try:
        from orchestrator.evaluation.runner import curve_keys

        plot_run_curves(c, run_id, tuple(curve_keys(final or {}, tau)))
    except Exception as e:  # a plot must never fail a finished run
        print(f"[llip] warning: could not plot curves: {e}", flush=True)


def print_summary(cfg: ExperimentConfig, r: RunResult) -> None:
    m = r.metrics
    n_eval = m.get("eval/num_samples")
    rows = [
        ("run", r.run_name),
        ("model / loss", f"{cfg.model.size} {cfg.resolved_model().pooling} / {cfg.loss.type}"),
        ("steps", f"{m.get('step', '?')}"),
        ("final train loss", f"{m['train/loss']:.4f}" if "train/loss" in m else "-"),
    ]
    for k, label in [("eval/i2t_recall1", "image->text R@1"), ("eval/i2t_recall5", "image->text R@5"),
                     ("eval/t2i_recall1", "text->image R@1"), ("eval/t2i_recall5", "text->image R@5")]:
        if k in m:
            rows.append((f"held-out {label}", f"{100 * m[k]:.2f}%"))
    if n_eval:
        # a model scoring everything alike; above k / N where captions repeat across images
        c1, c5 = m.get("eval/chance_t2i_recall1", 1 / n_eval), m.get("eval/chance_t2i_recall5", 5 / n_eval)
        rows.append(("chance text->image R@1 / R@5",
                     f"{100 * c1:.2f}% / {100 * c5:.2f}% ({int(n_eval)} held-out images)"))
    from orchestrator.console import natural_key

    for k in sorted(m, key=natural_key):  # eval.sets: each set's headline figures (all of them: eval/final.md)
        parts = k.split("/")
        if len(parts) == 3 and parts[0] == "eval" and (parts[2] in ("recall1", "recall5", "rprec", "map", "top1", "top5")
                                                       or parts[2].startswith("top1_tau")):
            rows.append((f"{parts[1]} {parts[2]}", f"{100 * m[k]:.2f}%"))
    rows += [("checkpoint", r.checkpoint or "-"), ("MLflow store", r.tracking_uri), ("MLflow run id", r.run_id)]
    w = max(len(a) for a, _ in rows)
    print()
    for a, b in rows:
        print(f"  {a:<{w}}  {b}")
    print(f"\nSee it in the MLflow UI:  mlflow ui --backend-store-uri {r.tracking_uri}  (then open http://127.0.0.1:5000)")

