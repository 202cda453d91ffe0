"""The approval page's socket, against the page in a process of its own.

NiceGUI runs a page's actions from messages on its Socket.IO connection, and each message
names the page it is for by client id. Those ids are no secret (they are in the page, in
the socket's URL, so in any proxy's access log): an action must act for the browser whose
page it is, and only over the socket that browser opened.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import socketio
from ui_helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
ENROL = "Create a new enrollment code for an agent"


@dataclass(frozen=True)
class Server:
    origin: str
    url: str  # where to connect (127.0.0.1), the Host header naming the origin
    cookie: str  # the signed-in browser's Cookie header
    calls: Path  # every call the stand-in registry received, one per line

    def registry_calls(self) -> list[str]:
        return self.calls.read_text().splitlines() if self.calls.exists() else []


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port = free_port()
    calls = tmp_path_factory.mktemp("ui-sockets") / "calls"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "ui_socket_server.py"), str(port), str(calls)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        cookie = json.loads(process.stdout.readline())["cookie"]
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the page did not start"
            time.sleep(0.2)
        yield Server(f"http://localhost:{port}", url, f"agentauth_session={cookie}", calls)
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


@dataclass(frozen=True)
class Page:
    client_id: str
    button: int  # the "new enrollment code" button's element id
    listener: str  # its click listener's id


async def load(server: Server, cookie: str) -> Page:
    headers = {"Host": server.origin.removeprefix("http://"), "Cookie": cookie}
    async with httpx.AsyncClient(base_url=server.url) as http:
        answer = await http.get("/agents", headers=headers)
    assert answer.status_code == 200
    client_id = re.search(r"client_id': '([0-9a-f-]{36})'", answer.text)
    found = re.search(r"parseElements\(String\.raw`(.*?)`\)", answer.text, re.S)
    assert client_id and found
    elements: dict[str, Any] = json.loads(found.group(1))
    (button,) = [
        (int(id_), element)
        for id_, element in elements.items()
        if element.get("props", {}).get("aria-label") == ENROL
    ]
    (listener,) = [e["listener_id"] for e in button[1]["events"] if e["type"] == "click"]
    return Page(client_id.group(1), button[0], listener)


async def open_socket(
    server: Server,
    cookie: str | None,
    page: Page | None,
    tab_id: str | None = None,
    extra: str = "",
) -> socketio.AsyncClient:
    """A socket as the page's script opens it (``page`` given: handshaking for that page
    as it connects), from a browser presenting ``cookie``."""
    path = "/"
    if page is not None:
        path += f"?client_id={page.client_id}&tab_id={tab_id or uuid.uuid4()}"
        path += f"&document_id={uuid.uuid4()}&next_message_id=0&implicit_handshake=true{extra}"
    headers = {"Host": server.origin.removeprefix("http://"), "Origin": server.origin}
    if cookie is not None:
        headers["Cookie"] = cookie
    sock = socketio.AsyncClient(reconnection=False)
    await sock.connect(
        server.url + path,
        headers=headers,
        socketio_path="/_nicegui_ws/socket.io",
        transports=["websocket"],
        wait_timeout=10,
    )
    return sock


def click(page: Page) -> dict[str, Any]:
    return {
        "id": page.button,
        "client_id": page.client_id,
        "listener_id": page.listener,
        "args": [],
    }


async def another_browsers_cookie(server: Server) -> str:
    async with httpx.AsyncClient(base_url=server.url) as http:
        answer = await http.get("/login", headers={"Host": server.origin.removeprefix("http://")})
    return answer.headers["set-cookie"].split(";")[0]


async def until_called(server: Server, call: str, before: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if call in server.registry_calls()[before:]:
            return True
        await asyncio.sleep(0.05)
    return False


@pytest.mark.asyncio
async def test_an_action_runs_only_from_the_socket_the_pages_browser_opened(
    server: Server,
) -> None:
    """Another socket naming the page in its message (with no cookie, or with another
    browser's) was run as the page's owner, with their registry session: it could mint
    enrollment codes, revoke, deny, or raise passkey prompts in their browser."""
    page = await load(server, server.cookie)
    own = await open_socket(server, server.cookie, page)
    try:
        for cookie in (None, await another_browsers_cookie(server)):
            other = await open_socket(server, cookie, None)
            before = len(server.registry_calls())
            await other.emit("event", click(page))
            assert not await until_called(server, "POST /v1/enrollments", before, 1.5)
            await other.disconnect()
        # The same message from the page's own socket does act (so the one above was
        # refused, not malformed).
        before = len(server.registry_calls())
        await own.emit("event", click(page))
        assert await until_called(server, "POST /v1/enrollments", before, 10)
    finally:
        await own.disconnect()


@pytest.mark.asyncio
async def test_only_the_pages_browser_can_join_its_socket(server: Server) -> None:
    """Joining a page's socket (its client id and a tab id) receives every update of the
    page, a new enrollment code included, and makes its actions fail for the owner: a
    socket must present the cookie the page was built for."""
    page = await load(server, server.cookie)
    tab = str(uuid.uuid4())
    for cookie in (None, await another_browsers_cookie(server)):
        for extra in ("", "&implicit_handshake=false"):  # the first of a repeated name counts
            with pytest.raises(socketio.exceptions.ConnectionError):
                await open_socket(server, cookie, page, tab, extra)
        other = await open_socket(server, cookie, None)
        data = {"client_id": page.client_id, "tab_id": tab, "document_id": str(uuid.uuid4())}
        assert await other.call("handshake", data, timeout=10) is False
        await other.disconnect()
    own = await open_socket(server, server.cookie, page, tab)  # the owner still can
    try:
        before = len(server.registry_calls())
        await own.emit("event", click(page))
        assert await until_called(server, "POST /v1/enrollments", before, 10)
    finally:
        await own.disconnect()


@pytest.mark.asyncio
async def test_a_same_site_page_cannot_open_a_socket_with_the_persons_cookie(
    server: Server,
) -> None:
    """Engine.IO answered any Origin with CORS and credentials. A page of the same site
    (another port of localhost, a sibling subdomain: SameSite cookies are sent) could open
    a polling session carrying the person's cookie and read its id; its server then sent
    the connect packet and the actions itself, with a forged Origin, and acted as the
    person (here: minted an enrollment code), the page's client id known (proxy logs)."""
    page = await load(server, server.cookie)
    sibling = "http://localhost:1"  # same site as the page's origin, another origin
    host = server.origin.removeprefix("http://")
    query = (
        f"EIO=4&transport=polling&client_id={page.client_id}&tab_id={uuid.uuid4()}"
        f"&document_id={uuid.uuid4()}&next_message_id=0&implicit_handshake=true"
    )
    before = len(server.registry_calls())
    async with httpx.AsyncClient(base_url=server.url) as http:
        opened = await http.get(
            f"/_nicegui_ws/socket.io/?{query}",
            headers={"Host": host, "Cookie": server.cookie, "Origin": sibling},
        )
        # What the sibling page's script may read of that answer.
        readable = opened.headers.get("access-control-allow-origin") in (sibling, "*")
        if opened.status_code == 200 and readable:
            sid = json.loads(opened.text[1:])["sid"]
            forged = {"Host": host, "Origin": server.origin, "Content-Type": "text/plain"}
            url = f"/_nicegui_ws/socket.io/?EIO=4&transport=polling&sid={sid}"
            await http.post(url, content="40", headers=forged)
            await http.get(url, headers=forged)  # the connect's answer
            event = "42" + json.dumps(["event", click(page)])
            await http.post(url, content=event, headers=forged)
    assert not readable
    assert opened.status_code == 403
    assert not await until_called(server, "POST /v1/enrollments", before, 2)


@pytest.mark.asyncio
async def test_a_page_that_fails_to_build_names_nothing_of_the_failure(server: Server) -> None:
    """NiceGUI's 500 page showed the exception's class and message ("KeyError: 'name'" when
    a registry answer lacked a field, or whatever value a message holds): what failed
    belongs in the server's log, the person reads that the page could not be shown."""
    headers = {"Host": server.origin.removeprefix("http://"), "Cookie": server.cookie}
    async with httpx.AsyncClient(base_url=server.url) as http:
        answer = await http.get("/passkeys", headers=headers)
    assert answer.status_code == 500
    for detail in ("RuntimeError", "only the server", "ses_1"):
        assert detail not in answer.text
    assert "This page could not be shown" in answer.text
    assert answer.headers["x-frame-options"] == "DENY"


@pytest.mark.asyncio
async def test_a_page_the_registry_is_too_slow_for_says_so_in_its_own_words(
    server: Server,
) -> None:
    """Each registry call is bounded (registry_timeout, 15 s) but a page makes several in
    turn: pending requests in two pages of 11 s each took longer than NiceGUI lets a page
    build (20 s), and NiceGUI's own error page told the person to "Await
    ui.context.client.connected() before long-running setup or increase response_timeout"."""
    headers = {"Host": server.origin.removeprefix("http://"), "Cookie": server.cookie}
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
        answer = await http.get("/", headers=headers)
    for detail in ("response_timeout", "client.connected"):
        assert detail not in answer.text
    assert "This page could not be shown" in answer.text
    assert "The registry took too long to answer" in answer.text
    assert answer.headers["x-frame-options"] == "DENY"


@pytest.mark.asyncio
async def test_a_session_left_idle_is_ended_at_the_registry_with_no_visit(
    server: Server,
) -> None:
    """A session idle past session_idle_ttl whose tab was closed: nothing looked at it
    again, so the registry session it held lived on until its expiry (12 h)."""
    assert await until_called(server, "DELETE /v1/sessions/current", 0, 10)
