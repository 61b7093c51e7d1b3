"""`train.init_from`: a new run that starts from other weights (step 0, a fresh optimizer; not a resume).

The source is an export folder (`llip export`, `llip import-official`; local or s3://), a checkpoint
folder or state.pt, or an MLflow run id or name (its final checkpoint). The driver resolves it before
Ray starts (`resolve`), trains with its tokenizer (a compact table included: `tokenization.resolve`),
and checks, tensor by tensor, that its model fits the YAML's (`check_fits`); the workers load the
weights when no checkpoint of the run exists yet (`load_weights`), so a relaunch resumes instead.
The run records the source as tags (`tags`).
"""
from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from orchestrator.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from orchestrator.config.schema import ExperimentConfig


@dataclass(frozen=True)
class InitSource:
    given: str  # what train.init_from says
    kind: str  # "export" or "checkpoint"
    location: str  # the export folder, or the state.pt URL (local or s3://)
    model: dict  # the source's ModelConfig fields
    loss: str
    tokenizer: Optional[dict]
    run_id: Optional[str] = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "InitSource":
        return cls(**d)


def resolve(cfg: "ExperimentConfig") -> Optional[InitSource]:
    """What train.init_from names, read enough to check it (config and tokenizer, no weights)."""
    given = cfg.train.init_from
    if not given:
        return None
    from orchestrator.storage.checkpoints import is_export

    where = f"train.init_from {given}"
    if (given.startswith("s3://") or Path(given).exists()) and is_export(given):
        return _export_source(given, given)
    from orchestrator.tracking.lookup import NoSuchTarget, resolve_checkpoint

    try:  # a checkpoint folder or file, a run's storage folder, or a run id or name
        ckpt, run, _ = resolve_checkpoint(given, cfg.mlflow.tracking_uri)
    except NoSuchTarget as e:
        if e.run is None:
            raise UserError(f"{where}: no such folder, and no MLflow run with that id or name in {e.uri}; give an "
                            "export folder (llip export / llip import-official) or a run id") from None
        raise UserError(f"{where}: run {e.run.info.run_id} has no checkpoint (no llip.checkpoint tag); export one "
                        "and give its folder") from None
    return _checkpoint_source(given, ckpt, run.info.run_id if run is not None else None)


def _export_source(given: str, folder: str) -> InitSource:
    import json

    from llip_core.pretrained import CONFIG_FILE, PretrainedError, read_config
    from orchestrator.storage.paths import read_url

    try:
        if folder.startswith("s3://"):
            cfg = json.loads(read_url(f"{folder.rstrip('/')}/{CONFIG_FILE}"))
        else:
            cfg = read_config(folder)
    except PretrainedError as e:
        raise UserError(f"train.init_from: {e}") from None
    src = cfg.get("source") or {}
    return InitSource(given, "export", folder, cfg["model"], cfg.get("loss", "?"), cfg.get("tokenizer"),
                      src.get("run_id"))


def _checkpoint_source(given: str, ckpt_file: str, run_id: Optional[str]) -> InitSource:
    from orchestrator.storage.checkpoints import load_checkpoint, state_tokenizer_spec

    state, cfg, _ = load_checkpoint(ckpt_file)
    return InitSource(given, "checkpoint", ckpt_file, dataclasses.asdict(cfg.resolved_model()), cfg.loss.type,
                      state_tokenizer_spec(state), run_id)


def check_fits(cfg: "ExperimentConfig", src: InitSource) -> None:
    """The YAML's model (its vocabulary size resolved) has every tensor of the source's, shape for
    shape; else one line naming the model type, or the first tensor and both shapes."""
    from llip_core.config import ModelConfig
    from llip_core.pretrained import model_shapes

    where = f"train.init_from {src.given}"
    mine = cfg.resolved_model()
    theirs = ModelConfig(**src.model)
    if theirs.pooling != mine.pooling:
        raise UserError(f"{where} holds a {theirs.pooling} model (loss {src.loss}) but the YAML asks for pooling "
                        f"{mine.pooling} (loss {cfg.loss.type}); set loss.type/model.pooling to the source's")
    a, b = model_shapes(theirs), model_shapes(mine)
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            found = a.get(k, "absent")
            expected = b.get(k, "absent")
            diff = [f"{f.name} {getattr(theirs, f.name)}" for f in dataclasses.fields(ModelConfig)
                    if f.name not in ("tau", "init_std") and getattr(theirs, f.name) != getattr(mine, f.name)]
            raise UserError(f"{where}: tensor {k} has shape {found} there, the YAML's model expects {expected}; "
                            f"set model.* to the source's ({', '.join(diff[:4]) or 'see its config.json'})")


def tags(src: Optional[InitSource]) -> dict[str, str]:
    if src is None:
        return {}
    out = {"llip.init_from": src.given, "llip.init_from.location": src.location, "llip.init_from.kind": src.kind}
    if src.run_id:
        out["llip.init_from.run_id"] = src.run_id
    return out


def load_weights(src: InitSource) -> dict[str, Any]:
    """The source's tensors under the export's names (LlipModel's, logit_scale, logit_bias)."""
    import torch

    from llip_core.pretrained import WEIGHTS_FILE, weights_from_task_state
    from orchestrator.storage.paths import read_url

    if src.kind == "export":
        from safetensors.torch import load

        return load(read_url(f"{src.location.rstrip('/')}/{WEIGHTS_FILE}"))
    state = torch.load(io.BytesIO(read_url(src.location)), map_location="cpu", weights_only=False)
    return weights_from_task_state(state["model"])


def apply(core, weights: dict) -> None:
    """Copy the weights into a Task (model strictly; logit scale and bias where the source has them)."""
    import torch

    from llip_core.pretrained import TASK_KEYS

    core.model.load_state_dict({k: v for k, v in weights.items() if k not in TASK_KEYS})
    with torch.no_grad():
        for k in TASK_KEYS:
            p = getattr(core, k, None)
            if p is not None and k in weights:
                p.copy_(weights[k].reshape(p.shape))
