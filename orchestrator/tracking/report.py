"""`llip report PARENT_RUN_OR_EXPERIMENT`: a sweep's trials grouped by configuration and seed, with
honest statistics, written as report/ artifacts on the sweep's parent run.

A configuration is the trial's `llip.variant` tag (sweep.variants), else its swept values other than
`seed`. Over the seeds of a configuration: mean, sample standard deviation (ddof=1) and n. Paired
comparisons over the seeds both configurations have, because with the same seed two trials share the
initialisation RNG and the data order, so the per-seed difference removes that part of the noise:
each [configuration, baseline] of the sweep's `sweep.pairs` (tag llip.sweep.pairs) or of `--pair`,
else every configuration against one baseline (default `clip`). Only FINISHED trials count.

What ran: per configuration, the keys that tell the models apart (loss, pooling, K, heads, the
initial logit scale and bias as training resolved them, steps, batch) and any other parameter that
differs between configurations. On sets whose images have several true captions (scenes of m
objects), R-precision by m (`rprec_m1`, ...) gets a table of its own, configurations by m, and one of
the paired differences by m: where a gap opens or closes as images get more true captions.

Artifacts: report/report.md, report/report.html, report/summary.csv, report/paired.csv,
report/summary.png (mean, std and each seed per metric), report/curves.png (per-step mean with a
min-max band over seeds), report/rprec_by_m.png (when a set has R-precision by m).
"""
from __future__ import annotations

import csv
import html
import json
import math
import re
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from orchestrator.errors import UserError

# Final values not worth a row: timings, set sizes, what a constant scorer gets.
_SKIP = re.compile(r"(seconds|num_samples|/chance_[^/]*)$")


def add_args(p) -> None:
    p.add_argument("target", metavar="PARENT_RUN_OR_EXPERIMENT",
                   help="a sweep's parent run id or run name, or an experiment name (its latest sweep)")
    p.add_argument("--baseline", default=None,
                   help="configuration the others are compared with, paired by seed (default: the sweep's "
                        "sweep.pairs, else clip, when present)")
    p.add_argument("--pair", action="append", default=None, metavar="CONFIG:BASELINE",
                   help="compare CONFIG with BASELINE seed by seed (repeatable; replaces sweep.pairs and --baseline)")
    p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    p.add_argument("--no-log", action="store_true", help="print only; do not log report/ to the parent run")


# --------------------------------------------------------------------------------------------
# collecting
# --------------------------------------------------------------------------------------------
@dataclass
class Trial:
    run_id: str
    name: str
    config: str
    seed: Optional[int]
    status: str
    final: dict[str, float]  # headline keys resolved, plus every final eval/* and train/* value
    source: dict[str, str] = field(default_factory=dict)  # resolved headline -> the run's own key
    params: dict[str, str] = field(default_factory=dict)


@dataclass
class Stat:
    values: list[float]  # in seed order

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> Optional[float]:
        return statistics.stdev(self.values) if self.n >= 2 else None


@dataclass
class Paired:
    config: str
    metric: str
    seeds: list[int]
    diffs: list[float]  # config - baseline, per shared seed
    spread: Optional[float]  # the larger of the two configurations' seed-to-seed std
    baseline: str = ""

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def mean(self) -> Optional[float]:
        return statistics.fmean(self.diffs) if self.diffs else None

    @property
    def std(self) -> Optional[float]:
        return statistics.stdev(self.diffs) if self.n >= 2 else None

    @property
    def exceeds(self) -> Optional[bool]:
        """|mean difference| > seed-to-seed spread; None when either cannot be computed."""
        if self.mean is None or self.spread is None or self.n < 2:
            return None
        return abs(self.mean) > self.spread


@dataclass
class Report:
    parent: Any
    experiment: str
    trials: list[Trial]
    configs: list[str]
    headline: list[str]
    metrics: list[str]  # every final metric, headline first
    baseline: Optional[str]
    notes: list[str] = field(default_factory=list)
    pairs: list[tuple[str, str]] = field(default_factory=list)  # [configuration, baseline]; empty: all vs baseline

    def stat(self, config: str, metric: str) -> Optional[Stat]:
        by_seed = self.values(config, metric)
        return Stat([by_seed[s] for s in sorted(by_seed)]) if by_seed else None

    def values(self, config: str, metric: str) -> dict[int, float]:
        """seed -> final value (the first finished trial of each seed)."""
        out: dict[int, float] = {}
        for t in self.trials:
            if t.config == config and t.seed is not None and metric in t.final and t.seed not in out:
                out[t.seed] = t.final[metric]
        return out

    def comparisons(self) -> list[tuple[str, str]]:
        """(configuration, baseline) pairs: the declared ones, else every configuration vs the baseline."""
        if self.pairs:
            return list(self.pairs)
        if self.baseline is None:
            return []
        return [(cfg, self.baseline) for cfg in self.configs if cfg != self.baseline]

    def pair(self, cfg: str, base: str, m: str) -> Paired:
        a, b = self.values(cfg, m), self.values(base, m)
        seeds = sorted(set(a) & set(b))
        sa, sb = self.stat(cfg, m), self.stat(base, m)
        spread = max(sa.std, sb.std) if sa and sb and sa.std is not None and sb.std is not None else None
        return Paired(cfg, m, seeds, [a[s] - b[s] for s in seeds], spread, base)

    def paired(self) -> list[Paired]:
        # training losses are not compared: their scales differ between loss types
        return [self.pair(cfg, base, m) for cfg, base in self.comparisons()
                for m in self.headline if not m.startswith("train/")]

    def by_m_sets(self) -> dict[str, list[str]]:
        """Set prefix ("eval/scenes" or "eval") -> its rprec_m metrics, in order of m."""
        out: dict[str, list[str]] = {}
        for k in self.metrics:
            mm = _BY_M.fullmatch(k)
            if mm:
                out.setdefault(mm.group(1), []).append(k)
        return {p: sorted(ks, key=lambda k: int(k.rsplit("_m", 1)[1])) for p, ks in sorted(out.items())}


_BY_M = re.compile(r"(eval(?:/[^/]+)?)/rprec_m(\d+)")


def _config_label(run, swept: list[str]) -> str:
    v = run.data.tags.get("llip.variant")
    if v:
        return v
    parts = [f"{k}={run.data.params.get(k, '')}" for k in swept if k not in ("seed", "variant")]
    return " ".join(parts) or "all"


def _seed(run) -> Optional[int]:
    try:
        return int(run.data.params["seed"])
    except (KeyError, ValueError):
        return None


def collect(c, target: str, baseline: Optional[str] = None, pairs: Optional[list[str]] = None) -> Report:
    """pairs: "CONFIG:BASELINE" items (--pair); None: the sweep's sweep.pairs when no baseline is named."""
    from orchestrator.tracking.lookup import resolve_target

    parent, exp_name, runs = resolve_target(c, target)
    if parent is None or parent.data.tags.get("llip.sweep") != "true":
        raise UserError(f"{target!r} is not a sweep's parent run (no llip.sweep tag); pass the parent run id or "
                        "run name that `llip sweep` printed, or the sweep's experiment name")
    swept = json.loads(parent.data.tags.get("llip.sweep.params", "[]"))
    sweep_metric = parent.data.tags.get("llip.sweep.metric", "eval/recall1")
    notes: list[str] = []
    trials: list[Trial] = []
    for r in runs:
        final = {k: v for k, v in r.data.metrics.items() if (k.startswith("eval/") or k.startswith("train/"))
                 and not _SKIP.search(k)}
        tau = r.data.params.get("model.tau")
        tau = float(tau) if tau not in (None, "", "None") and r.data.params.get("model.pooling") == "llip" else None
        source = {}
        for s in sorted({k.split("/")[1] for k in final if k.count("/") == 2 and k.startswith("eval/")}):
            if f"eval/{s}/top1" not in final and tau is not None and f"eval/{s}/top1_tau{tau:g}" in final:
                final[f"eval/{s}/top1"] = final[f"eval/{s}/top1_tau{tau:g}"]
                source[f"eval/{s}/top1"] = f"eval/{s}/top1_tau{tau:g}"
        t = Trial(r.info.run_id, r.data.tags.get("mlflow.runName", r.info.run_id[:8]), _config_label(r, swept),
                  _seed(r), r.info.status, final, source, dict(r.data.params))
        if t.status != "FINISHED":
            notes.append(f"left out {t.name} ({t.config}, seed {t.seed}): status {t.status}"
                         + (f", {r.data.tags['llip.error'][:200]}" if r.data.tags.get("llip.error") else ""))
            continue
        if t.seed is None:
            notes.append(f"left out {t.name} ({t.config}): no seed param")
            continue
        trials.append(t)
    if not trials:
        raise UserError(f"sweep {parent.info.run_id} has no FINISHED trial with a seed to report on"
                        + (f" ({'; '.join(notes[:3])})" if notes else ""))

    configs: list[str] = []
    for t in trials:
        if t.config not in configs:
            configs.append(t.config)
    declared: list[tuple[str, str]] = []
    if pairs:
        for item in pairs:
            a, sep, b = item.partition(":")
            if not sep or not a or not b:
                raise UserError(f"--pair {item}: give CONFIG:BASELINE, e.g. --pair llip_k8:avg_k8")
            bad = next((x for x in (a, b) if x not in configs), None)
            if bad is not None:
                raise UserError(f"--pair {item}: no configuration {bad!r} among the finished trials ({', '.join(configs)})")
            declared.append((a, b))
    elif baseline is None and parent.data.tags.get("llip.sweep.pairs"):
        for a, b in json.loads(parent.data.tags["llip.sweep.pairs"]):
            missing = [x for x in (a, b) if x not in configs]
            if missing:
                notes.append(f"sweep.pairs [{a}, {b}]: no finished trial of {', '.join(missing)}; not compared")
            else:
                declared.append((a, b))
    if declared:
        baseline = None
    elif baseline is None:
        baseline = "clip" if "clip" in configs else None
        if baseline is None:
            notes.append("no configuration named clip; pass --baseline NAME for the paired comparison "
                         f"(configurations: {', '.join(configs)})")
    elif baseline not in configs:
        raise UserError(f"--baseline {baseline}: no such configuration among the finished trials "
                        f"({', '.join(configs)})")
    if baseline is not None:
        configs.remove(baseline)
        configs.insert(0, baseline)

    # Seeds: every configuration should hold the same set, each seed once.
    seeds = {cfg: [t.seed for t in trials if t.config == cfg] for cfg in configs}
    for cfg, ss in seeds.items():
        dup = sorted({s for s in ss if ss.count(s) > 1})
        if dup:
            notes.append(f"{cfg}: seed(s) {dup} ran more than once; the first finished trial of each counts")
    all_seeds = sorted(set().union(*map(set, seeds.values())))
    for cfg in configs:
        missing = sorted(set(all_seeds) - set(seeds[cfg]))
        if missing:
            notes.append(f"{cfg} lacks seed(s) {missing} that other configurations ran: seeds are not shared, "
                         "so its paired comparison uses only the seeds both have")
        if len(set(seeds[cfg])) < 2:
            notes.append(f"{cfg} has {len(set(seeds[cfg]))} seed: no standard deviation (needs at least two seeds)")

    present = sorted({k for t in trials for k in t.final}, key=_natural)
    headline = [sweep_metric] if sweep_metric in present else []
    # several true captions per image: R-precision overall and by m, and mAP, per set
    for k in present:
        if re.fullmatch(r"eval(/[^/]+)?/(rprec|rprec_m\d+|map)", k) and k not in headline:
            headline.append(k)
    headline += [k for k in present if re.fullmatch(r"eval/[^/]+/top1", k) and k not in headline]
    if "train/loss" in present and "train/loss" not in headline:
        headline.append("train/loss")
    metrics = headline + [k for k in present if k not in headline]
    return Report(parent, exp_name, trials, configs, headline, metrics, baseline, notes, declared)


def _natural(k: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", k)]


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------
def _num(v: Optional[float], signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:+.4f}" if signed else f"{v:.4f}"


def summary_rows(rep: Report, metrics: Optional[list[str]] = None) -> list[list[str]]:
    """[configuration, metric, mean, std, n] rows; std is '-' below two seeds."""
    rows = []
    for m in metrics or rep.headline:
        for cfg in rep.configs:
            s = rep.stat(cfg, m)
            if s is not None:
                rows.append([cfg, m, _num(s.mean), _num(s.std), str(s.n)])
    return rows


def paired_rows(rep: Report) -> list[list[str]]:
    rows = []
    for p in rep.paired():
        missing = [c for c in (p.config, p.baseline) if not rep.values(c, p.metric)]
        if missing:
            verdict = f"not logged by {' and '.join(missing)}"
        elif p.n == 0:
            verdict = "no shared seeds"
        elif p.exceeds is None:
            verdict = "cannot tell (fewer than 2 seeds)"
        elif p.exceeds:
            verdict = f"yes: |diff| > spread {p.spread:.4f}"
        else:
            verdict = f"no: |diff| <= spread {p.spread:.4f}"
        rows.append([p.config, p.baseline, p.metric, _num(p.mean, signed=True), _num(p.std), str(p.n), verdict])
    return rows


SUMMARY_HEAD = ["configuration", "metric", "mean", "std", "n seeds"]


def paired_head(rep: Report) -> list[str]:
    return ["configuration", "baseline", "metric", "mean diff (config - baseline)", "std of diffs", "n pairs",
            "|mean diff| > seed-to-seed spread?"]


# What ran: the keys that tell this project's models apart, as the runs logged them
WHAT_RAN = [("loss.type", "loss"), ("model.pooling", "pooling"), ("model.mixture_tokens", "K"),
            ("model.cross_heads", "heads"), ("model.tau", "tau"), ("loss.init_logit_scale", "init scale"),
            ("loss.init_logit_bias", "init bias"), ("train.steps", "steps"), ("data.batch_size", "batch")]
_NOT_A_SETTING = re.compile(r"^(seed|name|description|mlflow\.|storage_path|sweep)")


def what_ran(rep: Report) -> tuple[list[str], list[list[str]]]:
    """Per configuration (its first finished trial's params): WHAT_RAN's keys, then any other param
    that differs between configurations. K and heads read '-' where the pooling has none."""
    first = {cfg: next(t for t in rep.trials if t.config == cfg).params for cfg in rep.configs}
    keys = [k for k, _ in WHAT_RAN]
    other = sorted({k for p in first.values() for k in p if k not in keys and not _NOT_A_SETTING.match(k)
                    and len({q.get(k) for q in first.values()}) > 1})
    head = ["configuration"] + [label for _, label in WHAT_RAN] + other
    rows = []
    for cfg, p in first.items():
        pooling = p.get("model.pooling")
        row = [cfg]
        for k in keys + other:
            v = p.get(k)
            if (k == "model.mixture_tokens" and pooling == "cls") or \
                    (k in ("model.cross_heads", "model.tau") and pooling not in (None, "llip")):
                v = "-"
            elif k == "loss.init_logit_bias" and v in ("None", None) and "loss.init_logit_scale" in p:
                v = "none (InfoNCE)"
            row.append("not logged" if v is None else str(v))
        rows.append(row)
    return head, rows


def _pm(s: Optional[Stat]) -> str:
    if s is None:
        return "-"
    return f"{s.mean:.4f} +- {s.std:.4f}" if s.std is not None else f"{s.mean:.4f} (n=1)"


def by_m_tables(rep: Report) -> list[tuple[str, list[str], list[list[str]], list[str], list[list[str]]]]:
    """Per set with R-precision by m: (set, head, per-configuration rows, paired head, paired rows).
    Cells: mean +- std over seeds; paired: mean diff +- std of diffs, '*' where |mean| > spread."""
    out = []
    for prefix, ms in rep.by_m_sets().items():
        cols = [f"{prefix}/rprec"] + ms + [f"{prefix}/map"]
        cols = [c for c in cols if c in rep.metrics]
        labels = ["rprec (all)" if c.endswith("/rprec") else "mAP" if c.endswith("/map")
                  else "m=" + c.rsplit("_m", 1)[1] for c in cols]
        rows = [[cfg] + [_pm(rep.stat(cfg, c)) for c in cols] for cfg in rep.configs]
        rows = [r for r in rows if any(x != "-" for x in r[1:])]  # configurations that evaluated this set
        prow = []
        for cfg, base in rep.comparisons():
            cells = []
            for c in cols:
                p = rep.pair(cfg, base, c)
                if p.mean is None:
                    cells.append("-")
                    continue
                cell = _num(p.mean, signed=True) + (f" +- {p.std:.4f}" if p.std is not None else "")
                cells.append(cell + (" *" if p.exceeds else ""))
            if any(x != "-" for x in cells):
                prow.append([cfg, base] + cells)
        out.append((prefix, ["configuration"] + labels, rows, ["configuration", "baseline"] + labels, prow))
    return out


def format_text(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[j]) for r in rows)) if rows else len(h) for j, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    return "\n".join(["| " + " | ".join(map(esc, head)) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(map(esc, r)) + " |" for r in rows])


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _sections(rep: Report) -> list[tuple[str, Any]]:
    """The report as (kind, content) blocks, rendered to Markdown and to HTML alike."""
    p = rep.parent
    name = p.data.tags.get("llip.run_name", p.info.run_id)
    seeds = sorted({t.seed for t in rep.trials})
    blocks: list[tuple[str, Any]] = [
        ("h1", f"Report: sweep {name}"),
        ("p", f"MLflow experiment {rep.experiment}, parent run {p.info.run_id}; {len(rep.trials)} finished trials, "
              f"{len(rep.configs)} configurations, seeds {seeds}. Statistics over seeds: mean, sample standard "
              "deviation (ddof=1), n. Zero-shot top-1 of a Llip model is taken at its training tau."),
    ]
    if rep.notes:
        blocks.append(("h2", "Notes"))
        blocks.append(("ul", rep.notes))
    blocks += [("h2", "What ran"),
               ("p", "As each configuration's runs logged them; init scale and bias are the loss's initial "
                     "logit scale and bias as training resolved them (loss.init_bias auto: -ln of the global batch)."),
               ("table", what_ran(rep))]
    blocks += [("h2", "Per configuration (headline metrics)"), ("table", (SUMMARY_HEAD, summary_rows(rep)))]
    for prefix, head, rows, phead, prows in by_m_tables(rep):
        blocks += [("h2", f"{prefix}: R-precision by number of true captions m"),
                   ("p", "Per image, the fraction of its m true captions among its top m; images grouped by m. "
                         "mean +- sample std over seeds."),
                   ("table", (head, rows)), ("img", "rprec_by_m.png")]
        if prows:
            blocks += [("p", "Paired by seed: mean difference (configuration - baseline) +- std of the differences; "
                             "* where |mean difference| exceeds the seed-to-seed spread."),
                       ("table", (phead, prows))]
    if rep.comparisons():
        title = "Paired by seed (declared pairs)" if rep.pairs else f"Paired by seed against {rep.baseline}"
        blocks += [("h2", title),
                   ("p", "diff = configuration - baseline at the same seed (same data order). The seed-to-seed "
                         "spread is the larger of the two configurations' standard deviations; a mean difference "
                         "inside it is not distinguishable from reseeding at this number of seeds. train/loss is "
                         "not paired: its scale differs between loss types."),
                   ("table", (paired_head(rep), paired_rows(rep)))]
    blocks += [("h2", "Curves"), ("img", "curves.png"), ("img", "summary.png"),
               ("h2", "Every final metric"), ("table", (SUMMARY_HEAD, summary_rows(rep, rep.metrics))),
               ("h2", "Trials"),
               ("table", (["configuration", "seed", "run", "run id"],
                          [[t.config, str(t.seed), t.name, t.run_id] for t in
                           sorted(rep.trials, key=lambda t: (rep.configs.index(t.config), t.seed))]))]
    return blocks


def render_markdown(rep: Report) -> str:
    out = []
    for kind, x in _sections(rep):
        out.append({"h1": lambda: f"# {x}", "h2": lambda: f"## {x}", "p": lambda: x,
                    "ul": lambda: "\n".join(f"- {n}" for n in x), "img": lambda: f"![{x}]({x})",
                    "table": lambda: _md_table(*x)}[kind]())
    return "\n\n".join(out) + "\n"


def render_html(rep: Report) -> str:
    out = []
    for kind, x in _sections(rep):
        out.append({"h1": lambda: f"<h1>{html.escape(x)}</h1>", "h2": lambda: f"<h2>{html.escape(x)}</h2>",
                    "p": lambda: f"<p>{html.escape(x)}</p>",
                    "ul": lambda: "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in x) + "</ul>",
                    "img": lambda: f'<img src="{html.escape(x)}" style="max-width:100%">',
                    "table": lambda: _html_table(*x)}[kind]())
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}")
    return f"<!doctype html><html><head><meta charset='utf-8'><style>{style}</style></head><body>{''.join(out)}</body></html>\n"


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------
def _histories(c, rep: Report, metric: str) -> dict[str, dict[int, list[tuple[int, float]]]]:
    from orchestrator.tracking.store import metric_history

    out: dict[str, dict[int, list]] = {}
    for t in rep.trials:
        pts = metric_history(c, t.run_id, t.source.get(metric, metric))
        if pts:
            out.setdefault(t.config, {}).setdefault(t.seed, pts)
    return out


def plot_curves(c, rep: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = _plotted(rep)
    n = len(shown)
    fig, axes = plt.subplots(1, max(1, n), figsize=(5 * max(1, n), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], shown):
        for i, (cfg, per_seed) in enumerate(sorted(_histories(c, rep, metric).items(),
                                                   key=lambda kv: rep.configs.index(kv[0]))):
            # steps every seed logged, so the band is over the same number of seeds at each point
            steps = sorted(set.intersection(*(set(s for s, _ in pts) for pts in per_seed.values())))
            if not steps:
                continue
            vals = [[dict(pts)[s] for pts in per_seed.values()] for s in steps]
            mean = [statistics.fmean(v) for v in vals]
            color = f"C{i}"
            ax.plot(steps, mean, color=color, label=f"{cfg} (n={len(per_seed)})", marker="o" if len(steps) < 3 else None)
            if len(per_seed) > 1:
                ax.fill_between(steps, [min(v) for v in vals], [max(v) for v in vals], color=color, alpha=0.2)
        ax.set_title(metric + (" (scales differ by loss)" if metric == "train/loss" else ""), fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("mean over seeds, band: min-max over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_summary(rep: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = _plotted(rep)
    n = len(shown)
    fig, axes = plt.subplots(1, max(1, n), figsize=(4.5 * max(1, n), 0.6 + 0.5 * len(rep.configs) + 1.5), squeeze=False)
    for ax, metric in zip(axes[0], shown):
        y = list(range(len(rep.configs)))[::-1]
        for yi, cfg in zip(y, rep.configs):
            s = rep.stat(cfg, metric)
            if s is None:
                continue
            ax.errorbar([s.mean], [yi], xerr=[[s.std or 0.0], [s.std or 0.0]], fmt="o", color="black", capsize=4)
            ax.scatter(s.values, [yi + 0.15] * s.n, s=12, color="tab:blue", alpha=0.7)
        ax.set_yticks(y, rep.configs, fontsize=8)
        ax.set_title(metric, fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle("mean +- std over seeds (black), each seed (blue)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plotted(rep: Report) -> list[str]:
    """Headline metrics with a panel each; R-precision by m has its own figure."""
    return [m for m in rep.headline if not _BY_M.fullmatch(m)]


def plot_rprec_by_m(rep: Report, path: Path) -> None:
    """Per set, R-precision against m (mean over seeds, error bar: std; dots: each seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = rep.by_m_sets()
    fig, axes = plt.subplots(1, max(1, len(sets)), figsize=(6 * max(1, len(sets)), 4), squeeze=False)
    for ax, (prefix, ms) in zip(axes[0], sets.items()):
        xs = [int(k.rsplit("_m", 1)[1]) for k in ms]
        for i, cfg in enumerate(rep.configs):
            stats = [rep.stat(cfg, k) for k in ms]
            pts = [(x + 0.04 * (i - len(rep.configs) / 2), s) for x, s in zip(xs, stats) if s is not None]
            if not pts:
                continue
            ax.errorbar([x for x, _ in pts], [s.mean for _, s in pts], yerr=[s.std or 0.0 for _, s in pts],
                        marker="o", capsize=3, color=f"C{i % 10}", label=f"{cfg} (n={max(s.n for _, s in pts)})")
            for x, s in pts:
                ax.scatter([x] * s.n, s.values, s=8, color=f"C{i % 10}", alpha=0.5)
        ax.set_xticks(xs)
        ax.set_xlabel("m: true captions (objects) per image")
        ax.set_ylabel("R-precision")
        ax.set_title(prefix, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("R-precision by m: mean +- std over seeds, dots: each seed", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# logging and CLI
# --------------------------------------------------------------------------------------------
def write(c, rep: Report, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.md").write_text(render_markdown(rep))
    (folder / "report.html").write_text(render_html(rep))
    for name, head, rows in (("summary.csv", SUMMARY_HEAD, summary_rows(rep, rep.metrics)),
                             ("paired.csv", paired_head(rep) if rep.comparisons() else [], paired_rows(rep))):
        with open(folder / name, "w", newline="") as f:
            w = csv.writer(f)
            if head:
                w.writerow(head)
            w.writerows(rows)
    plot_curves(c, rep, folder / "curves.png")
    plot_summary(rep, folder / "summary.png")
    if rep.by_m_sets():
        plot_rprec_by_m(rep, folder / "rprec_by_m.png")
    return sorted(folder.iterdir())


def log_to_parent(c, rep: Report) -> None:
    with tempfile.TemporaryDirectory() as d:
        write(c, rep, Path(d) / "report")
        c.log_artifacts(rep.parent.info.run_id, str(Path(d) / "report"), "report")


def console_text(rep: Report) -> str:
    out = ["what ran:", format_text(*what_ran(rep)), "", format_text(SUMMARY_HEAD, summary_rows(rep))]
    for prefix, head, rows, phead, prows in by_m_tables(rep):
        out += ["", f"{prefix}: R-precision by m (mean +- std over seeds):", format_text(head, rows)]
        if prows:
            out += ["", f"{prefix}: paired by seed, by m (* |mean diff| > seed-to-seed spread):", format_text(phead, prows)]
    if rep.comparisons():
        title = "paired by seed (declared pairs):" if rep.pairs else f"paired by seed against {rep.baseline}:"
        out += ["", title, format_text(paired_head(rep), paired_rows(rep))]
    out += ([""] if rep.notes else []) + [f"note: {n}" for n in rep.notes]
    return "\n".join(out)


def cli(args) -> int:
    from orchestrator.tracking import store as tracking

    c, uri = tracking.existing_store_client(args.tracking_uri)
    rep = collect(c, args.target, args.baseline, args.pair)
    name = rep.parent.data.tags.get("llip.run_name", rep.parent.info.run_id)
    print(f"sweep {name} in experiment {rep.experiment}: {len(rep.trials)} finished trials, "
          f"{len(rep.configs)} configurations\n")
    print(console_text(rep))
    if not args.no_log:
        log_to_parent(c, rep)
        print("\nlogged report/report.md, report.html, summary.csv, paired.csv, curves.png, summary.png"
              + (", rprec_by_m.png" if rep.by_m_sets() else "") + f" to parent run {rep.parent.info.run_id}")
    return 0
