"""Signing-key backends against real protocols: every test signs through the real client library.

AWS KMS runs as moto's server (real HTTP), PKCS#11 as a fresh SoftHSM2 token, Vault Transit
and Cloud KMS as local fakes of their HTTP APIs (``tests/fakes``; no Vault server or KMS
emulator installs here). Each backend: signatures verify alone and inside a JWS checked
against a key set built from the signer's public key; the kid is stable; a dead, slow or
lying backend gives ``SignerUnavailable``, never a signature that does not verify.
"""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes.disk import synced_directories
from fakes.gcp_kms import FakeGcpKms
from fakes.net import BlackHole, refused_url
from fakes.vault import FakeVault

from agentauth import keys
from agentauth.keys import (
    AsyncSigner,
    AwsKmsSigner,
    GcpKmsSigner,
    KeyRecord,
    KeyRing,
    LocalFileSigner,
    Pkcs11Signer,
    SignerUnavailable,
    VaultTransitSigner,
)
from agentauth.protocol import (
    Conflict,
    DependencyUnavailable,
    InvalidRequest,
    InvalidToken,
    KeySet,
    PayloadTooLarge,
    PrivateKey,
    PublicKey,
    b64url_decode,
    b64url_encode,
)
from agentauth.protocol._jws import attach_signature, check_signature, parse_compact, signing_input

SOFTHSM_LIB = "/usr/lib/softhsm/libsofthsm2.so"
needs_softhsm = pytest.mark.skipif(
    not Path(SOFTHSM_LIB).exists(), reason=f"SoftHSM2 is not installed ({SOFTHSM_LIB})"
)
TYP = "at+jwt"
# Short timeouts for the failure tests, so the file stays fast; the default is 2 s.
SHORT = 0.4


@pytest.fixture(autouse=True)
def _fresh_warning_throttle(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with no backend warning said yet: the signers' throttles are shared
    by the process, and a line one test caused would hold back the line another expects."""
    from agentauth._logs import Throttle
    from agentauth.keys import _base, _vault

    monkeypatch.setattr(_base, "_said", Throttle(30.0))
    monkeypatch.setattr(_vault, "_said", Throttle(30.0))


async def assert_signs(signer: AsyncSigner) -> bytes:
    """The signer's signatures verify alone and as a JWS under a key set of its public key."""
    assert isinstance(signer, AsyncSigner)
    public = signer.public_key()
    assert public.jwk["kid"] == signer.kid
    assert public.alg == signer.alg

    data = b"registry checkpoint 17"
    signature = await signer.sign(data)
    assert len(signature) == 64
    assert public.verify(signature, data)
    assert not public.verify(signature, data + b"!")

    header = {"alg": signer.alg, "kid": signer.kid, "typ": TYP}
    claims = {"iss": "https://registry.test", "sub": "agent-7", "exp": 1_900_000_000}
    token_input = signing_input(header, claims)
    token = attach_signature(token_input, await signer.sign(token_input))
    parsed = parse_compact(token, max_bytes=8192)
    assert check_signature(parsed, KeySet([public]), typ=TYP, error=InvalidToken) == signer.kid
    return signature


async def assert_unavailable(signer: AsyncSigner, *, reason: str, within: float) -> None:
    start = time.monotonic()
    with pytest.raises(SignerUnavailable) as caught:
        await signer.sign(b"payload")
    assert time.monotonic() - start < within
    assert caught.value.reason == reason, caught.value


def test_public_surface() -> None:
    public = {name for name in vars(keys) if not name.startswith("_")}
    modules = {name for name in public if type(vars(keys)[name]).__name__ == "module"}
    assert set(keys.__all__) == public - modules
    assert issubclass(SignerUnavailable, DependencyUnavailable)
    assert SignerUnavailable.error == "signer_unavailable"
    assert SignerUnavailable.status_hint == 503


def test_importing_keys_loads_no_backend_library() -> None:
    code = (
        "import sys, agentauth.keys; "
        "print(','.join(m for m in ('boto3', 'hvac', 'pkcs11', 'google.cloud.kms_v1') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_crc32c_matches_the_standard_check_value() -> None:
    from agentauth.keys._crc32c import crc32c

    # RFC 3720 (iSCSI) B.4 check value for "123456789".
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0


# -- local file ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_local_file_creates_a_private_key_file_and_reloads_it(tmp_path: Path) -> None:
    path = tmp_path / "state" / "keys" / "registry.pem"
    signer = LocalFileSigner.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    assert [p.name for p in path.parent.iterdir()] == ["registry.pem"]  # no temp file left
    assert signer.alg == "ES256"
    assert signer.kid == signer.public_key().thumbprint
    await assert_signs(signer)

    again = LocalFileSigner.load_or_create(path)
    assert again.kid == signer.kid
    named = LocalFileSigner.load_or_create(path, kid="registry-2026")
    assert named.kid == "registry-2026"
    assert named.public_key().thumbprint == signer.kid
    await assert_signs(named)
    await signer.aclose()


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_local_file_refuses_a_key_others_can_access(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "registry.pem"
    LocalFileSigner.load_or_create(path)
    path.chmod(mode)
    with pytest.raises(SignerUnavailable, match="chmod 600") as caught:
        LocalFileSigner.load_or_create(path)
    assert caught.value.reason == "insecure_key_file"


def test_local_file_refuses_a_key_another_user_owns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "registry.pem"
    LocalFileSigner.load_or_create(path)
    pem = path.read_bytes()
    if os.geteuid() == 0:
        os.chown(path, 12345, 12345)
        me = 0
    else:
        # Unprivileged, the file cannot be given away: this process pretends to be another
        # (non-root) user instead.
        me = os.geteuid() + 1
        monkeypatch.setattr(os, "geteuid", lambda: me)
    owner = path.stat().st_uid
    with pytest.raises(SignerUnavailable, match=f"owned by uid {owner}") as caught:
        LocalFileSigner.load_or_create(path)
    assert caught.value.reason == "insecure_key_file"
    assert f"chown {me} {path}" in caught.value.description
    assert pem.decode() not in str(caught.value)
    assert b"PRIVATE KEY" not in str(caught.value).encode()


@pytest.mark.asyncio
async def test_local_file_ed25519(tmp_path: Path) -> None:
    path = tmp_path / "ed.pem"
    signer = LocalFileSigner.load_or_create(path, alg="Ed25519")
    assert signer.alg == "Ed25519"
    assert signer.public_key().jwk["crv"] == "Ed25519"
    await assert_signs(signer)
    assert LocalFileSigner.load_or_create(path, alg="Ed25519").kid == signer.kid
    # The file decides the algorithm; asking for another one is refused, not ignored.
    with pytest.raises(SignerUnavailable, match="Ed25519 key, not ES256"):
        LocalFileSigner.load_or_create(path)


def test_local_file_refuses_a_symlink(tmp_path: Path) -> None:
    # A link planted at the key path must not redirect where the key is read from.
    real = tmp_path / "real.pem"
    LocalFileSigner.load_or_create(real)
    link = tmp_path / "registry.pem"
    link.symlink_to(real)
    with pytest.raises(SignerUnavailable, match="cannot use key file") as caught:
        LocalFileSigner.load_or_create(link)
    assert caught.value.reason == "bad_key_file"


def test_local_file_refuses_a_fifo_at_once(tmp_path: Path) -> None:
    """A FIFO at the key path (planted, or a misconfigured mount) is refused as not a
    regular file. Before, opening it to read waited for a writer that never comes: the
    registry's start, or its event loop at a kid's first request, hung for good."""
    path = tmp_path / "registry.pem"
    os.mkfifo(path, 0o600)
    outcome: list[BaseException | LocalFileSigner] = []

    def load() -> None:
        try:
            outcome.append(LocalFileSigner.load_or_create(path))
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(2.0)
    if thread.is_alive():
        # Release the hung open (a writer arrives, closes: the read sees EOF) before failing.
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(2.0)
        pytest.fail("opening a FIFO at the key path hung")
    [error] = outcome
    assert isinstance(error, SignerUnavailable), error
    assert error.reason == "bad_key_file"
    assert "not a regular file" in error.description


@pytest.mark.parametrize("make", ["load_or_create", "create_in"])
def test_a_new_key_file_reaches_the_disk_under_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make: str
) -> None:
    """The registry records a new key's kid in PostgreSQL once the file is written: the
    file's name (and its new directory's) must be synced first. Before, only the file's
    contents were: a crash could keep the row and lose the name, and no replica could
    sign under that kid again. ``create_in`` names the file after its kid from the start
    (the registry renamed it afterwards, unsynced)."""
    synced = synced_directories(monkeypatch)
    keys_dir = tmp_path / "keys"
    if make == "load_or_create":
        signer = LocalFileSigner.load_or_create(keys_dir / "registry.pem")
        name = "registry.pem"
    else:
        signer = LocalFileSigner.create_in(keys_dir, alg="Ed25519")
        name = f"{signer.kid}.pem"
        assert signer.alg == "Ed25519"
        assert signer.kid == signer.public_key().thumbprint
    assert (keys_dir.stat().st_ino, [name]) in synced  # the name, and no temporary file
    assert (tmp_path.stat().st_ino, ["keys"]) in synced
    assert stat.S_IMODE((keys_dir / name).stat().st_mode) == 0o600
    assert stat.S_IMODE(keys_dir.stat().st_mode) == 0o700
    assert LocalFileSigner.load_or_create(keys_dir / name, alg=signer.alg).kid == signer.kid


def test_local_file_refuses_garbage(tmp_path: Path) -> None:
    path = tmp_path / "bad.pem"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"not a key")
    os.close(fd)
    with pytest.raises(SignerUnavailable) as caught:
        LocalFileSigner.load_or_create(path)
    assert caught.value.reason == "bad_key_file"


# -- AWS KMS (moto server) -------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="module")
def aws_session() -> Any:
    import boto3

    # Dummy credentials: moto accepts any, and nothing here may reach real AWS.
    return boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    )


def create_kms_key(session: Any, url: str, spec: str = "ECC_NIST_P256") -> str:
    client = session.client("kms", endpoint_url=url)
    key_id: str = client.create_key(KeySpec=spec, KeyUsage="SIGN_VERIFY")["KeyMetadata"]["KeyId"]
    client.close()
    return key_id


@pytest.mark.asyncio
async def test_aws_kms_raw_mode(moto_url: str, aws_session: Any) -> None:
    key_id = create_kms_key(aws_session, moto_url)
    signer = await AwsKmsSigner.open(
        key_id, endpoint_url=moto_url, message_type="RAW", session=aws_session
    )
    await assert_signs(signer)
    assert signer.kid == signer.public_key().thumbprint
    again = await AwsKmsSigner.open(
        key_id, endpoint_url=moto_url, message_type="RAW", session=aws_session, kid="aws-1"
    )
    assert again.kid == "aws-1"
    assert again.public_key().thumbprint == signer.kid
    # KMS signs at most 4096 bytes in RAW mode: refused before any request.
    with pytest.raises(PayloadTooLarge, match="message_type=DIGEST"):
        await signer.sign(b"x" * 4097)
    await assert_signs(again)
    await signer.aclose()
    await again.aclose()
    with pytest.raises(SignerUnavailable, match="closed"):
        await signer.sign(b"after close")


@pytest.mark.asyncio
async def test_aws_kms_digest_mode_self_check_catches_moto(moto_url: str, aws_session: Any) -> None:
    # DIGEST mode sends SHA-256(data) and real KMS signs those 32 bytes as the digest, so
    # the signature verifies over data. moto 5 ignores MessageType and hashes the digest
    # again: its signature is over SHA-256(SHA-256(data)). This is exactly the "backend
    # returns a signature that does not verify" case, and the signer must refuse it.
    key_id = create_kms_key(aws_session, moto_url)
    signer = await AwsKmsSigner.open(key_id, endpoint_url=moto_url, session=aws_session)
    await assert_unavailable(signer, reason="bad_signature", within=2.0)
    await signer.aclose()


@pytest.mark.asyncio
async def test_aws_kms_refuses_keys_that_are_not_p256(moto_url: str, aws_session: Any) -> None:
    key_id = create_kms_key(aws_session, moto_url, spec="ECC_NIST_P384")
    with pytest.raises(SignerUnavailable, match="ECC_NIST_P256") as caught:
        await AwsKmsSigner.open(key_id, endpoint_url=moto_url, session=aws_session)
    assert caught.value.reason == "wrong_key_type"


@pytest.mark.asyncio
async def test_aws_kms_server_gone(aws_session: Any) -> None:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    key_id = create_kms_key(aws_session, url)
    signer = await AwsKmsSigner.open(
        key_id, endpoint_url=url, message_type="RAW", session=aws_session, timeout=SHORT
    )
    await assert_signs(signer)
    server.stop()
    await assert_unavailable(signer, reason="backend_error", within=SHORT + 0.5)
    await signer.aclose()

    with pytest.raises(SignerUnavailable, match="AWS KMS open failed"):
        await AwsKmsSigner.open(key_id, endpoint_url=refused_url(), session=aws_session)


@pytest.mark.asyncio
async def test_aws_kms_unanswered_request_times_out(aws_session: Any) -> None:
    with BlackHole() as hole:
        start = time.monotonic()
        with pytest.raises(SignerUnavailable) as caught:
            await AwsKmsSigner.open(
                "any", endpoint_url=hole.url, session=aws_session, timeout=SHORT
            )
        assert time.monotonic() - start < SHORT + 0.5
        assert caught.value.reason == "timeout"


# -- Google Cloud KMS (fake REST API) --------------------------------------------------------


@pytest.fixture
def gcp() -> Iterator[FakeGcpKms]:
    with FakeGcpKms() as fake:
        assert isinstance(fake, FakeGcpKms)
        yield fake


async def open_gcp(fake: FakeGcpKms, name: str, **kw: Any) -> GcpKmsSigner:
    return await GcpKmsSigner.open(name, endpoint=fake.url, **kw)


@pytest.mark.asyncio
async def test_gcp_kms_signs(gcp: FakeGcpKms) -> None:
    name = gcp.create_key_version()
    signer = await open_gcp(gcp, name)
    await assert_signs(signer)
    assert signer.kid == signer.public_key().thumbprint
    assert (await open_gcp(gcp, name)).kid == signer.kid
    assert (await open_gcp(gcp, name, kid="gcp-1")).kid == "gcp-1"

    # What went over the wire is what the real REST transport sends.
    sign_request = next(r for r in gcp.requests if r.path.endswith(":asymmetricSign"))
    assert sign_request.path == f"/v1/{name}:asymmetricSign"
    body = sign_request.json()
    assert set(body) == {"digest", "digestCrc32c"}
    assert isinstance(body["digestCrc32c"], str)  # int64 in proto JSON
    await signer.aclose()


@pytest.mark.asyncio
async def test_gcp_kms_refuses_unknown_and_non_p256_key_versions(gcp: FakeGcpKms) -> None:
    missing = gcp.create_key_version().replace("cryptoKeyVersions/1", "cryptoKeyVersions/9")
    with pytest.raises(SignerUnavailable, match="Cloud KMS open failed") as caught:
        await open_gcp(gcp, missing)
    assert caught.value.reason == "backend_error"
    p384 = gcp.create_key_version("p384", algorithm="EC_SIGN_P384_SHA384")
    with pytest.raises(SignerUnavailable) as caught:
        await open_gcp(gcp, p384)
    assert caught.value.reason == "wrong_key_type"


@pytest.mark.asyncio
async def test_gcp_kms_integrity_fields_are_checked(gcp: FakeGcpKms) -> None:
    signer = await open_gcp(gcp, gcp.create_key_version())
    gcp.corrupt_signature_crc32c = True
    await assert_unavailable(signer, reason="bad_response", within=2.0)
    gcp.corrupt_signature_crc32c = False
    gcp.skip_digest_crc32c_check = True
    await assert_unavailable(signer, reason="bad_response", within=2.0)
    gcp.skip_digest_crc32c_check = False
    await assert_signs(signer)
    await signer.aclose()


@pytest.mark.asyncio
async def test_gcp_kms_public_key_without_its_checksum_is_refused(gcp: FakeGcpKms) -> None:
    """GetPublicKey's pemCrc32c was checked only when present: an answer without it gave
    a public key no integrity check had passed."""
    name = gcp.create_key_version()
    gcp.omit_pem_crc32c = True
    with pytest.raises(SignerUnavailable, match="CRC32C") as caught:
        await open_gcp(gcp, name)
    assert caught.value.reason == "bad_response"
    gcp.omit_pem_crc32c = False
    signer = await open_gcp(gcp, name)
    await assert_signs(signer)
    await signer.aclose()


@pytest.mark.asyncio
async def test_gcp_kms_wrong_signature_is_never_returned(gcp: FakeGcpKms) -> None:
    signer = await open_gcp(gcp, gcp.create_key_version())
    gcp.wrong_signatures = True
    await assert_unavailable(signer, reason="bad_signature", within=2.0)
    await signer.aclose()


@pytest.mark.asyncio
async def test_gcp_kms_slow_and_stopped(gcp: FakeGcpKms) -> None:
    signer = await open_gcp(gcp, gcp.create_key_version(), timeout=SHORT)
    gcp.delay = 5.0
    await assert_unavailable(signer, reason="timeout", within=SHORT + 0.5)
    gcp.delay = 0.0
    await assert_signs(signer)
    gcp.stop()
    await assert_unavailable(signer, reason="backend_error", within=SHORT + 0.5)
    await signer.aclose()


# -- Vault Transit (fake HTTP API) -----------------------------------------------------------


@pytest.fixture
def vault() -> Iterator[FakeVault]:
    with FakeVault() as fake:
        assert isinstance(fake, FakeVault)
        yield fake


async def open_vault(fake: FakeVault, name: str, **kw: Any) -> VaultTransitSigner:
    kw.setdefault("token", fake.token)
    return await VaultTransitSigner.open(name, url=fake.url, **kw)


@pytest.mark.asyncio
@pytest.mark.parametrize(("key_type", "alg"), [("ecdsa-p256", "ES256"), ("ed25519", "Ed25519")])
async def test_vault_transit_signs(vault: FakeVault, key_type: str, alg: str) -> None:
    vault.create_key("registry", key_type)
    signer = await open_vault(vault, "registry")
    assert signer.alg == alg
    assert signer.key_version == 1
    await assert_signs(signer)
    assert signer.kid == signer.public_key().thumbprint
    assert (await open_vault(vault, "registry")).kid == signer.kid
    assert (await open_vault(vault, "registry", kid="vault-1")).kid == "vault-1"

    sign_body = next(r for r in vault.requests if "/sign/" in r.path).json()
    assert sign_body["key_version"] == 1
    if alg == "ES256":
        assert sign_body["marshaling_algorithm"] == "jws"
        assert sign_body["hash_algorithm"] == "sha2-256"
    else:
        assert "marshaling_algorithm" not in sign_body
    await signer.aclose()


@pytest.mark.asyncio
async def test_vault_rotation_inside_vault_does_not_change_what_a_kid_signs(
    vault: FakeVault,
) -> None:
    vault.create_key("registry")
    v1 = await open_vault(vault, "registry")
    assert vault.rotate_key("registry") == 2
    # The open signer keeps signing with version 1, so its kid stays true.
    await assert_signs(v1)
    v2 = await open_vault(vault, "registry")
    assert v2.key_version == 2
    assert v2.kid != v1.kid
    await assert_signs(v2)
    # A server that signs with another version than asked is caught by the version prefix.
    vault.ignore_key_version = True
    await assert_unavailable(v1, reason="bad_response", within=2.0)
    await v1.aclose()
    await v2.aclose()


@pytest.mark.asyncio
async def test_vault_opens_the_version_a_kid_names(vault: FakeVault) -> None:
    """After Vault rotated the key, the kid of version 1 is reopened at version 1 (a
    registry replica restarting mid-rotation); a version Vault does not hold is refused."""
    vault.create_key("registry")
    v1 = await open_vault(vault, "registry")
    vault.rotate_key("registry")
    again = await open_vault(vault, "registry", key_version=1)
    assert (again.key_version, again.kid) == (1, v1.kid)
    await assert_signs(again)
    assert (await open_vault(vault, "registry", key_version=2)).kid != v1.kid
    with pytest.raises(SignerUnavailable, match="no version 3") as caught:
        await open_vault(vault, "registry", key_version=3)
    assert caught.value.reason == "no_version"
    await v1.aclose()
    await again.aclose()


@pytest.mark.asyncio
async def test_vault_wrong_token_and_unsuitable_keys(vault: FakeVault) -> None:
    vault.create_key("registry")
    secret = "s.wrong-token-that-must-not-leak"
    with pytest.raises(SignerUnavailable) as caught:
        await open_vault(vault, "registry", token=secret)
    assert "Forbidden" in caught.value.description
    assert secret not in str(caught.value)
    assert secret not in repr(caught.value)
    assert secret not in str(caught.value.to_dict())

    with pytest.raises(SignerUnavailable):
        await open_vault(vault, "no-such-key")
    vault.create_key("symmetric", "aes256-gcm96")
    with pytest.raises(SignerUnavailable) as caught:
        await open_vault(vault, "symmetric")
    assert caught.value.reason == "wrong_key_type"


@pytest.mark.asyncio
async def test_a_password_in_the_backend_url_stays_out_of_the_log(
    vault: FakeVault, caplog: pytest.LogCaptureFixture
) -> None:
    """hvac's errors end with the URL they requested, user info included: the log line a
    refused request leaves must not carry a password put in the Vault address."""
    vault.create_key("registry")
    url = vault.url.replace("http://", "http://ops:url-password-7@")
    with caplog.at_level("WARNING", logger="agentauth.keys"), pytest.raises(SignerUnavailable):
        await VaultTransitSigner.open("registry", url=url, token="s.wrong", timeout=SHORT)
    assert "Forbidden" in caplog.text and "/v1/transit/keys/registry" in caplog.text
    assert "url-password-7" not in caplog.text
    assert "//***@127.0.0.1" in caplog.text


@pytest.mark.asyncio
async def test_a_password_in_the_backend_url_stays_out_of_the_error_traceback(
    vault: FakeVault,
) -> None:
    """Logged with its traceback (the registry's checkpoint loop does, and so does the admin
    UI), a signer error printed the client library's exception it was chained to: hvac's,
    which ends with the URL requested, password and all."""
    import traceback

    vault.create_key("registry")
    refused = vault.url.replace("http://", "http://ops:url-password-7@")  # a wrong token
    unparsable = vault.url.replace("http://", "http://ops:url/password-7@")
    for url in (refused, unparsable):
        with pytest.raises(SignerUnavailable) as caught:
            await VaultTransitSigner.open(
                "registry", url=url, token="s.wrong", timeout=SHORT, allow_insecure_http=True
            )
        printed = "".join(traceback.format_exception(caught.value))
        assert "password-7" not in printed, printed
        assert caught.value.reason == "backend_error"


@pytest.mark.asyncio
async def test_a_password_with_an_unescaped_slash_stays_out_of_the_log_too(
    vault: FakeVault, caplog: pytest.LogCaptureFixture
) -> None:
    """The client library cannot parse such an address, and its error quotes it whole:
    the user info ends at the last "@", not at the first "/"."""
    url = vault.url.replace("http://", "http://ops:url/password-7@")
    with caplog.at_level("WARNING", logger="agentauth.keys"), pytest.raises(SignerUnavailable):
        await VaultTransitSigner.open(
            "registry", url=url, token="s.token", timeout=SHORT, allow_insecure_http=True
        )
    assert "Failed to parse" in caplog.text
    assert "password-7" not in caplog.text and "url/" not in caplog.text
    assert "//***@127.0.0.1" in caplog.text


@pytest.mark.asyncio
async def test_vault_wrong_signature_is_never_returned(vault: FakeVault) -> None:
    vault.create_key("registry", "ed25519")
    signer = await open_vault(vault, "registry")
    vault.wrong_signatures = True
    await assert_unavailable(signer, reason="bad_signature", within=2.0)
    await signer.aclose()


# A fresh interpreter whose first import of one module takes `delay` seconds (a busy
# machine's import of a cloud client library), then opens a signer with a shorter timeout.
_SLOW_FIRST_IMPORT = """
import asyncio, importlib.abc, sys, time
from agentauth.keys import GcpKmsSigner, VaultTransitSigner

module, delay, backend, url, name, token = sys.argv[1:]

class SlowFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname == module:
            time.sleep(float(delay))
        return None  # the usual finders then load it

sys.meta_path.insert(0, SlowFinder())

async def main():
    if backend == "gcp":
        signer = await GcpKmsSigner.open(name, endpoint=url, timeout=0.5)
    else:
        signer = await VaultTransitSigner.open(name, url=url, token=token, timeout=0.5)
    assert len(await signer.sign(b"checkpoint")) == 64
    await signer.aclose()
    print("signed")

asyncio.run(main())
"""


@pytest.mark.parametrize("backend", ["gcp", "vault"])
def test_a_slow_first_import_of_the_client_library_is_not_the_backends_timeout(
    backend: str, gcp: FakeGcpKms, vault: FakeVault
) -> None:
    """google.cloud.kms_v1 takes about a second to import here, and longer on a busy
    machine: inside the open's 2 s bound, the first open of a Cloud KMS signer failed as
    "did not answer" while Cloud KMS answered in milliseconds. The library is imported
    before the bounded call now."""
    if backend == "gcp":
        module, url, name, token = "google.cloud.kms_v1", gcp.url, gcp.create_key_version(), ""
    else:
        vault.create_key("registry")
        module, url, name, token = "hvac", vault.url, "registry", vault.token
    args = [module, "1.0", backend, url, name, token]
    run = subprocess.run(
        [sys.executable, "-c", _SLOW_FIRST_IMPORT, *args],
        check=False,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0 and run.stdout.strip() == "signed", run.stderr[-2000:]


@pytest.mark.asyncio
async def test_vault_slow_and_stopped(vault: FakeVault) -> None:
    vault.create_key("registry")
    signer = await open_vault(vault, "registry", timeout=SHORT)
    vault.delay = 5.0
    await assert_unavailable(signer, reason="timeout", within=SHORT + 0.5)
    vault.delay = 0.0
    await assert_signs(signer)
    vault.stop()
    await assert_unavailable(signer, reason="backend_error", within=SHORT + 0.5)
    await signer.aclose()
    with pytest.raises(SignerUnavailable):
        await VaultTransitSigner.open("registry", url=refused_url(), token="t", timeout=SHORT)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "url",
    [
        "http://vault.example:8200",
        "HTTP://10.0.0.5:8200",
        "http://127.0.0.1.nip.io:8200",  # a name, whatever it resolves to
        "http://[fd00::2]:8200",
        "http://user:pw@vault.example",
        "ftp://vault.example",
        "vault.example:8200",
    ],
)
async def test_vault_token_is_never_sent_in_the_clear_off_this_machine(url: str) -> None:
    secret = "s.token-that-must-not-travel"
    with pytest.raises(SignerUnavailable) as caught:
        await VaultTransitSigner.open("registry", url=url, token=secret, timeout=SHORT)
    assert caught.value.reason == "insecure_vault_url"
    assert "https://" in caught.value.description
    assert secret not in str(caught.value) and "pw" not in str(caught.value)


@pytest.mark.asyncio
async def test_vault_plain_http_to_loopback_or_by_explicit_opt_in(
    vault: FakeVault, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agentauth.keys._vault import _resolve_url

    for url in (
        "http://127.0.0.1:8200",
        "http://127.8.9.10",
        "http://[::1]:8200",
        "http://LocalHost:8200",
        "https://vault.example",
    ):
        assert _resolve_url(url, allow_insecure_http=False) == url
    # hvac's fallback when no URL is given is checked as any other.
    monkeypatch.setenv("VAULT_ADDR", "http://vault.example:8200")
    with pytest.raises(SignerUnavailable, match=r"plain http to vault\.example"):
        await VaultTransitSigner.open("registry", url="", token="t", timeout=SHORT)
    monkeypatch.delenv("VAULT_ADDR")
    assert _resolve_url("", allow_insecure_http=False) == "http://localhost:8200"
    # The opt-in lets a plain-http host through to the network (nothing listens there).
    with pytest.raises(SignerUnavailable) as caught:
        await VaultTransitSigner.open(
            "registry",
            url=refused_url().replace("127.0.0.1", "127.0.0.1.invalid"),
            token="t",
            timeout=SHORT,
            allow_insecure_http=True,
        )
    assert caught.value.reason != "insecure_vault_url"
    vault.create_key("registry")
    signer = await open_vault(vault, "registry")  # the fake listens on 127.0.0.1
    await assert_signs(signer)
    await signer.aclose()


@pytest.mark.asyncio
@pytest.mark.parametrize("variable", ["HTTP_PROXY", "all_proxy"])
async def test_vault_plain_http_never_goes_through_a_proxy_from_the_environment(
    vault: FakeVault, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    """requests sends a plain http request through the proxy the environment names: the
    token went in the clear to the proxy's host, past the loopback check of the URL."""
    vault.create_key("registry")
    with FakeVault() as proxy:  # answers nothing useful; records what reaches it
        for name in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv(variable, proxy.url)
        signer = await open_vault(vault, "registry", timeout=SHORT)
        await assert_signs(signer)
        await signer.aclose()
        assert proxy.requests == []


# -- Vault tokens that expire: the token file (Vault Agent's sink) --------------------------


def write_token(path: Path, token: str) -> None:
    # As an editor or `echo` would: a trailing newline, never part of a token.
    path.write_text(token + "\n")


def vault_sign_requests(fake: FakeVault) -> list[str | None]:
    """The token each sign request carried, in order."""
    return [r.headers.get("x-vault-token") for r in fake.requests if "/sign/" in r.path]


@pytest.mark.asyncio
async def test_vault_token_file_takes_a_new_token_when_the_old_expires(
    vault: FakeVault, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Vault tokens have TTLs. Read once, the token expired and every signature failed (503)
    until the registry restarted; with a token file, a 403 makes the signer read the file,
    and a new token there (Vault Agent's auto-auth wrote it) signs at once."""
    vault.create_key("registry")
    first = vault.issue_token(ttl=0.5)
    token_file = tmp_path / "vault-token"
    write_token(token_file, first)
    signer = await open_vault(vault, "registry", token=None, token_file=str(token_file))
    await assert_signs(signer)
    time.sleep(0.6)  # the token's TTL runs out
    second = vault.issue_token()
    write_token(token_file, second)
    with caplog.at_level("INFO", logger="agentauth.keys"):
        await assert_signs(signer)
    # The refused sign was made again once, with the new token; the next went with it.
    assert vault_sign_requests(vault)[-3:] == [first, second, second]
    assert "took the new token" in caplog.text and str(token_file) in caplog.text
    for token in (first, second):
        assert token not in caplog.text and token not in repr(signer)
    await signer.aclose()


@pytest.mark.asyncio
async def test_vault_token_file_still_holding_the_refused_token_fails_closed(
    vault: FakeVault, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Vault Agent stopped renewing: the file holds the token Vault refuses. Nothing is
    signed, the failure is SignerUnavailable (503 signer_unavailable), the log says why,
    and the token is in no log line nor error; once the file changes, signing resumes."""
    vault.create_key("registry")
    token = vault.issue_token()
    token_file = tmp_path / "vault-token"
    write_token(token_file, token)
    signer = await open_vault(vault, "registry", token=None, token_file=str(token_file))
    vault.revoke_token(token)
    signed = vault.signatures
    with caplog.at_level("INFO", logger="agentauth.keys"):
        with pytest.raises(SignerUnavailable) as caught:
            await signer.sign(b"payload")
        assert (caught.value.reason, caught.value.status_hint) == ("backend_error", 503)
        assert vault.signatures == signed
        assert vault_sign_requests(vault) == [token]  # no retry with the same token
        assert "still holds that token" in caplog.text and "Forbidden" in caplog.text
        assert token not in caplog.text and token not in str(caught.value.to_dict())

        token_file.unlink()  # Vault Agent's sink gone: fails closed too, and says so
        await assert_unavailable(signer, reason="bad_token_file", within=2.0)
        assert "cannot read the Vault token file" in caplog.text
    assert vault.signatures == signed

    write_token(token_file, vault.issue_token())
    await assert_signs(signer)
    await signer.aclose()


@pytest.mark.asyncio
async def test_concurrent_signs_refused_together_swap_the_token_once(
    vault: FakeVault, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Signs run in several threads sharing one client (and its token): refused together,
    one reads the file and swaps the token; the others retry with it, none swaps back."""
    vault.create_key("registry")
    old = vault.issue_token()
    token_file = tmp_path / "vault-token"
    write_token(token_file, old)
    signer = await open_vault(vault, "registry", token=None, token_file=str(token_file))
    vault.revoke_token(old)
    new = vault.issue_token()
    write_token(token_file, new)
    vault.delay = 0.1  # the refusals overlap
    with caplog.at_level("INFO", logger="agentauth.keys"):
        signatures = await asyncio.gather(*(signer.sign(b"data %d" % i) for i in range(8)))
    for i, signature in enumerate(signatures):
        assert signer.public_key().verify(signature, b"data %d" % i)
    assert caplog.text.count("took the new token") == 1
    assert vault_sign_requests(vault).count(old) >= 2  # they were refused together
    await signer.aclose()


@pytest.mark.asyncio
async def test_a_vault_token_given_directly_is_not_retried(vault: FakeVault) -> None:
    """Without a file there is nothing to read again: a refused token fails as before."""
    vault.create_key("registry")
    token = vault.issue_token()
    signer = await open_vault(vault, "registry", token=token)
    vault.revoke_token(token)
    await assert_unavailable(signer, reason="backend_error", within=2.0)
    assert vault_sign_requests(vault) == [token]
    await signer.aclose()


@pytest.mark.asyncio
async def test_unusable_vault_token_files_and_settings_are_refused_at_open(
    vault: FakeVault, tmp_path: Path
) -> None:
    vault.create_key("registry")
    secret = "hvs.a-token-with-a-space that-must-not-leak"
    cases: dict[str, bytes | None] = {
        "missing": None,
        "empty": b"\n",
        "huge": b"h" * 20_000,
        "binary": b"hvs.\xff-must-not-leak",
        "space": secret.encode(),
    }
    for name, content in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(SignerUnavailable) as caught:
            await open_vault(vault, "registry", token=None, token_file=str(path))
        assert caught.value.reason == "bad_token_file", name
        assert str(path) in caught.value.description
        assert "must-not-leak" not in str(caught.value.to_dict())
    assert not any("/sign/" in r.path or "/keys/" in r.path for r in vault.requests)
    for both_or_neither in ({"token": None}, {"token_file": str(tmp_path / "empty")}):
        with pytest.raises(SignerUnavailable, match="exactly one") as caught:
            await open_vault(vault, "registry", **both_or_neither)
        assert caught.value.reason == "bad_token"


@pytest.mark.asyncio
async def test_a_vault_token_with_a_line_break_is_neither_refused_nor_logged(
    vault: FakeVault, caplog: pytest.LogCaptureFixture
) -> None:
    """A Secret made from a file ending in a newline gives the token with it: requests
    refused the header, and its message, logged by the signer, quoted the token whole."""
    vault.create_key("registry")
    token = vault.issue_token()
    with caplog.at_level("WARNING", logger="agentauth.keys"):
        signer = await open_vault(vault, "registry", token=token + "\n")
        await assert_signs(signer)
        with pytest.raises(SignerUnavailable) as caught:
            await open_vault(vault, "registry", token=token + "\r\nX-Injected: 1")
    assert caught.value.reason == "bad_token"
    assert token not in caplog.text and token not in str(caught.value.to_dict())
    await signer.aclose()


@pytest.mark.asyncio
async def test_a_token_file_error_is_not_chained_to_hvacs_error(
    vault: FakeVault, tmp_path: Path
) -> None:
    """The file read after a 403 raises inside hvac's Forbidden, whose message is the URL
    as configured: chained to it, a traceback logged later would print a URL password."""
    import traceback

    vault.create_key("registry")
    token = vault.issue_token()
    token_file = tmp_path / "vault-token"
    write_token(token_file, token)
    url = vault.url.replace("http://", "http://ops:url-password-7@")
    signer = await VaultTransitSigner.open("registry", url=url, token_file=str(token_file))
    vault.revoke_token(token)
    token_file.write_bytes(b"x" * 20_000)  # not a token file: refused, raised afresh
    with pytest.raises(SignerUnavailable) as caught:
        await signer.sign(b"payload")
    assert caught.value.reason == "bad_token_file"
    printed = "".join(traceback.format_exception(caught.value))
    assert "password-7" not in printed, printed
    await signer.aclose()


# -- Vault tokens given directly: renewed before they expire --------------------------------


class SteppedWaits:
    """Stands in for the renewal task's sleeps: each wait it asks for is handed to the
    test (``next``), which moves the fake Vault's clock and lets the wait end (``release``).
    Nothing waits out a TTL, and no assertion depends on how fast the machine is."""

    def __init__(self) -> None:
        self._asked: asyncio.Queue[float] = asyncio.Queue()
        self._go: asyncio.Queue[None] = asyncio.Queue()
        self.cancelled = 0

    async def __call__(self, seconds: float) -> None:
        self._asked.put_nowait(seconds)
        try:
            await self._go.get()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def next(self) -> float:
        """The next wait the renewal task asks for (a bounded wait: fails, not hangs,
        when it never asks)."""
        return await asyncio.wait_for(self._asked.get(), 5.0)

    def release(self) -> None:
        self._go.put_nowait(None)

    def asked_nothing(self) -> bool:
        return self._asked.empty()


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> SteppedWaits:
    from agentauth.keys import _vault

    stepped = SteppedWaits()
    monkeypatch.setattr(_vault, "_sleep", stepped)
    return stepped


def renewals(fake: FakeVault) -> list[dict[str, Any]]:
    return [r.json() for r in fake.requests if r.path == "/v1/auth/token/renew-self"]


def renewal_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "vault-token-renewal"]


@pytest.mark.asyncio
async def test_a_renewable_vault_token_keeps_signing_past_its_first_expiry(
    vault: FakeVault, waits: SteppedWaits, caplog: pytest.LogCaptureFixture
) -> None:
    """A `vault_token` with a TTL was never renewed: once the TTL ran out, every sign
    failed (503) until a restart with a new token. It is renewed now, past a half of its
    TTL and before two thirds, for its creation TTL each time, as Vault's clients do."""
    vault.freeze()  # exact TTLs, however slow the machine
    vault.create_key("registry")
    token = vault.issue_token(ttl=60)
    with caplog.at_level("INFO", logger="agentauth.keys"):
        signer = await open_vault(vault, "registry", token=token)
        first = await waits.next()
        assert 30 <= first <= 40
        vault.advance(first)
        waits.release()
        second = await waits.next()  # renewed: the next renewal is due
        assert renewals(vault) == [{"increment": 60}]
        assert 30 <= second <= 40
        vault.advance(60 - first + 1)  # past the token's first expiry (the fake's clock)
        await assert_signs(signer)
        vault.advance(max(0.0, first + second - 61))  # when the renewal asked to be made
        waits.release()
        await waits.next()
        assert len(renewals(vault)) == 2
        vault.advance(31)  # past the expiry the first renewal gave, within the second's
        await assert_signs(signer)
    assert "renewed the Vault token: it expires in 60 s" in caplog.text
    assert token not in caplog.text
    await signer.aclose()


@pytest.mark.asyncio
async def test_a_vault_token_at_its_max_ttl_is_warned_about_then_fails_closed(
    vault: FakeVault, waits: SteppedWaits, caplog: pytest.LogCaptureFixture
) -> None:
    """Vault grants a renewal no more than the token's max TTL leaves. That is noticed at
    the first short grant: a warning with the time left, no renewal after it, and at the
    expiry signing fails closed (503), as an expired token always did."""
    vault.freeze()  # exact TTLs, however slow the machine
    vault.create_key("registry")
    token = vault.issue_token(ttl=60, max_ttl=80)
    signer = await open_vault(vault, "registry", token=token)
    first = await waits.next()
    vault.advance(first)
    with caplog.at_level("INFO", logger="agentauth.keys"):
        waits.release()
        left = await waits.next()  # waiting for the expiry: granted 80 - first, not 60
        assert left == int(80 - first)  # whole seconds, rounded down, as Vault grants
        assert f"reached its max TTL and expires in {left} s" in caplog.text
        assert "not the 60 s asked" in caplog.text
        assert token not in caplog.text
        vault.advance(left + 1)
        waits.release()
        for task in renewal_tasks():
            await asyncio.wait([task], timeout=5.0)
        assert renewal_tasks() == []  # the task ended: nothing more to renew
        assert "reached its max TTL and expired" in caplog.text
    assert len(renewals(vault)) == 1
    signed = vault.signatures
    with pytest.raises(SignerUnavailable) as caught:
        await signer.sign(b"payload")
    assert (caught.value.reason, caught.value.status_hint) == ("backend_error", 503)
    assert vault.signatures == signed
    await signer.aclose()


@pytest.mark.asyncio
async def test_closing_a_vault_signer_stops_its_token_renewal(
    vault: FakeVault, waits: SteppedWaits
) -> None:
    vault.freeze()  # exact TTLs, however slow the machine
    vault.create_key("registry")
    signer = await open_vault(vault, "registry", token=vault.issue_token(ttl=60))
    await waits.next()  # the renewal task is waiting
    assert len(renewal_tasks()) == 1
    await signer.aclose()
    assert renewal_tasks() == [] and waits.cancelled == 1
    waits.release()
    await asyncio.sleep(0)
    assert renewals(vault) == [] and waits.asked_nothing()


@pytest.mark.asyncio
async def test_a_failed_vault_token_renewal_is_said_once_and_tried_again(
    vault: FakeVault, waits: SteppedWaits, caplog: pytest.LogCaptureFixture
) -> None:
    """Vault slow past the timeout at renewal time: said in the log as sign failures are
    (once, then every 30 s), tried again within the time left, renewed once Vault answers."""
    vault.freeze()  # exact TTLs, however slow the machine
    vault.create_key("registry")
    token = vault.issue_token(ttl=60)
    signer = await open_vault(vault, "registry", token=token, timeout=SHORT)
    vault.advance(await waits.next())
    vault.delay = 5.0
    with caplog.at_level("INFO", logger="agentauth.keys"):
        waits.release()
        retry = await waits.next()
        assert 1.0 <= retry < 60
        # "timed out", or the client's own ReadTimeout: whichever ends first.
        assert caplog.text.count("Vault Transit token renewal") == 1
        vault.delay = 0.0
        waits.release()
        await waits.next()
    assert "renewed the Vault token: it expires in 60 s" in caplog.text
    assert token not in caplog.text
    await signer.aclose()


@pytest.mark.asyncio
async def test_vault_tokens_that_need_no_renewal_get_none(
    vault: FakeVault, waits: SteppedWaits, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A token without a TTL (root), one not renewable (said: it will expire), and a token
    file (Vault Agent renews it; the signer does not even look it up)."""
    vault.freeze()  # exact TTLs, however slow the machine
    vault.create_key("registry")
    token_file = tmp_path / "vault-token"
    write_token(token_file, vault.issue_token(ttl=60))
    with caplog.at_level("INFO", logger="agentauth.keys"):
        signers = [
            await open_vault(vault, "registry"),
            await open_vault(vault, "registry", token=vault.issue_token(ttl=60, renewable=False)),
            await open_vault(vault, "registry", token=None, token_file=str(token_file)),
        ]
    await asyncio.sleep(0)
    assert renewal_tasks() == [] and waits.asked_nothing()
    assert "not renewable and expires in 60 s" in caplog.text
    lookups = [r.headers["x-vault-token"] for r in vault.requests if "lookup-self" in r.path]
    assert len(lookups) == 2 and token_file.read_text().strip() not in lookups
    for signer in signers:
        await assert_signs(signer)
        await signer.aclose()


@pytest.mark.asyncio
async def test_a_vault_token_lookup_failing_at_open_leaves_the_signer_open(
    vault: FakeVault, waits: SteppedWaits, caplog: pytest.LogCaptureFixture
) -> None:
    """A policy without lookup-self (no `default` policy): the signer opens and signs, and
    the log says the token will not be renewed."""
    vault.freeze()  # exact TTLs, however slow the machine
    vault.create_key("registry")
    vault.token_self_denied = True
    token = vault.issue_token(ttl=60)
    with caplog.at_level("WARNING", logger="agentauth.keys"):
        signer = await open_vault(vault, "registry", token=token)
    await assert_signs(signer)
    assert "could not look up the Vault token" in caplog.text
    assert "will not be renewed" in caplog.text and token not in caplog.text
    assert renewal_tasks() == [] and waits.asked_nothing()
    await signer.aclose()


@pytest.mark.asyncio
async def test_the_fake_vault_renews_and_caps_tokens_as_vault_does(vault: FakeVault) -> None:
    """The fake's token endpoints, through hvac: what the tests above rely on."""
    import hvac

    vault.freeze()
    client = hvac.Client(url=vault.url, token=vault.issue_token(ttl=60, max_ttl=100))
    looked = client.auth.token.lookup_self()["data"]
    assert (looked["ttl"], looked["renewable"], looked["creation_ttl"]) == (60, True, 60)
    assert looked["explicit_max_ttl"] == 100 and looked["expire_time"].endswith("Z")
    vault.advance(30)
    assert client.auth.token.renew_self(increment="1m")["auth"]["lease_duration"] == 60
    vault.advance(30)
    capped = client.auth.token.renew_self()  # the creation TTL, 60 s: 40 s are left
    assert capped["auth"]["lease_duration"] == 40 and "capped" in capped["warnings"][0]
    root = hvac.Client(url=vault.url, token=vault.token)
    looked = root.auth.token.lookup_self()["data"]
    assert (looked["ttl"], looked["renewable"], looked["expire_time"]) == (0, False, None)
    with pytest.raises(hvac.exceptions.InvalidRequest):
        root.auth.token.renew_self()
    vault.advance(40)
    with pytest.raises(hvac.exceptions.Forbidden):
        client.auth.token.lookup_self()


# -- PKCS#11 (a fresh SoftHSM2 token) --------------------------------------------------------

PIN = "1234"
TOKEN = "agentauth-test"


@pytest.fixture(scope="module")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A new SoftHSM2 token with P-256 key pairs; yields the token label.

    ``signer-a`` and ``signer-b`` are proper pairs. ``crossed`` is a private key and a
    public key that do not belong together (a misprovisioned HSM).
    """
    import pkcs11
    from pkcs11 import Attribute, KeyType

    from agentauth.keys._pkcs11 import P256_EC_PARAMS

    root = tmp_path_factory.mktemp("softhsm")
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\n")
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    subprocess.run(
        [
            *("softhsm2-util", "--init-token", "--free", "--label", TOKEN),
            *("--pin", PIN, "--so-pin", "5678"),
        ],
        env=env,
        check=True,
        capture_output=True,
    )
    # SoftHSM2 reads its configuration when the library initializes: set it first.
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    token = pkcs11.lib(SOFTHSM_LIB).get_token(token_label=TOKEN)
    with token.open(rw=True, user_pin=PIN) as session:
        params = session.create_domain_parameters(
            KeyType.EC, {Attribute.EC_PARAMS: P256_EC_PARAMS}, local=True
        )
        for label in ("signer-a", "signer-b"):
            params.generate_keypair(store=True, label=label)
        params.generate_keypair(
            store=True,
            public_template={Attribute.LABEL: "crossed"},
            private_template={Attribute.LABEL: "crossed-orphan"},
        )
        params.generate_keypair(
            store=True,
            public_template={Attribute.LABEL: "crossed-orphan"},
            private_template={Attribute.LABEL: "crossed"},
        )
    yield TOKEN
    if previous is None:
        del os.environ["SOFTHSM2_CONF"]
    else:
        os.environ["SOFTHSM2_CONF"] = previous


async def open_pkcs11(key_label: str, **kw: Any) -> Pkcs11Signer:
    kw.setdefault("token_label", TOKEN)
    kw.setdefault("pin", PIN)
    return await Pkcs11Signer.open(lib_path=SOFTHSM_LIB, key_label=key_label, **kw)


@needs_softhsm
@pytest.mark.asyncio
async def test_pkcs11_signs_and_signers_share_the_token_login(softhsm: str) -> None:
    a = await open_pkcs11("signer-a")
    b = await open_pkcs11("signer-b")
    await assert_signs(a)
    await assert_signs(b)
    assert a.kid == a.public_key().thumbprint
    assert a.kid != b.kid
    a_again = await open_pkcs11("signer-a", kid="hsm-a")
    assert a_again.kid == "hsm-a"
    assert a_again.public_key().thumbprint == a.kid
    # Closing one signer must not log the token out under the others (rotation keeps the
    # old and new keys open side by side).
    await a.aclose()
    await assert_signs(b)
    await assert_signs(a_again)
    await a_again.aclose()
    await b.aclose()
    # After the last signer closed, a new one logs in again.
    c = await open_pkcs11("signer-a")
    assert c.kid == a.kid
    await assert_signs(c)
    await c.aclose()


@needs_softhsm
@pytest.mark.asyncio
async def test_pkcs11_mismatched_pair_is_never_returned(softhsm: str) -> None:
    signer = await open_pkcs11("crossed")
    await assert_unavailable(signer, reason="bad_signature", within=2.0)
    await signer.aclose()


@needs_softhsm
@pytest.mark.asyncio
async def test_pkcs11_unavailable_token_key_pin_or_library(softhsm: str, tmp_path: Path) -> None:
    # PinIncorrect from the token, or our own check if another test left a session open.
    with pytest.raises(SignerUnavailable, match=r"PinIncorrect|PIN is incorrect"):
        await open_pkcs11("signer-a", pin="0000")
    held = await open_pkcs11("signer-b")
    # With the token already logged in for this process, a wrong PIN still fails.
    with pytest.raises(SignerUnavailable, match="PIN is incorrect"):
        await open_pkcs11("signer-a", pin="0000")
    with pytest.raises(SignerUnavailable, match="NoSuchKey"):
        await open_pkcs11("no-such-key")
    await assert_signs(held)
    await held.aclose()
    with pytest.raises(SignerUnavailable, match="NoSuchToken"):
        await open_pkcs11("signer-a", token_label="no-such-token")
    with pytest.raises(SignerUnavailable):
        await Pkcs11Signer.open(
            lib_path=str(tmp_path / "missing.so"), token_label=TOKEN, pin=PIN, key_label="x"
        )


@needs_softhsm
@pytest.mark.asyncio
async def test_pkcs11_token_logged_in_by_other_code_is_refused_whatever_the_pin(
    softhsm: str,
) -> None:
    """Other code of this process logged the token in with the right PIN: the token then
    answers "already logged in" to any PIN, so the signer cannot check its own and refuses,
    rather than sign with a wrong one."""
    import pkcs11

    from agentauth.keys._pkcs11 import _shared

    assert not _shared, "a signer from another test is still open"
    other = pkcs11.lib(SOFTHSM_LIB).get_token(token_label=softhsm).open(user_pin=PIN)
    try:
        for pin in ("0000", "", PIN):
            with pytest.raises(SignerUnavailable, match="PIN cannot be checked") as caught:
                await open_pkcs11("signer-a", pin=pin)
            assert caught.value.reason == "backend_error"
    finally:
        other.close()
    # Logged out again, the signer logs in itself.
    signer = await open_pkcs11("signer-a")
    await assert_signs(signer)
    await signer.aclose()


def _open_sessions(token_label: str) -> int:
    """How many sessions this process has open on the token, asked of SoftHSM2 itself:
    C_GetSessionInfo succeeds for open session handles only. SoftHSM2 hands out handles
    in increasing order, so a session opened now has the highest yet; it is not counted."""
    import ctypes

    import pkcs11

    class SessionInfo(ctypes.Structure):
        _fields_ = (
            ("slot", ctypes.c_ulong),
            ("state", ctypes.c_ulong),
            ("flags", ctypes.c_ulong),
            ("device_error", ctypes.c_ulong),
        )

    probe = pkcs11.lib(SOFTHSM_LIB).get_token(token_label=token_label).open()
    highest = probe.handle  # type: ignore[attr-defined]
    probe.close()
    get_info = ctypes.CDLL(SOFTHSM_LIB).C_GetSessionInfo  # the library python-pkcs11 loaded
    info = SessionInfo()
    return sum(get_info(ctypes.c_ulong(h), ctypes.byref(info)) == 0 for h in range(1, highest))


@needs_softhsm
@pytest.mark.asyncio
async def test_pkcs11_a_failed_open_leaves_no_session_open(softhsm: str) -> None:
    """Each failure after the signer opened its session closes it: a wrong PIN, a token
    that other code logged in, a key that is not there. Before, each wrong PIN leaked one
    session handle (python-pkcs11 opens one, then raises when the login fails)."""
    import pkcs11

    from agentauth.keys._pkcs11 import _shared

    assert not _shared, "a signer from another test is still open"
    before = _open_sessions(softhsm)
    for _ in range(3):
        with pytest.raises(SignerUnavailable, match="PinIncorrect"):
            await open_pkcs11("signer-a", pin="0000")
    assert _open_sessions(softhsm) == before
    other = pkcs11.lib(SOFTHSM_LIB).get_token(token_label=softhsm).open(user_pin=PIN)
    try:
        with pytest.raises(SignerUnavailable, match="PIN cannot be checked"):
            await open_pkcs11("signer-a", pin=PIN)
        assert _open_sessions(softhsm) == before + 1  # the other code's own, still open
    finally:
        other.close()
    with pytest.raises(SignerUnavailable, match="NoSuchKey"):
        await open_pkcs11("no-such-key")
    assert _open_sessions(softhsm) == before
    # A good login still signs, and its session goes with its last signer.
    signer = await open_pkcs11("signer-a")
    await assert_signs(signer)
    assert _open_sessions(softhsm) == before + 1
    await signer.aclose()
    assert _open_sessions(softhsm) == before
    assert not _shared


@needs_softhsm
@pytest.mark.asyncio
async def test_pkcs11_an_open_finishing_after_its_timeout_keeps_no_session(
    softhsm: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The open runs in a thread that a timeout does not stop: when it gets the token after
    open() gave up, its share of the session is released, not kept for nobody."""
    from agentauth.keys import _pkcs11

    before = _open_sessions(softhsm)
    slow_start = threading.Event()
    real_acquire = _pkcs11._acquire

    def slow_acquire(lib_path: str, token_label: str, pin: str) -> Any:
        slow_start.wait(5)
        return real_acquire(lib_path, token_label, pin)

    monkeypatch.setattr(_pkcs11, "_acquire", slow_acquire)
    with pytest.raises(SignerUnavailable, match="did not answer"):
        await open_pkcs11("signer-a", timeout=0.2)
    slow_start.set()  # the thread now logs in, after open() has given up
    for _ in range(100):
        await asyncio.sleep(0.05)
        if not _pkcs11._shared and _open_sessions(softhsm) == before:
            break
    assert not _pkcs11._shared
    assert _open_sessions(softhsm) == before
    monkeypatch.setattr(_pkcs11, "_acquire", real_acquire)
    signer = await open_pkcs11("signer-a")  # and the token opens normally after
    await assert_signs(signer)
    await signer.aclose()


@needs_softhsm
@pytest.mark.asyncio
async def test_pkcs11_signers_sign_again_once_the_token_dropped_their_session(
    softhsm: str,
) -> None:
    """An HSM restarting (or a network HSM failing over) drops every session, and the
    login with them. Before, the signers kept the dead session: every signature, and every
    later open on that token in this process, failed until the process restarted."""
    import ctypes

    from agentauth.keys._pkcs11 import _shared

    assert not _shared, "a signer from another test is still open"
    before = _open_sessions(softhsm)
    a = await open_pkcs11("signer-a")
    a_again = await open_pkcs11("signer-a", kid="hsm-a")
    await assert_signs(a)
    dropped = _shared[(SOFTHSM_LIB, softhsm)]
    # What a restart does to this process, short of restarting the token: the session's
    # handle is gone, and with the last session the login.
    handle = ctypes.c_ulong(dropped.session.handle)  # type: ignore[attr-defined]
    assert ctypes.CDLL(SOFTHSM_LIB).C_CloseSession(handle) == 0
    # The first call to find out logs in afresh, on a new session; the other signers on
    # the dropped session move to that one at their next call, and opens join it.
    await assert_signs(a)
    await assert_signs(a_again)
    b = await open_pkcs11("signer-b")
    await assert_signs(b)
    entry = _shared[(SOFTHSM_LIB, softhsm)]
    assert entry is not dropped and entry.users == 3
    assert _open_sessions(softhsm) == before + 1
    for signer in (a, a_again, b):
        await signer.aclose()
    assert not _shared
    assert _open_sessions(softhsm) == before


@needs_softhsm
@pytest.mark.asyncio
async def test_pkcs11_a_signer_finding_another_key_under_its_label_refuses(
    softhsm: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the token dropped its session, the signer finds its key again by label: a
    token that holds another key under that label now (re-provisioned) gets no signature
    made with it, under a kid that names the old key."""
    import ctypes

    from agentauth.keys._pkcs11 import _shared

    signer = await open_pkcs11("signer-a")
    before = _open_sessions(softhsm)
    handle = _shared[(SOFTHSM_LIB, softhsm)].session.handle  # type: ignore[attr-defined]
    assert ctypes.CDLL(SOFTHSM_LIB).C_CloseSession(ctypes.c_ulong(handle)) == 0
    # An open finds the dropped session and logs in on a new one.
    other = await open_pkcs11("signer-b")  # the same token, the other key's public half
    monkeypatch.setattr(signer, "_reopen", other._reopen)
    await assert_unavailable(signer, reason="bad_response", within=2.0)
    await assert_unavailable(signer, reason="bad_response", within=2.0)  # and again
    await assert_signs(other)
    await signer.aclose()
    await other.aclose()
    assert not _shared
    assert _open_sessions(softhsm) == before - 1


# -- KeyRing ---------------------------------------------------------------------------------


def record(kid: str, created_at: int = 0) -> KeyRecord:
    key = PrivateKey.generate(kid=kid)
    jwk = {k: v for k, v in key.public_jwk().items() if k in ("kty", "crv", "x", "y")}
    return KeyRecord(kid, jwk, "ES256", created_at=created_at, activates_at=created_at)


def kids(ring: KeyRing, now: int) -> list[str]:
    return [jwk["kid"] for jwk in ring.published(now)]


def test_keyring_rotation_timeline() -> None:
    publish_ahead, lifetime = 3600, 900
    ring = KeyRing([record("A", created_at=0)])
    assert kids(ring, 100) == ["A"]
    assert ring.signing_kid(100) == "A"

    t = 10_000
    ring = ring.rotate(
        record("B", created_at=t), now=t, publish_ahead=publish_ahead, max_token_lifetime=lifetime
    )
    activation = t + publish_ahead
    # B is published at once, before it signs anything.
    assert kids(ring, t) == ["A", "B"]
    assert ring.signing_kid(t) == "A"
    assert ring.signing_kid(activation - 1) == "A"
    # B takes over at activation; A stays published until its last token has expired.
    assert ring.signing_kid(activation) == "B"
    assert kids(ring, activation) == ["A", "B"]
    assert kids(ring, activation + lifetime - 1) == ["A", "B"]
    assert kids(ring, activation + lifetime) == ["B"]
    assert ring.signing_kid(activation + lifetime) == "B"

    # The JWKS a verifier fetches at any moment covers every token signed before it.
    for now in (t, activation - 1, activation, activation + lifetime - 1):
        jwks = KeySet.from_jwks({"keys": ring.published(now)})
        assert ring.signing_kid(now) in jwks
        assert all(jwks[kid].alg == "ES256" for kid in jwks)


def test_keyring_rotation_rules() -> None:
    with pytest.raises(SignerUnavailable, match="no signing key"):
        KeyRing().signing_kid(0)
    first = KeyRing().rotate(record("A"), now=50, publish_ahead=10, max_token_lifetime=60)
    with pytest.raises(SignerUnavailable):
        first.signing_kid(59)
    assert first.signing_kid(60) == "A"

    ring = KeyRing([record("A")]).rotate(
        record("B"), now=100, publish_ahead=10, max_token_lifetime=60
    )
    with pytest.raises(Conflict, match="pending"):
        ring.rotate(record("C"), now=105, publish_ahead=10, max_token_lifetime=60)
    with pytest.raises(Conflict, match="kid"):
        ring.rotate(record("A"), now=200, publish_ahead=10, max_token_lifetime=60)
    with pytest.raises(Conflict, match="duplicate"):
        KeyRing([record("A"), record("A")])
    # Retired keys are dropped at the next rotation.
    later = ring.rotate(record("C"), now=1000, publish_ahead=10, max_token_lifetime=60)
    assert [r.kid for r in later.records] == ["B", "C"]
    assert later.signing_kid(1009) == "B"
    assert later.signing_kid(1010) == "C"


@pytest.mark.asyncio
async def test_keyring_record_from_a_signer(tmp_path: Path) -> None:
    signer = LocalFileSigner.load_or_create(tmp_path / "k.pem", kid="registry-1")
    ring = KeyRing([KeyRecord.from_signer(signer, created_at=5)])
    assert ring.signing_kid(5) == "registry-1"
    jwks = KeySet.from_jwks({"keys": ring.published(5)})
    header = {"alg": signer.alg, "kid": signer.kid, "typ": TYP}
    data = signing_input(header, {"sub": "agent"})
    parsed = parse_compact(attach_signature(data, await signer.sign(data)), max_bytes=4096)
    assert check_signature(parsed, jwks, typ=TYP, error=InvalidToken) == "registry-1"


# --- Public keys from JWKs: one encoding per key, no keys without a secret ----------------------

# The eight points of edwards25519 whose order divides the cofactor 8, as libsodium's
# has_small_order lists them, each with both signs of x where that sign is x's own. A key
# made of one of them needs no private key: for the identity, R = identity and S = 0
# verify for every message.
ORDER_8_A = "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"
ORDER_8_B = "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"
SMALL_ORDER_ED25519 = [
    pytest.param("01" + "00" * 31, id="order-1-identity"),
    pytest.param("ec" + "ff" * 30 + "7f", id="order-2"),
    pytest.param("00" * 32, id="order-4"),
    pytest.param("00" * 31 + "80", id="order-4-other-sign"),
    pytest.param(ORDER_8_A, id="order-8-a"),
    pytest.param(ORDER_8_A[:-2] + "85", id="order-8-a-other-sign"),
    pytest.param(ORDER_8_B, id="order-8-b"),
    pytest.param(ORDER_8_B[:-2] + "fa", id="order-8-b-other-sign"),
    # x = 0 has no negative: RFC 8032 calls these encodings invalid, ref10 reads them as +0.
    pytest.param("01" + "00" * 30 + "80", id="identity-with-sign"),
    pytest.param("ec" + "ff" * 31, id="order-2-with-sign"),
    # y + p for y = 0 and y = 1, which fit in 255 bits.
    pytest.param("ed" + "ff" * 30 + "7f", id="order-4-y-plus-p"),
    pytest.param("ed" + "ff" * 31, id="order-4-y-plus-p-with-sign"),
    pytest.param("ee" + "ff" * 30 + "7f", id="identity-y-plus-p"),
    pytest.param("ee" + "ff" * 31, id="identity-y-plus-p-with-sign"),
]
ED25519_P = 2**255 - 19
P256_P = 2**256 - 2**224 + 2**192 + 2**96 - 1
P256_B = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B
# RFC 8037 appendix A: its Ed25519 public key, the key's thumbprint and a JWS it signed.
RFC8037_JWK = {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
RFC8037_THUMBPRINT = "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
RFC8037_JWS = (
    "eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc"
    ".hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg"
)


def ed25519_jwk(encoded: bytes) -> dict[str, str]:
    return {"kty": "OKP", "crv": "Ed25519", "x": b64url_encode(encoded)}


@pytest.mark.parametrize("hex_key", SMALL_ORDER_ED25519)
def test_small_order_ed25519_keys_are_refused(hex_key: str) -> None:
    with pytest.raises(InvalidRequest):
        PublicKey.from_jwk(ed25519_jwk(bytes.fromhex(hex_key)))


@pytest.mark.parametrize("sign", [0, 1 << 255], ids=["x-even", "x-odd"])
@pytest.mark.parametrize("y", range(19))
def test_non_canonical_ed25519_encodings_are_refused(y: int, sign: int) -> None:
    # Every y + p below 2^255: each would be a second thumbprint for the key y names.
    encoded = (ED25519_P + y + sign).to_bytes(32, "little")
    with pytest.raises(InvalidRequest, match="not a canonical"):
        PublicKey.from_jwk(ed25519_jwk(encoded))


def test_rfc8037_ed25519_key_is_accepted() -> None:
    key = PublicKey.from_jwk(RFC8037_JWK)
    assert key.alg == "Ed25519"
    assert key.thumbprint == RFC8037_THUMBPRINT
    header, payload, signature = RFC8037_JWS.split(".")
    assert key.verify(b64url_decode(signature), f"{header}.{payload}".encode())


def test_generated_ed25519_keys_are_accepted() -> None:
    for _ in range(200):
        private = PrivateKey.generate("Ed25519")
        key = PublicKey.from_jwk(private.public_jwk())
        assert key.thumbprint == private.thumbprint
        assert key.verify(private.sign(b"proof"), b"proof")


def _p256_point_with_small_x() -> tuple[int, int]:
    # x + p still fits in 32 bytes only for x < 2^256 - p (about 2^224): search upwards from 1.
    for x in range(1, 100):
        rhs = (x**3 - 3 * x + P256_B) % P256_P
        y = pow(rhs, (P256_P + 1) // 4, P256_P)  # p = 3 mod 4
        if y * y % P256_P == rhs:
            return x, y
    raise AssertionError("no point found")


def p256_jwk(x: int, y: int) -> dict[str, str]:
    return {
        "kty": "EC",
        "crv": "P-256",
        "x": b64url_encode(x.to_bytes(32, "big")),
        "y": b64url_encode(y.to_bytes(32, "big")),
    }


def test_p256_coordinates_must_be_field_elements() -> None:
    x, y = _p256_point_with_small_x()
    assert PublicKey.from_jwk(p256_jwk(x, y)).alg == "ES256"
    # OpenSSL would reduce x + p to x: the same key under a second thumbprint.
    for jwk in (p256_jwk(x + P256_P, y), p256_jwk(P256_P, y), p256_jwk(2**256 - 1, y)):
        with pytest.raises(InvalidRequest, match="x is not a P-256 field element"):
            PublicKey.from_jwk(jwk)
    for jwk in (p256_jwk(x, P256_P), p256_jwk(x, P256_P + 1), p256_jwk(x, 2**256 - 1)):
        with pytest.raises(InvalidRequest, match="y is not a P-256 field element"):
            PublicKey.from_jwk(jwk)


def test_generated_p256_keys_are_accepted() -> None:
    for _ in range(50):
        private = PrivateKey.generate("ES256")
        assert PublicKey.from_jwk(private.public_jwk()).thumbprint == private.thumbprint


@pytest.mark.asyncio
async def test_a_wedged_backend_does_not_starve_the_others() -> None:
    """Calls to a backend that never answers time out but keep their threads: they must use
    up that backend's threads only, not the pool every other backend (and every other
    to_thread call of the process) needs."""
    import asyncio
    import threading

    from agentauth.keys import SignerUnavailable
    from agentauth.keys._base import call_blocking

    release = threading.Event()
    try:
        for _ in range(12):  # more than Python's default pool has threads here
            with pytest.raises(SignerUnavailable):
                await call_blocking("wedged", "sign", 0.02, release.wait)
        assert await call_blocking("healthy", "sign", 2.0, lambda: 42) == 42
        assert await asyncio.wait_for(asyncio.to_thread(lambda: 7), 2.0) == 7
    finally:
        release.set()


@pytest.mark.asyncio
async def test_vault_redirects_are_not_followed(vault: FakeVault) -> None:
    """An https Vault (or a proxy in front of it) answering with a redirect to elsewhere
    must not get the token carried along: hvac's HTTP session re-sends X-Vault-Token on a
    redirect, even to plain http. (The redirect here goes from one loopback port to another.)"""
    import http.server
    import threading

    vault.create_key("registry")

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(307)
            self.send_header("Location", vault.url.rstrip("/") + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(SignerUnavailable):
            await VaultTransitSigner.open(
                "registry",
                url=f"http://127.0.0.1:{server.server_address[1]}",
                token=vault.token,
                timeout=SHORT,
            )
        assert vault.requests == []  # the token never reached the redirect's target
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.asyncio
async def test_a_loop_signing_through_a_backend_stops_when_cancelled_as_it_answers(
    vault: FakeVault, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The registry's checkpoint loop signs through the backend, and closing the registry
    cancels it. Cancelled in the loop turn the backend's answer came in, the signing call
    (``asyncio.wait_for`` on Python 3.11) returned the signature and swallowed the
    cancellation: the loop went on checkpointing for good, over a closed pool."""
    vault.create_key("registry", "ecdsa-p256")
    signer = await open_vault(vault, "registry")
    loop = asyncio.get_running_loop()
    run_in_executor = loop.run_in_executor

    def cancelled_as_it_answers(*args: Any) -> asyncio.Future[Any]:
        running = run_in_executor(*args)
        monkeypatch.undo()  # once
        # Ahead of the call's own callback: in the very turn its answer comes in.
        running.add_done_callback(lambda _: checkpointing.cancel())
        return running

    signed = 0

    async def checkpoint_loop() -> None:
        nonlocal signed
        while True:
            await signer.sign(b"a checkpoint")
            signed += 1
            await asyncio.sleep(0.01)

    monkeypatch.setattr(loop, "run_in_executor", cancelled_as_it_answers)
    checkpointing = asyncio.ensure_future(checkpoint_loop())
    try:
        await asyncio.wait((checkpointing,), timeout=2.0)
        assert checkpointing.cancelled(), f"still signing after {signed} signatures"
        assert signed == 0
    finally:
        checkpointing.cancel()
        await asyncio.wait((checkpointing,), timeout=2.0)
        await signer.aclose()


@pytest.mark.asyncio
async def test_the_client_librarys_timeout_and_the_outer_bound_are_one_outage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A backend that stops answering ends a call by the client library's own timeout or by
    call_blocking's bound, whichever fires first (both are set to the same value): either
    way one outage, said once. Until 2026-11-30 they were said under two throttle keys, so
    a slow backend logged two warnings in a row, one per kind."""
    from agentauth.keys._base import call_blocking

    class Timeout(Exception):  # as requests names its timeout (hvac, Cloud KMS)
        pass

    def library_timed_out() -> None:
        raise Timeout("Read timed out. (read timeout=0.05)")

    release = threading.Event()
    try:
        with caplog.at_level("WARNING", logger="agentauth.keys"):
            for fn in (library_timed_out, release.wait, library_timed_out):
                with pytest.raises(SignerUnavailable) as raised:
                    await call_blocking("one-outage", "sign", 0.05, fn)
                assert raised.value.reason == "timeout"
    finally:
        release.set()
    said = [r.getMessage() for r in caplog.records if r.name == "agentauth.keys"]
    assert said == ["one-outage sign timed out after 0.05s"], said


@pytest.mark.asyncio
@pytest.mark.parametrize("fault", ["stopped", "slow", "lying"])
async def test_a_backend_outage_is_said_at_once_then_every_30_s_with_a_count(
    vault: FakeVault,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    fault: str,
) -> None:
    """Every signing call fails while the backend is down (every token request, every
    checkpoint round): the log says so once, not once per call, and then every 30 s with
    the number of failures it held back."""
    import types

    from agentauth import _logs

    vault.create_key("registry")
    # SHORT only where the fault is slowness: a refused connection is said as such, and on a
    # loaded machine a refused call past SHORT was said as a timeout too (a second kind).
    signer = await open_vault(vault, "registry", timeout=SHORT if fault == "slow" else 2.0)
    if fault == "stopped":
        vault.stop()
    elif fault == "slow":
        vault.delay = 5.0
    else:
        vault.wrong_signatures = True

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "agentauth.keys"]

    with caplog.at_level("WARNING", logger="agentauth.keys"):
        for _ in range(3):
            with pytest.raises(SignerUnavailable):
                await signer.sign(b"payload")
        assert len(lines()) == 1, lines()
        assert "Vault Transit" in lines()[0]
        # 31 s later (for the throttle only), the next failure is said, with the count.
        later = types.SimpleNamespace(monotonic=lambda: time.monotonic() + 31)
        monkeypatch.setattr(_logs, "time", later)
        with pytest.raises(SignerUnavailable):
            await signer.sign(b"payload")
        assert len(lines()) == 2, lines()
        assert lines()[1].startswith(lines()[0].split(":")[0])
        assert "(and 2 more like it since the last such line)" in lines()[1]
    vault.delay = 0.0
    await signer.aclose()
