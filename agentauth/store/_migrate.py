"""Numbered, checksummed SQL migrations.

Files are ``NNNN_name.sql`` in one directory, applied in order, each in its own
transaction together with its ``schema_migrations`` row. Re-running is a no-op. A migration
whose file changed after it was applied is refused: the database would no longer match
what the files say, and silently moving on would hide that. A database migrated further
than these files go (a release rolled back) is used as it is, with a warning: each
migration is written for the release before it to keep working over it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from ..protocol import AgentAuthError

__all__ = ["Conn", "Migration", "MigrationError", "default_migrations_dir", "discover", "migrate"]

#: A connection, whether direct or borrowed from a pool.
Conn = asyncpg.Connection | PoolConnectionProxy

log = logging.getLogger("agentauth.store")

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# Any constant works: it only has to be the same for every migrator of one database.
_LOCK_KEY = 0x4A67_4175_7468
# How long a migration waits for a table lock before it gives way and tries again. While it
# waits in a table's lock queue everything queued behind it waits too (every verifier
# shard's commit, for audit_heads): under a shard's 2 s statement timeout, by a margin.
_LOCK_WAIT_MS = 500
_LOCK_PAUSE = 1.0
# About three minutes of tries, then the migrator gives up and says why.
_LOCK_TRIES = 120


class MigrationError(AgentAuthError):
    error = "migration_error"
    status_hint = 500
    default_description = "the database schema cannot be migrated"


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str
    checksum: str


def default_migrations_dir() -> Path:
    """``migrations/`` beside the package (a source checkout or an editable install)."""
    return Path(__file__).resolve().parents[2] / "migrations"


def discover(directory: Path) -> list[Migration]:
    migrations = []
    for path in sorted(directory.glob("*.sql")):
        match = _NAME.fullmatch(path.name)
        if not match:
            raise MigrationError(f"migration file name not understood: {path.name}")
        sql = path.read_text(encoding="utf-8")
        migrations.append(
            Migration(
                version=int(match.group(1)),
                name=path.name,
                sql=sql,
                checksum=hashlib.sha256(sql.encode("utf-8")).hexdigest(),
            )
        )
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise MigrationError(
            f"migrations must be numbered 0001, 0002, ... without gaps: {versions}"
        )
    return migrations


async def migrate(conn: Conn, directory: Path | None = None) -> list[str]:
    """Apply pending migrations; return the names applied (empty when up to date)."""
    migrations = discover(directory or default_migrations_dir())
    applied: list[str] = []
    # Serialize concurrent migrators (several replicas starting at once): the loser waits,
    # then finds everything applied. A session lock, held across the migrations' own
    # transactions: one transaction for them all would hold every table lock each one
    # takes (a hot table's among them) until the last had finished.
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version integer PRIMARY KEY,
                   name text NOT NULL,
                   checksum text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {
            row["version"]: row
            for row in await conn.fetch("SELECT version, name, checksum FROM schema_migrations")
        }
        for migration in migrations:
            row = done.get(migration.version)
            if row is not None:
                if row["checksum"] != migration.checksum:
                    raise MigrationError(
                        f"migration {migration.name} was edited after it was applied "
                        f"(applied checksum {row['checksum'][:12]},"
                        f" file {migration.checksum[:12]}); "
                        "add a new migration instead of editing an applied one"
                    )
                continue
            await _apply(conn, migration)
            applied.append(migration.name)
        newer = sorted(row["name"] for version, row in done.items() if version > len(migrations))
        if newer:
            log.warning(
                "the database has migrations this release does not know (%s): running over"
                " a newer schema, as after a rollback",
                ", ".join(newer),
            )
    finally:
        if not conn.is_closed():
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return applied


async def _apply(conn: Conn, migration: Migration) -> None:
    for tries in range(1, _LOCK_TRIES + 1):
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = {_LOCK_WAIT_MS}")
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
            return
        except asyncpg.LockNotAvailableError:
            if tries == 1:
                log.warning(
                    "migration %s waits for a table another transaction holds; retrying",
                    migration.name,
                )
            await asyncio.sleep(_LOCK_PAUSE)
        except asyncpg.PostgresError as exc:
            # Its SQL failed (data it cannot convert, a constraint the rows break): rolled
            # back alone. Named here, since the server's message does not say which file;
            # the message is the server's, about the schema, never a connection string.
            raise MigrationError(
                f"migration {migration.name} failed and was rolled back"
                f" ({type(exc).__name__}: {exc}); the ones before it stay applied"
            ) from exc
    raise MigrationError(
        f"migration {migration.name} could not take its tables' locks in {_LOCK_TRIES} tries:"
        " a long transaction holds one (see pg_stat_activity)"
    )
