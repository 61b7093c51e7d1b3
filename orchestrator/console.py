"""What the driver's console shows of Ray's worker output, and `say`, the print that Ray Train does
not double.

Ray forwards every worker's stdout/stderr to the driver. Most of it at INFO is Ray Train repeating
each report's metrics dict and Ray Data's per-execution banners, which bury llip's own progress
lines. The filter sits on the driver's side only: Ray's session folder (logs/worker-*.out,
ray-data.log) keeps every line, and `--verbose` (or LLIP_VERBOSE=1) shows them all again.
Warnings and errors always pass.
"""
from __future__ import annotations

import os
import re
import sys

# Informational lines from Ray that repeat per report or per dataset execution.
_NOISE = re.compile(
    r"Reporting training result \d+: TrainingReport\("
    r"|Starting execution of Dataset "
    r"|Execution plan of Dataset "
    r"|Dataset .* execution finished in "
    r"|\[dataset\]: A new progress UI is available"
    r"|tqdm is not installed\. Progress bars will be disabled"
    r"|^\s*$"
    # Ray Train's own default ingest options pass a Ray Data option Ray has deprecated; nothing a
    # user can act on (printed with the source line that triggered it).
    r"|RayDeprecationWarning: `ExecutionOptions\.exclude_resources` is deprecated"
    r"|^\s*self\.exclude_resources = exclude_resources\s*$"
    # Ray Train's controller logs this at error level for its own PreemptionWatcher actor on every
    # run (ray-project/ray#53727); nothing failed and nothing is for the user to do.
    r"|Actor with class name: 'PreemptionWatcher' and ID: '[0-9a-f]+' has constructor arguments in the object store"
)


def natural_key(key: str) -> list:
    """Sort key that puts top1_tau3 before top1_tau10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def verbose() -> bool:
    return os.environ.get("LLIP_VERBOSE", "") not in ("", "0")


def is_noise(line: str) -> bool:
    return bool(_NOISE.search(line))


def filter_batch(data: dict) -> dict | None:
    """The log batch without Ray's informational lines; None when nothing is left."""
    lines = [ln for ln in data.get("lines", []) if not is_noise(ln)]
    if not lines:
        return None
    return {**data, "lines": lines}


def quiet_worker_logs() -> bool:
    """Wrap the driver's handler that prints worker output; True if it was found and wrapped.

    Relies on Ray 2.60's `global_worker_stdstream_dispatcher` (Ray is pinned to 2.60.x); when the
    handler is missing the console is simply left as Ray prints it."""
    if verbose():
        return False
    import logging

    # Driver-side: Ray Data notes once that tqdm is absent; llip prints its own progress lines.
    logging.getLogger("ray.experimental.tqdm_ray").setLevel(logging.ERROR)
    # Datasets executed in this process (`llip curate`) log their banners and progress at INFO to
    # the console handler Ray Data installs when imported; its file handler (ray-data.log in the
    # session folder) keeps everything.
    import ray.data  # noqa: F401  (configures Ray Data's loggers once, so the change below sticks)

    for h in logging.getLogger("ray.data").handlers:
        if h.name == "console":
            h.setLevel(logging.WARNING)
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as disp
    except ImportError:
        return False
    with disp._lock:
        for i, (name, handler) in enumerate(disp.handlers):
            if name == "ray_print_logs" and not getattr(handler, "_llip_quiet", False):
                def quiet(data, _inner=handler):
                    kept = filter_batch(data)
                    if kept is not None:
                        _inner(kept)

                quiet._llip_quiet = True
                disp.handlers[i] = (name, quiet)
                return True
    return False


def say(msg: str) -> None:
    """Print once: Ray Train patches print() to tee into its logger, which doubles every line."""
    print(msg, file=sys.__stdout__, flush=True)
