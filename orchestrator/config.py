"""Experiment YAML -> validated, typed config.

Unknown keys and wrong types fail at load with the key's dotted path. An experiment may name a
`base:` file (relative to itself) and state only what differs; mappings merge key by key, lists
and scalars replace.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


from orchestrator.errors import UserError


class ConfigError(UserError, ValueError):
    """A one-line, user-facing problem with an experiment file."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Strict):
    size: str = "tiny"  # a named size from llip_core.config.SIZES
    # Fields below override the named size; None keeps the size's value.
    pooling: Optional[Literal["llip", "cls", "avg", "register"]] = None
    mixture_tokens: Optional[int] = Field(None, ge=1)
    cross_heads: Optional[int] = Field(None, ge=1)
    tau: Optional[float] = Field(None, gt=0)
    image_size: Optional[int] = Field(None, ge=8)
    patch_size: Optional[int] = Field(None, ge=1)
    width: Optional[int] = Field(None, ge=8)
    layers: Optional[int] = Field(None, ge=1)
    heads: Optional[int] = Field(None, ge=1)
    text_width: Optional[int] = Field(None, ge=8)
    text_layers: Optional[int] = Field(None, ge=1)
    text_heads: Optional[int] = Field(None, ge=1)
    context_length: Optional[int] = Field(None, ge=3)
    vocab_size: Optional[int] = Field(None, ge=16)
    embed_dim: Optional[int] = Field(None, ge=8)

    def resolve(self, loss_type: str = "llip"):
        """The llip_core ModelConfig; pooling, when not given, follows the loss type."""
        from llip_core.config import model_config

        fields = self.model_dump(exclude={"size"})
        if fields["pooling"] is None:
            fields["pooling"] = "llip" if loss_type.startswith("llip") else "cls"
        return model_config(self.size, **fields)


class LossSection(_Strict):
    # clip: InfoNCE; siglip: sigmoid; llip: sigmoid over text-conditioned image embeddings;
    # llip_infonce: the conditioned scores with InfoNCE (loss-type ablation).
    type: Literal["clip", "siglip", "llip", "llip_infonce"] = "llip"
    # The literal O(B^2 D) Llip scorer instead of the memory-efficient one (for checking only).
    literal_scorer: bool = False
    chunk_size: Optional[int] = Field(None, ge=1)  # images per chunk in the efficient Llip scorer; None: sized automatically


class S3Section(_Strict):
    # All None: the standard AWS chain (AWS_ENDPOINT_URL, AWS_PROFILE, env keys, instance profile).
    endpoint_url: Optional[str] = None
    region: Optional[str] = None
    profile: Optional[str] = None
    anonymous: bool = False


class DataSection(_Strict):
    train: str = "data/emoji/train"  # directory or s3://bucket/prefix of .tar shards (or one shard)
    eval: Optional[str] = "data/emoji/eval"  # held-out shards; None: no evaluation
    batch_size: int = Field(256, ge=1)  # global batch, split evenly across workers
    shuffle_buffer: int = Field(2048, ge=0)  # local shuffle buffer (samples); 0 disables
    decode_concurrency: int = Field(1, ge=1)  # parallel map_batches tasks for decode/augment/tokenize
    decode_cpus: float = Field(0.25, gt=0)  # CPUs reserved per decode task
    max_bad_fraction: float = Field(0.01, ge=0, le=1)  # above this fraction of skipped samples, fail
    augment: bool = True  # random resized crop + flip on training images
    s3: S3Section = Field(default_factory=S3Section)


class TrainSection(_Strict):
    steps: int = Field(300, ge=1)  # optimiser steps in total
    lr: float = Field(5e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-6, gt=0)
    weight_decay: float = Field(0.2, ge=0)  # on >=2-D weights only
    warmup_steps: int = Field(20, ge=0)
    grad_clip: Optional[float] = Field(1.0, gt=0)
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 autocast on GPU
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(0, ge=0)  # 0: evaluate at the end only
    checkpoint_every: int = Field(0, ge=0)  # 0: only at the end
    keep_checkpoints: int = Field(2, ge=1)
    threads_per_worker: Optional[int] = Field(None, ge=1)  # torch intra-op threads on CPU workers


class ScalingSection(_Strict):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0)  # fractional on small machines so Ray Data can read
    gpus_per_worker: Optional[float] = Field(None, gt=0)
    max_failures: int = Field(0, ge=-1)  # FailureConfig(max_failures); -1: retry forever


class MlflowSection(_Strict):
    tracking_uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: Optional[str] = None  # None: the experiment's name


class SearchSpace(_Strict):
    grid: Optional[list[Any]] = None
    choice: Optional[list[Any]] = None
    uniform: Optional[tuple[float, float]] = None
    loguniform: Optional[tuple[float, float]] = None
    randint: Optional[tuple[int, int]] = None

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k, v in self.model_dump().items() if v is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of grid, choice, uniform, loguniform, randint (got {given or 'none'})")
        return self


class SchedulerSection(_Strict):
    type: Literal["asha"] = "asha"
    grace_period: int = Field(1, ge=1)  # in reported iterations (log_every steps)
    reduction_factor: float = Field(2.0, gt=1)


class SweepSection(_Strict):
    params: dict[str, SearchSpace]  # dotted config path -> space
    num_samples: int = Field(1, ge=1)
    metric: str = "eval/recall1"  # mean of image->text and text->image recall@1 on held-out data
    mode: Literal["min", "max"] = "max"
    scheduler: Optional[SchedulerSection] = None
    max_concurrent_trials: Optional[int] = Field(None, ge=1)  # None: derived from cluster resources


class ExperimentConfig(_Strict):
    name: str
    description: str = ""
    seed: int = 0
    model: ModelSection = Field(default_factory=ModelSection)
    loss: LossSection = Field(default_factory=LossSection)
    data: DataSection = Field(default_factory=DataSection)
    train: TrainSection = Field(default_factory=TrainSection)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    mlflow: MlflowSection = Field(default_factory=MlflowSection)
    storage_path: str = "runs"  # local directory or s3://bucket/prefix for checkpoints
    sweep: Optional[SweepSection] = None

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\ "):
            raise ValueError("name must be non-empty without spaces or slashes")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        m = self.resolved_model()  # raises ValueError on inconsistent shapes
        if self.loss.type.startswith("llip") and m.pooling != "llip":
            raise ValueError(f"loss.type {self.loss.type!r} needs model.pooling llip (got {m.pooling!r}); "
                             "leave model.pooling unset to follow the loss type")
        if not self.loss.type.startswith("llip") and m.pooling == "llip":
            raise ValueError(f"model.pooling llip needs loss.type llip or llip_infonce (got {self.loss.type!r}); "
                             "leave model.pooling unset to follow the loss type")
        if self.data.batch_size % self.scaling.num_workers:
            raise ValueError(
                f"data.batch_size {self.data.batch_size} is not divisible by scaling.num_workers {self.scaling.num_workers}"
            )
        return self

    # -- helpers -------------------------------------------------------------------------------
    def resolved_model(self):
        return self.model.resolve(self.loss.type)

    def flat(self) -> dict[str, Any]:
        """Every resolved value as dotted keys (model values resolved through the named size)."""
        d = self.model_dump(mode="json", exclude={"sweep"})
        d["model"] = {"size": self.model.size, **dataclasses.asdict(self.resolved_model())}
        out: dict[str, Any] = {}
        _flatten(d, "", out)
        return out

    def fingerprint(self) -> str:
        return hashlib.sha1(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:10]

    def with_overrides(self, overrides: dict[str, Any]) -> "ExperimentConfig":
        """A new config with dotted-path overrides applied (used by sweeps), re-validated."""
        raw = self.model_dump(mode="json", exclude_none=True)
        for path, value in overrides.items():
            _set_dotted(raw, path, value)
        return parse_config(raw, source=f"{self.name} + overrides")


def _flatten(d: Any, prefix: str, out: dict) -> None:
    if isinstance(d, dict):
        for k, v in d.items():
            _flatten(v, f"{prefix}{k}.", out)
    else:
        out[prefix[:-1]] = d


def _set_dotted(d: dict, path: str, value: Any) -> None:
    keys = path.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: {k} is not a section")
    d[keys[-1]] = value


# Mappings whose entries replace inherited ones whole: a search space changed from grid to choice
# must not keep the base's grid beside it.
_REPLACE_ENTRIES = {("sweep", "params")}


def _deep_merge(base: dict, over: dict, path: tuple = ()) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and path not in _REPLACE_ENTRIES:
            out[k] = _deep_merge(out[k], v, path + (k,))
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_raw(path: str | Path, _seen: tuple = ()) -> dict:
    """Read YAML, following `base:` chains; returns the merged mapping (without `base`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: experiment file not found")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: circular base: chain")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}:{where}: YAML syntax error: {problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: base: must be a file name")
        raw = _deep_merge(load_raw(path.parent / base, _seen + (path.resolve(),)), raw)
    return raw


def parse_config(raw: dict, source: str = "<config>") -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see experiments/base.yaml for the valid keys)"
        elif err["type"] == "missing":
            msg = "required value is missing"
        more = f" (+{len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        raise ConfigError(f"{source}: {loc}: {msg}{more}") from None


def load_config(path: str | Path) -> ExperimentConfig:
    return parse_config(load_raw(path), source=str(path))


def resolved_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
