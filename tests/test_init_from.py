"""`train.init_from` refusals (before Ray starts and before any MLflow run exists) and `llip eval` on an
export folder. The run that really starts from exported weights: tests/test_models_e2e.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import ROOT
from orchestrator.cli import main as llip_main
from test_models_export import make_checkpoint

pytestmark = pytest.mark.timeout(300)


def micro_yaml(tmp_path: Path, emoji_shards: Path, **model) -> Path:
    lines = "".join(f"  {k}: {v}\n" for k, v in model.items())
    f = tmp_path / "micro.yaml"
    f.write_text(f"base: {ROOT / 'experiments' / 'base.yaml'}\nname: micro_init\nmodel:\n  size: micro\n  mixture_tokens: 4\n{lines}"
                 f"data:\n  train: {emoji_shards / 'train'}\n  eval: null\n  batch_size: 8\n"
                 f"storage_path: {tmp_path / 'runs'}\nmlflow:\n  tracking_uri: sqlite:///{tmp_path / 'mlflow.db'}\n")
    return f


@pytest.fixture
def micro_export(tmp_path):
    ckpt, core = make_checkpoint(tmp_path, "llip")
    out = tmp_path / "export"
    assert llip_main(["export", str(ckpt), "--out", str(out)]) == 0
    return out


def one_error_line(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("llip: error:")]
    assert len(err) == 1, err
    return err[0]


def test_init_from_that_does_not_fit_fails_in_one_line_before_ray(micro_export, emoji_shards, tmp_path, capsys):
    f = micro_yaml(tmp_path, emoji_shards)
    cases = [
        (["--set", "model.mixture_tokens=6"], "tensor k_proj has shape (4, 32, 32) there, the YAML's model expects (6, 32, 32); set model.* to the source's (mixture_tokens 4)"),
        (["--set", "loss.type=clip"], "holds a llip model (loss llip) but the YAML asks for pooling cls (loss clip)"),
        (["--set", "model.vocab=full", "--set", "model.vocab_size=49408"], "was trained with tokenizer clip_bpe/compact"),
        (["--set", f"train.init_from={tmp_path / 'nowhere'}"], "no such folder, and no MLflow run with that id or name"),
    ]
    for extra, text in cases:
        args = ["run", str(f), "--set", f"train.init_from={micro_export}", *extra]
        assert llip_main(args) == 2
        line = one_error_line(capsys)
        assert "train.init_from" in line and text in line, line
    db = tmp_path / "mlflow.db"
    if db.exists():  # the preflight may open the store; no run was created in it
        c = MlflowClient(f"sqlite:///{db}")
        exp = c.get_experiment_by_name("micro_init")
        assert exp is None or not c.search_runs([exp.experiment_id])
    assert not (tmp_path / "runs").exists()


def test_the_fit_check_reads_a_checkpoint_source_too(tmp_path, emoji_shards):
    from orchestrator.config.schema import load_config
    from orchestrator.errors import UserError
    from orchestrator.training import initweights

    ckpt, _ = make_checkpoint(tmp_path, "llip")
    cfg = load_config(micro_yaml(tmp_path, emoji_shards)).with_overrides({"train.init_from": str(ckpt)})
    src = initweights.resolve(cfg)
    assert src.kind == "checkpoint" and src.location.endswith("state.pt") and src.tokenizer["vocab"] == "compact"
    from orchestrator.training.tokenization import with_vocab_size

    initweights.check_fits(with_vocab_size(cfg, src.tokenizer), src)  # fits
    with pytest.raises(UserError, match=r"tensor k_proj has shape \(4, 32, 32\) there, the YAML's model expects \(4, 32, 64\)"):
        initweights.check_fits(with_vocab_size(cfg.with_overrides({"model.embed_dim": 64}), src.tokenizer), src)
    w = initweights.load_weights(src)
    state = torch.load(ckpt / "state.pt", weights_only=False)
    assert torch.equal(w["mixture_tokens"], state["model"]["model.mixture_tokens"]) and "logit_bias" in w


def test_llip_eval_on_an_imported_official_export(tmp_path, capsys):
    """`llip eval DIR` on `llip import-official`'s folder: the README's recipe for the released files."""
    import gzip

    from orchestrator.data.evalsets import write_eval_set
    from test_official_import import FIXTURES, heads_args

    meta = json.loads((FIXTURES / "official_llip_micro.json").read_text())
    f = tmp_path / "llip_micro.pt"
    f.write_bytes(gzip.decompress((FIXTURES / "official_llip_micro.pt.gz").read_bytes()))
    out = tmp_path / "imported"
    assert llip_main(["import-official", str(f), "--out", str(out), *heads_args(meta)]) == 0
    import io

    from PIL import Image

    def png(i):
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), ((50 * i) % 256, (90 * i) % 256, (20 * i) % 256)).save(buf, format="png")
        return buf.getvalue()

    write_eval_set(str(tmp_path / "shapes"), [(png(i), "png", i % 3) for i in range(12)], "classification",
                   classnames=["circle", "square", "star"], templates=["a {c}.", "a photo of a {c}."])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    capsys.readouterr()
    assert llip_main(["eval", str(out), "--set", str(tmp_path / "shapes"), "--tau", "1", "5",
                      "--tracking-uri", uri]) == 0
    printed = capsys.readouterr().out
    assert "evaluated export" in printed and "shapes" in printed
    c = MlflowClient(uri)
    run = c.search_runs([c.get_experiment_by_name("llip-exports").experiment_id])[0]
    assert run.data.tags["llip.export"] == str(out)
    assert {"eval/shapes/top1_tau1", "eval/shapes/top1_tau5"} <= set(run.data.metrics)
    assert llip_main(["eval", str(out), "--tracking-uri", uri]) == 2
    assert "an export names no eval sets of its own; pass --set PATH" in capsys.readouterr().err
