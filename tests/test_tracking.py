"""Where MLflow puts a run's artifacts: beside the local store, never in the working directory."""
import os
from pathlib import Path

from mlflow.tracking import MlflowClient

from orchestrator.tracking import store as tracking


def test_artifacts_land_beside_the_sqlite_store_not_in_the_working_directory(tmp_path, monkeypatch):
    cwd, store = tmp_path / "cwd", tmp_path / "store"
    cwd.mkdir()
    store.mkdir()
    monkeypatch.chdir(cwd)
    c, uri, exp = tracking.open_experiment(f"sqlite:///{store / 'mlflow.db'}", "demo/with spaces")
    run = c.create_run(exp).info.run_id
    (tmp_path / "note.txt").write_text("x")
    c.log_artifact(run, str(tmp_path / "note.txt"), "config")
    assert list(cwd.iterdir()) == []  # MLflow's default would have made ./mlruns here
    found = list((store / "mlruns").rglob("note.txt"))
    assert len(found) == 1 and found[0].parent.name == "config"
    # the same experiment found again keeps its location; a second one gets its own folder
    assert tracking.experiment_id(c, "demo/with spaces") == exp
    other = tracking.experiment_id(c, "other")
    assert Path(c.get_experiment(other).artifact_location.removeprefix("file://")).parent == store / "mlruns"


def test_a_server_store_keeps_the_servers_own_artifact_root():
    assert tracking.artifact_location("http://127.0.0.1:5000", "x") is None
    assert tracking.artifact_location("sqlite:////a/b/mlflow.db", "x") == "file:///a/b/mlruns/x"
