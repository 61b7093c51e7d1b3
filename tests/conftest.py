import os
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
