"""The requests page's logic in memory: the real cards in a bare NiceGUI client (no server,
no socket, no browser), a fake registry behind them and a stub for the passkey prompt.
Buttons are pressed by running their handlers as NiceGUI would, to the end."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, cast
from unittest import mock

import httpx
import pytest
from nicegui import Client, ui
from nicegui.element import Element
from nicegui.elements.mixins.text_element import TextElement
from nicegui.page import page
from softauthn import SoftAuthenticator
from starlette.requests import Request

import agentauth.ui._pages as pages_module
from agentauth._logs import Throttle
from agentauth.protocol import Envelope, Grant, b64url_encode, parse_capabilities
from agentauth.ui import RegistryClient, RegistryError, SessionStore, UISettings
from agentauth.ui._pages import Pages
from agentauth.ui._registry import EventHistory

SHOP_REQUEST: dict[str, Any] = {
    "id": "grq_shop",
    "agent_id": "agt_1",
    "agent_name": "Shopping bot",
    "provider_id": "shop",
    "provider_name": "Shop",
    "audience": "https://shop.example",
    "provider_suspended": False,
    "created_at": "2026-01-01T00:00:00+00:00",
    "capabilities": [
        {"kind": "transact", "resource": "payments/*", "max_amount": "50", "currency": "USD"}
    ],
    "envelope": {
        "rate_limits": [{"max_count": 5, "window_seconds": 3600}],
        "spend_limits": [{"amount": "200", "currency": "USD", "period": "day"}],
    },
}
STEP_UP: dict[str, Any] = {
    "id": "stp_1",
    "grant_id": "grt_9",
    "agent_id": "agt_1",
    "status": "pending",
    "expires_at": 2_000_000_000,
    "provider_suspended": False,
    "document": {
        "type": "agentauth.step-up.v1",
        "id": "stp_1",
        "grant_id": "grt_9",
        "grant_hash": "hash-of-grt_9",
        "agent_id": "agt_1",
        "expires_at": 2_000_000_000,
        "amount": "120",
        "currency": "USD",
        "resource": "payments/inv/7",
        "payee": "acme",
    },
}


class FakeRegistry:
    """The registry calls the requests page makes, answered from lists."""

    def __init__(self, requests: list[dict[str, Any]], steps: list[dict[str, Any]]) -> None:
        self.requests = requests
        self.steps = steps
        self.begun: list[dict[str, Any] | None] = []
        self.listed_passkeys: list[dict[str, Any]] = []
        self.denied: list[str] = []
        self.refused: list[str] = []

    async def grant_requests(self, token: str, status: str) -> list[dict[str, Any]]:
        return list(self.requests)

    async def step_ups(self, token: str, status: str) -> list[dict[str, Any]]:
        return list(self.steps)

    async def agents(self, token: str) -> list[dict[str, Any]]:
        return [{"id": "agt_1", "name": "Shopping bot"}, {"id": "agt_2", "name": "Mail bot"}]

    async def passkeys(self, token: str) -> list[dict[str, Any]]:
        return list(self.listed_passkeys)

    async def approval_begin(
        self, token: str, request_id: str, narrowed: dict[str, Any] | None
    ) -> dict[str, Any]:
        """Offers what it was asked for, as the real registry does (tighten() is its judge)."""
        self.begun.append(narrowed)
        request = next(r for r in self.requests if r["id"] == request_id)
        grant = Grant(
            grant_id="grt_1",
            agent_id=request["agent_id"],
            principal_id="hum_1",
            provider_id=request["provider_id"],
            audience=request["audience"],
            capabilities=parse_capabilities(
                (narrowed or {}).get("capabilities", request["capabilities"])
            ),
            envelope=Envelope.model_validate((narrowed or {}).get("envelope", request["envelope"])),
            created_at=int(time.time()),
        )
        return {"grant": grant.document(), "options": {"challenge": b64url_encode(grant.digest())}}

    async def approval_finish(
        self, token: str, request_id: str, credential: dict[str, Any]
    ) -> dict[str, Any]:
        self.requests = [r for r in self.requests if r["id"] != request_id]
        return {"id": "grt_1", "grant_hash": "-", "document": {}, "receipt": {}}

    async def deny_request(self, token: str, request_id: str) -> dict[str, Any]:
        self.denied.append(request_id)
        self.requests = [r for r in self.requests if r["id"] != request_id]
        return {}

    async def step_up_deny(self, token: str, step_id: str) -> dict[str, Any]:
        self.refused.append(step_id)
        self.steps = [s for s in self.steps if s["id"] != step_id]
        return {}


class RequestsPage:
    """The requests page of one signed-in person, built in memory."""

    def __init__(
        self,
        registry: FakeRegistry,
        monkeypatch: pytest.MonkeyPatch,
        store: SessionStore | None = None,
    ) -> None:
        store = store or SessionStore(ttl=3600, ticket_ttl=60)
        ticket = store.sign_in("anonymous", principal_id="hum_1", registry_token="tok")
        cookie_id = store.claim(ticket, "anonymous")
        assert cookie_id is not None
        self.cookie_id = cookie_id
        self.store = store
        self.pages = Pages(
            settings=UISettings(registry_url="http://registry.invalid"),
            registry=cast(RegistryClient, registry),
            store=store,
        )
        self.ceremonies = 0

        async def passkey(kind: str, options: dict[str, Any]) -> dict[str, Any]:
            self.ceremonies += 1
            return {"id": "credential"}

        monkeypatch.setattr(self.pages, "_ceremony", passkey)
        self.polls: list[Callable[[], Any]] = []
        # The page polls on a timer; here the test runs each poll itself.
        monkeypatch.setattr(ui, "timer", lambda _interval, callback: self.polls.append(callback))
        # The request that built the page, as the security middleware left it.
        built = {"type": "http", "method": "GET", "path": "/", "root_path": "", "headers": []}
        built |= {"query_string": b"", "state": {"agentauth_cookie_id": cookie_id}}
        self.client = Client(page("/"), request=Request(built))

    async def build(self) -> None:
        with self.client:
            session = self.store.get(self.cookie_id)
            assert session is not None
            await self.pages._requests(self.cookie_id, session)

    async def build_passkeys(self) -> None:
        """The passkeys page instead of the requests page."""
        with self.client:
            session = self.store.get(self.cookie_id)
            assert session is not None
            await self.pages._passkeys(self.cookie_id, session)

    async def poll(self) -> None:
        with self.client:
            for callback in self.polls:
                await callback()

    def elements(self) -> Iterator[Element]:
        return self.client.layout.descendants()

    def texts(self) -> list[str]:
        return [e.text for e in self.elements() if isinstance(e, TextElement) and e.text]

    def button(self, aria_label: str) -> ui.button:
        found = [
            e
            for e in self.elements()
            if isinstance(e, ui.button) and e.props.get("aria-label") == aria_label
        ]
        assert len(found) == 1, (aria_label, [e.props.get("aria-label") for e in self.buttons()])
        return found[0]

    def buttons(self) -> list[ui.button]:
        return [e for e in self.elements() if isinstance(e, ui.button)]

    async def press(self, button: ui.button) -> None:
        """What a click does, run to its end: NiceGUI hands the button's handler to
        ``handle_event``, which would start it as a background task."""
        handlers: list[Callable[[], Any]] = []
        with mock.patch(
            "nicegui.elements.button.handle_event",
            lambda handler, _arguments: handlers.append(handler),
        ):
            for listener in button._event_listeners.values():
                if listener.type == "click":
                    listener.handler(None)
        assert handlers, "the button has no click handler"
        with self.client, button.parent_slot:
            for handler in handlers:
                result = handler()
                if result is not None:
                    await result

    def notice(self) -> str:
        found = [e for e in self.elements() if e.props.get("aria-live") == "polite"]
        return str(cast(TextElement, found[0]).text)


def request_with(**changes: Any) -> dict[str, Any]:
    return {**SHOP_REQUEST, **changes}


# --- one request the page cannot show must not take the page down -----------------------


@pytest.mark.asyncio
async def test_a_request_the_page_cannot_show_leaves_the_others_answerable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Stored before envelopes had an upper bound on expires_at: year 33658 is no date.
    unreadable = request_with(
        id="grq_bad",
        agent_id="agt_2",
        agent_name="Mail bot",
        capabilities=[{"kind": "read", "resource": "mail/*"}],
        envelope={"expires_at": 10**12},
    )
    registry = FakeRegistry([SHOP_REQUEST, unreadable], [STEP_UP])
    requests = RequestsPage(registry, monkeypatch)
    await requests.build()
    texts = requests.texts()
    assert "Shopping bot asks Shop" in texts
    assert "Shopping bot asks to pay $120 to acme for payments/inv/7" in texts
    assert "A request this page cannot show" in texts
    # Every poll and refresh redraws the same way instead of failing.
    registry.requests = [unreadable, SHOP_REQUEST]
    await requests.poll()
    assert "A request this page cannot show" in requests.texts()
    assert "Shopping bot asks Shop" in requests.texts()

    # The unreadable request can still be denied; nothing offers to approve it.
    what = "request grq_bad from agent agt_2"
    assert not any(
        "grq_bad" in str(b.props.get("aria-label"))
        for b in requests.buttons()
        if str(b.props.get("aria-label")).startswith("Approve")
    )
    await requests.press(requests.button(f"Deny: {what}"))
    assert registry.denied == ["grq_bad"]
    assert requests.notice() == f"Denied: {what}."
    # The other agent's request and the payment are still answerable.
    await requests.press(
        requests.button("Refuse: Shopping bot asks to pay $120 to acme for payments/inv/7")
    )
    assert registry.refused == ["stp_1"]
    await requests.press(requests.button("Approve with passkey: Shopping bot asks Shop"))
    assert requests.ceremonies == 1


@pytest.mark.asyncio
async def test_a_payment_the_page_cannot_show_can_still_be_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broken = {**STEP_UP, "id": "stp_2", "document": {"type": "agentauth.step-up.v1"}}
    registry = FakeRegistry([SHOP_REQUEST], [broken])
    requests = RequestsPage(registry, monkeypatch)
    await requests.build()
    assert "A payment this page cannot show" in requests.texts()
    assert "Shopping bot asks Shop" in requests.texts()
    await requests.press(requests.button("Refuse: payment stp_2 for grant grt_9"))
    assert registry.refused == ["stp_2"]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "signed",
    [{"grant_id": "grt_other"}, {"agent_id": "agt_2"}, {"expires_at": 2_100_000_000}],
)
async def test_a_payment_shows_what_its_passkey_signs_or_offers_only_refusal(
    signed: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The card named the grant, the agent and the deadline from the registry's row, while
    the passkey signs the step-up document: a row and a document that disagree had the
    person approve a payment on another grant (or agent) than the one the card named."""
    step = {**STEP_UP, "document": {**STEP_UP["document"], **signed}}
    requests = RequestsPage(FakeRegistry([], [step]), monkeypatch)
    await requests.build()
    assert "A payment this page cannot show" in requests.texts()
    assert not [b for b in requests.buttons() if str(b.props["aria-label"]).startswith("Approve")]
    await requests.press(requests.button("Refuse: payment stp_1 for grant grt_9"))


# --- tightening: what is approved is what the person last saw chosen ------------------------

WHO = "Shopping bot asks Shop"


async def tighten_to_one_an_hour_and_ten_a_day(requests: RequestsPage) -> None:
    await requests.press(requests.button(f"Tighten the limits before approving: {WHO}"))
    (rate,) = [
        e
        for e in requests.elements()
        if isinstance(e, ui.number) and e.props.get("label") == "Most transactions an hour"
    ]
    (daily,) = [
        e
        for e in requests.elements()
        if isinstance(e, ui.input) and e.props.get("label") == "Most per day (USD)"
    ]
    with requests.client:
        rate.value = 1
        daily.value = "10"
    preview = "You would approve: up to 1 transaction an hour, at most $10 a day (UTC time)"
    assert preview in requests.texts()


@pytest.mark.asyncio
async def test_approve_signs_the_tightened_limits_while_the_form_is_open(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry = FakeRegistry([SHOP_REQUEST], [])
    requests = RequestsPage(registry, monkeypatch)
    await requests.build()
    await tighten_to_one_an_hour_and_ten_a_day(requests)
    await requests.press(requests.button(f"Approve with passkey: {WHO}"))
    (narrowed,) = registry.begun
    assert narrowed is not None
    assert narrowed["envelope"]["rate_limits"] == [{"max_count": 1, "window_seconds": 3600}]
    assert narrowed["envelope"]["spend_limits"][0]["amount"] == "10"
    assert requests.ceremonies == 1


@pytest.mark.asyncio
async def test_a_limit_finer_than_a_cent_is_refused_before_the_passkey(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry = FakeRegistry([SHOP_REQUEST], [])
    requests = RequestsPage(registry, monkeypatch)
    await requests.build()
    await tighten_to_one_an_hour_and_ten_a_day(requests)
    (daily,) = [
        e
        for e in requests.elements()
        if isinstance(e, ui.input) and e.props.get("label") == "Most per day (USD)"
    ]
    with requests.client:
        daily.value = "9.995"
    assert "Check the values: USD amounts have at most 2 decimal places." in requests.texts()
    await requests.press(requests.button(f"Approve with passkey: {WHO}"))
    assert registry.begun == []
    assert requests.ceremonies == 0
    assert "USD amounts have at most 2 decimal places" in requests.notice()


@pytest.mark.asyncio
async def test_closing_the_tighten_form_discards_it_and_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry = FakeRegistry([SHOP_REQUEST], [])
    requests = RequestsPage(registry, monkeypatch)
    await requests.build()
    await tighten_to_one_an_hour_and_ten_a_day(requests)
    toggle = requests.button(f"Discard the tightened limits: {WHO}")
    assert toggle.text == "Discard changes"
    await requests.press(toggle)
    # The form is gone, not hidden with its edits kept somewhere out of sight.
    assert not [e for e in requests.elements() if isinstance(e, ui.number)]
    assert "Changes discarded" in requests.notice()
    reopen = requests.button(f"Tighten the limits before approving: {WHO}")
    assert reopen.text == "Tighten limits…"
    # Opened again, the form starts from the request as asked.
    await requests.press(reopen)
    assert "Unchanged: you would approve exactly what was asked." in requests.texts()
    await requests.press(requests.button(f"Discard the tightened limits: {WHO}"))

    await requests.press(requests.button(f"Approve with passkey: {WHO}"))
    assert registry.begun == [None]  # the request as asked, which is what the card shows
    assert requests.ceremonies == 1


@pytest.mark.asyncio
async def test_the_notice_before_the_passkey_names_the_limits_it_signs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry = FakeRegistry([SHOP_REQUEST], [])
    requests = RequestsPage(registry, monkeypatch)
    await requests.build()
    shown: list[str] = []

    async def passkey(kind: str, options: dict[str, Any]) -> dict[str, Any]:
        shown.append(requests.notice())
        return {"id": "credential"}

    monkeypatch.setattr(requests.pages, "_ceremony", passkey)
    await tighten_to_one_an_hour_and_ten_a_day(requests)
    await requests.press(requests.button(f"Approve with passkey: {WHO}"))
    (text,) = shown
    assert ", as you tightened it." in text
    assert "Limits: up to 1 transaction an hour, at most $10 a day (UTC time)." in text


@pytest.mark.asyncio
async def test_the_end_date_is_fixed_when_the_person_enters_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry = FakeRegistry([SHOP_REQUEST], [])
    requests = RequestsPage(registry, monkeypatch)
    await requests.build()
    await requests.press(requests.button(f"Tighten the limits before approving: {WHO}"))
    (days,) = [
        e
        for e in requests.elements()
        if isinstance(e, ui.number) and str(e.props.get("label")).startswith("End the grant after")
    ]
    # A number of days no envelope could hold is refused in words, not by an error.
    with requests.client:
        days.value = 10**9
    assert "End the grant after 1 to 36,500 days" in " ".join(requests.texts())
    entered = time.time()
    with requests.client:
        days.value = 2
    later = entered + 3600  # the person takes an hour before pressing Approve
    monkeypatch.setattr(time, "time", lambda: later)
    await requests.press(requests.button(f"Approve with passkey: {WHO}"))
    (narrowed,) = registry.begun
    assert narrowed is not None
    assert abs(narrowed["envelope"]["expires_at"] - (entered + 2 * 86400)) < 5


# --- polling never moves a card that can still be answered -------------------------------


MAIL_REQUEST = request_with(
    id="grq_mail",
    agent_id="agt_2",
    agent_name="Mail bot",
    provider_id="mail",
    provider_name="Mail",
    capabilities=[{"kind": "read", "resource": "mail/*"}],
    envelope={},
)


def enabled(requests: RequestsPage) -> list[str]:
    return [str(b.props.get("aria-label")) for b in requests.buttons() if b.enabled]


@pytest.mark.asyncio
async def test_a_new_request_is_announced_not_drawn_above_the_cards_on_screen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry = FakeRegistry([SHOP_REQUEST], [STEP_UP])
    requests = RequestsPage(registry, monkeypatch)
    announced: list[str] = []
    monkeypatch.setattr(ui, "notify", lambda message, **_: announced.append(str(message)))
    await requests.build()
    before = requests.buttons()
    # The registry lists the newcomer first: drawn now, it would push every button down.
    registry.requests = [MAIL_REQUEST, SHOP_REQUEST]
    await requests.poll()
    assert requests.buttons()[:-1] == before[:-1]  # the same buttons, in the same places
    assert "Mail bot asks Mail" not in requests.texts()
    assert announced == [
        "1 new request waiting: press \u201cShow 1 new\u201d at the foot of the page."
    ]
    await requests.poll()
    assert len(announced) == 1  # said once
    # The person draws it when their hand is off the cards.
    await requests.press(requests.button("Show 1 new pending request"))
    assert "Mail bot asks Mail" in requests.texts()
    assert requests.button("Refresh the pending requests").text == "Refresh"


@pytest.mark.asyncio
async def test_a_card_no_longer_waiting_is_greyed_in_place(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry = FakeRegistry([SHOP_REQUEST, MAIL_REQUEST], [STEP_UP])
    requests = RequestsPage(registry, monkeypatch)
    await requests.build()
    before = requests.buttons()
    # Approved from another device: the card stays where it is, its buttons off.
    registry.requests = [MAIL_REQUEST]
    await requests.poll()
    assert requests.buttons() == before
    assert "Shopping bot asks Shop" in requests.texts()
    assert not any("Shopping bot asks Shop" in label for label in enabled(requests))
    assert "Approve with passkey: Mail bot asks Mail" in enabled(requests)
    assert "Refuse: Shopping bot asks to pay $120 to acme for payments/inv/7" in enabled(requests)
    # Once nothing on the page can be answered, it redraws by itself.
    registry.requests, registry.steps = [], []
    await requests.poll()
    assert "Shopping bot asks Shop" not in requests.texts()
    assert "No pending requests. When an agent asks for access, it shows here." in requests.texts()


@pytest.mark.asyncio
async def test_an_empty_page_shows_a_new_request_by_itself(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from agentauth.ui import _pages

    monkeypatch.setattr(_pages, "_ARMING_SECONDS", 0.05)
    registry = FakeRegistry([], [])
    requests = RequestsPage(registry, monkeypatch)
    await requests.build()
    registry.requests = [SHOP_REQUEST]
    await requests.poll()
    assert "Shopping bot asks Shop" in requests.texts()
    # Drawn where the person's pointer may be: no answer can be clicked for a moment.
    assert not any("Shopping bot asks Shop" in label for label in enabled(requests))
    await asyncio.sleep(0.1)
    assert "Approve with passkey: Shopping bot asks Shop" in enabled(requests)
    assert "Deny: Shopping bot asks Shop" in enabled(requests)


@pytest.mark.asyncio
async def test_a_card_drawn_by_a_poll_over_greyed_cards_cannot_be_clicked_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every card on screen was answered elsewhere (greyed out), and a poll draws the page
    anew with a newcomer: its Deny would sit where a pointer was resting on a greyed
    card's. Its buttons come on only after a moment; those of a card that is retired
    meanwhile stay off, and a page the person draws themself is answerable at once."""
    from agentauth.ui import _pages

    monkeypatch.setattr(_pages, "_ARMING_SECONDS", 0.1)
    registry = FakeRegistry([SHOP_REQUEST], [])
    requests = RequestsPage(registry, monkeypatch)
    await requests.build()
    registry.requests = []
    await requests.poll()  # greyed out in place
    registry.requests = [MAIL_REQUEST, request_with(id="grq_other", agent_name="Other bot")]
    await requests.poll()  # nothing answerable on screen: drawn anew, with the newcomers
    assert "Mail bot asks Mail" in requests.texts()
    assert not any("asks" in label for label in enabled(requests))
    registry.requests = [MAIL_REQUEST]  # the other answered elsewhere before the moment ends
    await requests.poll()
    await asyncio.sleep(0.2)
    assert "Deny: Mail bot asks Mail" in enabled(requests)
    assert not any("Other bot" in label for label in enabled(requests))
    await requests.press(requests.button("Refresh the pending requests"))
    assert "Deny: Mail bot asks Mail" in enabled(requests)


@pytest.mark.asyncio
async def test_a_poll_waits_while_a_tighten_form_is_open(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry = FakeRegistry([SHOP_REQUEST], [])
    requests = RequestsPage(registry, monkeypatch)
    await requests.build()
    await requests.press(
        requests.button("Tighten the limits before approving: Shopping bot asks Shop")
    )
    registry.requests = []
    await requests.poll()
    assert "Approve with passkey: Shopping bot asks Shop" in enabled(requests)


# --- the passkeys page -----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_each_passkey_is_labelled_from_the_backup_flags_the_registry_stored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry = FakeRegistry([], [])
    registry.listed_passkeys = [
        {"credential_id": f"{n}" * 20, "backup_eligible": be, "backed_up": bs}
        for n, (be, bs) in enumerate([(True, True), (True, False), (False, False), (None, False)])
    ]
    page = RequestsPage(registry, monkeypatch)
    await page.build_passkeys()
    lines = [t for t in page.texts() if " · added " in t]
    assert [line.split(" · ")[3:] for line in lines] == [
        ["synced"],
        ["not synced yet"],
        ["this device only"],
        [],
    ]


@pytest.mark.asyncio
async def test_while_one_approval_waits_for_the_passkey_no_card_can_be_answered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only the approving card's buttons were disabled: Approve on another card replaced
    the page's one notice (what the passkey is signing) while the first prompt was still
    up, and asked for a second ceremony on top of it; Deny went through meanwhile."""
    mail = {
        **SHOP_REQUEST,
        "id": "grq_mail",
        "agent_id": "agt_2",
        "agent_name": "Mail bot",
        "provider_id": "mail",
        "provider_name": "Mail",
        "audience": "https://mail.example",
        "capabilities": [{"kind": "read", "resource": "mail/*"}],
        "envelope": {},
    }
    registry = FakeRegistry([SHOP_REQUEST, mail], [])
    requests = RequestsPage(registry, monkeypatch)
    await requests.build()
    asked: list[str] = []
    release = asyncio.Event()

    async def passkey(kind: str, options: dict[str, Any]) -> dict[str, Any]:
        asked.append(requests.notice())
        await release.wait()
        return {"id": "credential"}

    monkeypatch.setattr(requests.pages, "_ceremony", passkey)
    mail_buttons = [
        requests.button(label)
        for label in (
            "Approve with passkey: Mail bot asks Mail",
            "Tighten the limits before approving: Mail bot asks Mail",
            "Deny: Mail bot asks Mail",
        )
    ]
    approving = asyncio.ensure_future(
        requests.press(requests.button(f"Approve with passkey: {WHO}"))
    )
    while not asked:
        await asyncio.sleep(0.01)
    (signing,) = asked
    assert WHO in signing
    assert not any(button.enabled for button in mail_buttons)
    # Clicks that crossed the disabling on their way change nothing.
    await requests.press(mail_buttons[0])
    await requests.press(mail_buttons[2])
    assert asked == [signing] and requests.notice() == signing
    assert len(registry.begun) == 1 and registry.denied == []

    release.set()
    await approving
    assert all(
        button.enabled
        for button in requests.buttons()
        if "Mail bot" in str(button.props.get("aria-label"))
    )
    await requests.press(requests.button("Deny: Mail bot asks Mail"))
    assert registry.denied == ["grq_mail"]


@pytest.mark.asyncio
async def test_while_an_answer_runs_the_page_cannot_be_drawn_anew_under_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Refresh (or Show N new) stayed on while an answer ran: the cards it drew came with
    their buttons on, and a Deny pressed on one was dropped without a word, the first
    answer still running."""
    mail = {**SHOP_REQUEST, "id": "grq_mail", "agent_name": "Mail bot", "provider_name": "Mail"}
    registry = FakeRegistry([SHOP_REQUEST, mail], [])
    requests = RequestsPage(registry, monkeypatch)
    await requests.build()
    release = asyncio.Event()
    denying: list[str] = []

    async def slow_deny(token: str, request_id: str) -> dict[str, Any]:
        denying.append(request_id)
        await release.wait()
        return await FakeRegistry.deny_request(registry, token, request_id)

    monkeypatch.setattr(registry, "deny_request", slow_deny)
    refresh = requests.button("Refresh the pending requests")
    answering = asyncio.ensure_future(requests.press(requests.button(f"Deny: {WHO}")))
    while not denying:
        await asyncio.sleep(0.01)
    assert not refresh.enabled
    await requests.press(refresh)  # a click that crossed the disabling on its way
    assert "Deny: Mail bot asks Mail" not in enabled(requests)
    release.set()
    await answering
    assert refresh.enabled and "Deny: Mail bot asks Mail" in enabled(requests)
    assert registry.denied == ["grq_shop"]


@pytest.mark.asyncio
async def test_a_session_the_registry_ended_ends_on_the_page_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The registry ends sessions the page does not see end (a passkey removed from another
    device ends the others). Its 401 sent the person to /login, which found the page's own
    session still there and sent them straight back to a page that could not load."""
    registry = FakeRegistry([SHOP_REQUEST], [])
    requests = RequestsPage(registry, monkeypatch)
    await requests.build()
    assert requests.store.get(requests.cookie_id) is not None

    async def ended(token: str, request_id: str) -> dict[str, Any]:
        raise RegistryError(401, "invalid_token", "the session has ended", "bad_session")

    monkeypatch.setattr(registry, "deny_request", ended)
    await requests.press(requests.button(f"Deny: {WHO}"))
    assert requests.store.get(requests.cookie_id) is None

    # The same when the page is being built.
    again = RequestsPage(registry, monkeypatch)

    async def listing_ended(token: str, status: str) -> list[dict[str, Any]]:
        raise RegistryError(401, "invalid_token", "the session has ended", "bad_session")

    monkeypatch.setattr(registry, "grant_requests", listing_ended)
    await again.build()
    assert again.store.get(again.cookie_id) is None


@pytest.mark.asyncio
async def test_a_session_the_registry_ended_leaves_the_screen_at_the_next_poll(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A poll's 401 was dropped with every other registry failure: a page on a computer
    whose session a passkey removal (or a recovery) elsewhere had ended went on showing the
    person's requests, frozen, for as long as it stayed open."""
    went: list[str] = []
    monkeypatch.setattr(ui.navigate, "to", went.append)
    registry = FakeRegistry([SHOP_REQUEST], [])
    requests = RequestsPage(registry, monkeypatch)
    await requests.build()

    async def unreachable(token: str, status: str) -> list[dict[str, Any]]:
        raise RegistryError(0, "unreachable", "the registry cannot be reached", None)

    monkeypatch.setattr(registry, "grant_requests", unreachable)
    await requests.poll()  # a registry down for a moment changes nothing
    assert went == [] and requests.store.get(requests.cookie_id) is not None

    async def ended(token: str, status: str) -> list[dict[str, Any]]:
        raise RegistryError(401, "invalid_token", "the session has ended", "bad_session")

    monkeypatch.setattr(registry, "grant_requests", ended)
    await requests.poll()
    assert went == ["/login"]
    assert requests.store.get(requests.cookie_id) is None


class IdleClock:
    """The session store's clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def idle_page(
    registry: FakeRegistry, monkeypatch: pytest.MonkeyPatch, clock: IdleClock, idle_ttl: int
) -> tuple[RequestsPage, list[str], list[str]]:
    """A requests page whose session ends after ``idle_ttl`` s idle; registry logouts and
    the page's navigations are recorded."""
    logouts: list[str] = []
    went: list[str] = []

    async def logout(token: str) -> None:
        logouts.append(token)

    monkeypatch.setattr(registry, "logout", logout, raising=False)
    monkeypatch.setattr(ui.navigate, "to", went.append)
    store = SessionStore(ttl=12 * 3600, idle_ttl=idle_ttl, ticket_ttl=60, clock=clock)
    return RequestsPage(registry, monkeypatch, store), logouts, went


@pytest.mark.asyncio
async def test_the_pages_polls_do_not_keep_an_idle_session_alive(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A page left open on a shared computer acted for the person for all of session_ttl
    (12 h), without a passkey: enrollment codes, revocations, the audit trail. Its own
    polls must not count as use, or an open tab would never be idle."""
    clock = IdleClock()
    registry = FakeRegistry([SHOP_REQUEST], [])
    page, logouts, went = idle_page(registry, monkeypatch, clock, 1800)
    await page.build()
    clock.now += 1000
    await page.poll()
    clock.now += 799
    await page.poll()
    assert page.store.get(page.cookie_id) is not None and went == []
    clock.now += 1  # 1800 s since the person last did anything
    await page.poll()
    await asyncio.sleep(0)  # the registry's logout runs beside the page
    assert page.store.get(page.cookie_id) is None
    assert went == ["/login"]  # the requests leave the screen
    assert logouts == ["tok"]  # and the registry session ends, as sign-out ends it
    await page.press(page.button(f"Deny: {WHO}"))
    assert registry.denied == []
    assert page.notice() == "Your session has ended. Please sign in again."


@pytest.mark.asyncio
async def test_an_action_on_the_page_keeps_its_session_alive(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = IdleClock()
    registry = FakeRegistry([SHOP_REQUEST], [])
    page, logouts, went = idle_page(registry, monkeypatch, clock, 1800)
    await page.build()
    clock.now += 1700
    await page.press(page.button("Refresh the pending requests"))
    clock.now += 1700  # 3400 s since sign-in, 1700 since the person's last action
    await page.poll()
    assert page.store.get(page.cookie_id) is not None and went == []
    await page.press(page.button(f"Deny: {WHO}"))
    assert registry.denied == ["grq_shop"] and logouts == []


@pytest.mark.asyncio
async def test_a_page_load_keeps_its_session_alive(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = IdleClock()
    page, _logouts, _went = idle_page(FakeRegistry([], []), monkeypatch, clock, 1800)
    loaded = {"type": "http", "method": "GET", "path": "/grants", "root_path": "", "headers": []}
    loaded |= {"query_string": b"", "state": {"agentauth_cookie_id": page.cookie_id}}
    clock.now += 1700
    assert page.pages._guard(Request(loaded)) == (page.cookie_id, page.store.get(page.cookie_id))
    clock.now += 1700
    assert page.store.get(page.cookie_id) is not None
    clock.now += 100
    assert page.store.get(page.cookie_id) is None


@pytest.mark.asyncio
async def test_a_passkey_prompt_longer_than_the_idle_period_is_no_idleness(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The person is at the authenticator: their approval must not fail for idleness."""
    clock = IdleClock()
    registry = FakeRegistry([SHOP_REQUEST], [])
    page, logouts, _went = idle_page(registry, monkeypatch, clock, 60)
    await page.build()
    monkeypatch.delattr(page.pages, "_ceremony")  # the real prompt, over a slow stub browser

    async def slow_person(code: str, timeout: float) -> dict[str, Any]:
        clock.now += 150
        return {"credential": {"id": "credential"}}

    monkeypatch.setattr(ui, "run_javascript", slow_person)
    await page.press(page.button(f"Approve with passkey: {WHO}"))
    assert registry.requests == []  # approval_finish ran: the session was not idle
    assert page.store.get(page.cookie_id) is not None and logouts == []


@pytest.mark.asyncio
async def test_a_session_idle_where_nothing_looks_at_it_is_ended_at_the_registry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A closed tab, or a page that does not poll (here the passkeys page): nothing looked
    at the session again, so its registry session lived on, for all of its 12 h, until the
    person came back or someone else signed in and then loaded a page. The app's sweep
    (every minute) ends it, once."""
    clock = IdleClock()
    registry = FakeRegistry([], [])
    page, logouts, _went = idle_page(registry, monkeypatch, clock, 1800)
    await page.build_passkeys()
    clock.now += 1799
    page.pages.end_idle_sessions()
    await asyncio.sleep(0)
    assert logouts == []
    clock.now += 1
    page.pages.end_idle_sessions()
    await asyncio.sleep(0)
    assert logouts == ["tok"]
    page.pages.end_idle_sessions()
    await asyncio.sleep(0)
    assert logouts == ["tok"] and page.store.get(page.cookie_id) is None


@pytest.mark.asyncio
async def test_a_request_whose_access_has_already_ended_can_only_be_denied(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The registry refuses to approve a grant that would have expired already; the page
    offered Approve all the same, which could only fail."""
    ended = {**SHOP_REQUEST, "envelope": {**SHOP_REQUEST["envelope"], "expires_at": 1_000_000}}
    registry = FakeRegistry([ended], [])
    requests = RequestsPage(registry, monkeypatch)
    await requests.build()
    labels = [str(b.props.get("aria-label")) for b in requests.buttons()]
    assert f"Deny: {WHO}" in labels
    assert not any(label.startswith(("Approve", "Tighten")) for label in labels), labels
    assert any("can no longer be approved" in text for text in requests.texts())
    await requests.press(requests.button(f"Deny: {WHO}"))
    assert registry.denied == ["grq_shop"]


# --- the active grants page ------------------------------------------------------------------


def grant_row(grant_id: str, *, revoked: bool = False) -> dict[str, Any]:
    grant = Grant(
        grant_id=grant_id,
        agent_id="agt_1",
        principal_id="hum_1",
        provider_id="shop",
        audience="https://shop.example",
        capabilities=parse_capabilities(SHOP_REQUEST["capabilities"]),
        envelope=Envelope.model_validate(SHOP_REQUEST["envelope"]),
        created_at=int(time.time()),
    )
    return {
        "id": grant_id,
        "agent_id": "agt_1",
        "document": grant.document(),
        "grant_hash": f"hash-{grant_id}",
        "receipt": {},
        "receipt_hash": "-",
        "revoked_at": "2026-01-02T00:00:00+00:00" if revoked else None,
        "created_at": "2026-01-01T00:00:00+00:00",
        "provider_suspended": False,
    }


class GrantsRegistry(FakeRegistry):
    """The calls the active grants page makes, too."""

    def __init__(self, grants: list[dict[str, Any]]) -> None:
        super().__init__([], [])
        self.listed_grants = grants
        self.revoked: list[tuple[str, str]] = []

    async def grants(self, token: str) -> list[dict[str, Any]]:
        return list(self.listed_grants)

    async def agents(self, token: str) -> list[dict[str, Any]]:
        return [{"id": "agt_1", "name": "Shopping bot", "status": "active"}]

    async def usage(self, token: str, grant_id: str) -> dict[str, Any]:
        return {"rate": [], "spend": [], "series": []}

    async def grant_tokens(self, token: str, grant_id: str) -> list[tuple[str, int]]:
        return []

    async def revoke(self, token: str, kind: str, target: str) -> dict[str, Any]:
        self.revoked.append((kind, target))
        return {}


async def build_grants(page: RequestsPage) -> None:
    with page.client:
        session = page.store.get(page.cookie_id)
        assert session is not None
        await page.pages._grants(page.cookie_id, session)


@pytest.mark.asyncio
async def test_revoking_one_of_two_alike_grants_names_the_one_it_revokes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two grants of one agent to one provider drew the same card title, the same button
    name and the same question ("Revoke the grant Shopping bot → shop?"): nothing said
    which of them the answer would end."""
    registry = GrantsRegistry([grant_row("grt_first"), grant_row("grt_second")])
    page = RequestsPage(registry, monkeypatch)
    await build_grants(page)
    pressing = asyncio.ensure_future(
        page.press(page.button("Revoke grant: Shopping bot → shop (grant grt_second)"))
    )
    while not any(isinstance(e, ui.dialog) for e in page.elements()):
        await asyncio.sleep(0.01)
    assert "Revoke the grant Shopping bot → shop (grant grt_second)?" in page.texts()
    await page.press(page.button("Yes, revoke the grant Shopping bot → shop (grant grt_second)"))
    await pressing
    assert registry.revoked == [("grant", "grt_second")]
    assert page.notice() == "Revoked the grant Shopping bot → shop (grant grt_second)."


@pytest.mark.asyncio
async def test_a_revocation_stands_when_the_page_cannot_be_drawn_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The grant was revoked, then listing the grants anew failed: the notice said only
    that the registry failed to answer, under the card still drawn as active, as if the
    revocation had not happened."""
    registry = GrantsRegistry([grant_row("grt_first")])
    page = RequestsPage(registry, monkeypatch)
    await build_grants(page)

    async def unlisted(token: str, grant_id: str) -> list[tuple[str, int]]:
        raise RegistryError(503, "unavailable", "try later", None)

    pressing = asyncio.ensure_future(
        page.press(page.button("Revoke grant: Shopping bot → shop (grant grt_first)"))
    )
    while not any(isinstance(e, ui.dialog) for e in page.elements()):
        await asyncio.sleep(0.01)
    monkeypatch.setattr(registry, "grant_tokens", unlisted)
    await page.press(page.button("Yes, revoke the grant Shopping bot → shop (grant grt_first)"))
    await pressing
    assert registry.revoked == [("grant", "grt_first")]
    assert page.notice().startswith(
        "Revoked the grant Shopping bot → shop (grant grt_first).\n"
        "The page could not be drawn again, so what it shows may be out of date: "
        "The registry failed to answer."
    )


@pytest.mark.asyncio
async def test_an_approval_is_not_said_unsigned_when_the_page_cannot_be_drawn_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The passkey signed and the registry approved; then the registry could not be
    reached to list the requests anew, and the notice said only that, over the card still
    offering Approve, as if nothing had been approved."""
    registry = FakeRegistry([dict(SHOP_REQUEST)], [])
    requests = RequestsPage(registry, monkeypatch)
    await requests.build()

    async def unreachable(token: str) -> list[dict[str, Any]]:
        raise RegistryError(0, "unreachable", "connection refused", None)

    monkeypatch.setattr(registry, "agents", unreachable)
    await requests.press(requests.button("Approve with passkey: Shopping bot asks Shop"))
    assert registry.requests == []  # approved
    notice = requests.notice()
    assert notice.startswith("Approved: Shopping bot asks Shop.\nGrant grt_1, hash -.\n")
    assert (
        "The page could not be drawn again, so what it shows may be out of date: The "
        "registry cannot be reached right now." in notice
    )


class ReceiptRegistry(FakeRegistry):
    """Stores, as the receipt of an approval, an assertion over the grant it offered: the
    one the browser handed over, or (``forge``) one it made with a key of its own."""

    def __init__(self, *, forge: bool) -> None:
        super().__init__([dict(SHOP_REQUEST)], [])
        self.forge = forge
        self.offered: dict[str, Any] = {}

    async def approval_begin(
        self, token: str, request_id: str, narrowed: dict[str, Any] | None
    ) -> dict[str, Any]:
        self.offered = await super().approval_begin(token, request_id, narrowed)
        return self.offered

    async def approval_finish(
        self, token: str, request_id: str, credential: dict[str, Any]
    ) -> dict[str, Any]:
        await super().approval_finish(token, request_id, credential)
        signer, assertion = PERSON, credential
        if self.forge:
            # A passkey of the registry's own, under the person's credential id.
            signer = SoftAuthenticator()
            signer.create(PASSKEY_OPTIONS, credential_id=b"person's passkey")
            assertion = signer.get(self.offered["options"])
        passkey = next(iter(signer.passkeys.values()))
        response = assertion["response"]
        receipt = {
            "credential_id": assertion["rawId"],
            "authenticator_data": response["authenticatorData"],
            "client_data_json": response["clientDataJSON"],
            "signature": response["signature"],
            "credential_public_key": b64url_encode(passkey.cose()),
        }
        grant = self.offered["grant"]
        return {"id": "grt_1", "grant_hash": "-", "document": grant, "receipt": receipt}


PASSKEY_OPTIONS = {"rp": {"id": "localhost"}, "user": {"id": "aHVtXzE"}, "challenge": "AAAA"}
PERSON = SoftAuthenticator()
PERSON.create(PASSKEY_OPTIONS, credential_id=b"person's passkey")


@pytest.mark.asyncio
@pytest.mark.parametrize("forge", [False, True])
async def test_a_receipt_is_said_to_be_the_passkeys_only_if_it_is_the_browsers_assertion(
    monkeypatch: pytest.MonkeyPatch, forge: bool
) -> None:
    """The page said "your passkey signed this exact grant" of any receipt that verified
    with the key it carries: a registry that signed the grant's hash with a key of its own
    was vouched for as the person's passkey."""
    registry = ReceiptRegistry(forge=forge)
    requests = RequestsPage(registry, monkeypatch)

    async def passkey(kind: str, options: dict[str, Any]) -> dict[str, Any]:
        return PERSON.get(options)

    monkeypatch.setattr(requests.pages, "_ceremony", passkey)
    await requests.build()
    await requests.press(requests.button("Approve with passkey: Shopping bot asks Shop"))
    check = requests.notice().split("\n")[2]
    if forge:
        assert check == "Warning: the stored receipt is not the assertion your passkey just made."
    else:
        assert check == (
            "Receipt verified offline: your passkey signed this exact grant (user verified)."
        )


@pytest.mark.asyncio
async def test_a_receipt_is_not_handed_out_after_the_session_ended(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry = GrantsRegistry([grant_row("grt_first")])
    page = RequestsPage(registry, monkeypatch)
    await build_grants(page)
    downloads: list[str] = []
    monkeypatch.setattr(ui.download, "content", lambda text, *_a, **_k: downloads.append(text))
    page.store.sign_out(page.cookie_id)  # signed out from another tab
    await page.press(
        page.button("Download the approval receipt of Shopping bot → shop (grant grt_first)")
    )
    assert downloads == []
    assert page.notice() == "Your session has ended. Please sign in again."


@pytest.mark.asyncio
async def test_an_ended_grant_the_page_cannot_describe_does_not_take_the_page_down(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    odd = {**grant_row("grt_odd", revoked=True), "document": {"envelope": None}}
    registry = GrantsRegistry([grant_row("grt_first"), odd])
    page = RequestsPage(registry, monkeypatch)
    await build_grants(page)
    assert "Shopping bot → shop" in page.texts()
    assert any(text.startswith("grt_odd · Shopping bot → ") for text in page.texts())


# --- the passkeys page: no prompt for a session that has ended ---------------------------------


@pytest.mark.asyncio
async def test_a_new_passkey_is_not_created_for_a_session_that_has_ended(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The session checked only after the authenticator made the passkey: one the registry
    then refused, left on the device as a passkey for nothing."""
    registry = FakeRegistry([], [])

    async def confirm(token: str, credential_id: str | None = None) -> dict[str, Any]:
        return {"challenge": "confirm"}

    async def begin(token: str, confirmation: dict[str, Any]) -> dict[str, Any]:
        return {"challenge": "create"}

    monkeypatch.setattr(registry, "passkey_confirm", confirm, raising=False)
    monkeypatch.setattr(registry, "passkey_begin", begin, raising=False)
    page = RequestsPage(registry, monkeypatch)
    await page.build_passkeys()
    await page.press(page.button("Add a passkey"))
    assert page.ceremonies == 1
    page.store.sign_out(page.cookie_id)
    await page.press(page.button("Create the new passkey"))
    assert page.ceremonies == 1
    assert page.notice() == "Your session has ended. Please sign in again."


@pytest.mark.asyncio
async def test_a_double_click_on_a_passkey_change_asks_for_one_prompt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both clicks of a double click on Remove asked the registry for a challenge and ran a
    prompt: the browser refused the second, and the page said "Nothing was signed" while
    the first prompt, still up, went on to remove the passkey."""
    registry = FakeRegistry([], [])
    registry.listed_passkeys = [{"credential_id": "cred-one"}, {"credential_id": "cred-two"}]
    asked: list[str | None] = []
    removed: list[str] = []

    async def confirm(token: str, credential_id: str | None = None) -> dict[str, Any]:
        asked.append(credential_id)
        return {"challenge": "confirm"}

    async def remove(token: str, credential_id: str, confirmation: dict[str, Any]) -> None:
        removed.append(credential_id)

    monkeypatch.setattr(registry, "passkey_confirm", confirm, raising=False)
    monkeypatch.setattr(registry, "remove_passkey", remove, raising=False)
    page = RequestsPage(registry, monkeypatch)
    await page.build_passkeys()
    release = asyncio.Event()
    prompts: list[str] = []

    async def passkey(kind: str, options: dict[str, Any]) -> dict[str, Any]:
        prompts.append(kind)
        await release.wait()
        return {"id": "credential"}

    monkeypatch.setattr(page.pages, "_ceremony", passkey)
    button = page.button("Remove passkey 2 (cred-two)")
    first = asyncio.ensure_future(page.press(button))
    while not prompts:
        await asyncio.sleep(0.01)
    second = asyncio.ensure_future(page.press(button))  # on its way before the first ends
    other = asyncio.ensure_future(page.press(page.button("Add a passkey")))
    await asyncio.sleep(0.05)
    assert page.notice() == "Confirm removing passkey 2 with a passkey…"
    release.set()
    await asyncio.gather(first, second, other)
    assert (asked, prompts, removed) == (["cred-two"], ["get"], ["cred-two"])


@pytest.mark.asyncio
async def test_the_sign_in_page_runs_one_passkey_prompt_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each button there turned only itself off: a second click on its way, Enter in the
    name field, or another button pressed under the prompt began a second ceremony, whose
    prompt the browser refused, and the notice read as the first one's failure."""
    registry = FakeRegistry([], [])
    begun: list[str] = []

    async def begin(*args: Any, **kwargs: Any) -> dict[str, Any]:
        begun.append("begin")
        return {"challenge": "c"}

    async def finish(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise RegistryError(401, "unauthenticated", "no such passkey", None)

    for name in ("login_begin", "signup_begin", "recovery_begin"):
        monkeypatch.setattr(registry, name, begin, raising=False)
    for name in ("login_finish", "signup_finish", "recovery_finish"):
        monkeypatch.setattr(registry, name, finish, raising=False)
    page = RequestsPage(registry, monkeypatch)
    with page.client:
        page.pages._login("anonymous-cookie")
    release = asyncio.Event()
    prompts: list[str] = []

    async def passkey(kind: str, options: dict[str, Any]) -> dict[str, Any]:
        prompts.append(kind)
        await release.wait()
        return {"id": "credential"}

    monkeypatch.setattr(page.pages, "_ceremony", passkey)
    for element in page.elements():
        if isinstance(element, ui.input):
            element.value = "Alice" if element.props.get("label") == "Your name" else "rc_1"
    sign_in = page.button("Sign in with a passkey")
    first = asyncio.ensure_future(page.press(sign_in))
    while not prompts:
        await asyncio.sleep(0.01)
    others = [
        asyncio.ensure_future(page.press(sign_in)),  # on its way before the first ends
        asyncio.ensure_future(page.press(page.button("Create an account with a passkey"))),
        asyncio.ensure_future(page.press(page.button("Make a new passkey with the code"))),
    ]
    await asyncio.sleep(0.05)
    release.set()
    await asyncio.gather(first, *others)
    assert (begun, prompts) == (["begin"], ["get"])
    assert sign_in.enabled


# --- the agents page ---------------------------------------------------------------------------


class AgentsRegistry(GrantsRegistry):
    def __init__(self) -> None:
        super().__init__([])
        self.disabled: list[str] = []

    async def agents(self, token: str) -> list[dict[str, Any]]:
        # Two agents may share a name; never an id.
        return [
            {"id": "agt_1", "name": "Shopping bot", "status": "active"},
            {"id": "agt_2", "name": "Shopping bot", "status": "active"},
        ]

    async def disable_agent(self, token: str, agent_id: str) -> None:
        self.disabled.append(agent_id)

    async def enrollment(self, token: str) -> dict[str, Any]:
        return {"enrollment_code": "enr_secret", "expires_in": 900}


async def build_agents(page: RequestsPage) -> None:
    with page.client:
        session = page.store.get(page.cookie_id)
        assert session is not None
        await page.pages._agents(page.cookie_id, session)


@pytest.mark.asyncio
async def test_revoking_one_of_two_agents_of_one_name_names_the_one_it_disables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry = AgentsRegistry()
    page = RequestsPage(registry, monkeypatch)
    await build_agents(page)
    links = [str(e.props.get("aria-label")) for e in page.elements() if isinstance(e, ui.link)]
    assert [label for label in links if label.startswith("Audit")] == [
        "Audit trail of agent Shopping bot (agt_1)",
        "Audit trail of agent Shopping bot (agt_2)",
    ]
    pressing = asyncio.ensure_future(page.press(page.button("Revoke agent Shopping bot (agt_2)")))
    while not any(isinstance(e, ui.dialog) for e in page.elements()):
        await asyncio.sleep(0.01)
    assert "Revoke agent Shopping bot (agt_2)?" in page.texts()
    await page.press(page.button("Yes, revoke agent Shopping bot (agt_2)"))
    await pressing
    assert registry.disabled == ["agt_2"]
    assert page.notice() == "Revoked agent Shopping bot (agt_2)."


@pytest.mark.asyncio
async def test_an_enrollment_code_leaves_the_page_when_it_expires(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry = AgentsRegistry()
    page = RequestsPage(registry, monkeypatch)
    timers: list[tuple[float, Callable[[], Any]]] = []
    monkeypatch.setattr(
        ui, "timer", lambda interval, callback, **_: timers.append((interval, callback))
    )
    await build_agents(page)
    await page.press(page.button("Create a new enrollment code for an agent"))

    def codes() -> list[str]:
        return [str(e.value) for e in page.elements() if isinstance(e, ui.input)]

    assert codes() == ["enr_secret"]
    ((interval, expired),) = timers
    assert interval == 900
    with page.client:
        expired()
    assert codes() == []
    assert any(text.startswith("The enrollment code has expired.") for text in page.texts())


@pytest.mark.asyncio
async def test_a_double_click_makes_one_enrollment_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both clicks of a double click reached the registry: two codes, the second's card
    replacing the first's, which stayed valid for its 15 minutes with nobody seeing it."""
    minted: list[str] = []
    release = asyncio.Event()

    class Slow(AgentsRegistry):
        async def enrollment(self, token: str) -> dict[str, Any]:
            minted.append(token)
            await release.wait()
            return await super().enrollment(token)

    page = RequestsPage(Slow(), monkeypatch)
    monkeypatch.setattr(ui, "timer", lambda *_a, **_k: None)
    await build_agents(page)
    button = page.button("Create a new enrollment code for an agent")
    first = asyncio.ensure_future(page.press(button))
    while not minted:
        await asyncio.sleep(0.01)
    # The second click, on its way before the button went off.
    second = asyncio.ensure_future(page.press(button))
    await asyncio.sleep(0.05)
    release.set()
    await first
    await second
    assert minted == ["tok"]
    assert button.enabled
    await page.press(button)  # a later press makes a new code, as it should
    assert minted == ["tok", "tok"]


# --- the audit page ----------------------------------------------------------------------------


class AuditRegistry(AgentsRegistry):
    async def newest_audit_events(self, token: str, agent_id: str, *, most: int) -> EventHistory:
        return EventHistory([], None)

    async def checkpoints(self, token: str) -> list[dict[str, Any]]:
        return []

    async def audit_keys(self) -> dict[str, Any]:
        return {"keys": []}


@pytest.mark.asyncio
async def test_the_audit_trail_is_not_exported_after_the_session_ended(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    page = RequestsPage(AuditRegistry(), monkeypatch)
    with page.client:
        session = page.store.get(page.cookie_id)
        assert session is not None
        await page.pages._audit(page.cookie_id, session, "agt_1")
    downloads: list[str] = []
    monkeypatch.setattr(ui.download, "content", lambda text, *_a, **_k: downloads.append(text))
    page.store.sign_out(page.cookie_id)  # signed out from another tab
    await page.press(page.button("Export the audit trail as JSON"))
    assert downloads == []
    assert page.notice() == "Your session has ended. Please sign in again."


@pytest.mark.asyncio
async def test_an_audit_address_naming_no_agent_of_the_persons_shows_no_other_trail(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``/audit?agent=`` naming an agent the person does not have (an edited address, an
    agent of another account) drew the newest agent's trail and verdict without a word,
    under an address naming the other: "verifies" read as that agent's."""
    read: list[str] = []

    class Recording(AuditRegistry):
        async def newest_audit_events(
            self, token: str, agent_id: str, *, most: int
        ) -> EventHistory:
            read.append(agent_id)
            return EventHistory([], None)

    page = RequestsPage(Recording(), monkeypatch)
    with page.client:
        session = page.store.get(page.cookie_id)
        assert session is not None
        await page.pages._audit(page.cookie_id, session, "agt_someone_elses")
    assert read == []
    assert page.notice() == (
        "You have no agent 'agt_someone_elses': no audit trail is shown. "
        "Choose one of your agents above."
    )
    assert not any("verifies" in text for text in page.texts())
    assert not [b for b in page.buttons() if "audit trail" in str(b.props.get("aria-label"))]
    # Without an agent named, the newest is shown, as before.
    again = RequestsPage(Recording(), monkeypatch)
    with again.client:
        session = again.store.get(again.cookie_id)
        assert session is not None
        await again.pages._audit(again.cookie_id, session, None)
    assert read == ["agt_2"]


@pytest.mark.asyncio
async def test_a_grant_the_registry_no_longer_reads_can_still_be_revoked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A grant approved under a resource rule refused since (one spelling of a name, as
    'a%3Ab') is 403 ``grant_unusable`` at its usage endpoint. That one refusal failed the
    whole grants page: no card, so no Revoke button for it nor for any other grant."""
    registry = FakeRegistry([], [])
    old = {
        "id": "grt_old",
        "agent_id": "agt_1",
        "revoked_at": None,
        "document": {"provider_id": "shop", "capabilities": [], "envelope": {}},
    }

    async def grants(token: str) -> list[dict[str, Any]]:
        return [old]

    async def agents(token: str) -> list[dict[str, Any]]:
        return [{"id": "agt_1", "name": "Shopping bot", "status": "active"}]

    async def usage(token: str, grant_id: str) -> dict[str, Any]:
        raise RegistryError(403, "forbidden", "approved in a form since refused", "grant_unusable")

    async def grant_tokens(token: str, grant_id: str) -> list[tuple[str, int]]:
        return []

    for name, fake in (
        ("grants", grants),
        ("agents", agents),
        ("usage", usage),
        ("grant_tokens", grant_tokens),
    ):
        monkeypatch.setattr(registry, name, fake, raising=False)
    page = RequestsPage(registry, monkeypatch)
    with page.client:
        session = page.store.get(page.cookie_id)
        assert session is not None
        await page.pages._grants(page.cookie_id, session)
    assert page.button("Revoke grant: grant grt_old of agent agt_1") is not None


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "tokens",
    [
        {"tokens": []},
        ["tok_1"],
        [{"expires_at": 2_000_000_000}],
        [{"jti": "tok_1"}],
        [{"jti": "tok_1", "expires_at": "soon"}],
    ],
)
async def test_a_token_list_of_the_wrong_shape_is_said_in_the_notice(
    tokens: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A grant's token list that was no list of {jti, expires_at} raised a KeyError or
    TypeError while the grants page was built, outside any card's boundary."""
    grant = {
        "id": "grt_1",
        "agent_id": "agt_1",
        "revoked_at": None,
        "document": {"provider_id": "shop", "capabilities": [], "envelope": {}},
    }
    answers: dict[str, Any] = {
        "/v1/grants": [grant],
        "/v1/agents": [{"id": "agt_1", "name": "Shopping bot", "status": "active"}],
        "/v1/grants/grt_1/usage": {"rate": [], "spend": [], "series": []},
        "/v1/grants/grt_1/tokens": tokens,
    }

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=answers.get(request.url.path, []))

    registry = RegistryClient("http://registry.invalid", transport=httpx.MockTransport(answer))
    page = RequestsPage(cast(FakeRegistry, registry), monkeypatch)
    await build_grants(page)
    assert "[502 invalid_response]" in page.notice()
    await registry.aclose()


# --- what an agent names cannot push the page's own words off the screen --------------------


def _wraps_anywhere(element: Element) -> bool:
    """Does ``element`` inherit ``overflow-wrap: anywhere`` (CSS inherits it)?"""
    while True:
        if "[overflow-wrap:anywhere]" in element.classes:
            return True
        slot = element.parent_slot
        if slot is None:
            return False
        element = slot.parent


@pytest.mark.asyncio
async def test_a_long_unbroken_name_wraps_instead_of_pushing_the_limits_off_screen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A resource (or payee) of hundreds of characters without a space widened its card's
    grid column past the screen, and the limits drawn in that column with it: in Chromium
    at 1280 px, "at most $9,000 a day" began at x=1280, out of sight (checked by hand)."""
    long = "payments/" + "a" * 480
    request = request_with(
        capabilities=[{"kind": "transact", "resource": long, "max_amount": "50", "currency": "USD"}]
    )
    step = {**STEP_UP, "document": {**STEP_UP["document"], "resource": long, "payee": "p" * 120}}
    requests = RequestsPage(FakeRegistry([request], [step]), monkeypatch)
    await requests.build()
    showing = [
        e
        for e in requests.elements()
        if isinstance(e, TextElement) and (long in e.text or "p" * 120 in e.text)
    ]
    assert len(showing) >= 4  # the capability, the payment's heading, payee and resource
    assert all(_wraps_anywhere(e) for e in showing), [e.tag for e in showing]
    # The tighten form's checkboxes name the capability too.
    await requests.press(requests.button(f"Tighten the limits before approving: {WHO}"))
    boxes = [e for e in requests.elements() if isinstance(e, ui.checkbox)]
    assert boxes and all(_wraps_anywhere(b) for b in boxes)


# --- a registry answer of the wrong shape is a failure said, not a page that fails ---------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "listing", [{"requests": []}, "grq_1", ["grq_1"], [{"agent_id": "agt_1"}], [{"id": 7}]]
)
async def test_a_listing_of_the_wrong_shape_is_said_in_the_notice(
    listing: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pending-requests answer that was no list of objects with ids raised a TypeError
    or KeyError while the page was built: NiceGUI's 500 page, naming the exception,
    instead of the requests page saying the registry failed."""

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/grant-requests":
            return httpx.Response(200, json=listing)
        return httpx.Response(200, json=[])

    registry = RegistryClient("http://registry.invalid", transport=httpx.MockTransport(answer))
    requests = RequestsPage(cast(FakeRegistry, registry), monkeypatch)
    await requests.build()
    assert "[502 invalid_response]" in requests.notice()
    await requests.poll()  # and a poll neither fails nor draws anything
    await registry.aclose()


@pytest.mark.asyncio
async def test_a_link_to_the_next_page_that_is_no_url_is_said_in_the_notice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """httpx.URL raises InvalidURL (no HTTPError) on a ``Link`` target such as ``::::``:
    the requests page failed as it was built, NiceGUI's error page, and so did each poll."""

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/grant-requests":
            link = {"Link": '<::::?cursor=1>; rel="next"'}
            return httpx.Response(200, json=[SHOP_REQUEST], headers=link)
        return httpx.Response(200, json=[])

    registry = RegistryClient("http://registry.invalid", transport=httpx.MockTransport(answer))
    requests = RequestsPage(cast(FakeRegistry, registry), monkeypatch)
    await requests.build()
    assert "[502 invalid_response]" in requests.notice()
    await requests.poll()
    await registry.aclose()


# --- a registry can neither hold a call past its timeout nor fill the page's memory ---------


@pytest.mark.asyncio
async def test_a_registry_that_drips_its_answer_is_cut_off_at_the_timeout() -> None:
    """httpx's timeout bounds each read, not the call: a registry sending its answer a
    byte every 0.2 s held a call with a 0.5 s timeout for 8 s, as long as its body lasted
    (a page being built, or every card's buttons while an approval runs, with it)."""
    handlers: list[asyncio.Task[None]] = []

    async def drip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.append(cast(asyncio.Task[None], asyncio.current_task()))
        await reader.readuntil(b"\r\n\r\n")
        body = b"[" + b" " * 38 + b"]"
        head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
        writer.write(head.encode() + b"\r\n\r\n")
        try:
            for byte in body:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.2)
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(drip, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    registry = RegistryClient(f"http://127.0.0.1:{port}", timeout=0.5)
    started = time.monotonic()
    try:
        with pytest.raises(RegistryError) as refused:
            await registry.agents("tok")
        took = time.monotonic() - started
    finally:
        await registry.aclose()
        for handler in handlers:
            handler.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        server.close()
        await server.wait_closed()
    assert (refused.value.status, refused.value.error) == (0, "unreachable")
    assert took < 2.0


@pytest.mark.asyncio
@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
async def test_an_answer_past_the_bound_is_refused_before_it_is_read_whole(
    declared: bool,
) -> None:
    """An answer of any size was read into the page server's memory whole (and once more
    as JSON): a registry could exhaust the memory every person's page shares."""
    chunk, chunks = 1024 * 1024, 80  # 80 MiB of a valid JSON list, past the 64 MiB bound
    sent: list[int] = []

    async def body() -> Any:
        yield b"["
        for i in range(chunks):
            sent.append(i)
            yield b'"' + b"x" * (chunk - 3) + (b'",' if i < chunks - 1 else b'"')
        yield b"]"

    def answer(request: httpx.Request) -> httpx.Response:
        headers = {"Content-Type": "application/json"}
        if declared:
            headers["Content-Length"] = str(2 + chunk * chunks - 1)
        return httpx.Response(200, headers=headers, content=body())

    registry = RegistryClient("http://registry.invalid", transport=httpx.MockTransport(answer))
    try:
        with pytest.raises(RegistryError) as refused:
            await registry.call("GET", "/v1/audit/checkpoints", token="tok")
    finally:
        await registry.aclose()
    assert refused.value.code == "502 invalid_response"
    assert len(sent) <= 65


@pytest.mark.asyncio
@pytest.mark.parametrize("status", [200, 400])
async def test_an_answer_nested_past_pythons_stack_is_a_registry_failure(status: int) -> None:
    """json.loads raises RecursionError, no ValueError, on "[[[[…": it escaped the client
    as an exception no page expects (NiceGUI's 500 page, naming it, while a page was
    built), instead of the registry's failure said in the notice."""
    nested = b"[" * 100_000 + b"]" * 100_000

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=nested)

    registry = RegistryClient("http://registry.invalid", transport=httpx.MockTransport(answer))
    try:
        with pytest.raises(RegistryError) as refused:
            await registry.agents("tok")
    finally:
        await registry.aclose()
    assert refused.value.status == (502 if status == 200 else 400)


_PASSKEYS_WRONG = [{"passkeys": []}, ["cred_1"], [{"id": "cred_1"}], [{"credential_id": 7}]]
_AGENTS_WRONG = [[{"id": "agt_1"}], [{"id": "agt_1", "name": None}]]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("build", "path", "listing"),
    [("_passkeys", "/v1/passkeys", listing) for listing in _PASSKEYS_WRONG]
    + [
        (build, "/v1/agents", listing)
        for build in ("_agents", "_audit")
        for listing in _AGENTS_WRONG
    ],
)
async def test_a_passkey_or_agent_listing_of_the_wrong_shape_is_said_in_the_notice(
    build: str, path: str, listing: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The passkey listing went unchecked, and agents were checked for their ids only, not
    the names the agents and audit pages draw: a TypeError or KeyError while the page was
    built, NiceGUI's 500 page naming it ("KeyError: 'name'"), not the registry's failure."""
    answers = {"/v1/passkeys": [], "/v1/agents": [{"id": "agt_1", "name": "Shopping bot"}]}
    answers[path] = listing

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=answers.get(request.url.path, []))

    registry = RegistryClient("http://registry.invalid", transport=httpx.MockTransport(answer))
    page = RequestsPage(cast(FakeRegistry, registry), monkeypatch)
    try:
        with page.client:
            session = page.store.get(page.cookie_id)
            assert session is not None
            arguments = (None,) if build == "_audit" else ()
            await getattr(page.pages, build)(page.cookie_id, session, *arguments)
    finally:
        await registry.aclose()
    assert "[502 invalid_response]" in page.notice()


@pytest.mark.asyncio
async def test_a_card_that_cannot_be_drawn_is_logged_once_a_period_not_at_every_draw(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Every visit draws the cards again, and what an agent stored decides which card
    fails: each draw logged its traceback again."""
    unreadable = request_with(id="grq_bad", envelope={"expires_at": 10**12})
    registry = FakeRegistry([SHOP_REQUEST, unreadable], [STEP_UP])
    monkeypatch.setattr(pages_module, "_SAID", Throttle(30.0), raising=False)  # said before
    with caplog.at_level(logging.ERROR, logger="agentauth.ui"):
        for _ in range(5):  # five visits
            requests = RequestsPage(registry, monkeypatch)
            await requests.build()
            assert "A request this page cannot show" in requests.texts()
    drawn = [r for r in caplog.records if r.getMessage() == "a card could not be drawn"]
    assert len(drawn) == 1 and drawn[0].exc_info is not None
