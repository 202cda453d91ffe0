"""The approval page in a real headless Chromium with the DevTools virtual authenticator.

The page runs in its own process against a registry and a verifier on Ray Serve (their own
Serve applications, so the registry's WebAuthn origin is this page's origin). Passkeys are
created and used by Chromium's virtual CTAP2 authenticator (resident keys, user
verification); the tests check what a human sees and what the registry then holds, and
save the README's screenshots into docs/images/.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from ui_helpers import (
    Agent,
    Page,
    Registry,
    add_authenticator,
    approval_begin,
    approval_finish,
    chrome,
    enrollment_code_for,
    focus,
    free_port,
    serve_html,
    soft_human,
    tab_order,
    ui_process,
    websocket_status,
)

from agentauth.protocol import (
    ApprovalReceipt,
    Capability,
    Grant,
    b64url_decode,
    b64url_encode,
    verify_receipt,
)

pytestmark = [pytest.mark.browser, pytest.mark.ray, pytest.mark.postgres, pytest.mark.redis]


@dataclass
class Stack:
    origin: str
    registry: Registry
    settings: Any  # the page's registry's RegistrySettings


@pytest.fixture(scope="module")
def stack(
    registry_settings: Any, serve_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    from ray import serve

    from agentauth.deployments.registry import build_registry_app
    from agentauth.deployments.verifier import build_verifier_app
    from agentauth.verifier import VerifierSettings

    port = free_port()
    origin = f"http://localhost:{port}"
    base = f"http://127.0.0.1:{serve_port}/registry-ui"
    # The session's registry admits http://localhost:8080 only; this one admits the page's
    # origin. Same database, keys and Redis: only WebAuthn's origin and the issuer differ.
    settings = registry_settings.model_copy(update={"origins": (origin,), "issuer": base})
    serve.run(
        build_registry_app(settings, replicas=1), name="registry-ui", route_prefix="/registry-ui"
    )
    verifier = VerifierSettings(
        database_url=settings.database_url,
        redis_url=settings.redis_url,
        issuer=base,
        shards=2,
        shard_timeout=2.0,
    )
    serve.run(
        build_verifier_app(verifier, replicas=1), name="verifier-ui", route_prefix="/verifier-ui"
    )
    log = tmp_path_factory.mktemp("ui") / "ui.log"
    try:
        with (
            ui_process(base, port, log) as served,
            httpx.Client(timeout=30) as client,
        ):
            assert served == origin
            yield Stack(
                origin=origin,
                registry=Registry(
                    client=client,
                    base=base,
                    admin_token=settings.admin_token,
                    verifier=f"http://127.0.0.1:{serve_port}/verifier-ui",
                ),
                settings=settings,
            )
    finally:
        # Replicas shut down gracefully in the background (blocking costs ~30 s each).
        serve.delete("verifier-ui", _blocking=False)
        serve.delete("registry-ui", _blocking=False)


@pytest.fixture(scope="module")
def downloads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def driver(downloads: Path) -> Iterator[webdriver.Chrome]:
    browser = chrome(downloads)
    try:
        yield browser
    finally:
        browser.quit()


@pytest.fixture
def page(stack: Stack, driver: webdriver.Chrome) -> Iterator[Page]:
    """A browser with no cookies and a fresh passkey authenticator (user verification on)."""
    driver.execute_cdp_cmd("Network.clearBrowserCookies", {})
    add_authenticator(driver)
    try:
        yield Page(driver, stack.origin)
    finally:
        driver.remove_virtual_authenticator()


def sign_up(page: Page, name: str) -> None:
    page.open("/login")
    page.field("Your name").send_keys(name)
    page.click("Create an account with a passkey")
    page.wait_text("Pending requests")


def _live_registry_sessions(stack: Stack) -> int:
    async def count() -> int:
        conn = await asyncpg.connect(stack.settings.database_url)
        try:
            live = await conn.fetchval("SELECT count(*) FROM sessions WHERE expires_at > now()")
            return int(live)
        finally:
            await conn.close()

    return asyncio.run(count())


def test_sign_up_sign_out_and_sign_in_with_the_passkey(page: Page, stack: Stack) -> None:
    page.open("/login")
    page.shot("ui-sign-in.png")
    sign_up(page, "Ada")
    assert len(page.driver.get_credentials()) == 1
    cookies = {c["name"]: c for c in page.driver.get_cookies()}
    session = cookies["agentauth_session"]
    assert session["httpOnly"] and session["sameSite"] == "Strict"
    live = _live_registry_sessions(stack)
    page.click("Sign out")
    page.wait_text("I have a passkey")
    # Signing out ended the registry session the page held, not only the page's cookie.
    assert _live_registry_sessions(stack) == live - 1
    page.click("Sign in with a passkey")
    page.wait_text("Pending requests")
    # Signing in rotated the cookie: the pre-login id is not the session's.
    rotated = {c["name"]: c for c in page.driver.get_cookies()}["agentauth_session"]
    assert rotated["value"] != session["value"]


ASKED = {
    # The example, word for word on the page.
    "rate_limits": [{"max_count": 5, "window_seconds": 3600}],
    "max_per_transaction": {"amount": "50", "currency": "USD"},
    "spend_limits": [{"amount": "200", "currency": "USD", "period": "day"}],
    "time_windows": [
        {"days": ["mon", "tue", "wed", "thu", "fri"], "start": "09:00", "end": "17:00"}
    ],
    "timezone": "Europe/Berlin",
}
ASKED_WORDS = (
    "up to 5 transactions an hour, at most $50 each and $200 a day, "
    "weekdays 09:00\u201317:00 Europe/Berlin (UTC+01:00 or UTC+02:00 by season)"
)
SHOP_CAPABILITIES = [Capability.transact("shop/*", max_amount=50, currency="USD").to_document()]
SHOP = {
    "rate_limits": [{"max_count": 10, "window_seconds": 3600}],
    "max_per_transaction": {"amount": "50", "currency": "USD"},
    "spend_limits": [{"amount": "200", "currency": "USD", "period": "day"}],
    "step_up_threshold": {"amount": "30", "currency": "USD"},
}


def pay(amount: str, resource: str = "shop/orders/1", payee: str = "acme") -> dict[str, Any]:
    return {
        "kind": "transact",
        "resource": resource,
        "amount": amount,
        "currency": "USD",
        "payee": payee,
    }


def enrollment_code(page: Page) -> str:
    page.open("/agents")
    page.click("Create a new enrollment code")
    field = page.field("Enrollment code")
    page.wait(lambda _: field.get_attribute("value"))
    return str(field.get_attribute("value"))


def grant_of(stack: Stack, agent: Agent, request_id: str) -> dict[str, Any]:
    request = stack.registry.as_agent(agent, "GET", f"/v1/grant-requests/{request_id}")
    assert request["status"] == "approved", request
    grant: dict[str, Any] = stack.registry.as_agent(
        agent, "GET", f"/v1/grants/{request['grant_id']}"
    )
    return grant


def test_a_person_approves_a_real_agents_requests_end_to_end(
    page: Page, stack: Stack, downloads: Path
) -> None:
    registry = stack.registry
    sign_up(page, "Grace")
    agent = registry.enroll(enrollment_code(page), "shopping-bot")
    acme, corner = registry.provider("acme-pay"), registry.provider("corner-shop")
    asked = registry.ask(
        agent,
        acme,
        [Capability.transact("payments/*", max_amount=50, currency="USD").to_document()],
        ASKED,
    )
    shop = registry.ask(
        agent,
        corner,
        SHOP_CAPABILITIES,
        SHOP,
    )

    # Pending requests, in plain words.
    page.open("/")
    page.wait_text(ASKED_WORDS)
    page.wait_text("make transactions on everything under payments/ up to $50 each")
    page.shot("ui-requests.png")

    # Widening is refused by the registry, and the page says so.
    page.click("Tighten the limits before approving: shopping-bot asks acme-pay")
    rate = page.field("Most transactions an hour")
    page.replace(rate, "50")
    page.click("Approve with passkey: shopping-bot asks acme-pay")
    page.wait_text("never widen it")
    page.wait_text("403 forbidden (widening)")
    assert registry.as_agent(agent, "GET", f"/v1/grant-requests/{asked['id']}")["status"] == (
        "pending"
    )
    # Tightened: approved as tightened, signed by the passkey.
    page.replace(rate, "3")
    page.wait_text("You would approve: up to 3 transactions an hour")
    page.click("Approve with passkey: shopping-bot asks acme-pay")
    page.wait_text("Approved: shopping-bot asks acme-pay")
    page.wait_text("Receipt verified offline")
    tightened = grant_of(stack, agent, asked["id"])
    assert tightened["document"]["envelope"]["rate_limits"] == [
        {"max_count": 3, "window_seconds": 3600}
    ]

    # As asked.
    page.click("Approve with passkey: shopping-bot asks corner-shop")
    page.wait_text("Approved: shopping-bot asks corner-shop")
    page.wait_text("No pending requests")
    page.shot("ui-approved.png")
    grant = grant_of(stack, agent, shop["id"])
    # The stored receipt verifies offline: this passkey approved exactly this grant.
    verified = verify_receipt(
        ApprovalReceipt.model_validate(grant["receipt"]),
        Grant.from_document(grant["document"]),
        rp_id="localhost",
        origin=stack.origin,
        require_uv=True,
    )
    assert verified.user_verified
    assert grant["receipt"]["credential_id"] in {
        c.id.rstrip("=") for c in page.driver.get_credentials()
    }

    # The agent uses its grant; one payment is above the step-up threshold.
    token = registry.token(agent, grant["id"])
    assert registry.verify(agent, corner, token, pay("20"))["decision"] == "allow"
    assert registry.verify(agent, corner, token, pay("12"))["decision"] == "allow"
    above = registry.verify(agent, corner, token, pay("45", "shop/orders/7"))
    assert (above["decision"], above["reason"]) == ("deny", "step_up_required")
    step = registry.as_agent(
        agent,
        "POST",
        "/v1/step-ups",
        json={
            "grant_id": grant["id"],
            "resource": "shop/orders/7",
            "amount": "45",
            "currency": "USD",
            "payee": "acme",
        },
    )
    page.open("/")
    page.wait_text("shopping-bot asks to pay $45 to acme for shop/orders/7")
    page.click("Approve with passkey: shopping-bot asks to pay $45")
    page.wait_text("Approved once")
    approved = registry.as_agent(agent, "GET", f"/v1/step-ups/{step['id']}")
    assert approved["status"] == "approved"
    answer = registry.verify(
        agent, corner, token, pay("45", "shop/orders/7"), step_up_ref=approved["approval_ref"]
    )
    assert answer["decision"] == "allow", answer

    # Active grants: use against each limit, and a chart of it.
    page.open("/grants")
    page.wait_text("3 of 10 transactions in the last hour \u2014 7 left")
    page.wait_text("$77 of $200 spent today \u2014 $123 left")
    page.wait_text("3 allowed, 1 denied")
    page.wait(
        lambda d: d.find_elements(By.CSS_SELECTOR, "[role=img] svg rect, [role=img] svg path")
    )
    page.shot("ui-grants.png")

    # Revoke the token from the page: the verifier refuses it from then on.
    page.driver.find_element(By.XPATH, "//*[contains(text(), 'Access tokens in use')]").click()
    page.click("Revoke token")
    page.click("Yes, revoke token")
    page.wait_text("Revoked token")
    deadline = time.monotonic() + 5
    while registry.verify(agent, corner, token, pay("1"))["decision"] == "allow":
        assert time.monotonic() < deadline, "the revoked token still verifies"
        time.sleep(0.2)

    # Audit: the chain, the signed checkpoint and each event's inclusion verify here.
    registry.checkpoint()
    page.open(f"/audit?agent={agent.id}")
    page.wait_text("The audit trail verifies")
    page.wait_text("grant.approved")
    assert "does not verify" not in page.text()
    page.shot("ui-audit.png")
    page.click("Check inclusion of event")
    page.wait_text("in the signed log: leaf")
    page.click("Export the audit trail as JSON")
    exported = downloads / f"audit-{agent.id}.json"
    page.wait(lambda _: exported.exists() and exported.stat().st_size > 0)
    document = json.loads(exported.read_text())
    assert document["verification"]["ok"] is True
    assert {"grant.approved", "step_up.approved", "token.revoked", "verify.allow"} <= {
        e["event"] for e in document["events"]
    }


def test_an_approval_without_user_verification_is_refused(page: Page, stack: Stack) -> None:
    registry = stack.registry
    sign_up(page, "Linus")
    agent = registry.enroll(enrollment_code(page), "uv-bot")
    calendar = registry.provider("calendar")
    asked = registry.ask(agent, calendar, [Capability.read("calendar/*").to_document()])
    # The person is present but not verified (no PIN, no biometric) under a UV-required policy:
    # the browser refuses to produce an assertion, and nothing is approved.
    page.driver.set_user_verified(False)
    page.open("/")
    page.click("Approve with passkey: uv-bot asks calendar")
    page.wait(lambda d: d.find_elements(By.CSS_SELECTOR, "[role=alert]"))
    alert = page.driver.find_element(By.CSS_SELECTOR, "[role=alert]").text
    assert "Nothing was signed" in alert and "NotAllowedError" in alert
    status = registry.as_agent(agent, "GET", f"/v1/grant-requests/{asked['id']}")["status"]
    assert status == "pending"
    # A client that sends a UV-less assertion anyway is refused by the registry itself.
    human = soft_human(registry, stack.origin)
    other = registry.enroll(enrollment_code_for(registry, human), "uv-bot-2")
    request = registry.ask(other, calendar, [Capability.read("calendar/*").to_document()])
    begun = approval_begin(registry, human, request["id"])
    human.authenticator.user_verification = False
    r = approval_finish(registry, human, request["id"], human.authenticator.get(begun["options"]))
    assert r.status_code == 400 and r.json()["reason"] == "assertion_refused", r.text
    # With the person verified again, the same request is approved from the page.
    page.driver.set_user_verified(True)
    page.click("Approve with passkey: uv-bot asks calendar")
    page.wait_text("Approved: uv-bot asks calendar")


def test_an_assertion_for_one_grant_cannot_approve_another(stack: Stack) -> None:
    registry = stack.registry
    human = soft_human(registry, stack.origin)
    agent = registry.enroll(enrollment_code_for(registry, human), "two-requests")
    files = registry.provider("files")
    a = registry.ask(agent, files, [Capability.read("files/a/*").to_document()])
    b = registry.ask(agent, files, [Capability.read("files/b/*").to_document()])
    begun_a = approval_begin(registry, human, a["id"])
    begun_b = approval_begin(registry, human, b["id"])
    for_a = human.authenticator.get(begun_a["options"])
    # Presented for B, A's assertion names A's grant hash: no challenge of B matches it.
    r = approval_finish(registry, human, b["id"], for_a)
    assert r.status_code == 409 and r.json()["reason"] == "challenge_used", r.text
    # Relabelled with B's challenge, the signature no longer matches.
    forged = json.loads(json.dumps(for_a))
    client_data = json.loads(b64url_decode(forged["response"]["clientDataJSON"]))
    client_data["challenge"] = begun_b["options"]["challenge"]
    forged["response"]["clientDataJSON"] = b64url_encode(json.dumps(client_data).encode())
    r = approval_finish(registry, human, b["id"], forged)
    assert r.status_code == 400 and r.json()["error"] == "invalid_receipt", r.text
    assert registry.as_agent(agent, "GET", f"/v1/grant-requests/{b['id']}")["status"] == "pending"
    # The assertion still approves exactly what it was made for.
    r = approval_finish(registry, human, a["id"], for_a)
    assert r.status_code == 200, r.text
    assert r.json()["grant_hash"] == begun_a["grant_hash"]


def test_a_reused_challenge_is_refused(stack: Stack) -> None:
    registry = stack.registry
    human = soft_human(registry, stack.origin)
    agent = registry.enroll(enrollment_code_for(registry, human), "replayer")
    files = registry.provider("files")
    request = registry.ask(agent, files, [Capability.read("files/*").to_document()])
    begun = approval_begin(registry, human, request["id"])
    assertion = human.authenticator.get(begun["options"])
    assert approval_finish(registry, human, request["id"], assertion).status_code == 200
    again = approval_finish(registry, human, request["id"], assertion)
    assert again.status_code == 409 and again.json()["reason"] == "challenge_used", again.text
    # A fresh signature over the used challenge is refused as well: the challenge is gone.
    fresh = human.authenticator.get(begun["options"])
    again = approval_finish(registry, human, request["id"], fresh)
    assert again.status_code == 409 and again.json()["reason"] == "challenge_used", again.text
    # Sign-in challenges are single-use too.
    r = registry.client.post(registry.url("/v1/sessions/begin"))
    login = human.authenticator.get(r.json())
    first = registry.client.post(registry.url("/v1/sessions/finish"), json={"credential": login})
    second = registry.client.post(registry.url("/v1/sessions/finish"), json={"credential": login})
    assert first.status_code == 200 and second.status_code == 409


def test_headers_cookies_and_cross_site_requests(stack: Stack) -> None:
    origin = stack.origin
    with httpx.Client(base_url=origin, timeout=10) as client:
        r = client.get("/login")
        assert r.status_code == 200
        assert r.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
        cookie = r.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
        assert "Secure" not in cookie  # http://localhost: browsers would drop a Secure cookie
        # Signed out, every page sends the browser to sign in.
        for path in ("/", "/grants", "/audit", "/agents", "/passkeys"):
            r = client.get(path)
            assert r.status_code == 303 and r.headers["location"] == "/login", path
            assert r.headers["x-frame-options"] == "DENY"
        # State changes only from the page's own origin, with the page's own header.
        good = {"Origin": origin, "X-AgentAuth": "1"}
        body = {"ticket": "t" * 43}
        for headers, status in (
            ({"Origin": "http://evil.example", "X-AgentAuth": "1"}, 403),
            ({"X-AgentAuth": "1"}, 403),
            ({"Origin": origin}, 403),
            (good, 403),  # a well-formed request with an unknown ticket
        ):
            r = client.post("/auth/session", json=body, headers=headers)
            assert r.status_code == status, (headers, r.status_code)
        # A malformed body from the page's origin: 400 in the API's error shape.
        for content in (b"{not json", b'{"ticket": 1}', b"{}", b'{"ticket": "short"}'):
            r = client.post(
                "/auth/session",
                content=content,
                headers={**good, "Content-Type": "application/json"},
            )
            assert (r.status_code, r.json()["error"]) == (400, "invalid_request"), content
        # Another Host name for this address (a rebinding page, or 127.0.0.1 typed by
        # hand) gets nothing but a redirect to the origin the passkeys are bound to.
        r = client.get("/login", headers={"Host": "attacker.example"})
        assert r.status_code == 308 and r.headers["location"] == f"{origin}/login"
        r = client.post("/auth/session", json=body, headers={**good, "Host": "attacker.example"})
        assert r.status_code == 400
    # NiceGUI's socket carries every action: a cross-site handshake is refused.
    port = int(origin.rsplit(":", 1)[1])
    assert websocket_status(port, origin) == 101
    assert websocket_status(port, "http://evil.example") == 403


def test_the_page_cannot_be_framed(page: Page, stack: Stack) -> None:
    """Chromium itself refuses to render the page in another site's frame; a control
    frame (the registry's health check, sent without framing headers) renders."""
    control = stack.registry.url("/healthz")
    html = (
        f"<iframe id=control src='{control}'></iframe>"
        f"<iframe id=page src='{stack.origin}/login'></iframe>"
    )
    with serve_html(html) as other_site:
        page.driver.get(other_site)

        def frame(name: str, script: str) -> str:
            page.driver.switch_to.frame(name)
            try:
                return str(page.driver.execute_script(script))
            finally:
                page.driver.switch_to.default_content()

        page.wait(lambda _: "ok" in frame("control", "return document.body.innerText"))
        # Chromium replaced the refused frame with its error page.
        page.wait(lambda _: frame("page", "return location.href").startswith("chrome-error:"))
        assert "passkey" not in frame("page", "return document.body.innerText").lower()


def test_keyboard_reaches_the_main_controls_and_each_has_a_name(page: Page, stack: Stack) -> None:
    registry = stack.registry
    page.open("/login")
    order = tab_order(page)
    assert order[:4] == [
        ("a", "Skip to main content"),
        ("button", "Sign in with a passkey"),
        ("input", "Your name"),
        ("button", "Create an account with a passkey"),
    ]
    # Sign up and approve by keyboard alone.
    page.driver.switch_to.active_element.send_keys(Keys.TAB)  # back to the top: skip link
    focus(page, "Your name").send_keys("Kay")
    focus(page, "Create an account with a passkey").send_keys(Keys.ENTER)
    page.wait_text("Pending requests")
    agent = registry.enroll(enrollment_code(page), "kbd-bot")
    asked = registry.ask(
        agent, registry.provider("notes"), [Capability.write("notes/*").to_document()]
    )
    page.open("/")
    page.wait_text("kbd-bot asks notes")
    names = [name for _, name in tab_order(page)]
    for expected in (
        "Skip to main content",
        "Requests",
        "Active grants",
        "Audit",
        "Agents",
        "Passkeys",
        "Sign out",
        "Approve with passkey: kbd-bot asks notes",
        "Tighten the limits before approving: kbd-bot asks notes",
        "Deny: kbd-bot asks notes",
        "Refresh the pending requests",
    ):
        assert expected in names, (expected, names)
    assert names.index("Approve with passkey: kbd-bot asks notes") < names.index(
        "Deny: kbd-bot asks notes"
    )
    focus(page, "Approve with passkey: kbd-bot asks notes").send_keys(Keys.ENTER)
    page.wait_text("Approved: kbd-bot asks notes")
    grant = grant_of(stack, agent, asked["id"])
    # Every control on every page has an accessible name.
    for path in ("/", "/grants", f"/audit?agent={agent.id}", "/agents", "/passkeys"):
        page.open(path)
        page.wait(lambda d: d.find_elements(By.TAG_NAME, "h1"))
        for element in page.driver.find_elements(
            By.CSS_SELECTOR, "button, a[href], input, [role=combobox], [tabindex='0']"
        ):
            if element.is_displayed():
                assert element.accessible_name.strip(), (path, element.get_attribute("outerHTML"))
    # Revoke the grant, then the agent, from the page (each after a confirmation).
    page.open("/grants")
    page.click("Revoke grant: kbd-bot")
    page.click("Yes, revoke the grant")
    page.wait_text("Revoked the grant")
    revoked = registry.as_agent(agent, "GET", f"/v1/grants/{grant['id']}")
    assert revoked["revoked_at"] is not None
    page.open("/agents")
    page.click("Revoke agent kbd-bot")
    page.click("Yes, revoke agent kbd-bot")
    page.wait_text("Revoked agent kbd-bot")
    page.wait_text("disabled")
    r = registry._agent_call(agent, "GET", "/v1/grants")
    assert r.status_code == 403 and r.json()["reason"] == "agent_disabled"


def test_deny_a_request_and_move_to_a_new_passkey(page: Page, stack: Stack) -> None:
    registry = stack.registry
    sign_up(page, "Mary")
    agent = registry.enroll(enrollment_code(page), "deny-bot")
    asked = registry.ask(
        agent, registry.provider("mail"), [Capability.write("mail/*").to_document()]
    )
    page.open("/")
    page.wait_text("deny-bot asks mail")
    deny = page.driver.find_element(By.CSS_SELECTOR, "[aria-label='Deny: deny-bot asks mail']")
    where = deny.location
    # A request that arrives while one is on screen is announced; the card under the
    # person's pointer does not move.
    later = registry.ask(
        agent, registry.provider("notes"), [Capability.read("notes/*").to_document()]
    )
    page.wait_text("1 new request waiting")  # the toast, gone again after a few seconds
    page.wait(
        lambda d: d.find_elements(By.CSS_SELECTOR, "[aria-label='Show 1 new pending request']")
    )
    assert deny.location == where
    assert "deny-bot asks notes" not in page.text()
    page.click("Show 1 new pending request")
    page.wait_text("deny-bot asks notes")
    page.click("Deny: deny-bot asks notes")
    page.wait_text("Denied: deny-bot asks notes")
    assert registry.as_agent(agent, "GET", f"/v1/grant-requests/{later['id']}")["status"] == (
        "denied"
    )
    page.click("Deny: deny-bot asks mail")
    page.wait_text("Denied: deny-bot asks mail")
    assert registry.as_agent(agent, "GET", f"/v1/grant-requests/{asked['id']}")["status"] == (
        "denied"
    )
    page.open("/passkeys")
    page.click("Remove passkey 1")
    page.wait_text("You cannot remove your last passkey")
    # A new security key replaces the phone: the phone's passkey confirms the change, then
    # the key (the only authenticator left) creates the second passkey.
    page.click("Add a passkey")
    page.wait_text("Confirmed. Now have the new passkey")
    page.driver.remove_virtual_authenticator()
    add_authenticator(page.driver)
    page.click("Create the new passkey")
    page.wait_text("Added a new passkey")
    page.wait_text("Passkey 2")
    # The phone's passkey goes, confirmed by the key's.
    page.click("Remove passkey 1")
    page.wait_text("Removed passkey 1")
    page.wait(lambda d: "Passkey 2" not in d.find_element(By.TAG_NAME, "body").text)
    # The new passkey signs in.
    page.click("Sign out")
    page.click("Sign in with a passkey")
    page.wait_text("Pending requests")
    # Every passkey lost, signed out: the administrator's one-time code makes a new one.
    page.click("Sign out")
    page.driver.remove_virtual_authenticator()
    add_authenticator(page.driver)
    mary = registry.as_agent(agent, "GET", f"/v1/agents/{agent.id}")["principal_id"]
    page.replace(page.field("Recovery code"), registry.recovery_code(mary))
    page.click("Make a new passkey with the code")
    page.wait_text("Pending requests")


def test_what_waits_on_a_suspended_provider_can_be_refused_not_approved(
    page: Page, stack: Stack
) -> None:
    registry = stack.registry
    sign_up(page, "Nora")
    agent = registry.enroll(enrollment_code(page), "held-bot")
    provider = registry.provider("ledger")
    # A grant approved before the suspension, and a payment above its step-up threshold.
    shop = registry.ask(
        agent,
        provider,
        SHOP_CAPABILITIES,
        SHOP,
    )
    page.open("/")
    page.click("Approve with passkey: held-bot asks ledger")
    page.wait_text("Approved: held-bot asks ledger")
    grant = grant_of(stack, agent, shop["id"])
    step = registry.as_agent(
        agent,
        "POST",
        "/v1/step-ups",
        json={
            "grant_id": grant["id"],
            "resource": "shop/orders/9",
            "amount": "40",
            "currency": "USD",
        },
    )
    asked = registry.ask(agent, provider, [Capability.read("ledger/*").to_document()])
    r = registry.client.put(
        registry.url(f"/v1/providers/{provider.id}/suspension"),
        headers={"Authorization": f"Bearer {registry.admin_token}"},
        json={"reason": "contract on hold"},
    )
    assert r.status_code == 200, r.text

    page.open("/")
    page.wait_text("ledger is suspended by the administrator: this request cannot be approved")
    page.wait_text("this payment cannot be approved until it is reinstated")
    names = [
        b.get_attribute("aria-label") for b in page.driver.find_elements(By.TAG_NAME, "button")
    ]
    assert "Deny: held-bot asks ledger" in names
    assert "Refuse: held-bot asks to pay $40 for shop/orders/9" in names
    assert not any(n and n.startswith(("Approve with passkey", "Tighten")) for n in names), names
    page.click("Deny: held-bot asks ledger")
    page.wait_text("Denied: held-bot asks ledger")
    assert registry.as_agent(agent, "GET", f"/v1/grant-requests/{asked['id']}")["status"] == (
        "denied"
    )
    page.click("Refuse: held-bot asks to pay $40")
    page.wait_text("Refused: held-bot asks to pay $40")
    assert registry.as_agent(agent, "GET", f"/v1/step-ups/{step['id']}")["status"] == "denied"
    # The grant is kept, and its card says why it does not work.
    page.open("/grants")
    page.wait_text("is suspended by the administrator: the agent gets no tokens for this grant")
