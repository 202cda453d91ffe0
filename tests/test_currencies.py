"""The minor-unit table and the rule that an amount is no finer than its currency's unit."""

from __future__ import annotations

from decimal import Decimal

import pytest

from agentauth.protocol import (
    ISO_4217_MINOR_UNITS,
    Capability,
    Envelope,
    InvalidRequest,
    Money,
    SpendLimit,
    amount_fits,
    check_amount,
    check_money,
    minor_unit,
)
from agentauth.protocol._currencies import MAX_PLACES, decimal_places


@pytest.mark.parametrize(
    ("currency", "places"),
    [
        ("USD", 2),
        ("EUR", 2),
        ("GBP", 2),
        ("JPY", 0),
        ("KRW", 0),
        ("ISK", 0),
        ("CLP", 0),
        ("XOF", 0),
        ("BHD", 3),
        ("KWD", 3),
        ("OMR", 3),
        ("TND", 3),
        ("JOD", 3),
        ("IQD", 3),
        ("LYD", 3),
        ("CLF", 4),
        ("UYW", 4),
        ("XCD", 2),
        ("XCG", 2),
        ("ZWG", 2),
    ],
)
def test_known_minor_units(currency: str, places: int) -> None:
    assert ISO_4217_MINOR_UNITS[currency] == places
    assert minor_unit(currency) == places


@pytest.mark.parametrize(
    "currency",
    # ISO 4217 codes whose minor unit is "N.A.", and codes outside ISO 4217.
    ["XAU", "XAG", "XPD", "XPT", "XDR", "XSU", "XUA", "XBA", "XTS", "XXX", "TOK", "PTS"],
)
def test_codes_without_a_minor_unit_keep_six_places(currency: str) -> None:
    assert currency not in ISO_4217_MINOR_UNITS
    assert minor_unit(currency) == MAX_PLACES == 6
    assert amount_fits(Decimal("0.000001"), currency)


def test_the_table_is_well_formed() -> None:
    assert len(ISO_4217_MINOR_UNITS) > 150
    for code, places in ISO_4217_MINOR_UNITS.items():
        assert len(code) == 3 and code.isalpha() and code.isupper(), code
        assert places in (0, 2, 3, 4), code
    with pytest.raises(TypeError):
        ISO_4217_MINOR_UNITS["USD"] = 6  # type: ignore[index]


@pytest.mark.parametrize(
    ("amount", "places"),
    [("0", 0), ("100", 0), ("1.50", 1), ("1.500000", 1), ("0.005", 3), ("12.000001", 6)],
)
def test_places_ignore_trailing_zeros(amount: str, places: int) -> None:
    assert decimal_places(Decimal(amount)) == places


@pytest.mark.parametrize(
    ("amount", "currency", "fits"),
    [
        ("0.01", "USD", True),
        ("1.50", "USD", True),
        ("100", "USD", True),
        ("0.005", "USD", False),
        ("1", "JPY", True),
        ("1.00", "JPY", True),
        ("1.5", "JPY", False),
        ("0.001", "BHD", True),
        ("0.0005", "BHD", False),
        ("0.0001", "UYW", True),
        ("0.00001", "UYW", False),
        ("0.000001", "TOK", True),
    ],
)
def test_amount_fits_its_currency(amount: str, currency: str, fits: bool) -> None:
    assert amount_fits(Decimal(amount), currency) is fits
    if fits:
        check_amount(Decimal(amount), currency)
    else:
        with pytest.raises(InvalidRequest) as caught:
            check_amount(Decimal(amount), currency, field="step_up.amount")
        assert caught.value.reason == "amount_precision"
        assert caught.value.error == "invalid_request"
        assert caught.value.description.startswith(f"step_up.amount: {currency} amounts have")


def test_a_whole_currency_says_no_decimal_places() -> None:
    with pytest.raises(InvalidRequest, match=r"JPY amounts have no decimal places, got 1\.5$"):
        check_amount(Decimal("1.5"), "JPY")


def test_check_money_names_the_first_field_finer_than_its_currency() -> None:
    fine = Envelope(
        max_per_transaction=Money(amount="10.50", currency="USD"),
        spend_limits=(SpendLimit(amount="1000", currency="JPY", period="day"),),
        step_up_threshold=Money(amount="5", currency="USD"),
    )
    payments = Capability.transact("payments", max_amount="10.5", currency="USD")
    check_money(capabilities=[payments, Capability.read("calendar")], envelope=fine)
    cases = [
        (
            {"capabilities": [Capability.transact("p", max_amount="0.001", currency="USD")]},
            "capabilities[0].max_amount",
        ),
        (
            {"envelope": Envelope(max_per_transaction=Money(amount="1.5", currency="JPY"))},
            "envelope.max_per_transaction.amount",
        ),
        (
            {"envelope": Envelope(step_up_threshold=Money(amount="0.0005", currency="KWD"))},
            "envelope.step_up_threshold.amount",
        ),
        (
            {
                "envelope": Envelope(
                    spend_limits=(
                        SpendLimit(amount="1", currency="USD", period="day"),
                        SpendLimit(amount="1.001", currency="USD", period="grant"),
                    )
                )
            },
            "envelope.spend_limits[1].amount",
        ),
    ]
    for arguments, field in cases:
        with pytest.raises(InvalidRequest) as caught:
            check_money(**arguments)  # type: ignore[arg-type]
        assert caught.value.reason == "amount_precision"
        assert caught.value.description.startswith(field + ": ")
