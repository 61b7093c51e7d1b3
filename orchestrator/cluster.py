"""Connecting to Ray: the cluster in $RAY_ADDRESS, one already started on this machine, or a new
local one. Every stage that runs on Ray (training, sweeps, curation) starts it through here."""
from __future__ import annotations

import os


def init_ray() -> None:
    """Connect to $RAY_ADDRESS or a cluster started on this machine, else start a local one."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=True, configure_logging=False)
        from orchestrator.console import quiet_worker_logs

        quiet_worker_logs()
