"""Grant requests and grants, and the grant hash a human's passkey signs.

The grant hash is SHA-256 over the RFC 8785 canonical JSON of the grant document. It is the
WebAuthn challenge of the approval, so the stored assertion proves which exact grant, down
to each limit, the human approved.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ._capabilities import (
    Action,
    AnyCapability,
    Capability,
    Transact,
    allowing_capability,
    capabilities_subset,
)
from ._currencies import check_amount
from ._encoding import b64url_encode, canonical_json
from ._envelope import Envelope
from ._errors import Forbidden
from ._receipts import ApprovalReceipt, VerifiedReceipt, verify_assertion
from ._types import Identifier

__all__ = ["GRANT_TYPE", "Grant", "GrantRequest", "check_money", "tighten", "verify_receipt"]

#: Domain separation: a grant document names its own type and version, so its hash cannot
#: collide with any other signed AgentAuth document.
GRANT_TYPE = "agentauth.grant.v1"
MAX_CAPABILITIES = 64


class GrantRequest(BaseModel):
    """What an agent asks of a provider: capabilities inside an envelope."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    agent_id: Identifier
    provider_id: Identifier
    capabilities: tuple[AnyCapability, ...] = Field(min_length=1, max_length=MAX_CAPABILITIES)
    envelope: Envelope = Field(default_factory=Envelope)


def tighten(
    request: GrantRequest,
    *,
    capabilities: tuple[AnyCapability, ...] | None = None,
    envelope: Envelope | None = None,
) -> GrantRequest:
    """The request as a human narrowed it before approving; widening raises ``Forbidden``."""
    new_caps = request.capabilities if capabilities is None else capabilities
    new_env = request.envelope if envelope is None else envelope
    if not new_caps or not capabilities_subset(new_caps, request.capabilities):
        raise Forbidden("capabilities may only be narrowed", reason="widening")
    if not new_env.is_within(request.envelope):
        raise Forbidden("the envelope may only be tightened", reason="widening")
    return request.model_copy(update={"capabilities": new_caps, "envelope": new_env})


def check_money(
    *, capabilities: Iterable[Capability] = (), envelope: Envelope | None = None
) -> None:
    """Refuse (``InvalidRequest``, reason ``amount_precision``) any amount of a grant that is
    finer than its currency's minor unit: a capability's ``max_amount`` and the envelope's
    limits and threshold.

    Called where a grant is asked for or approved, not when one is parsed: a document stored
    before this rule still loads (a verifier compares payable amounts against its limits,
    which only rounds them down in effect), and only a new approval is refused.
    """
    for i, capability in enumerate(capabilities):
        if isinstance(capability, Transact) and capability.max_amount is not None:
            assert capability.currency is not None  # the model keeps them together
            check_amount(
                capability.max_amount, capability.currency, field=f"capabilities[{i}].max_amount"
            )
    if envelope is None:
        return
    for name, money in (
        ("max_per_transaction", envelope.max_per_transaction),
        ("step_up_threshold", envelope.step_up_threshold),
    ):
        if money is not None:
            check_amount(money.amount, money.currency, field=f"envelope.{name}.amount")
    for i, spend in enumerate(envelope.spend_limits):
        check_amount(spend.amount, spend.currency, field=f"envelope.spend_limits[{i}].amount")


class Grant(BaseModel):
    """An approved (or to-be-approved) grant: exactly the document the human signs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    grant_id: Identifier
    agent_id: Identifier
    principal_id: Identifier = Field(description="The human who owns the agent and approves.")
    provider_id: Identifier
    audience: str = Field(min_length=1, max_length=512, description="The provider's token aud.")
    capabilities: tuple[AnyCapability, ...] = Field(min_length=1, max_length=MAX_CAPABILITIES)
    envelope: Envelope = Field(default_factory=Envelope)
    created_at: int = Field(ge=0, description="Unix time the grant document was made.")

    def document(self) -> dict[str, Any]:
        return {"type": GRANT_TYPE, **self.model_dump(mode="json", exclude_none=True)}

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> Grant:
        """Parse what ``document()`` produced (raises ValueError for another type)."""
        if document.get("type") != GRANT_TYPE:
            raise ValueError("not a grant document")
        return cls.model_validate({k: v for k, v in document.items() if k != "type"})

    def canonical_bytes(self) -> bytes:
        return canonical_json(self.document())

    def digest(self) -> bytes:
        """SHA-256 of the canonical document: the WebAuthn challenge for its approval."""
        return hashlib.sha256(self.canonical_bytes()).digest()

    def digest_b64(self) -> str:
        return b64url_encode(self.digest())

    def allows(self, action: Action) -> bool:
        return allowing_capability(self.capabilities, action) is not None


def verify_receipt(
    receipt: ApprovalReceipt,
    grant: Grant,
    *,
    rp_id: str,
    origin: str | Collection[str],
    require_uv: bool,
) -> VerifiedReceipt:
    """Check offline that ``receipt`` is a passkey assertion approving exactly ``grant``."""
    return verify_assertion(
        receipt, challenge=grant.digest(), rp_id=rp_id, origin=origin, require_uv=require_uv
    )
