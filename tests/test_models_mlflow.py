"""An export as an MLflow model (issue 25): logged into a run of a real SQLite store, registered with an
alias (by `llip register` and by the sweep's best-trial step), loaded back with
`mlflow.pyfunc.load_model("models:/NAME@ALIAS")`, and served by a real `mlflow models serve`."""
from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pandas as pd
import pytest

from orchestrator.cli import main as llip_main
from test_models_export import TEXTS, images, make_checkpoint

pytestmark = pytest.mark.timeout(300)


def logged_run(tmp_path, loss="llip", seed=0, name="r1"):
    """(tracking uri, run id, export folder): a run holding the export of a checkpoint as its model."""
    from orchestrator.models.export import export_checkpoint
    from orchestrator.models.mlflow_model import log_model
    from orchestrator.tracking.store import open_experiment

    ckpt, _ = make_checkpoint(tmp_path, loss, seed=seed)
    out = tmp_path / f"export_{name}"
    export_checkpoint(str(ckpt / "state.pt"), str(out))
    c, uri, exp_id = open_experiment(f"sqlite:///{tmp_path / 'mlflow.db'}", f"toy_{loss}")
    run = c.create_run(exp_id, run_name=name, tags={"llip.run_name": name})
    log_model(uri, run.info.run_id, str(out))
    return uri, run.info.run_id, out


def frame(imgs, texts) -> pd.DataFrame:
    return pd.DataFrame({"image": imgs, "text": texts})


def test_registered_model_predicts_the_export_scores_and_checks_its_schema(tmp_path, capsys):
    import mlflow
    from mlflow.exceptions import MlflowException

    import llip_core.pretrained as pretrained

    uri, run_id, out = logged_run(tmp_path)
    c = mlflow.MlflowClient(uri)
    run = c.get_run(run_id)
    assert run.info.status == "RUNNING"  # logging the model leaves the run's status to its owner
    assert run.data.tags["llip.mlflow_model"].startswith("models:/")
    assert llip_main(["register", "r1", "--alias", "best", "--tracking-uri", uri]) == 0
    assert "as toy_llip version 1, alias best" in capsys.readouterr().out

    mlflow.set_tracking_uri(uri)
    try:
        loaded = mlflow.pyfunc.load_model("models:/toy_llip@best")
        imgs = images(3)
        texts = TEXTS[:3]
        got = loaded.predict(frame(imgs, texts))
        want = pretrained.load(out).score(imgs, texts)
        assert np.abs(np.stack(got["scores"].to_numpy()) - want.numpy()).max() <= 1e-6
        assert np.abs(got["score"].to_numpy() - want.diagonal().numpy()).max() <= 1e-6
        at_tau1 = loaded.predict(frame(imgs, texts), params={"tau": 1.0})
        assert np.abs(np.stack(at_tau1["scores"].to_numpy()) - pretrained.load(out).score(imgs, texts, tau=1.0).numpy()).max() <= 1e-6
        sig = loaded.metadata.signature
        assert [s.name for s in sig.inputs.inputs] == ["image", "text"] and sig.params.params[0].default == 5.0
        with pytest.raises(MlflowException, match="missing inputs.*text"):
            loaded.predict(pd.DataFrame({"image": imgs}))
        with pytest.raises(MlflowException, match="Incompatible input types"):
            loaded.predict(pd.DataFrame({"image": imgs, "text": [1, 2, 3]}))
        reqs = open(mlflow.pyfunc.get_model_dependencies("models:/toy_llip@best")).read().split()
        pinned = {r.split("==")[0] for r in reqs if "==" in r}
        assert {"mlflow", "torch", "safetensors", "pillow", "numpy"} <= pinned, reqs
    finally:
        mlflow.set_tracking_uri(None)


def test_sweep_registration_moves_the_alias_and_never_fails_the_sweep(tmp_path):
    import mlflow

    from orchestrator.sweeps.tune import register_best

    uri, first, _ = logged_run(tmp_path, "siglip", seed=0, name="t1")
    _, second, _ = logged_run(tmp_path, "siglip", seed=1, name="t2")
    c = mlflow.MlflowClient(uri)
    parent = c.create_run(c.get_run(first).info.experiment_id, run_name="sweep").info.run_id
    assert register_best(c, uri, parent, first, "toy_siglip") == 1
    assert register_best(c, uri, parent, second, "toy_siglip") == 2
    mv = c.get_model_version_by_alias("toy_siglip", "best")
    assert int(mv.version) == 2 and mv.tags["llip.run_id"] == second
    assert c.get_run(parent).data.tags["llip.registered_model"] == "toy_siglip@best (version 2)"
    bare = c.create_run(c.get_run(first).info.experiment_id, run_name="no-model").info.run_id
    assert register_best(c, uri, parent, bare, "toy_siglip") is None  # a warning, not an exception
    assert "no logged MLflow model" in c.get_run(parent).data.tags["llip.registered_model_error"]


def test_register_refusals_are_one_line(tmp_path, capsys):
    from orchestrator.tracking.store import open_experiment

    c, uri, exp_id = open_experiment(f"sqlite:///{tmp_path / 'mlflow.db'}", "e")
    c.create_run(exp_id, run_name="bare", tags={"llip.run_name": "bare"})
    for args, text in ((["bare", "--alias", "best"], "has no logged MLflow model"),
                       (["nope", "--alias", "best"], "nope: no MLflow run with that id or llip run name"),
                       (["bare", "--alias", "v3"], "MLflow reserves those")):
        assert llip_main(["register", *args, "--tracking-uri", uri]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and text in err[0], err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_mlflow_models_serve_answers_with_the_scores(tmp_path):
    import llip_core.pretrained as pretrained

    uri, run_id, out = logged_run(tmp_path)
    assert llip_main(["register", run_id, "--alias", "best", "--tracking-uri", uri]) == 0
    port = _free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))  # its uvicorn
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/toy_llip@best",
                             "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            assert time.monotonic() < deadline, "server did not answer /ping: " + (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(1)

        imgs = images(2)
        body = {"dataframe_split": {"columns": ["image", "text"],
                                    "data": [[base64.b64encode(b).decode(), t] for b, t in zip(imgs, TEXTS[:2])]},
                "params": {"tau": 3.0}}

        def post(payload):
            req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())

        status, answer = post(body)
        assert status == 200, answer
        rows = answer["predictions"]
        want = pretrained.load(out).score(imgs, TEXTS[:2], tau=3.0)
        assert np.abs(np.asarray([r["scores"] for r in rows]) - want.numpy()).max() <= 1e-6
        status, answer = post({"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(imgs[0]).decode()]]}})
        assert status == 400 and "missing inputs" in answer["message"] and "text" in answer["message"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its worker, by the group the server leads
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()
