"""JSON Schemas of the public documents, generated from the models that validate them."""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from ._audit import AuditEvent, Checkpoint
from ._audit_keys import AuditKeysDocument
from ._capabilities import Action, AnyCapability
from ._envelope import Envelope
from ._grants import Grant, GrantRequest
from ._receipts import ApprovalReceipt
from ._tokens import AccessTokenClaims

__all__ = ["json_schemas"]

_DOCUMENTS: dict[str, Any] = {
    "action": Action,
    "approval-receipt": ApprovalReceipt,
    "audit-event": AuditEvent,
    "audit-keys": AuditKeysDocument,
    "capability": AnyCapability,
    "checkpoint": Checkpoint,
    "envelope": Envelope,
    "grant": Grant,
    "grant-request": GrantRequest,
    "token-claims": AccessTokenClaims,
}


def json_schemas() -> dict[str, dict[str, Any]]:
    """Schema per document name (as committed under ``schemas/<name>.schema.json``)."""
    schemas = {}
    for name, model in _DOCUMENTS.items():
        # Validation mode: the schema says what we accept, which is what callers send.
        schema = TypeAdapter(model).json_schema(mode="validation")
        schema = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"https://agentauth.dev/schemas/{name}.schema.json",
            **schema,
        }
        schemas[name] = schema
    return schemas
