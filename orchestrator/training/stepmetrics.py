"""Where a training step's time goes: waiting on the next batch from Ray Data, or computing.

The loop marks two instants per step: when the batch arrived (`batch_ready`) and when the optimiser
step finished (`step_done`, after the loss is read back, which waits for the device). Data-wait is
the time from the previous mark to the batch's arrival; compute is the rest. Time spent reporting,
evaluating and checkpointing falls outside both (`restart` after them), so samples/s and MFU
describe training steps; the ETA uses the window's wall time, those pauses included.

MFU (model FLOPs utilisation) = llip_core.flops.train_step_flops(global batch) x steps
/ (data-wait + compute) / (peak FLOP/s per device x devices); data-wait counts against it.
"""
from __future__ import annotations

import time
from typing import Callable, Optional, Union


class StepClock:
    def __init__(self, now: Callable[[], float] = time.perf_counter):
        self.now = now
        self.wait = self.compute = 0.0
        self.steps = self.samples = 0
        self.mark = self.window_start = now()

    def batch_ready(self) -> None:
        t = self.now()
        self.wait += t - self.mark
        self.mark = t

    def step_done(self, samples: int) -> None:
        """`samples`: the global batch (all ranks)."""
        t = self.now()
        self.compute += t - self.mark
        self.mark = t
        self.steps += 1
        self.samples += samples

    def window(self) -> tuple[float, float, float]:
        """(data-wait, compute, wall) seconds of this window: wall runs from the previous window's
        end (when it was read) to now, so the last report's and evaluation's time is in it."""
        self.read_at = self.now()
        return self.wait, self.compute, self.read_at - self.window_start

    def restart(self) -> None:
        """Start a new window after a report: the report, eval and checkpoint since the last step
        are neither data-wait nor compute, but the next window's wall (for the ETA) includes them."""
        self.wait = self.compute = 0.0
        self.steps = self.samples = 0
        self.window_start = getattr(self, "read_at", self.window_start)
        self.mark = self.now()


def step_metrics(steps: int, samples: int, wait: float, compute: float,
                 flops_per_step: Optional[float] = None, peak_flops: Optional[float] = None,
                 devices: int = 1) -> dict[str, float]:
    """The train/ metrics of one logging window (wait, compute: seconds summed over its steps)."""
    busy = wait + compute
    out = {
        "train/samples_per_s": samples / busy if busy > 0 else 0.0,
        "train/step_time_s": busy / steps,
        "train/data_wait_s": wait / steps,
        "train/compute_s": compute / steps,
        "train/data_wait_share": wait / busy if busy > 0 else 0.0,
    }
    if flops_per_step and peak_flops and busy > 0:
        out["train/mfu"] = flops_per_step * steps / busy / (peak_flops * devices)
    return out


def resolve_peak_flops(value: Union[None, float, str], device_type: str, device_name: Optional[str],
                       warn: Callable[[str], None]) -> Optional[float]:
    """train.peak_flops -> FLOP/s per device, or None (MFU not logged).

    None: not logged. A number: that. "auto": llip_core.flops's table for the CUDA device's name; on
    a CPU, or a GPU the table lacks, one warning line and no MFU."""
    if value is None:
        return None
    if value != "auto":
        return float(value)
    from llip_core.flops import peak_flops_for

    peak = peak_flops_for(device_name) if device_type == "cuda" and device_name else None
    if peak is None:
        where = f"GPU {device_name!r}" if device_type == "cuda" else f"a {device_type} device"
        warn(f"[llip] train.peak_flops: auto has no peak for {where}; MFU is not logged (set train.peak_flops "
             "to the device's FLOP/s, e.g. 989e12)")
    return peak


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def progress_line(step: int, total: int, loss: float, lr: float, metrics: dict[str, float],
                  wall_per_step: float) -> str:
    """The console's progress line: step, loss, samples/s, data-wait share, MFU when known, ETA."""
    line = (f"[llip] step {step}/{total} loss {loss:.4f} lr {lr:.2e} "
            f"{metrics['train/samples_per_s']:.0f} samples/s data-wait {metrics['train/data_wait_share']:.0%}")
    if "train/mfu" in metrics:
        line += f" MFU {metrics['train/mfu']:.1%}"
    return line + f" ETA {_duration(max(0, total - step) * wall_per_step)}"
