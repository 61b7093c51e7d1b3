"""`llip report` on sweeps recorded in a real MLflow SQLite store, laid out as `llip sweep` writes
them with sweep.variants: a parent tagged llip.sweep, children tagged mlflow.parentRunId and
llip.variant, with a `seed` param. Expected statistics come from the equations, written here."""
import json
import math
import os
import tempfile

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.tracking import report
from orchestrator.cli import main
from orchestrator.tracking.store import experiment_id

pytestmark = pytest.mark.timeout(180)

# configuration -> seed -> final held-out recall@1; Llip's Fashion-MNIST top-1 per tau below
R1 = {
    "clip": {0: 0.010, 1: 0.014, 2: 0.009},
    "siglip": {0: 0.012, 1: 0.011, 2: 0.016},
    "llip_k8": {0: 0.030, 1: 0.026, 2: 0.035},
}
FM = {  # eval/fashion_mnist/top1 (clip, siglip) or top1_tau5 (llip, trained at tau 5)
    "clip": {0: 0.20, 1: 0.25, 2: 0.22},
    "siglip": {0: 0.21, 1: 0.19, 2: 0.30},
    "llip_k8": {0: 0.31, 1: 0.27, 2: 0.26},
}


def ref_mean(xs):
    return sum(xs) / len(xs)


def ref_std(xs):  # sample standard deviation, ddof = 1
    m = ref_mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def make_sweep(uri, exp_name, trials, *, failed=()):
    """trials: [(config, seed, r1, fm)]; failed: [(config, seed)] recorded as FAILED runs."""
    c = MlflowClient(uri)
    exp = experiment_id(c, exp_name)
    parent = c.create_run(exp, run_name=f"{exp_name}-sweep", tags={
        "llip.sweep": "true", "llip.run_name": f"{exp_name}-sweep",
        "llip.sweep.params": json.dumps(["variant", "seed"]),
        "llip.sweep.metric": "eval/recall1", "llip.sweep.mode": "max"})
    pid = parent.info.run_id
    for i, (cfg, seed, r1, fm) in enumerate(list(trials) + [(c_, s_, None, None) for c_, s_ in failed]):
        run = c.create_run(exp, run_name=f"{exp_name}-{cfg}-t{i}", tags={
            "mlflow.parentRunId": pid, "llip.trial_id": f"t{i}", "llip.variant": cfg})
        rid = run.info.run_id
        llip = cfg.startswith("llip")
        c.log_param(rid, "seed", str(seed))
        c.log_param(rid, "model.pooling", "llip" if llip else "cls")
        c.log_param(rid, "model.tau", "5.0")
        if r1 is None:
            c.set_tag(rid, "llip.error", "RuntimeError: out of memory")
            c.set_terminated(rid, "FAILED")
            continue
        for step in (50, 100):
            frac = step / 100
            c.log_metric(rid, "train/loss", 5.0 - frac - seed * 0.1, step=step)
            c.log_metric(rid, "eval/recall1", r1 * frac, step=step)
            if llip:
                for tau in (1, 5, 10):
                    # tau 1 is deliberately best: the report must still take the training tau (5)
                    c.log_metric(rid, f"eval/fashion_mnist/top1_tau{tau}", (fm + (0.1 if tau == 1 else 0)) * frac, step=step)
            else:
                c.log_metric(rid, "eval/fashion_mnist/top1", fm * frac, step=step)
            c.log_metric(rid, "eval/fashion_mnist/seconds", 3.0, step=step)
        c.set_terminated(rid, "FINISHED")
    c.set_terminated(pid, "FINISHED")
    return c, pid


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('rep') / 'mlflow.db'}"
    trials = [(cfg, s, R1[cfg][s], FM[cfg][s]) for cfg in R1 for s in (0, 1, 2)]
    c, pid = make_sweep(uri, "repro", trials, failed=[("siglip", 1)])
    return uri, c, pid


def test_mean_std_and_paired_differences_exact(full):
    uri, c, pid = full
    rep = report.collect(c, pid)
    assert rep.configs[0] == "clip" and set(rep.configs) == set(R1)
    assert rep.headline == ["eval/recall1", "eval/fashion_mnist/top1", "train/loss"]
    for cfg in R1:
        xs = [R1[cfg][s] for s in (0, 1, 2)]
        st = rep.stat(cfg, "eval/recall1")
        assert st.n == 3
        assert st.mean == pytest.approx(ref_mean(xs), abs=1e-12)
        assert st.std == pytest.approx(ref_std(xs), abs=1e-12)
        # Llip's zero-shot headline is the training tau's value, not the best tau's
        fm = rep.stat(cfg, "eval/fashion_mnist/top1")
        assert fm.mean == pytest.approx(ref_mean([FM[cfg][s] for s in (0, 1, 2)]), abs=1e-12)
    pairs = {(p.config, p.metric): p for p in rep.paired()}
    for cfg in ("siglip", "llip_k8"):
        for metric, table in (("eval/recall1", R1), ("eval/fashion_mnist/top1", FM)):
            d = [table[cfg][s] - table["clip"][s] for s in (0, 1, 2)]
            p = pairs[(cfg, metric)]
            assert p.n == 3 and p.seeds == [0, 1, 2]
            assert p.mean == pytest.approx(ref_mean(d), abs=1e-12)
            assert p.std == pytest.approx(ref_std(d), abs=1e-12)
            spread = max(ref_std([table[cfg][s] for s in (0, 1, 2)]), ref_std([table["clip"][s] for s in (0, 1, 2)]))
            assert p.exceeds == (abs(ref_mean(d)) > spread)
    # llip_k8's recall gain (about +0.019) is far outside a spread of about 0.004; siglip's is not
    assert pairs[("llip_k8", "eval/recall1")].exceeds is True
    assert pairs[("siglip", "eval/recall1")].exceeds is False


def test_failed_trial_left_out_and_named(full):
    uri, c, pid = full
    rep = report.collect(c, pid)
    assert rep.stat("siglip", "eval/recall1").n == 3  # the FAILED duplicate of seed 1 is not a 4th value
    assert any("status FAILED" in n and "siglip" in n for n in rep.notes)
    assert not any("seconds" in m for m in rep.metrics)


def test_cli_prints_table_and_logs_artifacts_on_parent(full, capsys):
    uri, c, pid = full
    capsys.readouterr()
    assert main(["report", pid, "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    xs = [R1["llip_k8"][s] for s in (0, 1, 2)]
    line = next(ln for ln in out.splitlines() if ln.startswith("llip_k8") and "eval/recall1" in ln)
    assert f"{ref_mean(xs):.4f}" in line and f"{ref_std(xs):.4f}" in line and line.split()[-1] == "3"
    assert "paired by seed against clip" in out
    names = {os.path.basename(a.path) for a in c.list_artifacts(pid, "report")}
    assert {"report.md", "report.html", "summary.csv", "paired.csv", "curves.png", "summary.png"} <= names
    with tempfile.TemporaryDirectory() as d:
        md = open(c.download_artifacts(pid, "report/report.md", d)).read()
        png = open(c.download_artifacts(pid, "report/curves.png", d), "rb").read()
    assert f"| llip_k8 | eval/recall1 | {ref_mean(xs):.4f} | {ref_std(xs):.4f} | 3 |" in md
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # compare prints the same per-configuration table
    assert main(["compare", pid, "--tracking-uri", uri, "--by-config"]) == 0
    assert line in capsys.readouterr().out


def test_unshared_and_single_seeds_reported_without_std(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    trials = [("clip", 0, 0.01, 0.2), ("clip", 1, 0.02, 0.3), ("clip", 2, 0.03, 0.1),
              ("llip_k8", 0, 0.05, 0.3), ("llip_k8", 2, 0.04, 0.2),   # no seed 1
              ("siglip", 0, 0.02, 0.2),                                # one seed
              ("avg_siglip", 5, 0.02, 0.2), ("avg_siglip", 6, 0.03, 0.2)]  # seeds clip never ran
    c, pid = make_sweep(uri, "bad", trials)
    rep = report.collect(c, pid)
    notes = "\n".join(rep.notes)
    assert "llip_k8 lacks seed(s) [1" in notes
    assert "siglip has 1 seed: no standard deviation" in notes
    assert "clip lacks seed(s) [5, 6]" in notes
    s = rep.stat("siglip", "eval/recall1")
    assert s.n == 1 and s.std is None and s.mean == 0.02
    pairs = {(p.config, p.metric): p for p in rep.paired()}
    p = pairs[("llip_k8", "eval/recall1")]
    assert p.seeds == [0, 2] and p.mean == pytest.approx(ref_mean([0.04, 0.01]), abs=1e-12)
    assert p.std == pytest.approx(ref_std([0.04, 0.01]), abs=1e-12)
    assert pairs[("siglip", "eval/recall1")].std is None and pairs[("siglip", "eval/recall1")].exceeds is None
    assert pairs[("avg_siglip", "eval/recall1")].n == 0
    capsys.readouterr()
    assert main(["report", "bad", "--tracking-uri", uri]) == 0  # by experiment name
    out = capsys.readouterr().out
    row = next(ln for ln in out.splitlines() if ln.startswith("siglip ") and "eval/recall1" in ln).split()
    assert row[2:] == ["0.0200", "-", "1"]
    assert "no shared seeds" in out and "cannot tell (fewer than 2 seeds)" in out
    assert "note: siglip has 1 seed" in out


def test_not_a_sweep_is_one_line_error(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    exp = experiment_id(c, "single")
    rid = c.create_run(exp).info.run_id
    capsys.readouterr()
    assert main(["report", rid, "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a sweep's parent run" in err and len(err.splitlines()) == 1


def test_reproduce_yaml_variants_are_equal_budget_and_cross_seeds():
    """sweep.variants x the seed grid: 5 named configurations x 3 seeds, differing only in the
    variant's own keys (same data, steps, batch, model size, hyperparameters)."""
    from orchestrator.config.schema import load_config
    from orchestrator.errors import UserError
    from orchestrator.sweeps.tune import check_sweep, count_trials

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(root, "experiments", "reproduce.yaml"))
    check_sweep(cfg)
    assert count_trials(cfg) == 15
    assert list(cfg.sweep.params) == ["seed"] and cfg.sweep.params["seed"].grid == [0, 1, 2]
    flats = {name: cfg.with_overrides(ov).flat() for name, ov in cfg.sweep.variants.items()}
    allowed = {"loss.type", "model.pooling", "model.mixture_tokens", "loss.init_logit_bias"}  # the last follows loss.type
    base = flats["clip"]
    for name, f in flats.items():
        differ = {k for k in set(base) | set(f) if base.get(k) != f.get(k)}
        assert differ <= allowed, (name, differ - allowed)
    assert flats["avg_siglip"]["model.pooling"] == "avg" and flats["avg_siglip"]["loss.type"] == "siglip"
    assert {flats[n]["model.mixture_tokens"] for n in ("llip_k8", "llip_k32")} == {8, 32}
    bad = cfg.with_overrides({"sweep.variants": {"x": {"model.pooling": "nope"}}})
    with pytest.raises(UserError, match=r"sweep.variants.x"):
        check_sweep(bad)
    clash = cfg.with_overrides({"sweep.variants": {"x": {"seed": 3}}})
    with pytest.raises(UserError, match=r"sweep.variants.x sets seed, which sweep.params also sweeps"):
        check_sweep(clash)


def test_training_loss_is_summarised_but_not_paired(full):
    uri, c, pid = full
    rep = report.collect(c, pid)
    assert rep.stat("clip", "train/loss").n == 3
    assert {p.metric for p in rep.paired()} == {"eval/recall1", "eval/fashion_mnist/top1"}


ORDER_SCRIPT = r"""
import hashlib, json, sys
import ray
from orchestrator.config.schema import load_config
from orchestrator.data.plan import EpochStream, build_train_source
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
for ov in json.loads(sys.argv[2]):
    cfg = load_config(sys.argv[1]).with_overrides(ov)
    src = build_train_source(cfg, None)
    h = hashlib.sha1()
    for epoch in range(2):  # the first 6 batches of two epochs (each epoch's order is its own)
        stream = EpochStream(src, epoch, src.plan(epoch).worker_intervals(1)[0], 64)
        for _ in range(6):
            b = stream.next_batch()
            h.update(b["sample_id"].numpy().tobytes()); h.update(b["image"].numpy().tobytes())
            h.update(b["tokens"].numpy().tobytes())
        del stream
    print("STREAM", h.hexdigest(), flush=True)
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_same_seed_same_sample_stream_across_configurations(emoji_shards, cli_env, tmp_path):
    """A sweep's trials with one seed must train on the same samples in the same order (ids,
    augmented pixels, tokens) whatever the model; each trial is its own process, as under Tune."""
    import subprocess
    import sys

    import yaml

    exp = tmp_path / "order.yaml"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    exp.write_text(yaml.safe_dump({
        "base": os.path.join(root, "experiments", "smoke.yaml"), "name": "order",
        "data": {"train": str(emoji_shards / "train"), "eval": str(emoji_shards / "eval"), "shuffle_buffer": 256},
        "scaling": {"num_workers": 1}}))
    script = tmp_path / "order.py"
    script.write_text(ORDER_SCRIPT)

    def streams(*overrides):
        """One process (one Ray) streams each configuration in turn: one STREAM line each."""
        out = subprocess.run([sys.executable, str(script), str(exp), json.dumps(overrides)], env=cli_env, cwd=root,
                             capture_output=True, text=True, timeout=300)
        lines = [ln.split()[1] for ln in out.stdout.splitlines() if ln.startswith("STREAM")]
        assert len(lines) == len(overrides), out.stderr[-2000:]
        return lines

    (clip0,) = streams({"loss.type": "clip", "seed": 0})
    llip0, avg0, clip1 = streams({"loss.type": "llip", "model.mixture_tokens": 16, "seed": 0},
                                 {"loss.type": "siglip", "model.pooling": "avg", "seed": 0},
                                 {"loss.type": "clip", "seed": 1})
    assert llip0 == clip0 and avg0 == clip0  # another process, other models: the same stream
    assert clip1 != clip0


# -- scenes: R-precision by m, declared pairs, what ran ------------------------------------------------
# configuration -> seed -> {m: final eval/scenes/rprec_m<m>}; rprec and map derived below
RP = {
    "llip": {0: {1: 0.99, 2: 0.90, 3: 0.80}, 1: {1: 0.98, 2: 0.88, 3: 0.79}, 2: {1: 0.99, 2: 0.91, 3: 0.83}},
    "avg": {0: {1: 0.99, 2: 0.89, 3: 0.70}, 1: {1: 0.98, 2: 0.90, 3: 0.72}, 2: {1: 1.00, 2: 0.87, 3: 0.71}},
    "siglip": {0: {1: 0.97, 2: 0.80, 3: 0.60}, 1: {1: 0.96, 2: 0.83, 3: 0.66}, 2: {1: 0.98, 2: 0.79, 3: 0.62}},
}
INIT = {"llip": ("llip", "llip", "-4.85203"), "avg": ("siglip", "avg", "-4.85203"), "siglip": ("siglip", "cls", "-10.0")}


def make_scene_sweep(uri, pairs):
    c = MlflowClient(uri)
    exp = experiment_id(c, "scenes_rep")
    tags = {"llip.sweep": "true", "llip.run_name": "scenes-sweep", "llip.sweep.params": json.dumps(["variant", "seed"]),
            "llip.sweep.metric": "eval/scenes/rprec", "llip.sweep.mode": "max"}
    if pairs is not None:
        tags["llip.sweep.pairs"] = json.dumps(pairs)
    pid = c.create_run(exp, run_name="scenes-sweep", tags=tags).info.run_id
    for cfg, per_seed in RP.items():
        for seed, by_m in per_seed.items():
            rid = c.create_run(exp, run_name=f"{cfg}-{seed}", tags={"mlflow.parentRunId": pid,
                                                                     "llip.variant": cfg}).info.run_id
            loss, pooling, bias = INIT[cfg]
            for k, v in {"seed": seed, "loss.type": loss, "model.pooling": pooling, "model.mixture_tokens": 8,
                         "model.cross_heads": 8, "model.tau": 5.0, "loss.init_logit_scale": 14.285714,
                         "loss.init_logit_bias": bias, "train.steps": 400, "data.batch_size": 128}.items():
                c.log_param(rid, k, str(v))
            for m, v in by_m.items():
                c.log_metric(rid, f"eval/scenes/rprec_m{m}", v, step=400)
                c.log_metric(rid, f"eval/scenes/chance_rprec_m{m}", m / 200, step=400)
            c.log_metric(rid, "eval/scenes/rprec", ref_mean(list(by_m.values())), step=400)
            c.log_metric(rid, "eval/scenes/map", ref_mean(list(by_m.values())) - 0.1, step=400)
            c.log_metric(rid, "eval/scenes/recall1", 0.5, step=400)
            c.log_metric(rid, "train/loss", 1.0, step=400)
            c.set_terminated(rid, "FINISHED")
    c.set_terminated(pid, "FINISHED")
    return c, pid


def test_scene_report_rprec_by_m_declared_pairs_and_what_ran(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c, pid = make_scene_sweep(uri, [["llip", "avg"], ["llip", "siglip"]])
    rep = report.collect(c, pid)
    assert rep.pairs == [("llip", "avg"), ("llip", "siglip")] and rep.baseline is None
    assert rep.headline[:5] == ["eval/scenes/rprec", "eval/scenes/map", "eval/scenes/rprec_m1",
                                "eval/scenes/rprec_m2", "eval/scenes/rprec_m3"]
    assert not any("chance" in m for m in rep.metrics)
    # paired by seed, by m: exactly the declared pairs, each m its own comparison
    pairs = {(p.config, p.baseline, p.metric): p for p in rep.paired()}
    assert {(a, b) for a, b, _ in pairs} == {("llip", "avg"), ("llip", "siglip")}
    for m in (1, 2, 3):
        d = [RP["llip"][s][m] - RP["avg"][s][m] for s in (0, 1, 2)]
        p = pairs[("llip", "avg", f"eval/scenes/rprec_m{m}")]
        assert p.mean == pytest.approx(ref_mean(d), abs=1e-12) and p.std == pytest.approx(ref_std(d), abs=1e-12)
    # at m = 3 Llip's lead over avg (+0.097) is far beyond the spread; at m = 1 (-0.003) it is not
    assert pairs[("llip", "avg", "eval/scenes/rprec_m3")].exceeds is True
    assert pairs[("llip", "avg", "eval/scenes/rprec_m1")].exceeds is False
    ((prefix, head, rows, phead, prows),) = report.by_m_tables(rep)
    assert prefix == "eval/scenes" and head == ["configuration", "rprec (all)", "m=1", "m=2", "m=3", "mAP"]
    row = next(r for r in rows if r[0] == "avg")
    xs = [RP["avg"][s][3] for s in (0, 1, 2)]
    assert row[4] == f"{ref_mean(xs):.4f} +- {ref_std(xs):.4f}"
    prow = next(r for r in prows if r[:2] == ["llip", "avg"])
    d3 = [RP["llip"][s][3] - RP["avg"][s][3] for s in (0, 1, 2)]
    assert prow[5] == f"{ref_mean(d3):+.4f} +- {ref_std(d3):.4f} *" and not prow[3].endswith("*")
    head, rows = report.what_ran(rep)
    ran = {r[0]: dict(zip(head, r)) for r in rows}
    assert ran["siglip"]["init bias"] == "-10.0" and ran["llip"]["init bias"] == "-4.85203"
    assert ran["siglip"]["K"] == "-" and ran["avg"]["K"] == "8" and ran["avg"]["heads"] == "-"
    assert ran["llip"]["heads"] == "8" and ran["llip"]["loss"] == "llip"
    # the CLI prints and logs the by-m tables and figure; --pair replaces the declared pairs
    capsys.readouterr()
    assert main(["report", pid, "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "eval/scenes: R-precision by m" in out and "paired by seed (declared pairs):" in out
    names = {os.path.basename(a.path) for a in c.list_artifacts(pid, "report")}
    assert "rprec_by_m.png" in names
    with tempfile.TemporaryDirectory() as d:
        md = open(c.download_artifacts(pid, "report/report.md", d)).read()
    assert "## What ran" in md and "R-precision by number of true captions m" in md
    assert main(["report", pid, "--tracking-uri", uri, "--pair", "avg:siglip", "--no-log"]) == 0
    out = capsys.readouterr().out
    assert "| avg" not in out and any(ln.split()[:2] == ["avg", "siglip"] for ln in out.splitlines())
    assert not any(ln.split()[:2] == ["llip", "avg"] for ln in out.splitlines())
    assert main(["report", pid, "--tracking-uri", uri, "--pair", "llip:clip", "--no-log"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--pair llip:clip" in err and "'clip'" in err and len(err.splitlines()) == 1


def test_declared_pair_without_finished_trials_is_a_note_and_no_by_m_without_split(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c, pid = make_scene_sweep(uri, [["llip", "ghost"], ["llip", "avg"]])
    for r in c.search_runs([c.get_run(pid).info.experiment_id], "tags.`llip.variant` = 'llip'"):
        c.log_metric(r.info.run_id, "eval/other/rprec", 0.5, step=400)  # a set only Llip evaluated
    rep = report.collect(c, pid)
    assert rep.pairs == [("llip", "avg")]
    assert any("sweep.pairs [llip, ghost]: no finished trial of ghost" in n for n in rep.notes)
    row = next(r for r in report.paired_rows(rep) if r[2] == "eval/other/rprec")
    assert row[-1] == "not logged by avg"
    # the single-object sweep above has no rprec_m metrics: no by-m tables, no by-m figure
    uri2 = f"sqlite:///{tmp_path / 'mlflow2.db'}"
    c2, pid2 = make_sweep(uri2, "single", [(cfg, s, R1[cfg][s], FM[cfg][s]) for cfg in R1 for s in (0, 1, 2)])
    rep2 = report.collect(c2, pid2)
    assert report.by_m_tables(rep2) == [] and rep2.by_m_sets() == {}
    files = {p.name for p in report.write(c2, rep2, tmp_path / "out")}
    assert "rprec_by_m.png" not in files and "curves.png" in files
