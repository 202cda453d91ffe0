"""Small validated value types shared by capabilities, envelopes and grants."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, PlainSerializer, WithJsonSchema

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
# urllib.parse.quote writes escapes of this form. '%20' and '%C3%A9' pass; '%2E', '%2f',
# '%5C', '%25' and '%00' do not.
_LITERAL = r"[A-Za-z0-9._~:@+=,-]"
# By first hex digit: 20-2C but 25; 3A-3F; 40; 5B 5D 5E; 60; 7B-7D; then 80-FF, UTF-8's.
_ESCAPE = r"%(?:2[0-46-9A-C]|3[A-F]|40|5[BDE]|60|7[B-D]|[89A-F][0-9A-F])"
_SEGMENT = rf"\.*(?:[A-Za-z0-9_~:@+=,-]|{_ESCAPE})(?:{_LITERAL}|{_ESCAPE})*"
RESOURCE_RE = re.compile(rf"^{_SEGMENT}(/{_SEGMENT})*$")
PATTERN_RE = re.compile(rf"^(\*|{_SEGMENT}(/{_SEGMENT})*(/\*)?)$")

ResourceName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=512,
        pattern=RESOURCE_RE.pattern,
        description="A concrete resource path such as 'calendar/events/42'.",
    ),
]
ResourcePattern = Annotated[
    str,
    Field(
        min_length=1,
        max_length=512,
        pattern=PATTERN_RE.pattern,
        description="'calendar' (exactly), 'calendar/*' (everything under it) or '*'.",
    ),
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
