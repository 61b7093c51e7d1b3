"""`llip register RUN --alias NAME`: a finished run's logged MLflow model into the model registry,
under its experiment's name (or --name), with an alias; `mlflow.pyfunc.load_model("models:/NAME@ALIAS")`
and `mlflow models serve -m models:/NAME@ALIAS` then find it. `llip sweep` does the same for its best
trial with the alias `best`."""
from __future__ import annotations

from orchestrator.errors import UserError


def add_args(p) -> None:
    p.add_argument("run", metavar="RUN", help="an MLflow run id or llip run name")
    p.add_argument("--alias", required=True, metavar="NAME", help="the alias to point at this version, e.g. best")
    p.add_argument("--name", default=None, metavar="MODEL", help="registered model name (default: the run's experiment)")
    p.add_argument("--tracking-uri", default=None,
                   help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")


def register_run(c, uri: str, run, alias: str, name: str | None = None) -> tuple[str, int]:
    from orchestrator.models.mlflow_model import check_alias, register

    check_alias(alias)
    name = name or c.get_experiment(run.info.experiment_id).name
    return name, register(uri, run, name, alias)


def cli(args) -> int:
    from orchestrator.tracking.lookup import find_run
    from orchestrator.tracking.store import existing_store_client

    c, uri = existing_store_client(args.tracking_uri)
    run = find_run(c, args.run)
    if run is None:
        raise UserError(f"{args.run}: no MLflow run with that id or llip run name in {uri}; check it, or pass --tracking-uri")
    name, version = register_run(c, uri, run, args.alias, args.name)
    print(f"registered run {run.data.tags.get('llip.run_name', run.info.run_id)} as {name} version {version}, "
          f"alias {args.alias}:  mlflow.pyfunc.load_model('models:/{name}@{args.alias}')")
    return 0
