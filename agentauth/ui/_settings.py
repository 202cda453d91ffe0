"""The approval page's configuration: one typed object, read from the environment by
``from_env``."""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .._origins import check_rp_id, serialized_origin

__all__ = ["UISettings"]


class UISettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    registry_url: str = Field(
        description="Base URL of the registry's API, e.g. http://127.0.0.1:8000/registry."
    )
    # The exact origin browsers see. It must be one of the registry's `origins`: WebAuthn
    # binds every passkey assertion to it. `localhost` works over http for development.
    origin: str = "http://localhost:8080"
    rp_id: str = "localhost"
    # Approvals must prove the human was verified (PIN/biometric); mirrors the registry's
    # policy and is what the page's offline receipt check demands.
    require_user_verification: bool = True
    # The page's own sessions end with the registry's (12 h by default) or earlier.
    session_ttl: int = Field(12 * 3600, ge=60)
    # ...and after this long without the person's use (a page load or an action; the page's
    # own polls do not count): OWASP ASVS 4.0 V3.3.2 (level 2) asks for 30 minutes. A page
    # left open on a shared computer could otherwise enroll agents and revoke grants.
    session_idle_ttl: int = Field(1800, ge=60)
    # A login ticket only bridges the passkey ceremony to the new cookie: seconds suffice.
    ticket_ttl: int = Field(60, ge=5, le=600)
    # Registry calls are quick; a stuck registry must not hang a page forever.
    registry_timeout: float = Field(15.0, gt=0)
    # Longest a passkey prompt may stay open (the options carry their own timeout too).
    ceremony_timeout: float = Field(180.0, gt=0)
    # The audit page proves inclusion of at most this many events in one go (one proof
    # request each); the rest can be checked one by one.
    max_inclusion_checks: int = Field(200, ge=0)
    # The audit page reads an agent's newest events, at most this many a visit (one
    # registry request per 5,000): they are held in the page server's memory, and drawn as
    # table rows, for each open audit page. 5,000 is what it held before it read past the
    # registry's first page; older events are left unread, and the page says so.
    max_audit_events: int = Field(5000, ge=1, le=100_000)
    # The requests page looks for new requests this often (two light registry reads).
    poll_seconds: float = Field(5.0, gt=0)
    title: str = "AgentAuth"

    @field_validator("origin")
    @classmethod
    def _bare_origin(cls, origin: str) -> str:
        # As browsers write it into client data and the registry compares it.
        return serialized_origin(origin)

    @field_validator("rp_id")
    @classmethod
    def _domain_rp_id(cls, rp_id: str) -> str:
        return check_rp_id(rp_id, ())

    @model_validator(mode="after")
    def _rp_id_fits_origins(self) -> UISettings:
        # Refused at start: otherwise every passkey ceremony fails, with nothing to say why.
        check_rp_id(self.rp_id, (self.origin,))
        return self

    @model_validator(mode="after")
    def _idle_within_lifetime(self) -> UISettings:
        if self.session_idle_ttl > self.session_ttl:
            raise ValueError("session_idle_ttl must not exceed session_ttl")
        return self

    @property
    def secure_cookies(self) -> bool:
        """Cookies carry ``Secure`` when the page is served over https (not on http://localhost)."""
        return self.origin.startswith("https://")

    @property
    def host(self) -> str:
        """The Host header browsers send for ``origin`` (refusing others stops DNS rebinding)."""
        return urlsplit(self.origin).netloc

    @classmethod
    def from_env(cls, **overrides: object) -> UISettings:
        """Read ``AGENTAUTH_UI_*`` (and ``AGENTAUTH_RP_ID``) from the environment."""
        env = os.environ
        values: dict[str, object] = {}
        for name, key in (
            ("registry_url", "AGENTAUTH_UI_REGISTRY_URL"),
            ("origin", "AGENTAUTH_UI_ORIGIN"),
            ("rp_id", "AGENTAUTH_RP_ID"),
        ):
            if key in env:
                values[name] = env[key]
        values.update(overrides)
        return cls.model_validate(values)
