"""`llip eval RUN_ID_OR_CHECKPOINT --set PATH ...`: zero-shot and retrieval for a run's checkpoint (or a
checkpoint folder or file, local or s3://), logged into that run, into the run whose checkpoint it is,
or into a new eval-only run."""
from __future__ import annotations

import time
from pathlib import Path

from orchestrator.errors import UserError
from orchestrator.evaluation.runner import format_eval_table, merge_final, preflight, runner_for
from orchestrator.storage.checkpoints import load_checkpoint, state_tokenizer_spec
from orchestrator.tracking.lookup import resolve_checkpoint, store_client


def add_args(p) -> None:
    p.add_argument("target", metavar="RUN_ID_OR_CHECKPOINT",
                   help="an MLflow run id or run name (its checkpoint is evaluated and the metrics logged into it), "
                        "or a checkpoint: a directory holding state.pt, the state.pt file, or a run's storage "
                        "directory (its latest checkpoint_*); or an export folder (llip export, llip "
                        "import-official); local or s3://")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="PATH",
                   help="an eval set folder (clip_benchmark wds layout, local or s3://); repeatable; "
                        "default: the sets in the checkpoint's experiment config")
    p.add_argument("--split", default="test", help="the sets' split subfolder (default: test)")
    p.add_argument("--max-samples", type=int, default=None, metavar="N", help="evaluate the first N samples of each set")
    p.add_argument("--tau", type=float, nargs="+", default=None, metavar="TAU",
                   help="Llip: zero-shot at each softmax temperature, e.g. --tau 1 3 5 8 10 (default: eval.tau)")
    p.add_argument("--tracking-uri", default=None, help="default: the config's, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    p.add_argument("--no-log", action="store_true", help="print the table only; log nothing to MLflow")


def cli(args) -> int:
    from orchestrator.data.evalsets import inspect_set
    from orchestrator.tracking import store as tracking

    looks_like_path = args.target.startswith("s3://") or Path(args.target).exists()
    from orchestrator.storage.checkpoints import is_export

    if looks_like_path and is_export(args.target):
        c, uri = store_client(args.tracking_uri)
        return _eval_export(args, c, uri)
    # a run's checkpoint logs into that run; a checkpoint path into the run it belongs to, if any
    ckpt_file, run, c = resolve_checkpoint(args.target, args.tracking_uri)
    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    state, cfg, model = load_checkpoint(ckpt_file)
    step = int(state.get("step", 0))

    if args.sets:
        infos = [inspect_set(p, split=args.split, max_samples=args.max_samples, s3cfg=cfg.data.s3).to_dict()
                 for p in args.sets]
        names = [d["name"] for d in infos]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup:
            raise UserError(f"two --set folders are both named {dup!r}; eval/<name>/ metrics would collide")
    else:
        infos = preflight(cfg)
        if args.max_samples:
            for d in infos:
                d["max_samples"] = args.max_samples
        if not infos:
            raise UserError(f"the checkpoint's experiment ({cfg.name}) lists no eval sets; pass --set PATH")
    runner = runner_for(cfg, infos, state_tokenizer_spec(state), taus=args.tau)
    t0 = time.perf_counter()
    metrics = runner.run(model)
    dt = time.perf_counter() - t0
    print(f"evaluated {ckpt_file} (step {step}, {cfg.resolved_model().pooling} / {cfg.loss.type}) in {dt:.1f} s\n")
    print(format_eval_table(metrics, infos))

    if args.no_log:
        return 0
    if c is None:
        uri = tracking.resolve_tracking_uri(args.tracking_uri or cfg.mlflow.tracking_uri)
        c = tracking.client(uri)
    if run is None:  # a checkpoint no run of this store names: a new eval run
        exp_id = tracking.experiment_id(c, cfg.mlflow.experiment or cfg.name)
        run = c.create_run(exp_id, run_name=f"eval-{cfg.name}-step{step}",
                           tags={"llip.checkpoint": ckpt_file.rsplit("/", 1)[0], "llip.eval_only": "true",
                                 "llip.git_commit": tracking.git_commit()})
        c.set_terminated(run.info.run_id, status="FINISHED")
    return _log(c, uri, run, metrics, step)


def _eval_export(args, c, uri: str) -> int:
    """`llip eval EXPORT_DIR --set PATH`: an exported or imported model, logged into the run it was
    exported from when this store has it, else into an eval-only run of the export's experiment."""
    import llip_core.pretrained as pretrained
    from orchestrator.config.schema import parse_config
    from orchestrator.data.evalsets import inspect_set
    from orchestrator.evaluation.runner import EvalRunner
    from orchestrator.storage.checkpoints import local_export
    from orchestrator.tracking import store as tracking

    try:
        m = pretrained.load(local_export(args.target))
    except pretrained.PretrainedError as e:
        raise UserError(str(e)) from None
    experiment = m.info.get("experiment")
    if args.sets:
        infos = [inspect_set(p, split=args.split, max_samples=args.max_samples).to_dict() for p in args.sets]
    elif experiment:
        infos = preflight(parse_config(experiment, source=f"{args.target} (experiment)"))
        for d in infos:
            d["max_samples"] = args.max_samples or d.get("max_samples")
    else:
        infos = []
    if not infos:
        raise UserError(f"{args.target}: an export names no eval sets of its own; pass --set PATH")
    taus = args.tau or (parse_config(experiment).eval.tau if experiment else None)
    runner = EvalRunner(infos, m.config.image_size, m.tokenizer, taus=taus if m.pooling == "llip" else None)
    t0 = time.perf_counter()
    metrics = runner.run(m.model)
    source = m.info.get("source") or {}
    step = int(source.get("step", 0) or 0)
    print(f"evaluated export {args.target} ({m.pooling}, {source.get('kind', '?')}) in {time.perf_counter() - t0:.1f} s\n")
    print(format_eval_table(metrics, infos))
    if args.no_log:
        return 0
    c = c or tracking.client(uri)
    run = None
    if source.get("run_id"):
        try:
            run = c.get_run(source["run_id"])
        except Exception:
            run = None
    if run is None:
        name = source.get("experiment") or "llip-exports"
        run = c.create_run(tracking.experiment_id(c, name, uri), run_name=f"eval-{Path(args.target.rstrip('/')).name}",
                           tags={"llip.export": args.target, "llip.eval_only": "true",
                                 "llip.git_commit": tracking.git_commit()})
        c.set_terminated(run.info.run_id, status="FINISHED")
    return _log(c, uri, run, metrics, step)


def _log(c, uri: str, run, metrics: dict, step: int) -> int:
    from orchestrator.tracking import store as tracking

    tracking.MetricLogger(uri, run.info.run_id).log(metrics, step)
    merge_final(c, run.info.run_id, metrics)
    print(f"\nlogged {len(metrics)} metrics at step {step} into MLflow run {run.info.run_id} "
          f"({run.data.tags.get('mlflow.runName', '')}) in {uri}")
    return 0
