"""The page's client for the registry's HTTP API (httpx), as a signed-in human.

Every call carries the human's registry session token, which only this server process
holds. Errors come back as ``RegistryError`` with the registry's wire ``error`` and
``reason`` codes and a sentence fit to show the human.
"""

from __future__ import annotations

import asyncio
import json as jsonlib
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

import httpx

__all__ = ["EventHistory", "RegistryClient", "RegistryError"]

#: The most events the registry lists in one answer (docs/registry.md).
AUDIT_PAGE_MAX = 5000
#: The largest answer read from the registry. Its largest ones are a page of 5,000 audit
#: events (under 1 KiB each) and a person's grants (a few KiB each): a few MiB. A registry
#: answering more (or a body that never ends) is refused as it reaches this, before it
#: fills the page server's memory, which every signed-in person's page shares.
ANSWER_MAX_BYTES = 64 * 1024 * 1024
#: The most step-ups or grant requests it lists in one answer (docs/registry.md).
LIST_PAGE_MAX = 1000
#: The most rows the page reads of one such listing, following its pages: the pending ones
#: it shows are at most max_pending_* (20) a grant or agent, so ten full pages hold every
#: person's; past it the page shows the oldest, as a bound on one visit's work.
MAX_LISTED = 10_000

# What a human should read for the registry's reason codes; anything else shows the
# registry's own short description (it never carries secrets, see registry/_http.py).
_MESSAGES = {
    "widening": (
        "Refused: you can only tighten a request, never widen it. The registry rejected "
        "the changed limits because they would allow more than the agent asked for."
    ),
    "challenge_used": ("This approval was already used or has expired. Start the approval again."),
    "challenge_mismatch": (
        "The passkey signed something else than this request. Nothing was approved."
    ),
    "not_pending": "This request was already decided.",
    "expired": (
        "Nobody answered this in time, so it has expired and can no longer be decided. "
        "The agent has to ask again."
    ),
    "provider_suspended": (
        "The administrator has suspended this provider: nothing can be approved for it until "
        "it is reinstated."
    ),
    "agent_disabled": (
        "This agent has been disabled, so nothing can be approved for it any more. You can "
        "still refuse what it asked."
    ),
    "grant_revoked": "The grant behind this payment was revoked, so it can no longer be approved.",
    # A step-up's grant, or the grant a request would become (its end date has passed).
    "grant_expired": "The grant's end date has passed, so this can no longer be approved.",
    "already_expired": (
        "The end date you set has already passed: no token could be used under it. Choose a "
        "later one."
    ),
    "grant_too_large": (
        "This grant is too large for the access tokens providers accept (too many "
        "capabilities, long resource names or many limits), so it cannot be approved. Remove "
        "some limits, or refuse it so the agent asks for less."
    ),
    "currency_mismatch": (
        "Money limits must all be in one currency, the same as the payment capabilities': "
        "otherwise every payment would be refused. Nothing was approved."
    ),
    "bad_recovery": (
        "This recovery code does not work: it may be mistyped, used already or expired. Ask "
        "your administrator for a new one."
    ),
    "last_passkey": "You cannot remove your last passkey: add another one first.",
    "credential_flagged": (
        "This passkey is blocked because its signature counter went backwards (it may have "
        "been cloned). Use another passkey."
    ),
    "sign_count_regression": (
        "This passkey's signature counter went backwards (it may have been cloned); it is "
        "now blocked."
    ),
    "backup_eligibility_changed": (
        "This passkey now reports a different kind of storage (synced or single-device) than "
        "when it was first used here, which a genuine passkey never does. It was refused: use "
        "another passkey, and remove this one if it keeps happening."
    ),
    "invalid_backup_flags": (
        "This authenticator claims its passkey is synced while saying it cannot be. It was "
        "refused: use another authenticator."
    ),
    "unknown_credential": "This passkey is not registered to your account.",
    "bad_session": "Your session has ended. Please sign in again.",
    "missing_session": "Please sign in.",
    "signup_closed": "Sign-up is closed on this registry.",
    "duplicate_passkey": "This passkey is already registered.",
    "unsupported_key": (
        "This passkey's key type cannot sign approvals here (only Ed25519 and P-256 passkeys "
        "can). Use another authenticator."
    ),
    "credential_id_too_long": (
        "This authenticator made a passkey with an id longer than WebAuthn allows. Use "
        "another authenticator."
    ),
}


class RegistryError(Exception):
    """A refusal or failure from the registry (or of reaching it)."""

    def __init__(self, status: int, error: str, description: str, reason: str | None) -> None:
        super().__init__(f"{status} {error}{f'/{reason}' if reason else ''}: {description}")
        self.status = status
        self.error = error
        self.description = description
        self.reason = reason

    @property
    def message(self) -> str:
        """What the page tells the human."""
        if self.reason in _MESSAGES:
            return _MESSAGES[self.reason]
        if self.reason == "assertion_refused" and "verif" in self.description.lower():
            return (
                "Refused: the passkey did not verify you (PIN or biometric). This registry "
                "requires user verification for approvals."
            )
        if self.status == 0:
            return "The registry cannot be reached right now. Try again in a moment."
        if self.status >= 500:
            return "The registry failed to answer. Try again in a moment."
        return self.description[:300]

    @property
    def code(self) -> str:
        return f"{self.status} {self.error}" + (f" ({self.reason})" if self.reason else "")


class RegistryClient:
    """Typed calls to the registry; ``token`` is the human's session token."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 15.0,
        transport: httpx.AsyncBaseTransport | None = None,
        audit_page_size: int = AUDIT_PAGE_MAX,
        max_answer_bytes: int = ANSWER_MAX_BYTES,
        list_page_size: int = LIST_PAGE_MAX,
    ) -> None:
        if not 1 <= audit_page_size <= AUDIT_PAGE_MAX:
            raise ValueError(f"audit_page_size must be 1 to {AUDIT_PAGE_MAX}")
        if not 1 <= list_page_size <= LIST_PAGE_MAX:
            raise ValueError(f"list_page_size must be 1 to {LIST_PAGE_MAX}")
        self.base_url = base_url.rstrip("/")
        #: seconds one call may take in all, its answer's body read to the end
        self.timeout = timeout
        #: bytes an answer may hold (its body as decoded), see ANSWER_MAX_BYTES
        self.max_answer_bytes = max_answer_bytes
        #: events asked for in one request to ``GET /v1/audit/events``
        self.audit_page_size = audit_page_size
        #: step-ups or grant requests asked for in one request
        self.list_page_size = list_page_size
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=timeout,
            transport=transport,
            headers={"User-Agent": "agentauth-ui"},
            follow_redirects=False,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def call(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        json: Any = None,
        params: dict[str, str] | None = None,
        forwarded_for: str | None = None,
    ) -> Any:
        body, _ = await self._exchange(
            method, path, token=token, json=json, params=params, forwarded_for=forwarded_for
        )
        return body

    async def _exchange(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        json: Any = None,
        params: dict[str, str] | None = None,
        forwarded_for: str | None = None,
    ) -> tuple[Any, httpx.Response]:
        """The answer's JSON body, and the response for its headers."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if forwarded_for:
            # The browser's address, for the registry's limits on anonymous starts: the
            # page is a proxy for the person (docs/registry.md, "The client's address").
            headers["X-Forwarded-For"] = forwarded_for
        try:
            # httpx's timeout bounds each read, not the call: a registry sending its answer
            # a byte at a time would hold the call (and an approval's disabled buttons, or
            # a page being built) for as long as it liked. The deadline is for the whole.
            async with asyncio.timeout(self.timeout):
                response, raw = await self._read(
                    method, path, headers=headers, json=json, params=params
                )
        except (httpx.HTTPError, TimeoutError):
            raise RegistryError(0, "unreachable", "the registry cannot be reached", None) from None
        try:
            body = jsonlib.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: "[[[[…" nested past Python's stack
            if response.is_success:  # a page that cannot render would hide what the registry did
                raise RegistryError(
                    502, "invalid_response", "the registry's answer is not JSON", None
                ) from None
            body = {}
        if response.is_success:
            return body, response
        if not isinstance(body, dict):
            body = {}
        raise RegistryError(
            response.status_code,
            str(body.get("error", "error")),
            str(body.get("error_description", response.reason_phrase)),
            body.get("reason") if isinstance(body.get("reason"), str) else None,
        )

    async def _read(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str],
        json: Any,
        params: dict[str, str] | None,
    ) -> tuple[httpx.Response, bytes]:
        """The response and its body, read no further than ``max_answer_bytes``."""
        too_large = RegistryError(
            502, "invalid_response", "the registry's answer is too large", None
        )
        async with self._http.stream(
            method, path, headers=headers, json=json, params=params
        ) as response:
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self.max_answer_bytes:
                raise too_large
            body = bytearray()
            # Decoded bytes are counted: a small gzip body can unpack to gigabytes.
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > self.max_answer_bytes:
                    raise too_large
            return response, bytes(body)

    # --- public --------------------------------------------------------------------------

    async def audit_keys(self) -> dict[str, Any]:
        """Every key the registry has signed checkpoints with, and when (never dropped)."""
        result: dict[str, Any] = await self.call("GET", "/.well-known/agentauth-audit-keys.json")
        return result

    # --- passkeys and sessions -----------------------------------------------------------

    async def signup_begin(
        self, display_name: str, *, forwarded_for: str | None = None
    ) -> dict[str, Any]:
        result: dict[str, Any] = await self.call(
            "POST",
            "/v1/signup/begin",
            json={"display_name": display_name},
            forwarded_for=forwarded_for,
        )
        return result

    async def signup_finish(self, credential: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self.call(
            "POST", "/v1/signup/finish", json={"credential": credential}
        )
        return result

    async def login_begin(self, *, forwarded_for: str | None = None) -> dict[str, Any]:
        result: dict[str, Any] = await self.call(
            "POST", "/v1/sessions/begin", forwarded_for=forwarded_for
        )
        return result

    async def login_finish(self, credential: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self.call(
            "POST", "/v1/sessions/finish", json={"credential": credential}
        )
        return result

    async def recovery_begin(
        self, code: str, *, forwarded_for: str | None = None
    ) -> dict[str, Any]:
        result: dict[str, Any] = await self.call(
            "POST", "/v1/recovery/begin", json={"code": code}, forwarded_for=forwarded_for
        )
        return result

    async def recovery_finish(self, code: str, credential: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self.call(
            "POST", "/v1/recovery/finish", json={"code": code, "credential": credential}
        )
        return result

    async def logout(self, token: str) -> None:
        await self.call("DELETE", "/v1/sessions/current", token=token)

    async def passkeys(self, token: str) -> list[dict[str, Any]]:
        return _rows(await self.call("GET", "/v1/passkeys", token=token), key="credential_id")

    async def passkey_confirm(self, token: str, credential_id: str | None = None) -> dict[str, Any]:
        """Options for a passkey to confirm adding one, or removing ``credential_id``."""
        change = {"change": "remove", "credential_id": credential_id} if credential_id else {}
        result: dict[str, Any] = await self.call(
            "POST", "/v1/passkeys/confirm", token=token, json=change or {"change": "add"}
        )
        return result

    async def passkey_begin(self, token: str, confirmation: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self.call(
            "POST", "/v1/passkeys/begin", token=token, json={"credential": confirmation}
        )
        return result

    async def passkey_finish(self, token: str, credential: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self.call(
            "POST", "/v1/passkeys/finish", token=token, json={"credential": credential}
        )
        return result

    async def remove_passkey(
        self, token: str, credential_id: str, confirmation: dict[str, Any]
    ) -> None:
        await self.call(
            "DELETE",
            f"/v1/passkeys/{_seg(credential_id)}",
            token=token,
            json={"credential": confirmation},
        )

    # --- agents --------------------------------------------------------------------------

    async def agents(self, token: str) -> list[dict[str, Any]]:
        # The agents and audit pages draw each agent by its name as well as its id.
        return _rows(await self.call("GET", "/v1/agents", token=token), also=("name",))

    async def enrollment(self, token: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.call("POST", "/v1/enrollments", token=token)
        return result

    async def disable_agent(self, token: str, agent_id: str) -> None:
        await self.call("POST", f"/v1/agents/{_seg(agent_id)}/disable", token=token)

    # --- grant requests and grants -------------------------------------------------------

    async def grant_requests(self, token: str, status: str | None = None) -> list[dict[str, Any]]:
        return await self._listing(token, "/v1/grant-requests", status)

    async def approval_begin(
        self, token: str, request_id: str, narrowed: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        result: dict[str, Any] = await self.call(
            "POST",
            f"/v1/grant-requests/{_seg(request_id)}/approval/begin",
            token=token,
            json=narrowed or None,
        )
        return result

    async def approval_finish(
        self, token: str, request_id: str, credential: dict[str, Any]
    ) -> dict[str, Any]:
        result: dict[str, Any] = await self.call(
            "POST",
            f"/v1/grant-requests/{_seg(request_id)}/approval/finish",
            token=token,
            json={"credential": credential},
        )
        return result

    async def deny_request(self, token: str, request_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.call(
            "POST", f"/v1/grant-requests/{_seg(request_id)}/deny", token=token
        )
        return result

    async def grants(self, token: str) -> list[dict[str, Any]]:
        return _rows(await self.call("GET", "/v1/grants", token=token))

    async def grant(self, token: str, grant_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.call("GET", f"/v1/grants/{_seg(grant_id)}", token=token)
        return result

    async def usage(self, token: str, grant_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.call(
            "GET", f"/v1/grants/{_seg(grant_id)}/usage", token=token
        )
        return result

    async def revoke(self, token: str, kind: str, target: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.call(
            "POST", "/v1/revocations", token=token, json={"kind": kind, "target": target}
        )
        return result

    # --- step-ups ------------------------------------------------------------------------

    async def step_ups(self, token: str, status: str | None = None) -> list[dict[str, Any]]:
        return await self._listing(token, "/v1/step-ups", status)

    async def step_up_begin(self, token: str, step_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.call(
            "POST", f"/v1/step-ups/{_seg(step_id)}/approval/begin", token=token
        )
        return result

    async def step_up_finish(
        self, token: str, step_id: str, credential: dict[str, Any]
    ) -> dict[str, Any]:
        result: dict[str, Any] = await self.call(
            "POST",
            f"/v1/step-ups/{_seg(step_id)}/approval/finish",
            token=token,
            json={"credential": credential},
        )
        return result

    async def step_up_deny(self, token: str, step_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.call(
            "POST", f"/v1/step-ups/{_seg(step_id)}/deny", token=token
        )
        return result

    async def grant_tokens(self, token: str, grant_id: str) -> list[tuple[str, int]]:
        """The grant's tokens in use, as (jti, expires_at), soonest to expire first."""
        rows = _rows(
            await self.call("GET", f"/v1/grants/{_seg(grant_id)}/tokens", token=token), key="jti"
        )
        if not all(type(row.get("expires_at")) is int for row in rows):
            raise RegistryError(502, "invalid_response", "the registry's list is malformed", None)
        return [(row["jti"], row["expires_at"]) for row in rows]

    async def _listing(self, token: str, path: str, status: str | None) -> list[dict[str, Any]]:
        """A listing of step-ups or grant requests, oldest first, read ``list_page_size`` at
        a time, each page after the first at the cursor of its ``Link: rel="next"``, up to
        MAX_LISTED rows. Only the cursor is taken from the link (see newest_audit_events);
        any page's failure raises: a list that stops short would hide what waits."""
        base = {"status": status} if status else {}
        read: list[dict[str, Any]] = []
        cursor: str | None = None
        # Bounded in requests as in rows, as newest_audit_events is.
        for _ in range(-(-MAX_LISTED // self.list_page_size)):
            params = {**base, "limit": str(min(self.list_page_size, MAX_LISTED - len(read)))}
            if cursor is not None:
                params["cursor"] = cursor
            answer, response = await self._exchange("GET", path, token=token, params=params)
            read += _rows(answer)
            named = _next_query(response)
            cursor = None if named is None else named.get("cursor")
            if cursor is None or len(read) >= MAX_LISTED:
                break
        return read

    # --- audit ---------------------------------------------------------------------------

    async def newest_audit_events(self, token: str, agent_id: str, *, most: int) -> EventHistory:
        """The agent's newest ``most`` events at most, asked newest first (``order=desc``)
        ``audit_page_size`` at a time, each page after the first at the cursor of its
        ``Link: rel="next"``.

        Only the cursor is taken from the link: the request is built here, so a link naming
        another host or path never gets the session token. The first page's failure
        raises; a later one's ends the reading, with what was read and the error.
        """
        page = self.audit_page_size
        base = {"agent_id": agent_id, "order": "desc"}
        read: list[Any] = []
        cursor: str | None = None
        # Bounded in requests as in events: the registry fills each page but the last, and
        # one answering short pages (or empty ones with a next) cannot keep the page reading.
        for _ in range(-(-most // page)):
            params = {**base, "limit": str(min(page, most - len(read)))}
            if cursor is not None:
                params["cursor"] = cursor
            try:
                answer, response = await self._exchange(
                    "GET", "/v1/audit/events", token=token, params=params
                )
            except RegistryError as exc:
                if cursor is None:
                    raise
                return EventHistory(read[::-1], "older", exc)
            if not isinstance(answer, list):
                if cursor is None:  # shown as the malformed list it is (parse_events)
                    return EventHistory(answer, None)
                malformed = RegistryError(
                    502, "invalid_response", "the registry's event list is malformed", None
                )
                return EventHistory(read[::-1], "older", malformed)
            read += answer
            try:
                named = _next_query(response)
            except RegistryError as exc:  # what was read is shown; the rest cannot be
                return EventHistory(read[::-1], "older", exc)
            if named is None:
                return EventHistory(read[::-1], None)
            if named.get("order") != "desc":
                # A registry from before 2026-11-30 ignores order=desc: what it answered
                # are the oldest events, and the ones it would list next newer.
                return EventHistory(read, "newer")
            cursor = named.get("cursor")
            if cursor is None or len(read) >= most:
                break
        return EventHistory(read[::-1], "older")

    async def audit_proof(self, token: str, chain: str, seq: int) -> dict[str, Any]:
        result: dict[str, Any] = await self.call(
            "GET", f"/v1/audit/events/{_seg(chain)}/{int(seq)}/proof", token=token
        )
        return result

    async def checkpoints(self, token: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self.call("GET", "/v1/audit/checkpoints", token=token)
        return result

    async def audit_consistency(
        self, token: str, chain: str, first: int, second: int
    ) -> dict[str, Any]:
        result: dict[str, Any] = await self.call(
            "GET",
            "/v1/audit/consistency",
            token=token,
            params={"chain": chain, "first": str(int(first)), "second": str(int(second))},
        )
        return result


@dataclass(frozen=True, slots=True)
class EventHistory:
    """An agent's events as read, oldest first (or the first answer as it came, when it is
    no list), and what was left unread."""

    events: Any
    #: None: the whole history was read; "older" or "newer": the unread events are those
    unread: Literal["older", "newer"] | None
    #: the failure that stopped the reading after the first page, if one did
    error: RegistryError | None = None


def _rows(answer: Any, key: str = "id", also: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """A listing as the pages read it: a JSON array of objects, each with a string ``key``
    (and strings under ``also``). Anything else is the registry's failure, said in the
    page's notice, not an exception that fails the whole page (NiceGUI's 500, naming the
    exception)."""
    if not isinstance(answer, list) or not all(
        isinstance(row, dict) and all(isinstance(row.get(k), str) for k in (key, *also))
        for row in answer
    ):
        raise RegistryError(502, "invalid_response", "the registry's list is malformed", None)
    return answer


def _next_query(response: httpx.Response) -> httpx.QueryParams | None:
    """The query of the answer's ``Link: rel="next"``, None when it has none. A target that
    is no URL is the registry's failure: httpx's InvalidURL is no HTTPError, and raised
    from here it failed the page being built (NiceGUI's 500) or each poll."""
    following = response.links.get("next", {}).get("url")
    if following is None:
        return None
    try:
        return httpx.URL(following).params
    except httpx.InvalidURL:
        raise RegistryError(
            502, "invalid_response", "the registry's link to the next page is malformed", None
        ) from None


def _seg(value: str) -> str:
    """One path segment: ids come from the registry, but never let one change the path."""
    return quote(value, safe="")
