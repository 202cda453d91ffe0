"""A registry on a database of its own, driven through its FastAPI app in process (httpx's
ASGI transport, no Ray), by the same ``World`` the Ray tests use."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from conftest import _wait_out_replay_epoch, new_database
from registry_world import World

from agentauth.registry import Registry, RegistrySettings, create_app

ISSUER = "http://r.test"
UNLIMITED_STARTS = {"anonymous_client_limit": 1_000_000, "anonymous_global_limit": 1_000_000}


async def table_counts(pool: Any, tables: Iterable[str] | None = None) -> dict[str, int]:
    """Rows per table: the ``tables`` named (a test's own constants), or every table of the
    database, so a test can show that a refused request wrote nothing."""
    if tables is None:
        rows = await pool.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        tables = [r["tablename"] for r in rows]
    return {t: int(await pool.fetchval(f'SELECT count(*) FROM "{t}"')) for t in tables}


@dataclass
class Opened:
    registry: Registry
    world: World
    url: str  # the database's

    async def counts(self) -> dict[str, int]:
        """Rows in every table: what a refused request must leave as it was."""
        return await table_counts(self.registry.pool)


async def read_pages(
    client: httpx.AsyncClient, path: str, headers: dict[str, str], params: dict[str, Any]
) -> list[list[dict[str, Any]]]:
    """Every page of a listing, following each answer's Link rel="next" (relative to its
    request's URL)."""
    pages = []
    url = httpx.URL(ISSUER + path, params=params)
    while True:
        r = await client.get(url, headers=headers)
        assert r.status_code == 200, r.text
        pages.append(r.json())
        following = r.links.get("next")
        if following is None:
            return pages
        url = r.request.url.join(following["url"])
        assert len(pages) < 1000, "the pages never end"


async def append_events(
    opened: Opened, n: int, *, time_ms: int, event: str = "t.paged", **ids: str
) -> None:
    """``n`` events named ``event`` at one ``time_ms`` about the agent and/or grant in
    ``ids`` (``agent_id=``, ``grant_id=``), in one transaction, spread over the chains (each
    keyed apart), so equal times are ordered by chain, then seq."""
    audit = opened.registry.audit
    async with opened.registry.pool.acquire() as conn, conn.transaction():
        for i in range(n):
            await audit.append(
                conn, event=event, actor="t", subject=f"s{i}", key=f"k{i}", time_ms=time_ms, **ids
            )


@asynccontextmanager
async def registry_on_new_database(
    database_url: str, redis_url: str, data_dir: Path, *, prefix: str, **settings: Any
) -> AsyncIterator[tuple[Registry, str]]:
    """A registry (``RegistrySettings`` overridden by ``settings``) opened on a new database
    named ``prefix_<random>``; yields it and the database's URL, and drops the database after.
    Anonymous starts are limited far above what any test sends (every test's client is
    127.0.0.1, against one Redis), unless ``settings`` say otherwise."""
    settings = {**UNLIMITED_STARTS, **settings}
    async with new_database(database_url, prefix) as url:
        registry = await Registry.open(
            RegistrySettings(
                database_url=url,
                redis_url=redis_url,
                data_dir=data_dir,
                issuer=ISSUER,
                admin_token=secrets.token_urlsafe(24),
                **settings,
            )
        )
        try:
            yield registry, url
        finally:
            await registry.close()


@asynccontextmanager
async def registry_in_process(
    database_url: str, redis_url: str, data_dir: Path, *, prefix: str, **settings: Any
) -> AsyncIterator[Opened]:
    """Open it (``RegistrySettings`` overridden by ``settings``) on a new database named
    ``prefix_<random>``; drop that database after."""
    async with registry_on_new_database(
        database_url, redis_url, data_dir, prefix=prefix, **settings
    ) as (registry, url):
        _wait_out_replay_epoch(redis_url)
        transport = httpx.ASGITransport(app=create_app(registry))
        async with httpx.AsyncClient(transport=transport, base_url=ISSUER, timeout=60) as client:
            admin_token = registry.settings.admin_token
            world = World(client=client, base=ISSUER, admin_token=admin_token)
            yield Opened(registry, world, url)
