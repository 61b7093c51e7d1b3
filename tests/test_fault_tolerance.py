"""Checkpoints, exact resume and fault tolerance on a real local Ray cluster with real worker processes.

Every rank writes the sample ids and loss of each step ($LLIP_TRACE_STEPS). The data: 512 training
samples in 8 shards, global batch 64, so an epoch is 8 steps and the checkpoint at step 10 is two
steps into epoch 1.
- A Ray Train worker process is SIGKILLed mid-run, three steps after a checkpoint. With
  scaling.max_failures=1 the worker group is replaced and training continues from that checkpoint:
  the run finishes, MLflow's step counter has no gap and no restart from 0, there is one MLflow run,
  the steps replayed after the restart trained on the same samples with the same loss (within 1e-6)
  as before the kill, and every step after the checkpoint saw exactly the samples the epoch plan
  gives an uninterrupted run.
- With max_failures=0 the same kill fails the run (MLflow FAILED); relaunching with the same run
  name and ONE worker instead of two reopens that MLflow run, resumes from the latest checkpoint,
  and sees every remaining sample of the interrupted epoch exactly once before the next epoch.
"""
import json
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.config.schema import load_config

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

STEPS, EVERY = 20, 5  # log and checkpoint every 5 steps; 8 steps per epoch
KILL_AFTER = 10  # kill once this step is in MLflow (its checkpoint is at most one report behind)


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("trace")


@pytest.fixture(scope="module")
def ray_local(trace_dir):
    import ray

    os.environ["LLIP_TRACE_STEPS"] = str(trace_dir)  # before Ray starts: its workers inherit it
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True, configure_logging=False)
    yield ray
    ray.shutdown()
    os.environ.pop("LLIP_TRACE_STEPS", None)


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    from orchestrator.data.shards import write_emoji_shards

    out = tmp_path_factory.mktemp("ft")
    m = write_emoji_shards(str(out), samples_per_shard=64, seed=0, holdout=0.2, limit=640)
    assert m["splits"]["train"]["samples"] == 512
    return out


def make_cfg(tmp_path, shards, name, max_failures):
    return load_config(ROOT / "experiments" / "smoke.yaml").with_overrides({
        "name": name,
        "data.train": str(shards / "train"), "data.eval": None,
        "train.steps": STEPS, "train.log_every": EVERY, "train.checkpoint_every": EVERY, "train.keep_checkpoints": 2,
        "scaling.max_failures": max_failures,
        "storage_path": str(tmp_path / "runs"),
        "mlflow.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
    })


def read_trace(trace_dir, run_name: str, rank: int) -> list[dict]:
    p = Path(trace_dir) / f"{run_name}-rank{rank}.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def segments(trace: list[dict]) -> list[list[dict]]:
    """A trace cut where the step counter goes back (each restart or relaunch starts a segment)."""
    out: list[list[dict]] = [[]]
    for t in trace:
        if out[-1] and t["step"] <= out[-1][-1]["step"]:
            out.append([])
        out[-1].append(t)
    return out


def planned_ids(cfg, epoch: int, world: int, rank: int, intervals=None) -> list[list[int]]:
    """The batches of sample ids the epoch plan gives this rank, computed without training."""
    from orchestrator.data.plan import EpochStream, build_train_source

    src = build_train_source(cfg, None)
    mine = intervals if intervals is not None else src.plan(epoch).worker_intervals(world)[rank]
    stream, out = EpochStream(src, epoch, mine, cfg.data.batch_size // world), []
    while (b := stream.next_batch()) is not None:
        out.append(b["sample_id"].tolist())
    return out


def train_worker_pids() -> list[int]:
    """PIDs of the live Ray Train worker processes, from the GCS actor table of this test's cluster."""
    from ray._private.state import actors

    return sorted(a["Pid"] for a in actors(actor_state_name="ALIVE").values()
                  if a["ActorClassName"] == "RayTrainWorker" and a["Pid"])


def logged_steps(c, run_id) -> list[int]:
    return sorted(m.step for m in c.get_metric_history(run_id, "train/loss"))


def start_in_thread(cfg, run_name):
    from orchestrator.training.driver import run_experiment

    box = {}

    def target():
        try:
            box["result"] = run_experiment(cfg, run_name=run_name)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, box


def kill_a_worker_after(c, cfg, step: int, thread, trace_dir, run_name: str, timeout=420) -> tuple[str, int]:
    """Wait until `step` is logged to MLflow (so its checkpoint is written) and rank 0 has trained
    three steps more, then SIGKILL one Ray Train worker process; (run id, pid)."""
    deadline = time.time() + timeout
    run_id = None
    trace = Path(trace_dir) / f"{run_name}-rank0.jsonl"
    while time.time() < deadline and thread.is_alive():
        exp = c.get_experiment_by_name(cfg.name)
        runs = c.search_runs([exp.experiment_id]) if exp else []
        if runs:
            run_id = runs[0].info.run_id
            done = max((json.loads(x)["step"] for x in trace.read_text().splitlines()), default=0) if trace.exists() else 0
            # three or four steps past a checkpoint, so some steps are trained again after the restart
            if any(s >= step for s in logged_steps(c, run_id)) and done >= step + 3 and done % EVERY in (3, 4):
                pids = train_worker_pids()
                assert pids, "no live RayTrainWorker actors found"
                os.kill(pids[0], signal.SIGKILL)
                return run_id, pids[0]
        time.sleep(0.05)
    raise AssertionError(f"never saw step {step} logged (thread alive: {thread.is_alive()})")


def assert_continuous(steps: list[int], resumed_from: int):
    """Every step 5..20 logged; none at or before the resume checkpoint logged twice (no restart
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
def test_killed_worker_is_replaced_and_training_continues_exactly(ray_local, small_shards, trace_dir, tmp_path):
    cfg = make_cfg(tmp_path, small_shards, "ft_kill", max_failures=1)
    c = MlflowClient(cfg.mlflow.tracking_uri)
    t, box = start_in_thread(cfg, "ft-kill")
    run_id, pid = kill_a_worker_after(c, cfg, KILL_AFTER, t, trace_dir, "ft-kill")
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

    for rank in range(2):
        first, resumed = segments(read_trace(trace_dir, "ft-kill", rank))[:2]
        ckpt = resumed[0]["step"] - 1
        assert ckpt >= EVERY and ckpt % EVERY == 0 and resumed[-1]["step"] == STEPS, ckpt
        replayed = [s for s in first if s["step"] > ckpt]
        assert len(replayed) >= 1, (ckpt, [s["step"] for s in first])  # trained before the kill and again after
        for before, after in zip(replayed, resumed):
            assert before["step"] == after["step"] and before["ids"] == after["ids"]
            assert abs(before["loss"] - after["loss"]) <= 1e-6, (before["step"], before["loss"], after["loss"])
        # and the run's whole sequence is the plan's: epochs 0..2 of 8 steps, as if never interrupted
        plan = [b for e in range(4) for b in planned_ids(cfg, e, 2, rank)][:STEPS]
        assert [s["ids"] for s in first if s["step"] <= ckpt] + [s["ids"] for s in resumed] == plan


@pytest.mark.timeout(600)
def test_relaunch_with_fewer_workers_resumes_and_sees_the_epoch_once(ray_local, small_shards, trace_dir, tmp_path):
    from orchestrator.training.driver import run_experiment
    from orchestrator.errors import UserError

    cfg = make_cfg(tmp_path, small_shards, "ft_resume", max_failures=0)
    c = MlflowClient(cfg.mlflow.tracking_uri)
    t, box = start_in_thread(cfg, "ft-resume")
    run_id, _ = kill_a_worker_after(c, cfg, KILL_AFTER, t, trace_dir, "ft-resume")
    t.join(timeout=300)
    assert isinstance(box.get("error"), UserError), box  # max_failures=0: the kill fails the run
    assert c.get_run(run_id).info.status == "FAILED"
    before = logged_steps(c, run_id)
    assert max(before) < STEPS

    # relaunch under the same name on one worker instead of two (same global batch)
    result = run_experiment(cfg.with_overrides({"scaling.num_workers": 1}), run_name="ft-resume")
    assert result.run_id == run_id
    exp = c.get_experiment_by_name(cfg.name)
    runs = c.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = logged_steps(c, run_id)
    assert_continuous(steps, resumed_from=KILL_AFTER - EVERY)
    # Everything logged before the crash is still there, and the relaunch did not start over.
    assert Counter(steps)[EVERY] == 1 and len(steps) > len(before)
    assert checkpoint_step(c, run_id) == STEPS

    # The interrupted epoch: what both ranks trained on up to the checkpoint, plus what the single
    # worker trained on after it, is every sample of the epoch exactly once.
    resumed = read_trace(trace_dir, "ft-resume", 0)
    after = segments(resumed)[-1]
    ckpt = after[0]["step"] - 1
    epoch = after[0]["epoch"]
    assert ckpt % (512 // 64) != 0, "the checkpoint should fall inside an epoch"
    first = [segments(read_trace(trace_dir, "ft-resume", r))[0] for r in range(2)]
    before_ids = [i for r in range(2) for s in first[r] if s["epoch"] == epoch and s["step"] <= ckpt for i in s["ids"]]
    after_ids = [i for s in after if s["epoch"] == epoch for i in s["ids"]]
    assert before_ids and after_ids and all(len(s["ids"]) == 64 for s in after)  # one worker, whole global batch
    seen = before_ids + after_ids
    assert len(seen) == len(set(seen)) == 512, "a sample of the interrupted epoch was missed or seen twice"
    assert after[-1]["step"] == STEPS and any(s["epoch"] == epoch + 1 for s in after)
