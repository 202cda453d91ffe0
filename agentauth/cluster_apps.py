"""Serve application builders for ``serve deploy cluster/serve.yaml`` (config from the env)."""

from __future__ import annotations

import os
from typing import Any

from ray.serve import Application

from .deployments.registry import build_registry_app
from .deployments.verifier import build_verifier_app
from .registry import RegistrySettings
from .verifier import VerifierSettings

__all__ = ["registry_app", "verifier_app"]


def registry_app(args: dict[str, Any]) -> Application:
    settings = RegistrySettings.from_env(**args)
    return build_registry_app(
        settings, replicas=int(os.environ.get("AGENTAUTH_REGISTRY_REPLICAS", "2"))
    )


def verifier_app(args: dict[str, Any]) -> Application:
    return build_verifier_app(VerifierSettings.from_env(**args))
