"""What every signer shares: the error, the async interface, key and signature conversions.

A remote signer (KMS, Vault, HSM) is trusted to hold a key, not to be right: each signature
it returns is checked against the public key cached at open time before anyone sees it, so
a misrouted key, a rotated key or a corrupted response can only ever cause a denial.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar, runtime_checkable

from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agentauth._events import wait_within
from agentauth._logs import Throttle
from agentauth.protocol import Algorithm, DependencyUnavailable, PublicKey, b64url_encode

__all__ = ["DEFAULT_TIMEOUT", "AsyncSigner", "RemoteSigner", "SignerUnavailable"]

_log = logging.getLogger("agentauth.keys")
_T = TypeVar("_T")
# A backend down fails every signing call (every token request, every checkpoint round)
# alike: each kind of failure is said at once, then at most every 30 s with the count held
# back. Keys are (backend, call, failure kind): class constants and exception types.
_said = Throttle(30.0)

#: Seconds a backend may take per call before the signer gives up. Token issuance waits on
#: this, so it is short: a KMS answers in tens of milliseconds when it is healthy.
DEFAULT_TIMEOUT = 2.0


class SignerUnavailable(DependencyUnavailable):
    """The signing key cannot be used right now; whatever needed a signature is denied."""

    error = "signer_unavailable"
    status_hint = 503
    default_description = "the signing key is unavailable"


@runtime_checkable
class AsyncSigner(Protocol):
    """A signing key behind some backend; ``sign`` returns the JWS-form signature.

    ``public_key()`` is the key cached at open time, its JWK carrying ``kid``; every
    signature ``sign`` returns verifies under it, or ``sign`` raises ``SignerUnavailable``.
    """

    @property
    def kid(self) -> str: ...

    @property
    def alg(self) -> Algorithm: ...

    def public_key(self) -> PublicKey: ...

    async def sign(self, data: bytes) -> bytes: ...

    async def aclose(self) -> None: ...


def public_key_with_kid(
    key: ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey, kid: str | None
) -> PublicKey:
    """The protocol's ``PublicKey`` for ``key``, named ``kid`` or by its RFC 7638 thumbprint."""
    members: dict[str, Any]
    if isinstance(key, ed25519.Ed25519PublicKey):
        raw = key.public_bytes(Encoding.Raw, PublicFormat.Raw)
        members = {"kty": "OKP", "crv": "Ed25519", "x": b64url_encode(raw)}
    elif isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        numbers = key.public_numbers()
        members = {
            "kty": "EC",
            "crv": "P-256",
            "x": b64url_encode(numbers.x.to_bytes(32, "big")),
            "y": b64url_encode(numbers.y.to_bytes(32, "big")),
        }
    else:
        raise SignerUnavailable("the backend key is not P-256 or Ed25519", reason="wrong_key_type")
    thumbprint = PublicKey.from_jwk(members).thumbprint
    return PublicKey.from_jwk({**members, "kid": kid or thumbprint})


def der_to_raw(der: bytes) -> bytes:
    """An ASN.1 DER ECDSA P-256 signature (what KMSs return) as JWS's raw 64-byte r||s."""
    try:
        r, s = decode_dss_signature(der)
    except ValueError:
        raise SignerUnavailable(
            "the backend returned a malformed signature", reason="bad_response"
        ) from None
    if not (0 < r < 2**256 and 0 < s < 2**256):
        raise SignerUnavailable("the backend returned a malformed signature", reason="bad_response")
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


# Each backend's blocking calls run in threads of its own. A call that times out keeps its
# thread until the client returns (a wedged HSM driver may never return): in the shared
# default pool, a few such calls would starve every other backend and every other
# to_thread user of the process; here they use up only their own backend's threads.
_POOL_THREADS = 4
_pools: dict[str, ThreadPoolExecutor] = {}


def _pool(backend: str) -> ThreadPoolExecutor:
    pool = _pools.get(backend)
    if pool is None:
        pool = _pools[backend] = ThreadPoolExecutor(
            _POOL_THREADS, thread_name_prefix=f"signer-{backend}"
        )
    return pool


async def preload(*modules: str) -> None:
    """Import a backend's client library in a thread, before its first bounded call.

    An import is local work the timeout of a call, sized for a backend's answer, is not
    meant to cover: google.cloud.kms_v1 or boto3 take 0.5-1.5 s to import on a quiet 2-core
    machine and past the 2 s default on a busy one, which failed a signer's first open as a
    backend timeout. A library that does not import is left for the bounded call, whose
    own import then fails as any other backend failure is said.
    """

    def load() -> None:
        for name in modules:
            try:
                importlib.import_module(name)
            except ImportError:
                return

    await asyncio.to_thread(load)


async def call_blocking(backend: str, what: str, timeout: float, fn: Callable[[], _T]) -> _T:
    """Run a blocking client call in a thread, bounded by ``timeout``.

    Every failure becomes ``SignerUnavailable`` with a short description naming the backend
    and the exception type, not chained to the exception; the details (which may name hosts
    or key ids) go to the log, with any user info of a URL in them blanked out: no client
    library here puts a token or a key in its messages, but hvac's end with the URL
    requested, as it was configured.
    """
    try:
        # The client library has its own timeouts set to the same value; this outer bound
        # also covers what they miss (DNS, credential lookups, a wedged HSM driver).
        running = asyncio.get_running_loop().run_in_executor(_pool(backend), fn)
        # Not asyncio.wait_for: the registry's checkpoint loop signs here, and a
        # cancellation (the registry closing) coming as the backend answers must stop it.
        return await wait_within(running, timeout)
    except SignerUnavailable:
        raise
    except Exception as exc:
        # The client library's own timeout (set to the same value) and the bound above race
        # on a backend that stopped answering: either way it is one outage, said under one
        # throttle key and in one line. (Until 2026-11-30 the two were said apart, so a slow
        # backend logged two warnings where a stopped one logged one.)
        if _is_timeout(exc):
            _said.log(
                _log,
                (backend, what, "timeout"),
                "%s %s timed out after %.3gs",
                backend,
                what,
                timeout,
            )
            raise SignerUnavailable(
                f"{backend} did not answer within {timeout:g}s", reason="timeout"
            ) from None
        _said.log(
            _log,
            (backend, what, type(exc)),
            "%s %s failed: %s: %s",
            backend,
            what,
            type(exc).__name__,
            _without_userinfo(exc),
        )
        # Not chained (from None): a traceback logged later (the checkpoint loop logs its
        # failures with exc_info) would print the library's message, user info and all.
        raise SignerUnavailable(
            f"{backend} {what} failed ({type(exc).__name__})", reason="backend_error"
        ) from None


# The user info of a URL (scheme://user:password@host): from "//" to the last "@" on its
# line. Not to the first "/": a password with an unescaped "/", "?" or "#" is quoted whole
# by the client library's "Failed to parse" error, and not to the first whitespace either:
# one with a space or a tab is quoted so too. Masks more, never less.
_USERINFO = re.compile(r"(?<=//).*@")


def _without_userinfo(exc: BaseException) -> str:
    return _USERINFO.sub("***@", str(exc))


def _is_timeout(exc: BaseException) -> bool:
    """True for a timeout from a client library: requests' ``Timeout`` (hvac, Cloud KMS),
    botocore's timeouts (which derive from its vendored ``requests...Timeout``), and the
    builtin ``TimeoutError``. Matched by class name, so this module imports neither library.

    Only the exception raised is looked at, not its causes: urllib3's NewConnectionError
    (a refused connection) derives from its ConnectTimeoutError.
    """
    return isinstance(exc, TimeoutError) or any(c.__name__ == "Timeout" for c in type(exc).__mro__)


class RemoteSigner:
    """Shared half of the backends that do I/O: naming, the closed state, the self-check.

    Subclasses provide ``_sign_blocking`` (runs in a worker thread and returns the raw
    JWS-form signature) and may extend ``_close_blocking``.
    """

    _backend = "signer"

    def __init__(self, *, public: PublicKey, timeout: float) -> None:
        self._public = public
        self._kid = str(public.jwk["kid"])  # set by public_key_with_kid
        self._timeout = timeout
        self._closed = False

    @property
    def kid(self) -> str:
        return self._kid

    @property
    def alg(self) -> Algorithm:
        return self._public.alg

    def public_key(self) -> PublicKey:
        return self._public

    def _sign_blocking(self, data: bytes) -> bytes:
        raise NotImplementedError

    def _close_blocking(self) -> None:
        """Release client resources; runs once, in a worker thread."""

    def _check_input(self, data: bytes) -> None:
        """Refuse inputs the backend cannot sign, before any I/O."""

    async def sign(self, data: bytes) -> bytes:
        if self._closed:
            raise SignerUnavailable(f"the {self._backend} signer is closed", reason="closed")
        self._check_input(data)
        signature = await call_blocking(
            self._backend, "sign", self._timeout, lambda: self._sign_blocking(data)
        )
        # A signature that does not verify under our published kid would be a token no one
        # can check at best, and at worst a sign that the backend signs with another key.
        if not self._public.verify(signature, data):
            _said.log(
                _log,
                (self._backend, "sign", "bad_signature"),
                "%s returned a signature that does not verify (kid %s)",
                self._backend,
                self._kid,
                level=logging.ERROR,
            )
            raise SignerUnavailable(
                f"{self._backend} returned a signature that does not verify under kid {self._kid}",
                reason="bad_signature",
            )
        return signature

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await call_blocking(self._backend, "close", self._timeout, self._close_blocking)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(alg={self.alg!r}, kid={self._kid!r})"
