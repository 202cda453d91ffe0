"""Google Cloud KMS: an EC_SIGN_P256_SHA256 key version, through google-cloud-kms over REST.

The client follows Google's integrity guidance for AsymmetricSign: it sends the CRC32C of
the digest, requires the service to confirm it checked it (``verified_digest_crc32c``),
checks the CRC32C of the returned signature and the key version name in the response; and
for GetPublicKey, the CRC32C of the PEM (required, as the signature's is).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from ._base import (
    DEFAULT_TIMEOUT,
    RemoteSigner,
    SignerUnavailable,
    call_blocking,
    der_to_raw,
    preload,
    public_key_with_kid,
)
from ._crc32c import crc32c

if TYPE_CHECKING:
    from google.auth.credentials import Credentials
    from google.cloud.kms_v1 import KeyManagementServiceClient

    from agentauth.protocol import PublicKey

__all__ = ["GcpKmsSigner"]


class GcpKmsSigner(RemoteSigner):
    """Signs with one Cloud KMS ``CryptoKeyVersion`` (its full resource name)."""

    _backend = "Cloud KMS"

    def __init__(
        self,
        *,
        client: KeyManagementServiceClient,
        key_version_name: str,
        public: PublicKey,
        timeout: float,
    ) -> None:
        super().__init__(public=public, timeout=timeout)
        self._client = client
        self._name = key_version_name

    @classmethod
    async def open(
        cls,
        key_version_name: str,
        *,
        endpoint: str | None = None,
        credentials: Credentials | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        kid: str | None = None,
    ) -> GcpKmsSigner:
        """Fetch and check the key version's public key.

        ``endpoint`` (e.g. ``http://127.0.0.1:8080``) points the client elsewhere than
        Google; without ``credentials`` it then sends none. Without ``endpoint``, the
        client finds credentials the usual way (application default credentials).
        """

        def connect() -> tuple[KeyManagementServiceClient, PublicKey]:
            # Imported on open, so the package imports without the server extras.
            from google.auth.credentials import AnonymousCredentials  # noqa: PLC0415
            from google.cloud import kms_v1  # noqa: PLC0415

            creds: Credentials | None = credentials
            options: dict[str, str] | None = None
            if endpoint is not None:
                options = {"api_endpoint": endpoint}
                if creds is None:
                    creds = AnonymousCredentials()  # type: ignore[no-untyped-call]  # unannotated __init__
            client = kms_v1.KeyManagementServiceClient(
                credentials=creds, transport="rest", client_options=options
            )
            try:
                response = client.get_public_key(name=key_version_name, retry=None, timeout=timeout)
                expected = kms_v1.CryptoKeyVersion.CryptoKeyVersionAlgorithm.EC_SIGN_P256_SHA256
                if response.algorithm != expected:
                    raise SignerUnavailable(
                        "the Cloud KMS key version is not EC_SIGN_P256_SHA256",
                        reason="wrong_key_type",
                    )
                if response.name != key_version_name:
                    raise SignerUnavailable(
                        "Cloud KMS answered for another key version", reason="bad_response"
                    )
                pem = response.pem.encode("utf-8")
                # Required, as Google's integrity guidance checks it (Cloud KMS always sends
                # it): an answer without it is not one whose key can be trusted unchecked.
                if response.pem_crc32c != crc32c(pem):
                    raise SignerUnavailable(
                        "Cloud KMS public key failed its CRC32C check", reason="bad_response"
                    )
                key = load_pem_public_key(pem)
                if not isinstance(key, ec.EllipticCurvePublicKey):
                    raise SignerUnavailable("the Cloud KMS key is not EC", reason="wrong_key_type")
                return client, public_key_with_kid(key, kid)
            except BaseException:
                client.transport.close()  # type: ignore[no-untyped-call]  # unannotated
                raise

        await preload("google.auth.credentials", "google.cloud.kms_v1")
        client, public = await call_blocking(cls._backend, "open", timeout, connect)
        return cls(client=client, key_version_name=key_version_name, public=public, timeout=timeout)

    def _sign_blocking(self, data: bytes) -> bytes:
        digest = hashlib.sha256(data).digest()
        response = self._client.asymmetric_sign(
            request={
                "name": self._name,
                "digest": {"sha256": digest},
                "digest_crc32c": crc32c(digest),
            },
            retry=None,
            timeout=self._timeout,
        )
        if not response.verified_digest_crc32c:
            raise SignerUnavailable(
                "Cloud KMS did not confirm the digest checksum", reason="bad_response"
            )
        if response.name != self._name:
            raise SignerUnavailable(
                "Cloud KMS signed with another key version", reason="bad_response"
            )
        if response.signature_crc32c != crc32c(response.signature):
            raise SignerUnavailable(
                "Cloud KMS signature failed its CRC32C check", reason="bad_response"
            )
        return der_to_raw(response.signature)

    def _close_blocking(self) -> None:
        self._client.transport.close()  # type: ignore[no-untyped-call]  # unannotated
