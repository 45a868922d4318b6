"""The deployment files: Kubernetes manifests validated offline against the Kubernetes schemas, the compose
file and the Dockerfile checked for what the README promises, and `docker compose config` where it exists.
(Building and running the image is `deploy/smoke.sh`: it needs a Docker engine.)"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.conftest import ROOT

K8S = ROOT / "deploy" / "k8s"
K8S_VERSION = "1.30.0"
COMPOSE = ROOT / "docker-compose.yml"
DRAIN_SECONDS = 10

# NOTE: a CRD of the Prometheus Operator, so not in the Kubernetes schemas: the fields we use, checked here
SERVICE_MONITOR = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {"type": "object", "required": ["matchLabels"]},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["port"],
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string", "pattern": "^[0-9]+[smh]$"},
                        },
                    },
                },
            },
        },
    },
}


def documents() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        out += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return out


def by_kind(kind: str) -> dict[str, Any]:
    found = [doc for _, doc in documents() if doc["kind"] == kind]
    assert len(found) >= 1, kind
    return found[0]


@pytest.mark.parametrize(("name", "doc"), documents(), ids=lambda v: v if isinstance(v, str) else v.get("kind"))
def test_every_manifest_is_valid_against_the_kubernetes_schemas(name: str, doc: dict[str, Any]) -> None:
    """Each document validates (strict: no unknown fields) against Kubernetes 1.30's schemas; the
    ServiceMonitor CRD against the fields of it that we use."""
    if doc["kind"] == "ServiceMonitor":
        jsonschema.validate(doc, SERVICE_MONITOR)
        return
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kust["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_the_deployment_is_non_root_probed_on_both_transports_and_outlives_its_drain() -> None:
    """Probes use /readyz over HTTP and the gRPC health service; the pod runs as a non-root user with a
    read-only root file system; the grace period is above the drain time set in the ConfigMap."""
    dep = by_kind("Deployment")["spec"]["template"]["spec"]
    config = by_kind("ConfigMap")["data"]
    drain = float(config["LSTM_SERVE_DRAIN_SECONDS"])
    assert dep["terminationGracePeriodSeconds"] > drain
    assert dep["securityContext"]["runAsNonRoot"] is True
    assert dep["securityContext"]["runAsUser"] == 10001
    (container,) = dep["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["grpc"]["port"] == 50051
    assert config["LSTM_SERVE_STATE_STORE"].startswith("redis://")  # replicas share sessions
    assert (
        by_kind("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]["name"]
        == by_kind("Deployment")["metadata"]["name"]
    )
    assert by_kind("PodDisruptionBudget")["spec"]["minAvailable"] >= 1


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def test_compose_services_are_healthchecked_ordered_by_health_and_published_on_loopback() -> None:
    """Every long-running service has a healthcheck; depends_on waits for health; every published port is
    bound to 127.0.0.1; Redis data and the models are named volumes."""
    c = compose()
    services = c["services"]
    assert {"lstm", "lb", "redis", "prometheus", "grafana", "trainer"} <= set(services)
    for name, svc in services.items():
        if svc.get("profiles"):
            continue  # NOTE: the trainer is a one-off job (`run --rm`), not a service to health-check
        assert "healthcheck" in svc, name
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert cond == {"condition": "service_healthy"}, (name, dep)
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
    assert {"models", "redis-data"} <= set(c["volumes"])
    assert "redis-data:/data" in services["redis"]["volumes"]
    assert any(v.startswith("models:") for v in services["lstm"]["volumes"])
    assert services["trainer"]["build"]["target"] == "train"


def test_the_compose_service_is_read_only_without_capabilities_and_stops_after_its_drain() -> None:
    lstm = compose()["services"]["lstm"]
    assert lstm["read_only"] is True
    assert lstm["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in lstm["security_opt"]
    grace = int(re.fullmatch(r"(\d+)s", lstm["stop_grace_period"]).group(1))  # type: ignore[union-attr]
    assert grace > float(lstm["environment"]["LSTM_SERVE_DRAIN_SECONDS"])
    assert lstm["environment"]["LSTM_SERVE_STATE_STORE"] == "redis://redis:6379/0"


def test_the_dockerfile_builds_a_non_root_serving_image_without_torch_and_a_train_target() -> None:
    """Multi-stage, dependencies before the source, a fixed non-root UID, a HEALTHCHECK on readiness, the
    shipped model inside, torch only in the train target; .dockerignore keeps .venv and caches out."""
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM \S+ AS (\w+)$", text, re.M)
    assert stages == ["deps", "build", "train", "serve"]  # NOTE: serve last: the default target
    serve = text.split(" AS serve")[1]
    assert "USER 10001:10001" in serve
    assert "HEALTHCHECK" in serve
    assert "service.probe" in serve
    assert "COPY models /app/models" in serve
    assert "LSTM_SERVE_HOST=0.0.0.0" in serve
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "torch" not in code.split(" AS train")[0] + code.split(" AS serve")[1]
    deps = text.split(" AS deps")[1].split(" AS build")[0]
    assert "COPY pyproject.toml" in deps
    assert "COPY service" not in deps
    assert "torch==2.13.0" in text.split(" AS train")[1].split(" AS serve")[0]
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "**/__pycache__", "tests"} <= set(ignored)


def test_every_dashboard_panel_has_a_query_over_our_metrics() -> None:
    """Each panel of the provisioned dashboard queries lstm_* metrics (deploy/smoke.sh runs every query
    against a real Prometheus that scraped a real server and fails on an empty result)."""
    dash = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "lstm-serve.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(dash["panels"]) >= 10
    assert all("lstm_" in e for e in exprs)
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    for topic in ("steps", "latency", "queue wait", "batch size", "open sessions", "removed", "errors", "inference",
                  "live mae", "persistence"):  # fmt: skip
        assert topic in titles, topic


def compose_command() -> list[str] | None:
    """docker-compose 1.x, or the `docker compose` plugin, whichever this machine has."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        done = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30, check=False)
        if done.returncode == 0:
            return ["docker", "compose"]
    return None


@pytest.mark.skipif(compose_command() is None, reason="no docker compose on this machine (the issue: where it exists)")
def test_docker_compose_accepts_the_compose_file() -> None:
    """`docker compose config` parses and resolves the file, with and without the train profile."""
    cmd = compose_command()
    assert cmd is not None
    for extra in ([], ["--profile", "train"]):
        done = subprocess.run([*cmd, *extra, "config", "-q"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                              check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr


def test_the_probe_module_exits_1_when_nothing_is_ready() -> None:
    """The image's HEALTHCHECK command fails (exit 1) when no server answers on the port."""
    env = {"LSTM_SERVE_HTTP_PORT": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "service.probe"], cwd=ROOT, env=env, capture_output=True,
                          timeout=30, check=False)  # fmt: skip
    assert done.returncode == 1
