"""The registry as a Ray Serve deployment: a thin adapter over ``agentauth.registry``.

Each replica opens its own connection pool and Redis client in ``__init__`` and serves the
FastAPI app; all shared state is in PostgreSQL and Redis, so replicas scale freely.
"""

from __future__ import annotations

from typing import Any, cast

from ray import serve
from ray.serve import Application, Deployment

from ..registry import Registry, RegistrySettings, create_app

__all__ = ["RegistryDeployment", "build_registry_app"]


@serve.deployment(
    name="registry",
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=64,
    health_check_period_s=10,
)
@serve.ingress()
class RegistryDeployment:
    async def __init__(self, settings: dict[str, Any]) -> None:  # type: ignore[misc]
        # Serve awaits async constructors: the pool and keys open before the first request.
        self._registry = await Registry.open(RegistrySettings.model_validate(settings))
        self._registry.start_background()

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(self._registry)

    async def check_health(self) -> None:
        # A replica whose database is gone is unhealthy: Serve replaces it.
        await self._registry.pool.fetchval("SELECT 1")


def build_registry_app(settings: RegistrySettings, *, replicas: int = 1) -> Application:
    """The Serve application (``serve.run(app, route_prefix="/registry")``)."""
    deployment = cast(Deployment, RegistryDeployment)  # @serve.deployment made it one
    return deployment.options(num_replicas=replicas).bind(settings.model_dump(mode="json"))
