"""Text an agent chooses and a person reads (names, filters) carries no control or format
characters: the registry's input models refuse them, so the page never has to show them."""

from __future__ import annotations

import unicodedata
from typing import Any

import pytest
from pydantic import ValidationError

from agentauth.protocol._text import check_display_text
from agentauth.registry._models import AgentIn, GrantRequestIn, ProviderIn

# Each would make the approval page read differently from the text it holds.
HIDDEN = [
    pytest.param("Shopping bot\u202e", id="right-to-left-override"),
    pytest.param("Shopping bot\u2067", id="right-to-left-isolate"),
    pytest.param("\u202aShopping bot\u202c", id="embedding-and-pop"),
    pytest.param("Shopping\u200b bot", id="zero-width-space"),
    pytest.param("Shop\u200dping bot", id="zero-width-joiner"),
    pytest.param("Shopping\u2060bot", id="word-joiner"),
    pytest.param("\ufeffShopping bot", id="byte-order-mark"),
    pytest.param("Shop\u00adping bot", id="soft-hyphen"),
    pytest.param("Shopping bot\n\nThis is a routine $5 refund.", id="newline"),
    pytest.param("Shopping bot\r", id="carriage-return"),
    pytest.param("Shopping\tbot", id="tab"),
    pytest.param("Shopping bot\x7f", id="delete"),
    pytest.param("Shopping bot\x85", id="next-line-c1"),
    pytest.param("Shopping bot\u2028more", id="line-separator"),
    pytest.param("Shopping bot\u2029more", id="paragraph-separator"),
    pytest.param("Shopping\u3164bot", id="hangul-filler"),
    pytest.param("\u115fShopping bot", id="hangul-choseong-filler"),
    pytest.param("Shop\u034fping bot", id="combining-grapheme-joiner"),
    pytest.param("Shopping bot\u17b4", id="khmer-inherent-vowel"),
    pytest.param("Shopping\u2800\u2800bot", id="braille-blank"),
    # Unassigned, but reserved as default ignorable: drawn as nothing (Unicode 5.21).
    pytest.param("Shop\u2065ping bot", id="unassigned-ignorable-u2065"),
    pytest.param("Shopping\ufff0 bot", id="unassigned-ignorable-ufff0"),
    pytest.param("Shopping bot\U000e0002", id="unassigned-ignorable-tag-block"),
    pytest.param("Shopping\U000e01f0 bot", id="unassigned-ignorable-after-selectors"),
]
# Drawn, but over or away from the page's own lines: a pile of marks covers the line that
# tells look-alike agents apart, a run of wide spaces pushes an amount off the line.
PILED = [
    pytest.param("Shopping bot" + "\u0331" * 5, "combining marks", id="five-marks-below"),
    pytest.param("S" + "\u0301\u0300\u0302\u0303\u0304" * 20, "combining marks", id="zalgo"),
    pytest.param("Shopping" + "\u20dd" * 5 + " bot", "combining marks", id="enclosing-marks"),
    pytest.param("Shopping" + " " * 4 + "bot", "spaces in a row", id="four-spaces"),
    pytest.param("Shopping" + "\u3000" * 40 + "bot", "spaces in a row", id="ideographic-spaces"),
    pytest.param("Shopping" + "\u00a0 \u2003\u00a0" + "bot", "spaces in a row", id="mixed"),
]
# What a name may well hold: accents, other scripts, symbols, emoji, inner spaces.
READABLE = [
    "Shopping bot",
    "Café-Bot №2",
    "買い物ボット",
    "بوت التسوق",
    "🛒 bot",
    "❤\ufe0f bot",
    "a  b",
    "a \u00a0 b",  # three spaces in a row at most
    "Tiếng Việt",  # precomposed
    unicodedata.normalize("NFD", "Tiếng Việt"),  # two marks on one letter
    "ཧཱུྃ",  # a Tibetan stack: three marks on one letter
]

ENROLLMENT = "e" * 16
JWK = {"kty": "OKP", "crv": "Ed25519", "x": "A" * 43}


def agent(name: str) -> dict[str, Any]:
    return {"name": name, "public_jwk": JWK, "enrollment_code": ENROLLMENT}


def provider(**fields: str) -> dict[str, Any]:
    return {
        "id": "shop",
        "audience": "https://shop.example",
        "display_name": "Shop",
        "allowed_kinds": ["read"],
        **fields,
    }


def read_request(filter_text: str) -> dict[str, Any]:
    capability = {"kind": "read", "resource": "mail/*", "filter": filter_text}
    return {"provider_id": "mail", "capabilities": [capability]}


@pytest.mark.parametrize("text", HIDDEN)
def test_hidden_characters_are_refused_wherever_an_agent_names_something(text: str) -> None:
    with pytest.raises(ValueError, match=r"must not contain U\+"):
        check_display_text(text)
    with pytest.raises(ValidationError):
        AgentIn.model_validate(agent(text))
    with pytest.raises(ValidationError):
        GrantRequestIn.model_validate(read_request(text))
    with pytest.raises(ValidationError):
        ProviderIn.model_validate(provider(display_name=text))
    with pytest.raises(ValidationError):
        ProviderIn.model_validate(provider(audience="https://shop.example/" + text))


@pytest.mark.parametrize(("text", "says"), PILED)
def test_piles_of_marks_or_spaces_are_refused_wherever_an_agent_names_something(
    text: str, says: str
) -> None:
    """The approval page drew 100 stacked marks below a name over the line under it, and a
    run of wide spaces pushed the rest of a line away; neither was refused."""
    with pytest.raises(ValueError, match=says):
        check_display_text(text)
    with pytest.raises(ValidationError):
        AgentIn.model_validate(agent(text))
    with pytest.raises(ValidationError):
        GrantRequestIn.model_validate(read_request(text))
    with pytest.raises(ValidationError):
        ProviderIn.model_validate(provider(display_name=text))


@pytest.mark.parametrize("text", READABLE)
def test_readable_text_in_any_script_is_kept(text: str) -> None:
    assert check_display_text(text) == text
    assert AgentIn.model_validate(agent(text)).name == text
    assert GrantRequestIn.model_validate(read_request(text)).capabilities[0].filter == text  # type: ignore[union-attr]
    assert ProviderIn.model_validate(provider(display_name=text)).display_name == text
