"""PNG plots logged to MLflow (matplotlib with the Agg backend; no display needed)."""
from __future__ import annotations

import tempfile
from pathlib import Path


def plot_run_curves(c, run_id: str, keys: tuple[str, ...] = ("train/loss", "eval/recall1", "train/logit_scale")) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from orchestrator.tracking.store import metric_history

    series = {k: metric_history(c, run_id, k) for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return
    fig, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 3.2), squeeze=False)
    for ax, (k, pts) in zip(axes[0], series.items()):
        steps, values = zip(*pts)
        ax.plot(steps, values, marker="o" if len(pts) < 3 else None)
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "curves.png"
        fig.savefig(path, dpi=100)
        c.log_artifact(run_id, str(path), "plots")
    plt.close(fig)
