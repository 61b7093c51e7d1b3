"""Experiment YAML -> validated, typed config, and the few names every stage derives from it.

Unknown keys and wrong types fail at load with the key's dotted path. An experiment may name a
`base:` file (relative to itself) and state only what differs; mappings merge key by key, lists
and scalars replace.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orchestrator.errors import UserError


def _number_or_auto(v, ok, what: str):
    """None, "auto", or a number `ok` accepts (YAML reads 989e12, without a dot, as a string)."""
    if v is None or v == "auto":
        return v
    try:
        f = float(v)
    except (TypeError, ValueError):
        f = float("nan")
    if isinstance(v, bool) or f != f or not ok(f):
        raise ValueError(f"{v!r}: give {what}")
    return f


class ConfigError(UserError, ValueError):
    """A one-line, user-facing problem with an experiment file."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Strict):
    size: str = "tiny"  # a named size from llip_core.config.SIZES
    # Fields below override the named size; None keeps the size's value.
    pooling: Optional[Literal["llip", "cls", "avg", "register", "multi_cls"]] = None
    # Holistic CLIP's class tokens (pooling multi_cls); ignored by the other poolings. Default 1.
    branches: Optional[int] = Field(None, ge=1)
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
    vocab_size: Optional[int] = Field(None, ge=16)  # with vocab compact: set from the training shards at launch
    embed_dim: Optional[int] = Field(None, ge=8)
    # clip_bpe: CLIP's BPE, ids as open_clip's tokenize (every named size); word_hash: vocab_size hash buckets
    tokenizer: Optional[str] = None
    # full: the tokenizer's whole id range; compact: only ids seen in the training captions (tiny sizes)
    vocab: Optional[Literal["full", "compact"]] = None
    activation: Optional[Literal["quick_gelu", "gelu"]] = None  # quick_gelu as in every released Llip config
    kqv_norm: Optional[bool] = None  # LayerNorm on Llip keys/values/queries (released H/14, G/14)

    @field_validator("tokenizer")
    @classmethod
    def _known_tokenizer(cls, v):
        from llip_core.tokenizer import TOKENIZERS

        if v is not None and v not in TOKENIZERS:
            raise ValueError(f"unknown tokenizer {v!r}; choose one of {', '.join(TOKENIZERS)}")
        return v

    def resolve(self, loss_type: str = "llip"):
        """The llip_core ModelConfig; pooling, when not given, follows the loss type."""
        from llip_core.config import model_config

        fields = self.model_dump(exclude={"size"})
        if fields["pooling"] is None:
            fields["pooling"] = ("llip" if loss_type.startswith("llip")
                                 else "multi_cls" if loss_type == "holistic" else "cls")
        return model_config(self.size, **fields)


class LossSection(_Strict):
    # clip: InfoNCE; siglip: sigmoid; llip: sigmoid over text-conditioned image embeddings;
    # llip_infonce: the conditioned scores with InfoNCE (loss-type ablation);
    # holistic: Holistic CLIP's per-branch InfoNCE over M captions per image (model.pooling multi_cls).
    type: Literal["clip", "siglip", "llip", "llip_infonce", "holistic"] = "llip"
    # The literal O(B^2 D) Llip scorer instead of the memory-efficient one (for checking only).
    literal_scorer: bool = False
    chunk_size: Optional[int] = Field(None, ge=1)  # images per chunk in the efficient Llip scorer; None: sized automatically
    # holistic only: weight * max(mean cosine between an image's branches - margin, 0) (official: 1, 0.7)
    diversity_weight: float = Field(1.0, ge=0)
    diversity_margin: float = Field(0.7, ge=-1, le=1)
    # siglip only: open_clip: scale 1/0.07, bias -10 (open_clip's SigLIP configs, Llip's baseline);
    # siglip_paper: scale 10, bias -10 (the SigLIP paper)
    siglip_init: Literal["open_clip", "siglip_paper"] = "open_clip"
    # the sigmoid losses' (siglip, llip) initial bias: None keeps -10 (every released config: the prior
    # -ln n of a ~22k-text batch); a number; or auto = -ln(data.batch_size), SigLIP's prior argument at
    # this run's global batch. The InfoNCE losses have no bias. Logged resolved as loss.init_logit_bias.
    init_bias: Optional[Union[float, Literal["auto"]]] = None

    @field_validator("init_bias", mode="before")
    @classmethod
    def _init_bias(cls, v):
        return _number_or_auto(v, lambda f: abs(f) < float("inf"), "a number (e.g. -10) or auto (-ln of data.batch_size)")


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
    shuffle_buffer: int = Field(2048, ge=0)  # samples mixed together: shards grouped into windows of at least this many, each permuted per epoch (0: shard order only)
    decode_concurrency: int = Field(1, ge=1)  # parallel map_batches tasks for decode/augment/tokenize
    decode_cpus: float = Field(0.25, gt=0)  # CPUs reserved per decode task
    max_bad_fraction: float = Field(0.01, ge=0, le=1)  # above this fraction of skipped samples, fail
    augment: bool = True  # random resized crop on training images (open_clip's, scale 0.9-1)
    hflip: bool = False  # also flip half the views, never one whose captions say left/right/...; open_clip: off
    # one: each epoch draws one caption per sample (seeded) from its default list (see orchestrator/data/shards.py);
    # all: every caption, in stored order, the first max_captions of them, padded, with a mask (holistic)
    captions: Literal["one", "all"] = "one"
    max_captions: int = Field(4, ge=1)
    s3: S3Section = Field(default_factory=S3Section)


class TrainSection(_Strict):
    steps: int = Field(300, ge=1)  # optimiser steps in total
    lr: float = Field(5e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-6, gt=0)
    weight_decay: float = Field(0.2, ge=0)  # on >=2-D weights only
    warmup_steps: int = Field(20, ge=0)
    grad_clip: Optional[float] = Field(1.0, gt=0)
    # Speed switches (orchestrator/training/switches.py); each keeps the math (tests/test_switches.py).
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast the towers; loss and logit scale stay fp32
    grad_checkpointing: bool = False  # recompute each transformer block in the backward (memory for compute)
    compile: bool = False  # torch.compile both towers (first steps slower while it builds)
    attention: Literal["sdpa", "math"] = "sdpa"  # sdpa: fused scaled_dot_product_attention; math: explicit softmax
    allow_fallback: bool = False  # a switch this device can't run (bf16, compile): warn and use the default, not fail
    # MFU's peak FLOP/s per device: a number, or auto (llip_core.flops table, by CUDA device name); None: no MFU
    peak_flops: Optional[Union[float, Literal["auto"]]] = None

    @field_validator("peak_flops", mode="before")
    @classmethod
    def _peak_flops(cls, v):
        return _number_or_auto(v, lambda f: f > 0, "the device's peak FLOP/s per device (e.g. 989e12) or auto")
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(0, ge=0)  # 0: evaluate at the end only
    checkpoint_every: int = Field(0, ge=0)  # 0: only at the end
    keep_checkpoints: int = Field(2, ge=1)
    threads_per_worker: Optional[int] = Field(None, ge=1)  # torch intra-op threads on CPU workers
    # Start from these weights (step 0, a fresh optimizer; not a resume): an export folder (`llip export`,
    # `llip import-official`; local or s3://) or an MLflow run id or name (its final checkpoint).
    init_from: Optional[str] = None


class ScalingSection(_Strict):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0)  # fractional on small machines so Ray Data can read
    gpus_per_worker: Optional[float] = Field(None, gt=0)
    # Further Ray resources each training worker holds, e.g. {"accelerator_type:A10G": 0.001}, or a
    # custom resource that a node type advertises (the multi-node tests' stand-in for a GPU).
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    # Ray's placement strategy for the workers' bundles: PACK (fewest nodes), SPREAD, STRICT_SPREAD
    # (one worker per node), STRICT_PACK (all on one node).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    max_failures: int = Field(0, ge=-1)  # FailureConfig(max_failures); -1: retry forever
    # Seconds a run waits in all for nodes that can hold its workers (at the start, and again after
    # losing a node) before it fails in one line naming what it asked for; null: wait forever (a
    # sweep whose trials queue for an autoscaler's nodes may need that, or max_concurrent_trials).
    placement_timeout_s: Optional[float] = Field(900.0, gt=0)

    @field_validator("resources_per_worker")
    @classmethod
    def _custom_only(cls, v):
        for k, amount in v.items():
            if k in ("CPU", "GPU", "memory", "object_store_memory"):
                raise ValueError(f"{k}: set it with cpus_per_worker / use_gpu + gpus_per_worker, not here")
            if amount <= 0:
                raise ValueError(f"{k}: {amount}: must be positive")
        return v


class MlflowSection(_Strict):
    tracking_uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: Optional[str] = None  # None: the experiment's name
    log_model: bool = True  # the finished run's model as an MLflow model (orchestrator/models/mlflow_model.py)


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


class CurationSection(_Strict):
    """MetaCLIP curation of data.train (the raw pool): `llip curate FILE.yaml` writes the result to
    `out`, and `llip run` then trains on `out`/train instead of data.train."""
    metadata: str  # MetaCLIP-format JSON list of strings; `llip metadata build` makes one
    t: int  # per-entry cap: entries matched by more than t pairs keep each with p = t / count
    out: str  # curated shards, curation_stats.json and the count plot: local dir or s3://bucket/prefix
    mode: Literal["offline", "online"] = "offline"  # offline: keep/drop once; online: store p, resample each epoch
    seed: int = 0  # seeds the keep coins (hashed per sample, so independent of workers and blocks)
    samples_per_shard: int = Field(256, ge=1)
    concurrency: int = Field(1, ge=1)  # parallel matching tasks (each builds the automaton once)
    task_cpus: float = Field(0.5, gt=0)  # CPUs reserved per matching task

    @field_validator("t", mode="before")
    @classmethod
    def _t_positive(cls, v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 or v != int(v):
            raise ValueError(f"t={v!r}: must be a positive whole number of pairs per entry "
                             "(MetaCLIP: 20000 for 400M pairs); raise it")
        return int(v)


# An eval set's name is the prefix of its metrics (eval/<name>/...): given, or from its folder.
_GENERIC_DIRS = {"eval", "test", "val", "validation", "train", "heldout"}


def default_name(path: str) -> str:
    """data/eval/fashion_mnist -> fashion_mnist; data/emoji/eval -> emoji_eval (MLflow-safe)."""
    parts = [p for p in re.split(r"[/\\]+", path.rstrip("/")) if p and p != "s3:"]
    name = parts[-1] if parts else "set"
    if name.lower() in _GENERIC_DIRS and len(parts) > 1:
        name = f"{parts[-2]}_{name}"
    return safe_name(name)


def safe_name(name: str) -> str:
    """MLflow metric names allow letters, digits, _ - . / and spaces; keep one path level per set."""
    return re.sub(r"[^\w.\-]+", "_", name).strip("_") or "set"


class EvalSetSection(_Strict):
    path: str  # a folder or s3://bucket/prefix in clip_benchmark's wds layout (kind inferred from it)
    name: Optional[str] = None  # metric prefix eval/<name>/...; None: from the folder name
    split: str = "test"  # the <split>/ subfolder holding the .tar shards
    max_samples: Optional[int] = Field(None, ge=1)  # evaluate the first N samples only (cheap curves)


class EvalSection(_Strict):
    # Sets evaluated every `every` steps and at the end, by rank 0; a bare string is a path.
    sets: list[EvalSetSection] = Field(default_factory=list)
    every: int = Field(0, ge=0)  # steps between evaluations, independent of log_every; 0: train.eval_every
    # Llip zero-shot at each softmax temperature (the paper reports 1, 3, 5, 8, 10); None: the model's tau.
    tau: Optional[list[float]] = None
    recall_k: list[int] = Field(default_factory=lambda: [1, 5, 10])  # retrieval recall@k
    batch_size: int = Field(256, ge=1)  # images (and texts) encoded at once

    @field_validator("sets", mode="before")
    @classmethod
    def _paths_as_sets(cls, v):
        return [{"path": s} if isinstance(s, str) else s for s in v] if isinstance(v, list) else v

    @field_validator("tau")
    @classmethod
    def _tau_positive(cls, v):
        if v is not None and (not v or any(t <= 0 for t in v)):
            raise ValueError("eval.tau: a non-empty list of positive temperatures, e.g. [1, 3, 5, 8, 10]")
        return v

    @model_validator(mode="after")
    def _unique_names(self):
        names = [safe_name(s.name) if s.name else default_name(s.path) for s in self.sets]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup:
            raise ValueError(f"two eval sets are both named {dup!r}; give one a name: (metrics are eval/<name>/...)")
        return self


class SweepSection(_Strict):
    params: dict[str, SearchSpace] = Field(default_factory=dict)  # dotted config path -> space
    # Named configurations, each a set of dotted overrides, crossed with the params' grid: models
    # that differ in several keys at once (CLIP vs Llip K=8 vs an avg ablation) are not a product
    # of per-key grids. Child runs are tagged llip.variant.
    variants: Optional[dict[str, dict[str, Any]]] = None
    num_samples: int = Field(1, ge=1)
    metric: str = "eval/recall1"  # mean of image->text and text->image recall@1 on held-out data
    mode: Literal["min", "max"] = "max"
    scheduler: Optional[SchedulerSection] = None
    max_concurrent_trials: Optional[int] = Field(None, ge=1)  # None: derived from cluster resources
    shared_data: "SharedDataSection" = Field(default_factory=lambda: SharedDataSection())
    # `llip report`'s paired comparisons: [configuration, baseline] pairs of variant names, each
    # compared seed by seed; None: every configuration against clip (or --baseline).
    pairs: Optional[list[tuple[str, str]]] = None

    @model_validator(mode="after")
    def _pairs_name_variants(self):
        if self.pairs:
            names = list(self.variants or {})
            for a, b in self.pairs:
                bad = next((x for x in (a, b) if x not in names), None)
                if bad is not None:
                    raise ValueError(f"sweep.pairs: {bad!r} is not a variant (variants: {', '.join(names) or 'none'}); "
                                     "pair names from sweep.variants")
                if a == b:
                    raise ValueError(f"sweep.pairs: [{a}, {b}] pairs a variant with itself")
        return self


class SharedDataSection(_Strict):
    """One decode per data setting for all of a sweep's trials (orchestrator/data/shared_decode.py)."""
    # auto: on when decoding is at least min_decode_share of a trial's work per sample (measured at the
    # sweep's start: decoding a few real samples against a training step of the trial's model); true:
    # always; false: every trial reads and decodes its own data, as `llip run` does
    enabled: Union[bool, Literal["auto"]] = "auto"
    min_decode_share: float = Field(0.25, ge=0, le=1)
    cache: Optional[str] = None  # local dir or s3://bucket/prefix; None: <storage_path>/<sweep run>/data_cache
    max_gb: float = Field(50.0, gt=0)  # above this estimate (or the local disk's free space): per-trial decoding

    @field_validator("cache")
    @classmethod
    def _cache_where(cls, v):
        if v is not None and ("://" in v and not v.startswith("s3://") or not v.strip()):
            raise ValueError(f"{v!r}: give a local folder or s3://bucket/prefix, or null for the sweep's folder")
        return v


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
    # true: local paths (storage_path, data, eval sets, a sqlite tracking store) lie on a filesystem
    # every node mounts (NFS, EFS, Lustre). Without it a run whose workers can land on other nodes
    # than the driver's refuses local paths, which those nodes would not see.
    storage_shared: bool = False
    sweep: Optional[SweepSection] = None
    eval: EvalSection = Field(default_factory=EvalSection)  # zero-shot / retrieval sets (orchestrator/evaluation/runner.py)
    curation: Optional[CurationSection] = None  # MetaCLIP curation of data.train (llip curate)

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
        if self.loss.type == "holistic" and m.pooling != "multi_cls":
            raise ValueError(f"loss.type holistic needs model.pooling multi_cls (got {m.pooling!r}); "
                             "leave model.pooling unset to follow the loss type")
        if m.pooling == "multi_cls" and m.branches > 1 and self.loss.type != "holistic":
            raise ValueError(f"loss.type {self.loss.type!r} takes one embedding per image but model.branches is "
                             f"{m.branches}; set model.branches 1 or loss.type holistic")
        if not self.loss.type.startswith("llip") and m.pooling == "llip":
            raise ValueError(f"model.pooling llip needs loss.type llip or llip_infonce (got {self.loss.type!r}); "
                             "leave model.pooling unset to follow the loss type")
        try:
            self.loss_init()
        except ValueError as e:
            raise ValueError(f"loss.init_bias: {e}") from None
        if self.data.batch_size % self.scaling.num_workers:
            raise ValueError(
                f"data.batch_size {self.data.batch_size} is not divisible by scaling.num_workers {self.scaling.num_workers}"
            )
        return self

    # -- helpers -------------------------------------------------------------------------------
    def eval_interval(self) -> int:
        """Steps between evaluations (data.eval and eval.sets); 0: at the end only."""
        return self.eval.every or self.train.eval_every

    def train_location(self) -> str:
        """The shards training reads: the curated ones when a curation: section is set."""
        if self.curation is not None:
            return self.curation.out.rstrip("/") + "/train"
        return self.data.train

    def torch_threads(self) -> int:
        """torch's intra-op threads in a CPU training worker: train.threads_per_worker, else the
        whole CPUs the worker holds (at least 1)."""
        return self.train.threads_per_worker or max(1, int(self.scaling.cpus_per_worker))

    def resolved_model(self):
        return self.model.resolve(self.loss.type)

    def loss_init(self) -> tuple[float, Optional[float]]:
        """(initial log logit scale, initial logit bias or None) as training starts them: loss.init_bias
        resolved (auto: -ln of the global batch, data.batch_size)."""
        from llip_core.losses import initial_logits

        return initial_logits(self.loss.type, self.loss.siglip_init, self.loss.init_bias, self.data.batch_size)

    def flat(self) -> dict[str, Any]:
        """Every resolved value as dotted keys (model values resolved through the named size; the
        loss's initial scale and bias as loss.init_logit_scale / loss.init_logit_bias)."""
        d = self.model_dump(mode="json", exclude={"sweep"})
        d["model"] = {"size": self.model.size, **dataclasses.asdict(self.resolved_model())}
        log_scale, bias = self.loss_init()
        d["loss"]["init_logit_scale"] = round(math.exp(log_scale), 6)
        d["loss"]["init_logit_bias"] = None if bias is None else round(bias, 6)
        out: dict[str, Any] = {}
        _flatten(d, "", out)
        return out

    def fingerprint(self) -> str:
        return hashlib.sha1(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:10]

    def with_overrides(self, overrides: dict[str, Any]) -> "ExperimentConfig":
        """A new config with dotted-path overrides applied (used by sweeps), re-validated."""
        raw = self.model_dump(mode="json")  # keeps explicit nulls: data.eval: null must stay null
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
_REPLACE_ENTRIES = {("sweep", "params"), ("sweep", "variants")}


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
        raw = _deep_merge(load_raw(_base_path(path, base), _seen + (path.resolve(),)), raw)
    return raw


PACKAGED = "llip:"


def packaged_experiments() -> Path:
    """The folder of the experiments shipped with llip-orch (experiments/ in the repository)."""
    import importlib.util

    # A namespace package (experiments/ has no __init__.py): take its folder from the spec, which
    # works for regular and editable installs alike (importlib.resources trips on the latter).
    spec = importlib.util.find_spec("llip_experiments")
    for loc in (spec.submodule_search_locations if spec else None) or []:
        if Path(loc).is_dir():
            return Path(loc)
    raise ConfigError("the shipped experiments (package llip_experiments) are missing; reinstall llip-orch")


def _base_path(path: Path, base: str) -> Path:
    """`base: other.yaml` is relative to the file naming it; `base: llip:base.yaml` names a shipped one."""
    if base.startswith(PACKAGED):
        name = base[len(PACKAGED):]
        found = packaged_experiments() / name
        if not found.is_file():
            shipped = ", ".join(sorted(p.name for p in packaged_experiments().glob("*.yaml")))
            raise ConfigError(f"{path}: base: {base}: llip-orch ships no {name!r} (it ships {shipped})")
        return found
    return path.parent / base


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


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` items (VALUE parsed as YAML) -> {dotted key: value}."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.steps=50")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def yaml_spec(cfg: "ExperimentConfig") -> dict:
    """The tokenizer spec the YAML asks for, without a compact table yet (training resolves the table:
    orchestrator/training/tokenization.py)."""
    from llip_core.tokenizer import tokenizer_spec

    m = cfg.resolved_model()
    return tokenizer_spec(m.tokenizer, m.context_length, m.vocab_size, m.vocab)
