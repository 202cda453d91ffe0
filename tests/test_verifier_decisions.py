"""The replica's own denials stay denials, an unknown kid costs one key reload at most, and
a request line no proof can name is the provider's error, not the agent's denial.

No Ray, PostgreSQL or Redis: the replica's service layer in process (verifier_inprocess).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from verifier_inprocess import HTU, REGISTRY, Shards, ask, basic, mint, verifier

from agentauth.actors import Check, Result
from agentauth.protocol import KeySet, PrivateKey, PublicKey
from agentauth.verifier import VerifierSettings, create_app


class _AllowingShards(Shards):
    """A shard that answers allow whatever it is sent (another version, a bug, a garbled
    row): it records the check, as the real one does, and names an event."""

    async def check(self, shard: int, check: Check) -> Result:
        self.recorded.append(check)
        return Result(True, "ok", audit_event=f"verifier-{shard}:1")


@pytest.mark.asyncio
async def test_a_shard_allow_never_overrides_the_replicas_own_deny() -> None:
    """The replica decides the token, the proof and the capability; the shard records that
    denial. The answer was the shard's ``allowed``, so a shard answering allow for a check
    the replica had denied turned a stolen token or another provider's token into an allow.
    The replica's deny now stands, whatever the shard says."""
    v, _ = verifier()
    shards = _AllowingShards()
    v.shards = shards  # type: ignore[assignment]
    token = mint(now=time.time())
    cases = [
        ("prov_b", ask(token), "invalid_token:wrong_audience"),
        ("prov_a", ask(token, key=PrivateKey.generate()), "invalid_dpop_proof:jkt_mismatch"),
        ("prov_a", ask(token[:-4] + "AAAA"), "invalid_token:bad_signature"),
    ]
    for provider, body, reason in cases:
        answer = await v.verify(provider, body)
        assert (answer["decision"], answer["reason"]) == ("deny", reason), answer
        assert shards.recorded[-1].deny == reason
        assert await v.introspect(provider, body) == {"active": False}
    # A check the replica passed is still the shard's to decide.
    assert (await v.verify("prov_a", ask(token)))["decision"] == "allow"


@pytest.mark.asyncio
async def test_an_unknown_kid_reloads_the_keys_once_per_request() -> None:
    """A kid still unknown after a reload was checked again, and reloaded again, with no
    end but the reload's own rate limit: every pass a database read for one request."""
    v, shards = verifier()
    loads: list[bool] = []

    async def reload_finds_nothing(*, force: bool = False) -> bool:
        loads.append(force)
        return True  # reloaded, and still no such kid

    v._load_keys = reload_finds_nothing  # type: ignore[method-assign]
    stranger = PrivateKey.generate("ES256", kid="nobody-knows-me")
    answer = await v.verify("prov_a", ask(mint(now=time.time(), signer=stranger)))
    assert (answer["decision"], answer["reason"]) == ("deny", "invalid_token:unknown_kid")
    assert loads == [False]
    assert [c.deny for c in shards.recorded] == ["invalid_token:unknown_kid"]


@pytest.mark.parametrize("interval", [0.0, -1.0, 0.01, 3600.0])
def test_the_reload_interval_is_bounded(interval: float) -> None:
    """It rate-limits what an unknown kid or an unknown provider id (anyone can send one)
    costs: at 0, every such request was a read of the whole table."""
    settings: dict[str, Any] = {
        "database_url": "postgresql://unused",
        "redis_url": "redis://unused",
        "issuer": "https://registry.example",
    }
    with pytest.raises(ValidationError):
        VerifierSettings(**settings, key_refresh_min_interval=interval)
    assert VerifierSettings(**settings).key_refresh_min_interval == 1.0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("shard_timeout", 0.0),
        ("shard_timeout", -0.04),
        ("shard_timeout", 60.0),
        ("max_batch", 0),
        ("max_batch", 1_000_000),
        ("revocation_poll", 0.0),
        ("revocation_poll", 3600.0),
        # Polled no more often than freshness lasts: stale between polls, every request
        # denied revocation_state_stale with nothing naming the settings.
        ("revocation_poll", 1.0),
        ("revocation_poll", 2.0),
        ("revocation_max_staleness", 0.0),
        ("revocation_max_staleness", -1.0),
        ("revocation_max_staleness", 3600.0),
    ],
)
def test_the_waits_and_batches_are_bounded(field: str, value: float) -> None:
    """None of these had bounds: a shard_timeout of 0 denied every check, a poll interval of
    0 spun a loop, a max_batch of 0 never sent a check, and an hour of staleness let a
    revoked token through for an hour with no error at start."""
    settings: dict[str, Any] = {
        "database_url": "postgresql://unused",
        "redis_url": "redis://unused",
        "issuer": "https://registry.example",
    }
    with pytest.raises(ValidationError, match=field):
        VerifierSettings(**settings, **{field: value})
    defaults = VerifierSettings(**settings)
    assert (defaults.shard_timeout, defaults.max_batch) == (0.04, 128)
    assert (defaults.revocation_poll, defaults.revocation_max_staleness) == (0.25, 1.0)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("url", "/v1/calendar/events"),  # the path alone: a provider's likely mistake
        ("url", "api.example/v1/calendar/events"),
        ("url", "ftp://api.example/v1/calendar/events"),
        ("url", "https://user:pw@api.example/v1/calendar/events"),
        ("url", "https://api.example:99999/v1/calendar/events"),
        ("url", "https://[::1/v1"),
        ("method", "GET "),
        ("method", "G:ET"),
        ("method", "GÉT"),
    ],
)
async def test_a_request_line_no_proof_can_name_is_refused_and_records_nothing(
    field: str, value: str
) -> None:
    """The method and URL are the provider's account of the request. One that is not an
    HTTP method or an absolute http(s) URL was answered 200 deny ``htm_mismatch`` or
    ``htu_mismatch``, recorded on the agent's audit chain as if its proof were at fault;
    it is the call's own error now: 400 naming the field, nothing recorded."""
    v, shards = verifier()
    body = ask(mint(now=time.time())).model_dump(mode="json", exclude_none=True)
    transport = httpx.ASGITransport(app=create_app(v))
    async with httpx.AsyncClient(transport=transport, base_url="http://verifier") as c:
        for route in ("/v1/verify", "/v1/introspect"):
            r = await c.post(route, json={**body, field: value}, headers=basic("prov_a"))
            assert r.status_code == 400, r.text
            assert r.json()["reason"] == "schema"
            assert [d["loc"] for d in r.json()["details"]] == [[field]]
        assert shards.recorded == []
        # What any proof for the request names still passes: case, default port, query.
        same = "HTTPS://API.example:443" + HTU.removeprefix("https://api.example") + "?q=1"
        r = await c.post("/v1/verify", json={**body, "url": same}, headers=basic("prov_a"))
        assert r.json()["decision"] == "allow", r.text


@pytest.mark.asyncio
async def test_a_key_load_that_began_earlier_does_not_bring_back_a_retired_key() -> None:
    """An unknown kid's reload (anyone can send one) and a poll's key sync can load the
    key table at once. The reload that began first, before a key's ``retires_at``, may end
    after the sync that saw it retired: its older rows must not put the retired key back,
    where it verified tokens until a later poll noticed."""
    v, _ = verifier()
    retiring = PrivateKey.generate("ES256", kid="retiring")
    read, resume = asyncio.Event(), asyncio.Event()

    class Pool:
        """The key table: the first read sees the key still live, then waits; later reads
        find it retired."""

        def __init__(self) -> None:
            self.reads = 0

        async def fetch(self, query: str, *args: Any) -> list[dict[str, Any]]:
            self.reads += 1
            if self.reads == 1:
                rows = [
                    {"public_jwk": REGISTRY.public_jwk()},
                    {"public_jwk": retiring.public_jwk()},
                ]
                read.set()
                await resume.wait()
                return rows
            return [{"public_jwk": REGISTRY.public_jwk()}]

    v.pool = Pool()  # type: ignore[assignment]
    earlier = asyncio.create_task(v._load_keys())
    await read.wait()
    assert await v._load_keys(force=True)  # the poll's sync, after the key retired
    resume.set()
    await earlier
    assert set(v.tokens.keys) == {REGISTRY.kid}
    answer = await v.verify("prov_a", ask(mint(now=time.time(), signer=retiring)))
    assert (answer["decision"], answer["reason"]) == ("deny", "invalid_token:unknown_kid")


@pytest.mark.asyncio
async def test_an_allow_that_names_no_audit_event_is_not_answered_allow() -> None:
    """No allow leaves without its audit row, and the event id is the shard's word that the
    row is committed. A shard answering allow with no event (another version, a bug, a
    garbled row: the link accepts a row without one) was answered allow all the same."""

    class _Unrecorded(Shards):
        async def check(self, shard: int, check: Check) -> Result:
            self.recorded.append(check)
            return Result(True, "ok")

    v, _ = verifier()
    v.shards = _Unrecorded()  # type: ignore[assignment]
    body = ask(mint(now=time.time()))
    answer = await v.verify("prov_a", body)
    assert (answer["decision"], answer["reason"]) == ("deny", "audit_unavailable")
    assert answer["audit_event"] is None
    assert await v.introspect("prov_a", ask(mint(now=time.time()))) == {"active": False}


async def _ends_cancelled_unsent(request: asyncio.Task[Any], shards: Shards) -> None:
    """The request ended cancelled, and no check of it went to its shard."""
    await asyncio.wait((request,), timeout=2.0)
    assert request.cancelled(), f"the request ran on after it was cancelled: {request.result()}"
    assert shards.recorded == []


@pytest.mark.asyncio
async def test_a_request_cancelled_as_its_key_reload_ends_sends_no_check() -> None:
    """A request given up (its caller gone) in the loop turn its unknown kid's key reload
    ended: on Python 3.11 ``asyncio.wait_for`` returned the reload's result and dropped the
    cancellation, so the request ran on, sent its check, and the shard committed an allow
    (its budget spent, its audit row an allow) that no one received and nothing voided."""
    v, shards = verifier()
    rotated = PrivateKey.generate("ES256", kid="rotated")
    request: asyncio.Task[Any] | None = None

    async def reload_as_the_caller_leaves(*, force: bool = False) -> bool:
        v.tokens.set_keys(KeySet([PublicKey.from_jwk(k.public_jwk()) for k in (REGISTRY, rotated)]))
        assert request is not None
        request.cancel()  # in the turn the reload ends
        return True

    v._load_keys = reload_as_the_caller_leaves  # type: ignore[method-assign]
    request = asyncio.create_task(v.verify("prov_a", ask(mint(now=time.time(), signer=rotated))))
    await _ends_cancelled_unsent(request, shards)


@pytest.mark.asyncio
async def test_a_request_cancelled_as_its_step_up_lookup_ends_sends_no_check() -> None:
    """The same for the step-up lookup: a request given up as the lookup answered ran on
    and sent its check (and with it the one-time step-up reference, spent by the shard)."""
    v, shards = verifier()
    request: asyncio.Task[Any] | None = None

    class Pool:
        async def fetchrow(self, query: str, *args: Any) -> None:
            assert request is not None
            request.cancel()  # in the turn the lookup ends (no such step-up)

    v.pool = Pool()  # type: ignore[assignment]
    body = ask(mint(now=time.time())).model_copy(update={"step_up_ref": "stp-ref"})
    request = asyncio.create_task(v.verify("prov_a", body))
    await _ends_cancelled_unsent(request, shards)
