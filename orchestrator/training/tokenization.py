"""Which tokenizer a run uses, decided once at the driver and carried with the run.

The spec (llip_core.tokenizer.tokenizer_spec) follows the YAML's model.tokenizer / model.vocab. For
`vocab: compact` its ids are the base tokenizer's ids seen in the training shards' captions (and in
the texts the run's evaluation tokenizes: see eval_texts), read here once, before training; the model's vocab_size becomes the table's size. A relaunch of a run
that has a checkpoint uses the checkpoint's spec (its compact table included), after checking that
it names the same tokenizer as the YAML. Workers, the data pipeline and evaluation all rebuild the
tokenizer from this spec; checkpoints store it (`state["tokenizer"]` and TOKENIZER_FILE).
"""
from __future__ import annotations

import itertools
import json
import tarfile
from typing import TYPE_CHECKING, Any, Iterator, Optional

from orchestrator.config.schema import yaml_spec
from orchestrator.errors import UserError
from orchestrator.storage.checkpoints import TOKENIZER_FILE

if TYPE_CHECKING:  # pragma: no cover
    from orchestrator.config.schema import ExperimentConfig


def _same_kind(a: dict, b: dict) -> bool:
    keys = ("name", "context_length", "vocab", "buckets")
    return all(a.get(k) == b.get(k) for k in keys)


def check_same_tokenizer(checkpoint: dict, wanted: dict, where: str) -> None:
    """One line naming both when a checkpoint's tokenizer is not the one the YAML asks for."""
    from llip_core.tokenizer import describe

    if not _same_kind(checkpoint, wanted):
        raise UserError(
            f"{where} was trained with tokenizer {describe(checkpoint)} (context {checkpoint.get('context_length')}) "
            f"but the YAML asks for {describe(wanted)} (context {wanted.get('context_length')}); set model.tokenizer/"
            "model.vocab/model.context_length to the checkpoint's, or start a new run name")


def shard_captions(paths: list[str], filesystem=None) -> Iterator[str]:
    """Every caption of every sample in the shards (the .txt and the .json "captions" list)."""
    from orchestrator.data.decode import parse_captions

    for path in paths:
        stream = filesystem.open_input_stream(path) if filesystem is not None else open(path, "rb")
        with stream:
            members: dict[str, dict[str, bytes]] = {}
            try:
                with tarfile.open(fileobj=stream, mode="r|*") as tar:
                    for info in tar:
                        if not info.isfile():
                            continue
                        key, _, ext = info.name.rpartition(".")
                        if ext in ("txt", "json"):
                            members.setdefault(key, {})[ext] = tar.extractfile(info).read()
            except (tarfile.TarError, OSError):
                pass  # a truncated shard: its readable samples count, as in the data pipeline
        for parts in members.values():
            yield from parse_captions(parts.get("txt"), parts.get("json"))


def eval_texts(cfg: "ExperimentConfig") -> Iterator[str]:
    """Every text the run's evaluation will tokenize: the zero-shot prompts of its classification sets
    (template x class name) and the captions of its retrieval sets (data.eval included).

    Their ids join the compact table, so a word absent from the training captions ("trousers", a
    held-out emoji's name) keeps its own row, as under full BPE, instead of collapsing into the
    unknown id with every other unseen word, which would make distinct prompts or captions identical.
    No training signal comes from them: the rows exist, as they would in the full table."""
    from llip_core.evaluate import format_prompt
    from orchestrator.data.evalsets import CLASSIFICATION, inspect_set, iter_targets

    sets = ([(cfg.data.eval, "", "test", None)] if cfg.data.eval else []) + \
        [(s.path, s.name, s.split, s.max_samples) for s in cfg.eval.sets]
    for path, name, split, max_samples in sets:
        try:
            info = inspect_set(path, name, split, max_samples, cfg.data.s3, scan=False)
        except UserError:
            continue  # the eval preflight reports a bad set in its own words
        if info.kind == CLASSIFICATION:
            for c in info.classnames:
                for t in info.templates:
                    yield format_prompt(t, c)
        else:
            for _key, _image, _what, captions in iter_targets(info, cfg.data.s3):
                yield from captions


def checkpoint_tokenizer(cfg: "ExperimentConfig", run_name: Optional[str]) -> Optional[dict]:
    """The tokenizer spec stored with the run's newest checkpoint on disk, or None."""
    if not run_name:
        return None
    from orchestrator.storage.checkpoints import latest_checkpoint_on_disk

    ckpt = latest_checkpoint_on_disk(cfg, run_name)
    if ckpt is None:
        return None
    try:
        with ckpt.filesystem.open_input_stream(f"{ckpt.path}/{TOKENIZER_FILE}") as f:
            return json.loads(f.read())
    except (FileNotFoundError, OSError):
        return None  # a checkpoint from before tokenizers were stored: the worker's state check decides


def run_tokenizer_spec(cfg: "ExperimentConfig", run_name: Optional[str] = None,
                       init_spec: Optional[dict] = None) -> dict:
    """The spec this run trains with: the checkpoint's on a relaunch, else train.init_from's (its
    weights embed its ids: a compact table is kept as it is, and words it never saw are unknown), else
    the YAML's (with the compact table read from the training shards)."""
    from llip_core.tokenizer import build_compact_spec, describe

    wanted = yaml_spec(cfg)
    stored = checkpoint_tokenizer(cfg, run_name)
    if stored is not None:
        check_same_tokenizer(stored, wanted, f"run {run_name}'s checkpoint")
        return stored
    if init_spec is not None:
        check_same_tokenizer(init_spec, wanted, f"train.init_from {cfg.train.init_from}")
        return init_spec
    if wanted["vocab"] != "compact":
        return wanted
    from orchestrator.data.reading import resolve_shards

    paths, fs = resolve_shards(cfg.train_location(), cfg.data.s3, "data.train")
    spec = build_compact_spec(wanted, itertools.chain(shard_captions(paths, fs), eval_texts(cfg)))
    if not spec["ids"]:
        raise UserError(f"data.train: no captions found in {cfg.train_location()} to build the {describe(wanted)} "
                        "vocabulary; check the shards or set model.vocab: full")
    return spec


def with_vocab_size(cfg: "ExperimentConfig", spec: dict) -> "ExperimentConfig":
    """The config with model.vocab_size set to the compact table's size (what the model embeds)."""
    if spec.get("vocab") != "compact":
        return cfg
    from llip_core.tokenizer import build_tokenizer

    n = build_tokenizer(spec).vocab_size
    return cfg if cfg.model.vocab_size == n else cfg.with_overrides({"model.vocab_size": n})


def resolve(cfg: "ExperimentConfig", run_name: Optional[str] = None,
            init_spec: Optional[dict] = None) -> tuple["ExperimentConfig", dict[str, Any]]:
    """(config with the embedding size the run needs, tokenizer spec): what the driver calls."""
    spec = run_tokenizer_spec(cfg, run_name, init_spec)
    return with_vocab_size(cfg, spec), spec
