"""Durable state: PostgreSQL (asyncpg) with its migrations, Redis, and embedded defaults."""

from ._chains import STORED_CHAINS
from ._embedded import EmbeddedPostgres, EmbeddedRedis, EmbeddedServerError
from ._migrate import Conn, Migration, MigrationError, default_migrations_dir, discover, migrate
from ._names import GRANT_REVOKED_TTL, REVOCATION_CHANNEL, grant_cache_key
from ._urls import checked_url

__all__ = [
    "GRANT_REVOKED_TTL",
    "REVOCATION_CHANNEL",
    "STORED_CHAINS",
    "Conn",
    "EmbeddedPostgres",
    "EmbeddedRedis",
    "EmbeddedServerError",
    "Migration",
    "MigrationError",
    "checked_url",
    "default_migrations_dir",
    "discover",
    "grant_cache_key",
    "migrate",
]
