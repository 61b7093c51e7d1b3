"""An export folder as an MLflow model (a pyfunc), logged into a run, and registered with an alias.

The pyfunc is `pyfunc_model.py`, logged as code with the export folder as its artifact and this
package's `llip_core` beside it, so `mlflow.pyfunc.load_model(...)` and `mlflow models serve` need
mlflow, torch and the pinned requirements, not llip-orch. The run's tags `llip.mlflow_model` (the
model URI) and `llip.mlflow_model_id` say where it is; `register` reads them.
"""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Optional

from orchestrator.errors import UserError

MODEL_TAG = "llip.mlflow_model"
MODEL_ID_TAG = "llip.mlflow_model_id"
ARTIFACT_NAME = "model"
# What loading the pyfunc imports (llip_core's own needs), pinned to this environment's versions.
REQUIREMENTS = ("torch", "numpy", "pillow", "safetensors", "ftfy", "regex", "pandas")


def pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in REQUIREMENTS:
        try:
            v = version(name)
        except PackageNotFoundError:
            continue
        out.append(f"{name}=={v.split('+')[0]}")  # a local build tag (2.13.0+cpu) is no index version
    return out


def _png(rgb: tuple[int, int, int], size: int = 8) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buf, format="PNG")
    return buf.getvalue()


def signature_and_example(pooling: str, tau: float):
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema([ColSpec("binary", "image"), ColSpec("string", "text")])
    outputs = Schema([ColSpec("double", "score"), ColSpec(Array("double"), "scores")])
    params = ParamSchema([ParamSpec("tau", "double", float(tau))]) if pooling == "llip" else None
    example = pd.DataFrame({"image": [_png((220, 40, 40)), _png((40, 40, 220))],
                            "text": ["a red square", "a blue square"]})
    return ModelSignature(inputs=inputs, outputs=outputs, params=params), example


def log_model(tracking_uri: str, run_id: str, export_dir: str) -> str:
    """Log the export folder as the run's MLflow model; returns the model URI (also set as the
    run's `llip.mlflow_model` tag)."""
    import mlflow
    import mlflow.pyfunc

    import llip_core
    from llip_core.pretrained import read_config

    cfg = read_config(export_dir)
    signature, example = signature_and_example(cfg["model"]["pooling"], cfg["model"]["tau"])
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        c = mlflow.MlflowClient(tracking_uri)
        status = c.get_run(run_id).info.status
        with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
            # the schema is given as a signature (binary images are not a type-hint type)
            warnings.filterwarnings("ignore", message=".*type hints.*")
            info = mlflow.pyfunc.log_model(
                name=ARTIFACT_NAME,
                python_model=str(Path(__file__).with_name("pyfunc_model.py")),
                artifacts={"export": export_dir},
                code_paths=[os.path.dirname(llip_core.__file__)],
                signature=signature, input_example=example, pip_requirements=pip_requirements(),
            )
        c.update_run(run_id, status=status)  # start_run's exit marks the run FINISHED; the caller decides
        c.set_tag(run_id, MODEL_TAG, info.model_uri)
        if getattr(info, "model_id", None):
            c.set_tag(run_id, MODEL_ID_TAG, info.model_id)
        return info.model_uri
    finally:
        mlflow.set_tracking_uri(before)


def register(tracking_uri: str, run, name: str, alias: str) -> int:
    """Register the run's logged model under `name` with `alias`; returns the version."""
    import mlflow

    uri = run.data.tags.get(MODEL_TAG)
    if not uri:
        raise UserError(f"run {run.data.tags.get('llip.run_name', run.info.run_id)} has no logged MLflow model "
                        f"(no {MODEL_TAG} tag: it finished before llip-orch logged models, or with mlflow.log_model "
                        "false); export it (`llip export RUN --out DIR`) and rerun, or train it again")
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        import logging

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # its per-version INFO lines repeat ours
        mv = mlflow.register_model(uri, name, tags={"llip.run_id": run.info.run_id})
        c = mlflow.MlflowClient(tracking_uri)
        c.set_registered_model_alias(name, alias, mv.version)
        return int(mv.version)
    finally:
        mlflow.set_tracking_uri(before)


def check_alias(alias: str) -> str:
    import re

    if not re.fullmatch(r"[A-Za-z0-9_\-]+", alias) or re.fullmatch(r"[vV]\d+", alias) or alias.lower() == "latest":
        raise UserError(f"--alias {alias!r}: letters, digits, _ and - only, and not 'latest' or v<number> "
                        "(MLflow reserves those)")
    return alias


def model_name_for(experiment: str, override: Optional[str] = None) -> str:
    return override or experiment
