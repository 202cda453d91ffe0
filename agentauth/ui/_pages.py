"""The pages: sign-in, pending requests and step-ups, active grants, audit, agents, passkeys.

Each page checks the session from its cookie before drawing anything; each action checks it
again (the socket carrying the action must present the same cookie) and talks to the
registry with the human's token, which stays in this process. Passkey ceremonies run in
the browser through ``window.agentauth`` (see ``_webauthn_js``). Before a passkey signs,
the page re-derives the challenge from the document the registry offered and compares that
document with what the human was shown: the passkey signs only what is on the screen.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from functools import partial
from typing import Any, TypeVar
from urllib.parse import quote

from fastapi import Request
from fastapi.responses import RedirectResponse, Response
from nicegui import ui
from nicegui.elements.mixins.text_element import TextElement
from pydantic import ValidationError
from starlette.datastructures import Headers

from .._logs import Throttle, raised_at
from ..protocol import (
    AgentAuthError,
    ApprovalReceipt,
    Envelope,
    Grant,
    amount_fits,
    b64url_decode,
    canonical_json,
    minor_unit,
    parse_capabilities,
    verify_receipt,
)
from ._audit import AuditTrail
from ._registry import RegistryClient, RegistryError
from ._security import Session, SessionStore, cookie_name, read_cookie
from ._settings import UISettings
from ._webauthn_js import WEBAUTHN_JS
from ._wording import (
    action_noun,
    describe_backup,
    describe_capabilities,
    describe_capability,
    describe_envelope,
    describe_step_up,
    money,
    per_window,
    spend_period,
    when,
)

__all__ = ["Pages"]

log = logging.getLogger("agentauth.ui")
_SAID = Throttle(30.0)

E = TypeVar("E", bound=ui.element)

NAV = (
    ("/", "Requests"),
    ("/grants", "Active grants"),
    ("/audit", "Audit"),
    ("/agents", "Agents"),
    ("/passkeys", "Passkeys"),
)


class SignedOut(Exception):
    """The session behind this page is gone (signed out, expired, or another browser)."""


class CeremonyError(Exception):
    """The browser's passkey ceremony did not produce a credential."""


class Mismatch(Exception):
    """What the registry offered to sign is not what the human was shown."""


def heading(text: str, level: int = 1) -> TextElement:
    sizes = {1: "text-2xl font-semibold", 2: "text-xl font-semibold", 3: "text-lg font-medium"}
    return TextElement(tag=f"h{level}", text=text).classes(sizes.get(level, ""))


def labelled(element: E, label: str) -> E:
    """Give an element an accessible name (buttons with icons, regions, charts)."""
    element.props["aria-label"] = label
    return element


def _stamp(value: str | None) -> str:
    if not value:
        return "—"
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return value
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M} UTC"


def _short(identifier: str, keep: int = 12) -> str:
    return identifier if len(identifier) <= keep + 1 else identifier[:keep] + "…"


def _decimal(text: str) -> Decimal:
    try:
        return Decimal(text)
    except InvalidOperation:
        return Decimal(0)


class Notice:
    """A live region for the outcome of an action: read out by screen readers.

    It is in the page from the start (empty, so it takes no room): screen readers announce
    changes to live regions they already know, not to ones that appear with their text.
    """

    def __init__(self) -> None:
        self.label = ui.label("")
        self.label.props["role"] = "status"
        self.label.props["aria-live"] = "polite"

    def _show(self, text: str, classes: str) -> None:
        self.label.text = text
        self.label.classes(
            replace=f"rounded p-3 whitespace-pre-line {classes}",
        )

    def ok(self, text: str) -> None:
        self.label.props["role"] = "status"
        self._show(text, "bg-green-100 text-green-900 border border-green-700")

    def error(self, text: str, code: str | None = None) -> None:
        self.label.props["role"] = "alert"
        self._show(
            text + (f"\n[{code}]" if code else ""), "bg-red-100 text-red-900 border border-red-700"
        )

    def info(self, text: str) -> None:
        self.label.props["role"] = "status"
        self._show(text, "bg-blue-50 text-blue-900 border border-blue-700")

    def clear(self) -> None:
        self.label.text = ""
        self.label.classes(replace="")


@dataclass(frozen=True, slots=True)
class Ctx:
    """What an action on a page needs: whose page, where to report, how to redraw."""

    cookie_id: str = field(repr=False)  # the browser's session id: a bearer of the session
    notice: Notice
    reload: Callable[[], Awaitable[None]]


@dataclass(slots=True)
class Board:
    """What the requests page shows, and whether it may change by itself right now.

    A poll never moves a card that can still be answered: a card inserted or removed above
    another would slide that one's buttons under a pointer about to click, and the click
    would land on another agent's request. So a poll only greys out, in place, cards that
    are no longer waiting, and announces new ones, which the person draws with a button.
    The page redraws by itself only when nothing on it can be answered any more.
    """

    ids: frozenset[str] = frozenset()  # drawn, answerable or not
    draws: int = 0  # how many times the page was drawn: a timer tells its own draw
    gone: set[str] = field(default_factory=set)  # drawn, no longer waiting
    cards: dict[str, ui.element] = field(default_factory=dict)
    announced: int = 0  # how many new ones the last announcement counted: say each once
    in_flight: int = 0
    editors: list[ui.element] = field(default_factory=list)
    answers: list[ui.button] = field(default_factory=list)  # every card's answer buttons
    retired: set[int] = field(default_factory=set)  # ids of buttons on greyed-out cards
    # Buttons that draw the cards anew (Refresh, Show N new), kept across draws: off while
    # an answer runs, or the cards they draw would be answerable under it.
    redraws: list[ui.button] = field(default_factory=list)

    def quiet(self) -> bool:
        return self.in_flight == 0 and not any(e.visible for e in self.editors if not e.is_deleted)

    def drawn(self, ids: Iterable[str]) -> None:
        self.draws += 1
        self.ids = frozenset(ids)
        self.gone.clear()
        self.cards.clear()
        self.announced = 0
        self.editors.clear()
        self.answers.clear()
        self.retired.clear()

    def arm(self, after: float) -> None:
        """Hold this draw's answer buttons off for ``after`` seconds (see _ARMING_SECONDS)."""
        held = [b for b in self.answers if b.enabled]
        for button in held:
            button.disable()
        draw = self.draws

        def armed() -> None:
            if self.draws != draw:  # drawn again meanwhile: those buttons are gone
                return
            for button in held:
                if not button.is_deleted and button.id not in self.retired:
                    button.enable()

        asyncio.get_running_loop().call_later(after, armed)

    def retire(self, item_id: str) -> None:
        """Grey out a card that is no longer waiting, without changing its size."""
        self.gone.add(item_id)
        card = self.cards.get(item_id)
        if card is None or card.is_deleted:
            return
        card.classes("opacity-50")
        card.props["aria-disabled"] = "true"
        for element in card.descendants():
            if isinstance(element, ui.button):
                element.disable()
                self.retired.add(element.id)


class Tighten:
    """Inputs to narrow a request before approving. Only tightening is meant; the registry
    is the judge and refuses widening (403 ``widening``), which the page then shows.

    While the form is on the page, Approve signs what its preview says; closing it discards
    it (the card drops the form), so no edit outlives what the person can see.
    """

    def __init__(self, request: Mapping[str, Any]) -> None:
        self.capabilities = parse_capabilities(request["capabilities"])
        self.envelope = Envelope.model_validate(request["envelope"])
        self.document = self.envelope.model_dump(mode="json", exclude_none=True)
        # Fixed when the person enters the days, so the end the preview shows is the end
        # approved, however long they wait before pressing Approve.
        self.expires_at: int | None = None
        _, plural = action_noun(self.capabilities)
        self.keep = [ui.checkbox(describe_capability(c), value=True) for c in self.capabilities]
        if len(self.keep) == 1:
            self.keep[0].disable()  # the only capability: deny the request instead
        self.rates = [
            ui.number(
                f"Most {plural} {per_window(r.window_seconds)}",
                value=r.max_count,
                min=1,
                step=1,
                precision=0,
            )
            for r in self.envelope.rate_limits
        ]
        per_tx = self.envelope.max_per_transaction
        self.per_transaction = (
            ui.input(f"Most per transaction ({per_tx.currency})", value=_amount(per_tx.amount))
            if per_tx
            else None
        )
        self.spends = [
            ui.input(
                f"Most {('in total' if s.period == 'grant' else 'per ' + s.period)} ({s.currency})",
                value=_amount(s.amount),
            )
            for s in self.envelope.spend_limits
        ]
        step = self.envelope.step_up_threshold
        self.step_up = (
            ui.input(f"Ask me above ({step.currency})", value=_amount(step.amount))
            if step
            else None
        )
        self.days = ui.number(
            "End the grant after (days, optional)", min=1, max=_MAX_DAYS, step=1, precision=0
        )
        self.preview = ui.label("").classes("text-sm italic")
        for element in [*self.rates, *self.spends, self.per_transaction, self.step_up]:
            if element is not None:
                element.classes("w-64")
                element.on_value_change(self.update_preview)
        self.days.classes("w-64")
        self.days.on_value_change(self._days_changed)
        for box in self.keep:
            box.on_value_change(self.update_preview)
        self.update_preview()

    def _days_changed(self) -> None:
        days = self.days.value
        valid = isinstance(days, int | float) and 1 <= days <= _MAX_DAYS
        self.expires_at = int(time.time() + int(days) * 86400) if valid else None
        self.update_preview()

    def update_preview(self) -> None:
        try:
            narrowed = self.narrowed()
        except ValueError as exc:
            self.preview.text = str(exc)
            return
        if narrowed is None:
            self.preview.text = "Unchanged: you would approve exactly what was asked."
            return
        capabilities = parse_capabilities(
            narrowed.get("capabilities", [c.to_document() for c in self.capabilities])
        )
        envelope = Envelope.model_validate(narrowed.get("envelope", self.document))
        self.preview.text = "You would approve: " + describe_envelope(
            envelope, capabilities, now=time.time()
        )

    def narrowed(self) -> dict[str, Any] | None:
        """The approval/begin body, or None when nothing changed; ValueError if unreadable."""
        kept = [c for c, box in zip(self.capabilities, self.keep, strict=True) if box.value]
        if not kept:
            raise ValueError("Keep at least one capability, or deny the request instead.")
        document = json.loads(json.dumps(self.document))
        for i, number in enumerate(self.rates):
            if number.value is None or int(number.value) < 1:
                raise ValueError("Each rate limit needs a whole number of at least 1.")
            document["rate_limits"][i]["max_count"] = int(number.value)
        if self.per_transaction is not None:
            document["max_per_transaction"]["amount"] = str(self.per_transaction.value).strip()
        for i, text in enumerate(self.spends):
            document["spend_limits"][i]["amount"] = str(text.value).strip()
        if self.step_up is not None:
            document["step_up_threshold"]["amount"] = str(self.step_up.value).strip()
        if self.days.value is not None:
            if self.expires_at is None:
                raise ValueError(f"End the grant after 1 to {_MAX_DAYS:,} days, or leave it empty.")
            document["expires_at"] = self.expires_at
        try:
            envelope = Envelope.model_validate(document)
        except ValidationError:
            raise ValueError(
                "Check the values: amounts are plain decimal numbers such as 50 or 12.50."
            ) from None
        # The registry refuses these too (amount_precision); said here, as the form is filled.
        limits = [envelope.max_per_transaction, *envelope.spend_limits, envelope.step_up_threshold]
        for limit in limits:
            if limit is not None and not amount_fits(limit.amount, limit.currency):
                places = minor_unit(limit.currency)
                raise ValueError(
                    f"Check the values: {limit.currency} amounts have "
                    + ("no decimal places." if places == 0 else f"at most {places} decimal places.")
                )
        body: dict[str, Any] = {}
        if len(kept) != len(self.capabilities):
            body["capabilities"] = [c.to_document() for c in kept]
        if envelope.model_dump(mode="json", exclude_none=True) != self.document:
            body["envelope"] = envelope.model_dump(mode="json", exclude_none=True)
        return body or None


# The longest end a person can set while tightening: a century means "no end" in practice,
# and it keeps the date within what an envelope accepts.
_MAX_DAYS = 36_500


def _browser() -> str | None:
    """The address of the browser this page serves, as this server saw it (its own proxy
    rules applied: uvicorn's ``FORWARDED_ALLOW_IPS``)."""
    try:
        peer = ui.context.client.request.client
    except RuntimeError:  # a client built without a request
        return None
    return peer.host if peer is not None else None


# Lines break inside a word when nothing else fits (the CSS inherits): see Pages._frame.
_WRAP_ANYWHERE = "[overflow-wrap:anywhere]"

# NiceGUI's bound on building a page (its response_timeout): past it, it serves an error page
# of its own, in words for the page's developer ("increase response_timeout").
_PAGE_SECONDS = 20.0
# The page's own bound, short of NiceGUI's: each registry call has registry_timeout (15 s),
# but a page makes several in turn (pending requests page after page, then the agents).
_BUILD_SECONDS = 17.0

# Seconds the answer buttons of cards the page drew by itself stay off. A poll draws new
# cards where the person's pointer may be (on an empty page, or over cards all greyed out):
# a click already on its way would land on a request they have not read. (Browsers hold
# their own permission prompts' buttons off for a moment for the same reason.)
_ARMING_SECONDS = 1.0


def _amount(value: Decimal) -> str:
    return format(value.normalize(), "f")


class Pages:
    """Registers the NiceGUI pages for one settings/registry/session-store triple."""

    def __init__(
        self, *, settings: UISettings, registry: RegistryClient, store: SessionStore
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.store = store
        self.cookie = cookie_name(settings.secure_cookies)
        self._logouts: set[asyncio.Task[None]] = set()  # held until done (asyncio keeps none)

    # --- sessions ------------------------------------------------------------------------

    @staticmethod
    def _cookie_id(request: Request) -> str:
        return str(request.state.agentauth_cookie_id)

    def _session(self, cookie_id: str, *, use: bool = True) -> Session:
        """The session behind this page, checked again for every registry call.

        While the page is being built, the HTTP request that carried ``cookie_id`` is the
        caller. Afterwards calls come from actions over the socket, which must carry the
        very same cookie: a page's client id alone does not act for anyone. Each call is
        the person's use of the session (it stays alive), except with ``use=False``: the
        page's own polls, or an open page would never be idle.
        """
        client = ui.context.client
        if client.has_socket_connection:
            environ = client.environ or {}
            scope = environ.get("asgi.scope")
            if not isinstance(scope, dict):
                raise SignedOut
            if read_cookie(Headers(scope=scope), self.cookie) != cookie_id:
                raise SignedOut
        session = self.store.use(cookie_id) if use else self.store.get(cookie_id)
        self._end_idle()
        if session is None:
            raise SignedOut
        return session

    def _token(self, cookie_id: str, *, use: bool = True) -> str:
        return self._session(cookie_id, use=use).registry_token

    def _end_idle(self) -> None:
        """End at the registry, as sign-out does, the sessions the store ended for
        idleness (best effort: if the registry cannot be reached, at their expiry)."""
        for token in self.store.idle_ended():
            task = asyncio.get_running_loop().create_task(self._logout(token))
            self._logouts.add(task)
            task.add_done_callback(self._logouts.discard)

    def end_idle_sessions(self) -> None:
        """End the sessions left idle that nothing looks at again (a closed tab, a page
        that does not poll), at the registry too: the app runs this every minute."""
        self.store.sweep()
        self._end_idle()

    async def _logout(self, token: str) -> None:
        try:
            await self.registry.logout(token)
        except RegistryError as exc:
            log.warning(
                "could not end the registry session (%s); it ends at its expiry",
                exc.reason or exc.error,
            )

    @staticmethod
    def _page_cookie_id() -> str | None:
        """The cookie id of the request that built the page now running, if any."""
        try:
            request = ui.context.client.request
        except RuntimeError:  # a client built without a request
            return None
        cookie_id = getattr(request.state, "agentauth_cookie_id", None)
        return cookie_id if isinstance(cookie_id, str) else None

    async def _act(self, notice: Notice, work: Callable[[], Awaitable[None]]) -> None:
        """Run an action; turn every failure into words in ``notice``."""
        try:
            await work()
        except SignedOut:
            notice.error("Your session has ended. Please sign in again.")
            ui.navigate.to("/login")
        except RegistryError as exc:
            self._registry_failed(notice, exc)
        except CeremonyError as exc:
            notice.error(str(exc))
        except Mismatch as exc:
            notice.error(f"Not signed: {exc}")
        except Exception:  # the page's boundary: details to the server log, words to the human
            log.exception("action failed")
            notice.error("Something went wrong on this page's server. Nothing was signed.")

    async def _done(
        self, notice: Notice, outcome: str, reload: Callable[[], Awaitable[None]]
    ) -> None:
        """Say what the registry did, then draw the page anew. The action is done whatever
        the redraw meets: a registry that fails to list the page again must not read as the
        action refused (or as "Nothing was signed" after a passkey signed), nor leave the
        old cards (a revoked grant, an answered request) on screen unexplained."""
        notice.ok(outcome)
        try:
            await reload()
        except SignedOut:
            raise
        except Exception as exc:  # the action's outcome stands; the redraw's failure is said
            if isinstance(exc, RegistryError):
                why, code = exc.message, exc.code
            else:
                log.exception("redrawing the page after an action failed")
                why, code = "Something went wrong on this page's server.", None
            notice.error(
                f"{outcome}\nThe page could not be drawn again, so what it shows may be out of "
                f"date: {why} Refresh to see it as it is now.",
                code,
            )
            if isinstance(exc, RegistryError) and exc.status == 401:
                self._registry_signed_out()
                ui.navigate.to("/login")

    def _registry_signed_out(self) -> None:
        """The registry ended this page's session (a passkey removed from another device,
        its expiry): the page's own ends with it. Kept, /login would find it and send the
        person straight back to a page that cannot reach the registry, again and again."""
        cookie_id = self._page_cookie_id()
        if cookie_id is not None:
            self.store.sign_out(cookie_id)

    def _registry_failed(self, notice: Notice, exc: RegistryError) -> None:
        """An action or a page the registry refused says why; when the registry ended the
        session, the person is sent to sign in again, and the page's session ends too."""
        notice.error(exc.message, exc.code)
        if exc.status == 401:
            self._registry_signed_out()
            ui.navigate.to("/login")

    async def _ceremony(self, kind: str, options: Mapping[str, Any]) -> dict[str, Any]:
        """Run navigator.credentials.create/get in the browser with the registry's options."""
        code = f"return await window.agentauth.{kind}({json.dumps(options)})"
        # The person is busy with the prompt, however long it stays up: the session must
        # not end for idleness under them (one already ended stays so).
        cookie_id = self._page_cookie_id()
        self.store.use(cookie_id, busy_for=self.settings.ceremony_timeout)
        try:
            answer = await ui.run_javascript(code, timeout=self.settings.ceremony_timeout)
        except TimeoutError:
            raise CeremonyError("The passkey prompt timed out. Nothing was signed.") from None
        finally:
            self.store.use(cookie_id)
        if not isinstance(answer, dict):
            raise CeremonyError("The browser closed the passkey prompt. Nothing happened.")
        credential = answer.get("credential")
        if isinstance(credential, dict):
            return credential
        error = str(answer.get("error", "Error"))
        if error == "NotAllowedError":
            raise CeremonyError(
                "The passkey prompt was cancelled, timed out, or your passkey could not "
                "verify you. Nothing was signed. [NotAllowedError]"
            )
        if error == "InvalidStateError":
            raise CeremonyError("This passkey is already registered. [InvalidStateError]")
        raise CeremonyError(f"The passkey prompt failed. Nothing was signed. [{error}]")

    def _frame(self, *, active: str | None, session: Session | None, cookie_id: str) -> ui.element:
        ui.add_head_html(WEBAUTHN_JS)
        # Darker than NiceGUI's defaults: white button text keeps a 4.5:1 contrast (WCAG AA).
        ui.colors(primary="#1d4ed8", negative="#b91c1c", positive="#15803d")
        ui.query("body").classes("bg-slate-50")
        with ui.header().classes("items-center gap-4 bg-slate-800 text-white px-4 py-2"):
            ui.label(self.settings.title).classes("text-lg font-bold")
            if session is not None:
                nav = ui.element("nav").classes("flex gap-1")
                labelled(nav, "Main")
                with nav:
                    for path, text in NAV:
                        link = ui.link(text, path).classes(
                            "px-3 py-1 rounded text-white no-underline hover:bg-slate-600"
                            + (" bg-slate-600 font-semibold" if path == active else "")
                        )
                        if path == active:
                            link.props["aria-current"] = "page"
                ui.space()
                ui.label(session.display_name or _short(session.principal_id, 16)).classes(
                    "text-sm opacity-80"
                )

                async def sign_out() -> None:
                    try:
                        token = self._token(cookie_id)  # only the page's own browser signs out
                    except SignedOut:
                        pass
                    else:
                        self.store.sign_out(cookie_id)
                        # The registry's session ends too, not only this page's.
                        await self._logout(token)
                    ui.navigate.to("/login")

                labelled(
                    ui.button("Sign out", on_click=sign_out).props("flat color=white"),
                    "Sign out",
                )
        # An agent names resources and payees with up to 512 characters and no space: left
        # unbroken, one such word widens its card's grid column past the screen, and the
        # limits drawn in that column go with it (a daily cap of $9,000 starts off-screen).
        # Wrapping anywhere (inherited by everything in main) keeps every line on screen.
        main = ui.element("main").classes(
            f"w-full max-w-5xl mx-auto flex flex-col gap-4 p-2 {_WRAP_ANYWHERE}"
        )
        ui.skip_link(target=main)
        return main

    def _guard(self, request: Request) -> tuple[str, Session] | Response:
        cookie_id = self._cookie_id(request)
        session = self.store.use(cookie_id)  # a page load is the person's use
        self._end_idle()
        if session is None:
            return RedirectResponse("/login", status_code=303)
        return cookie_id, session

    # --- pages ---------------------------------------------------------------------------

    async def _built(self, build: Coroutine[Any, Any, None]) -> None:
        """Build a page within _BUILD_SECONDS, or say that the registry was too slow for it
        (what was drawn meanwhile goes; the header stays)."""
        deadline = asyncio.timeout(_BUILD_SECONDS)
        try:
            async with deadline:
                await build
        except TimeoutError:
            if not deadline.expired():  # not this bound's: the page's failure, as any other
                raise
            content = ui.context.client.content
            content.clear()
            with content:
                main = ui.element("main").classes("w-full max-w-xl mx-auto flex flex-col gap-4 p-8")
                ui.skip_link(target=main)
            with main:
                heading("This page could not be shown")
                ui.label(
                    "The registry took too long to answer. Nothing was changed. Try again in "
                    "a moment."
                ).props('role="alert"')
                ui.link("Back to your requests", "/")

    def register(self) -> None:
        timeout = _PAGE_SECONDS  # registry round trips while building; generous on a loaded host

        @ui.page("/login", title=f"Sign in · {self.settings.title}", response_timeout=timeout)
        async def login_page(request: Request) -> Response | None:
            cookie_id = self._cookie_id(request)
            if self.store.get(cookie_id) is not None:
                return RedirectResponse("/", status_code=303)
            self._login(cookie_id)
            return None

        @ui.page("/", title=f"Requests · {self.settings.title}", response_timeout=timeout)
        async def requests_page(request: Request) -> Response | None:
            guarded = self._guard(request)
            if isinstance(guarded, Response):
                return guarded
            await self._built(self._requests(*guarded))
            return None

        @ui.page(
            "/grants", title=f"Active grants · {self.settings.title}", response_timeout=timeout
        )
        async def grants_page(request: Request) -> Response | None:
            guarded = self._guard(request)
            if isinstance(guarded, Response):
                return guarded
            await self._built(self._grants(*guarded))
            return None

        @ui.page("/audit", title=f"Audit · {self.settings.title}", response_timeout=timeout)
        async def audit_page(request: Request, agent: str | None = None) -> Response | None:
            guarded = self._guard(request)
            if isinstance(guarded, Response):
                return guarded
            await self._built(self._audit(*guarded, agent))
            return None

        @ui.page("/agents", title=f"Agents · {self.settings.title}", response_timeout=timeout)
        async def agents_page(request: Request) -> Response | None:
            guarded = self._guard(request)
            if isinstance(guarded, Response):
                return guarded
            await self._built(self._agents(*guarded))
            return None

        @ui.page("/passkeys", title=f"Passkeys · {self.settings.title}", response_timeout=timeout)
        async def passkeys_page(request: Request) -> Response | None:
            guarded = self._guard(request)
            if isinstance(guarded, Response):
                return guarded
            await self._built(self._passkeys(*guarded))
            return None

    # --- sign-in -------------------------------------------------------------------------

    def _login(self, cookie_id: str) -> None:
        main = self._frame(active=None, session=None, cookie_id=cookie_id)
        with main:
            heading("Sign in")
            ui.label(
                "AgentAuth lets you decide what your AI agents may do. You sign in and "
                "approve with a passkey: no password."
            )
            notice = Notice()
            # One passkey prompt at a time on this page: each button turns only itself off,
            # and Enter in a field presses its button again, so a double click, or another
            # button pressed under a prompt, began a second ceremony, whose prompt the
            # browser refused with a notice that read as the first one's failure.
            prompting: list[bool] = []

            async def one_prompt(button: ui.button, work: Callable[[], Awaitable[None]]) -> None:
                if prompting:
                    return
                prompting.append(True)
                button.disable()
                try:
                    await self._act(notice, work)
                finally:
                    prompting.clear()
                    button.enable()

            async def adopt(principal_id: str, token: str, name: str | None) -> None:
                ticket = self.store.sign_in(
                    cookie_id, principal_id=principal_id, registry_token=token, display_name=name
                )
                answer = await ui.run_javascript(
                    f"return await window.agentauth.adopt({json.dumps(ticket)}, '/')", timeout=15
                )
                if not isinstance(answer, dict) or not answer.get("ok"):
                    raise CeremonyError("Signed in, but the browser refused the session cookie.")
                notice.ok("Signed in.")

            async def sign_in() -> None:
                async def work() -> None:
                    notice.info("Waiting for your passkey…")
                    options = await self.registry.login_begin(forwarded_for=_browser())
                    credential = await self._ceremony("get", options)
                    result = await self.registry.login_finish(credential)
                    await adopt(result["principal_id"], result["session"], None)

                await one_prompt(sign_in_button, work)

            with ui.card().classes("w-full max-w-xl"):
                heading("I have a passkey", 2)
                sign_in_button = labelled(
                    ui.button("Sign in with a passkey", on_click=sign_in, icon="key"),
                    "Sign in with a passkey",
                )

            async def sign_up() -> None:
                name = (display_name.value or "").strip()
                if not name:
                    notice.error("Enter your name first: it labels your passkey.")
                    display_name.run_method("focus")
                    return

                async def work() -> None:
                    notice.info("Creating your passkey…")
                    options = await self.registry.signup_begin(name, forwarded_for=_browser())
                    credential = await self._ceremony("create", options)
                    result = await self.registry.signup_finish(credential)
                    await adopt(result["principal_id"], result["session"], name)

                await one_prompt(sign_up_button, work)

            with ui.card().classes("w-full max-w-xl"):
                heading("I am new here", 2)
                display_name = ui.input("Your name", validation=None).classes("w-72")
                display_name.props["autocomplete"] = "name"
                display_name.on("keydown.enter", sign_up)
                sign_up_button = labelled(
                    ui.button("Create an account with a passkey", on_click=sign_up),
                    "Create an account with a passkey",
                )

            async def recover() -> None:
                code = (recovery_code.value or "").strip()
                if not code:
                    notice.error("Enter the recovery code your administrator gave you.")
                    recovery_code.run_method("focus")
                    return

                async def work() -> None:
                    notice.info("Creating your new passkey…")
                    options = await self.registry.recovery_begin(code, forwarded_for=_browser())
                    credential = await self._ceremony("create", options)
                    result = await self.registry.recovery_finish(code, credential)
                    await adopt(result["principal_id"], result["session"], None)

                await one_prompt(recover_button, work)

            with ui.card().classes("w-full max-w-xl"):
                heading("I lost my passkeys", 2)
                ui.label(
                    "Ask your administrator for a recovery code: it works once and makes a new "
                    "passkey for your account. Your old passkeys are removed and your other "
                    "sessions are signed out."
                ).classes("text-sm")
                recovery_code = ui.input("Recovery code", validation=None).classes("w-72")
                recovery_code.props["autocomplete"] = "off"
                recovery_code.on("keydown.enter", recover)
                recover_button = labelled(
                    ui.button("Make a new passkey with the code", on_click=recover),
                    "Make a new passkey with the code",
                )

    # --- requests and step-ups -----------------------------------------------------------

    async def _requests(self, cookie_id: str, session: Session) -> None:
        main = self._frame(active="/", session=session, cookie_id=cookie_id)
        with main:
            heading("Pending requests")
            notice = Notice()
            requests_box = ui.column().classes("w-full gap-4")
            heading("Payments waiting for your approval", 2)
            step_box = ui.column().classes("w-full gap-4")

        board = Board()

        async def pending_now(
            use: bool = True,
        ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
            token = self._token(cookie_id, use=use)
            requests, steps = await asyncio.gather(
                self.registry.grant_requests(token, "pending"),
                self.registry.step_ups(token, "pending"),
            )
            return requests, steps

        async def load(arm: bool = False, use: bool = True) -> None:
            pending, steps = await pending_now(use)
            agents = await self.registry.agents(self._token(cookie_id, use=use))
            names = {a["id"]: str(a.get("name", a["id"])) for a in agents}
            ctx = Ctx(cookie_id, notice, load)
            board.drawn(str(r["id"]) for r in [*pending, *steps])
            requests_box.clear()
            with requests_box:
                if not pending:
                    ui.label("No pending requests. When an agent asks for access, it shows here.")
                for request in pending:
                    board.cards[str(request["id"])] = self._isolated(
                        partial(self._request_card, ctx, board, request),
                        partial(self._unreadable_request, ctx, board, request),
                    )
            step_box.clear()
            with step_box:
                if not steps:
                    ui.label("No payments are waiting for you.")
                for step in steps:
                    board.cards[str(step["id"])] = self._isolated(
                        partial(self._step_up_card, ctx, board, step, names),
                        partial(self._unreadable_step_up, ctx, board, step),
                    )
            show_new(0)
            if arm:
                board.arm(_ARMING_SECONDS)

        def show_new(count: int) -> None:
            """The button at the foot of the page: Refresh, or Show N new (nothing below it
            moves when its words change)."""
            if count:
                many = "s" if count > 1 else ""
                refresh.text = f"Show {count} new request{many}"
                refresh.props["aria-label"] = f"Show {count} new pending request{many}"
                refresh.props(remove="outline")
            else:
                refresh.text = "Refresh"
                refresh.props["aria-label"] = "Refresh the pending requests"
                refresh.props("outline")

        async def poll() -> None:
            # Not while an approval runs or a tighten form is open: the person is busy with
            # what is on screen, and their own action redraws the page when it ends.
            if not board.quiet():
                return
            try:
                pending, steps = await pending_now(use=False)  # not the person's use
            except RegistryError as exc:
                if exc.status == 401:
                    # The registry ended the session (a passkey removed or a recovery on
                    # another device signs the others out): kept, the page went on showing
                    # the person's requests, frozen, on a screen they may have left.
                    self._registry_signed_out()
                    ui.navigate.to("/login")
                return
            except SignedOut:  # expired, idle or signed out elsewhere: off the screen
                ui.navigate.to("/login")
                return
            if not board.quiet():
                return
            waiting = {str(r["id"]) for r in [*pending, *steps]}
            for item_id in board.ids - board.gone - waiting:
                board.retire(item_id)
            arrived = waiting - board.ids
            if not board.ids - board.gone:
                # Nothing on the page can be clicked to any effect: drawing anew moves no
                # answerable card.
                if arrived or board.ids:
                    await self._act(notice, partial(load, arm=True, use=False))
                return
            if arrived and len(arrived) != board.announced:
                many = "s" if len(arrived) > 1 else ""
                ui.notify(
                    f"{len(arrived)} new request{many} waiting: press "
                    f"\u201cShow {len(arrived)} new\u201d at the foot of the page.",
                    position="top",
                )
            board.announced = len(arrived)
            show_new(len(arrived))

        async def redraw() -> None:
            if board.in_flight:  # a click that crossed the disabling on its way
                return
            await self._act(notice, load)

        with main:
            refresh = (
                labelled(
                    ui.button("Refresh", icon="refresh", on_click=redraw),
                    "Refresh the pending requests",
                )
                .props("outline")
                .classes("self-start")
            )
        board.redraws.append(refresh)

        try:
            await load()
        except RegistryError as exc:
            self._registry_failed(notice, exc)
        ui.timer(self.settings.poll_seconds, poll)

    @staticmethod
    def _isolated(draw: Callable[[], None], fallback: Callable[[], None]) -> ui.element:
        """Draw one card, or ``fallback`` in its place if its data cannot be drawn: what one
        agent sends must never keep the page from showing (and answering) everyone else's."""
        holder = ui.element("div").classes("w-full")
        try:
            with holder:
                draw()
        except (
            Exception
        ) as exc:  # a card's boundary: details to the server log, a card to the human
            # Once a period for each place a card fails: the page draws its cards again at
            # every poll and every visit, and an agent's data decides what fails.
            _SAID.log(
                log,
                ("card", type(exc), raised_at(exc)),
                "a card could not be drawn",
                level=logging.ERROR,
                exc_info=exc,
            )
            holder.clear()
            with holder:
                fallback()
        return holder

    def _unreadable_request(self, ctx: Ctx, board: Board, request: Mapping[str, Any]) -> None:
        """A request the page cannot put in words: it can only be denied."""
        request_id = str(request.get("id", "?"))
        self._unreadable(
            ctx,
            board,
            ("request", "Request", "Deny", "Denied"),
            f"request {request_id} from agent {request.get('agent_id', '?')}",
            lambda token: self.registry.deny_request(token, request_id),
        )

    def _unreadable_step_up(self, ctx: Ctx, board: Board, step: Mapping[str, Any]) -> None:
        """A payment the page cannot put in words: it can only be refused."""
        step_id = str(step.get("id", "?"))
        self._unreadable(
            ctx,
            board,
            ("payment", "Payment", "Refuse", "Refused"),
            f"payment {step_id} for grant {step.get('grant_id', '?')}",
            lambda token: self.registry.step_up_deny(token, step_id),
        )

    def _unreadable(
        self,
        ctx: Ctx,
        board: Board,
        words: tuple[str, str, str, str],
        what: str,
        answer: Callable[[str], Awaitable[Any]],
    ) -> None:
        """The card for something the page cannot show: it says so and offers only the
        refusal (``words``: the thing, capitalized, the button, the past tense)."""
        thing, title, verb, done = words
        card = ui.card().classes("w-full border border-red-700")
        card.props["role"] = "region"
        card.props["aria-label"] = f"{title} that cannot be shown: {what}"
        with card:
            heading(f"A {thing} this page cannot show", 2)
            ui.label(
                f"The {what} holds values this page cannot show in words, so it cannot be "
                f"approved here. {verb} it; the agent can ask again."
            )

            async def refuse() -> None:
                async def work() -> None:
                    await answer(self._token(ctx.cookie_id))
                    await self._done(ctx.notice, f"{done}: {what}.", ctx.reload)

                await self._busy(board, self._act(ctx.notice, work))

            board.answers.append(
                labelled(
                    ui.button(verb, on_click=refuse, color="negative").props("outline"),
                    f"{verb}: {what}",
                )
            )

    def _request_card(self, ctx: Ctx, board: Board, request: Mapping[str, Any]) -> None:
        cookie_id, notice, reload = ctx.cookie_id, ctx.notice, ctx.reload
        capabilities = parse_capabilities(request["capabilities"])
        envelope = Envelope.model_validate(request["envelope"])
        who = f"{request['agent_name']} asks {request['provider_name']}"
        card = ui.card().classes("w-full")
        card.props["role"] = "region"
        card.props["aria-label"] = f"Request: {who}"
        with card:
            heading(who, 2)
            ui.label(
                f"Agent {request['agent_id']} · provider {request['provider_id']} "
                f"({request['audience']}) · asked {_stamp(request.get('created_at'))}"
            ).classes("text-sm text-slate-600")
            # The registry refuses to approve these; the page says so instead of offering it.
            suspended = bool(request.get("provider_suspended"))
            if suspended:
                ui.label(
                    f"{request['provider_name']} is suspended by the administrator: this "
                    "request cannot be approved until it is reinstated. You can deny it."
                ).classes("text-amber-800")
            # The access it asks for would have ended already: the registry refuses to
            # approve it (no token could use it), so the page offers only the refusal.
            over = envelope.expires_at is not None and envelope.expires_at <= time.time()
            if over and envelope.expires_at is not None:
                ended = when(envelope.expires_at, envelope.timezone)
                ui.label(
                    f"The access this request asks for ended {ended}: it can no longer be "
                    "approved. You can deny it; the agent can ask again."
                ).classes("text-amber-800")
            with ui.element("dl").classes("grid grid-cols-[10rem_1fr] gap-x-4 gap-y-1"):
                TextElement(tag="dt", text="May").classes("font-medium")
                with ui.element("dd"), ui.element("ul").classes("list-disc ml-5"):
                    for capability in capabilities:
                        TextElement(tag="li", text=describe_capability(capability))
                TextElement(tag="dt", text="Limits").classes("font-medium")
                TextElement(
                    tag="dd", text=describe_envelope(envelope, capabilities, now=time.time())
                ).classes("envelope-words")
            tighten_box = ui.column().classes("w-full gap-2 border-l-4 border-amber-500 pl-4")
            tighten_box.visible = False
            board.editors.append(tighten_box)
            form: list[Tighten] = []  # the open form; Approve signs what it says

            def toggle_tighten() -> None:
                if form:
                    # Closing discards: a hidden edit would be a choice the person cannot see.
                    form.clear()
                    tighten_box.clear()
                    tighten_box.visible = False
                    tighten_button.text = "Tighten limits…"
                    tighten_button.props["aria-label"] = (
                        f"Tighten the limits before approving: {who}"
                    )
                    notice.info(
                        f"Changes discarded: Approve now signs the request as asked ({who})."
                    )
                    return
                with tighten_box:
                    heading("Tighten before approving", 3)
                    ui.label(
                        "Lower a limit or drop a capability; raising one is refused. Approve "
                        "signs what the line below says; Discard changes goes back to the "
                        "request as asked."
                    )
                    form.append(Tighten(request))
                tighten_box.visible = True
                tighten_button.text = "Discard changes"
                tighten_button.props["aria-label"] = f"Discard the tightened limits: {who}"

            async def approve() -> None:
                async def work() -> None:
                    token = self._token(cookie_id)
                    narrowed = None
                    if form:
                        try:
                            narrowed = form[0].narrowed()
                        except ValueError as exc:
                            notice.error(str(exc))
                            return
                    begun = await self.registry.approval_begin(token, request["id"], narrowed)
                    offered = self._check_offered(
                        begun, request, self._session(cookie_id).principal_id, narrowed
                    )
                    signed = describe_envelope(
                        offered.envelope, offered.capabilities, now=time.time()
                    )
                    notice.info(
                        f"Your passkey signs grant hash {offered.digest_b64()} for {who}"
                        f"{', as you tightened it' if narrowed else ', as asked'}.\n"
                        f"May: {describe_capabilities(offered.capabilities)}.\n"
                        f"Limits: {signed}.\nConfirm with your passkey…"
                    )
                    credential = await self._ceremony("get", begun["options"])
                    view = await self.registry.approval_finish(token, request["id"], credential)
                    check = self._check_receipt(view, offered, credential)
                    done = f"Approved: {who}.\nGrant {view['id']}, hash {view['grant_hash']}."
                    await self._done(notice, f"{done}\n{check}", reload)

                await self._busy(board, self._act(notice, work))

            async def deny() -> None:
                async def work() -> None:
                    token = self._token(cookie_id)
                    await self.registry.deny_request(token, request["id"])
                    await self._done(notice, f"Denied: {who}.", reload)

                await self._busy(board, self._act(notice, work))

            with ui.row().classes("gap-2"):
                if not (suspended or over):
                    board.answers.append(
                        labelled(
                            ui.button("Approve with passkey", icon="fingerprint", on_click=approve),
                            f"Approve with passkey: {who}",
                        )
                    )
                    tighten_button = labelled(
                        ui.button("Tighten limits…", on_click=toggle_tighten).props("outline"),
                        f"Tighten the limits before approving: {who}",
                    )
                    # Not while an approval runs: its notice says what the passkey signs.
                    board.answers.append(tighten_button)
                board.answers.append(
                    labelled(
                        ui.button("Deny", on_click=deny, color="negative").props("outline"),
                        f"Deny: {who}",
                    )
                )

    @staticmethod
    async def _busy(board: Board, work: Coroutine[Any, Any, None]) -> None:
        """Run one card's answer with every card's buttons disabled, not just its own: the
        page has one notice, which says what the passkey is signing, and an answer begun
        on another card meanwhile would replace it while the prompt is still up (and ask
        for a second passkey ceremony on top of the first)."""
        if board.in_flight:  # a click that crossed the disabling on its way
            work.close()
            return
        # The redraw buttons too: cards drawn while the answer runs came with their buttons
        # on, and a click on one was dropped without a word (the answer still running).
        buttons = [*board.answers, *board.redraws]
        chosen = [b for b in buttons if not b.is_deleted and b.enabled]
        for button in chosen:
            button.disable()
        board.in_flight += 1
        try:
            await work
        finally:
            board.in_flight -= 1
            for button in chosen:  # not those whose card a poll greyed out meanwhile
                if not button.is_deleted and button.id not in board.retired:
                    button.enable()

    @staticmethod
    def _check_offered(
        begun: Mapping[str, Any],
        request: Mapping[str, Any],
        principal_id: str,
        narrowed: Mapping[str, Any] | None,
    ) -> Grant:
        """The grant the registry asks us to sign must be exactly the one on screen."""
        try:
            grant = Grant.from_document(begun["grant"])
            challenge = b64url_decode(begun["options"]["challenge"])
        except (KeyError, TypeError, ValueError, AgentAuthError):
            raise Mismatch("the registry offered a malformed grant") from None
        wanted_caps = (narrowed or {}).get("capabilities", request["capabilities"])
        wanted_env = Envelope.model_validate((narrowed or {}).get("envelope", request["envelope"]))
        same = (
            grant.agent_id == request["agent_id"]
            and grant.provider_id == request["provider_id"]
            and grant.audience == request["audience"]
            and grant.principal_id == principal_id
            and [c.to_document() for c in grant.capabilities]
            == [c.to_document() for c in parse_capabilities(wanted_caps)]
            and grant.envelope == wanted_env
        )
        if not same:
            raise Mismatch("the registry's grant differs from the request shown here")
        if challenge != grant.digest():
            raise Mismatch("the challenge is not the hash of the grant shown here")
        return grant

    def _check_receipt(
        self, view: Mapping[str, Any], offered: Grant, credential: Mapping[str, Any]
    ) -> str:
        """Check the stored receipt offline, exactly as anyone holding it could, and that it
        holds the assertion the browser returned from this ceremony (``credential``)."""
        try:
            grant = Grant.from_document(view["document"])
            receipt = ApprovalReceipt.model_validate(view["receipt"])
            if grant.digest() != offered.digest():
                return "Warning: the stored grant differs from the one you signed."
            # A receipt verifies with the key it carries, and anyone can sign a grant's hash
            # with a key of their own: only the assertion the person's browser just handed
            # over is known here to be their passkey's, so the registry's copy must be it.
            response = credential["response"]
            same = (
                receipt.credential_id == (credential.get("rawId") or credential.get("id"))
                and receipt.authenticator_data == response["authenticatorData"]
                and receipt.client_data_json == response["clientDataJSON"]
                and receipt.signature == response["signature"]
            )
            if not same:
                return "Warning: the stored receipt is not the assertion your passkey just made."
            verified = verify_receipt(
                receipt,
                grant,
                rp_id=self.settings.rp_id,
                origin=self.settings.origin,
                require_uv=self.settings.require_user_verification,
            )
        except (AgentAuthError, KeyError, TypeError, ValueError, ValidationError) as exc:
            return f"Warning: the stored receipt does not verify offline ({exc})."
        uv = "verified" if verified.user_verified else "present"
        return f"Receipt verified offline: your passkey signed this exact grant (user {uv})."

    def _step_up_card(
        self, ctx: Ctx, board: Board, step: Mapping[str, Any], names: Mapping[str, str]
    ) -> None:
        cookie_id, notice, reload = ctx.cookie_id, ctx.notice, ctx.reload
        document = step["document"]
        # The card names the grant, the agent and the deadline from the registry's row, and
        # the passkey signs the document: they must be one payment, or the person approves
        # a payment on another grant than the one named here (the card falls back to Refuse).
        for key in ("id", "grant_id", "agent_id", "expires_at"):
            if document[key] != step[key]:
                raise ValueError(f"the payment's {key} is not the one its document signs")
        agent = names.get(step["agent_id"], step["agent_id"])
        what = f"{agent} asks to {describe_step_up(document)}"
        card = ui.card().classes("w-full")
        card.props["role"] = "region"
        card.props["aria-label"] = f"Payment: {what}"
        with card:
            heading(what, 2)
            with ui.element("dl").classes("grid grid-cols-[10rem_1fr] gap-x-4 gap-y-1"):
                for term, value in (
                    ("Amount", money(str(document["amount"]), str(document["currency"]))),
                    ("Payee", document.get("payee") or "not named"),
                    ("Resource", document["resource"]),
                    ("Grant", step["grant_id"]),
                    ("Answer by", when(int(step["expires_at"]))),
                ):
                    TextElement(tag="dt", text=term).classes("font-medium")
                    TextElement(tag="dd", text=str(value))
            # The registry refuses to approve it; the page says so instead of offering it.
            suspended = bool(step.get("provider_suspended"))
            if suspended:
                ui.label(
                    "The provider of this grant is suspended by the administrator: this payment "
                    "cannot be approved until it is reinstated. You can refuse it."
                ).classes("text-amber-800")

            async def approve() -> None:
                async def work() -> None:
                    token = self._token(cookie_id)
                    begun = await self.registry.step_up_begin(token, step["id"])
                    offered = begun.get("step_up")
                    challenge = b64url_decode(begun["options"]["challenge"])
                    if (
                        offered != document
                        or challenge != hashlib.sha256(canonical_json(document)).digest()
                    ):
                        raise Mismatch("the payment offered for signing differs from the one shown")
                    notice.info(f"Confirm with your passkey: {what}…")
                    credential = await self._ceremony("get", begun["options"])
                    await self.registry.step_up_finish(token, step["id"], credential)
                    await self._done(notice, f"Approved once: {what}.", reload)

                await self._busy(board, self._act(notice, work))

            async def deny() -> None:
                async def work() -> None:
                    token = self._token(cookie_id)
                    await self.registry.step_up_deny(token, step["id"])
                    await self._done(notice, f"Refused: {what}.", reload)

                await self._busy(board, self._act(notice, work))

            with ui.row().classes("gap-2"):
                if not suspended:
                    board.answers.append(
                        labelled(
                            ui.button("Approve with passkey", icon="fingerprint", on_click=approve),
                            f"Approve with passkey: {what}",
                        )
                    )
                board.answers.append(
                    labelled(
                        ui.button("Refuse", on_click=deny, color="negative").props("outline"),
                        f"Refuse: {what}",
                    )
                )

    # --- active grants -------------------------------------------------------------------

    async def _grants(self, cookie_id: str, session: Session) -> None:
        main = self._frame(active="/grants", session=session, cookie_id=cookie_id)
        with main:
            heading("Active grants")
            notice = Notice()
            box = ui.column().classes("w-full gap-4")

        async def load() -> None:
            token = self._token(cookie_id)
            grants, agents = await asyncio.gather(
                self.registry.grants(token), self.registry.agents(token)
            )
            agent_rows = {a["id"]: a for a in agents}
            now = time.time()
            live = [
                g
                for g in grants
                if g.get("revoked_at") is None
                and agent_rows.get(g.get("agent_id"), {}).get("status") == "active"
                and not _expired(g, now)
            ]

            async def usage(grant_id: str) -> dict[str, Any] | None:
                # A grant the registry reads no more (approved under a rule refused since)
                # is refused alone: its card can still revoke it, and the others still show.
                try:
                    return await self.registry.usage(token, grant_id)
                except RegistryError as exc:
                    if exc.reason != "grant_unusable":
                        raise
                    return None

            # Each grant's tokens as the registry records them. Until 2026-11-30 the page
            # worked them out from the grant's and the agent's first 5,000 audit events,
            # so a busy grant's newest tokens were missing, and tokens revoked after that
            # showed as in use.
            usages, grant_tokens = await asyncio.gather(
                asyncio.gather(*(usage(g["id"]) for g in live)),
                asyncio.gather(*(self.registry.grant_tokens(token, g["id"]) for g in live)),
            )
            box.clear()
            with box:
                if not live:
                    ui.label("No active grants. Approve a request and it shows here.")
                ctx = Ctx(cookie_id, notice, load)
                for grant, used, tokens in zip(live, usages, grant_tokens, strict=True):
                    unreadable = partial(self._unreadable_grant, ctx, grant)
                    self._isolated(
                        unreadable
                        if used is None
                        else partial(
                            self._grant_card,
                            ctx,
                            grant=grant,
                            usage=used,
                            agent=agent_rows.get(grant["agent_id"], {}),
                            tokens=tokens,
                            now=now,
                        ),
                        unreadable,
                    )
                ended = [g for g in grants if g not in live]
                if ended:
                    with ui.expansion(f"Ended grants ({len(ended)})").classes("w-full"):
                        for grant in ended:
                            # One line each, from what the row holds: an ended grant no
                            # longer allows anything, and an odd one must not fail the page.
                            document = grant.get("document") or {}
                            reason = (
                                "revoked"
                                if grant.get("revoked_at")
                                else "expired"
                                if _expired(grant, now)
                                else "agent disabled"
                            )
                            ui.label(
                                f"{grant.get('id', '?')} · "
                                f"{agent_rows.get(grant.get('agent_id'), {}).get('name', '?')} → "
                                f"{document.get('provider_id', '?')} · {reason}"
                            ).classes("text-sm")

        try:
            await load()
        except RegistryError as exc:
            self._registry_failed(notice, exc)
        with main:
            labelled(
                ui.button("Refresh", icon="refresh", on_click=lambda: self._act(notice, load)),
                "Refresh usage",
            ).props("outline").classes("self-start")

    def _unreadable_grant(self, ctx: Ctx, grant: Mapping[str, Any]) -> None:
        """A grant the page cannot put in words: it can still be revoked."""
        grant_id = str(grant.get("id", "?"))
        what = f"grant {grant_id} of agent {grant.get('agent_id', '?')}"
        card = ui.card().classes("w-full border border-red-700")
        card.props["role"] = "region"
        card.props["aria-label"] = f"Grant that cannot be shown: {what}"
        with card:
            heading("A grant this page cannot show", 2)
            ui.label(
                f"The {what} holds values this page cannot show in words. Revoke it if you "
                "are not sure what it allows."
            )

            async def revoke() -> None:
                await self._confirm_revoke(ctx, "grant", grant_id, what)

            labelled(
                ui.button("Revoke grant", on_click=revoke, color="negative"),
                f"Revoke grant: {what}",
            )

    def _grant_card(
        self,
        ctx: Ctx,
        *,
        grant: Mapping[str, Any],
        usage: Mapping[str, Any],
        agent: Mapping[str, Any],
        tokens: list[tuple[str, int]],
        now: float,
    ) -> None:
        document = grant["document"]
        parsed = Grant.from_document(document)
        agent_name = agent.get("name", grant["agent_id"])
        who = f"{agent_name} → {document['provider_id']}"
        # One agent can hold several grants to one provider: what a button or a question
        # names carries the grant's id, so that it names the one grant it acts on.
        which = f"{who} (grant {grant['id']})"
        card = ui.card().classes("w-full")
        card.props["role"] = "region"
        card.props["aria-label"] = f"Grant: {which}"
        with card:
            heading(who, 2)
            ui.label(
                f"Grant {grant['id']} · approved {_stamp(grant.get('created_at'))} · "
                f"hash {grant['grant_hash']}"
            ).classes("text-sm text-slate-600 break-all")
            if grant.get("provider_suspended"):
                ui.label(
                    f"{document['provider_id']} is suspended by the administrator: the agent "
                    "gets no tokens for this grant and no payment can be approved until it is "
                    "reinstated. The grant itself is kept."
                ).classes("text-amber-800")
            with ui.element("dl").classes("grid grid-cols-[10rem_1fr] gap-x-4 gap-y-1"):
                TextElement(tag="dt", text="May").classes("font-medium")
                TextElement(
                    tag="dd",
                    text="; ".join(describe_capability(c) for c in parsed.capabilities),
                )
                TextElement(tag="dt", text="Limits").classes("font-medium")
                TextElement(
                    tag="dd",
                    text=describe_envelope(parsed.envelope, parsed.capabilities, now=now),
                )
            with ui.row().classes("w-full gap-8 items-start flex-wrap"):
                with ui.column().classes("gap-2 min-w-72"):
                    heading("Use against the limits", 3)
                    self._usage(usage, parsed)
                with ui.column().classes("gap-1 grow"):
                    heading("Use over the last 24 hours", 3)
                    self._chart(usage, now, who)
            if tokens:
                with ui.expansion(f"Access tokens in use ({len(tokens)})").classes("w-full"):
                    for jti, exp in tokens:
                        with ui.row().classes("items-center gap-4"):
                            ui.label(f"Token {jti} · expires {when(exp)}").classes("text-sm")

                            async def revoke_token(jti: str = jti) -> None:
                                await self._confirm_revoke(ctx, "token", jti, f"token {jti}")

                            labelled(
                                ui.button("Revoke token", on_click=revoke_token).props(
                                    "outline dense color=negative"
                                ),
                                f"Revoke token {jti}",
                            )

            async def download_receipt() -> None:
                async def work() -> None:
                    self._session(ctx.cookie_id)  # a receipt is for a signed-in person only
                    payload = {
                        "format": "agentauth.approval-receipt.v1",
                        "grant": document,
                        "grant_hash": grant["grant_hash"],
                        "receipt": grant["receipt"],
                        "receipt_hash": grant["receipt_hash"],
                        "rp_id": self.settings.rp_id,
                        "origin": self.settings.origin,
                    }
                    ui.download.content(
                        json.dumps(payload, indent=2, sort_keys=True),
                        f"receipt-{grant['id']}.json",
                        "application/json",
                    )

                await self._act(ctx.notice, work)

            async def revoke_grant() -> None:
                await self._confirm_revoke(ctx, "grant", grant["id"], f"the grant {which}")

            async def disable_agent() -> None:
                await self._confirm_revoke(
                    ctx, "agent", grant["agent_id"], _agent_named(agent_name, grant["agent_id"])
                )

            with ui.row().classes("gap-2"):
                labelled(
                    ui.button("Revoke grant", on_click=revoke_grant, color="negative"),
                    f"Revoke grant: {which}",
                )
                labelled(
                    ui.button("Revoke agent", on_click=disable_agent, color="negative").props(
                        "outline"
                    ),
                    f"Revoke {_agent_named(agent_name, grant['agent_id'])} and all its grants",
                )
                labelled(
                    ui.button("Download receipt", icon="download", on_click=download_receipt).props(
                        "outline"
                    ),
                    f"Download the approval receipt of {which}",
                )
                labelled(
                    ui.link(
                        "Audit trail", f"/audit?agent={quote(grant['agent_id'], safe='')}"
                    ).classes("self-center"),
                    f"Audit trail of {_agent_named(agent_name, grant['agent_id'])}",
                )

    @staticmethod
    def _usage(usage: Mapping[str, Any], grant: Grant) -> None:
        _, plural = action_noun(grant.capabilities)
        rows = 0
        for rate in usage.get("rate", []):
            used, limit = int(rate["used"]), int(rate["max_count"])
            window = per_window(int(rate["window_seconds"]))
            last = window.replace("every ", "").removeprefix("an ").removeprefix("a ")
            text = f"{used} of {limit} {plural} in the last {last} — {max(0, limit - used)} left"
            ui.label(text).classes("usage-rate")
            bar = ui.linear_progress(min(1.0, used / limit), show_value=False).classes("w-72")
            labelled(bar, text)
            rows += 1
        for spend in usage.get("spend", []):
            used_d, cap = _decimal(str(spend["used"])), _decimal(str(spend["amount"]))
            currency = str(spend["currency"])
            text = (
                f"{money(used_d, currency)} of {money(cap, currency)} spent "
                f"{spend_period(str(spend['period']))} — "
                f"{money(max(Decimal(0), cap - used_d), currency)} left"
            )
            ui.label(text).classes("usage-spend")
            fraction = float(used_d / cap) if cap else 1.0
            labelled(
                ui.linear_progress(min(1.0, fraction), show_value=False, color="orange").classes(
                    "w-72"
                ),
                text,
            )
            rows += 1
        if not rows:
            ui.label("This grant has no rate or spend limits to count against.")

    @staticmethod
    def _chart(usage: Mapping[str, Any], now: float, who: str) -> None:
        hour_now = int(now // 3600 * 3600)
        hours = [hour_now - 3600 * i for i in range(23, -1, -1)]
        counts = {int(p["hour"]): p for p in usage.get("series", [])}
        allowed = [int(counts.get(h, {}).get("allow", 0)) for h in hours]
        denied = [int(counts.get(h, {}).get("deny", 0)) for h in hours]
        summary = (
            f"Use of {who} over the last 24 hours: {sum(allowed)} allowed, {sum(denied)} denied."
        )
        chart = ui.echart(
            {
                "aria": {"enabled": True},
                "animation": False,
                "grid": {"left": 32, "right": 8, "top": 28, "bottom": 24},
                "legend": {"data": ["allowed", "denied"], "top": 0},
                "tooltip": {"trigger": "axis"},
                "xAxis": {
                    "type": "category",
                    "data": [f"{datetime.fromtimestamp(h, tz=UTC):%H}:00" for h in hours],
                },
                "yAxis": {"type": "value", "minInterval": 1},
                "series": [
                    {
                        "name": "allowed",
                        "type": "bar",
                        "stack": "use",
                        "data": allowed,
                        "itemStyle": {"color": "#15803d"},
                    },
                    {
                        "name": "denied",
                        "type": "bar",
                        "stack": "use",
                        "data": denied,
                        "itemStyle": {"color": "#b91c1c"},
                    },
                ],
            },
            renderer="svg",
        ).classes("w-full h-48 min-w-80")
        labelled(chart, summary)
        chart.props["role"] = "img"
        ui.label(summary + " Hours in UTC.").classes("text-sm text-slate-600")

    async def _confirm_revoke(self, ctx: Ctx, kind: str, target: str, what: str) -> None:
        with ui.dialog() as dialog, ui.card():
            heading(f"Revoke {what}?", 2)
            effect = {
                "token": "This access token stops working at once.",
                "grant": "Every token of this grant stops working at once; the agent must "
                "ask again.",
                "agent": "The agent is disabled: all its grants and tokens stop working.",
            }[kind]
            ui.label(effect)
            with ui.row():
                labelled(
                    ui.button("Revoke", color="negative", on_click=lambda: dialog.submit(True)),
                    f"Yes, revoke {what}",
                )
                labelled(
                    ui.button("Cancel", on_click=lambda: dialog.submit(False)).props("outline"),
                    "Cancel",
                )
        if not await dialog:
            dialog.delete()
            return
        dialog.delete()

        async def work() -> None:
            token = self._token(ctx.cookie_id)
            if kind == "agent":
                await self.registry.disable_agent(token, target)
            else:
                await self.registry.revoke(token, kind, target)
            await self._done(ctx.notice, f"Revoked {what}.", ctx.reload)

        await self._act(ctx.notice, work)

    # --- audit ---------------------------------------------------------------------------

    async def _audit(self, cookie_id: str, session: Session, agent_id: str | None) -> None:
        main = self._frame(active="/audit", session=session, cookie_id=cookie_id)
        with main:
            heading("Audit trail")
            notice = Notice()
        try:
            agents = await self.registry.agents(session.registry_token)
        except RegistryError as exc:
            with main:
                self._registry_failed(notice, exc)
            return
        options = {a["id"]: f"{a['name']} ({a['id']})" for a in agents}
        if not agents:
            with main:
                ui.label("No agents yet: enroll one on the Agents page.")
            return
        # No agent asked for: the newest. One asked for that is none of this person's (an
        # edited address, an agent of another account) is said, and no trail is shown: the
        # newest agent's verdict, drawn under an address naming another, read as that one's.
        chosen = agents[-1]["id"] if agent_id is None else agent_id
        with main:
            ui.select(
                options,
                value=chosen if chosen in options else None,
                label="Agent",
                on_change=lambda e: ui.navigate.to(f"/audit?agent={quote(str(e.value), safe='')}"),
            ).classes("w-[32rem]")
            if chosen not in options:
                notice.error(
                    f"You have no agent {_short(chosen, 64)!r}: no audit trail is shown. "
                    "Choose one of your agents above."
                )
                return
            summary = ui.column().classes("w-full gap-1")
            table_box = ui.column().classes("w-full")
        trail_ref: list[AuditTrail] = []

        def draw() -> None:
            trail = trail_ref[0]
            summary.clear()
            with summary:
                self._audit_summary(trail)
            table_box.clear()
            with table_box:
                self._audit_table(trail, check_one)

        async def verify() -> None:
            human = self._session(cookie_id)
            seen = self.store.checkpoints_seen(human.principal_id)
            trail = await AuditTrail.fetch(
                self.registry,
                human.registry_token,
                chosen,
                prove=self.settings.max_inclusion_checks,
                most=self.settings.max_audit_events,
                seen=seen,
            )
            self.store.remember_checkpoints(human.principal_id, seen, trail.to_remember)
            trail_ref[:] = [trail]
            draw()
            failed = trail.read_error
            if failed is None:
                notice.clear()  # a failure said on an earlier try no longer holds
            elif failed.status == 401:  # the registry ended the session: sign in again
                self._registry_failed(notice, failed)
            else:  # what was read is shown and checked; say that the rest is missing
                notice.error(
                    f"Only the newest {len(trail.events):,} events could be read: reading"
                    f" older ones failed. {failed.message}",
                    failed.code,
                )

        async def check_one(chain: str, seq: int) -> None:
            async def work() -> None:
                token = self._token(cookie_id)
                trail = trail_ref[0]
                event = next(e for e in trail.events if (e.chain, e.seq) == (chain, seq))
                await trail.prove(self.registry, token, [event])
                result = trail.inclusion[(chain, seq)]
                draw()
                text = f"Event {chain}:{seq}: {result.detail}"
                if result.ok is False:
                    notice.error(text)
                else:
                    notice.ok(text)

            await self._act(notice, work)

        async def export() -> None:
            async def work() -> None:
                self._session(cookie_id)  # the trail is for a signed-in person only
                if not trail_ref:
                    return
                document = trail_ref[0].export(now=time.time())
                ui.download.content(
                    json.dumps(document, indent=2, sort_keys=True),
                    f"audit-{chosen}.json",
                    "application/json",
                )
                notice.ok(f"Exported {len(trail_ref[0].events)} events as JSON.")

            await self._act(notice, work)

        try:
            await verify()
        except RegistryError as exc:
            self._registry_failed(notice, exc)
        with main, ui.row().classes("gap-2"):
            labelled(
                ui.button(
                    "Verify again", icon="verified", on_click=lambda: self._act(notice, verify)
                ),
                "Verify the audit trail again",
            )
            labelled(
                ui.button("Export JSON", icon="download", on_click=export).props("outline"),
                "Export the audit trail as JSON",
            )

    @staticmethod
    def _audit_summary(trail: AuditTrail) -> None:
        ok, unproven = trail.ok, len(trail.unproven)
        shown = len(trail.events)
        partly = [f"{unproven} event{'s' if unproven != 1 else ''} not proven"] if unproven else []
        if trail.unread is not None:
            partly.append(f"{trail.unread} events not read")
        if not ok:
            colours, verdict = (
                "bg-red-50 border-red-700 text-red-900",
                "✗ The audit trail does not verify",
            )
        elif partly:
            colours = "bg-amber-50 border-amber-700 text-amber-900"
            verdict = f"The audit trail is only partly checked: {'; '.join(partly)}"
        else:
            colours, verdict = (
                "bg-green-50 border-green-700 text-green-900",
                "✓ The audit trail verifies",
            )
        box = ui.column().classes(f"w-full rounded p-3 gap-1 border {colours}")
        box.props["role"] = "status"
        box.props["aria-label"] = "Verification result"
        with box:
            heading(verdict, 2)
            if trail.read_error is not None:
                ui.label(
                    f"History: only the newest {shown:,} events of this agent are shown: reading"
                    " older ones from the registry failed, so they are neither shown nor"
                    " checked here. Verify again to retry."
                ).classes("audit-partial")
            elif trail.unread == "older":
                ui.label(
                    f"History: only the newest {shown:,} events of this agent are shown (the most"
                    " this page reads); it has older ones, neither shown nor checked here."
                ).classes("audit-partial")
            elif trail.unread == "newer":
                ui.label(
                    f"History: only the oldest {shown:,} events of this agent are shown: the"
                    " registry lists them oldest first only (it predates 2026-11-30), so its"
                    " newer ones are neither shown nor checked here."
                ).classes("audit-partial")
            chains = len(trail.chains)
            ui.label(
                f"Hash chain: {len(trail.events)} events in {chains} chain"
                f"{'s' if chains != 1 else ''}, all well-formed; {trail.links_checked} links "
                "between neighbouring events checked."
            ).classes("audit-chain")
            signed = [c for c in trail.chains.values() if c.checkpoint is not None]
            if signed:
                kids = sorted({c.checkpoint_kid or "?" for c in signed})
                ui.label(
                    f"Signed checkpoints: the latest checkpoint of {len(signed)} of {chains} "
                    f"chains verifies against the registry's audit key list, inside its key's"
                    f" signing window (key {', '.join(kids)})."
                ).classes("audit-checkpoint")
            else:
                ui.label("Signed checkpoints: none yet for these chains.").classes(
                    "audit-checkpoint"
                )
            ui.label(
                f"Inclusion: {trail.proven} of {len(trail.events)} events proven to be in the "
                f"signed log; {trail.awaiting_checkpoint} newer than the latest checkpoint"
                + (
                    f"; {unproven} covered by a checkpoint but not proven (beyond the proofs"
                    " one visit makes; a row's Check proves its event)."
                    if unproven
                    else "."
                )
            ).classes("audit-inclusion")
            if trail.seen:
                ui.label(
                    f"History: the latest checkpoint of {len(trail.seen)} chains checked against"
                    " the one your earlier visits verified (it must be the same, or extend it by"
                    " a consistency proof)."
                ).classes("audit-history")
            for problem in trail.all_problems[:20]:
                ui.label("✗ " + problem)

    @staticmethod
    def _audit_table(trail: AuditTrail, check_one: Callable[[str, int], Awaitable[None]]) -> None:
        table = ui.element("table").classes("w-full text-sm border-collapse")
        with table:
            TextElement(tag="caption", text="Events, newest first").classes("text-left font-medium")
            with ui.element("thead"), ui.element("tr").classes("text-left border-b"):
                for title in ("Time (UTC)", "Event", "Actor", "Subject", "Chain:seq", "In log"):
                    cell = TextElement(tag="th", text=title).classes("p-1")
                    cell.props["scope"] = "col"
            with ui.element("tbody"):
                for event in sorted(trail.events, key=lambda e: (e.time_ms, e.chain, e.seq))[::-1]:
                    with ui.element("tr").classes("border-b align-top"):
                        moment = datetime.fromtimestamp(event.time_ms / 1000, tz=UTC)
                        for text, wrap in (
                            (f"{moment:%Y-%m-%d %H:%M:%S}", "whitespace-nowrap"),
                            (event.event, "whitespace-nowrap"),
                            (event.actor, "break-all"),
                            (event.subject, "break-all"),
                            (f"{event.chain}:{event.seq}", "whitespace-nowrap"),
                        ):
                            TextElement(tag="td", text=text).classes(f"p-1 {wrap}")
                        with (
                            ui.element("td").classes("p-1"),
                            ui.row().classes("items-center gap-2 no-wrap"),
                        ):
                            result = trail.inclusion.get((event.chain, event.seq))
                            if result is not None and result.ok:
                                ui.label("✓ proven").classes("text-green-800 whitespace-nowrap")
                            elif result is not None and result.ok is False:
                                ui.label("✗ " + result.detail).classes("text-red-800")
                            elif event.seq >= trail.chains[event.chain].covered:
                                ui.label("awaiting checkpoint").classes(
                                    "text-slate-600 whitespace-nowrap"
                                )
                            else:  # covered, past the visit's proofs: say so, claim nothing
                                ui.label("not proven").classes("text-amber-800 whitespace-nowrap")

                            async def check(chain: str = event.chain, seq: int = event.seq) -> None:
                                await check_one(chain, seq)

                            labelled(
                                ui.button("Check", on_click=check).props("flat dense"),
                                f"Check inclusion of event {event.chain}:{event.seq} "
                                f"({event.event})",
                            )

    # --- agents --------------------------------------------------------------------------

    async def _agents(self, cookie_id: str, session: Session) -> None:
        main = self._frame(active="/agents", session=session, cookie_id=cookie_id)
        with main:
            heading("Agents")
            notice = Notice()
            code_box = ui.column().classes("w-full")
            box = ui.column().classes("w-full gap-2")

        async def load() -> None:
            token = self._token(cookie_id)
            agents = await self.registry.agents(token)
            box.clear()
            with box:
                if not agents:
                    ui.label("No agents yet. Create an enrollment code and give it to your agent.")
                for agent in agents:
                    with ui.card().classes("w-full"), ui.row().classes("items-center gap-4 w-full"):
                        ui.label(f"{agent['name']}").classes("font-medium")
                        ui.label(
                            f"{agent['id']} · {agent.get('status', '?')} · since "
                            f"{_stamp(agent.get('created_at'))}"
                        ).classes("text-sm")
                        ui.space()
                        labelled(
                            ui.link("Audit", f"/audit?agent={quote(agent['id'], safe='')}"),
                            f"Audit trail of {_agent_named(agent['name'], agent['id'])}",
                        )
                        if agent.get("status") == "active":

                            async def revoke(agent: Mapping[str, Any] = agent) -> None:
                                await self._confirm_revoke(
                                    Ctx(cookie_id, notice, load),
                                    "agent",
                                    agent["id"],
                                    _agent_named(agent["name"], agent["id"]),
                                )

                            labelled(
                                ui.button("Revoke agent", on_click=revoke, color="negative").props(
                                    "outline dense"
                                ),
                                f"Revoke {_agent_named(agent['name'], agent['id'])}",
                            )

        async def enroll() -> None:
            async def work() -> None:
                token = self._token(cookie_id)
                answer = await self.registry.enrollment(token)
                lifetime = int(answer["expires_in"])
                code_box.clear()
                with code_box, ui.card().classes("w-full bg-amber-50") as card:
                    heading("Enrollment code", 2)
                    ui.label(
                        "Give this code to your agent; it is shown only once and works once, "
                        f"for {lifetime // 60} minutes. The agent registers "
                        "its key with it, then its requests appear on the Requests page."
                    )
                    code = ui.input("Enrollment code", value=answer["enrollment_code"])
                    code.classes("w-full font-mono")
                    code.props["readonly"] = True

                def expired() -> None:
                    card.delete()
                    with code_box:
                        ui.label(
                            "The enrollment code has expired. If your agent has not "
                            "registered yet, create a new one."
                        )

                # A code is a secret while it works: off the page when it ends, not left on
                # a screen (or in its DOM) for whoever comes by later. Beside the card, not
                # in it: a timer must not delete itself from its own callback.
                with code_box:
                    ui.timer(lifetime, expired, once=True)
                notice.ok("A new enrollment code is ready.")

            # One code a press: a double click made two, the second's card replacing the
            # first's, which stayed valid for its lifetime with nobody seeing it. A click
            # that crossed the disabling on its way finds the button off.
            if not enroll_button.enabled:
                return
            enroll_button.disable()
            try:
                await self._act(notice, work)
            finally:
                enroll_button.enable()

        try:
            await load()
        except RegistryError as exc:
            self._registry_failed(notice, exc)
        with main:
            enroll_button = labelled(
                ui.button("New enrollment code", icon="add", on_click=enroll),
                "Create a new enrollment code for an agent",
            ).classes("self-start")

    # --- passkeys ------------------------------------------------------------------------

    async def _passkeys(self, cookie_id: str, session: Session) -> None:
        main = self._frame(active="/passkeys", session=session, cookie_id=cookie_id)
        with main:
            heading("Passkeys")
            ui.label(
                "Each passkey can sign you in and approve requests. Keep more than one (for "
                "example a phone and a security key) so losing one does not lock you out."
            )
            notice = Notice()
            box = ui.column().classes("w-full gap-2")

        # One change at a time: the browser shows one passkey prompt. A double click asked
        # the registry for a second challenge, and the browser refused its prompt, which
        # read "Nothing was signed" while the first prompt, still up, went on to change the
        # person's passkeys.
        running: list[bool] = []

        async def one_at_a_time(work: Callable[[], Awaitable[None]]) -> None:
            if running:
                return
            running.append(True)
            try:
                await self._act(notice, work)
            finally:
                running.clear()

        async def load() -> None:
            token = self._token(cookie_id)
            passkeys = await self.registry.passkeys(token)
            box.clear()
            with box:
                for i, passkey in enumerate(passkeys, start=1):
                    credential_id = passkey["credential_id"]
                    with ui.card().classes("w-full"), ui.row().classes("items-center gap-4 w-full"):
                        ui.label(f"Passkey {i}").classes("font-medium")
                        flags = []
                        backup = describe_backup(
                            backup_eligible=passkey.get("backup_eligible"),
                            backed_up=passkey.get("backed_up"),
                        )
                        if backup is not None:
                            flags.append(backup)
                        if passkey.get("flagged_at"):
                            flags.append("BLOCKED: possibly cloned")
                        ui.label(
                            f"{_short(credential_id, 16)} · added "
                            f"{_stamp(passkey.get('created_at'))} · last used "
                            f"{_stamp(passkey.get('last_used_at'))}"
                            + (f" · {', '.join(flags)}" if flags else "")
                        ).classes("text-sm")
                        ui.space()

                        async def remove(credential_id: str = credential_id, n: int = i) -> None:
                            async def work() -> None:
                                token = self._token(cookie_id)
                                options = await self.registry.passkey_confirm(token, credential_id)
                                notice.info(f"Confirm removing passkey {n} with a passkey…")
                                confirmation = await self._ceremony("get", options)
                                await self.registry.remove_passkey(
                                    token, credential_id, confirmation
                                )
                                await self._done(
                                    notice,
                                    f"Removed passkey {n}. Your other sessions were signed out.",
                                    load,
                                )

                            await one_at_a_time(work)

                        labelled(
                            ui.button("Remove", on_click=remove, color="negative").props(
                                "outline dense"
                            ),
                            f"Remove passkey {i} ({_short(credential_id, 16)})",
                        )

        # Two steps, each its own click: a passkey the person has confirms the change, then
        # the new authenticator (often another device, at hand only now) creates its
        # passkey. The registration options wait in between, for the challenge's lifetime.
        waiting: list[dict[str, Any]] = []

        async def add() -> None:
            async def work() -> None:
                token = self._token(cookie_id)
                confirm = await self.registry.passkey_confirm(token)
                notice.info("First confirm with one of your passkeys…")
                confirmation = await self._ceremony("get", confirm)
                waiting[:] = [await self.registry.passkey_begin(token, confirmation)]
                create_button.visible = True
                notice.info(
                    "Confirmed. Now have the new passkey's device or security key at hand "
                    "and press Create the new passkey."
                )

            await one_at_a_time(work)

        async def create() -> None:
            async def work() -> None:
                if not waiting:
                    return
                # Before the prompt: the authenticator keeps what it creates, even a passkey
                # the registry then refuses for a session that has ended.
                token = self._token(cookie_id)
                notice.info("Creating a new passkey…")
                credential = await self._ceremony("create", waiting[0])
                await self.registry.passkey_finish(token, credential)
                waiting.clear()
                create_button.visible = False
                await self._done(notice, "Added a new passkey.", load)

            await one_at_a_time(work)

        try:
            await load()
        except RegistryError as exc:
            self._registry_failed(notice, exc)
        with main, ui.row().classes("gap-2"):
            labelled(ui.button("Add a passkey", icon="add", on_click=add), "Add a passkey")
            create_button = labelled(
                ui.button("Create the new passkey", icon="key", on_click=create),
                "Create the new passkey",
            )
            create_button.visible = False


def _agent_named(name: object, agent_id: str) -> str:
    """'agent Mail bot (agt_…)': two agents may share a name, never an id."""
    return f"agent {name} ({agent_id})" if name != agent_id else f"agent {agent_id}"


def _expired(grant: Mapping[str, Any], now: float) -> bool:
    envelope = (grant.get("document") or {}).get("envelope") or {}
    expires = envelope.get("expires_at")
    try:
        return expires is not None and now >= int(expires)
    except (TypeError, ValueError):  # not a time: kept live, where a card offers to revoke it
        return False
