"""What the registry keeps of the secrets it hands out, and the recovery code's life, in
process (real PostgreSQL and Redis, no Ray): docs/registry.md ("secret shown once at
registration, stored hashed") and docs/threat-model.md (a recovery code is "one use, 24 h,
stored hashed"; recovering ends the human's unused enrollment codes and is audited), and
that each secret's expiry is checked whenever it is presented, not left to the sweep."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from registry_inprocess import Opened, registry_in_process
from softauthn import SoftAuthenticator

from agentauth.protocol import PrivateKey
from agentauth.registry._models import AgentIn, RecoveryCodeIn, RecoveryFinishIn

pytestmark = [pytest.mark.postgres, pytest.mark.redis]


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def service(
    database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Opened]:
    data_dir = tmp_path_factory.mktemp("registry")
    async with registry_in_process(database_url, redis_url, data_dir, prefix="secrets") as opened:
        yield opened


async def _every_row_as_text(service: Opened) -> str:
    """Every row of every table, as PostgreSQL prints it (bytea as hex)."""
    pool = service.registry.pool
    tables = await pool.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    texts = []
    for table in tables:
        rows = await pool.fetch(f'SELECT t::text AS row FROM "{table["tablename"]}" t')
        texts.extend(r["row"] for r in rows)
    return "\n".join(texts)


@pytest.mark.asyncio(loop_scope="session")
async def test_the_secrets_handed_out_are_stored_only_as_their_hashes(service: Opened) -> None:
    """Whoever reads the database (a backup, a replica, an insider with read access) finds
    no session token, enrollment or recovery code or provider secret it could present."""
    w = service.world
    human = await w.human()
    provider = await w.provider()
    r = await w.client.post(
        w.url(f"/v1/providers/{provider.id}/secret"),
        headers=provider.headers,
        json={"previous_valid_for": 60},
    )
    assert r.status_code == 200, r.text
    rotated = r.json()["secret"]
    r = await w.client.post(w.url("/v1/enrollments"), headers=human.headers)
    assert r.status_code == 200, r.text
    enrollment = r.json()["enrollment_code"]
    r = await w.client.post(
        w.url("/v1/admin/recoveries"), headers=w.admin, json={"principal_id": human.principal_id}
    )
    assert r.status_code == 200, r.text
    recovery = r.json()["recovery_code"]

    stored = await _every_row_as_text(service)
    secrets = {
        "session": human.session,
        "provider secret": provider.secret,
        "rotated provider secret": rotated,
        "enrollment code": enrollment,
        "recovery code": recovery,
    }
    for what, secret in secrets.items():
        assert secret not in stored, what
        # Stored as its SHA-256: what the registry compares a presented secret with.
        assert hashlib.sha256(secret.encode()).hexdigest() in stored, what
    assert service.registry.settings.admin_token not in stored


@pytest.mark.asyncio(loop_scope="session")
async def test_a_recovery_code_lives_a_day_works_once_and_ends_unused_enrollments(
    service: Opened,
) -> None:
    w = service.world
    pool = service.registry.pool
    alice = await w.human("Alice")
    r = await w.client.post(w.url("/v1/enrollments"), headers=alice.headers)
    assert r.status_code == 200, r.text
    enrollment = r.json()["enrollment_code"]

    issue = w.url("/v1/admin/recoveries")
    mine = {"principal_id": alice.principal_id}
    r = await w.client.post(issue, headers=w.admin, json=mine)
    assert r.status_code == 200, r.text
    assert r.json()["expires_in"] == 24 * 3600
    stale = r.json()["recovery_code"]
    left = await pool.fetchval(
        "SELECT extract(epoch FROM expires_at - now()) FROM recoveries WHERE code_hash = $1",
        hashlib.sha256(stale.encode()).digest(),
    )
    assert 24 * 3600 - 60 < left <= 24 * 3600
    # A day later it is refused, begun or finished, and nothing is written.
    await pool.execute(
        "UPDATE recoveries SET expires_at = now() - interval '1 second' WHERE code_hash = $1",
        hashlib.sha256(stale.encode()).digest(),
    )
    before = await service.counts()
    r = await w.client.post(w.url("/v1/recovery/begin"), json={"code": stale})
    assert r.status_code == 403 and r.json()["reason"] == "bad_recovery", r.text
    assert await service.counts() == before

    r = await w.client.post(issue, headers=w.admin, json=mine)
    code = r.json()["recovery_code"]
    device = SoftAuthenticator(origin=w.origin)
    r = await w.client.post(w.url("/v1/recovery/begin"), json={"code": code})
    assert r.status_code == 200, r.text
    credential = device.create(r.json())
    r = await w.client.post(
        w.url("/v1/recovery/finish"), json={"code": code, "credential": credential}
    )
    assert r.status_code == 200, r.text
    # Once: the same code again is refused.
    r = await w.client.post(w.url("/v1/recovery/begin"), json={"code": code})
    assert r.status_code == 403 and r.json()["reason"] == "bad_recovery", r.text
    # The enrollment code minted before (perhaps by whoever held the lost passkey) is gone.
    assert not await pool.fetchval(
        "SELECT count(*) FROM enrollments WHERE code_hash = $1",
        hashlib.sha256(enrollment.encode()).digest(),
    )
    events = await pool.fetch(
        "SELECT event FROM audit_events WHERE body LIKE '%' || $1 || '%' ORDER BY time_ms, seq",
        alice.principal_id,
    )
    names = [e["event"] for e in events]
    assert names.count("recovery.issued") == 2 and names.count("passkey.recovered") == 1, names


@pytest.mark.asyncio(loop_scope="session")
async def test_expired_sessions_codes_and_challenges_are_refused_before_any_sweep(
    database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """docs/registry.md: the sweep deletes dead rows, but "every read checks the expiry
    anyway". With no sweep due, a session, an enrollment code, a recovery code and a
    sign-in challenge past their time are refused, and their rows are still there."""
    data_dir = tmp_path_factory.mktemp("registry")
    async with registry_in_process(
        database_url, redis_url, data_dir, prefix="expiry", sweep_every_seconds=3600
    ) as service:
        w = service.world
        pool = service.registry.pool
        human = await w.human()
        r = await w.client.post(w.url("/v1/enrollments"), headers=human.headers)
        enrollment = r.json()["enrollment_code"]
        r = await w.client.post(
            w.url("/v1/admin/recoveries"),
            headers=w.admin,
            json={"principal_id": human.principal_id},
        )
        recovery = r.json()["recovery_code"]
        begun = (await w.client.post(w.url("/v1/sessions/begin"))).json()
        assertion = human.authenticator.get(begun)
        for table in ("sessions", "enrollments", "recoveries", "webauthn_challenges"):
            await pool.execute(f"UPDATE {table} SET expires_at = now() - interval '1 second'")

        r = await w.client.get(w.url("/v1/agents"), headers=human.headers)
        assert (r.status_code, r.json()["reason"]) == (401, "bad_session"), r.text
        key = PrivateKey.generate("ES256")
        r = await w.client.post(
            w.url("/v1/agents"),
            headers={"DPoP": w.proof(key, "POST", "/v1/agents")},
            json={"name": "bot", "public_jwk": key.public_jwk(), "enrollment_code": enrollment},
        )
        assert (r.status_code, r.json()["reason"]) == (403, "bad_enrollment"), r.text
        r = await w.client.post(w.url("/v1/recovery/begin"), json={"code": recovery})
        assert (r.status_code, r.json()["reason"]) == (403, "bad_recovery"), r.text
        r = await w.client.post(w.url("/v1/sessions/finish"), json={"credential": assertion})
        assert (r.status_code, r.json()["reason"]) == (409, "challenge_used"), r.text
        for table in ("sessions", "enrollments", "recoveries", "webauthn_challenges"):
            assert await pool.fetchval(f"SELECT count(*) FROM {table}"), table  # not swept


def test_the_codes_a_request_carries_stay_out_of_its_repr() -> None:
    """An enrollment or recovery code in a request's parsed body is a bearer of an agent's
    registration or of an account: what prints the body (a log line, an error report that
    records a frame's values) must not print the code."""
    code = "enr_" + "s3cret" * 4
    agent = AgentIn(name="bot", public_jwk=PrivateKey.generate().public_jwk(), enrollment_code=code)
    recovery = RecoveryFinishIn(code=code, credential={})
    for body in (agent, RecoveryCodeIn(code=code), recovery):
        assert code not in repr(body) and code not in str(body)
    assert "bot" in repr(agent)
