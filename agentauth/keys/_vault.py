"""HashiCorp Vault's Transit secrets engine: ecdsa-p256 (ES256) or ed25519 keys, through hvac.

The key version read at open time is pinned: ``sign`` passes ``key_version``, so rotating
the key inside Vault cannot make this signer sign with a key its kid does not name. Publish
the new version under its own kid (open another signer) and rotate through ``KeyRing``; a
kid already on record is reopened at its own version (``open(key_version=...)``), since the
latest one names another key once Vault has rotated (by hand, or its ``auto_rotate_period``).

Every request carries the Vault token in a header, so the URL must be ``https://``; plain
``http://`` is accepted only to a loopback host (127.0.0.0/8, ::1, ``localhost``: a Vault
agent or a development server on this machine), or with ``allow_insecure_http=True``; and a
plain ``http://`` request goes to that host itself, never through a proxy the environment
names (``HTTP_PROXY``, ``ALL_PROXY``).

The token is given as a string, or as a file (``token_file``: Vault Agent's auto-auth file
sink, which Vault Agent rewrites with a fresh token as each expires). When Vault refuses a
sign with 403 (an expired or revoked token), a signer with a token file reads the file
again and, if the token there has changed, retries that sign once with it; otherwise the
sign fails as any other (``SignerUnavailable``). A refused sign produced no signature, so the
retry cannot sign twice. The token never appears in a log line, a repr or an error.

A token given as a string is looked up at open (``auth/token/lookup-self``). If it is
renewable and has a TTL, a background task renews it (``auth/token/renew-self``, asking
for its creation TTL again) once a half to two thirds of its TTL has passed, jittered, as
Vault's own clients do, until ``aclose``. A renewal granting less than asked, or not moving
the expiry on, means the token has reached its max TTL: that is said at once, as a warning
with the time left, and nothing more is renewed; the token then expires and signing fails
closed (``SignerUnavailable``) as it always did. A token without a TTL (a root token) or not
renewable needs nothing, and a lookup that fails leaves the signer open, unrenewed, with a
warning. A token file is not renewed here: Vault Agent renews the token it writes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import ipaddress
import logging
import os
import random
import re
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from agentauth._events import stop_tasks
from agentauth._logs import Throttle
from agentauth.protocol import Algorithm, b64url_decode

from ._base import (
    DEFAULT_TIMEOUT,
    RemoteSigner,
    SignerUnavailable,
    call_blocking,
    preload,
    public_key_with_kid,
)

if TYPE_CHECKING:
    from agentauth.protocol import PublicKey

__all__ = ["VaultTransitSigner"]

_log = logging.getLogger("agentauth.keys")
# A token refused while its file still holds it fails every sign alike: said at once, then
# at most every 30 s (as _base says other backend failures).
_said = Throttle(30.0)
# Vault's tokens are about 100 bytes (batch tokens a few hundred): a file much larger is
# not a token file, and is not read whole into a request header.
_TOKEN_FILE_MAX = 16 * 1024

# When to renew a token, as fractions of its TTL: past the half, so a renewal does not
# come with every few signs, and well before the end, so a Vault slow or briefly down
# leaves time to try again (Vault's own LifetimeWatcher renews near two thirds). Jittered,
# so the replicas, all opened at once, do not all renew at once.
_RENEW_AT = (0.5, 2 / 3)
# After a failed renewal, the next try comes after this share of the time left, and not
# sooner than _RETRY_MIN seconds: a few tries before the token expires, none in a tight loop.
_RETRY_AT = (0.25, 1 / 3)
_RETRY_MIN = 1.0
# Module attributes, so a test can step the renewal task through its waits (and the
# random draws) instead of waiting a TTL out.
_sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
_jitter: Callable[[float, float], float] = random.uniform

_KEY_TYPES: dict[str, Algorithm] = {"ecdsa-p256": "ES256", "ed25519": "Ed25519"}
_SIGNATURE = re.compile(r"vault:v(?P<version>[1-9][0-9]*):(?P<body>[A-Za-z0-9+/=_-]+)")


def _resolve_url(url: str, *, allow_insecure_http: bool) -> str:
    """The URL the client will use (hvac's own default when none is given), once it is
    known not to send the token in the clear off this machine."""
    # As hvac does when given no URL: VAULT_ADDR, else a local dev server. Resolved here so
    # the URL checked is the one used.
    url = url or os.environ.get("VAULT_ADDR") or "http://localhost:8200"
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = parts.hostname or ""  # lower case, without brackets or credentials
    if scheme == "https":
        return url
    if scheme != "http":
        raise SignerUnavailable(
            f"the Vault URL must start with https:// (got scheme {scheme or 'none'!r})",
            reason="insecure_vault_url",
        )
    if allow_insecure_http or _is_loopback(host):
        return url
    # Only the host is named: the URL itself could carry credentials.
    raise SignerUnavailable(
        f"refusing to send the Vault token over plain http to {host or 'no host'}: anyone"
        " on the path could read it. Use https://; plain http is only for a loopback host"
        " (127.0.0.0/8, ::1, localhost), unless vault_allow_insecure_http is set",
        reason="insecure_vault_url",
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # another host name: it could resolve anywhere


def _usable_token(token: str, source: str) -> str:
    """``token`` without surrounding whitespace, once it can go into a header as it is.

    A token with a line break (a Secret made from a file that ended in a newline) was sent
    to requests, whose refusal quotes the header value: the token was logged. Whitespace is
    never part of a Vault token, so it is stripped; anything else unprintable is refused,
    and the message says where the token came from, never what it is.
    """
    token = token.strip()
    if not token:
        raise SignerUnavailable(f"the Vault token ({source}) is empty", reason="bad_token")
    if not all("!" <= c <= "~" for c in token):
        raise SignerUnavailable(
            f"the Vault token ({source}) holds characters a token never has"
            " (only printable ASCII, no spaces)",
            reason="bad_token",
        )
    return token


def _read_token_file(path: str) -> str:
    """The token in ``path`` (a Vault Agent file sink), checked as ``_usable_token`` does."""
    try:
        with open(path, "rb") as file:
            raw = file.read(_TOKEN_FILE_MAX + 1)
    except OSError as exc:
        # strerror only ("No such file or directory"): it names no content.
        raise SignerUnavailable(
            f"cannot read the Vault token file {path} ({exc.strerror or type(exc).__name__})",
            reason="bad_token_file",
        ) from None
    if len(raw) > _TOKEN_FILE_MAX:
        raise SignerUnavailable(
            f"the Vault token file {path} is over {_TOKEN_FILE_MAX} bytes: not a token file",
            reason="bad_token_file",
        )
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:  # its message quotes a byte of the file: not used
        raise SignerUnavailable(
            f"the Vault token file {path} holds characters a token never has"
            " (only printable ASCII, no spaces)",
            reason="bad_token_file",
        ) from None
    try:
        return _usable_token(text, f"file {path}")
    except SignerUnavailable as exc:
        raise SignerUnavailable(exc.description, reason="bad_token_file") from None


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def _bad(what: str) -> SignerUnavailable:
    return SignerUnavailable(f"Vault returned {what}", reason="bad_response")


def _seconds(value: Any) -> int | None:
    """A count of seconds from Vault's JSON, or None for anything else."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _parse_lookup(body: Any) -> tuple[int, bool, int]:
    """(ttl, renewable, creation ttl) from a ``lookup-self`` answer. The answer holds the
    token itself (``id``): nothing of it is logged."""
    try:
        data = body["data"]
        ttl, renewable = _seconds(data["ttl"]), data["renewable"]
        created = _seconds(data.get("creation_ttl")) or ttl
    except (KeyError, TypeError, AttributeError):
        raise _bad("an unexpected token lookup") from None
    if ttl is None or created is None or not isinstance(renewable, bool):
        raise _bad("an unexpected token lookup")
    return ttl, renewable, created


def _parse_renewal(body: Any) -> tuple[int, bool]:
    """(ttl granted, still renewable) from a ``renew-self`` answer."""
    try:
        auth = body["auth"]
        granted, renewable = _seconds(auth["lease_duration"]), auth["renewable"]
    except (KeyError, TypeError):
        raise _bad("an unexpected token renewal") from None
    if granted is None or not isinstance(renewable, bool):
        raise _bad("an unexpected token renewal")
    return granted, renewable


def _utc_in(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(time.time() + seconds))


class VaultTransitSigner(RemoteSigner):
    """Signs with one version of a Vault Transit key."""

    _backend = "Vault Transit"

    def __init__(
        self,
        *,
        client: Any,
        key_name: str,
        mount: str,
        version: int,
        public: PublicKey,
        timeout: float,
        token_file: str | None = None,
    ) -> None:
        super().__init__(public=public, timeout=timeout)
        self._client = client  # an hvac.Client
        self._key_name = key_name
        self._mount = mount
        self._version = version
        self._token_file = token_file
        # Signs run in several worker threads at once, all sending the client's token:
        # swapping it (after a 403) is one decision under this lock, so two calls refused
        # together read the file once and neither undoes the other's swap.
        self._token_lock = threading.Lock()
        self._renewal: asyncio.Task[None] | None = None

    @property
    def key_version(self) -> int:
        """The Vault key version this signer signs with (pinned at open time)."""
        return self._version

    @classmethod
    async def open(
        cls,
        key_name: str,
        *,
        url: str,
        token: str | None = None,
        token_file: str | None = None,
        mount: str = "transit",
        timeout: float = DEFAULT_TIMEOUT,
        kid: str | None = None,
        allow_insecure_http: bool = False,
        key_version: int | None = None,
    ) -> VaultTransitSigner:
        """Read the key's latest version (or ``key_version``) and its public key; the token
        stays in the client.

        Exactly one of ``token`` and ``token_file`` (a file holding the token, read now and
        again whenever Vault refuses the token) must be given. A ``token`` is looked up, and
        renewed in the background until ``aclose`` if it is renewable with a TTL.

        ``url`` must be ``https://``, or ``http://`` to a loopback host; any other ``http://``
        host needs ``allow_insecure_http=True`` (the token then crosses the network in the
        clear). Empty, it is ``VAULT_ADDR`` or ``http://localhost:8200``, as in hvac.
        """
        url = _resolve_url(url, allow_insecure_http=allow_insecure_http)
        if (token is None) == (token_file is None):
            raise SignerUnavailable(
                "give the Vault signer exactly one of a token and a token file", reason="bad_token"
            )
        given = None if token is None else _usable_token(token, "vault_token")
        plain_http = urlsplit(url).scheme.lower() == "http"

        def connect() -> tuple[Any, int, PublicKey]:
            # Imported on open, so the package imports without the server extras. hvac
            # ships no type hints.
            import hvac  # type: ignore[import-untyped, unused-ignore]  # noqa: PLC0415

            current = given if token_file is None else _read_token_file(token_file)
            # No redirects: hvac's session would re-send X-Vault-Token to wherever a redirect
            # points, plain http included, past the URL check above.
            client = hvac.Client(url=url, token=current, timeout=timeout, allow_redirects=False)
            if plain_http:
                # Nor through a proxy the environment names (HTTP_PROXY, ALL_PROXY): requests
                # would hand it the request, token and all, in the clear, and the proxy's
                # host is not the loopback (or opted-in) host the URL check above allowed.
                client.session.trust_env = False
            try:
                body = client.secrets.transit.read_key(name=key_name, mount_point=mount)
                version, public = _parse_key(body, kid, key_version)
            except BaseException:
                client.adapter.close()
                raise
            return client, version, public

        await preload("hvac")
        client, version, public = await call_blocking(cls._backend, "open", timeout, connect)
        signer = cls(
            client=client,
            key_name=key_name,
            mount=mount,
            version=version,
            public=public,
            timeout=timeout,
            token_file=token_file,
        )
        if token_file is None:  # a token file's token is Vault Agent's to renew
            try:
                await signer._watch_token()
            except BaseException:  # cancelled: the signer goes to no one who could close it
                signer._closed = True
                client.adapter.close()
                raise
        return signer

    async def _watch_token(self) -> None:
        """Look the token up and, if it is renewable with a TTL, start renewing it."""
        try:
            ttl, renewable, created = await call_blocking(
                self._backend, "token lookup", self._timeout, self._lookup_blocking
            )
        except SignerUnavailable as exc:
            # Signing may well work (a policy without lookup-self, a Vault slow once): the
            # signer opens, and the operator learns the token is not being renewed.
            _log.warning(
                "could not look up the Vault token (%s): it will not be renewed, and if it"
                " has a TTL every sign fails (503) once that runs out",
                exc.description,
            )
            return
        if ttl == 0:
            return  # no TTL (a root token): it never expires
        if not renewable:
            _log.warning(
                "the Vault token is not renewable and expires in %d s (about %s): every sign"
                " fails (503) from then until the registry restarts with a new token",
                ttl,
                _utc_in(ttl),
            )
            return
        _log.info("the Vault token expires in %d s unless renewed; renewing it before", ttl)
        self._renewal = asyncio.get_running_loop().create_task(
            self._keep_renewed(ttl, created), name="vault-token-renewal"
        )

    def _lookup_blocking(self) -> tuple[int, bool, int]:
        return _parse_lookup(self._client.auth.token.lookup_self())

    def _renew_blocking(self, increment: int) -> tuple[int, bool]:
        return _parse_renewal(self._client.auth.token.renew_self(increment=increment))

    async def _keep_renewed(self, ttl: int, increment: int) -> None:
        """Renew the token for ``increment`` seconds at a time until it cannot be, then say
        when it expires. Runs until ``aclose`` cancels it, or the token is past saving."""
        expires = time.monotonic() + ttl
        wait = ttl * _jitter(*_RENEW_AT)
        while True:
            await _sleep(wait)
            try:
                granted, renewable = await call_blocking(
                    self._backend,
                    "token renewal",
                    self._timeout,
                    lambda: self._renew_blocking(increment),
                )
            except SignerUnavailable:
                # Said by call_blocking, as sign failures are: at once, then every 30 s.
                left = expires - time.monotonic()
                if left <= 0:
                    _log.error(
                        "the Vault token expired without being renewed: every sign fails"
                        " (503) until the registry restarts with a new token"
                    )
                    return
                wait = min(left, max(_RETRY_MIN, left * _jitter(*_RETRY_AT)))
                continue
            now = time.monotonic()
            grew = now + granted > expires
            expires = now + granted
            if granted >= increment and grew and renewable:
                _log.info("renewed the Vault token: it expires in %d s", granted)
                wait = granted * _jitter(*_RENEW_AT)
                continue
            # Vault grants no more than the max TTL leaves: renewing again would gain
            # nothing, so it is said while there is time to act, and once.
            _log.warning(
                "Vault renewed the token for %d s, not the %d s asked: it has reached its max"
                " TTL and expires in %d s (about %s). Every sign fails (503) from then until"
                " the registry restarts with a new token; vault_token_file with Vault Agent"
                " avoids this",
                granted,
                increment,
                granted,
                _utc_in(granted),
            )
            await _sleep(granted)
            _log.error(
                "the Vault token has reached its max TTL and expired: every sign fails (503)"
                " until the registry restarts with a new token"
            )
            return

    def _sign_blocking(self, data: bytes) -> bytes:
        params: dict[str, Any] = {
            "name": self._key_name,
            "mount_point": self._mount,
            "hash_input": base64.b64encode(data).decode("ascii"),
            "key_version": self._version,
        }
        if self.alg == "ES256":
            # "jws" marshaling: raw r||s, base64url, instead of the default ASN.1 DER.
            params.update(hash_algorithm="sha2-256", marshaling_algorithm="jws")
        # ed25519 takes no hash_algorithm: Vault signs the input itself (pure Ed25519).
        body = self._with_current_token(lambda: self._client.secrets.transit.sign_data(**params))
        try:
            signature = body["data"]["signature"]
        except (KeyError, TypeError):
            raise _bad("no signature") from None
        match = _SIGNATURE.fullmatch(signature) if isinstance(signature, str) else None
        if match is None:
            raise _bad("a malformed signature")
        if int(match["version"]) != self._version:
            raise _bad("a signature from another key version")
        try:
            if self.alg == "ES256":
                return b64url_decode(match["body"])
            return base64.b64decode(match["body"], validate=True)
        except (ValueError, binascii.Error):
            raise _bad("a malformed signature") from None

    def _with_current_token(self, call: Callable[[], Any]) -> Any:
        """``call()``; refused with 403, once more if the token file holds another token.

        Runs in a worker thread that ``call_blocking`` waits ``timeout`` for: a retry starts
        only within ``timeout`` of the first try, not for a caller that has surely given up.
        """
        from hvac.exceptions import Forbidden  # noqa: PLC0415  # loaded already, by open

        deadline = time.monotonic() + self._timeout
        with self._token_lock:
            sent = self._client.token
        try:
            return call()
        except Forbidden:
            took = False
            if self._token_file is not None:
                try:
                    took = self._take_new_token(sent)
                except SignerUnavailable as exc:
                    # Not chained to hvac's error, whose message is the URL as configured,
                    # user info and all (call_blocking's reason for never chaining).
                    raise exc from None
            if not took:
                raise  # said in the log by call_blocking: "... sign failed: Forbidden: ..."
            if time.monotonic() >= deadline:
                raise  # the caller has had its timeout; the next call uses the new token
        return call()

    def _take_new_token(self, refused: str) -> bool:
        """After Vault refused ``refused``: whether the client now holds another token,
        read from the token file (or swapped in by a call refused at the same time)."""
        assert self._token_file is not None
        with self._token_lock:
            if not _same(self._client.token, refused):
                return True  # another call took the file's new token meanwhile
            try:
                token = _read_token_file(self._token_file)
            except SignerUnavailable as exc:
                _said.log(
                    _log,
                    ("Vault Transit", "token file", exc.reason),
                    "Vault refused the token (403) and the token file cannot give another: %s",
                    exc.description,
                )
                raise
            if _same(token, refused):
                _said.log(
                    _log,
                    ("Vault Transit", "token file", "unchanged"),
                    "Vault refused the token (403 permission denied: expired or revoked) and"
                    " the token file %s still holds that token: is Vault Agent running and"
                    " able to log in?",
                    self._token_file,
                )
                return False
            self._client.token = token
        _log.warning(
            "Vault refused the token (403); took the new token in %s and retrying",
            self._token_file,
        )
        return True

    async def aclose(self) -> None:
        # The renewal first: it uses the client, and must stop even if closing that fails.
        renewal, self._renewal = self._renewal, None
        await stop_tasks([renewal], timeout=self._timeout)
        await super().aclose()

    def _close_blocking(self) -> None:
        self._client.adapter.close()


def _parse_key(body: Any, kid: str | None, wanted: int | None = None) -> tuple[int, PublicKey]:
    """The version ``wanted`` (default: the latest) and its public key from a
    ``GET {mount}/keys/{name}`` answer."""
    try:
        data = body["data"]
        key_type = data["type"]
    except (KeyError, TypeError):
        raise _bad("an unexpected key description") from None
    if key_type not in _KEY_TYPES:
        raise SignerUnavailable(
            "the Vault key is not ecdsa-p256 or ed25519", reason="wrong_key_type"
        )
    try:
        version = data["latest_version"] if wanted is None else wanted
        versions = data["keys"]
        if not isinstance(versions, dict):
            raise TypeError
    except (KeyError, TypeError):
        raise _bad("an unexpected key description") from None
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _bad("an unexpected key version")
    if str(version) not in versions:
        # Asked for: trimmed (min_available_version) or never made; latest: a bad answer.
        raise SignerUnavailable(f"Vault holds no version {version} of the key", reason="no_version")
    try:
        encoded = versions[str(version)]["public_key"]
    except (KeyError, TypeError):
        raise _bad("an unexpected key description") from None
    if not isinstance(encoded, str):
        raise _bad("no public key")
    key: ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
    try:
        if key_type == "ed25519":
            # Vault gives ed25519 public keys as standard base64 of the 32 raw bytes.
            key = ed25519.Ed25519PublicKey.from_public_bytes(
                base64.b64decode(encoded, validate=True)
            )
        else:
            loaded = load_pem_public_key(encoded.encode("ascii"))
            if not isinstance(loaded, ec.EllipticCurvePublicKey):
                raise _bad("a public key of the wrong type")
            key = loaded
    except (ValueError, binascii.Error, UnicodeEncodeError):
        raise _bad("a malformed public key") from None
    public = public_key_with_kid(key, kid)
    if public.alg != _KEY_TYPES[key_type]:
        raise _bad("a public key of the wrong type")
    return version, public
