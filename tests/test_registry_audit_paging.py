"""GET /v1/audit/events in pages: a whole history read back in order, bad cursors refused,
and a cursor that carries no authority. In process (httpx's ASGI transport, no Ray), over
real PostgreSQL and Redis, on a registry of its own: these tests append events to its
chains, which the checkpoint tests of test_registry_service.py count."""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from registry_inprocess import Opened, append_events, read_pages, registry_in_process
from registry_world import Human

from agentauth.protocol import b64url_encode
from agentauth.registry._service import AUDIT_PAGE_MAX

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

EVENTS = "/v1/audit/events"


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def opened(
    database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Opened]:
    data_dir = tmp_path_factory.mktemp("registry")
    async with registry_in_process(database_url, redis_url, data_dir, prefix="paging") as o:
        yield o


async def stored(opened: Opened, column: str, value: str) -> list[dict[str, Any]]:
    """Every event of that agent or grant, in the listing's order, as the database holds it."""
    rows = await opened.registry.pool.fetch(
        f"SELECT body FROM audit_events WHERE {column} = $1 ORDER BY time_ms, chain, seq",
        value,
    )
    return [json.loads(r["body"]) for r in rows]


def flat(pages: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [event for page in pages for event in page]


@pytest.mark.asyncio(loop_scope="session")
async def test_a_history_longer_than_a_page_is_read_whole_in_order(opened: Opened) -> None:
    """Pages of 4 through an agent's and a grant's events, 13 of them written in the same
    millisecond over several chains: every event once, in (time_ms, chain, seq) order, no
    gap or repeat where equal times straddle a page boundary, and no next on the last page.
    Until 2026-11-30 limit and cursor were ignored: one answer, cut at 5,000 events."""
    world = opened.world
    human, agent, _, grant = await world.setup_grant()
    await append_events(
        opened, 13, time_ms=2_000_000_000_000, agent_id=agent.id, grant_id=grant["id"]
    )
    await append_events(opened, 3, time_ms=2_000_000_000_001, agent_id=agent.id)
    for column, value, headers in (
        ("agent_id", agent.id, human.headers),
        ("grant_id", grant["id"], human.headers),
        ("agent_id", agent.id, world.admin),
    ):
        expected = await stored(opened, column, value)
        assert len(expected) > 8  # three pages at least
        pages = await read_pages(world.client, EVENTS, headers, {column: value, "limit": 4})
        assert [len(p) for p in pages[:-1]] == [4] * (len(pages) - 1), pages
        assert 0 < len(pages[-1]) <= 4
        assert flat(pages) == expected
        positions = [(e["chain"], e["seq"]) for e in flat(pages)]
        assert len(set(positions)) == len(positions)
        assert any(
            before[-1]["time_ms"] == after[0]["time_ms"]
            for before, after in itertools.pairwise(pages)
        ), "no page boundary fell between events of one millisecond"
        # Without limit or cursor: the one answer it always was, its last page.
        r = await world.client.get(world.url(EVENTS), headers=headers, params={column: value})
        assert r.status_code == 200 and r.json() == expected and "link" not in r.headers


@pytest.mark.asyncio(loop_scope="session")
async def test_past_the_largest_page_the_next_one_follows(opened: Opened) -> None:
    """An agent with one event more than a page holds: the unpaged answer is its first
    AUDIT_PAGE_MAX events, as before, and now names a page with the rest."""
    world = opened.world
    human = await world.human()
    agent = await world.agent(human)
    before = len(await stored(opened, "agent_id", agent.id))
    await append_events(
        opened, AUDIT_PAGE_MAX + 1 - before, time_ms=2_000_000_000_000, agent_id=agent.id
    )
    expected = await stored(opened, "agent_id", agent.id)
    pages = await read_pages(world.client, EVENTS, human.headers, {"agent_id": agent.id})
    assert [len(p) for p in pages] == [AUDIT_PAGE_MAX, 1]
    assert flat(pages) == expected


@pytest.mark.asyncio(loop_scope="session")
async def test_newest_first_pages_read_the_history_backwards(opened: Opened) -> None:
    """With order=desc the pages run from the newest event back, each Link keeping the
    order, so a reader can stop after the newest few pages of a long history (the approval
    page's audit view does). The same events as oldest first, reversed, each once; a
    cursor from an oldest-first listing starts a newest-first one before its position.
    Until 2026-11-30 the listing ran oldest first only: the newest events of a history
    longer than a reader would go through could not be had without reading all of it."""
    world = opened.world
    human, agent, _, grant = await world.setup_grant()
    await append_events(
        opened, 13, time_ms=2_000_000_000_000, agent_id=agent.id, grant_id=grant["id"]
    )
    await append_events(opened, 3, time_ms=2_000_000_000_001, agent_id=agent.id)
    expected = await stored(opened, "agent_id", agent.id)
    params = {"agent_id": agent.id, "limit": 4, "order": "desc"}
    pages = await read_pages(world.client, EVENTS, human.headers, params)
    assert [len(p) for p in pages[:-1]] == [4] * (len(pages) - 1), pages
    assert flat(pages) == expected[::-1]
    # Unpaged, newest first: the newest events, and the rest named by a Link that keeps
    # the order.
    r = await world.client.get(
        world.url(EVENTS), headers=human.headers, params={"agent_id": agent.id, "order": "desc"}
    )
    assert r.status_code == 200 and r.json() == expected[::-1] and "link" not in r.headers
    r = await world.client.get(
        world.url(EVENTS), headers=human.headers, params={"agent_id": agent.id, "limit": 4}
    )
    cursor = httpx.URL(r.links["next"]["url"]).params["cursor"]  # after the 4th oldest
    r = await world.client.get(
        world.url(EVENTS),
        headers=human.headers,
        params={"agent_id": agent.id, "order": "desc", "cursor": cursor},
    )
    assert r.status_code == 200 and r.json() == expected[:3][::-1], r.text
    r = await world.client.get(
        world.url(EVENTS), headers=human.headers, params={"agent_id": agent.id, "order": "up"}
    )
    assert (r.status_code, r.json()["error"]) == (400, "invalid_request"), r.text


def encoded(value: Any) -> str:
    return b64url_encode(json.dumps(value).encode())


BAD_CURSORS = [
    "",
    "!",
    "a",  # no base64url is one character long
    "eyJ9==",  # padded
    "e30",  # {}
    b64url_encode(b"\xff\xfe"),
    encoded([1, "registry-0"]),
    encoded([1, "registry-0", 2, 3]),
    encoded([1.5, "registry-0", 2]),
    encoded([True, "registry-0", 2]),
    encoded(["1", "registry-0", 2]),
    encoded([1, "registry-0", None]),
    encoded([2**63, "registry-0", 2]),
    encoded([1, "registry-0", -(2**63) - 1]),
    encoded([1, "", 2]),
    encoded([1, "registry\u00000", 2]),
    encoded([1, "\ud800", 2]),
    encoded([1, "r" * 129, 2]),
    encoded([1, ["registry-0"], 2]),
    encoded(1e400),  # Infinity
    b64url_encode(b"[" * 250 + b"]" * 250),
    "A" * 4000,
    "\x00",
    "é",
]


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("cursor", BAD_CURSORS, ids=[str(i) for i in range(len(BAD_CURSORS))])
async def test_a_cursor_the_listing_did_not_give_is_refused(opened: Opened, cursor: str) -> None:
    """400 bad_cursor for anything that is not a position (a bigint, a chain's name, a
    bigint): never a 500 from the decoder or the database, nor a listing from nowhere."""
    world = opened.world
    human = await world.human()
    agent = await world.agent(human)
    r = await world.client.get(
        world.url(EVENTS), headers=human.headers, params={"agent_id": agent.id, "cursor": cursor}
    )
    assert r.status_code == 400, r.text
    assert (r.json()["error"], r.json()["reason"]) == ("invalid_request", "bad_cursor")


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("limit", ["0", "-1", str(AUDIT_PAGE_MAX + 1), "x", "1.5"])
async def test_a_limit_outside_one_page_is_refused(opened: Opened, limit: str) -> None:
    world = opened.world
    human = await world.human()
    agent = await world.agent(human)
    r = await world.client.get(
        world.url(EVENTS), headers=human.headers, params={"agent_id": agent.id, "limit": limit}
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "invalid_request"


async def first_cursor(world: Any, human: Human, agent_id: str) -> str:
    r = await world.client.get(
        world.url(EVENTS), headers=human.headers, params={"agent_id": agent_id, "limit": 1}
    )
    assert r.status_code == 200, r.text
    cursor = httpx.URL(r.links["next"]["url"]).params["cursor"]
    assert isinstance(cursor, str)
    return cursor


@pytest.mark.asyncio(loop_scope="session")
async def test_a_cursor_from_someone_elses_listing_shows_none_of_their_events(
    opened: Opened,
) -> None:
    """A cursor is a place in the order, not a permission: Bob holding one from Alice's
    listing (or one he made up) is still refused her agent, and with his own agent sees
    his own events only, from that place on."""
    world = opened.world
    alice, alices_agent, _, _ = await world.setup_grant()
    bob, bobs_agent, _, _ = await world.setup_grant()
    await append_events(opened, 5, time_ms=1, agent_id=alices_agent.id)
    await append_events(opened, 5, time_ms=1, agent_id=bobs_agent.id)
    alices = {(e["chain"], e["seq"]) for e in await stored(opened, "agent_id", alices_agent.id)}
    bobs = await stored(opened, "agent_id", bobs_agent.id)
    cursor = await first_cursor(world, alice, alices_agent.id)
    r = await world.client.get(
        world.url(EVENTS),
        headers=bob.headers,
        params={"agent_id": alices_agent.id, "cursor": cursor},
    )
    assert (r.status_code, r.json()["error"]) == (404, "not_found"), r.text
    # Hers, and one he made up from before the first event: his own listing from there.
    made_up = encoded([-(2**63), "0", -(2**63)])
    shown = {}
    for start in (cursor, made_up):
        params = {"agent_id": bobs_agent.id, "cursor": start, "limit": 3}
        shown[start] = flat(await read_pages(world.client, EVENTS, bob.headers, params))
        assert shown[start], "Bob sees nothing of his own"
        assert not alices & {(e["chain"], e["seq"]) for e in shown[start]}
        assert all(e in bobs for e in shown[start])
    assert shown[made_up] == bobs


@pytest.mark.asyncio(loop_scope="session")
async def test_a_consistency_question_from_a_larger_size_is_refused(opened: Opened) -> None:
    """GET /v1/audit/consistency with first past second is a 400 (it was a 404 saying no
    checkpoints have those sizes, while both did); in order, the same two answer."""
    world = opened.world
    for _ in range(2):
        await append_events(opened, 8, time_ms=1)  # the same chains both times
        await opened.registry.checkpoint_all()
    chain, first, second = await opened.registry.pool.fetchrow(
        "SELECT chain, min(size), max(size) FROM audit_checkpoints GROUP BY chain"
        " HAVING min(size) < max(size) ORDER BY chain LIMIT 1"
    )
    url = world.url("/v1/audit/consistency")
    r = await world.client.get(
        url, headers=world.admin, params={"chain": chain, "first": second, "second": first}
    )
    assert (r.status_code, r.json()["error"]) == (400, "invalid_request"), r.text
    r = await world.client.get(
        url, headers=world.admin, params={"chain": chain, "first": first, "second": second}
    )
    assert r.status_code == 200, r.text
