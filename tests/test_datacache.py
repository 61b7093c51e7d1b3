"""Sweeps decode once (orchestrator/data/shared_decode.py): the shared pass's windows, read back by a trial's
workers, give exactly the batches direct decoding gives (ids, pixels, tokens, positions), with a
local and an S3 cache root on a real S3-compatible server; each window is decoded once however many
readers ask; a dead producer makes readers decode the window themselves, same batches; and the
cache estimate that turns the pass off says so in one line. The sweep-level check (two trials, one
decode, one sample sequence, MLflow parent/children) is in tests/test_sweep.py's sweep test.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from orchestrator.config.schema import load_config, parse_config
from orchestrator.data.plan import EpochStream

try:
    from tests.s3server import moto_s3  # noqa: F401  (fixture)
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from s3server import moto_s3  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "llip-cache"
LB = 8


def _cfg(train: str, **data):
    return parse_config({"name": "cache", "model": {"size": "tiny"},
                         "data": {"train": train, "batch_size": 2 * LB, "shuffle_buffer": 40,
                                  "decode_concurrency": 2, "decode_cpus": 0.25, **data},
                         "scaling": {"num_workers": 2, "cpus_per_worker": 0.5}})


# --------------------------------------------------------------------------------------------
# no Ray
# --------------------------------------------------------------------------------------------
def test_key_follows_the_data_settings_only(emoji_shards):
    from orchestrator.data.shared_decode import data_key
    from orchestrator.data.plan import build_train_source

    base = _cfg(str(emoji_shards / "train"))
    k = data_key(build_train_source(base, None))
    same = [{"model.mixture_tokens": 16}, {"model.tau": 1.0}, {"loss.type": "llip_infonce"},
            {"data.batch_size": 32}, {"scaling.num_workers": 1}, {"data.decode_concurrency": 1}]
    other = [{"model.image_size": 48, "model.patch_size": 8}, {"seed": 1}, {"data.augment": False},
             {"data.shuffle_buffer": 100}, {"data.hflip": True}]
    for ov in same:
        assert data_key(build_train_source(base.with_overrides(ov), None)) == k, ov
    keys = {data_key(build_train_source(base.with_overrides(ov), None)) for ov in other}
    assert k not in keys and len(keys) == len(other)


def test_cache_estimate_over_budget_turns_the_pass_off_in_one_line(emoji_shards, capsys):
    from orchestrator.data.shared_decode import bytes_per_sample, cache_bytes, epochs_needed, start_shared_data

    cfg = load_config(ROOT / "experiments" / "sweep_demo.yaml").with_overrides(
        {"data.train": str(emoji_shards / "train"), "train.steps": 200, "sweep.shared_data.max_gb": 0.001,
         "sweep.shared_data.enabled": True})
    from orchestrator.data.plan import build_train_source

    n = sum(build_train_source(cfg, None).counts)
    per_epoch = n // 64  # sweep_demo: 1 worker, batch 64
    assert epochs_needed(cfg, n) == -(-200 // per_epoch)
    assert bytes_per_sample(cfg) == 3 * 32 * 32 + 8 * 16 + 16 + 1  # tiny: 32 px, 16 tokens
    assert cache_bytes(cfg, n) > 1e6
    assert start_shared_data(cfg, "s-1") is None  # before any actor exists
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("[llip] shared data pass off:")
    assert "sweep.shared_data.max_gb" in out[0] and out[0].endswith("trials decode their own data")


def test_cache_path_must_be_local_or_s3():
    from orchestrator.errors import UserError

    cfg = load_config(ROOT / "experiments" / "sweep_demo.yaml")
    with pytest.raises(UserError, match="sweep.shared_data.cache"):
        cfg.with_overrides({"sweep.shared_data.cache": "gs://bucket/x"})


# --------------------------------------------------------------------------------------------
# through Ray: cache == decode, local and S3 cache roots
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_local(moto_s3):  # noqa: F811
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def shards(moto_s3, tmp_path_factory):  # noqa: F811
    from orchestrator.data.shards import write_emoji_shards

    moto_s3.create_bucket(BUCKET)
    root = str(tmp_path_factory.mktemp("cache-shards"))
    write_emoji_shards(root, samples_per_shard=16, seed=0, holdout=0.2, limit=160)
    return root


def batches(src, epoch, intervals):
    stream, out = EpochStream(src, epoch, intervals, LB), []
    while (b := stream.next_batch()) is not None:
        out.append({k: v.numpy().copy() for k, v in b.items()})
    return out


def same_batches(a, b):
    assert len(a) == len(b) and a
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape, k
            assert np.array_equal(x[k], y[k]), k


def _attach(src, cfg, name, root, fs):
    from orchestrator.data.shared_decode import _registry_cls, attach

    registry = _registry_cls().options(name=name).remote(name, root, fs, 1e9)
    out = attach(src, cfg, {"registry": name})
    assert out.cache is not None and out.cpu_limit is None
    return out, registry


@pytest.mark.slow
@pytest.mark.timeout(420)
@pytest.mark.parametrize("where", ["local", "s3"])
def test_cached_batches_equal_decoded_batches(ray_local, shards, tmp_path, where, moto_s3):  # noqa: F811
    import ray

    from orchestrator.data.reading import DataStats
    from orchestrator.data.shared_decode import split_root
    from orchestrator.data.plan import build_train_source

    cfg = _cfg(f"{shards}/train", augment=True, hflip=True)
    direct = build_train_source(cfg, None, DataStats.create())
    root, fs = split_root(f"s3://{BUCKET}/cache-{tmp_path.name}" if where == "s3" else str(tmp_path / "cache"))
    trial_stats = DataStats.create()
    cached, registry = _attach(dataclasses.replace(direct, decoder=dataclasses.replace(direct.decoder, stats=trial_stats)),
                               cfg, f"reg-{where}", root, fs)
    plan = direct.plan(1)
    for r, mine in enumerate(plan.worker_intervals(2)):
        want = batches(direct, 1, mine)
        same_batches(batches(cached, 1, mine), want)  # ids, pixels (uint8), tokens, pos: equal
        assert want[0]["image"].dtype == np.uint8
    # A second trial (another worker count) reads the same windows: nothing is decoded again.
    again = batches(cached, 1, plan.worker_intervals(1)[0])
    assert len(again) == plan.size // LB
    summary = ray.get(registry.summary.remote())
    (s,) = summary.values()
    assert s["windows"] == len(plan.windows) and s["failed"] == 0
    assert s["data/decoded"] == plan.size  # every sample of the epoch decoded exactly once
    assert s["data/decode_cpu_ms"] > 0 and s["data/read_cpu_ms"] >= 0
    snap = trial_stats.snapshot()
    assert snap.get("data/decoded", 0) == 0  # the trial decoded nothing itself ...
    assert snap["data/seen"] == 2 * plan.size  # ... and still counts what it saw (twice: two passes)
    ray.kill(registry)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_stopped_reader_stops_the_producer(ray_local, shards, tmp_path):
    """Demand-driven: a slow trial's readers run only a few windows ahead of its training, so one
    that stops (ASHA) leaves the rest of the epoch undecoded."""
    import time

    import ray

    from orchestrator.data.plan import build_train_source

    cfg = _cfg(f"{shards}/train", shuffle_buffer=0, decode_concurrency=1)  # 8 windows of one shard (16)
    cached, registry = _attach(build_train_source(cfg, None), cfg, "reg-stop", str(tmp_path / "cache"), None)
    plan = cached.plan(0)
    assert len(plan.windows) == 8
    stream = EpochStream(cached, 0, plan.worker_intervals(1)[0], LB)
    assert stream.next_batch() is not None
    time.sleep(8)  # a slow trainer: its stream stays open
    (s,) = ray.get(registry.summary.remote()).values()
    # the window being trained on, the reader thread's one window ahead and the one it waits to hand
    # over, the producer's read-ahead of one
    assert 1 <= s["windows"] <= 5, s
    del stream
    ray.kill(registry)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_dead_producer_readers_decode_themselves(ray_local, shards, tmp_path):
    import ray

    from orchestrator.data.reading import DataStats
    from orchestrator.data.plan import build_train_source

    cfg = _cfg(f"{shards}/train")
    direct = build_train_source(cfg, None)
    stats = DataStats.create()
    cached, registry = _attach(dataclasses.replace(direct, decoder=dataclasses.replace(direct.decoder, stats=stats)),
                               cfg, "reg-dead", str(tmp_path / "cache"), None)
    ray.kill(ray.get_actor(cached.cache.producer))
    mine = direct.plan(0).worker_intervals(1)[0]
    same_batches(batches(cached, 0, mine), batches(direct, 0, mine))
    assert stats.snapshot()["data/decoded"] == direct.plan(0).size  # it fell back to its own decode
    ray.kill(registry)


# The sweep itself (two trials trained on one sample sequence, decoded once by the pass, the trials
# decoding nothing) is checked in tests/test_sweep.py's sweep test, which runs with the pass on.


def test_auto_measures_the_decode_share_and_turns_the_pass_off_below_the_bar(emoji_shards, capsys):
    """enabled: auto decodes a few real samples with the trials' decoder and times a training step of
    their model; below min_decode_share it turns the pass off in one line naming both figures."""
    from orchestrator.data.shared_decode import decode_seconds_per_sample, start_shared_data, train_seconds_per_sample

    cfg = load_config(ROOT / "experiments" / "sweep_demo.yaml").with_overrides(
        {"data.train": str(emoji_shards / "train"), "sweep.shared_data.min_decode_share": 1.0})
    assert cfg.sweep.shared_data.enabled == "auto"  # the default
    d, t = decode_seconds_per_sample(cfg, n=16), train_seconds_per_sample(cfg, batch=4, steps=1)
    assert 0 < d < 1 and 0 < t < 10
    assert start_shared_data(cfg, "s-1") is None  # a share below 1.0: off, before any actor exists
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("[llip] shared data pass off: decoding is ")
    assert "ms of CPU a sample against" in out[0] and "sweep.shared_data.enabled: true forces it" in out[0]
    with pytest.raises(Exception, match="sweep.shared_data.enabled"):
        cfg.with_overrides({"sweep.shared_data.enabled": "sometimes"})
