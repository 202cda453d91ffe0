"""Durable state: PostgreSQL (asyncpg) with its migrations, Redis, and embedded defaults."""

from ._embedded import EmbeddedPostgres, EmbeddedRedis
from ._migrate import Conn, Migration, MigrationError, default_migrations_dir, discover, migrate

__all__ = [
    "Conn",
    "EmbeddedPostgres",
    "EmbeddedRedis",
    "Migration",
    "MigrationError",
    "default_migrations_dir",
    "discover",
    "migrate",
]
