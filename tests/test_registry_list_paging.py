"""GET /v1/step-ups and GET /v1/grant-requests in pages: each listing read back whole, in
order, with its filter kept; bad limits and cursors refused; a cursor that carries no
authority. In process (httpx's ASGI transport, no Ray), over real PostgreSQL and Redis,
on a registry of its own. Rows are written straight into the tables, many sharing one
created_at, as a month of an agent's step-ups would be too slow to ask for."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from conftest import migrated_connection
from registry_inprocess import ISSUER, Opened, read_pages, registry_in_process
from registry_world import Human

from agentauth.protocol import b64url_encode
from agentauth.registry import create_app
from agentauth.registry._service import LIST_PAGE_MAX
from agentauth.ui._registry import RegistryClient

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

STEP_UPS = "/v1/step-ups"
REQUESTS = "/v1/grant-requests"


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def opened(
    database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Opened]:
    data_dir = tmp_path_factory.mktemp("registry")
    async with registry_in_process(database_url, redis_url, data_dir, prefix="listpaging") as o:
        yield o


async def add_step_ups(opened: Opened, grant: dict[str, Any], n: int, *, tag: str) -> None:
    """``n`` step-ups of the grant, expired long ago (as an agent leaves them), all created
    in one instant but the last three, a second apart after it."""
    await opened.registry.pool.execute(
        "INSERT INTO step_ups (id, grant_id, agent_id, document, expires_at, created_at)"
        " SELECT $3 || '_' || lpad(i::text, 5, '0'), $1, $2, '{}', 1,"
        " timestamptz '2026-01-01' + greatest(i - $4 + 3, 0) * interval '1 second'"
        " FROM generate_series(1, $4) i",
        grant["id"],
        grant["agent_id"],
        f"stp_{tag}",
        n,
    )


async def add_requests(opened: Opened, agent_id: str, provider_id: str, n: int) -> None:
    """``n`` denied grant requests of the agent, as add_step_ups times them."""
    await opened.registry.pool.execute(
        "INSERT INTO grant_requests (id, agent_id, provider_id, capabilities, envelope, status,"
        " created_at) SELECT 'req_' || $1 || '_' || lpad(i::text, 5, '0'), $1, $2, '[]', '{}',"
        " 'denied', timestamptz '2026-01-01' + greatest(i - $3 + 3, 0) * interval '1 second'"
        " FROM generate_series(1, $3) i",
        agent_id,
        provider_id,
        n,
    )


def ids(pages: list[list[dict[str, Any]]]) -> list[str]:
    return [row["id"] for page in pages for row in page]


async def unpaged(opened: Opened, path: str, headers: dict[str, str], **params: str) -> list[str]:
    r = await opened.world.client.get(opened.world.url(path), headers=headers, params=params)
    assert r.status_code == 200 and "link" not in r.headers, r.text
    return [row["id"] for row in r.json()]


@pytest.mark.asyncio(loop_scope="session")
async def test_a_humans_step_ups_are_read_in_pages_in_order(opened: Opened) -> None:
    """Pages of 4 through a human's step-ups (two grants, 13 created in one instant): each
    once, in (created_at, id) order, the status filter kept in every Link, no next on the
    last page. Until 2026-11-30 limit and cursor were ignored and every step-up came in
    one answer."""
    world = opened.world
    human, agent, _, grant = await world.payments_grant()
    await add_step_ups(opened, grant, 16, tag="a")
    pending = await world.step_up(agent, grant["id"], "60")
    expected = await unpaged(opened, STEP_UPS, human.headers)
    assert len(expected) == 17 and expected[-1] == pending["id"]
    pages = await read_pages(world.client, STEP_UPS, human.headers, {"limit": 4})
    assert [len(p) for p in pages] == [4, 4, 4, 4, 1]
    assert ids(pages) == expected
    expired = await read_pages(
        world.client, STEP_UPS, human.headers, {"limit": 4, "status": "expired"}
    )
    assert ids(expired) == expected[:-1]
    assert all(row["status"] == "expired" for page in expired for row in page)
    only = await read_pages(world.client, STEP_UPS, human.headers, {"status": "pending"})
    assert ids(only) == [pending["id"]]


@pytest.mark.asyncio(loop_scope="session")
async def test_grant_requests_are_read_in_pages_by_the_human_and_the_agent(
    opened: Opened,
) -> None:
    world = opened.world
    human, agent, provider, _ = await world.setup_grant()
    [approved] = await unpaged(opened, REQUESTS, human.headers)
    await add_requests(opened, agent.id, provider.id, 10)
    expected = await unpaged(opened, REQUESTS, human.headers)
    assert len(expected) == 11 and approved in expected
    pages = await read_pages(world.client, REQUESTS, human.headers, {"limit": 3})
    assert [len(p) for p in pages] == [3, 3, 3, 2]
    assert ids(pages) == expected
    denied = await read_pages(
        world.client, REQUESTS, human.headers, {"limit": 3, "status": "denied"}
    )
    assert ids(denied) == [i for i in expected if i != approved]
    # The agent reads its own the same way, each page with a proof of its own URL.
    read: list[str] = []
    url = f"{REQUESTS}?limit=4"
    for _ in range(10):
        r = await world.as_agent(agent, "GET", url)
        assert r.status_code == 200, r.text
        read += [row["id"] for row in r.json()]
        following = r.links.get("next")
        if following is None:
            break
        joined = r.request.url.join(following["url"])
        url = f"{joined.path}?{joined.query.decode()}"
    assert read == expected


@pytest.mark.asyncio(loop_scope="session")
async def test_past_the_largest_page_the_next_one_follows(opened: Opened) -> None:
    """A human with one step-up more than a page holds: the unpaged answer is the first
    LIST_PAGE_MAX, and names a page with the rest. Until 2026-11-30 it held them all, however
    many an agent had left."""
    world = opened.world
    human, _, _, grant = await world.payments_grant()
    await add_step_ups(opened, grant, LIST_PAGE_MAX + 1, tag="big")
    pages = await read_pages(world.client, STEP_UPS, human.headers, {})
    assert [len(p) for p in pages] == [LIST_PAGE_MAX, 1]
    assert len(set(ids(pages))) == LIST_PAGE_MAX + 1


def encoded(value: object) -> str:
    import json

    return b64url_encode(json.dumps(value).encode())


BAD_CURSORS = [
    "x",
    "",
    "a" * 5000,
    encoded([1, "stp_x", 3]),  # an audit event's position
    encoded([1]),
    encoded(["1", "stp_x"]),
    encoded([1.5, "stp_x"]),
    encoded([2**63, "stp_x"]),
    encoded([-(2**63), "stp_x"]),  # a bigint, but no time a row was created at
    encoded([253402300800000000, "stp_x"]),  # the year 10000
    encoded([1, "stp\u0000x"]),
    encoded([1, "a" * 129]),
    encoded({"a": 1}),
]


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("path", [STEP_UPS, REQUESTS])
async def test_a_bad_limit_or_cursor_is_refused(opened: Opened, path: str) -> None:
    """400 for a limit outside one page and for a cursor the listing did not give (reason
    bad_cursor): never a 500 from the decoder or the database."""
    world = opened.world
    human = await world.human()
    for limit in ["0", "-1", str(LIST_PAGE_MAX + 1), "x", "1.5"]:
        r = await world.client.get(world.url(path), headers=human.headers, params={"limit": limit})
        assert r.status_code == 400, (limit, r.text)
        assert r.json()["error"] == "invalid_request"
    for cursor in BAD_CURSORS:
        r = await world.client.get(
            world.url(path), headers=human.headers, params={"cursor": cursor}
        )
        assert r.status_code == 400, (cursor, r.text)
        assert (r.json()["error"], r.json()["reason"]) == ("invalid_request", "bad_cursor")


async def first_cursor(world: Any, human: Human) -> str:
    r = await world.client.get(world.url(STEP_UPS), headers=human.headers, params={"limit": 1})
    assert r.status_code == 200, r.text
    cursor = httpx.URL(r.links["next"]["url"]).params["cursor"]
    assert isinstance(cursor, str)
    return cursor


@pytest.mark.asyncio(loop_scope="session")
async def test_a_cursor_from_someone_elses_listing_shows_none_of_theirs(opened: Opened) -> None:
    """A cursor is a place in the order, not a permission: Bob with Alice's cursor (or one
    he made up from before everything) reads his own step-ups only."""
    world = opened.world
    alice, _, _, alices_grant = await world.payments_grant()
    bob, _, _, bobs_grant = await world.payments_grant()
    await add_step_ups(opened, alices_grant, 5, tag="alice")
    await add_step_ups(opened, bobs_grant, 5, tag="bob")
    alices = set(await unpaged(opened, STEP_UPS, alice.headers))
    bobs = await unpaged(opened, STEP_UPS, bob.headers)
    assert len(bobs) == 5 and not alices & set(bobs)
    for start in (await first_cursor(world, alice), encoded([0, "0"])):
        shown = ids(
            await read_pages(world.client, STEP_UPS, bob.headers, {"cursor": start, "limit": 2})
        )
        assert shown and set(shown) <= set(bobs)
    assert shown == bobs


@pytest.mark.asyncio(loop_scope="session")
async def test_the_approval_page_reads_every_pending_item_past_one_page(opened: Opened) -> None:
    """The approval page's client follows the pages, so more pending step-ups than the
    registry's largest page holds, and more pending requests than the client's own page
    size, are all on the page, each once and in order, as when the registry answered them
    in one list (its requests made here against this registry). Without following, the
    page would show the first LIST_PAGE_MAX and leave the rest unanswered."""
    world = opened.world
    human, agent, provider, grant = await world.payments_grant()
    await add_step_ups(opened, grant, LIST_PAGE_MAX + 1, tag="ui")
    await opened.registry.pool.execute(
        "UPDATE step_ups SET expires_at = 4102444800 WHERE id LIKE 'stp_ui_%'"
    )
    await add_requests(opened, agent.id, provider.id, 9)
    await opened.registry.pool.execute(
        "UPDATE grant_requests SET status = 'pending',"
        " created_at = now() + (created_at - timestamptz '2026-01-01')"
        " WHERE agent_id = $1 AND status = 'denied'",
        agent.id,
    )
    steps = ids(await read_pages(world.client, STEP_UPS, human.headers, {"status": "pending"}))
    requests = await unpaged(opened, REQUESTS, human.headers, status="pending")
    assert (len(steps), len(requests)) == (LIST_PAGE_MAX + 1, 9)
    transport = httpx.ASGITransport(app=create_app(opened.registry))
    client = RegistryClient(ISSUER, transport=transport)
    small = RegistryClient(ISSUER, transport=transport, list_page_size=4)
    try:
        assert [s["id"] for s in await client.step_ups(human.session, "pending")] == steps
        assert [r["id"] for r in await small.grant_requests(human.session, "pending")] == requests
    finally:
        await client.aclose()
        await small.aclose()


@pytest.mark.asyncio(loop_scope="session")
async def test_a_page_after_a_cursor_reads_an_index_in_its_order(database_url: str) -> None:
    """A page after the first reads each of the caller's agents' rows from its position on
    (migration 0016), not every row the agent ever had; generic plans too, as asyncpg
    prepares every statement."""
    from agentauth.registry._service import (
        _AFTER_CREATED,
        _REQUEST_SELECT,
        _REQUEST_STATUS,
        _STEP_UP_SELECT,
        _STEP_UP_STATUS,
    )

    async with migrated_connection(database_url, "listplan") as conn:
        await conn.execute("SET session_replication_role = replica")  # rows alone
        await conn.execute(
            "INSERT INTO agents (id, principal_id, name, jkt, public_jwk)"
            " SELECT 'agt_' || n, 'prn_' || (n % 50), 'b', 'j' || n, '{}'"
            " FROM generate_series(1, 200) n"
        )
        await conn.execute(
            "INSERT INTO grants (id, request_id, agent_id, principal_id, provider_id, document,"
            " grant_hash) SELECT 'grt_' || n, 'req_' || n, 'agt_' || n, 'prn_' || (n % 50), 'p',"
            " '{}', 'h' FROM generate_series(1, 200) n"
        )
        for table, columns, value in (
            ("step_ups", "grant_id, document, expires_at", "'grt_' || (n % 200 + 1), '{}', 1"),
            ("grant_requests", "provider_id, capabilities, envelope", "'p', '[]', '{}'"),
        ):
            await conn.execute(
                # Fixed table and column names above.
                f"INSERT INTO {table} (id, agent_id, created_at, {columns})"
                " SELECT 'x_' || n, 'agt_' || (n % 200 + 1),"
                f" timestamptz '2026-01-01' + n * interval '1 second', {value}"
                " FROM generate_series(1, 200000) n"
            )
        await conn.execute("ANALYZE")
        after = [(1767225600 + 100000) * 1_000_000, "x_1"]
        queries = (
            (
                f"{_STEP_UP_SELECT} WHERE a.principal_id = $1 AND ($2::text IS NULL"
                f" OR {_STEP_UP_STATUS} = $2){_AFTER_CREATED.format(t='s', n=4, m=5)}"
                " ORDER BY s.created_at, s.id LIMIT $3",
                ["prn_3", None, 1001, *after],
                "step_ups_agent_in_order",
            ),
            (
                f"{_REQUEST_SELECT} WHERE a.principal_id = $1 AND ($3::text IS NULL"
                f" OR {_REQUEST_STATUS} = $3){_AFTER_CREATED.format(t='r', n=5, m=6)}"
                " ORDER BY r.created_at, r.id LIMIT $4",
                ["prn_3", 604800.0, None, 1001, *after],
                "grant_requests_agent_in_order",
            ),
        )
        for sql, args, index in queries:
            for mode in ("force_custom_plan", "force_generic_plan"):
                await conn.execute(f"SET plan_cache_mode = {mode}")
                plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + sql, *args))
                assert index in plan and "created_at >=" in plan, plan


@pytest.mark.asyncio(loop_scope="session")
async def test_a_cursor_names_its_row_to_the_microsecond(opened: Opened) -> None:
    """Step-ups a microsecond apart, far from 1970 either way (where a microsecond count
    is past what a double holds exactly): each page starts exactly after the row before,
    none skipped or repeated."""
    world = opened.world
    human, _, _, grant = await world.payments_grant()
    await opened.registry.pool.execute(
        "UPDATE step_ups SET status = 'denied' WHERE grant_id = $1", grant["id"]
    )
    await opened.registry.pool.execute(
        "INSERT INTO step_ups (id, grant_id, agent_id, document, expires_at, created_at)"
        " SELECT 'stp_us_' || k || '_' || i, $1, $2, '{}', 1,"
        " t::timestamptz + i * interval '1 microsecond'"
        " FROM unnest(ARRAY['0002-03-04 05:06:07.999998+00', '9998-01-02 03:04:05.999998+00'])"
        " WITH ORDINALITY AS times (t, k), generate_series(0, 3) i",
        grant["id"],
        grant["agent_id"],
    )
    expected = await unpaged(opened, STEP_UPS, human.headers, status="expired")
    assert len(expected) == 8
    pages = await read_pages(
        world.client, STEP_UPS, human.headers, {"status": "expired", "limit": 1}
    )
    assert ids(pages) == expected
