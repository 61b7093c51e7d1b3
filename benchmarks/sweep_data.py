"""A 4-trial sweep with and without the shared data pass (orchestrator/data/shared_decode.py): CPU seconds
spent reading and decoding training data, and wall time.

The sweep is experiments/sweep_demo.yaml's grid (K x loss type, tau drawn per trial: 4 trials, tiny
model, 1 worker each) on the demo emoji shards, shortened to --steps steps with no evaluation
(metric train/loss), run twice on one local Ray cluster: per-trial decoding
(sweep.shared_data.enabled false, today's behaviour) and the shared pass. Concurrency is what each
mode derives from the free CPUs unless --concurrent is given (the shared pass's trials reserve no
data CPUs, so more of them may fit).

CPU seconds are thread CPU time measured inside the read and decode tasks (data/read_cpu_ms and
data/decode_cpu_ms: the DataStats actors of each trial, logged on its MLflow run as it ends, and of
the shared pass, logged on the sweep's parent run). The shared pass also writes its windows and the
trials read them back: that cost is reported beside (cache_io_cpu_s), not hidden.

    python benchmarks/sweep_data.py [--steps 40] [--shards data/emoji/train] [--concurrent N]

Last line: one JSON object with `decode_cpu_ratio` (shared / per-trial; target <= 0.35) and
`wall_ratio` (shared / per-trial; target <= 1).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(mode: str, args, work: Path) -> dict:
    from mlflow.tracking import MlflowClient

    from orchestrator.config.schema import load_config
    from orchestrator.sweeps.tune import run_sweep

    uri = f"sqlite:///{work / 'mlflow.db'}"
    cfg = load_config(ROOT / "experiments" / "sweep_demo.yaml").with_overrides({
        "name": f"bench_{mode}", "data.train": str(Path(args.shards).resolve()), "data.eval": None,
        "train.steps": args.steps, "train.log_every": max(1, args.steps // 4), "train.warmup_steps": 5,
        "storage_path": str(work / "runs"), "mlflow.tracking_uri": uri,
        "sweep.metric": "train/loss", "sweep.mode": "min",
        "sweep.shared_data.enabled": mode == "shared",
        **({"sweep.max_concurrent_trials": args.concurrent} if args.concurrent else {})})
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    out = run_sweep(cfg)
    wall = time.perf_counter() - t0
    c = MlflowClient(uri)
    parent = c.get_run(out["parent_run_id"])
    kids = c.search_runs([parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    m = [k.data.metrics for k in kids]
    pm = parent.data.metrics

    def s(key):
        return sum(x.get(key, 0.0) for x in m) / 1000

    trials_decode = s("data/read_cpu_ms") + s("data/decode_cpu_ms")
    shared_decode = (pm.get("data_shared/read_cpu_ms", 0.0) + pm.get("data_shared/decode_cpu_ms", 0.0)) / 1000
    return {
        "mode": mode, "trials": len(kids), "finished": out["finished"], "wall_s": wall,
        "decode_cpu_s": trials_decode + shared_decode, "trials_decode_cpu_s": trials_decode,
        "shared_decode_cpu_s": shared_decode,
        "cache_io_cpu_s": s("data/cache_read_cpu_ms") + pm.get("data_shared/cache_write_cpu_ms", 0.0) / 1000,
        "decoded_rows": sum(x.get("data/decoded", 0.0) for x in m) + pm.get("data_shared/decoded", 0.0),
        "load_before": load0, "load_after": os.getloadavg()[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--shards", default=str(ROOT / "data" / "emoji" / "train"))
    ap.add_argument("--concurrent", type=int, default=None, help="max concurrent trials for both modes")
    args = ap.parse_args()
    if not Path(args.shards).is_dir():
        sys.exit(f"{args.shards}: no shards; run `llip shards emoji --out data/emoji` first")
    os.environ.setdefault("RAY_ADDRESS", "local")
    import ray

    ray.init(address="local", include_dashboard=False, log_to_driver=True, configure_logging=False)
    res = {}
    with tempfile.TemporaryDirectory(prefix="llip-sweep-data-") as d:
        for mode in ("per_trial", "shared"):
            work = Path(d) / mode
            work.mkdir()
            res[mode] = run(mode, args, work)
    ray.shutdown()
    print()
    print(f"{'mode':<10} {'trials':>6} {'wall s':>8} {'read+decode CPU s':>18} {'cache I/O CPU s':>16} "
          f"{'rows decoded':>13} {'load 1m':>12}")
    for r in res.values():
        print(f"{r['mode']:<10} {r['finished']:>3}/{r['trials']:<2} {r['wall_s']:>8.1f} {r['decode_cpu_s']:>18.2f} "
              f"{r['cache_io_cpu_s']:>16.2f} {int(r['decoded_rows']):>13} "
              f"{r['load_before']:>5.1f}->{r['load_after']:<5.1f}")
    a, b = res["per_trial"], res["shared"]
    print(json.dumps({
        "decode_cpu_ratio": round(b["decode_cpu_s"] / a["decode_cpu_s"], 3) if a["decode_cpu_s"] else None,
        "wall_ratio": round(b["wall_s"] / a["wall_s"], 3),
        "decode_cpu_s": {"per_trial": round(a["decode_cpu_s"], 2), "shared": round(b["decode_cpu_s"], 2)},
        "cache_io_cpu_s": round(b["cache_io_cpu_s"], 2),
        "wall_s": {"per_trial": round(a["wall_s"], 1), "shared": round(b["wall_s"], 1)},
        "rows_decoded": {"per_trial": int(a["decoded_rows"]), "shared": int(b["decoded_rows"])},
        "steps": args.steps, "trials": 4,
    }))


if __name__ == "__main__":
    main()
