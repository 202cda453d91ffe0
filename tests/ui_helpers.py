"""Helpers for the approval page's tests: the page in a subprocess, headless Chromium with
the DevTools virtual authenticator, and the agent/provider side of the registry (httpx)."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from registry_world import Provider
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.common.virtual_authenticator import (
    Protocol,
    Transport,
    VirtualAuthenticatorOptions,
)
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait
from softauthn import SoftAuthenticator

from agentauth.protocol import PrivateKey, create_dpop_proof

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "docs" / "images"
API = "https://shop.example/api/orders"

# What design.md found headless Chromium needs here: without the background-networking
# flags it stalls on the closed network.
CHROME_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1000",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- the page in its own process -------------------------------------------------------------


@contextmanager
def ui_process(registry_url: str, port: int, log: Path) -> Iterator[str]:
    """``python -m agentauth.ui`` on ``port``; yields its origin once it answers."""
    origin = f"http://localhost:{port}"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agentauth.ui",
                "--registry-url",
                registry_url,
                "--port",
                str(port),
                "--origin",
                origin,
                "--log-level",
                "warning",
            ],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"the UI exited: {log.read_text()[-2000:]}")
                try:
                    if httpx.get(f"{origin}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the UI did not start: {log.read_text()[-2000:]}")
                time.sleep(0.2)
            yield origin
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# --- the browser ---------------------------------------------------------------------------


def chrome(download_dir: Path) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tempfile.mkdtemp(prefix='agentauth-chrome-')}")
    options.add_experimental_option(
        "prefs",
        {"download.default_directory": str(download_dir), "download.prompt_for_download": False},
    )
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    driver.execute_cdp_cmd(
        "Browser.setDownloadBehavior",
        {"behavior": "allow", "downloadPath": str(download_dir), "eventsEnabled": False},
    )
    driver.set_page_load_timeout(30)
    return driver


def add_authenticator(driver: webdriver.Chrome, *, user_verified: bool = True) -> None:
    """A platform passkey authenticator: CTAP2, resident keys, user verification."""
    driver.add_virtual_authenticator(
        VirtualAuthenticatorOptions(
            protocol=Protocol.CTAP2,
            transport=Transport.INTERNAL,
            has_resident_key=True,
            has_user_verification=True,
            is_user_consenting=True,
            is_user_verified=user_verified,
        )
    )


class Page:
    """Small waits over Selenium, by visible text and accessible names."""

    def __init__(self, driver: webdriver.Chrome, origin: str, timeout: float = 20) -> None:
        self.driver = driver
        self.origin = origin
        self.timeout = timeout

    def open(self, path: str) -> None:
        self.driver.get(self.origin + path)
        self.wait(lambda d: d.execute_script("return !!window.socket && window.socket.connected"))

    def wait(self, condition: Any, timeout: float | None = None) -> Any:
        try:
            return WebDriverWait(
                self.driver,
                timeout or self.timeout,
                ignored_exceptions=(StaleElementReferenceException,),
            ).until(condition)
        except TimeoutException:
            raise AssertionError(
                f"timed out at {self.driver.current_url}; page text:\n{self.text()[-3000:]}"
            ) from None

    def text(self) -> str:
        try:
            return str(self.driver.find_element(By.TAG_NAME, "body").text)
        except Exception:
            return ""

    def wait_text(self, needle: str, timeout: float | None = None) -> None:
        # Through text(), which reads a failed read as no text yet: a navigation (sign-up
        # moving to /) can replace <body> between the find and the read, and Chrome then
        # answers "Node ... does not belong to the document", no StaleElementReference
        # the wait would ignore (a flaky browser test in CI, 2026-12-01).
        self.wait(lambda d: needle in self.text(), timeout)

    def button(self, name: str, *, exact: bool = False) -> WebElement:
        """A visible, enabled button whose accessible name is (or starts with) ``name``."""

        def find(d: webdriver.Chrome) -> WebElement | bool:
            for element in d.find_elements(By.CSS_SELECTOR, "button"):
                label = element.get_attribute("aria-label") or element.text
                hit = label == name if exact else label.startswith(name)
                if hit and element.is_displayed() and element.is_enabled():
                    return element
            return False

        found: WebElement = self.wait(find)
        return found

    def click(self, name: str, *, exact: bool = False) -> None:
        self.button(name, exact=exact).click()

    def field(self, label: str) -> WebElement:
        def find(d: webdriver.Chrome) -> WebElement | bool:
            for element in d.find_elements(By.CSS_SELECTOR, "input"):
                if element.accessible_name == label and element.is_displayed():
                    return element
            return False

        found: WebElement = self.wait(find)
        return found

    @staticmethod
    def replace(field: WebElement, text: str) -> None:
        """Type ``text`` over a field's value as a person would (clear() bypasses Vue)."""
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(Keys.BACKSPACE)
        field.send_keys(text)

    def shot(self, name: str) -> None:
        """Save a screenshot: into docs/images/ when missing or when AGENTAUTH_SCREENSHOTS=1
        (so ordinary runs leave the committed images alone), else into a scratch dir."""
        target = IMAGES / name
        if target.exists() and os.environ.get("AGENTAUTH_SCREENSHOTS") != "1":
            target = Path(tempfile.gettempdir()) / "agentauth-screenshots" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        time.sleep(0.4)  # let charts and transitions settle
        height = self.driver.execute_script(
            "return Math.max(document.body.scrollHeight,"
            " document.documentElement.scrollHeight,"
            " document.querySelector('.q-page-container')?.scrollHeight || 0)"
        )
        self.driver.set_window_size(1280, max(800, min(int(height) + 120, 2400)))
        time.sleep(0.3)
        self.driver.save_screenshot(str(target))
        self.driver.set_window_size(1280, 1000)


# --- the agent and provider side -----------------------------------------------------------


@dataclass
class Agent:
    id: str
    key: PrivateKey


@dataclass
class Registry:
    """The registry's HTTP API as agents, providers and the administrator use it."""

    client: httpx.Client
    base: str
    admin_token: str
    verifier: str

    def url(self, path: str) -> str:
        return self.base.rstrip("/") + path

    def _agent_call(self, agent: Agent, method: str, path: str, **kwargs: Any) -> httpx.Response:
        proof = create_dpop_proof(
            agent.key, htm=method, htu=self.url(path.split("?", maxsplit=1)[0]), now=time.time()
        )
        return self.client.request(method, self.url(path), headers={"DPoP": proof}, **kwargs)

    def as_agent(self, agent: Agent, method: str, path: str, **kwargs: Any) -> Any:
        r = self._agent_call(agent, method, path, **kwargs)
        assert r.status_code == 200, r.text
        return r.json()

    def provider(
        self, name: str, kinds: tuple[str, ...] = ("read", "write", "transact")
    ) -> Provider:
        pid = f"{name}-{os.urandom(3).hex()}"
        audience = f"https://{pid}.example"
        r = self.client.post(
            self.url("/v1/providers"),
            headers={"Authorization": f"Bearer {self.admin_token}"},
            json={"id": pid, "audience": audience, "display_name": name, "allowed_kinds": kinds},
        )
        assert r.status_code == 200, r.text
        return Provider(pid, audience, r.json()["secret"])

    def enroll(self, code: str, name: str) -> Agent:
        key = PrivateKey.generate("ES256")
        proof = create_dpop_proof(key, htm="POST", htu=self.url("/v1/agents"), now=time.time())
        r = self.client.post(
            self.url("/v1/agents"),
            headers={"DPoP": proof},
            json={"name": name, "public_jwk": key.public_jwk(), "enrollment_code": code},
        )
        assert r.status_code == 200, r.text
        return Agent(r.json()["id"], key)

    def ask(
        self,
        agent: Agent,
        provider: Provider,
        capabilities: list[dict[str, Any]],
        envelope: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"provider_id": provider.id, "capabilities": capabilities}
        if envelope is not None:
            body["envelope"] = envelope
        result: dict[str, Any] = self.as_agent(agent, "POST", "/v1/grant-requests", json=body)
        return result

    def token(self, agent: Agent, grant_id: str) -> str:
        return str(
            self.as_agent(agent, "POST", "/v1/token", json={"grant_id": grant_id})["access_token"]
        )

    def verify(
        self,
        agent: Agent,
        provider: Provider,
        token: str,
        action: dict[str, Any],
        step_up_ref: str | None = None,
    ) -> dict[str, Any]:
        proof = create_dpop_proof(
            agent.key, htm="POST", htu=API, now=time.time(), access_token=token
        )
        body: dict[str, Any] = {
            "token": token,
            "proof": proof,
            "method": "POST",
            "url": API,
            "action": action,
        }
        if step_up_ref:
            body["step_up_ref"] = step_up_ref
        r = self.client.post(self.verifier + "/v1/verify", headers=provider.headers, json=body)
        assert r.status_code == 200, r.text
        result: dict[str, Any] = r.json()
        return result

    def checkpoint(self) -> None:
        r = self.client.post(
            self.url("/v1/admin/checkpoints"),
            headers={"Authorization": f"Bearer {self.admin_token}"},
        )
        assert r.status_code == 200, r.text

    def recovery_code(self, principal_id: str) -> str:
        r = self.client.post(
            self.url("/v1/admin/recoveries"),
            headers={"Authorization": f"Bearer {self.admin_token}"},
            json={"principal_id": principal_id},
        )
        assert r.status_code == 200, r.text
        return str(r.json()["recovery_code"])


# --- a human with a software authenticator (for what a browser cannot express) ---------------


@dataclass
class SoftHuman:
    session: str
    authenticator: SoftAuthenticator

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.session}"}


def soft_human(registry: Registry, origin: str) -> SoftHuman:
    authenticator = SoftAuthenticator(origin=origin)
    r = registry.client.post(registry.url("/v1/signup/begin"), json={"display_name": "Soft"})
    assert r.status_code == 200, r.text
    r = registry.client.post(
        registry.url("/v1/signup/finish"), json={"credential": authenticator.create(r.json())}
    )
    assert r.status_code == 200, r.text
    return SoftHuman(r.json()["session"], authenticator)


def enrollment_code_for(registry: Registry, human: SoftHuman) -> str:
    r = registry.client.post(registry.url("/v1/enrollments"), headers=human.headers)
    assert r.status_code == 200, r.text
    return str(r.json()["enrollment_code"])


def approval_begin(registry: Registry, human: SoftHuman, request_id: str) -> dict[str, Any]:
    r = registry.client.post(
        registry.url(f"/v1/grant-requests/{request_id}/approval/begin"), headers=human.headers
    )
    assert r.status_code == 200, r.text
    result: dict[str, Any] = r.json()
    return result


def approval_finish(
    registry: Registry, human: SoftHuman, request_id: str, credential: dict[str, Any]
) -> httpx.Response:
    return registry.client.post(
        registry.url(f"/v1/grant-requests/{request_id}/approval/finish"),
        headers=human.headers,
        json={"credential": credential},
    )


# --- keyboard and transport probes ---------------------------------------------------------


def tab_order(page: Page, limit: int = 60) -> list[tuple[str, str]]:
    """(tag, accessible name) of each element Tab reaches from the top of the page."""
    driver = page.driver
    driver.execute_script("document.activeElement && document.activeElement.blur()")
    driver.find_element(By.TAG_NAME, "body").click()
    seen: list[tuple[str, str]] = []
    ids: set[str] = set()
    for _ in range(limit):
        driver.switch_to.active_element.send_keys(Keys.TAB)
        element = driver.switch_to.active_element
        if element.id in ids:
            break
        ids.add(element.id)
        seen.append((element.tag_name, element.accessible_name))
    return seen


def focus(page: Page, name: str, limit: int = 60) -> WebElement:
    """Press Tab until the element named ``name`` has focus; return it."""
    for _ in range(limit):
        element = page.driver.switch_to.active_element
        if element.accessible_name == name:
            return element
        element.send_keys(Keys.TAB)
    raise AssertionError(f"Tab never reached {name!r}")


@contextmanager
def serve_html(html: str) -> Iterator[str]:
    """Another site: one HTML page on its own origin (127.0.0.1 and a free port)."""
    body = html.encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def websocket_status(port: int, origin: str) -> int:
    """The status NiceGUI's socket answers a WebSocket handshake from ``origin`` with."""
    request = (
        "GET /_nicegui_ws/socket.io/?EIO=4&transport=websocket HTTP/1.1\r\n"
        f"Host: localhost:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
        f"Sec-WebSocket-Version: 13\r\nOrigin: {origin}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request.encode())
        status_line = sock.recv(1024).split(b"\r\n", 1)[0]
    return int(status_line.split()[1])
