"""Offline checks of the deployment files in cluster/ (no cluster, no network).

What is checked, and against what:

- ``cluster/kuberay/rayservice.yaml`` and every RayService the Helm chart renders: KubeRay's
  v1.7.0 CRD schema (vendored in cluster/schemas/, unknown fields refused as the API
  server's strict field validation would), a hand-mirrored subset of KubeRay's own spec
  validation (``validation.go``), the pod templates and the other objects against
  Kubernetes' schemas (``kubernetes-validate``, strict), and the embedded Serve config
  against Ray's ``ServeDeploySchema`` with no unknown keys, its import paths imported and
  its builders called on its args with the manifests' environment.
- The Helm chart: linted and rendered by Helm's own engine (the Helm v4 Go SDK, through
  the ``helm-python-sdk`` wheel), for default values and for each signer backend; values
  that cannot work are refused at render time; every ``.Values`` path a template uses
  exists in values.yaml; the approval page's command line parses with the page's own
  argument parser and yields the settings the chart means.
- ``cluster/grafana/agentauth-dashboard.json``: valid JSON, a Prometheus datasource
  variable on every panel, and every query parses as PromQL (``promql-parser``) and names
  only the metrics in ``DASHBOARD_METRICS``.

Not checked: anything a live API server, the KubeRay operator, Ray on Kubernetes, an
Ingress controller, Prometheus or Grafana would do with these files.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
CHART = CLUSTER / "helm" / "agentauth"
RAYSERVICE = CLUSTER / "kuberay" / "rayservice.yaml"
DASHBOARD = CLUSTER / "grafana" / "agentauth-dashboard.json"
KUBERAY_SCHEMA = CLUSTER / "schemas" / "kuberay-rayservice-v1.json"

# The Prometheus series the Grafana dashboard may query: agentauth/metrics.py's metrics as
# Ray's metrics agent exports them (Ray adds `ray_`; the histogram is queried through its
# `_bucket` series). Keep in sync with agentauth/metrics.py (checked below while that
# module keeps its `_SPECS` table).
DASHBOARD_METRICS = frozenset(
    {
        "ray_agentauth_decisions_total",
        "ray_agentauth_verify_latency_seconds_bucket",
        "ray_agentauth_grant_lookup_seconds_bucket",
        "ray_agentauth_shard_queue_seconds_bucket",
        "ray_agentauth_shard_call_seconds_bucket",
        "ray_agentauth_audit_commit_seconds_bucket",
        "ray_agentauth_cache_hits_total",
        "ray_agentauth_cache_misses_total",
        "ray_agentauth_shard_queue_depth",
        "ray_agentauth_shard_overruns_total",
        "ray_agentauth_audit_lag_seconds",
        "ray_agentauth_tokens_issued_total",
        "ray_agentauth_fail_closed_total",
        "ray_agentauth_anonymous_refused_total",
        "ray_agentauth_anonymous_fallback_total",
        "ray_agentauth_step_up_waits_refused_total",
    }
)
# Labels the queries may group or filter by: the metrics' own tags, and the histogram's.
DASHBOARD_LABELS = frozenset(
    {"decision", "reason", "cache", "dependency", "shard", "acknowledged", "bound", "le"}
)

# The oldest Kubernetes the chart declares (Chart.yaml kubeVersion) and the newest schema
# kubernetes-validate ships; objects must be valid for both.
KUBE_VERSIONS = ("1.27.0", "latest")

# Pip packages these checks need beyond the project's [server,dev] extras. Locally a
# missing one skips its checks; under CI (CI=true) it fails them, so nothing is skipped
# silently there.
EXTRA_PACKAGES = {
    "helm_python": "helm-python-sdk",
    "kubernetes_validate": "kubernetes-validate",
    "promql_parser": "promql-parser",
}


def _need(module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        package = EXTRA_PACKAGES[module]
        message = f"needs the `{package}` package: pip install {package}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


# --- Helm: rendered in a child process (Helm's Go runtime stays out of pytest's) ---------

# name -> values. Each renders; RENDER_REFUSALS below must not.
RENDER_CASES: dict[str, dict[str, Any]] = {
    "default": {},
    "aws": {
        "signer": {
            "backend": "aws",
            "aws": {"keyId": "alias/agentauth", "credentialsSecret": "agentauth-aws"},
        },
        "verifier": {"autoscaling": {"enabled": False}, "replicas": 3},
        "registry": {"rayActorOptions": {"num_cpus": 0.5}},
        "ray": {"autoscaler": True, "extraEnv": [{"name": "TZ", "value": "UTC"}]},
        "ingress": {"enabled": True, "className": "nginx", "tls": {"enabled": True}},
        "metrics": {"podMonitor": {"enabled": True}},
        "imagePullSecrets": [{"name": "registry-login"}],
        "trustedProxies": ["10.244.0.0/16", "fd00:10:244::/56"],
        "openSignup": False,
    },
    "gcp": {
        "fullnameOverride": "auth",
        "issuer": "https://id.corp.example/registry",
        "rpId": "corp.example",
        "ui": {"enabled": False, "origin": "https://approve.corp.example"},
        "signer": {
            "backend": "gcp",
            "gcp": {
                "keyId": "projects/p/locations/l/keyRings/r/cryptoKeys/k/cryptoKeyVersions/1",
                "credentialsSecret": "agentauth-gcp",
            },
        },
        "ingress": {"enabled": True, "exposeVerifier": False},
        "serve": {"haProxy": False},
    },
    "vault": {
        "signer": {
            "backend": "vault",
            "vault": {
                "keyId": "agentauth",
                "endpoint": "https://vault.agentauth.svc:8200",
                "tokenSecret": {"name": "agentauth-vault", "key": "token"},
            },
        },
        "verifier": {"dpopNonces": True, "nonceSecret": {"name": "agentauth-nonce"}},
    },
    "vault-token-file": {
        "signer": {
            "backend": "vault",
            "vault": {
                "keyId": "agentauth",
                "endpoint": "https://vault.agentauth.svc:8200",
                "tokenFile": "/vault/secrets/token",
            },
        },
        "ray": {
            "podAnnotations": {
                "vault.hashicorp.com/agent-inject": "true",
                "vault.hashicorp.com/agent-inject-token": "true",
                "vault.hashicorp.com/role": "agentauth",
            }
        },
    },
    "pkcs11": {
        "signer": {
            "backend": "pkcs11",
            "pkcs11": {
                "keyId": "agentauth-signing",
                "token": "agentauth",
                "pinSecret": {"name": "agentauth-hsm", "key": "pin"},
            },
        },
    },
}

# name -> (values, words the refusal must contain)
RENDER_REFUSALS: dict[str, tuple[dict[str, Any], str]] = {
    "vault-without-token": (
        {"signer": {"backend": "vault", "vault": {"keyId": "k", "endpoint": "https://v"}}},
        "signer.vault.tokenSecret.name",
    ),
    "vault-with-token-secret-and-file": (
        {
            "signer": {
                "backend": "vault",
                "vault": {
                    "keyId": "k",
                    "endpoint": "https://v",
                    "tokenSecret": {"name": "agentauth-vault"},
                    "tokenFile": "/vault/secrets/token",
                },
            }
        },
        "set one of them",
    ),
    "vault-relative-token-file": (
        {"signer": {"vault": {"tokenFile": "vault/token"}}},
        "/signer/vault/tokenFile",
    ),
    "pkcs11-without-pin": (
        {"signer": {"backend": "pkcs11", "pkcs11": {"keyId": "k", "token": "t"}}},
        "signer.pkcs11.pinSecret.name",
    ),
    "local-without-volume": ({"signer": {"local": {"existingClaim": ""}}}, "ReadWriteMany"),
    "aws-without-key": ({"signer": {"backend": "aws"}}, "signer.aws.keyId"),
    "nonces-without-secret": ({"verifier": {"dpopNonces": True}}, "verifier.nonceSecret.name"),
    "rp-id-elsewhere": ({"rpId": "other.example"}, "parent domain"),
    "issuer-not-registry": ({"issuer": "https://auth.example.com/"}, "/registry"),
    "unknown-backend": ({"signer": {"backend": "azure"}}, "/signer/backend"),
    "misspelt-value": ({"verifier": {"autoscalling": {}}}, "autoscalling"),
    "min-over-max": ({"verifier": {"autoscaling": {"minReplicas": 9}}}, "minReplicas"),
}

_HELM_SCRIPT = """
import json, sys
import helm_python as helm
job = json.load(sys.stdin)
out = {"lint": helm.lint(job["chart"], strict=True), "renders": {}}
with helm.Chart.load(job["chart"]) as chart:
    out["chart"] = {"name": chart.name, "version": chart.version}
    for name, values in job["cases"].items():
        try:
            out["renders"][name] = {"ok": chart.render(
                values, name="agentauth", namespace="auth", is_install=True)}
        except helm.HelmError as exc:
            out["renders"][name] = {"error": str(exc)}
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="module")
def helm() -> dict[str, Any]:
    _need("helm_python")
    cases = dict(RENDER_CASES)
    cases.update({name: values for name, (values, _) in RENDER_REFUSALS.items()})
    job = json.dumps({"chart": str(CHART), "cases": cases})
    done = subprocess.run(
        [sys.executable, "-c", _HELM_SCRIPT],
        input=job,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _rendered(helm: dict[str, Any], case: str) -> list[dict[str, Any]]:
    render = helm["renders"][case]
    assert "ok" in render, f"{case}: {render.get('error')}"
    docs: list[dict[str, Any]] = []
    for path, text in sorted(render["ok"].items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


# --- Kubernetes and KubeRay schemas -------------------------------------------------------


def _strict(schema: Any) -> Any:
    """Refuse unknown fields wherever the schema lists its fields, like the API server's
    strict field validation (a CRD schema alone would silently prune them)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def rayservice_schema() -> jsonschema.Draft7Validator:
    schema = _strict(json.loads(KUBERAY_SCHEMA.read_text()))
    return jsonschema.Draft7Validator(schema)


def _validate_k8s(obj: dict[str, Any]) -> None:
    kv = _need("kubernetes_validate")
    for version in KUBE_VERSIONS:
        wanted = str(kv.latest_version()) if version == "latest" else version
        try:
            kv.validate(obj, wanted, strict=True)
        except kv.ValidationError as exc:  # the message names the field
            pytest.fail(f"{obj['kind']} {obj['metadata'].get('name')} (k8s {wanted}): {exc}")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def _check_kuberay_rules(rs: dict[str, Any]) -> None:
    """A subset of KubeRay v1.7.0's ValidateRayServiceMetadata/Spec, mirrored by hand."""
    name = rs["metadata"]["name"]
    assert len(name) <= 47, "KubeRay: RayService name over 47 characters"
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), "KubeRay: not a DNS-1035 label"
    spec = rs["spec"]
    assert spec.get("upgradeStrategy", {}).get("type", "NewCluster") in {
        "NewCluster",
        "None",
    }, "only NewCluster or None (incremental upgrades need a Gateway and the autoscaler)"
    cluster = spec["rayClusterConfig"]
    autoscaling = cluster.get("enableInTreeAutoscaling", False)
    groups = [("head", cluster["headGroupSpec"])] + [
        (w["groupName"], w) for w in cluster["workerGroupSpecs"]
    ]
    for group, gspec in groups:
        assert gspec["template"]["spec"]["containers"], f"{group}: no container"
        params = gspec.get("rayStartParams", {})
        assert "labels" not in params, f"{group}: rayStartParams['labels'] is refused"
        if gspec.get("resources"):
            clash = {"num-cpus", "num-gpus", "memory", "resources"} & set(params)
            assert not clash, f"{group}: resources both in rayStartParams and resources"
    for worker in cluster["workerGroupSpecs"]:
        if not autoscaling:
            assert "minReplicas" in worker and "maxReplicas" in worker
        low, high = worker.get("minReplicas", 0), worker.get("maxReplicas", 2**31)
        assert 0 <= low <= worker.get("replicas", low) <= high
    assert not cluster["headGroupSpec"].get("headService", {}).get("metadata", {}).get("name")
    if cluster.get("authOptions", {}).get("mode", "token") == "token":
        assert _version(cluster["rayVersion"]) >= (2, 52, 0), "token auth needs Ray 2.52+"


def _check_unprivileged(pod: dict[str, Any], where: str) -> None:
    """Non-root by a numeric id (the kubelet cannot check a named user), no capabilities."""
    context = pod.get("securityContext", {})
    assert context.get("runAsNonRoot") is True, f"{where}: may run as root"
    assert context.get("runAsUser", 0) > 0, f"{where}: no numeric non-root runAsUser"
    for container in pod["containers"]:
        own = container.get("securityContext", {})
        assert own.get("allowPrivilegeEscalation") is False, where
        assert own.get("capabilities", {}).get("drop") == ["ALL"], where


def _pods(rs: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    cluster = rs["spec"]["rayClusterConfig"]
    yield "head", cluster["headGroupSpec"]["template"]
    for worker in cluster["workerGroupSpecs"]:
        yield worker["groupName"], worker["template"]


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _check_rayservice(rs: dict[str, Any], schema: jsonschema.Draft7Validator) -> None:
    errors = sorted(schema.iter_errors(rs), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:10]
    )
    assert rs["apiVersion"] == "ray.io/v1"
    _check_kuberay_rules(rs)
    import ray

    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__, "rayVersion is not the Ray tested here"

    envs = []
    for group, template in _pods(rs):
        _validate_k8s(
            {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": group},
                "template": template,
            }
        )
        ray_container = template["spec"]["containers"][0]  # KubeRay's Ray container index
        env = _env(ray_container)
        envs.append((env, ray_container.get("envFrom", [])))
        for secret in ("DATABASE_URL", "REDIS_URL", "AGENTAUTH_ADMIN_TOKEN"):
            assert "secretKeyRef" in env[secret], f"{group}: {secret} not from a Secret"
        mounts = {m["name"]: m["mountPath"] for m in ray_container.get("volumeMounts", [])}
        volumes = {v["name"] for v in template["spec"].get("volumes", [])}
        assert set(mounts) <= volumes, f"{group}: a mount without its volume"
        assert mounts.get("dshm") == "/dev/shm"
        for probe in ("readinessProbe", "livenessProbe"):
            assert probe in ray_container, f"{group}: no {probe}"
        _check_unprivileged(template["spec"], group)
    # Every Serve process must see the same settings, wherever Ray places it.
    assert all(e == envs[0] for e in envs), "head and workers differ in their environment"

    config = yaml.safe_load(rs["spec"]["serveConfigV2"])
    port = config["http_options"]["port"]
    for group, template in _pods(rs):
        ports = {p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
        assert port in ports, f"{group}: Serve's port {port} is not a container port"
        if group != "head":
            probe = template["spec"]["containers"][0]["readinessProbe"]["httpGet"]
            assert (probe["path"], probe["port"]) == ("/-/healthz", port)


# --- Serve config --------------------------------------------------------------------------


def _unknown_keys(model: Any, data: Any, where: str = "") -> list[str]:
    """Keys pydantic would silently ignore (Ray's Serve schemas allow extra keys)."""
    from pydantic import BaseModel

    if not isinstance(data, dict):
        return []
    fields = model.model_fields
    names = dict(fields)
    names.update({f.alias: f for f in fields.values() if f.alias})
    problems = [f"{where}{key}" for key in data if key not in names]
    for key, value in data.items():
        field = names.get(key)
        if field is None:
            continue
        for inner in _models(field.annotation):
            if issubclass(inner, BaseModel):
                items = value if isinstance(value, list) else [value]
                for i, item in enumerate(items):
                    problems += _unknown_keys(inner, item, f"{where}{key}[{i}].")
    return problems


def _models(annotation: Any) -> Iterator[type]:
    from typing import get_args

    if isinstance(annotation, type):
        yield annotation
    for arg in get_args(annotation):
        yield from _models(arg)


def _check_serve_config(
    config: dict[str, Any], env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> dict[str, Any]:
    """Validate as Ray would, then build both applications; returns the registry settings."""
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    from agentauth.registry import RegistrySettings
    from agentauth.verifier import VerifierSettings

    schema = ServeDeploySchema.model_validate(config)
    assert not _unknown_keys(ServeDeploySchema, config)
    assert {a.name: a.route_prefix for a in schema.applications} == {
        "registry": "/registry",
        "verifier": "/verifier",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    built: dict[str, Any] = {}
    for app in schema.applications:
        builder = import_attr(app.import_path)
        # What Serve's controller does with import_path + args on deploy.
        call_user_app_builder_with_args_if_necessary(builder, dict(app.args))
        built[app.name] = dict(app.args)
        assert [d.name for d in app.deployments] == [app.name]
    VerifierSettings.from_env(**built["verifier"])
    return RegistrySettings.from_env(**built["registry"]).model_dump()


def _serve_env(configmap: dict[str, Any]) -> dict[str, str]:
    """The Ray pods' environment: the ConfigMap, plus stand-ins for the Secrets."""
    env = dict(configmap["data"])
    env.update(
        DATABASE_URL="postgresql://agentauth@db.example:5432/agentauth",
        REDIS_URL="redis://redis.example:6379/0",
        AGENTAUTH_ADMIN_TOKEN="a-stand-in-admin-token-0123456789",
        AGENTAUTH_VERIFIER_NONCE_SECRET="a-stand-in-nonce-secret-0123456789",
    )
    return env


def _applications_without_signer(config: dict[str, Any]) -> list[dict[str, Any]]:
    apps = json.loads(json.dumps(config["applications"]))
    for app in apps:
        app.get("args", {}).pop("signer", None)
        if app.get("args") == {}:
            del app["args"]
    return sorted(apps, key=lambda a: a["name"])


# --- the plain RayService manifest ---------------------------------------------------------


def _plain_docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(RAYSERVICE.read_text()) if d]


def test_plain_rayservice_is_valid_for_kuberay_and_kubernetes(
    rayservice_schema: jsonschema.Draft7Validator,
) -> None:
    docs = _plain_docs()
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "RayService"]
    rs, configmap = _one(docs, "RayService"), _one(docs, "ConfigMap")
    _check_rayservice(rs, rayservice_schema)
    _validate_k8s(configmap)
    for _, template in _pods(rs):
        refs = template["spec"]["containers"][0]["envFrom"]
        assert {"configMapRef": {"name": configmap["metadata"]["name"]}} in refs
        env = _env(template["spec"]["containers"][0])
        assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
        assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
        assert env["RAY_SERVE_HAPROXY_METRICS_ENABLED"] == "0"
        assert env["RAY_worker_niceness"] == "0"


def test_plain_rayservice_header_names_every_secret_it_reads() -> None:
    text = RAYSERVICE.read_text()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    rs = _one(_plain_docs(), "RayService")
    refs = {
        (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
        for _, template in _pods(rs)
        for e in template["spec"]["containers"][0]["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert refs
    current = ""
    listed = set()
    for line in header.splitlines():
        match = re.match(r"#\s+(agentauth-[a-z-]+)?\s+([a-z-]+)\s{2,}", line)
        if match:
            current = match.group(1) or current
            listed.add((current, match.group(2)))
    assert refs <= listed, f"Secrets not listed in the header: {refs - listed}"


def test_plain_rayservice_serves_the_same_applications_as_serve_yaml(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    docs = _plain_docs()
    rs, configmap = _one(docs, "RayService"), _one(docs, "ConfigMap")
    config = yaml.safe_load(rs["spec"]["serveConfigV2"])
    serve_yaml = yaml.safe_load((CLUSTER / "serve.yaml").read_text())
    assert _applications_without_signer(config) == _applications_without_signer(serve_yaml)
    assert config["proxy_location"] == serve_yaml["proxy_location"]
    settings = _check_serve_config(config, _serve_env(configmap), monkeypatch)
    assert settings["signer"]["backend"] == "aws"
    assert settings["issuer"] == configmap["data"]["AGENTAUTH_ISSUER"]


# --- the Helm chart ------------------------------------------------------------------------


def test_chart_metadata_and_values_are_well_formed() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == CHART.name
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart["version"])
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["appVersion"] == project["version"], "appVersion is the package's version"
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(values, schema)


def _value_paths(values: Any, prefix: str = "") -> set[str]:
    paths = {prefix} if prefix else set()
    if isinstance(values, dict):
        for key, value in values.items():
            paths |= _value_paths(value, f"{prefix}.{key}" if prefix else key)
    return paths


def test_every_value_a_template_uses_is_in_values_yaml() -> None:
    known = _value_paths(yaml.safe_load((CHART / "values.yaml").read_text()))
    used: dict[str, str] = {}
    for template in (CHART / "templates").iterdir():
        for path in re.findall(
            r"\.Values\.([A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*)", template.read_text()
        ):
            used.setdefault(path, template.name)
    assert used, "no template reads .Values"
    missing = {path: where for path, where in used.items() if path not in known}
    assert not missing, f"used in templates but absent from values.yaml: {missing}"


def test_helm_lints_the_chart_clean(helm: dict[str, Any]) -> None:
    lint = helm["lint"]
    assert lint["errors"] == []
    # severity 1 is informational ("icon is recommended"); 2 warning, 3 error
    assert [m for m in lint["messages"] if m["severity"] >= 2] == []
    assert helm["chart"] == {"name": "agentauth", "version": "0.1.0"}


@pytest.mark.parametrize("case", sorted(RENDER_REFUSALS))
def test_helm_refuses_values_that_cannot_work(helm: dict[str, Any], case: str) -> None:
    render = helm["renders"][case]
    assert "error" in render, f"{case} rendered"
    assert RENDER_REFUSALS[case][1] in render["error"]


@pytest.mark.parametrize("case", sorted(RENDER_CASES))
def test_helm_renders_valid_objects(
    helm: dict[str, Any],
    case: str,
    rayservice_schema: jsonschema.Draft7Validator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    docs = _rendered(helm, case)
    values = RENDER_CASES[case]
    rs, configmap = _one(docs, "RayService"), _one(docs, "ConfigMap")
    _check_rayservice(rs, rayservice_schema)
    for doc in docs:
        if doc["kind"] == "PodMonitor":
            continue  # a Prometheus Operator CRD: no schema here
        if doc["kind"] != "RayService":
            _validate_k8s(doc)
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == "agentauth"

    config = yaml.safe_load(rs["spec"]["serveConfigV2"])
    assert "nonce_secret" not in rs["spec"]["serveConfigV2"], "a secret in the RayService"
    env = _serve_env(configmap)
    head = next(_pods(rs))[1]["spec"]["containers"][0]
    for name in ("AGENTAUTH_SIGNER_VAULT_TOKEN", "AGENTAUTH_SIGNER_PKCS11_PIN"):
        if name in _env(head):  # from its Secret (checked below): a stand-in
            env[name] = f"a-stand-in-for-{name.lower()}"
    settings = _check_serve_config(config, env, monkeypatch)
    assert settings["open_signup"] == values.get("openSignup", True)
    assert list(settings["trusted_proxies"]) == values.get("trustedProxies", [])
    backend = values.get("signer", {}).get("backend", "local")
    assert settings["signer"]["backend"] == backend
    if backend != "local":
        assert settings["signer"]["key_id"] == values["signer"][backend]["keyId"]
    if case == "default":
        serve_yaml = yaml.safe_load((CLUSTER / "serve.yaml").read_text())
        assert _applications_without_signer(config) == _applications_without_signer(serve_yaml)

    for _, template in _pods(rs):
        container = template["spec"]["containers"][0]
        env = _env(container)
        flags = values.get("serve", {})
        assert env["RAY_SERVE_ENABLE_HA_PROXY"] == ("1" if flags.get("haProxy", True) else "0")
        assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
        assert env["RAY_SERVE_HAPROXY_METRICS_ENABLED"] == "0"
        assert env["RAY_worker_niceness"] == "0"
        assert {"configMapRef": {"name": configmap["metadata"]["name"]}} in container["envFrom"]
        if backend == "aws":
            assert env["AWS_ACCESS_KEY_ID"]["secretKeyRef"]["name"] == "agentauth-aws"
        # The signer's secret reaches the pods from its Secret, and only from there.
        secret_env = {
            "vault": "AGENTAUTH_SIGNER_VAULT_TOKEN",
            "pkcs11": "AGENTAUTH_SIGNER_PKCS11_PIN",
        }
        token_secret = values.get("signer", {}).get("vault", {}).get("tokenSecret", {})
        for other, name in secret_env.items():
            from_secret = backend == other and (other != "vault" or bool(token_secret))
            assert (name in env) == from_secret
        if backend == "vault":
            token_file = values["signer"]["vault"].get("tokenFile")
            assert settings["signer"]["vault_token_file"] == token_file
            annotations = template["metadata"]["annotations"]
            assert values.get("ray", {}).get("podAnnotations", {}).items() <= annotations.items()
        nonces = values.get("verifier", {}).get("dpopNonces", False)
        assert ("AGENTAUTH_VERIFIER_NONCE_SECRET" in env) == nonces
        if nonces:
            ref = {"name": values["verifier"]["nonceSecret"]["name"], "key": "secret"}
            assert env["AGENTAUTH_VERIFIER_NONCE_SECRET"] == {"secretKeyRef": ref}
        if backend in secret_env and not (backend == "vault" and not token_secret):
            ref = values["signer"][backend]["tokenSecret" if backend == "vault" else "pinSecret"]
            assert env[secret_env[backend]] == {"secretKeyRef": ref}
        if backend == "gcp":
            path = Path(env["GOOGLE_APPLICATION_CREDENTIALS"])
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            volume = next(
                v for v in template["spec"]["volumes"] if v["name"] == mounts[str(path.parent)]
            )
            assert volume["secret"]["secretName"] == "agentauth-gcp"
        data = next(v for v in template["spec"]["volumes"] if v["name"] == "data")
        assert ("persistentVolumeClaim" in data) == (backend == "local")

    _check_ui_and_routes(docs, rs, configmap, values, monkeypatch)


def _check_ui_and_routes(
    docs: list[dict[str, Any]],
    rs: dict[str, Any],
    configmap: dict[str, Any],
    values: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    serve_service = f"{rs['metadata']['name']}-serve-svc"  # KubeRay's name for it
    ui_enabled = values.get("ui", {}).get("enabled", True)
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    assert len(deployments) == int(ui_enabled)
    if ui_enabled:
        deployment = deployments[0]
        pod = deployment["spec"]["template"]
        assert deployment["spec"]["replicas"] == 1  # sessions live in the process
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= pod["metadata"]["labels"].items()
        service = services[deployment["metadata"]["name"]]
        assert service["spec"]["selector"] == selector
        container = pod["spec"]["containers"][0]
        _check_unprivileged(pod["spec"], "ui")
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        named_ports = {p["name"] for p in container["ports"]}
        assert service["spec"]["ports"][0]["targetPort"] in named_ports
        settings, listen = _parse_ui_command(container["command"] + container["args"], monkeypatch)
        assert listen["host"] == "0.0.0.0"
        assert any(p["containerPort"] == listen["port"] for p in container["ports"])
        assert settings.registry_url == f"http://{serve_service}.auth.svc:8000/registry"
        # The registry must accept the page's origin and agree on the RP id.
        assert settings.origin in configmap["data"]["AGENTAUTH_ORIGINS"].split(",")
        assert settings.rp_id == configmap["data"]["AGENTAUTH_RP_ID"]
        for probe in ("readinessProbe", "livenessProbe"):
            headers = container[probe]["httpGet"]["httpHeaders"]
            assert {"name": "Host", "value": settings.host} in headers

    ingresses = [d for d in docs if d["kind"] == "Ingress"]
    assert len(ingresses) == int(values.get("ingress", {}).get("enabled", False))
    for ingress in ingresses:
        routes = {
            (rule["host"], path["path"]): path["backend"]["service"]["name"]
            for rule in ingress["spec"]["rules"]
            for path in rule["http"]["paths"]
        }
        issuer = urlsplit(configmap["data"]["AGENTAUTH_ISSUER"])
        assert routes[(issuer.hostname, "/registry")] == serve_service
        expose = values["ingress"].get("exposeVerifier", True)
        assert ((issuer.hostname, "/verifier") in routes) == expose
        for name in set(routes.values()) - {serve_service}:
            assert name in services
        if ui_enabled:
            ui_host = urlsplit(configmap["data"]["AGENTAUTH_ORIGINS"].split(",")[0]).hostname
            assert (ui_host, "/") in routes

    for monitor in (d for d in docs if d["kind"] == "PodMonitor"):
        wanted = {
            e["key"]: set(e["values"]) for e in monitor["spec"]["selector"]["matchExpressions"]
        }
        for _, template in _pods(rs):
            labels = template["metadata"]["labels"]
            assert all(labels.get(k) in v for k, v in wanted.items())
            ports = {p["name"] for p in template["spec"]["containers"][0]["ports"]}
            assert monitor["spec"]["podMetricsEndpoints"][0]["port"] in ports


def _parse_ui_command(
    argv: list[str], monkeypatch: pytest.MonkeyPatch
) -> tuple[Any, dict[str, Any]]:
    """Run the page's own entry point on the container's command line, without serving."""
    assert argv[:3] == ["python", "-m", "agentauth.ui"], f"unknown UI command {argv[:3]}"
    ui_main = importlib.import_module("agentauth.ui.__main__")
    seen: dict[str, Any] = {}

    def run_ui(settings: Any, **listen: Any) -> None:
        seen["settings"], seen["listen"] = settings, listen

    for name in ("AGENTAUTH_UI_REGISTRY_URL", "AGENTAUTH_UI_ORIGIN", "AGENTAUTH_RP_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(ui_main, "run_ui", run_ui)
    assert ui_main.main(argv[3:]) == 0
    return seen["settings"], seen["listen"]


# --- the Grafana dashboard -----------------------------------------------------------------


def _dashboard_panels() -> list[dict[str, Any]]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def _promql(expr: str) -> Any:
    promql_parser = _need("promql_parser")
    # Grafana's interval variables become durations before Prometheus sees the query.
    concrete = re.sub(r"\$__(rate_interval|interval|range)", "5m", expr)
    assert "$" not in concrete, f"an unknown variable in {expr}"
    return promql_parser.parse(concrete)


def _names_and_labels(tree: Any) -> tuple[set[str], set[str]]:
    import promql_parser

    names: set[str] = set()
    labels: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"a selector without a metric name: {node}"
            names.add(node.name)
            labels.update(m.name for m in node.matchers.matchers if m.name != "__name__")
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            labels.update(node.modifier.labels)

    promql_parser.walk(tree, visit)
    return names, labels


def test_dashboard_uses_a_prometheus_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    source = {"type": "prometheus", "uid": "${datasource}"}
    panels = [p for p in _dashboard_panels() if p["type"] != "row"]
    assert panels
    for panel in panels:
        assert panel["datasource"] == source, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == source, panel["title"]
    ids = [p["id"] for p in _dashboard_panels()]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    cells: set[tuple[int, int]] = set()
    for panel in _dashboard_panels():
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & mine, f"{panel['title']} overlaps another panel"
        cells |= mine


def test_dashboard_queries_parse_and_name_only_known_metrics() -> None:
    used: set[str] = set()
    quantiles: set[float] = set()
    for panel in _dashboard_panels():
        for target in panel.get("targets", []):
            tree = _promql(target["expr"])
            names, labels = _names_and_labels(tree)
            assert names <= DASHBOARD_METRICS, f"{panel['title']}: {names - DASHBOARD_METRICS}"
            assert labels <= DASHBOARD_LABELS, f"{panel['title']}: {labels - DASHBOARD_LABELS}"
            used |= names
            quantiles.update(
                float(q) for q in re.findall(r"histogram_quantile\(\s*([0-9.]+)", target["expr"])
            )
    assert used == DASHBOARD_METRICS, f"metrics without a panel: {DASHBOARD_METRICS - used}"
    assert {0.5, 0.99} <= quantiles


def test_dashboard_metrics_match_the_code() -> None:
    metrics = importlib.import_module("agentauth.metrics")
    specs = getattr(metrics, "_SPECS", None)
    if specs is None:
        pytest.skip("agentauth.metrics has no _SPECS table any more: compare by hand")
    exported = {
        "ray_" + full + ("_bucket" if kind == "histogram" else "")
        for kind, full, _ in specs.values()
    }
    assert exported == DASHBOARD_METRICS
    tags = {tag for _, _, keys in specs.values() for tag in keys} | {"le"}
    assert tags == DASHBOARD_LABELS
