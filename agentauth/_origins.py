"""Origins and RP IDs as WebAuthn compares them, for the settings that name them.

A browser puts the page's serialized origin in every ceremony's client data (HTML's origin
serialization: lower-case scheme and host, an internationalized name in its ASCII form, no
default port, no path), and the registry and the approval page compare it with their
configured origins as strings. A configured ``https://Approve.example.com:443/`` or
``https://bücher.example`` names the same page but matches nothing, so every passkey
ceremony would fail with nothing to say why. Settings are normalized to that form here, and
what cannot be an origin, a plain-http origin no browser runs a ceremony on, or an RP ID
its origins cannot use, is refused at start.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

import idna

__all__ = ["check_issuer", "check_rp_id", "serialized_origin"]

_DEFAULT_PORTS = {"http": 80, "https": 443}
# A domain (or "localhost"): what WebAuthn accepts as an RP ID (no scheme, port or path).
_RP_ID = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")
# A host whose last label is a number is an IPv4 address (WHATWG URL, "ends in a number"),
# which WebAuthn never takes as an RP ID: a browser refuses every ceremony there
# (SecurityError, L3 §5.1.3: the effective domain must be a valid domain).
_IPV4_LAST_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")


def _ascii_domain(name: str) -> str:
    """``name`` as a browser writes it into an origin: an internationalized domain in its
    ASCII (punycode) form; ValueError if it is none. WHATWG URL's "domain to ASCII" is
    UTS #46 with non-transitional processing: Python's own "idna" codec is IDNA 2003,
    transitional, and turns ``faß.example`` into ``fass.example``, where browsers send
    ``xn--fa-hia.example``. Names already ASCII are left as they are (the strict IDNA 2008
    rules would refuse names browsers take, such as ``a_b.example``)."""
    if name.isascii():
        return name
    try:
        return idna.encode(name, uts46=True, transitional=False).decode("ascii")
    except idna.IDNAError as exc:
        raise ValueError(
            f"{name!r} is no internationalized domain name ({exc}); write it in ASCII (xn--) form"
        ) from None


def _potentially_trustworthy(scheme: str, host: str) -> bool:
    """Whether a browser counts the origin a secure context, which WebAuthn requires
    (W3C Secure Contexts, "potentially trustworthy origin": https, a loopback address, or
    localhost and names under it). Plain http to any other host runs no ceremony, and
    would carry the session cookie in the clear."""
    if scheme == "https":
        return True
    name = host.removesuffix(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv4Address):
        return address in ipaddress.IPv4Network("127.0.0.0/8")
    return address == ipaddress.IPv6Address("::1")


def serialized_origin(origin: str) -> str:
    """``origin`` as a browser serializes it; ValueError if it is not an origin at all."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        raise ValueError(f"{origin!r} is not an origin such as https://host[:port]") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"{origin!r} is not an origin such as https://host[:port]")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"an origin has no user name or password: {origin!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"an origin has no path, query or fragment: {origin!r}")
    host = parts.hostname  # lower-cased by urlsplit; IPv6 without its brackets
    if ":" in host:
        host = f"[{host}]"
    try:
        host = _ascii_domain(host)
    except ValueError as exc:
        raise ValueError(f"{origin!r} is not an origin: {exc}") from None
    if not _potentially_trustworthy(scheme, host):
        raise ValueError(
            f"origin {origin!r} is plain http: browsers run passkey ceremonies only on https"
            " origins, or on http://localhost and loopback addresses for development"
        )
    keep_port = port is not None and port != _DEFAULT_PORTS[scheme]
    return f"{scheme}://{host}{f':{port}' if keep_port else ''}"


def check_rp_id(rp_id: str, origins: tuple[str, ...]) -> str:
    """The RP ID, lower-cased and in ASCII form; ValueError unless every origin's host is it
    or under it (WebAuthn: an RP ID is the origin's host or a registrable suffix of it)."""
    try:
        normal = _ascii_domain(rp_id.strip()).lower()
    except ValueError as exc:
        raise ValueError(f"the RP ID is a domain such as example.com: {exc}") from None
    if not _RP_ID.fullmatch(normal):
        raise ValueError(f"the RP ID is a domain such as example.com, not {rp_id!r}")
    if _IPV4_LAST_LABEL.fullmatch(normal.rsplit(".", 1)[-1]):
        raise ValueError(f"the RP ID is a domain such as example.com, not an IP address: {rp_id!r}")
    for origin in origins:
        host = urlsplit(origin).hostname or ""
        if host != normal and not host.endswith("." + normal):
            raise ValueError(
                f"origin {origin} cannot run passkey ceremonies for RP ID {normal}: its host"
                " must be the RP ID or a name under it"
            )
    return normal


def check_issuer(issuer: str) -> str:
    """The registry's issuer URL (every token's ``iss``, compared as a string, and the base
    of the URLs agents sign proofs for), refused at start when it cannot be one: a missing
    scheme, a query or fragment, whitespace anywhere (a trailing newline from a secret
    file). Each of those was taken, and every token request refused later as a bad ``htu``,
    with nothing naming the setting."""
    parts = urlsplit(issuer)
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.query
        or parts.fragment
        or "?" in issuer
        or "#" in issuer
        or any(char.isspace() or not char.isprintable() for char in issuer)
    ):
        raise ValueError(
            "the issuer is an absolute http(s) URL with no query, fragment or spaces, such as"
            f" https://auth.example.com/registry, not {issuer!r}"
        )
    return issuer
