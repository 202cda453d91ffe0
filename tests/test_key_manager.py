"""The registry's KeyManager against a real PostgreSQL, without Ray: what a replica that
opens a recorded key (after a restart, or one another replica created) gets."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from conftest import new_database
from fakes.disk import synced_directories
from fakes.vault import FakeVault
from pydantic import ValidationError

from agentauth.keys import SignerUnavailable
from agentauth.protocol import Conflict
from agentauth.registry import RegistrySettings, SignerSettings
from agentauth.registry._keys import KeyManager
from agentauth.registry._service import open_pool
from agentauth.store import migrate

Replicas = Callable[[RegistrySettings], Awaitable[KeyManager]]


@pytest.fixture
def vault() -> Iterator[FakeVault]:
    with FakeVault() as fake:
        assert isinstance(fake, FakeVault)
        yield fake


@pytest_asyncio.fixture(loop_scope="session")
async def database(database_url: str) -> AsyncIterator[str]:
    async with new_database(database_url, "keyman") as url:
        pool = await open_pool(url)
        try:
            async with pool.acquire() as conn:
                await migrate(conn)
        finally:
            await pool.close()
        yield url


def settings(url: str, data_dir: Path, **signer: Any) -> RegistrySettings:
    return RegistrySettings(
        database_url=url,
        redis_url="redis://127.0.0.1:1/0",  # never used by the key manager
        data_dir=data_dir,
        issuer="http://r.test",
        admin_token=secrets.token_urlsafe(24),
        signer=SignerSettings(**signer),
    )


def vault_settings(url: str, data_dir: Path, vault: FakeVault, **token: str) -> RegistrySettings:
    """Settings signing with the fake Vault's key "registry": with its token unless
    ``token`` names another way in (``vault_token_file=...``)."""
    return settings(
        url,
        data_dir,
        backend="vault",
        key_id="registry",
        endpoint=vault.url,
        **(token or {"vault_token": vault.token}),
    )


@pytest_asyncio.fixture(loop_scope="session")
async def replicas() -> AsyncIterator[Replicas]:
    """Opens key managers, each on a pool of its own (a replica); closes them all after."""
    opened: list[tuple[KeyManager, Any]] = []

    async def open_replica(config: RegistrySettings) -> KeyManager:
        pool = await open_pool(config.database_url)
        manager = KeyManager(config, pool)
        opened.append((manager, pool))
        await manager.start()
        return manager

    yield open_replica
    for manager, pool in opened:
        await manager.aclose()
        await pool.close()


async def assert_signs_under(manager: KeyManager, now: float, kid: str) -> Any:
    signer = await manager.signer(now)
    assert signer.kid == kid
    assert signer.public_key().verify(await signer.sign(b"checkpoint"), b"checkpoint")
    return signer


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_a_vault_key_rotated_inside_vault_still_signs_under_its_kid(
    vault: FakeVault, database: str, tmp_path: Path, replicas: Replicas
) -> None:
    """Rotating a Transit key inside Vault (by hand before `agentauth keys rotate`, or by
    its auto_rotate_period) adds a version; the kid on record names the version it was
    opened at. A replica that opens that kid later (a restart) must get that version, not
    the latest: before, every token and checkpoint there was refused until a registry
    rotation, as "the key backend holds a different key"."""
    vault.create_key("registry")
    config = vault_settings(database, tmp_path, vault)
    first = await replicas(config)
    now = 1_900_000_000
    old_kid = (await first.signer(now)).kid
    assert vault.rotate_key("registry") == 2

    restarted = await replicas(config)
    signer = await assert_signs_under(restarted, now, old_kid)
    assert signer.key_version == 1

    # The registry's own rotation then publishes version 2 under a kid of its own, and a
    # replica opening either kid gets that kid's version.
    new_kid = await restarted.rotate(now=now)
    assert new_kid != old_kid
    later = await replicas(config)
    assert (await assert_signs_under(later, now, old_kid)).key_version == 1
    ahead = now + config.key_publish_ahead
    assert (await assert_signs_under(later, ahead, new_kid)).key_version == 2


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_a_vault_token_file_keeps_the_registry_signing_across_token_expiry(
    vault: FakeVault, database: str, tmp_path: Path, replicas: Replicas
) -> None:
    """`vault_token_file` (Vault Agent's sink): the registry's signer, opened once, signs
    on after its token expires and Vault Agent writes a new one; no restart. Until then,
    signing fails closed (SignerUnavailable, 503) and nothing is signed."""
    vault.create_key("registry")
    token_file = tmp_path / "vault-token"
    old = vault.issue_token()
    token_file.write_text(old)
    config = vault_settings(database, tmp_path, vault, vault_token_file=str(token_file))
    manager = await replicas(config)
    now = 1_900_000_000
    kid = (await manager.signer(now)).kid
    await assert_signs_under(manager, now, kid)

    vault.revoke_token(old)  # expired
    signed = vault.signatures
    with pytest.raises(SignerUnavailable):
        await (await manager.signer(now)).sign(b"checkpoint")
    assert vault.signatures == signed

    token_file.write_text(vault.issue_token())  # Vault Agent logged in again
    signer = await assert_signs_under(manager, now, kid)
    assert signer is await manager.signer(now)  # the same signer: nothing was reopened


async def recorded_kids(url: str) -> list[str]:
    pool = await open_pool(url)
    try:
        return [r["kid"] for r in await pool.fetch("SELECT kid FROM signing_keys ORDER BY kid")]
    finally:
        await pool.close()


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_a_key_whose_signatures_do_not_verify_is_never_recorded(
    vault: FakeVault, database: str, tmp_path: Path, replicas: Replicas
) -> None:
    """A backend whose signatures do not verify under the public key it reports (a
    PKCS#11 label on a crossed key pair, a misbehaving server) is refused before its kid
    is recorded: at the first start and at a rotation. Before, the kid was recorded for
    good (rows are never deleted) and published; once it signed, every token and
    checkpoint was 503 until another rotation had activated."""
    vault.create_key("registry")
    config = vault_settings(database, tmp_path, vault)
    vault.wrong_signatures = True
    with pytest.raises(SignerUnavailable) as caught:
        await replicas(config)
    assert caught.value.reason == "bad_signature"
    assert await recorded_kids(database) == []

    vault.wrong_signatures = False
    manager = await replicas(config)
    now = 1_900_000_000
    kid = (await assert_signs_under(manager, now, (await manager.signer(now)).kid)).kid
    vault.rotate_key("registry")
    vault.wrong_signatures = True
    with pytest.raises(SignerUnavailable) as caught:
        await manager.rotate(now=now)
    assert caught.value.reason == "bad_signature"
    assert await recorded_kids(database) == [kid]
    assert [k["kid"] for k in manager.jwks(now)["keys"]] == [kid]


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_a_replica_without_the_local_key_file_creates_no_key_under_its_kid(
    database: str, tmp_path: Path, replicas: Replicas
) -> None:
    """A replica whose data directory lacks a kid's key file (another machine made the
    key) cannot sign, and says why. Before, it generated a new key and wrote it under the
    kid's file name: a key file that names a kid it is not, read again at every request."""
    first = await replicas(settings(database, tmp_path / "a"))
    kid = (await first.signer(1_900_000_000)).kid
    other = await replicas(settings(database, tmp_path / "b"))
    with pytest.raises(SignerUnavailable, match=f"no key file for kid {kid}"):
        await other.signer(1_900_000_000)
    assert not (tmp_path / "b" / "keys" / f"{kid}.pem").exists()
    assert not (tmp_path / "b" / "keys").exists()


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_a_refused_rotation_leaves_no_key_behind(
    database: str, tmp_path: Path, replicas: Replicas
) -> None:
    """A rotation refused (another still pending) made its key first: before, that key's
    file stayed in the keys directory, a private key no record names, one per attempt."""
    manager = await replicas(settings(database, tmp_path))
    keys_dir = tmp_path / "keys"
    now = 1_900_000_000
    pending = await manager.rotate(now=now)
    before = sorted(p.name for p in keys_dir.iterdir())
    for _ in range(2):
        with pytest.raises(Conflict, match="pending"):
            await manager.rotate(now=now + 1)
    assert sorted(p.name for p in keys_dir.iterdir()) == before
    assert f"{pending}.pem" in before and len(before) == 2


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_a_rotation_that_fails_otherwise_closes_the_signer_it_made(
    database: str, tmp_path: Path, replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rotation whose recording fails another way (the database gone, its answer lost)
    may have committed, so its key stays; the handle it opened was neither kept nor
    closed, and a remote backend's HTTP client leaked with it."""
    from agentauth.keys import LocalFileSigner

    manager = await replicas(settings(database, tmp_path))
    closed: list[str] = []
    close = LocalFileSigner.aclose

    async def aclose(signer: LocalFileSigner) -> None:
        closed.append(signer.kid)
        await close(signer)

    async def lost(signer: Any, now: int, token_lifetime: int, publish_ahead: int) -> None:
        raise ConnectionError("the database went away mid-commit")

    monkeypatch.setattr(LocalFileSigner, "aclose", aclose)
    monkeypatch.setattr(manager, "_record_rotation", lost)
    with pytest.raises(ConnectionError):
        await manager.rotate(now=1_900_000_000)
    assert len(closed) == 1
    assert f"{closed[0]}.pem" in {p.name for p in (tmp_path / "keys").iterdir()}


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_a_recorded_local_key_opens_whatever_alg_new_keys_get(
    database: str, tmp_path: Path, replicas: Replicas
) -> None:
    """`signer.alg` chooses the algorithm of keys made from now on (the next rotation's).
    Before, a replica started with a new value refused to open the ES256 key on record
    ("holds an ES256 key, not Ed25519"): no token and no checkpoint until a rotation."""
    first = await replicas(settings(database, tmp_path))
    now = 1_900_000_000
    kid = (await first.signer(now)).kid
    config = settings(database, tmp_path, alg="Ed25519")
    switched = await replicas(config)
    assert (await assert_signs_under(switched, now, kid)).alg == "ES256"
    new_kid = await switched.rotate(now=now)
    ahead = now + config.key_publish_ahead
    assert (await assert_signs_under(switched, ahead, new_kid)).alg == "Ed25519"


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_an_aws_alias_moved_to_a_new_key_leaves_the_recorded_kid_its_key(
    database: str, tmp_path: Path, replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AWS's own rotation pattern moves an alias to a new key. The kid on record names the
    key the alias named when it was made: a replica opening it later (a restart) must reach
    that key by its ARN. Before, it opened the alias, found another key, and refused every
    token and checkpoint until a registry rotation."""
    import boto3
    from moto.server import ThreadedMotoServer

    for name, value in (
        ("AWS_ACCESS_KEY_ID", "testing"),  # moto takes any; nothing here reaches AWS
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        monkeypatch.setenv(name, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        kms = boto3.session.Session().client("kms", endpoint_url=url)

        def new_key() -> str:
            spec = {"KeySpec": "ECC_NIST_P256", "KeyUsage": "SIGN_VERIFY"}
            return str(kms.create_key(**spec)["KeyMetadata"]["KeyId"])

        kms.create_alias(AliasName="alias/registry", TargetKeyId=new_key())
        # moto hashes a DIGEST again (see test_keys): RAW is what verifies against it.
        config = settings(
            database,
            tmp_path,
            backend="aws",
            key_id="alias/registry",
            endpoint=url,
            aws_message_type="RAW",
        )
        now = 1_900_000_000
        old_kid = (await (await replicas(config)).signer(now)).kid
        kms.update_alias(AliasName="alias/registry", TargetKeyId=new_key())

        restarted = await replicas(config)
        await assert_signs_under(restarted, now, old_kid)
        new_kid = await restarted.rotate(now=now)  # the alias's key, under its own kid
        assert new_kid != old_kid
        later = await replicas(config)
        await assert_signs_under(later, now, old_kid)
        await assert_signs_under(later, now + config.key_publish_ahead, new_kid)
        kms.close()
    finally:
        server.stop()


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_a_new_local_key_is_on_disk_under_its_kid_before_its_row_commits(
    database: str, tmp_path: Path, replicas: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new local key was written under a temporary name, then renamed after its kid,
    and that rename was never synced: a crash after the row committed could leave the kid
    on record with no file of that name, and every replica refusing it for good."""
    synced = synced_directories(monkeypatch)
    manager = await replicas(settings(database, tmp_path))
    keys_dir = tmp_path / "keys"
    now = 1_900_000_000
    kid = (await manager.signer(now)).kid
    assert (keys_dir.stat().st_ino, [f"{kid}.pem"]) in synced
    new_kid = await manager.rotate(now=now)
    assert (keys_dir.stat().st_ino, sorted([f"{kid}.pem", f"{new_kid}.pem"])) in synced
    assert sorted(p.name for p in keys_dir.iterdir()) == sorted([f"{kid}.pem", f"{new_kid}.pem"])


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_a_signer_that_fails_to_close_does_not_keep_the_others_open(
    vault: FakeVault,
    database: str,
    tmp_path: Path,
    replicas: Replicas,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Closing the registry closes its key manager, then Redis and the pool. A signer whose
    backend could not close it (down, or wedged behind calls stuck there) raised out of
    the key manager: the signers after it stayed open, and so did the pool and Redis."""
    from agentauth.keys import VaultTransitSigner

    vault.create_key("registry")
    config = vault_settings(database, tmp_path, vault)
    manager = await replicas(config)
    now = 1_900_000_000
    old = await manager.signer(now)
    vault.rotate_key("registry")
    await manager.rotate(now=now)
    new = await manager.signer(now + config.key_publish_ahead)
    assert old is not new
    closed: list[str] = []
    close = VaultTransitSigner._close_blocking

    def close_blocking(signer: VaultTransitSigner) -> None:
        if signer is old:
            raise ConnectionError("Vault is down")
        closed.append(signer.kid)
        close(signer)

    monkeypatch.setattr(VaultTransitSigner, "_close_blocking", close_blocking)
    await manager.aclose()  # does not raise
    assert closed == [new.kid]
    for signer in (old, new):
        with pytest.raises(SignerUnavailable, match="closed"):
            await signer.sign(b"after close")


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_requests_during_a_hung_backend_wait_for_one_open_not_one_each(
    vault: FakeVault, database: str, tmp_path: Path, replicas: Replicas
) -> None:
    """A replica that has not opened the signing kid yet (restarted, or the kid just
    activated) while its backend hangs: every token request needs the kid. Opens ran one
    at a time behind a lock, so the n-th request waited n timeouts (2 s each); each now
    waits for one open, shared by all, and the first request after it failed tries again."""
    import asyncio
    import time

    from agentauth.keys import DEFAULT_TIMEOUT

    vault.create_key("registry")
    config = vault_settings(database, tmp_path, vault)
    now = 1_900_000_000
    kid = (await (await replicas(config)).signer(now)).kid
    restarted = await replicas(config)  # its signer is opened at its first request
    vault.delay = 5.0
    asked = len(vault.requests)
    start = time.monotonic()
    results = await asyncio.gather(
        *(restarted.signer(now) for _ in range(4)), return_exceptions=True
    )
    assert time.monotonic() - start < DEFAULT_TIMEOUT + 1.0
    assert all(isinstance(r, SignerUnavailable) for r in results), results
    assert {r.reason for r in results if isinstance(r, SignerUnavailable)} == {"timeout"}
    assert len(vault.requests) - asked == 1  # one open, awaited by all four
    vault.delay = 0.0
    await assert_signs_under(restarted, now, kid)


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_a_signer_opened_after_the_key_manager_closed_is_closed_not_kept(
    vault: FakeVault, database: str, tmp_path: Path, replicas: Replicas
) -> None:
    """An open still under way when the registry closes finishes later: its signer went
    into the closed manager's table, which nobody would close again (a backend's HTTP
    client, a PKCS#11 session and login, kept for good)."""
    import asyncio

    vault.create_key("registry")
    config = vault_settings(database, tmp_path, vault)
    now = 1_900_000_000
    await (await replicas(config)).signer(now)
    restarted = await replicas(config)
    vault.delay = 0.5  # slow, within the timeout
    request = asyncio.ensure_future(restarted.signer(now))
    await asyncio.sleep(0.1)
    await restarted.aclose()
    with pytest.raises(SignerUnavailable, match="closed"):
        await request
    assert restarted._signers == {}


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_a_retired_kids_signer_is_closed_not_kept_until_the_registry_closes(
    vault: FakeVault, database: str, tmp_path: Path, replicas: Replicas
) -> None:
    """Each rotation left the signer of the kid it retired open for as long as the
    registry ran: one more backend client per rotation and, with a renewable Vault token,
    one more task renewing that token for good. Once the kid is retired its signer is
    closed; a request dated inside its window opens it again."""
    from agentauth.keys import VaultTransitSigner

    vault.create_key("registry")
    token = vault.issue_token(ttl=3600)
    config = vault_settings(database, tmp_path, vault, vault_token=token)
    manager = await replicas(config)
    now = 1_900_000_000
    old = await manager.signer(now)
    assert isinstance(old, VaultTransitSigner)
    assert old._renewal is not None
    vault.rotate_key("registry")
    new_kid = await manager.rotate(now=now)
    activates = now + config.key_publish_ahead
    await assert_signs_under(manager, activates, new_kid)
    assert old.kid in manager._signers  # still published: not retired yet

    retires = activates + config.token_lifetime + 60
    new = await assert_signs_under(manager, retires, new_kid)
    assert list(manager._signers) == [new_kid]
    await asyncio.gather(*manager._retiring)  # closed in the background
    assert old._renewal is None  # its renewal task stopped
    with pytest.raises(SignerUnavailable, match="closed"):
        await old.sign(b"after retirement")
    assert new is await manager.signer(retires)  # the current kid's signer stays open
    again = await assert_signs_under(manager, now, old.kid)
    assert again is not old


def test_a_negative_key_publish_ahead_is_refused_with_the_settings(tmp_path: Path) -> None:
    """A negative publish-ahead was accepted at start and found out only at the first
    rotation (an emergency one, maybe): a ValueError there, answered 500 "internal error",
    a traceback from `agentauth keys rotate`, and each attempt's new key file left behind."""
    config = settings("postgresql://registry@127.0.0.1/registry", tmp_path)
    with pytest.raises(ValidationError, match="key_publish_ahead"):
        RegistrySettings(**{**config.model_dump(), "key_publish_ahead": -1})
    assert RegistrySettings(**{**config.model_dump(), "key_publish_ahead": 0})


def test_a_key_publish_ahead_longer_than_the_clis_is_refused_with_the_settings(
    tmp_path: Path,
) -> None:
    """`agentauth keys rotate` cannot see the deployment's publish-ahead and publishes for
    the longest allowed: unbounded, a deployment could want longer, and the command's new
    key signed before that deployment's readers were due to have fetched it."""
    config = settings("postgresql://registry@127.0.0.1/registry", tmp_path)
    with pytest.raises(ValidationError, match="key_publish_ahead"):
        RegistrySettings(**{**config.model_dump(), "key_publish_ahead": 3601})
    assert RegistrySettings(**{**config.model_dump(), "key_publish_ahead": 3600})


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_a_rotation_publishes_the_new_key_for_the_interval_it_is_given(
    database: str, tmp_path: Path, replicas: Replicas
) -> None:
    """The CLI's rotation gives the longest publish-ahead (it cannot see the deployment's);
    the new key must then wait that long, and the old one outlive it by a token's life."""
    config = settings(database, tmp_path)
    manager = await replicas(config)
    now = 1_900_000_000
    old = await manager.signer(now)
    new_kid = await manager.rotate(now=now, publish_ahead=config.key_publish_ahead + 600)
    activates = now + config.key_publish_ahead + 600
    assert (await manager.signer(activates - 1)).kid == old.kid
    await assert_signs_under(manager, activates, new_kid)
    retires = activates + config.token_lifetime + 60
    assert old.kid in {k["kid"] for k in manager.jwks(retires - 1)["keys"]}
    assert old.kid not in {k["kid"] for k in manager.jwks(retires)["keys"]}
