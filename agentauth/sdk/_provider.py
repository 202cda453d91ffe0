"""The provider side: ask the verifier about each request, fail closed, hand on the result.

Three ways in, one path underneath: ``VerifierClient.verify_request`` (a plain async
function over method, URL and headers), ``AgentAuthMiddleware`` (ASGI, for any framework)
and ``require(...)`` (a FastAPI dependency). ``OfflineVerifier`` checks, against the JWKS
and the token alone, the signature, the DPoP key binding, the capabilities and the rules of
the envelope that need no memory (expiry, time windows, an amount's precision and currency,
the per-transaction cap, a single action over a spend cap), after refusing the input the
verifier refuses. It is weaker: no replay, rate, cumulative spend or revocation checks, no
DPoP server nonces, keys only from the JWKS it was built with or, given ``fetch_jwks``, from
the latest it fetched when a token named an unknown kid (at most once per interval), and it
refuses every action above the step-up threshold (``step_up_required``), since it cannot
check a one-time approval. It is meant for read-only, low-value endpoints or a verifier
outage policy you choose deliberately.

``AgentAuthMiddleware`` asks ``action_of(method, path)`` about each request with the path
the app's router matches (without the mount prefix, ``root_path``) and a HEAD asked as the
GET it runs. None means unprotected: the request reaches the app with nothing verified.
It refuses WebSocket connections to paths ``action_of`` maps to an action (closed before
the handshake completes, which servers answer with HTTP 403): a handshake carries no
request to verify per message. Serve WebSockets on paths mapped to None and authorize them
yourself.

A verification is a commit: an allow counts against the grant's rate and spend limits,
spends a step-up reference and is written to the audit chain, even if the app then refuses
the request. Validate what the action is built from first, and have the handler do what
the action names, read from the same data (the middleware never sees the body).
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import httpx

from .._logs import Throttle
from ..protocol import (
    DPOP_ALGS,
    AccessTokenVerifier,
    Action,
    AgentAuthError,
    DPoPVerifier,
    InvalidRequest,
    InvalidToken,
    KeySet,
    UsageState,
    allowing_capability,
    amount_fits,
    evaluate,
    normalize_htu,
    path_as_sent,
)
from ._auth import STEP_UP_HEADER

__all__ = [
    "AgentAuthMiddleware",
    "OfflineVerifier",
    "Verification",
    "VerifierClient",
    "require",
]

log = logging.getLogger("agentauth.provider")


@dataclass(frozen=True, slots=True)
class Verification:
    """What the verifier said. ``allowed`` is the only field a decision may rest on."""

    allowed: bool
    reason: str
    agent_id: str | None = None
    grant_id: str | None = None
    remaining: dict[str, Any] | None = None
    audit_event: str | None = None
    dpop_nonce: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


#: What the provider helpers read credentials from: a mapping (a plain dict holds one value a
#: name; Starlette's and httpx's ``Headers`` keep every line) or the header lines themselves,
#: as ``(name, value)`` pairs of ``str`` or of ``bytes`` (ASGI's ``scope["headers"]``).
HeaderLines = Mapping[str, str] | Iterable[tuple[str, str]] | Iterable[tuple[bytes, bytes]]


# What the verifier accepts (agentauth.verifier.VerifyIn's limits; a test keeps them equal):
# a request over them is the caller's error, refused here without a call.
_LIMITS = {"token": 8192, "proof": 4096, "method": 16, "url": 2048, "step_up_ref": 128}
# VerifyIn's method: an HTTP method token (RFC 9110 §9.1); a test keeps the two equal.
_METHOD = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# A nonce as RFC 9449 §8.1 writes it (1*NQCHAR), which the helpers put in a DPoP-Nonce
# header as is: the verifier's are 32 characters, so 256 is ample.
_NONCE = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]{1,256}$")


def _over_limit(fields: Mapping[str, str | None]) -> str | None:
    """The deny reason for the first field over the verifier's limit, or None."""
    for name, most in _LIMITS.items():
        if len(fields.get(name) or "") > most:
            return f"invalid_request:{name}_too_long"
    return None


def _unusable_input(method: str, url: str, action: Action) -> str | None:
    """What the verifier's model (VerifyIn) refuses besides lengths, so the offline check
    refuses it too, or None: a method that is no HTTP token, a URL no proof can name, an
    action that does not validate (``model_copy(update=...)`` skips validation, and the
    verifier parses the action again from JSON)."""
    if not _METHOD.fullmatch(method):
        return "invalid_request:bad_method"
    try:
        normalize_htu(url)
    except InvalidRequest:
        return "invalid_request:bad_url"
    try:
        Action.model_validate(action.model_dump(mode="json", exclude_none=True))
    except ValueError:  # pydantic's ValidationError is one
        return "invalid_request:bad_action"
    return None


# The verifier's answers that refuse the call's own input: the agent's request was
# malformed (one a client check above missed), not a verifier that is down.
_REJECTED = frozenset({400, 413, 422})

# Two step-up references on one request: which one a proxy, a log and this helper would
# each take is anyone's guess, so neither is used (as with two DPoP lines).
_TWO_STEP_UPS = {"error": "invalid_request", "reason": "multiple_step_up_refs"}


def _values(headers: HeaderLines, name: str) -> list[str]:
    """Every value of the header ``name`` (lower case), one per field line."""
    items: Iterable[tuple[str | bytes, str | bytes]]
    if isinstance(headers, Mapping):
        # httpx's Headers joins repeated lines in items(); multi_items() keeps them apart.
        # Starlette's Headers keeps them apart in items() and has no multi_items().
        multi = getattr(headers, "multi_items", None)
        items = multi() if callable(multi) else headers.items()
    else:
        items = headers
    found = []
    for key, value in items:
        text = key.decode("latin-1") if isinstance(key, bytes) else key
        if text.lower() == name:
            found.append(value.decode("latin-1") if isinstance(value, bytes) else value)
    return found


def _credentials(headers: HeaderLines) -> tuple[str, str] | str:
    """The DPoP token and proof, or the reason the request carries no usable pair.

    RFC 9449 §4.3 (check 1) refuses a request with more than one DPoP header, as the
    registry does (``multiple_proofs``); a second Authorization line is refused too. Either
    would otherwise leave the choice of credential to whichever line a framework keeps. A
    comma in a value is two lines joined (RFC 9110 §5.3): neither a compact JWS nor a token
    ever holds one.
    """
    if not isinstance(headers, Mapping):
        # Read twice below: a one-pass iterable (a generator over a WSGI environ) would be
        # used up by the first read, and the Authorization line never seen.
        headers = cast(HeaderLines, list(headers))
    proofs = _values(headers, "dpop")
    authorizations = _values(headers, "authorization")
    if len(proofs) > 1 or any("," in proof for proof in proofs):
        return "invalid_dpop_proof:multiple_proofs"
    if len(authorizations) > 1 or any("," in value for value in authorizations):
        return "invalid_request:multiple_authorizations"
    scheme, _, token = (authorizations[0] if authorizations else "").partition(" ")
    token = token.strip()
    is_dpop = scheme.lower() == "dpop" and bool(token)
    if not proofs and not is_dpop:
        return "missing_dpop_credentials"  # nothing of DPoP presented
    if not is_dpop:
        return "invalid_request:missing_token"  # a proof with no DPoP token to bind
    if not proofs or not proofs[0]:
        return "invalid_dpop_proof:missing_proof"
    return token, proofs[0]


class VerifierClient:
    """A pooled client for the verifier with a short timeout; any failure is a deny.

    ``timeout`` (0.5 s unless given) bounds each call. With an ``http`` client of yours and
    no ``timeout``, that client's own timeouts apply; given both, ``timeout`` bounds each
    verifier call whatever the client's are."""

    def __init__(
        self,
        verifier_url: str,
        *,
        provider_id: str,
        secret: str,
        timeout: float | None = None,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self._url = verifier_url.rstrip("/") + "/v1/verify"
        basic = base64.b64encode(f"{provider_id}:{secret}".encode()).decode()
        self._headers = {"Authorization": f"Basic {basic}"}
        self._http = http or httpx.AsyncClient(
            timeout=0.5 if timeout is None else timeout,
            limits=httpx.Limits(max_keepalive_connections=32),
        )
        # Per call when given with a client of the caller's: until 2026-12-01 it was dropped
        # there, and a client made with timeout=None waited on a stuck verifier for good.
        self._timeout: float | httpx._client.UseClientDefault = (
            httpx.USE_CLIENT_DEFAULT if timeout is None or http is None else timeout
        )
        # A wrong or ended secret refuses every request: said every 30 s, not per request.
        self._said = Throttle(30.0)

    async def verify(
        self,
        *,
        token: str,
        proof: str,
        method: str,
        url: str,
        action: Action,
        step_up_ref: str | None = None,
    ) -> Verification:
        body: dict[str, Any] = {
            "token": token,
            "proof": proof,
            "method": method,
            "url": url,
            "action": action.model_dump(mode="json", exclude_none=True),
        }
        if step_up_ref:
            body["step_up_ref"] = step_up_ref
        if refused := _over_limit(body):
            return Verification(False, refused)
        status = 0
        try:
            # Never followed, whatever the caller's client is set to: httpx would send the
            # body (the agent's token and its unspent proof) on to wherever Location points,
            # and take that origin's answer for the verifier's. A redirect is a deny below.
            response = await self._http.post(
                self._url,
                json=body,
                headers=self._headers,
                follow_redirects=False,
                timeout=self._timeout,
            )
            status = response.status_code
            answer = response.json() if status in (200, 401, 403, *_REJECTED) else None
        except (httpx.HTTPError, ValueError):
            answer = None
        except Exception:
            # Anything else on the way (a client closed under a request in flight, at
            # shutdown, raises RuntimeError): still a deny, as promised, not an exception
            # that every provider helper would turn into a 500.
            self._said.log(log, ("call", "error"), "the verifier call failed", exc_info=True)
            answer = None
        if status in _REJECTED:
            # The verifier decided nothing: it refused this call's input. That input is the
            # agent's request, so it is the agent's 400; a 503 would tell anyone who sends
            # a long header that the verifier is down. Logged: it may be an SDK limit that
            # fell behind the verifier's.
            refused = answer.get("reason") if isinstance(answer, dict) else None
            self._said.log(
                log,
                ("input", status),
                "the verifier refused the request's input: %s %s",
                status,
                refused,
            )
            return Verification(
                False,
                "invalid_request:rejected_by_verifier",
                raw={"status": status, "reason": refused},
            )
        if status in (401, 403):
            # The verifier refused this provider itself (a wrong or ended secret, a
            # suspension): nothing about the agent's request was decided, so it is denied as
            # with no verifier, and the verifier's reason goes to the provider's own logs.
            refused = answer.get("reason") if isinstance(answer, dict) else None
            self._said.log(
                log,
                ("provider", status),
                "the verifier refused this provider: %s %s",
                status,
                refused,
            )
            return Verification(
                False, "verifier_unavailable", raw={"status": status, "reason": refused}
            )
        if not isinstance(answer, dict) or answer.get("decision") not in ("allow", "deny"):
            return Verification(False, "verifier_unavailable")  # fail closed
        nonce = answer.get("dpop_nonce")
        if nonce is not None and not (isinstance(nonce, str) and _NONCE.fullmatch(nonce)):
            # Not the verifier's form: it would go into a DPoP-Nonce header as is, where a
            # number made the helpers' answer a 500 and a line break broke it. Fail closed.
            self._said.log(log, ("answer", "nonce"), "the verifier answered a malformed nonce")
            return Verification(False, "verifier_unavailable")
        return Verification(
            allowed=answer["decision"] == "allow",
            reason=str(answer.get("reason")),
            agent_id=answer.get("agent_id"),
            grant_id=answer.get("grant_id"),
            remaining=answer.get("remaining"),
            audit_event=answer.get("audit_event"),
            dpop_nonce=nonce,
            raw=answer,
        )

    async def verify_request(
        self,
        *,
        method: str,
        url: str,
        headers: HeaderLines,
        action: Action,
        step_up_ref: str | None = None,
    ) -> Verification:
        """The plain function: read the DPoP headers, ask the verifier."""
        credentials = _credentials(headers)
        if isinstance(credentials, str):
            return Verification(False, credentials)
        token, proof = credentials
        return await self.verify(
            token=token, proof=proof, method=method, url=url, action=action, step_up_ref=step_up_ref
        )

    async def aclose(self) -> None:
        await self._http.aclose()


# The offline check's JWKS refresh (``fetch_jwks``). Anyone can send a token naming a kid
# nobody published, so an unknown kid costs the registry at most one fetch per interval:
# 30 s by default. A rotation publishes its kid ``key_publish_ahead`` before it signs
# (docs/registry.md), so a provider that sees no token in between is not refused for long.
_JWKS_REFRESH_INTERVAL = 30.0
# Under 1 s, a flood of unknown kids is a flood of fetches; over 10 min, one failed fetch
# (or one an unknown kid spent just before a rotation) refuses a new key's tokens for longer
# than a rebuild every few minutes, the advice before there was a refresh, would.
_REFRESH_INTERVAL_BOUNDS = (1.0, 600.0)
# Every unknown-kid request waits on the one fetch in flight: a hung fetch must end.
_JWKS_FETCH_TIMEOUT = 5.0


class _JWKSUnavailable(Exception):
    """The JWKS could not be fetched (now, or within the interval): nothing was decided."""

    def __init__(self, retry_after: float) -> None:
        super().__init__("the JWKS could not be fetched")
        self.retry_after = retry_after


class OfflineVerifier:
    """Signature, DPoP binding, capabilities and the envelope's stateless rules, against the
    JWKS. Weaker than the verifier: see the module docstring.

    ``fetch_jwks``, when given, is called (and awaited) for the registry's JWKS when a token
    names a kid the keys lack: at most once per ``refresh_interval`` seconds (1 to 600), one
    fetch shared by every request waiting for it. The keys it returns replace the others, so
    a key removed from the JWKS stops verifying then; the token is checked once more. A fetch
    that fails, times out (5 s), returns no valid JWKS or one with no usable key (an empty
    set, or only keys ``KeySet.from_jwks`` leaves out) keeps the keys held and denies,
    ``jwks_unavailable``, every unknown kid until the interval has passed. Without it, the
    keys are the ``jwks`` given, for good.
    """

    def __init__(
        self,
        *,
        jwks: dict[str, Any],
        issuer: str,
        audience: str,
        fetch_jwks: Callable[[], Awaitable[object]] | None = None,
        refresh_interval: float = _JWKS_REFRESH_INTERVAL,
    ) -> None:
        low, high = _REFRESH_INTERVAL_BOUNDS
        if not low <= refresh_interval <= high:  # NaN is refused too
            raise ValueError(f"refresh_interval must lie between {low} and {high} seconds")
        self._tokens = AccessTokenVerifier(keys=KeySet.from_jwks(jwks), issuer=issuer)
        self._proofs = DPoPVerifier()
        self._audience = audience
        self._fetch_jwks = fetch_jwks
        self._refresh_interval = refresh_interval
        self._fetched_at: float | None = None  # time.monotonic() when the last fetch began
        self._fetch_failed = False
        self._fetching: asyncio.Task[bool] | None = None

    async def _refreshed(self, fetch_jwks: Callable[[], Awaitable[object]]) -> bool:
        """Whether the keys were fetched again for an unknown kid (check the token once
        more), False if a fetch is not due; raises ``_JWKSUnavailable`` if it failed."""
        task = self._fetching
        if task is None:
            began = time.monotonic()
            if self._fetched_at is not None and began - self._fetched_at < self._refresh_interval:
                if self._fetch_failed:
                    raise _JWKSUnavailable(self._fetched_at + self._refresh_interval - began)
                return False
            self._fetched_at = began
            fetch = self._fetch(fetch_jwks)
            task = self._fetching = asyncio.get_running_loop().create_task(fetch)
        # Shielded: a request given up on (its client gone) must not cancel the fetch that
        # the other requests wait for.
        if not await asyncio.shield(task):
            raise _JWKSUnavailable(self._refresh_interval)
        return True

    async def _fetch(self, fetch_jwks: Callable[[], Awaitable[object]]) -> bool:
        self._fetch_failed = True  # until it has succeeded (a cancelled fetch did not)
        try:
            keys = KeySet.from_jwks(await asyncio.wait_for(fetch_jwks(), _JWKS_FETCH_TIMEOUT))
        except Exception:
            # Fail closed, keeping the keys held: a registry that is down must not stop the
            # tokens under known keys from verifying (offline mode may be its outage policy).
            log.warning(
                "the JWKS fetch failed: tokens under keys not yet known are denied"
                " (jwks_unavailable) for the next %s s",
                self._refresh_interval,
                exc_info=True,
            )
            return False
        finally:
            self._fetching = None
        if not keys:
            # The registry always publishes the key it signs with: a set with none is an
            # answer gone wrong on the way (a proxy, a half-started registry), and taking it
            # refused every token until the next fetch.
            log.warning(
                "the fetched JWKS has no usable key: the keys held are kept, and tokens under"
                " keys not yet known are denied (jwks_unavailable) for the next %s s",
                self._refresh_interval,
            )
            return False
        if keys != self._tokens.keys:  # a new key set empties the token cache
            self._tokens.set_keys(keys)
        self._fetch_failed = False
        return True

    async def verify_request(
        self,
        *,
        method: str,
        url: str,
        headers: HeaderLines,
        action: Action,
        step_up_ref: str | None = None,
    ) -> Verification:
        credentials = _credentials(headers)
        if isinstance(credentials, str):
            return Verification(False, credentials)
        token, proof = credentials
        # The input the verifier refuses before deciding anything (a provider reaching it
        # with VerifierClient is refused it), refused first here too: an offline allow must
        # never be a request the verifier would refuse for what it is. Unchecked, a long
        # request URL also went whole into the proof check's URL cache.
        asked = {"token": token, "proof": proof, "method": method, "url": url}
        refused = _over_limit({**asked, "step_up_ref": step_up_ref}) or _unusable_input(
            method, url, action
        )
        if refused:
            return Verification(False, refused)
        now = time.time()
        try:
            try:
                access = self._tokens.verify(token, audience=self._audience, now=now)
            except InvalidToken as exc:
                if exc.reason != "unknown_kid" or self._fetch_jwks is None:
                    raise
                if not await self._refreshed(self._fetch_jwks):
                    raise
                # A rotated-in key, perhaps: the same check again, once, with the keys as
                # the registry publishes them now.
                access = self._tokens.verify(token, audience=self._audience, now=now)
            self._proofs.verify(proof, htm=method, htu=url, now=now, ath=access.ath, jkt=access.jkt)
        except _JWKSUnavailable as exc:
            return Verification(False, "jwks_unavailable", raw={"retry_after": exc.retry_after})
        except AgentAuthError as exc:
            return Verification(False, f"{exc.error}:{exc.reason}" if exc.reason else exc.error)
        if action.amount is not None and not amount_fits(action.amount, action.currency or ""):
            return Verification(False, "amount_precision")  # before the capability, as online
        if allowing_capability(access.claims.capabilities, action) is None:
            return Verification(False, "insufficient_capability")
        # Evaluated as the grant's first action, with no step-up: the rules that need no
        # memory apply exactly as the verifier applies them, and a step-up reference cannot
        # be checked (nor marked used) here, so above the threshold is always refused.
        decision = evaluate(access.claims.envelope, UsageState(), action, now=now)
        if not decision.allowed:
            return Verification(False, decision.reason, access.claims.sub, access.claims.grant_id)
        return Verification(True, "ok_offline", access.claims.sub, access.claims.grant_id)


VerifyFn = Callable[..., Awaitable[Verification]]
ActionOf = Callable[[str, str], Action | None]


def _as_sent(public_url: str | None) -> str | None:
    """``public_url`` in the form agents' requests carry it, and so their proofs name it:
    the host in IDNA (``https://bücher.example`` is ``https://xn--bcher-kva.example`` on
    the wire and in every htu) and a path prefix percent-encoded, as httpx sends them.
    Without this a non-ASCII name, given as people write it, refused every proof."""
    if public_url is None:
        return None
    url = httpx.URL(public_url)
    # Said when the middleware is made: "api.example.com" (no scheme) became
    # "://api.example.com", and every proof was refused, blaming the agents.
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(
            f"public_url must be an absolute http(s) URL, such as https://api.example.com,"
            f" not {public_url!r}"
        )
    path = url.raw_path.partition(b"?")[0].decode("ascii")
    return f"{url.scheme}://{url.netloc.decode('ascii')}{path}"


# RFC 9110 §7.2's Host: uri-host [":" port], the host an IP literal or a reg-name, which
# covers an IPv4 address (RFC 3986 §3.2.2-3).
_HOST = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]*)(?::[0-9]*)?$")

# A request whose Host is not one (RFC 9112 §3.2 answers it 400), when the URL is built from it.
_BAD_HOST = {"error": "invalid_request", "reason": "bad_host"}


def _public_url(scope: Mapping[str, Any], base: str | None) -> str:
    """The URL the agent's proof must name; raises ``ValueError`` when it would be built
    from a Host header that is not one host[:port], or from two of them."""
    # As the agent sent it, mount prefix included: the proof names the encoded path
    # (protocol.path_as_sent).
    path = path_as_sent(scope, with_root=True)
    if base:
        return base.rstrip("/") + path
    # Header bytes are latin-1 to ASGI, as the other headers here are read: a byte that is
    # not UTF-8 in some other header must not make this request a 500. Without public_url
    # the host is the request's own Host header: see AgentAuthMiddleware's docstring.
    hosts = _values(scope.get("headers", []), "host")
    # The origin is the caller's choice here, but only the origin: a Host holding "/", "?"
    # or "#" (servers pass any field value on) rewrote the path the proof is checked
    # against, since "https://a.example#" + "/payments" reads as "https://a.example/", so a
    # proof the agent sent elsewhere passed for any route. Two Host lines are refused as
    # two DPoP lines are: which one names the origin is anyone's guess.
    if len(hosts) > 1 or (hosts and not _HOST.fullmatch(hosts[0])):
        raise ValueError("the Host header is not one host[:port]")
    host = hosts[0] if hosts else ""
    return f"{scope.get('scheme', 'http')}://{host or 'localhost'}{path}"


def _route_path(scope: Mapping[str, Any]) -> str:
    """The path the app's router matches: ``path`` without the mount prefix ``root_path``
    (Starlette's ``Mount``, a server's ``--root-path``, a Serve route prefix put it in
    both), removed only at a segment boundary as Starlette does. The prefix alone is "/"."""
    path = str(scope["path"])
    root = str(scope.get("root_path", ""))
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        return path[len(root) :] or "/"
    return path


def _asked_as(method: str) -> str:
    """The method ``action_of`` is asked about: a HEAD runs the GET handler (RFC 9110
    §9.3.2, and Starlette serves it from GET routes), so it is protected as that GET."""
    return "GET" if method == "HEAD" else method


def _challenge(error: str | None = None) -> str:
    """A DPoP challenge (RFC 9449 §7.1): ``algs`` names the proof algorithms accepted, and
    ``error`` is left out when the request presented no credentials (RFC 6750 §3.1)."""
    params = [f'error="{error}"'] if error else []
    params.append(f'algs="{" ".join(DPOP_ALGS)}"')
    return "DPoP " + ", ".join(params)


# Denials that say a dependency failed, not that the grant refuses the action: the
# verifier's fail-closed reasons (docs/verifier.md) and the SDK's own for an unreachable one.
_TEMPORARY = frozenset(
    {
        "verifier_unavailable",
        # The shard refused the replica's check as malformed (a replica and a shard of
        # different versions, or a bug): the verifier's failure, not a grant's refusal.
        "malformed_check",
        "state_unavailable",
        "state_timeout",
        "audit_unavailable",
        "dependency_unavailable",
        "revocation_state_stale",
        "jwks_unavailable",  # the offline check's: a JWKS fetch for an unknown kid failed
    }
)


# The shard's refusals of the proof itself (its jti seen, or dated within the jti window a
# restart lost), which carry no invalid_dpop_proof prefix.
_PROOF_REFUSED = frozenset({"replay_detected", "shard_restarted"})


def _retry_after(verification: Verification) -> int:
    """The verifier's ``retry_after`` (fractional seconds) as whole seconds for the
    Retry-After header (RFC 9110 §10.2.3): rounded up, at least 1, and 1 when absent."""
    wait = verification.raw.get("retry_after")
    if isinstance(wait, bool) or not isinstance(wait, int | float) or not math.isfinite(wait):
        return 1
    return max(1, math.ceil(wait))


def denial(verification: Verification) -> tuple[int, dict[str, str], dict[str, Any]]:
    """Status, headers and body for a refused request (RFC 9449 §7.1 challenges)."""
    reason = verification.reason
    body = {"error": "access_denied", "reason": reason}
    if verification.dpop_nonce:
        headers = {
            "WWW-Authenticate": _challenge("use_dpop_nonce"),
            "DPoP-Nonce": verification.dpop_nonce,
        }
        return 401, headers, {"error": "use_dpop_nonce", "reason": reason}
    if reason == "missing_dpop_credentials":
        return 401, {"WWW-Authenticate": _challenge()}, body
    # A proof that failed (a replay is one, RFC 9449 §11.1, and so is one a restarted shard
    # cannot tell from a replay, shard_restarted: a fresh proof is the cure, not another
    # grant): invalid_dpop_proof, the code RFC 9449 §12.2 registers for it; invalid_token is
    # for the token itself.
    if reason.startswith(("invalid_dpop_proof", "use_dpop_nonce")) or reason in _PROOF_REFUSED:
        return 401, {"WWW-Authenticate": _challenge("invalid_dpop_proof")}, body
    if reason.startswith("invalid_token"):
        return 401, {"WWW-Authenticate": _challenge("invalid_token")}, body
    if reason.startswith("invalid_request"):
        return 400, {"WWW-Authenticate": _challenge("invalid_request")}, body
    if reason in _TEMPORARY:
        # Nothing was decided about the request: a dependency of the verifier's failed (and
        # it denied, failing closed) or the verifier could not be reached. A 403 would tell
        # the agent the grant does not allow it; the same request with a fresh proof may
        # well pass in a moment (when the offline check may fetch the JWKS again, for
        # jwks_unavailable).
        return 503, {"Retry-After": str(_retry_after(verification))}, body
    if reason == "rate_limited":
        # The grant allows the action, just not this often: RFC 6585's 429, with the wait
        # the verifier computed (when the window frees a slot), as the registry answers its
        # own rate limits. A 403 read as "not allowed", and the wait was lost.
        return 429, {"Retry-After": str(_retry_after(verification))}, body
    if reason == "insufficient_capability":
        # The token grants nothing that covers this action: RFC 6750 §3.1's
        # insufficient_scope (applied to DPoP by RFC 9449 §7.1), which tells the agent it
        # needs a token with more, not a new proof. The other refusals of a covered action
        # (a limit reached, a step-up needed, a grant revoked) are not this: another token
        # for the same grant would fare no better, and they carry no challenge.
        return 403, {"WWW-Authenticate": _challenge("insufficient_scope")}, body
    return 403, {}, body


class AgentAuthMiddleware:
    """ASGI middleware: every request ``action_of(method, path)`` maps to an action must be
    allowed by the verifier; the verification lands in ``scope["state"]["agentauth"]``.

    ``path`` is the one the app's router matches: below any mount prefix (``/payments/1``
    for a call to ``/v1/payments/1`` on an app mounted at ``/v1``), decoded; if that maps to
    None, the full path is asked about too (what was asked before). A HEAD is asked
    about as ``GET``, the handler it runs (the verifier still checks the proof for HEAD).
    None means UNPROTECTED: the request reaches the app with nothing verified (health
    checks, public pages), so map every route that needs protecting, or return an action
    by default. A WebSocket connection to a path mapped to an action (asked as ``GET``) is
    refused, never verified.

    An allow is a commit (counted against rate and spend limits, a step-up reference
    spent) even if the app then refuses the request: build the action only from values
    the handler will use as they are, and check them first (a ``ValueError`` from
    ``action_of`` is answered 400). The middleware never reads the body.

    ``public_url``: the origin agents call (``https://api.example.com``), which the proofs'
    ``htu`` must name. Set it: without it the origin is rebuilt from the request's scheme and
    its own ``Host`` header (a caller's choice; and ``http`` behind a TLS proxy); a request
    whose Host is not one host[:port], or that has two, is then answered 400 ``bad_host``."""

    def __init__(
        self,
        app: Any,
        *,
        verifier: VerifierClient | OfflineVerifier,
        action_of: ActionOf,
        public_url: str | None = None,
    ) -> None:
        self.app = app
        self._verifier = verifier
        self._action_of = action_of
        self._public_url = _as_sent(public_url)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self.app(scope, receive, send)
            return
        if kind == "websocket":
            await self._websocket(scope, receive, send)
            return
        if kind != "http":  # a scope type this middleware cannot judge: fail closed
            raise RuntimeError(f"AgentAuthMiddleware cannot protect ASGI {kind!r} scopes")
        try:
            action = self._mapped(_asked_as(scope["method"]), scope)
        except ValueError:
            # A path no action can name (a resource with "..", say: refused by the model).
            # Not the provider's error, and not a request the verifier could allow.
            await _respond(send, 400, {}, {"error": "invalid_request", "reason": "bad_resource"})
            return
        if action is None:
            await self.app(scope, receive, send)
            return
        # The header lines as sent, not a dict of them: a dict keeps one line a name, and
        # a second DPoP or Authorization line must be refused, not chosen between.
        lines: list[tuple[bytes, bytes]] = list(scope.get("headers", []))
        step_up = _values(lines, STEP_UP_HEADER.lower())
        if len(step_up) > 1:
            await _respond(send, 400, {}, _TWO_STEP_UPS)
            return
        try:
            url = _public_url(scope, self._public_url)
        except ValueError:
            await _respond(send, 400, {}, _BAD_HOST)
            return
        verification = await self._verifier.verify_request(
            method=scope["method"],
            url=url,
            headers=lines,
            action=action,
            step_up_ref=step_up[0] if step_up else None,
        )
        if verification.allowed:
            scope.setdefault("state", {})["agentauth"] = verification
            if verification.dpop_nonce:
                send = _with_nonce(send, verification.dpop_nonce)
            await self.app(scope, receive, send)
            return
        await _respond(send, *denial(verification))

    def _mapped(self, method: str, scope: Any) -> Action | None:
        """``action_of`` about the router's path; and, if that is unprotected below a mount
        prefix, about the full path too, as this middleware asked before: an ``action_of``
        written for full paths keeps its routes protected rather than silently opened."""
        route = _route_path(scope)
        action = self._action_of(method, route)
        if action is None and route != scope["path"]:
            action = self._action_of(method, scope["path"])
        return action

    async def _websocket(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            public = self._mapped("GET", scope) is None
        except ValueError:  # no action can name this path: refused with the protected ones
            public = False
        if public:
            await self.app(scope, receive, send)
            return
        # A protected path: closing before accepting makes the server refuse the handshake
        # (HTTP 403). Each later message would need its own proof, which DPoP does not give.
        message = await receive()
        if message["type"] == "websocket.connect":
            await send({"type": "websocket.close", "code": 1008})


def _with_nonce(send: Any, nonce: str) -> Any:
    """``send`` with the verifier's renewed nonce (RFC 9449 §8.2) added to the answer's
    headers, unless the app set a DPoP-Nonce of its own."""
    header = (b"dpop-nonce", nonce.encode("latin-1"))

    async def sending(message: Any) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", []))
            if not any(name.lower() == b"dpop-nonce" for name, _ in headers):
                message = {**message, "headers": [*headers, header]}
        await send(message)

    return sending


async def _respond(send: Any, status: int, headers: dict[str, str], body: dict[str, Any]) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")]
            + [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        }
    )
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})


def require(
    action: Action | Callable[[Any], Action],
    *,
    verifier: VerifierClient | OfflineVerifier | Callable[[], VerifierClient | OfflineVerifier],
    public_url: str | None = None,
) -> Callable[..., Awaitable[Verification]]:
    """A FastAPI dependency: ``Depends(require(Action(...), verifier=...))``.

    Raises an ``HTTPException`` with the right status and DPoP challenge on deny, and a
    400 ``invalid_request`` (reason ``bad_action``) when ``action(request)`` raises a
    ``ValueError`` (the model's validation errors are ones), before the verifier is asked.
    FastAPI runs it before it validates the route's own parameters: an allow counts
    against the grant's limits even if the route then answers 422, so the callable must
    check every value it reads, and the handler use those same values.
    """
    public_url = _as_sent(public_url)
    # FastAPI is the provider's dependency, not the base install's: imported on use.
    from fastapi import HTTPException, Request, Response  # noqa: PLC0415

    async def dependency(request: Request, response: Response) -> Verification:
        try:
            wanted = action if isinstance(action, Action) else action(request)
        except ValueError:
            # A request no action can name (a malformed amount, a payee missing): the
            # caller's error, as the middleware answers it; not a 500 with a traceback.
            raise HTTPException(
                status_code=400, detail={"error": "invalid_request", "reason": "bad_action"}
            ) from None
        chosen = verifier if isinstance(verifier, VerifierClient | OfflineVerifier) else verifier()
        step_up = _values(request.headers, STEP_UP_HEADER.lower())
        if len(step_up) > 1:
            raise HTTPException(status_code=400, detail=_TWO_STEP_UPS)
        try:
            url = _public_url(request.scope, public_url)
        except ValueError:
            raise HTTPException(status_code=400, detail=_BAD_HOST) from None
        verification = await chosen.verify_request(
            method=request.method,
            url=url,
            headers=request.headers,  # Starlette's Headers: every line, repeats kept
            action=wanted,
            step_up_ref=step_up[0] if step_up else None,
        )
        if not verification.allowed:
            status, headers, body = denial(verification)
            raise HTTPException(status_code=status, detail=body, headers=headers)
        if verification.dpop_nonce:
            # FastAPI copies these onto the answer it builds from the handler's return
            # value; a handler returning a Response of its own sets it from the Verification.
            response.headers["DPoP-Nonce"] = verification.dpop_nonce
        return verification

    # This module postpones annotations and imports FastAPI lazily, so tell FastAPI the
    # parameter's real type directly.
    dependency.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [
            inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=kind)
            for name, kind in (("request", Request), ("response", Response))
        ],
        return_annotation=Verification,
    )
    return dependency
