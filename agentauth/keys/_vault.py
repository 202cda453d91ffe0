"""HashiCorp Vault's Transit secrets engine: ecdsa-p256 (ES256) or ed25519 keys, through hvac.

The key version read at open time is pinned: ``sign`` passes ``key_version``, so rotating
the key inside Vault cannot make this signer sign with a key its kid does not name. Publish
the new version under its own kid (open another signer) and rotate through ``KeyRing``; a
kid already on record is reopened at its own version (``open(key_version=...)``), since the
latest one names another key once Vault has rotated (by hand, or its ``auto_rotate_period``).

Every request carries the Vault token in a header, so the URL must be ``https://``; plain
``http://`` is accepted only to a loopback host (127.0.0.0/8, ::1, ``localhost``: a Vault
agent or a development server on this machine), or with ``allow_insecure_http=True``.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from agentauth.protocol import Algorithm, b64url_decode

from ._base import (
    DEFAULT_TIMEOUT,
    RemoteSigner,
    SignerUnavailable,
    call_blocking,
    public_key_with_kid,
)

if TYPE_CHECKING:
    from agentauth.protocol import PublicKey

__all__ = ["VaultTransitSigner"]

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


def _bad(what: str) -> SignerUnavailable:
    return SignerUnavailable(f"Vault returned {what}", reason="bad_response")


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
    ) -> None:
        super().__init__(public=public, timeout=timeout)
        self._client = client  # an hvac.Client
        self._key_name = key_name
        self._mount = mount
        self._version = version

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
        token: str,
        mount: str = "transit",
        timeout: float = DEFAULT_TIMEOUT,
        kid: str | None = None,
        allow_insecure_http: bool = False,
        key_version: int | None = None,
    ) -> VaultTransitSigner:
        """Read the key's latest version (or ``key_version``) and its public key; the token
        stays in the client.

        ``url`` must be ``https://``, or ``http://`` to a loopback host; any other ``http://``
        host needs ``allow_insecure_http=True`` (the token then crosses the network in the
        clear). Empty, it is ``VAULT_ADDR`` or ``http://localhost:8200``, as in hvac.
        """
        url = _resolve_url(url, allow_insecure_http=allow_insecure_http)

        def connect() -> tuple[Any, int, PublicKey]:
            # Imported on open, so the package imports without the server extras. hvac
            # ships no type hints.
            import hvac  # type: ignore[import-untyped, unused-ignore]  # noqa: PLC0415

            # No redirects: hvac's session would re-send X-Vault-Token to wherever a redirect
            # points, plain http included, past the URL check above.
            client = hvac.Client(url=url, token=token, timeout=timeout, allow_redirects=False)
            try:
                body = client.secrets.transit.read_key(name=key_name, mount_point=mount)
                version, public = _parse_key(body, kid, key_version)
            except BaseException:
                client.adapter.close()
                raise
            return client, version, public

        client, version, public = await call_blocking(cls._backend, "open", timeout, connect)
        return cls(
            client=client,
            key_name=key_name,
            mount=mount,
            version=version,
            public=public,
            timeout=timeout,
        )

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
        body = self._client.secrets.transit.sign_data(**params)
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
