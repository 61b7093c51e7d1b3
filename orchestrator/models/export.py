"""`llip export RUN_OR_CHECKPOINT --out DIR`: a training checkpoint as weights-only files others load.

`--format llip` (default) writes llip_core.pretrained's folder (model.safetensors, config.json,
CLIP's BPE merges, README.md), which `llip_core.pretrained.load(DIR)` turns back into the model in one
line, `llip eval DIR` evaluates and `train.init_from: DIR` trains from. `--format open_clip` writes
open_clip's `local-dir:` layout (open_clip_config.json, open_clip_model.safetensors, README.md) for
models with one embedding per image. DIR is a local folder or s3://bucket/prefix.

The model card (README.md) says where the weights came from: run id and name, experiment, the data
manifest's fingerprint, the curation lineage, the final eval metrics, and the llip-orch version and
commit that trained and that exported them.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from orchestrator.errors import UserError

FORMATS = ("llip", "open_clip")
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"


@dataclass
class ExportResult:
    out: str
    files: dict[str, int] = field(default_factory=dict)  # name -> bytes
    seconds: float = 0.0
    run_id: Optional[str] = None
    checkpoint: str = ""


def add_args(p) -> None:
    p.add_argument("target", metavar="RUN_OR_CHECKPOINT",
                   help="an MLflow run id or run name (its final checkpoint), or a checkpoint: a folder holding "
                        "state.pt, the state.pt file, or a run's storage folder (its latest checkpoint_*); local or s3://")
    p.add_argument("--out", required=True, metavar="DIR", help="the export folder, local or s3://bucket/prefix")
    p.add_argument("--format", choices=FORMATS, default="llip",
                   help="llip: llip_core.pretrained.load's folder (every model type); open_clip: open_clip's "
                        "local-dir: layout (CLIP/SigLIP models: one embedding per image)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weights' precision (default fp32)")
    p.add_argument("--tracking-uri", default=None,
                   help="the MLflow store holding the run (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")


def cli(args) -> int:
    from orchestrator.tracking.lookup import resolve_checkpoint

    ckpt, run, _c = resolve_checkpoint(args.target, args.tracking_uri)
    r = export_checkpoint(ckpt, args.out, fmt=args.format, dtype=args.dtype, run=run, client=_c)
    total = sum(r.files.values())
    print(f"exported {ckpt} ({'run ' + r.run_id if r.run_id else 'no MLflow run found'}) to {r.out} "
          f"in {r.seconds:.1f} s: " + ", ".join(f"{k} {_size(v)}" for k, v in r.files.items()) + f" ({_size(total)})")
    if args.format == "llip":
        print(f"  load it:  python -c \"import llip_core.pretrained as p; m = p.load('{r.out}')\"   "
              f"evaluate it:  llip eval {r.out} --set PATH")
    else:
        print(f"  load it:  open_clip.create_model_and_transforms('local-dir:{r.out}')")
    return 0


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _run_facts(c, run) -> dict[str, Any]:
    """What the model card and config.json say about the training run."""
    if run is None:
        return {}
    tags = run.data.tags
    exp = c.get_experiment(run.info.experiment_id).name if c is not None else ""
    final = {k: v for k, v in sorted(run.data.metrics.items()) if k.startswith("eval/") and not k.endswith("seconds")}
    return {
        "run_id": run.info.run_id, "run_name": tags.get("llip.run_name", tags.get("mlflow.runName", "")),
        "experiment": exp,
        "data_manifest": tags.get("llip.data_manifest", ""), "data_train": tags.get("llip.data_train", ""),
        "curation": {k[len("llip.curation."):]: v for k, v in sorted(tags.items()) if k.startswith("llip.curation.")},
        "trained_with": {"version": tags.get("llip.version", ""), "commit": tags.get("llip.git_commit", "")},
        "final_metrics": final,
    }


def model_card(title: str, model_cfg, loss: str, tokenizer: dict, facts: dict, source: dict, fmt: str,
               dtype: str, files: dict[str, int]) -> str:
    """README.md of an export: what the model is, where it came from, how to load it."""
    from llip_core.tokenizer import describe
    from orchestrator.tracking.store import git_commit, package_version

    m = model_cfg
    kind = {"llip": f"Llip (K={m.mixture_tokens} mixture tokens, {m.cross_heads} cross-attention heads, tau {m.tau:g})",
            "cls": "CLIP/SigLIP (one class token)", "avg": f"avg ablation (K={m.mixture_tokens})",
            "register": f"register ablation (K={m.mixture_tokens})",
            "multi_cls": f"Holistic CLIP ({m.branches} branches)"}[m.pooling]
    lines = ["---", "library_name: " + ("open_clip" if fmt == "open_clip" else "llip-orch"),
             "tags: [llip-orch, " + ("llip" if m.pooling == "llip" else "clip") + "]", "---", "",
             f"# {title}", "",
             f"{kind}, trained with the `{loss}` loss. ViT {m.width} wide, {m.layers} layers, {m.heads} heads, "
             f"patch {m.patch_size}, {m.image_size} px; text {m.text_width} wide, {m.text_layers} layers, context "
             f"{m.context_length}; embeddings {m.embed_dim}-d. Tokenizer {describe(tokenizer)}"
             + (f" ({len(tokenizer.get('ids', []))} ids seen in training, plus pad, SOT, EOT and unknown)"
                if tokenizer.get("vocab") == "compact" else "") + f". Weights {dtype}, no optimizer state.", ""]
    lines += ["## Source", ""]
    if facts:
        lines += [f"- run: `{facts['run_name']}` (MLflow run id `{facts['run_id']}`), experiment `{facts['experiment']}`",
                  f"- training data: `{facts['data_train'] or '?'}`, manifest fingerprint `{facts['data_manifest'] or 'none'}`"]
        cur = facts.get("curation") or {}
        lines.append("- curation: " + (", ".join(f"{k} `{v}`" for k, v in cur.items()) if cur else "none (uncurated)"))
        tw = facts.get("trained_with") or {}
        lines.append(f"- trained with llip-orch {tw.get('version') or '?'} (commit `{tw.get('commit') or '?'}`)")
    for k, v in source.items():
        lines.append(f"- {k}: `{v}`")
    lines.append(f"- exported with llip-orch {package_version()} (commit `{git_commit()}`) on "
                 f"{time.strftime('%Y-%m-%d')}")
    final = (facts or {}).get("final_metrics") or {}
    if final:
        lines += ["", "## Final evaluation (as logged by the run)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in final.items()]
    lines += ["", "## Files", ""] + [f"- `{k}` ({_size(v)})" for k, v in files.items()] + ["", "## Use", ""]
    if fmt == "open_clip":
        lines += ["```python", "import open_clip",
                  "model, _, preprocess = open_clip.create_model_and_transforms('local-dir:THIS_FOLDER')",
                  "tokenizer = open_clip.get_tokenizer('local-dir:THIS_FOLDER')", "```", "",
                  "clip_benchmark: `clip_benchmark eval --model local-dir:THIS_FOLDER --pretrained '' ...`. "
                  "Preprocessing here resizes the shorter side and center-crops in one PIL resize and composites "
                  "transparency on white; open_clip's transforms resize then crop and drop alpha, so inputs "
                  "with transparency embed differently."]
    else:
        lines += ["```python", "import llip_core.pretrained",
                  "m = llip_core.pretrained.load('THIS_FOLDER')          # device='cuda' for a GPU",
                  "scores = m.score(images, ['a cat', 'a dog'])            # PIL images or uint8 arrays",
                  "probs = m.zero_shot(images, ['cat', 'dog'], ['a photo of a {c}.']).softmax(-1)", "```", "",
                  "`llip eval THIS_FOLDER --set EVAL_SET` evaluates it; `train.init_from: THIS_FOLDER` trains from it."]
    return "\n".join(lines) + "\n"


def export_checkpoint(ckpt_file: str, out: str, fmt: str = "llip", dtype: str = "fp32", run=None,
                      client=None) -> ExportResult:
    """Export one checkpoint (state.pt, local or s3://) to `out` (a folder or s3:// prefix)."""
    from llip_core.convert import ConvertError, to_open_clip
    from llip_core.pretrained import (CARD_FILE, PretrainedError, export_files, weights_bytes,
                                      weights_from_task_state)
    from orchestrator.storage.checkpoints import load_checkpoint, state_tokenizer_spec
    from orchestrator.storage.paths import Destination
    from orchestrator.tracking.store import git_commit, package_version

    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    t0 = time.perf_counter()
    state, cfg, _model = load_checkpoint(ckpt_file)
    spec = state_tokenizer_spec(state)
    model_cfg = cfg.resolved_model()
    if spec is None:
        if model_cfg.vocab == "compact":
            raise UserError(f"{ckpt_file}: the checkpoint holds no tokenizer spec, and a compact vocabulary cannot be "
                            "rebuilt without it; export a checkpoint written by a newer llip-orch")
        from orchestrator.config.schema import yaml_spec

        spec = yaml_spec(cfg)
    weights = weights_from_task_state(state["model"])
    facts = _run_facts(client, run)
    source = {"checkpoint": ckpt_file.rsplit("/", 1)[0], "step": int(state.get("step", 0))}
    title = facts.get("run_name") or cfg.name
    try:
        if fmt == "llip":
            files = export_files(model_cfg, weights, spec, cfg.loss.type, dtype,
                                 source={"kind": "run" if facts else "checkpoint", **source,
                                         **{k: facts[k] for k in ("run_id", "run_name", "experiment") if k in facts}},
                                 extra={"experiment": state.get("config"),
                                        "llip_orch": {"version": package_version(), "commit": git_commit()},
                                        "provenance": facts})
        else:
            oc_cfg, tensors = to_open_clip(model_cfg, weights, spec)
            files = {OPEN_CLIP_CONFIG: (json.dumps(oc_cfg, indent=2) + "\n").encode(),
                     OPEN_CLIP_WEIGHTS: weights_bytes(tensors, dtype)}
    except (ConvertError, PretrainedError) as e:
        raise UserError(f"{ckpt_file}: {e}") from None
    sizes = {k: len(v) for k, v in files.items()}
    files[CARD_FILE] = model_card(title, model_cfg, cfg.loss.type, spec, facts, source, fmt, dtype, sizes).encode()
    dest = Destination(out, cfg.data.s3 if out.startswith("s3://") else None)
    for name, data in files.items():
        dest.put(name, data)
    return ExportResult(out=out, files={k: len(v) for k, v in files.items()}, seconds=time.perf_counter() - t0,
                        run_id=facts.get("run_id"), checkpoint=ckpt_file)
