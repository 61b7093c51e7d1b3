"""Distributed losses on real CPU processes (torch.distributed, gloo) equal the single-process result.

Each rank holds its slice of one global batch. DDP averages parameter gradients over ranks, so the
contract is: mean over ranks of the local "loss" == single-process loss on the concatenated batch, and
(sum over ranks of gradients) / world_size == single-process gradients. For features (which DDP would
back-propagate into the shared model) the rank's own slice gets its gradient, scaled the same way.
"""
import math
import multiprocessing
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llip_core.config import SIZES
from llip_core.losses import build_loss
from llip_core.task import build_task

LOSSES = ["clip", "siglip", "llip", "llip_infonce"]
B_LOCAL = 3
TAU = 2.0


def _global_features(loss_type, world_size, seed=0):
    """Leaves for the whole batch: per-sample features and replicated parameters."""
    g = torch.Generator().manual_seed(seed)
    B, H, K, d = B_LOCAL * world_size, 2, 3, 4
    D = H * d
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    unit = lambda x: x / x.norm(dim=-1, keepdim=True)
    if loss_type in ("clip", "siglip"):
        img, txt, params = {"image_emb": unit(r(B, D))}, {"text_emb": unit(r(B, D))}, {}
    else:
        img = {"keys": r(B, H, K, d), "values": r(B, H, K, d)}
        txt = {"queries": r(B, H, d), "text_emb": unit(r(B, D))}
        params = {"out_proj": r(D, D) * D ** -0.5}
    params["logit_scale"] = torch.tensor(math.log(1 / 0.07), dtype=torch.float64)
    if loss_type in ("siglip", "llip"):
        params["logit_bias"] = torch.tensor(-2.0, dtype=torch.float64)
    return img, txt, params


def _run_loss(loss_type, img, txt, params, rank, world_size):
    leaves = {**{f"img.{k}": v for k, v in img.items()}, **{f"txt.{k}": v for k, v in txt.items()}, **params}
    leaves = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
    loss_fn = build_loss(loss_type, rank, world_size, tau=TAU, chunk_size=2)
    out = loss_fn(
        {k[4:]: v for k, v in leaves.items() if k.startswith("img.")},
        {k[4:]: v for k, v in leaves.items() if k.startswith("txt.")},
        logit_scale=leaves["logit_scale"].exp(), logit_bias=leaves.get("logit_bias"),
        **({"out_proj": leaves["out_proj"]} if "out_proj" in leaves else {}),
    )
    out["loss"].backward()
    return out["loss"].detach(), {k: v.grad for k, v in leaves.items()}


def _init(rank, world_size, init_file):
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback: no lookup of the host's interfaces
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)


def _finish(path, results):
    """Save this rank's results and leave without tearing torch.distributed down: a DDP Reducer freed
    at interpreter exit can deadlock in ~ProcessGroupGloo (it joins a gloo thread that waits for the
    GIL the freeing thread holds; seen hanging a test until its timeout). Every rank passes the barrier
    first, so no collective is cut short; exit code 0 is what start_processes checks."""
    torch.save(results, path)
    dist.barrier()
    os._exit(0)


def _feature_worker(rank, world_size, init_file, out_dir):
    import llip_core.losses as L

    _init(rank, world_size, init_file)
    # count ring messages: the sigmoid losses must run the ring both ways (about N/2 hops)
    calls = {"bidir": 0, "one_way": 0}
    bidir, one_way = L.neighbour_exchange_bidir, L.neighbour_exchange

    def counted_bidir(*a, **k):
        calls["bidir"] += 1
        return bidir(*a, **k)

    def counted_one_way(*a, **k):
        calls["one_way"] += 1
        return one_way(*a, **k)

    L.neighbour_exchange_bidir, L.neighbour_exchange = counted_bidir, counted_one_way
    results = {}
    for loss_type in LOSSES:
        before = dict(calls)
        img, txt, params = _global_features(loss_type, world_size)
        sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        img = {k: v[sl] for k, v in img.items()}
        txt = {k: v[sl] for k, v in txt.items()}
        results[loss_type] = _run_loss(loss_type, img, txt, params, rank, world_size)
        results[f"{loss_type}.calls"] = {k: calls[k] - before[k] for k in calls}
    _finish(os.path.join(out_dir, f"rank{rank}.pt"), results)


def _spawn(fn, world_size, tmp_path, *args):
    # forkserver with torch preloaded: ranks start by fork from a clean server (no OpenMP or autograd
    # threads to inherit) instead of each re-importing torch (and DDP its lazy torch._dynamo import),
    # which takes ~10 s on a loaded 2-core box
    multiprocessing.set_forkserver_preload(["torch", "torch.distributed", "torch._dynamo", "llip_core.task"])
    init_file = tmp_path / "init"
    mp.start_processes(fn, args=(world_size, str(init_file), str(tmp_path), *args), nprocs=world_size,
                       join=True, start_method="forkserver")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world_size", [2, 3, pytest.param(4, marks=pytest.mark.slow)])
def test_feature_level_parity(world_size, tmp_path):
    ranks = _spawn(_feature_worker, world_size, tmp_path)
    both_ways, one_more = divmod(world_size - 1, 2)
    for loss_type in ("siglip", "llip"):  # forward + backward: each hop once each way
        assert ranks[0][f"{loss_type}.calls"] == {"bidir": 2 * both_ways, "one_way": 2 * one_more}, loss_type
    for loss_type in LOSSES:
        img, txt, params = _global_features(loss_type, world_size)
        single_loss, single_grads = _run_loss(loss_type, img, txt, params, 0, 1)
        mean_loss = sum(r[loss_type][0] for r in ranks) / world_size
        torch.testing.assert_close(mean_loss, single_loss, msg=loss_type)
        for name, g in single_grads.items():
            if name.startswith(("img.", "txt.")):  # per-sample: each rank owns its slice
                dist_g = torch.cat([r[loss_type][1][name] for r in ranks]) / world_size
            else:  # replicated: DDP's average
                dist_g = sum(r[loss_type][1][name] for r in ranks) / world_size
            torch.testing.assert_close(dist_g, g, msg=f"{loss_type} {name}")


def _batch(world_size, seed=1):
    cfg = SIZES["micro"]
    g = torch.Generator().manual_seed(seed)
    B = B_LOCAL * world_size
    images = torch.randn(B, 3, cfg.image_size, cfg.image_size, generator=g, dtype=torch.float64)
    tokens = torch.zeros(B, cfg.context_length, dtype=torch.long)
    tokens[:, 0], tokens[:, 1:4], tokens[:, 4] = 1, torch.randint(3, cfg.vocab_size, (B, 3), generator=g), 2
    return images, tokens


DDP_CASES = [("clip", "cls"), ("siglip", "cls"), ("llip", "llip"), ("llip_infonce", "llip"),
             ("siglip", "register"), ("clip", "avg")]  # register: K projections, only the first used


def _task(loss_type, rank, world_size, pooling=None):
    pooling = pooling or ("llip" if loss_type.startswith("llip") else "cls")
    torch.manual_seed(0)
    return build_task(SIZES["micro"].replace(pooling=pooling), loss_type, rank, world_size, chunk_size=2).double()


def _ddp_worker(rank, world_size, init_file, out_dir):
    from torch.nn.parallel import DistributedDataParallel as DDP

    _init(rank, world_size, init_file)
    images, tokens = _batch(world_size)
    sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    results = {}
    for loss_type, pooling in DDP_CASES:
        task = _task(loss_type, rank, world_size, pooling)
        ddp = DDP(task, find_unused_parameters=False)
        loss = ddp(images[sl], tokens[sl])["loss"]
        loss.backward()
        dist.all_reduce(mean := loss.detach().clone())
        results[loss_type, pooling] = (mean / world_size, {n: p.grad for n, p in task.named_parameters()})
    _finish(os.path.join(out_dir, f"rank{rank}.pt"), results)


@pytest.mark.timeout(120)
def test_ddp_task_parity(tmp_path):
    """The whole task under DDP on 2 ranks: every parameter's gradient equals one process on 2x batch."""
    ranks = _spawn(_ddp_worker, 2, tmp_path)
    images, tokens = _batch(2)
    for case in DDP_CASES:
        task = _task(case[0], 0, 1, case[1])
        loss = task(images, tokens)["loss"]
        loss.backward()
        for r in ranks:
            torch.testing.assert_close(r[case][0], loss.detach(), msg=str(case))
            for n, p in task.named_parameters():
                torch.testing.assert_close(r[case][1][n], p.grad, msg=f"{case} {n}")
