"""The approval page in a process of its own, for tests/test_ui_sockets.py.

A stand-in registry answers the page (every call it receives is appended to a file), and
one session is signed in before the server starts: its cookie id is the first line this
prints. Run: ``python tests/ui_socket_server.py PORT CALLS_FILE``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import httpx
import uvicorn

import agentauth.ui._app as app_module
from agentauth.ui._pages import Pages
from agentauth.ui._registry import RegistryClient
from agentauth.ui._security import Session

# How long the stand-in takes to answer each page of pending requests: within the page's
# registry_timeout (15 s), but two pages of them take longer than the page may take to build.
SLOW_LISTING_SECONDS = 11.0


def main(port: int, calls: Path) -> None:
    async def answer(request: httpx.Request) -> httpx.Response:
        with calls.open("a") as out:
            out.write(f"{request.method} {request.url.path}\n")
        if request.url.path == "/v1/agents":
            return httpx.Response(200, json=[])
        if request.url.path == "/v1/step-ups":
            return httpx.Response(200, json=[])
        if request.url.path == "/v1/grant-requests":
            await asyncio.sleep(SLOW_LISTING_SECONDS)
            if "cursor" in request.url.params:
                return httpx.Response(200, json=[])
            return httpx.Response(200, json=[], headers={"Link": '<?cursor=1>; rel="next"'})
        if request.url.path == "/v1/enrollments":
            return httpx.Response(
                200, json={"enrollment_code": "enr_" + "x" * 20, "expires_in": 600}
            )
        return httpx.Response(404, json={"error": "not_found", "error_description": "not here"})

    class StandIn(RegistryClient):
        def __init__(self, base_url: str, *, timeout: float = 15.0) -> None:
            super().__init__(base_url, timeout=timeout, transport=httpx.MockTransport(answer))

    async def failing(self: Pages, cookie_id: str, session: Session) -> None:
        raise RuntimeError(f"what only the server's log may hold: {session.registry_token}")

    app_module.RegistryClient = StandIn  # type: ignore[misc]
    # A page whose build fails, whatever the cause: its error page must name none of it.
    Pages._passkeys = failing  # type: ignore[method-assign]
    app = app_module.create_ui_app(
        registry_url="http://registry.invalid", origin=f"http://localhost:{port}"
    )
    store = app.state.sessions
    anonymous = "a" * 43
    ticket = store.sign_in(anonymous, principal_id="hum_1", registry_token="ses_1")
    print(json.dumps({"cookie": store.claim(ticket, anonymous)}), flush=True)
    # Another person's session, left idle an hour ago (its tab closed): nothing looks at
    # it again, and the app's own sweep must end its registry session.
    idle = store.claim(
        store.sign_in("b" * 43, principal_id="hum_2", registry_token="ses_idle"), "b" * 43
    )
    store.get(idle).used_at -= 3600
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]))
