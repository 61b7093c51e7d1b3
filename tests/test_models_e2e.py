"""Issue 25 end to end on real Ray runs: the smoke run logs its MLflow model; `llip export RUN` writes
the folder with its model card; the folder loads in a fresh process that never imports ray or mlflow
and gives the training checkpoint's scores; `llip register` + `mlflow.pyfunc.load_model` give them
too; a second run starts from the export (`train.init_from`: step 0, fresh optimizer, tagged)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import ROOT, llip_cmd
from test_models_export import TEXTS, images, load_fresh, reference_scores

pytestmark = [pytest.mark.slow]


def run_llip(args, env, cwd, timeout=420):
    return subprocess.run(llip_cmd(*args), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(900)
def test_smoke_run_exports_loads_anywhere_registers_and_seeds_a_new_run(emoji_shards, cli_env, tmp_path):
    import mlflow

    common = ["--set", f"data.train={emoji_shards / 'train'}", "--set", f"storage_path={tmp_path / 'runs'}"]
    r = run_llip(["run", ROOT / "experiments" / "smoke.yaml", "--run-name", "src",
                  "--set", f"data.eval={emoji_shards / 'eval'}", *common], cli_env, tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "[llip] logged the model as models:/" in r.stdout
    uri = cli_env["MLFLOW_TRACKING_URI"]
    c = MlflowClient(uri)
    src = c.search_runs([c.get_experiment_by_name("smoke").experiment_id], "tags.`llip.run_name` = 'src'")[0]
    assert src.info.status == "FINISHED" and src.data.tags["llip.mlflow_model"].startswith("models:/")

    out = tmp_path / "export"
    r = run_llip(["export", "src", "--out", out], cli_env, tmp_path, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    card = (out / "README.md").read_text()
    for fact in (src.info.run_id, "experiment `smoke`", src.data.tags["llip.data_manifest"], "curation: none",
                 "eval/recall1", src.data.tags["llip.git_commit"]):
        assert fact in card, fact
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["source"]["run_id"] == src.info.run_id and cfg["source"]["step"] == 30

    ckpt = Path(src.data.tags["llip.checkpoint"])
    state = torch.load(ckpt / "state.pt", weights_only=False)
    from orchestrator.storage.checkpoints import load_checkpoint

    _, _, model = load_checkpoint(str(ckpt / "state.pt"))

    class _Core:  # reference_scores takes a task-like object
        pass

    core = _Core()
    core.model = model
    imgs = images(4, size=40)
    ref = reference_scores(core, imgs, TEXTS, state["tokenizer"])
    got = load_fresh(out, imgs, TEXTS)
    assert got["modules"] == []  # neither ray, mlflow nor orchestrator was imported to use the model
    assert np.abs(np.asarray(got["scores"]) - ref.numpy()).max() <= 1e-6

    r = run_llip(["register", "src", "--alias", "best"], cli_env, tmp_path, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    mlflow.set_tracking_uri(uri)
    try:
        pred = mlflow.pyfunc.load_model("models:/smoke@best").predict(
            __import__("pandas").DataFrame({"image": imgs, "text": TEXTS[:4]}))
    finally:
        mlflow.set_tracking_uri(None)
    assert np.abs(np.stack(pred["scores"].to_numpy()) - ref[:, :4].numpy()).max() <= 1e-6

    # a new run from the export: its own step 0 and optimizer, the source's weights
    r = run_llip(["run", ROOT / "experiments" / "smoke.yaml", "--run-name", "tuned", "--set", f"train.init_from={out}",
                  "--set", "train.steps=2", "--set", "data.eval=null", "--set", "mlflow.log_model=false", *common],
                 cli_env, tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"initialised from {out}" in r.stdout
    tuned = c.search_runs([src.info.experiment_id], "tags.`llip.run_name` = 'tuned'")[0]
    assert tuned.data.tags["llip.init_from"] == str(out) and tuned.data.tags["llip.init_from.run_id"] == src.info.run_id
    assert "llip.mlflow_model" not in tuned.data.tags
    new = torch.load(Path(tuned.data.tags["llip.checkpoint"]) / "state.pt", weights_only=False)
    assert new["step"] == 2 and new["tokenizer"] == state["tokenizer"]
    assert all(int(s["step"]) == 2 for s in new["optimizer"]["state"].values())  # fresh AdamW: 2 updates, not 32
    from llip_core.task import build_task
    from orchestrator.config.schema import parse_config

    tcfg = parse_config(new["config"])
    torch.manual_seed(tcfg.seed)
    fresh = build_task(tcfg.resolved_model(), tcfg.loss.type).state_dict()  # what step 0 would be without init_from
    key = "model.k_proj"
    to_source = (new["model"][key] - state["model"][key]).abs().max()
    to_fresh = (new["model"][key] - fresh[key]).abs().max()
    assert to_source < to_fresh / 5, (float(to_source), float(to_fresh))
