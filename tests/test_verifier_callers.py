"""Who may ask the verifier what, without Ray, PostgreSQL or Redis (the replica's service
layer runs for real: tests/verifier_inprocess.py). docs/verifier.md: a provider "can only
verify tokens whose audience is themselves: nobody can burn an agent's proofs or budget by
verifying them first"; a previous secret's overlap ends by the replica's clock; a suspended
provider is told so only once its secret is right (docs/threat-model.md)."""

from __future__ import annotations

import time

import pytest
from verifier_inprocess import AUDIENCE, ask, mint, secret_hash, verifier

from agentauth.actors import Check
from agentauth.protocol import Forbidden, PrivateKey, Unauthenticated
from agentauth.verifier._service import _Provider


@pytest.mark.asyncio
async def test_nobody_burns_an_agents_proof_or_budget_by_verifying_it_first() -> None:
    """Another provider, or a thief with a key of its own, is denied before anything of the
    agent's is reserved or spent: the check its shard records names no proof (no jkt, no
    jti), no envelope, and for another audience not even the agent. The agent's provider
    then verifies the very same proof."""
    v, shards = verifier()
    token = mint(now=time.time())
    body = ask(token)

    elsewhere = await v.verify("prov_b", body)
    assert (elsewhere["decision"], elsewhere["reason"]) == ("deny", "invalid_token:wrong_audience")
    first = shards.recorded[-1]
    assert (first.jkt, first.jti, first.envelope, first.grant_id) == (None, None, None, None)
    assert first.agent_id == "provider:prov_b"  # recorded on the provider's account

    thief = await v.verify("prov_a", ask(token, key=PrivateKey.generate()))
    assert thief["reason"] == "invalid_dpop_proof:jkt_mismatch"
    second = shards.recorded[-1]
    assert (second.jkt, second.jti, second.envelope) == (None, None, None)

    allowed = await v.verify("prov_a", body)
    assert allowed["decision"] == "allow", allowed
    assert shards.recorded[-1].jti is not None and shards.recorded[-1].deny is None


@pytest.mark.asyncio
async def test_a_previous_secret_works_until_its_overlap_ends_by_the_replicas_clock() -> None:
    v, _ = verifier()
    v._providers["prov_a"] = _Provider(
        AUDIENCE, secret_hash("a"), secret_hash("old"), time.time() + 60, False
    )
    assert await v.authenticate_provider("prov_a", "secret-old") == "prov_a"
    assert await v.authenticate_provider("prov_a", "secret-a") == "prov_a"
    v._providers["prov_a"] = _Provider(
        AUDIENCE, secret_hash("a"), secret_hash("old"), time.time() - 1, False
    )
    with pytest.raises(Unauthenticated) as caught:
        await v.authenticate_provider("prov_a", "secret-old")
    assert caught.value.reason == "bad_provider_credential"
    assert await v.authenticate_provider("prov_a", "secret-a") == "prov_a"


@pytest.mark.asyncio
async def test_a_suspension_is_told_only_to_whoever_holds_the_secret() -> None:
    v, _ = verifier()
    v._providers["prov_a"] = _Provider(
        AUDIENCE, secret_hash("a"), secret_hash("old"), time.time() + 60, True
    )
    for secret in ("secret-a", "secret-old"):
        with pytest.raises(Forbidden) as suspended:
            await v.authenticate_provider("prov_a", secret)
        assert suspended.value.reason == "provider_suspended"
    with pytest.raises(Unauthenticated) as wrong:
        await v.authenticate_provider("prov_a", "secret-guess")
    assert wrong.value.reason == "bad_provider_credential"


def test_a_questions_credentials_stay_out_of_its_repr() -> None:
    """The token, the proof and the step-up reference a provider sends are bearers (a
    reference is spent by whoever presents it first with the agent's token): what prints
    the question, or the check sent on to its shard (a log line, an error report that
    records a frame's values), must not print them."""
    body = ask(mint(now=time.time())).model_copy(update={"step_up_ref": "sur_secret-reference"})
    shown = repr(body) + str(body)
    assert body.token not in shown and body.proof not in shown
    assert "sur_secret-reference" not in shown
    assert "calendar/events" in shown  # the rest still says what was asked
    check = Check(agent_id="agt_1", provider_id="prov_a", step_up_ref="sur_secret-reference")
    assert "sur_secret-reference" not in repr(check) and "agt_1" in repr(check)


def test_a_providers_secret_hashes_stay_out_of_its_repr() -> None:
    """As the registry's ProviderCredential: whatever prints a replica's provider table (a
    debugger, an error tracker recording locals) gets no hash of a provider's secret."""
    provider = _Provider(AUDIENCE, secret_hash("a"), secret_hash("old"), 0.0, False)
    shown = repr(provider)
    assert AUDIENCE in shown
    for hashed in (provider.secret_hash, provider.previous_hash):
        assert hashed.hex() not in shown and repr(hashed) not in shown
