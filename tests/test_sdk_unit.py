"""The SDK without a server: the DPoP auth flow driven by hand, errors mapped from bodies."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from agentauth.protocol import Action, DPoPVerifier, Forbidden, PrivateKey, b64url_decode
from agentauth.sdk import DPoPAuth, VerifierClient, error_from_response, is_nonce_challenge


def claims(proof: str) -> dict[str, object]:
    return dict(json.loads(b64url_decode(proof.split(".")[1])))


def test_auth_flow_signs_then_retries_once_with_the_servers_nonce() -> None:
    key = PrivateKey.generate()
    auth = DPoPAuth(key=key, token="tok.en.x")
    request = httpx.Request("GET", "https://api.example/v1/x?q=1")
    flow = auth.auth_flow(request)
    first = next(flow)
    assert first.headers["Authorization"] == "DPoP tok.en.x"
    first_proof = claims(first.headers["DPoP"])  # the request is re-signed in place
    assert "nonce" not in first_proof
    challenge = httpx.Response(
        401,
        headers={"WWW-Authenticate": 'DPoP error="use_dpop_nonce"', "DPoP-Nonce": "n-123"},
        request=request,
    )
    second = flow.send(challenge)
    proof = claims(second.headers["DPoP"])
    assert proof["nonce"] == "n-123" and proof["htu"] == "https://api.example/v1/x"
    assert proof["jti"] != first_proof["jti"]
    with pytest.raises(StopIteration):
        flow.send(httpx.Response(401, headers={"DPoP-Nonce": "again"}, request=request))
    # The nonce is remembered for the next request to that server.
    nxt = next(auth.auth_flow(httpx.Request("POST", "https://api.example/v1/y")))
    assert claims(nxt.headers["DPoP"])["nonce"] == "n-123"
    DPoPVerifier().verify(
        nxt.headers["DPoP"],
        htm="POST",
        htu="https://api.example/v1/y",
        now=time.time(),
        access_token="tok.en.x",
        jkt=key.thumbprint,
    )


def test_only_a_real_nonce_challenge_triggers_a_retry() -> None:
    request = httpx.Request("GET", "https://a.example/")
    assert not is_nonce_challenge(httpx.Response(401, request=request))
    assert not is_nonce_challenge(httpx.Response(403, headers={"DPoP-Nonce": "n"}, request=request))
    plain = httpx.Response(
        401, headers={"DPoP-Nonce": "n"}, json={"error": "invalid_token"}, request=request
    )
    assert not is_nonce_challenge(plain)


def test_server_errors_map_onto_the_error_tree() -> None:
    request = httpx.Request("GET", "https://r.example/")
    error = error_from_response(
        httpx.Response(
            403,
            json={"error": "forbidden", "error_description": "no", "reason": "widening"},
            request=request,
        )
    )
    assert isinstance(error, Forbidden) and error.reason == "widening"
    unknown = error_from_response(httpx.Response(418, json={"error": "teapot"}, request=request))
    assert unknown.code == "teapot"  # type: ignore[attr-defined]


@pytest.mark.asyncio
async def test_verifier_client_fails_closed() -> None:
    action = Action(kind="read", resource="x")
    headers = {"authorization": "DPoP a.b.c", "dpop": "d.e.f"}

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    for transport in (
        httpx.MockTransport(down),
        httpx.MockTransport(lambda r: httpx.Response(500, json={"error": "server_error"})),
        httpx.MockTransport(lambda r: httpx.Response(200, json={"decision": "maybe"})),
        httpx.MockTransport(lambda r: httpx.Response(200, content=b"not json")),
    ):
        client = VerifierClient(
            "http://v", provider_id="p", secret="s", http=httpx.AsyncClient(transport=transport)
        )
        result = await client.verify_request(
            method="GET", url="https://a/x", headers=headers, action=action
        )
        assert (result.allowed, result.reason) == (False, "verifier_unavailable")
    # The verifier refusing the provider itself (a suspension, a wrong secret) decides
    # nothing about the request: denied as unavailable, the verifier's reason kept.
    for status, reason in ((403, "provider_suspended"), (401, "bad_provider_credential")):
        refusing = httpx.MockTransport(
            lambda r, s=status, why=reason: httpx.Response(
                s, json={"error": "forbidden", "reason": why}
            )
        )
        client = VerifierClient(
            "http://v", provider_id="p", secret="s", http=httpx.AsyncClient(transport=refusing)
        )
        result = await client.verify_request(
            method="GET", url="https://a/x", headers=headers, action=action
        )
        assert (result.allowed, result.reason) == (False, "verifier_unavailable")
        assert result.raw == {"status": status, "reason": reason}
    allowing = httpx.MockTransport(
        lambda r: httpx.Response(200, json={"decision": "allow", "reason": "ok"})
    )
    client = VerifierClient(
        "http://v", provider_id="p", secret="s", http=httpx.AsyncClient(transport=allowing)
    )
    missing = await client.verify_request(
        method="GET", url="https://a/x", headers={}, action=action
    )
    assert not missing.allowed and missing.reason == "missing_dpop_credentials"
    assert (
        await client.verify_request(method="GET", url="https://a/x", headers=headers, action=action)
    ).allowed
