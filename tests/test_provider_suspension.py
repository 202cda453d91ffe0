"""Suspending a provider: the admin stops a provider's access (offboarding, a compromise
under investigation) without touching its credentials, and lifts it again. The registry on
a real Serve app with PostgreSQL and Redis; the verifier's side (every replica refuses a
suspended provider within a second) is in test_verifier.py."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import httpx
import pytest
from registry_world import PAYMENTS, STEP_UP_ABOVE_50, Provider, World

pytestmark = [pytest.mark.ray, pytest.mark.postgres, pytest.mark.redis]


def suspension(provider: Provider) -> str:
    return f"/v1/providers/{provider.id}/suspension"


async def suspend(world: World, provider: Provider, reason: str) -> dict[str, Any]:
    r = await world.client.put(
        world.url(suspension(provider)), headers=world.admin, json={"reason": reason}
    )
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


async def reinstate(world: World, provider: Provider) -> dict[str, Any]:
    r = await world.client.delete(world.url(suspension(provider)), headers=world.admin)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


async def provider_events(db: asyncpg.Connection, provider: Provider) -> list[dict[str, Any]]:
    rows = await db.fetch(
        "SELECT body FROM audit_events WHERE body::jsonb ->> 'subject' = $1 ORDER BY seq",
        f"provider:{provider.id}",
    )
    return [json.loads(r["body"]) for r in rows]


async def counts(db: asyncpg.Connection) -> tuple[int, ...]:
    return tuple(
        [
            await db.fetchval(f"SELECT count(*) FROM {table}")
            for table in ("audit_events", "issued_tokens", "grant_requests", "grants")
        ]
    )


def refused(r: httpx.Response, status: int, reason: str) -> bool:
    return r.status_code == status and r.json()["reason"] == reason


@pytest.mark.asyncio
async def test_a_suspended_provider_is_refused_everywhere_until_reinstated(
    world: World, db: asyncpg.Connection
) -> None:
    human, agent, provider, grant = await world.setup_grant()
    pending = await world.request(agent, provider)
    assert (await world.token(agent, grant["id"])).status_code == 200
    events_before = len(await provider_events(db, provider))

    answer = await suspend(world, provider, "offboarding")
    assert answer["id"] == provider.id and answer["suspension_reason"] == "offboarding"
    record = (
        await world.client.get(world.url(f"/v1/providers/{provider.id}"), headers=world.admin)
    ).json()
    assert record["suspended_at"] == answer["suspended_at"] is not None
    assert record["suspension_reason"] == "offboarding"
    # Humans and agents learn that it is suspended (their grants say so too), not why, nor
    # anything about its credential.
    own = world.url(f"/v1/providers/{provider.id}")
    seen = [
        (await world.client.get(own, headers=human.headers)).json(),
        (await world.as_agent(agent, "GET", f"/v1/providers/{provider.id}")).json(),
    ]
    for public in seen:
        assert public == {
            "id": provider.id,
            "audience": record["audience"],
            "display_name": record["display_name"],
            "allowed_kinds": record["allowed_kinds"],
            "suspended": True,
        }
    written = await counts(db)

    # The provider, with its valid secret, is told it is suspended; a wrong secret learns
    # nothing about suspension.
    own = world.url(f"/v1/providers/{provider.id}")
    assert refused(await world.client.get(own, headers=provider.headers), 403, "provider_suspended")
    assert refused(
        await world.client.post(own + "/secret", headers=provider.headers),
        403,
        "provider_suspended",
    )
    wrong = Provider(provider.id, provider.audience, "psk_wrong")
    assert refused(
        await world.client.get(own, headers=wrong.headers), 401, "bad_provider_credential"
    )
    # No token for its grants, no new grant request, no approval of a pending one.
    assert refused(await world.token(agent, grant["id"]), 403, "provider_suspended")
    r = await world.as_agent(
        agent,
        "POST",
        "/v1/grant-requests",
        json={"provider_id": provider.id, "capabilities": pending["capabilities"]},
    )
    assert refused(r, 409, "provider_suspended"), r.text
    r = await world.client.post(
        world.url(f"/v1/grant-requests/{pending['id']}/approval/begin"), headers=human.headers
    )
    assert refused(r, 409, "provider_suspended"), r.text
    # ... and none of that wrote anything.
    assert await counts(db) == written

    # Suspending again changes and records nothing: the first time and reason stand.
    again = await suspend(world, provider, "another reason")
    assert again == answer
    assert await counts(db) == written

    back = await reinstate(world, provider)
    assert back == {"id": provider.id, "suspended_at": None, "suspension_reason": None}
    assert (await world.client.get(own, headers=provider.headers)).status_code == 200
    assert (await world.token(agent, grant["id"])).status_code == 200
    granted = await world.approve(human, pending["id"])
    assert granted["provider_id"] == provider.id
    after = await counts(db)
    assert await reinstate(world, provider) == back  # idempotent: nothing more recorded
    assert (await counts(db))[0] == after[0]

    events = await provider_events(db, provider)
    changes = [(e["event"], e["actor"], e.get("data")) for e in events[events_before:]]
    assert changes == [
        ("provider.suspended", "admin", {"reason": "offboarding"}),
        ("provider.reinstated", "admin", {}),
    ]


@pytest.mark.asyncio
async def test_only_the_admin_may_suspend_or_reinstate(
    world: World, db: asyncpg.Connection
) -> None:
    human, agent, provider, _ = await world.setup_grant()
    written = await counts(db)
    path = suspension(provider)
    for method in ("PUT", "DELETE"):
        body = {"reason": "mine"} if method == "PUT" else None
        for headers, status, reason in (
            (provider.headers, 403, "wrong_caller"),
            (human.headers, 403, "wrong_caller"),
            ({}, 401, None),
        ):
            r = await world.client.request(method, world.url(path), headers=headers, json=body)
            assert r.status_code == status, r.text
            assert reason is None or r.json()["reason"] == reason
        r = await world.as_agent(agent, method, path, json=body)
        assert refused(r, 403, "wrong_caller"), r.text
        r = await world.client.request(
            method,
            world.url("/v1/providers/prov-nobody/suspension"),
            headers=world.admin,
            json=body,
        )
        assert r.status_code == 404, r.text
    assert await counts(db) == written
    assert (
        await world.client.get(world.url(f"/v1/providers/{provider.id}"), headers=provider.headers)
    ).status_code == 200


@pytest.mark.asyncio
async def test_bad_suspension_input_is_a_400_and_writes_nothing(
    world: World, db: asyncpg.Connection
) -> None:
    provider = await world.provider()
    written = await counts(db)
    await world.each_refused_as_invalid(
        "PUT",
        suspension(provider),
        [
            b"",
            b"{}",
            b'{"reason": ""}',
            b'{"reason": "' + b"x" * 201 + b'"}',
            b'{"reason": 7}',
            b'{"reason": null}',
            b'{"reason": "a", "until": 5}',
            b'{"reason": "a", "reason": "b"}',
            b'["a"]',
            b"{not json",
        ],
    )
    assert await counts(db) == written
    record = (
        await world.client.get(world.url(f"/v1/providers/{provider.id}"), headers=world.admin)
    ).json()
    assert record["suspended_at"] is None


@pytest.mark.asyncio
async def test_no_step_up_is_asked_or_approved_for_a_suspended_providers_grant(
    world: World, db: asyncpg.Connection
) -> None:
    human, agent, provider, grant = await world.payments_grant()
    pending = await world.step_up(agent, grant["id"], "120")
    payment = {"grant_id": grant["id"], "resource": "payments", "amount": "120", "currency": "USD"}
    # Begun before the suspension: its finish is refused after it, consuming nothing.
    r = await world.client.post(
        world.url(f"/v1/step-ups/{pending['id']}/approval/begin"), headers=human.headers
    )
    assert r.status_code == 200, r.text
    credential = human.authenticator.get(r.json()["options"])

    await suspend(world, provider, "payments paused")
    written = await counts(db)
    r = await world.as_agent(agent, "POST", "/v1/step-ups", json=payment)
    assert refused(r, 403, "provider_suspended"), r.text
    r = await world.client.post(
        world.url(f"/v1/step-ups/{pending['id']}/approval/finish"),
        headers=human.headers,
        json={"credential": credential},
    )
    assert refused(r, 409, "provider_suspended"), r.text
    r = await world.client.post(
        world.url(f"/v1/step-ups/{pending['id']}/approval/begin"), headers=human.headers
    )
    assert refused(r, 409, "provider_suspended"), r.text
    assert await counts(db) == written
    assert await db.fetchval("SELECT status FROM step_ups WHERE id = $1", pending["id"]) == (
        "pending"
    )

    # Reinstated, the assertion made before still approves it: nothing was consumed.
    await reinstate(world, provider)
    r = await world.client.post(
        world.url(f"/v1/step-ups/{pending['id']}/approval/finish"),
        headers=human.headers,
        json={"credential": credential},
    )
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "approved"


@pytest.mark.asyncio
async def test_grant_and_step_up_views_say_which_provider_is_suspended(world: World) -> None:
    """Lists and single views agree, one query or many, and carry the suspension, so the
    page can say so instead of offering what the registry refuses."""
    human = await world.human()
    agent = await world.agent(human)
    held, open_ = await world.provider(), await world.provider()
    grants, steps = [], []
    for provider in (held, open_):
        request = await world.request(agent, provider, PAYMENTS, STEP_UP_ABOVE_50)
        grant = await world.approve(human, request["id"])
        grants.append(grant["id"])
        steps.append((await world.step_up(agent, grant["id"], "70"))["id"])
    other = await world.human("Mallory")
    await suspend(world, held, "audit in progress")

    async def get(path: str, headers: dict[str, str]) -> Any:
        r = await world.client.get(world.url(path), headers=headers)
        assert r.status_code == 200, r.text
        return r.json()

    async def as_agent(path: str) -> Any:
        r = await world.as_agent(agent, "GET", path)
        assert r.status_code == 200, r.text
        return r.json()

    for listed in (await get("/v1/grants", human.headers), await as_agent("/v1/grants")):
        assert [g["id"] for g in listed] == grants
        assert [g["provider_suspended"] for g in listed] == [True, False]
        assert listed == [await get(f"/v1/grants/{g}", human.headers) for g in grants]
    pending = await get("/v1/step-ups?status=pending", human.headers)
    assert [s["id"] for s in pending] == steps
    assert [s["provider_suspended"] for s in pending] == [True, False]
    assert pending == [await get(f"/v1/step-ups/{s}", human.headers) for s in steps]
    assert (await as_agent(f"/v1/step-ups/{steps[0]}"))["provider_suspended"] is True
    # Nobody else's lists show them.
    assert await get("/v1/grants", other.headers) == []
    assert await get("/v1/step-ups", other.headers) == []
    assert await get("/v1/step-ups?status=approved", human.headers) == []

    await reinstate(world, held)
    listed = await get("/v1/step-ups", human.headers)
    assert [s["provider_suspended"] for s in listed] == [False, False]
    assert [g["provider_suspended"] for g in await get("/v1/grants", human.headers)] == [
        False,
        False,
    ]
