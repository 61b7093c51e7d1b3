"""`llip sweep`: Tune over real Ray Train trials on a local Ray cluster, one MLflow parent run with
one child per trial (a deliberately crashing trial among them), then `llip compare` on it. Plus the
cluster-free parts: search spaces, concurrency from resources, one-line config errors, and the
reconciliation of MLflow with Tune's view of trials."""
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.config.schema import load_config
from orchestrator.errors import UserError
from orchestrator.tracking.store import experiment_id

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "experiments" / "sweep_demo.yaml"
CRASH_BATCH = 100000  # more than the training split holds: the worker raises "no full batch"


def write_sweep(tmp_path, shards, extra_params="", extra_sweep="") -> Path:
    # The demo sweep itself, shrunk: K fixed, loss type drawn per trial, and a grid over the batch
    # size whose first value crashes inside the Ray Train worker (first, so it overlaps a good trial
    # instead of running alone at the end). 3 trials, 1 worker (0.5 CPU) each.
    p = tmp_path / "sweep_test.yaml"
    p.write_text(f"""
base: {DEMO}
name: sweep_test
train: {{steps: 10, log_every: 5, warmup_steps: 2}}
data: {{train: {shards / 'train'}, eval: {shards / 'eval'}}}
storage_path: {tmp_path / 'runs'}
sweep:
  shared_data: {{enabled: true}}
{extra_sweep}  params:
{extra_params}    model.mixture_tokens: {{grid: [4]}}
    loss.type: {{grid: null, choice: [llip, llip_infonce]}}
    data.batch_size: {{grid: [{CRASH_BATCH}, 32, 48]}}
""")
    return p


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sweep_parent_children_crash_and_compare(emoji_shards, cli_env, tmp_path, capsys):
    cfg_path = write_sweep(tmp_path, emoji_shards)
    env = {**cli_env, "LLIP_TRACE_STEPS": str(tmp_path / "trace")}  # each rank's sample ids, step by step
    r = subprocess.run([sys.executable, "-m", "orchestrator", "sweep", str(cfg_path)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=840)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    # On 2 CPUs, (2 - 0.25 for the shared data pass) / 0.5 per trial's worker (it decodes nothing
    # itself) would fit 3, but each trial trains on one thread: 2 cores, 2 trials. Other core counts:
    # the same rule, on the CPUs this machine's Ray sees.
    import ray._private.utils

    from orchestrator.config.schema import load_config
    from orchestrator.sweeps.tune import derive_max_concurrent

    cpus = float(ray._private.utils.get_num_cpus())
    want = derive_max_concurrent(load_config(cfg_path), {"CPU": cpus}, shared_cpus=0.25)
    assert want == min(int((cpus - 0.25) / 0.5), int(cpus)) and f"at most {want} at once" in out
    assert "[llip] shared data pass on:" in out and "shared data pass off" not in out

    c = MlflowClient(cli_env["MLFLOW_TRACKING_URI"])
    exp = c.get_experiment_by_name("sweep_test")
    runs = c.search_runs([exp.experiment_id], max_results=100)
    parents = [x for x in runs if x.data.tags.get("llip.sweep") == "true"]
    assert len(parents) == 1
    parent = parents[0]
    pid = parent.info.run_id
    children = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == pid]
    assert len(runs) == 1 + 3 and len(children) == 3, [x.info.run_name for x in runs]  # no duplicate runs
    assert len({x.data.tags["llip.trial_id"] for x in children}) == 3

    by_batch = {int(x.data.params["data.batch_size"]): x for x in children}
    assert set(by_batch) == {32, 48, CRASH_BATCH}
    crashed = by_batch.pop(CRASH_BATCH)
    assert crashed.info.status == "FAILED"
    assert "no full batch" in crashed.data.tags["llip.error"]
    for run in by_batch.values():
        assert run.info.status == "FINISHED"
        assert run.data.params["model.mixture_tokens"] == "4"
        assert run.data.params["loss.type"] in ("llip", "llip_infonce")
        assert run.data.tags["llip.git_commit"] and run.data.tags["llip.data_manifest"]
        assert json.loads(run.data.tags["llip.swept"])["data.batch_size"] in (32, 48)
        assert "eval/recall1" in run.data.metrics
        assert [m.step for m in sorted(c.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)] == [5, 10]

    assert parent.info.status == "FINISHED"
    assert (parent.data.tags["llip.trials"], parent.data.tags["llip.trials_failed"]) == ("3", "1")

    # One decode pass shared by the trials (issue 14): common random numbers, i.e. the two good trials
    # (batch 32 and 48, one seed) trained on one sample sequence, and only the pass decoded, each
    # window it wrote once; the trials decoded nothing.
    traces = {}
    for t in (tmp_path / "trace").glob("*.jsonl"):
        steps = [json.loads(line)["ids"] for line in t.read_text().splitlines()]
        if steps:
            traces[len(steps[0])] = [i for ids in steps for i in ids]
    assert sorted(traces) == [32, 48] and len(traces[32]) == 320 and len(traces[48]) == 480
    assert traces[48][:320] == traces[32]
    pm = parent.data.metrics
    # (the crashing trial's batch exceeds the split, so its next-epoch prefetch starts at once: epoch 1 too)
    assert 480 <= pm["data_shared/decoded"] == pm["data_shared/rows"] <= 2 * 3521
    assert pm["data_shared/decode_cpu_ms"] > 0 and pm["data_shared/failed"] == 0
    for run in by_batch.values():
        assert run.data.metrics.get("data/decoded", 0) == 0 and run.data.metrics["data/seen"] > 0
    assert not (tmp_path / "runs" / parent.data.tags["llip.run_name"] / "data_cache").exists()  # removed at the end
    assert json.loads(parent.data.tags["llip.sweep.params"]) == [
        "data.batch_size", "loss.type", "model.mixture_tokens", "model.tau"]  # tau: inherited from the demo
    top = max(x.data.metrics["eval/recall1"] for x in by_batch.values())
    best = {x.info.run_id: x.info.run_name for x in by_batch.values() if x.data.metrics["eval/recall1"] == top}
    assert parent.data.tags["llip.best_run_id"] in best  # (ties are possible at 10 steps)
    arts = {a.path for d in ("compare", "config") for a in c.list_artifacts(pid, d)}
    assert {"compare/comparison.png", "compare/trials.csv", "config/sweep.yaml"} <= arts

    # The sweep's own table and `llip compare` agree: best first, the crashed trial last.
    from orchestrator.cli import main

    capsys.readouterr()
    assert main(["compare", "sweep_test", "--no-log", "--tracking-uri", cli_env["MLFLOW_TRACKING_URI"]]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("#"))
    order = [line.split()[1] for line in lines[header + 2: header + 5]]
    assert order[0] in best.values() and order[-1] == crashed.info.run_name
    assert lines[header + 4].split()[3] == "FAILED"


# -- no cluster needed ---------------------------------------------------------------------------
def test_search_spaces_map_to_tune():
    from ray import tune

    from orchestrator.config.schema import SearchSpace
    from orchestrator.sweeps.tune import tune_space

    assert tune_space(SearchSpace(grid=[4, 16])) == tune.grid_search([4, 16])
    assert isinstance(tune_space(SearchSpace(choice=[1.0, 5.0])), tune.search.sample.Categorical)
    lu = tune_space(SearchSpace(loguniform=(1e-4, 1e-2)))
    assert isinstance(lu.get_sampler(), tune.search.sample.LogUniform) or lu.lower == 1e-4
    ri = tune_space(SearchSpace(randint=(1, 3)))
    assert (ri.lower, ri.upper) == (1, 4)  # YAML bounds inclusive, Tune's upper exclusive


def test_max_concurrent_trials_from_resources(tmp_path):
    from orchestrator.sweeps.tune import count_trials, derive_max_concurrent, trial_resources

    cfg = load_config(DEMO)
    assert count_trials(cfg) == 4
    assert trial_resources(cfg) == {"CPU": 1.0, "GPU": 0.0}
    assert derive_max_concurrent(cfg, {"CPU": 2.0}) == 2
    assert derive_max_concurrent(cfg, {"CPU": 7.9}) == 7
    # with the shared data pass (0.25 CPUs once) trials hold only their workers' 0.5, but each
    # trains on one thread: 2 cores run 2 trials, not the 3 the reservations alone would allow
    assert trial_resources(cfg, shared=True) == {"CPU": 0.5, "GPU": 0.0}
    assert derive_max_concurrent(cfg, {"CPU": 2.0}, shared_cpus=0.25) == 2
    assert derive_max_concurrent(cfg, {"CPU": 16.0}, shared_cpus=0.25) == 16
    assert derive_max_concurrent(cfg.with_overrides({"train.threads_per_worker": 4}), {"CPU": 16.0}) == 4
    gpu = cfg.with_overrides({"scaling.use_gpu": True, "scaling.num_workers": 2, "scaling.cpus_per_worker": 4,
                              "data.batch_size": 64})
    assert derive_max_concurrent(gpu, {"CPU": 64.0, "GPU": 4.0}) == 2  # GPUs bind first
    assert derive_max_concurrent(gpu, {"CPU": 8.0}) is None  # autoscaling: no GPU node up yet, no cap


@pytest.mark.parametrize("params, sweep, fragment", [
    ("", "  scheduler: {type: asha}\n", "train.eval_every is 0"),
    ("    model.mixture_tokenz: {grid: [4]}\n", "", "sweep.params.model.mixture_tokenz value 4"),
    ("    model.cross_heads: {grid: [8, 3]}\n", "", "sweep.params.model.cross_heads value 3"),  # 64 % 3
])
def test_bad_sweeps_fail_in_one_line_before_ray(tmp_path, params, sweep, fragment):
    from orchestrator.sweeps.tune import check_sweep

    p = write_sweep(tmp_path, tmp_path / "shards", params, sweep)
    with pytest.raises(UserError) as e:
        check_sweep(load_config(p))
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_sweep_without_sweep_section_is_one_line(capsys):
    from orchestrator.cli import main

    assert main(["sweep", str(ROOT / "experiments" / "smoke.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llip: error:") and "no sweep: section" in err and err.count("\n") == 1


def test_reconcile_makes_mlflow_agree_with_tune(tmp_path):
    """One child per trial, none left RUNNING: a trial that crashed before creating its run gets a
    FAILED child; one ASHA stopped (RUNNING in MLflow, TERMINATED in Tune) becomes KILLED."""
    from orchestrator.sweeps.tune import _reconcile

    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = experiment_id(c, "s")
    parent = c.create_run(exp, tags={"llip.sweep": "true", "llip.run_name": "s-1"}).info.run_id

    def child(tid, status=None):
        rid = c.create_run(exp, tags={"mlflow.parentRunId": parent, "llip.trial_id": tid}).info.run_id
        if status:
            c.set_terminated(rid, status)
        return rid

    done, stopped, crashed, ended = child("t0", "FINISHED"), child("t1"), child("t2", "FAILED"), child("t4")
    c.log_param(ended, "train.steps", "10")  # t4 logged its final step; Tune ended it before it closed its run
    c.log_metric(ended, "train/loss", 1.0, step=10)
    torn = child("t5", "FAILED")  # ASHA stopped t5; its actor's teardown broke the fit it waited on
    c.set_tag(torn, "llip.error", "ActorDiedError: placement group was removed")
    trial = lambda tid, status, err=None, ov=None: SimpleNamespace(  # noqa: E731
        trial_id=tid, status=status, config={"overrides": ov or {}},
        get_pickled_error=lambda: RuntimeError(err) if err else None, get_error=lambda: None)
    tracker = SimpleNamespace(trials={
        "t0": trial("t0", "TERMINATED"), "t1": trial("t1", "TERMINATED"), "t2": trial("t2", "ERROR", "boom"),
        "t3": trial("t3", "ERROR", "bad override", {"model.tau": -1}), "t4": trial("t4", "TERMINATED"),
        "t5": trial("t5", "TERMINATED")})
    counts = _reconcile(c, parent, tracker)
    assert counts == {"total": 6, "finished": 4, "failed": 2}
    t5 = c.get_run(torn)
    assert t5.info.status == "KILLED" and "llip.error" not in t5.data.tags and "ASHA" in t5.data.tags["llip.stopped"]
    assert c.get_run(ended).info.status == "FINISHED"
    assert c.get_run(done).info.status == "FINISHED"
    s = c.get_run(stopped)
    assert s.info.status == "KILLED" and "ASHA" in s.data.tags["llip.stopped"]
    assert c.get_run(crashed).info.status == "FAILED"
    new = c.search_runs([exp], filter_string="tags.`llip.trial_id` = 't3'")
    assert len(new) == 1 and new[0].info.status == "FAILED"
    assert new[0].data.tags["mlflow.parentRunId"] == parent and "bad override" in new[0].data.tags["llip.error"]
    assert new[0].data.params["model.tau"] == "-1"
