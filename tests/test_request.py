"""RequestVerifier: a token, the DPoP proof bound to it, then a capability, all stateless."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from agentauth.protocol import (
    AccessTokenVerifier,
    Action,
    AuthorizedRequest,
    Capability,
    DPoPNonces,
    DPoPVerifier,
    Grant,
    InsufficientCapability,
    InvalidDPoPProof,
    InvalidToken,
    KeySet,
    PrivateKey,
    PublicKey,
    Read,
    RequestVerifier,
    Transact,
    UseDPoPNonce,
    b64url_encode,
    create_dpop_proof,
    mint_access_token,
    path_as_sent,
)

NOW = 1_760_000_000
ISSUER = "https://registry.example"
AUDIENCE = "https://api.example"
HTU = "https://api.example/v1/calendar/events"
REGISTRY = PrivateKey.generate("ES256", kid="registry-es256")
AGENT = PrivateKey.generate("ES256")
AGENT_ED = PrivateKey.generate("Ed25519")
THIEF = PrivateKey.generate("ES256")
KEYS = KeySet([PublicKey.from_jwk(REGISTRY.public_jwk())])
GRANT = Grant(
    grant_id="grant-1",
    agent_id="agent-1",
    principal_id="human-1",
    provider_id="provider-1",
    audience=AUDIENCE,
    capabilities=(
        Capability.read("calendar/*"),
        Capability.transact("payments", max_amount="50", currency="USD", payees=["shop-1"]),
    ),
    created_at=NOW - 100,
)
READ_EVENT = Action(kind="read", resource="calendar/events/42")


def mint(agent: PrivateKey = AGENT) -> str:
    return mint_access_token(
        signer=REGISTRY,
        issuer=ISSUER,
        grant=GRANT,
        jkt=agent.thumbprint,
        receipt_hash=b64url_encode(hashlib.sha256(b"receipt").digest()),
        now=NOW,
        lifetime=600,
    )


TOKEN = mint()


def request_verifier(**proof_options: Any) -> RequestVerifier:
    return RequestVerifier(
        tokens=AccessTokenVerifier(keys=KEYS, issuer=ISSUER), proofs=DPoPVerifier(**proof_options)
    )


def proof_for(
    token: str | None = TOKEN, *, key: PrivateKey = AGENT, htm: str = "GET", htu: str = HTU
) -> str:
    return create_dpop_proof(key, htm=htm, htu=htu, now=NOW, access_token=token)


def check(
    *,
    token: object = TOKEN,
    proof: object = None,
    action: Action = READ_EVENT,
    htm: str = "GET",
    htu: str = HTU,
    audience: str = AUDIENCE,
    now: float = NOW,
    verifier: RequestVerifier | None = None,
) -> AuthorizedRequest:
    return (verifier or request_verifier()).verify(
        token=token,
        proof=proof_for() if proof is None else proof,
        htm=htm,
        htu=htu,
        audience=audience,
        action=action,
        now=now,
    )


# --- Positive controls -------------------------------------------------------------------------


def test_happy_path_returns_the_allowing_capability() -> None:
    result = check()
    assert isinstance(result.capability, Read)
    assert result.capability.resource == "calendar/*"
    assert result.token.jkt == AGENT.thumbprint
    assert result.token.claims.grant_id == GRANT.grant_id
    assert result.proof.jkt == AGENT.thumbprint
    assert result.proof.htm == "GET"


def test_transaction_within_the_capability_is_allowed() -> None:
    action = Action(
        kind="transact", resource="payments", amount="49.99", currency="USD", payee="shop-1"
    )
    proof = proof_for(htm="POST")
    result = check(action=action, proof=proof, htm="POST")
    assert isinstance(result.capability, Transact)


def test_ed25519_agent_key_is_accepted() -> None:
    token = mint(AGENT_ED)
    result = check(token=token, proof=proof_for(token, key=AGENT_ED))
    assert result.proof.jkt == AGENT_ED.thumbprint


def test_repeated_requests_with_the_cached_token_are_allowed() -> None:
    verifier = request_verifier()
    for _ in range(3):
        assert (
            check(verifier=verifier).token.claims.jti == check(verifier=verifier).token.claims.jti
        )
        assert isinstance(check(verifier=verifier).capability, Read)


def test_nonce_round_trip() -> None:
    verifier = request_verifier(nonces=DPoPNonces([b"n" * 32]))
    with pytest.raises(UseDPoPNonce) as excinfo:
        check(verifier=verifier)
    nonce = excinfo.value.nonce
    proof = create_dpop_proof(AGENT, htm="GET", htu=HTU, now=NOW, access_token=TOKEN, nonce=nonce)
    assert isinstance(check(verifier=verifier, proof=proof).capability, Read)


# --- Capabilities ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "action",
    [
        pytest.param(Action(kind="write", resource="calendar/events/42"), id="write-not-granted"),
        pytest.param(Action(kind="read", resource="contacts/1"), id="read-other-resource"),
        pytest.param(Action(kind="read", resource="calendar"), id="read-pattern-parent"),
        pytest.param(
            Action(
                kind="transact", resource="payments", amount="50.01", currency="USD", payee="shop-1"
            ),
            id="transact-over-max",
        ),
        pytest.param(
            Action(
                kind="transact", resource="payments", amount="5", currency="EUR", payee="shop-1"
            ),
            id="transact-other-currency",
        ),
        pytest.param(
            Action(
                kind="transact", resource="payments", amount="5", currency="USD", payee="shop-2"
            ),
            id="transact-other-payee",
        ),
        pytest.param(Action(kind="custom", name="deploy", resource="prod"), id="custom"),
    ],
)
def test_action_no_capability_allows_is_refused(action: Action) -> None:
    with pytest.raises(InsufficientCapability) as excinfo:
        check(action=action)
    assert excinfo.value.reason == "no_matching_capability"
    assert excinfo.value.status_hint == 403


# --- The proof must be bound to this token and its key -----------------------------------------


def test_proof_bound_to_another_token_is_refused() -> None:
    other = mint()
    assert other != TOKEN
    with pytest.raises(InvalidDPoPProof) as excinfo:
        check(proof=proof_for(other))
    assert excinfo.value.reason == "ath_mismatch"


def test_proof_without_ath_is_refused() -> None:
    with pytest.raises(InvalidDPoPProof) as excinfo:
        check(proof=proof_for(None))
    assert excinfo.value.reason == "ath_mismatch"


def test_signed_proof_with_a_lone_surrogate_ath_is_refused() -> None:
    # The agent's own key signs a proof whose ath is "\ud800": refused as a bad proof,
    # not a UnicodeEncodeError (a 500) escaping the verifier.
    claims = {"jti": "j-1", "htm": "GET", "htu": HTU, "iat": NOW}
    payload = json.dumps(claims, separators=(",", ":"))[:-1] + ',"ath":"\\ud800"}'
    jwk = {k: v for k, v in AGENT.public_jwk().items() if k in ("kty", "crv", "x", "y")}
    header = json.dumps({"typ": "dpop+jwt", "alg": AGENT.alg, "jwk": jwk}).encode()
    data = b64url_encode(header) + "." + b64url_encode(payload.encode("ascii"))
    proof = data + "." + b64url_encode(AGENT.sign(data.encode("ascii")))
    with pytest.raises(InvalidDPoPProof) as excinfo:
        check(proof=proof)
    assert excinfo.value.reason == "malformed"


def test_stolen_token_with_the_thiefs_key_is_refused() -> None:
    with pytest.raises(InvalidDPoPProof) as excinfo:
        check(proof=proof_for(TOKEN, key=THIEF))
    assert excinfo.value.reason == "jkt_mismatch"


@pytest.mark.parametrize(
    ("htm", "htu", "reason"),
    [
        pytest.param("POST", HTU, "htm_mismatch", id="other-method"),
        pytest.param("GET", "https://api.example/v1/payments", "htu_mismatch", id="other-url"),
    ],
)
def test_proof_for_another_request_is_refused(htm: str, htu: str, reason: str) -> None:
    with pytest.raises(InvalidDPoPProof) as excinfo:
        check(proof=proof_for(htm=htm, htu=htu))
    assert excinfo.value.reason == reason


# --- The token is checked first ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        pytest.param({"now": NOW + 3600}, "expired", id="expired"),
        pytest.param({"audience": "https://other.example"}, "wrong_audience", id="wrong-audience"),
        pytest.param({"token": None}, "malformed", id="no-token"),
        pytest.param({"token": TOKEN.rsplit(".", 1)[0]}, "malformed", id="unsigned-token"),
        pytest.param({"token": proof_for()}, "wrong_typ", id="proof-as-token"),
    ],
)
def test_invalid_token_is_refused_before_the_capability(
    kwargs: dict[str, Any], reason: str
) -> None:
    with pytest.raises(InvalidToken) as excinfo:
        check(**kwargs)
    assert excinfo.value.reason == reason


def test_token_as_proof_is_refused() -> None:
    with pytest.raises(InvalidDPoPProof) as excinfo:
        check(proof=TOKEN)
    assert excinfo.value.reason == "wrong_typ"


@pytest.mark.parametrize(
    ("raw_path", "root_path", "expected"),
    [
        (b"/registry/v1/token", "/registry", "/v1/token"),
        (b"/caf%C3%A9/v1/token?x=1", "/café", "/v1/token"),
        (b"/my%20app/v1/a%2Fb", "/my app", "/v1/a%2Fb"),
        (b"/v1/token", "/café", "/v1/token"),  # a proxy took the prefix off
        (b"/other/v1/token", "/café", "/other/v1/token"),
    ],
)
def test_path_as_sent_finds_a_mount_prefix_sent_encoded(
    raw_path: bytes, root_path: str, expected: str
) -> None:
    """The registry names its htu as its issuer plus the path below its mount: a prefix
    the client percent-encoded (``root_path`` is decoded) was left in that path."""
    scope = {"path": "/ignored", "raw_path": raw_path, "root_path": root_path}
    assert path_as_sent(scope) == expected
