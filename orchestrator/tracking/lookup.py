"""Finding runs in MLflow by what users type: an experiment name (its newest sweep), a sweep's parent
run name, or a run id. Shared by `llip compare` and `llip report`."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from orchestrator.errors import UserError

SWEEP_TAG = "llip.sweep"


def quote(s: str) -> str:
    """A value inside an MLflow search filter's single quotes."""
    return s.replace("'", "\\'")


def sweep_children(c, parent) -> list:
    """A sweep's child runs (tag mlflow.parentRunId), oldest first."""
    return c.search_runs([parent.info.experiment_id],
                         filter_string=f"tags.`mlflow.parentRunId` = '{quote(parent.info.run_id)}'",
                         max_results=10000, order_by=["attributes.start_time ASC"])


def resolve_target(c, target: str):
    """(parent run or None, experiment name, runs to compare)."""
    if re.fullmatch(r"[0-9a-f]{32}", target):
        try:
            run = c.get_run(target)
        except Exception:
            run = None
        if run is not None:
            exp = c.get_experiment(run.info.experiment_id).name
            return run, exp, sweep_children(c, run)
    exps = c.search_experiments(max_results=10000)
    ids = [e.experiment_id for e in exps]
    if ids:
        named = c.search_runs(ids, filter_string=f"tags.`llip.run_name` = '{quote(target)}'", max_results=1)
        if named:
            run = named[0]
            return run, c.get_experiment(run.info.experiment_id).name, sweep_children(c, run)
    exp = c.get_experiment_by_name(target)
    if exp is None:
        raise UserError(f"no MLflow experiment, sweep run name or run id {target!r} in {c.tracking_uri}; "
                        "check the name (or pass --tracking-uri / set MLFLOW_TRACKING_URI)")
    parents = c.search_runs([exp.experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = 'true'",
                            max_results=1, order_by=["attributes.start_time DESC"])
    if parents:
        return parents[0], exp.name, sweep_children(c, parents[0])
    runs = [r for r in c.search_runs([exp.experiment_id], max_results=10000, order_by=["attributes.start_time ASC"])
            if "mlflow.parentRunId" not in r.data.tags]
    return None, exp.name, runs


def find_run(c, target: str):
    """A run by id, or by llip run name (newest first, any experiment); None when neither."""
    if re.fullmatch(r"[0-9a-f]{32}", target):
        try:
            return c.get_run(target)
        except Exception:
            return None
    ids = [e.experiment_id for e in c.search_experiments(max_results=10000)]
    if not ids:
        return None
    runs = c.search_runs(ids, filter_string=f"tags.`llip.run_name` = '{quote(target)}'", max_results=1,
                         order_by=["attributes.start_time DESC"])
    return runs[0] if runs else None


def run_of_checkpoint(c, ckpt_dir: str):
    """The training run whose checkpoint folder this is (its llip.checkpoint tag), or None."""
    ids = [e.experiment_id for e in c.search_experiments(max_results=10000)]
    hits = c.search_runs(ids, filter_string=f"tags.`llip.checkpoint` = '{quote(ckpt_dir)}'", max_results=1) if ids else []
    return hits[0] if hits else None


def store_client(tracking_uri: Optional[str] = None):
    """(client or None, resolved URI): None when a local sqlite store does not exist (opening it would
    create an empty one)."""
    from orchestrator.tracking import store

    uri = store.resolve_tracking_uri(tracking_uri)
    exists = not (uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists())
    return (store.client(uri) if exists else None), uri


def resolve_checkpoint(target: str, tracking_uri: Optional[str] = None):
    """(checkpoint state.pt URL, its MLflow run or None, client or None) for what a user typed: a
    checkpoint folder or file (local or s3://), a run's storage folder, or a run id or name."""
    from orchestrator.storage.checkpoints import checkpoint_file

    c, uri = store_client(tracking_uri)
    if target.startswith("s3://") or Path(target).exists():
        ckpt = checkpoint_file(target)
        run = run_of_checkpoint(c, ckpt.rsplit("/", 1)[0]) if c is not None else None
        return ckpt, run, c
    run = find_run(c, target) if c is not None else None
    if run is None:
        raise NoSuchTarget(f"{target}: neither a checkpoint path nor an MLflow run id or name in {uri}; pass the "
                           "checkpoint folder, or --tracking-uri for the run's store", uri=uri)
    ckpt = run.data.tags.get("llip.checkpoint")
    if not ckpt:
        raise NoSuchTarget(f"run {target} has no checkpoint (no llip.checkpoint tag: it ended before its first "
                           "checkpoint); pass a checkpoint folder instead", uri=uri, run=run)
    return checkpoint_file(ckpt), run, c


class NoSuchTarget(UserError):
    """What a user named is no checkpoint: no such path or run (`run` None), or a run without one."""

    def __init__(self, msg: str, uri: str, run=None):
        super().__init__(msg)
        self.uri, self.run = uri, run
