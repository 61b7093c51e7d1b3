"""`llip run` end to end: real local Ray cluster, Ray Data over real shards, 2 TorchTrainer workers,
a real MLflow SQLite store read back afterwards."""
import json
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import ROOT, llip_cmd

pytestmark = [pytest.mark.slow]


def run_llip(args, env, cwd, timeout=420):
    return subprocess.run(llip_cmd(*args), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(480)
def test_smoke_run_trains_logs_checkpoints_and_evaluates_every_n_steps(emoji_shards, cli_env, tmp_path):
    # eval.sets beside data.eval: the emoji held-out retrieval set and, where Debian's package is
    # installed, 200 Fashion-MNIST images for zero-shot classification at two Llip temperatures
    from orchestrator.cli import main as llip_main

    fm_path = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
    sets = [tmp_path / "emoji_heldout"] + ([tmp_path / "fashion_mnist"] if fm_path.is_file() else [])
    assert llip_main(["shards", "emoji-heldout", "--out", str(sets[0]), "-q"]) == 0
    if len(sets) > 1:
        assert llip_main(["shards", "fashion-mnist", "--out", str(sets[1]), "--limit", "200", "-q"]) == 0
    r = run_llip([
        "run", ROOT / "experiments" / "smoke.yaml",
        "--set", f"data.train={emoji_shards / 'train'}",
        "--set", f"data.eval={emoji_shards / 'eval'}",
        "--set", f"storage_path={tmp_path / 'runs'}",
        "--set", "train.peak_flops=1e12",  # a number gives MFU on a CPU too
        "--set", f"eval.sets=[{', '.join(map(str, sets))}]", "--set", "eval.every=12", "--set", "eval.tau=[1, 5]",
    ], cli_env, tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "held-out image->text R@1" in r.stdout and "mlflow ui --backend-store-uri" in r.stdout
    progress = [ln for ln in r.stdout.splitlines() if "[llip] step " in ln]  # Ray prefixes the worker's pid
    assert progress and all(" samples/s data-wait " in ln and " MFU " in ln and " ETA " in ln for ln in progress), progress

    c = MlflowClient(cli_env["MLFLOW_TRACKING_URI"])
    exp = c.get_experiment_by_name("smoke")
    runs = c.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    # every resolved config value is a param, model values resolved through the named size
    assert run.data.params["model.width"] == "64"
    assert run.data.params["model.mixture_tokens"] == "4"
    assert run.data.params["train.steps"] == "30"
    assert run.data.params["data.train"] == str(emoji_shards / "train")
    hist = sorted(c.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
    assert [m.step for m in hist] == [5, 10, 12, 15, 20, 24, 25, 30]  # every log_every, and with each evaluation
    assert hist[-1].value < hist[0].value - 0.05, [m.value for m in hist]
    for key in ("train/lr", "train/logit_scale", "train/samples_per_s", "eval/i2t_recall1", "data/skipped"):
        assert c.get_metric_history(run.info.run_id, key), key
    step = {k: c.get_metric_history(run.info.run_id, f"train/{k}")[-1].value
            for k in ("step_time_s", "data_wait_s", "compute_s", "data_wait_share", "mfu")}
    assert step["data_wait_s"] + step["compute_s"] == pytest.approx(step["step_time_s"], rel=1e-6)
    assert 0 <= step["data_wait_share"] <= 1 and 0 < step["mfu"] < 1, step
    assert c.get_metric_history(run.info.run_id, "data/skipped")[-1].value == 0
    arts = {a.path for a in c.list_artifacts(run.info.run_id)} | {
        a.path for d in ("config", "plots", "eval") for a in c.list_artifacts(run.info.run_id, d)}
    assert {"config/experiment.yaml", "plots/curves.png", "eval/final.json", "eval/final.md"} <= arts
    final = json.loads(Path(c.download_artifacts(run.info.run_id, "eval/final.json", str(tmp_path))).read_text())
    assert final["step"] == 30
    from orchestrator.tracking.store import git_commit, package_version
    assert run.data.tags["llip.version"] == package_version() != "unknown"
    assert run.data.tags["llip.git_commit"] == git_commit()
    ckpt = Path(run.data.tags["llip.checkpoint"])
    assert ckpt.is_dir() and (ckpt / "state.pt").is_file()
    assert str(ckpt).startswith(str(tmp_path / "runs"))

    # evaluation every 12 steps, whatever log_every (5), plus the end; data.eval keeps its historic names
    def steps(key):
        return sorted(m.step for m in c.get_metric_history(run.info.run_id, key))

    assert steps("eval/emoji_heldout/recall1") == steps("eval/recall1") == [12, 24, 30]
    assert "eval/emoji_heldout/i2t_recall5" in final
    if len(sets) > 1:
        assert "fashion_mnist top1_tau5" in r.stdout
        assert steps("eval/fashion_mnist/top1_tau5") == [12, 24, 30]
        assert all(0.0 <= m.value <= 1.0 for m in c.get_metric_history(run.info.run_id, "eval/fashion_mnist/top1_tau1"))
        assert run.data.metrics["eval/fashion_mnist/num_samples"] == 200
        assert "eval/fashion_mnist/top5_tau5" in final


@pytest.mark.timeout(180)
def test_missing_shard_dir_fails_in_one_line_before_mlflow(cli_env, tmp_path):
    missing = tmp_path / "no-such-shards"
    r = run_llip(["run", ROOT / "experiments" / "smoke.yaml", "--set", f"data.train={missing}"], cli_env, tmp_path,
                 timeout=150)
    assert r.returncode != 0
    err = [line for line in r.stderr.splitlines() if line.startswith("llip: error:")]
    assert len(err) == 1 and str(missing) in err[0], r.stderr[-2000:]
    db = Path(cli_env["MLFLOW_TRACKING_URI"][len("sqlite:///"):])
    if db.exists():
        c = MlflowClient(cli_env["MLFLOW_TRACKING_URI"])
        exp = c.get_experiment_by_name("smoke")
        assert exp is None or not c.search_runs([exp.experiment_id])


@pytest.mark.timeout(600)
def test_same_machine_commit_and_seed_give_identical_loss_histories(emoji_shards, cli_env, tmp_path):
    """Two smoke runs launched one after the other from this test (2 workers each): every step's
    samples and every rank's loss are the same, bit for bit. Figures from another CPU may differ (its
    kernels round differently); figures from this machine must not."""
    trace = tmp_path / "trace"
    env = dict(cli_env, LLIP_TRACE_STEPS=str(trace))
    losses = {}
    for name in ("first", "second"):
        r = run_llip(["run", ROOT / "experiments" / "smoke.yaml", "--run-name", name,
                      "--set", f"data.train={emoji_shards / 'train'}", "--set", "data.eval=null",
                      "--set", f"storage_path={tmp_path / 'runs'}", "--set", "train.steps=12",
                      "--set", "train.checkpoint_every=0"], env, tmp_path)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        ranks = [[json.loads(ln) for ln in (trace / f"{name}-rank{k}.jsonl").read_text().splitlines()] for k in (0, 1)]
        assert [len(t) for t in ranks] == [12, 12]
        losses[name] = [[(s["step"], s["ids"], s["loss"]) for s in t] for t in ranks]
        c = MlflowClient(cli_env["MLFLOW_TRACKING_URI"])
        run = c.search_runs([c.get_experiment_by_name("smoke").experiment_id], f"tags.`llip.run_name` = '{name}'")[0]
        losses[name].append([(m.step, m.value) for m in sorted(c.get_metric_history(run.info.run_id, "train/loss"),
                                                               key=lambda m: m.step)])
    assert losses["first"] == losses["second"]
    assert losses["first"][0][0][1] != losses["first"][1][0][1]  # the ranks saw different samples
