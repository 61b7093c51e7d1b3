"""llip-orch as an installed tool: a non-editable install (`pip install .` into a folder of its own),
used from a project folder outside this repository that holds only experiments/*.yaml."""
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def _env(installed, base=None):
    env = dict(base or os.environ)
    env["PYTHONPATH"] = str(installed)
    env.pop("VIRTUAL_ENV", None)
    return env


def llip(installed, cwd, *args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "orchestrator", *map(str, args)], cwd=cwd, env=env or _env(installed),
                          capture_output=True, text=True, timeout=timeout)


def test_installed_copy_is_used_and_init_writes_a_working_project(installed, tmp_path):
    proj = tmp_path / "myproj"
    r = subprocess.run([sys.executable, "-c", "import orchestrator; print(orchestrator.__file__)"], cwd=tmp_path,
                       env=_env(installed), capture_output=True, text=True)
    assert r.stdout.strip() == str(installed / "orchestrator" / "__init__.py")  # not the checkout's

    r = llip(installed, tmp_path, "init", proj)
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in (proj / "experiments").glob("*.yaml"))
    assert "demo.yaml" in names and "base.yaml" not in names  # inherits the shipped base instead
    assert "base: llip:base.yaml" in (proj / "experiments" / "demo.yaml").read_text()
    r = llip(installed, proj, "validate", *[f"experiments/{n}" for n in names])
    assert r.returncode == 0 and r.stdout.count("ok  ") == len(names), r.stdout + r.stderr

    # A project experiment of the user's own, inheriting the packaged base by name.
    (proj / "experiments" / "mine.yaml").write_text("base: llip:base.yaml\nname: mine\ntrain:\n  steps: 7\n")
    r = llip(installed, proj, "validate", "experiments/mine.yaml")
    assert r.returncode == 0 and "mine (run" in r.stdout
    (proj / "experiments" / "typo.yaml").write_text("base: llip:bsae.yaml\nname: typo\n")
    r = llip(installed, proj, "validate", "experiments/typo.yaml")
    assert r.returncode == 2 and "llip-orch ships no 'bsae.yaml'" in r.stdout

    r = llip(installed, proj, "init", proj)  # never overwrites silently
    assert r.returncode == 2 and "already exists; pass --force" in r.stderr

    r = llip(installed, proj, "run", "experiments/demo.yaml")  # no shards built yet: fails before Ray
    assert r.returncode == 2 and "data.train: data/emoji/train does not exist" in r.stderr


def test_submission_ships_the_clients_library_and_the_users_folder(installed, tmp_path):
    r = llip(installed, tmp_path, "init", tmp_path)
    probe = ("import sys, json; from argparse import Namespace; from orchestrator.jobs.submit import build_submission; "
             "a = Namespace(file='experiments/smoke.yaml', working_dir='.', address='http://h:8265', sweep=False, "
             "wait=False, overrides=['data.train=s3://b/t', 'data.eval=null'], run_name=None, tracking_uri=None, "
             "storage_path=None, python=None, submission_id=None); print(json.dumps(build_submission(a)))")
    r = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=_env(installed), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    import json

    sub = json.loads(r.stdout)
    env = sub["runtime_env"]
    assert env["working_dir"] == str(tmp_path)
    assert sorted(env["py_modules"]) == [str(installed / "llip_core"), str(installed / "orchestrator")]
    assert sub["entrypoint"].startswith("sh -c ") and " llip-job run experiments/smoke.yaml " in sub["entrypoint"]


def test_the_install_ships_every_module_and_data_file(installed):
    """`pip install .` carries every package of the checkout (orchestrator's stage sub-packages
    included), the job entry script and the shipped experiments."""
    for pkg in ("llip_core", "orchestrator"):
        here = {p.relative_to(ROOT).as_posix() for p in (ROOT / pkg).rglob("*.py")}
        there = {p.relative_to(installed).as_posix() for p in (installed / pkg).rglob("*.py")}
        assert here <= there, sorted(here - there)
    assert (installed / "orchestrator" / "jobs" / "job_entry.sh").is_file()
    shipped = {p.name for p in (installed / "llip_experiments").glob("*.yaml")}
    assert shipped == {p.name for p in (ROOT / "experiments").glob("*.yaml")} and "base.yaml" in shipped


# The same installed copy submitting a job to a real head: tests/test_jobs.py (one head for both
# submissions).
