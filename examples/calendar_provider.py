"""A sample service provider: a calendar and payments API protected by AgentAuth.

    python examples/calendar_provider.py          # http://127.0.0.1:8090

On first start it registers itself with the local registry (admin token from
``.agentauth/admin-token``, as ``agentauth up`` wrote it) and keeps its credential in
``.agentauth/provider-calendar.json`` (mode 0600).
"""

# No "from __future__ import annotations" here: FastAPI must see the dependencies defined
# inside build_app when it reads the route signatures.
import json
import os
from pathlib import Path
from typing import Annotated, Any

import httpx
from fastapi import Depends, FastAPI, Request

from agentauth import Action
from agentauth.sdk import Verification, VerifierClient, require

BASE = os.environ.get("AGENTAUTH_URL", "http://127.0.0.1:8000")
PUBLIC_URL = os.environ.get("CALENDAR_URL", "http://127.0.0.1:8090")
DATA = Path(os.environ.get("AGENTAUTH_DATA_DIR", ".agentauth"))


def build_app(verifier: VerifierClient, *, public_url: str = PUBLIC_URL) -> FastAPI:
    """The provider app; tests build it with their own verifier client and URL."""
    app = FastAPI(title="Sample calendar provider")
    events: list[dict[str, Any]] = [{"id": 1, "title": "Standup", "at": "09:30"}]

    def payment(request: Request) -> Action:
        # The action depends on the request: the verifier checks the exact amount and payee.
        # An allow is a commit (it counts against the grant's spend limits and is audited),
        # and require() runs before FastAPI checks the route's own parameters: so every
        # value is checked here (the model refuses a bad amount or currency with a
        # ValueError, answered 400 before the verifier is asked), and the handler pays
        # what this returns, not parameters of its own.
        query = request.query_params
        if not query.get("payee"):
            raise ValueError("a payment names its payee")
        return Action(
            kind="transact",
            resource="payments",
            amount=query.get("amount", ""),
            currency=query.get("currency", "USD"),
            payee=query["payee"],
        )

    read_events = require(
        Action(kind="read", resource="calendar"), verifier=verifier, public_url=public_url
    )
    pay = require(payment, verifier=verifier, public_url=public_url)

    @app.get("/api/events")
    async def list_events(v: Annotated[Verification, Depends(read_events)]) -> dict[str, Any]:
        return {"events": events, "agent": v.agent_id, "remaining": v.remaining}

    @app.post("/api/payments")
    async def make_payment(
        request: Request, v: Annotated[Verification, Depends(pay)]
    ) -> dict[str, Any]:
        paid = payment(request)  # the very action the verifier allowed
        return {
            "paid": paid.amount,
            "currency": paid.currency,
            "payee": paid.payee,
            "agent": v.agent_id,
            "audit_event": v.audit_event,
        }

    return app


def _credential() -> dict[str, str]:
    """Register this provider once (admin token from the local stack) and remember it."""
    path = DATA / "provider-calendar.json"
    if path.exists():
        return dict(json.loads(path.read_text()))
    admin = (DATA / "admin-token").read_text().strip()
    body = {
        "id": "calendar",
        "audience": PUBLIC_URL,
        "display_name": "Sample calendar",
        "allowed_kinds": ["read", "transact"],
    }
    r = httpx.post(
        f"{BASE}/registry/v1/providers", json=body, headers={"Authorization": f"Bearer {admin}"}
    )
    r.raise_for_status()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump({"id": "calendar", "secret": r.json()["secret"]}, handle)
    return {"id": "calendar", "secret": r.json()["secret"]}


if __name__ == "__main__":
    import uvicorn

    credential = _credential()
    client = VerifierClient(
        f"{BASE}/verifier", provider_id=credential["id"], secret=credential["secret"]
    )
    uvicorn.run(build_app(client), host="127.0.0.1", port=8090)
