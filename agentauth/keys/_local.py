"""A private key in a PEM file on local disk: the development and single-node signer."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

from agentauth.protocol import Algorithm, PrivateKey, PublicKey

from ._base import SignerUnavailable, public_key_with_kid

__all__ = ["LocalFileSigner"]

# O_NOFOLLOW: a symlink planted at the key path must not redirect reads or writes.
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
# O_NONBLOCK: opening a FIFO to read waits for a writer, forever if none comes (on the event
# loop, at start or at a kid's first request); with it the open returns and fstat refuses
# the FIFO. It changes nothing for a regular file.
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


class LocalFileSigner:
    """Signs with a PKCS#8 PEM private key read from (or created at) a file only we can read.

    The key is in this process's memory, so there is no remote answer to double-check:
    signatures come straight from ``cryptography``.
    """

    __slots__ = ("_key", "_path", "_public")

    def __init__(self, key: PrivateKey, *, path: Path, public: PublicKey) -> None:
        self._key = key
        self._path = path
        self._public = public

    @classmethod
    def load_or_create(
        cls, path: Path, *, alg: Algorithm = "ES256", kid: str | None = None
    ) -> LocalFileSigner:
        """Load the key at ``path``, or create one (mode 0600, directory 0700) if none is there.

        ``alg`` only chooses the algorithm of a new key; an existing key of another
        algorithm is refused rather than silently used.
        """
        path = Path(path)
        try:
            try:
                pem = _read_private(path)
            except FileNotFoundError:
                pem = _create(path, alg)
        except OSError as exc:
            # ELOOP is O_NOFOLLOW refusing a symlink; EACCES, EISDIR... speak for themselves.
            raise SignerUnavailable(
                f"cannot use key file {path}: {exc.strerror or type(exc).__name__}",
                reason="bad_key_file",
            ) from exc
        try:
            loaded = load_pem_private_key(pem, password=None)
        except (ValueError, TypeError):
            raise SignerUnavailable(
                f"key file {path} is not an unencrypted PEM private key", reason="bad_key_file"
            ) from None
        if not isinstance(loaded, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
            raise SignerUnavailable(
                f"key file {path} holds neither a P-256 nor an Ed25519 key", reason="bad_key_file"
            )
        try:
            public = public_key_with_kid(loaded.public_key(), kid)
        except SignerUnavailable:
            raise SignerUnavailable(
                f"key file {path} holds neither a P-256 nor an Ed25519 key", reason="bad_key_file"
            ) from None
        if public.alg != alg:
            raise SignerUnavailable(
                f"key file {path} holds an {public.alg} key, not {alg}", reason="bad_key_file"
            )
        key = PrivateKey(loaded, kid=public.jwk["kid"])
        return cls(key, path=path, public=public)

    @classmethod
    def create_in(cls, directory: Path, *, alg: Algorithm = "ES256") -> LocalFileSigner:
        """A new key in ``directory``, in a file named after its kid (``<kid>.pem``, the
        RFC 7638 thumbprint), written as ``load_or_create`` writes one: the file has its
        final name from the moment it exists, so no rename can be lost in a crash."""
        key = PrivateKey.generate(alg)
        path = Path(directory) / f"{key.thumbprint}.pem"
        try:
            _write_new(path, _pem(key))
        except OSError as exc:
            raise SignerUnavailable(
                f"cannot use key file {path}: {exc.strerror or type(exc).__name__}",
                reason="bad_key_file",
            ) from exc
        return cls.load_or_create(path, alg=alg)

    @property
    def kid(self) -> str:
        return self._key.kid

    @property
    def alg(self) -> Algorithm:
        return self._key.alg

    @property
    def path(self) -> Path:
        return self._path

    def public_key(self) -> PublicKey:
        return self._public

    async def sign(self, data: bytes) -> bytes:
        # ~40 µs of CPU: cheaper inline than the hop to a worker thread.
        return self._key.sign(data)

    async def aclose(self) -> None:
        """Nothing to release; present for the ``AsyncSigner`` interface."""

    def __repr__(self) -> str:
        return f"LocalFileSigner(path={str(self._path)!r}, alg={self.alg!r}, kid={self.kid!r})"


def _read_private(path: Path) -> bytes:
    """The file's bytes, provided it is a regular file that group and others cannot touch,
    owned by this process's user or by root (as ssh requires of a private key)."""
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC | _NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        # fstat on the open descriptor: no window between the check and the read.
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise SignerUnavailable(f"key file {path} is not a regular file", reason="bad_key_file")
        owner = os.geteuid()
        # Another user who owns the file can rewrite the key, or chmod it readable, at will;
        # root can do so anyway, so a root-owned key is as safe as one of ours.
        if st.st_uid not in (owner, 0):
            raise SignerUnavailable(
                f"key file {path} is owned by uid {st.st_uid}, not by this process's user"
                f" (uid {owner}) or root, so that user can read or replace the key;"
                f" run: chown {owner} {path}",
                reason="insecure_key_file",
            )
        if st.st_mode & 0o077:
            raise SignerUnavailable(
                f"key file {path} is accessible by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}",
                reason="insecure_key_file",
            )
        return f.read()


def _create(path: Path, alg: Algorithm) -> bytes:
    """Write a new key at ``path``; see ``_write_new``."""
    return _write_new(path, _pem(PrivateKey.generate(alg)))


def _pem(key: PrivateKey) -> bytes:
    return key.crypto_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())


def _write_new(path: Path, pem: bytes) -> bytes:
    """Write ``pem`` so that no reader ever sees a partial file and no writer clobbers one;
    returns the bytes the path holds (another process's, if it won a race).

    The PEM goes to a private temporary file (O_EXCL, 0600) that is then hard-linked into
    place; ``link`` fails if the path exists, so of two racing processes one wins and the
    other loads the winner's key. The directory is synced after the link: the caller
    records the kid in PostgreSQL next, and a crash must not keep that record while losing
    the file's name (every replica would then refuse the kid, for good).
    """
    parent = path.parent
    if not parent.exists():
        parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(parent, 0o700)  # mkdir's mode is filtered through the umask
        _fsync_dir(parent.parent)
    tmp = parent / f".{path.name}.{os.getpid()}.{os.urandom(6).hex()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)  # a umask can only remove bits; this pins the mode
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return _read_private(path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _fsync_dir(parent)
    return pem


def _fsync_dir(directory: Path) -> None:
    """Make the directory's entries (a name just linked or made) survive a crash."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
