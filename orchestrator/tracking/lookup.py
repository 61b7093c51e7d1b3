"""Finding runs in MLflow by what users type: an experiment name (its newest sweep), a sweep's parent
run name, or a run id. Shared by `llip compare` and `llip report`."""
from __future__ import annotations

import re

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
