"""Grants and their canonical bytes: RFC 8785 cross-checked, strict parsing, hash, tightening.

``rfc8785`` is an independent JCS implementation; every canonical encoding here is compared
with it byte for byte.
"""

from __future__ import annotations

import hashlib
from decimal import Decimal
from typing import Any

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from agentauth.protocol import (
    GRANT_TYPE,
    Capability,
    Envelope,
    Forbidden,
    Grant,
    GrantRequest,
    InvalidRequest,
    Money,
    RateLimit,
    SpendLimit,
    TimeWindow,
    b64url_decode,
    b64url_encode,
    canonical_json,
    check_money,
    strict_json_loads,
    tighten,
)

T0 = 1_700_000_000
MAX_SAFE = 2**53 - 1

# --- canonical JSON against RFC 8785 --------------------------------------------------------

# Characters where JCS implementations go wrong: escapes, controls, DEL, the line separators
# JavaScript once refused, the top of the BMP and astral characters (UTF-16 surrogate pairs,
# which sort *below* U+E000..U+FFFF in UTF-16 code-unit order but above them by code point).
SPECIAL = [
    "\x00",
    "\x08",
    "\x0c",
    "\x1f",
    "\x7f",
    "\x80",
    "\u2028",
    "\u2029",
    "\ud7ff",
    "\ue000",
    "\ufb33",
    "\ufeff",
    "\uffff",
    "\U00010000",
    "\U0001f600",
    "\U0010ffff",
    '"',
    "\\",
    "/",
    "\n",
    "\r",
    "\t",
    "é",
    "€",
]
chars = st.characters(codec="utf-8") | st.sampled_from(SPECIAL)
strings = st.text(chars, max_size=12)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-MAX_SAFE, MAX_SAFE)
    | st.sampled_from([MAX_SAFE, -MAX_SAFE, 0])
    | strings
)
json_documents = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(chars, max_size=6), inner, max_size=6)
    ),
    max_leaves=25,
)


@settings(max_examples=250, deadline=None)
@given(document=json_documents)
def test_canonical_json_matches_rfc8785(document: Any) -> None:
    encoded = canonical_json(document)
    assert encoded == rfc8785.dumps(document)
    # Canonical bytes parse back to the document and re-encode to themselves.
    assert strict_json_loads(encoded) == document
    assert canonical_json(strict_json_loads(encoded)) == encoded


@settings(max_examples=200, deadline=None)
@given(keys=st.lists(st.text(st.sampled_from(SPECIAL), min_size=1, max_size=3), max_size=12))
def test_member_order_is_utf16_code_unit_order(keys: list[str]) -> None:
    document = {key: i for i, key in enumerate(keys)}
    assert canonical_json(document) == rfc8785.dumps(document)


def test_rfc8785_sorting_example() -> None:
    # RFC 8785 §3.2.3.
    document = {
        "\u20ac": "Euro Sign",
        "\r": "Carriage Return",
        "\ufb33": "Hebrew Letter Dalet With Dagesh",
        "1": "One",
        "\U0001f600": "Emoji: Grinning Face",
        "\u0080": "Control",
        "\u00f6": "Latin Small Letter O With Diaeresis",
    }
    order = list(strict_json_loads(canonical_json(document)).values())
    assert order == [
        "Carriage Return",
        "One",
        "Control",
        "Latin Small Letter O With Diaeresis",
        "Euro Sign",
        "Emoji: Grinning Face",
        "Hebrew Letter Dalet With Dagesh",
    ]
    assert canonical_json(document) == rfc8785.dumps(document)


def test_rfc8785_string_and_literal_example() -> None:
    # RFC 8785 §3.2.2 without its numbers (documents here carry no floats).
    document = {
        "string": "\u20ac$\u000f\u000aA'\u0042\u0022\u005c\\\"/",
        "literals": [None, True, False],
    }
    expected = '{"literals":[null,true,false],"string":"€$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}'
    assert canonical_json(document) == expected.encode("utf-8")
    assert canonical_json(document) == rfc8785.dumps(document)


@pytest.mark.parametrize(
    "document",
    [
        1.0,
        0.5,
        float("nan"),
        float("inf"),
        [1, 2.5],
        {"amount": 50.0},
        2**53,
        -(2**53),
        2**64,
        {"n": [MAX_SAFE + 1]},
        "\ud800",
        "a\udfffb",
        {"\ud83d": 1},
        [{"k": "\ude00"}],
    ],
    ids=repr,
)
def test_canonical_json_refuses_non_portable_values(document: Any) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the one documented error type
        canonical_json(document)


def test_canonical_json_keeps_the_largest_exact_integers() -> None:
    assert canonical_json([MAX_SAFE, -MAX_SAFE]) == b"[9007199254740991,-9007199254740991]"


@pytest.mark.parametrize(
    "document",
    [b"ab", bytearray(b"ab"), Decimal("1"), {1, 2}, object(), {1: "a"}, {("a",): 1}],
    ids=repr,
)
def test_canonical_json_refuses_what_json_cannot_hold(document: Any) -> None:
    # Bytes are not an array of numbers, and a member name must be a string: encoding either
    # silently would give two different documents one canonical form.
    with pytest.raises(ValueError):  # noqa: PT011 - the one documented error type
        canonical_json(document)


# --- strict JSON parsing --------------------------------------------------------------------


def test_strict_json_loads_parses_plain_json() -> None:
    assert strict_json_loads(b'{"a":[1,"\\u00e9",null,true]}') == {"a": [1, "é", None, True]}
    assert strict_json_loads('{"a": {"b": 2}} \n') == {"a": {"b": 2}}


@pytest.mark.parametrize(
    "text",
    [
        b'{"a":1,"a":1}',
        b'{"a":1,"b":2,"a":3}',
        b'{"x":{"b":1,"b":2}}',
        b'[{"x":1,"x":1}]',
        b'{"a":1,"\\u0061":2}',  # the same name, spelled with an escape
    ],
)
def test_strict_json_loads_refuses_duplicate_members(text: bytes) -> None:
    with pytest.raises(InvalidRequest):
        strict_json_loads(text)


@pytest.mark.parametrize(
    "text",
    [
        b"NaN",
        b"Infinity",
        b"-Infinity",
        b"[1,NaN]",
        b'{"a":Infinity}',
        # Literals too large for a double, which would otherwise become +-infinity.
        pytest.param(b"1e400", id="1e400"),
        pytest.param(b"-1e400", id="-1e400"),
        pytest.param(b'{"a":1.5e309}', id="nested-1.5e309"),
        pytest.param(b"[" + b"9" * 400 + b".0]", id="400-digits"),
    ],
)
def test_strict_json_loads_refuses_non_finite_numbers(text: bytes) -> None:
    with pytest.raises(InvalidRequest):
        strict_json_loads(text)


def test_strict_json_loads_keeps_finite_floats() -> None:
    assert strict_json_loads(b"[1.5, -0.25, 1e308, 1e-400]") == [1.5, -0.25, 1e308, 0.0]


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(b'"\\ud800"', id="high"),
        pytest.param(b'"\\uDFFF"', id="low-uppercase"),
        pytest.param(b'"a\\udc00\\ud800b"', id="low-before-high"),
        pytest.param(b'"\\ud83d"', id="high-at-the-end"),
        pytest.param(b'{"\\ud800":1}', id="member-name"),
        pytest.param(b'{"a":[{"b":["ok","\\ud800"]}]}', id="nested"),
        pytest.param(b'["\\\\", "\\ud800"]', id="after-an-escaped-backslash"),
        pytest.param('"\ud800"', id="raw-in-a-str"),
    ],
)
def test_strict_json_loads_refuses_unpaired_surrogates(text: bytes | str) -> None:
    # They have no UTF-8 form: the first .encode() of the string would raise far away.
    with pytest.raises(InvalidRequest):
        strict_json_loads(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(b'"\\ud83d\\ude00"', "\U0001f600", id="escaped-pair"),
        pytest.param(b'"\\\\ud800"', "\\ud800", id="escaped-backslash-then-text"),
        pytest.param(b'"\\u0000"', "\x00", id="nul-is-valid-json"),
        pytest.param('"\U0001f600"', "\U0001f600", id="raw-in-a-str"),
    ],
)
def test_strict_json_loads_keeps_characters_that_are_not_lone_surrogates(
    text: bytes | str, expected: str
) -> None:
    assert strict_json_loads(text) == expected


@pytest.mark.parametrize(
    "text", [b"{} {}", b"{}x", b"1 2", b'{"a":1}}', b"[]]", b"{}\x00", "{}\u00e9"]
)
def test_strict_json_loads_refuses_trailing_data(text: bytes | str) -> None:
    with pytest.raises(InvalidRequest):
        strict_json_loads(text)


@pytest.mark.parametrize(
    "data",
    [
        b'"\xff"',
        b'"\xc3"',  # truncated sequence
        b'"\xc0\xaf"',  # overlong '/'
        b'"\xed\xa0\x80"',  # an encoded surrogate (CESU-8)
        b'{"\xfe":1}',
        b'"\xf4\x90\x80\x80"',  # beyond U+10FFFF
    ],
)
def test_strict_json_loads_refuses_invalid_utf8(data: bytes) -> None:
    with pytest.raises(InvalidRequest):
        strict_json_loads(data)


@pytest.mark.parametrize("text", [b"", b"{", b"{'a':1}", b'{"a" 1}', b"[1,]", b"\xef\xbb\xbf{}"])
def test_strict_json_loads_refuses_malformed_json(text: bytes) -> None:
    with pytest.raises(InvalidRequest):
        strict_json_loads(text)


def test_strict_json_loads_refuses_pathological_nesting() -> None:
    with pytest.raises(InvalidRequest):
        strict_json_loads(b"[" * 100_000 + b"]" * 100_000)


# --- base64url ------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=70))
def test_b64url_round_trip(data: bytes) -> None:
    text = b64url_encode(data)
    assert "=" not in text
    assert b64url_decode(text) == data
    assert b64url_decode(text.encode("ascii")) == data


def test_b64url_decodes_known_values() -> None:
    assert b64url_decode("") == b""
    assert b64url_decode("AA") == b"\x00"
    assert b64url_decode("_-8") == b"\xff\xef"
    assert b64url_decode("SGVsbG8") == b"Hello"


@pytest.mark.parametrize("text", ["AA==", "AAA=", "AA=", "=", "AAAA====", "SGVsbG8="])
def test_b64url_refuses_padding(text: str) -> None:
    with pytest.raises(InvalidRequest):
        b64url_decode(text)


@pytest.mark.parametrize("text", ["AB", "AP", "AAB", "AAD", "SGVsbG9", "_-9"])
def test_b64url_refuses_non_canonical_trailing_bits(text: str) -> None:
    with pytest.raises(InvalidRequest):
        b64url_decode(text)


@pytest.mark.parametrize(
    "text",
    [
        "A",
        "AAAAA",
        "+AAA",
        "/AAA",
        "AA+A",
        "AA A",
        "AA\nA",
        "AAA\n",
        "AA.A",
        "AA*A",
        "\x00AAA",
        "AAé",
        "\u00e9\u00e9\u00e9\u00e9",
        "\uff21\uff21\uff21\uff21",  # fullwidth letters
    ],
    ids=repr,
)
def test_b64url_refuses_invalid_characters_and_lengths(text: str) -> None:
    with pytest.raises(InvalidRequest):
        b64url_decode(text)
    with pytest.raises(InvalidRequest):
        b64url_decode(text.encode("utf-8"))


# --- grants and their hash ------------------------------------------------------------------


def make_grant(**changes: Any) -> Grant:
    fields: dict[str, Any] = {
        "grant_id": "grant-1",
        "agent_id": "agent-1",
        "principal_id": "human-1",
        "provider_id": "calendar-co",
        "audience": "https://calendar.example",
        "capabilities": (
            Capability.read("calendar/*", filter="label:work"),
            Capability.transact("payments", max_amount="50", currency="USD", payees=["shop"]),
            Capability.custom("send_invite", "calendar/events"),
        ),
        "envelope": Envelope(
            rate_limits=(RateLimit(max_count=10, window_seconds=60),),
            time_windows=(TimeWindow(days=("mon", "tue"), start="09:00", end="17:00"),),
            timezone="Europe/Berlin",
            max_per_transaction=Money(amount="50", currency="USD"),
            spend_limits=(SpendLimit(amount="200", currency="USD", period="week"),),
            step_up_threshold=Money(amount="20", currency="USD"),
            expires_at=T0 + 86_400,
        ),
        "created_at": T0,
    }
    fields.update(changes)
    return Grant(**fields)


def test_a_small_grant_has_these_exact_canonical_bytes() -> None:
    grant = Grant(
        grant_id="g1",
        agent_id="a1",
        principal_id="h1",
        provider_id="p1",
        audience="https://p1.example",
        capabilities=(Capability.read("calendar"),),
        created_at=T0,
    )
    expected = (
        b'{"agent_id":"a1","audience":"https://p1.example",'
        b'"capabilities":[{"kind":"read","resource":"calendar"}],"created_at":1700000000,'
        b'"envelope":{"rate_limits":[],"spend_limits":[],"time_windows":[],"timezone":"UTC"},'
        b'"grant_id":"g1","principal_id":"h1","provider_id":"p1","type":"agentauth.grant.v1"}'
    )
    assert grant.canonical_bytes() == expected
    assert grant.digest() == hashlib.sha256(expected).digest()
    assert grant.digest_b64() == b64url_encode(hashlib.sha256(expected).digest())


@pytest.mark.parametrize(
    "grant",
    [
        make_grant(),
        make_grant(audience="https://例え.example/☃?q=\u2028\U0001f600"),
        make_grant(capabilities=(Capability.read("mail", filter='from:"a\\b"\t\x01\U0001f600'),)),
        make_grant(envelope=Envelope()),
    ],
    ids=["full", "unicode-audience", "control-chars-in-filter", "empty-envelope"],
)
def test_grant_canonical_bytes_are_rfc8785(grant: Grant) -> None:
    document = grant.document()
    assert document["type"] == GRANT_TYPE
    assert grant.canonical_bytes() == canonical_json(document) == rfc8785.dumps(document)
    assert grant.digest() == hashlib.sha256(rfc8785.dumps(document)).digest()
    assert len(grant.digest_b64()) == 43
    assert b64url_decode(grant.digest_b64()) == grant.digest()


@settings(max_examples=200, deadline=None)
@given(
    audience=st.text(chars, min_size=1, max_size=20), filter=st.text(chars, min_size=1, max_size=20)
)
def test_grants_with_any_text_are_rfc8785(audience: str, filter: str) -> None:
    grant = make_grant(audience=audience, capabilities=(Capability.read("r", filter=filter),))
    assert grant.canonical_bytes() == rfc8785.dumps(grant.document())


def test_grant_hash_is_stable_and_round_trips_through_its_document() -> None:
    assert make_grant().digest() == make_grant().digest()
    document = make_grant().document()
    assert document.pop("type") == GRANT_TYPE
    assert Grant.model_validate(document).digest() == make_grant().digest()
    wire = strict_json_loads(make_grant().canonical_bytes())
    del wire["type"]
    assert Grant.model_validate(wire).digest() == make_grant().digest()


def test_a_stored_grant_with_amounts_finer_than_its_currency_still_loads() -> None:
    """The minor-unit rule is checked where grants are asked for and approved, not when one is
    parsed: a grant approved before it must still load for tokens, the verifier and the UI."""
    grant = make_grant(
        capabilities=(Capability.transact("payments", max_amount="50.005", currency="USD"),),
        envelope=Envelope(
            max_per_transaction=Money(amount="0.001", currency="USD"),
            spend_limits=(SpendLimit(amount="1.5", currency="JPY", period="day"),),
        ),
    )
    loaded = Grant.from_document(strict_json_loads(grant.canonical_bytes()))
    assert loaded.digest() == grant.digest()
    with pytest.raises(InvalidRequest) as caught:
        check_money(capabilities=loaded.capabilities, envelope=loaded.envelope)
    assert caught.value.reason == "amount_precision"
    check_money(capabilities=make_grant().capabilities, envelope=make_grant().envelope)


def _envelope(**changes: Any) -> Envelope:
    return make_grant().envelope.model_copy(update=changes)


CHANGES: dict[str, dict[str, Any]] = {
    "grant_id": {"grant_id": "grant-2"},
    "agent_id": {"agent_id": "agent-2"},
    "principal_id": {"principal_id": "human-2"},
    "provider_id": {"provider_id": "calendar-co2"},
    "audience": {"audience": "https://calendar.example/"},
    "created_at": {"created_at": T0 + 1},
    "read resource": {
        "capabilities": (
            Capability.read("calendar", filter="label:work"),
            *make_grant().capabilities[1:],
        )
    },
    "read filter": {
        "capabilities": (
            Capability.read("calendar/*", filter="label:home"),
            *make_grant().capabilities[1:],
        )
    },
    "read filter dropped": {
        "capabilities": (Capability.read("calendar/*"), *make_grant().capabilities[1:])
    },
    "max_amount": {
        "capabilities": (
            make_grant().capabilities[0],
            Capability.transact("payments", max_amount="50.01", currency="USD", payees=["shop"]),
            make_grant().capabilities[2],
        )
    },
    "currency": {
        "capabilities": (
            make_grant().capabilities[0],
            Capability.transact("payments", max_amount="50", currency="EUR", payees=["shop"]),
            make_grant().capabilities[2],
        )
    },
    "payees": {
        "capabilities": (
            make_grant().capabilities[0],
            Capability.transact(
                "payments", max_amount="50", currency="USD", payees=["shop", "shop2"]
            ),
            make_grant().capabilities[2],
        )
    },
    "custom name": {
        "capabilities": (
            *make_grant().capabilities[:2],
            Capability.custom("cancel_invite", "calendar/events"),
        )
    },
    "capability dropped": {"capabilities": make_grant().capabilities[:2]},
    "rate count": {
        "envelope": _envelope(rate_limits=(RateLimit(max_count=11, window_seconds=60),))
    },
    "rate window": {
        "envelope": _envelope(rate_limits=(RateLimit(max_count=10, window_seconds=61),))
    },
    "time window": {
        "envelope": _envelope(
            time_windows=(TimeWindow(days=("mon", "tue"), start="09:00", end="17:01"),)
        )
    },
    "time window days": {
        "envelope": _envelope(
            time_windows=(TimeWindow(days=("mon", "wed"), start="09:00", end="17:00"),)
        )
    },
    "timezone": {"envelope": _envelope(timezone="Europe/Paris")},
    "max per transaction": {
        "envelope": _envelope(max_per_transaction=Money(amount="50.000001", currency="USD"))
    },
    "spend amount": {
        "envelope": _envelope(
            spend_limits=(SpendLimit(amount="201", currency="USD", period="week"),)
        )
    },
    "spend period": {
        "envelope": _envelope(
            spend_limits=(SpendLimit(amount="200", currency="USD", period="month"),)
        )
    },
    "step up": {"envelope": _envelope(step_up_threshold=Money(amount="21", currency="USD"))},
    "step up dropped": {"envelope": _envelope(step_up_threshold=None)},
    "expiry": {"envelope": _envelope(expires_at=T0 + 86_401)},
    "expiry dropped": {"envelope": _envelope(expires_at=None)},
}


def test_every_change_changes_the_hash() -> None:
    digests = {"original": make_grant().digest()}
    for name, change in CHANGES.items():
        digests[name] = make_grant(**change).digest()
    by_digest: dict[bytes, list[str]] = {}
    for name, digest in digests.items():
        by_digest.setdefault(digest, []).append(name)
    assert [names for names in by_digest.values() if len(names) > 1] == []


def test_equivalent_spellings_give_the_same_hash() -> None:
    base = make_grant().digest()
    for spelling in ("50.00", "50.0", Decimal("50.000"), 50):
        capabilities = (
            make_grant().capabilities[0],
            Capability.transact("payments", max_amount=spelling, currency="USD", payees=["shop"]),
            make_grant().capabilities[2],
        )
        envelope = _envelope(max_per_transaction=Money(amount=str(spelling), currency="USD"))
        assert make_grant(capabilities=capabilities, envelope=envelope).digest() == base, spelling
    # Sets are written in one order.
    payees = make_grant(
        capabilities=(
            make_grant().capabilities[0],
            Capability.transact("payments", max_amount="50", currency="USD", payees=["b", "a"]),
            make_grant().capabilities[2],
        )
    )
    assert (
        payees.digest()
        == make_grant(
            capabilities=(
                make_grant().capabilities[0],
                Capability.transact(
                    "payments", max_amount="50", currency="USD", payees=["a", "b", "a"]
                ),
                make_grant().capabilities[2],
            )
        ).digest()
    )
    days = _envelope(
        time_windows=(TimeWindow(days=("tue", "mon", "tue"), start="09:00", end="17:00"),)
    )
    assert make_grant(envelope=days).digest() == base


# --- tightening a request -------------------------------------------------------------------

REQUEST = GrantRequest(
    agent_id="agent-1",
    provider_id="shop-co",
    capabilities=(
        Capability.read("calendar/*"),
        Capability.transact("payments", max_amount="100", currency="USD", payees=["a", "b"]),
    ),
    envelope=Envelope(
        rate_limits=(RateLimit(max_count=10, window_seconds=60),),
        spend_limits=(SpendLimit(amount="500", currency="USD", period="month"),),
    ),
)


def test_tighten_without_changes_returns_the_request() -> None:
    assert tighten(REQUEST) == REQUEST


def test_tighten_accepts_narrower_capabilities() -> None:
    narrower = (
        Capability.read("calendar/work", filter="label:meetings"),
        Capability.transact("payments", max_amount="20.5", currency="USD", payees=["a"]),
    )
    tightened = tighten(REQUEST, capabilities=narrower)
    assert tightened.capabilities == narrower
    assert tightened.envelope == REQUEST.envelope
    assert (tightened.agent_id, tightened.provider_id) == (REQUEST.agent_id, REQUEST.provider_id)
    assert tighten(REQUEST, capabilities=(Capability.read("calendar/x"),)).capabilities == (
        Capability.read("calendar/x"),
    )


def test_tighten_accepts_a_stricter_envelope() -> None:
    stricter = Envelope(
        rate_limits=(RateLimit(max_count=5, window_seconds=120),),
        spend_limits=(SpendLimit(amount="100", currency="USD", period="day"),),
        time_windows=(TimeWindow(days=("mon",), start="09:00", end="12:00"),),
        expires_at=T0,
    )
    # A daily cap does not bound a month; keep a monthly one too.
    stricter = stricter.model_copy(
        update={
            "spend_limits": (
                *stricter.spend_limits,
                SpendLimit(amount="400", currency="USD", period="month"),
            )
        }
    )
    tightened = tighten(REQUEST, envelope=stricter)
    assert tightened.envelope == stricter
    assert tightened.capabilities == REQUEST.capabilities


@pytest.mark.parametrize(
    "capabilities",
    [
        (Capability.read("*"),),
        (Capability.read("calendar"),),  # 'calendar/*' does not cover 'calendar' itself
        (Capability.write("calendar/x"),),
        (Capability.transact("payments", max_amount="100.01", currency="USD", payees=["a"]),),
        (Capability.transact("payments", max_amount="50", currency="EUR", payees=["a"]),),
        (Capability.transact("payments", max_amount="50", currency="USD", payees=["a", "c"]),),
        (Capability.transact("payments", max_amount="50", currency="USD"),),
        (Capability.transact("payments", payees=["a"]),),
        (Capability.read("calendar/x"), Capability.custom("n", "calendar/x")),
        (),
    ],
    ids=repr,
)
def test_tighten_refuses_widening_capabilities(capabilities: tuple[Any, ...]) -> None:
    with pytest.raises(Forbidden) as caught:
        tighten(REQUEST, capabilities=capabilities)
    assert caught.value.reason == "widening"
    assert caught.value.error == "forbidden"
    assert caught.value.status_hint == 403


@pytest.mark.parametrize(
    "envelope",
    [
        Envelope(),
        Envelope(
            rate_limits=(RateLimit(max_count=11, window_seconds=60),),
            spend_limits=REQUEST.envelope.spend_limits,
        ),
        Envelope(rate_limits=REQUEST.envelope.rate_limits),
        Envelope(
            rate_limits=REQUEST.envelope.rate_limits,
            spend_limits=(SpendLimit(amount="500.01", currency="USD", period="month"),),
        ),
        Envelope(
            rate_limits=REQUEST.envelope.rate_limits,
            spend_limits=(SpendLimit(amount="100", currency="USD", period="week"),),
        ),
    ],
    ids=["no-rules", "more-rate", "no-spend", "more-spend", "weekly-instead-of-monthly"],
)
def test_tighten_refuses_a_wider_envelope(envelope: Envelope) -> None:
    with pytest.raises(Forbidden) as caught:
        tighten(REQUEST, envelope=envelope)
    assert caught.value.reason == "widening"
