"""Numbered, checksummed SQL migrations.

Files are ``NNNN_name.sql`` in one directory, applied in order, each in its own
transaction together with its ``schema_migrations`` row (but see below). Re-running is a
no-op. A migration whose file changed after it was applied is refused: the database would
no longer match what the files say, and silently moving on would hide that. A database
migrated further than these files go (a release rolled back) is used as it is, with a
warning: each migration is written for the release before it to keep working over it.

A file whose first line is exactly ``-- agentauth:no-transaction`` runs outside a
transaction, so that it can build and drop indexes without stopping writers: it may hold
nothing but ``CREATE [UNIQUE] INDEX CONCURRENTLY name ON table ...`` and ``DROP INDEX
CONCURRENTLY name`` statements (anything else is refused before any migration runs: a
migration outside a transaction that failed halfway through other DDL would leave a schema
no run could finish). Its statements run one at a time, then its ``schema_migrations`` row
is written. It resumes where it stopped: an index the file builds that is already there
and valid is taken as built, one left invalid by a build that failed or whose migrator died
is dropped and built again (``IF NOT EXISTS`` would take it as built), and an index the
file drops that is already gone is taken as dropped.

Timeouts. A migration in a transaction waits at most ``_LOCK_WAIT_MS`` for each lock, since
while it waits in a table's lock queue every writer queued behind it waits too; it gives way
and tries again, for about three minutes. A concurrent build or drop queues no writer: it
takes a lock that inserts, updates and deletes do not conflict with, then waits for the
transactions already writing to (or, for a drop, using) the table, and for every older
snapshot in the database, to end. Those waits are lock waits too, so a half-second
``lock_timeout`` would abort a build midway, whenever a transaction ran for half a second,
and throw its work away. It runs instead with ``lock_timeout`` at ``_CONCURRENT_WAIT_MS``
(about the same three minutes, once: a retry would start the build over) and no
``statement_timeout``: reading a large table takes as long as it takes, and holds back no
one but other DDL and vacuum on that table. The session's own settings come back after.
(A client-side timeout, a pool's ``command_timeout``, would still cancel it: migrate on a
connection of its own.)

One migrator at a time: each holds a session-level advisory lock for the whole run (a
transaction-level one would end with the first migration's transaction, and a
no-transaction migration has none). Others wait for it without holding a snapshot (see
``migrate``).
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
# How long a concurrent build or drop waits for one transaction to end: the same three
# minutes, in one wait (see the module docstring).
_CONCURRENT_WAIT_MS = 180_000
# A migrator waiting for another one asks again this often (see migrate).
_MIGRATOR_PAUSE = 0.5

# The first line of a migration that runs outside a transaction.
_NO_TRANSACTION = "-- agentauth:no-transaction"


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
    #: False for a file marked ``-- agentauth:no-transaction`` (see the module docstring).
    in_transaction: bool = True


def default_migrations_dir() -> Path:
    """The SQL files shipped inside the package (``agentauth/store/migrations``), so that a
    wheel carries them as a source checkout does."""
    return Path(__file__).resolve().parent / "migrations"


def discover(directory: Path) -> list[Migration]:
    migrations = []
    for path in sorted(directory.glob("*.sql")):
        match = _NAME.fullmatch(path.name)
        if not match:
            raise MigrationError(f"migration file name not understood: {path.name}")
        sql = path.read_text(encoding="utf-8")
        in_transaction = sql.split("\n", 1)[0].rstrip() != _NO_TRANSACTION
        if not in_transaction:
            _index_steps(path.name, sql)  # refused now, before any migration runs
        migrations.append(
            Migration(
                version=int(match.group(1)),
                name=path.name,
                sql=sql,
                checksum=hashlib.sha256(sql.encode("utf-8")).hexdigest(),
                in_transaction=in_transaction,
            )
        )
    if not migrations:
        # With no files here (an install that lost them: until 2026-12-01 a wheel did not
        # carry them), "up to date" would start the registry on a database without its
        # schema, or report a bare one migrated.
        raise MigrationError(
            f"no migrations in {directory}: this installation of AgentAuth is incomplete"
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
    #
    # Asked for again and again rather than waited for in pg_advisory_lock: a session
    # waiting inside a statement holds that statement's snapshot, and a concurrent index
    # build waits for every older snapshot in the database to go. The migrator building
    # would wait for the one waiting for it, until PostgreSQL called it a deadlock and
    # failed one of them.
    while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _LOCK_KEY):
        await asyncio.sleep(_MIGRATOR_PAUSE)
    try:
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
        except asyncpg.PostgresError as exc:
            # A standby, a database or role read-only by default, a role that may not
            # create tables: said as a migration's own failure is, not as a traceback.
            raise MigrationError(
                f"cannot make or read schema_migrations ({type(exc).__name__}: {exc});"
                " no migration was applied"
            ) from exc
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
            if migration.in_transaction:
                await _apply(conn, migration)
            else:
                await _apply_concurrently(conn, migration)
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


@dataclass(frozen=True, slots=True)
class _IndexStep:
    """One statement of a migration outside a transaction."""

    sql: str
    index: str  # as written (quotes and all), schema-qualified as the table is
    table: str | None  # None for a drop


# A no-transaction file, cut into comments, quoted text, statement ends and the rest.
# Escape strings (E'\'') and dollar quotes would be cut wrongly: a backslash or a dollar
# outside a comment is refused rather than guessed at.
_PART = re.compile(
    r"""(?P<comment>--[^\n]*|/\*.*?\*/)|(?P<quoted>'(?:[^'\\]|'')*'|"(?:[^"]|"")+")"""
    r"""|(?P<end>;)|(?P<other>[^-/'";\\$]+|[-/])""",
    re.DOTALL,
)
_IDENT = r'(?:"(?:[^"]|"")+"|[a-z_][a-z0-9_]*)'
_CREATE = re.compile(
    r"create\s+(?:unique\s+)?index\s+concurrently\s+(?:if\s+not\s+exists\s+)?"
    rf"(?P<index>{_IDENT})\s+on\s+(?P<table>(?:(?P<schema>{_IDENT})\.)?{_IDENT})(?=[\s(])",
    re.IGNORECASE,
)
_DROP = re.compile(
    rf"drop\s+index\s+concurrently\s+(?:if\s+exists\s+)?(?P<index>(?:{_IDENT}\.)?{_IDENT})",
    re.IGNORECASE,
)


def _index_steps(name: str, sql: str) -> list[_IndexStep]:
    """The statements of a no-transaction migration, each a named concurrent index build
    or drop; anything else is refused."""
    statements: list[str] = []
    current: list[str] = []
    position = 0
    while position < len(sql):
        part = _PART.match(sql, position)
        if part is None:
            raise MigrationError(
                f"migration {name} runs outside a transaction and holds what cannot be read"
                f" safely at character {position} (an unclosed quote, an escape"
                " string, a dollar quote)"
            )
        position = part.end()
        if part.group("end"):
            statements.append("".join(current).strip())
            current = []
        elif part.group("comment"):
            current.append(" ")
        else:
            current.append(part.group())
    statements.append("".join(current).strip())
    steps = []
    for statement in filter(None, statements):
        create = _CREATE.match(statement)
        drop = _DROP.fullmatch(statement)
        if create:
            index = create["index"]
            if create["schema"]:  # built in its table's schema
                index = f"{create['schema']}.{index}"
            steps.append(_IndexStep(sql=statement, index=index, table=create["table"]))
        elif drop:
            steps.append(_IndexStep(sql=statement, index=drop["index"], table=None))
        else:
            raise MigrationError(
                f"migration {name} runs outside a transaction, so it may hold only CREATE"
                " INDEX CONCURRENTLY (with the index named) and DROP INDEX CONCURRENTLY"
                f" statements; it holds: {' '.join(statement.split())[:80]}"
            )
    return steps


async def _apply_concurrently(conn: Conn, migration: Migration) -> None:
    """Run a no-transaction migration's statements one by one, resuming a run that
    stopped midway, then record it."""
    steps = _index_steps(migration.name, migration.sql)
    saved = {
        setting: await conn.fetchval("SELECT current_setting($1)", setting)
        for setting in ("lock_timeout", "statement_timeout")
    }
    await conn.execute(f"SET lock_timeout = {_CONCURRENT_WAIT_MS}")
    await conn.execute("SET statement_timeout = 0")
    step = None
    try:
        for step in steps:
            await _run_step(conn, migration, step)
        step = None
        await conn.execute(
            "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
            migration.version,
            migration.name,
            migration.checksum,
        )
    except asyncpg.LockNotAvailableError as exc:
        raise MigrationError(
            f"migration {migration.name} waited {_CONCURRENT_WAIT_MS / 1000:g} s for a"
            f" transaction to end{_at(step)}: a long transaction holds it up (see"
            " pg_stat_activity); the next run finishes what this one left, an invalid"
            " index included"
        ) from exc
    except asyncpg.PostgresError as exc:
        raise MigrationError(
            f"migration {migration.name} failed{_at(step)} ({type(exc).__name__}: {exc});"
            " it runs outside a transaction: what it did before stays done, and the next"
            " run resumes it, an invalid index included"
        ) from exc
    finally:
        if not conn.is_closed():
            for setting, value in saved.items():
                await conn.execute("SELECT set_config($1, $2, false)", setting, value)


def _at(step: _IndexStep | None) -> str:
    if step is None:
        return ""
    return f" at index {step.index}"


async def _run_step(conn: Conn, migration: Migration, step: _IndexStep) -> None:
    found = await conn.fetchrow(
        "SELECT i.indisvalid AS valid, i.indrelid = to_regclass($2) AS on_table"
        " FROM pg_index i WHERE i.indexrelid = to_regclass($1)",
        step.index,
        step.table,
    )
    if step.table is None:
        if found is None:
            log.info("migration %s: index %s is already dropped", migration.name, step.index)
            return
    elif found is not None and found["on_table"]:
        if found["valid"]:
            log.info("migration %s: index %s is already built", migration.name, step.index)
            return
        log.warning(
            "migration %s: index %s was left invalid by a build that stopped; dropping it"
            " and building it again",
            migration.name,
            step.index,
        )
        await conn.execute(f"DROP INDEX CONCURRENTLY {step.index}")
    if step.table is not None:
        log.info(
            "migration %s builds index %s on %s without stopping writes: it waits for the"
            " transactions writing to the table, then reads it"
            " (progress: pg_stat_progress_create_index)",
            migration.name,
            step.index,
            step.table,
        )
    # As a prepared statement, which PostgreSQL refuses to hold more than one command: the
    # statement run is the one checked, however its text was cut.
    await conn.fetch(step.sql)
