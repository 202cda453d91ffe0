"""Registry configuration: one typed object, read from the environment by ``from_env``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .._origins import check_rp_id, serialized_origin

__all__ = ["RegistrySettings", "SignerSettings"]


class SignerSettings(BaseModel):
    """Which key backend signs tokens and checkpoints, and how to reach it."""

    # A refused value is left out of the error's text: it may be the Vault token or the PIN.
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    backend: Literal["local", "aws", "gcp", "vault", "pkcs11"] = "local"
    # local: key files under <data_dir>/keys, created 0600 on first start.
    alg: Literal["ES256", "Ed25519"] = "ES256"
    # aws / gcp / vault / pkcs11: the key's name in that backend and its endpoint.
    key_id: str | None = None
    endpoint: str | None = None
    region: str = "us-east-1"
    # Real KMS signs a SHA-256 digest (DIGEST); RAW is for emulators that hash again.
    aws_message_type: Literal["DIGEST", "RAW"] = "DIGEST"
    vault_token: str | None = Field(None, repr=False)
    # The Vault token rides on every request: plain http is refused except to a loopback
    # host. Setting this sends it in the clear to any host (a trusted private link only).
    vault_allow_insecure_http: bool = False
    pkcs11_lib: str = "/usr/lib/softhsm/libsofthsm2.so"
    pkcs11_token: str | None = None
    pkcs11_pin: str | None = Field(None, repr=False)


class RegistrySettings(BaseModel):
    # Errors leave the input out: a model-level one would print all of it, admin token and
    # database password included, into a traceback or a log (repr=False does not cover it).
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    # URLs may carry passwords: kept out of reprs (and so out of logs).
    database_url: str = Field(repr=False)
    redis_url: str = Field(repr=False)
    data_dir: Path
    issuer: str = Field(description="Token iss; also the base URL of the registry's endpoints.")
    admin_token: str = Field(repr=False, min_length=16)
    rp_id: str = "localhost"
    origins: tuple[str, ...] = ("http://localhost:8080",)
    rp_name: str = "AgentAuth"
    # Passkey approvals must prove the human was verified (PIN/biometric), not just present.
    require_user_verification: bool = True
    # Anyone may create an account with a passkey (development); off, only admins invite.
    open_signup: bool = True
    # Minutes-long tokens keep revocation lag short without hammering the token endpoint.
    token_lifetime: int = Field(300, ge=30, le=3600)
    # WebAuthn ceremonies must finish within this many seconds.
    challenge_ttl: int = 300
    session_ttl: int = 12 * 3600
    enrollment_ttl: int = 3600
    # A recovery code (a person who lost every passkey) works this long, once.
    recovery_ttl: int = Field(24 * 3600, ge=60)
    step_up_ttl: int = 600
    # Pending step-ups a grant may have at once: each is a card on the human's page, and a
    # flood of them would bury the one that matters. 20 is more payments above a threshold
    # than a person approves in one sitting; a new one waits until one is decided.
    max_pending_step_ups: int = Field(20, ge=1)
    # A grant request unanswered this long is expired (no longer approved or denied).
    grant_request_ttl: int = Field(7 * 86400, ge=60)
    audit_chains: int = Field(8, ge=1, le=256)
    checkpoint_every_events: int = 1000
    # At most a tenth of MAX_UNSEALED_AGE (300 s): a chain's events older than that under
    # no checkpoint fail `audit verify` and the approval page's check, as checkpoints
    # deleted or withheld would, so the registry must sign well within it.
    checkpoint_every_seconds: float = Field(10.0, gt=0, le=30.0)
    # Expired challenges, sessions and enrollment codes are deleted this often (anyone can
    # start a sign-in, so its challenges must not pile up).
    sweep_every_seconds: float = Field(60.0, gt=0)
    # A rotated-in key is published this long before it signs (verifiers refresh JWKS).
    key_publish_ahead: int = 60
    signer: SignerSettings = SignerSettings()
    pool_min_size: int = 1
    pool_max_size: int = 10

    @field_validator("origins")
    @classmethod
    def _serialized_origins(cls, origins: tuple[str, ...]) -> tuple[str, ...]:
        # As browsers write them into client data, which is compared as a string.
        if not origins:
            raise ValueError("at least one origin may run passkey ceremonies")
        return tuple(dict.fromkeys(serialized_origin(o) for o in origins))

    @field_validator("rp_id")
    @classmethod
    def _domain_rp_id(cls, rp_id: str) -> str:
        return check_rp_id(rp_id, ())

    @model_validator(mode="after")
    def _rp_id_fits_origins(self) -> RegistrySettings:
        # Refused at start: otherwise every passkey ceremony fails, with nothing to say why.
        check_rp_id(self.rp_id, self.origins)
        return self

    @property
    def token_endpoint(self) -> str:
        return self.issuer.rstrip("/") + "/v1/token"

    @classmethod
    def from_env(cls, **overrides: object) -> RegistrySettings:
        """Read ``AGENTAUTH_*`` (and DATABASE_URL / REDIS_URL) from the environment."""
        env = os.environ
        values: dict[str, object] = {}
        for name, key in (
            ("database_url", "DATABASE_URL"),
            ("redis_url", "REDIS_URL"),
            ("data_dir", "AGENTAUTH_DATA_DIR"),
            ("issuer", "AGENTAUTH_ISSUER"),
            ("admin_token", "AGENTAUTH_ADMIN_TOKEN"),
            ("rp_id", "AGENTAUTH_RP_ID"),
        ):
            if key in env:
                values[name] = env[key]
        signer: dict[str, object] = {
            field: env[f"AGENTAUTH_SIGNER_{field.upper()}"]
            for field in SignerSettings.model_fields
            if f"AGENTAUTH_SIGNER_{field.upper()}" in env
        }
        given = overrides.pop("signer", None)
        if isinstance(given, SignerSettings):
            given = given.model_dump(exclude_unset=True)
        if isinstance(given, dict):
            # Field by field, the given ones first: a deployment's config (Serve args) names
            # the backend and the key, and secrets such as the Vault token or the PKCS#11 PIN
            # come from the environment (Kubernetes Secrets), never from a config file.
            values["signer"] = signer | given
        elif given is not None:
            values["signer"] = given  # not settings at all: the model refuses it
        elif signer:
            values["signer"] = signer
        if "AGENTAUTH_OPEN_SIGNUP" in env:
            # Closed once an organisation's people have signed up: nobody else can then
            # create an account to sign in with. pydantic reads true/false, 1/0, yes/no.
            values["open_signup"] = env["AGENTAUTH_OPEN_SIGNUP"]
        if "AGENTAUTH_ORIGINS" in env:
            values["origins"] = tuple(o for o in env["AGENTAUTH_ORIGINS"].split(",") if o)
        values.update(overrides)
        return cls.model_validate(values)
