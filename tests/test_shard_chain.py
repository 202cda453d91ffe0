"""A shard is its chain's only writer, and its answers are what its chain says.

Two incarnations of one shard can overlap (a zombie actor during a restart, a second
cluster pointed at the same database during an upgrade). Whichever commits second must
fail, write nothing, and come back as a new incarnation would: refusing every proof the
other one may have accepted. And once a batch is committed, its clients get the committed
decisions, whatever fails after the commit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from decimal import Decimal
from typing import Any

import asyncpg
import asyncpg.connection
import pytest
from shard_checks import a_check, fail_once_after_the_head_read, payment

from agentauth.actors import Check, StateShard, _shard
from agentauth.protocol import Action, Envelope

INDEX = 700
ENVELOPE = Envelope.model_validate({"rate_limits": [{"max_count": 100, "window_seconds": 60}]})


def _check(jti: str, iat: float) -> Check:
    return a_check(
        "chain",
        jti=jti,
        iat=iat,
        action=Action(kind="read", resource="calendar/events"),
        envelope=ENVELOPE,
        token_jti=None,
    )


async def _events(database_url: str, index: int = INDEX) -> list[tuple[int, str]]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT seq, body FROM audit_events WHERE chain = $1 ORDER BY seq",
            f"verifier-{index}",
        )
    finally:
        await conn.close()
    return [(r["seq"], r["body"]) for r in rows]


@pytest.mark.asyncio
@pytest.mark.usefixtures("migrated_database_url")
async def test_a_second_writer_on_the_chain_is_caught(database_url: str) -> None:
    first = StateShard(index=INDEX, database_url=database_url)
    second = StateShard(index=INDEX, database_url=database_url)
    try:
        issued = time.time()
        [allowed] = await first.check_batch([_check("j1", issued)])
        assert allowed.allowed and allowed.audit_event == f"verifier-{INDEX}:0"

        # The second incarnation lost nothing it could know of: it refuses proofs issued no
        # later than the newest the first one reserved, and records that denial on the
        # chain; a proof issued after it is a proof the first never saw.
        [refused] = await second.check_batch([_check("j2", issued)])
        assert refused.reason == "shard_restarted"
        assert refused.audit_event == f"verifier-{INDEX}:1"
        later = issued + 0.5
        [fresh] = await second.check_batch([_check("j2b", later)])
        assert fresh.allowed and fresh.audit_event == f"verifier-{INDEX}:2"

        # The first one's next commit finds the chain moved: nothing written, deny.
        [lost] = await first.check_batch([_check("j3", time.time() + 30)])
        assert (lost.allowed, lost.reason) == (False, "audit_unavailable")
        assert [seq for seq, _ in await _events(database_url)] == [0, 1, 2]

        # ... and it comes back as a new incarnation: the proof the other writer accepted
        # is refused here (its jti window is not here), and a younger one is not.
        [replayed] = await first.check_batch([_check("j2b", later)])
        assert replayed.reason == "shard_restarted"
        assert replayed.audit_event == f"verifier-{INDEX}:3"
        [younger] = await first.check_batch([_check("j4", later + 0.5)])
        assert younger.allowed and younger.audit_event == f"verifier-{INDEX}:4"
        events = await _events(database_url)
        assert [seq for seq, _ in events] == [0, 1, 2, 3, 4]
    finally:
        await first.close()
        await second.close()


# A grant may spend 100 EUR in all, whichever writer decides.
CAPPED = Envelope.model_validate(
    {"spend_limits": [{"amount": "100", "currency": "EUR", "period": "grant"}]}
)


def _pay(grant: str, amount: str, **changes: Any) -> Check:
    return a_check("writers", grant_id=grant, action=payment(amount), envelope=CAPPED, **changes)


def _later(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A clock to move on by hand: each call moves ``time.time`` on by its seconds (past a
    floor, instead of sleeping)."""
    clock, offset = time.time, [0.0]
    monkeypatch.setattr(time, "time", lambda: clock() + offset[0])

    def later(seconds: float) -> None:
        offset[0] += seconds

    return later


async def _committed_spend(database_url: str, grant: str) -> list[Decimal]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT body FROM audit_events WHERE grant_id = $1 AND event = 'verify.allow'"
            " ORDER BY chain, seq",
            grant,
        )
    finally:
        await conn.close()
    return [Decimal(json.loads(r["body"])["data"]["action"]["amount"]) for r in rows]


@pytest.mark.asyncio
@pytest.mark.usefixtures("migrated_database_url")
async def test_the_loser_of_a_commit_race_counts_the_other_writers_spend(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shard that loses a commit race starts over for usage too: each grant it knew is
    rebuilt from the chain, so the other writer's allows count against its limits."""
    later = _later(monkeypatch)
    first = StateShard(index=710, database_url=database_url)
    second = StateShard(index=710, database_url=database_url)
    try:
        assert (await first.check_batch([_pay("grt_race", "40")]))[0].allowed
        later(11)  # past the floor the second one starts with
        [other] = await second.check_batch([_pay("grt_race", "50")])
        assert (other.allowed, other.remaining) == (True, {"rate": [], "spend": ["10"]})
        [lost] = await first.check_batch([_pay("grt_race", "10")])
        assert lost.reason == "audit_unavailable"
        later(11)  # past the second one's last decision
        # 90 spent on the chain: 50 more would pass 100, 10 fits exactly.
        [over] = await first.check_batch([_pay("grt_race", "50")])
        assert (over.allowed, over.reason) == (False, "cumulative_limit_exceeded")
        [fits] = await first.check_batch([_pay("grt_race", "10")])
        assert (fits.allowed, fits.remaining) == (True, {"rate": [], "spend": ["0"]})
        assert sum(await _committed_spend(database_url, "grt_race")) == 100
    finally:
        await first.close()
        await second.close()


@pytest.mark.asyncio
@pytest.mark.usefixtures("migrated_database_url")
async def test_a_writer_whose_reload_fails_after_reading_the_head_still_starts_over(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loser of a commit race reloads the head. If its reconnect fails just after
    reading it, the retry must not take the head as its own without the floor and the
    forgotten usage that go with it. (It did: the head was recorded before a second query,
    and a failure there let the loser allow, and commit, a proof the winner had allowed.)"""
    issued = time.time()
    a = StateShard(index=741, database_url=database_url)
    b = StateShard(index=741, database_url=database_url)
    try:
        assert (await b.check_batch([_check("b0", issued - 3)]))[0].allowed
        assert (await a.check_batch([_check("a0", issued - 2)]))[0].allowed
        proof = _check("a1", issued - 1)
        assert (await a.check_batch([proof]))[0].allowed

        left = fail_once_after_the_head_read(monkeypatch)
        [lost] = await b.check_batch([_check("b1", issued - 0.5)])
        assert (lost.allowed, lost.reason) == (False, "audit_unavailable")
        [replayed] = await b.check_batch([proof])
        assert left == [0], "the injected fault did not fire"
        assert (replayed.allowed, replayed.reason) == (False, "shard_restarted")
    finally:
        await a.close()
        await b.close()


@pytest.mark.asyncio
@pytest.mark.usefixtures("migrated_database_url")
async def test_a_reconnect_that_finds_another_writers_head_starts_over(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shard whose database session ended reconnects to find that another writer
    committed meanwhile. It must not carry on as if the chain were its own: the other
    writer's proofs are refused (their jtis are not here), and its spend counts."""
    later = _later(monkeypatch)
    first = StateShard(index=711, database_url=database_url)
    second = StateShard(index=711, database_url=database_url)
    try:
        assert (await first.check_batch([_pay("grt_reconnect", "1")]))[0].allowed
        later(11)
        proof = _pay("grt_reconnect", "30")
        assert (await second.check_batch([proof]))[0].allowed
        conn = first._conn
        assert conn is not None
        admin = await asyncpg.connect(database_url)
        try:
            await admin.execute("SELECT pg_terminate_backend($1)", conn.get_server_pid())
        finally:
            await admin.close()
        for _ in range(250):  # the session's end reaches the client
            if conn.is_closed():
                break
            await asyncio.sleep(0.02)
        assert conn.is_closed()

        # The same proof, sent to the first writer: refused, on a new connection.
        [replayed] = await first.check_batch([proof])
        assert (replayed.allowed, replayed.reason) == (False, "shard_restarted")
        assert first._conn is not None and first._conn is not conn
        later(11)
        # 31 spent on the chain: 70 more would pass 100.
        [over] = await first.check_batch([_pay("grt_reconnect", "70")])
        assert (over.allowed, over.reason) == (False, "cumulative_limit_exceeded")
        spent = await _committed_spend(database_url, "grt_reconnect")
        assert spent == [Decimal(1), Decimal(30)]
    finally:
        await first.close()
        await second.close()


@pytest.mark.asyncio
@pytest.mark.usefixtures("migrated_database_url")
async def test_expired_proofs_are_forgotten_while_commits_fail(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every batch is decided, and its proofs reserved, whether or not its commit goes
    through: an outage of the audit store must not grow the shard's memory with them."""
    later = _later(monkeypatch)
    shard = StateShard(index=712, database_url=database_url)

    async def disk_full(*args: Any) -> None:
        raise asyncpg.exceptions.DiskFullError("could not extend file")

    monkeypatch.setattr(shard, "_commit", disk_full)
    window = shard.state.policy.max_age + shard.state.policy.future_skew
    try:
        for minute in range(5):
            shard._last_prune = 0.0  # a prune is due
            results = await shard.check_batch(
                [_check(f"m{minute}-{i}", time.time()) for i in range(50)]
            )
            assert {r.reason for r in results} == {"audit_unavailable"}
            later(window + 1)
        # Only the last batch's proofs can still verify.
        assert len(shard.state.jtis) == 50
    finally:
        await shard.close()


@pytest.mark.asyncio
@pytest.mark.usefixtures("migrated_database_url")
async def test_a_clock_stepped_ahead_while_commits_fail_and_back_reopens_no_replay(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wall clock steps an hour ahead (a bad NTP step) while the audit store refuses a
    batch, then back. The failed batch's prune ran on the hour-ahead clock, which forgets
    every live jti: decided on the wall clock again, a proof allowed just before the step
    would be allowed a second time. The shard's decision clock never goes back, whatever
    became of the commit."""
    later = _later(monkeypatch)
    shard = StateShard(index=850, database_url=database_url)
    try:
        proof = _check("before-the-step", time.time())
        assert (await shard.check_batch([proof]))[0].allowed
        real_commit = shard._commit

        async def disk_full(*args: Any) -> None:
            raise asyncpg.exceptions.DiskFullError("could not extend file")

        monkeypatch.setattr(shard, "_commit", disk_full)
        later(3600)
        shard._last_prune = 0.0  # a prune is due
        [failed] = await shard.check_batch([_check("during-the-step", time.time())])
        assert failed.reason == "audit_unavailable"
        monkeypatch.setattr(shard, "_commit", real_commit)
        later(-3600 + 1)  # the clock is put right: a second after the proof was allowed
        [replay] = await shard.check_batch([proof])
        assert not replay.allowed
        assert replay.reason in ("replay_detected", "invalid_dpop_proof:iat_too_old")
    finally:
        await shard.close()


class _WriterGone:
    def is_closing(self) -> bool:
        return True


class _LinkGone:
    """A replica's link that closed while its batch was decided."""

    writer = _WriterGone()


@pytest.mark.asyncio
@pytest.mark.usefixtures("migrated_database_url")
async def test_an_undelivered_allow_whose_void_fails_to_commit_is_voided_later(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replica died while its batch was decided, so the shard voids the allow itself;
    but that void's commit fails (the database hiccups). Nobody else will ask about the
    allow (the replica that could is gone): the shard still owes the chain its void, and
    writes it ahead of its next batch."""
    shard = StateShard(index=851, database_url=database_url)
    real_commit, commits = shard._commit, [0]

    async def the_second_fails(*args: Any) -> None:
        commits[0] += 1
        if commits[0] == 2:
            raise asyncpg.exceptions.DiskFullError("could not extend file")
        await real_commit(*args)

    monkeypatch.setattr(shard, "_commit", the_second_fails)
    try:
        await shard._answer(_LinkGone(), 1, [_check("undelivered", time.time())])  # type: ignore[arg-type]
        assert commits[0] == 2  # the allow committed, its void did not
        [later] = await shard.check_batch([_check("after", time.time())])
        assert later.allowed
        events = [json.loads(body) for _, body in await _events(database_url, 851)]
        assert [e["event"] for e in events] == ["verify.allow", "verify.void", "verify.allow"]
        assert events[1]["data"]["voids"] == "verifier-851:0"
        assert events[1]["data"]["reason"] == "answer_undelivered"
    finally:
        await shard.close()


@pytest.mark.asyncio
@pytest.mark.usefixtures("migrated_database_url")
async def test_committed_decisions_are_answered_even_if_upkeep_fails(
    database_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    shard = StateShard(index=705, database_url=database_url)

    def broken(now: float, *, idle_grants_after: float) -> None:
        raise RuntimeError("prune bug")

    monkeypatch.setattr(shard.state, "prune", broken)
    shard._last_prune = 0.0  # due now, after this batch's commit
    try:
        results = await shard.check_batch([_check(f"u{i}", time.time()) for i in range(2)])
        # The chain holds two allows: the clients get exactly those.
        assert [(r.allowed, r.reason) for r in results] == [(True, "ok")] * 2
        assert [r.audit_event for r in results] == ["verifier-705:0", "verifier-705:1"]
        assert "shard 705 failed to prune its state" in caplog.text
        # The next batch is not retried into the same failure (nor denied by it).
        [later] = await shard.check_batch([_check("u2", time.time())])
        assert (later.allowed, later.reason) == (True, "ok")
    finally:
        await shard.close()


@pytest.mark.asyncio
@pytest.mark.usefixtures("migrated_database_url")
async def test_a_void_records_an_allow_that_reached_no_client(database_url: str) -> None:
    """A replica whose call overran answered ``state_timeout``; the shard had allowed. The
    void puts the answer given next to the allow; what the allow reserved stays spent."""
    shard = StateShard(index=706, database_url=database_url)
    now = time.time()

    def mine(jti: str, iat: float) -> Check:  # a grant of its own: usage is rebuilt per grant
        return dataclasses.replace(_check(jti, iat), grant_id="grt_void")

    try:
        [allowed] = await shard.check_batch([mine("v1", now)])
        assert allowed.audit_event == "verifier-706:0"

        def void(event_id: str) -> Check:
            return dataclasses.replace(
                mine("v1", now), deny="state_timeout", voids=event_id, jkt=None, jti=None
            )

        # Only events already on this chain can be voided.
        results = await shard.check_batch(
            [void("verifier-706:0"), void("verifier-705:0"), void("verifier-706:7")]
        )
        assert [(r.allowed, r.reason) for r in results] == [
            (False, "state_timeout"),
            (False, "malformed_check"),
            (False, "malformed_check"),
        ]
        bodies = [json.loads(body) for _, body in await _events(database_url, 706)]
        assert [b["event"] for b in bodies] == [
            "verify.allow",
            "verify.void",
            "verify.deny",
            "verify.deny",
        ]
        assert bodies[1]["data"]["voids"] == "verifier-706:0"
        assert bodies[1]["data"]["reason"] == "state_timeout"
        assert bodies[1]["data"]["grant_id"] == "grt_void"
        assert "voids" not in bodies[2]["data"] and "voids" not in bodies[3]["data"]

        # The proof stays spent, and the allow's use of the rate limit stays counted.
        [replayed] = await shard.check_batch([mine("v1", now)])
        assert replayed.reason == "replay_detected"
        [fresh] = await shard.check_batch([mine("v2", time.time())])
        assert fresh.remaining is not None and fresh.remaining["rate"] == [98]
    finally:
        await shard.close()


@pytest.mark.asyncio
@pytest.mark.usefixtures("migrated_database_url")
async def test_a_check_of_unknown_fate_is_settled_by_its_proof(database_url: str) -> None:
    """A replica whose call never answered asks about each check by its proof: the shard
    voids the allow it committed for that proof, or records the denial the client got."""
    from agentauth.actors._state import ANY_ALLOW

    shard = StateShard(index=707, database_url=database_url)
    now = time.time()

    def mine(jti: str) -> Check:
        return dataclasses.replace(_check(jti, now), grant_id="grt_settle")

    def settle(jti: str) -> Check:
        return dataclasses.replace(
            mine(jti), deny="state_unavailable", voids=ANY_ALLOW, envelope=None
        )

    try:
        [allowed] = await shard.check_batch([mine("s1")])
        # Only the allows of the proof's lifetime are searched: the same jti with an iat
        # an hour off finds nothing.
        elsewhere = dataclasses.replace(settle("s1"), iat=now - 3600)
        results = await shard.check_batch([settle("s1"), settle("never-decided"), elsewhere])
        assert [(r.allowed, r.reason) for r in results] == [(False, "state_unavailable")] * 3
        bodies = [json.loads(body) for _, body in await _events(database_url, 707)]
        assert [(b["event"], b["data"]["proof_jti"]) for b in bodies] == [
            ("verify.allow", "s1"),
            ("verify.void", "s1"),
            ("verify.deny", "never-decided"),
            ("verify.deny", "s1"),
        ]
        assert bodies[1]["data"]["voids"] == allowed.audit_event
        assert "voids" not in bodies[2]["data"] and "voids" not in bodies[3]["data"]
        # Asked again (another replica, a retry), a voided allow is neither voided twice
        # nor taken for a denial to record: nothing is written, and the answer names the
        # void that settled it.
        [again] = await shard.check_batch([settle("s1")])
        assert (again.reason, again.audit_event) == ("state_unavailable", "verifier-707:1")
        assert len(await _events(database_url, 707)) == 4
    finally:
        await shard.close()


@pytest.mark.asyncio
async def test_a_database_that_accepts_and_says_nothing_costs_a_batch_seconds_not_a_minute(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A blackholed database (the connection opens, nothing ever comes back) denies the
    batch `audit_unavailable` once the shard's 2 s connect bound passes, not after
    asyncpg's own 60 s, so the shard is back within seconds of the database."""
    import asyncio

    from agentauth.actors import _shard

    monkeypatch.setattr(_shard, "_DB_TIMEOUT", 0.5)
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # read nothing, answer nothing

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    shard = StateShard(index=INDEX + 9, database_url=f"postgresql://x@127.0.0.1:{port}/x")
    try:
        began = time.monotonic()
        [result] = await asyncio.wait_for(shard.check_batch([_check("silent", time.time())]), 10.0)
        took = time.monotonic() - began
        assert (result.allowed, result.reason) == (False, "audit_unavailable")
        assert 0.4 < took < 3.0
    finally:
        await shard.close()
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


class _AnswerLost(StateShard):
    """A shard whose next commit gets no answer from the database (a timeout, a dropped
    connection), after the database applied it (``applied``) or before."""

    applied: bool | None = None  # None: commits normally

    async def _commit(self, conn: Any, *args: Any) -> None:
        applied, self.applied = self.applied, None
        if applied is None:
            return await super()._commit(conn, *args)
        if applied:
            await super()._commit(conn, *args)
        raise TimeoutError  # what asyncpg's command timeout raises


@pytest.mark.asyncio
@pytest.mark.usefixtures("migrated_database_url")
@pytest.mark.parametrize("applied", [True, False], ids=["applied", "not-applied"])
async def test_a_commit_answered_as_failed_that_took_effect_has_its_allows_voided(
    database_url: str, applied: bool
) -> None:
    """The clients of a batch whose commit got no answer are denied ``audit_unavailable``.
    If the database had applied it, its allows are on the chain although nobody got them:
    on reconnect the shard finds out and voids each one ahead of its next batch. If not,
    nothing of it is on the chain, and nothing is voided."""
    index = 720 if applied else 721
    shard = _AnswerLost(index=index, database_url=database_url)
    now = time.time()
    try:
        # One batch first: a shard that has committed nothing yet reconnects as a new
        # incarnation would (refusing older proofs), which is not what is tested here.
        [first] = await shard.check_batch([_check("l0", now)])
        assert first.audit_event == f"verifier-{index}:0"
        shard.applied = applied
        lost = await shard.check_batch(
            [
                _check("l1", now),
                _check("l2", now),
                dataclasses.replace(_check("l3", now), deny="revoked"),
            ]
        )
        # Each allow among them is named (the event it would be) for the replica to ask
        # about should this incarnation die before it learns the commit's fate.
        assert [(r.allowed, r.reason, r.audit_event) for r in lost] == [
            (False, "audit_unavailable", f"verifier-{index}:1"),
            (False, "audit_unavailable", f"verifier-{index}:2"),
            (False, "audit_unavailable", None),
        ]
        # The next batch is answered as usual, the voids (if any) written ahead of it.
        [later] = await shard.check_batch([_check("l4", now)])
        assert (later.allowed, later.reason) == (True, "ok")
        bodies = [json.loads(body) for _, body in await _events(database_url, index)]
        chain = [(b["event"], b["data"]["proof_jti"], b["data"].get("voids")) for b in bodies]
        if applied:
            assert chain == [
                ("verify.allow", "l0", None),
                ("verify.allow", "l1", None),
                ("verify.allow", "l2", None),
                ("verify.deny", "l3", None),
                ("verify.void", "l1", f"verifier-{index}:1"),
                ("verify.void", "l2", f"verifier-{index}:2"),
                ("verify.allow", "l4", None),
            ]
            assert {b["data"]["reason"] for b in bodies[4:6]} == {"audit_unavailable"}
            assert later.audit_event == f"verifier-{index}:6"
        else:
            assert chain == [("verify.allow", "l0", None), ("verify.allow", "l4", None)]
            assert later.audit_event == f"verifier-{index}:1"
        # Either way the lost batch's proofs stay spent: the shard cannot know better.
        [replayed] = await shard.check_batch([_check("l1", now)])
        assert replayed.reason == "replay_detected"
    finally:
        await shard.close()


@pytest.mark.asyncio
@pytest.mark.usefixtures("migrated_database_url")
async def test_a_commit_of_unknown_fate_still_waiting_on_the_server_never_lands_unvoided(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit waits on the head's row lock (held here, as another writer or a standby's
    acknowledgement would hold it) past the statement timeout: its client is denied
    ``audit_unavailable`` and the shard hangs up. PostgreSQL does not notice a hang-up
    while a statement waits, so the statement would go on, and commit once the lock goes:
    after the shard had looked it up and found nothing, leaving an allow on the chain that
    nobody got and nothing voids (so it was, until 2026-11-30). The reconnect ends that
    server process first: the statement never lands, and the shard carries on."""
    monkeypatch.setattr(_shard, "_DB_TIMEOUT", 0.5)
    index = 790
    chain = f"verifier-{index}"
    shard = StateShard(index=index, database_url=database_url)
    locker = await asyncpg.connect(database_url)
    now = time.time()
    try:
        # Committed once, so a reconnect that finds this head takes it as its own.
        assert (await shard.check_batch([_check("r0", now)]))[0].allowed
        holding = locker.transaction()
        await holding.start()
        await locker.execute("SELECT 1 FROM audit_heads WHERE chain = $1 FOR UPDATE", chain)
        try:
            [lost] = await shard.check_batch([_check("r1", now)])
            assert (lost.allowed, lost.reason) == (False, "audit_unavailable")
            [second] = await shard.check_batch([_check("r2", now)])
            assert (second.allowed, second.reason) == (False, "audit_unavailable")
        finally:
            await holding.rollback()  # the lock goes
        await asyncio.sleep(0.5)  # time for a statement that was still waiting to commit
        for jti in ("r3", "r4"):
            assert (await shard.check_batch([_check(jti, time.time())]))[0].allowed

        rows = await locker.fetch(
            "SELECT seq, body FROM audit_events WHERE chain = $1 ORDER BY seq", chain
        )
        bodies = {r["seq"]: json.loads(r["body"]) for r in rows}
        allows = {
            b["data"].get("proof_jti"): f"{chain}:{seq}"
            for seq, b in bodies.items()
            if b["event"] == "verify.allow"
        }
        voided = {b["data"]["voids"] for b in bodies.values() if b["event"] == "verify.void"}
        # r1's statement was ended, waiting, before anything else ran: it never lands.
        assert "r1" not in allows, f"a timed-out commit landed after its lookup: {bodies}"
        # r2's may have committed the moment the lock went, before the reconnect ended its
        # process: then the chain holds it, and a void for it.
        assert "r2" not in allows or allows["r2"] in voided, f"r2 stands unvoided: {bodies}"
        assert {"r0", "r3", "r4"} <= set(allows) and not {allows["r0"]} & voided
    finally:
        await locker.close()
        await shard.close()


@pytest.mark.asyncio
@pytest.mark.usefixtures("migrated_database_url")
async def test_spend_of_a_commit_known_not_to_have_applied_is_given_back(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A payment's commit gets no answer: its client is denied ``audit_unavailable``, and
    on reconnect the shard learns the commit never applied. The 60 EUR it reserved must
    not be held against the retry (the natural answer to ``audit_unavailable``) on a grant
    capped at 100 EUR whose chain holds no spend. Its proof stays spent."""
    capped = Envelope.model_validate(
        {"spend_limits": [{"amount": "100", "currency": "EUR", "period": "grant"}]}
    )

    def pay(amount: str, **changes: Any) -> Check:
        return a_check(
            "unspent", grant_id="grt_unspent", action=payment(amount), envelope=capped, **changes
        )

    armed = [False]
    real = asyncpg.connection.Connection.fetchval

    async def fetchval(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
        if armed[0] and query == _shard._COMMIT:
            armed[0] = False
            raise TimeoutError("injected: the commit's answer never came (it never ran)")
        return await real(self, query, *args, **kwargs)

    monkeypatch.setattr(asyncpg.connection.Connection, "fetchval", fetchval)
    shard = StateShard(index=791, database_url=database_url)
    try:
        assert (await shard.check_batch([_check("u0", time.time())]))[0].allowed
        armed[0] = True
        first = pay("60")
        [lost] = await shard.check_batch([first])
        assert (lost.allowed, lost.reason) == (False, "audit_unavailable") and not armed[0]
        # The next batch learns the commit's fate: not applied.
        assert (await shard.check_batch([_check("u1", time.time())]))[0].allowed
        assert shard._unsure is None
        [retry] = await shard.check_batch([pay("60")])
        assert (retry.allowed, retry.reason) == (True, "ok")
        [over] = await shard.check_batch([pay("60")])
        assert over.reason == "cumulative_limit_exceeded"  # 60 of 100 spent, on the chain
        [again] = await shard.check_batch([first])
        assert again.reason == "replay_detected"
    finally:
        await shard.close()


@pytest.mark.asyncio
@pytest.mark.usefixtures("migrated_database_url")
async def test_one_allow_is_voided_once_however_many_ask_in_one_batch(database_url: str) -> None:
    """Two replicas ask about one proof in the same batch, and the shard owes that allow a
    void itself (its commit got no answer, then took effect): one void is written, and
    every asker is answered with it."""
    from agentauth.actors._state import ANY_ALLOW

    index = 900
    shard = _AnswerLost(index=index, database_url=database_url)
    now = time.time()

    def ask(jti: str) -> Check:
        return dataclasses.replace(
            _check(jti, now), deny="state_unavailable", voids=ANY_ALLOW, envelope=None
        )

    try:
        assert (await shard.check_batch([_check("d0", now)]))[0].allowed
        shard.applied = True
        [lost] = await shard.check_batch([_check("d1", now)])
        assert (lost.reason, lost.audit_event) == ("audit_unavailable", f"verifier-{index}:1")
        # The next batch resolves the commit (it took effect: d1's allow is owed a void)
        # and carries two asks about d1 and one about d0.
        answers = await shard.check_batch([ask("d1"), ask("d1"), ask("d0")])
        bodies = [json.loads(body) for _, body in await _events(database_url, index)]
        chain = [(b["event"], b["data"]["proof_jti"], b["data"].get("voids")) for b in bodies]
        assert chain == [
            ("verify.allow", "d0", None),
            ("verify.allow", "d1", None),
            ("verify.void", "d1", f"verifier-{index}:1"),  # owed: the shard's own
            ("verify.void", "d0", f"verifier-{index}:0"),
        ]
        assert [(a.allowed, a.reason, a.audit_event) for a in answers] == [
            (False, "state_unavailable", f"verifier-{index}:2"),
            (False, "state_unavailable", f"verifier-{index}:2"),
            (False, "state_unavailable", f"verifier-{index}:3"),
        ]
    finally:
        await shard.close()


class _Endpoint:
    """A shard handle as ShardClient uses it (``endpoint.remote()``), pointing at whichever
    in-process shard is ``current`` (Ray bringing up a new incarnation)."""

    def __init__(self, shard: StateShard) -> None:
        self.current = shard
        self.endpoint = self

    def remote(self) -> Any:
        return self.current.endpoint()


@pytest.mark.asyncio
@pytest.mark.usefixtures("migrated_database_url")
@pytest.mark.parametrize("survives", [False, True], ids=["shard-dies", "shard-lives"])
async def test_an_allow_of_unknown_fate_is_voided_even_if_its_shard_dies_first(
    database_url: str, survives: bool
) -> None:
    """A commit gets no answer but took effect; the replica's client was told
    ``audit_unavailable``. Should the shard die before it resolves that commit, its next
    incarnation knows nothing of it: the replica asks about the allow on its next link,
    and the new incarnation voids it. Should the shard live, it voids the allow itself
    before its next commit, and the replica, seeing that commit, asks nothing."""
    from agentauth.actors import ShardClient

    index = 901 if survives else 902
    first = _AnswerLost(index=index, database_url=database_url)
    handle = _Endpoint(first)
    client = ShardClient([handle], timeout=2.0)
    shards: list[StateShard] = [first]
    try:
        assert (await client.check(0, _check("u0", time.time()))).allowed
        first.applied = True
        lost = await client.check(0, _check("u1", time.time()))
        # The would-be event is the replica's to keep, not the verifier's to report.
        assert (lost.allowed, lost.reason, lost.audit_event) == (False, "audit_unavailable", None)
        if survives:
            # Checks are denied while it reconnects (it serves replicas: none waits).
            deadline = time.monotonic() + 10
            while not (await client.check(0, _check("u2", time.time()))).allowed:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            assert not client._unsure[0]
            client.close()  # a new link all the same: nothing is left to ask about
            await asyncio.sleep(0.15)
        else:
            await first.close()  # died before its next batch
            handle.current = StateShard(index=index, database_url=database_url)
            shards.append(handle.current)
            # The first check after the death finds the link broken; the next link asks.
            await client.check(0, _check("u2", time.time()))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if (await client.check(0, _check("u3", time.time()))).allowed:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.2)  # what the new link asked is recorded by now
        bodies = [json.loads(body) for _, body in await _events(database_url, index)]
        voids = [
            (b["data"]["proof_jti"], b["data"]["voids"], b["data"]["reason"])
            for b in bodies
            if b["event"] == "verify.void"
        ]
        assert voids == [("u1", f"verifier-{index}:1", "audit_unavailable")], bodies
        # Nothing else was written about u1: its allow and its void.
        assert [b["event"] for b in bodies if b["data"]["proof_jti"] == "u1"] == [
            "verify.allow",
            "verify.void",
        ]
    finally:
        client.close()
        for shard in shards:
            await shard.close()


class _LateAnswerLost(_AnswerLost):
    """An ``_AnswerLost`` whose lost commit first waits for ``release``: its answer comes
    after the replica's deadline, once the test lets it."""

    release: asyncio.Event | None = None

    async def _commit(self, conn: Any, *args: Any) -> None:
        if self.applied is not None and self.release is not None:
            await self.release.wait()
        return await super()._commit(conn, *args)


@pytest.mark.asyncio
@pytest.mark.usefixtures("migrated_database_url")
async def test_a_late_allow_of_unknown_fate_is_voided_with_the_answer_its_client_got(
    database_url: str,
) -> None:
    """The commit of an allow gets no answer but took effect, and the shard's answer
    (``audit_unavailable``, naming the allow) comes after the replica's deadline: its
    client was told ``state_timeout``. The shard dies before it resolves the commit; the
    replica asks its next incarnation about the allow, which voids it. The void must give
    the answer the client got. (Until 2026-11-30 the replica asked with
    ``audit_unavailable``, what the shard had answered too late, not what the client got.)"""
    from agentauth.actors import ShardClient

    index = 903
    first = _LateAnswerLost(index=index, database_url=database_url)
    handle = _Endpoint(first)
    client = ShardClient([handle], timeout=0.5)
    shards: list[StateShard] = [first]
    try:
        # One batch first, so that the lost commit is not the incarnation's first.
        [warm] = await first.check_batch([_check("t0", time.time())])
        assert warm.allowed
        await client.connect()
        first.release, first.applied = asyncio.Event(), True
        told = await client.check(0, _check("t1", time.time()))
        assert (told.allowed, told.reason) == (False, "state_timeout")
        first.release.set()  # the commit applies, its answer is lost, the shard says so
        deadline = time.monotonic() + 10
        while not client._unsure[0]:  # the late answer is in: the allow is held
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        await first.close()  # died before its next batch
        handle.current = StateShard(index=index, database_url=database_url)
        shards.append(handle.current)
        voids: list[tuple[str, str, str]] = []
        while not voids:  # the next link asks about t1
            assert time.monotonic() < deadline
            await client.check(0, _check(f"t2-{time.monotonic_ns()}", time.time()))
            bodies = [json.loads(body) for _, body in await _events(database_url, index)]
            voids = [
                (b["data"]["proof_jti"], b["data"]["voids"], b["data"]["reason"])
                for b in bodies
                if b["event"] == "verify.void"
            ]
            await asyncio.sleep(0.05)
        assert voids == [("t1", f"verifier-{index}:1", told.reason)], bodies
    finally:
        client.close()
        for shard in shards:
            await shard.close()


@pytest.mark.asyncio
@pytest.mark.usefixtures("migrated_database_url")
async def test_a_void_naming_an_absurdly_long_event_number_costs_only_itself(
    database_url: str,
) -> None:
    """A void's event id comes off the wire as any text. One whose number has more digits
    than Python turns into an int (4,300) is as malformed as one naming no event of this
    chain: it is recorded so, and the checks merged into the same commit are decided as
    usual (it used to raise out of the batch, and every check in it, any replica's, was
    denied audit_unavailable)."""
    shard = StateShard(index=920, database_url=database_url)
    now = time.time()
    try:
        void = dataclasses.replace(
            _check("huge-void", now),
            deny="state_timeout",
            voids="verifier-920:" + "9" * 5000,
            jkt=None,
            jti=None,
        )
        results = await shard.check_batch([void, _check("beside-it", now)])
        assert [(r.allowed, r.reason) for r in results] == [
            (False, "malformed_check"),
            (True, "ok"),
        ]
        bodies = [json.loads(body) for _, body in await _events(database_url, 920)]
        assert [b["event"] for b in bodies] == ["verify.deny", "verify.allow"]
    finally:
        await shard.close()


@pytest.mark.asyncio
@pytest.mark.usefixtures("migrated_database_url")
async def test_a_question_about_a_proof_dated_absurdly_far_off_costs_only_itself(
    database_url: str,
) -> None:
    """A replica asks about a proof (``voids="*"``) by its ``iat``, which comes off the wire
    as any finite number. The proof's lifetime around one dated 1e300 or -1e300 is past
    what a bigint holds: the lookup failed, and with it the whole batch it came in (every
    check merged into it denied audit_unavailable). No allow can be found for it, so it is
    recorded as the denial its client got, and the checks beside it are decided."""
    from agentauth.actors._state import ANY_ALLOW

    shard = StateShard(index=921, database_url=database_url)
    now = time.time()
    try:
        asked = [
            dataclasses.replace(
                _check(f"far-{sign}", sign * 1e300), deny="state_timeout", voids=ANY_ALLOW
            )
            for sign in (1, -1)
        ]
        results = await shard.check_batch([*asked, _check("beside-them", now)])
        assert [(r.allowed, r.reason) for r in results] == [
            (False, "state_timeout"),
            (False, "state_timeout"),
            (True, "ok"),
        ]
    finally:
        await shard.close()


class _HeldCommits(StateShard):
    """A shard that records each commit's events (first seq, count) once it is durable,
    and whose commits wait for ``release`` while it is set and unset."""

    release: asyncio.Event | None = None

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.committed: list[tuple[int, int]] = []
        self.committing = asyncio.Event()

    async def _commit(self, conn: Any, checks: Any, outcomes: Any, entries: Any) -> None:
        self.committing.set()
        if self.release is not None:
            await self.release.wait()
        await super()._commit(conn, checks, outcomes, entries)
        self.committed.append((entries[0].event.seq, len(entries)))


@pytest.mark.asyncio
@pytest.mark.usefixtures("migrated_database_url")
async def test_calls_queued_behind_a_commit_share_transactions_of_at_most_the_cap(
    database_url: str,
) -> None:
    """Calls that queue behind a slow commit are merged whole, in arrival order, into
    transactions of at most _MAX_COMMIT checks; the rest wait for the next one. (They were
    merged without a cap: enough replicas' calls made one transaction that overran its
    statement timeout, and every check in it was denied.) Each call is answered only once
    its own transaction is committed."""
    cap = _shard._MAX_COMMIT
    shard = _HeldCommits(index=930, database_url=database_url)
    shard.release = asyncio.Event()
    # Queued behind the held commit: the first two fill a transaction exactly; the third
    # leaves room for the fifth but not the fourth, which the fifth must not jump ahead of.
    sizes = [1, cap - 2, 2, cap - 1, 2, 1]
    answered: list[tuple[list[Any], int]] = []

    async def call(n: int, size: int) -> None:
        checks = [a_check("cap", jti=f"c{n}-{i}") for i in range(size)]
        results = await shard.check_batch(checks)
        answered.append((results, len(shard.committed)))

    try:
        first = asyncio.create_task(call(0, sizes[0]))
        await shard.committing.wait()
        queued = [asyncio.create_task(call(n, size)) for n, size in enumerate(sizes[1:], 1)]
        await asyncio.sleep(0)
        assert len(shard._pending) == len(queued)  # all queued before the commit goes on
        shard.release.set()
        await asyncio.wait_for(asyncio.gather(first, *queued), 30)

        assert [count for _, count in shard.committed] == [1, cap, cap - 1, 3]
        # Answered in arrival order, each with its own events in arrival order, every one
        # an allow, and never before the transaction holding them was committed.
        seq = 0
        for size, (results, commits) in zip(sizes, answered, strict=True):
            assert [(r.allowed, r.reason) for r in results] == [(True, "ok")] * size
            events = [f"verifier-930:{seq + i}" for i in range(size)]
            assert [r.audit_event for r in results] == events
            seq += size
            assert shard.committed[commits - 1][0] + shard.committed[commits - 1][1] >= seq
        assert shard._size == seq
    finally:
        await shard.close()
