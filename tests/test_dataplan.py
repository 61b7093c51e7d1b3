"""The training stream as a plan (orchestrator/data/plan.py): exact mid-epoch resume and elastic
resume, checked on real shards (local and on a real S3-compatible server) through real Ray Data.

Pure checks first (the plan's permutations, contiguous equal splits, what a checkpoint's position
gives back for the same and for another number of workers), then streams: the sample ids a worker
trains on after resuming at a checkpoint's position equal what an uninterrupted worker goes on to
see, and with 2 -> 1 and 1 -> 2 workers every remaining sample of the epoch is seen exactly once.
"""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.config.schema import parse_config
from orchestrator.data.plan import DataPosition, EpochPlan, EpochStream, after, split, total

try:
    from tests.s3server import moto_s3  # noqa: F401  (fixture)
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from s3server import moto_s3  # noqa: F401


# --------------------------------------------------------------------------------------------
# the plan, without Ray
# --------------------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(0, 9), min_size=1, max_size=6), n=st.integers(1, 5), data=st.data())
def test_split_is_contiguous_equal_and_exact(sizes, n, data):
    # disjoint ascending intervals with gaps
    ivs, x = [], 0
    for s in sizes:
        x += data.draw(st.integers(0, 3))
        ivs.append((x, x + s))
        x += s
    ivs = [iv for iv in ivs if iv[1] > iv[0]]
    parts = split(ivs, n)
    flat = [p for part in parts for a, b in part for p in range(a, b)]
    assert flat == [p for a, b in ivs for p in range(a, b)]  # in order, each position once
    sizes_ = [total(part) for part in parts]
    assert max(sizes_) - min(sizes_) <= 1


def test_plan_is_a_permutation_per_epoch_with_windows_of_at_least_the_buffer():
    counts = (16, 5, 16, 0, 11, 16, 16, 3)
    paths = tuple(f"s{i}.tar" for i in range(len(counts)))
    seen = []
    for epoch in range(3):
        plan = EpochPlan(paths, counts, seed=7, epoch=epoch, window=24)
        refs = plan.positions([(0, plan.size)])
        assert [p for p, _, _ in refs] == list(range(sum(counts)))
        assert sorted((s, k) for _, s, k in refs) == [(s, k) for s, c in enumerate(counts) for k in range(c)]
        assert all(w.size >= 24 for w in plan.windows[:-1])  # the last window takes what is left
        seen.append([(s, k) for _, s, k in refs])
        # a window holds whole shards, each (with samples) in exactly one window of the epoch
        in_windows = [s for w in plan.windows for s in w.shards if counts[s]]
        assert sorted(in_windows) == [s for s in range(len(counts)) if counts[s]]
    assert seen[0] != seen[1] != seen[2]
    again = EpochPlan(paths, counts, seed=7, epoch=1, window=24).positions([(0, sum(counts))])
    assert [(s, k) for _, s, k in again] == seen[1]  # a function of (seed, epoch, shards) alone
    other = EpochPlan(paths, counts, seed=8, epoch=1, window=24).positions([(0, sum(counts))])
    assert [(s, k) for _, s, k in other] != seen[1]


def test_no_buffer_keeps_each_shard_in_order():
    plan = EpochPlan(("a", "b", "c"), (3, 2, 4), seed=0, epoch=0, window=0)
    refs = plan.positions([(0, plan.size)])
    for s in range(3):
        assert [k for _, s2, k in refs if s2 == s] == list(range(plan.counts[s]))


def test_position_same_workers_keeps_each_remainder_and_other_counts_redeal():
    pos = DataPosition(3, [[(10, 32)], [(40, 64)]])
    assert pos.for_workers(2) == [[(10, 32)], [(40, 64)]]
    assert pos.for_workers(1) == [[(10, 32), (40, 64)]]
    three = pos.for_workers(3)
    assert [total(p) for p in three] == [15, 15, 16]
    assert DataPosition.from_json(pos.to_json()) == pos
    assert after([(0, 5), (8, 12)], 9) == [(9, 12)]


# --------------------------------------------------------------------------------------------
# streams through Ray Data, local and S3 shards
# --------------------------------------------------------------------------------------------
BUCKET = "llip-plan"
N_TRAIN = 128  # 8 shards of 16
LB = 8  # local batch


# --------------------------------------------------------------------------------------------
# shard sample counts: written down beside the shards, else read from the tars (with a note)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["local", "s3"])
def test_counts_come_from_the_manifest_sizes_json_img2dataset_stats_or_the_tars(where, moto_s3, tmp_path):  # noqa: F811
    import json
    from pathlib import Path

    from orchestrator.cli import main as llip_main
    from orchestrator.data.reading import resolve_shards
    from orchestrator.data.sizes import shard_counts
    from orchestrator.data.shards import write_emoji_shards

    if where == "s3":
        moto_s3.create_bucket("llip-sizes")
        root, c = "s3://llip-sizes/emoji", moto_s3.client()
        put = lambda name, obj: c.put_object(Bucket="llip-sizes", Key=f"emoji/{name}", Body=json.dumps(obj).encode())  # noqa: E731
        rm = lambda name: c.delete_object(Bucket="llip-sizes", Key=f"emoji/{name}")  # noqa: E731
    else:
        root = str(tmp_path / "emoji")
        put = lambda name, obj: Path(root, name).write_text(json.dumps(obj))  # noqa: E731
        rm = lambda name: Path(root, name).unlink()  # noqa: E731
    write_emoji_shards(root, samples_per_shard=16, seed=0, holdout=0.2, limit=110)
    loc = f"{root}/train"
    paths, fs = resolve_shards(loc, None, "data.train")

    def counts():
        notes = []
        return shard_counts(loc, paths, fs, say=notes.append), notes

    truth, notes = counts()  # the manifest's
    assert notes == [] and len(set(truth)) == 2 and truth.count(16) == len(truth) - 1  # one shorter shard
    rm("manifest.json")
    got, notes = counts()  # no manifest: every tar is read, and one line says so and what to do
    assert got == truth and len(notes) == 1 and f"llip sizes {loc}" in notes[0] and f"{len(paths)} of" in notes[0]
    assert llip_main(["sizes", loc]) == 0  # open_clip's sizes.json beside the shards
    got, notes = counts()
    assert got == truth and notes == []
    rm("train/sizes.json")
    names = [p.rsplit("/", 1)[-1] for p in paths]
    for name, n in zip(names, truth):  # img2dataset's per-shard stats; the first one says 3
        put(f"train/{name[:-4]}_stats.json", {"count": 20, "successes": 3 if name == names[0] else n})
    got, notes = counts()
    assert got == [3] + truth[1:] and notes == []


@pytest.fixture(scope="module")
def ray_local(moto_s3):  # noqa: F811  (after the AWS env is set)
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module", params=["local", "s3"])
def source(request, moto_s3, tmp_path_factory, ray_local):  # noqa: F811
    from orchestrator.data.plan import build_train_source
    from orchestrator.data.shards import write_emoji_shards

    if request.param == "s3":
        moto_s3.create_bucket(BUCKET)
        root = f"s3://{BUCKET}/emoji"
    else:
        root = str(tmp_path_factory.mktemp("plan"))
    write_emoji_shards(root, samples_per_shard=16, seed=0, holdout=0.2, limit=160)
    cfg = parse_config({"name": "plan", "model": {"size": "tiny"},
                        "data": {"train": f"{root}/train", "batch_size": 2 * LB, "shuffle_buffer": 40,
                                 "decode_concurrency": 2, "decode_cpus": 0.25},
                        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5}})
    src = build_train_source(cfg, tokenizer=None)
    assert sum(src.counts) == N_TRAIN and src.counts == (16,) * 8  # from the manifest
    return src


def consume(src, epoch, intervals, k=None):
    """Batches of sample ids a worker trains on, and what it has left."""
    stream = EpochStream(src, epoch, intervals, LB)
    out = []
    while k is None or len(out) < k:
        b = stream.next_batch()
        if b is None:
            break
        assert b["image"].dtype.is_floating_point is False and b["image"].shape[1:] == (32, 32, 3)
        out.append(b["sample_id"].tolist())
    return out, stream.remaining()


def flat(batches):
    return [i for b in batches for i in b]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_resume_continues_the_same_sample_sequence(source):
    plan = source.plan(1)
    mine = plan.worker_intervals(2)
    for r in range(2):
        full, _ = consume(source, 1, mine[r])
        assert len(full) == N_TRAIN // 2 // LB
        head, rest = consume(source, 1, mine[r], k=3)
        pos = DataPosition(1, [rest if q == r else mine[q] for q in range(2)])
        tail, _ = consume(source, 1, pos.for_workers(2)[r])
        assert head + tail == full  # batch for batch, id for id
    # the two workers together see the epoch once, in an order that differs from epoch 0's
    both = flat(consume(source, 1, mine[0])[0]) + flat(consume(source, 1, mine[1])[0])
    assert len(set(both)) == len(both) == N_TRAIN
    epoch0 = flat(consume(source, 0, plan.worker_intervals(1)[0])[0])
    assert set(epoch0) == set(both) and epoch0 != both


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("before,after_", [(2, 1), (1, 2)])
def test_elastic_resume_sees_every_remaining_sample_once(source, before, after_):
    plan = source.plan(0)
    seen, rests = [], []
    for r, mine in enumerate(plan.worker_intervals(before)):
        got, rest = consume(source, 0, mine, k=2 + r)  # workers stopped at different points
        seen += flat(got)
        rests.append(rest)
    later = []
    for mine in DataPosition(0, rests).for_workers(after_):
        got, rest = consume(source, 0, mine)
        later += flat(got)
        assert total(rest) < LB  # only a final partial batch is left
    everything = seen + later
    assert len(set(everything)) == len(everything), "a sample was seen twice in the epoch"
    assert len(everything) == N_TRAIN  # 128 samples, nothing dropped: the remainder splits into full batches


def _ids(ds):
    return [int(i) for b in ds.iter_batches(batch_size=None, batch_format="numpy") for i in b["sample_id"]]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_training_stream_is_paced_and_pacing_changes_no_row(source):
    """The executor's loop sleeps between steps (orchestrator/data/pacing.py), and the paced stream
    holds the very rows, in the very order, of the same dataset without the pause."""
    from orchestrator.data.pacing import Paced

    mine = source.plan(0).worker_intervals(1)[0]
    paced_ds = source.dataset(0, mine)
    assert Paced in paced_ds.context.custom_execution_callback_classes
    before = Paced.steps
    got = _ids(paced_ds)
    assert Paced.steps > before  # the callback ran in this (the consuming) process
    bare = source.dataset(0, mine)
    bare.context.custom_execution_callback_classes = [c for c in bare.context.custom_execution_callback_classes
                                                       if c is not Paced]
    steps = Paced.steps
    assert _ids(bare) == got and len(got) == N_TRAIN
    assert Paced.steps == steps
