"""Per-step metrics of the training loop (orchestrator/training/stepmetrics.py): the data-wait/compute split,
samples/s, MFU against train.peak_flops, and the console's progress line."""
import time

import pytest

from llip_core.config import model_config
from llip_core.flops import train_step_flops
from orchestrator.config.schema import parse_config
from orchestrator.training.stepmetrics import StepClock, progress_line, resolve_peak_flops, step_metrics


class FakeTime:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_clock_splits_each_step_into_data_wait_and_compute():
    now = FakeTime()
    clock = StepClock(now)
    # step 1: 0.3 s blocked on the batch, 0.7 s computing; step 2: 0.1 s and 0.9 s
    for wait, compute in ((0.3, 0.7), (0.1, 0.9)):
        now.t += wait
        clock.batch_ready()
        now.t += compute
        clock.step_done(samples=64)
    wait, compute, wall = clock.window()
    assert (clock.steps, clock.samples) == (2, 128)
    assert wait == pytest.approx(0.4) and compute == pytest.approx(1.6) and wall == pytest.approx(2.0)

    # a report + evaluation of 5 s is neither data-wait nor compute of the next window, but its wall has it
    now.t += 5.0
    clock.restart()
    now.t += 0.2
    clock.batch_ready()
    now.t += 0.8
    clock.step_done(samples=64)
    wait, compute, wall = clock.window()
    assert wait == pytest.approx(0.2) and compute == pytest.approx(0.8)
    assert wall == pytest.approx(6.0)


def test_window_metrics_and_mfu_from_the_flop_count():
    cfg = model_config("tiny")
    f = train_step_flops(cfg, 256)
    m = step_metrics(steps=4, samples=4 * 256, wait=1.0, compute=3.0, flops_per_step=f, peak_flops=1e12, devices=2)
    assert m["train/samples_per_s"] == pytest.approx(256.0)  # 1024 samples in 4 s of steps
    assert m["train/step_time_s"] == pytest.approx(1.0)
    assert m["train/data_wait_s"] == pytest.approx(0.25) and m["train/compute_s"] == pytest.approx(0.75)
    assert m["train/data_wait_share"] == pytest.approx(0.25)
    # MFU: 4 steps of f FLOPs in 4 s over two devices of 1e12 FLOP/s each
    assert m["train/mfu"] == pytest.approx(4 * f / 4.0 / 2e12)
    assert "train/mfu" not in step_metrics(4, 1024, 1.0, 3.0, flops_per_step=f, peak_flops=None)


def test_peak_flops_number_auto_and_unknown():
    warned = []
    assert resolve_peak_flops(None, "cuda", "NVIDIA H100 80GB HBM3", warned.append) is None
    assert resolve_peak_flops(312e12, "cpu", None, warned.append) == 312e12
    assert resolve_peak_flops("auto", "cuda", "NVIDIA H100 80GB HBM3", warned.append) == 989e12
    assert resolve_peak_flops("auto", "cuda", "NVIDIA A100-SXM4-80GB", warned.append) == 312e12
    assert not warned
    assert resolve_peak_flops("auto", "cpu", None, warned.append) is None  # CPU: MFU not logged
    assert resolve_peak_flops("auto", "cuda", "NVIDIA GeForce GTX 1080", warned.append) is None
    assert len(warned) == 2 and all("train.peak_flops" in w and "\n" not in w for w in warned)
    assert "GTX 1080" in warned[1]


def test_peak_flops_in_the_yaml():
    assert parse_config({"name": "x", "train": {"peak_flops": "989e12"}}).train.peak_flops == 989e12  # YAML's 989e12 is a str
    assert parse_config({"name": "x", "train": {"peak_flops": "auto"}}).train.peak_flops == "auto"
    assert parse_config({"name": "x"}).train.peak_flops is None
    for bad in ("fast", 0, -5, True):
        with pytest.raises(Exception) as e:
            parse_config({"name": "x", "train": {"peak_flops": bad}})
        assert str(e.value).startswith("<config>: train.peak_flops:") and "auto" in str(e.value)


def test_progress_line():
    m = step_metrics(steps=10, samples=2560, wait=2.5, compute=7.5, flops_per_step=1e12, peak_flops=1e13)
    line = progress_line(20, 300, 4.25, 2e-4, m, wall_per_step=0.5)
    assert line.startswith("[llip] step 20/300 loss 4.2500 lr 2.00e-04 ")
    assert "256 samples/s" in line and "data-wait 25%" in line and "MFU 10.0%" in line  # 10 steps x 1e12 FLOPs in 10 s over 1e13 FLOP/s
    assert line.endswith("ETA 2m20s")  # 280 steps left x 0.5 s
    m.pop("train/mfu")
    assert "MFU" not in progress_line(300, 300, 1.0, 0.0, m, 0.5) and \
        progress_line(300, 300, 1.0, 0.0, m, 0.5).endswith("ETA 0s")
    assert progress_line(0, 20_000, 1.0, 0.0, m, 1.0).endswith("ETA 5h33m")


def test_clock_on_a_real_loop_that_waits_on_its_data():
    """The loop as train.py runs it: blocked in next() on a slow loader, then computing."""
    def slow_loader(n):
        for i in range(n):
            time.sleep(0.06)
            yield i

    clock = StepClock()
    for _ in slow_loader(5):
        clock.batch_ready()
        time.sleep(0.02)
        clock.step_done(samples=8)
    wait, compute, _ = clock.window()
    assert wait >= 5 * 0.06 and compute >= 5 * 0.02  # sleeps are lower bounds, even on a busy machine
    m = step_metrics(clock.steps, clock.samples, wait, compute)
    assert 0.5 < m["train/data_wait_share"] < 0.95, m  # 0.75 on an idle machine
