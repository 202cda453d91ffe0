"""Minor units of currencies: how many decimal places an amount in each may have.

An amount is exact to 6 places for any 3-letter code (see ``_types.Amount``), but money moves
in a currency's minor unit: a provider settles USD 0.005 as 0.00 or 0.01. Limits counted on
amounts nobody can pay would let sub-unit transactions spend up to twice a cumulative limit,
so an amount in a currency with a known minor unit may not be finer than that unit.

Source: ISO 4217 list one (current currency and funds codes) as published by SIX, the
standard's maintenance agency, in the 2025 edition of the list (with the Caribbean guilder
XCG and the Zimbabwe Gold ZWG). The table holds each active code whose minor unit is a
number. Codes whose minor unit is "N.A." (precious metals XAU XAG XPD XPT, the units of
account XDR XSU XUA and the bond-market units XBA..XBD, the test code XTS and XXX) are not
in it: like codes outside ISO 4217 (the system also carries other units, such as a token's
smallest unit), they keep the 6 places every amount may have.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from types import MappingProxyType

from ._errors import InvalidRequest

__all__ = [
    "ISO_4217_MINOR_UNITS",
    "MAX_PLACES",
    "amount_fits",
    "check_amount",
    "decimal_places",
    "minor_unit",
]

#: Places any amount may have (``_types.Amount``); the rule for codes not in the table.
MAX_PLACES = 6

# By minor unit; every code in ISO 4217 list one with a numeric minor unit appears once.
# ANG stays while it is being replaced by XCG (both 2 places, so nothing hinges on its date).
_BY_MINOR_UNIT: dict[int, str] = {
    0: "BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX UYI VND VUV XAF XOF XPF",
    2: (
        "AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BMD BND BOB BOV BRL BSD BTN"
        " BWP BYN BZD CAD CDF CHE CHF CHW CNY COP COU CRC CUP CVE CZK DKK DOP DZD EGP ERN ETB"
        " EUR FJD FKP GBP GEL GHS GIP GMD GTQ GYD HKD HNL HTG HUF IDR ILS INR IRR JMD KES KGS"
        " KHR KPW KYD KZT LAK LBP LKR LRD LSL MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN"
        " MXV MYR MZN NAD NGN NIO NOK NPR NZD PAB PEN PGK PHP PKR PLN QAR RON RSD RUB SAR SBD"
        " SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS TMT TOP TRY TTD TWD TZS"
        " UAH USD USN UYU UZS VED VES WST XCD XCG YER ZAR ZMW ZWG"
    ),
    3: "BHD IQD JOD KWD LYD OMR TND",
    4: "CLF UYW",
}

#: ISO 4217 alphabetic code -> minor unit (decimal places), for codes that have one.
ISO_4217_MINOR_UNITS: Mapping[str, int] = MappingProxyType(
    {code: unit for unit, codes in _BY_MINOR_UNIT.items() for code in codes.split()}
)


def minor_unit(currency: str) -> int:
    """How many decimal places an amount in ``currency`` may have."""
    return ISO_4217_MINOR_UNITS.get(currency, MAX_PLACES)


def decimal_places(amount: Decimal) -> int:
    """Significant places after the point: trailing zeros do not count ('1.50' has 1)."""
    exponent = amount.normalize().as_tuple().exponent
    assert isinstance(exponent, int), "amounts are finite"
    return max(0, -exponent)


def amount_fits(amount: Decimal, currency: str) -> bool:
    """Whether ``amount`` can be paid in ``currency``: no finer than its minor unit."""
    return decimal_places(amount) <= minor_unit(currency)


def check_amount(amount: Decimal, currency: str, *, field: str = "amount") -> None:
    """Raise ``InvalidRequest`` (reason ``amount_precision``) when ``amount`` is finer than
    ``currency``'s minor unit; ``field`` names where it was given."""
    if not amount_fits(amount, currency):
        places = minor_unit(currency)
        unit = "no decimal places" if places == 0 else f"at most {places} decimal places"
        raise InvalidRequest(
            f"{field}: {currency} amounts have {unit}, got {format(amount, 'f')}",
            reason="amount_precision",
        )
