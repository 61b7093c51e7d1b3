"""`llip sweep FILE.yaml`: the experiment's `sweep:` section run with Ray Tune.

Three layers (Ray's train_tune_interop pattern): Tune runs `driver_fn` once per trial; driver_fn
builds the trial's config and calls the same `run_experiment` as `llip run`, whose TorchTrainer runs
the per-worker loop. MLflow: this module creates one parent run per sweep; each trial's
run_experiment creates its child run (tag `mlflow.parentRunId`, `llip.trial_id`), and rank 0 logs
into it, so no Tune logger callback writes runs of its own (no duplicates). After the sweep, trials
that never reached MLflow or were stopped by ASHA are reconciled from Tune's view, and the parent
gets the comparison table and plot (`orchestrator.compare`).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Optional

from orchestrator.config import ExperimentConfig, SearchSpace, load_config, resolved_yaml
from orchestrator.errors import UserError


def add_args(p) -> None:
    p.add_argument("file", metavar="FILE.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a base config value by dotted path before sweeping (repeatable)")
    p.add_argument("--max-concurrent-trials", type=int, default=None,
                   help="trials at once (default: sweep.max_concurrent_trials, else what the cluster's free "
                        "CPUs/GPUs fit)")


def cli(args) -> int:
    from orchestrator.compare import format_table
    from orchestrator.driver import parse_overrides

    cfg = load_config(args.file)
    if args.overrides:
        cfg = cfg.with_overrides(parse_overrides(args.overrides))
    if cfg.sweep is None:
        raise UserError(f"{args.file}: no sweep: section; add one (see experiments/sweep_demo.yaml) or use `llip run`")
    out = run_sweep(cfg, max_concurrent_trials=args.max_concurrent_trials)
    cmp = out["comparison"]
    print(f"\nsweep {out['run_name']}: {out['finished']} of {out['trials']} trials finished, "
          f"ranked by {cmp.metric} ({cmp.mode}):\n")
    print(format_table(cmp))
    if cmp.best is not None:
        print(f"\nbest: {cmp.best['run_name']}  " + "  ".join(f"{k}={v}" for k, v in cmp.best["values"].items()))
    print(f"\nMLflow parent run {out['parent_run_id']} in {out['tracking_uri']} (compare/comparison.png)")
    print(f"  llip compare {out['run_name']}      mlflow ui --backend-store-uri {out['tracking_uri']}")
    return 0 if out["finished"] else 1


# -- search space ------------------------------------------------------------------------------
def tune_space(space: SearchSpace):
    from ray import tune

    if space.grid is not None:
        return tune.grid_search(list(space.grid))
    if space.choice is not None:
        return tune.choice(list(space.choice))
    if space.uniform is not None:
        return tune.uniform(*space.uniform)
    if space.loguniform is not None:
        return tune.loguniform(*space.loguniform)
    lo, hi = space.randint
    return tune.randint(lo, hi + 1)  # the YAML's bounds are inclusive; Tune's upper bound is not


def count_trials(cfg: ExperimentConfig) -> int:
    grid = math.prod(len(s.grid) for s in cfg.sweep.params.values() if s.grid is not None)
    return grid * len(cfg.sweep.variants or {None: None}) * cfg.sweep.num_samples


def check_sweep(cfg: ExperimentConfig) -> None:
    """Mistakes that Tune would only report after the cluster is busy: fail here, in one line."""
    sw = cfg.sweep
    for vname, vover in (sw.variants or {}).items():
        if not isinstance(vover, dict):
            raise UserError(f"sweep.variants.{vname}: give a mapping of dotted keys to values, e.g. {{loss.type: clip}}")
        clash = sorted(set(vover) & set(sw.params))
        if clash:
            raise UserError(f"sweep.variants.{vname} sets {clash[0]}, which sweep.params also sweeps; keep it in one place")
        try:
            cfg.with_overrides(vover)
        except UserError as e:
            raise UserError(f"sweep.variants.{vname}: {e}") from None
    for path, space in sw.params.items():
        if path.startswith(("sweep.", "name", "mlflow.")):
            raise UserError(f"sweep.params.{path}: cannot sweep this key; sweep model/loss/data/train/scaling values")
        # Every grid/choice value must give a valid config (a typo'd path or value fails here).
        values = space.grid or space.choice or []
        for v in values:
            try:
                cfg.with_overrides({path: v})
            except UserError as e:
                raise UserError(f"sweep.params.{path} value {v!r}: {e}") from None
        if not values:
            lo = (space.uniform or space.loguniform or space.randint)[0]
            try:
                cfg.with_overrides({path: lo})
            except UserError as e:
                raise UserError(f"sweep.params.{path}: {e}") from None
    if sw.scheduler is not None and sw.metric.startswith("eval/") and cfg.eval_interval() == 0:
        raise UserError(f"sweep.scheduler needs {sw.metric} during training but train.eval_every is 0 and so is "
                        "eval.every (end only); set eval.every (e.g. 50) or sweep.metric: train/loss with mode: min")


# -- resources -----------------------------------------------------------------------------------
# The Tune actor running driver_fn only waits on its TorchTrainer (whose workers hold the real
# resources); Tune refuses an empty request, so it asks for a token amount, left out of the sums.
TRIAL_ACTOR_CPU = 0.001


def trial_data_cpus(cfg: ExperimentConfig) -> float:
    """Each trial's Ray Data pipeline (fused read+decode tasks, `decode_concurrency` of them at
    `decode_cpus` each) is capped at that plus one task's worth of headroom."""
    return (cfg.data.decode_concurrency + 1) * cfg.data.decode_cpus


def trial_resources(cfg: ExperimentConfig) -> dict[str, float]:
    """What one trial holds while it runs: its training workers plus its Ray Data read/decode tasks."""
    s = cfg.scaling
    cpu = s.num_workers * s.cpus_per_worker + trial_data_cpus(cfg)
    gpu = s.num_workers * (s.gpus_per_worker or 1) if s.use_gpu else 0.0
    return {"CPU": cpu, "GPU": gpu}


def derive_max_concurrent(cfg: ExperimentConfig, available: dict[str, float]) -> Optional[int]:
    """floor(free resources / per-trial resources), the tightest of CPU and GPU; None (no cap) when
    nothing fits yet, e.g. an autoscaling cluster whose GPU nodes are not up."""
    need = trial_resources(cfg)
    fits = [math.floor(available.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0]
    n = min(fits) if fits else 1
    return n if n >= 1 else None


# -- the Tune function trainable -------------------------------------------------------------------
def _report_callback(metric: str):
    """TuneReportCallback that forwards a Train report to Tune only when it carries the sweep metric.

    Eval metrics exist only at eval steps; Tune requires the metric in every result it gets, and
    ASHA should compare trials on the metric, not on reports that lack it."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class MetricTuneReportCallback(TuneReportCallback):
        def __init__(self, metric: str):
            super().__init__()
            self.metric = metric

        def after_report(self, run_context, metrics, checkpoint):
            if metrics and self.metric in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    return MetricTuneReportCallback(metric)


def driver_fn(config: dict[str, Any], llip: dict[str, Any]) -> None:
    """One trial: the base config plus this trial's overrides, trained by run_experiment into a
    child run of the sweep's parent. `llip` (the base config, parent run, variants) is passed with
    tune.with_parameters, not in the trial's config, so Tune's console shows only what is swept."""
    import ray.tune

    from orchestrator.config import parse_config
    from orchestrator.driver import run_experiment

    meta = llip
    overrides = dict(config["overrides"])
    variant = config.get("variant")
    variant_tags = {}
    if variant is not None:
        overrides = {**meta["variants"][variant], **overrides}
        variant_tags = {"llip.variant": variant}
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = parse_config(meta["base"], source=meta["sweep_run_name"]).with_overrides(overrides)
    run_experiment(
        cfg,
        run_name=f"{meta['sweep_run_name']}-{variant + '-' if variant else ''}{trial_id}",
        parent_run_id=meta["parent_run_id"],
        tags={"llip.trial_id": trial_id, "llip.swept": json.dumps(overrides, sort_keys=True), **variant_tags},
        callbacks=[_report_callback(meta["metric"])],
        data_cpu_limit=trial_data_cpus(cfg),
    )


# -- the sweep -------------------------------------------------------------------------------------
def _absolute(cfg: ExperimentConfig) -> ExperimentConfig:
    """Local paths made absolute, so trials read and write the same places whatever their cwd."""
    from orchestrator import tracking
    from orchestrator.driver import storage_path

    ov: dict[str, Any] = {"storage_path": storage_path(cfg),
                          "mlflow.tracking_uri": tracking.resolve_tracking_uri(cfg.mlflow.tracking_uri)}
    for key in ("train", "eval"):
        v = getattr(cfg.data, key)
        if v and "://" not in v:
            ov[f"data.{key}"] = os.path.abspath(v)
    if cfg.eval.sets:
        ov["eval.sets"] = [{**s.model_dump(exclude_none=True),
                            "path": s.path if "://" in s.path else os.path.abspath(s.path)} for s in cfg.eval.sets]
    return cfg.with_overrides(ov)


def run_sweep(cfg: ExperimentConfig, max_concurrent_trials: Optional[int] = None) -> dict[str, Any]:
    import ray
    from ray import tune

    from orchestrator import compare
    from orchestrator.data import build_datasets, manifest_tags
    from orchestrator.driver import _one_line, init_ray, preflight, start_mlflow_run, storage_path

    if cfg.sweep is None:
        raise UserError(f"{cfg.name}: no sweep: section")
    check_sweep(cfg)
    cfg = _absolute(cfg)
    sw = cfg.sweep
    # Tune would chdir every trial into its own directory; the trials need none of that.
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    preflight(cfg)
    init_ray()
    build_datasets(cfg)  # preflight the shards before any MLflow run exists

    c, uri, parent_id, run_name, _ = start_mlflow_run(
        cfg, None, tags={"llip.sweep": "true",
                         "llip.sweep.params": json.dumps((["variant"] if sw.variants else []) + sorted(sw.params)),
                         "llip.sweep.metric": sw.metric, "llip.sweep.mode": sw.mode, **manifest_tags(cfg)})
    tracker = None
    try:
        c.log_text(parent_id, resolved_yaml(cfg), "config/sweep.yaml")
        n_trials = count_trials(cfg)
        limit = max_concurrent_trials or sw.max_concurrent_trials
        if limit is None:
            limit = derive_max_concurrent(cfg, ray.available_resources())
            how = f"derived from free resources {_fmt_res(ray.available_resources())} / per trial {_fmt_res(trial_resources(cfg))}"
        else:
            how = "as configured"
        c.log_param(parent_id, "sweep.max_concurrent_trials", str(limit))
        print(f"[llip] sweep {run_name}: {n_trials} trials, at most {limit or 'unlimited'} at once ({how}); "
              f"MLflow parent run {parent_id} in {uri}", flush=True)

        scheduler = None
        if sw.scheduler is not None:
            from ray.tune.schedulers import ASHAScheduler

            every = cfg.eval_interval() if sw.metric.startswith("eval/") else cfg.train.log_every
            # stop_last_trials=False: a trial that survives every rung ends by itself, so its run
            # is closed FINISHED by run_experiment instead of being cut off at its final report.
            scheduler = ASHAScheduler(time_attr="step", max_t=cfg.train.steps, grace_period=sw.scheduler.grace_period * every,
                                      reduction_factor=sw.scheduler.reduction_factor, stop_last_trials=False)
        tracker = _trial_tracker()
        tuner = tune.Tuner(
            # The trial actor only waits on its TorchTrainer, whose workers hold the real resources.
            tune.with_resources(
                tune.with_parameters(driver_fn, llip={
                    "base": cfg.model_dump(mode="json", exclude={"sweep"}), "parent_run_id": parent_id,
                    "sweep_run_name": run_name, "metric": sw.metric, "variants": sw.variants or {}}),
                {"cpu": TRIAL_ACTOR_CPU}),
            param_space={
                "overrides": {path: tune_space(space) for path, space in sw.params.items()},
                **({"variant": tune.grid_search(list(sw.variants))} if sw.variants else {}),
            },
            tune_config=tune.TuneConfig(metric=sw.metric, mode=sw.mode, num_samples=sw.num_samples, scheduler=scheduler,
                                        max_concurrent_trials=limit),
            run_config=tune.RunConfig(name=run_name, storage_path=storage_path(cfg), callbacks=[tracker],
                                      failure_config=tune.FailureConfig(max_failures=0, fail_fast=False), verbose=1),
        )
        tuner.fit()
    except BaseException as e:
        c.set_tag(parent_id, "llip.error", _one_line(e)[:5000])
        if tracker is not None:
            _reconcile(c, parent_id, tracker, interrupted=True)
        c.set_terminated(parent_id, status="KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise

    counts = _reconcile(c, parent_id, tracker)
    cmp = compare.compare(c, parent_id)
    if cmp.rows:
        compare.log_to_parent(c, cmp)
    c.set_tag(parent_id, "llip.trials", str(counts["total"]))
    c.set_tag(parent_id, "llip.trials_failed", str(counts["failed"]))
    if counts["finished"] == 0:
        c.set_tag(parent_id, "llip.error", f"all {counts['total']} trials failed; see the child runs' llip.error")
        c.set_terminated(parent_id, status="FAILED")
    else:
        c.set_terminated(parent_id, status="FINISHED")
    return {"parent_run_id": parent_id, "run_name": run_name, "tracking_uri": uri, "trials": counts["total"],
            "finished": counts["finished"], "comparison": cmp}


def _fmt_res(r: dict) -> str:
    return "{" + ", ".join(f"{k}: {r.get(k, 0):g}" for k in ("CPU", "GPU")) + "}"


def _trial_tracker():
    """Tune callback that remembers every trial, for reconciling MLflow with Tune afterwards."""
    from ray.tune import Callback

    class TrialTracker(Callback):
        def __init__(self):
            self.trials = {}

        def on_trial_start(self, iteration, trials, trial, **info):
            self.trials[trial.trial_id] = trial

        def on_trial_error(self, iteration, trials, trial, **info):
            self.trials[trial.trial_id] = trial

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.trials[trial.trial_id] = trial

    return TrialTracker()


def _trial_error(trial) -> str:
    from orchestrator.driver import _one_line

    try:
        err = trial.get_pickled_error()
    except Exception:
        err = None
    if err is not None:
        return _one_line(err)
    try:
        text = trial.get_error()
    except Exception:
        text = None
    if text:
        lines = [line for line in str(text).strip().splitlines() if line.strip()]
        return lines[-1] if lines else "unknown error"
    return "unknown error"


def _reconcile(c, parent_id: str, tracker, interrupted: bool = False) -> dict[str, int]:
    """Make MLflow agree with Tune: exactly one child per trial, none left RUNNING.

    A trial that failed before run_experiment created its run (bad override, preflight) gets a
    FAILED child with its error; a trial ASHA stopped (its actor is gone, so it could not finish its
    own run) is marked KILLED with tag llip.stopped; an errored trial's run is FAILED."""
    from orchestrator import compare

    parent = c.get_run(parent_id)
    by_trial = {}
    for r in compare.sweep_children(c, parent):
        by_trial.setdefault(r.data.tags.get("llip.trial_id"), []).append(r)
    counts = {"total": 0, "finished": 0, "failed": 0}
    for tid, trial in tracker.trials.items():
        counts["total"] += 1
        status = trial.status  # TERMINATED | ERROR | RUNNING/PENDING (interrupted)
        runs = by_trial.get(tid, [])
        error = _trial_error(trial) if status == "ERROR" else None
        if not runs:
            overrides = trial.config.get("overrides", {})
            run = c.create_run(parent.info.experiment_id, run_name=f"{parent.data.tags.get('llip.run_name')}-{tid}",
                               tags={"mlflow.parentRunId": parent_id, "llip.trial_id": tid,
                                     "llip.swept": json.dumps(overrides, sort_keys=True)})
            for k, v in overrides.items():
                c.log_param(run.info.run_id, k, str(v))
            c.set_tag(run.info.run_id, "llip.error", error or f"trial ended as {status} before training started")
            c.set_terminated(run.info.run_id, "FAILED" if status == "ERROR" or not interrupted else "KILLED")
            counts["failed"] += 1
            continue
        run = runs[0]
        rid, mstatus = run.info.run_id, run.info.status
        if status == "ERROR":
            if mstatus != "FAILED":
                c.set_tag(rid, "llip.error", error)
                c.set_terminated(rid, "FAILED")
            counts["failed"] += 1
        elif mstatus == "FAILED" and status == "TERMINATED" and not interrupted:
            # Tune stopped it (ASHA) and tearing its actor down broke the fit it was waiting on;
            # Tune itself saw no error, so this is an early stop, not a crash.
            last = max((m.step for m in c.get_metric_history(rid, "train/loss")), default=0)
            c.set_tag(rid, "llip.stopped", f"stopped early by the ASHA scheduler at step {last}")
            c.set_tag(rid, "llip.stop_teardown", run.data.tags.get("llip.error", "")[:5000])
            c.delete_tag(rid, "llip.error")
            c.update_run(rid, status="KILLED")
            counts["finished"] += 1
        elif mstatus == "RUNNING":
            # Tune ended it without a crash: ASHA stopped it, or the sweep was interrupted. A trial
            # that had logged its final step only missed its closing bookkeeping.
            last = max((m.step for m in c.get_metric_history(rid, "train/loss")), default=0)
            if not interrupted and last >= int(run.data.params.get("train.steps", 0) or 0) > 0:
                c.set_tag(rid, "llip.stopped", "ended by Tune right after its final step")
                c.set_terminated(rid, "FINISHED")
            else:
                why = "interrupted with the sweep" if interrupted else f"stopped early by the ASHA scheduler at step {last}"
                c.set_tag(rid, "llip.stopped", why)
                c.set_terminated(rid, "KILLED")
            counts["finished" if not interrupted else "failed"] += 1
        elif mstatus == "FINISHED":
            counts["finished"] += 1
        else:
            counts["failed"] += 1
    return counts
