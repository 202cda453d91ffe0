"""The registry's signing keys: which kid signs now, which kids the JWKS publishes.

Key records live in PostgreSQL (``signing_keys``) so every replica agrees; private keys
stay in their backend. Rotation publishes the new kid ``key_publish_ahead`` seconds before
it signs anything, and keeps the old kid published until its last token has expired. Rows
are never deleted, so the audit key list (every kid with its signing window) can be served
from them for as long as checkpoints are kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any

import asyncpg

from .. import keys
from ..keys import AsyncSigner, KeyRecord, KeyRing, LocalFileSigner, SignerUnavailable
from ..protocol import AuditKey, AuditKeys, Conflict, PublicKey
from ..store import Conn
from ._settings import RegistrySettings

__all__ = ["KeyManager"]

_log = logging.getLogger("agentauth.registry")

# Replicas re-read key records this often, so a rotation reaches all of them well within
# the publish-ahead interval.
_REFRESH_S = 5.0
# Separates a Vault key's name from the version a kid names in a backend reference
# ("vault:registry#2"); a key name, a URL path segment, cannot hold it.
_VAULT_VERSION = "#"


async def _check_signs(signer: AsyncSigner) -> None:
    """Sign once and verify, before a new key's kid is recorded: its row is never deleted,
    and a kid whose signatures fail (a PKCS#11 label on a crossed key pair, whose public
    key object is another pair's) would be published, and once active would fail every
    token and checkpoint until another rotation activated. A kid already on record needs
    no such check: its key must match the record (``_open_kid``) and every signature is
    checked anyway."""
    probe = b"agentauth signing key check"
    if not signer.public_key().verify(await signer.sign(probe), probe):
        raise SignerUnavailable(
            "the key backend's signature does not verify under its public key",
            reason="bad_signature",
        )


async def _close_retired_signer(signer: AsyncSigner) -> None:
    try:
        await signer.aclose()
    except Exception as exc:  # logged; the request goes on with the current kid
        _log.warning("closing the signer of retired kid %s failed: %s", signer.kid, exc)


class KeyManager:
    def __init__(self, settings: RegistrySettings, pool: asyncpg.Pool) -> None:
        self._settings = settings
        self._pool = pool
        self._ring = KeyRing([])
        self._backends: dict[str, str] = {}
        self._signers: dict[str, AsyncSigner] = {}
        self._retiring: set[asyncio.Task[None]] = set()  # retired kids' closes
        self._loaded_at = 0.0
        # The open of a kid's backend under way, which every request needing that kid
        # awaits: one open per kid at a time, and no request waits for more than one.
        self._opening: dict[str, asyncio.Task[AsyncSigner]] = {}
        self._closed = False

    async def start(self, *, create: bool = True) -> None:
        """Load key records, creating the first key if there is none (unless ``create`` is
        false: then the ring stays empty until a start that may create it)."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('agentauth:keys'))")
            count = await conn.fetchval("SELECT count(*) FROM signing_keys")
            if count == 0 and create:
                signer = await self._create_signer()
                now = int(time.time())
                await self._insert(
                    conn, signer, backend=self._backend_ref(signer), at=now, activates=now
                )
                self._signers[signer.kid] = signer
        await self.refresh(force=True)

    def _backend_ref(self, signer: AsyncSigner) -> str:
        settings = self._settings.signer
        if settings.backend == "local":
            return f"local:{signer.kid}.pem"
        if isinstance(signer, keys.VaultTransitSigner):
            # A Transit key's name stays while Vault adds versions: the kid is one version.
            return f"vault:{settings.key_id}{_VAULT_VERSION}{signer.key_version}"
        if isinstance(signer, keys.AwsKmsSigner):
            # key_id may be an alias, which AWS's own rotation moves to a new key.
            return f"aws:{signer.key_ref}"
        return f"{settings.backend}:{settings.key_id}"

    async def _create_signer(self) -> AsyncSigner:
        settings = self._settings.signer
        if settings.backend != "local":
            signer = await self._open_backend(f"{settings.backend}:{settings.key_id}")
            try:
                await _check_signs(signer)
            except BaseException:
                with contextlib.suppress(SignerUnavailable):  # the check's error is the one
                    await signer.aclose()
                raise
            return signer
        # A new local key, written under its kid's name at once: a file renamed there
        # afterwards could lose that name in a crash while its kid's row stays committed.
        return LocalFileSigner.create_in(self._settings.data_dir / "keys", alg=settings.alg)

    async def _open_backend(self, ref: str) -> AsyncSigner:
        backend, _, name = ref.partition(":")
        s = self._settings.signer
        if backend == "local":
            path = self._settings.data_dir / "keys" / name
            # s.alg is for keys made from now on: a recorded key keeps its own algorithm.
            kid = name.removesuffix(".pem")
            alg = next((r.alg for r in self._ring.records if r.kid == kid), s.alg)
            # A recorded kid's key is loaded, never made: a new key written under the kid's
            # name would be a file that lies about its key (another machine made this one).
            if not os.path.lexists(path):
                raise SignerUnavailable(
                    f"no key file for kid {kid} in {path.parent}", reason="bad_key_file"
                )
            return LocalFileSigner.load_or_create(path, alg=alg)
        if backend == "aws":
            return await keys.AwsKmsSigner.open(
                name, region=s.region, endpoint_url=s.endpoint, message_type=s.aws_message_type
            )
        if backend == "gcp":
            return await keys.GcpKmsSigner.open(name, endpoint=s.endpoint)
        if backend == "vault":
            # Rows recorded before versions were: the latest version, as then.
            key_name, pinned, version = name.rpartition(_VAULT_VERSION)
            return await keys.VaultTransitSigner.open(
                key_name if pinned else name,
                key_version=int(version) if pinned else None,
                url=s.endpoint or "",
                token=s.vault_token,
                token_file=s.vault_token_file,
                allow_insecure_http=s.vault_allow_insecure_http,
            )
        if backend == "pkcs11":
            return await keys.Pkcs11Signer.open(
                lib_path=s.pkcs11_lib,
                token_label=s.pkcs11_token or "",
                pin=s.pkcs11_pin or "",
                key_label=name,
            )
        raise SignerUnavailable(f"unknown key backend {backend!r}")

    @staticmethod
    async def _insert(
        conn: Conn, signer: AsyncSigner, *, backend: str, at: int, activates: int
    ) -> None:
        jwk = dict(signer.public_key().jwk, kid=signer.kid, alg=signer.alg, use="sig")
        await conn.execute(
            "INSERT INTO signing_keys (kid, alg, public_jwk, backend, created_at, activates_at)"
            " VALUES ($1, $2, $3, $4, $5, $6)",
            signer.kid,
            signer.alg,
            jwk,
            backend,
            at,
            activates,
        )

    async def rotate(
        self,
        *,
        now: int | None = None,
        token_lifetime: int | None = None,
        publish_ahead: int | None = None,
    ) -> str:
        """Add a new key: published now, signing after the publish-ahead interval.

        ``token_lifetime`` is the longest a token the current key signs may live (default:
        these settings'): the current key stays published until such a token has expired.
        ``publish_ahead`` is how long the new key is published before it signs (default:
        these settings' ``key_publish_ahead``).
        """
        now = int(time.time()) if now is None else now
        lifetime = self._settings.token_lifetime if token_lifetime is None else token_lifetime
        ahead = self._settings.key_publish_ahead if publish_ahead is None else publish_ahead
        signer = await self._create_signer()
        try:
            await self._record_rotation(signer, now, lifetime, ahead)
        except Conflict:
            # Refused before anything was written (a rotation pending, the configured key
            # already in the ring): the key made for it is no one's. Only then, as after any
            # other failure the row may have committed, and its key file is then needed.
            await signer.aclose()
            if isinstance(signer, LocalFileSigner):
                signer.path.unlink(missing_ok=True)
            raise
        except BaseException:
            # The row may have committed, so the key stays (a replica opens it from the
            # record when it needs it); this handle goes, and a remote backend's client
            # with it, rather than leak.
            await signer.aclose()
            raise
        self._signers[signer.kid] = signer
        await self.refresh(force=True)
        return signer.kid

    async def _record_rotation(
        self, signer: AsyncSigner, now: int, token_lifetime: int, publish_ahead: int
    ) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('agentauth:keys'))")
            await self.refresh(force=True, conn=conn)
            activates = now + publish_ahead
            ring = self._ring.rotate(
                KeyRecord(
                    kid=signer.kid,
                    public_jwk=dict(signer.public_key().jwk),
                    alg=signer.alg,
                    created_at=now,
                    activates_at=activates,
                    retires_at=None,
                ),
                now=now,
                publish_ahead=publish_ahead,
                # The old key must outlive every token it signed, plus verifier leeway.
                max_token_lifetime=token_lifetime + 60,
            )
            await self._insert(
                conn, signer, backend=self._backend_ref(signer), at=now, activates=activates
            )
            for record in ring.records:
                await conn.execute(
                    "UPDATE signing_keys SET retires_at = $2 WHERE kid = $1",
                    record.kid,
                    record.retires_at,
                )

    async def refresh(self, *, force: bool = False, conn: Conn | None = None) -> None:
        if not force and time.monotonic() - self._loaded_at < _REFRESH_S:
            return
        query = (
            "SELECT kid, alg, public_jwk, backend, created_at, activates_at, retires_at"
            " FROM signing_keys ORDER BY activates_at, created_at"
        )
        rows = await (conn.fetch(query) if conn else self._pool.fetch(query))
        self._ring = KeyRing(
            [
                KeyRecord(
                    kid=r["kid"],
                    public_jwk=dict(r["public_jwk"]),
                    alg=r["alg"],
                    created_at=r["created_at"],
                    activates_at=r["activates_at"],
                    retires_at=r["retires_at"],
                )
                for r in rows
            ]
        )
        self._backends = {r["kid"]: r["backend"] for r in rows}
        self._loaded_at = time.monotonic()

    async def signer(self, now: float) -> AsyncSigner:
        """The signer for the key that signs at ``now``; raises ``SignerUnavailable``."""
        await self.refresh()
        kid = self._ring.signing_kid(int(now))
        self._close_retired(int(now))
        signer = self._signers.get(kid)
        if signer is not None:
            return signer
        # Not behind a lock, as opens were: with the backend down or hung, each request
        # queued there waited out the open of every request ahead of it, one timeout
        # each, so a token request could wait minutes. Now each waits for one open at most.
        opening = self._opening.get(kid)
        if opening is None:
            opening = self._opening[kid] = asyncio.ensure_future(self._open_kid(kid))
            opening.add_done_callback(lambda done: self._opened(kid, done))
        # Shielded: a request that gives up (its client went away) leaves the open to the
        # others, rather than cancel it under them.
        return await asyncio.shield(opening)

    def _close_retired(self, now: int) -> None:
        """Close the signers of kids retired at ``now``. Each rotation left the signer of
        the kid it retired open until the registry closed: one more backend client per
        rotation, and for Vault one more task renewing the token for good. A retired kid
        stopped signing ``token_lifetime`` + 60 s before it retired, so no request still
        holds its signer; one that asks for it later (a ``now`` in its window) opens it
        again. Closed in the background: a wedged backend's close (up to its timeout) must
        not hold the request that came across it, which signs under the current kid."""
        retired = [
            r.kid for r in self._ring.records if r.kid in self._signers and not r.published_at(now)
        ]
        for kid in retired:
            task = asyncio.get_running_loop().create_task(
                _close_retired_signer(self._signers.pop(kid))
            )
            self._retiring.add(task)  # held until done (the loop keeps only weak references)
            task.add_done_callback(self._retiring.discard)

    async def _open_kid(self, kid: str) -> AsyncSigner:
        signer = await self._open_backend(self._backends[kid])
        if signer.kid != kid:
            # Never sign under a kid whose published key is another key. The client
            # opened for it is closed: this repeats on every request.
            await signer.aclose()
            raise SignerUnavailable("the key backend holds a different key")
        if self._closed:  # closed while this open was under way: nobody would close it
            await signer.aclose()
            raise SignerUnavailable("the key manager is closed", reason="closed")
        self._signers[kid] = signer
        return signer

    def _opened(self, kid: str, done: asyncio.Task[AsyncSigner]) -> None:
        if self._opening.get(kid) is done:
            del self._opening[kid]  # the next request after a failed open tries again
        if not done.cancelled():
            done.exception()  # seen, even when every request awaiting it has given up

    def jwks(self, now: float) -> dict[str, Any]:
        return {"keys": self._ring.published(int(now))}

    def audit_keys(self) -> AuditKeys:
        """Every key ever recorded, retired ones included, each with its window: what a
        stored checkpoint may be signed by, and (as a document) the published audit key list.

        The ring holds every ``signing_keys`` row (``refresh`` reads them all), and a key
        signs checkpoints in the same window as tokens.
        """
        return AuditKeys(
            AuditKey(
                PublicKey.from_jwk({**r.public_jwk, "kid": r.kid}, alg=r.alg),
                activates_at=r.activates_at,
                retires_at=r.retires_at,
            )
            for r in self._ring.records
        )

    async def aclose(self) -> None:
        """Close every signer. One whose backend cannot close it (down, or wedged: a close
        waits behind the calls still stuck there) is logged and passed over: it must not
        keep the other signers open, nor the pool and Redis client the registry closes next.
        """
        self._closed = True
        if self._retiring:  # each logs its own failure and returns
            await asyncio.gather(*self._retiring)
        signers, self._signers = list(self._signers.values()), {}
        for signer in signers:
            try:
                await signer.aclose()
            except Exception as exc:  # logged; closing goes on
                _log.warning("closing the signer of kid %s failed: %s", signer.kid, exc)
