"""The admin's commands (`agentauth providers add|rotate-secret|end-previous|suspend|
reinstate`, `agentauth agents disable`, `agentauth revoke`) against the session's real
database and Redis, with their effects checked through the running registry's HTTP API:
the same service layer, so the same checks, audit events and change epochs."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from registry_world import World

from agentauth.cli import main

pytestmark = [pytest.mark.ray, pytest.mark.postgres, pytest.mark.redis]

Cli = Callable[..., Awaitable[tuple[int, str, str]]]


@pytest.fixture
def cli(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    registry_settings: Any,
    registry_base: str,
) -> Cli:
    """Run one command as an operator on the registry's host would: (exit code, out, err)."""
    monkeypatch.setenv("DATABASE_URL", registry_settings.database_url)
    monkeypatch.setenv("REDIS_URL", registry_settings.redis_url)
    monkeypatch.setenv("AGENTAUTH_DATA_DIR", str(registry_settings.data_dir))

    async def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        # The command runs its own event loop, so not on the test's: in a thread.
        code = await asyncio.to_thread(main, list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def basic(provider_id: str, secret: str) -> dict[str, str]:
    raw = base64.b64encode(f"{provider_id}:{secret}".encode()).decode()
    return {"Authorization": f"Basic {raw}"}


def secret_in(out: str) -> str:
    return next(w for w in out.split() if w.startswith("psk_"))


async def events_about(db: asyncpg.Connection, subject: str) -> list[tuple[str, str]]:
    rows = await db.fetch(
        "SELECT body FROM audit_events WHERE body::jsonb ->> 'subject' = $1 ORDER BY seq",
        subject,
    )
    return [(json.loads(r["body"])["event"], json.loads(r["body"])["actor"]) for r in rows]


@pytest.mark.asyncio
async def test_a_provider_managed_from_the_command_line(
    cli: Cli, world: World, db: asyncpg.Connection
) -> None:
    pid = "cli-" + secrets.token_hex(3)
    own = world.url(f"/v1/providers/{pid}")
    code, out, _ = await cli(
        "providers", "add", pid, "--audience", f"https://{pid}.example", "--kinds", "read"
    )
    assert code == 0, out
    first = secret_in(out)
    r = await world.client.get(own, headers=basic(pid, first))
    assert r.status_code == 200, r.text
    assert r.json()["allowed_kinds"] == ["read"]

    # A leak: a new secret, the old one stopped at once.
    code, out, _ = await cli("providers", "rotate-secret", pid, "--previous-valid-for", "0")
    assert code == 0 and "the previous one stopped" in out, out
    second = secret_in(out)
    assert (await world.client.get(own, headers=basic(pid, first))).status_code == 401
    assert (await world.client.get(own, headers=basic(pid, second))).status_code == 200
    # A routine rotation keeps the previous secret for its overlap; ending it stops it.
    code, out, _ = await cli("providers", "rotate-secret", pid)
    assert code == 0 and "works until" in out, out
    third = secret_in(out)
    assert (await world.client.get(own, headers=basic(pid, second))).status_code == 200
    assert (await world.client.get(own, headers=basic(pid, third))).status_code == 200
    code, out, _ = await cli("providers", "end-previous", pid)
    assert code == 0, out
    assert (await world.client.get(own, headers=basic(pid, second))).status_code == 401

    code, out, _ = await cli("providers", "suspend", pid, "--reason", "contract ended")
    assert code == 0 and "contract ended" in out, out
    r = await world.client.get(own, headers=basic(pid, third))
    assert (r.status_code, r.json()["reason"]) == (403, "provider_suspended")
    code, out, _ = await cli("providers", "list")
    line = next(row for row in out.splitlines() if row.startswith(pid + " "))
    assert code == 0 and "None" not in line and line == line.rstrip()
    assert line.split()[-2:] != ["-", "-"]  # suspended_at is set (a time, not "-")
    code, out, _ = await cli("providers", "reinstate", pid)
    assert code == 0, out
    assert (await world.client.get(own, headers=basic(pid, third))).status_code == 200

    assert await events_about(db, f"provider:{pid}") == [
        ("provider.registered", "admin"),
        ("provider.secret_rotated", "admin"),
        ("provider.secret_rotated", "admin"),
        ("provider.previous_secret_ended", "admin"),
        ("provider.suspended", "admin"),
        ("provider.reinstated", "admin"),
    ]


@pytest.mark.asyncio
async def test_bad_admin_commands_say_why_and_change_nothing(
    cli: Cli, world: World, db: asyncpg.Connection
) -> None:
    provider = await world.provider()
    before = await db.fetchval("SELECT count(*) FROM audit_events")
    cases = [
        (("providers", "suspend", "nope", "--reason", "x"), 1, "no such provider"),
        (("providers", "reinstate", "nope"), 1, "no such provider"),
        (("providers", "rotate-secret", "nope"), 1, "no such provider"),
        (("providers", "end-previous", "nope"), 1, "no such provider"),
        (("providers", "suspend", provider.id, "--reason", ""), 2, "reason"),
        (("providers", "suspend", provider.id, "--reason", "r" * 201), 2, "reason"),
        (("providers", "rotate-secret", provider.id, "--previous-valid-for", "-1"), 2, "previous"),
        (("providers", "add", "a b", "--audience", "https://x.example"), 2, "id"),
        (("providers", "add", "p-x", "--audience", "https://x.example", "--kinds", "fly"), 2, ""),
        (("providers", "add", provider.id, "--audience", "https://y.example"), 1, "exists"),
        (("agents", "disable", "agt_nope"), 1, "no such agent"),
        (("revoke", "grant", "grt_nope"), 1, "no such grant"),
    ]
    for argv, status, words in cases:
        code, _, err = await cli(*argv)
        assert code == status and err.startswith("error: ") and words in err, (argv, code, err)
    assert await db.fetchval("SELECT count(*) FROM audit_events") == before
    r = await world.client.get(world.url(f"/v1/providers/{provider.id}"), headers=provider.headers)
    assert r.status_code == 200 and r.json()["suspended_at"] is None


@pytest.mark.asyncio
async def test_revoking_and_disabling_from_the_command_line(
    cli: Cli, world: World, db: asyncpg.Connection
) -> None:
    human, agent, _, grant = await world.setup_grant()
    assert (await world.token(agent, grant["id"])).status_code == 200
    code, out, _ = await cli("revoke", "grant", grant["id"])
    assert code == 0, out
    r = await world.token(agent, grant["id"])
    assert (r.status_code, r.json()["reason"]) == (403, "grant_revoked")
    assert (
        await db.fetchval(
            "SELECT revoked_by FROM revocations WHERE kind = 'grant' AND target = $1", grant["id"]
        )
        == "admin"
    )

    code, out, _ = await cli("agents", "disable", agent.id)
    assert code == 0, out
    r = await world.as_agent(agent, "GET", "/v1/grants")
    assert (r.status_code, r.json()["reason"]) == (403, "agent_disabled")
    r = await world.client.get(world.url(f"/v1/agents/{agent.id}"), headers=human.headers)
    assert r.json()["status"] == "disabled"


@pytest.mark.asyncio
async def test_a_recovery_code_from_the_command_line(cli: Cli, world: World) -> None:
    human = await world.human("Rita")
    code, out, _ = await cli("humans", "list")
    assert code == 0 and human.principal_id in out and "Rita" in out, out
    code, out, _ = await cli("humans", "recover", human.principal_id)
    assert code == 0, out
    recovery = next(w for w in out.split() if w.startswith("rec_"))
    r = await world.client.post(world.url("/v1/recovery/begin"), json={"code": recovery})
    assert r.status_code == 200 and r.json()["user"]["id"], r.text
    code, _, err = await cli("humans", "recover", "hum_nobody")
    assert code == 1 and "no such human" in err, err
