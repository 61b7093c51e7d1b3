"""`llip shards emoji-scenes`: scenes of several real Twemoji, one caption per object, seeded and
byte-reproducible; evaluation scenes are new combinations of the training concepts, written in
clip_benchmark's retrieval layout; bad layouts fail in one line naming the option; the evaluation
runner logs R-precision by number of objects on them."""
from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from orchestrator.cli import main as llip_main
from orchestrator.data.evalsets import RETRIEVAL, inspect_set, load_set
from orchestrator.data.scenes import SceneOptions, combined_caption, compose
from orchestrator.errors import UserError


def test_compose_is_seeded_balanced_and_keeps_eval_combinations_out_of_training():
    opts = SceneOptions(concepts=12, train_scenes=400, eval_scenes=40, seed=3)
    pool, held, a = compose(opts, 50)
    assert compose(opts, 50) == (pool, held, a)  # pure and seeded
    assert compose(SceneOptions(concepts=12, train_scenes=400, eval_scenes=40, seed=4), 50)[2] != a
    assert len(pool) == 12 and held == [] and set(a) == {"train", "eval"}
    assert [len(s.concepts) for s in a["eval"]] == [1, 2, 3, 4] * 10  # balanced over m
    for s in a["train"] + a["eval"]:
        assert 1 <= len(s.concepts) <= 4 and len(set(s.concepts)) == len(s.concepts) <= 4
        assert set(s.concepts) <= set(pool)
        assert list(s.cells) == sorted(set(s.cells)) and all(0 <= c < 4 for c in s.cells)  # reading order
    train_sets = {frozenset(s.concepts) for s in a["train"]}
    eval_sets = {frozenset(s.concepts) for s in a["eval"] if len(s.concepts) >= 2}
    assert eval_sets and not (train_sets & eval_sets)  # new combinations
    assert {len(s.concepts) for s in a["train"]} == {1, 2, 3, 4}


def test_heldout_concepts_never_appear_in_training():
    pool, held, a = compose(SceneOptions(concepts=10, heldout_concepts=4, train_scenes=200, eval_scenes=20), 30)
    assert len(held) == 4 and not set(held) & set(pool)
    assert all(not set(s.concepts) & set(held) for s in a["train"] + a["eval"])
    assert all(set(s.concepts) & set(held) for s in a["eval_heldout"])
    assert all(set(s.concepts) <= set(pool) | set(held) for s in a["eval_heldout"])


@pytest.mark.parametrize("opts, flag", [
    (SceneOptions(grid=2, max_objects=5), "--max-objects 5"),
    (SceneOptions(grid=1, max_objects=2), "--max-objects 2"),
    (SceneOptions(concepts=3, max_objects=4), "--concepts 3"),
    (SceneOptions(min_objects=3, max_objects=2), "--min-objects 3"),
    (SceneOptions(cell=2), "--cell 2"),
    (SceneOptions(concepts=40, heldout_concepts=20), "--concepts 40 + --heldout-concepts 20"),
    (SceneOptions(concepts=2, min_objects=2, max_objects=2, train_scenes=5, eval_scenes=1), "--concepts 2"),
])
def test_impossible_layouts_and_small_pools_fail_in_one_line_naming_the_option(opts, flag):
    with pytest.raises(UserError) as e:
        compose(opts, 50)
    assert str(e.value).startswith(flag) and "\n" not in str(e.value)


def test_cli_bad_layout_is_one_line(tmp_path, capsys):
    rc = llip_main(["shards", "emoji-scenes", "--out", str(tmp_path / "s"), "--max-objects", "5"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--max-objects 5" in err and "--grid" in err
    assert not (tmp_path / "s").exists()


def _tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


def _occupied_cells(png: bytes, grid: int = 2, cell: int = 16) -> int:
    a = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert a.shape == (grid * cell, grid * cell, 3)
    return sum(int((a[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] != 255).any())
               for r in range(grid) for c in range(grid))


ARGS = ["--concepts", "10", "--heldout-concepts", "3", "--train-scenes", "40", "--eval-scenes", "12",
        "--samples-per-shard", "16", "--seed", "1", "-q"]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    for name in ("a", "b"):
        assert llip_main(["shards", "emoji-scenes", "--out", str(root / name), *ARGS]) == 0
    return root


def test_cli_output_is_byte_reproducible(scenes):
    files = sorted(p.relative_to(scenes / "a") for p in (scenes / "a").rglob("*") if p.is_file())
    assert {str(f) for f in files} >= {"manifest.json", "train/train-00000.tar", "train/train-00002.tar",
                                       "eval/test/0.tar", "eval/test/nshards.txt", "eval/dataset_type.txt",
                                       "eval_heldout/test/0.tar"}
    for f in files:
        assert (scenes / "a" / f).read_bytes() == (scenes / "b" / f).read_bytes(), f


def test_training_scenes_carry_one_default_caption_per_object(scenes):
    man = json.loads((scenes / "a" / "manifest.json").read_text())
    sc = man["scenes"]
    assert man["source"] == "emoji-scenes" and man["splits"]["train"]["samples"] == 40
    assert sc["image_size"] == 32 and len(sc["concepts"]) == 10 and len(sc["heldout_concepts"]) == 3
    assert sum(sc["scenes_per_objects"]["train"].values()) == 40
    assert sc["scenes_per_objects"]["eval"] == {"1": 3, "2": 3, "3": 3, "4": 3}
    names, held = set(sc["concepts"]), set(sc["heldout_concepts"])
    seen_m = set()
    for tar in sorted((scenes / "a" / "train").glob("*.tar")):
        for key, mem in _tar_samples(tar).items():
            first = mem["txt"].decode()
            if "json" not in mem:  # one object: its name is the only caption
                objs = [first]
            else:
                js = json.loads(mem["json"])
                objs = [js["captions"][i] for i in js["default"]]
                assert objs[0] == first and set(js["perspectives"]) == {"object", "scene"}
                assert [c for c, p in zip(js["captions"], js["perspectives"]) if p == "scene"] == [combined_caption(objs)]
            assert set(objs) <= names and not set(objs) & held and len(set(objs)) == len(objs)
            assert _occupied_cells(mem["png"]) == len(objs)  # one drawn cell per captioned object
            seen_m.add(len(objs))
    assert seen_m == {1, 2, 3, 4}


def test_eval_sets_are_clip_benchmark_retrieval_sets_with_every_object_caption(scenes):
    man = json.loads((scenes / "a" / "manifest.json").read_text())
    names, held = set(man["scenes"]["concepts"]), set(man["scenes"]["heldout_concepts"])
    train_sets = set()
    for tar in (scenes / "a" / "train").glob("*.tar"):
        for mem in _tar_samples(tar).values():
            caps = json.loads(mem["json"]) if "json" in mem else {"captions": [mem["txt"].decode()], "default": [0]}
            train_sets.add(frozenset(caps["captions"][i] for i in caps["default"]))
    for name in ("eval", "eval_heldout"):
        info = inspect_set(str(scenes / "a" / name))
        assert info.kind == RETRIEVAL and info.samples == 12
        loaded = load_set(info, 32)
        assert loaded.images.shape == (12, 32, 32, 3)
        assert [len(c) for c in loaded.captions] == [1, 2, 3, 4] * 3
        raw = list(_tar_samples(scenes / "a" / name / "test" / "0.tar").values())
        assert [_occupied_cells(m["png"]) for m in raw] == [len(c) for c in loaded.captions]
        for caps in loaded.captions:
            if name == "eval":
                assert set(caps) <= names
                if len(caps) >= 2:
                    assert frozenset(caps) not in train_sets
            else:
                assert set(caps) & held and set(caps) <= names | held


def test_eval_runner_logs_rprec_by_objects_and_no_by_m_split_without_several_captions(scenes, tmp_path):
    """A random micro model on the scenes: rprec, rprec_m1..m4, map and their chance values (m / the
    number of distinct captions); a one-caption-per-image set gets rprec and map but no rprec_m keys."""
    import torch

    from llip_core.config import SIZES
    from llip_core.model import LlipModel
    from llip_core.tokenizer import WordHashTokenizer
    from orchestrator.data.evalsets import write_eval_set
    from orchestrator.evaluation.runner import EvalRunner, format_eval_table

    torch.manual_seed(0)
    cfg = SIZES["micro"]
    tok = WordHashTokenizer(cfg.vocab_size, cfg.context_length)
    single = tmp_path / "single"
    raw = list(_tar_samples(scenes / "a" / "eval" / "test" / "0.tar").values())
    write_eval_set(str(single), ((m["png"], "png", [f"image {i}"]) for i, m in enumerate(raw)), RETRIEVAL)
    infos = [inspect_set(str(scenes / "a" / "eval"), name="scenes").to_dict(),
             inspect_set(str(single), name="single").to_dict()]
    out = EvalRunner(infos, cfg.image_size, tok, recall_k=(1, 5)).run(LlipModel(cfg))
    distinct = len({c for caps in load_set(inspect_set(str(scenes / "a" / "eval")), 16).captions for c in caps})
    for m in (1, 2, 3, 4):
        assert 0 <= out[f"eval/scenes/rprec_m{m}"] <= 1
        assert out[f"eval/scenes/chance_rprec_m{m}"] == pytest.approx(m / distinct)
    assert 0 <= out["eval/scenes/rprec"] <= 1 and 0 < out["eval/scenes/map"] <= 1
    assert "eval/single/rprec" in out and "eval/single/map" in out
    assert not any(k.startswith("eval/single/rprec_m") or k.startswith("eval/single/chance_rprec_m") for k in out)
    from orchestrator.evaluation.runner import curve_keys

    curves = curve_keys(out)
    assert "eval/scenes/rprec" in curves and "eval/single/rprec" not in curves and "eval/scenes/recall1" in curves
    table = format_eval_table(out, infos)
    row = next(ln for ln in table.splitlines() if ln.split()[:2] == ["scenes", "rprec_m2"])
    assert row.split()[-1] == f"{100 * 2 / distinct:.2f}%"  # its chance column


def test_scenes_reproduce_yaml_is_equal_budget_and_poses_the_four_questions():
    """9 named configurations x 3 seeds, differing only in their variant's own keys (and what those
    resolve: pooling, the initial bias), with one declared pair per comparison the README reads."""
    from orchestrator.config.schema import load_config
    from orchestrator.sweeps.tune import check_sweep, count_trials

    root = Path(__file__).resolve().parents[1] / "experiments"
    cfg = load_config(root / "scenes_reproduce.yaml")
    check_sweep(cfg)
    assert count_trials(cfg) == 27 and cfg.sweep.params["seed"].grid == [0, 1, 2]
    assert cfg.sweep.metric == "eval/scenes/rprec" and [s.name for s in cfg.eval.sets] == ["scenes"]
    flats = {name: cfg.with_overrides(ov).flat() for name, ov in cfg.sweep.variants.items()}
    allowed = {"loss.type", "model.pooling", "model.cross_heads", "loss.init_bias", "loss.init_logit_bias"}
    for name, f in flats.items():
        differ = {k for k in set(flats["clip"]) | set(f) if flats["clip"].get(k) != f.get(k)}
        assert differ <= allowed, (name, differ - allowed)
        assert f["model.mixture_tokens"] == 8 and f["data.batch_size"] == 128 and f["train.steps"] == cfg.train.steps
    auto = -np.log(128)
    bias = {n: f["loss.init_logit_bias"] for n, f in flats.items()}
    assert bias["clip"] is None and bias["llip_k8_infonce"] is None and bias["avg_k8_clip"] is None
    assert bias["siglip_b10"] == bias["llip_k8_b10"] == -10.0
    assert all(bias[n] == pytest.approx(auto, abs=1e-5) for n in ("siglip", "llip_k8", "avg_k8", "llip_k8_h1"))
    assert flats["llip_k8_h1"]["model.cross_heads"] == 1 and flats["llip_k8"]["model.cross_heads"] == 8
    assert flats["avg_k8"]["model.pooling"] == "avg" and flats["avg_k8_clip"]["model.pooling"] == "avg"
    pairs = {tuple(p) for p in cfg.sweep.pairs}
    # 1. conditioning or capacity, both losses; 2. baselines; 3. bias prior; 4. heads
    assert {("llip_k8", "avg_k8"), ("llip_k8_infonce", "avg_k8_clip"), ("llip_k8", "siglip"),
            ("llip_k8_infonce", "clip"), ("siglip", "siglip_b10"), ("llip_k8", "llip_k8_b10"),
            ("llip_k8_h1", "llip_k8")} == pairs
    for a, b in pairs:  # each pair differs in exactly the question's keys
        differ = {k for k in flats[a] if flats[a][k] != flats[b].get(k)} - {"loss.init_logit_bias", "loss.init_bias"}
        assert len(differ) <= 2, (a, b, differ)


def test_sweep_pairs_must_name_variants(tmp_path):
    from orchestrator.config.schema import ConfigError, load_config

    p = tmp_path / "x.yaml"
    p.write_text("name: x\nsweep:\n  variants: {a: {loss.type: clip}, b: {loss.type: siglip}}\n"
                 "  pairs: [[a, c]]\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "sweep.pairs: 'c' is not a variant" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_scenes_sweep_and_report_end_to_end(scenes, cli_env, tmp_path):
    """scenes.yaml swept as scenes_reproduce.yaml sweeps it, shrunk (2 of its configurations with
    their declared pair, 2 seeds, 6 steps; a child's sweep.variants would merge with the parent's,
    so the sweep is written whole), through `llip sweep` and `llip report` on a real local Ray and a
    real MLflow store: the
    trials log R-precision by m and mAP on the scenes, record the resolved initial bias (auto: -ln
    of the batch) and the bias's curve, and the report pairs what sweep.pairs declares, by m."""
    import math
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    root = Path(__file__).resolve().parents[1]
    exp = tmp_path / "mini.yaml"
    exp.write_text(f"""
base: {root / 'experiments' / 'scenes.yaml'}
name: scenes_mini
data: {{train: {scenes / 'a' / 'train'}, batch_size: 16, shuffle_buffer: 16}}
train: {{steps: 6, log_every: 3, warmup_steps: 1}}
eval: {{every: 3, sets: [{{path: {scenes / 'a' / 'eval'}, name: scenes}}]}}
storage_path: {tmp_path / 'runs'}
sweep:
  variants:
    llip_k8: {{loss.type: llip}}
    avg_k8: {{loss.type: siglip, model.pooling: avg}}
  params:
    seed: {{grid: [0, 1]}}
  pairs: [[llip_k8, avg_k8]]
  metric: eval/scenes/rprec
  shared_data: {{enabled: true}}  # as scenes_reproduce.yaml; auto would decide by this CPU's speed
""")
    r = subprocess.run([sys.executable, "-m", "orchestrator", "sweep", str(exp), "--max-concurrent-trials", "2"],
                       cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=780)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    c = MlflowClient(cli_env["MLFLOW_TRACKING_URI"])
    runs = c.search_runs([c.get_experiment_by_name("scenes_mini").experiment_id], max_results=20)
    parent = next(x for x in runs if x.data.tags.get("llip.sweep") == "true")
    assert json.loads(parent.data.tags["llip.sweep.pairs"]) == [["llip_k8", "avg_k8"]]
    children = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4 and all(x.info.status == "FINISHED" for x in children)
    for x in children:
        m = x.data.metrics
        assert {f"eval/scenes/rprec_m{k}" for k in (1, 2, 3, 4)} <= set(m) and "eval/scenes/map" in m
        assert 0 <= m["eval/scenes/rprec"] <= 1
        assert x.data.params["loss.init_bias"] == "auto"
        assert float(x.data.params["loss.init_logit_bias"]) == pytest.approx(-math.log(16), abs=1e-5)
        bias = sorted(c.get_metric_history(x.info.run_id, "train/logit_bias"), key=lambda h: h.step)
        assert [h.step for h in bias] == [3, 6] and abs(bias[0].value + math.log(16)) < 0.05  # started at the prior
    r = subprocess.run([sys.executable, "-m", "orchestrator", "report", parent.info.run_id], cwd=tmp_path,
                       env=cli_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "eval/scenes: R-precision by m" in r.stdout and "paired by seed (declared pairs):" in r.stdout
    row = next(ln.split() for ln in r.stdout.splitlines() if ln.split()[:3] == ["llip_k8", "avg_k8", "eval/scenes/rprec_m4"])
    assert re.fullmatch(r"[+-]\d\.\d{4}", row[3]) and row[5] == "2", row  # a mean difference over 2 seeds
    names = {a.path.rsplit("/", 1)[-1] for a in c.list_artifacts(parent.info.run_id, "report")}
    assert {"report.md", "rprec_by_m.png"} <= names
