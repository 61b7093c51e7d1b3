"""A training run's MLflow run: created once by the driver (so a crash can mark it FAILED and a
relaunch find it again by name), with every resolved config value as a param, the YAML as an
artifact and the version, commit and config fingerprint as tags. Rank 0 of the TorchTrainer logs
metrics into it; nothing else creates runs, so there are no duplicates."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from orchestrator.config.schema import resolved_yaml
from orchestrator.tracking import store as tracking

if TYPE_CHECKING:  # pragma: no cover
    from orchestrator.config.schema import ExperimentConfig


def find_run_by_name(c, exp_id: str, run_name: str):
    """The run of this experiment tagged with llip's run name, or None."""
    runs = c.search_runs([exp_id], filter_string=f"tags.`llip.run_name` = '{run_name}'", max_results=1)
    return runs[0] if runs else None


def start_mlflow_run(cfg: ExperimentConfig, run_name: Optional[str], parent_run_id: Optional[str] = None,
                     tags: Optional[dict[str, str]] = None):
    """Create (or, for an existing run name, reopen) the MLflow run; returns (client, uri, run_id, run_name)."""
    c, uri, exp_id = tracking.open_experiment(cfg.mlflow.tracking_uri, cfg.mlflow.experiment or cfg.name)
    existing = find_run_by_name(c, exp_id, run_name) if run_name else None
    if existing is not None:
        run_id = existing.info.run_id
        c.update_run(run_id, status="RUNNING")
        return c, uri, run_id, run_name, True
    all_tags = {"llip.git_commit": tracking.git_commit(), "llip.version": tracking.package_version(), "llip.config_fingerprint": cfg.fingerprint(),
                **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(exp_id, tags=all_tags, run_name=run_name)
    run_id = run.info.run_id
    run_name = run_name or f"{cfg.name}-{run_id[:8]}"
    c.set_tag(run_id, "mlflow.runName", run_name)
    c.set_tag(run_id, "llip.run_name", run_name)
    tracking.log_params(c, run_id, cfg.flat())
    c.log_text(run_id, resolved_yaml(cfg), "config/experiment.yaml")
    return c, uri, run_id, run_name, False
