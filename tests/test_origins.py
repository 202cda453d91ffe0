"""Origins and RP IDs in settings, as WebAuthn compares them (a string against the
browser's serialized origin): written any equivalent way, stored the browser's way."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from agentauth._origins import check_issuer, check_rp_id, serialized_origin
from agentauth.registry import RegistrySettings
from agentauth.ui import UISettings
from agentauth.verifier import VerifierSettings


@pytest.mark.parametrize(
    ("written", "serialized"),
    [
        ("https://approve.example.com", "https://approve.example.com"),
        ("https://approve.example.com/", "https://approve.example.com"),
        ("HTTPS://Approve.Example.COM:443", "https://approve.example.com"),
        ("http://localhost:80/", "http://localhost"),
        ("http://localhost:8080", "http://localhost:8080"),
        ("https://approve.example.com:8443", "https://approve.example.com:8443"),
        ("https://[::1]:8443", "https://[::1]:8443"),
        (" https://approve.example.com ", "https://approve.example.com"),
    ],
)
def test_an_origin_is_kept_as_browsers_serialize_it(written: str, serialized: str) -> None:
    assert serialized_origin(written) == serialized


@pytest.mark.parametrize(
    "written",
    [
        "approve.example.com",
        "ftp://approve.example.com",
        "https://",
        "https://approve.example.com/approve",
        "https://approve.example.com/?x=1",
        "https://approve.example.com/#top",
        "https://user:pw@approve.example.com",
        "https://approve.example.com:99999",
    ],
)
def test_what_is_no_origin_is_refused(written: str) -> None:
    with pytest.raises(ValueError, match="origin"):
        serialized_origin(written)


def test_the_rp_id_must_cover_every_origin() -> None:
    assert check_rp_id("Example.COM", ("https://approve.example.com",)) == "example.com"
    assert check_rp_id("localhost", ("http://localhost:8080",)) == "localhost"
    for rp_id, origin in [
        ("example.com", "https://approve.example.org"),
        ("example.com", "https://notexample.com"),  # a suffix as text, not as a domain
        ("approve.example.com", "https://example.com"),  # a parent is not under its child
    ]:
        with pytest.raises(ValueError, match="cannot run passkey ceremonies"):
            check_rp_id(rp_id, (origin,))
    for rp_id in ("https://example.com", "example.com:443", "example.com/", "", ".example.com"):
        with pytest.raises(ValueError, match="RP ID is a domain"):
            check_rp_id(rp_id, ())


@pytest.mark.parametrize("rp_id", ["127.0.0.1", "10.0.0.7", "0x7f.1", "192.168.1.1"])
def test_an_ip_address_is_no_rp_id(rp_id: str) -> None:
    # WebAuthn takes a valid domain only: a browser refuses every ceremony for an IP address
    # (SecurityError), so it is refused at start (until 2026-12-01 it was taken, with the
    # page's origin on that address "under" it, and every passkey ceremony failed later).
    with pytest.raises(ValueError, match="not an IP address"):
        check_rp_id(rp_id, (f"http://{rp_id}:8080",))
    # A name whose labels are digits, but not the last one, is a domain.
    assert check_rp_id("1.2.example", ("https://a.1.2.example",)) == "1.2.example"


def test_settings_store_origins_as_browsers_send_them_and_refuse_a_mismatch() -> None:
    base = {
        "database_url": "postgresql://db/x",
        "redis_url": "redis://r/0",
        "data_dir": "/tmp/x",
        "issuer": "https://registry.example.com",
        "admin_token": "t" * 24,
    }
    settings = RegistrySettings.model_validate(
        {**base, "rp_id": "Example.com", "origins": ["https://Approve.example.com:443/"]}
    )
    assert (settings.rp_id, settings.origins) == ("example.com", ("https://approve.example.com",))
    with pytest.raises(ValidationError, match="cannot run passkey ceremonies"):
        RegistrySettings.model_validate(
            {**base, "rp_id": "example.com", "origins": ["https://approve.example.org"]}
        )
    with pytest.raises(ValidationError, match="at least one origin"):
        RegistrySettings.model_validate({**base, "origins": []})
    ui = UISettings(
        registry_url="http://r", origin="https://APPROVE.example.com:443", rp_id="example.com"
    )
    assert ui.origin == "https://approve.example.com" and ui.host == "approve.example.com"
    with pytest.raises(ValidationError, match="cannot run passkey ceremonies"):
        UISettings(registry_url="http://r", origin="https://approve.example.com", rp_id="x.test")


_REGISTRY = {
    "database_url": "postgresql://db/x",
    "redis_url": "redis://r/0",
    "data_dir": "/tmp/x",
    "issuer": "https://registry.example.com",
    "admin_token": "t" * 24,
}


@pytest.mark.parametrize(
    ("written", "rp_id", "serialized"),
    [
        ("https://bücher.example", "Bücher.example", "https://xn--bcher-kva.example"),
        ("https://Bücher.EXAMPLE:8443/", "bücher.example", "https://xn--bcher-kva.example:8443"),
        # Non-transitional, as browsers map it: Python's "idna" codec gives fass.example.
        ("https://faß.example", "faß.example", "https://xn--fa-hia.example"),
        ("https://bücher。example", "bücher.example", "https://xn--bcher-kva.example"),
        ("https://xn--bcher-kva.example", "bücher.example", "https://xn--bcher-kva.example"),
    ],
)
def test_an_internationalized_origin_is_kept_in_the_ascii_form_browsers_send(
    written: str, rp_id: str, serialized: str
) -> None:
    """A browser puts the punycode form in clientDataJSON.origin and hashes the RP ID the
    registry sends: kept as written, a Unicode origin matched no ceremony, and the
    deployment refused every passkey."""
    assert serialized_origin(written) == serialized
    ascii_rp_id = serialized.removeprefix("https://").split(":")[0]
    assert check_rp_id(rp_id, (serialized,)) == ascii_rp_id
    settings = UISettings(registry_url="http://r", origin=written, rp_id=rp_id)
    assert (settings.origin, settings.rp_id) == (serialized, ascii_rp_id)
    registry = RegistrySettings.model_validate({**_REGISTRY, "rp_id": rp_id, "origins": [written]})
    assert (registry.origins, registry.rp_id) == ((serialized,), ascii_rp_id)


def test_a_name_with_no_ascii_form_is_refused() -> None:
    for origin in ("https://bücher..example", "https://😀.example"):
        with pytest.raises(ValueError, match="no internationalized domain name"):
            serialized_origin(origin)
    with pytest.raises(ValueError, match="RP ID is a domain"):
        check_rp_id("bücher..example", ())


@pytest.mark.parametrize(
    "origin",
    [
        "http://approve.example.com",
        "http://approve.example.com:8080",
        "http://10.0.0.7:8080",
        "http://[::ffff:127.0.0.1]:8080",  # loopback to the kernel, not to a browser
        "http://localhost.example.com",
    ],
)
def test_a_plain_http_origin_off_the_loopback_is_refused(origin: str) -> None:
    """WebAuthn runs in secure contexts only: a browser refuses every ceremony on such a
    page (and its session cookie would travel in the clear)."""
    with pytest.raises(ValueError, match="plain http"):
        serialized_origin(origin)
    with pytest.raises(ValidationError, match="plain http"):
        UISettings(registry_url="http://r", origin=origin, rp_id="example.com")
    with pytest.raises(ValidationError, match="plain http"):
        RegistrySettings.model_validate({**_REGISTRY, "origins": ["https://localhost", origin]})
    assert serialized_origin(origin.replace("http://", "https://", 1))


@pytest.mark.parametrize(
    "origin",
    ["http://localhost:8080", "http://app.localhost", "http://127.0.0.1:8080", "http://[::1]"],
)
def test_a_plain_http_origin_on_the_loopback_serves_development(origin: str) -> None:
    # Potentially trustworthy to browsers (W3C Secure Contexts §3.1).
    assert serialized_origin(origin) == origin


@pytest.mark.parametrize(
    "issuer",
    [
        "auth.example.com/registry",  # no scheme
        "",
        "ftp://auth.example.com/registry",
        "https:///registry",  # no host
        "https://auth.example.com/registry\n",  # a secret file's newline
        "https://auth.example.com/reg istry",
        "https://auth.example.com/registry?x=1",
        "https://auth.example.com/registry#top",
    ],
)
def test_an_issuer_that_cannot_be_the_registrys_url_is_refused_at_start(issuer: str) -> None:
    """It is every token's iss and the base URL proofs are signed for: taken, each of these
    refused every token request as a bad htu later, with nothing naming the setting."""
    with pytest.raises(ValueError, match="issuer"):
        check_issuer(issuer)
    with pytest.raises(ValidationError, match="issuer"):
        RegistrySettings(database_url="postgresql://x/y", redis_url="redis://x", issuer=issuer)
    with pytest.raises(ValidationError, match="issuer"):
        VerifierSettings(database_url="postgresql://x/y", redis_url="redis://x", issuer=issuer)
    for good in ("https://auth.example.com/registry", "http://127.0.0.1:8000/registry"):
        assert check_issuer(good) == good
