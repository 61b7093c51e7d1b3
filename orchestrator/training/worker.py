"""The per-worker training loop that TorchTrainer runs on every rank.

It calls llip_core for everything numerical (the task object hides the model type), reads its data
shard from Ray Data, and reports every `log_every` steps on every rank (Ray Train requires all ranks
to report). Rank 0 alone writes metrics to MLflow and checkpoints to the run's storage path
(orchestrator/storage/checkpoints.py writes and reads them).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import torch

from orchestrator.console import say
from orchestrator.storage.checkpoints import load_latest_state, save_checkpoint


def eval_line(step: int, metrics: dict) -> str:
    """The headline eval figures of this step: R@1 (and R-precision) per retrieval set, top-1 per classification set
    (for Llip, at every tau evaluated), and the seconds evaluation took."""
    from orchestrator.console import natural_key

    parts = []
    for k in sorted(metrics, key=lambda k: (k.count("/"), natural_key(k))):  # held-out first
        name = k.split("/")
        if name[0] != "eval":
            continue
        last = name[-1]
        if last in ("recall1", "rprec", "top1") or last.startswith("top1_tau"):
            where = "/".join(name[1:-1]) or "held-out"
            parts.append(f"{where} {last} {100 * metrics[k]:.1f}%")
    secs = sum(v for k, v in metrics.items() if k.startswith("eval") and k.endswith("seconds"))
    return f"[llip] eval step {step}: " + ", ".join(parts) + f" ({secs:.1f} s)"


def _all_reduce_mean(values: list[float], world: int) -> list[float]:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return (t / world).tolist()


def _all_have_batch(mine: bool, world: int, device) -> bool:
    """True while every rank has a full batch: the epoch ends for all ranks at once (their plan
    runs can differ by a few samples, and unreadable samples are dropped unevenly)."""
    if world == 1:
        return mine
    t = torch.tensor([1 if mine else 0], dtype=torch.int32, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item())


def _open_trace(run_name: str, rank: int):
    """$LLIP_TRACE_STEPS=DIR: every rank appends one JSON line per step to DIR/<run>-rank<r>.jsonl
    (step, epoch, this rank's loss, the sample ids it trained on, the Ray node it ran on and the wall
    clock when the step ended), for checking which samples a step saw and where, e.g. that a run
    resumed on another node continues exactly where it stopped."""
    d = os.environ.get("LLIP_TRACE_STEPS")
    if not d:
        return None
    os.makedirs(d, exist_ok=True)
    return open(os.path.join(d, f"{run_name}-rank{rank}.jsonl"), "a", buffering=1)


def _rng_state() -> dict[str, Any]:
    st = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict[str, Any] | None) -> None:
    if not st:
        return
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(st["cuda"])
        except (RuntimeError, IndexError):  # fewer GPUs than when it was written: keep the fresh state
            pass


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from llip_core.optim import build_optimizer, cosine_lr
    from llip_core.preprocess import normalize_torch
    from llip_core.task import build_task
    from orchestrator.config.schema import parse_config
    from orchestrator.data.plan import EpochStream, total
    from orchestrator.data.reading import check_bad_fraction
    from orchestrator.tracking.store import MetricLogger

    cfg = parse_config(config["experiment"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    use_cuda = device.type == "cuda"
    if not use_cuda:
        # Fractional CPUs per worker: more intra-op threads than cores only adds contention.
        torch.set_num_threads(cfg.torch_threads())

    torch.manual_seed(cfg.seed)  # identical init on every rank (DDP also broadcasts from rank 0)
    core = build_task(
        cfg.resolved_model(), cfg.loss.type, rank=rank, world_size=world,
        literal_scorer=cfg.loss.literal_scorer, chunk_size=cfg.loss.chunk_size,
        multi_caption=cfg.data.captions == "all", diversity_weight=cfg.loss.diversity_weight,
        diversity_margin=cfg.loss.diversity_margin, siglip_init=cfg.loss.siglip_init,
        init_bias=cfg.loss.init_bias, global_batch=cfg.data.batch_size,
    ).to(device)
    optimizer = build_optimizer(core, cfg.train.lr, cfg.train.betas, cfg.train.eps, cfg.train.weight_decay)

    step, epoch = 0, 0
    data_pos = None  # where in its epoch the checkpoint stopped (orchestrator/data/plan.py)
    state = load_latest_state(cfg)
    if state is not None:
        if state.get("tokenizer") is not None and config.get("tokenizer_spec") is not None:
            from orchestrator.training.tokenization import check_same_tokenizer

            check_same_tokenizer(state["tokenizer"], config["tokenizer_spec"], "the checkpoint")
        core.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, epoch = state["step"], state["epoch"]
        if state.get("data") is not None:
            from orchestrator.data.plan import DataPosition

            data_pos = DataPosition.from_json(state["data"])
            epoch = data_pos.epoch
        _set_rng_state(state.get("rng"))
        if rank == 0:
            from orchestrator.data.plan import describe

            say(f"[llip] resumed from checkpoint at step {step}, epoch {epoch} ({describe(data_pos)})")
    elif config.get("init_from"):
        # a new run from other weights: every rank loads them (DDP would broadcast rank 0's anyway),
        # the optimizer and step stay fresh; a relaunch finds this run's own checkpoint above instead
        from orchestrator.training import initweights

        src = initweights.InitSource.from_json(config["init_from"])
        initweights.apply(core, initweights.load_weights(src))
        if rank == 0:
            say(f"[llip] initialised from {src.given} ({src.kind} {src.location}); step 0, fresh optimizer")
    local_bs = cfg.data.batch_size // world
    source = config["train_source"]  # orchestrator.data.plan.TrainSource, built by the driver
    multi = cfg.data.captions == "all"

    def open_stream(e: int) -> EpochStream:
        """This rank's stream of epoch e: the rest of its share when the checkpoint stopped inside e,
        else its run of the epoch's plan."""
        if data_pos is not None and data_pos.epoch == e:
            mine = data_pos.for_workers(world)[rank]
        else:
            mine = source.plan(e).worker_intervals(world)[rank]
        return EpochStream(source, e, mine, local_bs, multi_caption=multi)

    # The first stream starts now, so that Ray Data's start-up and the first window's decode overlap
    # what comes before the first step (switches, DDP, the eval sets' decode on rank 0).
    upcoming = open_stream(epoch).prefetch() if step < cfg.train.steps else None
    from llip_core.flops import train_step_flops
    from orchestrator.training.stepmetrics import StepClock, progress_line, resolve_peak_flops, step_metrics
    from orchestrator.training.switches import apply_switches

    warn = say if rank == 0 else (lambda _msg: None)
    bf16 = apply_switches(core, cfg.train, device, warn=warn)  # before DDP wraps the model
    peak = resolve_peak_flops(cfg.train.peak_flops, device.type,
                              torch.cuda.get_device_name(device) if use_cuda else None, warn)
    step_flops = train_step_flops(
        cfg.resolved_model(), cfg.data.batch_size, literal=cfg.loss.literal_scorer,
        captions_per_image=cfg.data.max_captions if cfg.data.captions == "all" else 1,
        world_size=world, ring=cfg.loss.type in ("siglip", "llip")) if peak else None
    task = ray.train.torch.prepare_model(core, parallel_strategy_kwargs={"find_unused_parameters": False}) if world > 1 else core

    logger = MetricLogger(config["tracking_uri"], config["mlflow_run_id"]) if rank == 0 and config.get("mlflow_run_id") else None
    stats = config.get("data_stats")
    # Eval sets (data.eval and eval.sets, preflighted by the driver) are decoded once, on rank 0 only:
    # the other ranks wait for it at the next collective, so an evaluation stalls training by its own
    # duration and no more. Every rank knows when one is due, so all report on that step together.
    from orchestrator.evaluation.runner import runner_for

    eval_sets = config.get("eval_sets") or []
    evaluator = runner_for(cfg, eval_sets, config.get("tokenizer_spec"), device) if rank == 0 else None
    eval_every = cfg.eval_interval()
    amp = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)

    def report(metrics: dict[str, float], with_checkpoint: bool) -> None:
        ckpt = None
        if with_checkpoint:
            from orchestrator.data.plan import DataPosition, gather_remaining

            remaining = gather_remaining(stream.remaining(), world)  # a collective: every rank
            if rank == 0:
                ckpt = save_checkpoint({
                    "model": core.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "epoch": epoch,
                    "config": config["experiment"], "tokenizer": config.get("tokenizer_spec"),
                    "data": DataPosition(epoch, remaining).to_json(), "rng": _rng_state(),
                })
        if logger is not None:
            logger.log(metrics, step)
        ray.train.report({**metrics, "step": step, "epoch": epoch}, checkpoint=ckpt)

    window_loss, window_n = 0.0, 0
    trace = _open_trace(ctx.get_experiment_name(), rank)
    node_id = ray.get_runtime_context().get_node_id() if trace is not None else None
    clock = StepClock()  # data-wait vs compute per step (orchestrator/training/stepmetrics.py)
    done = step >= cfg.train.steps

    while not done:
        saw_batch = False
        resuming = data_pos is not None and data_pos.epoch == epoch  # the rest of the checkpoint's epoch
        # started before the first step, or near the end of the previous epoch
        stream = upcoming if upcoming is not None and upcoming.epoch == epoch else open_stream(epoch)
        upcoming = None
        ahead = max(4 * local_bs, total(stream.intervals) // 4)  # positions left when the next epoch starts
        while True:
            left = total(stream.remaining())  # this epoch's positions this rank has not trained on
            # the next epoch starts decoding near this one's end, if the run lasts beyond this epoch
            if upcoming is None and left <= ahead and cfg.train.steps - step > left // local_bs:
                upcoming = open_stream(epoch + 1).prefetch()
            batch = stream.next_batch()
            if not _all_have_batch(batch is not None, world, device):  # ranks step in lockstep
                break
            saw_batch = True
            clock.batch_ready()
            lr = cosine_lr(step, cfg.train.lr, cfg.train.warmup_steps, cfg.train.steps)
            for g in optimizer.param_groups:
                g["lr"] = lr
            images = normalize_torch(batch["image"].to(device, non_blocking=True))
            tokens = batch["tokens"].to(device, non_blocking=True)
            mask = batch["caption_mask"].to(device, non_blocking=True) if "caption_mask" in batch else None
            with amp:
                terms = task(images, tokens, mask) if mask is not None else task(images, tokens)
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            if cfg.train.grad_clip:
                torch.nn.utils.clip_grad_norm_(core.parameters(), cfg.train.grad_clip)
            optimizer.step()
            core.after_step()
            step += 1
            step_loss = float(terms["loss"].detach())  # also waits for the device: compute ends here
            window_loss += step_loss
            window_n += 1
            if trace is not None:
                trace.write(json.dumps({"step": step, "epoch": epoch, "loss": step_loss,
                                        "ids": batch["sample_id"].tolist(), "node": node_id,
                                        "time": time.time()}) + "\n")
            clock.step_done(images.shape[0] * world)

            last = step >= cfg.train.steps
            ckpt_due = last or (cfg.train.checkpoint_every > 0 and step % cfg.train.checkpoint_every == 0)
            eval_due = bool(eval_sets) and (last or (eval_every > 0 and step % eval_every == 0))
            if step % cfg.train.log_every == 0 or ckpt_due or eval_due:
                wait, compute, wall = clock.window()
                # ranks' data-wait differs (each has its own split of the stream): log the mean
                loss_mean, wait, compute = _all_reduce_mean([window_loss / window_n, wait, compute], world)
                metrics = {
                    "train/loss": loss_mean,
                    "train/lr": lr,
                    "train/logit_scale": core.logit_scale_value(),
                    # the sigmoid losses' bias (from loss.init_bias); InfoNCE has none
                    **({"train/logit_bias": float(core.logit_bias.detach())} if core.logit_bias is not None else {}),
                    "train/epoch": float(epoch),
                    **step_metrics(clock.steps, clock.samples, wait, compute, step_flops, peak, world),
                }
                if stats is not None:
                    metrics.update(stats.snapshot())
                    check_bad_fraction(stats, cfg.data.max_bad_fraction)
                if eval_due and evaluator is not None:
                    metrics.update(evaluator.run(core.model))
                report(metrics, with_checkpoint=ckpt_due)
                if rank == 0:
                    say(progress_line(step, cfg.train.steps, loss_mean, lr, metrics, wall / clock.steps))
                    if eval_due:
                        say(eval_line(step, metrics))
                window_loss, window_n = 0.0, 0
                clock.restart()
            if last:
                done = True
                break
        if not saw_batch and not resuming:
            raise RuntimeError(
                f"rank {rank}: the training shard yielded no full batch of {local_bs}; "
                "lower data.batch_size or add data"
            )
        epoch += 1
