"""`llip validate FILE...`: load each experiment through the typed schema."""
from __future__ import annotations

from orchestrator.config.schema import ConfigError, load_config


def add_args(p) -> None:
    p.add_argument("files", nargs="+", metavar="FILE.yaml")


def cli(args) -> int:
    bad = 0
    for f in args.files:
        try:
            cfg = load_config(f)
        except ConfigError as e:
            print(f"llip: error: {e}")
            bad += 1
            continue
        kind = "sweep" if cfg.sweep else "run"
        print(f"ok  {f}: {cfg.name} ({kind}, model {cfg.model.size}/{cfg.resolved_model().pooling}, loss {cfg.loss.type})")
    return 2 if bad else 0
