"""A small driver for the registry's HTTP API, as the tests' humans, agents and admin."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from softauthn import SoftAuthenticator

from agentauth.protocol import Capability, PrivateKey, create_dpop_proof


@dataclass
class Human:
    principal_id: str
    session: str
    authenticator: SoftAuthenticator

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.session}"}


@dataclass
class Agent:
    id: str
    key: PrivateKey
    owner: Human


@dataclass
class Provider:
    id: str
    audience: str
    secret: str

    @property
    def headers(self) -> dict[str, str]:
        import base64

        raw = base64.b64encode(f"{self.id}:{self.secret}".encode()).decode()
        return {"Authorization": f"Basic {raw}"}


# A grant to pay for "payments" up to $500 at a time, with a step-up asked above $50.
PAYMENTS = [Capability.transact("payments", max_amount="500", currency="USD").to_document()]
STEP_UP_ABOVE_50 = {"step_up_threshold": {"amount": "50", "currency": "USD"}}


@dataclass
class World:
    client: httpx.AsyncClient
    base: str
    admin_token: str
    origin: str = "http://localhost:8080"
    humans: list[Human] = field(default_factory=list)
    verifier: str = ""

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    def url(self, path: str) -> str:
        return self.base.rstrip("/") + path

    def proof(self, key: PrivateKey, method: str, path: str, token: str | None = None) -> str:
        return create_dpop_proof(
            key, htm=method, htu=self.url(path), now=time.time(), access_token=token
        )

    def dpop(self, agent: Agent, method: str, path: str) -> dict[str, str]:
        return {"DPoP": self.proof(agent.key, method, path)}

    async def as_agent(self, agent: Agent, method: str, path: str, **kwargs: Any) -> httpx.Response:
        path_only = path.split("?", 1)[0]
        headers = {**kwargs.pop("headers", {}), **self.dpop(agent, method, path_only)}
        return await self.client.request(method, self.url(path), headers=headers, **kwargs)

    async def recovery_options(self, principal_id: str) -> tuple[str, dict[str, Any]]:
        """The admin's recovery code for the human, and the registration options the
        recovery begins with."""
        r = await self.client.post(
            self.url("/v1/admin/recoveries"),
            headers=self.admin,
            json={"principal_id": principal_id},
        )
        assert r.status_code == 200, r.text
        code = r.json()["recovery_code"]
        r = await self.client.post(self.url("/v1/recovery/begin"), json={"code": code})
        assert r.status_code == 200, r.text
        return code, r.json()

    async def human(self, name: str = "Alice", *, uv: bool = True) -> Human:
        authenticator = SoftAuthenticator(origin=self.origin, user_verification=uv)
        r = await self.client.post(self.url("/v1/signup/begin"), json={"display_name": name})
        assert r.status_code == 200, r.text
        r = await self.client.post(
            self.url("/v1/signup/finish"), json={"credential": authenticator.create(r.json())}
        )
        assert r.status_code == 200, r.text
        human = Human(r.json()["principal_id"], r.json()["session"], authenticator)
        self.humans.append(human)
        return human

    async def provider(self, kinds: tuple[str, ...] = ("read", "write", "transact")) -> Provider:
        pid = "prov-" + secrets.token_hex(4)
        audience = f"https://{pid}.example"
        r = await self.client.post(
            self.url("/v1/providers"),
            headers=self.admin,
            json={"id": pid, "audience": audience, "display_name": pid, "allowed_kinds": kinds},
        )
        assert r.status_code == 200, r.text
        return Provider(pid, audience, r.json()["secret"])

    async def agent(self, owner: Human, alg: str = "ES256") -> Agent:
        r = await self.client.post(self.url("/v1/enrollments"), headers=owner.headers)
        assert r.status_code == 200, r.text
        key = PrivateKey.generate(alg)  # type: ignore[arg-type]
        r = await self.client.post(
            self.url("/v1/agents"),
            headers={"DPoP": self.proof(key, "POST", "/v1/agents")},
            json={
                "name": "bot",
                "public_jwk": key.public_jwk(),
                "enrollment_code": r.json()["enrollment_code"],
            },
        )
        assert r.status_code == 200, r.text
        return Agent(r.json()["id"], key, owner)

    async def request(
        self,
        agent: Agent,
        provider: Provider,
        capabilities: list[dict[str, Any]] | None = None,
        envelope: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "provider_id": provider.id,
            "capabilities": capabilities or [Capability.read("calendar").to_document()],
        }
        if envelope is not None:
            body["envelope"] = envelope
        r = await self.as_agent(agent, "POST", "/v1/grant-requests", json=body)
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    async def begin_approval(self, human: Human, request_id: str, **narrow: Any) -> dict[str, Any]:
        r = await self.client.post(
            self.url(f"/v1/grant-requests/{request_id}/approval/begin"),
            headers=human.headers,
            json=narrow or None,
        )
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    async def signed_request(self) -> tuple[Human, Agent, dict[str, Any], dict[str, Any]]:
        """A new human, their agent, its pending request to a new provider, and the human's
        passkey assertion approving it: signed, not yet sent."""
        human = await self.human()
        agent = await self.agent(human)
        request = await self.request(agent, await self.provider())
        begun = await self.begin_approval(human, request["id"])
        return human, agent, request, human.authenticator.get(begun["options"])

    async def approve(self, human: Human, request_id: str, **narrow: Any) -> dict[str, Any]:
        begun = await self.begin_approval(human, request_id, **narrow)
        r = await self.client.post(
            self.url(f"/v1/grant-requests/{request_id}/approval/finish"),
            headers=human.headers,
            json={"credential": human.authenticator.get(begun["options"])},
        )
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    async def each_refused_as_invalid(self, method: str, path: str, bodies: list[bytes]) -> None:
        """Every one of these raw bodies, sent by the admin, is a 400 invalid_request."""
        headers = {**self.admin, "Content-Type": "application/json"}
        for content in bodies:
            r = await self.client.request(method, self.url(path), content=content, headers=headers)
            assert r.status_code == 400, (content, r.text)
            assert r.json()["error"] == "invalid_request", content

    async def token(self, agent: Agent, grant_id: str) -> httpx.Response:
        return await self.as_agent(agent, "POST", "/v1/token", json={"grant_id": grant_id})

    async def payments_grant(self) -> tuple[Human, Agent, Provider, dict[str, Any]]:
        return await self.setup_grant(capabilities=PAYMENTS, envelope=STEP_UP_ABOVE_50)

    async def step_up(
        self, agent: Agent, grant_id: str, amount: str, **extra: Any
    ) -> dict[str, Any]:
        """The agent asks its human to approve one payment for "payments"; the pending view."""
        payment = {"grant_id": grant_id, "resource": "payments", "amount": amount}
        r = await self.as_agent(
            agent, "POST", "/v1/step-ups", json={**payment, "currency": "USD", **extra}
        )
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    async def setup_grant(self, **request: Any) -> tuple[Human, Agent, Provider, dict[str, Any]]:
        human = await self.human()
        agent = await self.agent(human)
        provider = await self.provider()
        req = await self.request(agent, provider, **request)
        grant = await self.approve(human, req["id"])
        return human, agent, provider, grant
