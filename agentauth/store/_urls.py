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
    refused = ValueError("not a valid URL (percent-encode any @, :, /, ? or # in the password)")
    try:
        urlsplit(url).port  # noqa: B018 - parsing it is the check
    except ValueError:
        raise refused from None
    # A password that starts with digits passes as a port ('u:1234/rest@host'), and the
    # driver then names that "host:port" in its connection errors. An '@' after the
    # authority's end is the rest of such a user part: no database or Redis URL needs one.
    _, slashes, rest = url.partition("//")
    ends = [i for i in (rest.find(c) for c in "/?#") if i >= 0]
    if slashes and ends and "@" in rest[min(ends) :]:
        raise refused
    return url
