"""deploy/: every Kubernetes manifest is valid against the Kubernetes schemas (kubernetes-validate,
offline, strict: unknown fields fail), the manifests wire what the deployment relies on, the
compose file parses and names its services, and the images build on what the extras pin."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
BASE = DEPLOY / "k8s" / "base"
PYPROJECT = DEPLOY.parent / "pyproject.toml"
# The oldest Kubernetes still in wide use whose Job has backoffLimitPerIndex, and the newest.
VERSIONS = ("1.29.0", kubernetes_validate.latest_version())


def manifests() -> dict[str, dict[str, Any]]:
    """Every resource of the kustomization, by kind/name."""
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    found = {}
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((BASE / name).read_text()):
            found[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return found


def containers(resource: dict[str, Any]) -> list[dict[str, Any]]:
    return resource["spec"]["template"]["spec"]["containers"]


def test_the_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    on_disk = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(on_disk)


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_is_valid_against_the_kubernetes_schemas(version: str) -> None:
    resources = manifests()
    assert {k.split("/")[0] for k in resources} == {
        "ConfigMap", "Secret", "Deployment", "Service", "Job",
    }  # fmt: skip
    for name, resource in resources.items():
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{name} is not a valid Kubernetes {version} resource: {error.message}")


def test_the_server_has_a_gpu_probes_and_binds_every_interface() -> None:
    server = manifests()["Deployment/logitcache-server"]
    (container,) = containers(server)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["args"][container["args"].index("--host") + 1] == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 50051, "http": 8080}


def test_the_reader_is_store_only_on_cpus() -> None:
    resources = manifests()
    (reader,) = containers(resources["Deployment/logitcache-reader"])
    assert reader["image"] == "logitcache-cpu" and "nvidia.com/gpu" not in str(reader)
    config = tomllib.loads(resources["ConfigMap/logitcache-config"]["data"]["reader.toml"])
    assert "teachers" not in config and config["host"] == "0.0.0.0"
    assert reader["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_the_services_route_to_their_pods_ports() -> None:
    resources = manifests()
    for service, deployment in [("logitcache", "logitcache-server"),
                                ("logitcache-reader", "logitcache-reader")]:  # fmt: skip
        spec = resources[f"Service/{service}"]["spec"]
        pods = resources[f"Deployment/{deployment}"]["spec"]["template"]["metadata"]["labels"]
        assert spec["selector"].items() <= pods.items()
        named = {p["name"] for c in containers(resources[f"Deployment/{deployment}"])
                 for p in c["ports"]}  # fmt: skip
        assert {p["targetPort"] for p in spec["ports"]} <= named


def test_the_precompute_job_gives_each_index_its_share() -> None:
    job = manifests()["Job/logitcache-precompute"]
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    (container,) = containers(job)
    args = container["args"]
    assert args[0] == "precompute"
    assert "--worker=$(JOB_COMPLETION_INDEX)" in args
    assert f"--workers={spec['completions']}" in args
    assert spec["template"]["spec"]["restartPolicy"] == "Never"  # backoffLimitPerIndex needs it
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_config_and_secret_hold_every_key_the_pods_read() -> None:
    resources = manifests()
    config = resources["ConfigMap/logitcache-config"]["data"]
    secret = resources["Secret/logitcache-secrets"]["stringData"]
    for kind in ("Deployment/logitcache-server", "Deployment/logitcache-reader",
                 "Job/logitcache-precompute"):  # fmt: skip
        pod = resources[kind]["spec"]["template"]["spec"]
        for container in pod["containers"]:
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == "logitcache-secrets" and ref["key"] in secret, env
        for volume in pod.get("volumes", []):
            source = volume.get("secret") or volume.get("configMap") or {}
            keys = secret if "secret" in volume else config
            assert all(item["key"] in keys for item in source.get("items", [])), volume
    server = tomllib.loads(config["server.toml"])
    assert server["host"] == "0.0.0.0" and server["teachers"][0]["source"]
    assert config["LOGITCACHE_STORE"].startswith("s3://")
    assert secret["LOGITCACHE_STATE_URL"].startswith("postgresql://")


def test_the_compose_file_names_its_services_images_ports_and_settings() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"seaweedfs", "create-bucket", "postgres", "setup", "server", "trainer"}
    seaweedfs = services["seaweedfs"]
    assert seaweedfs["image"].startswith("chrislusf/seaweedfs:")
    assert seaweedfs["command"].startswith("server ") and " -s3 " in seaweedfs["command"]
    assert services["postgres"]["image"].startswith("postgres:")
    server = services["server"]
    assert (
        server["command"][0] == "serve" and server["build"]["dockerfile"] == "deploy/Dockerfile.cpu"
    )
    assert {"50051:50051", "8080:8080"} <= set(server["ports"])
    env = server["environment"]
    assert env["LOGITCACHE_HOST"] == "0.0.0.0"
    assert env["LOGITCACHE_STORE"].startswith("s3://")
    assert env["AWS_ENDPOINT_URL"] == "http://seaweedfs:8333"
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env)
    assert (
        env["LOGITCACHE_STATE_URL"].startswith("postgresql://")
        and "@postgres:" in env["LOGITCACHE_STATE_URL"]
    )
    trainer = services["trainer"]
    assert "grpc://server:50051" in trainer["command"][0]
    assert trainer["depends_on"]["server"]["condition"] == "service_healthy"
    assert "/readyz" in " ".join(server["healthcheck"]["test"])
    gpu = yaml.safe_load((DEPLOY / "compose.gpu.yaml").read_text())["services"]["server"]
    assert gpu["build"]["dockerfile"] == "deploy/Dockerfile.gpu"


def test_the_images_build_on_the_pinned_vllm_and_bind_every_interface() -> None:
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    (pin,) = extras["gpu"]
    version = pin.removeprefix("vllm==")
    gpu = (DEPLOY / "Dockerfile.gpu").read_text()
    assert re.search(rf"^FROM vllm/vllm-openai:v{re.escape(version)}$", gpu, re.M), pin
    cpu = (DEPLOY / "Dockerfile.cpu").read_text()
    assert re.search(r"^FROM python:3\.\d+-slim$", cpu, re.M)
    assert '".[cpu,' in cpu and '".[gpu,' in gpu
    for dockerfile in (gpu, cpu):
        assert "LOGITCACHE_HOST=0.0.0.0" in dockerfile
        assert 'ENTRYPOINT ["logitcache"]' in dockerfile
