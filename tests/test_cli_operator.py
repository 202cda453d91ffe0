"""The operator's commands on the state they meet: a signer that is not the deployment's, a
database without the schema, a failing migration, bad flag values, and ``up``'s clean-up.

None of these starts Ray: ``up``'s pieces are driven with fakes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest
from conftest import new_database

from agentauth import cli


def agentauth(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentauth.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


async def _key_rows(url: str) -> list[str]:
    conn = await asyncpg.connect(url)
    try:
        return [r["backend"] for r in await conn.fetch("SELECT backend FROM signing_keys")]
    finally:
        await conn.close()


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.asyncio(loop_scope="session")
async def test_keys_rotate_refuses_a_signer_the_registry_cannot_open(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    """A key made with this host's signer must be one every replica can open: otherwise,
    once it signs, every token and checkpoint fails signer_unavailable."""
    async with new_database(database_url, "keys") as url:
        registry_dir = tmp_path / "registry-data"
        env = {"DATABASE_URL": url, "REDIS_URL": redis_url}
        assert agentauth("migrate", env=env).returncode == 0
        first = agentauth("keys", "list", env={**env, "AGENTAUTH_DATA_DIR": str(registry_dir)})
        assert first.returncode == 0, first.stderr
        assert len(await _key_rows(url)) == 1

        # An operator's laptop: the default data directory, without the registry's keys.
        elsewhere = tmp_path / "laptop"
        out = agentauth("keys", "rotate", env={**env, "AGENTAUTH_DATA_DIR": str(elsewhere)})
        assert out.returncode == 1, out.stdout + out.stderr
        assert "Traceback" not in out.stderr
        assert f"not in {elsewhere / 'keys'}" in out.stderr
        assert len(await _key_rows(url)) == 1
        assert not list((elsewhere / "keys").glob("*.pem"))

        # A deployment whose signer is a KMS named in its Serve args, not in this env.
        out = agentauth(
            "keys",
            "rotate",
            env={
                **env,
                "AGENTAUTH_DATA_DIR": str(registry_dir),
                "AGENTAUTH_SIGNER_BACKEND": "aws",
                "AGENTAUTH_SIGNER_KEY_ID": "alias/agentauth",
            },
        )
        assert out.returncode == 1, out.stdout + out.stderr
        assert "on the local backend and this command's signer is aws" in out.stderr
        assert len(await _key_rows(url)) == 1

        # Where the registry's keys are, it rotates; a second one at once is refused (one
        # is pending) with a message, not a traceback.
        out = agentauth("keys", "rotate", env={**env, "AGENTAUTH_DATA_DIR": str(registry_dir)})
        assert out.returncode == 0, out.stderr
        assert len(await _key_rows(url)) == 2
        again = agentauth("keys", "rotate", env={**env, "AGENTAUTH_DATA_DIR": str(registry_dir)})
        assert again.returncode == 1, again.stdout + again.stderr
        assert "Traceback" not in again.stderr
        assert again.stderr.startswith("error: ")
        assert len(await _key_rows(url)) == 2


class _FakeProcess(subprocess.Popen[bytes]):
    """A started page that never answers; a Popen, as ``_UIProcess.stop`` asserts."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self._child_created = False  # Popen.__del__ reads it
        self.returncode = None
        self.terminated = False

    def poll(self) -> int | None:
        return None

    def terminate(self) -> None:
        self.terminated = True

    def wait(self, timeout: float | None = None) -> int:
        return 0

    def kill(self) -> None:
        raise AssertionError("terminate was enough")


def test_ctrl_c_while_the_approval_page_starts_stops_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """``up`` can stop only what ``_start_ui`` returned: interrupted before that, the page's
    process must be stopped there, or it outlives ``up``."""
    import subprocess as subprocess_module

    import httpx

    started: list[_FakeProcess] = []

    class Recorded(_FakeProcess):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__()
            started.append(self)

    def interrupted(*args: object, **kwargs: object) -> object:
        raise KeyboardInterrupt

    monkeypatch.setattr(subprocess_module, "Popen", Recorded)
    monkeypatch.setattr(httpx, "get", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli._start_ui("http://127.0.0.1:1", 1)
    assert len(started) == 1 and started[0].terminated


# ``up`` with its servers and Ray replaced by fakes that record being stopped; Ray's fake
# receives a SIGTERM while it "starts". Run in a process of its own: before the fix the
# signal ended it on the spot.
_UP_WITH_FAKES = """
import os, signal, sys, types
from pathlib import Path
from agentauth import cli, store

log = Path(sys.argv[1])
def note(what):
    with log.open("a") as f:
        f.write(what + "\\n")

class Server:
    def __init__(self, name):
        self.name = name
    @property
    def url(self):
        return {"pg": "postgresql://u@127.0.0.1:1/x", "redis": "redis://127.0.0.1:1/0"}[self.name]
    def stop(self):
        note(self.name + " stopped")

store.EmbeddedPostgres = lambda directory: Server("pg")
store.EmbeddedRedis = lambda directory: Server("redis")
ray = types.ModuleType("ray")
ray.serve = types.ModuleType("ray.serve")
state = {"up": False}
def init(**kwargs):
    state["up"] = True
    note("ray started")
    os.kill(os.getpid(), signal.SIGTERM)
    import time; time.sleep(5)
    note("ray init returned")
ray.init = init
ray.is_initialized = lambda: state["up"]
ray.shutdown = lambda: note("ray stopped")
sys.modules["ray"] = ray
sys.modules["ray.serve"] = ray.serve
sys.exit(cli.main(["up"]))
"""


def test_sigterm_while_up_starts_stops_what_it_started(tmp_path: Path) -> None:
    log = tmp_path / "log"
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env["AGENTAUTH_DATA_DIR"] = str(tmp_path / "data")
    env.pop("AGENTAUTH_ADMIN_TOKEN", None)
    env.pop("AGENTAUTH_ORIGINS", None)
    out = subprocess.run(
        [sys.executable, "-c", _UP_WITH_FAKES, str(log)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert out.returncode == 143, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    assert log.read_text().splitlines() == [
        "ray started",
        "ray stopped",
        "redis stopped",
        "pg stopped",
    ]
    assert out.stdout.rstrip().endswith("stopped.")


@pytest.mark.parametrize(
    "argv",
    [
        ("audit", "verify", "--max-unsealed-age", "nan"),
        ("audit", "verify", "--max-unsealed-age", "inf"),
        ("audit", "verify", "--max-unsealed-age", "-1"),
        ("up", "--port", "0"),
        ("up", "--port", "70000"),
        ("up", "--ui-port", "-8080"),
        ("up", "--dashboard-port", "x"),
    ],
)
def test_bad_flag_values_are_refused_by_the_parser(
    argv: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused before anything runs (exit 2, argparse's usage line), never acted on: a NaN
    age compared with ``>`` is never exceeded, so it would pass every unsealed chain."""
    with pytest.raises(SystemExit) as exited:
        cli.build_parser().parse_args(argv)
    assert exited.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_good_flag_values_are_taken() -> None:
    args = cli.build_parser().parse_args(["audit", "verify", "--max-unsealed-age", "0"])
    assert args.max_unsealed_age == 0.0
    args = cli.build_parser().parse_args(["up", "--port", "65535", "--ui-port", "1"])
    assert (args.port, args.ui_port) == (65535, 1)


@pytest.mark.postgres
@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize(
    "command", [("providers", "list"), ("humans", "list"), ("audit", "verify")]
)
async def test_a_database_without_the_schema_says_to_migrate(
    database_url: str, command: tuple[str, ...], tmp_path: Path
) -> None:
    async with new_database(database_url, "empty") as url:
        out = agentauth(*command, env={"DATABASE_URL": url, "AGENTAUTH_DATA_DIR": str(tmp_path)})
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    assert "run `agentauth migrate`" in out.stderr


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.asyncio(loop_scope="session")
async def test_admin_commands_leave_pending_migrations_to_agentauth_migrate(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    """Some migrations hold a busy table's lock while they rewrite it (docs/runbook.md): an
    admin command from a newer install must not apply them on the way, unannounced."""
    async with new_database(database_url, "pending") as url:
        env = {"DATABASE_URL": url, "REDIS_URL": redis_url, "AGENTAUTH_DATA_DIR": str(tmp_path)}
        for command in (("keys", "list"), ("revoke", "token", "tok_1")):
            out = agentauth(*command, env=env)
            assert out.returncode == 1, out.stdout + out.stderr
            assert "Traceback" not in out.stderr
            assert "lacks migrations 0001_initial.sql," in out.stderr
            assert "agentauth migrate" in out.stderr
        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetchval("SELECT to_regclass('schema_migrations')") is None
        finally:
            await conn.close()
        assert agentauth("migrate", env=env).returncode == 0
        out = agentauth("keys", "list", env=env)
        assert out.returncode == 0, out.stderr


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.asyncio(loop_scope="session")
async def test_an_admin_command_before_the_first_start_makes_no_signing_key(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    """Run against a database no registry has started on, `providers add` created the first
    signing key with this host's signer: a key file in the operator's data directory, which
    a deployment whose signer is a KMS (named in its Serve args) could not open, so every
    token and checkpoint was refused until a rotation. Only `keys` creates one."""
    async with new_database(database_url, "nokey") as url:
        laptop = tmp_path / "laptop"
        env = {"DATABASE_URL": url, "REDIS_URL": redis_url, "AGENTAUTH_DATA_DIR": str(laptop)}
        assert agentauth("migrate", env=env).returncode == 0
        out = agentauth("providers", "add", "shop", "--audience", "https://shop.example", env=env)
        assert out.returncode == 0, out.stdout + out.stderr
        out = agentauth("providers", "suspend", "shop", "--reason", "audit", env=env)
        assert out.returncode == 0, out.stdout + out.stderr
        assert await _key_rows(url) == []
        assert not list((laptop / "keys").glob("*.pem"))
        # `keys` still makes the first one, as documented.
        assert agentauth("keys", "list", env=env).returncode == 0
        assert len(await _key_rows(url)) == 1


@pytest.mark.postgres
@pytest.mark.asyncio(loop_scope="session")
async def test_a_role_without_rights_on_the_tables_is_said_in_one_line(
    database_url: str, tmp_path: Path
) -> None:
    """A database refusal other than a missing schema (a role the operator may not read
    with, here) printed asyncpg's traceback from the list commands."""
    role = f"aa_norights_{os.getpid()}"
    async with new_database(database_url, "rights") as url:
        env = {"DATABASE_URL": url, "AGENTAUTH_DATA_DIR": str(tmp_path)}
        assert agentauth("migrate", env=env).returncode == 0
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(f"CREATE ROLE {role} LOGIN")
            try:
                limited = url.replace("//postgres:", f"//{role}:", 1)
                limited = limited.replace("//postgres@", f"//{role}@", 1)
                assert limited != url, url
                out = agentauth("providers", "list", env={**env, "DATABASE_URL": limited})
                assert out.returncode == 2, out.stdout + out.stderr
                assert "Traceback" not in out.stderr
                assert "error: the database refused: InsufficientPrivilegeError" in out.stderr
            finally:
                await conn.execute(f"DROP OWNED BY {role}")
                await conn.execute(f"DROP ROLE {role}")
        finally:
            await conn.close()


def test_embedded_postgres_refuses_a_path_too_long_for_its_socket(tmp_path: Path) -> None:
    """pgserver trusts every connection on its socket; with a data directory too long for
    one it would put the socket in the runtime directory (often a 0755 fallback under /tmp),
    where every user of the host could connect as the superuser."""
    data = tmp_path / ("d" * (120 - len(str(tmp_path))))
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
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
    assert "too long a path for its socket" in out.stderr
    assert not (data / "postgres" / "PG_VERSION").exists()


def test_no_documented_command_passes_a_secret_on_its_command_line() -> None:
    """An argument is in every local user's process list (``ps``, /proc/PID/cmdline), and
    a literal one in shell history: a documented command leaves a secret in its variable,
    which the commands read themselves, rather than expanding it into an argument."""
    import re

    root = Path(__file__).resolve().parents[1]
    secret_argument = re.compile(
        r"--[a-z-]+[ =]\"?\$\{?[A-Z_]*(URL|TOKEN|SECRET|PASSWORD|PIN)\b", re.MULTILINE
    )
    found = [
        f"{path.relative_to(root)}: {match.group(0)}"
        for path in [root / "README.md", *sorted((root / "docs").glob("*.md"))]
        for match in secret_argument.finditer(path.read_text(encoding="utf-8"))
    ]
    assert found == []


async def _rotated_from_the_cli(
    database_url: str, redis_url: str, data_dir: Path
) -> tuple[str, list[asyncpg.Record]]:
    """`agentauth keys rotate` on a new database's first key: its output, and the two
    keys' rows (created_at, activates_at, retires_at), the old one first."""
    async with new_database(database_url, "rotated") as url:
        env = {"DATABASE_URL": url, "REDIS_URL": redis_url, "AGENTAUTH_DATA_DIR": str(data_dir)}
        assert agentauth("migrate", env=env).returncode == 0
        assert agentauth("keys", "list", env=env).returncode == 0
        out = agentauth("keys", "rotate", env=env)
        assert out.returncode == 0, out.stderr
        conn = await asyncpg.connect(url)
        try:
            rows = await conn.fetch(
                "SELECT created_at, activates_at, retires_at FROM signing_keys"
                " ORDER BY activates_at"
            )
        finally:
            await conn.close()
    assert len(rows) == 2
    return out.stdout, rows


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.asyncio(loop_scope="session")
async def test_keys_rotate_keeps_the_old_key_until_any_deployments_tokens_expired(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    """The deployment's token_lifetime is in its Serve args, which this command does not
    see: with its own default (300 s) it retired the old key 360 s after the new one took
    over, while a deployment's last tokens under the old key, up to an hour long, were
    still valid, and every verifier then refused them (their kid no longer published)."""
    from agentauth.registry import RegistrySettings

    longest = RegistrySettings.model_fields["token_lifetime"].metadata
    most = next(m.le for m in longest if hasattr(m, "le"))
    _, (old, new) = await _rotated_from_the_cli(database_url, redis_url, tmp_path)
    assert new["retires_at"] is None
    # Its last token is signed just before the new key activates, and lives `most` s,
    # plus the verifiers' leeway.
    assert old["retires_at"] >= new["activates_at"] + most + 60


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.asyncio(loop_scope="session")
async def test_keys_rotate_publishes_the_new_key_as_long_as_any_deployment_does(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    """The deployment's key_publish_ahead is in its Serve args, which this command does not
    see: with its own default it published the new key 60 s before it signed, while a
    deployment set to publish it longer (its verifiers and providers fetch keys less often)
    has readers that had not fetched it yet, and they refused its first tokens."""
    from agentauth.registry import RegistrySettings

    bounds = RegistrySettings.model_fields["key_publish_ahead"].metadata
    most = next((m.le for m in bounds if hasattr(m, "le")), None)
    assert most is not None, "unbounded: no interval covers every deployment's"
    out, (_, new) = await _rotated_from_the_cli(database_url, redis_url, tmp_path)
    assert f"signs in {most} s" in out
    assert new["activates_at"] - new["created_at"] >= most
