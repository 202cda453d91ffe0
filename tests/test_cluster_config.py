"""The Serve config in cluster/ is valid for Ray's own schema and its imports resolve."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_serve_config_matches_rays_schema_and_imports() -> None:
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((ROOT / "cluster" / "serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    names = {app.name for app in schema.applications}
    assert names == {"registry", "verifier"}
    for app in schema.applications:
        module, _, attr = app.import_path.partition(":")
        assert callable(getattr(importlib.import_module(module), attr))
    prefixes = {app.route_prefix for app in schema.applications}
    assert prefixes == {"/registry", "/verifier"}
