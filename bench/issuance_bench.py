"""Token issuance through the registry on Ray Serve: tokens/s and p50/p99.

    python bench/issuance_bench.py [--seconds 10] [--connections 16] [--replicas 2] [--kms]

Each request is POST /v1/token with a fresh DPoP proof (pre-generated, replayed by wrk from
a Lua script so the load generator costs almost nothing). Every token is a real issuance:
proof check, jti reservation in Redis, grant lookup, signature, token row and audit event
in one PostgreSQL transaction. ``--kms`` repeats the run with the signing key in AWS KMS
(moto's server mode standing in for KMS on this machine) and reports it separately.
"""

from __future__ import annotations

import argparse
import os
import secrets
import tempfile
import time
from pathlib import Path

import httpx
from _stack import REDIS, fresh_database, run, run_wrk, start_serve

LUA = """
local proofs = {}
local i = 0
local body
init = function(args)
  for line in io.lines(args[1]) do proofs[#proofs + 1] = line end
  body = '{"grant_id": "' .. args[2] .. '"}'
end
request = function()
  i = i + 1
  local headers = {["Content-Type"] = "application/json", ["DPoP"] = proofs[i] or proofs[#proofs]}
  return wrk.format("POST", nil, headers, body)
end
"""


def setup_grant(base: str, admin: str) -> tuple[object, str]:
    from registry_world import World

    async def go() -> tuple[object, str]:
        async with httpx.AsyncClient(timeout=60) as client:
            world = World(client=client, base=base, admin_token=admin)
            _, agent, _, grant = await world.setup_grant()
            return agent.key, grant["id"]

    return run(go())  # type: ignore[no-any-return]


def measure(
    label: str, settings_kwargs: dict[str, object], args: argparse.Namespace, port: int
) -> None:
    from ray import serve

    from agentauth.deployments.registry import build_registry_app
    from agentauth.protocol import create_dpop_proof
    from agentauth.registry import RegistrySettings

    admin = secrets.token_urlsafe(24)
    base = f"http://127.0.0.1:{port}/registry"
    settings = RegistrySettings(
        database_url=run(fresh_database()),
        redis_url=REDIS,
        data_dir=Path(tempfile.mkdtemp()),
        issuer=base,
        admin_token=admin,
        pool_max_size=20,
        # One grant takes every token here: far more than an agent's per-grant limit.
        token_limit=1_000_000,
        **settings_kwargs,  # type: ignore[arg-type]
    )
    serve.run(
        build_registry_app(settings, replicas=args.replicas),
        name="registry",
        route_prefix="/registry",
    )
    key, grant_id = setup_grant(base, admin)
    count = int(args.seconds * 3000)  # more proofs than requests: each is used once
    now = time.time()
    proofs = [
        create_dpop_proof(key, htm="POST", htu=f"{base}/v1/token", now=now)  # type: ignore[arg-type]
        for _ in range(count)
    ]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as handle:
        handle.write("\n".join(proofs) + "\n")
    result = run_wrk(
        f"{base}/v1/token",
        LUA,
        [handle.name, grant_id],
        connections=args.connections,
        seconds=args.seconds,
    )
    print(
        f"{label:<28} {result.requests_per_s:8.0f} tokens/s   p50 {result.p50_ms:6.1f} ms"
        f"   p90 {result.p90_ms:6.1f} ms   p99 {result.p99_ms:6.1f} ms"
        f"   ({result.requests} requests, {result.errors} errors)"
    )
    serve.delete("registry")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--kms", action="store_true", help="also measure with AWS KMS (moto)")
    args = parser.parse_args()
    # Dummy credentials for moto, inherited by the Serve replicas.
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    port = start_serve()
    print(
        f"registry replicas={args.replicas}, wrk 1 thread,"
        f" {args.connections} connections, {args.seconds} s"
    )
    measure("local key (ES256)", {}, args, port)
    if args.kms:
        import boto3
        from moto.server import ThreadedMotoServer

        moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
        moto.start()
        host, moto_port = moto.get_host_and_port()
        endpoint = f"http://{host}:{moto_port}"
        kms = boto3.client(
            "kms",
            region_name="us-east-1",
            endpoint_url=endpoint,
            aws_access_key_id="bench",
            aws_secret_access_key="bench",
        )
        key_id = kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"][
            "KeyId"
        ]
        from agentauth.registry import SignerSettings

        measure(
            "AWS KMS via moto (RAW)",
            {
                "signer": SignerSettings(
                    backend="aws", key_id=key_id, endpoint=endpoint, aws_message_type="RAW"
                )
            },
            args,
            port,
        )
        moto.stop()


if __name__ == "__main__":
    main()
