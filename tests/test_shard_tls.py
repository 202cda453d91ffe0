"""The shard link under Ray's TLS settings: with ``RAY_USE_TLS`` on, checks travel over
mutual TLS with the cluster's certificates, a peer without one is refused, and TLS turned
on without its files stops the shard and the client from starting instead of falling back
to plain TCP. A real shard (in-process, with PostgreSQL) and the real client."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from shard_checks import a_check

from agentauth.actors import ShardClient, StateShard, _shard
from agentauth.actors._wire import frame, link_tls, read_frame


def _name(text: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])


def _cluster(directory: Path, name: str) -> dict[str, str]:
    """A CA and one node certificate it signs (as Ray's TLS set-up has): the env Ray reads."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name(f"{name} CA"))
        .issuer_name(_name(f"{name} CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    # Named for a host the shard does not listen on: names are not what is checked.
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("some-node"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("10.9.8.7"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = {
        "RAY_TLS_CA_CERT": (f"{name}-ca.pem", ca.public_bytes(serialization.Encoding.PEM)),
        "RAY_TLS_SERVER_CERT": (f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM)),
        "RAY_TLS_SERVER_KEY": (
            f"{name}.key",
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        ),
    }
    env = {"RAY_USE_TLS": "1"}
    for variable, (filename, content) in files.items():
        path = directory / filename
        path.write_bytes(content)
        path.chmod(0o600)
        env[variable] = str(path)
    return env


def _use(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)


class _Handle:
    """What the client uses of a shard's Ray handle: ``endpoint.remote()``."""

    def __init__(self, endpoint: Callable[[], Awaitable[tuple[str, int, bytes]]]) -> None:
        self.endpoint = self

        async def ask() -> tuple[str, int, bytes]:
            return await endpoint()

        self._ask = ask

    def remote(self) -> Any:
        return self._ask()


def test_no_tls_unless_ray_uses_it() -> None:
    assert link_tls("server", {}) is None
    assert link_tls("client", {"RAY_USE_TLS": "0", "RAY_TLS_CA_CERT": "/x"}) is None


@pytest.mark.parametrize("side", ["server", "client"])
def test_tls_turned_on_without_its_files_refuses_to_start(
    side: Literal["server", "client"],
) -> None:
    env = {"RAY_USE_TLS": "1", "RAY_TLS_SERVER_CERT": "/c", "RAY_TLS_CA_CERT": "/a"}
    with pytest.raises(ValueError, match="RAY_TLS_SERVER_KEY"):
        link_tls(side, env)


def test_a_shard_and_a_client_will_not_start_half_configured(
    monkeypatch: pytest.MonkeyPatch, migrated_database_url: str
) -> None:
    monkeypatch.setenv("RAY_USE_TLS", "1")
    for variable in ("RAY_TLS_SERVER_CERT", "RAY_TLS_SERVER_KEY", "RAY_TLS_CA_CERT"):
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(ValueError, match="RAY_USE_TLS"):
        StateShard(index=731, database_url=migrated_database_url)
    with pytest.raises(ValueError, match="RAY_USE_TLS"):
        ShardClient([])


@pytest.mark.asyncio
async def test_checks_travel_over_mutual_tls_with_the_clusters_certificates(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, migrated_database_url: str
) -> None:
    _use(monkeypatch, _cluster(tmp_path, "cluster"))
    shard = StateShard(index=732, database_url=migrated_database_url)
    client = ShardClient([_Handle(shard.endpoint)], timeout=2.0)
    try:
        result = await client.check(0, a_check("tls"))
        assert (result.allowed, result.reason) == (True, "ok")
        # The shard speaks nothing but TLS: the token in the clear gets no answer.
        host, port, token = await shard.endpoint()
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(frame(token))
        with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
            await asyncio.wait_for(read_frame(reader), 6.0)
        writer.close()
    finally:
        client.close()
        await shard.close()


@pytest.mark.asyncio
async def test_a_peer_without_a_certificate_from_the_clusters_ca_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, migrated_database_url: str
) -> None:
    """A replica holding the token but not a certificate the cluster's CA signed gets no
    link, so its checks are denied; the shard itself answers a proper client meanwhile."""
    cluster, rogue = _cluster(tmp_path, "cluster"), _cluster(tmp_path, "rogue")
    _use(monkeypatch, cluster)
    shard = StateShard(index=733, database_url=migrated_database_url)
    _use(monkeypatch, rogue)
    outsider = ShardClient([_Handle(shard.endpoint)], timeout=0.5, connect_timeout=2.0)
    _use(monkeypatch, cluster)
    member = ShardClient([_Handle(shard.endpoint)], timeout=2.0)
    try:
        result = await outsider.check(0, a_check("rogue"))
        assert (result.allowed, result.reason) == (False, "state_unavailable")
        assert (await member.check(0, a_check("member"))).allowed
    finally:
        outsider.close()
        member.close()
        await shard.close()


async def _until(condition: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def _hung_up(reader: asyncio.StreamReader, within: float) -> bool:
    """Whether the shard closed the connection within ``within`` seconds, sending nothing."""
    try:
        return await asyncio.wait_for(reader.read(1), within) == b""
    except ConnectionError:
        return True
    except TimeoutError:
        return False


# The first bytes of a TLS ClientHello (a handshake record's header and the message's type
# and length), then nothing: a handshake begun and never finished.
_HELLO_BEGUN = bytes.fromhex("160301020001") + bytes(3)


@pytest.mark.asyncio
async def test_tls_handshakes_in_progress_count_against_the_bound(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, migrated_database_url: str
) -> None:
    """A connection counts from its accept, not from the end of its TLS handshake: peers
    that connect and never finish the handshake (silent, or with a ClientHello begun) fill
    the bound of connections yet to show the token; one more is closed at once, with no
    handshake; a replica links again as soon as there is room."""
    _use(monkeypatch, _cluster(tmp_path, "cluster"))
    limit = _shard._MAX_UNAUTHENTICATED
    shard = StateShard(index=734, database_url=migrated_database_url)
    client = ShardClient([_Handle(shard.endpoint)], timeout=2.0)
    host, port, _ = await shard.endpoint()
    stalled = [await asyncio.open_connection(host, port) for _ in range(limit)]
    try:
        for _, writer in stalled[: limit // 2]:
            writer.write(_HELLO_BEGUN)
        await _until(lambda: shard._unauthenticated == limit)
        for _ in range(3):
            reader, writer = await asyncio.open_connection(host, port)
            began = time.monotonic()
            assert await _hung_up(reader, 2.0)
            assert time.monotonic() - began < 1.0  # turned away, not timed out
            writer.close()
        assert shard._unauthenticated == limit

        _, writer = stalled.pop()
        writer.close()
        await _until(lambda: shard._unauthenticated == limit - 1)
        assert (await client.check(0, a_check("room"))).allowed
        assert shard._unauthenticated == limit - 1  # the linked replica is not counted
    finally:
        for _, writer in stalled:
            writer.close()
        client.close()
        await shard.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("sent", [b"", _HELLO_BEGUN], ids=["silent", "hello-begun"])
async def test_a_stalled_tls_handshake_is_timed_out_like_a_stalled_token(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, migrated_database_url: str, sent: bytes
) -> None:
    """A peer that stalls its handshake is counted while it stalls and dropped when the
    token timeout has passed, as one that never shows the token is."""
    _use(monkeypatch, _cluster(tmp_path, "cluster"))
    monkeypatch.setattr(_shard, "_TOKEN_TIMEOUT", 0.5)
    shard = StateShard(index=735, database_url=migrated_database_url)
    try:
        host, port, _ = await shard.endpoint()
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(sent)
        began = time.monotonic()
        await _until(lambda: shard._unauthenticated == 1)
        assert await _hung_up(reader, 3.0)
        assert 0.4 < time.monotonic() - began < 2.0
        await _until(lambda: shard._unauthenticated == 0)
        writer.close()
    finally:
        await shard.close()
