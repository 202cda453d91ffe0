"""``agentauth audit verify`` walks every chain and checkpoint, and catches tampering."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio
from conftest import with_database

from agentauth.registry import Registry, RegistrySettings

pytestmark = [pytest.mark.postgres, pytest.mark.redis]


@pytest_asyncio.fixture(loop_scope="session")
async def audited_db(database_url: str, redis_url: str, tmp_path: Path) -> AsyncIterator[str]:
    name = f"audit_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = with_database(database_url, name)
    settings = RegistrySettings(
        database_url=url,
        redis_url=redis_url,
        data_dir=tmp_path,
        issuer="http://r.test",
        admin_token=secrets.token_urlsafe(24),
        audit_chains=3,
    )
    registry = await Registry.open(settings)
    try:
        for round_ in range(2):
            for i in range(40):
                async with registry.pool.acquire() as conn, conn.transaction():
                    await registry.audit.append(
                        conn,
                        event="test.event",
                        actor="test",
                        subject=f"s{i}",
                        key=f"agent-{i % 7}",
                        data={"round": round_},
                    )
            await registry.checkpoint_all()
        yield url
    finally:
        await registry.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def run_verify(url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": url}
    return subprocess.run(
        [sys.executable, "-m", "agentauth.cli", "audit", "verify"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


@pytest.mark.asyncio
async def test_audit_verify_passes_then_catches_a_changed_event(audited_db: str) -> None:
    good = run_verify(audited_db)
    assert good.returncode == 0, good.stdout + good.stderr
    assert "audit log verifies" in good.stdout
    assert "checkpoints: ok" in good.stdout and "[####" in good.stderr  # progress shown
    conn = await asyncpg.connect(audited_db)
    try:
        row = await conn.fetchrow("SELECT chain, seq, body FROM audit_events WHERE seq = 3 LIMIT 1")
        await conn.execute(
            "UPDATE audit_events SET body = $3 WHERE chain = $1 AND seq = $2",
            row["chain"],
            row["seq"],
            row["body"].replace('"round":0', '"round":1'),
        )
    finally:
        await conn.close()
    bad = run_verify(audited_db)
    assert bad.returncode == 1
    assert f"{row['chain']}" in bad.stderr and "FAILED" in bad.stdout


def test_audit_verify_archive_refuses_an_empty_archive(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "agentauth.cli", "audit", "verify", "--archive", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert out.returncode == 1 and "holds no keys" in out.stderr
