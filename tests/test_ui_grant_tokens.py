"""The active grants page's access tokens and the audit page's events, read from a real
registry: in process (httpx's ASGI transport, no Ray, no browser), over real PostgreSQL and
Redis, on a registry of its own (these tests append events to its chains). The pages are
built in a bare NiceGUI client as in test_ui_pages.py, with the real RegistryClient in
front of the registry's app."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from nicegui import Client
from nicegui.elements.mixins.text_element import TextElement
from nicegui.page import page
from registry_inprocess import ISSUER, Opened, append_events, registry_in_process
from registry_world import Human
from starlette.requests import Request

from agentauth.registry import create_app
from agentauth.ui import RegistryClient, SessionStore, UISettings
from agentauth.ui._pages import Pages
from agentauth.ui._registry import AUDIT_PAGE_MAX

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

# One more than the page read of a grant's and an agent's audit events until 2026-11-30.
BUSY = 5001


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def opened(
    database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Opened]:
    data_dir = tmp_path_factory.mktemp("registry")
    async with registry_in_process(database_url, redis_url, data_dir, prefix="uitokens") as o:
        yield o


async def issue(opened: Opened, agent: Any, grant_id: str) -> str:
    """A new token of the grant, as the agent gets one; its jti."""
    held = "SELECT jti FROM issued_tokens WHERE grant_id = $1"
    before = {r["jti"] for r in await opened.registry.pool.fetch(held, grant_id)}
    r = await opened.world.token(agent, grant_id)
    assert r.status_code == 200, r.text
    (jti,) = {r["jti"] for r in await opened.registry.pool.fetch(held, grant_id)} - before
    return str(jti)


async def revoke_token(opened: Opened, human: Human, jti: str) -> None:
    r = await opened.world.client.post(
        opened.world.url("/v1/revocations"),
        headers=human.headers,
        json={"kind": "token", "target": jti},
    )
    assert r.status_code == 200, r.text


async def grants_page_texts(
    opened: Opened,
    human: Human,
    audit_of: str | None = None,
    *,
    audit_page_size: int = AUDIT_PAGE_MAX,
    **settings: Any,
) -> list[str]:
    """The texts of the active grants page as ``human`` sees it, or with ``audit_of`` (an
    agent's id) of the audit page of that agent; ``settings`` for the page's UISettings,
    ``audit_page_size`` for its registry client's pages of events."""
    store = SessionStore(ttl=3600, ticket_ttl=60)
    ticket = store.sign_in(
        "anonymous", principal_id=human.principal_id, registry_token=human.session
    )
    cookie_id = store.claim(ticket, "anonymous")
    assert cookie_id is not None
    transport = httpx.ASGITransport(app=create_app(opened.registry))
    registry = RegistryClient(ISSUER, transport=transport, audit_page_size=audit_page_size)
    try:
        settings = UISettings(registry_url=ISSUER, **settings)
        pages = Pages(settings=settings, registry=registry, store=store)
        path = "/" if audit_of is None else "/audit"
        built = {"type": "http", "method": "GET", "path": path, "root_path": "", "headers": []}
        built |= {"query_string": b"", "state": {"agentauth_cookie_id": cookie_id}}
        client = Client(page(path), request=Request(built))
        with client:
            session = store.get(cookie_id)
            assert session is not None
            if audit_of is None:
                await pages._grants(cookie_id, session)
            else:
                await pages._audit(cookie_id, session, audit_of)
        return [
            e.text for e in client.layout.descendants() if isinstance(e, TextElement) and e.text
        ]
    finally:
        await registry.aclose()


@pytest.mark.asyncio(loop_scope="session")
async def test_a_busy_grants_newest_tokens_are_listed_and_revoked_ones_are_not(
    opened: Opened,
) -> None:
    """More than 5,000 events of the grant and its agent before its newest tokens: the page
    lists the newest token, and not the one revoked after those events. Until 2026-11-30
    the page worked its tokens out from the grant's and the agent's oldest 5,000 audit
    events: the newest token was missing, and a token revoked late showed as in use."""
    world = opened.world
    human, agent, _, grant = await world.setup_grant()
    early = await issue(opened, agent, grant["id"])
    before = int(time.time() * 1000) - 60_000
    await append_events(
        opened, BUSY, time_ms=before, event="t.busy", agent_id=agent.id, grant_id=grant["id"]
    )
    await revoke_token(opened, human, early)
    newest = await issue(opened, agent, grant["id"])
    texts = " ".join(await grants_page_texts(opened, human))
    assert f"Token {newest} ·" in texts, texts
    assert early not in texts, texts
    assert "Access tokens in use (1)" in texts, texts


@pytest.mark.asyncio(loop_scope="session")
async def test_a_grants_tokens_are_shown_only_to_whom_the_grant_is(opened: Opened) -> None:
    """GET /v1/grants/{id}/tokens answers whoever may see the grant (its human, its agent)
    and 404 to anyone else, as GET /v1/grants/{id} does; expired and revoked tokens are
    not in it."""
    world = opened.world
    alice, agent, _, grant = await world.setup_grant()
    bob = await world.human("Bob")
    jti = await issue(opened, agent, grant["id"])
    path = f"/v1/grants/{grant['id']}/tokens"
    r = await world.client.get(world.url(path), headers=alice.headers)
    assert r.status_code == 200, r.text
    assert [t["jti"] for t in r.json()] == [jti]
    r = await world.as_agent(agent, "GET", path)
    assert r.status_code == 200 and [t["jti"] for t in r.json()] == [jti], r.text
    r = await world.client.get(world.url(path), headers=bob.headers)
    assert (r.status_code, r.json()["error"]) == (404, "not_found"), r.text
    assert (
        await opened.registry.grant_tokens(
            grant["id"], now=int(time.time()) + 3600, principal_id=alice.principal_id
        )
        == []
    )
    await revoke_token(opened, alice, jti)
    r = await world.client.get(world.url(path), headers=alice.headers)
    assert r.status_code == 200 and r.json() == [], r.text


@pytest.mark.asyncio(loop_scope="session")
async def test_a_busy_agents_newest_events_are_on_its_audit_page(opened: Opened) -> None:
    """More events of an agent than the page reads, in pages of 4: the audit page shows the
    newest, and says that older ones are not shown; allowed them all, it reads every page
    and shows them all. (The shipped bound is 5,000 events in pages of 5,000; smaller ones
    here make the same walk over a dozen events.) Until 2026-11-30 it read the registry's
    first page only, the oldest events, and said nothing of the rest."""
    world = opened.world
    human, agent, _, _ = await world.setup_grant()
    before = int(time.time() * 1000) - 60_000
    older = 12
    await append_events(opened, older, time_ms=before, event="t.busy", agent_id=agent.id)
    now = int(time.time() * 1000)
    await append_events(opened, 1, time_ms=now, event="t.newest", agent_id=agent.id)
    total = await opened.registry.pool.fetchval(
        "SELECT count(*) FROM audit_events WHERE agent_id = $1", agent.id
    )
    texts = await grants_page_texts(opened, human, agent.id, audit_page_size=4, max_audit_events=10)
    # The grant's own events and the newest come after the older ones, back-dated a minute.
    assert "t.newest" in texts and "grant.approved" in texts
    assert texts.count("t.busy") == 10 - (total - older)
    assert "The audit trail is only partly checked: older events not read" in texts, texts[:40]
    assert (
        "History: only the newest 10 events of this agent are shown (the most this page"
        " reads); it has older ones, neither shown nor checked here."
    ) in texts
    texts = await grants_page_texts(
        opened, human, agent.id, audit_page_size=4, max_audit_events=total + 1
    )
    assert "t.newest" in texts and texts.count("t.busy") == older
    assert not any(t.startswith("History: only") for t in texts)
    assert not any("events not read" in t for t in texts)
