"""AWS KMS: an ECC_NIST_P256 SIGN_VERIFY key, ECDSA_SHA_256, through boto3."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Literal

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key

from agentauth.protocol import PayloadTooLarge

from ._base import (
    DEFAULT_TIMEOUT,
    RemoteSigner,
    SignerUnavailable,
    call_blocking,
    der_to_raw,
    preload,
    public_key_with_kid,
)

if TYPE_CHECKING:
    from agentauth.protocol import PublicKey

__all__ = ["AwsKmsSigner"]

#: KMS refuses a RAW message longer than this (API reference, Sign: Message).
KMS_RAW_MAX = 4096
_SIGNING_ALGORITHM = "ECDSA_SHA_256"


class AwsKmsSigner(RemoteSigner):
    """Signs with an AWS KMS asymmetric key.

    ``message_type="DIGEST"`` (the default) sends SHA-256(data), which KMS signs as is:
    any input size, 32 bytes on the wire. ``"RAW"`` sends the data for KMS to hash, which
    KMS limits to 4096 bytes.
    """

    _backend = "AWS KMS"

    def __init__(
        self,
        *,
        client: Any,
        key_ref: str,
        message_type: Literal["DIGEST", "RAW"],
        public: PublicKey,
        timeout: float,
    ) -> None:
        super().__init__(public=public, timeout=timeout)
        self._client = client  # a botocore KMS client; thread-safe per the boto3 docs
        self._key_ref = key_ref  # the id or ARN GetPublicKey named: never an alias
        self._message_type = message_type

    @property
    def key_ref(self) -> str:
        """The key as KMS named it at open time (its ARN, or its id on some KMS-compatible
        servers), never an alias: what to reopen this kid by once an alias has moved."""
        return self._key_ref

    @classmethod
    async def open(
        cls,
        key_id: str,
        *,
        region: str = "us-east-1",
        endpoint_url: str | None = None,
        message_type: Literal["DIGEST", "RAW"] = "DIGEST",
        timeout: float = DEFAULT_TIMEOUT,
        kid: str | None = None,
        session: Any = None,
    ) -> AwsKmsSigner:
        """Fetch and check the key's public half; ``key_id`` may be an id, ARN or alias.

        ``session`` is a ``boto3.session.Session`` (default: a new one, which finds
        credentials the usual boto3 way). Later calls name the key as GetPublicKey did (its
        ARN, or its id on some KMS-compatible servers), so re-pointing an alias cannot move
        this signer to another key.
        """
        if message_type not in ("DIGEST", "RAW"):
            raise ValueError("message_type is DIGEST or RAW")

        def connect() -> tuple[Any, str, PublicKey]:
            # Imported on open, so the package imports without the server extras. boto3
            # and botocore ship no type hints.
            import boto3  # type: ignore[import-untyped, unused-ignore]  # noqa: PLC0415
            from botocore.config import Config  # type: ignore[import-untyped, unused-ignore]  # noqa: PLC0415

            config = Config(
                connect_timeout=timeout,
                read_timeout=timeout,
                # One attempt: the caller is waiting on a token, and fails closed anyway.
                retries={"mode": "standard", "total_max_attempts": 1},
            )
            client = (session or boto3.session.Session()).client(
                "kms", region_name=region, endpoint_url=endpoint_url, config=config
            )
            try:
                response = client.get_public_key(KeyId=key_id)
                # CustomerMasterKeySpec is the deprecated name; some KMS-compatible servers
                # (moto 5) still answer with it alone.
                spec = response.get("KeySpec") or response.get("CustomerMasterKeySpec")
                if spec != "ECC_NIST_P256":
                    raise SignerUnavailable(
                        "the KMS key is not ECC_NIST_P256", reason="wrong_key_type"
                    )
                if response.get("KeyUsage") != "SIGN_VERIFY":
                    raise SignerUnavailable(
                        "the KMS key is not for signing", reason="wrong_key_type"
                    )
                if _SIGNING_ALGORITHM not in response.get("SigningAlgorithms", ()):
                    raise SignerUnavailable(
                        "the KMS key cannot sign ECDSA_SHA_256", reason="wrong_key_type"
                    )
                key = load_der_public_key(response["PublicKey"])
                if not isinstance(key, ec.EllipticCurvePublicKey):
                    raise SignerUnavailable("the KMS key is not an EC key", reason="wrong_key_type")
                return client, str(response["KeyId"]), public_key_with_kid(key, kid)
            except BaseException:
                client.close()
                raise

        await preload("boto3", "botocore.config")
        client, key_ref, public = await call_blocking(cls._backend, "open", timeout, connect)
        return cls(
            client=client,
            key_ref=key_ref,
            message_type=message_type,
            public=public,
            timeout=timeout,
        )

    def _check_input(self, data: bytes) -> None:
        if self._message_type == "RAW" and len(data) > KMS_RAW_MAX:
            raise PayloadTooLarge(
                f"AWS KMS signs at most {KMS_RAW_MAX} bytes in RAW mode; use message_type=DIGEST"
            )

    def _sign_blocking(self, data: bytes) -> bytes:
        message = hashlib.sha256(data).digest() if self._message_type == "DIGEST" else data
        response = self._client.sign(
            KeyId=self._key_ref,
            Message=message,
            MessageType=self._message_type,
            SigningAlgorithm=_SIGNING_ALGORITHM,
        )
        der = response.get("Signature")
        if not isinstance(der, bytes):
            raise SignerUnavailable("AWS KMS returned no signature", reason="bad_response")
        return der_to_raw(der)

    def _close_blocking(self) -> None:
        self._client.close()
