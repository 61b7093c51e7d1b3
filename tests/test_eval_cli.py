"""The `eval:` section, `llip eval` on a real checkpoint with a real MLflow SQLite store, `llip compare`
ranking by an eval metric, and the driver's preflight of bad sets. (Evaluation every N steps inside a
real run is checked by tests/test_run_e2e.py's smoke run.)"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import ROOT
from orchestrator.cli import main as llip_main
from orchestrator.config.schema import ConfigError, load_config, parse_config
from orchestrator.data.evalsets import CLASSIFICATION, inspect_set, load_set, write_eval_set

pytestmark = pytest.mark.timeout(300)


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------
def test_eval_section_parses_paths_names_and_tau():
    cfg = load_config(ROOT / "experiments" / "demo.yaml")
    assert cfg.eval_interval() == 50 and {s.path for s in cfg.eval.sets} >= {"data/eval/fashion_mnist"}
    cfg = cfg.with_overrides({"eval.sets": ["x/fm", {"path": "y/eval", "max_samples": 10}], "eval.tau": [1, 5],
                              "eval.every": 0, "train.eval_every": 7})
    assert [s.path for s in cfg.eval.sets] == ["x/fm", "y/eval"] and cfg.eval.tau == [1.0, 5.0]
    assert cfg.eval_interval() == 7  # train.eval_every still works when eval.every is unset
    with pytest.raises(ConfigError, match="both named 'fm'"):
        cfg.with_overrides({"eval.sets": ["a/fm", "b/fm"]})
    with pytest.raises(ConfigError, match="eval.tau"):
        cfg.with_overrides({"eval.tau": [0]})
    with pytest.raises(ConfigError, match=r"eval.sets.0.colour: unknown key"):
        cfg.with_overrides({"eval.sets": [{"path": "a", "colour": 1}]})


# ---------------------------------------------------------------------------------------------
# llip eval on a checkpoint, then on the run it created, then compare
# ---------------------------------------------------------------------------------------------
def _toy_sets(root: Path):
    """A 4-class classification set and a retrieval set with two captions per image, tiny images."""
    from PIL import Image
    import io

    def png(i):
        buf = io.BytesIO()
        Image.new("RGB", (12, 12), ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256)).save(buf, format="png")
        return buf.getvalue()

    write_eval_set(str(root / "shapes"), [(png(i), "png", i % 4) for i in range(24)], CLASSIFICATION,
                   classnames=["circle", "square", "star", "heart"], templates=["a {c}.", "a drawing of a {c}."])
    write_eval_set(str(root / "pairs"), [(png(i), "png", [f"thing number {i}", f"item {i}"]) for i in range(10)],
                   "retrieval")
    return root / "shapes", root / "pairs"


def _checkpoint(tmp_path: Path, step: int = 7) -> tuple[Path, object]:
    from llip_core.task import build_task
    from llip_core.tokenizer import build_compact_spec
    from orchestrator.training.tokenization import with_vocab_size
    from orchestrator.config.schema import yaml_spec

    cfg = parse_config({"name": "evaltoy", "model": {"size": "micro", "image_size": 16, "patch_size": 8},
                        "loss": {"type": "llip"}, "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}})
    # a compact vocabulary over "training" captions that cover the toy sets' words, as a run builds it
    words = ["a circle square star heart drawing of thing number item"] + [str(i) for i in range(30)]
    spec = build_compact_spec(yaml_spec(cfg), words)
    cfg = with_vocab_size(cfg, spec)
    torch.manual_seed(0)
    core = build_task(cfg.resolved_model(), cfg.loss.type)
    d = tmp_path / "ckpt" / "checkpoint_000001"
    d.mkdir(parents=True)
    torch.save({"model": core.state_dict(), "optimizer": {}, "step": step, "epoch": 0,
                "config": cfg.model_dump(mode="json"), "tokenizer": spec}, d / "state.pt")
    return d, core.model.eval()


def test_llip_eval_checkpoint_logs_a_new_run_then_into_it_by_id_and_compare_ranks(tmp_path, monkeypatch, capsys):
    from llip_core.evaluate import retrieval_recall, zero_shot_classify
    from llip_core.preprocess import normalize
    from llip_core.tokenizer import build_tokenizer

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    shapes, pairs = _toy_sets(tmp_path)
    ckpt, model = _checkpoint(tmp_path)

    rc = llip_main(["eval", str(ckpt), "--set", str(shapes), "--set", str(pairs)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "shapes" in out and "top1" in out and "pairs" in out and "t2i_recall1" in out

    # the numbers equal llip_core's on the same decoded data
    tok = build_tokenizer(torch.load(ckpt / "state.pt", weights_only=False)["tokenizer"])
    s = load_set(inspect_set(str(shapes)), 16)
    want_top1 = zero_shot_classify(model, torch.from_numpy(normalize(s.images)), s.labels, s.info.classnames,
                                   s.info.templates, tok)["top1"]
    p = load_set(inspect_set(str(pairs)), 16)
    flat = [c for caps in p.captions for c in caps]
    owner = torch.tensor([i for i, caps in enumerate(p.captions) for _ in caps])
    want_r = retrieval_recall(model, torch.from_numpy(normalize(p.images)), torch.as_tensor(tok(flat)), ks=(1, 5),
                              caption_image=owner)

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("evaltoy")
    runs = c.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["llip.checkpoint"] == str(ckpt) and run.data.tags["llip.eval_only"] == "true"
    m = run.data.metrics
    assert m["eval/shapes/top1"] == pytest.approx(want_top1)
    assert m["eval/pairs/recall1"] == pytest.approx(want_r["r@1"])
    assert m["eval/pairs/t2i_recall5"] == pytest.approx(want_r["t2i_r@5"])
    assert m["eval/shapes/num_samples"] == 24 and m["eval/pairs/num_samples"] == 10
    assert m["eval/pairs/chance_t2i_recall1"] == pytest.approx(1 / 10)  # distinct captions: k / N
    assert c.get_metric_history(run.info.run_id, "eval/shapes/top1")[0].step == 7
    final = json.loads(Path(c.download_artifacts(run.info.run_id, "eval/final.json", str(tmp_path))).read_text())
    assert final["eval/shapes/top1"] == pytest.approx(want_top1)

    # by run id: the same run, now with one top-1 per tau
    rc = llip_main(["eval", run.info.run_id, "--set", str(shapes), "--tau", "1", "5"])
    assert rc == 0
    m = c.get_run(run.info.run_id).data.metrics
    assert {"eval/shapes/top1_tau1", "eval/shapes/top1_tau5"} <= set(m)
    assert len(c.search_runs([exp.experiment_id])) == 1

    capsys.readouterr()
    assert llip_main(["compare", "evaltoy", "--metric", "eval/shapes/top1_tau5", "--no-log"]) == 0
    table = capsys.readouterr().out
    assert "eval/shapes/top1_tau5 (max)" in table and f"{m['eval/shapes/top1_tau5']:.4f}" in table


def test_llip_eval_bad_target_and_bad_set_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert llip_main(["eval", str(tmp_path / "nope")]) == 2
    assert "neither a checkpoint path nor an MLflow run" in capsys.readouterr().err
    ckpt, _ = _checkpoint(tmp_path)
    bad = tmp_path / "bad"
    write_eval_set(str(bad), [(b"not an image", "png", 0)], CLASSIFICATION, classnames=["a"])
    (bad / "classnames.txt").unlink()
    assert llip_main(["eval", str(ckpt), "--set", str(bad)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("llip: error:")]
    assert len(err) == 1 and str(bad) in err[0] and "classnames.txt" in err[0]


def test_run_with_a_bad_eval_set_fails_before_training_in_one_line(emoji_shards, tmp_path, monkeypatch, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    shapes, _ = _toy_sets(tmp_path)
    (shapes / "classnames.txt").write_text("circle\nsquare\n")  # labels go up to 3
    rc = llip_main(["run", str(ROOT / "experiments" / "smoke.yaml"), "--set", f"data.train={emoji_shards / 'train'}",
                    "--set", f"data.eval={emoji_shards / 'eval'}", "--set", f"eval.sets=[{shapes}]",
                    "--set", f"storage_path={tmp_path / 'runs'}"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("llip: error:")]
    assert rc == 2 and len(err) == 1, err
    assert str(shapes) in err[0] and "class index 2 out of range" in err[0]
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("smoke")
    assert exp is None or not c.search_runs([exp.experiment_id])


# In training (every eval.every steps on rank 0, a curve per set, final values in eval/final.json):
# the smoke run in tests/test_run_e2e.py.
