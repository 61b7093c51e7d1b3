"""A training stream's Ray Data executor, paced so that it does not spin beside the trainer.

Ray Data's streaming executor runs its scheduling loop in a thread of the process that iterates the
dataset: here the training worker. The loop blocks in `ray.wait(..., timeout=0.1)` only while some
task's output is not ready yet; once every running read task has a block ready that backpressure
keeps it from taking (the trainer has not caught up), or when no task runs at all, each step returns
at once and the loop spins, holding the GIL and a core against the training step it feeds. That is
the common case for a stream whose blocks come quickly (as the sweep's shared decode's read tasks
did, before its reads moved into the trainer's own thread: shared_decode.cache_batches) and for any
stream the trainer consumes more slowly than it is produced.

Measured here (dev Xeon, 2026-12-05): a Ray Data stream of quick read tasks under an object-store
limit, consumed at 0.05 s per batch, cost its consumer process 2.9 s of CPU in 4.3 s of wall; with
a 10 ms pause per loop step, 0.7-0.8 s for the same wall and the same rows. In a scenes sweep's
trainer, py-spy put the loop's thread on the CPU in as many samples as the training thread.

`paced(ds)` adds an execution callback that sleeps PACE_S after every loop step. A step dispatches
every task it can, so the pause delays noticing a finished task by at most PACE_S (against training
steps of tenths of a second or more) and changes neither the rows nor their order.
"""
from __future__ import annotations

import time

from ray.data._internal.execution.execution_callback import ExecutionCallback

PACE_S = 0.01


class Paced(ExecutionCallback):
    """Sleeps PACE_S after each step of the streaming executor's scheduling loop."""

    steps = 0  # paced steps in this process (tests read it)

    def on_execution_step(self, executor) -> None:
        Paced.steps += 1
        time.sleep(PACE_S)


def paced(ds):
    """`ds`, whose executions pause PACE_S per scheduling step (its own DataContext only)."""
    ctx = ds.context
    if Paced not in ctx.custom_execution_callback_classes:
        ctx.custom_execution_callback_classes = [*ctx.custom_execution_callback_classes, Paced]
    return ds
