"""Migrations: applied once, re-running is a no-op, an edited applied migration is refused."""

from __future__ import annotations

import asyncio
import itertools
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from conftest import new_database

from agentauth.store import MigrationError, default_migrations_dir, discover, migrate

pytestmark = pytest.mark.postgres


@pytest_asyncio.fixture(loop_scope="session")
async def fresh_db(database_url: str) -> AsyncIterator[str]:
    """A database of its own (the session database is shared with the registry tests)."""
    async with new_database(database_url, "mig") as url:
        yield url


@pytest.mark.asyncio
async def test_migrations_apply_once_then_are_a_no_op(fresh_db: str) -> None:
    conn = await asyncpg.connect(fresh_db)
    try:
        applied = await migrate(conn)
        assert applied == [m.name for m in discover(default_migrations_dir())]
        assert await migrate(conn) == []
        tables = {r["tablename"] for r in await conn.fetch("SELECT tablename FROM pg_tables")}
        assert {"principals", "agents", "grants", "audit_events", "revocations"} <= tables
        assert {"audit_checkpoints", "audit_nodes"} <= tables
    finally:
        await conn.close()


@pytest.mark.asyncio
async def test_an_edited_applied_migration_is_refused(fresh_db: str, tmp_path: Path) -> None:
    copy = tmp_path / "migrations"
    shutil.copytree(default_migrations_dir(), copy)
    conn = await asyncpg.connect(fresh_db)
    try:
        await migrate(conn, copy)
        first = sorted(copy.glob("*.sql"))[0]
        first.write_text(first.read_text() + "\n-- edited\n")
        with pytest.raises(MigrationError, match="was edited after it was applied"):
            await migrate(conn, copy)
    finally:
        await conn.close()


@pytest.mark.asyncio
async def test_passkeys_from_before_0010_keep_their_backup_state_and_have_no_be(
    fresh_db: str, tmp_path: Path
) -> None:
    """0010 stores BE: a passkey registered before has none to give (NULL, recorded at its
    next use), keeps the BS it registered with, and BS without BE stays impossible."""
    copy = tmp_path / "migrations"
    copy.mkdir()
    migrations = {m.version: m for m in discover(default_migrations_dir())}

    def up_to(version: int) -> Path:
        for n in range(1, version + 1):
            (copy / migrations[n].name).write_text(migrations[n].sql, encoding="utf-8")
        return copy

    conn = await asyncpg.connect(fresh_db)
    try:
        await migrate(conn, up_to(9))
        await conn.execute("INSERT INTO principals (id, display_name) VALUES ('hum_1', 'A')")
        await conn.execute(
            "INSERT INTO passkey_credentials (credential_id, principal_id, public_key, backed_up)"
            " VALUES ('synced', 'hum_1', '\\x00', true), ('single', 'hum_1', '\\x00', false)"
        )
        assert await migrate(conn, up_to(10)) == ["0010_passkey_backup_flags.sql"]
        rows = await conn.fetch(
            "SELECT credential_id, backup_eligible, backed_up FROM passkey_credentials"
            " ORDER BY credential_id"
        )
        assert [tuple(r) for r in rows] == [("single", None, False), ("synced", None, True)]
        insert = (
            "INSERT INTO passkey_credentials (credential_id, principal_id, public_key,"
            " backup_eligible, backed_up) VALUES ($1, 'hum_1', '\\x00', $2, $3)"
        )
        await conn.execute(insert, "eligible", True, True)
        await conn.execute(insert, "device", False, False)
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(insert, "bs-without-be", False, True)
    finally:
        await conn.close()


@pytest.mark.asyncio
async def test_a_failing_migration_leaves_the_ones_before_it_applied(
    fresh_db: str, tmp_path: Path
) -> None:
    """Each migration commits on its own: one that fails is rolled back alone, and the next
    run starts from it (one transaction for them all held every table lock each took,
    hot tables' too, until the last had finished)."""
    copy = tmp_path / "migrations"
    broken = with_one_more(copy, "broken", "CREATE TABLE half_done (id int);\nSELECT 1 / 0;\n")
    last = len(discover(copy)) - 1
    conn = await asyncpg.connect(fresh_db)
    try:
        with pytest.raises(MigrationError, match=f"migration {broken.name} failed") as failed:
            await migrate(conn, copy)
        assert isinstance(failed.value.__cause__, asyncpg.DivisionByZeroError)
        recorded = await conn.fetchval("SELECT max(version) FROM schema_migrations")
        assert recorded == last
        assert await conn.fetchval("SELECT to_regclass('half_done')") is None
        broken.write_text("CREATE TABLE half_done (id int);\n")
        assert await migrate(conn, copy) == [broken.name]
    finally:
        await conn.close()


@pytest.mark.asyncio
async def test_a_database_that_refuses_writes_is_a_migration_error(fresh_db: str) -> None:
    """A standby, or a database or role read-only by default: making schema_migrations,
    before any migration, failed with asyncpg's traceback out of `agentauth migrate`
    (and a replica's start), where each migration's own failure is a MigrationError."""
    admin = await asyncpg.connect(fresh_db)
    try:
        name = await admin.fetchval("SELECT current_database()")
        await admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
    finally:
        await admin.close()
    conn = await asyncpg.connect(fresh_db)
    try:
        with pytest.raises(MigrationError, match="schema_migrations") as refused:
            await migrate(conn)
        assert isinstance(refused.value.__cause__, asyncpg.ReadOnlySQLTransactionError)
    finally:
        await conn.close()
    run = [sys.executable, "-m", "agentauth.cli", "migrate"]
    out = subprocess.run(
        run, env={"DATABASE_URL": fresh_db}, capture_output=True, text=True, check=False
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    assert out.stderr.startswith("error: ") and "read-only transaction" in out.stderr


@pytest.mark.asyncio
async def test_a_database_newer_than_the_code_is_used_with_a_warning(
    fresh_db: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """After a rollback the older release runs over the newer schema (each migration keeps
    the release before it working), and says so instead of "up to date" alone."""
    copy = tmp_path / "migrations"
    newer = with_one_more(copy, "from_the_future", "SELECT 1;\n")
    conn = await asyncpg.connect(fresh_db)
    try:
        await migrate(conn, copy)
        caplog.clear()
        with caplog.at_level("WARNING", logger="agentauth.store"):
            assert await migrate(conn) == []
        assert newer.name in caplog.text
    finally:
        await conn.close()


@pytest.mark.asyncio
async def test_a_grants_pending_step_ups_and_a_humans_listing_read_indexes(fresh_db: str) -> None:
    """A step-up request reads its grant's pending step-ups, and a human's listing reaches
    step-ups through their agents: with many agents' step-ups in the table, neither must
    read them all (nothing indexed step_ups but its id and approval reference)."""
    conn = await asyncpg.connect(fresh_db)
    try:
        await migrate(conn)
        # Step-ups alone: their parent rows do not change the plan, so the foreign keys'
        # triggers are off for this session (it connects as a superuser).
        await conn.execute("SET session_replication_role = replica")
        await conn.execute(
            "INSERT INTO step_ups (id, grant_id, agent_id, document, expires_at)"
            " SELECT 'stp_' || n, 'grt_' || (n % 2000 + 1), 'agt_' || (n % 2000 + 1), '{}', 0"
            " FROM generate_series(1, 100000) n"
        )
        await conn.execute("ANALYZE step_ups")
        for query, indexes in (
            (
                "SELECT id FROM step_ups WHERE grant_id = 'grt_7' AND agent_id = 'agt_7'",
                ("step_ups_grant", "step_ups_agent"),  # either serves
            ),
            ("SELECT id FROM step_ups WHERE agent_id = 'agt_7'", ("step_ups_agent",)),
        ):
            plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + query))
            assert "Seq Scan" not in plan, plan
            assert any(index in plan for index in indexes), plan
    finally:
        await conn.close()


@pytest.mark.asyncio
async def test_counting_a_humans_enrollment_codes_reads_an_index(fresh_db: str) -> None:
    """create_enrollment counts the human's live codes on every mint: with codes of many
    humans in the table, that must not read them all."""
    conn = await asyncpg.connect(fresh_db)
    try:
        await migrate(conn)
        await conn.execute(
            "INSERT INTO principals (id, display_name)"
            " SELECT 'hum_' || n, 'H' FROM generate_series(1, 5000) n"
        )
        await conn.execute(
            "INSERT INTO enrollments (code_hash, principal_id, expires_at)"
            " SELECT sha256(n::text::bytea), 'hum_' || (n % 5000 + 1), now() + interval '1 hour'"
            " FROM generate_series(1, 100000) n"
        )
        await conn.execute("ANALYZE enrollments")
        rows = await conn.fetch(
            "EXPLAIN SELECT count(*) FROM enrollments WHERE principal_id = 'hum_42'"
            " AND used_at IS NULL AND expires_at > now()"
        )
        plan = "\n".join(r[0] for r in rows)
        assert "Seq Scan" not in plan, plan
        assert "enrollments_principal" in plan, plan
    finally:
        await conn.close()


@pytest.mark.asyncio
async def test_a_registry_waits_out_another_migrating_past_its_statement_timeout(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    """Replicas starting at once: the one that loses the migration lock waits for the one
    migrating, however long that takes (an index built on a large table). It waited on a
    pool connection, whose statements time out at 10 s, and so failed to start."""
    from agentauth.registry import Registry, RegistrySettings

    copy = tmp_path / "migrations"
    with_one_more(copy, "slow", "SELECT pg_sleep(11);\n")
    async with new_database(database_url, "migwait") as url:
        other = await asyncpg.connect(url)
        try:
            migrating = asyncio.create_task(migrate(other, copy))
            while not await other_holds_a_lock(url):
                await asyncio.sleep(0.05)
            settings = RegistrySettings(
                database_url=url,
                redis_url=redis_url,
                data_dir=tmp_path / "registry",
                issuer="http://r.test",
                admin_token="a" * 24,
            )
            registry = await Registry.open(settings)
            await registry.close()
            assert migrating.done()
            await migrating
        finally:
            await other.close()


async def other_holds_a_lock(url: str) -> bool:
    conn = await asyncpg.connect(url)
    try:
        held = await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        return bool(held)
    finally:
        await conn.close()


@pytest.mark.asyncio
async def test_a_migration_waiting_for_a_lock_does_not_hold_back_a_hot_table(
    fresh_db: str, tmp_path: Path
) -> None:
    """An ALTER waiting for a table that a long transaction reads queues every write behind
    it (every shard commit, for audit_heads): until that transaction ended, not one went
    through. It now gives way after a short wait and tries again."""
    conn = await asyncpg.connect(fresh_db)
    reader = await asyncpg.connect(fresh_db)
    writer = await asyncpg.connect(fresh_db)
    try:
        await migrate(conn)
        await conn.execute("INSERT INTO audit_heads (chain, size, head) VALUES ('c', 0, '')")
        copy = tmp_path / "migrations"
        added = with_one_more(copy, "alter", "ALTER TABLE audit_heads ADD COLUMN later bigint;\n")
        await reader.execute("BEGIN")
        await reader.fetch("SELECT * FROM audit_heads")
        migrating = asyncio.create_task(migrate(conn, copy))
        try:
            await asyncio.sleep(0.3)
            for size in (1, 2, 3):
                await asyncio.wait_for(
                    writer.execute("UPDATE audit_heads SET size = $1 WHERE chain = 'c'", size),
                    timeout=2.0,
                )
            assert not migrating.done()
        finally:
            await reader.execute("COMMIT")
        assert await asyncio.wait_for(migrating, timeout=10.0) == [added.name]
    finally:
        for c in (conn, reader, writer):
            await c.close()


@pytest.mark.asyncio
async def test_a_migration_that_never_gets_its_lock_gives_up_and_says_why(
    fresh_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agentauth.store import _migrate

    monkeypatch.setattr(_migrate, "_LOCK_TRIES", 2)
    monkeypatch.setattr(_migrate, "_LOCK_PAUSE", 0.1)
    conn = await asyncpg.connect(fresh_db)
    reader = await asyncpg.connect(fresh_db)
    try:
        await migrate(conn)
        copy = tmp_path / "migrations"
        added = with_one_more(copy, "alter", "ALTER TABLE audit_heads ADD COLUMN later bigint;\n")
        async with reader.transaction():
            await reader.fetch("SELECT * FROM audit_heads")
            with pytest.raises(MigrationError, match="long transaction"):
                await asyncio.wait_for(migrate(conn, copy), timeout=10.0)
        assert await migrate(conn, copy) == [added.name]
    finally:
        for c in (conn, reader):
            await c.close()


def test_migration_files_must_be_numbered_without_gaps(tmp_path: Path) -> None:
    (tmp_path / "0001_a.sql").write_text("SELECT 1;")
    (tmp_path / "0003_c.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match="without gaps"):
        discover(tmp_path)
    (tmp_path / "notes.sql").write_text("")
    with pytest.raises(MigrationError, match="not understood"):
        discover(tmp_path)


def test_a_directory_without_migrations_is_refused(tmp_path: Path) -> None:
    """An install without the migration files (a wheel, which ships only the package) must
    not pass for a database that is up to date: the registry would start on no schema."""
    with pytest.raises(MigrationError, match="no migrations in"):
        discover(tmp_path / "absent")
    with pytest.raises(MigrationError, match="no migrations in"):
        discover(tmp_path)


@pytest.mark.asyncio
async def test_migrating_from_a_directory_without_migrations_applies_nothing_and_fails(
    fresh_db: str, tmp_path: Path
) -> None:
    conn = await asyncpg.connect(fresh_db)
    try:
        with pytest.raises(MigrationError, match="no migrations in"):
            await migrate(conn, tmp_path / "absent")
        assert await conn.fetchval("SELECT to_regclass('schema_migrations')") is None
    finally:
        await conn.close()


def test_agentauth_migrate_command(fresh_db: str) -> None:
    env = {"DATABASE_URL": fresh_db, "PATH": "/usr/bin:/bin"}
    run = [sys.executable, "-m", "agentauth.cli", "migrate"]
    first = subprocess.run(run, env=env, capture_output=True, text=True, check=False)
    assert first.returncode == 0, first.stderr
    assert "0001_initial.sql" in first.stdout
    again = subprocess.run(run, env=env, capture_output=True, text=True, check=False)
    assert again.returncode == 0 and "up to date" in again.stdout
    helped = subprocess.run([*run[:-1], "--help"], capture_output=True, text=True, check=False)
    assert "migrate" in helped.stdout


def test_embedded_postgres_serves_the_same_code_path(tmp_path: Path) -> None:
    import asyncio

    from agentauth.store import EmbeddedPostgres

    server = EmbeddedPostgres(tmp_path / "pg")
    try:

        async def check() -> list[str]:
            conn = await asyncpg.connect(server.url)
            try:
                return await migrate(conn)
            finally:
                await conn.close()

        assert asyncio.run(check()) == [m.name for m in discover(default_migrations_dir())]
    finally:
        server.stop()


def required_settings(data_dir: Path) -> dict[str, Any]:
    """The registry settings without defaults, as placeholders (nothing connects)."""
    return {
        "database_url": "postgresql://x/y",
        "redis_url": "redis://x",
        "data_dir": data_dir,
        "issuer": "http://r",
        "admin_token": "a" * 20,
    }


def test_sign_up_can_be_closed_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from pydantic import ValidationError

    from agentauth.registry import RegistrySettings

    given = required_settings(tmp_path)
    assert RegistrySettings.from_env(**given).open_signup is True
    monkeypatch.setenv("AGENTAUTH_OPEN_SIGNUP", "false")
    assert RegistrySettings.from_env(**given).open_signup is False
    monkeypatch.setenv("AGENTAUTH_OPEN_SIGNUP", "perhaps")
    with pytest.raises(ValidationError):
        RegistrySettings.from_env(**given)


def test_signer_settings_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from agentauth.registry import RegistrySettings

    monkeypatch.setenv("AGENTAUTH_SIGNER_BACKEND", "vault")
    monkeypatch.setenv("AGENTAUTH_SIGNER_KEY_ID", "registry")
    monkeypatch.setenv("AGENTAUTH_SIGNER_VAULT_TOKEN", "s.secret-token")
    settings = RegistrySettings.from_env(**required_settings(tmp_path))
    assert (settings.signer.backend, settings.signer.key_id) == ("vault", "registry")
    assert settings.signer.vault_token == "s.secret-token"
    assert "s.secret-token" not in repr(settings)  # secrets stay out of logs
    with_passwords = RegistrySettings.from_env(
        database_url="postgresql://registry:db-password@x/y",
        redis_url="redis://:redis-password@x",
        data_dir=tmp_path,
        issuer="http://r",
        admin_token="a" * 20,
    )
    assert "password" not in repr(with_passwords)


def test_a_configured_signer_takes_its_secret_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A deployment's config (Serve args) names the backend and the key; the Vault token
    or the PKCS#11 PIN comes from the environment (a Kubernetes Secret). The config's
    signer replaced the environment's whole, so the token was never read and no chart could
    run Vault or PKCS#11 without writing the secret into its config."""
    from agentauth.registry import RegistrySettings, SignerSettings

    monkeypatch.setenv("AGENTAUTH_SIGNER_VAULT_TOKEN", "s.from-a-secret")
    monkeypatch.setenv("AGENTAUTH_SIGNER_KEY_ID", "from-the-environment")
    base = required_settings(tmp_path)
    configured = {"backend": "vault", "key_id": "registry", "endpoint": "https://vault:8200"}
    for given in (configured, SignerSettings(**configured)):
        signer = RegistrySettings.from_env(**base, signer=given).signer
        assert (signer.backend, signer.key_id, signer.endpoint) == (
            "vault",
            "registry",  # the config's, field by field over the environment's
            "https://vault:8200",
        )
        assert signer.vault_token == "s.from-a-secret"
    monkeypatch.delenv("AGENTAUTH_SIGNER_VAULT_TOKEN")
    monkeypatch.delenv("AGENTAUTH_SIGNER_KEY_ID")
    # With no token from anywhere, the settings are refused (they were accepted, and every
    # signature was then 403).
    with pytest.raises(ValueError, match="exactly one of vault_token"):
        RegistrySettings.from_env(**base, signer=configured)


def test_a_vault_signer_takes_exactly_one_of_a_token_and_a_token_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The token file (Vault Agent's sink, rewritten as tokens expire) is an alternative
    to the token itself. Both, neither, or an empty one is refused at start, saying which
    settings, never what the token is."""
    from pydantic import ValidationError

    from agentauth.registry import RegistrySettings, SignerSettings

    base = required_settings(tmp_path)
    configured = {"backend": "vault", "key_id": "registry", "endpoint": "https://vault:8200"}
    monkeypatch.setenv("AGENTAUTH_SIGNER_VAULT_TOKEN_FILE", "/vault/secrets/token")
    signer = RegistrySettings.from_env(**base, signer=configured).signer
    assert (signer.vault_token_file, signer.vault_token) == ("/vault/secrets/token", None)

    secret = "hvs.both-given-and-must-not-leak"
    monkeypatch.setenv("AGENTAUTH_SIGNER_VAULT_TOKEN", secret)
    with pytest.raises(ValidationError) as caught:
        RegistrySettings.from_env(**base, signer=configured)
    assert "got vault_token and vault_token_file" in str(caught.value)
    assert secret not in str(caught.value)
    monkeypatch.delenv("AGENTAUTH_SIGNER_VAULT_TOKEN_FILE")
    monkeypatch.delenv("AGENTAUTH_SIGNER_VAULT_TOKEN")
    with pytest.raises(ValidationError, match="got neither"):
        RegistrySettings(**base, signer=SignerSettings(**configured))
    for empty in ({"vault_token": " "}, {"vault_token_file": ""}):
        with pytest.raises(ValidationError, match="is empty"):
            RegistrySettings(**base, signer={**configured, **empty})
    # Another backend ignores the Vault settings, as it always did.
    aws = {"backend": "aws", "key_id": "k", "vault_token": secret}
    assert RegistrySettings(**base, signer=aws).signer.backend == "aws"
    with_token = RegistrySettings(**base, signer={**configured, "vault_token": secret})
    assert secret not in repr(with_token)


@pytest.mark.parametrize(
    ("signer", "named"),
    [
        ({"backend": "aws"}, "needs key_id"),
        ({"backend": "gcp", "key_id": " "}, "needs key_id"),
        ({"backend": "vault", "vault_token": "s.t"}, "needs key_id"),
        ({"backend": "pkcs11", "pkcs11_token": "agentauth"}, "needs key_id"),
        ({"backend": "pkcs11", "key_id": "registry"}, "needs pkcs11_token"),
        ({"backend": "pkcs11", "key_id": "registry", "pkcs11_token": ""}, "needs pkcs11_token"),
    ],
)
def test_a_signer_without_its_key_name_is_refused_at_start(
    tmp_path: Path, signer: dict[str, str], named: str
) -> None:
    """A KMS, Vault or HSM signer needs the key's name (and an HSM the token's label): one
    without it was accepted and opened a key named "None", failing at the first signature,
    far from the setting to blame."""
    from pydantic import ValidationError

    from agentauth.registry import RegistrySettings

    base = required_settings(tmp_path)
    with pytest.raises(ValidationError, match=named):
        RegistrySettings(**base, signer=signer)
    named_key = {**signer, "key_id": "registry", "pkcs11_token": "agentauth"}
    assert RegistrySettings(**base, signer=named_key).signer.key_id == "registry"
    assert RegistrySettings(**base).signer.key_id is None  # the local backend names none


def test_checkpoints_come_well_within_what_verifiers_allow_unsealed(tmp_path: Path) -> None:
    """Events older than MAX_UNSEALED_AGE under no checkpoint fail `audit verify` and the
    approval page, as deleted checkpoints would: an interval near it would fail honest
    chains, so the setting is bounded well inside it."""
    from pydantic import ValidationError

    from agentauth.protocol import MAX_UNSEALED_AGE
    from agentauth.registry import RegistrySettings

    base = required_settings(tmp_path)
    assert RegistrySettings(**base, checkpoint_every_seconds=30).checkpoint_every_seconds == 30
    for seconds in (MAX_UNSEALED_AGE, 31, 0):
        with pytest.raises(ValidationError):
            RegistrySettings(**base, checkpoint_every_seconds=seconds)


@pytest.mark.parametrize(
    "values",
    [
        # Every ceremony, session, enrollment code or step-up expired as it was made.
        {"challenge_ttl": 0},
        {"session_ttl": -1},
        {"enrollment_ttl": 0},
        {"step_up_ttl": 0},
        # Past PostgreSQL's timestamps: every sign-in (or ceremony) a 500.
        {"session_ttl": 10**13},
        {"challenge_ttl": 10**13},
        {"recovery_ttl": 10**13},
        {"grant_request_ttl": 10**13},
        # A checkpoint every half second, whatever checkpoint_every_seconds says.
        {"checkpoint_every_events": 0},
        # The pool refused at the first start, in asyncpg's words (min_size, max_size).
        {"pool_max_size": 0},
        {"pool_min_size": -1},
        {"pool_min_size": 5, "pool_max_size": 2},
    ],
)
def test_settings_that_break_every_request_are_refused_naming_the_setting(
    values: dict[str, int], tmp_path: Path
) -> None:
    """These were taken at start and found out by the requests they broke, none of whose
    errors named the setting."""
    from pydantic import ValidationError

    from agentauth.registry import RegistrySettings

    with pytest.raises(ValidationError) as refused:
        RegistrySettings(**required_settings(tmp_path), **values)
    text = str(refused.value)
    assert any(name in text for name in values), text


@pytest.mark.asyncio
async def test_a_page_of_audit_events_reads_an_index_in_its_order(fresh_db: str) -> None:
    """GET /v1/audit/events pages an agent's or a grant's events in (time_ms, chain, seq)
    order from a cursor: each page must read its rows from an index in time order, not
    find the whole history and sort it (the single-column indexes on agent_id and
    grant_id did, once per page). Generic plans too: asyncpg prepares every statement.
    The indexes hold no more than that order needs: until 2026-11-30 they held chain and
    seq as well, about a quarter more storage an event for the whole audit log."""
    from agentauth.registry._service import audit_page_sql

    conn = await asyncpg.connect(fresh_db)
    try:
        await migrate(conn)
        # Events alone: audit_heads rows do not change the plan (foreign keys off).
        await conn.execute("SET session_replication_role = replica")
        await conn.execute(
            "INSERT INTO audit_events (chain, seq, entry_hash, body, event, agent_id, grant_id,"
            " time_ms) SELECT 'registry-' || (n % 8), n, '\\x00', '{}', 'verify.allow',"
            " 'agt_' || (n % 4), 'grt_' || (n % 8), 1700000000000 + n / 3"
            " FROM generate_series(1, 400000) n"
        )
        await conn.execute("ANALYZE audit_events")
        # Every decision writes an entry to each: keyed by id and time alone they take about
        # 32 bytes an event here, where (id, time_ms, chain, seq) took 94 and 100.
        for index in ("audit_events_agent_in_order", "audit_events_grant_in_order"):
            size = await conn.fetchval("SELECT pg_relation_size($1::regclass)", index)
            assert size / 400_000 < 50, (index, size)
        position = (1700000010000, "registry-3", 30003)
        for agent, grant in ((True, False), (False, True), (True, True)):
            ids = [v for v, given in (("agt_3", agent), ("grt_3", grant)) if given]
            for after, newest_first in itertools.product((False, True), (False, True)):
                sql = audit_page_sql(
                    agent=agent, grant=grant, after=after, newest_first=newest_first
                )
                # Far enough from the end it reads towards: near it, reading what is left
                # and sorting it is the better plan.
                start = (1700000120000, "registry-3", 360003) if newest_first else position
                args = [*ids, *(start if after else ()), 5001]
                for mode in ("force_custom_plan", "force_generic_plan"):
                    await conn.execute(f"SET plan_cache_mode = {mode}")
                    plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + sql, *args))
                    assert "Seq Scan" not in plan, plan
                    if agent and grant:
                        # Named together (no client does): the planner takes the two as
                        # independent and may read the grant's events and sort them.
                        continue
                    index = (
                        "audit_events_agent_in_order" if agent else "audit_events_grant_in_order"
                    )
                    # Newest first, the same index read backwards.
                    scan = "Index Scan Backward" if newest_first else "Index Scan"
                    assert f"{scan} using {index}" in plan, plan
                    # Events of one millisecond put in (chain, seq) order as they are read,
                    # never all of the agent's or grant's events sorted at once.
                    assert not re.search(r"(?<!Incremental )Sort  \(", plan), plan
                    if after:  # the position bounds the scan, the rest of it filters
                        beyond = "<" if newest_first else ">"
                        assert re.search(rf"Index Cond: .*time_ms {beyond}=", plan), plan
                        filtered = rf"Filter: .*ROW\(time_ms, chain, seq\) {beyond}"
                        assert re.search(filtered, plan), plan
    finally:
        await conn.close()


MARKER = "-- agentauth:no-transaction"
IN_ORDER = ("audit_events_agent_in_order", "audit_events_grant_in_order")
# 0014 and every migration after it (0015 drops what 0014 replaces; 0016 builds others).
FROM_0014 = [m.name for m in discover(default_migrations_dir())][13:]


def with_one_more(directory: Path, name: str, sql: str) -> Path:
    """The shipped migrations copied into ``directory`` and one more after them, ``sql``
    under ``NNNN_name.sql``: the file added (``directory`` is its parent)."""
    shutil.copytree(default_migrations_dir(), directory)
    added = directory / f"{len(discover(directory)) + 1:04d}_{name}.sql"
    added.write_text(sql)
    return added


def migrations_up_to(directory: Path, version: int) -> Path:
    directory.mkdir()
    for migration in discover(default_migrations_dir())[:version]:
        (directory / migration.name).write_text(migration.sql, encoding="utf-8")
    return directory


async def begin_writing_an_event(conn: asyncpg.Connection) -> None:
    """A transaction left open with a row written to audit_events, as a shard's commit."""
    await conn.execute("INSERT INTO audit_heads (chain, size, head) VALUES ('c', 0, '')")
    await conn.execute("BEGIN")
    await conn.execute(INSERT_EVENT, 1)


INSERT_EVENT = (
    "INSERT INTO audit_events (chain, seq, entry_hash, body, event, agent_id, grant_id,"
    " time_ms) VALUES ('c', $1, '\\x00', '{}', 'verify.allow', 'agt_1', 'grt_1', 1)"
)


async def waits_for_a_lock(url: str, migrator: asyncpg.Connection) -> None:
    """Return once the migrator's backend waits for a lock (0014's build, for the open
    transaction writing to audit_events)."""
    conn = await asyncpg.connect(url)
    try:
        while not await conn.fetchval(
            "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1",
            migrator.get_server_pid(),
        ):
            await asyncio.sleep(0.02)
    finally:
        await conn.close()


async def audit_event_indexes(conn: asyncpg.Connection) -> dict[str, bool]:
    rows = await conn.fetch(
        "SELECT indexrelid::regclass::text AS name, indisvalid FROM pg_index"
        " WHERE indrelid = 'audit_events'::regclass"
    )
    return {row["name"]: row["indisvalid"] for row in rows}


async def assert_0014_and_0015_done(conn: asyncpg.Connection) -> None:
    indexes = await audit_event_indexes(conn)
    assert all(indexes[name] for name in IN_ORDER), indexes
    assert "audit_events_agent" not in indexes and "audit_events_grant" not in indexes


@pytest.mark.asyncio
async def test_building_0014s_indexes_holds_back_no_writer(
    fresh_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """0014 built its indexes under a SHARE lock on audit_events: queued behind one open
    transaction writing to it, it held back every shard's commit after (verifications fail
    closed), then stopped them all while it read the table. Built concurrently, it waits
    for that transaction while writers go on, and finishes once it has ended."""
    from agentauth.store import _migrate

    # A lock request used to give way after half a second: kept queued while checked here.
    monkeypatch.setattr(_migrate, "_LOCK_WAIT_MS", 60_000)
    conn, writing, writer = [await asyncpg.connect(fresh_db) for _ in range(3)]
    try:
        await migrate(conn, migrations_up_to(tmp_path / "migrations", 13))
        await begin_writing_an_event(writing)
        migrating = asyncio.create_task(migrate(conn))
        try:
            await asyncio.wait_for(waits_for_a_lock(fresh_db, conn), timeout=30.0)
            await writer.execute("SET lock_timeout = '100ms'")
            await writer.execute(INSERT_EVENT, 2)
            assert not migrating.done()
        finally:
            await writing.execute("COMMIT")
        assert await asyncio.wait_for(migrating, timeout=60.0) == FROM_0014
        await assert_0014_and_0015_done(conn)
        assert await conn.fetchval("SELECT count(*) FROM audit_events") == 2
    finally:
        for c in (conn, writing, writer):
            await c.close()


@pytest.mark.asyncio
async def test_a_build_whose_migrator_died_is_built_again_by_the_next_run(
    fresh_db: str, tmp_path: Path
) -> None:
    """A concurrent build that stops midway leaves its index behind, invalid: never used by
    queries, yet kept up by every write. The next run drops it and builds it again (it
    neither fails on the name being taken nor takes the index as built)."""
    conn, writing, killer = [await asyncpg.connect(fresh_db) for _ in range(3)]
    try:
        await migrate(conn, migrations_up_to(tmp_path / "migrations", 13))
        await begin_writing_an_event(writing)
        migrating = asyncio.create_task(migrate(conn))
        try:
            await asyncio.wait_for(waits_for_a_lock(fresh_db, conn), timeout=30.0)
            pid = conn.get_server_pid()
            assert await killer.fetchval("SELECT pg_terminate_backend($1)", pid)
            with pytest.raises(MigrationError, match=f"failed at index {IN_ORDER[0]}"):
                await asyncio.wait_for(migrating, timeout=30.0)
        finally:
            await writing.execute("COMMIT")
        indexes = await audit_event_indexes(killer)
        assert indexes[IN_ORDER[0]] is False, indexes
        again = await asyncpg.connect(fresh_db)
        try:
            assert await migrate(again) == FROM_0014
            await assert_0014_and_0015_done(again)
        finally:
            await again.close()
    finally:
        for c in (conn, writing, killer):
            await c.close()


@pytest.mark.asyncio
async def test_an_invalid_index_is_not_taken_as_built_by_if_not_exists(
    fresh_db: str, tmp_path: Path
) -> None:
    copy = tmp_path / "migrations"
    added = with_one_more(
        copy,
        "unique",
        f"{MARKER}\nCREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS audit_heads_size"
        " ON audit_heads (size);\n",
    )
    conn = await asyncpg.connect(fresh_db)
    try:
        await migrate(conn)
        await conn.execute(
            "INSERT INTO audit_heads (chain, size, head) VALUES ('a', 1, ''), ('b', 1, '')"
        )
        with pytest.raises(MigrationError, match="failed at index audit_heads_size"):
            await migrate(conn, copy)
        valid = "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)"
        assert await conn.fetchval(valid, "audit_heads_size") is False
        await conn.execute("UPDATE audit_heads SET size = 2 WHERE chain = 'b'")
        assert await migrate(conn, copy) == [added.name]
        assert await conn.fetchval(valid, "audit_heads_size") is True
    finally:
        await conn.close()


@pytest.mark.asyncio
async def test_a_concurrent_build_held_up_by_a_long_transaction_gives_up_and_says_why(
    fresh_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agentauth.store import _migrate

    monkeypatch.setattr(_migrate, "_CONCURRENT_WAIT_MS", 300)
    conn, writing = [await asyncpg.connect(fresh_db) for _ in range(2)]
    try:
        await migrate(conn, migrations_up_to(tmp_path / "migrations", 13))
        await begin_writing_an_event(writing)
        try:
            with pytest.raises(MigrationError, match="long transaction"):
                await asyncio.wait_for(migrate(conn), timeout=30.0)
            # Back to the session's own timeouts once the migration is over.
            assert await conn.fetchval("SHOW lock_timeout") == "0"
        finally:
            await writing.execute("COMMIT")
        assert await migrate(conn) == FROM_0014
        await assert_0014_and_0015_done(conn)
    finally:
        for c in (conn, writing):
            await c.close()


@pytest.mark.asyncio
async def test_a_migrator_waiting_for_another_does_not_hold_up_its_concurrent_build(
    fresh_db: str, tmp_path: Path
) -> None:
    """Replicas starting together while 0014 builds: one waiting inside pg_advisory_lock
    held a snapshot the build waits to see go, while it waited for the build's migrator,
    until PostgreSQL failed one of them as a deadlock."""
    first, second, writing = [await asyncpg.connect(fresh_db) for _ in range(3)]
    try:
        await migrate(first, migrations_up_to(tmp_path / "migrations", 13))
        await begin_writing_an_event(writing)
        building = asyncio.create_task(migrate(first))
        waiting = None
        try:
            await asyncio.wait_for(waits_for_a_lock(fresh_db, first), timeout=30.0)
            waiting = asyncio.create_task(migrate(second))
            pid = second.get_server_pid()
            # Asked inside writing's open transaction, pg_stat_activity answers from the
            # snapshot its first read took: read before second's query, it never shows it.
            while True:
                await writing.execute("SELECT pg_stat_clear_snapshot()")
                if await writing.fetchval(
                    "SELECT query LIKE '%advisory_lock%' FROM pg_stat_activity WHERE pid = $1", pid
                ):
                    break
                await asyncio.sleep(0.02)
        finally:
            await writing.execute("COMMIT")
        assert await asyncio.wait_for(building, timeout=60.0) == FROM_0014
        assert waiting is not None and await asyncio.wait_for(waiting, timeout=60.0) == []
        await assert_0014_and_0015_done(first)
    finally:
        for c in (first, second, writing):
            await c.close()


@pytest.mark.parametrize(
    "body",
    [
        "CREATE INDEX CONCURRENTLY a ON t (x);\nALTER TABLE t ADD COLUMN y int;",
        "CREATE INDEX a ON t (x);",
        "CREATE INDEX CONCURRENTLY ON t (x);",  # no name: nothing to resume by
        "DROP INDEX CONCURRENTLY a; DROP TABLE t;",
        "CREATE INDEX CONCURRENTLY a ON t (x) WHERE y = E'\\'; DROP TABLE t; --';",
        "CREATE INDEX CONCURRENTLY a ON t (x) WHERE y = $$; DROP TABLE t; $$;",
        "CREATE INDEX CONCURRENTLY a ON t (x) WHERE y = 'unclosed;",
    ],
)
def test_a_no_transaction_migration_holding_anything_else_is_refused(
    tmp_path: Path, body: str
) -> None:
    (tmp_path / "0001_a.sql").write_text(f"{MARKER}\n-- why\n{body}\n")
    with pytest.raises(MigrationError, match=r"0001_a\.sql runs outside a transaction"):
        discover(tmp_path)


def test_a_no_transaction_migration_is_read_statement_by_statement(tmp_path: Path) -> None:
    (tmp_path / "0001_a.sql").write_text(
        f"{MARKER}\n-- a comment; with a semicolon\n"
        "CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS \"A;b\" ON s.t (x) WHERE y = 'a;b';\n"
        "/* another; */ DROP INDEX CONCURRENTLY IF EXISTS s.c;\n"
    )
    (migration,) = discover(tmp_path)
    assert not migration.in_transaction
    from agentauth.store._migrate import _index_steps

    steps = _index_steps(migration.name, migration.sql)
    assert [(s.index, s.table) for s in steps] == [('s."A;b"', "s.t"), ("s.c", None)]
    assert steps[0].sql.endswith("WHERE y = 'a;b'")


@pytest.mark.asyncio
async def test_a_refused_no_transaction_migration_stops_the_run_before_it_starts(
    fresh_db: str, tmp_path: Path
) -> None:
    copy = tmp_path / "migrations"
    with_one_more(
        copy,
        "mixed",
        f"{MARKER}\nCREATE INDEX CONCURRENTLY audit_heads_size ON audit_heads (size);\n"
        "ALTER TABLE audit_heads ADD COLUMN later bigint;\n",
    )
    conn = await asyncpg.connect(fresh_db)
    try:
        with pytest.raises(MigrationError, match="may hold only CREATE INDEX CONCURRENTLY"):
            await migrate(conn, copy)
        assert await conn.fetchval("SELECT to_regclass('schema_migrations')") is None
    finally:
        await conn.close()
