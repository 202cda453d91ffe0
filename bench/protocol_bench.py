"""Protocol microbenchmark: microseconds per operation, all measured in one run.

    python bench/protocol_bench.py [--n 3000] [--repeat 5] [--agent-alg ES256|Ed25519]

Reports the raw cost of the two signature checks (cryptography alone) as the floor, then
AAT verification, DPoP proof verification and the full stateless+envelope check, uncached
and with the AAT's signature result cached. Each figure is the best of ``repeat`` runs of
``n`` operations over pre-generated, distinct inputs (best-of is the least noisy estimate
on a shared machine); ratios compare figures from the same run.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

from agentauth.protocol import (
    AccessTokenVerifier,
    Action,
    Capability,
    DPoPVerifier,
    Envelope,
    Grant,
    KeySet,
    PrivateKey,
    PublicKey,
    RateLimit,
    RequestVerifier,
    SpendLimit,
    UsageState,
    create_dpop_proof,
    evaluate,
    mint_access_token,
)
from agentauth.protocol._jws import parse_compact

ISSUER = "https://registry.local"
AUDIENCE = "https://calendar.example"
HTU = "https://calendar.example/api/events"
NOW = 1_800_000_000


def best_of(fn: Callable[[int], None], n: int, repeat: int) -> float:
    """Best per-operation time in microseconds over ``repeat`` runs of ``n`` operations."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn(n)
        best = min(best, time.perf_counter() - start)
    return best / n * 1e6


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--agent-alg", choices=["ES256", "Ed25519"], default="ES256")
    args = parser.parse_args(argv)
    n = args.n

    registry = PrivateKey.generate("ES256", kid="registry-1")
    agent = PrivateKey.generate(args.agent_alg)
    keys = KeySet([PublicKey.from_jwk(registry.public_jwk())])
    grant = Grant(
        grant_id="grant-1",
        agent_id="agent-1",
        principal_id="human-1",
        provider_id="calendar",
        audience=AUDIENCE,
        capabilities=(
            Capability.read("calendar/*"),
            Capability.write("calendar/events"),
            Capability.transact("payments", max_amount="50", currency="USD"),
        ),
        envelope=Envelope(
            rate_limits=(
                RateLimit(max_count=1000, window_seconds=3600),
                RateLimit(max_count=100, window_seconds=60),
            ),
            spend_limits=(SpendLimit(amount="1000000", currency="USD", period="day"),),
        ),
        created_at=NOW,
    )
    tokens = [
        mint_access_token(
            signer=registry,
            issuer=ISSUER,
            grant=grant,
            jkt=agent.thumbprint,
            receipt_hash="A" * 43,
            now=NOW,
            lifetime=300,
        )
        for _ in range(n)
    ]
    proofs = [
        create_dpop_proof(agent, htm="POST", htu=HTU, now=NOW, access_token=t) for t in tokens
    ]
    action = Action(kind="read", resource="calendar/events")

    registry_public = keys["registry-1"]
    agent_public = agent.public_key
    parsed_tokens = [parse_compact(t, max_bytes=8192) for t in tokens]
    parsed_proofs = [parse_compact(p, max_bytes=2048) for p in proofs]

    def raw_two_signatures(k: int) -> None:
        for i in range(k):
            t, p = parsed_tokens[i], parsed_proofs[i]
            registry_public.verify(t.signature, t.signing_input)
            agent_public.verify(p.signature, p.signing_input)

    def raw_agent_signature(k: int) -> None:
        for i in range(k):
            p = parsed_proofs[i]
            agent_public.verify(p.signature, p.signing_input)

    # "uncached": no token cache, so every token's signature and claims are checked; the
    # per-grant memo stays on, as in a running verifier (new tokens, known grants).
    uncached = AccessTokenVerifier(keys=keys, issuer=ISSUER, cache_size=0)
    cold = AccessTokenVerifier(keys=keys, issuer=ISSUER, cache_size=0, grant_memo_size=0)

    def aat_verify(k: int) -> None:
        for i in range(k):
            uncached.verify(tokens[i], audience=AUDIENCE, now=NOW + 1)

    dpop = DPoPVerifier()
    ath = [uncached.verify(t, audience=AUDIENCE, now=NOW + 1).ath for t in tokens]

    def dpop_verify(k: int) -> None:
        for i in range(k):
            dpop.verify(
                proofs[i], htm="POST", htu=HTU, now=NOW + 1, ath=ath[i], jkt=agent.thumbprint
            )

    # A verifier keeps its 1,024 most recent tokens as built objects and the rest of its
    # cache as atoms it rebuilds on a hit: "hot" requests reuse 512 tokens, each with a
    # proof of its own; the plain cached run's 2,000 distinct tokens are all rebuilt.
    hot = 512
    hot_tokens = [tokens[i % hot] for i in range(n)]
    hot_proofs = [
        create_dpop_proof(agent, htm="POST", htu=HTU, now=NOW, access_token=t) for t in hot_tokens
    ]

    def full(
        verifier: RequestVerifier, use: tuple[list[str], list[str]] = (tokens, proofs)
    ) -> Callable[[int], None]:
        use_tokens, use_proofs = use

        def run(k: int) -> None:
            # Requests spread over 100 agents' states, as a verifier sees them.
            states = [UsageState()] * 100
            for i in range(k):
                checked = verifier.verify(
                    token=use_tokens[i],
                    proof=use_proofs[i],
                    htm="POST",
                    htu=HTU,
                    audience=AUDIENCE,
                    action=action,
                    now=NOW + 1,
                )
                envelope = checked.token.claims.envelope
                decision = evaluate(envelope, states[i % 100], action, now=NOW + 1)
                if not decision.allowed:
                    raise SystemExit(f"benchmark setup error: denied ({decision.reason})")
                states[i % 100] = decision.state

        return run

    full_uncached = RequestVerifier(tokens=uncached, proofs=DPoPVerifier())
    full_cold = RequestVerifier(tokens=cold, proofs=DPoPVerifier(cache_size=0))
    cached_tokens = AccessTokenVerifier(keys=keys, issuer=ISSUER, cache_size=n)
    full_cached = RequestVerifier(tokens=cached_tokens, proofs=DPoPVerifier())
    full(full_cached)(n)  # warm the token cache: every later call is a hit
    hot_cached = RequestVerifier(
        tokens=AccessTokenVerifier(keys=keys, issuer=ISSUER), proofs=DPoPVerifier()
    )
    full(hot_cached, (hot_tokens, hot_proofs))(n)

    rows = [
        ("raw: two signature checks (floor)", best_of(raw_two_signatures, n, args.repeat)),
        ("raw: one signature check (agent)", best_of(raw_agent_signature, n, args.repeat)),
        ("AAT verify (uncached)", best_of(aat_verify, n, args.repeat)),
        ("DPoP proof verify", best_of(dpop_verify, n, args.repeat)),
        ("full: AAT+DPoP+capability+envelope", best_of(full(full_uncached), n, args.repeat)),
        ("full, no caches or memos at all", best_of(full(full_cold), n, args.repeat)),
        (
            "full, AAT cached, hot",
            best_of(full(hot_cached, (hot_tokens, hot_proofs)), n, args.repeat),
        ),
        ("full, AAT cached, rebuilt", best_of(full(full_cached), n, args.repeat)),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"agent key {args.agent_alg}, registry key ES256, n={n}, best of {args.repeat}")
    for name, micros in rows:
        print(f"{name:<{width}}  {micros:8.1f} us/op")
    figures = dict(rows)
    floor2 = figures["raw: two signature checks (floor)"]
    floor1 = figures["raw: one signature check (agent)"]
    ratio_full = figures["full: AAT+DPoP+capability+envelope"] / floor2
    ratio_cached = figures["full, AAT cached, hot"] / floor1
    ratio_rebuilt = figures["full, AAT cached, rebuilt"] / floor1
    print(f"full / two-signature floor     = {ratio_full:.2f}x  (goal <= 1.5x)")
    print(f"full cached / one signature    = {ratio_cached:.2f}x  (goal <= 1.5x)")
    print(f"  the same, token rebuilt      = {ratio_rebuilt:.2f}x")


if __name__ == "__main__":
    main()
