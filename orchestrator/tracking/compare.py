"""`llip compare EXPERIMENT_OR_PARENT_RUN`: a sweep's trials from MLflow, sorted by the sweep metric,
with their swept values; the same table and a comparison plot are logged to the sweep's parent run.

A sweep's parent run records what was swept and how to rank it (tags `llip.sweep.params`,
`llip.sweep.metric`, `llip.sweep.mode`), so compare needs nothing but the tracking store. Given an
experiment with no sweep, it compares the experiment's top-level runs on the parameters that differ.
"""
from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from orchestrator.tracking.lookup import resolve_target

DEFAULT_METRIC = "eval/recall1"


def add_args(p) -> None:
    p.add_argument("target", metavar="EXPERIMENT_OR_PARENT_RUN",
                   help="an MLflow experiment name (its latest sweep), a sweep's parent run name, or a run id")
    p.add_argument("--metric", default=None, help="rank by this metric (default: the sweep's metric)")
    p.add_argument("--mode", choices=["min", "max"], default=None, help="default: the sweep's mode")
    p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    p.add_argument("--no-log", action="store_true", help="print only; do not log the table and plot to the parent run")
    p.add_argument("--by-config", action="store_true",
                   help="one row per configuration and metric over seeds (mean, std, n), as `llip report` prints")


@dataclass
class Comparison:
    metric: str
    mode: str
    swept: list[str]
    rows: list[dict[str, Any]]
    parent: Any = None  # mlflow Run or None
    experiment: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def best(self) -> Optional[dict[str, Any]]:
        return self.rows[0] if self.rows and _finite(self.rows[0]["metric"]) else None


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _differing_params(runs) -> list[str]:
    keys = sorted({k for r in runs for k in r.data.params})
    skip = ("data.train", "data.eval", "storage_path", "mlflow.")
    return [k for k in keys if not k.startswith(skip) and len({r.data.params.get(k) for r in runs}) > 1]


def compare(c, target: str, metric: Optional[str] = None, mode: Optional[str] = None) -> Comparison:
    parent, exp_name, runs = resolve_target(c, target)
    tags = parent.data.tags if parent is not None else {}
    metric = metric or tags.get("llip.sweep.metric") or DEFAULT_METRIC
    mode = mode or tags.get("llip.sweep.mode") or "max"
    swept = json.loads(tags["llip.sweep.params"]) if "llip.sweep.params" in tags else _differing_params(runs)
    notes = []
    if not runs:
        notes.append("no trial runs found" + (f" under parent run {parent.info.run_id}" if parent else ""))
    rows = []
    for r in runs:
        m = r.data.metrics
        value = m.get(metric)
        rows.append({
            "run_id": r.info.run_id,
            "run_name": r.data.tags.get("mlflow.runName", r.info.run_id[:8]),
            "trial_id": r.data.tags.get("llip.trial_id", ""),
            "status": r.info.status,
            "values": {k: (r.data.tags.get("llip.variant", "") if k == "variant" else r.data.params.get(k, ""))
                       for k in swept},
            "metric": value,
            "train_loss": m.get("train/loss"),
            "step": int(m["step"]) if "step" in m else _last_step(c, r.info.run_id),
            "error": r.data.tags.get("llip.error", ""),
        })
    sign = -1.0 if mode == "max" else 1.0
    rows.sort(key=lambda row: (0, sign * row["metric"]) if _finite(row["metric"]) else (1, 0.0))
    if runs and not any(_finite(row["metric"]) for row in rows):
        have = sorted({k for r in runs for k in r.data.metrics if k.startswith("eval/")})
        notes.append(f"no run reported {metric!r}; pick another with --metric"
                     + (f" (eval metrics logged: {', '.join(have[:30])}{' ...' if len(have) > 30 else ''})" if have else ""))
    return Comparison(metric=metric, mode=mode, swept=swept, rows=rows, parent=parent, experiment=exp_name,
                      notes=notes)


def _last_step(c, run_id: str) -> Optional[int]:
    hist = c.get_metric_history(run_id, "train/loss")
    return max((h.step for h in hist), default=None)


def _fmt(v) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if _finite(v) else str(v)
    return str(v)


def format_table(cmp: Comparison) -> str:
    head = ["#", "run", "trial", "status", *cmp.swept, f"{cmp.metric} ({cmp.mode})", "train/loss", "step"]
    body = []
    for i, r in enumerate(cmp.rows, 1):
        body.append([str(i), r["run_name"], r["trial_id"] or "-", r["status"], *[_fmt(r["values"][k]) for k in cmp.swept],
                     _fmt(r["metric"]), _fmt(r["train_loss"]), _fmt(r["step"])])
    widths = [max(len(h), *(len(row[j]) for row in body)) if body else len(h) for j, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in body]
    for r in cmp.rows:
        if r["error"]:
            lines.append(f"  {r['run_name']} failed: {r['error'][:300]}")
    return "\n".join(lines)


def _label(r: dict, swept: list[str]) -> str:
    short = " ".join(f"{k.rsplit('.', 1)[-1]}={r['values'][k]}" for k in swept)
    return short or r["run_name"]


def plot_comparison(c, cmp: Comparison, path: Path) -> None:
    """Left: the sweep metric per trial (best on top). Right: each trial's training loss over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from orchestrator.tracking.store import metric_history

    n = max(1, len(cmp.rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 1.2 + 0.45 * n + 2))
    labels = [_label(r, cmp.swept) for r in cmp.rows]
    values = [r["metric"] if _finite(r["metric"]) else 0.0 for r in cmp.rows]
    colors = ["tab:green" if i == 0 and cmp.best else ("tab:red" if r["status"] == "FAILED" else "tab:blue")
              for i, r in enumerate(cmp.rows)]
    y = list(range(len(cmp.rows)))[::-1]
    ax1.barh(y, values, color=colors)
    ax1.set_yticks(y, labels, fontsize=8)
    for yi, r, v in zip(y, cmp.rows, values):
        ax1.text(v, yi, f" {_fmt(r['metric'])}" + (" FAILED" if r["status"] == "FAILED" else ""), va="center", fontsize=8)
    ax1.set_xlabel(f"{cmp.metric} ({cmp.mode} is better)")
    ax1.set_title("trials, best on top")
    for r, label in zip(cmp.rows, labels):
        pts = metric_history(c, r["run_id"], "train/loss")
        if pts:
            steps, vals = zip(*pts)
            ax2.plot(steps, vals, label=label, linestyle="--" if r["status"] == "FAILED" else "-")
    ax2.set_xlabel("step")
    ax2.set_title("train/loss" + (" (scales differ between loss types)" if "loss.type" in cmp.swept else ""))
    ax2.grid(alpha=0.3)
    if cmp.rows:
        ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def log_to_parent(c, cmp: Comparison) -> None:
    """The table (text and CSV), the plot and the best trial, on the sweep's parent run."""
    import csv

    if cmp.parent is None:
        return
    pid = cmp.parent.info.run_id
    with tempfile.TemporaryDirectory() as d:
        png = Path(d) / "comparison.png"
        plot_comparison(c, cmp, png)
        c.log_artifact(pid, str(png), "compare")
        (Path(d) / "trials.txt").write_text(format_table(cmp) + "\n")
        c.log_artifact(pid, str(Path(d) / "trials.txt"), "compare")
        with open(Path(d) / "trials.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["rank", "run_id", "run_name", "trial_id", "status", *cmp.swept, cmp.metric, "train/loss", "step"])
            for i, r in enumerate(cmp.rows, 1):
                w.writerow([i, r["run_id"], r["run_name"], r["trial_id"], r["status"],
                            *[r["values"][k] for k in cmp.swept], r["metric"], r["train_loss"], r["step"]])
        c.log_artifact(pid, str(Path(d) / "trials.csv"), "compare")
    best = cmp.best
    if best is not None:
        c.set_tag(pid, "llip.best_run_id", best["run_id"])
        c.set_tag(pid, "llip.best_values", json.dumps(best["values"]))
        c.log_metric(pid, f"best/{cmp.metric}", float(best["metric"]))


def cli(args) -> int:
    from orchestrator.tracking import store as tracking

    c, uri = tracking.existing_store_client(args.tracking_uri)
    if args.by_config:
        from orchestrator.tracking import report

        rep = report.collect(c, args.target)
        print(report.console_text(rep))
        return 0
    cmp = compare(c, args.target, args.metric, args.mode)
    where = f"sweep {cmp.parent.data.tags.get('llip.run_name', cmp.parent.info.run_id)}" if cmp.parent else "runs"
    print(f"{where} in experiment {cmp.experiment} ({len(cmp.rows)} trials), ranked by {cmp.metric} ({cmp.mode}):\n")
    print(format_table(cmp))
    for n in cmp.notes:
        print(f"\nnote: {n}")
    if cmp.parent is not None and not args.no_log and cmp.rows:
        log_to_parent(c, cmp)
        print(f"\nlogged compare/comparison.png and compare/trials.csv to parent run {cmp.parent.info.run_id}")
    return 0
