"""Cluster-side configuration: ray_cluster.yaml, the cluster image, KubeRay and MLflow manifests.

ray_cluster.yaml is checked with Ray's own launcher schema (offline); the manifests have no
validator here, so the tests pin the fields the project relies on and, above all, that the
files agree with each other: one image, one Ray version, the same GPU worker bounds, and an
MLFLOW_TRACKING_URI that names the MLflow Service actually deployed.
"""

from __future__ import annotations

import copy
import re
import shlex
import socket
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[2]
RAY_CLUSTER = ROOT / "ray_cluster.yaml"
DOCKERFILE = ROOT / "infra" / "docker" / "Dockerfile"
RAYCLUSTER = ROOT / "infra" / "k8s" / "raycluster.yaml"
RAYJOB = ROOT / "infra" / "k8s" / "rayjob.yaml"
SHARED_STORAGE = ROOT / "infra" / "k8s" / "shared-storage.yaml"
JOB_SPECS = sorted((ROOT / "jobs" / "specs").glob("*.yaml"))
COMPOSE = ROOT / "infra" / "mlflow" / "docker-compose.yaml"
MLFLOW_K8S = ROOT / "infra" / "mlflow" / "k8s.yaml"

# AWS instance types with 8 GPUs of >= 32 GB each: the paper's setup, one 36-frame clip per GPU.
GPU_INSTANCES = {"p3dn.24xlarge": 32, "p4d.24xlarge": 40, "p4de.24xlarge": 80, "p5.48xlarge": 80}


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def load_compose() -> dict[str, Any]:
    """The compose file as `docker compose config` sees it with no .env: ${VAR:-default} -> default."""
    text = re.sub(r"\$\{\w+:?-([^}]*)\}", r"\1", COMPOSE.read_text()).replace("$$", "$")
    return yaml.safe_load(text)


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def check_launcher_config(config: dict[str, Any]) -> dict[str, Any]:
    """Ray's own pipeline for `ray up`: fill in defaults, then the JSON schema + cross-checks."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def gpu_node_type(config: dict[str, Any]) -> dict[str, Any]:
    gpu_types = [t for t in config["available_node_types"].values() if t["resources"].get("GPU", 0) > 0]
    assert len(gpu_types) == 1, "expected exactly one GPU worker type in ray_cluster.yaml"
    return gpu_types[0]


def docker_env(config: dict[str, Any]) -> dict[str, str]:
    """`--env KEY=VALUE` entries of the launcher's docker run_options."""
    env: dict[str, str] = {}
    for option in config["docker"]["run_options"]:
        words = shlex.split(option)
        if words[0] in ("--env", "-e"):
            key, _, value = words[1].partition("=")
            env[key] = value
    return env


def ray_containers(raycluster: dict[str, Any]) -> list[dict[str, Any]]:
    spec = raycluster["spec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def container_env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def dockerfile_args() -> dict[str, str]:
    """Default values of the Dockerfile's ``ARG NAME=value`` lines (quotes stripped)."""
    pairs = re.findall(r'^ARG (\w+)=(?:"([^"]*)"|(\S+))', DOCKERFILE.read_text(), re.M)
    return {name: quoted or bare for name, quoted, bare in pairs}


def dockerfile_workdir() -> str:
    return re.search(r"^WORKDIR (\S+)", DOCKERFILE.read_text(), re.M).group(1)


def flag_values(argv: list[str]) -> dict[str, str]:
    """``["server", "--port", "5000"]`` -> ``{"--port": "5000"}``."""
    return {
        a: b for a, b in zip(argv, argv[1:], strict=False) if a.startswith("--") and not b.startswith("--")
    }


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return load(RAY_CLUSTER)


@pytest.fixture(scope="module")
def raycluster() -> dict[str, Any]:
    return load(RAYCLUSTER)


# --- ray_cluster.yaml against Ray's validator --------------------------------------------------


def test_ray_cluster_passes_rays_validator_offline(cluster, monkeypatch):
    """prepare_config reads only Ray's bundled defaults.yaml: no AWS call, no network at all."""

    def no_network(*args, **kwargs):
        raise AssertionError("prepare_config/validate_config tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    prepared = check_launcher_config(cluster)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_ray_cluster_gpu_workers_fit_the_paper(cluster):
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    worker = gpu_node_type(cluster)
    instance = worker["node_config"]["InstanceType"]
    assert instance in GPU_INSTANCES, f"{instance}: not a known 8 x >=32 GB GPU instance"
    assert worker["resources"]["GPU"] == 8
    assert 0 <= worker["min_workers"] <= worker["max_workers"] <= cluster["max_workers"]


_GPU_TYPE = "ray.worker.gpu"


def _delete_provider(c):
    del c["provider"]


def _string_max_workers(c):
    c["max_workers"] = "2"


def _string_gpu_count(c):
    c["available_node_types"][_GPU_TYPE]["resources"]["GPU"] = "8"


def _no_resources(c):
    del c["available_node_types"][_GPU_TYPE]["resources"]


def _typo_key(c):
    c["max_worker"] = c.pop("max_workers")


def _unknown_head(c):
    c["head_node_type"] = "ray.head.missing"


def _min_above_max(c):
    c["available_node_types"][_GPU_TYPE]["min_workers"] = c["max_workers"] + 1


@pytest.mark.parametrize(
    "breaker",
    [
        _delete_provider,
        _string_max_workers,
        _string_gpu_count,
        _no_resources,
        _typo_key,
        _unknown_head,
        _min_above_max,
    ],
)
def test_validator_rejects_broken_configs(cluster, breaker):
    """The test above would be worthless if the validator accepted anything: break one field."""
    assert _GPU_TYPE in cluster["available_node_types"]
    broken = copy.deepcopy(cluster)
    breaker(broken)
    with pytest.raises((jsonschema.ValidationError, ValueError, KeyError)):
        check_launcher_config(broken)


def test_ray_cluster_environment_and_storage(cluster):
    env = docker_env(cluster)
    vistr = cluster["metadata"]["vistr"]
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["MLFLOW_TRACKING_URI"] == vistr["mlflow_tracking_uri"]
    assert env["VISTR_STORAGE_PATH"].startswith("s3://")
    assert vistr["storage_path"].startswith(env["VISTR_STORAGE_PATH"] + "/"), "checkpoints outside the bucket"
    assert vistr["shards_path"].startswith(vistr["shared_path"] + "/"), "shards outside the shared filesystem"
    # The token every node checks is the one the client generated and mounted.
    assert cluster["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"


def docker_volumes(config: dict[str, Any]) -> dict[str, str]:
    """`-v HOST:CONTAINER` entries of the launcher's docker run_options: container path -> host path."""
    volumes = {}
    for option in config["docker"]["run_options"]:
        words = shlex.split(option)
        if words[0] in ("-v", "--volume"):
            host, container = words[1].split(":")[:2]
            volumes[container] = host
    return volumes


def test_every_ray_node_mounts_the_shared_filesystem_where_jobs_look(cluster, raycluster):
    """The stages read and write local paths (dataset, shards, campaigns); a job's driver and its
    workers run on different nodes, so those paths must be one filesystem on every node."""
    shared = cluster["metadata"]["vistr"]["shared_path"]
    # ray up: the host mounts it before the container starts, and the container sees the same path.
    init = " ".join(cluster["initialization_commands"])
    assert re.search(rf"mount -t nfs4 .* \S+:/ {re.escape(shared)}(\s|$)", init), init
    assert docker_volumes(cluster)[shared] == shared
    # KubeRay: every Ray container mounts the ReadWriteMany claim of shared-storage.yaml there.
    claims = {d["metadata"]["name"]: d for d in load_all(SHARED_STORAGE) if d["kind"] == "PersistentVolumeClaim"}
    spec = raycluster["spec"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == shared]
            claim = claims[volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]]
            assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
            assert claim["metadata"]["namespace"] == raycluster["metadata"]["namespace"]
    # Every absolute local path a job spec or the RayJob names is on that filesystem.
    texts = [RAYJOB.read_text(), *(p.read_text() for p in JOB_SPECS)]
    paths = {m for text in texts for m in re.findall(r"(?<![\w:/])(/mnt/[\w./-]+)", text)}
    assert paths and all(p == shared or p.startswith(shared + "/") for p in paths), sorted(paths)


def test_ray_cluster_installs_the_synced_checkout_where_the_image_has_it(cluster):
    workdir = dockerfile_workdir()
    assert cluster["file_mounts"][workdir] == "."
    assert f"pip install --no-deps -e {workdir}" in cluster["setup_commands"]
    assert ".gitignore" in cluster["rsync_filter"], ".venv/ must not be synced to the nodes"


# --- the image ----------------------------------------------------------------------------------


def test_dockerfile_builds_on_rays_gpu_image_with_ffmpeg_and_the_package(raycluster):
    text = DOCKERFILE.read_text()
    args = dockerfile_args()
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    resolved = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert resolved == f"rayproject/ray:{args['RAY_VERSION']}-{args['PYTHON_TAG']}-gpu"
    assert args["RAY_VERSION"] == raycluster["spec"]["rayVersion"]
    assert re.search(r"apt-get install .*\bffmpeg\b", text)
    assert re.search(r"pip install .*-e \.", text)


def test_dockerignore_keeps_the_venv_out_of_the_build_context():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "runs"} <= set(ignored)


def test_one_image_everywhere(cluster, raycluster):
    image = cluster["docker"]["image"]
    assert {c["image"] for c in ray_containers(raycluster)} == {image}
    # The documented build command tags exactly that image, with the Ray version the image has.
    assert f"-t {image} " in DOCKERFILE.read_text()
    assert f"ray{raycluster['spec']['rayVersion']}" in image


# --- KubeRay ------------------------------------------------------------------------------------


def test_raycluster_matches_ray_cluster_yaml(cluster, raycluster):
    assert (raycluster["apiVersion"], raycluster["kind"]) == ("ray.io/v1", "RayCluster")
    spec = raycluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"]["mode"] == "token"
    worker = gpu_node_type(cluster)
    (group,) = spec["workerGroupSpecs"]
    assert (group["minReplicas"], group["maxReplicas"]) == (worker["min_workers"], worker["max_workers"])
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for container in group["template"]["spec"]["containers"]:
        resources = container["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == worker["resources"]["GPU"] == 8
        assert resources["requests"]["nvidia.com/gpu"] == 8
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    head_cpus = cluster["available_node_types"][cluster["head_node_type"]]["resources"]["CPU"]
    assert int(head["resources"]["limits"]["cpu"]) == head_cpus
    assert "nvidia.com/gpu" not in head["resources"]["limits"]


def test_raycluster_env_points_at_the_deployed_mlflow_service(cluster, raycluster):
    services = {
        (d["metadata"]["name"], d["metadata"]["namespace"]): d
        for d in load_all(MLFLOW_K8S)
        if d["kind"] == "Service"
    }
    for container in ray_containers(raycluster):
        env = container_env(container)
        url = urlparse(env["MLFLOW_TRACKING_URI"])
        name, namespace, *rest = url.hostname.split(".")
        assert rest == ["svc", "cluster", "local"], f"{url.hostname}: not an in-cluster Service name"
        service = services[(name, namespace)]
        assert url.port in [p["port"] for p in service["spec"]["ports"]]
        assert env["VISTR_STORAGE_PATH"] == docker_env(cluster)["VISTR_STORAGE_PATH"]
    assert raycluster["metadata"]["namespace"] == namespace


def test_rayjob_trains_paper_r50_on_the_raycluster(raycluster):
    job = load(RAYJOB)
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["metadata"]["namespace"] == raycluster["metadata"]["namespace"]
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": raycluster["metadata"]["name"]}
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.train"]
    config = flag_values(argv)["--config"]
    workdir = dockerfile_workdir()
    assert config == f"{workdir}/configs/paper_r50.yaml"
    assert (ROOT / "configs" / "paper_r50.yaml").is_file()


# --- MLflow server ------------------------------------------------------------------------------


def check_mlflow_server_argv(argv: list[str]) -> dict[str, str]:
    assert argv[:2] == ["mlflow", "server"]
    flags = flag_values(argv)
    assert flags["--backend-store-uri"].startswith("postgresql://")
    assert flags["--artifacts-destination"].startswith("s3://")
    assert (flags["--host"], flags["--port"]) == ("0.0.0.0", "5000")
    return flags


def test_mlflow_compose_runs_postgres_and_s3(cluster):
    services = load_compose()["services"]
    mlflow = services["mlflow"]
    flags = check_mlflow_server_argv(mlflow["command"])
    db = urlparse(flags["--backend-store-uri"])
    assert db.hostname in services and "postgres" in services[db.hostname]["image"]
    assert "5000:5000" in mlflow["ports"]
    base = re.search(r"^FROM (\S+)", mlflow["build"]["dockerfile_inline"], re.M).group(1)
    assert base.startswith("ghcr.io/mlflow/mlflow:v")
    assert mlflow["image"].endswith(":" + base.rsplit(":v", 1)[1]), "server image tag = MLflow version"


def test_mlflow_k8s_deployment_and_service():
    docs = {(d["kind"], d["metadata"]["name"]): d for d in load_all(MLFLOW_K8S)}
    deployment, service = docs[("Deployment", "mlflow")], docs[("Service", "mlflow")]
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    check_mlflow_server_argv(container["command"])
    assert container["image"] == load_compose()["services"]["mlflow"]["image"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (port,) = service["spec"]["ports"]
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert (port["port"], named[port["targetPort"]]) == (5000, 5000)
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    # The backend-store host is the PostgreSQL Service of the same file.
    db_host = urlparse(flag_values(container["command"])["--backend-store-uri"]).hostname
    assert ("Service", db_host.split(".")[0]) in docs


# --- local scripts ------------------------------------------------------------------------------


@pytest.mark.parametrize("script", ["start.sh", "stop.sh"])
def test_local_scripts_parse_and_are_executable(script):
    path = ROOT / "infra" / "local" / script
    assert path.stat().st_mode & 0o111, f"{path} is not executable"
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
