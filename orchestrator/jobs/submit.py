"""`llip submit FILE.yaml --address http://HEAD:8265`: run an experiment or sweep on a remote Ray
cluster as a Ray job.

Ray's convention: the user's folder travels as the job's working_dir (`--working-dir`, default the
current folder: a research repository with its own experiments/, without data, venvs, results or
.git), and the library travels beside it: this client's own `llip_core` and `orchestrator` go as
`py_modules`, so the cluster runs exactly the client's version whether llip-orch is installed there
or not. The job runs the script in `orchestrator/jobs/job_entry.sh` (inlined into the entrypoint, since
the package is not a folder of the working_dir), which finds the Python that runs the cluster's Ray
workers instead of trusting the head's bare `python`. The experiment is validated here first so a
typo fails in one line on the laptop, not minutes later on the cluster.
"""
from __future__ import annotations

import fnmatch
import os
import shlex
import sys
import time
import uuid
from pathlib import Path
from typing import Optional

from orchestrator.config.schema import ExperimentConfig, load_config
from orchestrator.errors import UserError

ENTRY_SCRIPT = Path(__file__).resolve().parent / "job_entry.sh"
# Never uploaded: big, local-only, or results (gitignore syntax, relative to the working_dir).
EXCLUDES = [".venv/", "venv/", "data/", "runs/", "ray_results/", "mlruns/", "mlflow.db", ".git/", "**/__pycache__/",
            "*.egg-info/", ".pytest_cache/", "build/", ".cache/", ".config/", ".mypy_cache/", ".ruff_cache/"]
MODULE_EXCLUDES = ["**/__pycache__/"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def add_args(p) -> None:
    p.add_argument("file", metavar="FILE.yaml", help="experiment file inside the working dir")
    p.add_argument("--working-dir", default=".",
                   help="folder uploaded as the job's working_dir (default: the current folder); the experiment "
                        "file and its base: files must be inside it")
    p.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS"),
                   help="the cluster's job API, e.g. http://127.0.0.1:8265 after `ray dashboard cluster.yaml` "
                        "(default: $RAY_API_SERVER_ADDRESS)")
    p.add_argument("--sweep", action="store_true", help="run the file's sweep: section (llip sweep) instead of one run")
    p.add_argument("--wait", action="store_true", help="stream the job's logs and exit with its final status")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value by dotted path (repeatable), passed on to the job")
    p.add_argument("--run-name", default=None, help="run name (an existing one resumes that run)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI for the job (default: $MLFLOW_TRACKING_URI when it names a server, "
                        "else sqlite:///~/llip/mlflow.db on the head)")
    p.add_argument("--storage-path", default=None,
                   help="checkpoint storage for the job when the experiment's storage_path is a relative local "
                        "path (default: ~/llip/runs on the head); use s3://... on multi-node clusters")
    p.add_argument("--python", default=None,
                   help="interpreter on the head to run with (default: the one running the cluster's Ray workers)")
    p.add_argument("--submission-id", default=None, help="job id to use (default: llip-NAME-RANDOM)")
    p.add_argument("--in-place", action="store_true",
                   help="the working dir and this llip-orch lie at the same paths on every node (a shared "
                        "filesystem): run them where they are (Ray's local:// working_dir and py_modules) "
                        "instead of uploading copies")


def normalize_address(address: Optional[str]) -> str:
    if not address:
        raise UserError("no cluster address: pass --address http://HEAD:8265 (or set RAY_API_SERVER_ADDRESS)")
    if address.startswith("ray://"):
        raise UserError(f"--address {address}: llip submit talks to the job API, e.g. http://HEAD:8265, not ray://")
    if "://" not in address:
        address = "http://" + address
    return address.rstrip("/")


def _relative(path: str, working_dir: Path) -> str:
    p = Path(path).resolve()
    try:
        return p.relative_to(working_dir).as_posix()
    except ValueError:
        raise UserError(f"{path}: the experiment file must be inside the working dir ({working_dir}), which is what "
                        "gets uploaded with the job; cd to your project or pass --working-dir") from None


def _excluded(rel: str, is_dir: bool, patterns: list[str]) -> bool:
    """The subset of gitignore matching our exclude lists use (names, globs, `**/` prefixes)."""
    name = rel.rsplit("/", 1)[-1]
    for pat in patterns:
        if pat.endswith("/") and not is_dir:
            continue
        pat = pat.rstrip("/")
        if pat.startswith("**/"):
            if fnmatch.fnmatch(name, pat[3:]):
                return True
        elif "/" not in rel and fnmatch.fnmatch(name, pat):  # top-level entries, as in .gitignore
            return True
        elif fnmatch.fnmatch(rel, pat):
            return True
    return False


def upload_size(root: Path, patterns: list[str]) -> tuple[int, int]:
    """(files, bytes) that an upload of root with these excludes carries."""
    files = size = 0
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        rel = (lambda n: n) if rel_dir == "." else (lambda n: f"{rel_dir}/{n}")
        dirnames[:] = [d for d in dirnames if not _excluded(rel(d), True, patterns)]
        for f in filenames:
            if not _excluded(rel(f), False, patterns):
                files += 1
                size += os.path.getsize(os.path.join(dirpath, f))
    return files, size


def library_modules() -> list[str]:
    """The folders of the llip_core and orchestrator packages this client imports."""
    import llip_core
    import orchestrator

    return [str(Path(m.__file__).resolve().parent) for m in (llip_core, orchestrator)]


def _fmt_bytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.0f} kB"


def _check_paths(cfg: ExperimentConfig) -> None:
    """Relative local data paths cannot work in a job: data/ is not uploaded."""
    for key in ("train", "eval"):
        v = getattr(cfg.data, key)
        if v and "://" not in v and not os.path.isabs(v):
            raise UserError(
                f"data.{key} {v!r} is a relative local path and data/ is not uploaded with the job; put the shards "
                f"on S3 (llip shards ... --out s3://BUCKET/PREFIX) or pass a path that exists on the cluster: "
                f"--set data.{key}=/abs/path")


def build_submission(args) -> dict:
    """Everything submit_job needs; pure, so tests and --help users can see what would be sent."""
    from orchestrator.config.schema import parse_overrides

    working_dir = Path(getattr(args, "working_dir", None) or ".").resolve()
    if not working_dir.is_dir():
        raise UserError(f"--working-dir {working_dir} is not a folder")
    rel = _relative(args.file, working_dir)
    cfg = load_config(args.file)
    overrides = parse_overrides(args.overrides)
    if overrides:
        cfg = cfg.with_overrides(overrides)
    if args.sweep and cfg.sweep is None:
        raise UserError(f"{args.file}: --sweep given but the file has no sweep: section")
    _check_paths(cfg)

    command = "sweep" if args.sweep else "run"
    argv = [command, rel]
    for item in args.overrides:
        argv += ["--set", item]
    if args.run_name:
        argv += ["--run-name", args.run_name]
    # `sh -c SCRIPT NAME ARGS...`: the entry script travels inside the entrypoint itself.
    entry = "sh -c " + shlex.quote(ENTRY_SCRIPT.read_text()) + " llip-job " + " ".join(shlex.quote(a) for a in argv)
    if "://" not in cfg.storage_path and not os.path.isabs(cfg.storage_path) and "storage_path" not in overrides:
        # Single-quoted for Python, double-quoted for the head's shell so $HOME expands there.
        entry += ' --set "storage_path=' + (args.storage_path or "$HOME/llip/runs") + '"'

    env = {"PYTHONUNBUFFERED": "1"}
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri and (args.tracking_uri or uri.split("://")[0] in ("http", "https", "databricks")):
        env["MLFLOW_TRACKING_URI"] = uri  # a local sqlite path means nothing on a remote head
    if args.python:
        env["LLIP_PYTHON"] = args.python
    from orchestrator.tracking import store as tracking

    commit = tracking.git_commit()
    if commit != "unknown":
        env["LLIP_GIT_COMMIT"] = commit  # .git is not uploaded; keep the run's commit tag honest
    if getattr(args, "in_place", False):  # nothing uploaded: every node reads the same folders
        runtime_env = {"working_dir": f"local://{working_dir}", "py_modules": [f"local://{m}" for m in library_modules()],
                       "env_vars": env}
    else:
        runtime_env = {"working_dir": str(working_dir), "excludes": EXCLUDES, "py_modules": library_modules(),
                       "env_vars": env}
    return {
        "entrypoint": entry,
        "runtime_env": runtime_env,
        "submission_id": args.submission_id or f"llip-{cfg.name}-{uuid.uuid4().hex[:8]}",
        "metadata": {"llip.experiment": cfg.name, "llip.command": command, "llip.file": rel},
    }


def _unreachable(address: str, reason: str) -> UserError:
    return UserError(f"cannot reach the Ray job API at {address} ({reason.rstrip('.')}); is the cluster up "
                     "(`ray up cluster.yaml`) and its dashboard port forwarded (`ray dashboard cluster.yaml`)?")


def connect(address: str, timeout_s: float = 10.0):
    import socket
    from urllib.parse import urlsplit

    from ray.job_submission import JobSubmissionClient

    # requests has no connect timeout here: probe first so a dead host fails in seconds, not minutes.
    u = urlsplit(address)
    try:
        socket.create_connection((u.hostname, u.port or (443 if u.scheme == "https" else 80)), timeout=timeout_s).close()
    except OSError as e:
        raise _unreachable(address, e.strerror or type(e).__name__) from None
    try:
        return JobSubmissionClient(address)
    except Exception as e:  # ConnectionError, auth errors, a non-Ray server: one line each
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _unreachable(address, reason) from None


def cli(args) -> int:
    address = normalize_address(args.address)
    sub = build_submission(args)
    env = sub["runtime_env"]
    if env["working_dir"].startswith("local://"):
        print(f"running in place on the cluster (nothing uploaded): {env['working_dir']} and "
              f"{', '.join(env['py_modules'])} must exist at those paths on every node")
        wd_bytes = 0
    else:
        wd_files, wd_bytes = upload_size(Path(env["working_dir"]), EXCLUDES)
        lib = [upload_size(Path(m), MODULE_EXCLUDES) for m in env["py_modules"]]
        print(f"uploading {env['working_dir']} ({wd_files} files, {_fmt_bytes(wd_bytes)}; not {', '.join(EXCLUDES[:4])}...) "
              f"and this client's llip_core + orchestrator ({sum(f for f, _ in lib)} files, "
              f"{_fmt_bytes(sum(b for _, b in lib))})")
    if wd_bytes > 100e6:
        print(f"[llip] warning: the working dir upload is {_fmt_bytes(wd_bytes)}; Ray refuses packages over 512 MB. "
              "Keep shards and results out of it (data/ and runs/ are excluded) or use --working-dir")
    client = connect(address)
    job_id = client.submit_job(**sub)
    print(f"submitted job {job_id} to {address}")
    print(f"  runs:       llip {sub['entrypoint'].split(' llip-job ', 1)[1]}  (with the cluster's worker Python)")
    print(f"  follow:     ray job logs {job_id} --address {address} --follow")
    print(f"  status:     ray job status {job_id} --address {address}")
    print(f"  stop:       ray job stop {job_id} --address {address}")
    print(f"  dashboard:  {address}/#/jobs/{job_id}")
    sys.stdout.flush()
    if not args.wait:
        return 0
    try:
        status = follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running (ray job stop {job_id} --address {address})")
        return 130
    info = client.get_job_info(job_id)
    msg = f"job {job_id} {status}"
    if status != "SUCCEEDED" and info.message:
        msg += f": {info.message.strip().splitlines()[-1]}"
    print(msg)
    return 0 if status == "SUCCEEDED" else 1


def follow(client, job_id: str) -> str:
    """Stream the job's logs to stdout until it ends; returns the final status."""
    import asyncio

    async def tail():
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        asyncio.run(tail())
    except RuntimeError as e:  # the log socket can close early (head restart); the status still tells
        print(f"[llip] log stream ended: {e}", file=sys.stderr)
    while True:  # the stream closes when the job ends; the status may lag a moment behind it
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL:
            return status
        time.sleep(1)
