"""The verifier as a Ray Serve deployment, and the shard actors it calls.

Replicas are stateless (caches aside) and scale by ``num_replicas`` or an autoscaling
config; per-agent state lives in the named, detached ``StateShard`` actors that every
replica shares. Actors restart on failure (``max_restarts=-1``) and fail closed for replay.
"""

from __future__ import annotations

import gc
from typing import Any, cast

import ray
from ray import serve
from ray.serve import Application, Deployment

from ..actors import StateShard
from ..verifier import Verifier, VerifierSettings, create_app

__all__ = [
    "NAMESPACE",
    "VerifierDeployment",
    "build_verifier_app",
    "settle_collector",
    "shard_handles",
    "shard_options",
]

NAMESPACE = "agentauth"


def shard_options(index: int) -> dict[str, Any]:
    """Ray options of shard ``index``: named and detached (every replica finds the same
    actor), restarted forever by Ray, its calls never retried (a retried check could be
    decided twice)."""
    return {
        "name": f"agentauth-shard-{index}",
        "namespace": NAMESPACE,
        "get_if_exists": True,
        "lifetime": "detached",
        "max_restarts": -1,
        "max_task_retries": 0,
        "num_cpus": 0,
        "max_concurrency": 64,
    }


# Gen-1 collections between two full ones (Python's default: 10). A full collection walks
# every object the collector tracks while the replica answers nothing. When the token
# cache held its tokens as models (about 28 tracked objects each) that was 80-110 ms on the
# 2-core development machine every few thousand new tokens; the cache now keeps most of
# them as atoms it does not track, and what remains (1,024 built tokens, the memo, the
# proof keys) is still walked. At 100 full collections come ten times less often
# (docs/verifier-bench.md, "The collector and the token cache").
# The price: cyclic garbage that reaches the oldest generation waits longer to be freed
# (most garbage here has no cycles and goes by reference counting at once).
FULL_COLLECTION_AFTER = 100


def settle_collector() -> None:
    """Set up the collector for a verifier process once it is open: what is alive now (Ray,
    Serve, FastAPI, the caches' shells) lives as long as the process, so it is taken out of
    the collector's sight (``gc.freeze``), and full collections are made rarer."""
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_AFTER)


def shard_handles(settings: VerifierSettings) -> list[Any]:
    """Get or create the shard actors (idempotent across replicas)."""
    actor = ray.remote(StateShard)
    return [
        actor.options(**shard_options(i)).remote(index=i, database_url=settings.database_url)
        for i in range(settings.shards)
    ]


# No per-request access log: every decision is already an audit event on its shard's hash
# chain, and Serve's log line was about 5 % of a replica's py-spy samples (1 % remains: Serve
# still builds the record that its filter then drops).
@serve.deployment(
    name="verifier",
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=256,
    logging_config={"enable_access_log": False},
)
@serve.ingress()
class VerifierDeployment:
    async def __init__(self, settings: dict[str, Any]) -> None:  # type: ignore[misc]
        parsed = VerifierSettings.model_validate(settings)
        self._verifier = await Verifier.open(parsed, shard_handles(parsed))
        settle_collector()

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(self._verifier)


def build_verifier_app(
    settings: VerifierSettings,
    *,
    replicas: int = 2,
    autoscaling: dict[str, Any] | None = None,
) -> Application:
    deployment = cast(Deployment, VerifierDeployment)
    options: dict[str, Any] = (
        {"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": replicas}
    )
    return deployment.options(**options).bind(settings.model_dump(mode="json"))
