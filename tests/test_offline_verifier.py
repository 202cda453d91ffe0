"""OfflineVerifier against the verifier it stands in for.

The differential: generated requests (tokens, proofs, actions and envelopes, each
sometimes wrong in one way) go through ``OfflineVerifier`` and through the in-process
verifier (tests/verifier_inprocess.py, reached over HTTP by ``VerifierClient`` as a provider
reaches it), whose shard stand-in here decides with the real ``ShardState`` on a fresh
grant, at the same instant. Every offline allow must be an online allow or an online deny
for a reason that needs state; every online deny for a stateless reason must be the offline
deny, reason for reason. Then the JWKS the offline check is given: a rotated key, and keys
that must never be trusted.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import httpx
import pytest
from verifier_inprocess import AGENT, AUDIENCE, ISSUER, REGISTRY, Shards, mint, verifier

from agentauth.actors import Check, Result
from agentauth.actors._state import ShardState
from agentauth.protocol import (
    Action,
    Capability,
    Envelope,
    Grant,
    InvalidRequest,
    PrivateKey,
    b64url_decode,
    b64url_encode,
    create_dpop_proof,
    mint_access_token,
)
from agentauth.protocol._jws import sign_compact
from agentauth.sdk import OfflineVerifier, VerifierClient
from agentauth.sdk._provider import denial
from agentauth.verifier import Verifier, create_app

# Online denials that need memory or a lookup the offline check does not have: a step-up
# reference the database does not approve, a database that is not there. (With a fresh
# grant and a fresh replay window, no rate, spend or replay refusal can arise.)
STATEFUL = frozenset({"step_up_invalid", "dependency_unavailable"})

# The envelope's rules checked after the step-up threshold (docs/protocol.md).
AFTER_STEP_UP = frozenset({"rate_limited", "cumulative_limit_exceeded"})

OTHER_KEY = PrivateKey.generate("ES256", kid="retired-es256")
ED_REGISTRY = PrivateKey.generate("Ed25519", kid="registry-ed25519")
URL = f"{AUDIENCE}/v1/calendar/events"
MONDAY = 1_717_372_800  # 2024-06-03 00:00 UTC


class DecidingShards(Shards):
    """The shard stand-in, deciding as a shard does on a grant it has not seen: the real
    ``ShardState.decide`` (proof age, replay, step-up, envelope) on the shard's clock,
    the wall clock rounded up to the whole millisecond."""

    async def check(self, shard: int, check: Check) -> Result:
        self.recorded.append(check)
        now = math.ceil(time.time() * 1000) / 1000
        outcome = ShardState(started_at=now).decide(check, now)
        return Result(outcome.allowed, outcome.reason, audit_event=f"verifier-{shard}:1")


class StepUps:
    """The step_ups table: "ref-ok" approves exactly the action of the case at hand."""

    def __init__(self) -> None:
        self.document: dict[str, Any] = {}

    async def fetch(self, query: str, *args: Any) -> list[dict[str, Any]]:
        # The signing key table, read on an unknown kid: the keys the offline check has.
        return [{"public_jwk": k.public_jwk()} for k in (REGISTRY, ED_REGISTRY)]

    async def fetchrow(self, query: str, ref: str) -> dict[str, Any] | None:
        if ref != "ref-ok":
            return None
        return {"document": json.dumps(self.document), "status": "approved", "expires_at": 1e12}


@dataclass
class Case:
    token: str
    proof: str
    method: str
    url: str
    action: Action
    step_up_ref: str | None
    now: int
    label: str


def _envelope(rng: random.Random, now: int) -> dict[str, Any]:
    currency = rng.choice(["USD", "EUR", "JPY"])
    envelope: dict[str, Any] = {}
    if rng.random() < 0.3:
        envelope["timezone"] = rng.choice(["UTC", "Europe/Berlin", "America/New_York"])
    if rng.random() < 0.4:
        start = rng.randrange(0, 23)
        end = rng.randrange(start + 1, 25)
        days = rng.sample(["mon", "tue", "wed", "thu", "fri", "sat", "sun"], rng.randrange(1, 8))
        envelope["time_windows"] = [
            {"days": days, "start": f"{start:02d}:00", "end": f"{end:02d}:00"}
        ]
    if rng.random() < 0.4:
        envelope["max_per_transaction"] = {
            "amount": str(rng.randrange(1, 200)),
            "currency": currency,
        }
    if rng.random() < 0.4:
        envelope["step_up_threshold"] = {"amount": str(rng.randrange(1, 100)), "currency": currency}
    if rng.random() < 0.4:
        period = rng.choice(["hour", "day", "week", "month", "grant"])
        envelope["spend_limits"] = [
            {"amount": str(rng.randrange(1, 150)), "currency": currency, "period": period}
        ]
    if rng.random() < 0.3:
        envelope["rate_limits"] = [{"max_count": rng.randrange(1, 5), "window_seconds": 60}]
    if rng.random() < 0.3:
        envelope["expires_at"] = now + rng.choice([-10, -1, 0, 1, 10, 3600])
    return envelope


def _capabilities(rng: random.Random, action: Action) -> list[Capability]:
    """A few capabilities, most often one of them broad enough for ``action``."""
    broad = {
        "read": Capability.read("*"),
        "write": Capability.write("*"),
        "transact": Capability.transact("*"),
        "custom": Capability.custom(action.name or "export", "*"),
    }
    pool = [
        Capability.read("calendar/*"),
        Capability.transact("payments/*"),
        Capability.transact("*"),
        Capability.read("calendar/events", filter="mine"),
        Capability.write("calendar/events"),
        Capability.transact("payments/*"),
        Capability.transact("payments/*", max_amount=50, currency="USD"),
        Capability.transact("payments/1", payees=["acme"]),
        Capability.custom("export", "calendar/*"),
    ]
    chosen = rng.sample(pool, rng.randrange(1, 3))
    return [broad[action.kind], *chosen] if rng.random() < 0.7 else chosen


def _action(rng: random.Random) -> Action:
    kind = rng.choice(["read", "write", "transact", "transact", "transact", "custom"])
    if kind == "transact":
        amount = rng.choice(["0.5", "1", "10", "20", "49.99", "50", "75", "150", "0.005", "3.5"])
        return Action(
            kind="transact",
            resource=rng.choice(["payments/1", "payments/2", "calendar/events"]),
            amount=Decimal(amount),
            currency=rng.choice(["USD", "USD", "EUR", "JPY"]),
            payee=rng.choice([None, "acme", "evil"]),
        )
    resource = rng.choice(["calendar/events", "calendar/other", "payments/1"])
    if kind == "custom":
        return Action(kind="custom", name=rng.choice(["export", "delete"]), resource=resource)
    if kind == "read":
        return Action(kind="read", resource=resource, filter=rng.choice([None, "mine", "all"]))
    return Action(kind="write", resource=resource)


def _token(
    rng: random.Random, now: int, envelope: dict[str, Any], action: Action
) -> tuple[str, str]:
    """A token, and what (if anything) is wrong with it."""
    flaw = rng.choice(
        ["none"] * 20
        + [
            "issuer",
            "audience",
            "kid",
            "typ",
            "alg",
            "early",
            "expired",
            "lifetime",
            "header",
            "signature",
        ]
    )
    iat = now - rng.randrange(0, 300)
    lifetime = 600
    if flaw == "early":
        iat = now + rng.choice([20, 31, 60])
    elif flaw == "expired":
        iat, lifetime = now - 700, rng.choice([660, 669, 670, 671, 700])
    elif flaw == "lifetime":
        lifetime = 3601
    grant = Grant(
        grant_id="grant-1",
        agent_id="agent-1",
        principal_id="human-1",
        provider_id="prov_a",
        audience="https://other.example" if flaw == "audience" else AUDIENCE,
        capabilities=tuple(_capabilities(rng, action)),
        envelope=Envelope.model_validate(envelope),
        created_at=iat - 100,
    )
    signer = OTHER_KEY if flaw == "kid" else REGISTRY
    issuer = "https://evil.example" if flaw == "issuer" else ISSUER
    token = mint_access_token(
        signer=signer,
        issuer=issuer,
        grant=grant,
        jkt=AGENT.thumbprint,
        receipt_hash=b64url_encode(hashlib.sha256(b"receipt").digest()),
        now=iat,
        lifetime=lifetime,
    )
    if flaw in ("typ", "alg", "header"):
        claims = json.loads(b64url_decode(token.split(".")[1]))
        header: dict[str, Any] = {"alg": "ES256", "kid": REGISTRY.kid, "typ": "aat+jwt"}
        if flaw == "typ":
            header["typ"] = "dpop+jwt"
        elif flaw == "alg":
            header["alg"] = rng.choice(["Ed25519", "HS256", "none"])
        else:
            header["jku"] = "https://evil.example/jwks"
        token = sign_compact(header, claims, REGISTRY)
    if flaw == "signature":
        token = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    return token, flaw


def generate(rng: random.Random) -> Case:
    now = MONDAY + rng.randrange(0, 14 * 86400)
    if rng.random() < 0.3:  # at a window's edge, to the second
        now = now - now % 3600 + rng.choice([-1, 0, 1])
    envelope = _envelope(rng, now)
    action = _action(rng)
    token, flaw = _token(rng, now, envelope, action)
    method = "GET"
    url = URL
    proof_method, proof_url = method, url
    key = AGENT
    iat = now - rng.randrange(0, 5)
    ath_token: str | None = token
    step_up_ref = rng.choice([None, None, None, "ref-ok", "ref-bad"])
    proof_flaw = rng.choice(
        ["none"] * 25
        + [
            "htm",
            "htu",
            "key",
            "old",
            "future",
            "ath",
            "no_ath",
            "same_url",
            "long_url",
            "long_method",
            "odd_method",
            "long_ref",
            "bad_url",
            "bad_action",
        ]
    )
    if proof_flaw == "htm":
        proof_method = "POST"
    elif proof_flaw == "htu":
        proof_url = f"{AUDIENCE}/v1/calendar/other"
    elif proof_flaw == "key":
        key = OTHER_KEY
    elif proof_flaw == "old":
        iat = now - rng.choice([59, 60, 61, 120])
    elif proof_flaw == "future":
        iat = now + rng.choice([9, 10, 11, 60])
    elif proof_flaw == "ath":
        ath_token = token + "x"
    elif proof_flaw == "no_ath":
        ath_token = None
    elif proof_flaw == "same_url":  # another spelling of the same URL (RFC 3986 §6.2.2)
        proof_url = "HTTPS://API.example:443/v1/./calendar/%65vents"
    elif proof_flaw == "long_url":
        url = proof_url = f"{AUDIENCE}/v1/calendar/events/" + "a" * 2100
    elif proof_flaw == "long_method":
        method = proof_method = "M" * 20
    elif proof_flaw == "odd_method":  # no HTTP method token (RFC 9110 §9.1)
        method = proof_method = "GET /"
    elif proof_flaw == "long_ref":
        step_up_ref = "s" * 200
    elif proof_flaw == "bad_url":  # credentials: no htu can name it
        url = proof_url = "https://user@api.example/v1/calendar/events"
    elif proof_flaw == "bad_action":  # model_copy(update=...) validates nothing
        action = action.model_copy(update={"resource": "calendar/../payroll"})
    proof = create_dpop_proof(key, htm=proof_method, htu=proof_url, now=iat, access_token=ath_token)
    return Case(
        token,
        proof,
        method,
        url,
        action,
        step_up_ref,
        now,
        f"token:{flaw} proof:{proof_flaw} ref:{step_up_ref and step_up_ref[:8]}",
    )


def _online(step_ups: StepUps) -> tuple[Verifier, VerifierClient]:
    service, _ = verifier(pool=step_ups)
    service.shards = DecidingShards()  # type: ignore[assignment]
    http = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(service)), base_url="http://verifier"
    )
    client = VerifierClient("http://verifier", provider_id="prov_a", secret="secret-a", http=http)
    return service, client


def _offline() -> OfflineVerifier:
    return OfflineVerifier(
        jwks={"keys": [REGISTRY.public_jwk(), ED_REGISTRY.public_jwk()]},
        issuer=ISSUER,
        audience=AUDIENCE,
    )


@pytest.mark.asyncio
async def test_offline_never_allows_what_the_verifier_denies_for_a_stateless_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = random.Random(20261130)
    step_ups = StepUps()
    (service, online), offline = _online(step_ups), _offline()
    seen: dict[str, int] = {}
    try:
        for _ in range(600):
            case = generate(rng)
            action = case.action
            step_ups.document = {
                "grant_id": "grant-1",
                "agent_id": "agent-1",
                "resource": action.resource,
                "amount": format((action.amount or Decimal(0)).normalize(), "f"),
                "currency": action.currency,
                "payee": action.payee,
            }
            headers = {"authorization": f"DPoP {case.token}", "dpop": case.proof}
            # Known active (as the stand-in promises) however long the run takes.
            service._known_grants.add("grant-1", time.monotonic())
            monkeypatch.setattr(time, "time", lambda now=case.now: float(now))
            asked = {
                "method": case.method,
                "url": case.url,
                "headers": headers,
                "action": action,
                "step_up_ref": case.step_up_ref,
            }
            got_online = await online.verify_request(**asked)
            got_offline = await offline.verify_request(**asked)
            monkeypatch.undo()
            on, off = got_online.reason, got_offline.reason
            seen[on] = seen.get(on, 0) + 1
            where = (case.label, on, off)
            if got_offline.allowed:
                assert got_online.allowed or on in STATEFUL, where
            if case.step_up_ref == "ref-ok" and off == "step_up_required":
                # Only a one-time approval lets the verifier pass what offline cannot: an
                # allow, or a refusal by a rule checked after the step-up's.
                assert got_online.allowed or on in AFTER_STEP_UP, where
            elif got_online.allowed:
                assert got_offline.allowed, where
            elif on not in STATEFUL:
                if on == "invalid_request:rejected_by_verifier":
                    # The verifier's model refused the call: offline refuses it as input.
                    assert off.startswith("invalid_request:"), where
                else:
                    assert off == on, where
    finally:
        await online.aclose()
    # The generator reaches the allows and the refusals it is meant to compare.
    assert seen.get("ok", 0) >= 30, seen
    for reason in (
        "expired",
        "outside_time_window",
        "currency_mismatch",
        "transaction_limit_exceeded",
        "step_up_required",
        "cumulative_limit_exceeded",
        "amount_precision",
        "insufficient_capability",
        "invalid_token:unknown_kid",
        "invalid_dpop_proof:htu_mismatch",
        "invalid_request:rejected_by_verifier",
        "invalid_request:url_too_long",
    ):
        assert seen.get(reason, 0) > 0, (reason, seen)


# --- the JWKS it is given ---------------------------------------------------------------------


def _request(signer: PrivateKey, now: int) -> dict[str, Any]:
    token = mint(now=now, signer=signer)
    proof = create_dpop_proof(AGENT, htm="GET", htu=URL, now=now, access_token=token)
    return {
        "method": "GET",
        "url": URL,
        "headers": {"authorization": f"DPoP {token}", "dpop": proof},
        "action": Action(kind="read", resource="calendar/events"),
    }


@pytest.mark.asyncio
async def test_a_token_signed_by_a_key_rotated_in_since_is_denied_not_a_crash() -> None:
    now = int(time.time())
    offline = OfflineVerifier(
        jwks={"keys": [REGISTRY.public_jwk()]}, issuer=ISSUER, audience=AUDIENCE
    )
    assert (await offline.verify_request(**_request(REGISTRY, now))).allowed
    rotated_in = PrivateKey.generate("Ed25519", kid="registry-next")
    refused = await offline.verify_request(**_request(rotated_in, now))
    assert (refused.allowed, refused.reason) == (False, "invalid_token:unknown_kid")


@pytest.mark.parametrize(
    "jwk",
    [
        {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac", "alg": "HS256"},
        {**REGISTRY.public_jwk(), "d": "AAAA"},
        {**ED_REGISTRY.public_jwk(), "d": "AAAA"},
        {**ED_REGISTRY.public_jwk(), "d": "AAAA", "use": "enc"},
        {**REGISTRY.public_jwk(), "alg": "Ed25519"},
        {**REGISTRY.public_jwk(), "key_ops": "verify"},
    ],
    ids=["hmac", "ec_private", "ed_private", "private_enc", "alg_mismatch", "key_ops_string"],
)
def test_a_jwks_with_a_key_it_must_not_trust_is_refused_whole(jwk: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest):
        OfflineVerifier(
            jwks={"keys": [REGISTRY.public_jwk(), jwk]}, issuer=ISSUER, audience=AUDIENCE
        )


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "jwk",
    [
        {**ED_REGISTRY.public_jwk(), "use": "enc"},
        {**{k: v for k, v in ED_REGISTRY.public_jwk().items() if k != "use"}, "key_ops": ["sign"]},
        {**ED_REGISTRY.public_jwk(), "alg": "none"},
        {k: v for k, v in ED_REGISTRY.public_jwk().items() if k != "kid"},
        {"kty": "oct", "kid": "hmac"},
        {"kty": "RSA", "n": "AQAB", "e": "AQAB", "kid": "rsa"},
    ],
    ids=["use_enc", "key_ops_sign", "alg_none", "no_kid", "oct", "rsa"],
)
async def test_a_key_that_is_not_for_verifying_is_left_out_and_the_rest_kept(
    jwk: dict[str, Any],
) -> None:
    """An encryption key beside the signing keys, as many JWKS endpoints publish, no longer
    refuses the whole set (it did until 2026-11-30); and it verifies nothing: the first
    four are the real Ed25519 registry key, marked as not for signatures or unnamed."""
    now = int(time.time())
    offline = OfflineVerifier(
        jwks={"keys": [REGISTRY.public_jwk(), jwk]}, issuer=ISSUER, audience=AUDIENCE
    )
    assert (await offline.verify_request(**_request(REGISTRY, now))).allowed
    refused = await offline.verify_request(**_request(ED_REGISTRY, now))
    assert (refused.allowed, refused.reason) == (False, "invalid_token:unknown_kid")


# --- refreshing the JWKS on an unknown kid ------------------------------------------------------


class JWKSEndpoint:
    """The registry's /.well-known/jwks.json, in process: serves ``keys`` (or a 503 while
    ``down``), counts the requests, and holds each answer until ``release`` is set."""

    def __init__(self, *keys: PrivateKey) -> None:
        self.keys = [k.public_jwk() for k in keys]
        self.down = False
        self.requests = 0
        self.asked = asyncio.Event()
        self.release = asyncio.Event()
        self.release.set()
        self.http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="https://registry.example"
        )

    async def app(self, scope: Any, receive: Any, send: Any) -> None:
        self.requests += 1
        self.asked.set()
        await self.release.wait()
        status, body = (
            (503, b"{}") if self.down else (200, json.dumps({"keys": self.keys}).encode())
        )
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def fetch_jwks(self) -> object:
        """What a provider passes: an HTTP GET of the JWKS, an error status an exception."""
        response = await self.http.get("/.well-known/jwks.json")
        response.raise_for_status()
        return response.json()


class Clock:
    """``time`` for the SDK module: the wall clock as it is, a monotonic one moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    from agentauth.sdk import _provider

    fake = Clock()
    monkeypatch.setattr(_provider, "time", fake)
    return fake


def _refreshing(endpoint: JWKSEndpoint, **kwargs: Any) -> OfflineVerifier:
    return OfflineVerifier(
        jwks={"keys": [REGISTRY.public_jwk()]},
        issuer=ISSUER,
        audience=AUDIENCE,
        fetch_jwks=endpoint.fetch_jwks,
        **kwargs,
    )


@pytest.mark.asyncio
async def test_a_key_published_after_construction_verifies_after_a_refresh(clock: Clock) -> None:
    """A rotation publishes the new kid ahead of its first token; the offline check built
    before it fetches the JWKS again at that first token and allows it (until 2026-11-30 it
    denied every such token, unknown_kid, until the provider built a new one)."""
    now = int(time.time())
    rotated_in = PrivateKey.generate("Ed25519", kid="registry-next")
    endpoint = JWKSEndpoint(REGISTRY, rotated_in)
    offline = _refreshing(endpoint)
    assert (await offline.verify_request(**_request(REGISTRY, now))).allowed
    assert endpoint.requests == 0  # a known kid fetches nothing
    allowed = await offline.verify_request(**_request(rotated_in, now))
    assert (allowed.allowed, allowed.reason) == (True, "ok_offline")
    assert endpoint.requests == 1
    assert (await offline.verify_request(**_request(rotated_in, now))).allowed
    assert (await offline.verify_request(**_request(REGISTRY, now))).allowed
    assert endpoint.requests == 1


@pytest.mark.asyncio
async def test_unknown_kids_fetch_at_most_once_per_interval(clock: Clock) -> None:
    now = int(time.time())
    endpoint = JWKSEndpoint(REGISTRY)
    offline = _refreshing(endpoint, refresh_interval=30)
    nobodys = PrivateKey.generate("ES256", kid="nobodys-key")
    for _ in range(3):
        refused = await offline.verify_request(**_request(nobodys, now))
        assert refused.reason == "invalid_token:unknown_kid"
    assert endpoint.requests == 1
    # Published just after that fetch: its tokens wait for the interval to end.
    rotated_in = PrivateKey.generate("ES256", kid="registry-next")
    endpoint.keys.append(rotated_in.public_jwk())
    clock.now += 29.9
    refused = await offline.verify_request(**_request(rotated_in, now))
    assert (refused.reason, endpoint.requests) == ("invalid_token:unknown_kid", 1)
    clock.now += 0.1
    assert (await offline.verify_request(**_request(rotated_in, now))).allowed
    assert endpoint.requests == 2


@pytest.mark.asyncio
async def test_unknown_kids_arriving_together_share_one_fetch(clock: Clock) -> None:
    """Every request with the new kid while the fetch is under way waits for that fetch,
    and the request that started it being given up on (its client gone) does not cancel
    it for the others."""
    now = int(time.time())
    rotated_in = PrivateKey.generate("ES256", kid="registry-next")
    endpoint = JWKSEndpoint(REGISTRY, rotated_in)
    endpoint.release.clear()
    offline = _refreshing(endpoint)
    requests = [
        asyncio.create_task(offline.verify_request(**_request(rotated_in, now))) for _ in range(5)
    ]
    await endpoint.asked.wait()  # every request has reached the fetch by now
    requests[0].cancel()
    endpoint.release.set()
    answers = await asyncio.gather(*requests[1:])
    assert [a.reason for a in answers] == ["ok_offline"] * 4
    assert requests[0].cancelled()
    assert endpoint.requests == 1


@pytest.mark.asyncio
async def test_a_failed_fetch_denies_and_waits_for_the_interval(clock: Clock) -> None:
    """Fail closed: the token under a kid that could not be looked up is denied as nothing
    decided (a 503, Retry-After the time left before a fetch may be made again), tokens under
    the keys held still verify, and no fetch is made again before the interval ends."""
    now = int(time.time())
    rotated_in = PrivateKey.generate("ES256", kid="registry-next")
    endpoint = JWKSEndpoint(REGISTRY, rotated_in)
    endpoint.down = True
    offline = _refreshing(endpoint, refresh_interval=30)
    refused = await offline.verify_request(**_request(rotated_in, now))
    assert (refused.allowed, refused.reason) == (False, "jwks_unavailable")
    status, headers, _ = denial(refused)
    assert (status, headers["Retry-After"]) == (503, "30")
    assert (await offline.verify_request(**_request(REGISTRY, now))).allowed
    endpoint.down = False
    clock.now += 20
    refused = await offline.verify_request(**_request(rotated_in, now))
    assert (refused.reason, endpoint.requests) == ("jwks_unavailable", 1)
    assert denial(refused)[1]["Retry-After"] == "10"
    clock.now += 10
    assert (await offline.verify_request(**_request(rotated_in, now))).allowed
    assert endpoint.requests == 2


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "served",
    [
        [{"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"}],
        "not a JWKS",
    ],
    ids=["secret-key", "not-a-jwks"],
)
async def test_a_fetched_jwks_that_does_not_parse_is_a_failed_fetch(
    clock: Clock, served: Any
) -> None:
    now = int(time.time())
    endpoint = JWKSEndpoint(REGISTRY)
    endpoint.keys = served
    offline = _refreshing(endpoint)
    refused = await offline.verify_request(**_request(ED_REGISTRY, now))
    assert refused.reason == "jwks_unavailable"
    assert (await offline.verify_request(**_request(REGISTRY, now))).allowed


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "served",
    [
        [],
        # Well-formed, and each left out by KeySet.from_jwks: an encryption key, an RSA key.
        [
            {**OTHER_KEY.public_jwk(), "use": "enc"},
            {"kty": "RSA", "kid": "rsa", "n": "AQAB", "e": "AQAB"},
        ],
    ],
    ids=["empty", "no-usable-key"],
)
async def test_a_fetched_jwks_without_a_usable_key_is_a_failed_fetch(
    clock: Clock, served: list[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    """A registry always publishes its signing key, so a set with none is an answer gone
    wrong: the keys held are kept (until 2026-12-01 it replaced them, and every token was
    refused until the next fetch), the unknown kid is denied as nothing decided, and it
    is said in the log."""
    now = int(time.time())
    endpoint = JWKSEndpoint(REGISTRY)
    endpoint.keys = served
    offline = _refreshing(endpoint, refresh_interval=30)
    with caplog.at_level("WARNING", logger="agentauth.provider"):
        refused = await offline.verify_request(**_request(ED_REGISTRY, now))
    assert (refused.allowed, refused.reason) == (False, "jwks_unavailable")
    assert denial(refused)[:2] == (503, {"Retry-After": "30"})
    assert "the fetched JWKS has no usable key" in caplog.text
    assert (await offline.verify_request(**_request(REGISTRY, now))).allowed
    clock.now += 10
    refused = await offline.verify_request(**_request(ED_REGISTRY, now))
    assert (refused.reason, endpoint.requests) == ("jwks_unavailable", 1)
    endpoint.keys = [REGISTRY.public_jwk(), ED_REGISTRY.public_jwk()]
    clock.now += 20
    assert (await offline.verify_request(**_request(ED_REGISTRY, now))).allowed
    assert endpoint.requests == 2


@pytest.mark.asyncio
async def test_a_hung_fetch_is_given_up_on(clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    from agentauth.sdk import _provider

    monkeypatch.setattr(_provider, "_JWKS_FETCH_TIMEOUT", 0.01)
    now = int(time.time())
    endpoint = JWKSEndpoint(REGISTRY, ED_REGISTRY)
    endpoint.release.clear()  # never answers
    offline = _refreshing(endpoint)
    refused = await offline.verify_request(**_request(ED_REGISTRY, now))
    assert refused.reason == "jwks_unavailable"
    endpoint.release.set()
    clock.now += 30
    assert (await offline.verify_request(**_request(ED_REGISTRY, now))).allowed


@pytest.mark.asyncio
async def test_a_key_removed_from_the_jwks_stops_verifying_after_a_refresh(clock: Clock) -> None:
    now = int(time.time())
    rotated_in = PrivateKey.generate("ES256", kid="registry-next")
    endpoint = JWKSEndpoint(rotated_in)  # REGISTRY retired
    offline = _refreshing(endpoint)
    assert (await offline.verify_request(**_request(REGISTRY, now))).allowed  # not refreshed yet
    assert (await offline.verify_request(**_request(rotated_in, now))).allowed
    refused = await offline.verify_request(**_request(REGISTRY, now))
    assert (refused.allowed, refused.reason) == (False, "invalid_token:unknown_kid")


@pytest.mark.parametrize("interval", [0.5, 601, math.nan, math.inf])
def test_the_refresh_interval_is_bounded(interval: float) -> None:
    async def fetch_jwks() -> object:
        return {"keys": []}

    with pytest.raises(ValueError, match="refresh_interval"):
        OfflineVerifier(
            jwks={"keys": []},
            issuer=ISSUER,
            audience=AUDIENCE,
            fetch_jwks=fetch_jwks,
            refresh_interval=interval,
        )


# --- the input the verifier refuses before deciding -----------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("long_step_up_ref", "invalid_request:step_up_ref_too_long"),
        ("long_method", "invalid_request:method_too_long"),
        ("long_url", "invalid_request:url_too_long"),
        ("odd_method", "invalid_request:bad_method"),
        ("unvalidated_action", "invalid_request:bad_action"),
    ],
)
async def test_input_the_verifier_refuses_is_refused_offline_too(case: str, reason: str) -> None:
    """Each of these, with a good token and a proof that names the request, the verifier
    refuses as the call's own error (VerifierClient before asking, or VerifyIn): a
    step-up reference over 128 characters, a method over 16 or that is no HTTP token, a
    URL over 2048, an action built with ``model_copy(update=...)`` that would not validate.
    Offline they were allowed."""
    now = int(time.time())
    asked = _request(REGISTRY, now)
    token = asked["headers"]["authorization"].removeprefix("DPoP ")
    if case == "long_step_up_ref":
        asked["step_up_ref"] = "s" * 200
    elif case in ("long_method", "odd_method", "long_url"):
        if case == "long_url":
            asked["url"] = URL + "/" + "a" * 2100
        else:
            asked["method"] = "M" * 20 if case == "long_method" else "GET /"
        asked["headers"]["dpop"] = create_dpop_proof(
            AGENT, htm=asked["method"], htu=asked["url"], now=now, access_token=token
        )
    else:
        asked["action"] = asked["action"].model_copy(update={"resource": "calendar/../payroll"})
    refused = await _offline().verify_request(**asked)
    assert (refused.allowed, refused.reason) == (False, reason)


@pytest.mark.asyncio
async def test_a_long_url_never_reaches_the_proof_checks_url_cache() -> None:
    """The proof check normalizes the request URL and caches it (4,096 entries): with no
    cap on the URL offline, anyone holding a token (the proof's signature is checked
    after) could fill that cache with URLs as long as the server takes."""
    from agentauth.protocol import normalize_htu

    now = int(time.time())
    asked = _request(REGISTRY, now)
    asked["url"] = URL + "/" + "a" * 20_000
    before = normalize_htu.cache_info()
    refused = await _offline().verify_request(**asked)
    after = normalize_htu.cache_info()
    assert refused.reason == "invalid_request:url_too_long"
    assert (after.hits + after.misses) == (before.hits + before.misses)


def test_the_offline_checks_input_rules_are_the_verifiers() -> None:
    from agentauth.sdk._provider import _METHOD
    from agentauth.verifier import VerifyIn

    metadata = VerifyIn.model_fields["method"].metadata
    assert [m.pattern for m in metadata if hasattr(m, "pattern")] == [_METHOD.pattern]
