"""Database and Redis URLs, checked before a driver parses them."""

from __future__ import annotations

from urllib.parse import urlsplit

__all__ = ["checked_url"]


def checked_url(url: str) -> str:
    """``url``, if its port (when it names one) is a port; else ValueError, without it.

    An unescaped ``/``, ``?`` or ``#`` in the password ends the URL's authority inside the
    password, and asyncpg's and redis-py's parsers then refuse a "port" that is the
    password's first part, quoting it: into a replica's start-up error and so the
    cluster's logs, or a scheduled job's. Refused here, the error names no part of it.
    """
    try:
        urlsplit(url).port  # noqa: B018 - parsing it is the check
    except ValueError:
        raise ValueError(
            "not a valid URL (percent-encode any @, :, /, ? or # in the password)"
        ) from None
    return url
