"""The registry's operations, independent of HTTP: each takes an authenticated caller.

Every state change runs in one PostgreSQL transaction together with its audit event, so
there is never a change without its event nor an event for a change that did not happen.
A rejected operation raises before or inside that transaction and writes nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import asyncpg
import redis.asyncio as aioredis
import webauthn
from webauthn.helpers import base64url_to_bytes, bytes_to_base64url
from webauthn.helpers.cose import COSEAlgorithmIdentifier
from webauthn.helpers.exceptions import (
    InvalidAuthenticationResponse,
    InvalidBackupFlags,
    WebAuthnException,
)
from webauthn.helpers.structs import (
    AuthenticatorSelectionCriteria,
    CredentialDeviceType,
    PublicKeyCredentialDescriptor,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)

from .._events import stop_tasks
from .._logs import Throttle
from ..metrics import increment, set_gauge
from ..protocol import (
    Action,
    ApprovalReceipt,
    Capability,
    Conflict,
    DependencyUnavailable,
    DPoPPolicy,
    DPoPVerifier,
    Envelope,
    Forbidden,
    Grant,
    GrantRequest,
    IntegrityError,
    InvalidReceipt,
    InvalidRequest,
    KeySet,
    NotFound,
    PublicKey,
    RateLimited,
    ReplayDetected,
    TokenPolicy,
    Transact,
    Unauthenticated,
    access_token_parts,
    b64url_decode,
    b64url_encode,
    canonical_json,
    check_amount,
    check_money,
    cose_key_to_jwk,
    strict_json_loads,
    tighten,
    verify_assertion,
)
from ..protocol._audit import AUDIT_NAME_MAX_LENGTH
from ..protocol._envelope import MAX_EXPIRES_AT, period_key
from ..protocol._jws import attach_signature, signing_input
from ..protocol._receipts import check_token_binding, check_top_level_frame
from ..protocol._types import IDENTIFIER_MAX_LENGTH, IDENTIFIER_PATTERN, is_identifier
from ..store import GRANT_REVOKED_TTL, REVOCATION_CHANNEL, Conn, grant_cache_key
from ..store import migrate as run_migrations
from ._audit_log import AuditLog
from ._keys import KeyManager
from ._limits import TAKE_LUA, Full, Limit, LocalBuckets, RecentAnswers, Waits
from ._models import (
    ApprovalBeginIn,
    GrantRequestIn,
    ProviderIn,
    SecretRotationIn,
    StepUpIn,
    SuspensionIn,
)
from ._settings import RegistrySettings

__all__ = ["Agent", "Registry"]

log = logging.getLogger("agentauth.registry")

STEP_UP_TYPE = "agentauth.step-up.v1"

# The passkey algorithms offered and accepted at registration: those the protocol's receipt
# verifier (agentauth.protocol.verify_assertion) checks. py_webauthn's default list adds
# RS256, whose passkeys would register and then fail every approval and sign-in.
_PASSKEY_ALGORITHMS = [COSEAlgorithmIdentifier.EDDSA, COSEAlgorithmIdentifier.ECDSA_SHA_256]
# WebAuthn L3 §7.1: an RP refuses credential ids longer than 1023 bytes (receipts cap them
# there too: ApprovalReceipt.credential_id).
_MAX_CREDENTIAL_ID_BYTES = 1023


# Reserve KEYS[1] (a proof's jkt and jti) once. ARGV: the proof's iat, the future skew a
# proof may carry, how long after its iat any replica may still accept it (its maximum age
# plus the clock difference tolerated between replicas and Redis), and that difference.
# A proof dated up to the epoch plus the skew plus that difference predates the memory: a
# replica that far ahead of Redis took proofs that far ahead of the epoch before the
# restart (with the skew alone, they were reserved again after it). The reservation's
# lifetime, the age check and the dating of a missing epoch run on Redis's clock, the one
# clock all replicas share: once the key has expired, the proof is too old to reserve
# again, whatever a replica's own clock says. (An epoch dated by the caller's clock was as
# early as that clock was slow: the reservations of the seconds before Redis restarted
# empty were taken again, by any other replica, as new.) -1: the proof predates this Redis
# memory (KEYS[2], the epoch); -2: too old on Redis's clock; 0: reserved before.
_RESERVE_LUA = """
local iat, skew, lifetime = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tolerance = tonumber(ARGV[4])
local now = tonumber(redis.call('TIME')[1])
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  redis.call('SET', KEYS[2], now, 'NX')
  epoch = redis.call('GET', KEYS[2])
end
if iat - skew - tolerance <= tonumber(epoch) then return -1 end
local ttl = math.floor(iat + lifetime - now)
if ttl < 1 then return -2 end
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ttl) then return 1 end
return 0
"""
# The clock difference between a replica and Redis that reservations still cover.
_CLOCK_TOLERANCE = 5
# A step-up wait reads its row at once, 0.25 s later, then after pauses doubling up to
# 2 s: an answer given soon is seen soon, a later one at most 2 s after it commits.
_STEP_UP_POLL_FIRST = 0.25
_STEP_UP_POLL_MAX = 2.0
# A wait refused past its bounds: another is likely free within a few seconds (the SDK's
# polls last 25 s, and most step-ups are answered or given up well before).
_STEP_UP_WAIT_RETRY_AFTER = 5

#: The checkpoint loop checks new audit events ahead of the next checkpoint in slices of
#: this many (one query, then tens of microseconds of CPU each with no pause between:
#: under 10 ms on a slow 2-core machine), at most AHEAD_PER_TICK per chain each half
#: second (4,000 a second); a chain growing faster leaves the rest to its checkpoint.
AHEAD_SLICE = 250
AHEAD_PER_TICK = 2000
# The most events one page holds, and the page size unless the caller asks for fewer: the
# cap the listing had before it was paged (until 2026-11-30, with no way past it), so a
# client that never pages reads what it always did (about 2.5 MB of JSON, ~0.5 KB an event).
AUDIT_PAGE_MAX = 5000
# The most step-ups or grant requests one page of their listing holds, and the page size
# unless the caller asks for fewer. Those listings had no bound (until 2026-11-30): an
# agent may leave max_pending_step_ups step-ups a grant every step_up_ttl, kept 30 days,
# tens of thousands of rows (about 0.5 KB each) in one answer. 1,000 is more than the
# approval page shows pending at once for any person with under 50 grants or agents.
LIST_PAGE_MAX = 1000
# Longer than any cursor _cursor makes (two int64s and an identifier: under 250
# characters); checked before decoding, so no input makes the decoder work hard.
_CURSOR_MAX = 400
_CHAIN_NAME = re.compile(IDENTIFIER_PATTERN)
_INT64 = 2**63 - 1


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_urlsafe(16)}"


def _sha256(data: bytes | str) -> bytes:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).digest()


class SignCountRegression(Forbidden):
    """A passkey's counter went backwards: possibly a cloned authenticator."""

    def __init__(self, credential_id: str, principal_id: str) -> None:
        super().__init__(
            "the passkey's signature counter went backwards", reason="sign_count_regression"
        )
        self.credential_id = credential_id
        self.principal_id = principal_id


class BackupEligibilityChanged(Forbidden):
    """A passkey's signed assertion with another BE than the one recorded: not the
    authenticator that created the credential behaving as WebAuthn says (its key moved,
    cloned, or a tampered authenticator)."""

    def __init__(self, credential_id: str, principal_id: str, presented: bool) -> None:
        super().__init__(
            "the passkey's backup eligibility (BE) changed, which WebAuthn rules out",
            reason="backup_eligibility_changed",
        )
        self.credential_id = credential_id
        self.principal_id = principal_id
        self.presented = presented


@dataclass(frozen=True, slots=True)
class Agent:
    id: str
    principal_id: str
    jkt: str
    status: str


@dataclass(frozen=True, slots=True)
class ProviderCredential:
    """A provider that authenticated: its id, whether with its current secret (else the
    previous one, inside its overlap), and the hash of the secret it showed, so that a
    change to its credentials can check that secret again under the row's lock."""

    provider_id: str
    current: bool
    secret_hash: bytes = field(repr=False)


async def _init_connection(conn: Conn) -> None:
    # jsonb <-> Python values, so rows carry dicts rather than JSON text.
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def open_pool(url: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        url, min_size=min_size, max_size=max_size, init=_init_connection, command_timeout=10
    )
    assert pool is not None
    return pool


# The longest kid an agent's key may carry: an id's bound.
_MAX_AGENT_KID = AUDIT_NAME_MAX_LENGTH


class Registry:
    """Registry operations over PostgreSQL, Redis and a key manager."""

    def __init__(
        self,
        *,
        settings: RegistrySettings,
        pool: asyncpg.Pool,
        redis: aioredis.Redis,
        keys: KeyManager,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.redis = redis
        self.keys = keys
        self.audit = AuditLog(chains=settings.audit_chains)
        # One policy for checking proofs and for how long their reservations must last.
        self._proof_policy = DPoPPolicy()
        self.proofs = DPoPVerifier(policy=self._proof_policy)
        # One round trip: check the epoch, then SET NX the reservation (see _reserve_jti).
        self._reserve_script = redis.register_script(_RESERVE_LUA)
        self._take_script = redis.register_script(TAKE_LUA)
        self.trusted_proxies = settings.trusted_proxy_networks
        period_us = settings.anonymous_limit_period * 1_000_000
        # The script's ARGV for the client and the global bucket, made once.
        self._anonymous_args = [
            n
            for limit in (
                Limit(settings.anonymous_client_limit, period_us),
                Limit(settings.anonymous_global_limit, period_us),
            )
            for n in (limit.interval_us, limit.period_us)
        ]
        tokens = Limit(settings.token_limit, settings.token_limit_period * 1_000_000)
        self._token_args = [tokens.interval_us, tokens.period_us]
        self._fallback = LocalBuckets()
        self._fallback_limits = (
            Limit(settings.anonymous_client_limit, period_us),
            Limit(max(1, settings.anonymous_fallback_limit), period_us),
        )
        self._limits_reachable = True
        self._step_up_waits = Waits(
            per_caller=settings.step_up_waits_per_caller,
            in_all=settings.step_up_waits_per_replica,
        )
        self._usage = RecentAnswers[dict[str, Any]](
            ttl_us=int(settings.usage_cache_seconds * 1_000_000)
        )
        self._events_since_checkpoint = 0
        self._said = Throttle(30.0)
        self._checkpoint_task: asyncio.Task[None] | None = None
        self._sweep_task: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls, settings: RegistrySettings, *, migrate: bool = True, create_key: bool = True
    ) -> Registry:
        """Open the pools and the key ring; ``create_key=False`` leaves a database without
        signing keys without them (admin commands, whose host's signer may not be the
        deployment's)."""
        pool = await open_pool(
            settings.database_url, min_size=settings.pool_min_size, max_size=settings.pool_max_size
        )
        if migrate:
            # Not on a pool connection, whose statements time out at 10 s: a migration may
            # take longer (an index built on a large table), and so may a replica's wait for
            # another that is migrating at the same start.
            migrator = await asyncpg.connect(settings.database_url)
            try:
                await run_migrations(migrator)
            finally:
                await migrator.close()
        redis = aioredis.Redis.from_url(
            settings.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0
        )
        keys = KeyManager(settings, pool)
        await keys.start(create=create_key)
        registry = cls(settings=settings, pool=pool, redis=redis, keys=keys)
        await registry._init_replay_epoch()
        async with pool.acquire() as conn:
            await registry.audit.ensure_chains(conn)
        return registry

    def start_background(self) -> None:
        """Start the periodic checkpointer and sweeper (one each per replica; each locks in
        SQL what it works on)."""
        if self._checkpoint_task is None:
            self._checkpoint_task = asyncio.create_task(self._checkpoint_loop())
        if self._sweep_task is None:
            self._sweep_task = asyncio.create_task(self._sweep_loop())

    async def close(self) -> None:
        await stop_tasks((self._checkpoint_task, self._sweep_task))
        await self.keys.aclose()
        await self.redis.aclose()
        await self.pool.close()

    # --- transactions with audit --------------------------------------------------------

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[Conn]:
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                yield conn
        except SignCountRegression as exc:
            # Recorded after the refused transaction has rolled back (and released its lock
            # on the credential row), in a transaction of its own.
            await self._flag_credential(exc.credential_id, exc.principal_id)
            raise
        except BackupEligibilityChanged as exc:
            # Likewise, but only the audit event: the passkey is not flagged (a faulty
            # authenticator is as likely as a clone), and nothing else of the refused
            # ceremony stays.
            await self._audit_backup_eligibility_change(exc)
            raise
        except (OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError) as exc:
            raise DependencyUnavailable("the database is unavailable") from exc
        self._events_since_checkpoint += 1

    async def _audit(self, conn: Conn, **event: Any) -> None:
        await self.audit.append(conn, **event)

    # --- checkpoints ---------------------------------------------------------------------

    async def checkpoint_keys(self) -> KeySet:
        """The keys a stored checkpoint must be signed by: every key on record, retired ones
        too (a quiet chain's latest checkpoint may predate the current key), each within
        its signing window (the audit key list the registry publishes)."""
        await self.keys.refresh(force=True)
        return self.keys.audit_keys()

    async def checkpoint_all(self) -> list[dict[str, Any]]:
        # Audit lag: how long the oldest event not yet under a signed checkpoint has waited.
        # Per chain: the first event after its latest checkpoint (primary-key lookups only).
        oldest = await self.pool.fetchval(
            "SELECT min((SELECT e.time_ms FROM audit_events e WHERE e.chain = h.chain AND"
            " e.seq = (SELECT coalesce(max(c.size), 0) FROM audit_checkpoints c"
            " WHERE c.chain = h.chain))) FROM audit_heads h"
        )
        set_gauge("audit_lag", 0.0 if oldest is None else max(0.0, time.time() - oldest / 1000))
        signer = await self.keys.signer(time.time())
        made = []
        async with self.pool.acquire() as conn:
            keys = await self.checkpoint_keys()
            # Every chain: the registry's own and the verifier shards' decision chains.
            chains = [r["chain"] for r in await conn.fetch("SELECT chain FROM audit_heads")]
            for chain in chains:
                try:
                    result = await self.audit.checkpoint(
                        conn, chain, signer, keys=keys, now=int(time.time())
                    )
                except IntegrityError as exc:
                    # The chain stays unsigned (audit_lag grows) until someone looks; the
                    # others are still checkpointed.
                    log.error("audit chain %s not checkpointed: %s", chain, exc.description)
                    continue
                if result:
                    made.append(result)
        self._events_since_checkpoint = 0
        return made

    async def verify_ahead(self, *, limit: int = AHEAD_PER_TICK) -> int:
        """Check up to ``limit`` new events of each chain ahead of its next checkpoint
        (``AuditLog.verify_ahead``), in slices; returns how many were checked."""
        checked = 0
        async with self.pool.acquire() as conn:
            for row in await conn.fetch("SELECT chain, size FROM audit_heads"):
                for _ in range(0, limit, AHEAD_SLICE):
                    step = await self.audit.verify_ahead(
                        conn, row["chain"], row["size"], limit=AHEAD_SLICE
                    )
                    checked += step
                    if step < AHEAD_SLICE:
                        break
        return checked

    async def _checkpoint_loop(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.5)
            due = time.monotonic() - last >= self.settings.checkpoint_every_seconds
            try:
                if due or self._events_since_checkpoint >= self.settings.checkpoint_every_events:
                    last = time.monotonic()
                    await self.checkpoint_all()
                else:
                    await self.verify_ahead()
            except Exception:  # retried next round; the loop must outlive any failure
                # Every round (0.5 s) while PostgreSQL or the signer is down.
                self._said.log(
                    log,
                    "checkpoint",
                    "checkpointing failed; retrying (audit_lag grows until it succeeds)",
                    level=logging.ERROR,
                    exc_info=True,
                )

    async def sweep_expired(self) -> int:
        """Delete expired WebAuthn challenges, sessions and enrollment codes (every read of
        them checks the expiry already, so they are dead rows), the records and revocations
        of tokens expired a day ago, the spent marks of step-up approvals expired a day ago,
        and grant requests and step-ups left unanswered 30 days past their expiry. Returns
        how many went (0 when another replica holds the lock)."""
        async with self.pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval(_SWEEP_LOCK):
                return 0
            deleted = 0
            for statement in _SWEEPS:
                deleted += int((await conn.execute(statement)).rsplit(" ", 1)[-1])
            swept = await conn.execute(
                _SWEEP_UNANSWERED_REQUESTS, float(self.settings.grant_request_ttl)
            )
            deleted += int(swept.rsplit(" ", 1)[-1])
        return deleted

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_every_seconds)
            try:
                if deleted := await self.sweep_expired():
                    log.info("deleted %d expired rows (challenges, sessions, ...)", deleted)
            except Exception:  # retried next round; the loop must outlive any failure
                log.exception("deleting expired rows failed")

    # --- callers -------------------------------------------------------------------------

    async def authenticate_agent(self, *, proof: str | None, htm: str, htu: str) -> Agent:
        """An agent proves its registered key with a DPoP proof for this exact request."""
        if not proof:
            raise Unauthenticated("a DPoP proof is required", reason="missing_proof")
        now = time.time()
        # The signature, by far the dearest check, comes last: a proof that is stale, for
        # another request, or by a key no agent has is refused without it, so nobody
        # without an agent makes the registry check signatures. That an unknown key is
        # told apart (at once, and by its answer) reveals nothing worth hiding: an agent's
        # public key travels in every proof it sends, to every provider.
        screened = self.proofs.screen(proof, htm=htm, htu=htu, now=now)
        row = await self.pool.fetchrow(
            "SELECT id, principal_id, jkt, status FROM agents WHERE jkt = $1", screened.jkt
        )
        if row is None:
            raise Unauthenticated("unknown agent key", reason="unknown_agent")
        verified = self.proofs.confirm(screened, now=now)
        agent = Agent(row["id"], row["principal_id"], row["jkt"], row["status"])
        if agent.status != "active":
            raise Forbidden("the agent is disabled", reason="agent_disabled")
        await self._reserve_jti(verified.jkt, verified.jti, verified.iat)
        return agent

    async def _init_replay_epoch(self) -> None:
        """Date the replay cache's memory from Redis's own start, if nobody has yet.

        A Redis that has been up for hours remembers every reservation of the last minute,
        so only proofs from before it started need refusing. If this fails, the first
        reservation sets the epoch to "now" instead: stricter, never looser.
        """
        try:
            info = await self.redis.info("server")
            # On Redis's clock, as the reservations (_RESERVE_LUA): dated by this
            # replica's, the epoch was as early as its clock was slow.
            seconds, _ = await self.redis.time()
            started = int(seconds - float(info["uptime_in_seconds"]))
            await self.redis.set("agentauth:jti-epoch", started, nx=True)
        except Exception:  # Redis unreachable now: reservations will fail closed anyway
            log.warning("could not read the replay cache's start time")

    async def _reserve_jti(self, jkt: str, jti: str, iat: float) -> None:
        """Reserve a proof's ``(jkt, jti)`` once, in Redis, failing closed.

        Redis may restart empty and forget reservations. An epoch key, set when missing,
        marks when the current Redis memory began: proofs issued up to then (plus the
        clock skew a proof may carry and the clock difference tolerated between replicas
        and Redis) could have been reserved before, so they are refused.
        """
        try:
            result = await self._reserve_script(
                keys=[f"agentauth:jti:{jkt}:{jti}", "agentauth:jti-epoch"],
                args=[
                    math.floor(iat),
                    self._proof_policy.future_skew,
                    self._proof_policy.max_age + _CLOCK_TOLERANCE + 1,  # +1: iat's fraction
                    _CLOCK_TOLERANCE,
                ],
            )
        except Exception as exc:  # any Redis failure denies (fail closed)
            raise DependencyUnavailable("the replay cache is unavailable") from exc
        if result == -1:
            raise ReplayDetected("proof predates the replay cache", reason="replay_cache_reset")
        if result == -2:
            raise ReplayDetected("proof too old by the replay cache's clock", reason="too_old")
        if result != 1:
            raise ReplayDetected(reason="jti_reused")

    async def admit_anonymous(self, client: str) -> None:
        """Take one anonymous start from ``client``'s bucket and the global one, or refuse
        (429, Retry-After) having taken from neither. Call it before anything is written.

        Redis unreachable: the buckets of this replica's memory decide instead, with the
        global limit lowered to ``anonymous_fallback_limit`` (0: refuse, 503). These are
        anonymous ceremony starts, not decisions about anyone's access: refusing them all
        would lock every human out of signing in for as long as Redis is down, while a
        small per-replica budget still never admits unlimited requests, and the challenge
        table stays capped by PostgreSQL (``max_anonymous_challenges``). The switch is
        logged both ways and counted, never silent."""
        keys = [f"agentauth:anon:client:{client}", "agentauth:anon:all"]
        try:
            wait_us = int(await self._take_script(keys=keys, args=self._anonymous_args))
        except Exception as exc:  # any Redis failure: this replica's own buckets (see above)
            wait_us = self._admit_without_redis(client, exc)
        else:
            if not self._limits_reachable:
                self._limits_reachable = True
                log.warning("anonymous start limits are shared in Redis again")
        if wait_us > 0:
            increment("anonymous_refused", tags={"reason": "rate_limited"})
            raise RateLimited(
                "too many sign-in, sign-up or registration starts; retry later",
                retry_after=math.ceil(wait_us / 1_000_000),
                reason="rate_limited",
            )

    def _admit_without_redis(self, client: str, failure: Exception) -> int:
        if self._limits_reachable:
            self._limits_reachable = False
            log.warning(
                "Redis unreachable (%s): anonymous starts limited in this replica's memory"
                " (%d per %d s)",
                type(failure).__name__,
                self.settings.anonymous_fallback_limit,
                self.settings.anonymous_limit_period,
            )
        if self.settings.anonymous_fallback_limit == 0:
            increment("anonymous_refused", tags={"reason": "limits_unavailable"})
            raise DependencyUnavailable(
                "sign-in and sign-up are unavailable for now", reason="limits_unavailable"
            )
        increment("anonymous_fallback")
        now_us = int(time.monotonic() * 1_000_000)
        return self._fallback.take([f"client:{client}", "all"], self._fallback_limits, now_us)

    async def authenticate_session(self, token: str | None) -> str:
        if not token:
            raise Unauthenticated("a session is required", reason="missing_session")
        row = await self.pool.fetchrow(
            "SELECT principal_id FROM sessions WHERE token_hash = $1 AND expires_at > now()",
            _sha256(token),
        )
        if row is None:
            raise Unauthenticated("the session is invalid or expired", reason="bad_session")
        return str(row["principal_id"])

    async def end_session(self, token: str) -> None:
        """Sign a human out: the session token stops working at once, on every replica
        (sessions live in PostgreSQL, not in a replica's memory). Ending one already ended
        changes and records nothing."""
        async with self._tx() as conn:
            ended = await conn.fetchval(
                "DELETE FROM sessions WHERE token_hash = $1 RETURNING principal_id",
                _sha256(token),
            )
            if ended is not None:
                await self._audit(
                    conn,
                    event="session.ended",
                    actor=f"human:{ended}",
                    subject=f"human:{ended}",
                    key=ended,
                )

    def is_admin(self, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(
            _sha256(token), _sha256(self.settings.admin_token)
        )

    async def authenticate_provider(self, provider_id: str, secret: str) -> ProviderCredential:
        """The provider's credential: whether ``secret`` is its current one (else the
        previous one, still inside its rotation's overlap). A suspended provider is told
        so, but only once its secret is right: the suspension is nobody else's to learn."""
        row = (
            await self.pool.fetchrow(_PROVIDER_CREDENTIALS + " WHERE id = $1", provider_id)
            if is_identifier(provider_id)
            else None  # no such id can exist (the database would refuse a NUL byte with an error)
        )
        given = _sha256(secret)
        return ProviderCredential(provider_id, _credential_standing(row, given), given)

    # --- WebAuthn ------------------------------------------------------------------------

    def _uv(self) -> UserVerificationRequirement:
        return (
            UserVerificationRequirement.REQUIRED
            if self.settings.require_user_verification
            else UserVerificationRequirement.PREFERRED
        )

    async def _store_challenge(
        self,
        conn: Conn | asyncpg.Pool,
        challenge: bytes,
        *,
        purpose: str,
        principal_id: str | None = None,
        subject_id: str | None = None,
        payload: dict[str, Any] | None = None,
    ) -> None:
        if principal_id is None:
            # Sign-up and sign-in: nothing else in their (absent) transaction, so the capped
            # insert takes its own.
            await self._store_anonymous_challenge(challenge, purpose=purpose, payload=payload)
            return
        if isinstance(conn, asyncpg.Pool):
            # Counted and inserted under a lock (below): a transaction of its own.
            async with conn.acquire() as own, own.transaction():
                await self._store_challenge(
                    own,
                    challenge,
                    purpose=purpose,
                    principal_id=principal_id,
                    subject_id=subject_id,
                    payload=payload,
                )
            return
        # A human's live challenges are bounded as the anonymous ones are: every approval's
        # begin and every passkey change's confirmation stores one (an approval's holds the
        # whole grant), and nothing else limits how fast a session, or whoever has taken
        # one, asks. Counted and inserted one at a time per human, so concurrent begins
        # cannot all fit under the bound; a renewal of the same row (below) adds none.
        # A recovery's begin counts only the recovery's own: whoever holds the lost
        # passkeys holds a session too, and could otherwise keep the rest at the bound
        # and so refuse the one ceremony that locks them out.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"chl:{principal_id}")
        cap = self.settings.max_human_challenges
        recovery = bool(payload and payload.get("recovery"))
        live = await conn.fetchval(
            "SELECT count(*) FROM (SELECT 1 FROM webauthn_challenges WHERE principal_id = $1"
            " AND expires_at > now() AND challenge <> $2 AND (NOT $4 OR payload ? 'recovery')"
            " LIMIT $3) AS live",
            principal_id,
            challenge,
            cap,
            recovery,
        )
        if live >= cap:
            wait = await conn.fetchval(
                "SELECT extract(epoch FROM min(expires_at) - now()) FROM webauthn_challenges"
                " WHERE principal_id = $1 AND expires_at > now()"
                " AND (NOT $2 OR payload ? 'recovery')",
                principal_id,
                recovery,
            )
            raise RateLimited(
                f"{live} passkey ceremonies of this human are under way already; retry later",
                retry_after=math.ceil(float(wait or 1)),
                reason="too_many_challenges",
            )
        # A step-up's challenge is its document's hash, the same at every begin: a second
        # begin (a reload, another device) renews the row instead of colliding with it. Both
        # ceremonies then sign the one challenge, and the first finish consumes it. Any other
        # challenge is random, so the renewal is limited to the same ceremony's row.
        stored = await conn.fetchval(
            "INSERT INTO webauthn_challenges (challenge, purpose, principal_id, subject_id,"
            " payload, expires_at) VALUES ($1, $2, $3, $4, $5, now() + make_interval(secs => $6))"
            " ON CONFLICT (challenge) DO UPDATE SET payload = EXCLUDED.payload,"
            " expires_at = EXCLUDED.expires_at WHERE webauthn_challenges.purpose = $2"
            " AND webauthn_challenges.principal_id IS NOT DISTINCT FROM $3"
            " AND webauthn_challenges.subject_id IS NOT DISTINCT FROM $4 RETURNING true",
            challenge,
            purpose,
            principal_id,
            subject_id,
            payload or {},
            float(self.settings.challenge_ttl),
        )
        if not stored:
            raise Conflict("this challenge belongs to another ceremony", reason="challenge_used")

    async def _store_anonymous_challenge(
        self, challenge: bytes, *, purpose: str, payload: dict[str, Any] | None
    ) -> None:
        """Store a sign-up's or sign-in's challenge unless ``max_anonymous_challenges``
        unexpired ones exist (the rate limits bound how fast they come; this bounds the
        table, Redis or not)."""
        cap = self.settings.max_anonymous_challenges
        async with self.pool.acquire() as conn, conn.transaction():
            # Counted and inserted one at a time across replicas: concurrent starts counting
            # side by side would each see room and all insert, past the cap.
            await conn.execute(_ANONYMOUS_CHALLENGES_LOCK)
            live = await conn.fetchval(
                "SELECT count(*) FROM (SELECT 1 FROM webauthn_challenges WHERE principal_id"
                " IS NULL AND expires_at > now() LIMIT $1) AS live",
                cap,
            )
            if live >= cap:
                wait = await conn.fetchval(
                    "SELECT extract(epoch FROM min(expires_at) - now()) FROM webauthn_challenges"
                    " WHERE principal_id IS NULL AND expires_at > now()"
                )
                increment("anonymous_refused", tags={"reason": "too_many_challenges"})
                raise RateLimited(
                    "too many sign-ins and sign-ups are under way; retry later",
                    retry_after=math.ceil(float(wait or 1)),
                    reason="too_many_challenges",
                )
            await conn.execute(
                "INSERT INTO webauthn_challenges (challenge, purpose, payload, expires_at)"
                " VALUES ($1, $2, $3, now() + make_interval(secs => $4))",
                challenge,
                purpose,
                payload or {},
                float(self.settings.challenge_ttl),
            )

    @staticmethod
    def _client_challenge(credential: dict[str, Any]) -> bytes:
        """The challenge the browser signed, read from clientDataJSON (checked again later)."""
        try:
            response = credential["response"]
            client_data = strict_json_loads(base64url_to_bytes(response["clientDataJSON"]))
            return base64url_to_bytes(client_data["challenge"])
        except (KeyError, TypeError, ValueError, InvalidRequest):
            raise InvalidReceipt("malformed WebAuthn credential", reason="malformed") from None

    async def _consume_challenge(
        self,
        conn: Conn,
        credential: dict[str, Any],
        *,
        purpose: str,
        principal_id: str | None = None,
        subject_id: str | None = None,
    ) -> tuple[bytes, dict[str, Any]]:
        challenge = self._client_challenge(credential)
        row = await conn.fetchrow(
            "DELETE FROM webauthn_challenges WHERE challenge = $1 AND purpose = $2"
            " AND principal_id IS NOT DISTINCT FROM $3 AND subject_id IS NOT DISTINCT FROM $4"
            " AND expires_at > now() RETURNING payload",
            challenge,
            purpose,
            principal_id,
            subject_id,
        )
        if row is None:
            raise Conflict(
                "the challenge is unknown, expired or already used", reason="challenge_used"
            )
        return challenge, dict(row["payload"])

    async def signup_begin(self, display_name: str) -> dict[str, Any]:
        if not self.settings.open_signup:
            raise Forbidden("sign-up is closed", reason="signup_closed")
        principal_id = new_id("hum")
        options = webauthn.generate_registration_options(
            rp_id=self.settings.rp_id,
            rp_name=self.settings.rp_name,
            user_id=principal_id.encode(),
            user_name=display_name,
            user_display_name=display_name,
            authenticator_selection=AuthenticatorSelectionCriteria(
                resident_key=ResidentKeyRequirement.REQUIRED, user_verification=self._uv()
            ),
            supported_pub_key_algs=_PASSKEY_ALGORITHMS,
        )
        await self._store_challenge(
            self.pool,
            options.challenge,
            purpose="register",
            payload={"principal_id": principal_id, "display_name": display_name},
        )
        return json.loads(webauthn.options_to_json(options))  # type: ignore[no-any-return]

    async def signup_finish(self, credential: dict[str, Any]) -> dict[str, Any]:
        async with self._tx() as conn:
            challenge, payload = await self._consume_challenge(conn, credential, purpose="register")
            verified = self._verify_registration(credential, challenge)
            principal_id = payload["principal_id"]
            await conn.execute(
                "INSERT INTO principals (id, display_name) VALUES ($1, $2)",
                principal_id,
                payload["display_name"],
            )
            await self._insert_credential(conn, principal_id, verified)
            session = await self._new_session(conn, principal_id)
            await self._audit(
                conn,
                event="principal.created",
                actor=f"human:{principal_id}",
                subject=f"human:{principal_id}",
                key=principal_id,
            )
        return {"principal_id": principal_id, "session": session}

    def _verify_registration(self, credential: dict[str, Any], challenge: bytes) -> Any:
        """Check a passkey registration over ``challenge``; refuse (400, before anything is
        written) a passkey the registry could never use afterwards."""
        try:
            verified = webauthn.verify_registration_response(
                credential=credential,
                expected_challenge=challenge,
                expected_rp_id=self.settings.rp_id,
                expected_origin=list(self.settings.origins),
                require_user_verification=self.settings.require_user_verification,
                supported_pub_key_algs=_PASSKEY_ALGORITHMS,
            )
        except InvalidBackupFlags:
            # Not one of py_webauthn's response errors: uncaught, it would be a 500.
            raise _invalid_backup_flags() from None
        # Anything else it raises is about the sender's credential, never a 500: the call
        # reads nothing but its arguments. py_webauthn refuses with WebAuthnException, and
        # its attestation formats also let through what the parsers they call raise on the
        # sender's statement, which is no closed set: AttributeError and IndexError
        # (android-safetynet decodes a text response as bytes, takes a JSON array for an
        # object, the first of no certificates), RecursionError (a SafetyNet JWS nested
        # deeper than json.loads recurses), and cryptography's own exceptions for an x5c
        # certificate, which are not ValueErrors (InvalidVersion, UnsupportedAlgorithm for a
        # key type it does not know). Until 2026-12-01 those were 500s.
        except Exception as exc:
            raise InvalidReceipt(
                f"passkey registration refused: {exc}", reason="registration_refused"
            ) from None
        _same_origin_frame(credential)
        if len(verified.credential_id) > _MAX_CREDENTIAL_ID_BYTES:
            raise InvalidReceipt(
                f"passkey registration refused: its credential id is longer than"
                f" {_MAX_CREDENTIAL_ID_BYTES} bytes",
                reason="credential_id_too_long",
            )
        # Every receipt carries this key and is checked by the protocol's verifier, which
        # takes fewer keys than py_webauthn: what it cannot read must not be registered.
        try:
            cose_key_to_jwk(verified.credential_public_key)
        except InvalidReceipt as exc:
            raise InvalidReceipt(
                f"passkey registration refused: {exc.description}", reason="unsupported_key"
            ) from None
        return verified

    @staticmethod
    async def _insert_credential(conn: Conn, principal_id: str, verified: Any) -> None:
        try:
            await conn.execute(
                "INSERT INTO passkey_credentials (credential_id, principal_id, public_key,"
                " sign_count, backup_eligible, backed_up) VALUES ($1, $2, $3, $4, $5, $6)",
                bytes_to_base64url(verified.credential_id),
                principal_id,
                verified.credential_public_key,
                verified.sign_count,
                # py_webauthn names BE by what it usually means: a multi-device passkey.
                verified.credential_device_type == CredentialDeviceType.MULTI_DEVICE,
                bool(verified.credential_backed_up),
            )
        except asyncpg.UniqueViolationError:
            raise Conflict(
                "this passkey is already registered", reason="duplicate_passkey"
            ) from None

    async def _new_session(self, conn: Conn, principal_id: str) -> str:
        token = "ses_" + secrets.token_urlsafe(32)
        await conn.execute(
            "INSERT INTO sessions (token_hash, principal_id, expires_at)"
            " VALUES ($1, $2, now() + make_interval(secs => $3))",
            _sha256(token),
            principal_id,
            float(self.settings.session_ttl),
        )
        return token

    async def login_begin(self) -> dict[str, Any]:
        options = webauthn.generate_authentication_options(
            rp_id=self.settings.rp_id, user_verification=self._uv()
        )
        await self._store_challenge(self.pool, options.challenge, purpose="login")
        return json.loads(webauthn.options_to_json(options))  # type: ignore[no-any-return]

    async def login_finish(self, credential: dict[str, Any]) -> dict[str, Any]:
        async with self._tx() as conn:
            challenge, _ = await self._consume_challenge(conn, credential, purpose="login")
            principal_id, receipt = await self._verify_assertion(conn, credential, challenge, None)
            session = await self._new_session(conn, principal_id)
            # Which passkey opened a session, and when: the evidence a person (or the admin)
            # needs to tell their own sign-ins from a thief's (a lost or cloned passkey), as
            # sign-up and recovery, which also open one, are recorded.
            await self._audit(
                conn,
                event="session.created",
                actor=f"human:{principal_id}",
                subject=_passkey_subject(receipt.credential_id),
                key=principal_id,
            )
        return {"principal_id": principal_id, "session": session}

    # Adding or removing a passkey changes who can approve for this human, so a session is
    # not enough (a stolen session token would add the thief's passkey, approve with it and
    # remove the owner's): one of the human's passkeys confirms each change, signing a
    # challenge bound to that change ("add", or "remove:<credential id>").

    async def passkey_confirm(self, principal_id: str, change: str) -> dict[str, Any]:
        """Assertion options for confirming ``change`` with one of the human's passkeys. A
        removal that cannot happen is refused now, before anyone is asked to sign for it."""
        if change.startswith("remove:"):
            rows = await self.pool.fetch(_PASSKEYS_FLAGGED, principal_id)
            _removable(_flagged_by_id(rows), change.removeprefix("remove:"))
        return await self._assertion_options(
            principal_id, secrets.token_bytes(32), purpose="manage_passkeys", subject_id=change
        )

    async def _confirmed(
        self, conn: Conn, principal_id: str, change: str, credential: dict[str, Any]
    ) -> None:
        challenge, _ = await self._consume_challenge(
            conn,
            credential,
            purpose="manage_passkeys",
            principal_id=principal_id,
            subject_id=change,
        )
        await self._verify_assertion(conn, credential, challenge, principal_id)

    async def passkey_begin(
        self, principal_id: str, confirmation: dict[str, Any]
    ) -> dict[str, Any]:
        async with self._tx() as conn:
            await self._confirmed(conn, principal_id, "add", confirmation)
            return await self._registration_options(conn, principal_id)

    async def _registration_options(
        self, conn: Conn, principal_id: str, *, recovery: bool = False
    ) -> dict[str, Any]:
        """Options to register one more passkey for an existing human (none of theirs
        again), with the challenge stored for this human (marked a ``recovery``'s)."""
        options = webauthn.generate_registration_options(
            rp_id=self.settings.rp_id,
            rp_name=self.settings.rp_name,
            user_id=principal_id.encode(),
            user_name=principal_id,
            exclude_credentials=await _descriptors(conn, principal_id),
            authenticator_selection=AuthenticatorSelectionCriteria(
                resident_key=ResidentKeyRequirement.REQUIRED, user_verification=self._uv()
            ),
            supported_pub_key_algs=_PASSKEY_ALGORITHMS,
        )
        await self._store_challenge(
            conn,
            options.challenge,
            purpose="register",
            principal_id=principal_id,
            payload={"recovery": True} if recovery else None,
        )
        return json.loads(webauthn.options_to_json(options))  # type: ignore[no-any-return]

    async def passkey_finish(
        self, principal_id: str, credential: dict[str, Any], *, session_token: str
    ) -> dict[str, Any]:
        async with self._tx() as conn:
            # Shared with other additions, exclusive of a recovery (recovery_finish), taken
            # before the session: a recovery that comes while this adds a passkey waits for
            # it to commit before it reads the passkeys to remove, so this one goes too.
            await conn.execute(_PASSKEYS_ADDED_LOCK_SHARED, principal_id)
            await self._hold_session(conn, principal_id, session_token)
            credential_id = await self._add_passkey(conn, principal_id, credential, "added")
        return {"credential_id": credential_id}

    async def _hold_session(self, conn: Conn, principal_id: str, session_token: str) -> None:
        """The session that authenticated this request, read again and held (FOR SHARE)
        in the transaction of the change it asks for. It was checked before the
        transaction began; a passkey removal or a recovery that ended it meanwhile (to
        lock out whoever held a lost passkey) must not be followed by that holder's change,
        and one that comes later waits for this change to commit."""
        held = await conn.fetchval(
            "SELECT 1 FROM sessions WHERE token_hash = $1 AND principal_id = $2"
            " AND expires_at > now() FOR SHARE",
            _sha256(session_token),
            principal_id,
        )
        if held is None:
            raise Unauthenticated("the session is invalid or expired", reason="bad_session")

    async def _add_passkey(
        self, conn: Conn, principal_id: str, credential: dict[str, Any], how: str
    ) -> str:
        """Register ``credential`` for an existing human over a challenge issued to them
        (``_registration_options``), audited as ``passkey.<how>``; its id."""
        challenge, payload = await self._consume_challenge(
            conn, credential, purpose="register", principal_id=principal_id
        )
        # A recovery's challenge was issued for a code alone, no passkey confirming it: it
        # registers only through the recovery, which spends the code and replaces the other
        # passkeys and sessions. Taken by an addition (until 2026-12-01), a session and a
        # code added a passkey beside the owner's, unseen, and left the code unspent.
        if bool(payload.get("recovery")) != (how == "recovered"):
            raise Conflict(
                "the challenge is unknown, expired or already used", reason="challenge_used"
            )
        verified = self._verify_registration(credential, challenge)
        await self._insert_credential(conn, principal_id, verified)
        credential_id = bytes_to_base64url(verified.credential_id)
        await self._audit(
            conn,
            event=f"passkey.{how}",
            actor=f"human:{principal_id}",
            subject=_passkey_subject(credential_id),
            key=principal_id,
        )
        return credential_id

    # --- recovery: a person who has lost every passkey -----------------------------------

    async def create_recovery(self, principal_id: str) -> dict[str, Any]:
        """A one-time code (admin only) with which the person registers a new passkey from
        the sign-in page. Whoever holds it can take the account over, like the admin who
        issues it: hand it over as such, out of band."""
        code = "rec_" + secrets.token_urlsafe(24)
        async with self._tx() as conn:
            if not await conn.fetchval("SELECT 1 FROM principals WHERE id = $1", principal_id):
                raise NotFound("no such human")
            await conn.execute(
                "INSERT INTO recoveries (code_hash, principal_id, expires_at)"
                " VALUES ($1, $2, now() + make_interval(secs => $3))",
                _sha256(code),
                principal_id,
                float(self.settings.recovery_ttl),
            )
            await self._audit(
                conn,
                event="recovery.issued",
                actor="admin",
                subject=f"human:{principal_id}",
                key=principal_id,
            )
        return {"recovery_code": code, "expires_in": self.settings.recovery_ttl}

    async def _recovering(self, conn: Conn | asyncpg.Pool, code: str, *, spend: bool) -> str:
        """The human a live recovery code is for (spent, with ``spend``)."""
        row = await conn.fetchrow(
            (
                "UPDATE recoveries SET used_at = now() WHERE code_hash = $1 AND used_at IS NULL"
                " AND expires_at > now() RETURNING principal_id"
            )
            if spend
            else (
                "SELECT principal_id FROM recoveries WHERE code_hash = $1 AND used_at IS NULL"
                " AND expires_at > now()"
            ),
            _sha256(code),
        )
        if row is None:
            raise Forbidden("the recovery code is invalid, used or expired", reason="bad_recovery")
        return str(row["principal_id"])

    async def recovery_begin(self, code: str) -> dict[str, Any]:
        principal_id = await self._recovering(self.pool, code, spend=False)
        async with self._tx() as conn:
            return await self._registration_options(conn, principal_id, recovery=True)

    async def recovery_finish(self, code: str, credential: dict[str, Any]) -> dict[str, Any]:
        """Register the new passkey and sign in with it. Every other passkey and session of
        the person ends: whoever has the lost passkeys may have signed one in, and would
        otherwise go on signing in and approving with them."""
        async with self._tx() as conn:
            principal_id = await self._recovering(conn, code, spend=True)
            # A passkey being added now (passkey_finish, with a session that whoever has
            # the lost passkeys opened) commits first and is read below: the sessions are
            # taken after the passkeys, so waiting for its session would come too late.
            await conn.execute(_PASSKEYS_ADDED_LOCK, principal_id)
            # Removed as remove_passkey removes one (the row stays: receipts name it), and
            # in its lock order: the passkeys (locked by the same query), then the sessions,
            # then the human's audit chain, which the new passkey's event locks (in another
            # order the two deadlocked when they met, and one of them failed). A refusal
            # below rolls all of it back with the code.
            rows = await conn.fetch(_PASSKEYS_FLAGGED + " FOR UPDATE", principal_id)
            lost = [r["credential_id"] for r in rows]
            await conn.execute(
                "UPDATE passkey_credentials SET removed_at = now()"
                " WHERE credential_id = ANY($1::text[])",
                lost,
            )
            await conn.execute("DELETE FROM sessions WHERE principal_id = $1", principal_id)
            await self._end_enrollments(conn, principal_id)
            await self._add_passkey(conn, principal_id, credential, "recovered")
            for credential_id in lost:
                await self._audit(
                    conn,
                    event="passkey.removed",
                    actor=f"human:{principal_id}",
                    subject=_passkey_subject(credential_id),
                    key=principal_id,
                    data={"reason": "recovery"},
                )
            session = await self._new_session(conn, principal_id)
        return {"principal_id": principal_id, "session": session}

    async def _end_enrollments(self, conn: Conn, principal_id: str) -> None:
        """With the sessions a passkey removal or a recovery ends go the enrollment codes
        not yet used: one of those sessions (whoever held the lost passkey) may have
        minted them, and a code is the human's, not a session's, so all go. The owner
        mints a new one."""
        await conn.execute(
            "DELETE FROM enrollments WHERE principal_id = $1 AND used_at IS NULL", principal_id
        )

    async def list_passkeys(self, principal_id: str) -> list[dict[str, Any]]:
        rows = await self.pool.fetch(
            "SELECT credential_id, sign_count, backup_eligible, backed_up, flagged_at, created_at,"
            " last_used_at FROM passkey_credentials WHERE principal_id = $1 AND removed_at IS NULL"
            " ORDER BY created_at",
            principal_id,
        )
        return [_jsonable(dict(r)) for r in rows]

    async def remove_passkey(
        self,
        principal_id: str,
        credential_id: str,
        confirmation: dict[str, Any],
        *,
        session_token: str,
    ) -> None:
        """Remove a passkey, confirmed by one of the human's passkeys, and end the human's
        other sessions: whoever held the removed passkey may have signed one in."""
        async with self._tx() as conn:
            rows = await conn.fetch(_PASSKEYS_FLAGGED + " FOR UPDATE", principal_id)
            _removable(_flagged_by_id(rows), credential_id)
            await self._confirmed(conn, principal_id, f"remove:{credential_id}", confirmation)
            await conn.execute(
                "UPDATE passkey_credentials SET removed_at = now() WHERE credential_id = $1",
                credential_id,
            )
            await conn.execute(
                "DELETE FROM sessions WHERE principal_id = $1 AND token_hash <> $2",
                principal_id,
                _sha256(session_token),
            )
            await self._end_enrollments(conn, principal_id)
            await self._audit(
                conn,
                event="passkey.removed",
                actor=f"human:{principal_id}",
                subject=_passkey_subject(credential_id),
                key=principal_id,
            )

    async def _verify_assertion(
        self,
        conn: Conn,
        credential: dict[str, Any],
        challenge: bytes,
        principal_id: str | None,
    ) -> tuple[str, ApprovalReceipt]:
        """Check a passkey assertion over ``challenge``; return its owner and the receipt.

        ``principal_id`` is the human the assertion was asked of (the options listed their
        passkeys); None for a discoverable sign-in, where the authenticator names the user.
        """
        credential_id = credential.get("rawId") or credential.get("id")
        if not isinstance(credential_id, str):
            raise InvalidReceipt("malformed WebAuthn credential", reason="malformed")
        row = await conn.fetchrow(
            "SELECT principal_id, public_key, sign_count, backup_eligible, flagged_at"
            " FROM passkey_credentials WHERE credential_id = $1 AND removed_at IS NULL FOR UPDATE",
            credential_id,
        )
        if row is None or (principal_id is not None and row["principal_id"] != principal_id):
            raise InvalidReceipt("unknown passkey", reason="unknown_credential")
        if row["flagged_at"] is not None:
            raise Forbidden(
                "this passkey is flagged as possibly cloned", reason="credential_flagged"
            )
        try:
            verified = webauthn.verify_authentication_response(
                credential=credential,
                expected_challenge=challenge,
                expected_rp_id=self.settings.rp_id,
                expected_origin=list(self.settings.origins),
                credential_public_key=bytes(row["public_key"]),
                # py_webauthn compares the counter before it checks the signature, so with the
                # stored counter an unsigned assertion would pass for a clone and lock the
                # passkey. With 0 it never judges the counter; _counter_regressed does, below,
                # once the signature is known to be the passkey's (WebAuthn §7.2 steps 20-21).
                credential_current_sign_count=0,
                require_user_verification=self.settings.require_user_verification,
            )
        except InvalidAuthenticationResponse as exc:
            raise InvalidReceipt(
                f"passkey assertion refused: {exc}", reason="assertion_refused"
            ) from None
        except InvalidBackupFlags:
            # Raised only once the signature has verified; not a response error to py_webauthn.
            # BS without BE says BE is clear: from a passkey registered with BE set, that is a
            # change of BE as well, refused and audited as one (else also setting BS would be
            # enough to leave the change without its audit event).
            if row["backup_eligible"] is True:
                _checked_user_handle(
                    credential["response"].get("userHandle"),
                    owner=row["principal_id"],
                    required=principal_id is None,
                )
                # The counter before the flags, as below: a BE change with BS set is no
                # way for a clone's signed assertion to leave the passkey unflagged.
                # py_webauthn read authenticatorData whole before it raised; the counter is
                # its bytes 33-36, after rpIdHash (32) and the flags (1).
                auth_data = base64url_to_bytes(credential["response"]["authenticatorData"])
                presented = int.from_bytes(auth_data[33:37], "big")
                if _counter_regressed(stored=row["sign_count"], presented=presented):
                    raise SignCountRegression(credential_id, row["principal_id"]) from None
                raise _backup_eligibility_refused(
                    credential_id, row["principal_id"], presented=False
                ) from None
            raise _invalid_backup_flags() from None
        except (WebAuthnException, ValueError, KeyError, TypeError):  # JSON it cannot read...
            raise InvalidReceipt("malformed WebAuthn credential", reason="malformed") from None
        response = credential["response"]
        user_handle = _checked_user_handle(
            response.get("userHandle"), owner=row["principal_id"], required=principal_id is None
        )
        receipt = ApprovalReceipt(
            credential_id=credential_id,
            authenticator_data=response["authenticatorData"],
            client_data_json=response["clientDataJSON"],
            signature=response["signature"],
            credential_public_key=b64url_encode(bytes(row["public_key"])),
            user_handle=user_handle,
        )
        # The stored receipt must verify offline with the protocol's own checker too.
        checked = verify_assertion(
            receipt,
            challenge=challenge,
            rp_id=self.settings.rp_id,
            origin=self.settings.origins,
            require_uv=self.settings.require_user_verification,
        )
        # Only a signed assertion reaches here: whoever holds no passkey cannot flag one.
        if _counter_regressed(stored=row["sign_count"], presented=verified.new_sign_count):
            raise SignCountRegression(credential_id, row["principal_id"])
        if _backup_eligibility_changed(
            stored=row["backup_eligible"], presented=checked.backup_eligible
        ):
            raise _backup_eligibility_refused(
                credential_id, row["principal_id"], presented=checked.backup_eligible
            )
        # BE is recorded here for passkeys registered before it was stored (NULL) and is
        # otherwise the stored value again; BS is whatever the authenticator says now.
        await conn.execute(
            "UPDATE passkey_credentials SET sign_count = $2, last_used_at = now(),"
            " backup_eligible = $3, backed_up = $4 WHERE credential_id = $1",
            credential_id,
            verified.new_sign_count,
            checked.backup_eligible,
            checked.backed_up,
        )
        return str(row["principal_id"]), receipt

    async def _flag_credential(self, credential_id: str, principal_id: str) -> None:
        # Its own transaction: the caller's rolls back, the flag and its event must stay.
        # A counter going back means two copies of the key may be in use, and nobody can
        # tell which one signed what: whoever holds the clone may have signed in, and a
        # session needs no passkey to mint enrollment codes, revoke, deny or read. So every
        # session of the human ends with the flag, and the enrollment codes not yet used
        # with them (as a passkey removal ends them, for the same reason); the person signs
        # in again with another passkey, or through a recovery. Rows in the order
        # remove_passkey takes them: the passkey, then sessions and codes, then the chain.
        async with self._tx() as conn:
            await conn.execute(
                "UPDATE passkey_credentials SET flagged_at = now() WHERE credential_id = $1",
                credential_id,
            )
            ended = await conn.fetchval(
                "WITH ended AS (DELETE FROM sessions WHERE principal_id = $1 RETURNING 1)"
                " SELECT count(*) FROM ended",
                principal_id,
            )
            await self._end_enrollments(conn, principal_id)
            await self._audit(
                conn,
                event="passkey.flagged",
                actor="registry",
                subject=_passkey_subject(credential_id),
                key=principal_id,
                data={"reason": "sign_count_regression", "sessions_ended": int(ended)},
            )

    async def _audit_backup_eligibility_change(self, refused: BackupEligibilityChanged) -> None:
        async with self._tx() as conn:
            await self._audit(
                conn,
                event="passkey.refused",
                actor="registry",
                subject=_passkey_subject(refused.credential_id),
                key=refused.principal_id,
                data={
                    "reason": "backup_eligibility_changed",
                    "backup_eligible": refused.presented,
                },
            )

    # --- enrollment and agents -----------------------------------------------------------

    async def create_enrollment(self, principal_id: str, *, session_token: str) -> dict[str, Any]:
        code = "enr_" + secrets.token_urlsafe(24)
        async with self._tx() as conn:
            await self._hold_session(conn, principal_id, session_token)
            # Counted and inserted under one lock per human: two sessions minting at once
            # cannot both fit under the bound.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"enr:{principal_id}")
            live = await conn.fetchval(
                "SELECT count(*) FROM enrollments WHERE principal_id = $1"
                " AND used_at IS NULL AND expires_at > now()",
                principal_id,
            )
            if live >= self.settings.max_live_enrollments:
                raise Conflict(
                    f"{live} enrollment codes of this human are unused and unexpired already:"
                    " use one, or mint another once one expires",
                    reason="too_many_enrollments",
                )
            await conn.execute(
                "INSERT INTO enrollments (code_hash, principal_id, expires_at)"
                " VALUES ($1, $2, now() + make_interval(secs => $3))",
                _sha256(code),
                principal_id,
                float(self.settings.enrollment_ttl),
            )
            await self._audit(
                conn,
                event="enrollment.created",
                actor=f"human:{principal_id}",
                subject=f"human:{principal_id}",
                key=principal_id,
            )
        return {"enrollment_code": code, "expires_in": self.settings.enrollment_ttl}

    async def register_agent(
        self,
        *,
        name: str,
        public_jwk: dict[str, Any],
        enrollment_code: str,
        proof: str | None,
        htu: str,
    ) -> dict[str, Any]:
        try:
            key = PublicKey.from_jwk(public_jwk)
        except InvalidRequest as exc:
            raise InvalidRequest(exc.description, reason="bad_jwk") from None
        # The one member of the agent's JWK kept as it was sent, and listed back with the
        # agent: bounded as the ids are, where the body's 64 KiB cap alone bounded it.
        if len(key.jwk.get("kid", "")) > _MAX_AGENT_KID:
            raise InvalidRequest(
                f"the key's kid is over {_MAX_AGENT_KID} characters", reason="bad_jwk"
            )
        if not proof:
            raise Unauthenticated("a DPoP proof by the new key is required", reason="missing_proof")
        # Proof of possession: a fresh proof for this request, signed by the key itself.
        now = time.time()
        screened = self.proofs.screen(proof, htm="POST", htu=htu, now=now, jkt=key.thumbprint)
        code_hash = _sha256(enrollment_code)
        # A code that could not register anything is refused before the signature is
        # checked (anyone may call this). The transaction below spends it, checking again.
        if await self.pool.fetchval(_ENROLLMENT_USABLE, code_hash) is None:
            raise Forbidden(
                "the enrollment code is invalid, used or expired", reason="bad_enrollment"
            )
        verified = self.proofs.confirm(screened, now=now)
        await self._reserve_jti(verified.jkt, verified.jti, verified.iat)
        agent_id = new_id("agt")
        async with self._tx() as conn:
            row = await conn.fetchrow(
                "UPDATE enrollments SET used_at = now() WHERE code_hash = $1 AND used_at IS NULL"
                " AND expires_at > now() RETURNING principal_id",
                code_hash,
            )
            if row is None:
                raise Forbidden(
                    "the enrollment code is invalid, used or expired", reason="bad_enrollment"
                )
            principal_id = row["principal_id"]
            try:
                await conn.execute(
                    "INSERT INTO agents (id, principal_id, name, jkt, public_jwk)"
                    " VALUES ($1, $2, $3, $4, $5)",
                    agent_id,
                    principal_id,
                    name,
                    key.thumbprint,
                    key.jwk,
                )
            except asyncpg.UniqueViolationError:
                raise Conflict("this key is already registered", reason="duplicate_key") from None
            await self._audit(
                conn,
                event="agent.registered",
                actor=f"agent:{agent_id}",
                subject=f"agent:{agent_id}",
                key=agent_id,
                agent_id=agent_id,
                data={"jkt": key.thumbprint, "principal_id": principal_id},
            )
        return {"id": agent_id, "principal_id": principal_id, "name": name, "jkt": key.thumbprint}

    async def get_agent(
        self, agent_id: str, *, principal_id: str | None, agent: Agent | None
    ) -> dict[str, Any]:
        row = await self.pool.fetchrow(
            "SELECT id, principal_id, name, jkt, public_jwk, status, created_at FROM agents"
            " WHERE id = $1",
            agent_id,
        )
        if row is None or not (
            (principal_id is not None and row["principal_id"] == principal_id)
            or (agent is not None and agent.id == agent_id)
        ):
            raise NotFound("no such agent")  # not yours reads as absent: no existence oracle
        return _jsonable(dict(row))

    async def list_agents(self, principal_id: str) -> list[dict[str, Any]]:
        rows = await self.pool.fetch(
            "SELECT id, principal_id, name, jkt, status, created_at FROM agents"
            " WHERE principal_id = $1 ORDER BY created_at",
            principal_id,
        )
        return [_jsonable(dict(r)) for r in rows]

    async def disable_agent(self, agent_id: str, *, principal_id: str | None, admin: bool) -> None:
        async with self._tx() as conn:
            row = await conn.fetchrow(
                "SELECT principal_id, status FROM agents WHERE id = $1 FOR UPDATE", agent_id
            )
            if row is None or not (admin or row["principal_id"] == principal_id):
                raise NotFound("no such agent")
            actor = "admin" if admin else f"human:{principal_id}"
            # Disabling what is disabled changes and records nothing (the revocation below
            # is conditional the same way).
            disabling = row["status"] != "disabled"
            if disabling:
                await conn.execute("UPDATE agents SET status = 'disabled' WHERE id = $1", agent_id)
            await self._revoke_in(
                conn, "agent", agent_id, actor=actor, key=agent_id, agent_id=agent_id
            )
            if disabling:
                await self._audit(
                    conn,
                    event="agent.disabled",
                    actor=actor,
                    subject=f"agent:{agent_id}",
                    key=agent_id,
                    agent_id=agent_id,
                )
        await self._publish_revocation("agent", agent_id)

    # --- providers -----------------------------------------------------------------------

    async def register_provider(self, body: ProviderIn) -> dict[str, Any]:
        secret = "psk_" + secrets.token_urlsafe(32)
        async with self._tx() as conn:
            try:
                await conn.execute(
                    "INSERT INTO providers (id, audience, display_name, allowed_kinds, secret_hash)"
                    " VALUES ($1, $2, $3, $4, $5)",
                    body.id,
                    body.audience,
                    body.display_name,
                    list(body.allowed_kinds),
                    _sha256(secret),
                )
            except asyncpg.UniqueViolationError:
                raise Conflict(
                    "a provider with this id or audience exists", reason="duplicate_provider"
                ) from None
            await self._provider_changed(
                conn,
                body.id,
                event="provider.registered",
                actor="admin",
                data={"audience": body.audience, "allowed_kinds": list(body.allowed_kinds)},
            )
        return {**body.model_dump(mode="json"), "secret": secret}

    async def get_provider(self, provider_id: str) -> dict[str, Any]:
        row = await self.pool.fetchrow(
            "SELECT id, audience, display_name, allowed_kinds, created_at,"
            " credential_rotated_at,"
            " CASE WHEN previous_expires_at > now() THEN previous_expires_at END"
            " AS previous_credential_valid_until, suspended_at, suspension_reason"
            " FROM providers WHERE id = $1",
            provider_id,
        )
        if row is None:
            raise NotFound("no such provider")
        return _jsonable(dict(row))

    async def rotate_provider_secret(
        self,
        provider_id: str,
        body: SecretRotationIn,
        *,
        actor: str,
        credential: ProviderCredential | None = None,
    ) -> dict[str, Any]:
        """A new credential for the provider, shown once. The one it replaces keeps working
        for ``previous_valid_for`` seconds; a previous one still in its overlap stops at once
        (a provider holds at most two). ``credential``: when the provider itself asks, the
        one it authenticated with (None for the admin)."""
        secret = "psk_" + secrets.token_urlsafe(32)
        async with self._tx() as conn:
            await self._lock_credentials(conn, provider_id, credential)
            row = await conn.fetchrow(
                "UPDATE providers SET"
                " previous_secret_hash = CASE WHEN $3 > 0 THEN secret_hash END,"
                " previous_expires_at = CASE WHEN $3 > 0"
                " THEN now() + $3 * interval '1 second' END,"
                " secret_hash = $2, credential_rotated_at = now()"
                " WHERE id = $1 RETURNING previous_expires_at, credential_rotated_at",
                provider_id,
                _sha256(secret),
                float(body.previous_valid_for),
            )
            assert row is not None  # locked above, so still there
            until = row["previous_expires_at"]
            await self._provider_changed(
                conn,
                provider_id,
                event="provider.secret_rotated",
                actor=actor,
                data={"previous_valid_until": until.isoformat() if until else None},
            )
        return {
            "id": provider_id,
            "secret": secret,
            "credential_rotated_at": row["credential_rotated_at"].isoformat(),
            "previous_credential_valid_until": until.isoformat() if until else None,
        }

    async def end_previous_provider_secret(
        self, provider_id: str, *, actor: str, credential: ProviderCredential | None = None
    ) -> dict[str, Any]:
        """Stop the previous credential now (it leaked, or the rollout is done). Ending one
        that is absent or already expired changes and records nothing. ``credential`` as
        for ``rotate_provider_secret``."""
        async with self._tx() as conn:
            row = await self._lock_credentials(conn, provider_id, credential)
            if row["overlap"]:
                await conn.execute(
                    "UPDATE providers SET previous_secret_hash = NULL,"
                    " previous_expires_at = NULL WHERE id = $1",
                    provider_id,
                )
                await self._provider_changed(
                    conn, provider_id, event="provider.previous_secret_ended", actor=actor
                )
        return {"id": provider_id, "previous_credential_valid_until": None}

    async def _lock_credentials(
        self, conn: Conn, provider_id: str, credential: ProviderCredential | None
    ) -> asyncpg.Record:
        """Lock the provider's row for a change to its credentials and, when the provider
        itself asks, check its secret again under that lock. The request was authenticated
        before its transaction began: meanwhile the admin may have rotated the secret away
        (a leak), made it the previous one, or suspended the provider, and whoever holds a
        leaked secret must not then rotate it back into the current one."""
        row = await conn.fetchrow(_PROVIDER_CREDENTIALS + " WHERE id = $1 FOR UPDATE", provider_id)
        if row is None:
            raise NotFound("no such provider")
        if credential is not None:
            if credential.provider_id != provider_id:
                raise Forbidden("another provider's credential", reason="wrong_provider")
            if not _credential_standing(row, credential.secret_hash):
                raise Forbidden(
                    "the previous credential cannot change credentials",
                    reason="previous_credential",
                )
        return row

    async def suspend_provider(self, provider_id: str, body: SuspensionIn) -> dict[str, Any]:
        """Refuse the provider everywhere until it is reinstated (see docs/registry.md).
        Suspending one already suspended changes and records nothing: the first time and
        reason stand."""
        async with self._tx() as conn:
            suspended = await conn.fetchval(
                "UPDATE providers SET suspended_at = now(), suspension_reason = $2"
                " WHERE id = $1 AND suspended_at IS NULL RETURNING true",
                provider_id,
                body.reason,
            )
            if suspended:
                await self._provider_changed(
                    conn,
                    provider_id,
                    event="provider.suspended",
                    actor="admin",
                    data={"reason": body.reason},
                )
        return await self._suspension(provider_id)

    async def reinstate_provider(self, provider_id: str) -> dict[str, Any]:
        """Lift a suspension (one that is not there changes and records nothing)."""
        async with self._tx() as conn:
            lifted = await conn.fetchval(
                "UPDATE providers SET suspended_at = NULL, suspension_reason = NULL"
                " WHERE id = $1 AND suspended_at IS NOT NULL RETURNING true",
                provider_id,
            )
            if lifted:
                await self._provider_changed(
                    conn, provider_id, event="provider.reinstated", actor="admin"
                )
        return await self._suspension(provider_id)

    async def _suspension(self, provider_id: str) -> dict[str, Any]:
        row = await self.pool.fetchrow(
            "SELECT id, suspended_at, suspension_reason FROM providers WHERE id = $1",
            provider_id,
        )
        if row is None:
            raise NotFound("no such provider")
        return _jsonable(dict(row))

    async def _provider_changed(
        self,
        conn: Conn,
        provider_id: str,
        *,
        event: str,
        actor: str,
        data: dict[str, Any] | None = None,
    ) -> None:
        """Record a change to a provider, in the changing transaction: its audit event, and
        a step of the epoch verifiers poll. The epoch row's lock orders these transactions'
        commits, so a verifier that reads an epoch has seen every change up to it."""
        await conn.execute("UPDATE provider_changes SET epoch = epoch + 1")
        await self._audit(
            conn,
            event=event,
            actor=actor,
            subject=f"provider:{provider_id}",
            key=provider_id,
            data=data,
        )

    # --- grant requests and grants -------------------------------------------------------

    async def request_grant(self, agent: Agent, body: GrantRequestIn) -> dict[str, Any]:
        check_money(capabilities=body.capabilities, envelope=body.envelope)
        provider = await self.pool.fetchrow(
            "SELECT id, audience, allowed_kinds, suspended_at FROM providers WHERE id = $1",
            body.provider_id,
        )
        if provider is None:
            raise NotFound("no such provider")
        if provider["suspended_at"] is not None:
            raise Conflict("the provider is suspended", reason="provider_suspended")
        kinds = {c.kind for c in body.capabilities}
        if not kinds <= set(provider["allowed_kinds"]):
            raise Forbidden(
                "the provider does not offer these capability kinds", reason="kind_not_offered"
            )
        # The grant this request would become, as asked: refused now if no token could use
        # it, rather than put before the human to sign.
        self._check_usable(
            Grant(
                grant_id=new_id("grt"),  # every grant id has this one length
                agent_id=agent.id,
                principal_id=agent.principal_id,
                provider_id=body.provider_id,
                audience=provider["audience"],
                capabilities=body.capabilities,
                envelope=body.envelope,
                created_at=int(time.time()),
            ),
            now=time.time(),
        )
        request_id = new_id("grq")
        async with self._tx() as conn:
            # One agent's requests one at a time, so that concurrent ones count each other.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"grq:{agent.id}")
            await _hold_agent(conn, agent)
            # The provider again, under a shared lock (after the agent's, the approvals'
            # order): a suspension committed since the read above is seen, and one asked
            # for now waits for this request, which is then pending for a suspended
            # provider as every earlier one is. Unlocked, a suspension in between left a
            # new request, and its event, behind the 409 it should have been.
            suspended = await conn.fetchval(
                "SELECT suspended_at IS NOT NULL FROM providers WHERE id = $1 FOR SHARE",
                body.provider_id,
            )
            if suspended:
                raise Conflict("the provider is suspended", reason="provider_suspended")
            waiting = await conn.fetchval(
                "SELECT count(*) FROM grant_requests WHERE agent_id = $1 AND status = 'pending'"
                " AND created_at > now() - make_interval(secs => $2)",
                agent.id,
                float(self.settings.grant_request_ttl),
            )
            if waiting >= self.settings.max_pending_grant_requests:
                # An agent must not bury the request that matters under a flood of others.
                raise Conflict(
                    f"{waiting} requests of this agent are waiting for the human already:"
                    " ask again once one is decided or expired",
                    reason="too_many_grant_requests",
                )
            await conn.execute(
                "INSERT INTO grant_requests (id, agent_id, provider_id, capabilities, envelope)"
                " VALUES ($1, $2, $3, $4, $5)",
                request_id,
                agent.id,
                body.provider_id,
                [c.to_document() for c in body.capabilities],
                body.envelope.model_dump(mode="json", exclude_none=True),
            )
            await self._audit(
                conn,
                event="grant_request.created",
                actor=f"agent:{agent.id}",
                subject=f"grant_request:{request_id}",
                key=agent.id,
                agent_id=agent.id,
                data={"provider_id": body.provider_id},
            )
            return await self.get_grant_request(request_id, agent=agent, conn=conn)

    def _check_usable(self, grant: Grant, *, now: float | None) -> None:
        """Refuse (400 invalid_request) a grant no token could use: one already expired at
        ``now`` (None: not checked here), one whose money rules no payment could meet, or
        one whose tokens would be larger than every verifier accepts."""
        expires_at = grant.envelope.expires_at
        if now is not None and expires_at is not None and expires_at <= now:
            raise InvalidRequest(
                "envelope.expires_at: already past, so every token would be refused",
                reason="already_expired",
            )
        _check_currencies(grant.capabilities, grant.envelope)
        _check_token_size(grant, issuer=self.settings.issuer)

    async def _request_row(
        self, conn: Conn | asyncpg.Pool, request_id: str, *, lock: bool = False
    ) -> asyncpg.Record:
        row = await conn.fetchrow(
            # Only constant fragments are joined here: no caller text enters the SQL.
            f"{_REQUEST_SELECT} WHERE r.id = $1" + (_APPROVAL_LOCKS_REQUEST if lock else ""),
            request_id,
            float(self.settings.grant_request_ttl),
        )
        if row is None:
            raise NotFound("no such grant request")
        return row

    async def get_grant_request(
        self,
        request_id: str,
        *,
        principal_id: str | None = None,
        agent: Agent | None = None,
        conn: Conn | None = None,
    ) -> dict[str, Any]:
        row = await self._request_row(conn or self.pool, request_id)
        if not _may_see(row, principal_id, agent):
            raise NotFound("no such grant request")
        return _request_view(row)

    async def list_grant_requests(
        self,
        *,
        principal_id: str | None = None,
        agent: Agent | None = None,
        status: str | None = None,
        limit: int = LIST_PAGE_MAX,
        cursor: str | None = None,
    ) -> RowPage:
        """One page of the human's (or the agent's) grant requests in (created_at, id)
        order: at most ``limit``, after ``cursor`` (the ``next`` of the page before)."""
        _check_list_limit(limit)
        after = None if cursor is None else _created_position(cursor)
        owner_clause = "a.principal_id = $1" if principal_id else "r.agent_id = $1"
        owner = principal_id if principal_id else agent.id if agent else None
        # The cursor only says where the caller's own listing starts: the owner is named
        # again for every page.
        beyond = "" if after is None else _AFTER_CREATED.format(t="r", n=5, m=6)
        rows = await self.pool.fetch(
            # owner_clause is one of two constants chosen above, beyond a constant.
            f"{_REQUEST_SELECT} WHERE {owner_clause}"
            f" AND ($3::text IS NULL OR {_REQUEST_STATUS} = $3){beyond}"
            " ORDER BY r.created_at, r.id LIMIT $4",
            owner,
            float(self.settings.grant_request_ttl),
            status,
            limit + 1,  # one past the page says whether another follows
            *(after or ()),
        )
        return _row_page(rows, limit, _request_view)

    async def _assertion_options(
        self,
        principal_id: str,
        challenge: bytes,
        *,
        purpose: str,
        subject_id: str,
        payload: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """WebAuthn request options over ``challenge`` for the human's passkeys, with the
        challenge stored single-use for ``purpose`` on ``subject_id``."""
        options = webauthn.generate_authentication_options(
            rp_id=self.settings.rp_id,
            challenge=challenge,
            allow_credentials=await _descriptors(self.pool, principal_id),
            user_verification=self._uv(),
        )
        await self._store_challenge(
            self.pool,
            challenge,
            purpose=purpose,
            principal_id=principal_id,
            subject_id=subject_id,
            payload=payload,
        )
        return json.loads(webauthn.options_to_json(options))  # type: ignore[no-any-return]

    async def approval_begin(
        self, principal_id: str, request_id: str, body: ApprovalBeginIn
    ) -> dict[str, Any]:
        row = await self._request_row(self.pool, request_id)
        if row["principal_id"] != principal_id:
            raise NotFound("no such grant request")
        _still_pending(row["status"], "request")
        _still_usable(row)
        requested = GrantRequest.model_validate(
            {
                "agent_id": row["agent_id"],
                "provider_id": row["provider_id"],
                "capabilities": row["capabilities"],
                "envelope": row["envelope"],
            }
        )
        approved = tighten(requested, capabilities=body.capabilities, envelope=body.envelope)
        # What is signed, as narrowed: a request stored before amounts had to fit their
        # currency can still be approved once the person rounds its limits down.
        check_money(capabilities=approved.capabilities, envelope=approved.envelope)
        grant = Grant(
            grant_id=new_id("grt"),
            agent_id=approved.agent_id,
            principal_id=principal_id,
            provider_id=approved.provider_id,
            audience=row["audience"],
            capabilities=approved.capabilities,
            envelope=approved.envelope,
            created_at=int(time.time()),
        )
        # Tightening adds limits (carried in every token) and may move the expiry or the
        # currency: what is signed must be usable, not only what was asked.
        self._check_usable(grant, now=time.time())
        challenge = grant.digest()
        options = await self._assertion_options(
            principal_id,
            challenge,
            purpose="approve_grant",
            subject_id=request_id,
            payload={"grant": grant.model_dump(mode="json", exclude_none=True)},
        )
        return {
            "grant": grant.document(),
            "grant_hash": grant.digest_b64(),
            "options": options,
        }

    async def approval_finish(
        self, principal_id: str, request_id: str, credential: dict[str, Any]
    ) -> dict[str, Any]:
        async with self._tx() as conn:
            row = await self._request_row(conn, request_id, lock=True)
            if row["principal_id"] != principal_id:
                raise NotFound("no such grant request")
            challenge, payload = await self._consume_challenge(
                conn,
                credential,
                purpose="approve_grant",
                principal_id=principal_id,
                subject_id=request_id,
            )
            _still_pending(row["status"], "request")
            _still_usable(row)  # since the approval began: nothing is consumed
            grant = Grant.model_validate(payload["grant"])
            # Checked at the begin too; a begin from before that check may still be open.
            check_money(capabilities=grant.capabilities, envelope=grant.envelope)
            if grant.envelope.expires_at is not None and grant.envelope.expires_at <= time.time():
                # Tightened to an expiry that passed since the begin: nothing is consumed.
                raise Conflict("the grant has expired", reason="grant_expired")
            self._check_usable(grant, now=None)
            if grant.digest() != challenge:  # the stored grant is what the challenge commits to
                raise InvalidReceipt(
                    "challenge does not match the grant", reason="challenge_mismatch"
                )
            owner, receipt = await self._verify_assertion(conn, credential, challenge, principal_id)
            await conn.execute(
                "UPDATE grant_requests SET status = 'approved', decided_at = now() WHERE id = $1",
                request_id,
            )
            await conn.execute(
                "INSERT INTO grants (id, request_id, agent_id, principal_id, provider_id, document,"
                " grant_hash, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                grant.grant_id,
                request_id,
                grant.agent_id,
                owner,
                grant.provider_id,
                grant.canonical_bytes().decode("utf-8"),
                grant.digest_b64(),
                grant.envelope.expires_at,
            )
            await conn.execute(
                "INSERT INTO approval_receipts (grant_id, credential_id, receipt, receipt_hash)"
                " VALUES ($1, $2, $3, $4)",
                grant.grant_id,
                receipt.credential_id,
                receipt.model_dump(mode="json", exclude_none=True),
                receipt.digest(),
            )
            await self._audit(
                conn,
                event="grant.approved",
                actor=f"human:{owner}",
                subject=f"grant:{grant.grant_id}",
                key=grant.agent_id,
                agent_id=grant.agent_id,
                grant_id=grant.grant_id,
                data={
                    "grant_hash": grant.digest_b64(),
                    "receipt_hash": receipt.digest(),
                    "request_id": request_id,
                },
            )
            # The answer read in the change's own transaction: a failure to read it then
            # undoes the change, rather than reporting an error for a change that stands.
            return await self.get_grant(grant.grant_id, principal_id=principal_id, conn=conn)

    async def deny_request(self, principal_id: str, request_id: str) -> dict[str, Any]:
        async with self._tx() as conn:
            row = await self._request_row(conn, request_id, lock=True)
            if row["principal_id"] != principal_id:
                raise NotFound("no such grant request")
            _still_pending(row["status"], "request")
            await conn.execute(
                "UPDATE grant_requests SET status = 'denied', decided_at = now() WHERE id = $1",
                request_id,
            )
            await self._audit(
                conn,
                event="grant_request.denied",
                actor=f"human:{principal_id}",
                subject=f"grant_request:{request_id}",
                key=row["agent_id"],
                agent_id=row["agent_id"],
            )
            return await self.get_grant_request(request_id, principal_id=principal_id, conn=conn)

    async def get_grant(
        self,
        grant_id: str,
        *,
        principal_id: str | None = None,
        agent: Agent | None = None,
        conn: Conn | None = None,
    ) -> dict[str, Any]:
        row = await (conn or self.pool).fetchrow(_GRANT_SELECT + " WHERE g.id = $1", grant_id)
        if row is None or not _may_see(row, principal_id, agent):
            raise NotFound("no such grant")
        return _grant_view(row)

    async def list_grants(
        self, *, principal_id: str | None = None, agent: Agent | None = None
    ) -> list[dict[str, Any]]:
        # One query for the whole list: a person with hundreds of grants is one round trip.
        owner_clause = "g.principal_id = $1" if principal_id else "g.agent_id = $1"
        owner = principal_id if principal_id else agent.id if agent else None
        rows = await self.pool.fetch(
            # owner_clause is one of two constants chosen above.
            f"{_GRANT_SELECT} WHERE {owner_clause} ORDER BY g.created_at, g.id",
            owner,
        )
        return [_grant_view(r) for r in rows]

    async def grant_usage(
        self, grant_id: str, *, principal_id: str | None = None, agent: Agent | None = None
    ) -> dict[str, Any]:
        """Use of a grant against its limits, from the verifier's committed decisions: as
        counted at most ``usage_cache_seconds`` ago (the caller is authorized every time)."""
        grant_view = await self.get_grant(grant_id, principal_id=principal_id, agent=agent)
        grant = _stored_grant(grant_view["document"])
        now_us = int(time.monotonic() * 1_000_000)
        return await self._usage.get(grant_id, now_us, partial(self._count_usage, grant_id, grant))

    async def _count_usage(self, grant_id: str, grant: Grant) -> dict[str, Any]:
        now = time.time()
        # Counted by the database: a busy grant has millions of decisions a week, which
        # were all read here, bodies and all, to answer a few counts. Each rate limit over
        # its own window (up to 31 days, as the shard counts it), not only the series'
        # week: older allows in a longer window still use it up.
        rate = [
            {
                "max_count": limit.max_count,
                "window_seconds": limit.window_seconds,
                "used": await self.pool.fetchval(
                    _ALLOWS_SINCE, grant_id, math.floor((now - limit.window_seconds) * 1000)
                ),
            }
            for limit in grant.envelope.rate_limits
        ]
        # What is spent comes with the latest allow, however old: a month's or a grant's
        # limit is used by allows from before the week the series shows.
        latest = await self.pool.fetchval(
            "SELECT body FROM audit_events WHERE grant_id = $1 AND event = 'verify.allow'"
            " ORDER BY time_ms DESC LIMIT 1",
            grant_id,
        )
        spend_snapshot: list[list[str]] = (
            json.loads(latest)["data"].get("usage", {}).get("spend", []) if latest else []
        )
        local = datetime.fromtimestamp(now, tz=grant.envelope.zone)
        spend = []
        for i, cap in enumerate(grant.envelope.spend_limits):
            key = period_key(cap.period, local)
            used = (
                spend_snapshot[i][1]
                if i < len(spend_snapshot) and spend_snapshot[i][0] == key
                else "0"
            )
            spend.append(
                {
                    "amount": format(cap.amount, "f"),
                    "currency": cap.currency,
                    "period": cap.period,
                    "used": used,
                }
            )
        hours = await self.pool.fetch(
            _HOURLY_DECISIONS, grant_id, int((now - 7 * 24 * 3600) * 1000)
        )
        return {
            "grant_id": grant_id,
            "rate": rate,
            "spend": spend,
            "series": [{"hour": h["hour"], "allow": h["allow"], "deny": h["deny"]} for h in hours],
        }

    async def grant_tokens(
        self,
        grant_id: str,
        *,
        now: int,
        principal_id: str | None = None,
        agent: Agent | None = None,
    ) -> list[dict[str, Any]]:
        """The grant's tokens in use at ``now``: issued, unexpired and not revoked one by
        one, soonest to expire first. Whoever may see the grant may see these."""
        await self.get_grant(grant_id, principal_id=principal_id, agent=agent)
        # From the records issuance and revocation keep, not the audit log: those hold
        # exactly the tokens still alive (expired ones go a day later), however long the
        # grant's history has grown.
        rows = await self.pool.fetch(
            "SELECT t.jti, t.expires_at FROM issued_tokens t WHERE t.grant_id = $1"
            " AND t.expires_at > $2 AND NOT EXISTS (SELECT 1 FROM revocations r"
            " WHERE r.kind = 'token' AND r.target = t.jti) ORDER BY t.expires_at, t.jti",
            grant_id,
            now,
        )
        return [{"jti": r["jti"], "expires_at": r["expires_at"]} for r in rows]

    # --- tokens --------------------------------------------------------------------------

    async def issue_token(self, agent: Agent, grant_id: str) -> dict[str, Any]:
        now = int(time.time())
        row = await self.pool.fetchrow(
            # Only the constant _GRANT_REVOKED is joined in.
            "SELECT g.document, g.agent_id, g.expires_at, g.grant_hash, r.receipt,"  # noqa: S608
            f" r.receipt_hash, c.public_key, {_GRANT_REVOKED} AS revoked,"
            " p.suspended_at IS NOT NULL AS provider_suspended"
            " FROM grants g JOIN approval_receipts r ON r.grant_id = g.id"
            " JOIN providers p ON p.id = g.provider_id"
            # The approver's passkey as registered (removed since or not: a removal does not
            # undo what it approved), so that the receipt is checked against its real key.
            " LEFT JOIN passkey_credentials c ON c.credential_id = r.credential_id"
            " AND c.principal_id = g.principal_id WHERE g.id = $1",
            grant_id,
        )
        if row is None or row["agent_id"] != agent.id:
            raise NotFound("no such grant")
        if row["revoked"]:
            raise Forbidden("the grant is revoked", reason="grant_revoked")
        if row["expires_at"] is not None and now >= row["expires_at"]:
            raise Forbidden("the grant has expired", reason="grant_expired")
        if row["provider_suspended"]:
            raise Forbidden("the grant's provider is suspended", reason="provider_suspended")
        grant = _stored_grant(json.loads(row["document"]))
        self._check_signed_as_stored(grant_id, grant, row)
        await self._take_token_slot(grant_id)
        lifetime = self.settings.token_lifetime
        if grant.envelope.expires_at is not None:
            lifetime = min(lifetime, grant.envelope.expires_at - now)
        # A signer failure raises SignerUnavailable (503) here: no token, nothing written.
        signer = await self.keys.signer(now)
        header, claims = access_token_parts(
            kid=signer.kid,
            alg=signer.alg,
            issuer=self.settings.issuer,
            grant=grant,
            jkt=agent.jkt,
            receipt_hash=row["receipt_hash"],
            now=now,
            lifetime=lifetime,
        )
        data = signing_input(header, claims)
        if _compact_size(data) > _TOKEN_POLICY.max_token_bytes:
            # A grant approved before its size was checked (see _check_token_size): every
            # verifier would refuse the token, so none is signed.
            raise Forbidden(
                "the grant is too large for an access token any verifier accepts",
                reason="grant_too_large",
            )
        token = attach_signature(data, await signer.sign(data))
        async with self._tx() as conn:
            # The read above may be stale by now: a revocation of the grant, or the agent's,
            # may have committed while the token was signed. So the grant and agent rows are
            # locked and read again, in this transaction, before the token is recorded. A
            # revocation locks one of those rows before anything else (revoke, the grant's;
            # disable_agent, the agent's): one that committed first is seen here, and one
            # that comes later waits for this issuance to commit (its token is revoked too).
            # Signing stays outside, so a slow key backend never holds up a revocation.
            # The provider's row too: a suspension (an UPDATE of it) that committed while
            # the token was signed is seen, and one that comes later waits for this.
            await conn.execute(
                "SELECT 1 FROM grants g JOIN agents a ON a.id = g.agent_id"
                " JOIN providers p ON p.id = g.provider_id WHERE g.id = $1"
                " FOR SHARE OF g, a, p",
                grant_id,
            )
            # A statement of its own: its snapshot is taken once the locks are held.
            now_row = await conn.fetchrow(_GRANT_STANDING_NOW, grant_id)
            assert now_row is not None  # its row is locked above, in this transaction
            if now_row["revoked"]:
                raise Forbidden("the grant is revoked", reason="grant_revoked")
            if now_row["provider_suspended"]:
                raise Forbidden("the grant's provider is suspended", reason="provider_suspended")
            await conn.execute(
                "INSERT INTO issued_tokens (jti, grant_id, agent_id, kid, issued_at, expires_at)"
                " VALUES ($1, $2, $3, $4, $5, $6)",
                claims["jti"],
                grant_id,
                agent.id,
                signer.kid,
                now,
                claims["exp"],
            )
            await self._audit(
                conn,
                event="token.issued",
                actor=f"agent:{agent.id}",
                subject=f"token:{claims['jti']}",
                key=agent.id,
                agent_id=agent.id,
                grant_id=grant_id,
                data={"kid": signer.kid, "exp": claims["exp"]},
            )
        increment("tokens_issued")
        return {
            "access_token": token,
            "token_type": "DPoP",
            "expires_in": claims["exp"] - now,
            "grant_id": grant_id,
            "jti": claims["jti"],
        }

    async def _take_token_slot(self, grant_id: str) -> None:
        """Take one of the grant's tokens for this period (``token_limit``), or refuse: 429
        with Retry-After, nothing signed or written. Taken before signing, so a token whose
        signing or recording then fails still counts: a refusal can come early, never late.
        Redis unreachable refuses too (503): issuance has already reserved the request's
        proof there, so it could not have gone on anyway."""
        try:
            wait_us = int(
                await self._take_script(
                    keys=[f"agentauth:tokens:grant:{grant_id}"], args=self._token_args
                )
            )
        except Exception:
            raise DependencyUnavailable(
                "token issuance is unavailable for now", reason="limits_unavailable"
            ) from None
        if wait_us > 0:
            raise RateLimited(
                f"more than {self.settings.token_limit} tokens for this grant in"
                f" {self.settings.token_limit_period} s; reuse the one held, or retry later",
                retry_after=math.ceil(wait_us / 1_000_000),
                reason="token_rate_limited",
            )

    def _check_signed_as_stored(self, grant_id: str, grant: Grant, row: asyncpg.Record) -> None:
        """Refuse (403 ``grant_unusable``) to mint from a stored grant that is not, to the
        byte, the document its stored receipt's passkey signed: verifiers trust a token's
        capabilities and envelope as they are, so the registry is the one place where a
        grant rewritten in the database (or one whose stored form no longer reads back to
        the bytes signed) would become authority nobody approved. The receipt is checked
        as anyone would offline, against the key the approver's passkey was registered
        with; the origin and user verification were judged at the approval, so a change
        of those settings since does not undo approvals."""
        try:
            receipt = ApprovalReceipt.model_validate(row["receipt"])
            client_data = strict_json_loads(b64url_decode(receipt.client_data_json))
            origin = client_data.get("origin") if isinstance(client_data, dict) else None
            registered = row["public_key"]
            if (
                grant.digest_b64() != row["grant_hash"]
                or not isinstance(origin, str)
                or registered is None
                or not hmac.compare_digest(
                    b64url_decode(receipt.credential_public_key), bytes(registered)
                )
            ):
                raise InvalidReceipt("the receipt is not the approver's", reason="mismatch")
            verify_assertion(
                receipt,
                challenge=grant.digest(),
                rp_id=self.settings.rp_id,
                origin=origin,
                require_uv=False,
            )
        except (InvalidReceipt, InvalidRequest, ValueError, TypeError) as exc:
            # Only a rewritten database row or a grant stored under other rules gets here:
            # worth an operator's look. Ids and a reason only, no receipt material. Once a
            # period per reason (a code's own word, never the caller's): this comes before
            # the grant's token limit, so an agent asking again and again would otherwise
            # write a line per proof it signs.
            why = getattr(exc, "reason", None) or type(exc).__name__
            self._said.log(
                log,
                ("grant_unusable", why),
                "grant %s: its stored document is not the one its receipt approved (%s);"
                " no token minted",
                grant_id,
                why,
                level=logging.ERROR,
            )
            raise Forbidden(
                "the stored grant is not the one its approval signed: ask for it again",
                reason="grant_unusable",
            ) from None

    # --- revocation ----------------------------------------------------------------------

    async def revoke(
        self, kind: str, target: str, *, principal_id: str | None, admin: bool
    ) -> dict[str, Any]:
        if kind == "agent":
            # One meaning for a revoked agent, however it is asked for: it is disabled, so
            # it can no longer sign in to ask for grants or step-ups either, not only be
            # refused tokens and verifications.
            await self.disable_agent(target, principal_id=principal_id, admin=admin)
            return {"kind": kind, "target": target, "revoked": True}
        owner_query = {
            "token": "SELECT t.agent_id, a.principal_id FROM issued_tokens t"
            " JOIN agents a ON a.id = t.agent_id WHERE t.jti = $1",
            # Locked first, before the audit chain: a token issuance holds this row (shared)
            # and then appends to the chain, so taking them in the same order cannot deadlock,
            # and this revocation waits for an issuance that read the grant before it.
            "grant": "SELECT agent_id, principal_id FROM grants WHERE id = $1 FOR UPDATE",
        }[kind]
        async with self._tx() as conn:
            row = await conn.fetchrow(owner_query, target)
            if row is None or not (admin or row["principal_id"] == principal_id):
                raise NotFound(f"no such {kind}")
            actor = "admin" if admin else f"human:{principal_id}"
            await self._revoke_in(
                conn, kind, target, actor=actor, key=row["agent_id"], agent_id=row["agent_id"]
            )
            if kind == "grant":
                await conn.execute(
                    "UPDATE grants SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL",
                    target,
                )
        await self._publish_revocation(kind, target)
        return {"kind": kind, "target": target, "revoked": True}

    async def _revoke_in(
        self,
        conn: Conn,
        kind: str,
        target: str,
        *,
        actor: str,
        key: str,
        agent_id: str,
    ) -> None:
        # Revoking again changes nothing and takes no id (an ON CONFLICT alone would burn
        # one each time). Committed, the row is numbered (seq) in commit order by migration
        # 0009's trigger; verifiers poll by that number.
        inserted = await conn.fetchval(
            "INSERT INTO revocations (kind, target, revoked_by) SELECT $1::text, $2::text, $3"
            " WHERE NOT EXISTS (SELECT 1 FROM revocations WHERE kind = $1 AND target = $2)"
            " ON CONFLICT (kind, target) DO NOTHING RETURNING id",
            kind,
            target,
            actor,
        )
        if inserted is not None:
            await self._audit(
                conn,
                event=f"{kind}.revoked",
                actor=actor,
                subject=f"{kind}:{target}",
                key=key,
                agent_id=agent_id,
                grant_id=target if kind == "grant" else None,
            )

    async def _publish_revocation(self, kind: str, target: str) -> None:
        # Best effort: the row is committed; verifiers that miss the message read it with
        # their next poll of the table (in commit order, so none is passed over). A revoked
        # grant's cached status is marked "revoked" rather than deleted: a verifier that
        # read "active" from PostgreSQL before this revocation committed writes its fill
        # afterwards, with SET NX, so it cannot put the stale "active" back. If Redis is
        # unreachable here, a cached "active" lives out its TTL (grant_cache_ttl); every
        # replica denies the grant's tokens meanwhile on the revocation itself (the poll),
        # which it keeps far longer, before it looks at the grant's status.
        try:
            pipe = self.redis.pipeline(transaction=False)
            if kind == "grant":
                pipe.set(grant_cache_key(target), b"revoked", ex=GRANT_REVOKED_TTL)
            pipe.publish(REVOCATION_CHANNEL, json.dumps({"kind": kind, "target": target}))
            await pipe.execute()
        except Exception:  # the revocations table is the durable channel
            # Per revocation while Redis is down, and revoking again publishes again: said
            # once per period for each kind (the poll carries them all the same).
            self._said.log(
                log,
                ("publish", kind),
                "revocation %s:%s not published; verifiers will reload",
                kind,
                target,
            )

    async def list_revocations(self, since: int = 0) -> list[dict[str, Any]]:
        """Revocations numbered above ``since``, in commit order (``seq``): a reader that
        resumes from the last ``seq`` it read misses none, which ids, taken at insert and
        committed out of order, cannot promise."""
        rows = await self.pool.fetch(
            "SELECT id, seq, kind, target, revoked_at FROM revocations WHERE seq > $1"
            " ORDER BY seq LIMIT 10000",
            since,
        )
        return [_jsonable(dict(r)) for r in rows]

    # --- step-up approvals -----------------------------------------------------------------

    async def request_step_up(self, agent: Agent, body: StepUpIn) -> dict[str, Any]:
        # An approval for an amount nobody can pay could never be used (the verifier
        # refuses the transaction): refused before the human is asked.
        check_amount(body.amount, body.currency)
        grant = await self.get_grant(body.grant_id, agent=agent)
        if grant["revoked_at"] is not None:
            raise Forbidden("the grant is revoked", reason="grant_revoked")
        expires_at = grant["document"]["envelope"].get("expires_at")
        if expires_at is not None and expires_at <= time.time():
            raise Forbidden("the grant has expired", reason="grant_expired")
        if grant["provider_suspended"]:  # no token could use the approval
            raise Forbidden("the grant's provider is suspended", reason="provider_suspended")
        _check_step_up_applies(_stored_grant(grant["document"]), body)
        step_id = new_id("stp")
        expires_at = int(time.time()) + self.settings.step_up_ttl
        document = {
            "type": STEP_UP_TYPE,
            "id": step_id,
            "grant_id": body.grant_id,
            "grant_hash": grant["grant_hash"],
            "agent_id": agent.id,
            "resource": body.resource,
            "amount": format(body.amount.normalize(), "f"),
            "currency": body.currency,
            "expires_at": expires_at,
        }
        if body.payee is not None:
            document["payee"] = body.payee
        async with self._tx() as conn:
            # One pending approval per payment. An agent that asks again (a retry after a
            # timeout, a restarted process) finds the one already waiting: two cards for one
            # payment would have the human approve it twice, and the agent could then pay
            # twice. A payment is its grant, resource, amount, currency and payee; once
            # decided or expired, asking again is a new payment. The lock makes two
            # concurrent asks one.
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext($1))", f"step-up:{body.grant_id}"
            )
            await _hold_agent(conn, agent)
            await _hold_step_up_grant(conn, body.grant_id)
            waiting = await conn.fetch(
                "SELECT id, document FROM step_ups WHERE grant_id = $1 AND agent_id = $2"
                " AND status = 'pending' AND expires_at > $3",
                body.grant_id,
                agent.id,
                int(time.time()),
            )
            existing = next(
                (
                    str(row["id"])
                    for row in waiting
                    if _same_payment(json.loads(row["document"]), document)
                ),
                None,
            )
            if existing is not None:
                return await self.get_step_up(existing, agent=agent)  # committed before
            if len(waiting) >= self.settings.max_pending_step_ups:
                # Each is a card on the human's page: an agent must not bury the one that
                # matters under a flood of others.
                raise Conflict(
                    f"{len(waiting)} step-ups of this grant are waiting for the human already:"
                    " ask again once one is decided or expired",
                    reason="too_many_step_ups",
                )
            await conn.execute(
                "INSERT INTO step_ups (id, grant_id, agent_id, document, expires_at)"
                " VALUES ($1, $2, $3, $4, $5)",
                step_id,
                body.grant_id,
                agent.id,
                canonical_json(document).decode(),
                expires_at,
            )
            await self._audit(
                conn,
                event="step_up.requested",
                actor=f"agent:{agent.id}",
                subject=f"step_up:{step_id}",
                key=agent.id,
                agent_id=agent.id,
                grant_id=body.grant_id,
                data={"amount": document["amount"], "currency": body.currency},
            )
        return await self.get_step_up(step_id, agent=agent)

    async def get_step_up(
        self,
        step_id: str,
        *,
        principal_id: str | None = None,
        agent: Agent | None = None,
        wait: float = 0.0,
        conn: Conn | None = None,
    ) -> dict[str, Any]:
        if wait <= 0:
            return await self._read_step_up(step_id, principal_id, agent, conn=conn)
        caller = f"agent:{agent.id}" if agent is not None else f"human:{principal_id}"
        try:
            with self._step_up_waits.hold(caller):
                return await self._wait_for_step_up(step_id, principal_id, agent, wait)
        except Full as full:
            increment("step_up_waits_refused", tags={"bound": full.args[0]})
            raise RateLimited(
                "too many step-up waits open at once; retry later"
                if full.args[0] == "replica"
                else "this caller has too many step-up waits open already; retry later",
                retry_after=_STEP_UP_WAIT_RETRY_AFTER,
                reason="too_many_waits",
            ) from None

    async def _read_step_up(
        self,
        step_id: str,
        principal_id: str | None,
        agent: Agent | None,
        *,
        conn: Conn | None = None,
    ) -> dict[str, Any]:
        row = await (conn or self.pool).fetchrow(_STEP_UP_SELECT + " WHERE s.id = $1", step_id)
        if row is None or not _may_see(row, principal_id, agent):
            raise NotFound("no such step-up")
        return _step_up_view(row, for_agent=agent is not None)

    async def _wait_for_step_up(
        self, step_id: str, principal_id: str | None, agent: Agent | None, wait: float
    ) -> dict[str, Any]:
        """Read the step-up until it is no longer pending or ``wait`` seconds pass. Each
        read borrows a pooled connection only for itself; the pauses between reads grow,
        so a wait unanswered for 30 s costs about 20 reads, not 120."""
        deadline = time.monotonic() + min(wait, 30.0)
        pause = _STEP_UP_POLL_FIRST
        while True:
            view = await self._read_step_up(step_id, principal_id, agent)
            left = deadline - time.monotonic()
            if view["status"] != "pending" or left <= 0:
                return view
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 2, _STEP_UP_POLL_MAX)

    async def list_step_ups(
        self,
        principal_id: str,
        status: str | None = None,
        *,
        limit: int = LIST_PAGE_MAX,
        cursor: str | None = None,
    ) -> RowPage:
        """One page of the human's step-ups in (created_at, id) order: at most ``limit``,
        after ``cursor`` (the ``next`` of the page before)."""
        _check_list_limit(limit)
        after = None if cursor is None else _created_position(cursor)
        beyond = "" if after is None else _AFTER_CREATED.format(t="s", n=4, m=5)
        rows = await self.pool.fetch(
            f"{_STEP_UP_SELECT} WHERE a.principal_id = $1"
            f" AND ($2::text IS NULL OR {_STEP_UP_STATUS} = $2){beyond}"
            " ORDER BY s.created_at, s.id LIMIT $3",
            principal_id,
            status,
            limit + 1,  # one past the page says whether another follows
            *(after or ()),
        )
        return _row_page(rows, limit, lambda r: _step_up_view(r, for_agent=False))

    async def step_up_begin(self, principal_id: str, step_id: str) -> dict[str, Any]:
        row = await self.pool.fetchrow(_STEP_UP_SELECT + " WHERE s.id = $1", step_id)
        if row is None or not _may_see(row, principal_id, None):
            raise NotFound("no such step-up")
        _still_pending(row["status"], "step-up")
        _still_usable(row)
        document = json.loads(row["document"])
        challenge = _sha256(canonical_json(document))
        options = await self._assertion_options(
            principal_id, challenge, purpose="approve_step_up", subject_id=step_id
        )
        return {"step_up": document, "options": options}

    async def step_up_finish(
        self, principal_id: str, step_id: str, credential: dict[str, Any]
    ) -> dict[str, Any]:
        ref = "sur_" + secrets.token_urlsafe(24)
        async with self._tx() as conn:
            row = await conn.fetchrow(
                _STEP_UP_SELECT + " WHERE s.id = $1" + _APPROVAL_LOCKS_STEP_UP, step_id
            )
            if row is None or row["principal_id"] != principal_id:
                raise NotFound("no such step-up")
            challenge, _ = await self._consume_challenge(
                conn,
                credential,
                purpose="approve_step_up",
                principal_id=principal_id,
                subject_id=step_id,
            )
            _still_pending(row["status"], "step-up")
            _still_usable(row)  # since the approval began: nothing is consumed
            if challenge != _sha256(row["document"].encode()):
                raise InvalidReceipt(
                    "challenge does not match the transaction", reason="challenge_mismatch"
                )
            _, receipt = await self._verify_assertion(conn, credential, challenge, principal_id)
            await conn.execute(
                "UPDATE step_ups SET status = 'approved', approval_ref = $2, receipt = $3,"
                " decided_at = now() WHERE id = $1",
                step_id,
                ref,
                receipt.model_dump(mode="json", exclude_none=True),
            )
            await self._audit(
                conn,
                event="step_up.approved",
                actor=f"human:{principal_id}",
                subject=f"step_up:{step_id}",
                key=row["agent_id"],
                agent_id=row["agent_id"],
                grant_id=row["grant_id"],
                data={"receipt_hash": receipt.digest()},
            )
            return await self.get_step_up(step_id, principal_id=principal_id, conn=conn)

    async def step_up_deny(self, principal_id: str, step_id: str) -> dict[str, Any]:
        async with self._tx() as conn:
            row = await conn.fetchrow(_STEP_UP_SELECT + " WHERE s.id = $1 FOR UPDATE OF s", step_id)
            if row is None or row["principal_id"] != principal_id:
                raise NotFound("no such step-up")
            _still_pending(row["status"], "step-up")
            await conn.execute(
                "UPDATE step_ups SET status = 'denied', decided_at = now() WHERE id = $1", step_id
            )
            await self._audit(
                conn,
                event="step_up.denied",
                actor=f"human:{principal_id}",
                subject=f"step_up:{step_id}",
                key=row["agent_id"],
                agent_id=row["agent_id"],
                grant_id=row["grant_id"],
            )
            return await self.get_step_up(step_id, principal_id=principal_id, conn=conn)

    # --- audit views ---------------------------------------------------------------------

    async def audit_events(
        self,
        *,
        principal_id: str | None,
        admin: bool,
        agent_id: str | None,
        grant_id: str | None,
        limit: int = AUDIT_PAGE_MAX,
        cursor: str | None = None,
        newest_first: bool = False,
    ) -> EventPage:
        """One page of an agent's or a grant's events in (time_ms, chain, seq) order, or the
        reverse with ``newest_first``: at most ``limit``, starting after ``cursor`` (the
        ``next`` of the page before, if any)."""
        if agent_id is None and grant_id is None:
            raise InvalidRequest("give agent_id or grant_id", reason="missing_filter")
        if not 1 <= limit <= AUDIT_PAGE_MAX:
            raise InvalidRequest(f"limit must be 1 to {AUDIT_PAGE_MAX}", reason="bad_limit")
        after = None if cursor is None else _cursor_position(cursor)
        # A cursor carries no authority, only a place in the order: every page is authorized
        # here as the first was, and the query below names the filter again, so a cursor
        # made from (or forged after) another person's listing only says where to start in
        # the caller's own.
        if not admin:
            # Each id named must be the caller's (until 2026-11-30 a grant named beside an
            # agent went unchecked; no event could match both, but the rule is the rule).
            owners = [
                await self.pool.fetchval(query, named)
                for query, named in (
                    ("SELECT principal_id FROM agents WHERE id = $1", agent_id),
                    ("SELECT principal_id FROM grants WHERE id = $1", grant_id),
                )
                if named is not None
            ]
            if principal_id is None or any(owner != principal_id for owner in owners):
                raise NotFound("nothing to show")
        named = [v for v in (agent_id, grant_id) if v is not None]
        sql = audit_page_sql(
            agent=agent_id is not None,
            grant=grant_id is not None,
            after=after is not None,
            newest_first=newest_first,
        )
        # One row past the page says whether another follows, so the last page has no next.
        rows = await self.pool.fetch(sql, *named, *(after or ()), limit + 1)
        page = rows[:limit]
        last = page[-1] if len(rows) > limit else None
        return EventPage(
            events=[json.loads(r["body"]) for r in page],
            next=None if last is None else _cursor(last["time_ms"], last["chain"], last["seq"]),
        )

    async def audit_inclusion(
        self,
        chain: str,
        seq: int,
        *,
        admin: bool = False,
        principal_id: str | None = None,
        agent_id: str | None = None,
        provider_id: str | None = None,
    ) -> dict[str, Any]:
        """An event with its inclusion proof, for whoever may read that event: the admin;
        the human owning its agent or grant; the agent itself; the provider of its grant.
        Anyone else gets the same 404 as for no event at all (events name people, keys and
        amounts; their ids are dense, so an open door here would be the whole log)."""
        async with self.pool.acquire() as conn:
            if not admin:
                row = await conn.fetchrow(
                    "SELECT a.principal_id AS agent_owner, e.agent_id,"
                    " g.principal_id AS grant_owner, g.agent_id AS grant_agent, g.provider_id"
                    " FROM audit_events e LEFT JOIN agents a ON a.id = e.agent_id"
                    " LEFT JOIN grants g ON g.id = e.grant_id WHERE e.chain = $1 AND e.seq = $2",
                    chain,
                    seq,
                )
                if row is None or not _may_read_event(row, principal_id, agent_id, provider_id):
                    raise NotFound("no such event")
            result = await self.audit.inclusion(conn, chain, seq)
        if result is None:
            raise NotFound("no such event")
        return result

    async def latest_checkpoints(self) -> list[dict[str, Any]]:
        # One primary-key lookup a chain: DISTINCT ON read and sorted every checkpoint ever
        # made (a chain gains 8,640 a day), on each call of anyone who may call this.
        rows = await self.pool.fetch(
            "SELECT c.chain, c.size, c.signed, c.time FROM audit_heads h CROSS JOIN LATERAL"
            " (SELECT chain, size, signed, time FROM audit_checkpoints"
            " WHERE chain = h.chain ORDER BY size DESC LIMIT 1) c ORDER BY h.chain"
        )
        return [dict(r) for r in rows]

    async def audit_consistency(self, chain: str, first: int, second: int) -> dict[str, Any]:
        if not 0 < first <= second:
            # A question no proof answers, whatever is stored: a 400, not the 404 (and "no
            # checkpoints of those sizes") it got when both checkpoints exist.
            raise InvalidRequest("first must be between 1 and second", reason="bad_sizes")
        rows = await self.pool.fetch(
            "SELECT size, signed FROM audit_checkpoints WHERE chain = $1"
            " AND size = ANY($2::bigint[])",
            chain,
            [first, second],
        )
        found = {r["size"]: r["signed"] for r in rows}
        if first not in found or second not in found:
            raise NotFound("no checkpoints of those sizes")
        async with self.pool.acquire() as conn:
            proof = await self.audit.consistency(conn, chain, first, second)
        return {"chain": chain, "first": found[first], "second": found[second], "proof": proof}


@dataclass(frozen=True, slots=True)
class EventPage:
    """A page of audit events; ``next`` resumes after its last, None on the last page."""

    events: list[dict[str, Any]]
    next: str | None


@dataclass(frozen=True, slots=True)
class RowPage:
    """A page of a listing (step-ups, grant requests) in (created_at, id) order; ``next``
    resumes after its last row, None on the last page."""

    rows: list[dict[str, Any]]
    next: str | None


def _row_page(
    rows: Sequence[asyncpg.Record], limit: int, view: Callable[[asyncpg.Record], dict[str, Any]]
) -> RowPage:
    page = rows[:limit]
    return RowPage(
        rows=[view(r) for r in page],
        next=_created_cursor(page[-1]) if len(rows) > limit else None,
    )


def audit_page_sql(*, agent: bool, grant: bool, after: bool, newest_first: bool = False) -> str:
    """The query for one page of events: by agent, by grant or both (their ids first, in
    that order), after a position (time_ms, chain, seq) if ``after``, then the row limit.
    With ``newest_first`` the order is reversed, "after" meaning older than the position,
    and the same index is read backwards.
    Each shape is a statement of its own, without "$1 IS NULL OR ..." alternatives, which
    a generic plan (asyncpg prepares every statement) could serve from no index. The rows
    are read from the index on the agent's or the grant's id and time_ms (migration 0014),
    which the row comparison bounds on time_ms; the planner orders each millisecond's few
    events by (chain, seq) as it reads them: a page reads its own rows, not the whole
    history."""
    columns = [c for c, given in (("agent_id", agent), ("grant_id", grant)) if given]
    where = [f"{column} = ${n}" for n, column in enumerate(columns, start=1)]
    n = len(where)
    beyond, direction = ("<", " DESC") if newest_first else (">", "")
    if after:
        where.append(
            f"(time_ms, chain, seq) {beyond} (${n + 1}::bigint, ${n + 2}::text, ${n + 3}::bigint)"
        )
        n += 3
    order = ", ".join(f"{column}{direction}" for column in ("time_ms", "chain", "seq"))
    # Composed only of the column names, placeholder numbers and fixed words above.
    return (
        "SELECT chain, seq, time_ms, body FROM audit_events"  # noqa: S608
        f" WHERE {' AND '.join(where)} ORDER BY {order} LIMIT ${n + 1}"
    )


def _cursor(*position: int | str) -> str:
    """The opaque cursor after a row: its position, base64url JSON. Not signed: it grants
    nothing (every listing authorizes every page), and whoever edits one only moves where
    their own listing starts."""
    return b64url_encode(json.dumps(list(position), separators=(",", ":")).encode())


def _cursor_parts(cursor: str) -> list[Any] | None:
    """The list a cursor encodes, or None for anything else; never an error from the
    decoder, which sees only what is short enough."""
    value: object = None
    if len(cursor) <= _CURSOR_MAX:
        with suppress(InvalidRequest, ValueError):
            value = json.loads(b64url_decode(cursor))
    return value if isinstance(value, list) else None


def _is_int64(value: object) -> bool:
    return type(value) is int and -_INT64 - 1 <= value <= _INT64


def _is_identifier(value: object) -> bool:
    # As the database takes it: no NUL byte or lone surrogate for the driver to choke on.
    return (
        isinstance(value, str)
        and len(value) <= IDENTIFIER_MAX_LENGTH
        and _CHAIN_NAME.fullmatch(value) is not None
    )


def _cursor_position(cursor: str) -> tuple[int, str, int]:
    """The position a cursor names; InvalidRequest (400 bad_cursor) for anything that is not
    one made by ``_cursor``, never an error from the database or the decoder."""
    value = _cursor_parts(cursor)
    # Each part as the database takes it: a bigint, a chain's name, a bigint.
    if (
        value is not None
        and len(value) == 3
        and all(_is_int64(v) for v in value[::2])
        and _is_identifier(value[1])
    ):
        return value[0], value[1], value[2]
    raise InvalidRequest("cursor is not one this listing gave", reason="bad_cursor")


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
# The times a row's created_at can be read as (years 1 to 9999), in microseconds since the
# epoch: a cursor naming another is none the listing gave, and the database would refuse
# to make a timestamp of it (a 500).
_CREATED_RANGE = range(
    (datetime.min.replace(tzinfo=UTC) - _EPOCH) // _MICROSECOND,
    (datetime.max.replace(tzinfo=UTC) - _EPOCH) // _MICROSECOND + 1,
)


def _created_cursor(row: asyncpg.Record) -> str:
    """The cursor after a step-up or grant request: its (created_at, id), the time in whole
    microseconds since the epoch, PostgreSQL's own resolution, so the position is exact."""
    return _cursor((row["created_at"] - _EPOCH) // _MICROSECOND, row["id"])


def _created_position(cursor: str) -> tuple[int, str]:
    """The (created_at in microseconds, id) a listing's cursor names; 400 bad_cursor for
    anything ``_created_cursor`` did not make, as _cursor_position."""
    value = _cursor_parts(cursor)
    if (
        value is not None
        and len(value) == 2
        and type(value[0]) is int
        and value[0] in _CREATED_RANGE
        and _is_identifier(value[1])
    ):
        return value[0], value[1]
    raise InvalidRequest("cursor is not one this listing gave", reason="bad_cursor")


def _check_list_limit(limit: int) -> None:
    if not 1 <= limit <= LIST_PAGE_MAX:
        raise InvalidRequest(f"limit must be 1 to {LIST_PAGE_MAX}", reason="bad_limit")


# After a listing's cursor: rows later in (created_at, id) order than the position, the
# time given in microseconds since the epoch. An interval is multiplied as a double, exact
# only below 2**53: whole seconds and the microseconds left are each well under it, so the
# time is exact over the whole range a cursor may name. {t} is the table's alias, {n} and
# {m} the placeholders' numbers.
_AFTER_CREATED = (
    " AND ({t}.created_at, {t}.id) > ('epoch'::timestamptz"
    " + ${n}::bigint / 1000000 * interval '1 second'"
    " + ${n}::bigint % 1000000 * interval '1 microsecond', ${m}::text)"
)


def _may_read_event(
    row: asyncpg.Record, principal_id: str | None, agent_id: str | None, provider_id: str | None
) -> bool:
    if principal_id is not None:
        return principal_id in (row["agent_owner"], row["grant_owner"])
    if agent_id is not None:
        return agent_id in (row["agent_id"], row["grant_agent"])
    return provider_id is not None and provider_id == row["provider_id"]


# A grant request nobody answered within grant_request_ttl ($2 of every query using this)
# is "expired": it can no longer be approved, so a human is never asked weeks later about
# what an agent wanted then. Computed, not stored, as for step-ups below.
# One whose agent was disabled meanwhile is "cancelled": nobody is asked to approve for it.
_REQUEST_STATUS = (
    "CASE WHEN r.status = 'pending'"
    " AND r.created_at <= now() - make_interval(secs => $2::double precision)"
    " THEN 'expired' WHEN r.status = 'pending' AND a.status = 'disabled' THEN 'cancelled'"
    " ELSE r.status END"
)
# An enrollment code that can still register an agent (register_agent).
_ENROLLMENT_USABLE = (
    "SELECT 1 FROM enrollments WHERE code_hash = $1 AND used_at IS NULL AND expires_at > now()"
)
# Whether grant ``g`` is revoked, itself or through its agent (disabling an agent records an
# agent revocation). Used by token issuance, before signing and again when recording.
_GRANT_REVOKED = (
    "(g.revoked_at IS NOT NULL OR EXISTS (SELECT 1 FROM revocations v"
    " WHERE (v.kind = 'grant' AND v.target = g.id)"
    " OR (v.kind = 'agent' AND v.target = g.agent_id)))"
)
# Whether a grant still stands, read again once its rows are locked (issue_token).
_GRANT_STANDING_NOW = (
    # Only the constant _GRANT_REVOKED is joined in.
    f"SELECT {_GRANT_REVOKED} AS revoked,"  # noqa: S608
    " p.suspended_at IS NOT NULL AS provider_suspended"
    " FROM grants g JOIN providers p ON p.id = g.provider_id WHERE g.id = $1"
)

_REQUEST_SELECT = (
    # Only the constant above is joined in.
    "SELECT r.id, r.agent_id, r.provider_id, r.capabilities, r.envelope,"  # noqa: S608
    f" {_REQUEST_STATUS} AS status,"
    " r.created_at, r.decided_at, a.principal_id, a.name AS agent_name,"
    " p.audience, p.display_name AS provider_name, g.id AS grant_id,"
    " p.suspended_at IS NOT NULL AS provider_suspended, a.status AS agent_status,"
    " false AS grant_revoked,"
    # The grant it would become expires with the envelope's expires_at (on the database's
    # clock, as a step-up's grant): past it, no token of it could be used.
    " coalesce((r.envelope->>'expires_at')::bigint <= extract(epoch FROM now()), false)"
    " AS grant_expired"
    " FROM grant_requests r JOIN agents a ON a.id = r.agent_id"
    " JOIN providers p ON p.id = r.provider_id LEFT JOIN grants g ON g.request_id = r.id"
)

# A grant's verify.allow events after a time in ms (grant_usage): one rate limit's use.
_ALLOWS_SINCE = (
    "SELECT count(*) FROM audit_events WHERE grant_id = $1 AND event = 'verify.allow'"
    " AND time_ms > $2"
)
# A grant's allows and denies after a time in ms, per hour (grant_usage's series). An allow
# whose provider was told state_timeout instead (a verify.void names it, docs/verifier.md)
# counts against the limits, as in the shard, but shows as denied.
_HOURLY_DECISIONS = (
    "SELECT e.time_ms / 3600000 * 3600 AS hour,"
    " count(*) FILTER (WHERE e.event = 'verify.allow' AND v.voids IS NULL) AS allow,"
    " count(*) FILTER (WHERE e.event = 'verify.deny' OR v.voids IS NOT NULL) AS deny"
    " FROM audit_events e LEFT JOIN (SELECT DISTINCT body::jsonb -> 'data' ->> 'voids' AS voids"
    " FROM audit_events WHERE grant_id = $1 AND event = 'verify.void' AND time_ms > $2) v"
    " ON e.event = 'verify.allow' AND v.voids = e.chain || ':' || e.seq"
    " WHERE e.grant_id = $1 AND e.event IN ('verify.allow', 'verify.deny') AND e.time_ms > $2"
    " GROUP BY 1 ORDER BY 1"
)

# Per human: passkey_finish takes it shared, recovery_finish exclusive (see there).
_PASSKEYS_ADDED_LOCK = "SELECT pg_advisory_xact_lock(hashtext('psk:' || $1))"
_PASSKEYS_ADDED_LOCK_SHARED = "SELECT pg_advisory_xact_lock_shared(hashtext('psk:' || $1))"
_SWEEP_LOCK = "SELECT pg_try_advisory_xact_lock(hashtext('agentauth:sweep'))"
_ANONYMOUS_CHALLENGES_LOCK = (
    "SELECT pg_advisory_xact_lock(hashtext('agentauth:anonymous-challenges'))"
)
_SWEEPS = (
    "DELETE FROM webauthn_challenges WHERE expires_at < now()",
    "DELETE FROM sessions WHERE expires_at < now()",
    "DELETE FROM enrollments WHERE expires_at < now()",
    "DELETE FROM recoveries WHERE expires_at < now()",
    # A token a day past its expiry needs no revoking (verifiers refuse it as expired); its
    # row only served to find the owner of a revocation. Its audit events stay.
    "DELETE FROM issued_tokens WHERE expires_at < (extract(epoch FROM now()) - 86400)::bigint",
    # After the line above: a token revocation whose token's record has gone is about a
    # token that expired a day ago, which every verifier refuses as expired (a token is
    # recorded in the transaction that issues it, and only a recorded one can be revoked).
    # Verifiers read only revocations younger than the longest a token lives, and providers
    # resume GET /v1/revocations by seq, so neither misses a live one. A day's age as well:
    # a row some other writer (the command line, by hand) added for an unrecorded jti is
    # kept that long. Grant and agent revocations stay: token issuance reads them forever.
    "DELETE FROM revocations v WHERE v.kind = 'token' AND v.revoked_at < now() - interval '1 day'"
    " AND NOT EXISTS (SELECT 1 FROM issued_tokens t WHERE t.jti = v.target)",
    # A spent step-up approval needs remembering only while it could be used again: the
    # verifier refuses one past its step-up's expires_at anyway (_step_up_valid). A day
    # later, so no verifier's clock can be behind enough to take it as live.
    "DELETE FROM verifier_step_up_uses u USING step_ups s WHERE s.approval_ref = u.approval_ref"
    " AND s.expires_at < (extract(epoch FROM now()) - 86400)::bigint",
    # A step-up nobody answered before it expired can never be approved: an agent may leave
    # max_pending_step_ups of them per grant every step_up_ttl, and each is a row every
    # listing of its human's step-ups returns. Kept 30 days past expiry so that
    # its agent and human still read "expired" for a while; its step_up.requested audit
    # event stays. (No approval was given, so no verifier_step_up_uses row names it.) Asked
    # that long ago too: one whose expiry was set back by hand still reads "expired" a while.
    "DELETE FROM step_ups WHERE status = 'pending'"
    " AND expires_at < (extract(epoch FROM now() - interval '30 days'))::bigint"
    " AND created_at < now() - interval '30 days'",
)
# A grant request unanswered within grant_request_ttl ($1) is expired (_REQUEST_STATUS):
# an agent may leave max_pending_grant_requests of them every ttl. Deleted 30 days
# later, as step-ups are; never one a grant was made from (none is, while pending: the
# approval changes both in one transaction), which the foreign key would refuse, failing
# every sweep.
_SWEEP_UNANSWERED_REQUESTS = (
    "DELETE FROM grant_requests r WHERE r.status = 'pending'"
    " AND r.created_at < now() - make_interval(secs => $1::double precision)"
    " - interval '30 days'"
    " AND NOT EXISTS (SELECT 1 FROM grants g WHERE g.request_id = r.id)"
)

# A grant with its receipt, and whether its provider is suspended (nothing works for it
# then; the page says so instead of offering what the registry would refuse).
_GRANT_SELECT = (
    "SELECT g.id, g.agent_id, g.principal_id, g.provider_id, g.document, g.grant_hash,"
    " g.created_at, g.revoked_at, r.receipt, r.receipt_hash,"
    " p.suspended_at IS NOT NULL AS provider_suspended FROM grants g"
    " JOIN approval_receipts r ON r.grant_id = g.id JOIN providers p ON p.id = g.provider_id"
)

# A step-up left pending past its deadline is "expired": no approval of it could be used
# (the verifier refuses it), so none is taken. Computed, not stored: nothing has to run at
# the deadline for every reader to agree.
# One whose grant was revoked or is over, or whose agent was disabled, meanwhile is
# "cancelled": no payment could use its approval any more (a suspended provider may be
# reinstated, so that one stays pending).
_STEP_UP_STATUS = (
    "CASE WHEN s.status = 'pending' AND s.expires_at <= extract(epoch FROM now())"
    " THEN 'expired' WHEN s.status = 'pending' AND (g.revoked_at IS NOT NULL"
    " OR g.expires_at <= extract(epoch FROM now()) OR a.status = 'disabled')"
    " THEN 'cancelled' ELSE s.status END"
)

# A step-up with its agent's owner and whether its grant's provider is suspended.
_STEP_UP_SELECT = (
    # Only the constant above is joined in.
    "SELECT s.id, s.grant_id, s.agent_id, s.document, s.approval_ref, s.expires_at,"  # noqa: S608
    " s.created_at,"
    f" {_STEP_UP_STATUS} AS status,"
    " a.principal_id, p.suspended_at IS NOT NULL AS provider_suspended,"
    " a.status AS agent_status, g.revoked_at IS NOT NULL AS grant_revoked,"
    " coalesce(g.expires_at <= extract(epoch FROM now()), false) AS grant_expired FROM step_ups s"
    " JOIN agents a ON a.id = s.agent_id JOIN grants g ON g.id = s.grant_id"
    " JOIN providers p ON p.id = g.provider_id"
)

# What an approval's finish locks (the request or step-up, and shared, the rows whose state
# _still_usable reads), so that disabling the agent, suspending the provider or revoking
# the grant either commits before it, and is seen (the locked rows are read as committed,
# not as of the statement's start), or waits for the approval and then covers what it
# made. Without the shared locks a disable could commit between that read and the
# approval's commit: a receipt for something no token could use.
# Lock order, kept by every writer: these rows (agent, grant, provider, request, step-up)
# before any audit chain head, provider_changes or revocation_log row. Each writer that
# locks one of them exclusively (disable_agent: the agent; revoke: the grant; a provider's
# suspension, reinstatement and credential changes: the provider) locks only that one
# before the counters, and those who lock several (token issuance: grant and agent; these
# finishes) share them, so no two wait for each other in opposite orders.
_APPROVAL_LOCKS_REQUEST = " FOR UPDATE OF r FOR SHARE OF a, p"
_APPROVAL_LOCKS_STEP_UP = " FOR UPDATE OF s FOR SHARE OF a, g, p"


async def _hold_agent(conn: Conn, agent: Agent) -> None:
    """Refuse an agent disabled since it authenticated, and keep it from being disabled
    until this transaction ends: disable_agent locks the row FOR UPDATE, so one that
    committed first is seen here, and one that comes later finds what this one wrote."""
    status = await conn.fetchval("SELECT status FROM agents WHERE id = $1 FOR SHARE", agent.id)
    if status != "active":
        raise Forbidden("the agent is disabled", reason="agent_disabled")


async def _hold_step_up_grant(conn: Conn, grant_id: str) -> None:
    """Refuse a step-up whose grant was revoked, or whose provider was suspended, after the
    request read them, and keep both so until this transaction ends. The request's first
    read is unlocked: a revocation committed between it and this insert left a step-up
    row and a ``step_up.requested`` event behind an answer of 200 ("cancelled") for a
    grant already dead. Shared locks, taken after the agent's, as every approval takes
    them (see _APPROVAL_LOCKS_STEP_UP): revoke and a suspension each lock one of these
    rows exclusively and then wait for nothing this transaction holds."""
    row = await conn.fetchrow(
        "SELECT g.revoked_at IS NOT NULL AS revoked,"
        " p.suspended_at IS NOT NULL AS provider_suspended"
        " FROM grants g JOIN providers p ON p.id = g.provider_id WHERE g.id = $1"
        " FOR SHARE OF g, p",
        grant_id,
    )
    if row is None:  # read a moment ago; grants are never deleted
        raise NotFound("no such grant")
    if row["revoked"]:
        raise Forbidden("the grant is revoked", reason="grant_revoked")
    if row["provider_suspended"]:
        raise Forbidden("the grant's provider is suspended", reason="provider_suspended")


def _still_pending(status: str, what: str) -> None:
    """Refuse to decide a request or step-up that is decided already or expired (409, each
    with its reason)."""
    if status == "expired":
        raise Conflict(f"the {what} expired unanswered", reason="expired")
    # "cancelled" is still undecided: an approval is refused by _still_usable, with the
    # reason (agent disabled, grant revoked or over), and a refusal may still be recorded.
    if status not in ("pending", "cancelled"):
        raise Conflict(f"the {what} was already decided", reason="not_pending")


async def _passkey_ids(conn: Conn | asyncpg.Pool, principal_id: str) -> list[str]:
    """The ids of the human's passkeys (not removed)."""
    rows = await conn.fetch(
        "SELECT credential_id FROM passkey_credentials WHERE principal_id = $1"
        " AND removed_at IS NULL",
        principal_id,
    )
    return [r["credential_id"] for r in rows]


async def _descriptors(
    conn: Conn | asyncpg.Pool, principal_id: str
) -> list[PublicKeyCredentialDescriptor]:
    """The human's passkeys as WebAuthn options name them (to use, or not to register twice)."""
    ids = await _passkey_ids(conn, principal_id)
    return [PublicKeyCredentialDescriptor(id=base64url_to_bytes(i)) for i in ids]


def _same_origin_frame(credential: dict[str, Any]) -> None:
    """Refuse a registration made in a cross-origin frame, or over Token Binding, by the
    rules assertions are held to (agentauth.protocol's verifier); py_webauthn ignores
    crossOrigin and topOrigin, and takes any tokenBinding "present" unchecked."""
    try:
        client_data = strict_json_loads(
            base64url_to_bytes(credential["response"]["clientDataJSON"])
        )
    except (KeyError, TypeError, ValueError, InvalidRequest):
        raise InvalidReceipt("malformed WebAuthn credential", reason="malformed") from None
    if not isinstance(client_data, dict):
        raise InvalidReceipt("malformed WebAuthn credential", reason="malformed")
    check_top_level_frame(client_data, "registration")
    check_token_binding(client_data, "registration")


def _checked_user_handle(given: object, *, owner: str, required: bool) -> str | None:
    """The assertion's userHandle, checked (WebAuthn §7.2 step 6): when present it must be
    the handle the passkey was registered with (its owner's principal id), since receipts
    carry it as the approver; a discoverable sign-in must carry one. Returned canonical."""
    if given is None or given == "":
        if required:
            raise InvalidReceipt(
                "a sign-in without a user handle is refused", reason="user_handle_missing"
            )
        return None
    if not isinstance(given, str):
        raise InvalidReceipt("malformed WebAuthn credential", reason="malformed")
    try:
        handle = b64url_decode(given)
    except InvalidRequest:
        raise InvalidReceipt("malformed WebAuthn credential", reason="malformed") from None
    if not hmac.compare_digest(handle, owner.encode()):
        raise InvalidReceipt(
            "the assertion's user handle is not the passkey's owner", reason="user_handle_mismatch"
        )
    return b64url_encode(handle)


def _counter_regressed(*, stored: int, presented: int) -> bool:
    """WebAuthn §7.2 step 21: a counter that does not move forward, unless both are 0 (an
    authenticator without a counter), is a sign of a cloned authenticator."""
    return (presented != 0 or stored != 0) and presented <= stored


def _backup_eligibility_changed(*, stored: bool | None, presented: bool) -> bool:
    """WebAuthn L3 §6.1.3: BE is fixed when the credential is created and never changes, so
    an assertion whose BE differs from the recorded one is refused (whatever made it, it
    is not the authenticator that stored this credential behaving as WebAuthn says). None:
    registered before BE was stored; this assertion is the first to record it."""
    return stored is not None and stored != presented


def _backup_eligibility_refused(
    credential_id: str, principal_id: str, *, presented: bool
) -> BackupEligibilityChanged:
    """The refusal of a signed assertion whose BE is not the recorded one, logged. The
    caller's transaction rolls back; _tx then records the refusal alone. Who, not which
    passkey: the log carries no passkey material (the audit event does)."""
    log.warning("refused a passkey assertion whose BE flag changed (%s)", principal_id)
    return BackupEligibilityChanged(credential_id, principal_id, presented)


def _invalid_backup_flags() -> InvalidReceipt:
    """BS (backed up) with BE (may be backed up) clear, which WebAuthn L3 §7.1 and §7.2
    refuse: no authenticator backs up what cannot be."""
    return InvalidReceipt(
        "the passkey says it is backed up but cannot be backed up", reason="invalid_backup_flags"
    )


# The human's passkeys (not removed), each with whether it is flagged.
_PASSKEYS_FLAGGED = (
    "SELECT credential_id, flagged_at IS NOT NULL AS flagged FROM passkey_credentials"
    " WHERE principal_id = $1 AND removed_at IS NULL"
)


def _flagged_by_id(rows: Sequence[asyncpg.Record]) -> dict[str, bool]:
    return {r["credential_id"]: r["flagged"] for r in rows}


def _removable(flagged: Mapping[str, bool], credential_id: str) -> None:
    """Refuse to remove a passkey that is not the human's, or the last one that can still
    sign: a flagged passkey is refused for good, so keeping only flagged ones would lock
    the person out until the admin issues a recovery code."""
    if credential_id not in flagged:
        raise NotFound("no such passkey")
    if not any(not f for i, f in flagged.items() if i != credential_id):
        raise Conflict("the last passkey cannot be removed", reason="last_passkey")


def _same_payment(asked: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """Whether two step-up documents ask for the same payment (their ids and deadlines
    aside): grant, resource, amount, currency and payee (absent and absent alike)."""
    fields = ("grant_id", "resource", "amount", "currency", "payee")
    return all(asked.get(field) == new.get(field) for field in fields)


# An audit subject has at most 256 characters (AuditEvent.subject, as every reader of a
# chain holds events to), so "passkey:" leaves 248 for the id, 186 bytes; registration
# takes ids up to WebAuthn's 1023 bytes (_MAX_CREDENTIAL_ID_BYTES).
_PASSKEY_SUBJECT_ID_CHARS = AUDIT_NAME_MAX_LENGTH - len("passkey:")


def _passkey_subject(credential_id: str) -> str:
    """The audit subject naming a passkey: ``passkey:<its id>``, or for an id longer than a
    subject holds, ``passkey-sha256:<SHA-256 of the id as stored, base64url>``, one name
    no id spells (an id has no ":"). Until 2026-12-01 the event naming such a passkey
    failed its request (400): a human whose passkey had a long id could never sign in
    again, nor add or remove one, nor be recovered from losing it."""
    if len(credential_id) <= _PASSKEY_SUBJECT_ID_CHARS:
        return f"passkey:{credential_id}"
    return f"passkey-sha256:{b64url_encode(_sha256(credential_id))}"


# A provider's credentials as authentication compares them: both hashes, whether the
# previous one is inside its overlap, and whether the provider is suspended.
_PROVIDER_CREDENTIALS = (
    "SELECT secret_hash, previous_secret_hash, previous_expires_at > now() AS overlap,"
    " suspended_at IS NOT NULL AS suspended FROM providers"
)


def _credential_standing(row: asyncpg.Record | None, given: bytes) -> bool:
    """Whether ``given`` (a secret's SHA-256) is the provider's current credential (True) or
    its previous one inside the overlap (False); anything else is 401, and a suspended
    provider 403 once the secret is right. Both hashes are compared every time, against
    dummies when absent, so the time taken reveals neither whether the id exists nor which
    credential matched."""
    current = bytes(row["secret_hash"]) if row else _sha256(secrets.token_bytes(16))
    previous = (
        bytes(row["previous_secret_hash"])
        if row and row["previous_secret_hash"] is not None
        else _sha256(secrets.token_bytes(16))
    )
    is_current = hmac.compare_digest(given, current)
    is_previous = hmac.compare_digest(given, previous)
    if row is None or not (is_current or (is_previous and row["overlap"])):
        raise Unauthenticated("bad provider credential", reason="bad_provider_credential")
    if row["suspended"]:
        raise Forbidden("the provider is suspended", reason="provider_suspended")
    return is_current


def _stored_grant(document: dict[str, Any]) -> Grant:
    """A grant as stored at its approval. One approved under a rule refused since (a
    resource named in a form no longer accepted, docs/protocol.md) parses no more: that is
    no fault of the request naming it, so it is a 403 ``grant_unusable``, not a 400."""
    try:
        return Grant.from_document(document)
    except ValueError:
        raise Forbidden(
            "the grant was approved in a form no longer accepted: ask for it again",
            reason="grant_unusable",
        ) from None


def _still_usable(row: asyncpg.Record) -> None:
    """Refuse (409) to approve what no token could use: a request or step-up whose agent is
    disabled, whose grant is revoked or expired, or whose provider is suspended. Nothing is
    signed for it, so no receipt says a human approved something dead."""
    if row["agent_status"] != "active":
        raise Conflict("the agent is disabled", reason="agent_disabled")
    if row["grant_revoked"]:
        raise Conflict("the grant is revoked", reason="grant_revoked")
    if row["grant_expired"]:
        raise Conflict("the grant has expired", reason="grant_expired")
    if row["provider_suspended"]:
        raise Conflict("the provider is suspended", reason="provider_suspended")


# A token's size is known before it is signed: what is signed plus "." and the signature,
# 64 bytes for both algorithms the key backends sign with (ES256 as raw r||s, Ed25519),
# 86 characters of base64url.
_SIGNATURE_CHARS = 86
_TOKEN_POLICY = TokenPolicy()
# The longest of what a token carries beside its grant, for the bound on a grant before it
# is signed: every key backend names its key by its RFC 7638 thumbprint (43 characters),
# "Ed25519" is the longer alg name, a jti may have 64 characters (the registry mints 32),
# jkt and receipt hash are 43 characters, and times are reckoned at the latest expiry.
_LONGEST_KID = "k" * 43
_LONGEST_ALG = "Ed25519"
_LONGEST_JTI = "j" * 64
_SHA256_B64 = "h" * 43


def _compact_size(signing_input: bytes) -> int:
    """The size of the compact JWS made by signing ``signing_input``."""
    return len(signing_input) + 1 + _SIGNATURE_CHARS


def _check_token_size(grant: Grant, *, issuer: str) -> None:
    """Refuse (400 invalid_request, reason ``grant_too_large``) a grant whose access tokens
    could be larger than ``TokenPolicy.max_token_bytes``: every verifier refuses those
    (``token_too_large``), so the human would approve a grant no token can use. Reckoned
    with the real minting code and the longest values issuance can put beside the grant."""
    header, claims = access_token_parts(
        kid=_LONGEST_KID,
        alg=_LONGEST_ALG,
        issuer=issuer,
        grant=grant,
        jkt=_SHA256_B64,
        receipt_hash=_SHA256_B64,
        now=MAX_EXPIRES_AT,
        lifetime=_TOKEN_POLICY.max_lifetime,
        jti=_LONGEST_JTI,
    )
    size = _compact_size(signing_input(header, claims))
    if size > _TOKEN_POLICY.max_token_bytes:
        raise InvalidRequest(
            f"the grant's access tokens would be up to {size} bytes, over the"
            f" {_TOKEN_POLICY.max_token_bytes} every verifier accepts: ask for fewer"
            " capabilities, shorter resources or fewer limits",
            reason="grant_too_large",
        )


def _money_currencies(envelope: Envelope) -> set[str]:
    """The currencies of an envelope's money rules (limits, threshold, spend caps)."""
    rules = (envelope.max_per_transaction, envelope.step_up_threshold)
    return {m.currency for m in rules if m} | {cap.currency for cap in envelope.spend_limits}


def _check_currencies(capabilities: Sequence[Capability], envelope: Envelope) -> None:
    """Refuse (400 invalid_request, reason ``currency_mismatch``) money rules no payment
    could meet: the verifier refuses a payment in any currency but that of every money rule
    of the envelope, so rules in two currencies refuse every payment, and a transact
    capability capped in another currency allows none. Checked where grants are asked for
    and approved, not in ``Envelope``: grants stored before keep loading."""
    currencies = _money_currencies(envelope)
    if len(currencies) > 1:
        raise InvalidRequest(
            "envelope: max_per_transaction, step_up_threshold and spend_limits are in"
            f" {', '.join(sorted(currencies))}; every payment must meet them all, so they"
            " must share one currency",
            reason="currency_mismatch",
        )
    for i, capability in enumerate(capabilities):
        if (
            isinstance(capability, Transact)
            and capability.currency is not None
            and currencies
            and capability.currency not in currencies
        ):
            raise InvalidRequest(
                f"capabilities[{i}].currency: {capability.currency}, but the envelope's"
                f" limits are in {next(iter(currencies))}: no payment could meet both",
                reason="currency_mismatch",
            )


def _check_step_up_applies(grant: Grant, body: StepUpIn) -> None:
    """Refuse (403, reason ``step_up_not_applicable``) a step-up no payment of ``grant``
    could use, before it is put before the human: the grant must ask for step-ups (a
    threshold), the payment must be above that threshold and within every other limit,
    in the envelope's currency, and allowed by the grant's capabilities (resource, amount,
    currency, payee). Time windows and rate limits are left to the payment's moment."""
    envelope = grant.envelope
    threshold = envelope.step_up_threshold
    if threshold is None:
        why = "the grant asks for no step-up (it has no step_up_threshold)"
    elif any(currency != body.currency for currency in _money_currencies(envelope)):
        why = f"the grant's limits are in {threshold.currency}, not {body.currency}"
    elif body.amount <= threshold.amount:
        why = f"the amount is not above the grant's step-up threshold of {threshold.amount}"
    elif (cap := envelope.max_per_transaction) is not None and body.amount > cap.amount:
        why = f"the amount is above the grant's max_per_transaction of {cap.amount}"
    elif any(body.amount > spend.amount for spend in envelope.spend_limits):
        why = "the amount is above one of the grant's spend_limits on its own"
    elif not grant.allows(
        Action(
            kind="transact",
            resource=body.resource,
            amount=body.amount,
            currency=body.currency,
            payee=body.payee,
        )
    ):
        why = "the grant's capabilities do not allow this payment (resource, amount or payee)"
    else:
        return
    raise Forbidden(
        f"no payment under this grant could use this step-up: {why}",
        reason="step_up_not_applicable",
    )


def _may_see(row: asyncpg.Record, principal_id: str | None, agent: Agent | None) -> bool:
    return (principal_id is not None and row["principal_id"] == principal_id) or (
        agent is not None and row["agent_id"] == agent.id
    )


def _request_view(row: asyncpg.Record) -> dict[str, Any]:
    return _jsonable(
        {
            "id": row["id"],
            "agent_id": row["agent_id"],
            "agent_name": row["agent_name"],
            "provider_id": row["provider_id"],
            "provider_name": row["provider_name"],
            "audience": row["audience"],
            # Nothing can be approved for a suspended provider (docs/registry.md).
            "provider_suspended": row["provider_suspended"],
            "capabilities": row["capabilities"],
            "envelope": row["envelope"],
            "status": row["status"],
            "grant_id": row["grant_id"],
            "created_at": row["created_at"],
            "decided_at": row["decided_at"],
        }
    )


def _grant_view(row: asyncpg.Record) -> dict[str, Any]:
    view = _jsonable(dict(row))
    view["document"] = json.loads(row["document"])
    return view


def _step_up_view(row: asyncpg.Record, *, for_agent: bool) -> dict[str, Any]:
    view = {
        "id": row["id"],
        "grant_id": row["grant_id"],
        "agent_id": row["agent_id"],
        "status": row["status"],
        "document": json.loads(row["document"]),
        "expires_at": row["expires_at"],
        "provider_suspended": row["provider_suspended"],
    }
    # Only the agent receives the one-time reference it will present to the verifier.
    if for_agent and row["status"] == "approved":
        view["approval_ref"] = row["approval_ref"]
    return view


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if hasattr(value, "isoformat"):
            out[key] = value.isoformat()
        elif isinstance(value, bytes | memoryview):
            out[key] = b64url_encode(bytes(value))
        else:
            out[key] = value
    return out
