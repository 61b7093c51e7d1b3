"""Does a sweep's shared decode (orchestrator/data/shared_decode.py) pay in wall time? A 4-trial sweep
decoding per trial against the same sweep reading one shared decode, in two settings:

  emoji     experiments/sweep_demo.yaml's grid (K x loss type: 4 trials, smoke-size model, one
            worker each) on the demo's 32 px Twemoji PNG shards, 60 steps (sweep_demo's own): decoding is cheap.
  jpeg224   the same sweep with the smallest model (`micro`) on those images re-encoded as 224 px
            JPEG shards, decoded and augmented at 224 with patch 16 (a B/16 run's 196 patches),
            100 steps, 2 decode tasks (`data.decode_concurrency`; in the shared mode that is also
            the producer's tasks and its read-ahead): decoding is about half of a trial's CPU a
            sample, and the steps are enough that the trials' start-up (about 30 s each here) is
            not most of the wall.
  jpeg224-p32  the same with patch 32 (49 patches): the same decode and augmentation at 224, a
            training step about half as costly, so decoding dominates (two thirds of a sample's
            CPU), as on GPU trials, where the CPUs do little else; 300 steps, so that the trials'
            start-up, the same in both modes, is not most of the wall.

Both modes run at the same number of trials at once (`--concurrent`, 2: the per-trial mode's own
limit on 2 cores; the shared mode would otherwise start 3, as its trials reserve no decode CPUs,
and on a CPU-only machine a third trial only shares the same 2 cores and leaves the 4th trial
alone at the end), so the schedule is the same and only the data path differs. Model logging is
off (`mlflow.log_model`): it is the same in both modes and not data.

The two modes run interleaved (per-trial, shared, shared, per-trial, ... `--rounds` of each, the
order alternating per round) on one local Ray cluster, so a change in the machine's load hits both;
the load average is printed before each run. Reported per setting and mode: median and range of the
sweep's wall time and of the read+decode CPU seconds (thread CPU time measured inside the read and
decode tasks, the trials' and the shared pass's), the cache's own I/O CPU beside them, and what
`sweep.shared_data.enabled: auto` decides for the setting (its measured decode share).

    python benchmarks/sweep_data.py [--settings emoji jpeg224 jpeg224-p32] [--rounds 3] [--steps N] [--concurrent 2]

Last line: one JSON object; per setting `wall_ratio` and `decode_cpu_ratio` (median shared / median
per-trial; targets where decoding is the cost: <= 0.8 and <= 0.35), the spreads, and auto's decision.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
STEPS = {"emoji": 60, "jpeg224": 100, "jpeg224-p32": 300}  # per setting, unless --steps


def jpeg_shards(src: Path, out: Path) -> Path:
    """The emoji training shards' images re-encoded as 224 px JPEG (quality 90, on white), same
    captions, same sample keys' order; returns the train folder."""
    from PIL import Image

    from orchestrator.data.shards import write_splits
    from orchestrator.data.sizes import open_shard
    from orchestrator.data.sources import Sample
    from orchestrator.data.tars import read_tar_stream

    samples = []
    for path in sorted(src.glob("*.tar")):
        with open_shard(str(path), None) as f:
            for t in read_tar_stream(f, str(path)):
                for row in t.to_pylist():
                    if row["error"] is not None or row["image"] is None:
                        continue
                    img = Image.open(io.BytesIO(row["image"]))
                    if img.mode in ("RGBA", "LA", "P"):
                        img = img.convert("RGBA")
                        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
                        img = Image.alpha_composite(bg, img)
                    buf = io.BytesIO()
                    img.convert("RGB").resize((224, 224), Image.BICUBIC).save(buf, format="JPEG", quality=90)
                    caps = json.loads(row["json"])["captions"] if row["json"] else [row["txt"].decode()]
                    samples.append(Sample(key_hint=row["key"], captions=caps,
                                          load=(lambda b=buf.getvalue(): (b, "jpg"))))
    write_splits(str(out), {"train": samples}, samples_per_shard=256, seed=0, source="emoji:jpeg224")
    return out / "train"


def config(setting: str, shards: Path, mode: str, args, work: Path):
    from orchestrator.config.schema import load_config

    steps = args.steps or STEPS[setting]
    over = {
        "name": f"bench_{setting}_{mode}", "data.train": str(shards), "data.eval": None,
        "train.steps": steps, "train.log_every": max(1, steps // 4), "train.warmup_steps": 5,
        "mlflow.log_model": False,
        "storage_path": str(work / "runs"), "mlflow.tracking_uri": f"sqlite:///{work / 'mlflow.db'}",
        "sweep.metric": "train/loss", "sweep.mode": "min",
        "sweep.shared_data.enabled": {"per_trial": False, "shared": True, "auto": "auto"}[mode],
    }
    if setting.startswith("jpeg224"):  # the smallest model, at a B/16 run's image size (and patch count)
        over.update({"model.size": "micro", "model.image_size": 224, "model.patch_size": 32 if setting.endswith("p32") else 16,
                     "data.decode_concurrency": 2,  # 2 decode tasks, as 224 px data needs (both modes)
                     "model.width": None, "model.layers": None, "model.heads": None, "model.text_width": None,
                     "model.text_layers": None, "model.text_heads": None, "model.embed_dim": None,
                     "model.mixture_tokens": None})
    if args.concurrent:
        over["sweep.max_concurrent_trials"] = args.concurrent
    return load_config(ROOT / "experiments" / "sweep_demo.yaml").with_overrides(over)


def run(setting: str, shards: Path, mode: str, args, work: Path) -> dict:
    from mlflow.tracking import MlflowClient

    from orchestrator.sweeps.tune import run_sweep

    cfg = config(setting, shards, mode, args, work)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    out = run_sweep(cfg)
    wall = time.perf_counter() - t0
    c = MlflowClient(cfg.mlflow.tracking_uri)
    parent = c.get_run(out["parent_run_id"])
    kids = c.search_runs([parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    m = [k.data.metrics for k in kids]
    pm = parent.data.metrics

    def s(key):
        return sum(x.get(key, 0.0) for x in m) / 1000

    trials = s("data/read_cpu_ms") + s("data/decode_cpu_ms")
    shared = (pm.get("data_shared/read_cpu_ms", 0.0) + pm.get("data_shared/decode_cpu_ms", 0.0)) / 1000
    r = {"setting": setting, "mode": mode, "finished": out["finished"], "trials": len(kids), "wall_s": wall,
         "decode_cpu_s": trials + shared,
         "cache_io_cpu_s": s("data/cache_read_cpu_ms") + pm.get("data_shared/cache_write_cpu_ms", 0.0) / 1000,
         "decoded_rows": sum(x.get("data/decoded", 0.0) for x in m) + pm.get("data_shared/decoded", 0.0),
         "load_before": load0}
    print(f"[bench] {setting:<8} {mode:<9} wall {wall:7.1f} s  read+decode CPU {r['decode_cpu_s']:7.2f} s  "
          f"cache I/O CPU {r['cache_io_cpu_s']:5.2f} s  rows decoded {int(r['decoded_rows']):6d}  "
          f"load before {load0:.1f}", flush=True)
    return r


def summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", nargs="+", default=["emoji", "jpeg224", "jpeg224-p32"],
                    choices=["emoji", "jpeg224", "jpeg224-p32"])
    ap.add_argument("--rounds", type=int, default=3, help="runs of each mode per setting, interleaved")
    ap.add_argument("--steps", type=int, default=None, help=f"steps per trial (default per setting: {STEPS})")
    ap.add_argument("--shards", default=str(ROOT / "data" / "emoji" / "train"), help="the emoji training shards")
    ap.add_argument("--concurrent", type=int, default=2,
                    help="trials at once, the same for both modes (0: each mode derives its own)")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false",
                    help="skip the uncounted 5-step sweep that starts Ray's worker processes first")
    args = ap.parse_args()
    emoji = Path(args.shards)
    if not emoji.is_dir():
        sys.exit(f"{emoji}: no shards; run `llip shards emoji --out data/emoji` first")
    os.environ.setdefault("RAY_ADDRESS", "local")
    import ray

    from orchestrator.data.shared_decode import decode_share

    ray.init(address="local", include_dashboard=False, log_to_driver=True, configure_logging=False)
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="llip-sweep-data-") as d:
        shards = {"emoji": emoji}
        if any(x.startswith("jpeg224") for x in args.settings):
            t0 = time.perf_counter()
            shards["jpeg224"] = shards["jpeg224-p32"] = jpeg_shards(emoji, Path(d) / "jpeg224")
            print(f"[bench] wrote the 224 px JPEG shards in {time.perf_counter() - t0:.1f} s", flush=True)
        if args.warmup:  # the first sweep on a fresh Ray cluster pays for starting its worker processes
            setting = args.settings[0]
            t0 = time.perf_counter()
            run(setting, shards[setting], "per_trial", argparse.Namespace(**{**vars(args), "steps": 5}),
                Path(tempfile.mkdtemp(dir=d, prefix="warmup-")))
            print(f"[bench] warm-up sweep (5 steps, not counted) in {time.perf_counter() - t0:.1f} s", flush=True)
        for setting in args.settings:
            probe = config(setting, shards[setting], "auto", args, Path(d))
            dec, train, share = decode_share(probe)
            auto = "shared" if share >= probe.sweep.shared_data.min_decode_share else "per_trial"
            print(f"[bench] {setting}: decode {1e3 * dec:.2f} ms, train {1e3 * train:.2f} ms a sample: decode share "
                  f"{share:.0%}, so `auto` decodes {'once, shared' if auto == 'shared' else 'per trial'}", flush=True)
            runs = {"per_trial": [], "shared": []}
            for i in range(args.rounds):
                order = ("per_trial", "shared") if i % 2 == 0 else ("shared", "per_trial")
                for mode in order:
                    work = Path(d) / f"{setting}-{mode}-{i}"
                    work.mkdir()
                    runs[mode].append(run(setting, shards[setting], mode, args, work))
            results[setting] = {"runs": runs, "decode_share": share, "auto": auto,
                                "decode_ms": 1e3 * dec, "train_ms": 1e3 * train}
    ray.shutdown()

    print()
    print(f"{'setting':<9} {'mode':<10} {'wall s median [min-max]':>26} {'read+decode CPU s median [min-max]':>36} "
          f"{'cache I/O CPU s':>16}")
    out = {}
    for setting, res in results.items():
        stats = {}
        for mode, rs in res["runs"].items():
            w, c = summary([r["wall_s"] for r in rs]), summary([r["decode_cpu_s"] for r in rs])
            stats[mode] = {"wall_s": w, "decode_cpu_s": c,
                           "cache_io_cpu_s": round(statistics.median(r["cache_io_cpu_s"] for r in rs), 2),
                           "load_before": [round(r["load_before"], 1) for r in rs],
                           "finished": [r["finished"] for r in rs]}
            print(f"{setting:<9} {mode:<10} {w['median']:>9.1f} [{w['min']:.1f}-{w['max']:.1f}]{'':>6} "
                  f"{c['median']:>14.2f} [{c['min']:.2f}-{c['max']:.2f}]{'':>8} {stats[mode]['cache_io_cpu_s']:>10.2f}")
        a, b = stats["per_trial"], stats["shared"]
        out[setting] = {
            "wall_ratio": round(b["wall_s"]["median"] / a["wall_s"]["median"], 3),
            "decode_cpu_ratio": round(b["decode_cpu_s"]["median"] / a["decode_cpu_s"]["median"], 3)
            if a["decode_cpu_s"]["median"] else None,
            "auto": res["auto"], "decode_share": round(res["decode_share"], 3),
            "decode_ms_per_sample": round(res["decode_ms"], 3), "train_ms_per_sample": round(res["train_ms"], 3),
            **{mode: stats[mode] for mode in stats},
        }
        print(f"{setting}: shared / per-trial wall {out[setting]['wall_ratio']}, read+decode CPU "
              f"{out[setting]['decode_cpu_ratio']}; auto: {res['auto']}")
    print(json.dumps({"steps": {k: args.steps or STEPS[k] for k in out}, "trials": 4, "rounds": args.rounds,
                      "warmup": args.warmup,
                      "concurrent": args.concurrent or "derived", **out}))


if __name__ == "__main__":
    main()
