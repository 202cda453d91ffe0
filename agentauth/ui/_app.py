"""The approval page as an ASGI app: NiceGUI on FastAPI, talking to the registry over HTTP.

NiceGUI keeps its pages in one global app, so one process serves one approval page:
``create_ui_app`` may be called once per process (``run_ui`` and ``python -m
agentauth.ui`` do exactly that).
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from nicegui import core, ui
from nicegui.elements.mixins.text_element import TextElement
from pydantic import BaseModel, ConfigDict, Field

from ._pages import Pages
from ._registry import RegistryClient
from ._security import (
    SecurityMiddleware,
    SessionStore,
    bind_sockets_to_pages,
    cookie_name,
    read_cookie,
    set_cookie_header,
)
from ._settings import UISettings

__all__ = ["create_ui_app", "run_ui"]

_created = threading.Lock()
_used = False
# The shortest session_idle_ttl allowed: a session nothing looks at again ends at the
# registry at most this long after its idle period.
_IDLE_SWEEP_SECONDS = 60.0


class _TicketIn(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    ticket: str = Field(min_length=16, max_length=128, repr=False)  # a bearer of a session


def create_ui_app(
    *,
    registry_url: str | None = None,
    settings: UISettings | None = None,
    **overrides: Any,
) -> FastAPI:
    """The approval page as a FastAPI app (serve it with uvicorn, one worker).

    Give ``settings``, or ``registry_url`` plus any ``UISettings`` field as keyword
    (``origin="http://localhost:8080"``, ``rp_id="localhost"``...).
    """
    global _used  # noqa: PLW0603 - NiceGUI's page registry is process-global too
    with _created:
        if _used:
            raise RuntimeError("create_ui_app() runs once per process (NiceGUI is global)")
        _used = True
    if settings is None:
        if registry_url is None:
            raise TypeError("give settings or registry_url")
        settings = UISettings(registry_url=registry_url, **overrides)
    elif registry_url is not None or overrides:
        raise TypeError("give either settings or registry_url and fields, not both")

    registry = RegistryClient(settings.registry_url, timeout=settings.registry_timeout)
    store = SessionStore(
        ttl=settings.session_ttl,
        idle_ttl=settings.session_idle_ttl,
        ticket_ttl=settings.ticket_ttl,
    )
    cookie = cookie_name(settings.secure_cookies)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await registry.aclose()

    app = FastAPI(
        title=settings.title, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.settings = settings
    app.state.sessions = store

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    async def invalid(_: Request, exc: Exception) -> JSONResponse:
        # The API's error shape, not FastAPI's 422 that echoes the input back.
        return JSONResponse(
            {"error": "invalid_request", "error_description": "malformed request"}, 400
        )

    app.add_exception_handler(RequestValidationError, invalid)

    @app.post("/auth/session", include_in_schema=False)
    async def adopt_session(request: Request, body: _TicketIn) -> Response:
        # Origin was checked by the middleware; the custom header keeps this endpoint out
        # of reach of plain cross-site forms even where Origin checks are relaxed.
        if request.headers.get("x-agentauth") != "1":
            return JSONResponse({"error": "forbidden"}, status_code=403)
        session_id = store.claim(body.ticket, read_cookie(request.headers, cookie))
        if session_id is None:
            return JSONResponse({"error": "invalid_ticket"}, status_code=403)
        response = Response(status_code=204)
        response.raw_headers.append(
            (
                b"set-cookie",
                set_cookie_header(
                    cookie, session_id, secure=settings.secure_cookies, max_age=settings.session_ttl
                ),
            )
        )
        return response

    pages = Pages(settings=settings, registry=registry, store=store)
    pages.register()
    # A session is ended for idleness when it is next looked at; one nothing looks at again
    # (its tab closed, a page that does not poll) kept its registry session for all of
    # session_ttl.
    core.app.timer(_IDLE_SWEEP_SECONDS, pages.end_idle_sessions)
    core.app.on_page_exception(_error_page)
    ui.run_with(
        app,
        title=settings.title,
        favicon="🔑",
        show_welcome_message=False,
        reconnect_timeout=10.0,
    )
    bind_sockets_to_pages(core.sio, cookie)
    # NiceGUI lets Engine.IO answer every origin with CORS and credentials; the page's
    # socket is the page's own (the middleware refuses other origins before this too).
    core.sio.eio.cors_allowed_origins = [settings.origin]
    app.add_middleware(
        SecurityMiddleware,
        origin=settings.origin,
        host=settings.host,
        secure=settings.secure_cookies,
        cookie_max_age=settings.session_ttl,
    )
    return app


def _error_page() -> None:
    """What a page that failed to build shows. NiceGUI's own error page names the exception
    and its message, which can hold a registry answer's values (or anything else): those
    go to the server's log, where NiceGUI writes the exception either way."""
    with ui.element("main").classes("w-full max-w-xl mx-auto flex flex-col gap-4 p-8"):
        TextElement(tag="h1", text="This page could not be shown").classes("text-2xl font-semibold")
        ui.label(
            "Something went wrong on this page's server. Nothing was signed or changed. "
            "Try again in a moment."
        )
        ui.link("Back to your requests", "/")


def run_ui(
    settings: UISettings,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    log_level: str = "warning",
) -> None:
    """Serve the approval page until interrupted (blocking)."""
    uvicorn.run(
        create_ui_app(settings=settings),
        host=host,
        port=port,
        log_level=log_level,
        # The session store lives in this process: exactly one worker.
        workers=1,
        proxy_headers=False,
    )
