"""Evaluation runs: inside training (rank 0, every `eval.every` steps and at the end) and standalone
(`llip eval`, orchestrator/evaluation/standalone.py). The math is llip_core.evaluate; this module
reads the sets (orchestrator/data/evalsets.py), names the metrics and logs them.

Metric names: `eval/<set>/<metric>`, where <metric> is `recall1`, `i2t_recall5`, `t2i_recall10`, ...
for retrieval (recallK is the mean of the two directions), with `rprec` (per image, the fraction of
its m distinct true captions among its top m), `rprec_m1`, `rprec_m2`, ... (the same over the images
with m true captions; only on sets where some image has several) and `map` (per caption, the average
precision of its images over the gallery), and `top1`, `top5` for zero-shot
classification; with `eval.tau` listed (Llip), `top1_tau5` is top-1 at tau = 5 (MLflow names may not
hold "@" or "="). `eval/<set>/num_samples` and `eval/<set>/seconds` come with them. The held-out
split in `data.eval` keeps its historic top-level names (`eval/recall1`, `eval/i2t_recall1`, ...),
which is what `sweep.metric` defaults to.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from orchestrator.errors import UserError

HEADLINE = ("recall1", "top1")  # the metric per set that curves and summaries show first


# --------------------------------------------------------------------------------------------
# names and set resolution
# --------------------------------------------------------------------------------------------
def metric_key(set_name: str, key: str) -> str:
    """("fashion_mnist", "top1@tau=5") -> "eval/fashion_mnist/top1_tau5"; ("", "r@1") -> "eval/recall1"."""
    k = key.replace("@tau=", "_tau").replace("r@", "recall")
    return "eval/" + (f"{set_name}/" if set_name else "") + k


def preflight(cfg, scan: bool = True) -> list[dict]:
    """Every set a run evaluates (data.eval as the unnamed set, then eval.sets), resolved and checked:
    a bad set fails here, in one line naming its folder, before any trainer or MLflow run starts.
    Returns JSON-able dicts for the worker loop."""
    from orchestrator.data.evalsets import inspect_set

    infos = []
    if cfg.data.eval:
        infos.append(inspect_set(cfg.data.eval, name="", split="test", s3cfg=cfg.data.s3, scan=scan))
    for s in cfg.eval.sets:
        infos.append(inspect_set(s.path, name=s.name, split=s.split, max_samples=s.max_samples,
                                 s3cfg=cfg.data.s3, scan=scan))
    return [i.to_dict() for i in infos]


def eval_tokenizer(cfg, spec: Optional[dict] = None):
    """The tokenizer the model was trained with: rebuilt from the run's spec (passed to the workers,
    stored in checkpoints as state["tokenizer"]) when there is one, else the one the YAML names."""
    from llip_core.tokenizer import build_tokenizer

    if spec is None:
        from orchestrator.config.schema import yaml_spec

        spec = yaml_spec(cfg)
        if spec.get("vocab") == "compact" and not spec.get("ids"):
            # every word would map to the unknown id and all captions would look alike
            raise UserError(f"{cfg.name}: model.vocab compact needs the run's own id table, stored with its "
                            "checkpoint (state['tokenizer']); evaluate a checkpoint or run, not a bare config")
    return build_tokenizer(spec)


class _Images:
    """uint8 HWC images normalised on the fly, batch by batch (a whole 224 px set as float32 would
    not fit in memory); llip_core.evaluate only slices and reads shape and device."""

    def __init__(self, u8, device):
        import torch

        self.u8, self.device, self.shape = u8, torch.device(device), (len(u8),)

    def __getitem__(self, sl):
        import torch

        from llip_core.preprocess import normalize

        return torch.from_numpy(normalize(self.u8[sl])).to(self.device)


class EvalRunner:
    """Sets decoded once (at the model's image size) and captions tokenized once; `run(model)` scores
    them all. Cost per call is the forward passes: (images + distinct captions or class prompts)."""

    def __init__(self, infos: Sequence[dict], image_size: int, tokenizer, *, batch_size: int = 256,
                 recall_k: Sequence[int] = (1, 5, 10), taus: Optional[Sequence[float]] = None, s3cfg=None,
                 device="cpu"):
        import numpy as np
        import torch

        from llip_core.evaluate import retrieval_chance
        from orchestrator.data.evalsets import RETRIEVAL, SetInfo, load_set

        self.tokenizer, self.batch_size, self.taus, self.device = tokenizer, batch_size, taus, device
        self.recall_k = tuple(recall_k)
        self.sets = []
        for d in infos:
            loaded = load_set(SetInfo.from_dict(d), image_size, s3cfg)
            entry = {"set": loaded}
            if loaded.info.kind == RETRIEVAL:
                flat = [c for caps in loaded.captions for c in caps]
                entry["tokens"] = torch.as_tensor(np.asarray(tokenizer(flat)), device=device)
                entry["owner"] = torch.as_tensor([i for i, caps in enumerate(loaded.captions) for _ in caps],
                                                 device=device)
                # chance depends on the set only (repeated captions raise it above k / N): once
                ks = tuple(k for k in self.recall_k if k <= len(loaded.images)) or (1,)
                entry["chance"] = {"chance_" + k: v for k, v in
                                   retrieval_chance(entry["tokens"], entry["owner"], len(loaded.images), ks,
                                                    multi=True).items()}
            self.sets.append(entry)

    def run(self, model) -> dict[str, float]:
        import torch

        from llip_core.evaluate import retrieval_metrics, zero_shot_classify
        from orchestrator.data.evalsets import CLASSIFICATION

        out: dict[str, float] = {}
        was_training = getattr(model, "training", False)
        if hasattr(model, "eval"):
            model.eval()
        try:
            with torch.no_grad():
                for e in self.sets:
                    s, t0 = e["set"], time.perf_counter()
                    images = _Images(s.images, self.device)
                    if s.info.kind == CLASSIFICATION:
                        r = zero_shot_classify(model, images, s.labels, s.info.classnames, s.info.templates,
                                               self.tokenizer, self.batch_size, taus=self.taus)
                    else:
                        ks = tuple(k for k in self.recall_k if k <= len(s.images)) or (1,)
                        r = retrieval_metrics(model, images, e["tokens"], ks, self.batch_size, caption_image=e["owner"])
                    name = s.info.name
                    out.update({metric_key(name, k): float(v) for k, v in {**r, **e.get("chance", {})}.items()})
                    out[metric_key(name, "num_samples")] = float(len(s.images))
                    out[metric_key(name, "seconds")] = time.perf_counter() - t0
        finally:
            if was_training and hasattr(model, "train"):
                model.train()
        return out


def runner_for(cfg, infos: Sequence[dict], tokenizer_spec: Optional[dict] = None, device="cpu",
               taus: Optional[Sequence[float]] = None) -> Optional[EvalRunner]:
    if not infos:
        return None
    m = cfg.resolved_model()
    taus = taus if taus is not None else cfg.eval.tau
    # tau is Llip's softmax temperature over mixture tokens; the other poolings have none to sweep
    taus = taus if m.pooling == "llip" else None
    return EvalRunner(infos, m.image_size, eval_tokenizer(cfg, tokenizer_spec), batch_size=cfg.eval.batch_size,
                      recall_k=cfg.eval.recall_k, taus=taus, s3cfg=cfg.data.s3, device=device)


def curve_keys(metrics: dict, tau: Optional[float] = None) -> list[str]:
    """The metrics plotted over steps: training loss, then each set's headline: recall1, top1, or with
    several taus the top-1 at the model's own tau (else the first listed), and R-precision on sets
    whose images have several captions."""
    keys = ["train/loss"]
    sets = sorted({k.split("/")[1] for k in metrics if k.count("/") == 2 and k.startswith("eval/")})
    if "eval/recall1" in metrics:
        keys.append("eval/recall1")
    for s in sets:
        own = [f"eval/{s}/top1_tau{tau:g}"] if tau is not None else []
        cands = [f"eval/{s}/{h}" for h in HEADLINE] + own + sorted(k for k in metrics if k.startswith(f"eval/{s}/top1_tau"))
        hit = next((k for k in cands if k in metrics), None)
        if hit:
            keys.append(hit)
        if any(k.startswith(f"eval/{s}/rprec_m") for k in metrics):  # several captions per image: R-precision too
            keys.append(f"eval/{s}/rprec")
    keys.append("train/logit_scale")
    return keys


def format_eval_table(metrics: dict, infos: Sequence[dict] = ()) -> str:
    """Rows of set / metric / value / chance: k / classes for top-k; for retrieval, what a model
    scoring everything alike gets on that set (logged as eval/<set>/chance_*)."""
    classes = {d["name"]: len(d.get("classnames") or []) for d in infos}
    rows = []
    for k in sorted(metrics):
        parts = k.split("/")
        if parts[0] != "eval" or len(parts) not in (2, 3) or parts[-1] in ("seconds", "num_samples") \
                or parts[-1].startswith("chance_"):
            continue
        prefix = "/".join(parts[:-1])
        metric = parts[-1]
        chance = None
        mm = re.match(r"top(\d+)", metric)
        if mm and classes.get(parts[1] if len(parts) == 3 else ""):
            chance = min(1.0, int(mm.group(1)) / classes[parts[1]])
        elif metric.startswith(("i2t_", "t2i_", "rprec")) or metric == "map":
            chance = metrics.get(f"{prefix}/chance_{metric}")
        elif re.fullmatch(r"recall\d+", metric):
            pair = [metrics.get(f"{prefix}/chance_{d}_{metric}") for d in ("i2t", "t2i")]
            chance = sum(pair) / 2 if None not in pair else None
        name = parts[1] if len(parts) == 3 else "(data.eval)"
        rows.append((name, metric, f"{100 * metrics[k]:.2f}%", "" if chance is None else f"{100 * chance:.2f}%"))
    if not rows:
        return "(no eval metrics)"
    head = ("set", "metric", "value", "chance")
    w = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(x) for h, x in zip(head, w)), "  ".join("-" * x for x in w)]
    lines += ["  ".join(c.ljust(x) for c, x in zip(r, w)).rstrip() for r in rows]
    return "\n".join(lines)


def merge_final(c, run_id: str, metrics: dict) -> None:
    """Add metrics to the run's eval/final.json and eval/final.md (written at the end of training)."""
    import tempfile

    final: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory() as d:
            final = json.loads(Path(c.download_artifacts(run_id, "eval/final.json", d)).read_text())
    except Exception:  # no final table yet (a run that failed, or a new eval-only run)
        final = {}
    final.update({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    final = dict(sorted(final.items()))
    c.log_dict(run_id, final, "eval/final.json")
    rows = "\n".join(f"| {k} | {v:.6g} |" for k, v in final.items())
    c.log_text(run_id, f"| metric | value |\n|---|---|\n{rows}\n", "eval/final.md")
