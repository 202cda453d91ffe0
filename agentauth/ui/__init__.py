"""The passkey approval page (NiceGUI on FastAPI), talking to the registry over HTTP.

A human signs in with a passkey, approves (or tightens, or denies) their agents' grant
requests and step-up payments by signing with the passkey, watches grants' use against
their limits, revokes tokens, grants and agents, and checks the audit trail. Start it with
``run_ui(UISettings(...))``, ``python -m agentauth.ui --registry-url ...``, or serve
``create_ui_app(...)`` with uvicorn (one worker). See docs/ui.md.
"""

from ._app import create_ui_app, run_ui
from ._audit import (
    AuditTrail,
    check_chains,
    check_checkpoints,
    check_consistency,
    check_inclusion,
    check_seen,
    consistency_needed,
    parse_events,
)
from ._registry import RegistryClient, RegistryError
from ._security import SecurityMiddleware, SessionStore
from ._settings import UISettings
from ._wording import describe_capability, describe_envelope, describe_step_up, money

__all__ = [
    "AuditTrail",
    "RegistryClient",
    "RegistryError",
    "SecurityMiddleware",
    "SessionStore",
    "UISettings",
    "check_chains",
    "check_checkpoints",
    "check_consistency",
    "check_inclusion",
    "check_seen",
    "consistency_needed",
    "create_ui_app",
    "describe_capability",
    "describe_envelope",
    "describe_step_up",
    "money",
    "parse_events",
    "run_ui",
]
