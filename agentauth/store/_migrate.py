"""Numbered, checksummed SQL migrations.

Files are ``NNNN_name.sql`` in one directory, applied in order, each in its own
transaction together with its ``schema_migrations`` row. Re-running is a no-op. A migration
whose file changed after it was applied is refused: the database would no longer match
what the files say, and silently moving on would hide that.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from ..protocol import AgentAuthError

__all__ = ["Conn", "Migration", "MigrationError", "default_migrations_dir", "discover", "migrate"]

#: A connection, whether direct or borrowed from a pool.
Conn = asyncpg.Connection | PoolConnectionProxy

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# Any constant works: it only has to be the same for every migrator of one database.
_LOCK_KEY = 0x4A67_4175_7468


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
    async with conn.transaction():
        # Serialize concurrent migrators (several replicas starting at once).
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
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
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                migration.version,
                migration.name,
                migration.checksum,
            )
            applied.append(migration.name)
    return applied
