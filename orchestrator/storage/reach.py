"""Storage every node can reach: the checks a run makes before its workers spread over nodes.

A training worker on another node than the driver's writes checkpoints, logs metrics (rank 0) and
reads shards and eval sets from its own machine. A local path there is another disk: checkpoints
land where nobody resumes from, a sqlite store splits in two, a shard folder is missing. And an
S3 endpoint the driver reaches may not answer from a worker node (a 127.0.0.1 endpoint, a VPC
endpoint, a firewall). So before training, on a cluster:

  where     `worker_nodes`: the alive nodes whose resources can hold one training worker (CPU, GPU,
            scaling.resources_per_worker), and whether the run's workers can land anywhere but the
            driver's node (`spreads`: another node can hold one, or the driver's node cannot hold
            them all, so an autoscaler will add nodes).
  paths     `check_shared_storage`: with workers that spread, every local path the run uses
            (storage_path, data.train, data.eval, eval.sets, a sqlite tracking store, the sweep's
            cache) is refused in one line, unless `storage_shared: true` vouches for a filesystem
            every node mounts. A run whose workers all sit on the driver's node keeps local paths.
  S3        `check_nodes_reach_s3`: one tiny task pinned to each node that can hold a worker checks
            that every s3:// location of the run answers from there, with that node's own
            environment (its AWS_ENDPOINT_URL and credentials, as the workers will see them).
Nodes an autoscaler adds later cannot be asked in advance; they run the same setup as the others.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from orchestrator.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from orchestrator.config.schema import ExperimentConfig


def worker_request(cfg: "ExperimentConfig") -> dict[str, float]:
    """The Ray resources one training worker asks for (what the driver gives ScalingConfig)."""
    s = cfg.scaling
    req = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        req["GPU"] = s.gpus_per_worker or 1
    req.update(s.resources_per_worker)
    return req


def holds(node_resources: dict[str, float], request: dict[str, float], n: int = 1) -> bool:
    return all(node_resources.get(k, 0.0) + 1e-9 >= n * v for k, v in request.items())


def spreads(nodes: list[dict], driver_node: str, request: dict[str, float], num_workers: int,
            can_grow: bool = True) -> bool:
    """Whether a run's workers can land on another node than the driver's. `nodes`: alive nodes as
    {"id", "resources"} (totals, not what is free now: placement waits for busy resources).
    `can_grow`: whether nodes may join (a cluster started elsewhere, perhaps with an autoscaler); a
    local cluster this process started cannot, and workers that do not fit there never start."""
    others = [n for n in nodes if n["id"] != driver_node and holds(n["resources"], request)]
    mine = next((n for n in nodes if n["id"] == driver_node), None)
    fits_here = mine is not None and holds(mine["resources"], request, num_workers)
    return bool(others) or (can_grow and not fits_here)


def cluster_nodes() -> list[dict]:
    """The alive nodes of the connected Ray cluster: id, address and total resources."""
    import ray

    return [{"id": n["NodeID"], "address": n.get("NodeManagerAddress", "?"), "resources": dict(n.get("Resources") or {})}
            for n in ray.nodes() if n.get("Alive")]


def worker_nodes(cfg: "ExperimentConfig") -> tuple[str, list[dict], bool]:
    """(the driver's node id, the alive nodes that can hold a worker, whether the workers spread)."""
    import ray

    driver = ray.get_runtime_context().get_node_id()
    nodes = cluster_nodes()
    req = worker_request(cfg)
    able = [n for n in nodes if holds(n["resources"], req)]
    return driver, able, spreads(nodes, driver, req, cfg.scaling.num_workers, can_grow=not _started_here())


def _started_here() -> bool:
    """Whether this process started the (local, single-node) Ray cluster it is connected to."""
    try:
        import ray

        return bool(ray._private.worker._global_node.head)
    except Exception:  # noqa: BLE001 - unknown: assume a cluster that can grow
        return False


def local_paths(cfg: "ExperimentConfig", tracking_uri: Optional[str] = None) -> list[tuple[str, str]]:
    """(config key, path) of every local path the run reads or writes on its workers' nodes."""
    out = []

    def add(key, path):
        if path and "://" not in str(path):
            out.append((key, str(path)))

    add("storage_path", cfg.storage_path)
    add("data.train", cfg.train_location())
    add("data.eval", cfg.data.eval)
    for i, s in enumerate(cfg.eval.sets):
        add(f"eval.sets[{i}]", s.path)
    if cfg.sweep is not None and cfg.sweep.shared_data.cache:
        add("sweep.shared_data.cache", cfg.sweep.shared_data.cache)
    uri = tracking_uri or cfg.mlflow.tracking_uri
    if uri and uri.startswith("sqlite:///"):
        out.append(("mlflow.tracking_uri", uri))
    return out


def check_shared_storage(cfg: "ExperimentConfig", tracking_uri: str, spread: bool,
                         also: tuple[tuple[str, str], ...] = ()) -> None:
    """One line when the workers spread over nodes and the run uses a path only this node sees.
    `also`: (key, location) the driver resolved itself, e.g. where train.init_from's weights lie."""
    if not spread or cfg.storage_shared:
        return
    local = local_paths(cfg, tracking_uri) + [(k, v) for k, v in also if v and "://" not in v]
    if not local:
        return
    key, path = local[0]
    more = f" (and {', '.join(k for k, _ in local[1:])})" if len(local) > 1 else ""
    if key == "mlflow.tracking_uri":
        fix = "use an MLflow tracking server (MLFLOW_TRACKING_URI=http://HOST:5000)"
    else:
        fix = f"use s3://BUCKET/PREFIX for {key}"
    raise UserError(f"{key}: {path} is a local path{more}, but this run's training workers can run on other "
                    f"nodes than this one, which would not see it; {fix}, or set storage_shared: true if it is "
                    "on a filesystem every node mounts")


def _probe(urls: list[str], s3cfg) -> Optional[tuple[str, str]]:
    """Runs on one node: the first s3:// location that does not answer from there, with why."""
    from orchestrator.storage import s3

    for url in urls:
        try:
            s3.check_reachable(url, s3cfg, must_exist=False)
        except UserError as e:
            return url, str(e)
        except Exception as e:  # noqa: BLE001 - anything the node's stack raises is the answer
            return url, f"{type(e).__name__}: {e}"
    return None


def s3_locations(cfg: "ExperimentConfig") -> list[str]:
    locs = [cfg.storage_path, cfg.train_location(), cfg.data.eval, *(s.path for s in cfg.eval.sets)]
    return [u for u in dict.fromkeys(locs) if u and str(u).startswith("s3://")]


def check_nodes_reach_s3(cfg: "ExperimentConfig", nodes: list[dict], timeout_s: float = 120.0) -> None:
    """One line naming the node and the URL when a node that can hold a worker cannot reach one of
    the run's s3:// locations. Each node answers with its own environment."""
    urls = s3_locations(cfg)
    if not urls or not nodes:
        return
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0, max_retries=0)(_probe)
    refs = {probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["id"], soft=False)).remote(urls, cfg.data.s3): n
            for n in nodes}
    ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    for ref in ready:
        node = refs[ref]
        try:
            bad = ray.get(ref)
        except Exception as e:  # noqa: BLE001 - the node died or the task could not run there
            bad = (urls[0], f"the check could not run there ({type(e).__name__})")
        if bad:
            url, why = bad
            why = why.splitlines()[0].removeprefix(f"{url}: ").split("; ")[0]
            raise UserError(f"node {node['id'][:12]} ({node['address']}) cannot reach {url}: {why}; its training "
                            "workers would fail there: give every node the same S3 endpoint and credentials "
                            "(data.s3, or AWS_ENDPOINT_URL and keys or an instance profile on each node)")
    if pending:
        node = refs[pending[0]]
        raise UserError(f"node {node['id'][:12]} ({node['address']}) did not answer a {timeout_s:.0f} s check of "
                        f"{', '.join(urls)}; check that node (ray status) before training there")
