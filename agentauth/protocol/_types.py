"""Small validated value types shared by capabilities, envelopes and grants."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any
from urllib.parse import unquote_to_bytes

from pydantic import AfterValidator, BeforeValidator, Field, PlainSerializer, WithJsonSchema
from pydantic_core import PydanticCustomError

__all__ = ["Amount", "Currency", "Identifier", "ResourceName", "ResourcePattern", "format_amount"]

# Money is exact: decimals travel as strings, never floats. 12 integer digits and 6 after the
# point cover every ISO 4217 currency and most tokens' smallest units without overflow
# games. (Python patterns here are used with fullmatch: "$" alone accepts a trailing "\n".)
_AMOUNT_RE = re.compile(r"^(0|[1-9][0-9]{0,11})(\.[0-9]{1,6})?$")


def _parse_amount(value: Any) -> Decimal:
    # Only strings (and Decimals from Python callers): JSON numbers are refused, so 50, 50.0
    # and true can never stand for "50" (a verifier's parse memo relies on this).
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError("amount must be finite")
        value = format(value, "f")
    if not isinstance(value, str) or not _AMOUNT_RE.fullmatch(value):
        raise ValueError("amount must be a decimal string such as '50' or '12.99'")
    try:
        return Decimal(value)
    except InvalidOperation:  # pragma: no cover - the regex admits only valid decimals
        raise ValueError("amount is not a decimal") from None


def format_amount(value: Decimal) -> str:
    """The one textual form of an amount: no exponent, no trailing zeros ('50', '12.5')."""
    return format(value.normalize(), "f")


Amount = Annotated[
    Decimal,
    BeforeValidator(_parse_amount),
    PlainSerializer(format_amount, return_type=str),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": _AMOUNT_RE.pattern,
            "description": "A non-negative decimal amount as a string.",
        }
    ),
]

Currency = Annotated[
    str, Field(pattern=r"^[A-Z]{3}$", description="ISO 4217 alphabetic code, e.g. USD.")
]

# A resource is a '/'-separated path of segments; a pattern may end in '/*' (everything under
# the prefix) or be '*' (everything). Wildcards elsewhere are refused, so matching is a
# string comparison and a subset check is a prefix check.
#
# That is only sound if a name means the same path to every reader: 'calendar/../payments'
# is under 'calendar/' as a string but is 'payments' to a provider, proxy or URL library
# that resolves it. So a segment made only of dots is refused, and so is every escape a
# decoder could turn into one or into a separator: '%' may only spell, in uppercase hex, a
# byte other than an unreserved character (RFC 3986 §2.3: letters, digits and '-._~', never
# escaped), '/', '\', '%' itself (so decoding twice changes nothing) or a control byte.
#
# And a path has one name: a character allowed as itself (the literals below, ':@+=,' too)
# is never escaped, so 'a%3Ab' is refused rather than being a second name of 'a:b' that a
# grant on 'a:b' would not match; and the bytes of escapes above 7F must be well-formed
# UTF-8 (RFC 3629: no stray or missing continuation byte, no overlong form, no surrogate,
# nothing past U+10FFFF), so every name decodes to exactly one text and back. That is what
# urllib.parse.quote(segment, safe=":@+=,") writes for a str segment. '%20' and '%C3%A9'
# pass; '%2E', '%2f', '%5C', '%25', '%00', '%3A', '%FF' and '%C0%AF' do not.
_LITERAL = r"[A-Za-z0-9._~:@+=,-]"
# By first hex digit: 20-2A but 25; 3B 3C 3E 3F; 5B 5D 5E; 60; 7B-7D.
_ASCII_ESCAPE = r"%(?:2[0-46-9A]|3[BCEF]|5[BDE]|60|7[B-D])"
_TAIL = r"%[89AB][0-9A-F]"  # a continuation byte, 80-BF
_UTF8_ESCAPE = (
    rf"%(?:C[2-9A-F]|D[0-9A-F]){_TAIL}"
    rf"|%E0%[AB][0-9A-F]{_TAIL}|%E[1-9A-CEF]{_TAIL}{_TAIL}|%ED%[89][0-9A-F]{_TAIL}"
    rf"|%F0%[9AB][0-9A-F]{_TAIL}{_TAIL}|%F[1-3]{_TAIL}{_TAIL}{_TAIL}|%F4%8[0-9A-F]{_TAIL}{_TAIL}"
)
_ESCAPE = rf"(?:{_ASCII_ESCAPE}|{_UTF8_ESCAPE})"
_SEGMENT = rf"\.*(?:[A-Za-z0-9_~:@+=,-]|{_ESCAPE})(?:{_LITERAL}|{_ESCAPE})*"
RESOURCE_RE = re.compile(rf"^{_SEGMENT}(/{_SEGMENT})*$")
PATTERN_RE = re.compile(rf"^(\*|{_SEGMENT}(/{_SEGMENT})*(/\*)?)$")

_LITERALS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._~:@+=,-")
_HEX = frozenset("0123456789ABCDEF")


def _why_not(name: str) -> str:
    """Why ``name`` is not a resource name (a pattern's ``*`` taken off): the rule it breaks,
    for the person or program that wrote it. The regex decides; this only explains."""
    for segment in name.split("/"):
        if not segment:
            return "a segment is empty ('a//b', a leading or a trailing '/')"
        if not segment.strip("."):
            return f"the segment {segment!r} is made of dots only: it names another path"
        for index, char in enumerate(segment):
            if char == "%":
                digits = segment[index + 1 : index + 3]
                if len(digits) < 2 or not set(digits) <= _HEX:
                    return f"{segment[index : index + 3]!r} is not '%' and two uppercase hex digits"
                byte = chr(int(digits, 16))
                if byte in _LITERALS:
                    return f"'%{digits}' is a second name of {byte!r}, which is written as itself"
                if byte < " " or byte in "/\\%\x7f":
                    return f"'%{digits}' escapes a separator, '%' or a control byte"
            elif char not in _LITERALS:
                return (
                    f"{char!r} must be percent-escaped, as"
                    " urllib.parse.quote(segment, safe=':@+=,') writes it"
                )
    # What is left is the bytes escapes spell above 7F: ASCII ends any run of them, so the
    # name is well-formed UTF-8 exactly when each run is.
    try:
        unquote_to_bytes(name).decode("utf-8")
    except UnicodeDecodeError:
        return "escapes above '%7F' must spell well-formed UTF-8"
    return "not a resource name"


def _resource_name(value: str) -> str:
    if not RESOURCE_RE.fullmatch(value):
        raise PydanticCustomError("resource_name", "{why}", {"why": _why_not(value)})
    return value


def _resource_pattern(value: str) -> str:
    if not PATTERN_RE.fullmatch(value):
        name = value.removesuffix("/*") if value != "*" else value
        why = "'*' stands only alone or as the last segment" if "*" in name else _why_not(name)
        raise PydanticCustomError("resource_pattern", "{why}", {"why": why})
    return value


# The regexes decide (and are the JSON schema's patterns); a refusal says which rule broke,
# not the regex, so that a provider or agent can tell a second spelling from a typo.
ResourceName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=512,
        description="A concrete resource path such as 'calendar/events/42'.",
        json_schema_extra={"pattern": RESOURCE_RE.pattern},
    ),
    AfterValidator(_resource_name),
]
ResourcePattern = Annotated[
    str,
    Field(
        min_length=1,
        max_length=512,
        description="'calendar' (exactly), 'calendar/*' (everything under it) or '*'.",
        json_schema_extra={"pattern": PATTERN_RE.pattern},
    ),
    AfterValidator(_resource_pattern),
]
IDENTIFIER_PATTERN = r"^[A-Za-z0-9._:@-]+$"
IDENTIFIER_MAX_LENGTH = 128
_IDENTIFIER = re.compile(IDENTIFIER_PATTERN)


def is_identifier(text: str) -> bool:
    """Could ``text`` be an id (an :data:`Identifier`)? Lets a credential check refuse an
    id that cannot exist without asking the database (which refuses a NUL byte loudly)."""
    return len(text) <= IDENTIFIER_MAX_LENGTH and _IDENTIFIER.fullmatch(text) is not None


Identifier = Annotated[
    str,
    Field(
        min_length=1,
        max_length=IDENTIFIER_MAX_LENGTH,
        pattern=IDENTIFIER_PATTERN,
        description="An identifier: letters, digits and . _ : @ -",
    ),
]
