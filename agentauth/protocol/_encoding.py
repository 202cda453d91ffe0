"""Byte-level encodings: base64url, strict JSON parsing, RFC 8785 canonical JSON.

One canonical encoding serves every hashed or signed document (grants, audit events,
checkpoints), so two parties that agree on a document agree on its bytes.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ._errors import InvalidRequest

__all__ = ["b64url_decode", "b64url_encode", "canonical_json", "strict_json_loads"]

# The largest integer an IEEE double holds exactly; RFC 8785 numbers beyond it are not portable.
_MAX_SAFE_INT = 2**53 - 1
# Nesting of objects and arrays that canonical_json accepts. AgentAuth's documents nest a
# few levels; the bound keeps the recursive walk (two frames a level) far below Python's
# recursion limit, so hostile nesting (strict_json_loads parses nearly 1,000 levels) is refused like
# any other non-canonical input instead of escaping every handler as a RecursionError.
_MAX_DEPTH = 64


def b64url_encode(data: bytes) -> str:
    """Base64url without padding (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


# To the standard alphabet; '+', '/' and '=' (valid there, not here) become '!', which the
# strict decoder refuses, so one pass both translates and screens the input.
_TO_STANDARD = bytes.maketrans(b"-_+/=", b"+/!!!")
_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
# For an unpadded length of 2 or 3 mod 4, the last character carries 4 or 2 spare bits.
_SPARE_BITS_MASK = {2: 0x0F, 3: 0x03}


def b64url_decode(text: str | bytes) -> bytes:
    """Decode unpadded base64url; rejects padding, other alphabets and non-canonical tails.

    Non-canonical encodings (spare bits set in the last character) are refused so that one
    byte string has exactly one textual form: a token cannot be varied without changing it.
    """
    try:
        raw = text.encode("ascii") if isinstance(text, str) else bytes(text)
    except UnicodeEncodeError:
        raise InvalidRequest("malformed base64url") from None
    tail = len(raw) % 4
    if tail == 1:
        raise InvalidRequest("malformed base64url")
    if tail and _ALPHABET.find(raw[-1:]) & _SPARE_BITS_MASK[tail]:
        raise InvalidRequest("non-canonical base64url")
    try:
        # strict_mode refuses characters outside the alphabet and misplaced padding.
        return binascii.a2b_base64(
            raw.translate(_TO_STANDARD) + b"=" * (-len(raw) % 4), strict_mode=True
        )
    except (binascii.Error, ValueError):
        raise InvalidRequest("malformed base64url") from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise InvalidRequest("duplicate JSON member")
    return result


def _no_constants(name: str) -> Any:
    raise InvalidRequest(f"JSON constant {name} is not allowed")


def _finite_float(text: str) -> float:
    # 1e400 overflows to infinity: the same value NaN/Infinity would spell, refused alike.
    value = float(text)
    if math.isinf(value):
        raise InvalidRequest("JSON number out of range")
    return value


_STRICT_DECODER = json.JSONDecoder(
    object_pairs_hook=_no_duplicates, parse_constant=_no_constants, parse_float=_finite_float
)
# A lone surrogate in a parsed string can only come from a \uD800-\uDFFF escape: raw ones
# are not UTF-8, so decoding bytes refuses them. Paired escapes match too and are let pass
# by the walk, which runs only when this finds a candidate.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _refuse_lone_surrogates(document: Any) -> None:
    stack = [document]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    raise InvalidRequest("strings may not hold unpaired surrogates") from None
        elif isinstance(value, dict):
            stack.extend(value)
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)


def strict_json_loads(data: bytes | str) -> Any:
    """Parse JSON refusing duplicate members, NaN/Infinity and numbers beyond them, strings
    with unpaired surrogates, invalid UTF-8 and trailing data.

    Unpaired surrogates (which I-JSON, RFC 7493 §2.1, also excludes) have no UTF-8 form, so
    a later ``.encode()``, hash or database write of the string would fail far from here:
    a 500, not a refusal. U+0000 is valid JSON and canonical documents may hold it; only
    storage objects to it, so BodyGuard screens request bodies for it.
    """
    try:
        if isinstance(data, bytes):
            text = data.decode("utf-8", "strict")
        else:
            text = data
            if not text.isascii():
                text.encode("utf-8", "strict")  # a raw lone surrogate is not Unicode text
        document = _STRICT_DECODER.decode(text)
    except InvalidRequest:
        raise
    except (UnicodeError, ValueError, RecursionError):
        raise InvalidRequest("malformed JSON") from None
    # Most documents (every token and proof the SDK makes) hold no backslash at all; a
    # one-character search is a memchr, so their cost does not grow.
    if "\\" in text and _SURROGATE_ESCAPE.search(text):
        _refuse_lone_surrogates(document)
    return document


def _utf16_key(key: str) -> bytes:
    # RFC 8785 §3.2.3 sorts member names by their UTF-16 code units.
    return key.encode("utf-16-be", "surrogatepass")


def _check(value: Any, depth: int = 0) -> Any:
    """Validate a document for canonical encoding and return it with members sorted."""
    kind = type(value)  # exact-type dispatch first: this runs for every value signed
    if kind is str:
        value.encode("utf-8", "strict")  # lone surrogates have no UTF-8 form
        return value
    if kind is dict:
        if depth >= _MAX_DEPTH:
            raise ValueError(f"nested deeper than {_MAX_DEPTH} levels")
        if not all(type(key) is str for key in value):
            raise ValueError("object member names must be strings")
        return {key: _check(value[key], depth + 1) for key in sorted(value, key=_utf16_key)}
    if kind is list or kind is tuple:
        if depth >= _MAX_DEPTH:
            raise ValueError(f"nested deeper than {_MAX_DEPTH} levels")
        return [_check(v, depth + 1) for v in value]
    if kind is int:
        if abs(value) > _MAX_SAFE_INT:
            raise ValueError("integer outside the IEEE 754 exact range")
        return value
    if value is None or kind is bool:
        return value
    if isinstance(value, float):
        # Documents carry decimals as strings: float formatting is where implementations
        # disagree, and money must be exact.
        raise ValueError("floats are not allowed in canonical documents")
    if isinstance(value, bytes | bytearray | memoryview):
        raise ValueError("bytes have no JSON form: encode them (base64url) first")
    # Subclasses and other containers take the general (slower) route.
    if isinstance(value, str):
        return _check(str(value), depth)
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return _check(int(value), depth)
    if isinstance(value, Mapping):
        return _check(dict(value), depth)
    if isinstance(value, Sequence):
        return _check(list(value), depth)
    raise ValueError(f"cannot encode {type(value).__name__} canonically")


def canonical_json(document: Any) -> bytes:
    """RFC 8785 (JCS) bytes of a document made of objects, arrays, strings, ints, bools, null."""
    try:
        ordered = _check(document)
    except UnicodeEncodeError:
        raise ValueError("strings must be valid Unicode") from None
    # With sorted members, no floats and ensure_ascii off, json.dumps emits exactly JCS:
    # minimal escapes (\" \\ \b \f \n \r \t, other controls as lowercase \u00xx).
    return json.dumps(ordered, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
