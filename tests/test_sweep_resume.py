"""Resuming an interrupted `llip sweep`: the sweep driver is SIGKILLed after one trial finished and
while the next one is training, then `llip sweep FILE --resume` continues it (Tuner.restore). The
finished trial is not rerun, the interrupted one goes on from its checkpoint, and MLflow keeps one
parent and one child per trial. Plus the cluster-free parts: which sweep is found, one-line errors,
how the tracker tells an interrupt from the end, and the reconciliation after an interrupt."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.config.schema import load_config, resolved_yaml
from orchestrator.errors import UserError
from orchestrator.tracking.store import experiment_id

ROOT = Path(__file__).resolve().parents[1]
STEPS, CKPT_EVERY = 30, 10


def write_sweep(tmp_path, shards, seeds=(0, 1)) -> Path:
    # Two trials one after the other (max_concurrent_trials 1 makes the order fixed), tiny model,
    # a checkpoint every 10 steps, no eval set: a trial trains its 30 steps in about 12 s.
    p = tmp_path / "resume.yaml"
    p.write_text(f"""
base: {ROOT / 'experiments' / 'smoke.yaml'}
name: sweep_resume
data: {{train: {shards / 'train'}, eval: null, batch_size: 32}}
train: {{steps: {STEPS}, log_every: 5, checkpoint_every: {CKPT_EVERY}, warmup_steps: 2}}
scaling: {{num_workers: 1, cpus_per_worker: 0.5}}
storage_path: {tmp_path / 'runs'}
sweep:
  params:
    seed: {{grid: {list(seeds)}}}
  max_concurrent_trials: 1
  metric: train/loss
  mode: min
  shared_data: {{enabled: true}}  # a resumed sweep starts its pass again; auto would decide by this CPU's speed
""")
    return p


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _newest_step(run_dir: Path) -> int:
    """The step of the newest readable checkpoint in a Ray Train run folder (0: none yet)."""
    import torch

    for d in sorted(run_dir.glob("checkpoint_*"), reverse=True):
        try:
            return int(torch.load(d / "state.pt", map_location="cpu", weights_only=False)["step"])
        except Exception:
            continue
    return 0


def _steps(c, run_id: str) -> list[int]:
    return sorted(m.step for m in c.get_metric_history(run_id, "train/loss"))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_killed_sweep_resumes_without_rerunning_or_duplicating(emoji_shards, cli_env, tmp_path):
    cfg_path = write_sweep(tmp_path, emoji_shards)
    cmd = [sys.executable, "-m", "orchestrator", "sweep", str(cfg_path)]
    c = MlflowClient(cli_env["MLFLOW_TRACKING_URI"])
    log1 = open(tmp_path / "first.log", "w")
    # Own session, so the kill below reaches the driver and the local Ray it started, and nothing else.
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=cli_env, stdout=log1, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        first = second = None
        refused = None
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
            exp = c.get_experiment_by_name("sweep_resume")
            runs = c.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"]) if exp else []
            # (llip.run_name is tagged just after the run is created)
            kids = [r for r in runs if "llip.trial_id" in r.data.tags and "llip.run_name" in r.data.tags]
            if kids and refused is None:
                # While this driver lives, a second one for the same sweep is refused, naming it.
                refused = subprocess.run(cmd + ["--resume"], cwd=tmp_path, env=cli_env, capture_output=True,
                                         text=True, timeout=120)
            if len(kids) == 2 and kids[0].info.status == "FINISHED":
                first, second = kids
                if _newest_step(tmp_path / "runs" / second.data.tags["llip.run_name"]) >= CKPT_EVERY:
                    break
            time.sleep(0.2)
        else:
            pytest.fail("the sweep never reached a finished first trial and a checkpointed second one")
        doomed = _descendants(proc.pid)  # the local Ray (GCS, raylet, workers) the driver started
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log1.close()
    # Ray's processes share the driver's fate (they are killed with its session or exit when their
    # parent dies); give them a moment, then end any straggler we started, by PID.
    t_end = time.monotonic() + 30
    while time.monotonic() < t_end and any(_alive(p) for p in doomed):
        time.sleep(0.5)
    stragglers = [p for p in doomed if _alive(p)]
    for p in stragglers:
        os.kill(p, signal.SIGKILL)

    parent = next(r for r in c.search_runs([first.info.experiment_id]) if r.data.tags.get("llip.sweep") == "true")
    name = parent.data.tags["llip.run_name"]
    err = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(err) == 1, refused.stdout[-2000:] + refused.stderr[-2000:]
    assert f"sweep {name} is being run by another driver (host {socket.gethostname()}, pid {proc.pid}," in err[0]
    assert parent.info.status == "RUNNING"  # SIGKILL: nobody could close it
    assert (tmp_path / "runs" / name / "tuner.pkl").exists()
    killed_at = _newest_step(tmp_path / "runs" / second.data.tags["llip.run_name"])
    assert CKPT_EVERY <= killed_at < STEPS
    first_steps, first_times = _steps(c, first.info.run_id), (first.info.start_time, first.info.end_time)
    assert first_steps[-1] == STEPS

    r = subprocess.run(cmd + ["--resume"], cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    (tmp_path / "resume.log").write_text(out)
    assert r.returncode == 0, out[-4000:]
    assert f"resuming sweep {name}" in out
    assert f"its previous driver is gone (host {socket.gethostname()}, pid {proc.pid}," in out  # lease taken over
    assert f"run {first.data.tags['llip.run_name']}" not in out  # neither "starting run" nor "resuming run"
    resumed = [int(m) for m in re.findall(r"resumed from checkpoint at step (\d+)", out)]
    assert resumed and resumed[0] >= killed_at, out[-4000:]

    runs = c.search_runs([first.info.experiment_id], max_results=100)
    parents = [x for x in runs if x.data.tags.get("llip.sweep") == "true"]
    kids = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 3 and len(parents) == 1 and len(kids) == 2  # no duplicate runs
    assert {k.data.tags["llip.trial_id"] for k in kids} == {first.data.tags["llip.trial_id"],
                                                            second.data.tags["llip.trial_id"]}
    by_id = {k.info.run_id: k for k in kids}
    assert set(by_id) == {first.info.run_id, second.info.run_id}
    for k in kids:
        assert k.info.status == "FINISHED"
        assert "llip.error" not in k.data.tags and "llip.stopped" not in k.data.tags

    # The first trial was not touched: same MLflow history and times.
    f = by_id[first.info.run_id]
    assert _steps(c, f.info.run_id) == first_steps
    assert (f.info.start_time, f.info.end_time) == first_times
    # The second went on from its checkpoint: the steps up to it were logged once (a restart from
    # step 0 would log them twice), and it reached the end.
    s_steps = _steps(c, second.info.run_id)
    before = [s for s in s_steps if s <= resumed[0]]
    assert before == sorted(set(before)) and before[-1] == resumed[0]
    assert s_steps[-1] == STEPS and set(range(5, STEPS + 1, 5)) <= set(s_steps)

    p = c.get_run(parent.info.run_id)
    assert p.info.status == "FINISHED"
    assert p.data.tags["llip.sweep.resumes"] == "1" and "llip.error" not in p.data.tags
    assert (p.data.tags["llip.trials"], p.data.tags["llip.trials_failed"]) == ("2", "0")
    assert {a.path for a in c.list_artifacts(p.info.run_id, "compare")} >= {"compare/comparison.png",
                                                                            "compare/trials.csv"}
    # Nothing left to resume now: one line saying so.
    r = subprocess.run(cmd + ["--resume"], cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "nothing to resume" in r.stderr and r.stderr.count("\n") == 1, r.stderr


# -- no cluster needed ---------------------------------------------------------------------------
def _store(tmp_path):
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return c, experiment_id(c, "sweep_resume")


def _parent(c, exp, name, cfg=None, status=None):
    rid = c.create_run(exp, tags={"llip.sweep": "true", "llip.run_name": name}).info.run_id
    if cfg is not None:
        c.log_text(rid, resolved_yaml(cfg), "config/sweep.yaml")
    if status:
        c.set_terminated(rid, status)
    return c.get_run(rid)


def test_find_sweep_picks_the_newest_unfinished_or_the_named_one(tmp_path):
    from orchestrator.sweeps.tune import find_sweep

    c, exp = _store(tmp_path)
    with pytest.raises(UserError, match="nothing to resume"):
        find_sweep(c, "uri", "sweep_resume", exp, None, resume=True)
    _parent(c, exp, "s-old", status="KILLED")
    time.sleep(0.01)
    _parent(c, exp, "s-done", status="FINISHED")
    single = c.create_run(exp, tags={"llip.run_name": "one-run"}).info.run_id
    assert find_sweep(c, "uri", "sweep_resume", exp, None, resume=True).data.tags["llip.run_name"] == "s-old"
    time.sleep(0.01)
    _parent(c, exp, "s-new")  # RUNNING: a driver killed with SIGKILL leaves it so
    assert find_sweep(c, "uri", "sweep_resume", exp, None, resume=True).data.tags["llip.run_name"] == "s-new"
    assert find_sweep(c, "uri", "sweep_resume", exp, "s-done", resume=True).data.tags["llip.run_name"] == "s-done"
    assert find_sweep(c, "uri", "sweep_resume", exp, "fresh", resume=False) is None  # --run-name of a new sweep
    for name, fragment in (("nope", "no sweep named 'nope'"), ("one-run", "is a single run, not a sweep")):
        with pytest.raises(UserError) as e:
            find_sweep(c, "uri", "sweep_resume", exp, name, resume=True)
        assert fragment in str(e.value) and "\n" not in str(e.value)
    assert c.get_run(single).info.status == "RUNNING"


def test_resume_refuses_a_changed_sweep_a_finished_one_and_missing_tune_state(tmp_path, emoji_shards):
    from orchestrator.sweeps.tune import _absolute, _prepare_resume

    c, exp = _store(tmp_path)
    cfg = _absolute(load_config(write_sweep(tmp_path, emoji_shards)))
    parent = _parent(c, exp, "s-1", cfg)

    changed = _absolute(load_config(write_sweep(tmp_path, emoji_shards, seeds=(0, 1, 2))))
    with pytest.raises(UserError) as e:
        _prepare_resume(changed, c, parent, retry_failed=False)
    msg = str(e.value)
    assert "sweep.params.seed.grid is [0, 1, 2] in the file but [0, 1] in sweep s-1" in msg and "\n" not in msg

    with pytest.raises(UserError) as e:  # the sweep matches, but no Tune folder under storage_path
        _prepare_resume(cfg, c, parent, retry_failed=False)
    assert f"no Ray Tune state in {tmp_path / 'runs' / 's-1'}" in str(e.value) and "storage_path" in str(e.value)

    done = _parent(c, exp, "s-2", cfg, status="FINISHED")
    with pytest.raises(UserError, match="already FINISHED; nothing to resume"):
        _prepare_resume(cfg, c, done, retry_failed=False)

    bare = _parent(c, exp, "s-3")  # died before it logged its config
    with pytest.raises(UserError, match="no config/sweep.yaml artifact"):
        _prepare_resume(cfg, c, bare, retry_failed=False)


def test_resume_uses_the_stored_config_and_finds_moved_tune_state(tmp_path, emoji_shards, capsys):
    """Trials go on with the config the sweep started with; a storage_path pointing at the folder's
    new place is taken (the stored one no longer holds it)."""
    from orchestrator.sweeps.tune import _absolute, _prepare_resume

    c, exp = _store(tmp_path)
    cfg = _absolute(load_config(write_sweep(tmp_path, emoji_shards)))
    parent = _parent(c, exp, "s-1", cfg)
    moved = tmp_path / "moved"
    (moved / "s-1").mkdir(parents=True)
    (moved / "s-1" / "tuner.pkl").write_bytes(b"")  # the files Tuner.restore needs, named as Tune names them
    edited = cfg.with_overrides({"train.lr": 0.5, "storage_path": str(moved)})
    with pytest.raises(UserError, match="no Ray Tune state"):  # killed before Tune saved any trial table
        _prepare_resume(edited, c, parent, retry_failed=False)
    (moved / "s-1" / "experiment_state-2026-01-01_00-00-00.json").write_text("{}")
    capsys.readouterr()
    stored, folder = _prepare_resume(edited, c, parent, retry_failed=False)
    assert folder == str(moved / "s-1")
    assert stored.storage_path == str(moved) and stored.train.lr == cfg.train.lr  # the sweep's lr, not the file's
    note = capsys.readouterr().out
    assert "storage_path" in note and "train.lr" in note and "resuming with the stored one" in note


def test_tracker_tells_an_interrupt_from_the_end():
    """Tune's SIGINT handling stops running trials as TERMINATED without on_trial_complete, and fit()
    returns normally: only the missing completion event shows the sweep did not end. Trials restored
    already over count as ended."""
    from orchestrator.sweeps.tune import _trial_tracker

    t = lambda tid, status: SimpleNamespace(trial_id=tid, status=status)  # noqa: E731
    tr = _trial_tracker()
    done_before, crashed_before = t("a", "TERMINATED"), t("b", "ERROR")
    running, pending, finishing = t("c", "PENDING"), t("d", "PENDING"), t("e", "PENDING")
    tr.on_step_begin(iteration=0, trials=[done_before, crashed_before, running, pending, finishing])
    for x in (running, finishing):
        x.status = "RUNNING"
        tr.on_trial_start(iteration=1, trials=[], trial=x)
    finishing.status = "TERMINATED"
    tr.on_trial_complete(iteration=2, trials=[], trial=finishing)
    running.status = "TERMINATED"  # stopped by Tune's cleanup after a SIGINT
    tr.on_step_begin(iteration=3, trials=[done_before, crashed_before, running, pending, finishing])
    assert sorted(tr.unfinished()) == ["c", "d"]


def test_reconcile_after_an_interrupt_and_after_the_resume(tmp_path):
    from orchestrator.sweeps.tune import STOPPED_INTERRUPTED, _reconcile

    c, exp = _store(tmp_path)
    parent = _parent(c, exp, "s-1").info.run_id

    def child(tid, status=None, **tags):
        rid = c.create_run(exp, tags={"mlflow.parentRunId": parent, "llip.trial_id": tid,
                                      "llip.run_name": f"s-1-{tid}", **tags}).info.run_id
        if status:
            c.set_terminated(rid, status)
        return rid

    done, cut = child("t0", "FINISHED"), child("t2")
    torn = child("t1", "FAILED", **{"llip.error": "ActorDiedError: gone"})
    trial = lambda tid, status, err=None: SimpleNamespace(  # noqa: E731
        trial_id=tid, status=status, config={"overrides": {"seed": 1}},
        get_pickled_error=lambda: RuntimeError(err) if err else None, get_error=lambda: None)
    tracker = SimpleNamespace(
        trials={"t0": trial("t0", "TERMINATED"), "t1": trial("t1", "TERMINATED"), "t2": trial("t2", "TERMINATED"),
                "t3": trial("t3", "PENDING"), "t4": trial("t4", "ERROR", "bad value")},
        ended={"t0", "t4"})
    _reconcile(c, parent, tracker, interrupted=True)
    assert c.get_run(done).info.status == "FINISHED"
    for rid in (torn, cut):  # stopped by the interrupt: KILLED for a resume to reopen, not FAILED
        run = c.get_run(rid)
        assert run.info.status == "KILLED" and run.data.tags["llip.stopped"] == STOPPED_INTERRUPTED
        assert "llip.error" not in run.data.tags
    assert "ActorDiedError" in c.get_run(torn).data.tags["llip.stop_teardown"]
    runs = {r.data.tags["llip.trial_id"]: r for r in c.search_runs([exp], filter_string="tags.`llip.trial_id` != ''")}
    assert "t3" not in runs  # never started: its run is made when a resume starts it, under its own id
    assert runs["t4"].info.status == "FAILED" and runs["t4"].data.tags["llip.run_name"] == "s-1-t4"
    assert runs["t4"].data.tags["llip.placeholder"] == "true" and "bad value" in runs["t4"].data.tags["llip.error"]

    # The resume reopened t1 and t2 and finished them: the interrupt's marks go.
    for rid in (torn, cut):
        c.update_run(rid, status="FINISHED")
    tracker.trials.update({"t3": trial("t3", "TERMINATED")})
    child("t3", "FINISHED")
    tracker.ended |= {"t1", "t2", "t3"}
    counts = _reconcile(c, parent, tracker)
    assert counts == {"total": 5, "finished": 4, "failed": 1}
    for rid in (torn, cut):
        tags = c.get_run(rid).data.tags
        assert not {"llip.stopped", "llip.stop_teardown", "llip.error"} & set(tags)
    assert len(c.search_runs([exp], filter_string="tags.`llip.trial_id` != ''")) == 5


def test_cli_flags_one_line(tmp_path, capsys):
    from orchestrator.cli import main

    demo = str(ROOT / "experiments" / "sweep_demo.yaml")
    assert main(["sweep", demo, "--resume", "a", "--run-name", "b"]) == 2
    assert "name different sweeps" in capsys.readouterr().err
    assert main(["sweep", demo, "--retry-failed"]) == 2
    err = capsys.readouterr().err
    assert "add --resume" in err and err.count("\n") == 1


def test_tune_snapshot_wait_returns_once_the_trial_is_recorded(tmp_path):
    """driver_fn makes no MLflow run before Tune's saved state lists the trial (else a driver killed
    in between leaves a child whose trial a restore re-creates under a new id)."""
    import threading

    from orchestrator.sweeps.tune import _await_tune_snapshot

    cfg = load_config(ROOT / "experiments" / "smoke.yaml").with_overrides({"storage_path": str(tmp_path)})
    folder = tmp_path / "s-1"
    folder.mkdir()
    (folder / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps({"trial_data": ["abc_00000"]}))
    threading.Timer(1.0, lambda: (folder / "experiment_state-2026-01-01_00-00-05.json").write_text(
        json.dumps({"trial_data": ["abc_00000", "abc_00001"]}))).start()
    t0 = time.monotonic()
    assert _await_tune_snapshot(cfg, "s-1", "abc_00001", timeout_s=60) is True  # found, not timed out
    assert time.monotonic() - t0 > 0.9  # not before the snapshot listing it was written
    t0 = time.monotonic()
    assert _await_tune_snapshot(cfg, "s-1", "abc_00009", timeout_s=1.5) is False  # never recorded: gives up
    assert time.monotonic() - t0 >= 1.5
