"""The data plane against a real S3-compatible HTTP server (moto, started on 127.0.0.1 by the tests):
`llip shards emoji --out s3://...` through the real CLI, Ray Data reading back through the same
code path as AWS (endpoint from AWS_ENDPOINT_URL), a real 2-worker TorchTrainer with exact per-epoch
coverage, bad data skipped and counted, and preflight failures in one line naming the URL."""
from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path

import pytest

from orchestrator.cli import main as llip_main
from orchestrator.config.schema import parse_config
from orchestrator.errors import UserError
try:
    from tests.s3server import SECRET_KEY, closed_port, moto_s3  # noqa: F401  (fixture)
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from s3server import SECRET_KEY, closed_port, moto_s3  # noqa: F401

BUCKET = "llip-test"
EMOJI = f"s3://{BUCKET}/emoji"
N_TRAIN, N_EVAL = 128, 32  # --limit 160 --holdout 0.2, 16 per shard: 8 train shards, 2 eval shards


@pytest.fixture(scope="module")
def s3_shards(moto_s3):  # noqa: F811
    moto_s3.create_bucket(BUCKET)
    rc = llip_main(["shards", "emoji", "--out", EMOJI, "--limit", str(N_TRAIN + N_EVAL), "--holdout", "0.2",
                    "--samples-per-shard", "16", "--seed", "0", "-q"])
    assert rc == 0
    return EMOJI


@pytest.fixture(scope="module")
def ray_local(moto_s3):  # noqa: F811  (after the AWS env is set, so nothing leaks in from outside)
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield ray
    ray.shutdown()


def _cfg(train, eval_=None, **data):
    return parse_config({
        "name": "s3test",
        "model": {"size": "tiny"},
        "data": {"train": train, "eval": eval_, "batch_size": 32, "shuffle_buffer": 32, "decode_concurrency": 2,
                 "decode_cpus": 0.25, **data},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
    })


def _s3_tar_samples(client, bucket: str, prefix: str) -> dict[str, list[str]]:
    """shard file name -> sample keys in it, read straight from the server."""
    out = {}
    for obj in client.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]:
        if not obj["Key"].endswith(".tar"):
            continue
        data = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            keys = []
            for m in tf.getmembers():
                k = m.name.split(".", 1)[0]
                if not keys or keys[-1] != k:
                    keys.append(k)
        out[obj["Key"].rsplit("/", 1)[-1]] = keys
    return out


def _wait_stats(stats, key, want, timeout=10.0):
    """Counters arrive fire-and-forget from decode tasks; give the last ones a moment."""
    deadline = time.monotonic() + timeout
    snap = stats.snapshot()
    while snap.get(key) != want and time.monotonic() < deadline:
        time.sleep(0.2)
        snap = stats.snapshot()
    return snap


# --------------------------------------------------------------------------------------------
# writing through the CLI
# --------------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_cli_writes_shards_and_manifest_to_s3(s3_shards, moto_s3, tmp_path):  # noqa: F811
    c = moto_s3.client()
    keys = sorted(o["Key"] for o in c.list_objects_v2(Bucket=BUCKET, Prefix="emoji/")["Contents"])
    assert keys == ["emoji/eval/eval-00000.tar", "emoji/eval/eval-00001.tar", "emoji/manifest.json"] + [
        f"emoji/train/train-{i:05d}.tar" for i in range(8)]
    m = json.loads(c.get_object(Bucket=BUCKET, Key="emoji/manifest.json")["Body"].read())
    assert m["splits"]["train"]["samples"] == N_TRAIN and m["splits"]["eval"]["samples"] == N_EVAL
    assert [s["samples"] for s in m["splits"]["train"]["shards"]] == [16] * 8
    assert len(m["fingerprint"]) == 16
    # the same shards written locally are byte-identical: same content fingerprint
    from orchestrator.data.shards import write_emoji_shards

    local = write_emoji_shards(str(tmp_path / "local"), samples_per_shard=16, seed=0, holdout=0.2,
                               limit=N_TRAIN + N_EVAL)
    assert local["fingerprint"] == m["fingerprint"]


@pytest.mark.timeout(60)
def test_redacted_description_has_no_secret(moto_s3):  # noqa: F811
    from orchestrator.storage import s3
    from orchestrator.training.driver import manifest_tags

    text = s3.redacted(None)
    assert moto_s3.endpoint_url in text and "credentials=env" in text
    assert SECRET_KEY not in text
    tags = manifest_tags(_cfg(f"{EMOJI}/train"))
    assert SECRET_KEY not in json.dumps(tags)


# --------------------------------------------------------------------------------------------
# streaming into a real 2-worker TorchTrainer
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_worker_trainer_sees_every_sample_once_per_epoch(s3_shards, moto_s3, ray_local, tmp_path):  # noqa: F811
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from orchestrator.data.reading import DataStats, sample_id
    from orchestrator.data.plan import build_train_source

    cfg = _cfg(f"{EMOJI}/train", f"{EMOJI}/eval")  # endpoint: AWS_ENDPOINT_URL, as for any S3 store
    stats = DataStats.create()
    source = build_train_source(cfg, None, stats)
    out_dir = tmp_path / "seen"
    out_dir.mkdir()

    def train_fn(config):
        import json as _json

        import ray.train

        from orchestrator.data.plan import EpochStream

        rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
        src = config["source"]
        for epoch in range(2):
            ids = []
            stream = EpochStream(src, epoch, src.plan(epoch).worker_intervals(world)[rank], config["local_bs"])
            while (b := stream.next_batch()) is not None:
                assert b["image"].shape[1:] == (32, 32, 3) and b["tokens"].shape[1:] == (16,)
                ids += b["sample_id"].tolist()
            Path(config["out"], f"rank{rank}_epoch{epoch}.json").write_text(_json.dumps({"ids": ids}))
            ray.train.report({"epoch": epoch})

    trainer = TorchTrainer(
        train_fn,
        train_loop_config={"local_bs": 16, "out": str(out_dir), "source": source},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="coverage", storage_path=str(tmp_path / "runs")),
    )
    trainer.fit()

    by_shard = _s3_tar_samples(moto_s3.client(), BUCKET, "emoji/train/")
    shard_of = {sample_id(name, k): name for name, keys in by_shard.items() for k in keys}
    assert len(shard_of) == N_TRAIN
    orders = []
    for epoch in range(2):
        per_rank = [json.loads((out_dir / f"rank{r}_epoch{epoch}.json").read_text()) for r in range(2)]
        ids = per_rank[0]["ids"] + per_rank[1]["ids"]
        assert len(per_rank[0]["ids"]) == len(per_rank[1]["ids"]) == N_TRAIN // 2
        assert len(set(ids)) == len(ids), "a sample was seen twice in one epoch"
        assert set(ids) == set(shard_of), "a sample was missed in an epoch"
        # order in which shards first show up on each worker
        orders.append([list(dict.fromkeys(shard_of[i] for i in r["ids"])) for r in per_rank])
    assert orders[0] != orders[1], "shard order did not change between epochs"
    snap = _wait_stats(stats, "data/seen", 2 * N_TRAIN)
    assert snap["data/seen"] == 2 * N_TRAIN and snap["data/skipped"] == 0


# --------------------------------------------------------------------------------------------
# bad data
# --------------------------------------------------------------------------------------------
def _png_bytes(seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _bad_shards(client, prefix: str, n_good: int) -> tuple[int, int]:
    """Two shards: one with good samples + a corrupt image + a sample without caption; one
    truncated in the middle of an image. Returns (good samples readable, cut sample index)."""
    from orchestrator.data.tars import encode_sample, tar_bytes

    s1 = [encode_sample(f"a{i:04d}", _png_bytes(i), "png", [f"a thing number {i}"]) for i in range(n_good)]
    s1.insert(3, encode_sample("a-corrupt", b"\x89PNG\r\n\x1a\n this is not a png", "png", ["corrupt"]))
    s1.insert(7, [("a-nocap.png", _png_bytes(999))])  # image, no txt/json
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/bad-00000.tar", Body=tar_bytes(s1))

    s2 = [encode_sample(f"b{i:04d}", _png_bytes(100 + i), "png", [f"b thing {i}"]) for i in range(n_good)]
    data = tar_bytes(s2)
    cut_at = n_good // 2
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        m = next(m for m in tf.getmembers() if m.name == f"b{cut_at:04d}.png")
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/bad-00001.tar", Body=data[: m.offset_data + m.size // 2])
    return n_good + cut_at, cut_at


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_bad_samples_and_truncated_tar_are_skipped_and_counted(s3_shards, moto_s3, ray_local):  # noqa: F811
    from orchestrator.data.reading import DataStats, check_bad_fraction
    from orchestrator.data.plan import build_train_source

    n_readable, _ = _bad_shards(moto_s3.client(), "bad", n_good=20)
    stats = DataStats.create()
    src = build_train_source(_cfg(f"s3://{BUCKET}/bad", None, max_bad_fraction=0.5), None, stats)
    # no manifest: the samples were counted by reading the tars (the truncated one up to its damage)
    assert sum(src.counts) == n_readable + 2
    n = sum(len(b["sample_id"]) for b in src.dataset(0, [(0, sum(src.counts))]).iter_batches(batch_size=64))
    assert n == n_readable
    snap = _wait_stats(stats, "data/seen", n_readable + 3)
    assert snap["data/skipped_corrupt_image"] == 1
    assert snap["data/skipped_no_caption"] == 1
    assert snap["data/truncated_shards"] == 1
    assert snap["data/skipped"] == 3 and snap["data/seen"] == n_readable + 3
    check_bad_fraction(stats, 0.5)  # 3 of 33: fine at 50 %
    with pytest.raises(UserError) as e:
        check_bad_fraction(stats, 0.01)
    msg = str(e.value)
    assert "\n" not in msg and "max_bad_fraction=0.01" in msg and "3 of" in msg


# --------------------------------------------------------------------------------------------
# preflight: fail before any trainer starts, in one line naming the URL
# --------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("url", ["s3://no-such-bucket-llip/x/train", f"s3://{BUCKET}/no/such/prefix"])
def test_missing_bucket_or_prefix_fails_fast_naming_the_url(s3_shards, url):
    from orchestrator.data.plan import build_train_source

    with pytest.raises(UserError) as e:
        build_train_source(_cfg(url), None)
    msg = str(e.value)
    assert url in msg and "\n" not in msg
    assert ("does not exist" in msg) if "no-such-bucket" in url else ("no objects" in msg)


@pytest.mark.timeout(60)
def test_unreachable_endpoint_fails_fast_naming_the_url(moto_s3):  # noqa: F811  (for its credentials)
    from orchestrator.data.plan import build_train_source

    endpoint = f"http://127.0.0.1:{closed_port()}"
    url = f"s3://{BUCKET}/emoji/train"
    with pytest.raises(UserError) as e:
        build_train_source(_cfg(url, None, s3={"endpoint_url": endpoint}), None)
    msg = str(e.value)
    assert url in msg and endpoint in msg and "unreachable" in msg and "\n" not in msg


@pytest.mark.timeout(60)
def test_shards_cli_to_missing_bucket_is_one_line(moto_s3, capsys):  # noqa: F811
    rc = llip_main(["shards", "emoji", "--out", "s3://no-such-bucket-llip/emoji", "--limit", "10", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "s3://no-such-bucket-llip/emoji" in err[0]
