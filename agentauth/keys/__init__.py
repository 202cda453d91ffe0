"""Signing keys for the registry (access tokens, audit checkpoints) behind one async interface.

Backends: a local PEM file, AWS KMS, Google Cloud KMS, HashiCorp Vault Transit, and any
PKCS#11 token. Each is an ``AsyncSigner``: ``kid``, ``alg``, ``public_key()`` (cached at open
time), ``await sign(data)`` (JWS-form signature) and ``await aclose()``.

Every backend that does I/O checks each signature it gets back against the cached public
key and raises ``SignerUnavailable`` (``signer_unavailable``, 503) rather than hand out a
signature that does not verify under its kid; every backend error (unreachable, timeout,
refused credentials, malformed answer) is ``SignerUnavailable`` too. Client libraries are
imported when a backend is opened, so importing this package needs none of them.

``KeyRing`` is the pure rotation timeline: which kid signs now, which kids the JWKS lists.

    AgentAuthError
    └── DependencyUnavailable
        └── SignerUnavailable          signer_unavailable        503
"""

from ._aws import AwsKmsSigner
from ._base import DEFAULT_TIMEOUT, AsyncSigner, SignerUnavailable
from ._gcp import GcpKmsSigner
from ._keyring import KeyRecord, KeyRing
from ._local import LocalFileSigner
from ._pkcs11 import Pkcs11Signer
from ._vault import VaultTransitSigner

__all__ = [
    "DEFAULT_TIMEOUT",
    "AsyncSigner",
    "AwsKmsSigner",
    "GcpKmsSigner",
    "KeyRecord",
    "KeyRing",
    "LocalFileSigner",
    "Pkcs11Signer",
    "SignerUnavailable",
    "VaultTransitSigner",
]
