"""The AgentAuth verifier under one bare uvicorn worker, without Ray Serve in the request path.

    AGENTAUTH_BENCH_VERIFIER_SETTINGS='{"database_url": ..., "redis_url": ..., "issuer": ...}' \\
    RAY_ADDRESS=<gcs host:port> \\
    python -m uvicorn --app-dir bench --factory uvicorn_verifier:create_app --port 8123

The verification code, the shard actors and the databases are the very ones the Serve
deployment uses; only the HTTP front differs (uvicorn straight to the ASGI app, no HAProxy,
no Serve proxy or router). ``verify_bench.py`` uses it as the floor for Python on this box.
``RAY_ADDRESS`` picks the cluster: ``address="auto"`` alone would attach to whichever Ray
instance started last on the machine, and other sessions start their own.
"""

from __future__ import annotations

import json
import os
from typing import Any

SETTINGS_ENV = "AGENTAUTH_BENCH_VERIFIER_SETTINGS"

Scope = dict[str, Any]


class _LazyVerifierApp:
    """An ASGI app that opens the verifier at lifespan start-up.

    ``Verifier.open`` is async (pools, keys, revocation watcher), and the app factory that
    uvicorn calls is not, so the real FastAPI app is built once the event loop runs.
    """

    def __init__(self, settings: dict[str, Any]) -> None:
        self._settings = settings
        self._app: Any = None
        self._verifier: Any = None

    async def _start(self) -> None:
        import ray

        from agentauth.deployments.verifier import NAMESPACE, settle_collector, shard_handles
        from agentauth.verifier import Verifier, VerifierSettings, create_app

        ray.init(
            address=os.environ.get("RAY_ADDRESS", "auto"),
            namespace=NAMESPACE,
            log_to_driver=False,
        )
        settings = VerifierSettings.model_validate(self._settings)
        self._verifier = await Verifier.open(settings, shard_handles(settings))
        self._app = create_app(self._verifier)
        settle_collector()  # as the Serve deployment does after opening the verifier

    async def _stop(self) -> None:
        import ray

        if self._verifier is not None:
            await self._verifier.close()
        ray.shutdown()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await self._app(scope, receive, send)
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self._start()
                except Exception as exc:  # uvicorn prints the message and exits
                    await send({"type": "lifespan.startup.failed", "message": repr(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self._stop()
                await send({"type": "lifespan.shutdown.complete"})
                return


def create_app() -> _LazyVerifierApp:
    return _LazyVerifierApp(json.loads(os.environ[SETTINGS_ENV]))
