"""Several Ray nodes on this machine: a head and two worker nodes, each a separate `ray start` with
its own raylet and its own custom resource; shards and checkpoints on S3 (moto's server on
127.0.0.1) and MLflow on a real tracking server, both reached the same way from every node.

- `llip run` with 2 training workers that each need a `trainer` slot, which only the worker nodes
  have (one each): the workers run on two different nodes (node ids from Ray, in the step trace),
  checkpoint to s3://, and when one worker node is lost (its raylet and every process of it
  SIGKILLed by PID a few steps after a checkpoint) the run goes on from that checkpoint on the
  surviving node and a node the test starts again, ends FINISHED in one MLflow run, and every step
  after the checkpoint sees exactly the samples of the uninterrupted plan.
- A local storage_path (or a sqlite store) is refused before training when the workers can land on
  other nodes; `storage_shared: true` vouches for a shared filesystem.
- A worker node that cannot reach the S3 endpoint the driver reached, and workers no node can hold:
  one line each, never a hang.
Every process started here is stopped by PID. `pytest -m multinode` runs these alone.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from clusters import MlflowServer, RayCluster, wait_for
from s3server import aws_env, closed_port, start_moto, stop_moto
from test_fault_tolerance import planned_ids, segments

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.multinode]

BUCKET = "llip-multinode"
STEPS, EVERY = 20, 5  # 512 training samples, global batch 64: 8 steps an epoch


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    """moto's S3 server with the shards on it, and an MLflow tracking server."""
    from orchestrator.data.shards import write_emoji_shards

    root = tmp_path_factory.mktemp("mn")
    moto = start_moto()
    mp = pytest.MonkeyPatch()
    for k, v in aws_env(moto.endpoint_url).items():
        mp.setenv(k, v)
    server = None
    try:
        moto.create_bucket(BUCKET)
        m = write_emoji_shards(f"s3://{BUCKET}/emoji", samples_per_shard=64, seed=0, holdout=0.2, limit=640)
        assert m["splits"]["train"]["samples"] == 512
        server = MlflowServer(root)
        yield {"root": root, "s3": moto.endpoint_url, "mlflow": server.url, "trace": root / "trace"}
    finally:
        if server is not None:
            server.stop()
        mp.undo()
        stop_moto(moto.proc)


@pytest.fixture(scope="module")
def cluster(services):
    """Head (1 CPU, where drivers run) and worker nodes a and b (1 CPU and one `trainer` slot each)."""
    env = {**os.environ, **aws_env(services["s3"]), "MLFLOW_TRACKING_URI": services["mlflow"],
           "LLIP_TRACE_STEPS": str(services["trace"])}  # the nodes' workers inherit it from their raylet
    c = RayCluster(env)
    try:
        c.start_head(num_cpus=1)
        c.add_node("a", num_cpus=1, resources={"trainer": 1, "node_a": 1})
        c.add_node("b", num_cpus=1, resources={"trainer": 1, "node_b": 1})
        yield c
    finally:
        c.stop()


def llip(cluster, services, *args, timeout=600, **kw):
    env = {**cluster.env, "RAY_ADDRESS": cluster.address, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "orchestrator", *map(str, args)], cwd=services["root"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def run_args(name, *extra):
    sets = {"data.train": f"s3://{BUCKET}/emoji/train", "data.eval": "null", "storage_path": f"s3://{BUCKET}/runs",
            "train.steps": STEPS, "train.log_every": EVERY, "train.checkpoint_every": EVERY,
            "train.keep_checkpoints": 2, "scaling.num_workers": 2, "scaling.cpus_per_worker": 0.5,
            "scaling.resources_per_worker": "{trainer: 1}", "scaling.max_failures": 1,
            "scaling.placement_timeout_s": 300}
    out = ["run", ROOT / "experiments" / "smoke.yaml", "--run-name", name]
    for k, v in sets.items():
        out += ["--set", f"{k}={v}"]
    for e in extra:
        out += ["--set", e]
    return out


def trace_steps(services, run, rank) -> list[dict]:
    p = services["trace"] / f"{run}-rank{rank}.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []


def one_error_line(out: str) -> str:
    errs = [ln for ln in out.splitlines() if ln.startswith("llip: error:")]
    assert len(errs) == 1, out[-4000:]
    return errs[0]


@pytest.mark.timeout(900)
def test_workers_on_two_nodes_survive_a_lost_node_and_resume_exactly(cluster, services, capsys):
    import ray

    c = MlflowClient(services["mlflow"])
    proc = llip(cluster, services, *run_args("mn-run"))
    try:
        # A few steps past a checkpoint: wait until step 10 is in MLflow (its checkpoint is written)
        # and rank 0 trained two or three steps more.
        def past_checkpoint():
            exp = c.get_experiment_by_name("smoke")
            runs = c.search_runs([exp.experiment_id]) if exp else []
            logged = {m.step for r in runs for m in c.get_metric_history(r.info.run_id, "train/loss")}
            done = max((s["step"] for s in trace_steps(services, "mn-run", 0)), default=0)
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            return 10 in logged and done >= 12

        wait_for(past_checkpoint, 480, "step 10 checkpointed and step 12 trained", poll_s=0.05)
        killed_at = time.time()
        killed_step = max(s["step"] for s in trace_steps(services, "mn-run", 0))
        lost = cluster.nodes["b"].node_id
        pids = cluster.kill_node("b")
        assert pids and not any(Path(f"/proc/{p}").exists() and "zombie" not in Path(f"/proc/{p}/status").read_text()
                                for p in pids)
        cluster.add_node("c", num_cpus=1, resources={"trainer": 1, "node_c": 1})  # the replacement node
        node_up = time.time() - killed_at
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-5000:]

    exp = c.get_experiment_by_name("smoke")
    runs = c.search_runs([exp.experiment_id], "tags.`llip.run_name` = 'mn-run'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["llip.checkpoint"].startswith(f"s3://{BUCKET}/runs/mn-run/checkpoint_")

    # The rest asks Ray (node ids) and reads the plan through Ray Data, on this cluster.
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    try:
        _check_the_run(cluster, services, lost, killed_at, killed_step, node_up, capsys)
    finally:
        ray.shutdown()


def _check_the_run(cluster, services, lost, killed_at, killed_step, node_up, capsys):
    import ray

    alive = {n["NodeID"]: n for n in ray.nodes() if n.get("Alive")}
    # Ray's own view: a and c alive with their resources, b gone
    assert alive[cluster.nodes["a"].node_id]["Resources"].get("node_a") == 1
    assert alive[cluster.nodes["c"].node_id]["Resources"].get("node_c") == 1 and lost not in alive

    from orchestrator.config.schema import load_config

    cfg = load_config(ROOT / "experiments" / "smoke.yaml").with_overrides({
        "data.train": f"s3://{BUCKET}/emoji/train", "data.eval": None, "train.steps": STEPS})
    first_nodes, after_nodes, resumed_at, steps_again = [], [], [], []
    for rank in range(2):
        first, resumed = segments(trace_steps(services, "mn-run", rank))[:2]
        first_nodes.append({s["node"] for s in first})
        after_nodes.append({s["node"] for s in resumed})
        ckpt = resumed[0]["step"] - 1
        assert ckpt in (5, 10) and resumed[-1]["step"] == STEPS, ckpt
        # the run's sequence is the plan's, as if never interrupted (the steps after the checkpoint
        # were trained again on the new nodes with the same samples)
        plan = [b for e in range(3) for b in planned_ids(cfg, e, 2, rank)][:STEPS]
        assert [s["ids"] for s in first if s["step"] <= ckpt] + [s["ids"] for s in resumed] == plan
        resumed_at.append(resumed[0]["time"])
        steps_again.append(sum(1 for s in first if s["step"] > ckpt))
    # before the loss: one worker on each worker node, never on the head
    assert [len(n) for n in first_nodes] == [1, 1] and first_nodes[0] != first_nodes[1]
    assert first_nodes[0] | first_nodes[1] == {cluster.nodes["a"].node_id, lost}
    # after it: node a and the replacement node c
    assert after_nodes[0] | after_nodes[1] == {cluster.nodes["a"].node_id, cluster.nodes["c"].node_id}
    with capsys.disabled():
        print(f"\n[multinode] node lost at step {killed_step}; the replacement node was up {node_up:.1f} s after "
              f"the kill; the next training step came {min(resumed_at) - killed_at:.1f} s after the kill; "
              f"{max(steps_again)} step(s) trained again")


@pytest.mark.timeout(300)
def test_local_storage_is_refused_when_workers_span_nodes(cluster, services, tmp_path):
    """Workers can only run on the worker nodes, not the driver's (the head): a local storage_path is
    refused before training in one line; a sqlite tracking store as well; `storage_shared: true`
    vouches for a shared filesystem. (A local path stays fine when every worker is on the driver's
    node: every single-node test of this suite runs that way.)"""
    import ray

    from orchestrator.config.schema import load_config
    from orchestrator.errors import UserError
    from orchestrator.storage.reach import check_shared_storage, worker_nodes

    proc = llip(cluster, services, *run_args("mn-local", f"storage_path={tmp_path / 'runs'}"))
    out, _ = proc.communicate(timeout=240)
    line = one_error_line(out)
    assert proc.returncode == 2 and "storage_path" in line and str(tmp_path / "runs") in line
    assert "storage_shared: true" in line and "s3://" in line
    c = MlflowClient(services["mlflow"])
    exp = c.get_experiment_by_name("smoke")
    assert not exp or not c.search_runs([exp.experiment_id], "tags.`llip.run_name` = 'mn-local'")  # before any run
    assert not (tmp_path / "runs").exists()

    cfg = load_config(ROOT / "experiments" / "smoke.yaml").with_overrides({
        "data.train": f"s3://{BUCKET}/emoji/train", "data.eval": None, "storage_path": str(tmp_path / "runs"),
        "scaling.resources_per_worker": {"trainer": 1}})
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    try:
        driver, able, spread = worker_nodes(cfg)
        assert spread and driver not in {n["id"] for n in able} and len(able) >= 2
        with pytest.raises(UserError, match="storage_path"):
            check_shared_storage(cfg, services["mlflow"], spread)
        s3cfg = cfg.with_overrides({"storage_path": f"s3://{BUCKET}/runs"})
        with pytest.raises(UserError, match="mlflow.tracking_uri.*MLflow tracking server"):
            check_shared_storage(s3cfg, f"sqlite:///{tmp_path / 'mlflow.db'}", spread)
        check_shared_storage(s3cfg, services["mlflow"], spread)  # nothing local: fine
        check_shared_storage(cfg.with_overrides({"storage_shared": True}), services["mlflow"], spread)
    finally:
        ray.shutdown()


@pytest.mark.timeout(300)
def test_a_node_that_cannot_reach_s3_is_named_before_training(cluster, services):
    bad = f"http://127.0.0.1:{closed_port()}"
    node = cluster.add_node("d", num_cpus=1, resources={"trainer": 1}, extra_env={"AWS_ENDPOINT_URL": bad})
    try:
        proc = llip(cluster, services, *run_args("mn-unreachable"))
        out, _ = proc.communicate(timeout=240)
    finally:
        cluster.kill_node("d")
    line = one_error_line(out)
    assert proc.returncode == 2 and f"node {node.node_id[:12]}" in line and bad in line
    assert f"s3://{BUCKET}/" in line and "unreachable" in line


@pytest.mark.timeout(300)
def test_workers_no_node_can_hold_fail_in_one_line_after_the_timeout(cluster, services):
    proc = llip(cluster, services, *run_args("mn-unplaceable", "scaling.resources_per_worker={no_such_gpu: 1}",
                                             "scaling.placement_timeout_s=5"))
    out, _ = proc.communicate(timeout=240)
    line = one_error_line(out)
    assert proc.returncode == 2
    assert "could not be placed within scaling.placement_timeout_s=5 s" in line and "no_such_gpu: 1" in line
    c = MlflowClient(services["mlflow"])
    run = c.search_runs([c.get_experiment_by_name("smoke").experiment_id], "tags.`llip.run_name` = 'mn-unplaceable'")
    assert len(run) == 1 and run[0].info.status == "FAILED"
