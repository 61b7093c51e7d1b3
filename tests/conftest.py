import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# -- the machine, in the log ---------------------------------------------------------------------
def machine_line() -> str:
    """CPU model, the instruction-set flags that change torch's kernels here, and torch's view of
    them, so a failure on another machine of this kind can be read from the CI log."""
    import torch

    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    wanted = ["avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"]
    have = " ".join(f"{f}={'yes' if f in flags else 'no'}" for f in wanted)
    from orchestrator.training.switches import bf16_supported

    return (f"machine: {model}, {os.cpu_count()} cores; {have}; torch {torch.__version__} kernels "
            f"{torch.backends.cpu.get_cpu_capability()}, bf16 kernels "
            f"{'yes' if bf16_supported(torch.device('cpu')) else 'no'}"
            + "".join(f", {k}={os.environ[k]}" for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ))


# -- the checkout stays as it was ----------------------------------------------------------------
_OWN = (".venv/", ".pytest_cache/", "llip_orch.egg-info/", "data/")  # setup's and the user's, not the tests'

try:  # Hypothesis keeps its examples and caches in ./.hypothesis unless told otherwise
    import tempfile

    from hypothesis import settings as _hypothesis_settings
    from hypothesis.configuration import set_hypothesis_home_dir

    set_hypothesis_home_dir(tempfile.mkdtemp(prefix="llip-hypothesis-"))
    _hypothesis_settings.register_profile("llip", database=None)
    _hypothesis_settings.load_profile("llip")
except ImportError:
    pass


def _checkout_files() -> set[str]:
    """Untracked and ignored paths in the checkout (empty outside a git checkout)."""
    r = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--ignored"], cwd=ROOT,
                       capture_output=True, text=True)
    if r.returncode != 0:
        return set()
    out = set()
    for line in r.stdout.splitlines():
        path = line[3:]
        if line[:2] in ("??", "!!") and "__pycache__/" not in path and not path.startswith(_OWN):
            out.add(path)
    return out


def pytest_sessionstart(session):
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(machine_line())
    session.config._llip_checkout_before = _checkout_files()


def pytest_sessionfinish(session, exitstatus):
    """Tests write only under temporary folders: a file the session left in the checkout (an
    `mlruns/`, a `runs/`, a stray database) fails the run, naming it."""
    before = getattr(session.config, "_llip_checkout_before", None)
    if before is None:
        return
    new = sorted(_checkout_files() - before)
    if new:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        msg = f"tests left {len(new)} new file(s) in the checkout {ROOT}: " + ", ".join(new[:10])
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_line(msg, red=True)
        else:
            print(msg)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def emoji_shards(tmp_path_factory):
    """Real demo data (Twemoji + Unicode names) as local WebDataset shards, built once per session."""
    from orchestrator.data.shards import write_emoji_shards

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
    # Built from a copy of the working tree's files (tracked or not ignored): setuptools builds in the
    # source folder (build/, *.egg-info), which must not be the checkout.
    src = tmp_path_factory.mktemp("src")
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, files):
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", str(target), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return target
