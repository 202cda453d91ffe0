"""Registry configuration: one typed object, read from the environment by ``from_env``."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .._origins import check_issuer, check_rp_id, serialized_origin
from ..store import checked_url

__all__ = ["MAX_KEY_PUBLISH_AHEAD", "MAX_TOKEN_LIFETIME", "RegistrySettings", "SignerSettings"]

#: The longest ``token_lifetime`` a deployment may set.
MAX_TOKEN_LIFETIME = 3600
#: The longest ``key_publish_ahead`` a deployment may set. An hour is far past the key
#: refresh of every reader here (verifier replicas, the SDK's offline check: 10 min at most)
#: and of JWT libraries' usual JWKS caches; ``agentauth keys rotate``, which cannot see the
#: deployment's value, publishes for this long, so its new key signs that much later.
MAX_KEY_PUBLISH_AHEAD = 3600
# The longest any other lifetime below may be: a year is past any use, and far short of
# where ``now() + ttl`` leaves PostgreSQL's timestamps (every request using it a 500).
_MAX_TTL = 366 * 86400


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
    # Vault: exactly one of the token itself and a file holding it. The file is for Vault
    # Agent's auto-auth sink, which it rewrites with a fresh token before the old expires:
    # the signer reads it at open and again whenever Vault refuses the token it holds.
    vault_token: str | None = Field(None, repr=False)
    vault_token_file: str | None = None
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
    token_lifetime: int = Field(300, ge=30, le=MAX_TOKEN_LIFETIME)
    # WebAuthn ceremonies must finish within this many seconds. Each of these lifetimes is
    # bounded: at 0 or below, every ceremony, session or code expired as it was made, with
    # nothing to say why; past the bound, every request making one was a 500.
    challenge_ttl: int = Field(300, ge=30, le=86400)
    session_ttl: int = Field(12 * 3600, ge=60, le=_MAX_TTL)
    enrollment_ttl: int = Field(3600, ge=60, le=_MAX_TTL)
    # Enrollment codes a human may hold unused and unexpired at once: each is a row, minted
    # by any session. 20 is more agents than a person sets up within `enrollment_ttl`;
    # another is refused (409) until one is used or expires.
    max_live_enrollments: int = Field(20, ge=1, le=10_000)
    # A recovery code (a person who lost every passkey) works this long, once.
    recovery_ttl: int = Field(24 * 3600, ge=60, le=_MAX_TTL)
    step_up_ttl: int = Field(600, ge=60, le=_MAX_TTL)
    # Pending step-ups a grant may have at once: each is a card on the human's page, and a
    # flood of them would bury the one that matters. 20 is more payments above a threshold
    # than a person approves in one sitting; a new one waits until one is decided.
    max_pending_step_ups: int = Field(20, ge=1)
    # Step-up long polls (`GET /v1/step-ups/{id}?wait=`) each hold a request open for up to
    # 30 s and read the database now and then: at most `step_up_waits_per_caller` of one
    # agent (or human) and `step_up_waits_per_replica` in all at once, counted in each
    # replica. Past them: 429 with Retry-After. The SDK holds one per step-up it waits on.
    step_up_waits_per_caller: int = Field(4, ge=1, le=1000)
    step_up_waits_per_replica: int = Field(256, ge=1, le=100_000)
    # A grant's usage (`GET /v1/grants/{id}/usage`) counts its decisions, up to 31 days of
    # them: about 205 ms of PostgreSQL at 250,000 in the week. Whoever may see the grant
    # may ask as often as it likes, so each replica counts a grant at most once in this
    # many seconds and answers that count meanwhile (0: every call counts).
    usage_cache_seconds: float = Field(10.0, ge=0, le=60)
    # A grant request unanswered this long is expired (no longer approved or denied).
    grant_request_ttl: int = Field(7 * 86400, ge=60, le=_MAX_TTL)
    # Pending grant requests an agent may have at once, for the same reason as step-ups:
    # each is a card on its human's page, and rows in the registry's tables.
    max_pending_grant_requests: int = Field(20, ge=1)
    audit_chains: int = Field(8, ge=1, le=256)
    # At least 1: at 0 the registry signed a checkpoint every half second, whatever
    # checkpoint_every_seconds said.
    checkpoint_every_events: int = Field(1000, ge=1)
    # At most a tenth of MAX_UNSEALED_AGE (300 s): a chain's events older than that under
    # no checkpoint fail `audit verify` and the approval page's check, as checkpoints
    # deleted or withheld would, so the registry must sign well within it.
    checkpoint_every_seconds: float = Field(10.0, gt=0, le=30.0)
    # Expired challenges, sessions and enrollment codes are deleted this often (anyone can
    # start a sign-in, so its challenges must not pile up).
    sweep_every_seconds: float = Field(60.0, gt=0)
    # Anonymous starts (passkey sign-up and sign-in, recovery, agent registration: anyone
    # may send them, and each stores a challenge or verifies a signature) are limited per
    # client address and for all clients together, in Redis so every replica counts the
    # same requests: at most `anonymous_client_limit` and `anonymous_global_limit` in any
    # `anonymous_limit_period` seconds (all at once if need be). Past them: 429 with
    # Retry-After, and nothing written. 30 a minute is many sign-in attempts for one
    # person; 1,200 (20 a second) is more than an organisation's people start at once.
    anonymous_client_limit: int = Field(30, ge=1, le=1_000_000)
    anonymous_global_limit: int = Field(1200, ge=1, le=1_000_000)
    anonymous_limit_period: int = Field(60, ge=1, le=86400)
    # Redis unreachable: each replica admits at most this many anonymous starts per period
    # in its own memory (the client limit too), so people can still sign in during an
    # outage, never without a limit. 0 refuses them all (503) until Redis is back.
    anonymous_fallback_limit: int = Field(60, ge=0, le=1_000_000)
    # Tokens minted for one grant: at most `token_limit` in any `token_limit_period` seconds
    # (all at once if need be), counted in Redis so every replica counts the same. Past it:
    # 429 with Retry-After, before anything is signed or written. An agent's SDK reuses a
    # token until near its expiry (`token_lifetime`, 300 s), so an honest agent needs a few
    # per grant per period, one per process; without a bound one agent (buggy, or its key
    # taken) could mint as fast as the registry signs, each token a row and an audit event,
    # and take the signing capacity every other agent shares.
    token_limit: int = Field(120, ge=1, le=1_000_000)
    token_limit_period: int = Field(300, ge=1, le=86400)
    # Unexpired challenges of anonymous ceremonies (sign-up, sign-in) at most, whatever the
    # limits above admit: the table's bound, kept by PostgreSQL itself. At the limits'
    # defaults (20 a second, challenges living `challenge_ttl` 300 s) 6,000 can exist.
    # Bounded: it is the count query's LIMIT (each start counts up to it under a lock), and
    # one past a bigint made every sign-up and sign-in start a 500.
    max_anonymous_challenges: int = Field(10_000, ge=1, le=1_000_000)
    # Unexpired challenges of one human's ceremonies (approvals, step-ups, passkey changes
    # and additions, recovery) at most: each begin stores one, an approval's with the whole
    # grant (up to 8 KiB), and a session could otherwise store them as fast as it can ask.
    # 100 is a begin every 3 s for a challenge's life (`challenge_ttl`, 300 s), far more
    # than a person clicks; past it, 429 with Retry-After until the oldest expires. A
    # recovery's begins are counted among themselves (a lost passkey's session can fill
    # the rest), so the total may reach twice this.
    max_human_challenges: int = Field(100, ge=1, le=100_000)
    # The proxies (addresses or networks) whose X-Forwarded-For names the client. A peer
    # outside them is the client itself, whatever header it sends; see docs/registry.md.
    trusted_proxies: tuple[str, ...] = ()
    # A rotated-in key is published this long before it signs (verifiers refresh JWKS).
    # Not negative: KeyRing.rotate refuses that, and only a rotation would find it out.
    key_publish_ahead: int = Field(60, ge=0, le=MAX_KEY_PUBLISH_AHEAD)
    signer: SignerSettings = SignerSettings()
    # Refused here rather than by asyncpg at the first start, in words naming no setting.
    pool_min_size: int = Field(1, ge=0)
    pool_max_size: int = Field(10, ge=1)

    @field_validator("database_url", "redis_url")
    @classmethod
    def _parseable(cls, url: str) -> str:
        return checked_url(url)

    @field_validator("issuer")
    @classmethod
    def _issuer(cls, issuer: str) -> str:
        return check_issuer(issuer)

    @field_validator("origins")
    @classmethod
    def _serialized_origins(cls, origins: tuple[str, ...]) -> tuple[str, ...]:
        # As browsers write them into client data, which is compared as a string.
        if not origins:
            raise ValueError("at least one origin may run passkey ceremonies")
        return tuple(dict.fromkeys(serialized_origin(o) for o in origins))

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, proxies: tuple[str, ...]) -> tuple[str, ...]:
        # strict: "10.0.0.1/8" is a typo for one or the other; refused rather than guessed.
        return tuple(str(ipaddress.ip_network(p.strip(), strict=True)) for p in proxies)

    @property
    def trusted_proxy_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(p) for p in self.trusted_proxies)

    @field_validator("rp_id")
    @classmethod
    def _domain_rp_id(cls, rp_id: str) -> str:
        return check_rp_id(rp_id, ())

    @model_validator(mode="after")
    def _rp_id_fits_origins(self) -> RegistrySettings:
        # Refused at start: otherwise every passkey ceremony fails, with nothing to say why.
        check_rp_id(self.rp_id, self.origins)
        return self

    @model_validator(mode="after")
    def _one_vault_token(self) -> RegistrySettings:
        # Here, not on SignerSettings: a deployment's signer settings name the backend and
        # leave the token to the environment, merged in by from_env. Refused at start: with
        # neither, every signature would be 403; with both, which one signs is a guess.
        signer = self.signer
        if signer.backend != "vault":
            return self
        given = [
            name
            for name, value in (
                ("vault_token", signer.vault_token),
                ("vault_token_file", signer.vault_token_file),
            )
            if value is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "signer backend vault needs exactly one of vault_token"
                " (AGENTAUTH_SIGNER_VAULT_TOKEN) and vault_token_file"
                " (AGENTAUTH_SIGNER_VAULT_TOKEN_FILE), got "
                + (" and ".join(given) if given else "neither")
            )
        if not (signer.vault_token or signer.vault_token_file or "").strip():
            raise ValueError(f"signer {given[0]} is empty")
        return self

    @model_validator(mode="after")
    def _signer_names_its_key(self) -> RegistrySettings:
        # Refused at start, like the Vault token above: a KMS, Vault or HSM signer without
        # its key's name opened a key literally named "None" (and a token without its
        # label, the first token found), failing later and far from the setting to blame.
        signer = self.signer
        if signer.backend == "local":
            return self
        if not (signer.key_id or "").strip():
            raise ValueError(
                f"signer backend {signer.backend} needs key_id (AGENTAUTH_SIGNER_KEY_ID):"
                " the key's name, ARN or alias in that backend"
            )
        if signer.backend == "pkcs11" and not (signer.pkcs11_token or "").strip():
            raise ValueError(
                "signer backend pkcs11 needs pkcs11_token (AGENTAUTH_SIGNER_PKCS11_TOKEN):"
                " the label of the token holding the key"
            )
        return self

    @model_validator(mode="after")
    def _caller_waits_fit_replica(self) -> RegistrySettings:
        # A per-caller bound above the replica's would never bind: a typo, refused.
        if self.step_up_waits_per_caller > self.step_up_waits_per_replica:
            raise ValueError("step_up_waits_per_caller exceeds step_up_waits_per_replica")
        return self

    @model_validator(mode="after")
    def _pool_sizes(self) -> RegistrySettings:
        if self.pool_min_size > self.pool_max_size:
            raise ValueError("pool_min_size exceeds pool_max_size")
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
        if "AGENTAUTH_TRUSTED_PROXIES" in env:
            proxies = env["AGENTAUTH_TRUSTED_PROXIES"].split(",")
            values["trusted_proxies"] = tuple(p for p in proxies if p.strip())
        values.update(overrides)
        return cls.model_validate(values)
