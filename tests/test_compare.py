"""`llip compare` on a sweep recorded in a real MLflow SQLite store (laid out the way `llip sweep`
writes it: a parent run tagged with the sweep's params/metric/mode and one child per trial)."""
import json

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.cli import main
from orchestrator.tracking.store import experiment_id

pytestmark = pytest.mark.timeout(180)

TRIALS = [  # (K, loss type, final R@1 or None for a crashed trial)
    (4, "llip", 0.031),
    (16, "llip", 0.052),
    (4, "llip_infonce", None),
    (16, "llip_infonce", 0.012),
]


def make_sweep(uri: str) -> str:
    c = MlflowClient(uri)
    exp = experiment_id(c, "fake_sweep")
    parent = c.create_run(exp, run_name="fake_sweep-sweep", tags={
        "llip.sweep": "true", "llip.run_name": "fake_sweep-sweep",
        "llip.sweep.params": json.dumps(["model.mixture_tokens", "loss.type"]),
        "llip.sweep.metric": "eval/i2t_r1", "llip.sweep.mode": "max"})
    pid = parent.info.run_id
    for i, (k, loss, r1) in enumerate(TRIALS):
        run = c.create_run(exp, run_name=f"fake_sweep-t{i}", tags={
            "mlflow.parentRunId": pid, "llip.trial_id": f"t{i}", "llip.run_name": f"fake_sweep-t{i}"})
        rid = run.info.run_id
        c.log_param(rid, "model.mixture_tokens", str(k))
        c.log_param(rid, "loss.type", loss)
        c.log_param(rid, "train.steps", "20")
        for step in (10, 20):
            c.log_metric(rid, "train/loss", 5.0 - step / 10 - (r1 or 0), step=step)
        if r1 is None:
            c.set_tag(rid, "llip.error", "RuntimeError: rank 0: the training shard yielded no full batch")
            c.set_terminated(rid, "FAILED")
        else:
            c.log_metric(rid, "eval/i2t_r1", r1, step=20)
            c.set_terminated(rid, "FINISHED")
    c.set_terminated(pid, "FINISHED")
    return pid


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('cmp') / 'mlflow.db'}"
    return uri, make_sweep(uri)


def llip(capsys, *args):
    capsys.readouterr()
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_compare_prints_trials_sorted_by_metric_and_logs_plot(sweep, capsys, tmp_path):
    uri, pid = sweep
    for target in ("fake_sweep", "fake_sweep-sweep", pid):  # experiment, parent run name, run id
        rc, out, err = llip(capsys, "compare", target, "--tracking-uri", uri)
        assert rc == 0, err[-2000:]
        lines = out.splitlines()
        header = next(i for i, line in enumerate(lines) if line.startswith("#"))
        assert "model.mixture_tokens" in lines[header] and "loss.type" in lines[header]
        rows = [line.split() for line in lines[header + 2: header + 2 + len(TRIALS)]]
        # best first (mode max), the crashed trial (no metric) last
        assert [row[1] for row in rows] == ["fake_sweep-t1", "fake_sweep-t0", "fake_sweep-t3", "fake_sweep-t2"]
        assert rows[0][4:7] == ["16", "llip", "0.0520"]
        assert rows[-1][3] == "FAILED"
        assert "fake_sweep-t2 failed: RuntimeError" in out

    c = MlflowClient(uri)
    arts = {a.path for a in c.list_artifacts(pid, "compare")}
    assert {"compare/comparison.png", "compare/trials.csv", "compare/trials.txt"} <= arts
    png = c.download_artifacts(pid, "compare/comparison.png", str(tmp_path))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    parent = c.get_run(pid)
    assert parent.data.tags["llip.best_run_id"] == next(
        r.info.run_id for r in c.search_runs([parent.info.experiment_id]) if r.info.run_name == "fake_sweep-t1")
    assert parent.data.metrics["best/eval/i2t_r1"] == pytest.approx(0.052)


def test_compare_min_mode_and_metric_override(sweep, capsys):
    uri, _ = sweep
    rc, out, err = llip(capsys, "compare", "fake_sweep", "--metric", "train/loss", "--mode", "min", "--no-log",
                        "--tracking-uri", uri)
    assert rc == 0, err
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("#"))
    first = lines[header + 2].split()
    assert first[1] == "fake_sweep-t1"  # lowest final loss (5 - 2 - 0.052)


def test_compare_unknown_target_is_one_line(sweep, capsys):
    uri, _ = sweep
    rc, out, err = llip(capsys, "compare", "no_such_thing", "--tracking-uri", uri)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("llip: error:") and "no_such_thing" in err
