"""Turn a server's error body into the protocol's error tree, keeping code and reason."""

from __future__ import annotations

from typing import Any

import httpx

from ..protocol import AgentAuthError, RateLimited, ReplayDetected, Unauthenticated

__all__ = ["error_from_response"]

# The registry's replay-cache refusals. Its token endpoint sends them as invalid_dpop_proof,
# the code RFC 6749 §5.2 answers may carry there (RFC 9449 §5), with one of these reasons;
# they are raised as ReplayDetected, as before and as the registry's other routes send them.
_REPLAY_REASONS = frozenset({"jti_reused", "too_old", "replay_cache_reset"})
# And a caller it does not know (no proof, a key of no agent) as invalid_client (RFC 6749
# §5.2), raised as Unauthenticated, as the registry's other routes send it.
_TOKEN_ENDPOINT_CODES = {"invalid_client": Unauthenticated}


def _classes() -> dict[str, type[AgentAuthError]]:
    found: dict[str, type[AgentAuthError]] = {}
    pending: list[type[AgentAuthError]] = [AgentAuthError]
    while pending:
        cls = pending.pop()
        found.setdefault(cls.error, cls)
        pending.extend(cls.__subclasses__())
    return found


class ServerError(AgentAuthError):
    """An error code this SDK does not know; ``code`` carries the server's code (``error``
    stays the class's own, ``server_error``) and ``status`` the HTTP status."""

    def __init__(self, code: str, description: str, *, status: int, reason: str | None) -> None:
        super().__init__(description, reason=reason)
        self.code = code
        self.status = status


def error_from_response(response: httpx.Response) -> AgentAuthError:
    try:
        body: Any = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    # Strings only: a gateway in front of the registry may answer in its own form
    # ({"error": {"code": 502, ...}}), which is no code of the tree, and no description.
    code, description, reason = (
        value if isinstance(value, str) else None
        for value in (body.get("error"), body.get("error_description"), body.get("reason"))
    )
    description = description or f"HTTP {response.status_code}"
    cls = _classes().get(code or "") or _TOKEN_ENDPOINT_CODES.get(code or "")
    if code == "invalid_dpop_proof" and reason in _REPLAY_REASONS:
        cls = ReplayDetected
    if cls is None or cls.__name__ == "UseDPoPNonce":
        return ServerError(
            code or "server_error", description, status=response.status_code, reason=reason
        )
    if issubclass(cls, RateLimited):
        return cls(description, retry_after=_retry_after(response), reason=reason)
    return cls(description, reason=reason)


def _retry_after(response: httpx.Response) -> int:
    """Retry-After in seconds, as the registry sends it; 1 when absent or an HTTP date."""
    value = response.headers.get("retry-after", "")
    return int(value) if value.isascii() and value.isdigit() else 1
