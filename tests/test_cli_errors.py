"""The ``agentauth`` command on bad input, a bad configuration or an unreachable database
answers with one line on stderr and a non-zero exit status: never a Python traceback, and
never a secret it was given (a traceback or a pydantic error would print both)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import new_database, with_database
from pydantic import ValidationError

from agentauth import cli
from agentauth.registry import RegistrySettings, SignerSettings
from agentauth.verifier import VerifierSettings

#: Nothing listens on port 1; the password must never be printed.
UNREACHABLE = "postgresql://registry:db-s3cret@127.0.0.1:1/agentauth"


def agentauth(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentauth.cli", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


@pytest.mark.parametrize(
    "command",
    [
        ("grants", "list"),
        ("migrate",),
        ("keys", "list"),
        ("audit", "verify"),
        ("revoke", "token", "tok_1"),
        ("providers", "suspend", "shop", "--reason", "leak"),
    ],
)
def test_an_unreachable_database_is_named_with_its_password_masked(
    command: tuple[str, ...], tmp_path: Path
) -> None:
    out = agentauth(
        *command,
        env={
            "DATABASE_URL": UNREACHABLE,
            "REDIS_URL": "redis://127.0.0.1:1/0",
            "AGENTAUTH_DATA_DIR": str(tmp_path / "data"),
        },
    )
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert "db-s3cret" not in out.stdout + out.stderr
    assert out.stderr.startswith(
        "error: cannot reach the database (postgresql://registry:***@127.0.0.1:1/agentauth): "
    )


@pytest.mark.parametrize(
    ("query", "shown"),
    [
        (
            "?sslkey=/k.pem&sslpassword=key-s3cret",
            "postgresql://registry:***@127.0.0.1:1/agentauth?sslkey=/k.pem&sslpassword=***",
        ),
        # An '@' in it ends the user part inside it: the rest of it showed after that '@'.
        ("?sslpassword=key@s3cret&sslmode=require", "postgresql://registry:***&sslmode=require"),
    ],
)
def test_the_ssl_key_password_of_a_database_url_is_masked_too(query: str, shown: str) -> None:
    """``sslpassword`` (the passphrase of the client's TLS key, which asyncpg and libpq take
    in the URL) is a secret like ``password``: it was printed whole in the error line (and
    in ``up``'s ready lines)."""
    out = agentauth("grants", "list", env={"DATABASE_URL": UNREACHABLE + query})
    assert out.returncode == 2, out.stderr
    assert "s3cret" not in out.stdout + out.stderr
    assert out.stderr.startswith(f"error: cannot reach the database ({shown}): ")


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:pw-s3cret@db:notaport/x",
        # An unescaped '@' in the password: asyncpg splits at the first one, and its error
        # would quote what follows, a piece of the password.
        "postgresql://u:pw@s3cret:s3cret@db/x",
    ],
)
def test_a_malformed_database_url_is_a_message_without_the_password(url: str) -> None:
    out = agentauth("grants", "list", env={"DATABASE_URL": url})
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert "s3cret" not in out.stdout + out.stderr
    assert out.stderr.startswith("error: cannot reach the database (postgresql://u:***@")
    assert "not a valid PostgreSQL URL" in out.stderr


@pytest.mark.parametrize("command", [("grants", "list"), ("migrate",)])
def test_a_database_port_out_of_range_is_a_message(command: tuple[str, ...]) -> None:
    """asyncpg takes any number for a port, and the socket's connect raises OverflowError
    for one past 65535: no ValueError, no OSError."""
    url = "postgresql://u:pw-s3cret@127.0.0.1:99999/x"
    out = agentauth(*command, env={"DATABASE_URL": url})
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert "s3cret" not in out.stdout + out.stderr
    assert out.stderr.startswith("error: cannot reach the database (postgresql://u:***@")
    assert "port" in out.stderr


def test_a_programming_error_is_not_reported_as_the_database(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only connecting is translated: a ValueError from the work itself stays a bug."""
    monkeypatch.setenv("DATABASE_URL", UNREACHABLE)

    async def broken(url: str, query: str, *params: object) -> list[dict[str, object]]:
        raise ValueError("a bug")

    monkeypatch.setattr(cli, "_rows", broken)
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["grants", "list"])


@pytest.mark.parametrize("location", ["s3://", "s3:///prefix"])
def test_a_malformed_archive_location_is_a_message(location: str) -> None:
    out = agentauth("audit", "verify", "--archive", location)
    assert out.returncode == 2  # the archive could not be read (docs/archive.md)
    assert "Traceback" not in out.stderr
    assert "s3://bucket[/prefix]" in out.stderr


def test_an_archive_directory_that_is_not_there_could_not_be_read(tmp_path: Path) -> None:
    """docs/archive.md: exit 1 is problems found in an archive, 2 a store that could not be
    read. A mistyped path is the second, not an archive someone emptied."""
    for missing in (tmp_path / "nowhere", tmp_path / "a-file"):
        if missing.name == "a-file":
            missing.write_text("x")
        out = agentauth("audit", "verify", "--archive", str(missing))
        assert out.returncode == 2, out.stdout + out.stderr
        assert f"no archive directory at {missing}" in out.stderr


def test_a_refused_admin_token_is_not_printed(tmp_path: Path) -> None:
    """``keys`` builds RegistrySettings from the environment; pydantic's error would print
    the token it refuses (too short) whole."""
    out = agentauth(
        "keys",
        "list",
        env={
            "DATABASE_URL": UNREACHABLE,
            "AGENTAUTH_DATA_DIR": str(tmp_path / "data"),
            "AGENTAUTH_ADMIN_TOKEN": "hunter2-admin",
        },
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "hunter2-admin" not in out.stdout + out.stderr
    assert "error: admin_token: String should have at least 16 characters" in out.stderr


SECRET = "Zq3" * 14 + "X"  # 43 characters, as secrets.token_urlsafe(32)


@pytest.mark.parametrize(
    ("model", "values"),
    [
        # A model-level check fails: pydantic prints the whole input, secrets included.
        (
            RegistrySettings,
            {
                "database_url": "postgresql://u@h/d",
                "redis_url": "redis://h",
                "data_dir": "/tmp",
                "issuer": "http://127.0.0.1:8000/registry",
                "origins": ["https://approve.example.com"],  # not under rp_id localhost
                "admin_token": SECRET,
            },
        ),
        (
            VerifierSettings,
            {
                "database_url": "postgresql://u@h/d",
                "redis_url": "redis://h",
                "issuer": "http://127.0.0.1:8000/registry",
                "dpop_nonces": True,
                "nonce_secret": SECRET[:20],  # too short: refused, and must not be shown
            },
        ),
        # A PIN written as a number (YAML reads it as one) is refused by its own field.
        (SignerSettings, {"backend": "pkcs11", "pkcs11_pin": 73194628}),
    ],
)
def test_a_settings_error_does_not_show_the_secrets_it_was_given(
    model: Any, values: dict[str, object]
) -> None:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(values)
    assert SECRET[:12] not in str(caught.value) and "73194628" not in str(caught.value)


class _NoRay(SimpleNamespace):
    """Stands in for ``ray`` in ``up``: a bad configuration is refused before Ray starts."""

    serve = None

    def init(self, **_: object) -> None:
        raise AssertionError("Ray started before the settings were checked")

    def is_initialized(self) -> bool:
        return False


def test_up_refuses_bad_settings_before_starting_ray_and_without_the_admin_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With AGENTAUTH_ORIGINS set and the default RP ID the registry's settings are refused;
    pydantic's error would print the tail of its input, the admin token of
    <data>/admin-token."""
    data = tmp_path / "data"
    monkeypatch.setitem(sys.modules, "ray", _NoRay())
    monkeypatch.setenv("AGENTAUTH_DATA_DIR", str(data))
    monkeypatch.setenv("AGENTAUTH_ORIGINS", "https://approve.example.com")
    monkeypatch.setenv("DATABASE_URL", UNREACHABLE)  # not embedded, and not reached
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    for name in ("AGENTAUTH_ADMIN_TOKEN", "AGENTAUTH_RP_ID"):
        monkeypatch.delenv(name, raising=False)
    assert cli.main(["up"]) == 2
    out = capsys.readouterr()
    token = (data / "admin-token").read_text().strip()
    assert token[-12:] not in out.out + out.err
    assert out.err.startswith("error: Value error, origin https://approve.example.com cannot")


@pytest.mark.parametrize(
    "command",
    [("migrate",), ("grants", "list"), ("keys", "list"), ("revoke", "token", "tok_1"), ("up",)],
)
def test_the_base_install_names_the_server_extra(command: tuple[str, ...], tmp_path: Path) -> None:
    """`pip install agentauth` (the SDK) installs this command too, without the server
    extra: a command that needs it says which install it needs, not a ModuleNotFoundError."""
    blocked = sorted(cli._SERVER_MODULES)
    code = (
        "import sys\n"
        f"sys.modules.update(dict.fromkeys({blocked!r}))\n"  # None: every import of them fails
        "from agentauth.cli import main\n"
        f"sys.exit(main({list(command)!r}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "DATABASE_URL": UNREACHABLE, "AGENTAUTH_DATA_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    assert f"error: `agentauth {command[0]}` needs the server extra (" in out.stderr
    assert "pip install 'agentauth[server]'" in out.stderr


def test_the_server_modules_are_the_server_extras() -> None:
    """Each distribution of the server extra has its import name in cli._SERVER_MODULES."""
    import tomllib
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    root = Path(__file__).resolve().parent.parent
    extra = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    imports: dict[str, set[str]] = {}
    for module, dists in metadata.packages_distributions().items():
        for dist in dists:
            imports.setdefault(canonicalize_name(dist), set()).add(module)
    for spec in extra["server"]:
        name = canonicalize_name(Requirement(spec).name)
        assert imports[name] & cli._SERVER_MODULES, f"{name}: add its import name"


def test_a_data_directory_that_cannot_be_made_is_a_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without DATABASE_URL the embedded PostgreSQL lives under AGENTAUTH_DATA_DIR."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    for data in (afile, afile / "below"):
        out = subprocess.run(
            [sys.executable, "-m", "agentauth.cli", "migrate"],
            env={**env, "AGENTAUTH_DATA_DIR": str(data)},
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        assert out.returncode == 2, out.stdout + out.stderr
        assert "Traceback" not in out.stderr
        assert f"cannot make the embedded PostgreSQL's data directory {data}" in out.stderr
    # `up` makes the data directory first, before Ray.
    monkeypatch.setitem(sys.modules, "ray", _NoRay())
    monkeypatch.setenv("AGENTAUTH_DATA_DIR", str(afile))
    assert cli.main(["up"]) == 2
    assert capsys.readouterr().err.startswith(f"error: cannot make the data directory {afile}: ")


@pytest.mark.postgres
@pytest.mark.asyncio(loop_scope="session")
async def test_a_database_url_that_is_not_utf8_is_a_message(database_url: str) -> None:
    """A byte that is not UTF-8 in DATABASE_URL reaches Python as a lone surrogate; asyncpg
    failed on it with a traceback once connected to the server."""
    async with new_database(database_url, "utf8") as url:
        out = agentauth("migrate", env={"DATABASE_URL": with_database(url, "x\udcff")})
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    assert "not a valid PostgreSQL URL (not UTF-8 text)" in out.stderr


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.asyncio(loop_scope="session")
async def test_an_id_that_is_not_utf8_is_refused(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    """A byte that is not UTF-8 on the command line reaches Python as a lone surrogate,
    which asyncpg cannot send: each admin command failed with its traceback."""
    async with new_database(database_url, "ids") as url:
        env = {"DATABASE_URL": url, "REDIS_URL": redis_url, "AGENTAUTH_DATA_DIR": str(tmp_path)}
        assert agentauth("migrate", env=env).returncode == 0
        for command in (
            ("revoke", "token"),
            ("agents", "disable"),
            ("humans", "recover"),
            ("providers", "reinstate"),
            ("providers", "rotate-secret"),
        ):
            out = agentauth(*command, "tok\udcff", env=env)
            assert out.returncode == 2, out.stdout + out.stderr
            assert "Traceback" not in out.stderr
            assert "argument id: not UTF-8 text" in out.stderr


def test_schemas_into_a_path_that_is_a_file_is_a_message(tmp_path: Path) -> None:
    target = tmp_path / "afile"
    target.write_text("x")
    out = agentauth("schemas", str(target))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.startswith("error: cannot write the schemas into ")


def test_a_burst_of_signals_stops_agentauth_up_every_time() -> None:
    """`agentauth up` waits for Ctrl+C or SIGTERM in ``_wait_for_stop``. Its handlers set a
    threading.Event, whose lock the main thread held while waking from that Event's wait:
    a second signal then (Ctrl+C pressed twice, or `timeout` forwarding the signal it got)
    ran the handler into that lock, and the stack never stopped (found by hand on
    2026-11-30, three signals; a burst of 300 hung the old wait in 1 run of 10)."""
    # SIGINT ignored until _wait_for_stop takes it over: one that came before would end
    # the child with a KeyboardInterrupt instead. Bursts then come until it has stopped.
    code = (
        "import signal\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "from agentauth.cli import _wait_for_stop\n"
        "print('waiting', flush=True)\n"
        "_wait_for_stop()\n"
        "print('stopped', flush=True)\n"
    )
    for _ in range(5):
        with subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True
        ) as waiting:
            assert waiting.stdout is not None
            try:
                assert waiting.stdout.readline() == "waiting\n"
                deadline = time.monotonic() + 20
                while waiting.poll() is None and time.monotonic() < deadline:
                    for _ in range(300):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(waiting.pid, signal.SIGINT)
                    time.sleep(0.05)
                assert waiting.poll() is not None, "still waiting after 20 s of signals"
                # (Its exit status is not asserted: a signal still coming as the
                # interpreter shuts down, its handlers restored to the default, ends it by
                # SIGINT.)
                assert waiting.stdout.read() == "stopped\n"
            finally:
                waiting.kill()
