"""The verifier: every check of a provider's request, failing closed at each step.

Order: the token (signature, pinned algorithm, issuer, audience = the calling provider,
lifetime) -> the DPoP proof bound to it (method, URL, ath, cnf.jkt, nonce) -> a capability
for the action -> revocation (token, grant, agent) -> the grant's status (Redis cache-aside
over PostgreSQL) -> a one-time step-up approval if one is presented -> the agent's shard
(replay, envelope, step-up single use, audit commit). Every decision, allow or deny, is
committed to the shard's audit chain before the answer leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Generic, TypeVar

import asyncpg
import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .._events import stop_tasks, wait_event, wait_within
from .._logs import Throttle
from .._origins import check_issuer
from ..actors import Check, Result, ShardClient, shard_for
from ..metrics import CounterBuffer, observe, set_gauge
from ..protocol import (
    AccessToken,
    AccessTokenVerifier,
    Action,
    AgentAuthError,
    DPoPNonces,
    DPoPVerifier,
    Forbidden,
    InvalidDPoPProof,
    InvalidRequest,
    InvalidToken,
    KeySet,
    PublicKey,
    TokenPolicy,
    Unauthenticated,
    UseDPoPNonce,
    allowing_capability,
    amount_fits,
    normalize_htu,
)
from ..protocol._types import is_identifier
from ..store import GRANT_REVOKED_TTL, REVOCATION_CHANNEL, checked_url, grant_cache_key

__all__ = ["FAIL_CLOSED", "Verifier", "VerifierSettings", "VerifyIn"]

log = logging.getLogger("agentauth.verifier")
# Failures that repeat with every poll or request while a dependency is down are said at
# most this often (seconds), with the count held back.
_SAID_EVERY = 30.0


class VerifierSettings(BaseModel):
    # Errors leave the input out: a model-level one would print all of it, the nonce secret
    # and the database password included (repr=False does not cover it).
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    # URLs may carry passwords: kept out of reprs (and so out of logs).
    database_url: str = Field(repr=False)
    redis_url: str = Field(repr=False)
    issuer: str
    shards: int = Field(4, ge=1, le=256)
    # Bounded waits: a dead dependency must still produce a fast deny. (Every knob here is
    # bounded: 0 or less would mean no shard call ever in time, a poll loop spinning, or
    # batches that never leave; a value past the bounds, denials slower than any caller
    # waits for, or revocations that take minutes to count.)
    shard_timeout: float = Field(0.04, gt=0.0, le=5.0)
    # How long a check may wait for company before its shard call leaves. 0: on the next
    # turn of the event loop. Batches still form under load, behind the call in flight;
    # a fixed wait only added latency once shard calls became cheap (docs/verifier.md).
    batch_wait: float = Field(0.0, ge=0.0, le=0.01)
    max_batch: int = Field(128, ge=1, le=4096)
    # Revocations must reach every replica within a second: the watcher polls twice a
    # second besides listening, and refuses to decide on data older than this.
    revocation_poll: float = Field(0.25, gt=0.0, le=60.0)
    revocation_max_staleness: float = Field(1.0, gt=0.0, le=60.0)
    # RFC 9449 server nonces: off by default (one more round trip per agent per period).
    dpop_nonces: bool = False
    nonce_secret: str | None = Field(None, repr=False)
    # Nonces made with these are accepted too, none is issued with them: to rotate the
    # secret across replicas, first accept the new one everywhere, then issue with it and
    # accept the old one until its nonces have lapsed (docs/verifier.md).
    accepted_nonce_secrets: tuple[str, ...] = Field((), repr=False)
    # At most one reload of the signing keys (an unknown kid) or of the provider table (an
    # unknown provider id, which anyone can send) per this many seconds: at 0, every such
    # request would be a database read.
    key_refresh_min_interval: float = Field(1.0, ge=0.1, le=60.0)
    # Capped by the registry's "revoked" mark, which a fill must never outlive.
    grant_cache_ttl: int = Field(60, ge=1, le=GRANT_REVOKED_TTL)
    # A verification's lookups (grant status, step-up) give up after this: an unreachable
    # database or Redis is a deny in this time, not a wait for a connect or command timeout.
    lookup_timeout: float = Field(0.25, gt=0.0, le=5.0)
    # A denial this replica made because a dependency failed (stale revocations, a failed
    # lookup) waits this long for its shard to record it, then is answered without the
    # event id and recorded when the shard can. In an outage the shard is often slow too
    # (its database may be what is down), and the answer is a deny either way.
    outage_record_wait: float = Field(0.01, ge=0.0, le=1.0)

    @field_validator("database_url", "redis_url")
    @classmethod
    def _parseable(cls, url: str) -> str:
        return checked_url(url)

    @field_validator("issuer")
    @classmethod
    def _issuer(cls, issuer: str) -> str:
        return check_issuer(issuer)

    @model_validator(mode="after")
    def _polled_within_the_staleness_bound(self) -> VerifierSettings:
        # A replica is fresh for revocation_max_staleness after a poll: polled less often,
        # it denied revocation_state_stale between polls, every request, nothing saying why.
        if self.revocation_poll >= self.revocation_max_staleness:
            raise ValueError("revocation_poll must be shorter than revocation_max_staleness")
        return self

    @model_validator(mode="after")
    def _nonces_need_a_secret(self) -> VerifierSettings:
        # Without one, the nonce key would be derived from a public constant: anyone could
        # mint nonces this verifier accepts.
        if self.dpop_nonces and len((self.nonce_secret or "").encode()) < 32:
            raise ValueError("dpop_nonces needs a nonce_secret of at least 32 bytes")
        if any(len(s.encode()) < 32 for s in self.accepted_nonce_secrets):
            raise ValueError("each of accepted_nonce_secrets needs at least 32 bytes")
        return self

    @classmethod
    def from_env(cls, **overrides: object) -> VerifierSettings:
        """Read DATABASE_URL, REDIS_URL, ``AGENTAUTH_ISSUER`` and
        ``AGENTAUTH_VERIFIER_NONCE_SECRET`` from the environment; ``overrides`` win."""
        env = os.environ
        values: dict[str, object] = {}
        for name, key in (
            ("database_url", "DATABASE_URL"),
            ("redis_url", "REDIS_URL"),
            ("issuer", "AGENTAUTH_ISSUER"),
            # A deployment's config (Serve args) turns nonces on; the secret comes from the
            # environment (a Kubernetes Secret), never from a config file.
            ("nonce_secret", "AGENTAUTH_VERIFIER_NONCE_SECRET"),
        ):
            if key in env:
                values[name] = env[key]
        values.update(overrides)
        return cls.model_validate(values)


class VerifyIn(BaseModel):
    """A provider's question: may this request, carrying these headers, do this action?"""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # The credentials stay out of reprs (and so out of logs and error reports).
    token: str = Field(
        max_length=8192, description="The AAT from `Authorization: DPoP ...`.", repr=False
    )
    proof: str = Field(max_length=4096, description="The `DPoP` header.", repr=False)
    # The request's method and absolute URL, which the proof's htm and htu must name. One
    # that no proof can name (not an RFC 9110 token; a relative URL, another scheme, a bad
    # port) is this call's own error: refused 400 with nothing recorded, not answered as
    # the agent's htm_mismatch or htu_mismatch and written to its audit chain.
    method: str = Field(min_length=1, max_length=16, pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
    url: str = Field(min_length=1, max_length=2048)
    action: Action
    step_up_ref: str | None = Field(None, max_length=128, repr=False)

    @field_validator("url")
    @classmethod
    def _absolute_http_url(cls, url: str) -> str:
        try:
            normalize_htu(url)  # cached: the proof's check compares with this very call
        except InvalidRequest:
            raise ValueError("url must be an absolute http(s) URL without credentials") from None
        return url


@dataclass(frozen=True)
class _Provider:
    audience: str
    # Out of the repr, as the registry's ProviderCredential keeps them: a hash is no
    # credential, but nothing that prints a provider needs it either.
    secret_hash: bytes = field(repr=False)
    # The credential its last rotation replaced, accepted until previous_until (Unix time);
    # a random hash and 0 when there is none, so every check compares both.
    previous_hash: bytes = field(repr=False)
    previous_until: float
    suspended: bool  # by the admin: refused, once its secret is right (docs/registry.md)


K = TypeVar("K", bound=Hashable)

# How long a revocation is kept: the longest life the token check lets a token claim (the
# verifier uses the default policy), its clock leeway on either side, and five minutes for
# the registry's, the database's and this host's clocks to disagree. Every token a
# revocation is about was issued before it (the registry issues none for a revoked grant
# or agent: issuance re-reads the grant, locked, in the transaction that records the
# token), so by then that token is refused as expired anyway.
_REVOCATION_MEMORY = TokenPolicy().max_lifetime + 2 * TokenPolicy().leeway + 300

# How long the revocation channel may answer nothing (it is pinged four times a second)
# before the listener takes it for dead and subscribes again.
_CHANNEL_SILENCE = 1.0
# How long a replica's start waits for its revocation state to be fresh.
_START_WAIT = 2.0


class _Expiring(Generic[K]):
    """Keys each kept for ``ttl`` seconds from when they were added (or from ``since``),
    in the order they expire; expired keys are dropped as later ones arrive, so memory
    follows the last ``ttl`` seconds, not every key ever added. Times: any one clock."""

    def __init__(self, ttl: float) -> None:
        self._ttl = ttl
        self._until: dict[K, float] = {}

    def __len__(self) -> int:
        return len(self._until)

    def __contains__(self, key: K) -> bool:
        return key in self._until

    def active(self, key: K, now: float) -> bool:
        return self._until.get(key, now) > now

    def add(self, key: K, now: float, *, since: float | None = None) -> None:
        until = (now if since is None else since) + self._ttl
        # Popped and put back at the end, so the dict stays (about) in expiry order.
        self._until[key] = max(self._until.pop(key, until), until)
        self.forget(now)

    def forget(self, now: float) -> None:
        """Drop the keys whose time has passed, oldest first."""
        until = self._until
        while until:
            oldest = next(iter(until))
            if until[oldest] > now:
                return
            del until[oldest]


class _DecisionCounts:
    """This replica's decisions, counted by reason for each provider that asked. A provider
    may see its own counts (/v1/stats), never another's: how often a competitor's agents
    are allowed, refused or rate-limited is that provider's business. The metrics keep the
    totals. Only authenticated providers are counted, so the table grows with the provider
    table, not with what callers send."""

    def __init__(self) -> None:
        self._by_provider: dict[str, dict[str, int]] = {}

    def add(self, provider_id: str, reason: str) -> None:
        counts = self._by_provider.get(provider_id)
        if counts is None:
            counts = self._by_provider[provider_id] = {}
        counts[reason] = counts.get(reason, 0) + 1

    def of(self, provider_id: str) -> dict[str, int]:
        """A copy of one provider's counts by reason (empty if it asked nothing here)."""
        return dict(self._by_provider.get(provider_id, {}))


async def _closing(pubsub: Any) -> None:
    await pubsub.aclose()  # untyped in redis-py's annotations (its typed aliases are deprecated)


class _Revocations:
    """Revoked tokens, grants and agents, kept fresh by pub/sub plus polling."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        redis: aioredis.Redis,
        settings: VerifierSettings,
        *,
        also: Callable[[], Awaitable[None]],
    ) -> None:
        self._pool = pool
        # Polled with the revocations, under the same staleness rule: the provider table's
        # credentials (a credential ended is a revocation too).
        self._also = also
        self._redis = redis
        self._settings = settings
        # Revoked tokens, grants and agents, as (kind, target), each kept from its
        # revocation (Unix time) for as long as a token it is about can be valid.
        self._revoked: _Expiring[tuple[str, str]] = _Expiring(ttl=_REVOCATION_MEMORY)
        self._last_seq = 0
        self._synced_at = 0.0
        self._listening = False
        # When the channel's subscription was last confirmed: a message published before
        # it reached no one here, so only a poll read after it covers the time before.
        self._subscribed_at = 0.0
        self._poll_now = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._said = Throttle(_SAID_EVERY)

    async def start(self) -> None:
        await self._poll()
        self._tasks = [asyncio.create_task(self._poll_loop()), asyncio.create_task(self._listen())]
        # Until the channel is subscribed and a poll has read after that, every check is
        # denied revocation_state_stale: a replica that took requests at once denied its
        # first ones (tens of milliseconds on an idle machine, seconds on a busy one).
        # Bounded: with Redis down it starts all the same, and denies until it is back.
        deadline = time.monotonic() + _START_WAIT
        while not self.fresh() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def _poll(self) -> None:
        # Fresh as of now, not of when this poll ends: what is read next may be older than
        # the poll's end by the time the table sync below takes (its bounds add up to
        # seconds), and fresh() must not trust it for revocation_max_staleness after that.
        reading = time.monotonic()
        # Revocations are numbered (seq) in the order they commit (migration 0009), so the
        # rows above the last number seen are every revocation this replica has not read.
        # (Ids are taken at insert and commit out of order: polling by id could pass over
        # one for good.) Revocations older than a token can live are left out: on a
        # replica's first poll that is every revocation ever made, and the tokens they are
        # about have expired. One more row (kind NULL) carries the newest number in the
        # same snapshot, read or left out, so later polls start there and do not scan
        # the old rows again.
        rows = await self._pool.fetch(
            "SELECT seq, kind, target, extract(epoch FROM revoked_at)::float8 AS at"
            " FROM revocations WHERE seq > $1"
            " AND revoked_at > now() - $2 * interval '1 second'"
            " UNION ALL SELECT max(seq), NULL, NULL, NULL FROM revocations WHERE seq > $1"
            " ORDER BY seq",
            self._last_seq,
            float(_REVOCATION_MEMORY),
        )
        for row in rows:
            if row["kind"] is not None:
                self._add(row["kind"], row["target"], row["at"])
            elif row["seq"] is not None:
                self._last_seq = row["seq"]
        await self._also()
        self.forget_expired(time.time())
        self._synced_at = reading

    def _add(self, kind: str, target: str, revoked_at: float) -> None:
        self._revoked.add((kind, target), time.time(), since=revoked_at)

    def forget_expired(self, now: float) -> None:
        """Drop revocations whose tokens have all expired (``now``: Unix time)."""
        self._revoked.forget(now)

    async def _poll_loop(self) -> None:
        while True:
            # Or at once when the channel has (re)subscribed: until a poll reads after
            # that, the replica is not fresh.
            await wait_event(self._poll_now, self._settings.revocation_poll)
            self._poll_now.clear()
            try:
                await self._poll()
            except Exception as exc:  # stale data is refused by fresh(); keep trying
                # Every revocation_poll (250 ms) while PostgreSQL is down.
                self._said.log(
                    log,
                    "poll",
                    "revocation poll failed (%s); after revocation_max_staleness every"
                    " check is denied revocation_state_stale until a poll succeeds",
                    type(exc).__name__,
                )

    async def _listen(self) -> None:
        while True:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(REVOCATION_CHANNEL)
                last_ping = time.monotonic()
                # When the oldest ping still unanswered went out (None: none is, or
                # something came in since). Silence is judged from a ping, not from the
                # last thing heard: a replica busy for a second between two reads has
                # sent nothing meanwhile, and what Redis said waits in the socket.
                unanswered: float | None = last_ping  # the SUBSCRIBE counts as one
                while True:
                    message = await pubsub.get_message(timeout=0.25)
                    now = time.monotonic()
                    if message is not None:
                        unanswered = None
                        if message["type"] == "subscribe":
                            # Listening from here, not from sending SUBSCRIBE: Redis may not
                            # have read it yet.
                            self._subscribed_at = now
                            self._listening = True
                            self._poll_now.set()
                        elif message["type"] == "message":
                            item = json.loads(message["data"])
                            self._add(item["kind"], item["target"], time.time())
                    elif unanswered is not None and now - unanswered > _CHANNEL_SILENCE:
                        # A ping a few times a second, and its pong, prove the channel alive
                        # when nothing is revoked. Sending one proves nothing: a stalled
                        # server or a network dropping packets takes it and answers nothing,
                        # and its messages are lost alike.
                        raise TimeoutError("the revocation channel is silent")
                    if now - last_ping >= 0.25:
                        await wait_within(pubsub.ping(), 0.5)
                        last_ping = now
                        if unanswered is None:
                            unanswered = now
            except asyncio.CancelledError:
                raise
            except Exception:
                self._listening = False
            finally:
                # A failed round's connection may be up and subscribed still (a message it
                # could not read): dropped unclosed, each such failure would leave one.
                with contextlib.suppress(Exception):
                    await wait_within(_closing(pubsub), 0.5)
            await asyncio.sleep(0.2)

    def fresh(self) -> bool:
        # The poll must have read after the subscription: a revocation published while the
        # channel was down (or resubscribing) is lost to it, and was read by no poll before.
        age = time.monotonic() - self._synced_at
        return (
            self._listening
            and self._synced_at >= self._subscribed_at
            and age <= self._settings.revocation_max_staleness
        )

    def revoked(self, token: AccessToken) -> bool:
        claims = token.claims
        return (
            ("token", claims.jti) in self._revoked
            or ("grant", claims.grant_id) in self._revoked
            or ("agent", claims.sub) in self._revoked
        )

    async def stop(self) -> None:
        await stop_tasks(self._tasks)


class Verifier:
    def __init__(
        self,
        *,
        settings: VerifierSettings,
        pool: asyncpg.Pool,
        redis: aioredis.Redis,
        shards: ShardClient,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.redis = redis
        self.shards = shards
        self.tokens = AccessTokenVerifier(keys=KeySet([]), issuer=settings.issuer)
        nonces = None
        if settings.dpop_nonces and settings.nonce_secret:
            # The first issues; every one verifies.
            secrets_ = (settings.nonce_secret, *settings.accepted_nonce_secrets)
            nonces = DPoPNonces(
                [hashlib.sha256(b"agentauth-nonce" + s.encode()).digest() for s in secrets_]
            )
        self.proofs = DPoPVerifier(nonces=nonces)
        self.revocations = _Revocations(pool, redis, settings, also=self._sync_tables)
        self._providers: dict[str, _Provider] = {}
        self._known_grants: _Expiring[str] = _Expiring(ttl=5.0)
        self._keys_loaded_at = 0.0
        self._key_loads = 0  # loads begun
        self._key_loaded_ticket = 0  # the latest-begun load applied (see _load_keys)
        self._key_failed_ticket = 0  # the latest-begun load that failed
        self._keys_reload: asyncio.Future[bool] | None = None  # an unknown kid's, in flight
        self._providers_loaded_at = 0.0
        self._provider_epoch = -1
        self._provider_loads = 0  # loads begun
        self._provider_loaded_ticket = 0  # the latest-begun load applied (see _load_providers)
        self._providers_reload: asyncio.Future[None] | None = None
        self.decisions = _DecisionCounts()
        self.counters = CounterBuffer()
        self._said = Throttle(_SAID_EVERY)
        self._tasks: set[asyncio.Future[Any]] = set()
        self._grants_wanted: dict[str, list[asyncio.Future[bytes]]] = {}
        self._grants_looking = False
        self._reporter: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, settings: VerifierSettings, handles: list[Any]) -> Verifier:
        pool = await asyncpg.create_pool(
            settings.database_url,
            min_size=1,
            max_size=4,
            command_timeout=2.0,
            reset=_reset,
            timeout=2.0,  # a new connection's connect, 60 s by default
        )
        assert pool is not None
        redis = aioredis.Redis.from_url(
            settings.redis_url, socket_timeout=0.5, socket_connect_timeout=0.5
        )
        client = ShardClient(
            handles,
            max_batch=settings.max_batch,
            max_wait=settings.batch_wait,
            timeout=settings.shard_timeout,
        )
        verifier = cls(settings=settings, pool=pool, redis=redis, shards=client)
        await client.connect()
        await verifier._load_keys(force=True)
        await verifier._load_providers()
        await verifier.revocations.start()
        verifier._reporter = asyncio.create_task(verifier._report_metrics())
        return verifier

    async def close(self) -> None:
        if self._reporter is not None:
            self._reporter.cancel()
            self.counters.flush()
        await self.revocations.stop()
        self.shards.close()
        await self.redis.aclose()
        await self.pool.close()

    # --- caches ------------------------------------------------------------------------

    def _keys_throttled(self) -> bool:
        return time.monotonic() - self._keys_loaded_at < self.settings.key_refresh_min_interval

    def _keys_in_doubt(self) -> bool:
        """A load begun after the keys in place were read has failed: a kid they lack may
        be one the registry has published."""
        return self._key_failed_ticket > self._key_loaded_ticket

    async def _reload_keys(self) -> bool:
        """For a token naming a kid not loaded: True once the keys were reloaded, False when
        a load was too recent (anyone can make up a kid). Requests asking while a reload is
        in flight share it and its outcome: one told before it ends would be told the kid is
        unknown, which nothing has looked at yet."""
        if self._keys_reload is None:
            if self._keys_throttled():
                return False
            self._keys_reload = asyncio.ensure_future(self._reload_keys_bounded())
        return await asyncio.shield(self._keys_reload)

    async def _reload_keys_bounded(self) -> bool:
        # Bounded like every lookup on the request path (a pool wait included); a bound per
        # request instead would leave an unbounded load for the next requests to wait on.
        try:
            return await wait_within(self._load_keys(), self.settings.lookup_timeout)
        finally:
            self._keys_reload = None

    async def _load_keys(self, *, force: bool = False) -> bool:
        """Reload the registry's published keys; rate-limited so unknown kids are cheap."""
        if not force and self._keys_throttled():
            return False
        self._keys_loaded_at = time.monotonic()
        # Loads can overlap (an unknown kid's reload and a poll's key sync): the one that
        # began last is the freshest, and one that began earlier must not replace it when
        # it ends later (it could bring back a key that had retired in between).
        self._key_loads += 1
        ticket = self._key_loads
        try:
            rows = await self.pool.fetch(
                "SELECT public_jwk FROM signing_keys WHERE retires_at IS NULL OR retires_at > $1",
                int(time.time()),
            )
            keys = []
            for row in rows:
                jwk = row["public_jwk"]
                jwk = json.loads(jwk) if isinstance(jwk, str) else jwk
                keys.append(PublicKey.from_jwk(jwk, alg=jwk.get("alg")))
        except BaseException:  # timed out (cancelled) included
            self._key_failed_ticket = max(self._key_failed_ticket, ticket)
            raise
        if ticket < self._key_loaded_ticket:
            return True  # a later load's keys are in place
        self._key_loaded_ticket = ticket
        if set(KeySet(keys)) != set(self.tokens.keys):
            self.tokens.set_keys(KeySet(keys))
        return True

    async def _load_providers(self) -> None:
        self._providers_loaded_at = time.monotonic()
        # Loads can overlap (a poll's sync and an unknown provider id's reload): the one
        # that began last is the freshest, and one that began earlier must not replace it
        # when it ends later (it could bring back a secret whose overlap had just ended).
        self._provider_loads += 1
        ticket = self._provider_loads

        async def read() -> tuple[int, list[asyncpg.Record]]:
            async with self.pool.acquire() as conn:
                # The epoch first: rows read after it include every change up to it.
                epoch = await conn.fetchval("SELECT epoch FROM provider_changes")
                rows = await conn.fetch(
                    "SELECT id, audience, secret_hash, previous_secret_hash,"
                    " extract(epoch FROM previous_expires_at)::float8 AS previous_until,"
                    " suspended_at IS NOT NULL AS suspended FROM providers"
                )
            return int(epoch), rows

        epoch, rows = await wait_within(read(), self.settings.lookup_timeout)
        if ticket < self._provider_loaded_ticket:
            return
        self._provider_loaded_ticket = ticket
        self._providers = {
            r["id"]: _Provider(
                r["audience"],
                bytes(r["secret_hash"]),
                bytes(r["previous_secret_hash"] or secrets.token_bytes(32)),
                r["previous_until"] or 0.0,
                r["suspended"],
            )
            for r in rows
        }
        self._provider_epoch = epoch

    async def _sync_tables(self) -> None:
        """What every revocation poll also reads (under its staleness rule): the provider
        table's credentials and the registry's signing keys."""
        await self._sync_providers()
        await self._sync_keys()

    async def _sync_keys(self) -> None:
        """Follow the key table: a key reaching its ``retires_at`` leaves this replica within
        a poll (it verifies no token after, a leaked one included), and a new one arrives
        before the first token naming it. Otherwise keys would only reload for an unknown
        kid, which a retired key never is."""
        kids = await wait_within(
            self.pool.fetch(
                "SELECT kid FROM signing_keys WHERE retires_at IS NULL OR retires_at > $1",
                int(time.time()),
            ),
            self.settings.lookup_timeout,
        )
        if {r["kid"] for r in kids} != set(self.tokens.keys):
            await self._load_keys(force=True)

    async def _sync_providers(self) -> None:
        """Part of every revocation poll (so a replica that cannot read it goes stale and
        denies): reload the provider table when a credential changed (a rotation, an
        ended overlap) or a provider was registered."""
        epoch = await wait_within(
            self.pool.fetchval("SELECT epoch FROM provider_changes"),
            self.settings.lookup_timeout,
        )
        if epoch != self._provider_epoch:
            await self._load_providers()

    async def _reload_providers(self) -> None:
        """Reload for a provider registered since the last load. At most one reload a
        second, shared by every request that asks meanwhile: an unknown id costs nothing to
        send, and a reload reads the whole table."""
        if self._providers_reload is None:
            due = self._providers_loaded_at + self.settings.key_refresh_min_interval
            self._providers_reload = asyncio.ensure_future(
                self._load_providers_at(due - time.monotonic())
            )
        await asyncio.shield(self._providers_reload)

    async def _load_providers_at(self, delay: float) -> None:
        try:
            if delay > 0:
                await asyncio.sleep(delay)
            await self._load_providers()
        finally:
            self._providers_reload = None

    async def authenticate_provider(self, provider_id: str, secret: str) -> str:
        provider = self._providers.get(provider_id)
        if provider is None and is_identifier(provider_id):  # else no reload could find it
            await self._reload_providers()
            provider = self._providers.get(provider_id)
        given = hashlib.sha256(secret.encode()).digest()
        # Both hashes compared every time, dummies for an unknown id: the comparison's time
        # says neither whether the id exists nor which credential matched. (The reload
        # above does: an id this replica does not know waits for it, up to a second. Ids
        # are not secrets, the registry lists them to the humans approving grants; the
        # secret is what the comparison guards.)
        current = provider.secret_hash if provider else secrets.token_bytes(32)
        previous = provider.previous_hash if provider else secrets.token_bytes(32)
        is_current = hmac.compare_digest(given, current)
        is_previous = hmac.compare_digest(given, previous)
        ok = provider is not None and (
            is_current or (is_previous and time.time() < provider.previous_until)
        )
        if not ok:
            raise Unauthenticated("bad provider credential", reason="bad_provider_credential")
        if provider is not None and provider.suspended:
            raise Forbidden("the provider is suspended", reason="provider_suspended")
        return provider_id

    def audience_of(self, provider_id: str) -> str:
        return self._provider(provider_id).audience

    def _provider(self, provider_id: str) -> _Provider:
        """An authenticated provider; one deleted since (a reload dropped it) is refused."""
        provider = self._providers.get(provider_id)
        if provider is None:
            raise Unauthenticated("bad provider credential", reason="bad_provider_credential")
        return provider

    async def _grant_active(self, grant_id: str) -> bool:
        """Cache-aside: this replica's memory, then Redis, then PostgreSQL."""
        if self._known_grants.active(grant_id, time.monotonic()):
            self.counters.inc("cache_hits", {"cache": "grant_local"})
            return True
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._grants_wanted.setdefault(grant_id, []).append(future)
        if not self._grants_looking:
            self._grants_looking = True
            asyncio.get_running_loop().call_soon(self._look_up_grants)
        active = await future == b"active"
        if active:
            self._known_grants.add(grant_id, time.monotonic())
        return active

    def _look_up_grants(self) -> None:
        """One lookup at a time for all the grants wanted meanwhile: a cold burst costs one
        MGET and one query for the misses, not a GET and a query per request."""
        wanted, self._grants_wanted = self._grants_wanted, {}
        if not wanted:
            self._grants_looking = False
            return
        self._background(self._grant_statuses(wanted), "grant lookup")

    async def _grant_statuses(self, wanted: dict[str, list[asyncio.Future[bytes]]]) -> None:
        began = time.perf_counter()
        try:
            status = await asyncio.wait_for(
                self._fetch_grant_statuses(list(wanted)), self.settings.lookup_timeout
            )
            observe("grant_lookup", time.perf_counter() - began)
            for grant_id, futures in wanted.items():
                for future in futures:
                    if not future.done():
                        future.set_result(status[grant_id] or b"absent")
        except Exception as exc:  # each waiting request denies (dependency_unavailable)
            for futures in wanted.values():
                for future in futures:
                    if not future.done():
                        future.set_exception(exc)
        finally:
            self._look_up_grants()  # what was wanted meanwhile, or stand down

    async def _fetch_grant_statuses(self, ids: list[str]) -> dict[str, bytes | None]:
        cached = await self.redis.mget([grant_cache_key(g) for g in ids])
        status: dict[str, bytes | None] = {
            g: v if isinstance(v, bytes) else None for g, v in zip(ids, cached, strict=True)
        }
        missing = [g for g, value in status.items() if value is None]
        self.counters.inc("cache_hits", {"cache": "grant_redis"}, len(ids) - len(missing))
        if missing:
            self.counters.inc("cache_misses", {"cache": "grant_redis"}, len(missing))
            rows = await self.pool.fetch(
                "SELECT id, revoked_at FROM grants WHERE id = ANY($1::text[])", missing
            )
            found = {r["id"]: b"revoked" if r["revoked_at"] else b"active" for r in rows}
            fill = self.redis.pipeline(transaction=False)
            for grant_id in missing:
                value = status[grant_id] = found.get(grant_id, b"absent")
                # NX: what was read may be stale by the time it is written (a revocation
                # committed meanwhile and marked the key "revoked"); a fill only fills.
                fill.set(
                    grant_cache_key(grant_id),
                    value,
                    ex=self.settings.grant_cache_ttl,
                    nx=True,
                )
            # Filling the cache need not delay these answers, which PostgreSQL has given.
            self._background(fill.execute(), "grant cache fill")
        return status

    def _background(self, work: Awaitable[Any], what: str) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)

        def settled(task: asyncio.Future[Any]) -> None:
            self._tasks.discard(task)
            if not task.cancelled() and task.exception() is not None:
                # Per request while a dependency is down; ``what`` is one of a few names.
                self._said.log(log, what, "%s failed: %s", what, type(task.exception()).__name__)

        task.add_done_callback(settled)

    async def _step_up_valid(self, ref: str, token: AccessToken, action: Action) -> bool:
        # wait_within, not asyncio.wait_for: a request given up as the lookup answers must
        # end there, not run on to spend its step-up in the shard (see _stateless).
        row = await wait_within(
            self.pool.fetchrow(
                "SELECT document, status, expires_at FROM step_ups WHERE approval_ref = $1", ref
            ),
            self.settings.lookup_timeout,
        )
        if row is None or row["status"] != "approved" or row["expires_at"] < time.time():
            return False
        document = json.loads(row["document"])
        expected = {
            "grant_id": token.claims.grant_id,
            "agent_id": token.claims.sub,
            "resource": action.resource,
            "amount": format((action.amount or Decimal(0)).normalize(), "f"),
            "currency": action.currency,
        }
        if any(document.get(k) != v for k, v in expected.items()):
            return False
        return bool(document.get("payee") == action.payee)

    # --- the decision ------------------------------------------------------------------

    async def verify(self, provider_id: str, body: VerifyIn) -> dict[str, Any]:
        answer, _ = await self._decision(provider_id, body)
        return answer

    async def introspect(self, provider_id: str, body: VerifyIn) -> dict[str, Any]:
        """The same decision in RFC 7662's shape: ``active`` only on an allow. The token's
        claims are those the decision checked, not a second check of the token (which, at
        its expiry, could refuse an allow already committed)."""
        # RFC 7662 §2.2: active means not expired, so no leeway after exp here (verify
        # allows 30 s for the registry's clock against ours). Checked with the token, before
        # the shard: a check after the shard's answer would come after it had committed an
        # allow and spent budget, and the audit log would say allow where the provider was
        # told inactive. Refused here, it is a denial recorded as invalid_token:expired.
        answer, token = await self._decision(provider_id, body, expiry_leeway=0)
        if answer["decision"] != "allow" or token is None:
            # RFC 7662 §2.2: an inactive answer says no more (the reason stays in the audit
            # event and the metrics; /v1/verify, a provider's own diagnosis, gives it, and
            # docs/verifier.md says what wrong_audience tells). The one exception is a nonce
            # (RFC 9449 §9): the provider must hand it to the agent in DPoP-Nonce, or no
            # proof the agent makes can ever carry it and every request is refused.
            inactive: dict[str, Any] = {"active": False}
            if "dpop_nonce" in answer:
                inactive["dpop_nonce"] = answer["dpop_nonce"]
            return inactive
        claims = token.claims
        active = {
            "active": True,
            "sub": claims.sub,
            "aud": claims.aud,
            "iss": claims.iss,
            "exp": claims.exp,
            "iat": claims.iat,
            "jti": claims.jti,
            "cnf": {"jkt": claims.cnf.jkt},
            "token_type": "DPoP",
            "grant_id": claims.grant_id,
            "scope": " ".join(f"{c.kind}:{c.resource}" for c in claims.capabilities),
            "remaining": answer.get("remaining"),
            "audit_event": answer["audit_event"],
        }
        if "dpop_nonce" in answer:  # a renewal (RFC 9449 §8.2), for the provider to pass on
            active["dpop_nonce"] = answer["dpop_nonce"]
        return active

    async def _decision(
        self, provider_id: str, body: VerifyIn, *, expiry_leeway: float | None = None
    ) -> tuple[dict[str, Any], AccessToken | None]:
        """The decision, and the token it checked (None when the token did not verify);
        ``expiry_leeway`` replaces the token check's leeway after ``exp``."""
        started = time.perf_counter()
        hits, misses = self.tokens.cache_hits, self.tokens.cache_misses
        answer, token = await self._verify(provider_id, body, expiry_leeway)
        observe("verify_latency", time.perf_counter() - started)
        counters = self.counters
        counters.inc("decisions", {"decision": answer["decision"], "reason": answer["reason"]})
        if self.tokens.cache_hits > hits:
            counters.inc("cache_hits", {"cache": "token"})
        if self.tokens.cache_misses > misses:
            counters.inc("cache_misses", {"cache": "token"})
        dependency = FAIL_CLOSED.get(answer["reason"])
        if dependency is not None:
            counters.inc("fail_closed", {"dependency": dependency})
        return answer, token

    async def _report_metrics(self) -> None:
        """Hand the summed counters and the queue depth to Ray once a second."""
        while True:
            await asyncio.sleep(1.0)
            self.counters.flush()
            set_gauge("shard_queue_depth", float(self.shards.queue_depth()))

    async def _verify(
        self, provider_id: str, body: VerifyIn, expiry_leeway: float | None
    ) -> tuple[dict[str, Any], AccessToken | None]:
        provider = self._provider(provider_id)
        now = time.time()
        check, extra, token = await self._stateless(provider, provider_id, body, now, expiry_leeway)
        if check.deny is None and token is not None:
            check = await self._stateful_prechecks(check, token, body)
        shard = shard_for(check.agent_id, self.shards.shards)
        if check.deny is not None and check.deny in _OUTAGE_DENIALS:
            result = await self._outage_denial(shard, check, check.deny)
        else:
            result = await self.shards.check(shard, check)
        if check.deny is not None and result.audit_event is None:
            # Denied here, and the shard that was to record it could not: the answer keeps
            # its own reason (a retry would get the same), with no event to name.
            result = Result(False, check.deny)
        elif check.deny is not None and result.allowed:
            # The shard only records what was denied here: an allow for it (a shard of
            # another version, a bug, a garbled row) must not turn this replica's deny
            # into an allow. Fail closed; the event stays named, for the audit trail.
            result = Result(False, check.deny, audit_event=result.audit_event)
        elif result.allowed and not result.audit_event:
            # No allow without its audit row, and the event id is the shard's word that it
            # is committed: an allow naming none (a shard of another version, a bug, a
            # garbled row) is not known to be recorded. Fail closed.
            result = Result(False, "audit_unavailable")
        self.decisions.add(provider_id, result.reason)
        answer: dict[str, Any] = {
            "decision": "allow" if result.allowed else "deny",
            "reason": result.reason,
            "audit_event": result.audit_event,
        }
        if token is not None:
            answer.update(agent_id=token.claims.sub, grant_id=token.claims.grant_id)
        if result.remaining is not None:
            answer["remaining"] = result.remaining
        if result.retry_after is not None:
            answer["retry_after"] = round(result.retry_after, 3)
        renewal = extra.pop("nonce_renewal", None)
        answer.update(extra)
        if renewal is not None and result.allowed:
            # Only with an allow: on a denial, a provider reads dpop_nonce as the challenge
            # to retry with it (RFC 9449 §9), which would hide the denial's own reason.
            answer["dpop_nonce"] = renewal
        return answer, token

    async def _stateless(
        self,
        provider: _Provider,
        provider_id: str,
        body: VerifyIn,
        now: float,
        expiry_leeway: float | None,
        *,
        keys_reloaded: bool = False,
    ) -> tuple[Check, dict[str, Any], AccessToken | None]:
        anonymous = Check(agent_id=f"provider:{provider_id}", provider_id=provider_id)
        try:
            token = self.tokens.verify(
                body.token, audience=provider.audience, now=now, expiry_leeway=expiry_leeway
            )
        except InvalidToken as exc:
            if exc.reason == "unknown_kid" and not keys_reloaded:
                try:
                    # Awaited as is, the reload bounding itself. Not asyncio.wait_for: on
                    # Python 3.11 it drops a cancellation that lands as the reload ends, and
                    # a request given up then ran on to its shard, whose allow nobody
                    # received and nothing voided.
                    reloaded = await self._reload_keys()
                except Exception:  # PostgreSQL unreachable or restarting: deny, recorded
                    return _replace(anonymous, deny="dependency_unavailable"), {}, None
                if reloaded:
                    # A rotated key: the same check again with the keys reloaded, once (a
                    # kid still unknown after a reload is unknown: no second reload).
                    return await self._stateless(
                        provider, provider_id, body, now, expiry_leeway, keys_reloaded=True
                    )
                if self._keys_in_doubt():
                    # No reload allowed yet, and the latest failed: the kid is not known to
                    # be unknown, and invalid_token would tell the provider not to retry.
                    return _replace(anonymous, deny="dependency_unavailable"), {}, None
            return _deny(anonymous, exc), {}, None
        base = Check(
            agent_id=token.claims.sub,
            provider_id=provider_id,
            grant_id=token.claims.grant_id,
            token_jti=token.claims.jti,
            action=body.action,
        )
        try:
            proof = self.proofs.verify(
                body.proof, htm=body.method, htu=body.url, now=now, ath=token.ath, jkt=token.jkt
            )
        except UseDPoPNonce as exc:
            return _deny(base, exc), {"dpop_nonce": exc.nonce}, token
        except InvalidDPoPProof as exc:
            return _deny(base, exc), {}, token
        action = body.action
        if action.amount is not None and not amount_fits(action.amount, action.currency or ""):
            # Before the capability check, so an amount nobody can pay (USD 0.005) is refused
            # as that, whichever capability's maximum it would also exceed; the envelope's
            # evaluation in the shard refuses it too.
            return _replace(base, deny="amount_precision"), {}, token
        if allowing_capability(token.claims.capabilities, action) is None:
            return _replace(base, deny="insufficient_capability"), {}, token
        checked = _replace(
            base,
            jkt=proof.jkt,
            jti=proof.jti,
            iat=proof.iat,
            envelope=token.claims.envelope,
            step_up_ref=body.step_up_ref,
        )
        return checked, ({"nonce_renewal": proof.next_nonce} if proof.next_nonce else {}), token

    async def _outage_denial(self, shard: int, check: Check, reason: str) -> Result:
        """Record a denial this replica made for a failed dependency, waiting for the record
        at most ``outage_record_wait``: past it, the check stays with its shard, to be
        recorded when it can, and the answer goes without its event id."""
        record = asyncio.ensure_future(self.shards.check(shard, check))
        try:
            await asyncio.wait({record}, timeout=self.settings.outage_record_wait)
        except asyncio.CancelledError:
            record.cancel()  # the request was given up: its check is too
            raise
        if record.done():
            return record.result()
        self._background(record, "outage denial record")
        return Result(False, reason)

    async def _stateful_prechecks(self, check: Check, token: AccessToken, body: VerifyIn) -> Check:
        if refused := self._revocation_state(token):
            return _replace(check, deny=refused)
        try:
            if not await self._grant_active(token.claims.grant_id):
                return _replace(check, deny="grant_inactive")
            if body.step_up_ref is not None:
                valid = await self._step_up_valid(body.step_up_ref, token, body.action)
                check = _replace(check, step_up_valid=valid)
        except Exception:  # Redis or PostgreSQL unreachable: deny
            return _replace(check, deny="dependency_unavailable")
        # Again: the lookups may have waited (a database round trip, or seconds when it is
        # slow), and a revocation this replica learned of meanwhile must count.
        if refused := self._revocation_state(token):
            return _replace(check, deny=refused)
        return check

    def _revocation_state(self, token: AccessToken) -> str | None:
        if not self.revocations.fresh():
            return "revocation_state_stale"
        if self.revocations.revoked(token):
            return "revoked"
        return None


async def _reset(conn: asyncpg.Connection) -> None:
    """What a connection needs before it returns to the verifier's pool: nothing but ending a
    transaction left open. The verifier only reads, in single statements, and takes no
    session state (no LISTEN, locks or settings), so asyncpg's default reset -- a query
    per release, a second round trip for every lookup -- buys it nothing."""
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


# Deny reasons that mean "a dependency failed, so we refused", and which dependency:
# counted as fail-closed (metrics, the chaos experiments).
FAIL_CLOSED: dict[str, str] = {
    "revocation_state_stale": "redis",
    "dependency_unavailable": "redis_or_postgres",
    "state_unavailable": "shard",
    "state_timeout": "shard",
    "audit_unavailable": "audit_store",
}


# The replica's own fail-closed denials (the shard's, state_* and audit_unavailable, come
# from the call itself).
_OUTAGE_DENIALS = frozenset({"revocation_state_stale", "dependency_unavailable"})


def _deny(check: Check, exc: AgentAuthError) -> Check:
    return _replace(check, deny=f"{exc.error}:{exc.reason}" if exc.reason else exc.error)


def _replace(check: Check, **changes: Any) -> Check:
    return dataclasses.replace(check, **changes)
