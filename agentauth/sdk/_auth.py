"""DPoP-signed requests as an ``httpx.Auth`` (RFC 9449 §7 and §9).

``auth_flow`` signs each request with a fresh proof bound to the access token; if the
server answers with a DPoP nonce challenge it signs once more with that nonce and retries.
The nonce is remembered for the following requests to the same server, and replaced by
any newer one a server sends with another answer (RFC 9449 §8.2: a successful one too).
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable, Generator

import httpx

from ..protocol import Signer, create_dpop_proof

__all__ = ["STEP_UP_HEADER", "DPoPAuth", "is_nonce_challenge"]

# The header an agent sends a step-up approval's one-time reference in, with the payment
# it approved; the provider helpers pass it to the verifier as ``step_up_ref``.
STEP_UP_HEADER = "AgentAuth-Step-Up"


def is_nonce_challenge(response: httpx.Response) -> bool:
    """RFC 9449 §8/§9: 401 (or 400) with ``error="use_dpop_nonce"`` and a DPoP-Nonce."""
    if response.status_code not in (400, 401) or "dpop-nonce" not in response.headers:
        return False
    challenge = response.headers.get("www-authenticate", "")
    if "use_dpop_nonce" in challenge:
        return True
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("error") == "use_dpop_nonce"


def _challenge_in_body(response: httpx.Response) -> bool:
    """Whether only the body can tell if ``response`` is a nonce challenge: RFC 9449 §8's
    authorization-server form puts ``use_dpop_nonce`` in the JSON body alone."""
    return (
        response.status_code in (400, 401)
        and "dpop-nonce" in response.headers
        and "use_dpop_nonce" not in response.headers.get("www-authenticate", "")
    )


# A provider's refusals (by the provider helpers' reasons) that a new token may cure, and so
# let the token go: its grant revoked, inactive or over (``expired``: the envelope's expiry,
# which a newer grant for the provider may not share), a token not bound to the key signing
# its proofs or to the proof (``jkt_mismatch``, ``ath_mismatch``: the agent's key
# replaced), and a token covering too little (``insufficient_capability``, RFC 6750's
# insufficient_scope: the newest grant for the provider may cover more). A 401
# ``invalid_token`` is one whatever its reason (the token expired, its signing key retired).
# Every other refusal stands with any token of the grant: a limit reached (rate, spend, per
# payment, the time window), a step-up wanted or spent, an amount or currency no rule
# accepts, a proof that failed (too old, replayed, before a shard's restart: a new proof is
# the cure), a malformed request, a dependency down.
_TOKEN_GONE = frozenset(
    {
        "revoked",
        "grant_inactive",
        "expired",
        "insufficient_capability",
        "invalid_dpop_proof:jkt_mismatch",
        "invalid_dpop_proof:ath_mismatch",
    }
)


def _may_refuse_token(response: httpx.Response) -> bool:
    """Whether ``response`` may be a refusal of the token whose reason only the body gives:
    a 403 without a challenge or with ``insufficient_scope``, or a 401 for the proof (the
    provider helpers' forms)."""
    challenge = response.headers.get("www-authenticate")
    if response.status_code == 403:
        return challenge is None or "insufficient_scope" in challenge
    return response.status_code == 401 and "invalid_dpop_proof" in (challenge or "")


def _refuses_token(response: httpx.Response) -> bool:
    if response.status_code == 401 and "invalid_token" in response.headers.get(
        "www-authenticate", ""
    ):
        return True
    if not _may_refuse_token(response):
        return False
    try:
        body = response.json()
    except ValueError:
        return False
    # ``require`` refuses through FastAPI's HTTPException, whose answer nests the
    # middleware's body in ``detail``: both are the provider helpers' forms.
    if isinstance(body, dict) and isinstance(body.get("detail"), dict):
        body = body["detail"]
    return isinstance(body, dict) and body.get("reason") in _TOKEN_GONE


def htu_of(url: httpx.URL | str) -> str:
    """The ``htu`` for a request to ``url`` (RFC 9449 §4.2): the URL as httpx sends it, so
    as the server reads it, without query, fragment or userinfo.

    Parsed by httpx, not split as text: a host outside ASCII goes on the wire in its IDNA
    form (``xn--…``) and a path's spaces and non-ASCII characters percent-encoded, and a
    proof naming the text as typed would never match the request the server received.
    Userinfo is not part of the request target, and the verifier refuses an ``htu`` that
    holds it.
    """
    parsed = httpx.URL(url)
    path = parsed.raw_path.partition(b"?")[0].decode("ascii") or "/"
    return f"{parsed.scheme}://{parsed.netloc.decode('ascii')}{path}"


#: How many origins' nonces one ``DPoPAuth`` keeps (the most recently told).
MAX_NONCES = 256


def _origin(url: httpx.URL) -> str:
    return f"{url.scheme}://{url.netloc.decode()}"


def _answered_from(response: httpx.Response) -> str | None:
    """The origin that answered (the last hop's, after redirects); None if unknown."""
    try:
        return _origin(response.request.url)
    except RuntimeError:  # a response built without its request
        return None


class DPoPAuth(httpx.Auth):
    """Signs requests for one access token with the agent's key.

    ``on_refused`` (optional) is called with the token when the server's refusal is one a
    new token may cure (401 ``invalid_token``; ``revoked``, ``grant_inactive``, ``expired``,
    ``insufficient_capability``; a proof refused as not bound to the token), so a cache of
    tokens can let it go.

    A request body is read into memory before it is sent (a streamed upload too), so that
    a nonce challenge's retry can send it again.
    """

    def __init__(
        self,
        *,
        key: Signer,
        token: str | Callable[[], str],
        clock: Callable[[], float] = time.time,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self._key = key
        self._token = token
        self._clock = clock
        self._on_refused = on_refused
        self.nonces: dict[str, str] = {}

    def _remember(self, origin: str, nonce: str) -> None:
        """Keep ``nonce`` for ``origin``, the newest last; at most ``MAX_NONCES`` origins
        (the oldest forgotten, which costs it one nonce challenge), so a client sent to
        many servers does not grow without end."""
        self.nonces.pop(origin, None)
        self.nonces[origin] = nonce
        while len(self.nonces) > MAX_NONCES:
            del self.nonces[next(iter(self.nonces))]

    def _sign(self, request: httpx.Request) -> None:
        token = self._token() if callable(self._token) else self._token
        origin = _origin(request.url)
        proof = create_dpop_proof(
            self._key,
            htm=request.method,
            htu=htu_of(request.url),
            now=self._clock(),
            access_token=token,
            nonce=self.nonces.get(origin),
        )
        request.headers["Authorization"] = f"DPoP {token}"
        request.headers["DPoP"] = proof

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        self._sign(request)
        response = yield request
        origin = _origin(request.url)
        if _answered_from(response) != origin:
            # A client following redirects hands the flow the last hop's answer: another
            # server's nonce is neither this origin's nor one to retry this request with.
            return
        if is_nonce_challenge(response):
            self._remember(origin, response.headers["dpop-nonce"])
            self._sign(request)  # a new proof (new jti) carrying the server's nonce
            response = yield request
            if _answered_from(response) != origin:
                return
        # A server may renew its nonce with any answer (AgentAuth's providers do on an allow
        # whose nonce is aging): the newest one spares the refusal and retry an expired one
        # costs. Only servers that take nonces send one; it goes back to its origin alone.
        renewed = response.headers.get("dpop-nonce")
        if renewed:
            self._remember(origin, renewed)

    # httpx hands the flow a response whose body it has not read. Reading every body first
    # (requires_response_body) would buffer streamed downloads too; only a possible
    # challenge whose error is in the body alone is read, so is_nonce_challenge can see
    # it, and a possible refusal of the token when someone listens for one.

    def _needs_body(self, response: httpx.Response) -> bool:
        return _challenge_in_body(response) or (
            self._on_refused is not None and _may_refuse_token(response)
        )

    def _settled(self, request: httpx.Request, response: httpx.Response) -> None:
        # As with nonces: after a redirect the answer is the last hop's, another server's,
        # whose refusal says nothing of the token this origin issued it for.
        if _answered_from(response) != _origin(request.url):
            return
        if self._on_refused is not None and _refuses_token(response):
            self._on_refused(request.headers["authorization"].removeprefix("DPoP "))

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        # Read first, as httpx's own retrying auths do (requires_request_body): a streamed
        # upload sent once cannot be sent again after a nonce challenge.
        request.read()
        flow = self.auth_flow(request)
        outgoing = next(flow)
        while True:
            response = yield outgoing
            if self._needs_body(response):
                response.read()
            try:
                outgoing = flow.send(response)
            except StopIteration:
                self._settled(outgoing, response)
                return

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        await request.aread()  # as in sync_auth_flow: the body may have to go twice
        flow = self.auth_flow(request)
        outgoing = next(flow)
        while True:
            response = yield outgoing
            if self._needs_body(response):
                await response.aread()
            try:
                outgoing = flow.send(response)
            except StopIteration:
                self._settled(outgoing, response)
                return
