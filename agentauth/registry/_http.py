"""The registry's HTTP API (FastAPI): authentication, input limits, error mapping.

Callers authenticate as one of:
- an agent: a ``DPoP`` header, a proof for this exact method and URL signed by its
  registered key (each proof usable once);
- a human: ``Authorization: Bearer ses_...`` from a passkey sign-in;
- the administrator: ``Authorization: Bearer <admin token from configuration>``;
- a service provider: ``Authorization: Basic base64(provider_id:secret)``.
Only health, the JWKS and the discovery document answer anonymous callers.

The starts anyone may send (passkey sign-up and sign-in, recovery, agent registration)
are rate limited per client address and globally before anything else is done with them
(``AnonymousStart``; docs/registry.md, "Limits on anonymous starts").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from urllib.parse import urlencode

from fastapi import Depends, FastAPI, Path, Query, Request, Response

from .._web import (
    Authentication,
    NoStore,
    answer_head,
    basic_credentials,
    expect_authentication,
    install_error_handlers,
)
from ..protocol import (
    DPOP_ALGS,
    Forbidden,
    InvalidDPoPProof,
    Unauthenticated,
    path_as_sent,
)
from ..protocol._types import IDENTIFIER_MAX_LENGTH, IDENTIFIER_PATTERN
from ._limits import client_address
from ._models import (
    AgentIn,
    ApprovalBeginIn,
    CredentialIn,
    GrantRequestIn,
    PasskeyChangeIn,
    ProviderIn,
    RecoveryCodeIn,
    RecoveryFinishIn,
    RecoveryIn,
    RevocationIn,
    SecretRotationIn,
    SignupIn,
    StepUpIn,
    SuspensionIn,
    TokenIn,
)
from ._service import AUDIT_PAGE_MAX, LIST_PAGE_MAX, Agent, ProviderCredential, Registry

__all__ = ["create_app"]

log = logging.getLogger("agentauth.registry")


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling: exactly one of these is set."""

    principal_id: str | None = None
    agent: Agent | None = None
    admin: bool = False
    provider_id: str | None = None
    # A provider's credential as it authenticated: only the current one (not the previous
    # one still inside a rotation's overlap) may rotate or end credentials, and the service
    # checks it again inside the transaction that changes them.
    provider: ProviderCredential | None = None


def _registry(request: Request) -> Registry:
    registry: Registry = request.app.state.registry
    return registry


def htu_of(request: Request) -> str:
    """The URL a DPoP proof for this request must name: the issuer's base plus the path as
    the client sent it (see protocol.path_as_sent)."""
    path = path_as_sent(request.scope)
    return _registry(request).settings.issuer.rstrip("/") + path


def _authorization(request: Request) -> tuple[str, str]:
    """The Authorization header as (scheme in lower case, credentials)."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return scheme.lower(), value.strip()


async def caller(request: Request) -> Caller:
    registry = _registry(request)
    proofs = request.headers.getlist("dpop")
    if proofs:
        if len(proofs) != 1:
            raise InvalidDPoPProof("exactly one DPoP header is allowed", reason="multiple_proofs")
        agent = await registry.authenticate_agent(
            proof=proofs[0], htm=request.method, htu=htu_of(request)
        )
        return Caller(agent=agent)
    scheme, value = _authorization(request)
    if scheme == "basic":
        credential = await registry.authenticate_provider(*basic_credentials(value))
        return Caller(provider_id=credential.provider_id, provider=credential)
    token = value if scheme == "bearer" and value else None
    if token is not None and registry.is_admin(token):
        return Caller(admin=True)
    return Caller(principal_id=await registry.authenticate_session(token))


_REALM = "agentauth-registry"
# The scheme each kind of caller authenticates with (the module docstring).
_SCHEMES = {"agent": "DPoP", "human": "Bearer", "admin": "Bearer", "provider": "Basic"}
# A route that names no kinds of caller (sign-up, sign-in) offers them all in a 401.
AUTHENTICATION = Authentication(realm=_REALM, schemes=("DPoP", "Bearer", "Basic"))


def _authentication(kinds: tuple[str, ...], *, token_endpoint: bool = False) -> Authentication:
    wanted = {_SCHEMES[kind] for kind in kinds}
    schemes = tuple(scheme for scheme in AUTHENTICATION.schemes if scheme in wanted)
    return Authentication(realm=_REALM, schemes=schemes, token_endpoint=token_endpoint)


def only(*kinds: str, token_endpoint: bool = False) -> Callable[..., Awaitable[Caller]]:
    """A dependency admitting only the given kinds of caller. A 401 on its route challenges
    for their schemes (recorded before the caller is authenticated, which may raise it);
    ``token_endpoint`` makes DPoP failures 400s (RFC 9449 §5)."""
    authentication = _authentication(kinds, token_endpoint=token_endpoint)

    async def dependency(request: Request) -> Caller:
        expect_authentication(request.scope, authentication)
        who = await caller(request)
        allowed = (
            ("human" in kinds and who.principal_id is not None)
            or ("agent" in kinds and who.agent is not None)
            or ("admin" in kinds and who.admin)
            or ("provider" in kinds and who.provider_id is not None)
        )
        if not allowed:
            raise Forbidden("this endpoint is not for this kind of caller", reason="wrong_caller")
        return who

    return dependency


Human = Annotated[Caller, Depends(only("human"))]
AgentCaller = Annotated[Caller, Depends(only("agent"))]
TokenRequester = Annotated[Caller, Depends(only("agent", token_endpoint=True))]
Admin = Annotated[Caller, Depends(only("admin"))]
HumanOrAgent = Annotated[Caller, Depends(only("human", "agent"))]
HumanOrAdmin = Annotated[Caller, Depends(only("human", "admin"))]
AdminOrProvider = Annotated[Caller, Depends(only("admin", "provider"))]
Anyone = Annotated[Caller, Depends(only("human", "agent", "admin", "provider"))]


async def _anonymous_start(request: Request) -> None:
    """Refuse (429) a client, or everyone, past the limits on anonymous starts; runs before
    the body is validated and before the route writes or verifies anything."""
    registry = _registry(request)
    await registry.admit_anonymous(client_address(request.scope, registry.trusted_proxies))


AnonymousStart = Depends(_anonymous_start)

# Ids in paths and queries have the alphabet of every id the registry issues or accepts
# (protocol.Identifier), and integers fit PostgreSQL's bigint: a NUL byte, a megabyte or
# 10**30 is a 400 here instead of an error from the database.
INT64 = 2**63 - 1
_ID = {"min_length": 1, "max_length": IDENTIFIER_MAX_LENGTH, "pattern": IDENTIFIER_PATTERN}
PathId = Annotated[str, Path(**_ID)]
QueryId = Annotated[str, Query(**_ID)]
OptionalQueryId = Annotated[str | None, Query(**_ID)]
# A page of a listing: its size (400 when outside 1..LIST_PAGE_MAX) and where it starts,
# a cursor the service checks (400 bad_cursor).
ListLimit = Annotated[int | None, Query(ge=1, le=LIST_PAGE_MAX)]


def _link_next(response: Response, query: dict[str, Any], cursor: str | None) -> None:
    """Name the next page, if any, in ``Link: <?...&cursor=...>; rel="next"`` (RFC 8288):
    the request's own parameters (``query``, those given) and the cursor, relative to this
    request's URL so that it holds behind a path prefix such as ``/registry/``."""
    if cursor is not None:
        given = {k: v for k, v in query.items() if v is not None}
        response.headers["Link"] = f'<?{urlencode({**given, "cursor": cursor})}>; rel="next"'


def create_app(registry: Registry) -> FastAPI:
    settings = registry.settings
    app = FastAPI(
        title="AgentAuth registry",
        version="1",
        description="Agents, providers, grant requests, passkey approvals, tokens, audit.",
    )
    app.state.registry = registry

    install_error_handlers(app, log, authentication=AUTHENTICATION)
    # Outermost: every answer, errors included, is marked not to be stored.
    app.add_middleware(NoStore)

    # --- public --------------------------------------------------------------------------

    @app.get("/healthz", tags=["public"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/.well-known/jwks.json", tags=["public"])
    async def jwks() -> dict[str, Any]:
        # Always from the database: a rotated-in key must be visible at once, everywhere.
        await registry.keys.refresh(force=True)
        return registry.keys.jwks(time.time())

    @app.get("/.well-known/agentauth-audit-keys.json", tags=["public"])
    async def audit_keys() -> dict[str, Any]:
        # Every key that ever signed, retired ones too: checkpoints outlive the JWKS's keys.
        await registry.keys.refresh(force=True)
        return registry.keys.audit_keys().to_document()

    @app.get("/.well-known/agentauth-configuration", tags=["public"])
    async def discovery() -> dict[str, Any]:
        base = settings.issuer.rstrip("/")
        return {
            "issuer": settings.issuer,
            "jwks_uri": f"{base}/.well-known/jwks.json",
            "audit_keys_uri": f"{base}/.well-known/agentauth-audit-keys.json",
            "token_endpoint": f"{base}/v1/token",
            "grant_request_endpoint": f"{base}/v1/grant-requests",
            "agent_registration_endpoint": f"{base}/v1/agents",
            "step_up_endpoint": f"{base}/v1/step-ups",
            "revocation_list_endpoint": f"{base}/v1/revocations",
            "token_signing_alg_values_supported": ["ES256", "Ed25519"],
            "dpop_signing_alg_values_supported": list(DPOP_ALGS),
            "token_type": "aat+jwt",
            "rp_id": settings.rp_id,
        }

    # --- humans: passkeys and sessions ---------------------------------------------------

    @app.post("/v1/signup/begin", tags=["humans"], dependencies=[AnonymousStart])
    async def signup_begin(body: SignupIn) -> dict[str, Any]:
        return await registry.signup_begin(body.display_name)

    @app.post("/v1/signup/finish", tags=["humans"])
    async def signup_finish(body: CredentialIn) -> dict[str, Any]:
        return await registry.signup_finish(body.credential)

    @app.post("/v1/sessions/begin", tags=["humans"], dependencies=[AnonymousStart])
    async def login_begin() -> dict[str, Any]:
        return await registry.login_begin()

    @app.post("/v1/sessions/finish", tags=["humans"])
    async def login_finish(body: CredentialIn) -> dict[str, Any]:
        return await registry.login_finish(body.credential)

    @app.post("/v1/recovery/begin", tags=["humans"], dependencies=[AnonymousStart])
    async def recovery_begin(body: RecoveryCodeIn) -> dict[str, Any]:
        """Registration options for a new passkey, for whoever holds a recovery code."""
        return await registry.recovery_begin(body.code)

    @app.post("/v1/recovery/finish", tags=["humans"])
    async def recovery_finish(body: RecoveryFinishIn) -> dict[str, Any]:
        """Spend the code: the new passkey is registered, the human's other passkeys are
        removed and other sessions end, and this answer carries a new session."""
        return await registry.recovery_finish(body.code, body.credential)

    @app.delete("/v1/sessions/current", tags=["humans"])
    async def logout(who: Human, request: Request) -> dict[str, bool]:
        # `who` proved the bearer token is a live session of a human: that token ends.
        await registry.end_session(_authorization(request)[1])
        return {"signed_out": True}

    @app.get("/v1/passkeys", tags=["humans"])
    async def passkeys(who: Human) -> list[dict[str, Any]]:
        return await registry.list_passkeys(_p(who))

    @app.post("/v1/passkeys/confirm", tags=["humans"])
    async def passkey_confirm(who: Human, body: PasskeyChangeIn) -> dict[str, Any]:
        """Options for one of the human's passkeys to confirm adding or removing one."""
        return await registry.passkey_confirm(_p(who), body.subject)

    @app.post("/v1/passkeys/begin", tags=["humans"])
    async def passkey_begin(who: Human, body: CredentialIn) -> dict[str, Any]:
        """``credential``: an existing passkey's assertion over an "add" confirmation."""
        return await registry.passkey_begin(_p(who), body.credential)

    @app.post("/v1/passkeys/finish", tags=["humans"])
    async def passkey_finish(who: Human, body: CredentialIn, request: Request) -> dict[str, Any]:
        return await registry.passkey_finish(
            _p(who), body.credential, session_token=_authorization(request)[1]
        )

    @app.delete("/v1/passkeys/{credential_id}", tags=["humans"])
    async def passkey_remove(
        who: Human, credential_id: str, body: CredentialIn, request: Request
    ) -> dict[str, bool]:
        """``credential``: a passkey's assertion over a "remove" confirmation of this one.
        The human's other sessions end with it."""
        await registry.remove_passkey(
            _p(who), credential_id, body.credential, session_token=_authorization(request)[1]
        )
        return {"removed": True}

    @app.post("/v1/enrollments", tags=["humans"])
    async def enrollment(who: Human, request: Request) -> dict[str, Any]:
        return await registry.create_enrollment(_p(who), session_token=_authorization(request)[1])

    # --- agents --------------------------------------------------------------------------

    @app.post("/v1/agents", tags=["agents"], dependencies=[AnonymousStart])
    async def register_agent(request: Request, body: AgentIn) -> dict[str, Any]:
        # The new key proves itself with a DPoP proof: a 401 here asks for one.
        expect_authentication(request.scope, _authentication(("agent",)))
        proofs = request.headers.getlist("dpop")
        if len(proofs) > 1:
            raise InvalidDPoPProof("exactly one DPoP header is allowed", reason="multiple_proofs")
        return await registry.register_agent(
            name=body.name,
            public_jwk=body.public_jwk,
            enrollment_code=body.enrollment_code,
            proof=proofs[0] if proofs else None,
            htu=htu_of(request),
        )

    @app.get("/v1/agents", tags=["agents"])
    async def list_agents(who: Human) -> list[dict[str, Any]]:
        return await registry.list_agents(_p(who))

    @app.get("/v1/agents/{agent_id}", tags=["agents"])
    async def get_agent(who: HumanOrAgent, agent_id: PathId) -> dict[str, Any]:
        return await registry.get_agent(agent_id, principal_id=who.principal_id, agent=who.agent)

    @app.post("/v1/agents/{agent_id}/disable", tags=["agents"])
    async def disable_agent(who: HumanOrAdmin, agent_id: PathId) -> dict[str, Any]:
        await registry.disable_agent(agent_id, principal_id=who.principal_id, admin=who.admin)
        return {"id": agent_id, "status": "disabled"}

    # --- providers -----------------------------------------------------------------------

    @app.post("/v1/providers", tags=["providers"])
    async def register_provider(_: Admin, body: ProviderIn) -> dict[str, Any]:
        return await registry.register_provider(body)

    @app.get("/v1/providers/{provider_id}", tags=["providers"])
    async def get_provider(who: Anyone, provider_id: PathId) -> dict[str, Any]:
        if who.provider_id is not None and who.provider_id != provider_id:
            raise Forbidden("another provider's record", reason="wrong_provider")
        record = await registry.get_provider(provider_id)
        if who.admin or who.provider_id == provider_id:
            return record
        # Humans and agents see what they need to ask for and approve grants: not the
        # credential's history or the admin's words about a suspension, only that it is one.
        public = ("id", "audience", "display_name", "allowed_kinds")
        return {**{k: record[k] for k in public}, "suspended": record["suspended_at"] is not None}

    def _credential_owner(who: Caller, provider_id: str) -> tuple[str, ProviderCredential | None]:
        """The admin, or the provider itself with its current credential: the previous one
        (inside an overlap, perhaps leaked) must not be able to take the provider over. The
        actor, and the provider's credential for the service to check again in the
        transaction that changes it (this check is only the early answer)."""
        if who.admin:
            return "admin", None
        if who.provider_id != provider_id or who.provider is None:
            raise Forbidden("another provider's credential", reason="wrong_provider")
        if not who.provider.current:
            raise Forbidden(
                "the previous credential cannot change credentials", reason="previous_credential"
            )
        return f"provider:{provider_id}", who.provider

    @app.post("/v1/providers/{provider_id}/secret", tags=["providers"])
    async def rotate_provider_secret(
        who: AdminOrProvider, provider_id: PathId, body: SecretRotationIn | None = None
    ) -> dict[str, Any]:
        actor, credential = _credential_owner(who, provider_id)
        return await registry.rotate_provider_secret(
            provider_id, body or SecretRotationIn(), actor=actor, credential=credential
        )

    @app.put("/v1/providers/{provider_id}/suspension", tags=["providers"])
    async def suspend_provider(_: Admin, provider_id: PathId, body: SuspensionIn) -> dict[str, Any]:
        return await registry.suspend_provider(provider_id, body)

    @app.delete("/v1/providers/{provider_id}/suspension", tags=["providers"])
    async def reinstate_provider(_: Admin, provider_id: PathId) -> dict[str, Any]:
        return await registry.reinstate_provider(provider_id)

    @app.delete("/v1/providers/{provider_id}/secret/previous", tags=["providers"])
    async def end_previous_provider_secret(
        who: AdminOrProvider, provider_id: PathId
    ) -> dict[str, Any]:
        actor, credential = _credential_owner(who, provider_id)
        return await registry.end_previous_provider_secret(
            provider_id, actor=actor, credential=credential
        )

    # --- grant requests and grants -------------------------------------------------------

    @app.post("/v1/grant-requests", tags=["grants"])
    async def request_grant(who: AgentCaller, body: GrantRequestIn) -> dict[str, Any]:
        return await registry.request_grant(_a(who), body)

    @app.get("/v1/grant-requests", tags=["grants"])
    async def list_requests(
        who: HumanOrAgent,
        response: Response,
        status: Annotated[
            str | None, Query(pattern="^(pending|approved|denied|expired|cancelled)$")
        ] = None,
        limit: ListLimit = None,
        cursor: str | None = None,
    ) -> list[dict[str, Any]]:
        """A page of requests, oldest first; a ``Link: rel="next"`` names the next one, as
        for audit events."""
        page = await registry.list_grant_requests(
            principal_id=who.principal_id,
            agent=who.agent,
            status=status,
            limit=LIST_PAGE_MAX if limit is None else limit,
            cursor=cursor,
        )
        _link_next(response, {"status": status, "limit": limit}, page.next)
        return page.rows

    @app.get("/v1/grant-requests/{request_id}", tags=["grants"])
    async def get_request(who: HumanOrAgent, request_id: PathId) -> dict[str, Any]:
        return await registry.get_grant_request(
            request_id, principal_id=who.principal_id, agent=who.agent
        )

    @app.post("/v1/grant-requests/{request_id}/approval/begin", tags=["grants"])
    async def approval_begin(
        who: Human, request_id: PathId, body: ApprovalBeginIn | None = None
    ) -> dict[str, Any]:
        return await registry.approval_begin(_p(who), request_id, body or ApprovalBeginIn())

    @app.post("/v1/grant-requests/{request_id}/approval/finish", tags=["grants"])
    async def approval_finish(who: Human, request_id: PathId, body: CredentialIn) -> dict[str, Any]:
        return await registry.approval_finish(_p(who), request_id, body.credential)

    @app.post("/v1/grant-requests/{request_id}/deny", tags=["grants"])
    async def deny(who: Human, request_id: PathId) -> dict[str, Any]:
        return await registry.deny_request(_p(who), request_id)

    @app.get("/v1/grants", tags=["grants"])
    async def list_grants(who: HumanOrAgent) -> list[dict[str, Any]]:
        return await registry.list_grants(principal_id=who.principal_id, agent=who.agent)

    @app.get("/v1/grants/{grant_id}", tags=["grants"])
    async def get_grant(who: HumanOrAgent, grant_id: PathId) -> dict[str, Any]:
        return await registry.get_grant(grant_id, principal_id=who.principal_id, agent=who.agent)

    @app.get("/v1/grants/{grant_id}/usage", tags=["grants"])
    async def grant_usage(who: HumanOrAgent, grant_id: PathId) -> dict[str, Any]:
        return await registry.grant_usage(grant_id, principal_id=who.principal_id, agent=who.agent)

    @app.get("/v1/grants/{grant_id}/tokens", tags=["grants"])
    async def grant_tokens(who: HumanOrAgent, grant_id: PathId) -> list[dict[str, Any]]:
        return await registry.grant_tokens(
            grant_id, now=int(time.time()), principal_id=who.principal_id, agent=who.agent
        )

    # --- tokens and revocation -----------------------------------------------------------

    @app.post("/v1/token", tags=["tokens"])
    async def token(who: TokenRequester, body: TokenIn) -> dict[str, Any]:
        return await registry.issue_token(_a(who), body.grant_id)

    @app.post("/v1/revocations", tags=["tokens"])
    async def revoke(who: HumanOrAdmin, body: RevocationIn) -> dict[str, Any]:
        return await registry.revoke(
            body.kind, body.target, principal_id=who.principal_id, admin=who.admin
        )

    @app.get("/v1/revocations", tags=["tokens"])
    async def revocations(
        who: Anyone, since: Annotated[int, Query(ge=0, le=INT64)] = 0
    ) -> list[dict[str, Any]]:
        if not (who.admin or who.provider_id):
            raise Forbidden("for verifiers and providers", reason="wrong_caller")
        return await registry.list_revocations(since)

    # --- step-up approvals ---------------------------------------------------------------

    @app.post("/v1/step-ups", tags=["step-up"])
    async def step_up(who: AgentCaller, body: StepUpIn) -> dict[str, Any]:
        return await registry.request_step_up(_a(who), body)

    @app.get("/v1/step-ups", tags=["step-up"])
    async def list_step_ups(
        who: Human,
        response: Response,
        status: Annotated[
            str | None, Query(pattern="^(pending|approved|denied|expired|used|cancelled)$")
        ] = None,
        limit: ListLimit = None,
        cursor: str | None = None,
    ) -> list[dict[str, Any]]:
        """A page of step-ups, oldest first; a ``Link: rel="next"`` names the next one, as
        for audit events."""
        page = await registry.list_step_ups(
            _p(who), status, limit=LIST_PAGE_MAX if limit is None else limit, cursor=cursor
        )
        _link_next(response, {"status": status, "limit": limit}, page.next)
        return page.rows

    @app.get("/v1/step-ups/{step_id}", tags=["step-up"])
    async def get_step_up(
        who: HumanOrAgent, step_id: PathId, wait: Annotated[float, Query(ge=0, le=30)] = 0
    ) -> dict[str, Any]:
        return await registry.get_step_up(
            step_id, principal_id=who.principal_id, agent=who.agent, wait=wait
        )

    @app.post("/v1/step-ups/{step_id}/approval/begin", tags=["step-up"])
    async def step_up_begin(who: Human, step_id: PathId) -> dict[str, Any]:
        return await registry.step_up_begin(_p(who), step_id)

    @app.post("/v1/step-ups/{step_id}/approval/finish", tags=["step-up"])
    async def step_up_finish(who: Human, step_id: PathId, body: CredentialIn) -> dict[str, Any]:
        return await registry.step_up_finish(_p(who), step_id, body.credential)

    @app.post("/v1/step-ups/{step_id}/deny", tags=["step-up"])
    async def step_up_deny(who: Human, step_id: PathId) -> dict[str, Any]:
        return await registry.step_up_deny(_p(who), step_id)

    # --- audit ---------------------------------------------------------------------------

    @app.get("/v1/audit/events", tags=["audit"])
    async def audit_events(
        who: HumanOrAdmin,
        response: Response,
        *,
        agent_id: OptionalQueryId = None,
        grant_id: OptionalQueryId = None,
        limit: Annotated[int | None, Query(ge=1, le=AUDIT_PAGE_MAX)] = None,
        cursor: str | None = None,  # checked by the service: 400 bad_cursor
        order: Literal["asc", "desc"] | None = None,
    ) -> list[dict[str, Any]]:
        """A page of events in (time_ms, chain, seq) order, newest first with
        ``order=desc``. The body stays the bare list it always was; when more may follow, a
        ``Link: <?...&cursor=...>; rel="next"`` header (RFC 8288, relative to this request's
        URL) names the next page."""
        page = await registry.audit_events(
            principal_id=who.principal_id,
            admin=who.admin,
            agent_id=agent_id,
            grant_id=grant_id,
            limit=AUDIT_PAGE_MAX if limit is None else limit,
            cursor=cursor,
            newest_first=order == "desc",
        )
        query = {"agent_id": agent_id, "grant_id": grant_id, "limit": limit, "order": order}
        _link_next(response, query, page.next)
        return page.events

    @app.get("/v1/audit/events/{chain}/{seq}/proof", tags=["audit"])
    async def audit_proof(
        who: Anyone, chain: PathId, seq: Annotated[int, Path(ge=0, le=INT64)]
    ) -> dict[str, Any]:
        return await registry.audit_inclusion(
            chain,
            seq,
            admin=who.admin,
            principal_id=who.principal_id,
            agent_id=who.agent.id if who.agent else None,
            provider_id=who.provider_id,
        )

    @app.get("/v1/audit/checkpoints", tags=["audit"])
    async def checkpoints(_: Anyone) -> list[dict[str, Any]]:
        return await registry.latest_checkpoints()

    @app.get("/v1/audit/consistency", tags=["audit"])
    async def consistency(
        _: Anyone,
        chain: QueryId,
        first: Annotated[int, Query(ge=1, le=INT64)],
        second: Annotated[int, Query(ge=1, le=INT64)],
    ) -> dict[str, Any]:
        return await registry.audit_consistency(chain, first, second)

    # --- administration ------------------------------------------------------------------

    @app.post("/v1/admin/keys/rotate", tags=["admin"])
    async def rotate(_: Admin) -> dict[str, Any]:
        return {"kid": await registry.keys.rotate()}

    @app.post("/v1/admin/recoveries", tags=["admin"])
    async def recovery(_: Admin, body: RecoveryIn) -> dict[str, Any]:
        """A one-time recovery code for a human who has lost every passkey."""
        return await registry.create_recovery(body.principal_id)

    @app.post("/v1/admin/checkpoints", tags=["admin"])
    async def force_checkpoint(_: Admin) -> list[dict[str, Any]]:
        return await registry.checkpoint_all()

    answer_head(app)  # last: it serves the routes declared above
    return app


def _p(who: Caller) -> str:
    if who.principal_id is None:  # the route's dependency rules this out; fail closed anyway
        raise Unauthenticated("a session is required", reason="missing_session")
    return who.principal_id


def _a(who: Caller) -> Agent:
    if who.agent is None:
        raise Unauthenticated("an agent proof is required", reason="missing_proof")
    return who.agent
