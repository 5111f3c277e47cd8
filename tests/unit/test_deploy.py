"""Deployment files: Kubernetes schemas, compose structure, and real setting names."""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel

from streams.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.31.0"
BUILTIN = {"ConfigMap", "Secret", "Deployment", "PodDisruptionBudget", "Service"}


def _docs() -> list[dict]:
    out = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        out.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return out


def _is_setting(name: str) -> bool:
    parts = name.removeprefix("PINFRESH_").lower().split("__")
    model: type[BaseModel] = Settings
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return False
        ann = field.annotation
        if i < len(parts) - 1:
            if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
                return False
            model = ann
    return True


def _env_names() -> set[str]:
    names: set[str] = set()
    for path in DEPLOY.rglob("*"):
        if path.is_file() and path.suffix in {".yaml", ".yml", ""} | {".cuda"}:
            names |= set(re.findall(r"\b(PINFRESH_[A-Z0-9_]+)\b", path.read_text()))
    return names


@pytest.mark.parametrize("doc", [d for d in _docs() if d["kind"] in BUILTIN],
                         ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_manifests_match_kubernetes_schemas(doc):
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_every_environment_variable_is_a_real_setting():
    names = _env_names()
    assert len(names) > 15
    unknown = sorted(n for n in names if not _is_setting(n))
    assert unknown == []
    assert not _is_setting("PINFRESH_KAFKA__NOPE") and not _is_setting("PINFRESH_NOPE")


def test_scaling_and_drain_are_consistent():
    docs = {(d["kind"], d["metadata"]["name"]): d for d in _docs()}
    cfg = docs[("ConfigMap", "pinfresh-config")]["data"]
    scaled = docs[("ScaledObject", "pinfresh-worker")]["spec"]
    trigger = scaled["triggers"][0]["metadata"]
    pod = docs[("Deployment", "pinfresh-worker")]["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    feeders = int(args[args.index("--feeders") + 1])
    # every feeder is a consumer of the topic: the largest fleet still gets a partition each
    assert scaled["maxReplicaCount"] * feeders <= int(cfg["PINFRESH_KAFKA__PARTITIONS"])
    assert (scaled["maxReplicaCount"] + 1) * feeders > int(cfg["PINFRESH_KAFKA__PARTITIONS"])
    assert trigger["consumerGroup"] == cfg["PINFRESH_KAFKA__GROUP_ID"]
    assert trigger["topic"] == cfg["PINFRESH_KAFKA__TOPIC"]
    assert pod["terminationGracePeriodSeconds"] > float(cfg["PINFRESH_WORKER__DRAIN_TIMEOUT_S"])
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    secret_keys = set(docs[("Secret", "pinfresh-secrets")]["stringData"])
    assert secret_keys.isdisjoint(cfg), "secrets never in the ConfigMap"


def test_api_probes_use_the_real_routes():
    from store.api import create_app
    from store.config import ApiSettings, MilvusSettings, RedisSettings

    docs = {(d["kind"], d["metadata"]["name"]): d for d in _docs()}
    c = docs[("Deployment", "pinfresh-api")]["spec"]["template"]["spec"]["containers"][0]
    routes = {r.path for r in create_app(ApiSettings(), RedisSettings(), MilvusSettings()).routes}
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz" in routes
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz" in routes
    assert c["args"] == ["serve"]


def test_compose_stack_structure():
    compose = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"kafka", "etcd", "minio", "milvus", "redis", "worker", "api"} <= set(services)
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    env = services["worker"]["environment"]
    assert env["PINFRESH_KAFKA__BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert env["PINFRESH_MILVUS__URI"].endswith("milvus:19530")
    grace = int(services["worker"]["stop_grace_period"].rstrip("s"))
    assert grace > float(env["PINFRESH_WORKER__DRAIN_TIMEOUT_S"])


def _declared_metrics() -> set[str]:
    names = set()
    for src in ("streams/metrics.py", "store/api.py"):
        text = (ROOT / src).read_text()
        names |= set(re.findall(r'(?:Counter|Gauge|Histogram)\(\s*"(pinfresh_\w+)"', text))
    return names


def test_dashboard_and_alerts_name_only_metrics_that_exist():
    """A renamed metric would leave a panel empty and an alert silent."""
    import json

    declared = _declared_metrics()
    assert {"pinfresh_consumer_lag", "pinfresh_partition_stalled_seconds",
            "pinfresh_freshness_seconds", "pinfresh_dead_letters_total",
            "pinfresh_retries_total"} <= declared
    dash = json.loads((ROOT / "deploy/monitoring/grafana-dashboard.json").read_text())
    rules = yaml.safe_load((ROOT / "deploy/monitoring/alerts.yml").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    alerts = [r for g in rules["groups"] for r in g["rules"]]
    assert all({"alert", "expr", "for"} <= set(r) and r["labels"]["severity"]
               and r["annotations"]["summary"] for r in alerts)
    used = {re.sub(r"_(bucket|sum|count)$", "", m)
            for e in exprs + [r["expr"] for r in alerts] for m in re.findall(r"pinfresh_\w+", e)}
    assert used - declared == set()
    # the alerts the operator needs: lag, stalled partitions, freshness, dead letters, errors
    alerted = " ".join(r["expr"] for r in alerts)
    for name in ("pinfresh_consumer_lag", "pinfresh_partition_stalled_seconds",
                 "pinfresh_freshness_seconds_bucket", "pinfresh_dead_letters_total",
                 "pinfresh_retries_total"):
        assert name in alerted
