"""Checks that need no cluster run before Ray is imported, and `llip --version` tells the commit."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import sys
from orchestrator.cli import main
rc = main(sys.argv[1:])
print("RAY_IMPORTED" if any(m == "ray" or m.startswith("ray.") for m in sys.modules) else "RAY_NOT_IMPORTED")
sys.exit(rc)
"""


def _llip(tmp_path, *args):
    # a bare environment, but the same code: a worktree's PYTHONPATH (ahead of the venv's editable install) stays
    env = {"PATH": "/usr/bin:/bin", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db",
           **({"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else {})}
    return subprocess.run([sys.executable, "-c", PROBE, *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env=env)


def test_missing_local_shards_fail_before_ray(tmp_path):
    r = _llip(tmp_path, "run", str(ROOT / "experiments/demo.yaml"), "--set", f"data.train={tmp_path}/nope")
    assert r.returncode == 2, r.stderr
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("llip: error: data.train:") and "nope does not exist" in err[0], r.stderr
    assert "RAY_NOT_IMPORTED" in r.stdout
    assert not (tmp_path / "m.db").exists()  # nothing written to MLflow


def test_missing_eval_shards_fail_before_ray(tmp_path):
    train = tmp_path / "train"
    train.mkdir()
    (train / "s-000000.tar").write_bytes(b"")
    r = _llip(tmp_path, "run", str(ROOT / "experiments/demo.yaml"), "--set", f"data.train={train}",
              "--set", f"data.eval={tmp_path}/held_out")
    assert r.returncode == 2 and "data.eval:" in r.stderr and "held_out does not exist" in r.stderr, r.stderr
    assert "RAY_NOT_IMPORTED" in r.stdout


def test_version_names_package_and_commit(tmp_path):
    r = subprocess.run([sys.executable, "-m", "orchestrator", "--version"], cwd=ROOT, capture_output=True, text=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    from importlib.metadata import version
    assert r.returncode == 0
    assert r.stdout.strip() == f"llip-orch {version('llip-orch')} (commit {head})"
