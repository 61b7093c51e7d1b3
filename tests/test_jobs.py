"""`llip submit`: a real Ray head started with `ray start --head` (token auth disabled, its own temp
dir and ports), the smoke experiment submitted with --wait until SUCCEEDED, the run read back from
MLflow; then, on the same head, a job submitted from a project folder outside the repository by a
non-editable install (tests/test_installed.py's), which ships that install's library. The cluster is
then stopped by the PIDs it started (never `ray stop`, which would kill every Ray process on the
machine). Plus the cluster-free parts: what is uploaded, the entrypoint, and
one-line errors for an unreachable address and for data that would not reach the cluster."""
import os
import shutil
import subprocess
import sys
import tempfile
from argparse import Namespace
from pathlib import Path

import pytest

from clusters import free_port, processes_of, stop_cluster
from orchestrator.errors import UserError
from test_installed import _env, llip

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head of our own, shared by this module's two submissions: (dashboard address, env for clients)."""
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths have a length limit
    dash = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "VIRTUAL_ENV")}
    env["RAY_AUTH_MODE"] = "disabled"
    # The venv is NOT on PATH: a job's bare `python` is then an interpreter without our dependencies,
    # which is the situation job_entry.sh exists for.
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if Path(p) != VENV_BIN)
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--port", str(free_port()), "--dashboard-port", str(dash),
           "--dashboard-host", "127.0.0.1", "--include-dashboard", "true", "--num-cpus", "2", "--num-gpus", "0",
           "--temp-dir", temp_dir, "--ray-client-server-port", str(free_port()),
           "--dashboard-agent-listen-port", str(free_port()), "--disable-usage-stats"]
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        yield f"http://127.0.0.1:{dash}", env
    finally:
        stop_cluster(temp_dir)
        assert not processes_of(temp_dir), "cluster processes survived"
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(720)
def test_submit_wait_succeeds_on_a_real_head(ray_head, emoji_shards, tmp_path):
    from mlflow.tracking import MlflowClient

    address, env = ray_head
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    r = subprocess.run(
        [sys.executable, "-m", "orchestrator", "submit", "experiments/smoke.yaml", "--address", address, "--wait",
         "--set", f"data.train={emoji_shards / 'train'}", "--set", f"data.eval={emoji_shards / 'eval'}",
         "--set", "train.steps=10", "--tracking-uri", uri, "--storage-path", str(tmp_path / "runs")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=660)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    job_id = next(line.split()[2] for line in r.stdout.splitlines() if line.startswith("submitted job "))
    assert f"ray job logs {job_id} --address {address} --follow" in r.stdout
    assert f"job {job_id} SUCCEEDED" in r.stdout.splitlines()[-1]
    # The job ran with the interpreter of the cluster's workers, not the head's bare `python`.
    assert f"[llip job] python: {VENV_BIN}/python" in r.stdout
    assert "step 10/10" in r.stdout  # the job's own log was streamed

    c = MlflowClient(uri)
    runs = c.search_runs([c.get_experiment_by_name("smoke").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["llip.git_commit"] not in ("", "unknown")  # passed in: .git is not uploaded
    assert str(tmp_path / "runs") in runs[0].data.tags["llip.checkpoint"]

    from ray.job_submission import JobSubmissionClient

    info = JobSubmissionClient(address).get_job_info(job_id)
    assert str(info.status.value) == "SUCCEEDED" and info.metadata["llip.experiment"] == "smoke"


def test_unreachable_address_is_one_line():
    port = free_port()  # nothing listens there
    r = subprocess.run([sys.executable, "-m", "orchestrator", "submit", "experiments/smoke.yaml",
                        "--address", f"127.0.0.1:{port}", "--set", "data.train=/abs/shards", "--set", "data.eval=null"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("llip: error: cannot reach the Ray job API at "
                                                             f"http://127.0.0.1:{port}")


def args(**kw):
    base = dict(file=str(ROOT / "experiments" / "smoke.yaml"), working_dir=str(ROOT), address="http://h:8265",
                sweep=False, wait=False,
                overrides=["data.train=s3://b/train", "data.eval=s3://b/eval"], run_name=None, tracking_uri=None,
                storage_path=None, python=None, submission_id=None)
    return Namespace(**{**base, **kw})


def test_submission_uploads_the_working_dir_without_big_dirs_and_runs_the_entry_script(monkeypatch):
    from orchestrator.jobs.submit import build_submission

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    sub = build_submission(args(run_name="r1"))
    env = sub["runtime_env"]
    assert env["working_dir"] == str(ROOT)
    for d in (".venv/", "data/", "runs/", "mlflow.db", ".git/"):
        assert d in env["excludes"]
    assert env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow.internal:5000"  # a server URI travels
    assert sub["entrypoint"].startswith("sh -c ")  # the entry script travels inline: the library is not in working_dir
    assert (ROOT / "orchestrator" / "jobs" / "job_entry.sh").read_text().strip()[:40] in sub["entrypoint"].replace("'\"'\"'", "'")
    assert " llip-job run experiments/smoke.yaml --set " in sub["entrypoint"]
    assert sorted(Path(m).name for m in env["py_modules"]) == ["llip_core", "orchestrator"]
    assert "--run-name r1" in sub["entrypoint"]
    assert '--set "storage_path=$HOME/llip/runs"' in sub["entrypoint"]  # relative local storage: head-side default

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")  # a local file means nothing on the head
    assert "MLFLOW_TRACKING_URI" not in build_submission(args())["runtime_env"]["env_vars"]


def test_in_place_submission_uploads_nothing():
    """--in-place: the folders are named as Ray's local:// URIs, which every node must already have."""
    import llip_core
    import orchestrator
    from orchestrator.jobs.submit import build_submission

    env = build_submission(args(in_place=True))["runtime_env"]
    assert env["working_dir"] == f"local://{ROOT}" and "excludes" not in env
    assert sorted(env["py_modules"]) == sorted(f"local://{Path(m.__file__).resolve().parent}"
                                               for m in (llip_core, orchestrator))


@pytest.mark.parametrize("kw, fragment", [
    (dict(overrides=[]), "data.train 'data/emoji/train' is a relative local path"),
    (dict(sweep=True), "--sweep given but the file has no sweep: section"),
    (dict(file="/tmp/elsewhere.yaml"), "must be inside the working dir"),
    (dict(overrides=["data.train=s3://b/t", "train.stepz=3"]), "train.stepz"),
])
def test_bad_submissions_fail_locally_in_one_line(kw, fragment):
    from orchestrator.jobs.submit import build_submission

    with pytest.raises(UserError) as e:
        build_submission(args(**kw))
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_sweep_submission(tmp_path):
    from orchestrator.jobs.submit import build_submission

    sub = build_submission(args(file=str(ROOT / "experiments" / "sweep_demo.yaml"), sweep=True))
    assert " llip-job sweep experiments/sweep_demo.yaml" in sub["entrypoint"]
    assert sub["metadata"]["llip.command"] == "sweep"


@pytest.mark.slow
@pytest.mark.timeout(720)
def test_submit_from_a_project_outside_the_repo_with_a_non_editable_install(installed, ray_head, emoji_shards, tmp_path):
    from mlflow.tracking import MlflowClient

    address, head_env = ray_head
    proj = tmp_path / "research"
    assert llip(installed, tmp_path, "init", proj).returncode == 0
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    r = llip(installed, proj, "submit", "experiments/smoke.yaml", "--address", address, "--wait",
             "--set", f"data.train={emoji_shards / 'train'}", "--set", f"data.eval={emoji_shards / 'eval'}",
             "--set", "train.steps=10", "--tracking-uri", uri, "--storage-path", str(tmp_path / "runs"),
             env=_env(installed, head_env), timeout=660)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    assert r.stdout.startswith(f"uploading {proj} (")  # says what travels, and how much
    assert "this client's llip_core + orchestrator (" in r.stdout.splitlines()[0]
    assert "SUCCEEDED" in r.stdout.splitlines()[-1]
    # The job imported the shipped library (Ray's py_modules folder), not a copy on the cluster.
    lib = next(line for line in r.stdout.splitlines() if line.startswith("[llip job] python:")).split("llip from: ")[1].split()[0]
    assert lib != str(ROOT) and lib != str(installed) and "runtime_resources" in lib, lib
    c = MlflowClient(uri)
    runs = c.search_runs([c.get_experiment_by_name("smoke").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
