"""One driver per sweep: a lease file in the sweep's Tune folder (storage_path/SWEEP/llip-lease.json,
local or s3://) names the driver that holds it (host, pid, the process's start time, since when)
and its last heartbeat, renewed every HEARTBEAT_S by a daemon thread while the sweep runs.

A second driver for the same sweep (`llip sweep --resume`, or `llip submit --sweep --run-name` of
a running sweep) is refused in one line naming the holder. A holder that died leaves its lease
behind and loses it: on the same host a lease whose pid is gone, or now belongs to a process
started at another time (pid reuse), is dead; from another host, one whose heartbeat is older
than STALE_S is. Storage has no compare-and-swap here, so two drivers starting in the same instant
can both write; each reads the file back after writing and only the one whose token is there
goes on.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Optional

from orchestrator.errors import UserError

LEASE_FILE = "llip-lease.json"
HEARTBEAT_S = 15.0
STALE_S = 90.0  # six missed heartbeats: the holder's host or process is gone


def _proc_start(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), or None when
    there is no such process (or no /proc)."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def holder_alive(lease: dict, now: Optional[float] = None, host: Optional[str] = None) -> bool:
    """Whether the lease's driver still runs: asked of the process table on its own host, of the
    heartbeat's age from anywhere else."""
    now = time.time() if now is None else now
    if lease.get("host") == (host or socket.gethostname()):
        start = _proc_start(int(lease.get("pid", -1)))
        return start is not None and start == lease.get("pid_start")
    return now - float(lease.get("heartbeat", 0)) < STALE_S


class Lease:
    """The lease of one sweep, taken with `acquire` and given back with `release`."""

    def __init__(self, fs, folder: str, sweep: str):
        self.fs, self.path, self.sweep = fs, f"{folder.rstrip('/')}/{LEASE_FILE}", sweep
        self.token = uuid.uuid4().hex
        self.record = {"sweep": sweep, "host": socket.gethostname(), "pid": os.getpid(),
                       "pid_start": _proc_start(os.getpid()), "token": self.token,
                       "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # -- storage ---------------------------------------------------------------------------------
    def _read(self) -> Optional[dict]:
        import pyarrow.fs as pafs

        if self.fs.get_file_info(self.path).type != pafs.FileType.File:
            return None
        try:
            with self.fs.open_input_stream(self.path) as f:
                return json.loads(f.read())
        except (OSError, ValueError):
            return None  # cut short by a dying writer: nobody holds it

    def _write(self) -> None:
        self.fs.create_dir(self.path.rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(self.path) as f:
            f.write(json.dumps({**self.record, "heartbeat": time.time()}).encode())

    # -- the protocol ----------------------------------------------------------------------------
    def acquire(self) -> Optional[dict]:
        """Take the lease; returns the dead holder's record when it was taken over, else None.
        Raises UserError naming the holder when it lives."""
        held = self._read()
        if held and held.get("token") != self.token and holder_alive(held):
            raise UserError(f"sweep {self.sweep} is being run by another driver (host {held.get('host')}, "
                            f"pid {held.get('pid')}, since {held.get('since')}; lease {self.path}); wait for it "
                            "to end or stop it first, then resume")
        self._write()
        again = self._read()
        if not again or again.get("token") != self.token:  # another driver wrote in between
            raise UserError(f"sweep {self.sweep}: another driver took its lease at the same moment "
                            f"(host {(again or {}).get('host')}, pid {(again or {}).get('pid')}); run one of them")
        self._thread = threading.Thread(target=self._beat, name="llip-sweep-lease", daemon=True)
        self._thread.start()
        return held if held and held.get("token") != self.token else None

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._write()
            except Exception:  # noqa: BLE001 - a missed beat is retried; STALE_S allows several
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            held = self._read()
            if held and held.get("token") == self.token:
                self.fs.delete_file(self.path)
        except Exception:  # noqa: BLE001 - a lease left behind is taken over later
            pass
