"""`llip sweep FILE.yaml`: the experiment's `sweep:` section run with Ray Tune.

Three layers (Ray's train_tune_interop pattern): Tune runs `driver_fn` once per trial; driver_fn
builds the trial's config and calls the same `run_experiment` as `llip run`, whose TorchTrainer runs
the per-worker loop. MLflow: this module creates one parent run per sweep; each trial's
run_experiment creates its child run (tag `mlflow.parentRunId`, `llip.trial_id`), and rank 0 logs
into it, so no Tune logger callback writes runs of its own (no duplicates). After the sweep, trials
that never reached MLflow or were stopped by ASHA are reconciled from Tune's view, and the parent
gets the comparison table and plot (`orchestrator.tracking.compare`).

Resume (`--resume [NAME]`, or `--run-name NAME` of an existing sweep): Tuner.restore on the sweep's
Tune folder, storage_path/NAME. Trials keep their ids, hence their run names `NAME-[VARIANT-]ID`, so
each trial's run_experiment reopens its own child run and its newest checkpoint; finished trials are
not rerun, errored ones stay FAILED unless --retry-failed. The trainable's meta (base config, parent
run) is rebuilt from the parent's config/sweep.yaml, not from the file, so resumed trials train what
the sweep started with.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Optional

from orchestrator.config.schema import ExperimentConfig, SearchSpace, load_config, resolved_yaml
from orchestrator.errors import UserError
from orchestrator.tracking.lookup import quote, sweep_children


def add_args(p) -> None:
    p.add_argument("file", metavar="FILE.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a base config value by dotted path before sweeping (repeatable)")
    p.add_argument("--max-concurrent-trials", type=int, default=None,
                   help="trials at once (default: sweep.max_concurrent_trials, else what the cluster's free "
                        "CPUs/GPUs fit)")
    p.add_argument("--run-name", default=None,
                   help="name of the sweep (its MLflow parent run and Ray Tune folder); relaunching with an "
                        "existing name resumes that sweep")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="NAME",
                   help="continue an interrupted sweep (NAME, else the experiment's newest unfinished one): "
                        "finished trials are kept, unfinished ones resume from their checkpoints")
    p.add_argument("--retry-failed", action="store_true",
                   help="when resuming, also rerun the trials that failed (from their last checkpoint); "
                        "without it they stay FAILED")


def cli(args) -> int:
    from orchestrator.config.schema import parse_overrides
    from orchestrator.tracking.compare import format_table

    cfg = load_config(args.file)
    if args.overrides:
        cfg = cfg.with_overrides(parse_overrides(args.overrides))
    if cfg.sweep is None:
        raise UserError(f"{args.file}: no sweep: section; add one (see experiments/sweep_demo.yaml) or use `llip run`")
    if args.resume and args.run_name and args.resume != args.run_name:
        raise UserError(f"--resume {args.resume} and --run-name {args.run_name} name different sweeps; "
                        "give one of them")
    resume = args.resume is not None
    if args.retry_failed and not (resume or args.run_name):
        raise UserError("--retry-failed applies to resuming a sweep; add --resume [NAME]")
    out = run_sweep(cfg, max_concurrent_trials=args.max_concurrent_trials,
                    run_name=args.run_name or args.resume or None, resume=resume,
                    retry_failed=args.retry_failed, source=args.file)
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


def trial_resources(cfg: ExperimentConfig, shared: bool = False) -> dict[str, float]:
    """What one trial holds while it runs: its training workers plus its Ray Data read/decode tasks
    (none with `shared`: the sweep's shared data pass holds the decode CPUs for all trials)."""
    s = cfg.scaling
    cpu = s.num_workers * s.cpus_per_worker + (0.0 if shared else trial_data_cpus(cfg))
    gpu = s.num_workers * (s.gpus_per_worker or 1) if s.use_gpu else 0.0
    return {"CPU": cpu, "GPU": gpu, **{k: s.num_workers * v for k, v in s.resources_per_worker.items()}}


def derive_max_concurrent(cfg: ExperimentConfig, available: dict[str, float],
                          shared_cpus: Optional[float] = None) -> Optional[int]:
    """floor(free resources / per-trial resources), the tightest of CPU, GPU and the workers' custom
    resources; None (no cap) when nothing fits yet, e.g. an autoscaling cluster whose GPU nodes are
    not up. `shared_cpus`: the
    shared data pass's CPUs, taken off the top once (its trials then reserve no data CPUs).
    CPU trials also count their training threads (`train.threads_per_worker`, else the worker's
    whole CPUs, at least 1): each keeps a core busy whatever fraction of a CPU the worker reserves,
    so no more trials start than the CPUs have cores for their threads (with the shared pass,
    whose trials reserve only their workers' fractional CPUs, more would only share the cores)."""
    cores = available.get("CPU", 0.0)
    if shared_cpus is not None:
        available = {**available, "CPU": cores - shared_cpus}
    need = trial_resources(cfg, shared=shared_cpus is not None)
    fits = [math.floor(available.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0]
    if not cfg.scaling.use_gpu and fits:
        fits.append(math.floor(cores / (cfg.scaling.num_workers * cfg.torch_threads()) + 1e-9))
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


PLACEHOLDER_TAG = "llip.placeholder"  # a child _reconcile made for a trial that died before run_experiment made one
STOPPED_INTERRUPTED = "interrupted with the sweep"
# Seconds between Tune's snapshots of its trial table (Tune's "auto" is at least 10). A trial must be
# in a snapshot before its MLflow run exists (driver_fn waits for that), so this is also the most a
# trial's start waits; the snapshot is a few KB of JSON.
TUNE_SNAPSHOT_S = 2


def trial_run_name(sweep_run_name: str, trial_id: str, variant: Optional[str] = None) -> str:
    """A trial's run name (MLflow tag llip.run_name and Ray Train folder): Tune keeps trial ids across
    Tuner.restore, so a resumed trial finds its run and its checkpoints again by this name."""
    return f"{sweep_run_name}-{variant + '-' if variant else ''}{trial_id}"


def driver_fn(config: dict[str, Any], llip: dict[str, Any]) -> None:
    """One trial: the base config plus this trial's overrides, trained by run_experiment into a
    child run of the sweep's parent. `llip` (the base config, parent run, variants) is passed with
    tune.with_parameters, not in the trial's config, so Tune's console shows only what is swept."""
    import ray.tune

    from orchestrator.config.schema import parse_config
    from orchestrator.console import say
    from orchestrator.tracking import store as tracking
    from orchestrator.tracking.runs import find_run_by_name
    from orchestrator.training.driver import run_experiment

    meta = llip
    overrides = dict(config["overrides"])
    variant = config.get("variant")
    variant_tags = {}
    if variant is not None:
        overrides = {**meta["variants"][variant], **overrides}
        variant_tags = {"llip.variant": variant}
    trial_id = ray.tune.get_context().get_trial_id()
    name = trial_run_name(meta["sweep_run_name"], trial_id, variant)
    cfg = parse_config(meta["base"], source=meta["sweep_run_name"]).with_overrides(overrides)
    _await_tune_snapshot(cfg, meta["sweep_run_name"], trial_id)

    c = tracking.client(cfg.mlflow.tracking_uri)
    prior = find_run_by_name(c, meta["experiment_id"], name)
    if prior is not None and prior.data.tags.get(PLACEHOLDER_TAG):
        c.delete_run(prior.info.run_id)  # --retry-failed of a trial that crashed before training: make the real run
    elif prior is not None and prior.info.status == "FINISHED":
        # Tune's last snapshot predates this trial's end (the driver died in between): its run is
        # complete, so hand Tune the final figures instead of training again.
        say(f"[llip] trial {trial_id}: run {name} already FINISHED (MLflow run {prior.info.run_id}); not rerun")
        final = dict(prior.data.metrics)
        if meta["metric"] in final:
            ray.tune.report({**final, "step": int(prior.data.params.get("train.steps", 0) or 0)})
        return
    run_experiment(
        cfg,
        run_name=name,
        parent_run_id=meta["parent_run_id"],
        tags={"llip.trial_id": trial_id, "llip.swept": json.dumps(overrides, sort_keys=True), **variant_tags},
        callbacks=[_report_callback(meta["metric"])],
        data_cpu_limit=None if meta.get("shared_data") else trial_data_cpus(cfg),
        shared_data=meta.get("shared_data"),
    )


def _tune_dir(cfg: ExperimentConfig, sweep_run_name: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path) of the sweep's Tune experiment folder, storage_path/NAME."""
    from orchestrator.storage.paths import run_folder

    return run_folder(cfg, sweep_run_name)


def _tune_snapshots(fs, folder: str) -> list[str]:
    """Tune's saved trial tables in the folder, oldest first (the session timestamps in their names
    sort by time)."""
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    return sorted(i.path for i in infos
                  if i.base_name.startswith("experiment_state-") and i.base_name.endswith(".json"))


def _await_tune_snapshot(cfg: ExperimentConfig, sweep_run_name: str, trial_id: str, timeout_s: float = 120.0) -> bool:
    """Wait until Tune's saved trial table (experiment_state-*.json) lists this trial.

    A driver killed after a trial started but before Tune's next snapshot would, on restore, create
    that trial afresh under a new id, while the old id's MLflow run stayed behind: two children for
    one trial. So no trial makes its MLflow run before Tune has recorded it."""
    import time

    from orchestrator.console import say

    fs, folder = _tune_dir(cfg, sweep_run_name)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            states = _tune_snapshots(fs, folder)
            if states:  # restore reads the newest too
                with fs.open_input_stream(states[-1]) as f:
                    if trial_id.encode() in f.readall():
                        return True
        except OSError:
            pass  # a snapshot being replaced: read it again
        time.sleep(0.5)
    say(f"[llip] warning: Tune's saved state in {folder} still lacks trial {trial_id} after {timeout_s:.0f} s; "
        "if the sweep is resumed after a crash from here on, this trial may run again under a new id")
    return False


# -- the sweep -------------------------------------------------------------------------------------
def _absolute(cfg: ExperimentConfig) -> ExperimentConfig:
    """Local paths made absolute, so trials read and write the same places whatever their cwd."""
    from orchestrator.storage.paths import storage_path
    from orchestrator.tracking import store as tracking

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


def _trainable(meta: dict[str, Any]):
    from ray import tune

    # The trial actor only waits on its TorchTrainer, whose workers hold the real resources.
    return tune.with_resources(tune.with_parameters(driver_fn, llip=meta), {"cpu": TRIAL_ACTOR_CPU})


def _meta(cfg: ExperimentConfig, parent_id: str, run_name: str, exp_id: str,
          shared: Optional[dict] = None) -> dict[str, Any]:
    return {"base": cfg.model_dump(mode="json", exclude={"sweep"}), "parent_run_id": parent_id,
            "sweep_run_name": run_name, "metric": cfg.sweep.metric, "variants": cfg.sweep.variants or {},
            "experiment_id": exp_id, "shared_data": shared}


def _mlflow(cfg: ExperimentConfig):
    from orchestrator.tracking import store as tracking

    exp = cfg.mlflow.experiment or cfg.name
    c, uri, exp_id = tracking.open_experiment(cfg.mlflow.tracking_uri, exp)
    return c, uri, exp, exp_id


def find_sweep(c, uri: str, exp: str, exp_id: str, name: Optional[str], resume: bool):
    """The parent run of the sweep to continue: the one named NAME, else (resume without a name)
    the experiment's newest sweep that did not finish. None: start a new sweep (named NAME)."""
    if name:
        runs = c.search_runs([exp_id], filter_string=f"tags.`llip.run_name` = '{quote(name)}'", max_results=1)
        if not runs:
            if resume:
                raise UserError(f"no sweep named {name!r} in MLflow experiment {exp!r} ({uri}); check the name "
                                f"(`llip compare {exp}` shows the latest sweep) or drop --resume to start a new one")
            return None
        if runs[0].data.tags.get("llip.sweep") != "true":
            raise UserError(f"{name!r} in MLflow experiment {exp!r} is a single run, not a sweep; resume it with "
                            f"`llip run FILE --run-name {name}`, or give the sweep another name")
        return runs[0]
    runs = c.search_runs([exp_id], filter_string="tags.`llip.sweep` = 'true' and attributes.status != 'FINISHED'",
                         max_results=1, order_by=["attributes.start_time DESC"])
    if not runs:
        raise UserError(f"nothing to resume: no unfinished sweep in MLflow experiment {exp!r} ({uri}); "
                        "start a new one without --resume, or name a sweep: --resume NAME")
    return runs[0]


def _first_difference(a: Any, b: Any, path: str) -> Optional[tuple[str, Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            d = _first_difference(a.get(k), b.get(k), f"{path}.{k}")
            if d:
                return d
        return None
    return None if a == b else (path, a, b)


def _stored_config(c, parent) -> ExperimentConfig:
    import tempfile

    import yaml

    from orchestrator.config.schema import parse_config

    name, pid = parent.data.tags.get("llip.run_name"), parent.info.run_id
    with tempfile.TemporaryDirectory() as d:
        try:
            text = open(c.download_artifacts(pid, "config/sweep.yaml", d)).read()
        except Exception:
            raise UserError(f"sweep {name} (MLflow run {pid}) has no config/sweep.yaml artifact, so it cannot be "
                            "resumed as it started; start a new sweep without --resume/--run-name") from None
    return parse_config(yaml.safe_load(text), source=f"{name}: config/sweep.yaml")


def _prepare_resume(cfg: ExperimentConfig, c, parent, retry_failed: bool) -> tuple[ExperimentConfig, str]:
    """Checks before Ray starts: the sweep can be resumed, the file's sweep: section is the one it
    ran, and Tune's state is where it is looked for. Returns (stored config, Tune folder)."""
    from ray import tune

    from orchestrator.storage.paths import storage_path

    name, pid = parent.data.tags.get("llip.run_name"), parent.info.run_id
    if parent.info.status == "FINISHED" and not retry_failed:
        raise UserError(f"sweep {name} already FINISHED; nothing to resume (rerun its failed trials with "
                        "--retry-failed, or start a new sweep without --resume/--run-name)")
    stored = _stored_config(c, parent)
    diff = _first_difference(cfg.sweep.model_dump(mode="json"), stored.sweep.model_dump(mode="json"), "sweep")
    if diff:
        key, now, then = diff
        raise UserError(f"{key} is {now!r} in the file but {then!r} in sweep {name} (config/sweep.yaml on MLflow run "
                        f"{pid}); Tune cannot resume a changed search space: restore it, or start a new sweep "
                        "without --resume/--run-name")
    # Trials must go on with the config they started with; say what in the file is not used.
    now, then = cfg.flat(), stored.flat()
    changed = [k for k in sorted(set(now) | set(then)) if now.get(k) != then.get(k)]
    if changed:
        print(f"[llip] note: {', '.join(changed[:4])}{' ...' if len(changed) > 4 else ''} differ(s) from sweep "
              f"{name}'s stored config; resuming with the stored one (config/sweep.yaml on its parent run)", flush=True)
    # The folder where the file says (it may have moved there), else where the sweep started.
    tried = []
    for root in dict.fromkeys([storage_path(cfg), storage_path(stored)]):
        cand = stored.with_overrides({"storage_path": root})
        fs, folder = _tune_dir(cand, name)
        tried.append(folder)
        if tune.Tuner.can_restore(folder, storage_filesystem=fs) and _tune_snapshots(fs, folder):
            return cand, folder  # as `fs` names it: Tuner.restore gets the same filesystem
    raise UserError(f"sweep {name}: no Ray Tune state in {' or '.join(tried)} (tuner.pkl, experiment_state-*.json); "
                    "if the folder moved, set storage_path to its new parent (--set storage_path=DIR), else start a "
                    "new sweep without --resume/--run-name")


def run_sweep(cfg: ExperimentConfig, max_concurrent_trials: Optional[int] = None, run_name: Optional[str] = None,
              resume: bool = False, retry_failed: bool = False, source: str = "FILE") -> dict[str, Any]:
    """A new sweep, or (resume, or run_name naming an existing sweep) the rest of an earlier one.

    Errored trials are not rerun on resume unless retry_failed: a trial crashes mostly on something
    in its own config (too large a batch, a bad value), which would crash again; with retry_failed
    they continue from their last checkpoint (Tune's resume_errored; run_experiment picks up the
    newest checkpoint either way, so restart_errored would not start them from scratch).

    The driver holds the sweep's lease (orchestrator/sweeps/lease.py) from the moment it knows the
    sweep's name until it returns: a second driver of the same sweep is refused in one line."""
    leases: list = []
    try:
        return _run_sweep(cfg, max_concurrent_trials, run_name, resume, retry_failed, source, leases)
    finally:
        for lease in leases:
            lease.release()


def _take_lease(cfg: ExperimentConfig, run_name: str, leases: list) -> None:
    from orchestrator.sweeps.lease import Lease

    fs, folder = _tune_dir(cfg, run_name)
    lease = Lease(fs, folder, run_name)
    dead = lease.acquire()
    leases.append(lease)
    if dead:
        print(f"[llip] sweep {run_name}: its previous driver is gone (host {dead.get('host')}, pid {dead.get('pid')}, "
              f"since {dead.get('since')}); this driver takes over its lease", flush=True)


def _run_sweep(cfg: ExperimentConfig, max_concurrent_trials: Optional[int], run_name: Optional[str],
               resume: bool, retry_failed: bool, source: str, leases: list) -> dict[str, Any]:
    import ray
    from ray import tune

    from orchestrator.cluster import init_ray
    from orchestrator.errors import one_line
    from orchestrator.storage.paths import storage_filesystem
    from orchestrator.tracking import compare
    from orchestrator.tracking.runs import start_mlflow_run
    from orchestrator.training.driver import manifest_tags, preflight

    if cfg.sweep is None:
        raise UserError(f"{cfg.name}: no sweep: section")
    check_sweep(cfg)
    cfg = _absolute(cfg)
    # Tune would chdir every trial into its own directory; the trials need none of that.
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", str(TUNE_SNAPSHOT_S))
    c, uri, exp, exp_id = _mlflow(cfg)
    previous = find_sweep(c, uri, exp, exp_id, run_name, resume) if (resume or run_name) else None
    if previous is not None:
        run_name = previous.data.tags["llip.run_name"]
        cfg, folder = _prepare_resume(cfg, c, previous, retry_failed)
        _take_lease(cfg, run_name, leases)  # before anything of the sweep's is touched
    elif run_name:
        fs, folder = _tune_dir(cfg, run_name)
        if tune.Tuner.can_restore(folder, storage_filesystem=fs):
            raise UserError(f"{folder} holds a Ray Tune sweep but MLflow experiment {exp!r} ({uri}) has no sweep "
                            f"{run_name!r}; pick another --run-name, or delete that folder")
    sw = cfg.sweep
    preflight(cfg)
    init_ray()
    # Trials' workers may land on other nodes: local paths must be visible there too.
    from orchestrator.storage.reach import check_shared_storage, worker_nodes

    check_shared_storage(cfg, uri, worker_nodes(cfg)[2])

    n_trials = count_trials(cfg)
    tracker = _trial_tracker()
    if previous is None:
        swept = (["variant"] if sw.variants else []) + sorted(sw.params)
        if run_name:
            _take_lease(cfg, run_name, leases)
        c, uri, parent_id, run_name, _ = start_mlflow_run(
            cfg, run_name, tags={"llip.sweep": "true", "llip.sweep.params": json.dumps(swept),
                                 "llip.sweep.metric": sw.metric, "llip.sweep.mode": sw.mode, **manifest_tags(cfg),
                                 # llip report's paired comparisons (sweep.pairs)
                                 **({"llip.sweep.pairs": json.dumps(sw.pairs)} if sw.pairs else {})})
        if not leases:  # named from the new MLflow run's id: nobody else can know the name yet
            _take_lease(cfg, run_name, leases)
    else:
        parent_id = previous.info.run_id
        c.update_run(parent_id, status="RUNNING")
        if "llip.error" in previous.data.tags:
            c.delete_tag(parent_id, "llip.error")
        c.set_tag(parent_id, "llip.sweep.resumes", str(int(previous.data.tags.get("llip.sweep.resumes", "0")) + 1))
    shared = None
    try:
        from orchestrator.data.shared_decode import start_shared_data

        # one decode per data setting for every trial (orchestrator/data/shared_decode.py), started here so
        # that no trial owns it; None after one line when the cache would not fit
        shared = start_shared_data(cfg, run_name)
        shared_meta = shared.meta() if shared is not None else None
        if previous is None:
            c.log_text(parent_id, resolved_yaml(cfg), "config/sweep.yaml")
            limit = max_concurrent_trials or sw.max_concurrent_trials
            if limit is None:
                limit = derive_max_concurrent(cfg, ray.available_resources(), shared.cpus if shared else None)
                how = (f"derived from free resources {_fmt_res(ray.available_resources())} / "
                       f"per trial {_fmt_res(trial_resources(cfg, shared is not None))}"
                       + (f", {shared.cpus:g} CPUs for the shared data pass" if shared else ""))
            else:
                how = "as configured"
            c.log_param(parent_id, "sweep.max_concurrent_trials", str(limit))
            print(f"[llip] sweep {run_name}: {n_trials} trials, at most {limit or 'unlimited'} at once ({how}); "
                  f"MLflow parent run {parent_id} in {uri}", flush=True)
            tuner = _new_tuner(cfg, _meta(cfg, parent_id, run_name, exp_id, shared_meta), run_name, limit, tracker)
        else:
            done = [r for r in sweep_children(c, previous) if r.info.status == "FINISHED"]
            kept = previous.data.params.get("sweep.max_concurrent_trials", "?")
            print(f"[llip] resuming sweep {run_name}: {len(done)} of {n_trials} trials FINISHED before, the others "
                  f"continue from their checkpoints{' (failed ones too)' if retry_failed else ''}; at most {kept} at "
                  f"once; MLflow parent run {parent_id} in {uri}; Tune state "
                  f"{'s3://' if cfg.storage_path.startswith('s3://') else ''}{folder}", flush=True)
            if max_concurrent_trials and str(max_concurrent_trials) != kept:
                print(f"[llip] note: --max-concurrent-trials {max_concurrent_trials} is ignored when resuming; "
                      f"Tune keeps the sweep's {kept}", flush=True)
            tuner = tune.Tuner.restore(folder, trainable=_trainable(_meta(cfg, parent_id, run_name, exp_id, shared_meta)),
                                       resume_unfinished=True, resume_errored=retry_failed,
                                       storage_filesystem=storage_filesystem(cfg))
            # Tune restores the RunConfig pickled at the sweep's start, callbacks included; this
            # session's tracker must be the one Tune calls. (Tuner has no public RunConfig accessor.)
            tuner._local_tuner.get_run_config().callbacks = [tracker]
        tuner.fit()
        unfinished = tracker.unfinished()
        if unfinished:
            # Tune catches SIGINT itself: it snapshots its state, stops the running trials as
            # TERMINATED and fit() returns as if the sweep had ended.
            raise KeyboardInterrupt(f"{len(unfinished)} of {len(tracker.trials)} trials unfinished")
    except BaseException as e:
        interrupted = isinstance(e, KeyboardInterrupt)
        hint = f"continue it with: llip sweep {source} --resume {run_name}"
        c.set_tag(parent_id, "llip.error", (f"interrupted; {hint}" if interrupted else one_line(e))[:5000])
        _reconcile(c, parent_id, tracker, interrupted=True)
        if shared is not None:  # its files stay for --resume
            shared.finish(c, parent_id, remove=False)
        c.set_terminated(parent_id, status="KILLED" if interrupted else "FAILED")
        print(f"[llip] sweep {run_name} {'interrupted' if interrupted else 'failed'}; {hint}", flush=True)
        raise

    counts = _reconcile(c, parent_id, tracker)
    if shared is not None:
        shared.finish(c, parent_id, remove=True)
    cmp = compare.compare(c, parent_id)
    if cmp.rows:
        compare.log_to_parent(c, cmp)
    if cmp.best is not None and cfg.mlflow.log_model:  # without logged models there is nothing to register
        register_best(c, uri, parent_id, cmp.best["run_id"], exp)
    c.set_tag(parent_id, "llip.trials", str(counts["total"]))
    c.set_tag(parent_id, "llip.trials_failed", str(counts["failed"]))
    if counts["finished"] == 0:
        c.set_tag(parent_id, "llip.error", f"all {counts['total']} trials failed; see the child runs' llip.error")
        c.set_terminated(parent_id, status="FAILED")
    else:
        c.set_terminated(parent_id, status="FINISHED")
    return {"parent_run_id": parent_id, "run_name": run_name, "tracking_uri": uri, "trials": counts["total"],
            "finished": counts["finished"], "comparison": cmp}


def register_best(c, uri: str, parent_id: str, best_run_id: str, name: str, alias: str = "best") -> Optional[int]:
    """The best trial's logged MLflow model registered as NAME@best (NAME: the experiment), so
    `mlflow.pyfunc.load_model("models:/NAME@best")` follows the newest sweep's winner; None (with a
    warning and a tag on the parent) when it cannot be done, which never fails the sweep."""
    from orchestrator.models.register import register_run

    try:
        name, version = register_run(c, uri, c.get_run(best_run_id), alias, name)
    except Exception as e:
        c.set_tag(parent_id, "llip.registered_model_error", f"{type(e).__name__}: {str(e)[:500]}")
        print(f"[llip] warning: the best trial's model was not registered: {str(e)[:300]}", flush=True)
        return None
    c.set_tag(parent_id, "llip.registered_model", f"{name}@{alias} (version {version})")
    print(f"[llip] registered the best trial's model as {name} version {version}, alias {alias}: "
          f"models:/{name}@{alias}", flush=True)
    return version


def _new_tuner(cfg: ExperimentConfig, meta: dict[str, Any], run_name: str, limit: Optional[int], tracker):
    from ray import tune

    from orchestrator.storage.paths import ray_storage

    sw = cfg.sweep
    scheduler = None
    if sw.scheduler is not None:
        from ray.tune.schedulers import ASHAScheduler

        every = cfg.eval_interval() if sw.metric.startswith("eval/") else cfg.train.log_every
        # stop_last_trials=False: a trial that survives every rung ends by itself, so its run
        # is closed FINISHED by run_experiment instead of being cut off at its final report.
        scheduler = ASHAScheduler(time_attr="step", max_t=cfg.train.steps,
                                  grace_period=sw.scheduler.grace_period * every,
                                  reduction_factor=sw.scheduler.reduction_factor, stop_last_trials=False)
    return tune.Tuner(
        _trainable(meta),
        param_space={
            "overrides": {path: tune_space(space) for path, space in sw.params.items()},
            **({"variant": tune.grid_search(list(sw.variants))} if sw.variants else {}),
        },
        tune_config=tune.TuneConfig(metric=sw.metric, mode=sw.mode, num_samples=sw.num_samples, scheduler=scheduler,
                                    max_concurrent_trials=limit),
        run_config=tune.RunConfig(name=run_name, storage_path=ray_storage(cfg)[0],
                                  storage_filesystem=ray_storage(cfg)[1], callbacks=[tracker],
                                  failure_config=tune.FailureConfig(max_failures=0, fail_fast=False), verbose=1),
    )


def _fmt_res(r: dict) -> str:
    return "{" + ", ".join(f"{k}: {r.get(k, 0):g}" for k in ("CPU", "GPU")) + "}"


def _trial_tracker():
    """Tune callback that remembers every trial, for reconciling MLflow with Tune afterwards."""
    from ray.tune import Callback

    class TrialTracker(Callback):
        """`ended`: trials that completed, were stopped by the scheduler or errored, in this session
        or (already over when first seen) a restored earlier one. A trial Tune stops because the
        sweep was interrupted gets no such event, although Tune then marks it TERMINATED."""

        def __init__(self):
            self.trials, self.ended = {}, set()

        def _see(self, trial):
            if trial.trial_id not in self.trials and trial.status in ("TERMINATED", "ERROR"):
                self.ended.add(trial.trial_id)
            self.trials[trial.trial_id] = trial

        def on_step_begin(self, iteration, trials, **info):
            for t in trials:
                self._see(t)

        def on_trial_start(self, iteration, trials, trial, **info):
            self._see(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._see(trial)
            self.ended.add(trial.trial_id)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._see(trial)
            self.ended.add(trial.trial_id)

        def unfinished(self) -> list[str]:
            return [tid for tid in self.trials if tid not in self.ended]

    return TrialTracker()


def _trial_error(trial) -> str:
    from orchestrator.errors import one_line

    try:
        err = trial.get_pickled_error()
    except Exception:
        err = None
    if err is not None:
        return one_line(err)
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
    own run) is marked KILLED with tag llip.stopped; an errored trial's run is FAILED. When the sweep
    was interrupted, its unfinished trials' runs are KILLED (tag llip.stopped) for a resume to reopen,
    and trials that never started get no run yet: a resume starts them under the same ids."""
    parent = c.get_run(parent_id)
    by_trial = {}
    for r in sweep_children(c, parent):
        by_trial.setdefault(r.data.tags.get("llip.trial_id"), []).append(r)
    ended = getattr(tracker, "ended", None)
    counts = {"total": 0, "finished": 0, "failed": 0}
    for tid, trial in tracker.trials.items():
        counts["total"] += 1
        status = trial.status  # TERMINATED | ERROR | RUNNING/PENDING (interrupted)
        cut = interrupted and status != "ERROR" and (ended is None or tid not in ended)
        runs = by_trial.get(tid, [])
        error = _trial_error(trial) if status == "ERROR" else None
        if not runs:
            counts["failed"] += 1
            if cut:
                continue
            overrides = trial.config.get("overrides", {})
            name = trial_run_name(parent.data.tags.get("llip.run_name"), tid, trial.config.get("variant"))
            # llip.run_name as driver_fn would give it, so a --retry-failed resume finds (and replaces) it
            run = c.create_run(parent.info.experiment_id, run_name=name,
                               tags={"mlflow.parentRunId": parent_id, "llip.trial_id": tid, "llip.run_name": name,
                                     PLACEHOLDER_TAG: "true", "llip.swept": json.dumps(overrides, sort_keys=True)})
            for k, v in overrides.items():
                c.log_param(run.info.run_id, k, str(v))
            c.set_tag(run.info.run_id, "llip.error", error or f"trial ended as {status} before training started")
            c.set_terminated(run.info.run_id, "FAILED")
            continue
        run = runs[0]
        rid, mstatus = run.info.run_id, run.info.status
        if status == "ERROR":
            if mstatus != "FAILED":
                c.set_tag(rid, "llip.error", error)
                c.set_terminated(rid, "FAILED")
            counts["failed"] += 1
        elif cut and mstatus in ("RUNNING", "FAILED"):
            # Stopping the trial's actor may have broken the fit it waited on (FAILED): not a crash.
            if mstatus == "FAILED":
                c.set_tag(rid, "llip.stop_teardown", run.data.tags.get("llip.error", "")[:5000])
                c.delete_tag(rid, "llip.error")
            c.set_tag(rid, "llip.stopped", STOPPED_INTERRUPTED)
            c.update_run(rid, status="KILLED")
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
                why = STOPPED_INTERRUPTED if interrupted else f"stopped early by the ASHA scheduler at step {last}"
                c.set_tag(rid, "llip.stopped", why)
                c.set_terminated(rid, "KILLED")
            counts["finished" if not interrupted else "failed"] += 1
        elif mstatus == "FINISHED":
            # Finished after a resume: the interrupted attempt's marks no longer describe the run.
            tags = run.data.tags
            if tags.get("llip.stopped") == STOPPED_INTERRUPTED:
                for k in ("llip.stopped", "llip.stop_teardown"):
                    if k in tags:
                        c.delete_tag(rid, k)
            if "llip.error" in tags:
                c.delete_tag(rid, "llip.error")
            counts["finished"] += 1
        else:
            counts["failed"] += 1
    return counts
