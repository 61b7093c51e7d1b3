"""`llip curate` end to end on a real local Ray cluster, real Twemoji shards, a real MLflow store and
a real S3-compatible server (moto): the kept set equals a reference computed here from the tars
and the equations, does not depend on blocks or workers, is the same from S3 as from disk, and a
training run on it records where it came from. Bad input fails in one line without writing."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from llip_core import curation as cur
from orchestrator.cli import main as llip_main
from orchestrator.config.schema import parse_config
from orchestrator.data.reading import sample_id
from orchestrator.errors import UserError

try:
    from tests.s3server import moto_s3  # noqa: F401  (fixture)
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from s3server import moto_s3  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ENTRIES = ["skin tone", "skin", "tone", "face", "man", "woman", "light", "dark", "medium", "hand", "hands",
           "flag", "heart", "cat", "dog", "person", "red", "blue", "Face", "a.b", "of", "with", "and"]
SHARD_ARGS = dict(limit=240, samples_per_shard=40, seed=0)


@pytest.fixture(scope="module")
def ray_local(moto_s3):  # noqa: F811  (after the AWS env is set, so workers inherit it)
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    from orchestrator.data.shards import write_emoji_shards

    root = tmp_path_factory.mktemp("pool")
    write_emoji_shards(str(root / "emoji"), **SHARD_ARGS)
    meta = root / "meta.json"
    meta.write_text(json.dumps(ENTRIES))
    return root


def _cfg(pool: Path, out, t=3, mode="offline", seed=0, concurrency=1, train=None, **data):
    return parse_config({
        "name": "curtest",
        "model": {"size": "tiny"},
        "data": {"train": train or str(pool / "emoji" / "train"), "eval": None, "batch_size": 8,
                 "shuffle_buffer": 0, "decode_concurrency": 1, **data},
        "train": {"steps": 2, "log_every": 1, "warmup_steps": 0},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.5},
        "mlflow": {"tracking_uri": f"sqlite:///{pool / 'mlflow.db'}"},
        "storage_path": str(pool / "runs"),
        "curation": {"metadata": str(pool / "meta.json"), "t": t, "out": str(out), "mode": mode, "seed": seed,
                     "samples_per_shard": 16, "concurrency": concurrency, "task_cpus": 0.25},
    })


def _tar_records(data: bytes, name: str):
    recs: dict[str, dict] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            recs.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return [(name, k, v) for k, v in recs.items()]


def _read_dir(d: Path):
    out = []
    for p in sorted(d.glob("*.tar")):
        out += _tar_records(p.read_bytes(), p.name)
    return out


def _reference(pool: Path, t: int, seed: int):
    """From the raw tars and the equations: entry ids per record (literal loop, union over
    captions), counts, keep probabilities and the offline kept set (by source shard/key)."""
    spaced = [f" {e} " for e in ENTRIES]

    def lit(c):
        s = " " + "".join(f" {ch} " if ch in ",.;:?!`" else (" " if ch in "\t\n\r" else ch) for ch in c) + " "
        return {i for i, e in enumerate(spaced) if e in s}

    recs = []
    for shard, key, r in _read_dir(pool / "emoji" / "train"):
        caps = json.loads(r["json"])["captions"] if "json" in r else [r["txt"].decode()]
        ids = sorted(set().union(*(lit(c) for c in caps)))
        recs.append((f"{shard}/{key}", sample_id(shard, key), ids))
    counts = np.zeros(len(ENTRIES))
    for _, _, ids in recs:
        counts[ids] += 1
    kp = {src: 1 - np.prod([1 - t / max(counts[e], t) for e in ids]) if ids else 0.0 for src, _, ids in recs}
    ids_flat = np.asarray([e for _, _, ids in recs for e in ids], dtype=np.int32)
    off = np.cumsum([0] + [len(ids) for _, _, ids in recs])
    kept = cur.sample_offline(np.asarray([s for _, s, _ in recs]), ids_flat, off, np.minimum(1, t / np.maximum(counts, t)), seed)
    return {"recs": recs, "counts": counts, "keep_prob": kp,
            "kept": {src for (src, _, _), k in zip(recs, kept) if k},
            "ids": {src: ids for src, _, ids in recs}}


def _curated(out: Path):
    return [json.loads(r["json"]) for _, _, r in _read_dir(out / "train")]


def test_offline_matches_reference_and_ignores_partitioning(pool, ray_local, tmp_path):
    from orchestrator.curation.curate import run_curation
    from orchestrator.tracking.store import client

    ref = _reference(pool, t=3, seed=0)
    s1 = run_curation(_cfg(pool, tmp_path / "a"), log=lambda s: None)
    s2 = run_curation(_cfg(pool, tmp_path / "b", concurrency=2), log=lambda s: None, chunk_rows=7)
    got = _curated(tmp_path / "a")
    sources = [g["source"] for g in got]
    assert len(sources) == len(set(sources))  # no record twice
    assert set(sources) == ref["kept"]
    assert all(g["entries"] == ref["ids"][g["source"]] for g in got)
    assert 0 < len(got) < len(ref["recs"])
    assert s1["fingerprint"] == s2["fingerprint"]  # 1 block per file vs blocks of 7, 1 vs 2 actors
    assert s1["pool_size"] == len(ref["recs"]) and s1["kept_pairs"] == len(got) == s1["written_pairs"]
    assert s1["matched_pairs"] == sum(1 for _, _, ids in ref["recs"] if ids)
    assert s1["entries_over_t"] == int((ref["counts"] > 3).sum())
    man = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert man["fingerprint"] == s1["fingerprint"] and man["splits"]["train"]["samples"] == len(got)
    assert (tmp_path / "a" / "curation_counts.png").read_bytes()[:4] == b"\x89PNG"
    c = client(f"sqlite:///{pool / 'mlflow.db'}")
    run = c.get_run(s1["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["llip.kind"] == "curation"
    assert run.data.params["curation.t"] == "3" and run.data.metrics["curate/kept_pairs"] == len(got)
    arts = {a.path for a in c.list_artifacts(run.info.run_id)} | {a.path for a in c.list_artifacts(run.info.run_id, "plots")}
    assert {"curation_stats.json", "plots/curation_counts.png"} <= arts


def test_online_writes_every_match_with_its_keep_probability(pool, ray_local, tmp_path):
    from orchestrator.curation.curate import run_curation

    ref = _reference(pool, t=3, seed=0)
    s = run_curation(_cfg(pool, tmp_path / "on", mode="online"), log=lambda s: None)
    got = _curated(tmp_path / "on")
    assert {g["source"] for g in got} == {src for src, _, ids in ref["recs"] if ids}
    for g in got:
        assert g["keep_prob"] == pytest.approx(ref["keep_prob"][g["source"]], rel=1e-12)
    assert s["kept_pairs"] == pytest.approx(sum(ref["keep_prob"].values()))


def test_online_training_stream_resamples_each_epoch(pool, ray_local, tmp_path):
    from orchestrator.curation.curate import run_curation
    from orchestrator.data.plan import build_train_source

    cfg = _cfg(pool, tmp_path / "on2", t=2, mode="online")
    s = run_curation(cfg, log=lambda s: None)
    src = build_train_source(cfg, None)
    epochs = [set(np.concatenate([b["sample_id"] for b in src.dataset(e, [(0, sum(src.counts))]).iter_batches(
        batch_size=None, batch_format="numpy")]).tolist()) for e in range(3)]
    probs = np.array([g["keep_prob"] for g in _curated(tmp_path / "on2")])
    sd = np.sqrt((probs * (1 - probs)).sum())
    for e in epochs:
        assert abs(len(e) - s["kept_pairs"]) <= 5 * sd + 1
    assert len(epochs[0] ^ epochs[1]) > 0 and len(epochs[1] ^ epochs[2]) > 0  # fresh draws per epoch
    assert (probs < 1).any() and len(set.union(*epochs)) > max(len(e) for e in epochs)


def test_s3_source_and_output_give_the_same_shards(pool, ray_local, moto_s3, tmp_path):  # noqa: F811
    from orchestrator.curation.provenance import read_stats
    from orchestrator.curation.curate import run_curation

    moto_s3.create_bucket("cur")
    assert llip_main(["shards", "emoji", "--out", "s3://cur/emoji", "--limit", str(SHARD_ARGS["limit"]),
                      "--samples-per-shard", str(SHARD_ARGS["samples_per_shard"]), "--seed", "0", "-q"]) == 0
    local = run_curation(_cfg(pool, tmp_path / "loc"), log=lambda s: None)
    remote = run_curation(_cfg(pool, "s3://cur/curated", train="s3://cur/emoji/train"), log=lambda s: None)
    assert remote["fingerprint"] == local["fingerprint"] and remote["kept_pairs"] == local["kept_pairs"]
    assert read_stats("s3://cur/curated")["fingerprint"] == local["fingerprint"]
    keys = [o["Key"] for o in moto_s3.client().list_objects_v2(Bucket="cur", Prefix="curated/")["Contents"]]
    assert "curated/manifest.json" in keys and sum(k.endswith(".tar") for k in keys) >= 1


def test_training_run_records_its_curation(pool, ray_local, tmp_path):
    from orchestrator.curation.curate import run_curation
    from orchestrator.training.driver import preflight, run_experiment
    from orchestrator.tracking.store import client

    cfg = _cfg(pool, tmp_path / "tr")
    with pytest.raises(UserError, match="nothing was curated yet.*llip curate"):
        preflight(cfg)
    s = run_curation(cfg, log=lambda s: None)
    with pytest.raises(UserError, match="curated with t=3 but the config says t=4"):
        preflight(cfg.with_overrides({"curation.t": 4}))
    r = run_experiment(cfg)
    run = client(r.tracking_uri).get_run(r.run_id)
    tags, params = run.data.tags, run.data.params
    assert tags["llip.curation.run_id"] == s["mlflow_run_id"]
    assert tags["llip.curation.fingerprint"] == s["fingerprint"] == tags["llip.data_manifest"]
    assert tags["llip.curation.metadata_sha256"] == s["metadata_sha256"] and tags["llip.curation.mode"] == "offline"
    assert tags["llip.data_train"] == str(tmp_path / "tr" / "train")
    assert params["curation.t"] == "3" and params["curation.metadata"] == str(pool / "meta.json")


def _seed_keeping_nothing(pool: Path, entry: str) -> int:
    global ENTRIES
    saved = ENTRIES
    try:
        ENTRIES = [entry]
        for seed in range(200):
            if not _reference(pool, t=1, seed=seed)["kept"]:
                return seed
    finally:
        ENTRIES = saved
    raise AssertionError("no seed keeps nothing")


def test_bad_input_fails_in_one_line_without_writing(pool, ray_local, tmp_path, capsys):
    from orchestrator.curation.curate import run_curation

    cfg = _cfg(pool, tmp_path / "none")
    nomatch = tmp_path / "nomatch.json"
    nomatch.write_text(json.dumps(["zzzqqq", "Skin Tone"]))
    with pytest.raises(UserError, match=r"curation.metadata .*nomatch.json: none of its 2 entries occurs"):
        run_curation(cfg.with_overrides({"curation.metadata": str(nomatch)}), log=lambda s: None)
    assert not (tmp_path / "none").exists() or not list((tmp_path / "none").rglob("*.tar"))

    one = tmp_path / "one.json"
    one.write_text(json.dumps(["tone"]))
    seed = _seed_keeping_nothing(pool, "tone")
    with pytest.raises(UserError, match=r"curation.t=1: the curation kept none of \d+ matched pairs.*raise curation.t"):
        run_curation(cfg.with_overrides({"curation.metadata": str(one), "curation.t": 1, "curation.seed": seed}),
                     log=lambda s: None)
    assert not list((tmp_path / "none").rglob("*.tar")) and not (tmp_path / "none" / "manifest.json").exists()

    bad = tmp_path / "bad.json"
    bad.write_text('{"dog": 1}')
    yaml_file = tmp_path / "x.yaml"
    yaml_file.write_text(json.dumps(cfg.with_overrides({"curation.metadata": str(bad)}).model_dump(mode="json")))
    assert llip_main(["curate", str(yaml_file)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.json" in err[0] and "JSON list of strings" in err[0]
