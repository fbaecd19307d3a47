"""The Helm chart (helm/arbiter): lint, render, validate offline against Kubernetes schemas, and check
what was rendered: probes, hardening, secret references, the migration hook, optional objects."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from arbiter.settings import load_settings
from tests.deploy.conftest import ROOT, tool_missing

CHART = ROOT / "helm" / "arbiter"
PRODUCTION = CHART / "values-production.yaml"
# The newest Kubernetes whose schemas this kubernetes-validate ships (helm's client is v1.35).
K8S_VERSION = "1.35.0"
# Custom resources kubernetes-validate has no schema for; checked by hand below.
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
SECRET_ENV = {
    "ARBITER_DATABASE_URL": "database-url",
    "ARBITER_REDIS_URL": "redis-url",
    "ARBITER_AUDIT__SIGNING_KEY": "audit-signing-key",
    "ARBITER_AUDIT__HMAC_KEY": "audit-hmac-key",
    "ARBITER_SECRET_KEY": "secret-key",
    "ARBITER_ADMIN_TOKEN": "admin-token",
    "ARBITER_TELEMETRY__METRICS_TOKEN": "metrics-token",
}
# Given as chart values in some tests: none of these may reach a ConfigMap.
SECRET_VALUES = {
    "databaseUrl": "postgresql://arbiter:pg-password-1234@pg.internal:5432/arbiter",
    "redisUrl": "redis://:redis-password-5678@redis.internal:6379/0",
    "auditSigningKey": "c2lnbmluZy1rZXktc2lnbmluZy1rZXktc2lnbmluZy0x",
    "auditHmacKey": "hmac-key-0123456789abcdef",
    "secretKey": "q4NrCgqbPdc3Nd2Gu0mBhX1hV6WqK2wXNiYdVYZ5JqA=",
    "adminToken": "admin-token-abcdefghijklmnop",
    "metricsToken": "metrics-token-qrstuvwxyz0123",
}
SECRET_LOOKING = re.compile(r"://[^/\s:@]+:[^@\s]+@|password|BEGIN [A-Z ]*PRIVATE KEY", re.IGNORECASE)


def run_helm(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=60, check=False)


def render(helm: Path, *args: str) -> list[dict[str, Any]]:
    done = run_helm(helm, "template", "rel", str(CHART), "--namespace", "prod", *args)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def secret_sets() -> list[str]:
    return [f"secrets.{field}={value}" for field, value in SECRET_VALUES.items()]


def with_sets(*sets: str) -> list[str]:
    return [a for s in sets for a in ("--set-string", s)]


def one(docs: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"{kind}: {[d['metadata']['name'] for d in found]}"
    return found[0]


def kinds(docs: list[dict[str, Any]]) -> set[str]:
    return {d["kind"] for d in docs}


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


@pytest.fixture(scope="module")
def default_docs(helm: Path) -> list[dict[str, Any]]:
    return render(helm)


@pytest.fixture(scope="module")
def production_docs(helm: Path) -> list[dict[str, Any]]:
    return render(helm, "-f", str(PRODUCTION))


@pytest.fixture(scope="module")
def inline_docs(helm: Path) -> list[dict[str, Any]]:
    """External database and every key given as values: the chart makes the Secret."""
    return render(helm, *with_sets(*secret_sets()), "--set", "replicaCount=2")


@pytest.mark.parametrize("values", [None, PRODUCTION], ids=["default", "production"])
def test_helm_lint_passes(helm: Path, values: Path | None) -> None:
    done = run_helm(helm, "lint", "--strict", str(CHART), *(["-f", str(values)] if values else []))
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_rendered_manifest_is_valid_kubernetes(
    default_docs: list[dict[str, Any]],
    production_docs: list[dict[str, Any]],
    inline_docs: list[dict[str, Any]],
) -> None:
    try:
        import kubernetes_validate  # pyright: ignore[reportMissingTypeStubs]
    except ImportError:
        tool_missing("kubernetes-validate (the dev extra)")
    checked = 0
    for doc in [*default_docs, *production_docs, *inline_docs]:
        if (doc["apiVersion"], doc["kind"]) in CRDS:
            continue
        # strict: an unknown field (a typo in a template) is an error, not silently dropped by the API.
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        checked += 1
    assert checked >= 20


def test_a_value_the_schema_refuses_fails_the_render(helm: Path) -> None:
    done = run_helm(helm, "template", "rel", str(CHART), "--set", "replicaCount=abc")
    assert done.returncode != 0
    assert "replicaCount" in done.stderr
    # A secret setting put in the ConfigMap's settings is refused too.
    done = run_helm(helm, "template", "rel", str(CHART), "--set", "config.audit.signing_key=x")
    assert done.returncode != 0


def test_probes_and_hardening(production_docs: list[dict[str, Any]]) -> None:
    deployment = one(production_docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    c = container(production_docs)
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["resources"]["requests"] and c["resources"]["limits"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert pod["automountServiceAccountToken"] is False
    # What Arbiter writes has a volume under the read-only root: /tmp and the audit spool.
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    env = {e["name"]: e.get("value") for e in c["env"]}
    for path in ("/tmp", env["ARBITER_AUDIT__SPOOL_DIR"]):
        assert "emptyDir" in volumes[mounts[path]], path


def test_termination_grace_covers_drain_grace_and_audit_flush(helm: Path) -> None:
    docs = render(
        helm,
        *with_sets(*secret_sets()),
        # --set-json: --set would pass 7.5 as a string.
        "--set-json",
        "config.drain_delay_s=7.5,config.shutdown_grace_s=40,config.audit.drain_timeout_s=12",
    )
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    # ceil(7.5) + 40 + 12 + 5 s for the process to exit.
    assert pod["terminationGracePeriodSeconds"] == 8 + 40 + 12 + 5


def test_every_secret_reaches_the_pod_by_reference(production_docs: list[dict[str, Any]]) -> None:
    env = {e["name"]: e for e in container(production_docs)["env"]}
    for name, key in SECRET_ENV.items():
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == ("arbiter-secrets", key)
        assert "value" not in env[name]
    # The operator's Secret must hold the database URL; the rest are optional.
    assert env["ARBITER_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["optional"] is False
    assert env["ARBITER_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True


def test_existing_secret_is_used_and_no_secret_rendered(production_docs: list[dict[str, Any]]) -> None:
    assert "Secret" not in kinds(production_docs)
    job = one(production_docs, "Job")
    ref = job["spec"]["template"]["spec"]["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "arbiter-secrets", "key": "database-url"}


def test_chart_made_secret_holds_the_values_and_the_pod_refers_to_it(
    inline_docs: list[dict[str, Any]],
) -> None:
    import base64

    secret = one(inline_docs, "Secret", "rel-arbiter")
    stored = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    keys = dict(zip(SECRET_VALUES, SECRET_ENV.values(), strict=True))
    assert stored == {keys[field]: value for field, value in SECRET_VALUES.items()}
    env = {e["name"]: e for e in container(inline_docs)["env"]}
    for name, key in SECRET_ENV.items():
        assert env[name]["valueFrom"]["secretKeyRef"] == {
            "name": "rel-arbiter",
            "key": key,
            "optional": False,
        }


@pytest.mark.parametrize("which", ["default_docs", "production_docs", "inline_docs"])
def test_no_secret_in_any_configmap(which: str, request: pytest.FixtureRequest) -> None:
    docs: list[dict[str, Any]] = request.getfixturevalue(which)
    maps = [d for d in docs if d["kind"] == "ConfigMap"]
    assert maps
    for cm in maps:
        text = json.dumps(cm)
        for value in SECRET_VALUES.values():
            assert value not in text
        assert not SECRET_LOOKING.search(text), SECRET_LOOKING.search(text)
        config = yaml.safe_load(cm["data"]["config.yaml"])
        assert not {"database_url", "redis_url", "admin_token", "secret_key"} & set(config)


def test_configmap_settings_are_a_valid_arbiter_config(
    production_docs: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pod's environment plus the ConfigMap's file load as Arbiter's settings, as they will in the pod."""
    cm = one(production_docs, "ConfigMap")
    (tmp_path / "config.yaml").write_text(cm["data"]["config.yaml"], encoding="utf-8")
    for e in container(production_docs)["env"]:
        if "value" in e:
            monkeypatch.setenv(e["name"], e["value"])
    monkeypatch.setenv("ARBITER_CONFIG_FILE", str(tmp_path / "config.yaml"))
    settings = load_settings()
    assert settings.host == "0.0.0.0"
    assert settings.telemetry.traces == "otlp" and settings.telemetry.otlp_endpoint
    assert "arbiter.example.com" in settings.mcp.allowed_hosts
    assert "rel-arbiter.prod.svc:*" in settings.mcp.allowed_hosts
    assert str(settings.audit.spool_dir) == "/var/lib/arbiter/audit-spool"
    # The Casbin model beside it is the one the code enforces.
    packaged = (ROOT / "src" / "arbiter" / "policies" / "model.conf").read_text(encoding="utf-8")
    assert cm["data"]["model.conf"].strip() == packaged.strip()


def test_migration_job_is_a_pre_install_and_pre_upgrade_hook(production_docs: list[dict[str, Any]]) -> None:
    job = one(production_docs, "Job")
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert "helm.sh/hook-weight" in annotations
    assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"]
    spec = job["spec"]["template"]["spec"]
    assert spec["containers"][0]["args"] == ["migrate"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    # Not selected by the Service or counted by the PodDisruptionBudget.
    selector = one(production_docs, "Service")["spec"]["selector"]
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert not selector.items() <= labels.items()


def test_inline_database_url_reaches_the_hook_through_a_hook_secret(
    inline_docs: list[dict[str, Any]],
) -> None:
    hook_secret = one(inline_docs, "Secret", "-migrate")
    # Made before the Job (hooks run before the release's own Secret exists).
    assert hook_secret["metadata"]["annotations"]["helm.sh/hook-weight"] == "-10"
    job = one(inline_docs, "Job")
    ref = job["spec"]["template"]["spec"]["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == hook_secret["metadata"]["name"]


def test_default_values_run_one_self_migrating_sqlite_pod(
    default_docs: list[dict[str, Any]], helm: Path
) -> None:
    assert "Job" not in kinds(default_docs)
    pod = one(default_docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["initContainers"][0]["args"] == ["migrate"]
    assert "ARBITER_DATABASE_URL" not in {e["name"] for e in container(default_docs)["env"]}
    # Replicas on SQLite would each have a database of their own: refused.
    done = run_helm(helm, "template", "rel", str(CHART), "--set", "replicaCount=3")
    assert done.returncode != 0 and "external PostgreSQL" in done.stderr


def test_optional_objects_render_only_when_enabled(
    default_docs: list[dict[str, Any]], production_docs: list[dict[str, Any]]
) -> None:
    optional = {"ServiceMonitor", "Ingress", "NetworkPolicy", "HorizontalPodAutoscaler"}
    assert not optional & kinds(default_docs)
    assert optional <= kinds(production_docs)
    monitor = one(production_docs, "ServiceMonitor")["spec"]["endpoints"][0]
    assert monitor["path"] == "/metrics"
    assert monitor["authorization"]["credentials"] == {"name": "arbiter-secrets", "key": "metrics-token"}
    assert "replicas" not in one(production_docs, "Deployment")["spec"]  # the HPA's to set
    assert one(production_docs, "HorizontalPodAutoscaler")["spec"]["minReplicas"] == 3
    assert one(production_docs, "Ingress")["spec"]["tls"]


def test_service_monitor_without_a_metrics_token_is_refused(helm: Path) -> None:
    done = run_helm(
        helm,
        "template",
        "rel",
        str(CHART),
        *with_sets(f"secrets.databaseUrl={SECRET_VALUES['databaseUrl']}"),
        "--set",
        "serviceMonitor.enabled=true",
    )
    assert done.returncode != 0 and "metrics token" in done.stderr


def test_session_affinity_for_handshake_era_clients(
    default_docs: list[dict[str, Any]], production_docs: list[dict[str, Any]], helm: Path
) -> None:
    assert one(default_docs, "Service")["spec"]["sessionAffinity"] == "None"
    service = one(production_docs, "Service")["spec"]
    assert service["sessionAffinity"] == "ClientIP"
    assert service["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"] > 0
    docs = render(helm, "--set", "config.mcp.stateless_legacy=true")
    config = yaml.safe_load(one(docs, "ConfigMap")["data"]["config.yaml"])
    assert config["mcp"]["stateless_legacy"] is True


def test_readme_lists_every_value() -> None:
    readme = (CHART / "README.md").read_text(encoding="utf-8")
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))

    def leaves(node: Any, prefix: str) -> list[str]:
        if isinstance(node, dict) and node:
            return [p for k, v in node.items() for p in leaves(v, f"{prefix}.{k}" if prefix else str(k))]
        return [prefix]

    missing = [key for key in leaves(values, "") if f"`{key}`" not in readme]
    assert not missing, f"helm/arbiter/README.md does not list: {missing}"


def test_spool_can_be_a_shared_claim(helm: Path) -> None:
    docs = render(helm, *with_sets(*secret_sets(), "volumes.spoolClaimName=arbiter-spool"))
    volumes = {v["name"]: v for v in one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["spool"]["persistentVolumeClaim"] == {"claimName": "arbiter-spool"}
