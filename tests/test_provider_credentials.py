"""Provider credentials: rotation with an overlap, ending the previous one early, who may do
either, and bad input. The registry on a real Serve app with PostgreSQL and Redis; the
verifier's side (every replica learns of a change within a second) is in test_verifier.py."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from typing import Any

import asyncpg
import pytest
from registry_world import Provider, World

pytestmark = [pytest.mark.ray, pytest.mark.postgres, pytest.mark.redis]


async def accepted(world: World, provider: Provider) -> bool:
    """Does the registry accept this credential? (A provider reading its own record.)"""
    r = await world.client.get(world.url(f"/v1/providers/{provider.id}"), headers=provider.headers)
    assert r.status_code in (200, 401), r.text
    if r.status_code == 401:
        assert r.json()["reason"] == "bad_provider_credential"
    return r.status_code == 200


async def rotate(
    world: World, provider: Provider, headers: dict[str, str], body: Any = None
) -> Provider:
    r = await world.client.post(
        world.url(f"/v1/providers/{provider.id}/secret"), headers=headers, json=body
    )
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["id"] == provider.id and answer["secret"].startswith("psk_")
    assert answer["secret"] != provider.secret
    return Provider(provider.id, provider.audience, answer["secret"])


async def provider_row(db: asyncpg.Connection, provider: Provider) -> dict[str, Any]:
    row = await db.fetchrow(
        "SELECT secret_hash, previous_secret_hash, previous_expires_at, credential_rotated_at"
        " FROM providers WHERE id = $1",
        provider.id,
    )
    return dict(row)


async def events(db: asyncpg.Connection, provider: Provider) -> list[dict[str, Any]]:
    """The provider's audit events (one chain: they are keyed by its id), oldest first."""
    rows = await db.fetch(
        "SELECT body FROM audit_events WHERE body::jsonb ->> 'subject' = $1 ORDER BY seq",
        f"provider:{provider.id}",
    )
    return [json.loads(r["body"]) for r in rows]


def seconds_from_now(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp() - time.time()


@pytest.mark.asyncio
async def test_an_admin_rotation_keeps_the_old_secret_through_its_overlap_then_it_ends(
    world: World, db: asyncpg.Connection
) -> None:
    old = await world.provider()
    r = await world.client.get(world.url(f"/v1/providers/{old.id}"), headers=old.headers)
    assert r.json()["previous_credential_valid_until"] is None
    assert r.json()["credential_rotated_at"] is None

    new = await rotate(world, old, world.admin, {"previous_valid_for": 600})
    assert await accepted(world, old) and await accepted(world, new)
    record = (
        await world.client.get(world.url(f"/v1/providers/{old.id}"), headers=new.headers)
    ).json()
    assert 590 < seconds_from_now(record["previous_credential_valid_until"]) <= 600
    assert record["credential_rotated_at"] is not None

    # The provider itself, with its current secret, ends the overlap early.
    r = await world.client.delete(
        world.url(f"/v1/providers/{old.id}/secret/previous"), headers=new.headers
    )
    assert r.status_code == 200, r.text
    assert r.json() == {"id": old.id, "previous_credential_valid_until": None}
    assert not await accepted(world, old)
    assert await accepted(world, new)

    # Both changes are on the audit chain, with who made them and no secret material.
    rows = await events(db, old)
    assert [(e["event"], e["actor"]) for e in rows] == [
        ("provider.registered", "admin"),
        ("provider.secret_rotated", "admin"),
        ("provider.previous_secret_ended", f"provider:{old.id}"),
    ]
    stored = await provider_row(db, new)
    text = json.dumps(rows)
    for secret in (old.secret, new.secret):
        assert secret not in text
    assert bytes(stored["secret_hash"]).hex() not in text

    # Ending an overlap that is over changes and records nothing.
    r = await world.client.delete(
        world.url(f"/v1/providers/{old.id}/secret/previous"), headers=world.admin
    )
    assert r.status_code == 200
    assert len(await events(db, old)) == 3
    assert await provider_row(db, new) == stored


@pytest.mark.asyncio
async def test_no_overlap_stops_the_old_secret_at_once_and_a_provider_holds_at_most_two(
    world: World,
) -> None:
    first = await world.provider()
    second = await rotate(world, first, world.admin, {"previous_valid_for": 0})
    assert not await accepted(world, first)
    assert await accepted(world, second)
    r = await world.client.get(world.url(f"/v1/providers/{first.id}"), headers=second.headers)
    assert r.json()["previous_credential_valid_until"] is None

    # Rotating again inside an overlap: the secret before the previous one stops at once.
    third = await rotate(world, second, second.headers, {"previous_valid_for": 600})
    fourth = await rotate(world, third, third.headers, {"previous_valid_for": 600})
    assert [await accepted(world, p) for p in (second, third, fourth)] == [False, True, True]


@pytest.mark.asyncio
async def test_the_default_overlap_is_an_hour_and_it_ends_by_itself(
    world: World, db: asyncpg.Connection
) -> None:
    old = await world.provider()
    new = await rotate(world, old, old.headers)  # no body: the default overlap
    stored = await provider_row(db, new)
    left = stored["previous_expires_at"].timestamp() - time.time()
    assert 3590 < left <= 3600
    # An overlap that has run out: the old secret is refused with no other change.
    await db.execute(
        "UPDATE providers SET previous_expires_at = now() - interval '1 second' WHERE id = $1",
        old.id,
    )
    assert not await accepted(world, old)
    assert await accepted(world, new)


@pytest.mark.asyncio
async def test_only_the_admin_or_the_provider_with_its_current_secret_may_change_it(
    world: World, db: asyncpg.Connection
) -> None:
    human, agent, victim, _ = await world.setup_grant()
    other = await world.provider()
    current = await rotate(world, victim, world.admin, {"previous_valid_for": 600})
    previous = victim  # still accepted, inside its overlap
    assert await accepted(world, previous)
    stored = await provider_row(db, current)
    count = await db.fetchval("SELECT count(*) FROM audit_events")

    secret = f"/v1/providers/{victim.id}/secret"
    for method, path in (("POST", secret), ("DELETE", secret + "/previous")):
        # The previous secret may authenticate but must not take the provider over.
        r = await world.client.request(method, world.url(path), headers=previous.headers)
        assert (r.status_code, r.json()["reason"]) == (403, "previous_credential"), r.text
        r = await world.client.request(method, world.url(path), headers=other.headers)
        assert (r.status_code, r.json()["reason"]) == (403, "wrong_provider"), r.text
        r = await world.client.request(method, world.url(path), headers=human.headers)
        assert (r.status_code, r.json()["reason"]) == (403, "wrong_caller"), r.text
        r = await world.as_agent(agent, method, path)
        assert (r.status_code, r.json()["reason"]) == (403, "wrong_caller"), r.text
        r = await world.client.request(method, world.url(path))
        assert r.status_code == 401
        r = await world.client.request(
            method, world.url(path.replace(victim.id, "prov-nobody")), headers=world.admin
        )
        assert r.status_code == 404, r.text

    assert await provider_row(db, current) == stored
    assert await db.fetchval("SELECT count(*) FROM audit_events") == count
    assert await accepted(world, previous) and await accepted(world, current)


@pytest.mark.asyncio
async def test_bad_rotation_input_is_a_400_and_writes_nothing(
    world: World, db: asyncpg.Connection
) -> None:
    provider = await world.provider()
    stored = await provider_row(db, provider)
    count = await db.fetchval("SELECT count(*) FROM audit_events")
    await world.each_refused_as_invalid(
        "POST",
        f"/v1/providers/{provider.id}/secret",
        [
            b'{"previous_valid_for": -1}',
            b'{"previous_valid_for": 604801}',
            b'{"previous_valid_for": "60"}',
            b'{"previous_valid_for": 1.5}',
            b'{"previous_valid_for": true}',
            b'{"previous_valid_for": null}',
            b'{"previous_valid_for": 60, "previous_valid_for": 0}',
            b'{"overlap": 60}',
            b"[60]",
            b"{not json",
        ],
    )
    assert await provider_row(db, provider) == stored
    assert await db.fetchval("SELECT count(*) FROM audit_events") == count
    assert await accepted(world, provider)


@pytest.mark.asyncio
async def test_the_cli_lists_providers_with_their_rotation_and_no_secret(
    world: World, db: asyncpg.Connection, database_url: str
) -> None:
    old = await world.provider()
    new = await rotate(world, old, world.admin, {"previous_valid_for": 600})
    unrotated = await world.provider()
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "agentauth.cli", "providers", "list"],
        env={**os.environ, "DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    header, *lines = out.stdout.splitlines()
    assert header.split() == [
        "id",
        "audience",
        "kinds",
        "created_at",
        "credential_rotated_at",
        "previous_valid_until",
        "suspended_at",
    ]
    rows = {line.split()[0]: line.split() for line in lines}
    # A rotated provider shows both times (date and time are two words each), an unrotated
    # one neither ("-"); neither is suspended.
    assert len(rows[old.id]) == 3 + 2 * 3 + 1 and rows[old.id][2] == "read,write,transact"
    assert len(rows[unrotated.id]) == 3 + 2 + 2 * 1 + 1
    assert rows[old.id][-1] == rows[unrotated.id][-1] == "-"
    stored = await provider_row(db, new)
    for secret in (
        old.secret,
        new.secret,
        bytes(stored["secret_hash"]).hex(),
        bytes(stored["previous_secret_hash"]).hex(),
    ):
        assert secret not in out.stdout
