import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def emoji_shards(tmp_path_factory):
    """Real demo data (Twemoji + Unicode names) as local WebDataset shards, built once per session."""
    from orchestrator.shards import write_emoji_shards

    out = tmp_path_factory.mktemp("emoji")
    write_emoji_shards(str(out), samples_per_shard=512, seed=0)
    return out


@pytest.fixture
def cli_env(tmp_path):
    """Environment for `llip` subprocesses: a fresh local Ray (never someone else's cluster) and a
    private MLflow store."""
    env = dict(os.environ)
    env["RAY_ADDRESS"] = "local"
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env.pop("AWS_ENDPOINT_URL", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def llip_cmd(*args):
    return [sys.executable, "-m", "orchestrator", *map(str, args)]


@pytest.fixture(scope="session")
def installed(tmp_path_factory):
    """A non-editable build of this checkout in its own folder; PYTHONPATH puts it ahead of the
    venv's editable install, whose dependencies (ray, torch, ...) it still uses."""
    target = tmp_path_factory.mktemp("site")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", str(target), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return target
