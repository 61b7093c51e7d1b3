"""MLflow in one place: where the store is, run creation and finishing, and the rank-0 metric logger.

The driver creates the run (so a crash can mark it FAILED and resume can find it again); rank 0 of
the TorchTrainer logs metrics into that run id. Nothing else logs, so there are no duplicate runs.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any, Optional

DEFAULT_URI = "sqlite:///mlflow.db"


def resolve_tracking_uri(configured: Optional[str] = None) -> str:
    """YAML value, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory.

    Relative sqlite paths are made absolute so Ray workers (other cwd) write to the same file.
    """
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    elif "://" not in uri:  # a bare path: MLflow 3 refuses plain file stores, so say so early
        from orchestrator.errors import UserError

        raise UserError(f"MLflow tracking URI {uri!r} is a bare path; use sqlite:///{uri}.db or http://HOST:5000")
    return uri


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def existing_store_client(configured: Optional[str] = None):
    """(client, uri) for commands that read results: a local sqlite store must already exist (opening
    a missing one would silently create an empty store and report "nothing found")."""
    from orchestrator.errors import UserError

    uri = resolve_tracking_uri(configured)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        raise UserError(f"MLflow store {uri} does not exist; run from the directory you trained in, "
                        "or pass --tracking-uri / set MLFLOW_TRACKING_URI")
    return client(uri), uri


def artifact_location(uri: str, name: str) -> Optional[str]:
    """Where a new experiment's artifacts go: for a local sqlite store, `mlruns/<name>` beside the
    database file; MLflow's own default (`./mlruns` in whatever folder the process started in)
    would scatter artifacts over every working directory, a checkout's included. A server decides
    for itself (None)."""
    if not uri.startswith("sqlite:///"):
        return None
    import re

    folder = Path(uri[len("sqlite:///"):]).resolve().parent / "mlruns" / (re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "_")
    return folder.as_uri()


def experiment_id(c, name: str, uri: Optional[str] = None) -> str:
    exp = c.get_experiment_by_name(name)
    if exp:
        return exp.experiment_id
    return c.create_experiment(name, artifact_location=artifact_location(uri or c.tracking_uri, name))


def open_experiment(configured: Optional[str], name: str):
    """(client, resolved uri, experiment id), creating the experiment if needed. An unusable store
    (unreachable server, bad URI) fails here, before any training, in one line naming it."""
    from orchestrator.errors import UserError

    uri = resolve_tracking_uri(configured)
    try:
        c = client(uri)
        return c, uri, experiment_id(c, name, uri)
    except Exception as e:
        raise UserError(f"MLflow tracking store {uri} is not usable ({type(e).__name__}); "
                        "check MLFLOW_TRACKING_URI") from None


def git_commit() -> str:
    if os.environ.get("LLIP_GIT_COMMIT"):  # set by `llip submit`: jobs run from an upload without .git
        return os.environ["LLIP_GIT_COMMIT"]
    try:
        root = Path(__file__).resolve().parents[2]  # the checkout: orchestrator/tracking/store.py
        # Only when this package is the checkout's own code: an installed copy inside some other
        # repository's folder (a venv in a research repo) must not report that repository's commit.
        out = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=root,
                             capture_output=True, text=True, timeout=5).stdout.split()
        if len(out) == 2 and Path(out[0]).resolve() == root:
            return out[1]
    except Exception:
        pass
    return "unknown"


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llip-orch")
    except PackageNotFoundError:
        return "unknown"


def log_params(c, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        c.log_batch(run_id, params=items[i : i + 100])


def log_metrics(c, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Metrics at one step, in log_batch calls of at most 1,000 (MLflow's limit); None values skipped."""
    import time

    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    items = [Metric(k, float(v), ts, step) for k, v in metrics.items() if v is not None]
    for i in range(0, len(items), 1000):
        c.log_batch(run_id, metrics=items[i : i + 1000])


class MetricLogger:
    """Rank 0's buffer of step metrics, flushed as one log_batch per report."""

    def __init__(self, uri: str, run_id: str):
        self.client = client(uri)
        self.run_id = run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        log_metrics(self.client, self.run_id, metrics, step)


def metric_history(c, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in sorted(c.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))]
