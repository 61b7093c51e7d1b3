"""Where a run's workers can land and what that asks of storage, and the sweep's lease: the parts
that need no cluster (the multi-node behaviour itself: tests/test_multinode.py)."""
import os
import socket
import subprocess
import sys
import time

import pyarrow.fs as pafs
import pytest

from orchestrator.errors import UserError


def test_placement_decision_without_a_cluster():
    """Which clusters make the workers spread over nodes (pure: node lists as Ray reports them)."""
    from orchestrator.storage.reach import spreads

    head = {"id": "h", "resources": {"CPU": 8.0}}
    gpu = {"id": "g", "resources": {"CPU": 4.0, "GPU": 1.0}}
    cpu_req, gpu_req = {"CPU": 0.5}, {"CPU": 1.0, "GPU": 1.0}
    assert not spreads([head], "h", cpu_req, 2)  # one node that holds them all: local paths are fine
    assert spreads([head, {"id": "w", "resources": {"CPU": 2.0}}], "h", cpu_req, 2)  # another node can hold one
    assert spreads([head], "h", gpu_req, 1)  # a GPU head-less cluster: the autoscaler adds GPU nodes
    assert spreads([head, gpu], "h", gpu_req, 1)
    assert not spreads([head], "h", {"CPU": 4.0}, 4, can_grow=False)  # a local cluster that cannot grow
    assert spreads([head], "h", {"CPU": 4.0}, 4, can_grow=True)


def test_local_paths_named_in_the_order_a_user_fixes_them(tmp_path):
    from orchestrator.config.schema import load_config
    from orchestrator.storage.reach import check_shared_storage, local_paths

    from conftest import ROOT

    cfg = load_config(ROOT / "experiments" / "smoke.yaml").with_overrides({
        "storage_path": "runs", "data.train": "s3://b/train", "data.eval": "data/eval",
        "eval.sets": ["s3://b/fm", str(tmp_path / "set")]})
    assert [k for k, _ in local_paths(cfg, "sqlite:///x.db")] == ["storage_path", "data.eval", "eval.sets[1]",
                                                                  "mlflow.tracking_uri"]
    check_shared_storage(cfg, "sqlite:///x.db", spread=False)  # every worker on the driver's node
    with pytest.raises(UserError) as e:
        check_shared_storage(cfg, "sqlite:///x.db", spread=True)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("storage_path: runs is a local path (and data.eval, eval.sets[1], "
                                              "mlflow.tracking_uri)") and "storage_shared: true" in msg
    check_shared_storage(cfg.with_overrides({"storage_shared": True}), "sqlite:///x.db", spread=True)


def test_placement_budget_adds_up_to_the_timeout():
    from orchestrator.training.driver import placement_budget

    assert placement_budget(None) == (None, -1)  # wait forever: Ray Train's own default
    assert placement_budget(5) == (5.0, 0)  # one try of 5 s
    assert placement_budget(60) == (60.0, 0)
    assert placement_budget(61) == (60.0, 1)
    assert placement_budget(900) == (60.0, 14)


def test_scaling_rejects_cpu_and_gpu_among_the_custom_resources():
    from orchestrator.config.schema import parse_config

    with pytest.raises(Exception, match="scaling.resources_per_worker.*GPU: set it with"):
        parse_config({"name": "x", "scaling": {"resources_per_worker": {"GPU": 1}}})
    cfg = parse_config({"name": "x", "scaling": {"resources_per_worker": {"fake_gpu": 1}, "num_workers": 2}})
    from orchestrator.storage.reach import worker_request
    from orchestrator.sweeps.tune import derive_max_concurrent

    assert worker_request(cfg) == {"CPU": 0.5, "fake_gpu": 1}
    # a custom accelerator binds like a GPU: none up yet means no cap (the autoscaler adds nodes)
    assert derive_max_concurrent(cfg, {"CPU": 64.0}) is None
    assert derive_max_concurrent(cfg, {"CPU": 64.0, "fake_gpu": 5.0}) == 2


# -- the sweep's lease -----------------------------------------------------------------------------
def _lease(tmp_path, sweep="s-1"):
    from orchestrator.sweeps.lease import Lease

    return Lease(pafs.LocalFileSystem(), str(tmp_path / sweep), sweep)


def _write(tmp_path, record, sweep="s-1"):
    import json

    (tmp_path / sweep).mkdir(exist_ok=True)
    (tmp_path / sweep / "llip-lease.json").write_text(json.dumps(record))


def test_a_living_driver_keeps_its_lease_and_is_named(tmp_path):
    first = _lease(tmp_path)
    assert first.acquire() is None
    try:
        with pytest.raises(UserError) as e:
            _lease(tmp_path).acquire()
        msg = str(e.value)
        assert "\n" not in msg and "sweep s-1 is being run by another driver" in msg
        assert f"host {socket.gethostname()}, pid {os.getpid()}, since {first.record['since']}" in msg
    finally:
        first.release()
    assert not (tmp_path / "s-1" / "llip-lease.json").exists()
    second = _lease(tmp_path)
    assert second.acquire() is None  # released: free to take
    second.release()


def test_the_lease_of_a_dead_driver_is_taken_over(tmp_path):
    from orchestrator.sweeps.lease import _proc_start

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    start = _proc_start(p.pid)
    p.wait()
    _write(tmp_path, {"host": socket.gethostname(), "pid": p.pid, "pid_start": start, "since": "then",
                      "heartbeat": time.time(), "token": "old"})
    lease = _lease(tmp_path)
    dead = lease.acquire()  # same host, its pid is gone: dead, whatever its heartbeat says
    lease.release()
    assert dead and dead["pid"] == p.pid
    # a pid now used by another process (started at another time) is not the holder either
    _write(tmp_path, {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": "1", "since": "then",
                      "heartbeat": time.time(), "token": "old"})
    lease = _lease(tmp_path)
    assert lease.acquire()["pid_start"] == "1"
    lease.release()


def test_another_hosts_driver_is_judged_by_its_heartbeat(tmp_path):
    from orchestrator.sweeps.lease import STALE_S

    _write(tmp_path, {"host": "elsewhere", "pid": 1, "since": "then", "heartbeat": time.time(), "token": "x"})
    with pytest.raises(UserError, match="host elsewhere, pid 1"):
        _lease(tmp_path).acquire()
    _write(tmp_path, {"host": "elsewhere", "pid": 1, "since": "then", "heartbeat": time.time() - STALE_S - 1,
                      "token": "x"})
    lease = _lease(tmp_path)
    assert lease.acquire()["host"] == "elsewhere"
    lease.release()
