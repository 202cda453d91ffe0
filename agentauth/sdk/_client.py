"""The agent SDK: register, ask for grants, wait for approval, sign requests.

Async first (``AgentAuthClient``); ``AgentAuthClientSync`` wraps it for plain scripts.
The agent's private key lives in a file created with mode 0600 (or is supplied by the
caller); the agent id is kept beside it, so a registered agent starts ready to work.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import math
import os
import time
from collections.abc import AsyncGenerator, Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urljoin

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from pydantic import ValidationError

from ..keys import SignerUnavailable
from ..keys._local import _create as _create_key_file
from ..keys._local import _read_private as _read_key_file
from ..protocol import (
    AgentAuthError,
    Capability,
    DependencyUnavailable,
    Envelope,
    Forbidden,
    Money,
    NotFound,
    PrivateKey,
    RateLimited,
    check_amount,
    check_money,
    create_dpop_proof,
)
from ._auth import STEP_UP_HEADER, DPoPAuth, htu_of
from ._errors import ServerError, error_from_response

__all__ = ["AgentAuthClient", "AgentAuthClientSync", "Approval", "GrantPending"]

DEFAULT_HOME = Path(os.environ.get("AGENTAUTH_AGENT_HOME", Path.home() / ".agentauth" / "agent"))
# The registry holds a step-up poll open for ``wait`` seconds (30 at most): the read must
# last longer than that, or every unanswered poll ends in a ReadTimeout. 15 s on top leaves
# room for a slow network without waiting on a dead connection for long.
_STEP_UP_WAIT = 25.0
_STEP_UP_READ_MARGIN = 15.0
# After a poll fails on the way (a timeout, a dropped connection), wait this long and poll
# the same step-up again: the human may still be answering it.
_STEP_UP_RETRY_PAUSE = 1.0
# With less than this left before the deadline, stop waiting instead of polling again: such
# a poll is mostly its round trip and its signed proof, and back-to-back ones would hammer
# the registry for nothing.
_STEP_UP_MIN_POLL = 0.1
# After a provider's refusal let a token go, the next refusal does so only this much later.
_REISSUE_PAUSE = 30.0


def _unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says the registry could not answer just now (unreachable, a
    dependency or a gateway down, too busy), not that it refused: worth asking again."""
    if isinstance(exc, httpx.TransportError | DependencyUnavailable | RateLimited):
        return True
    # AgentAuthError itself is the registry's own 500 (server_error).
    return type(exc) is AgentAuthError or (isinstance(exc, ServerError) and exc.status >= 500)


def _check_payable(amount: str, currency: str) -> None:
    """Refuse an amount finer than its currency's minor unit before anything is sent."""
    try:
        money = Money.model_validate({"amount": amount, "currency": currency})
    except ValidationError:
        return  # malformed: the registry's answer names what is wrong
    check_amount(money.amount, money.currency)


@dataclass(frozen=True, slots=True)
class GrantPending:
    """A grant request waiting for its human."""

    id: str
    provider_id: str
    status: str


@dataclass(frozen=True, slots=True)
class Approval:
    grant_id: str
    provider_id: str
    document: dict[str, Any]


@dataclass
class _Token:
    value: str = field(repr=False)  # a bearer of the grant, for whoever also holds the key
    expires_at: float
    grant_id: str
    grant_expires_at: int | None = None  # the grant's envelope expires_at, if it has one
    lifetime: float = math.inf  # expires_in as issued


def _load_or_create_key(path: Path, alg: Literal["ES256", "Ed25519"]) -> PrivateKey:
    try:
        try:
            # Read as the registry reads its own key (LocalFileSigner): O_NOFOLLOW, then
            # fstat on the open file. A symlink planted at the path, a file another user
            # owns (who knows or can replace the key), or a FIFO (whose read waits for ever)
            # is refused, not signed with; so is a file group or others can read.
            pem = _read_key_file(path)
        except FileNotFoundError:
            # The registry's own way too: written whole and 0600 to a temporary file, then
            # linked into place. Agents started together on one home all end up with the
            # one key that was linked first, none reads a half-written file, and a crash
            # leaves no empty key behind.
            pem = _create_key_file(path, alg)
    except SignerUnavailable as exc:  # the registry's error; to the agent, a bad file
        raise PermissionError(exc.description) from None
    loaded = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(loaded, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        raise ValueError(f"{path} holds an unsupported key type")
    return PrivateKey(loaded)


class AgentAuthClient:
    """An agent's connection to the AgentAuth registry.

    ``key`` supplies the agent key directly; otherwise it is loaded from (or created in)
    ``home``/agent-key.pem. ``clock`` is injectable for tests of token refresh.
    """

    def __init__(
        self,
        registry_url: str,
        *,
        key: PrivateKey | None = None,
        home: str | Path | None = None,
        alg: Literal["ES256", "Ed25519"] = "ES256",
        agent_id: str | None = None,
        http: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
        refresh_margin: float = 30.0,
        timeout: float = 10.0,
    ) -> None:
        self.registry_url = registry_url.rstrip("/")
        self.home = Path(home) if home is not None else DEFAULT_HOME
        self.key = key or _load_or_create_key(self.home / "agent-key.pem", alg)
        self._agent_id = agent_id
        self._http = http or httpx.AsyncClient(timeout=timeout)
        self._owns_http = http is None
        self._clock = clock
        self._refresh_margin = refresh_margin
        self._tokens: dict[str, _Token] = {}
        # Step-ups this client asked for and is still waiting on, by what they approve: a
        # repeated call (after a TimeoutError, say) waits on the same one, never a second.
        self._pending_step_ups: dict[tuple[str, str, str, str, str | None], str] = {}
        self._audiences: dict[str, str] = {}
        self._renewals: dict[str, asyncio.Future[_Token]] = {}  # in flight, by provider
        self._refused_at: dict[str, float] = {}  # when a refusal last let a token go

    # --- plumbing --------------------------------------------------------------------------

    @property
    def agent_id(self) -> str | None:
        if self._agent_id is None:
            state = self.home / "agent.json"
            if state.exists():
                saved = json.loads(state.read_text())
                if saved.get("jkt") == self.key.thumbprint:
                    self._agent_id = str(saved["agent_id"])
        return self._agent_id

    async def _call(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        read_timeout: float | None = None,
    ) -> Any:
        """A registry call signed with a fresh DPoP proof by the agent's key; ``read_timeout``
        replaces the client's for a call the registry may hold open (a long poll)."""
        url = self.registry_url + path
        proof = create_dpop_proof(self.key, htm=method, htu=htu_of(url), now=self._clock())
        timeout = self._http.timeout
        if read_timeout is not None:
            timeout = httpx.Timeout(
                connect=timeout.connect, read=read_timeout, write=timeout.write, pool=timeout.pool
            )
        # Never followed, whatever the caller's client is set to: httpx would send the same
        # DPoP header on to wherever the Location points, another origin included, and a
        # registry proof carries no token hash, so whoever gets it may present it to the
        # registry with a body of their choosing (a grant request, say) until it is too old.
        response = await self._http.request(
            method,
            url,
            json=json_body,
            headers={"DPoP": proof},
            timeout=timeout,
            follow_redirects=False,
        )
        if not response.is_success:  # a redirect too: the registry sends none
            raise error_from_response(response)
        return response.json()

    async def aclose(self) -> None:
        # A renewal runs on when its callers give up (others may share it), but not past
        # the client: it would ask through a closed client, or be dropped by a closed loop.
        renewals = list(self._renewals.values())
        for renewal in renewals:
            renewal.cancel()
        await asyncio.gather(*renewals, return_exceptions=True)
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AgentAuthClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- registration and grants -------------------------------------------------------

    async def register(self, *, enrollment_code: str, name: str = "agent") -> str:
        """Register this agent's key under the human who issued ``enrollment_code``."""
        body = {
            "name": name,
            "public_jwk": self.key.public_jwk(),
            "enrollment_code": enrollment_code,
        }
        result = await self._call("POST", "/v1/agents", json_body=body)
        self._agent_id = str(result["id"])
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        state = json.dumps({"agent_id": self._agent_id, "jkt": self.key.thumbprint})
        _replace_file(self.home / "agent.json", state.encode())
        return self._agent_id

    async def request_grant(
        self,
        service_provider_id: str,
        capabilities: Sequence[Capability],
        *,
        envelope: Envelope | dict[str, Any] | None = None,
    ) -> GrantPending:
        """Ask the human for capabilities at a provider; returns the pending request.

        Raises ``InvalidRequest`` (reason ``amount_precision``) before asking when an amount
        is finer than its currency's minor unit (USD 0.005), as the registry would."""
        checked = envelope
        if isinstance(checked, dict):
            try:
                checked = Envelope.model_validate(checked)
            except ValidationError:
                checked = None  # malformed: the registry's answer names what is wrong
        check_money(capabilities=capabilities, envelope=checked)
        if isinstance(envelope, Envelope):
            envelope = envelope.model_dump(mode="json", exclude_none=True)
        body: dict[str, Any] = {
            "provider_id": service_provider_id,
            "capabilities": [c.to_document() for c in capabilities],
        }
        if envelope is not None:
            body["envelope"] = envelope
        result = await self._call("POST", "/v1/grant-requests", json_body=body)
        return GrantPending(result["id"], result["provider_id"], result["status"])

    async def wait_for_approval(
        self,
        request: GrantPending | str,
        *,
        timeout: float = 300.0,
        interval: float = 1.0,
        max_interval: float = 10.0,
        on_progress: Callable[[str, float], None] | None = None,
    ) -> Approval:
        """Poll until the human decides, with backoff; raise ``Forbidden`` (reason
        ``denied`` or ``expired``) if the request is refused or left unanswered too long,
        ``agent_disabled`` if this agent was disabled meanwhile (it can no longer read the
        request, which its human sees ``cancelled``). A registry that cannot answer
        (unreachable, ``temporarily_unavailable``, ``rate_limited``, a 5xx) is polled again
        until ``timeout``, and its failure raised only if it never answered."""
        request_id = request.id if isinstance(request, GrantPending) else request
        deadline = time.monotonic() + timeout
        while True:
            try:
                state = await self._call("GET", f"/v1/grant-requests/{request_id}")
            except Exception as exc:
                # The registry restarting or overloaded is no answer: the human may still be
                # deciding. Its failure is raised only if it never answered in time.
                if not _unavailable(exc) or time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(min(interval, max(0.0, deadline - time.monotonic())))
                interval = min(interval * 1.5, max_interval)
                continue
            if on_progress is not None:
                on_progress(state["status"], max(0.0, deadline - time.monotonic()))
            if state["status"] == "approved":
                grant = await self._call("GET", f"/v1/grants/{state['grant_id']}")
                return Approval(grant["id"], grant["provider_id"], grant["document"])
            if state["status"] == "denied":
                raise Forbidden("the human denied the request", reason="denied")
            if state["status"] == "expired":
                raise Forbidden("nobody answered the request in time", reason="expired")
            # Only an agent disabled meanwhile cancels a request, and the registry refuses
            # that agent's poll (agent_disabled) before it could see this: kept in case.
            if state["status"] == "cancelled":
                raise Forbidden("the request no longer stands", reason="cancelled")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"grant request {request_id} still pending")
            await asyncio.sleep(min(interval, max(0.0, deadline - time.monotonic())))
            interval = min(interval * 1.5, max_interval)

    async def _grant_for(self, service_provider_id: str, *, now: float) -> dict[str, Any]:
        """The newest grant for the provider that the registry would issue a token for."""
        grants = await self._call("GET", "/v1/grants")
        active = [
            g for g in grants if g["provider_id"] == service_provider_id and not g["revoked_at"]
        ]
        if not active:
            raise Forbidden(f"no approved grant for {service_provider_id}", reason="no_grant")
        # The listing keeps expired grants (and those of a suspended provider), which the
        # registry refuses: a newer one of those must not hide an older grant still good.
        usable = [
            g for g in active if not g.get("provider_suspended") and not _grant_expired(g, now=now)
        ]
        # With none usable, the newest is asked for all the same: the registry's refusal
        # (grant_expired, provider_suspended) says why better than no_grant would.
        newest: dict[str, Any] = (usable or active)[-1]  # listed oldest approval first
        return newest

    # --- tokens and signed requests -----------------------------------------------------

    async def get_token(self, service_provider_id: str) -> str:
        """A current access token for the provider: cached, renewed before it expires.

        Callers that find the token due together share one renewal, and its failure: with
        the registry down, each asking again in turn would keep the last waiting a timeout
        per caller ahead of it. A token is renewed early so that a registry that cannot
        answer just then costs nothing: until it expires, the token still serves.
        """
        cached = self._tokens.get(service_provider_id)
        if cached and self._fresh(cached, now=self._clock()):
            return cached.value
        renewal = self._renewals.get(service_provider_id)
        if renewal is None:
            renewal = asyncio.ensure_future(self._issue_token(service_provider_id))
            self._renewals[service_provider_id] = renewal
            renewal.add_done_callback(functools.partial(self._renewed, service_provider_id))
        try:
            # Shielded: a caller that gives up must not cancel the renewal others wait on.
            return (await asyncio.shield(renewal)).value
        except Exception as exc:
            still_cached = self._tokens.get(service_provider_id) is cached
            if (
                cached is not None
                and still_cached  # not let go meanwhile after a provider's refusal
                and cached.expires_at > self._clock()
                and _unavailable(exc)
            ):
                return cached.value
            raise

    def _renewed(self, service_provider_id: str, renewal: asyncio.Future[_Token]) -> None:
        if self._renewals.get(service_provider_id) is renewal:
            del self._renewals[service_provider_id]
        if not renewal.cancelled():
            renewal.exception()  # its callers have it; asyncio need not log it as lost

    async def _issue_token(self, service_provider_id: str) -> _Token:
        grant = await self._grant_for(service_provider_id, now=self._clock())
        self._audiences[service_provider_id] = grant["document"]["audience"]
        # Counted from before the call: the registry's expires_in runs from when it
        # signed, which is later, so the token is never taken to outlive itself.
        asked = self._clock()
        issued = await self._call("POST", "/v1/token", json_body={"grant_id": grant["id"]})
        token = _Token(
            issued["access_token"],
            asked + issued["expires_in"],
            grant["id"],
            _grant_expires_at(grant),
            lifetime=float(issued["expires_in"]),
        )
        self._tokens[service_provider_id] = token
        return token

    def _fresh(self, token: _Token, *, now: float) -> bool:
        """Whether ``token`` serves for now, or a new one is due."""
        # Half its life at most: a token issued for no longer than the margin (the
        # registry's token_lifetime may be 30 s, the default margin) was never fresh, and
        # every request asked for another, a token row and an audit event each.
        margin = min(self._refresh_margin, token.lifetime / 2)
        if token.expires_at - margin > now:
            return True
        # The registry ends a token at its grant's expires_at. A token that already reaches
        # (within the margin) to its grant's end would be replaced by one ending no later,
        # and each issuance writes a token row and an audit event: it serves until it
        # expires. After that the grant is over, and the verifier refuses it whatever token
        # comes with it.
        ends_with_grant = (
            token.grant_expires_at is not None
            and token.grant_expires_at <= token.expires_at + margin
        )
        return ends_with_grant and token.expires_at > now

    def _forget_refused(self, service_provider_id: str, token: str) -> None:
        """A provider refused ``token`` in a way a new token may cure (its grant revoked or
        over, the token bound to another key, or covering too little): let it go, so the
        next request takes a token from the newest grant that stands instead of presenting
        this one until it expires. At most once per ``_REISSUE_PAUSE`` per provider: a
        refusal a new token does not cure (a provider that is misconfigured) must not make
        every request an issuance, a token row and an audit event each."""
        cached = self._tokens.get(service_provider_id)
        now = self._clock()
        if cached is None or not hmac.compare_digest(cached.value, token):
            return  # another token already, or none
        if now - self._refused_at.get(service_provider_id, -_REISSUE_PAUSE) < _REISSUE_PAUSE:
            return
        del self._tokens[service_provider_id]
        self._refused_at[service_provider_id] = now

    async def audience(self, service_provider_id: str) -> str:
        if service_provider_id not in self._audiences:
            await self.get_token(service_provider_id)
        return self._audiences[service_provider_id]

    async def authenticate_headers(
        self,
        service_provider_id: str,
        method: str,
        url: str,
        *,
        nonce: str | None = None,
        step_up_ref: str | None = None,
    ) -> dict[str, str]:
        """``Authorization: DPoP <token>`` and ``DPoP: <proof>`` for one request, and the
        step-up reference from :meth:`request_step_up` for the payment it approved.

        A relative ``url`` ("/api/events") is taken relative to the provider's audience,
        which is its base URL.
        """
        token = await self.get_token(service_provider_id)
        # Parsed, not searched for "://": a relative URL may carry one in its query
        # (/links?next=https://...), and was signed for no URL at all.
        if httpx.URL(url).is_relative_url:
            url = urljoin(self._audiences[service_provider_id].rstrip("/") + "/", url.lstrip("/"))
        proof = create_dpop_proof(
            self.key,
            htm=method.upper(),
            htu=htu_of(url),
            now=self._clock(),
            access_token=token,
            nonce=nonce,
        )
        headers = {"Authorization": f"DPoP {token}", "DPoP": proof}
        if step_up_ref is not None:
            headers[STEP_UP_HEADER] = step_up_ref
        return headers

    async def authenticate_request(
        self, service_provider_id: str, request: httpx.Request
    ) -> httpx.Request:
        request.headers.update(
            await self.authenticate_headers(service_provider_id, request.method, str(request.url))
        )
        return request

    def auth(self, service_provider_id: str) -> httpx.Auth:
        """An ``httpx.Auth`` signing every request to the provider (with nonce retry)."""
        return _ClientAuth(self, service_provider_id)

    # --- step-up --------------------------------------------------------------------------

    async def request_step_up(
        self,
        service_provider_id: str,
        *,
        resource: str,
        amount: str,
        currency: str,
        payee: str | None = None,
        timeout: float = 300.0,
    ) -> str:
        """Ask the human to approve one transaction above the threshold; returns the
        one-time approval reference to present with that transaction (in the
        ``STEP_UP_HEADER`` header). Raises ``Forbidden`` (reason ``denied`` or ``expired``)
        if the human refuses it or lets it expire, ``cancelled`` if its grant is revoked or
        over meanwhile, or ``agent_disabled`` if the agent was; ``TimeoutError`` after
        ``timeout``, and ``InvalidRequest`` (reason ``amount_precision``), before asking
        anyone, for an amount finer than the currency's minor unit. The registry refuses,
        before asking anyone, a payment no token of the grant could make with the approval
        (``Forbidden``, reason ``step_up_not_applicable``: the grant has no threshold, the
        amount is not above it or over a limit, another currency, a resource or payee the
        grant does not allow; the description says which) and a new step-up while the grant
        already has the registry's bound of them pending (``Conflict``, reason
        ``too_many_step_ups``).

        After a ``TimeoutError`` (or any failure once the step-up exists), calling again for
        the same payment waits on the step-up already asked for instead of asking the human
        a second time.
        """
        _check_payable(amount, currency)
        grant = await self._grant_for(service_provider_id, now=self._clock())
        key = (grant["id"], resource, amount, currency, payee)
        step_id = self._pending_step_ups.get(key)
        if step_id is None:
            body: dict[str, Any] = {
                "grant_id": grant["id"],
                "resource": resource,
                "amount": amount,
                "currency": currency,
            }
            if payee is not None:
                body["payee"] = payee
            step = await self._call("POST", "/v1/step-ups", json_body=body)
            step_id = str(step["id"])
            self._pending_step_ups[key] = step_id
        try:
            state = await self._wait_for_step_up(step_id, time.monotonic() + timeout)
        except NotFound:
            self._pending_step_ups.pop(key, None)  # gone: the next call asks afresh
            raise
        if state["status"] == "pending":
            raise TimeoutError(f"step-up {step_id} still pending")
        self._pending_step_ups.pop(key, None)  # decided: a new payment needs a new step-up
        if state["status"] == "approved":
            # The verifier takes the reference only with a token of this grant: one cached
            # from another grant for the provider (this one approved since) would present
            # it in vain, so the next request takes a token from the newest grant, this one.
            cached = self._tokens.get(service_provider_id)
            if cached is not None and cached.grant_id != grant["id"]:
                del self._tokens[service_provider_id]
            return str(state["approval_ref"])
        raise Forbidden("the step-up was not approved", reason=state["status"])

    async def _wait_for_step_up(self, step_id: str, deadline: float) -> dict[str, Any]:
        """Long-poll one step-up until it is decided or ``deadline`` (monotonic) passes.

        A poll the registry could not answer (it failed on the way, a dependency or a
        gateway was down, too many polls) is asked again, for the same step-up: only the
        registry's answer ends the wait early.
        """
        while True:
            left = max(0.0, deadline - time.monotonic())
            wait = min(_STEP_UP_WAIT, left)
            try:
                state: dict[str, Any] = await self._call(
                    "GET",
                    # The registry takes a fractional wait: rounded to whole seconds, the
                    # last half second would be wait=0 polls, answered at once, back to back.
                    f"/v1/step-ups/{step_id}?wait={wait:.3f}",
                    read_timeout=wait + _STEP_UP_READ_MARGIN,
                )
            except Exception as exc:
                if not _unavailable(exc):
                    raise
                if deadline - time.monotonic() < _STEP_UP_MIN_POLL:
                    return {"status": "pending"}
                # A 429 says when to come back: the registry holds only so many polls of
                # one agent at once (this process may wait on several step-ups).
                pause = exc.retry_after if isinstance(exc, RateLimited) else _STEP_UP_RETRY_PAUSE
                await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))
                continue
            if state["status"] != "pending" or deadline - time.monotonic() < _STEP_UP_MIN_POLL:
                return state


def _replace_file(path: Path, data: bytes) -> None:
    """Put ``data`` at ``path`` whole: written to a new file beside it, then renamed over
    it. A rename replaces a symlink planted at ``path`` rather than writing where it points,
    and no reader finds the file empty or half written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(6).hex()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(tmp, flags, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _grant_expires_at(grant: dict[str, Any]) -> int | None:
    expires_at = (grant["document"].get("envelope") or {}).get("expires_at")
    return None if expires_at is None else int(expires_at)


def _grant_expired(grant: dict[str, Any], *, now: float) -> bool:
    """As the registry judges it: a grant is over from its expires_at on."""
    expires_at = _grant_expires_at(grant)
    return expires_at is not None and now >= expires_at


class _ClientAuth(DPoPAuth):
    """``DPoPAuth`` whose token comes, refreshed when due, from the client."""

    def __init__(self, client: AgentAuthClient, provider: str) -> None:
        super().__init__(
            key=client.key,
            token="",
            clock=client._clock,
            on_refused=lambda token: client._forget_refused(provider, token),
        )
        self._client = client
        self._provider = provider

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        # The token comes from the async client, which a sync httpx.Client cannot await:
        # DPoPAuth's own sync flow would sign with no token (or one left from an earlier
        # async request, perhaps let go since), and send it.
        raise TypeError(
            "AgentAuthClient.auth() signs for httpx.AsyncClient; "
            "use AgentAuthClientSync(...).auth() with httpx.Client"
        )
        yield request  # pragma: no cover (makes this a generator, as httpx expects)

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        self._token = await self._client.get_token(self._provider)
        flow = super().async_auth_flow(request)
        outgoing = await anext(flow)
        while True:
            response = yield outgoing
            try:
                outgoing = await flow.asend(response)
            except StopAsyncIteration:
                return


class AgentAuthClientSync:
    """The same client for code without an event loop (scripts, notebooks, CLIs)."""

    def __init__(self, registry_url: str, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._client = self._loop.run_until_complete(self._make(registry_url, options))
        except BaseException:
            self._loop.close()  # nobody holds this object to close() it
            raise

    @staticmethod
    async def _make(registry_url: str, options: dict[str, Any]) -> AgentAuthClient:
        return AgentAuthClient(registry_url, **options)  # the httpx client binds to this loop

    def __getattr__(self, name: str) -> Any:
        # Read from __dict__: without a _client (a copy.copy probing __setstate__, an
        # __init__ that raised) self._client would come back here, and recurse forever.
        client = self.__dict__.get("_client")
        if client is None:
            raise AttributeError(f"{type(self).__name__} has no client", name=name, obj=self)
        attribute = getattr(client, name)
        if not asyncio.iscoroutinefunction(attribute):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._loop.run_until_complete(attribute(*args, **kwargs))

        return call

    def auth(self, service_provider_id: str) -> httpx.Auth:
        """An ``httpx.Auth`` for a sync ``httpx.Client``; the token refreshes when due."""

        def token() -> str:
            return self._loop.run_until_complete(self._client.get_token(service_provider_id))

        return DPoPAuth(
            key=self._client.key,
            token=token,
            clock=self._client._clock,
            on_refused=lambda sent: self._client._forget_refused(service_provider_id, sent),
        )

    def close(self) -> None:
        """Close the client and its event loop; closing again does nothing (a ``with``
        block around a client closed inside it raised RuntimeError: the loop is closed)."""
        if self._loop.is_closed():
            return
        self._loop.run_until_complete(self._client.aclose())
        self._loop.close()

    def __enter__(self) -> AgentAuthClientSync:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
