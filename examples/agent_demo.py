"""A sample agent: asks for calendar read and a $50 transact capability, then uses them.

    python examples/agent_demo.py --enrollment-code enr_...   # the code from the approval page

It registers its key (kept in .agentauth/agent, mode 0600), requests the grant, waits while
you approve it in the browser with your passkey, reads the calendar, pays $20, and tries to
pay $80, which the envelope refuses.
"""

from __future__ import annotations

import argparse
import asyncio
import os

import httpx

from agentauth import AgentAuthClient, AgentAuthError, Capability

REGISTRY = os.environ.get("AGENTAUTH_URL", "http://127.0.0.1:8000") + "/registry"
CALENDAR = os.environ.get("CALENDAR_URL", "http://127.0.0.1:8090")


async def main(code: str | None) -> None:
    client = AgentAuthClient(REGISTRY, home=".agentauth/agent")
    if client.agent_id is None:
        if not code:
            raise SystemExit("first run: pass --enrollment-code from the approval page")
        print("registered agent", await client.register(enrollment_code=code, name="demo agent"))
    request = await client.request_grant(
        service_provider_id="calendar",
        capabilities=[
            Capability.read("calendar"),
            Capability.transact("payments", max_amount=50, currency="USD"),
        ],
        envelope={
            "rate_limits": [{"max_count": 5, "window_seconds": 3600}],
            "spend_limits": [{"amount": "200", "currency": "USD", "period": "day"}],
        },
    )
    print(f"grant request {request.id}: approve it in the browser ...")
    await client.wait_for_approval(
        request, on_progress=lambda status, left: print(f"  {status} ({left:.0f} s left)")
    )
    async with httpx.AsyncClient(base_url=CALENDAR, auth=client.auth("calendar")) as api:
        events = await api.get("/api/events")
        print("calendar:", events.status_code, events.json())
        paid = await api.post("/api/payments", params={"amount": "20", "payee": "acme"})
        print("pay $20:", paid.status_code, paid.json())
        refused = await api.post("/api/payments", params={"amount": "80", "payee": "acme"})
        print("pay $80:", refused.status_code, refused.json())
    await client.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--enrollment-code")
    try:
        asyncio.run(main(parser.parse_args().enrollment_code))
    except AgentAuthError as exc:
        raise SystemExit(f"error: {exc.error} ({exc.reason}): {exc.description}") from None
