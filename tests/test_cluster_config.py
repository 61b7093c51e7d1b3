"""cluster.yaml through Ray's own autoscaler validation (and botocore's EC2 model), and the KubeRay
RayJob manifest's structure. No cloud calls: everything here is offline."""
import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster.yaml"
RAYJOB = ROOT / "k8s" / "rayjob.yaml"
GPU_FAMILIES = ("g4dn", "g5", "g6", "p3", "p4d", "p5")


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load(CLUSTER.read_text())


def _is_gpu(node_type: dict) -> bool:
    return node_type["node_config"]["InstanceType"].split(".")[0] in GPU_FAMILIES


def test_cluster_yaml_passes_rays_autoscaler_validation(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    # What `ray up` does before anything touches AWS: merge the AWS defaults, then validate
    # against ray-schema.json (unknown keys and wrong types fail here).
    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"


def test_ray_validation_rejects_a_typo(cluster):
    """Guards the test above: Ray's validation does reject a misspelt key in a node type."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = copy.deepcopy(cluster)
    bad["available_node_types"]["gpu_spot"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


def test_node_configs_are_valid_ec2_run_instances_params(cluster):
    """node_config goes verbatim to EC2 RunInstances; Ray's schema leaves it free-form, botocore does not."""
    import botocore.session
    from botocore.validate import ParamValidator

    shape = botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
    for name, nt in cluster["available_node_types"].items():
        report = ParamValidator().validate({**nt["node_config"], "MinCount": 1, "MaxCount": 1}, shape)
        assert not report.has_errors(), f"{name}: {report.generate_report()}"


def test_cpu_head_and_gpu_workers_on_demand_and_spot(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert not _is_gpu(head), "the head should be a CPU instance"
    workers = {n: t for n, t in types.items() if n != cluster["head_node_type"]}
    assert workers and all(_is_gpu(t) for t in workers.values())
    spot = [n for n, t in workers.items() if t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"]
    on_demand = [n for n, t in workers.items() if "InstanceMarketOptions" not in t["node_config"]]
    assert spot and on_demand
    for n, t in workers.items():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cluster["max_workers"], n
    assert cluster["idle_timeout_minutes"] > 0


def test_every_node_has_an_iam_profile_for_s3(cluster):
    for name, nt in cluster["available_node_types"].items():
        arn = nt["node_config"]["IamInstanceProfile"]["Arn"]
        assert re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@-]+", arn), name


def test_setup_installs_this_package_and_ray_runs_from_that_env(cluster):
    # The repo is mounted on the nodes and pip-installed (with our constraints) into one venv...
    mount = {remote: local for remote, local in cluster["file_mounts"].items()}
    repo_remote = next(r for r, l in mount.items() if l in (".", "./"))
    installs = [c for c in cluster["setup_commands"] if "pip install" in c and "-e" in shlex.split(c)]
    assert installs, "setup_commands must pip install the package"
    venv_pip = shlex.split(installs[-1])[0]
    assert venv_pip.endswith("/bin/pip")
    assert shlex.split(installs[-1])[-1].rstrip("/").endswith(Path(repo_remote).name)
    assert "constraints.txt" in installs[-1]
    # ...and Ray is started from that venv, so jobs and workers import the package.
    venv_bin = venv_pip.rsplit("/", 1)[0]
    for cmd in cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]:
        if "ray start" in cmd or "ray stop" in cmd:
            assert f"{venv_bin}/ray " in cmd, cmd
    # Big local directories stay off the nodes.
    for d in (".venv", "data", "runs", "mlflow.db"):
        assert d in cluster["rsync_exclude"]


@pytest.fixture(scope="module")
def rayjob():
    return yaml.safe_load(RAYJOB.read_text())


def test_rayjob_manifest(rayjob):
    import ray

    from orchestrator.config.schema import load_config

    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    assert spec["rayClusterSpec"]["rayVersion"] == ray.__version__
    assert spec["shutdownAfterJobFinishes"] is True
    # The entrypoint runs one of our commands on an experiment that exists and validates.
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "orchestrator"] and argv[3] in ("run", "sweep")
    exp = ROOT / "experiments" / Path(argv[4]).name
    assert exp.is_file(), f"{argv[4]} is not in experiments/"
    cfg = load_config(exp)
    assert argv[3] != "sweep" or cfg.sweep is not None
    # ...with its data and storage on S3, since pods share no local disk.
    from orchestrator.config.schema import parse_overrides

    cfg = cfg.with_overrides(parse_overrides([argv[i + 1] for i, a in enumerate(argv) if a == "--set"]))
    assert all(v.startswith("s3://") for v in (cfg.data.train, cfg.data.eval, cfg.storage_path))
    yaml.safe_load(spec["runtimeEnvYAML"])
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})
    for g in spec["rayClusterSpec"]["workerGroupSpecs"]:
        assert 0 <= g["minReplicas"] <= g["maxReplicas"]
        c = g["template"]["spec"]["containers"][0]
        assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1


# vCPUs and GPUs per instance type (AWS's published figures) for the types cluster.yaml uses.
INSTANCE_SIZES = {"m5.2xlarge": (8, 0), "g5.xlarge": (4, 1), "g5.12xlarge": (48, 4)}
FAKE = ROOT / "tests" / "fixtures" / "fake_cluster.yaml"


def test_the_autoscaler_tests_cluster_mirrors_cluster_yaml(cluster):
    """tests/test_autoscaler.py runs Ray's autoscaler on fake_cluster.yaml: the same worker node types
    (names, min/max workers, CPUs) as cluster.yaml, its GPUs as a custom `fake_gpu`, its head as the
    fake provider's `ray.head.default`; so what is exercised is the real file minus the cloud."""
    fake = yaml.safe_load(FAKE.read_text())
    real_types, fake_types = cluster["available_node_types"], fake["available_node_types"]
    head = real_types[cluster["head_node_type"]]
    workers = {k: v for k, v in real_types.items() if k != cluster["head_node_type"]}
    assert set(fake_types) == set(workers) | {"ray.head.default"} and fake["head_node_type"] == "ray.head.default"
    cpus, gpus = INSTANCE_SIZES[head["node_config"]["InstanceType"]]
    assert fake_types["ray.head.default"]["resources"] == {"CPU": cpus, **({"fake_gpu": gpus} if gpus else {})}
    for name, nt in workers.items():
        cpus, gpus = INSTANCE_SIZES[nt["node_config"]["InstanceType"]]
        ft = fake_types[name]
        assert (ft["min_workers"], ft["max_workers"]) == (nt.get("min_workers", 0), nt["max_workers"]), name
        assert ft["resources"] == {"CPU": cpus, "fake_gpu": gpus}, name
    for key in ("cluster_name", "max_workers", "upscaling_speed"):
        assert fake[key] == cluster[key], key
    assert fake["provider"]["type"] == "fake_multinode"


def test_the_mirror_check_catches_a_drift(cluster):
    """Guards the test above: a max_workers changed in cluster.yaml alone makes it fail."""
    drifted = copy.deepcopy(cluster)
    drifted["available_node_types"]["gpu_spot"]["max_workers"] = 5
    with pytest.raises(AssertionError, match="gpu_spot"):
        test_the_autoscaler_tests_cluster_mirrors_cluster_yaml(drifted)
