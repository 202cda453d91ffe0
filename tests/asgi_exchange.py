"""One HTTP request straight to an ASGI app, for what a client library hides: httpx drops
the content of an answer to HEAD itself, so through it a test cannot tell whether the app
sent one."""

from __future__ import annotations

from starlette.types import ASGIApp, Message


async def exchange(
    app: ASGIApp,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    *,
    root_path: str = "",
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """The answer's status, its headers as sent and the content it carried. ``root_path``
    names a mount prefix ``path`` keeps, as under Serve."""
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "https",
        "server": ("test", 443),
        "path": path,
        "raw_path": path.encode(),
        "root_path": root_path,
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
    }
    await app(scope, receive, send)
    content = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], list(sent[0]["headers"]), content
