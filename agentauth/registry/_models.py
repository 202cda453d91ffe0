"""Request and response bodies of the registry's HTTP API."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from ..protocol import AnyCapability, Envelope, Read
from ..protocol._text import check_display_text
from ..protocol._types import Amount, Currency, Identifier, ResourceName

__all__ = [
    "AgentIn",
    "ApprovalBeginIn",
    "CredentialIn",
    "GrantRequestIn",
    "PasskeyChangeIn",
    "ProviderIn",
    "RecoveryCodeIn",
    "RecoveryFinishIn",
    "RecoveryIn",
    "RevocationIn",
    "SecretRotationIn",
    "SignupIn",
    "StepUpIn",
    "SuspensionIn",
    "TokenIn",
]


class _In(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# A name the approval page shows a person: no control or format characters (see _text).
_DisplayName = Annotated[
    str, Field(min_length=1, max_length=128), AfterValidator(check_display_text)
]


class SignupIn(_In):
    # The passkey's user.displayName too: the platform's passkey picker shows it.
    display_name: _DisplayName


class CredentialIn(_In):
    """A WebAuthn credential as the browser's JSON serialization gives it."""

    credential: dict[str, Any]


class PasskeyChangeIn(_In):
    """A change to the human's passkeys, to be confirmed with one of them: adding one, or
    removing ``credential_id``."""

    change: Literal["add", "remove"]
    # As long as registration takes one: WebAuthn's 1023 bytes are 1364 base64url characters
    # (until 2026-12-01 the cap was 1024, and a passkey with a longer id stayed for good).
    credential_id: str | None = Field(None, min_length=1, max_length=1364)

    @model_validator(mode="after")
    def _names_what_it_removes(self) -> PasskeyChangeIn:
        if (self.change == "remove") != (self.credential_id is not None):
            raise ValueError("credential_id is given exactly when removing")
        return self

    @property
    def subject(self) -> str:
        return "add" if self.change == "add" else f"remove:{self.credential_id}"


class RecoveryIn(_In):
    """The human (principal id) the admin issues a recovery code for."""

    principal_id: Identifier


class RecoveryCodeIn(_In):
    # Secrets stay out of reprs (and so out of logs and error reports), here as elsewhere.
    code: str = Field(min_length=16, max_length=128, repr=False)


class RecoveryFinishIn(RecoveryCodeIn):
    """The recovery code and the new passkey's registration, from the sign-in page."""

    credential: dict[str, Any]


class AgentIn(_In):
    name: _DisplayName
    public_jwk: dict[str, Any]
    enrollment_code: str = Field(min_length=16, max_length=128, repr=False)


def _basic_user_id(value: str) -> str:
    # A provider's id is the user-id of its Basic credentials, which cannot hold a colon
    # (RFC 7617 §2: the first colon ends it): such a provider could never authenticate.
    if ":" in value:
        raise ValueError("a provider id cannot contain ':' (it is a Basic credential's user-id)")
    return value


class ProviderIn(_In):
    id: Annotated[Identifier, AfterValidator(_basic_user_id)]
    audience: Annotated[
        str, Field(min_length=1, max_length=512), AfterValidator(check_display_text)
    ]
    display_name: _DisplayName
    allowed_kinds: tuple[Literal["read", "write", "transact", "custom"], ...] = Field(min_length=1)


class GrantRequestIn(_In):
    provider_id: Identifier
    capabilities: tuple[AnyCapability, ...] = Field(min_length=1, max_length=64)
    envelope: Envelope = Field(default_factory=Envelope)

    @field_validator("capabilities")
    @classmethod
    def _readable_filters(
        cls, capabilities: tuple[AnyCapability, ...]
    ) -> tuple[AnyCapability, ...]:
        # A read filter is shown to the person verbatim, quoted inside a sentence.
        for capability in capabilities:
            if isinstance(capability, Read) and capability.filter is not None:
                check_display_text(capability.filter)
        return capabilities


class ApprovalBeginIn(_In):
    """Optionally narrow what is approved. Each field given replaces the request's whole
    (the capability list, or the envelope with every limit it keeps), and must be within
    it; a field left out keeps the request's."""

    capabilities: tuple[AnyCapability, ...] | None = Field(None, min_length=1, max_length=64)
    envelope: Envelope | None = None


class TokenIn(_In):
    grant_id: Identifier


class RevocationIn(_In):
    kind: Literal["token", "grant", "agent"]
    target: str = Field(min_length=1, max_length=128)


class SecretRotationIn(_In):
    """A provider credential's rotation: how long the secret being replaced keeps working,
    so the provider can roll the new one out without a gap (0: it stops at once)."""

    previous_valid_for: int = Field(3600, strict=True, ge=0, le=7 * 86400)


class SuspensionIn(_In):
    """Why the admin suspends a provider: kept with the suspension and in its audit event."""

    reason: str = Field(strict=True, min_length=1, max_length=200)


class StepUpIn(_In):
    grant_id: Identifier
    resource: ResourceName
    amount: Amount
    currency: Currency
    payee: Identifier | None = None
