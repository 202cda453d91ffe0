"""Where archives live: a directory or an S3 bucket, behind three blocking methods.

Both stores make each ``put`` atomic (a reader sees the old object, the whole new one, or
nothing), which is what lets an interrupted export resume by rewriting at most one object.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, Protocol, TypeVar, runtime_checkable

from ._errors import ArchiveUnavailable

__all__ = ["ArchiveStore", "DirectoryStore", "S3Store", "open_store"]

_T = TypeVar("_T")
# Keys are relative, '/'-separated, and no component is empty, '.', '..' or hidden (temporary
# files start with a dot), so a key can never name a path outside the store.
_KEY = re.compile(r"^[A-Za-z0-9_:@-][A-Za-z0-9._:@-]*(/[A-Za-z0-9_:@-][A-Za-z0-9._:@-]*)*$")
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
# Every component below the root is opened with O_NOFOLLOW (see DirectoryStore).
_DIR_NOFOLLOW = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC
_FILE_NOFOLLOW = os.O_RDONLY | os.O_NOFOLLOW | _CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _CLOEXEC
#: Connect and read timeout for S3 calls, seconds: an export is a batch job and can wait out
#: a slow object store, but must not hang forever on a dead one.
S3_TIMEOUT = 60.0
#: Largest object a store reads or writes, bytes. Objects are read whole, so without a bound
#: anyone who can write the bucket could plant one that exhausts the reader's memory. A
#: segment at the registry's default 1000 events a checkpoint is about a megabyte; this
#: leaves room for coarse ``--min-events`` segments and large events, and a store writes
#: nothing it would refuse to read back.
MAX_OBJECT_BYTES = 256 * 1024 * 1024


def _raise(error: OSError) -> NoReturn:
    raise error


def _check_bound(max_object_bytes: int) -> int:
    if max_object_bytes < 1:
        raise ValueError("max_object_bytes must be at least 1")
    return max_object_bytes


def _fits(key: str, size: int, bound: int) -> None:
    if size > bound:
        raise ArchiveUnavailable(
            f"archive object {key} is larger than the {bound} bytes this store reads or"
            " writes (max_object_bytes)"
        )


def _read_bounded(key: str, size: int, read: Callable[[int], bytes], bound: int) -> bytes:
    """The object's bytes, refused unread if its stated ``size`` is over ``bound``, and
    read at most one byte past it: the size is the file's or the server's word at one
    moment, not a limit on what the read returns."""
    _fits(key, size, bound)
    data = read(bound + 1)
    _fits(key, len(data), bound)
    return data


def _check_key(key: str) -> str:
    if not _KEY.fullmatch(key):
        raise ValueError(f"not an archive key: {key!r}")
    return key


@runtime_checkable
class ArchiveStore(Protocol):
    """An object store with atomic whole-object writes; keys are ``a/b/c`` paths."""

    def get(self, key: str) -> bytes | None:
        """The object's bytes, or ``None`` if there is no such object. The stores here
        refuse an object larger than their ``max_object_bytes`` instead of reading it."""
        ...

    def put(self, key: str, data: bytes) -> None:
        """Create or replace the object, atomically."""
        ...

    def list(self, prefix: str = "") -> Sequence[str]:
        """Every key starting with ``prefix``, sorted."""
        ...


class DirectoryStore:
    """An archive in a local (or shared, e.g. NFS) directory.

    A put writes a hidden temporary file in the target directory, flushes it to disk, then
    renames it over the key (``os.replace`` is atomic within a file system) and flushes the
    directory, so a crash leaves either the old object or the new one, never a torn file.

    Nothing under the root is reached through a symbolic link: each directory of a key is
    opened relative to the one before with ``O_NOFOLLOW``, and so is the object itself, so
    a link planted in the archive (a segment pointing at ``/etc/...``, a chain directory
    pointing elsewhere) cannot redirect a read or a write; it is refused, named. The root
    itself may be a link: the operator chose it.

    An object larger than ``max_object_bytes`` is refused (``ArchiveUnavailable``), on
    reads and writes alike.
    """

    def __init__(
        self, root: str | os.PathLike[str], *, max_object_bytes: int = MAX_OBJECT_BYTES
    ) -> None:
        self.root = Path(root)
        self.max_object_bytes = _check_bound(max_object_bytes)

    def __repr__(self) -> str:
        return f"DirectoryStore({str(self.root)!r})"

    def _io(self, what: str, fn: Callable[[], _T]) -> _T:
        try:
            return fn()
        except OSError as exc:
            raise ArchiveUnavailable(
                f"archive directory {what} failed ({type(exc).__name__}: {exc.strerror})"
            ) from exc

    def _refuse_link(self, path: str, directory: int) -> None:
        """Raise if ``path``'s last component, under the descriptor ``directory``, is a
        symbolic link."""
        try:
            mode = os.stat(path.rsplit("/", 1)[-1], dir_fd=directory, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(mode.st_mode):
            raise ArchiveUnavailable(
                f"archive path {self.root / path} is a symbolic link, which the archive does"
                " not follow; remove it (or point the archive at the real directory)"
            )

    def _open_parent(self, key: str, *, create: bool) -> int:
        """A descriptor of the directory holding ``key``, reached without following links."""
        directory = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
        try:
            parts = key.split("/")[:-1]
            for depth, part in enumerate(parts, 1):
                if create:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, dir_fd=directory)
                try:
                    inner = os.open(part, _DIR_NOFOLLOW, dir_fd=directory)
                except OSError as exc:
                    # Linux says ENOTDIR for a link opened O_DIRECTORY | O_NOFOLLOW.
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        self._refuse_link("/".join(parts[:depth]), directory)
                    raise
                os.close(directory)
                directory = inner
        except BaseException:
            os.close(directory)
            raise
        return directory

    def get(self, key: str) -> bytes | None:
        _check_key(key)
        name = key.rsplit("/", 1)[-1]

        def read() -> bytes | None:
            try:
                directory = self._open_parent(key, create=False)
            except FileNotFoundError:
                return None
            try:
                try:
                    # O_NONBLOCK: a FIFO planted at the key must not hang the open; a
                    # regular file ignores it.
                    fd = os.open(name, _FILE_NOFOLLOW | os.O_NONBLOCK, dir_fd=directory)
                except FileNotFoundError:
                    return None
                except OSError as exc:
                    if exc.errno == errno.ELOOP:
                        self._refuse_link(key, directory)
                    raise
            finally:
                os.close(directory)
            with os.fdopen(fd, "rb") as file:
                status = os.fstat(file.fileno())
                if not stat.S_ISREG(status.st_mode):
                    raise ArchiveUnavailable(f"archive key {key} is not a regular file")
                # Someone else may append to the file after the fstat: the read is bounded.
                return _read_bounded(key, status.st_size, file.read, self.max_object_bytes)

        return self._io("read", read)

    def put(self, key: str, data: bytes) -> None:
        _check_key(key)
        _fits(key, len(data), self.max_object_bytes)
        self._io("write", lambda: self._write(key, data))

    def _write(self, key: str, data: bytes) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        name = key.rsplit("/", 1)[-1]
        directory = self._open_parent(key, create=True)
        try:
            # rename() would replace a link at the key rather than write through it, but a
            # link there was planted by someone: say so instead of quietly removing it.
            self._refuse_link(key, directory)
            temp = f".{name}.{secrets.token_hex(6)}.tmp"
            fd = os.open(temp, _NEW_FILE, 0o666, dir_fd=directory)
            try:
                with os.fdopen(fd, "wb") as file:
                    file.write(data)
                    file.flush()
                    os.fsync(file.fileno())
                os.replace(temp, name, src_dir_fd=directory, dst_dir_fd=directory)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp, dir_fd=directory)
                raise
            os.fsync(directory)  # the rename itself survives a power cut
        finally:
            os.close(directory)

    def list(self, prefix: str = "") -> Sequence[str]:
        def walk() -> list[str]:
            if not self.root.is_dir():
                return []
            keys = []
            # os.walk does not descend into linked directories; a linked file is listed,
            # and refused by get, so the archive's verification names it. Without onerror
            # it skips a directory it cannot read without a word: a chain (or the whole
            # archive) unread read as absent, so verify passed without it and export began
            # it again from genesis.
            for directory, subdirs, files in os.walk(self.root, onerror=_raise):
                subdirs[:] = [d for d in subdirs if not d.startswith(".")]
                base = Path(directory).relative_to(self.root).as_posix()
                for name in files:
                    if name.startswith("."):  # a temporary file, or not ours
                        continue
                    key = name if base == "." else f"{base}/{name}"
                    if key.startswith(prefix):
                        keys.append(key)
            return sorted(keys)

        return self._io("listing", walk)

    def close(self) -> None:
        """Nothing to release; here so either store can be closed alike."""


class S3Store:
    """An archive under ``prefix`` in an S3 bucket (or any S3-compatible store).

    ``client`` is a boto3 S3 client (boto3 clients are thread-safe). A PUT is atomic per
    object in S3. Every client failure becomes ``ArchiveUnavailable``, and so does an object
    larger than ``max_object_bytes`` (judged by its Content-Length before the body is read).
    """

    def __init__(
        self,
        *,
        bucket: str,
        prefix: str = "",
        client: Any,
        max_object_bytes: int = MAX_OBJECT_BYTES,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._client = client
        self.max_object_bytes = _check_bound(max_object_bytes)

    @classmethod
    def connect(
        cls,
        *,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region_name: str | None = None,
        session: Any = None,
        timeout: float = S3_TIMEOUT,
        max_object_bytes: int = MAX_OBJECT_BYTES,
    ) -> S3Store:
        """A store with its own client; ``session`` is a ``boto3.session.Session`` (default:
        a new one, which finds credentials, region and ``AWS_ENDPOINT_URL_S3`` the usual way)."""
        # Imported here so the package imports without the server extras; boto3 and
        # botocore ship no type hints.
        import boto3  # type: ignore[import-untyped, unused-ignore]  # noqa: PLC0415
        from botocore.config import Config  # type: ignore[import-untyped, unused-ignore]  # noqa: PLC0415

        config = Config(
            connect_timeout=timeout,
            read_timeout=timeout,
            retries={"mode": "standard", "total_max_attempts": 3},
        )
        client = (session or boto3.session.Session()).client(
            "s3", endpoint_url=endpoint_url, region_name=region_name, config=config
        )
        return cls(bucket=bucket, prefix=prefix, client=client, max_object_bytes=max_object_bytes)

    def __repr__(self) -> str:
        return f"S3Store('s3://{self.bucket}/{self.prefix}')"

    def _full(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, what: str, fn: Callable[[], _T]) -> _T:
        try:
            return fn()
        except ArchiveUnavailable:
            raise  # already says what is wrong
        except Exception as exc:
            raise ArchiveUnavailable(
                f"S3 {what} in bucket {self.bucket} failed ({type(exc).__name__})"
            ) from exc

    def get(self, key: str) -> bytes | None:
        full = self._full(_check_key(key))

        def read() -> bytes | None:
            try:
                response = self._client.get_object(Bucket=self.bucket, Key=full)
            except self._client.exceptions.NoSuchKey:
                return None
            stream = response["Body"]
            try:
                size = int(response.get("ContentLength") or 0)
                return _read_bounded(key, size, stream.read, self.max_object_bytes)
            finally:
                stream.close()

        return self._call("get", read)

    def put(self, key: str, data: bytes) -> None:
        full = self._full(_check_key(key))
        _fits(key, len(data), self.max_object_bytes)
        self._call("put", lambda: self._client.put_object(Bucket=self.bucket, Key=full, Body=data))

    def list(self, prefix: str = "") -> Sequence[str]:
        start = self._full(prefix) if prefix else (f"{self.prefix}/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0

        def walk() -> list[str]:
            keys: list[str] = []
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=start
            )
            for page in pages:
                keys.extend(item["Key"][strip:] for item in page.get("Contents", ()))
            return sorted(keys)

        return self._call("list", walk)

    def close(self) -> None:
        self._client.close()


def open_store(
    location: str, *, endpoint_url: str | None = None, session: Any = None
) -> DirectoryStore | S3Store:
    """``s3://bucket/prefix`` is an ``S3Store``; anything else is a directory path."""
    if location.startswith("s3://"):
        bucket, _, prefix = location.removeprefix("s3://").partition("/")
        if not bucket:
            raise ValueError("an S3 archive location is s3://bucket[/prefix]")
        return S3Store.connect(
            bucket=bucket, prefix=prefix, endpoint_url=endpoint_url, session=session
        )
    return DirectoryStore(location)
