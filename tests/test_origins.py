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
