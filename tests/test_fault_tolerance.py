"""Checkpoints, resume and fault tolerance on a real local Ray cluster with real worker processes.

- A Ray Train worker process is SIGKILLed mid-run. With scaling.max_failures=1 the worker group is
  replaced and training continues from the last checkpoint: the run finishes, MLflow's step counter
  has no gap and no restart from 0, and there is exactly one MLflow run.
- With max_failures=0 the same kill fails the run (MLflow FAILED); relaunching with the same run
  name reopens that MLflow run and resumes from the latest checkpoint instead of step 0.
"""
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.config import load_config

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

STEPS, EVERY = 30, 5  # log and checkpoint every 5 steps
KILL_AFTER = 10  # kill once this step is in MLflow (its checkpoint is at most one report behind)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True, configure_logging=False)
    yield ray
    ray.shutdown()


def make_cfg(tmp_path, shards, name, max_failures):
    return load_config(ROOT / "experiments" / "smoke.yaml").with_overrides({
        "name": name,
        "data.train": str(shards / "train"), "data.eval": None,
        "train.steps": STEPS, "train.log_every": EVERY, "train.checkpoint_every": EVERY, "train.keep_checkpoints": 2,
        "scaling.max_failures": max_failures,
        "storage_path": str(tmp_path / "runs"),
        "mlflow.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
    })


def train_worker_pids() -> list[int]:
    """PIDs of the live Ray Train worker processes, from the GCS actor table of this test's cluster."""
    from ray._private.state import actors

    return sorted(a["Pid"] for a in actors(actor_state_name="ALIVE").values()
                  if a["ActorClassName"] == "RayTrainWorker" and a["Pid"])


def logged_steps(c, run_id) -> list[int]:
    return sorted(m.step for m in c.get_metric_history(run_id, "train/loss"))


def start_in_thread(cfg, run_name):
    from orchestrator.driver import run_experiment

    box = {}

    def target():
        try:
            box["result"] = run_experiment(cfg, run_name=run_name)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, box


def kill_a_worker_after(c, cfg, step: int, thread, timeout=420) -> tuple[str, int]:
    """Wait until `step` is logged, then SIGKILL one Ray Train worker process; (run id, pid)."""
    deadline = time.time() + timeout
    run_id = None
    while time.time() < deadline and thread.is_alive():
        exp = c.get_experiment_by_name(cfg.name)
        runs = c.search_runs([exp.experiment_id]) if exp else []
        if runs:
            run_id = runs[0].info.run_id
            if any(s >= step for s in logged_steps(c, run_id)):
                pids = train_worker_pids()
                assert pids, "no live RayTrainWorker actors found"
                os.kill(pids[0], signal.SIGKILL)
                return run_id, pids[0]
        time.sleep(0.2)
    raise AssertionError(f"never saw step {step} logged (thread alive: {thread.is_alive()})")


def assert_continuous(steps: list[int], resumed_from: int):
    """Every step 5..30 logged; none at or before the resume checkpoint logged twice (no restart
    from 0). Steps after it may repeat once: they were logged, then replayed after the restart."""
    assert sorted(set(steps)) == list(range(EVERY, STEPS + 1, EVERY)), steps
    counts = Counter(steps)
    assert all(counts[s] == 1 for s in range(EVERY, resumed_from + 1, EVERY)), steps
    assert all(n <= 2 for n in counts.values()), steps


def checkpoint_step(c, run_id) -> int:
    import torch

    ckpt = Path(c.get_run(run_id).data.tags["llip.checkpoint"])
    return torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)["step"]


@pytest.mark.timeout(600)
def test_killed_worker_is_replaced_and_training_continues(ray_local, emoji_shards, tmp_path):
    cfg = make_cfg(tmp_path, emoji_shards, "ft_kill", max_failures=1)
    c = MlflowClient(cfg.mlflow.tracking_uri)
    t, box = start_in_thread(cfg, "ft-kill")
    run_id, pid = kill_a_worker_after(c, cfg, KILL_AFTER, t)
    t.join(timeout=480)
    assert not t.is_alive(), "run did not finish after the worker was killed"
    assert "error" not in box, box.get("error")
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the process really died; the run finished on a replacement

    exp = c.get_experiment_by_name(cfg.name)
    runs = c.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == run_id  # the restart logged into the same run
    assert runs[0].info.status == "FINISHED"
    steps = logged_steps(c, run_id)
    # The restart resumed from a checkpoint after step 5 (the kill can land between logging step 10
    # and registering its checkpoint, so 10 itself may repeat).
    assert_continuous(steps, resumed_from=KILL_AFTER - EVERY)
    assert checkpoint_step(c, run_id) == STEPS
    assert box["result"].metrics["step"] == STEPS


@pytest.mark.timeout(600)
def test_relaunch_with_same_run_name_resumes_from_latest_checkpoint(ray_local, emoji_shards, tmp_path):
    from orchestrator.driver import run_experiment
    from orchestrator.errors import UserError

    cfg = make_cfg(tmp_path, emoji_shards, "ft_resume", max_failures=0)
    c = MlflowClient(cfg.mlflow.tracking_uri)
    t, box = start_in_thread(cfg, "ft-resume")
    run_id, _ = kill_a_worker_after(c, cfg, KILL_AFTER, t)
    t.join(timeout=300)
    assert isinstance(box.get("error"), UserError), box  # max_failures=0: the kill fails the run
    assert c.get_run(run_id).info.status == "FAILED"
    before = logged_steps(c, run_id)
    assert max(before) < STEPS

    result = run_experiment(cfg, run_name="ft-resume")  # relaunch under the same name
    assert result.run_id == run_id
    exp = c.get_experiment_by_name(cfg.name)
    runs = c.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = logged_steps(c, run_id)
    assert_continuous(steps, resumed_from=KILL_AFTER - EVERY)
    # Everything logged before the crash is still there, and the relaunch did not start over.
    assert Counter(steps)[EVERY] == 1 and len(steps) > len(before)
    assert checkpoint_step(c, run_id) == STEPS
