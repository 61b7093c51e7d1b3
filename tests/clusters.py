"""Real Ray clusters and servers for tests, started as processes of their own and stopped by PID.

`RayCluster`: a head (`ray start --head`) and worker nodes (`ray start --address=HEAD`), each its own
raylet, object store and agents on this machine, with its own resources. A node is stopped, or
"lost", by killing its raylet and every process of that node by PID, never by name: `ray stop`
would kill every Ray process on the machine, other tests' and other users' included.
`MlflowServer`: `mlflow server` on 127.0.0.1 (one worker, no job execution: starts in seconds).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the process table ------------------------------------------------------------------------------
def proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) from /proc (Linux, like the clusters we start)."""
    table = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int(next(line.split()[1] for line in (d / "status").read_text().splitlines()
                            if line.startswith("PPid:")))
        except (OSError, StopIteration, ValueError):
            continue
        table[int(d.name)] = (ppid, cmd)
    return table


def with_descendants(pids: set[int], table: Optional[dict] = None) -> set[int]:
    table = table if table is not None else proc_table()
    found = set(pids)
    grew = True
    while grew:
        kids = {pid for pid, (ppid, _) in table.items() if ppid in found} - found
        found |= kids
        grew = bool(kids)
    return found


def processes_of(marker: str) -> set[int]:
    """PIDs of processes naming `marker` on their command line (a cluster's temp dir, a node id) and
    all their descendants (workers)."""
    table = proc_table()
    found = with_descendants({pid for pid, (_, cmd) in table.items() if marker in cmd}, table)
    found.discard(os.getpid())
    return found


def _state(pid: int) -> str:
    try:
        return next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if line.startswith("State:")).lower()
    except (OSError, StopIteration):
        return "zombie"


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid)


def kill_pids(pids: set[int], graceful_s: float = 15.0) -> None:
    """SIGTERM (or straight SIGKILL with graceful_s=0), then SIGKILL what is left."""
    steps = ((signal.SIGTERM, graceful_s), (signal.SIGKILL, 10.0)) if graceful_s else ((signal.SIGKILL, 10.0),)
    for sig, wait in steps:
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while time.time() < deadline and (pids := {p for p in pids if alive(p)}):
            time.sleep(0.2)
        if not pids:
            return


def stop_cluster(temp_dir: str) -> None:
    kill_pids(processes_of(temp_dir))


# -- Ray ---------------------------------------------------------------------------------------------
@dataclass
class Node:
    name: str
    node_id: str
    pids: set[int] = field(default_factory=set)  # what `ray start` left running for this node

    def processes(self) -> set[int]:
        """The node's processes now: those it started with and their descendants (Ray workers are
        the raylet's children), and anything naming its node id (agents)."""
        table = proc_table()
        named = {pid for pid, (_, cmd) in table.items() if self.node_id in cmd}
        return with_descendants({p for p in self.pids if p in table} | named, table) - {os.getpid()}


class RayCluster:
    """Ray nodes started with `ray start` in a temp dir of our own, with an environment of our own."""

    def __init__(self, env: dict[str, str]):
        self.temp_dir = tempfile.mkdtemp(prefix="rmn", dir="/tmp")  # short: socket paths have a length limit
        self.env = {k: v for k, v in env.items() if k not in ("RAY_ADDRESS", "VIRTUAL_ENV")}
        self.env.setdefault("RAY_AUTH_MODE", "disabled")
        self.port = free_port()
        self.dashboard_port: Optional[int] = None
        self.nodes: dict[str, Node] = {}

    @property
    def address(self) -> str:
        """The GCS address, on this machine's own IP (what Ray gives every node here)."""
        from ray._private.services import get_node_ip_address

        return f"{get_node_ip_address()}:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, name: str, args: list[str], extra_env: Optional[dict] = None) -> Node:
        before = set(proc_table())
        env = {**self.env, **(extra_env or {})}
        r = subprocess.run([str(VENV_BIN / "ray"), "start", *args, "--disable-usage-stats"], env=env,
                           capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, f"ray start {name}: " + r.stdout[-2000:] + r.stderr[-2000:]
        table = proc_table()
        mine = {pid for pid in set(table) - before if self.temp_dir in table[pid][1]}
        node_id = next((cmd.split("--node_id=", 1)[1].split()[0] for pid, (_, cmd) in table.items()
                        if pid in mine and "--node_id=" in cmd), "")
        assert node_id, f"ray start {name}: no raylet found"
        node = Node(name, node_id, mine)
        self.nodes[name] = node
        return node

    def start_head(self, num_cpus: float, resources: Optional[dict] = None, dashboard: bool = False,
                   extra_args: tuple = (), extra_env: Optional[dict] = None) -> Node:
        args = ["--head", "--port", str(self.port), "--temp-dir", self.temp_dir, "--num-cpus", f"{num_cpus:g}",
                "--num-gpus", "0", "--ray-client-server-port", str(free_port()),
                "--dashboard-agent-listen-port", str(free_port())]
        if dashboard:
            self.dashboard_port = free_port()
            args += ["--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                     "--dashboard-port", str(self.dashboard_port)]
        else:
            args += ["--include-dashboard", "false"]
        if resources:
            args += ["--resources", json.dumps(resources)]
        return self._start("head", args + list(extra_args), extra_env)

    def add_node(self, name: str, num_cpus: float, resources: dict, extra_env: Optional[dict] = None) -> Node:
        args = ["--address", self.address, "--num-cpus", f"{num_cpus:g}", "--num-gpus", "0",
                "--resources", json.dumps(resources),
                "--dashboard-agent-listen-port", str(free_port())]
        return self._start(name, args, extra_env)

    def kill_node(self, name: str) -> set[int]:
        """A lost node: its raylet and every process of the node SIGKILLed at once, by PID."""
        node = self.nodes.pop(name)
        pids = node.processes()
        kill_pids(pids, graceful_s=0)
        return pids

    def stop(self) -> None:
        stop_cluster(self.temp_dir)
        leftover = processes_of(self.temp_dir)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        assert not leftover, f"cluster processes survived: {sorted(leftover)}"


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


# -- MLflow ------------------------------------------------------------------------------------------
class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a sqlite backend and proxied artifacts under `root`."""

    def __init__(self, root: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        self.log = open(root / "mlflow-server.log", "w")
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
            cwd=root, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for(self._up, 120, f"mlflow server on {self.url}")
        except AssertionError:
            self.stop()
            raise

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {self.proc.returncode}")
        try:
            return urllib.request.urlopen(self.url + "/health", timeout=2).status == 200
        except OSError:
            return False

    def stop(self) -> None:
        kill_pids(with_descendants({self.proc.pid}))
        self.proc.wait(timeout=10)
        self.log.close()
