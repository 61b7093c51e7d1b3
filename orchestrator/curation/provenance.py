"""What a curation produced, as training sees it: the stats file `llip curate` writes beside the
curated shards, checked against a training run's `curation:` settings before it trains
(`provenance`), and the MLflow tags that lead from the training run back to its curation run
(`provenance_tags`)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from orchestrator.curation.metadata import file_sha256
from orchestrator.errors import UserError
from orchestrator.storage.paths import read_json_at

STATS_FILE = "curation_stats.json"
STATS_FORMAT = "llip-curation/1"


def read_stats(out: str, s3cfg=None) -> Optional[dict]:
    """curation_stats.json under a curated root, or None when absent or unreadable."""
    return read_json_at(out, STATS_FILE, s3cfg)


def provenance(cfg) -> dict:
    """The curation a training run is about to use, checked against its config: the stats of the
    curated output, or a one-line UserError when it is missing or was made with other settings."""
    c = cfg.curation
    stats = read_stats(c.out, cfg.data.s3)
    cmd = "`llip curate FILE.yaml` (the same experiment file)"
    if stats is None:
        raise UserError(f"curation.out {c.out}: no {STATS_FILE} there, so nothing was curated yet; run {cmd} first")
    meta_sha = file_sha256(c.metadata) if Path(c.metadata).is_file() else stats.get("metadata_sha256")
    want = {"t": c.t, "mode": c.mode, "seed": c.seed, "metadata_sha256": meta_sha, "source": cfg.data.train}
    for k, v in want.items():
        if stats.get(k) != v:
            shown = (lambda x: str(x)[:12]) if k == "metadata_sha256" else repr
            raise UserError(f"curation.out {c.out} was curated with {k}={shown(stats.get(k))} but the config says "
                            f"{k}={shown(v)}; rerun {cmd} or point curation.out elsewhere")
    return stats


def provenance_tags(stats: dict) -> dict[str, str]:
    return {
        "llip.curation.run_id": str(stats.get("mlflow_run_id")),
        "llip.curation.metadata_sha256": str(stats.get("metadata_sha256")),
        "llip.curation.t": str(stats.get("t")),
        "llip.curation.mode": str(stats.get("mode")),
        "llip.curation.fingerprint": str(stats.get("fingerprint")),
        "llip.curation.kept_pairs": f"{float(stats.get('kept_pairs', 0)):.0f}",
    }
