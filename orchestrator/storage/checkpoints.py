"""A run's checkpoints: the one module that writes, finds and reads them, for the worker loop, the
driver and `llip eval` alike.

A checkpoint is a folder `storage_path/RUN/checkpoint_*` (local or s3://) holding `state.pt` (model,
optimizer, step, epoch, the data position, RNG states, the experiment's config and the tokenizer
spec) and `tokenizer.json` (the spec again, readable without torch.load: a relaunch's driver needs
it before any worker starts). Ray Train registers each one; `load_latest_state` also looks on disk,
because Ray registers a checkpoint some time after the report that wrote it.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from orchestrator.console import say
from orchestrator.errors import UserError
from orchestrator.storage.paths import read_url, run_folder

if TYPE_CHECKING:  # pragma: no cover
    from orchestrator.config.schema import ExperimentConfig

CKPT_FILE = "state.pt"
TOKENIZER_FILE = "tokenizer.json"  # beside the checkpoint's state file, readable without torch.load


# -- writing and reading inside the Ray Train worker loop ---------------------------------------------
def save_checkpoint(state: dict[str, Any]):
    """A Ray Train Checkpoint of `state` (rank 0 reports it; Ray copies it to the run's storage)."""
    import ray.train
    import torch

    d = tempfile.mkdtemp(prefix="llip-ckpt-")
    torch.save(state, os.path.join(d, CKPT_FILE))
    if state.get("tokenizer") is not None:  # the driver reads it on relaunch without loading the state
        with open(os.path.join(d, TOKENIZER_FILE), "w") as f:
            json.dump(state["tokenizer"], f)
    return ray.train.Checkpoint.from_directory(d)


def load_latest_state(cfg) -> dict[str, Any] | None:
    """The newest state of this run: Ray's registered checkpoint or a newer one on disk.

    Ray's controller registers a checkpoint some time after the report that wrote it; a worker or
    driver killed in between made restarts and relaunches start again at step 0 (seen under load).
    The files are there, so take whichever of the two holds the later step."""
    import ray.train
    import torch

    states = []
    for ckpt in (ray.train.get_checkpoint(),
                 latest_checkpoint_on_disk(cfg, ray.train.get_context().get_experiment_name())):
        if ckpt is None:
            continue
        try:
            with ckpt.as_directory() as d:
                states.append(torch.load(os.path.join(d, CKPT_FILE), map_location="cpu", weights_only=False))
        except Exception as e:  # a checkpoint cut short by the kill: use the other one
            say(f"[llip] skipping unreadable checkpoint {ckpt.path}: {type(e).__name__}")
    return max(states, key=lambda st: st["step"], default=None)


# -- finding and loading checkpoints anywhere (driver, `llip eval`) ------------------------------------
def latest_checkpoint_on_disk(cfg: ExperimentConfig, run_name: str):
    """The newest checkpoint directory holding a state file in the run's storage path (names sort
    by time), or None. The worker loop compares it with Ray's registered checkpoint."""
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    fs, root = run_folder(cfg, run_name)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError:
        return None
    dirs = sorted(i.path for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_"))
    for d in reversed(dirs):
        if fs.get_file_info(f"{d}/{CKPT_FILE}").type == pafs.FileType.File:
            return Checkpoint(d, filesystem=fs)
    return None


def checkpoint_file(path: str) -> str:
    """state.pt under a checkpoint dir, the file itself, or the latest checkpoint_* of a run dir."""
    import pyarrow.fs as pafs

    if path.startswith("s3://"):
        from orchestrator.storage import s3

        fs, root = s3.arrow_filesystem(None), path[len("s3://"):].rstrip("/")
        scheme = "s3://"
    else:
        p = Path(path)
        if not p.exists():
            raise UserError(f"{path}: no such checkpoint, and no MLflow run has that id or name")
        fs, root, scheme = pafs.LocalFileSystem(), str(p.resolve()), ""
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        return scheme + root
    if fs.get_file_info(f"{root}/{CKPT_FILE}").type == pafs.FileType.File:
        return f"{scheme}{root}/{CKPT_FILE}"
    subs = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
                  if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_"))
    for d in reversed(subs):
        if fs.get_file_info(f"{d}/{CKPT_FILE}").type == pafs.FileType.File:
            return f"{scheme}{d}/{CKPT_FILE}"
    raise UserError(f"{path}: no {CKPT_FILE} there, nor in a checkpoint_* folder under it")


def load_checkpoint(ckpt_file: str):
    """(state dict, ExperimentConfig, LlipModel in eval mode) from a checkpoint's state.pt."""
    import torch

    from llip_core.task import build_task
    from orchestrator.config.schema import parse_config

    try:
        state = torch.load(io.BytesIO(read_url(ckpt_file)), map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"{ckpt_file}: cannot read the checkpoint ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise UserError(f"{ckpt_file}: not an llip checkpoint (expected a dict with model and config)")
    cfg = parse_config(state["config"], source=f"{ckpt_file} (config)")
    core = build_task(cfg.resolved_model(), cfg.loss.type)
    core.load_state_dict(state["model"])
    core.eval()
    return state, cfg, core.model


def state_tokenizer_spec(state: dict) -> Optional[dict]:
    """The tokenizer spec a checkpoint was trained with (older checkpoints kept it in other places)."""
    for k in ("tokenizer_spec", "tokenizer"):
        if isinstance(state.get(k), dict):
            return state[k]
    cfg = state.get("config") or {}
    spec = cfg.get("tokenizer_spec") if isinstance(cfg, dict) else None
    return spec if isinstance(spec, dict) else None



# -- export folders (llip_core.pretrained's layout) anywhere ------------------------------------------
def is_export(path: str) -> bool:
    """True when `path` (local or s3://) holds an llip export's config.json."""
    from llip_core.pretrained import CONFIG_FILE

    if path.startswith("s3://"):
        try:
            read_url(f"{path.rstrip('/')}/{CONFIG_FILE}")
            return True
        except Exception:
            return False
    return (Path(path) / CONFIG_FILE).is_file()


def local_export(path: str) -> str:
    """A local folder holding the export at `path`: the folder itself, or an s3:// export copied to a
    temporary folder (an export is a handful of files; llip_core reads local files only)."""
    if not path.startswith("s3://"):
        return path
    from llip_core.pretrained import CARD_FILE, CONFIG_FILE, VOCAB_FILE, WEIGHTS_FILE

    d = tempfile.mkdtemp(prefix="llip-export-")
    for name in (CONFIG_FILE, WEIGHTS_FILE, VOCAB_FILE, CARD_FILE):
        try:
            data = read_url(f"{path.rstrip('/')}/{name}")
        except OSError:  # pyarrow: FileNotFoundError, or OSError for a missing S3 key
            if name in (CONFIG_FILE, WEIGHTS_FILE):
                raise UserError(f"{path}: no {name} there; not an llip export folder") from None
            continue
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)
    return d
