"""Experiment YAML: schema validation, inheritance, and `llip validate` on every experiment file."""
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.config.schema import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "experiments").glob("*.yaml"))


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def llip(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=cwd, capture_output=True, text=True)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.name for p in EXPERIMENTS])
def test_every_experiment_validates(path):
    cfg = load_config(path)
    assert cfg.name
    # The header comment says how to launch it (docs/architecture.md: each file opens with what, how, cost).
    text = path.read_text()
    assert text.startswith("#")
    if path.name != "base.yaml":  # the defaults, not an experiment to launch
        header = [ln for ln in text.splitlines() if ln.startswith("#")]
        assert any(ln.startswith("# Launch:") for ln in header) and any(ln.startswith("# Cost:") for ln in header)


def test_experiments_exist():
    assert any(p.name == "demo.yaml" for p in EXPERIMENTS)


def test_inheritance_merges_sections_key_by_key(tmp_path):
    write(tmp_path, "base.yaml", "name: b\ntrain: {steps: 100, lr: 0.001}\nmodel: {size: micro, tau: 3.0}\n")
    child = write(tmp_path, "child.yaml", "base: base.yaml\nname: c\ntrain: {steps: 7}\n")
    cfg = load_config(child)
    assert (cfg.name, cfg.train.steps, cfg.train.lr, cfg.model.size) == ("c", 7, 0.001, "micro")
    assert cfg.resolved_model().tau == 3.0


def test_inherited_search_space_is_replaced_not_merged(tmp_path):
    write(tmp_path, "base.yaml", "name: b\nsweep: {params: {model.tau: {grid: [1, 5]}, seed: {grid: [0, 1]}}}\n")
    child = write(tmp_path, "child.yaml", "base: base.yaml\nname: c\nsweep: {params: {model.tau: {choice: [3]}}}\n")
    params = load_config(child).sweep.params
    assert params["model.tau"].choice == [3] and params["model.tau"].grid is None
    assert params["seed"].grid == [0, 1]


@pytest.mark.parametrize("text, path_in_msg", [
    ("name: x\ntrain: {stepz: 3}\n", "train.stepz"),
    ("name: x\ndata: {s3: {endpoint: http://x}}\n", "data.s3.endpoint"),
    ("name: x\ntrain: {steps: many}\n", "train.steps"),
    ("name: x\nmodel: {mixture_tokens: 0}\n", "model.mixture_tokens"),
    ("description: no name\n", "name"),
    ("name: x\nloss: {type: triplet}\n", "loss.type"),
])
def test_bad_keys_name_their_dotted_path(tmp_path, text, path_in_msg):
    p = write(tmp_path, "bad.yaml", text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "\n" not in msg
    assert f": {path_in_msg}:" in msg


def test_pooling_follows_loss_type_and_conflicts_are_rejected(tmp_path):
    assert load_config(write(tmp_path, "a.yaml", "name: a\nloss: {type: clip}\n")).resolved_model().pooling == "cls"
    assert load_config(write(tmp_path, "b.yaml", "name: b\nloss: {type: llip}\n")).resolved_model().pooling == "llip"
    with pytest.raises(ConfigError, match="model.pooling"):
        load_config(write(tmp_path, "c.yaml", "name: c\nloss: {type: siglip}\nmodel: {pooling: llip}\n"))


def test_batch_must_split_evenly_across_workers(tmp_path):
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(write(tmp_path, "a.yaml", "name: a\ndata: {batch_size: 255}\nscaling: {num_workers: 2}\n"))


def test_overrides_are_revalidated():
    cfg = load_config(ROOT / "experiments" / "demo.yaml")
    assert cfg.with_overrides({"model.mixture_tokens": 16}).resolved_model().mixture_tokens == 16
    with pytest.raises(ConfigError, match="model.mixture_tokens"):
        cfg.with_overrides({"model.mixture_tokens": -1})


def test_flat_params_hold_resolved_model_values():
    flat = load_config(ROOT / "experiments" / "demo.yaml").flat()
    assert flat["model.width"] == 128 and flat["model.pooling"] == "llip" and flat["train.steps"] > 0
    assert "sweep" not in flat


def test_cli_validate_exit_codes_and_one_line_errors(tmp_path):
    ok = llip("validate", *map(str, EXPERIMENTS))
    assert ok.returncode == 0, ok.stderr + ok.stdout
    bad = write(tmp_path, "bad.yaml", "name: x\ntrain: {stepz: 3}\n")
    r = llip("validate", str(bad))
    assert r.returncode != 0
    assert r.stdout.strip().count("\n") == 0 and "train.stepz" in r.stdout
    syntax = write(tmp_path, "syntax.yaml", "name: x\ntrain: [steps: 3\n")
    r = llip("validate", str(syntax))
    assert r.returncode != 0 and "YAML syntax error" in r.stdout and "line" in r.stdout
    r = llip("run", str(tmp_path / "missing.yaml"))
    assert r.returncode != 0
    assert r.stderr.strip() == f"llip: error: {tmp_path / 'missing.yaml'}: experiment file not found"


def test_overrides_keep_explicit_nulls():
    """A later override must not resurrect a default the user set to null (data.eval: null would
    otherwise evaluate on data/emoji/eval again, or fail on a machine without it)."""
    from orchestrator.config.schema import load_config

    cfg = load_config(ROOT / "experiments" / "smoke.yaml").with_overrides({"data.eval": None})
    again = cfg.with_overrides({"model.vocab_size": 123}).with_overrides({"train.steps": 3})
    assert again.data.eval is None and again.model.vocab_size == 123 and again.train.steps == 3
