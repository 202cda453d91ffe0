"""Offline checks of cluster/ that need neither Ray nor Helm: the files are read as YAML,
JSON or, for the chart's templates, as text (tests/test_cluster_manifests.py renders and
validates them, starting Ray to build the Serve applications)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agentauth.metrics import _SPECS
from agentauth.verifier import VerifierSettings

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
CHART = CLUSTER / "helm" / "agentauth"
TEMPLATES = CHART / "templates"


def _dashboard_exprs() -> Iterator[str]:
    dashboard = json.loads((CLUSTER / "grafana" / "agentauth-dashboard.json").read_text())
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                yield target["expr"]


def test_dashboard_graphs_every_metric_the_code_exports() -> None:
    # As Ray's metrics agent exports them: `ray_` added, histograms queried by `_bucket`.
    exported = {
        "ray_" + full + ("_bucket" if kind == "histogram" else "")
        for kind, full, _ in _SPECS.values()
    }
    queried = {m for expr in _dashboard_exprs() for m in re.findall(r"\bray_agentauth_\w+", expr)}
    assert queried <= exported, f"queried but never exported: {queried - exported}"
    assert exported <= queried, f"exported but on no panel: {exported - queried}"


def _plain_pods() -> Iterator[tuple[str, dict[str, Any]]]:
    docs = yaml.safe_load_all((CLUSTER / "kuberay" / "rayservice.yaml").read_text())
    rs = next(d for d in docs if d and d["kind"] == "RayService")
    cluster = rs["spec"]["rayClusterConfig"]
    yield "head", cluster["headGroupSpec"]["template"]["spec"]
    for worker in cluster["workerGroupSpecs"]:
        yield worker["groupName"], worker["template"]["spec"]


def test_plain_rayservice_runs_as_non_root_without_capabilities() -> None:
    for group, pod in _plain_pods():
        context = pod.get("securityContext", {})
        # Ray's image names its user; only a numeric id lets the kubelet enforce this.
        assert context.get("runAsNonRoot") is True, group
        assert isinstance(context.get("runAsUser"), int) and context["runAsUser"] > 0, group
        assert context.get("seccompProfile") == {"type": "RuntimeDefault"}, group
        for container in pod["containers"]:
            own = container.get("securityContext", {})
            assert own.get("allowPrivilegeEscalation") is False, group
            assert own.get("capabilities", {}).get("drop") == ["ALL"], group


def test_chart_runs_as_non_root_and_the_page_on_a_read_only_root() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    context = values["podSecurityContext"]  # every pod of the chart (agentauth.podSettings)
    assert context.get("runAsNonRoot") is True
    assert isinstance(context.get("runAsUser"), int) and context["runAsUser"] > 0
    assert context.get("seccompProfile") == {"type": "RuntimeDefault"}
    assert "podSecurityContext" in (TEMPLATES / "_helpers.tpl").read_text()
    for name in ("rayservice.yaml", "ui-deployment.yaml"):
        text = (TEMPLATES / name).read_text()
        contexts = text.count("securityContext:")
        assert contexts == text.count("capabilities: {drop: [ALL]}"), name
        assert contexts == text.count("allowPrivilegeEscalation: false"), name
    page = yaml.safe_load(
        # The Deployment's body, its template actions taken out, is plain YAML.
        re.sub(r"^.*\{\{.*\}\}.*$", "", (TEMPLATES / "ui-deployment.yaml").read_text(), flags=re.M)
    )
    pod = page["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]], "the page needs a writable /tmp"


NONCE_SECRET = "n" * 32


@pytest.fixture
def verifier_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://agentauth@db.example:5432/agentauth")
    monkeypatch.setenv("REDIS_URL", "redis://redis.example:6379/0")
    monkeypatch.setenv("AGENTAUTH_ISSUER", "https://auth.example.com/registry")


@pytest.mark.usefixtures("verifier_env")
def test_verifier_settings_take_the_nonce_secret_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Serve args (a RayService's spec, serve.yaml) turn nonces on; the secret stays in a
    # Kubernetes Secret and reaches the replicas through their environment.
    monkeypatch.setenv("AGENTAUTH_VERIFIER_NONCE_SECRET", NONCE_SECRET)
    settings = VerifierSettings.from_env(shards=4, dpop_nonces=True)
    assert settings.nonce_secret == NONCE_SECRET
    assert settings.issuer == "https://auth.example.com/registry"
    assert settings.shards == 4
    assert NONCE_SECRET not in repr(settings)
    # What the application's args say still wins.
    assert VerifierSettings.from_env(shards=2).shards == 2


@pytest.mark.usefixtures("verifier_env")
def test_verifier_settings_without_a_nonce_secret_refuse_nonces(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("AGENTAUTH_VERIFIER_NONCE_SECRET", raising=False)
    with pytest.raises(ValueError, match="nonce_secret"):
        VerifierSettings.from_env(dpop_nonces=True)
    assert VerifierSettings.from_env().dpop_nonces is False


def test_chart_passes_the_nonce_secret_from_a_secret_only() -> None:
    helpers = (TEMPLATES / "_helpers.tpl").read_text()
    env = re.search(
        r"- name: AGENTAUTH_VERIFIER_NONCE_SECRET\n\s+valueFrom:\n\s+secretKeyRef: \{name: "
        r"\{\{ \.Values\.verifier\.nonceSecret\.name",
        helpers,
    )
    assert env, "the nonce secret does not come from verifier.nonceSecret"
    serve_config = helpers[helpers.index('define "agentauth.serveConfig"') :]
    serve_config = serve_config[: serve_config.index("{{- end -}}\n\n")]
    assert '"dpop_nonces" true' in serve_config
    assert "nonce_secret" not in serve_config and "nonceSecret" not in serve_config
    assert "verifier.dpopNonces needs verifier.nonceSecret.name" in helpers


def test_chart_sets_the_registrys_client_address_and_signup_settings() -> None:
    # Behind an ingress and Serve's HAProxy, the registry tells clients apart only through
    # AGENTAUTH_TRUSTED_PROXIES; without it they all share one limit on anonymous starts.
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["trustedProxies"] == [] and values["openSignup"] is True
    configmap = (TEMPLATES / "configmap.yaml").read_text()
    assert (
        '{{- with .Values.trustedProxies }}\n  AGENTAUTH_TRUSTED_PROXIES: {{ join "," . | quote }}'
        in configmap
    )
    assert re.search(r"^  AGENTAUTH_OPEN_SIGNUP: .*\.Values\.openSignup", configmap, re.M)
