"""Ray's autoscaler, really, in its laptop mode: `RAY_FAKE_CLUSTER=1 ray start --head
--autoscaling-config=tests/fixtures/fake_cluster.yaml`, whose node types are cluster.yaml's (checked
by tests/test_cluster_config.py) with a `fake_gpu` resource standing in for each GPU, every worker
type starting at zero. A sweep submitted with `llip submit --sweep` asks for one fake GPU per trial:
the autoscaler launches worker nodes for the trials (each a real local Ray node), the job ends
SUCCEEDED, and the idle nodes are terminated after the idle timeout. Shards and checkpoints on S3
(moto's server), runs on an MLflow server, every process stopped by PID.

The job runs `--in-place` (Ray's local:// working_dir): in laptop mode every "node" shares the head's
session folder, and Ray unpacks an uploaded working_dir afresh (remove, then unpack) on each node
that first uses it, which would pull the folder from under the processes of the nodes already
using it. On a real cluster each node has its own disk; the upload itself is tested against a real
head in tests/test_jobs.py."""
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from clusters import MlflowServer, RayCluster, wait_for
from s3server import aws_env, start_moto, stop_moto

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.multinode]
BUCKET = "llip-autoscaler"

SWEEP = """\
# two trials, one fake GPU each (tests/test_autoscaler.py)
base: smoke.yaml
name: autoscaled
train: {steps: 8, log_every: 4}
scaling: {num_workers: 1, cpus_per_worker: 1, resources_per_worker: {fake_gpu: 1}, placement_timeout_s: 300}
sweep:
  params:
    model.mixture_tokens: {grid: [2, 4]}
  metric: train/loss
  mode: min
  max_concurrent_trials: 2
  shared_data: {enabled: false}
"""


def gpu_nodes(address) -> set[str]:
    """Alive nodes offering a fake GPU (what the autoscaler launched), from Ray's GCS."""
    import ray

    return {n["NodeID"] for n in ray.nodes() if n.get("Alive") and (n.get("Resources") or {}).get("fake_gpu")}


@pytest.mark.timeout(1200)
def test_a_sweep_scales_gpu_nodes_up_and_back_down(tmp_path, emoji_shards):
    moto = start_moto()
    server = cluster = None
    env = {**os.environ, **aws_env(moto.endpoint_url)}
    try:
        moto.create_bucket(BUCKET)
        for split in ("train", "eval"):  # the shards the session already wrote, onto S3
            subprocess.run([sys.executable, "-c", (
                "import sys, boto3, pathlib; c = boto3.client('s3');"
                "[c.upload_file(str(p), sys.argv[1], sys.argv[2] + p.name) for p in pathlib.Path(sys.argv[3]).glob('*.tar')]"),
                BUCKET, f"emoji/{split}/", str(emoji_shards / split)], env=env, check=True, timeout=120)
        server = MlflowServer(tmp_path)
        config = yaml.safe_load((ROOT / "tests" / "fixtures" / "fake_cluster.yaml").read_text())
        cluster = RayCluster({**env, "RAY_FAKE_CLUSTER": "1"})
        config["provider"]["gcs_address"] = cluster.address
        (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(config))
        cluster.start_head(num_cpus=config["available_node_types"]["ray.head.default"]["resources"]["CPU"],
                           dashboard=True, extra_args=("--autoscaling-config", str(tmp_path / "cluster.yaml")))

        work = tmp_path / "project"
        (work / "experiments").mkdir(parents=True)
        for name in ("base.yaml", "smoke.yaml"):
            shutil.copy(ROOT / "experiments" / name, work / "experiments" / name)
        (work / "experiments" / "autoscaled.yaml").write_text(SWEEP)

        import ray

        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        seen: dict[str, float] = {}  # fake-GPU node id -> when first seen
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                for n in gpu_nodes(cluster.address):
                    seen.setdefault(n, time.time())
                stop.wait(0.5)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        assert not gpu_nodes(cluster.address), "the GPU node types start at zero"
        submitted = time.time()
        r = subprocess.run(
            [sys.executable, "-m", "orchestrator", "submit", "experiments/autoscaled.yaml", "--sweep", "--wait",
             "--address", cluster.dashboard, "--working-dir", str(work), "--tracking-uri", server.url, "--in-place",
             "--set", f"data.train=s3://{BUCKET}/emoji/train", "--set", f"data.eval=s3://{BUCKET}/emoji/eval",
             "--set", f"storage_path=s3://{BUCKET}/runs"],
            cwd=work, env={**env, "RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True, timeout=900)
        done_at = time.time()
        out = r.stdout + r.stderr
        assert r.returncode == 0, out[-6000:]
        assert "SUCCEEDED" in r.stdout.splitlines()[-1]
        launched = dict(seen)
        assert len(launched) >= 1, "no worker node was launched for the trials"
        # the nodes go once idle for idle_timeout_minutes (0.2 min) plus the autoscaler's update period
        wait_for(lambda: not gpu_nodes(cluster.address), 180, "the idle GPU nodes to be terminated", poll_s=1)
        gone_after = time.time() - done_at
        stop.set()
        watcher.join(timeout=5)
        ray.shutdown()

        c = MlflowClient(server.url)
        runs = c.search_runs([c.get_experiment_by_name("autoscaled").experiment_id])
        parent = [x for x in runs if x.data.tags.get("llip.sweep") == "true"]
        children = [x for x in runs if "mlflow.parentRunId" in x.data.tags]
        assert len(parent) == 1 and parent[0].info.status == "FINISHED"
        assert len(children) == 2 and all(x.info.status == "FINISHED" for x in children)
        print(f"\n[autoscaler] {len(launched)} fake-GPU node(s) launched, the first {min(launched.values()) - submitted:.0f} s "
              f"after submitting; the sweep took {done_at - submitted:.0f} s; the nodes were gone {gone_after:.0f} s "
              "after it ended")
    finally:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        finally:
            if cluster is not None:
                cluster.stop()
            if server is not None:
                server.stop()
            stop_moto(moto.proc)
