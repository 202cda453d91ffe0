"""Packaging promises: a small public surface, committed schemas, a Ray-free base install."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest

import agentauth
from agentauth import protocol
from agentauth.schemas import render

ROOT = Path(__file__).resolve().parent.parent


def test_public_all_is_complete_and_exact() -> None:
    public = {name for name in vars(protocol) if not name.startswith("_")}
    modules = {name for name in public if type(vars(protocol)[name]).__name__ == "module"}
    assert set(protocol.__all__) == public - modules
    assert len(protocol.__all__) == len(set(protocol.__all__))


def test_sdk_examples_import_as_written() -> None:
    from agentauth import Capability

    assert Capability.read("calendar").to_document() == {"kind": "read", "resource": "calendar"}
    assert agentauth.Capability is protocol.Capability


def test_base_install_pulls_in_no_server_dependency() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"]).lower()
    for server_only in ("ray", "asyncpg", "redis", "nicegui", "boto3", "webauthn"):
        assert server_only not in base
    # Every dependency carries a lower bound.
    extras = [spec for group in project["optional-dependencies"].values() for spec in group]
    for spec in project["dependencies"] + extras:
        assert ">=" in spec, spec
    # Importing the protocol and SDK side loads no server module.
    code = (
        "import sys, agentauth, agentauth.protocol; "
        "bad = [m for m in ('ray', 'asyncpg', 'redis', 'nicegui', 'boto3') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_py_typed_ships() -> None:
    assert (ROOT / "agentauth" / "py.typed").exists()


@pytest.mark.parametrize("name", sorted(render()))
def test_committed_schema_is_current(name: str) -> None:
    committed = ROOT / "schemas" / name
    assert committed.exists(), f"run: python -m agentauth.schemas ({name} missing)"
    assert committed.read_text(encoding="utf-8") == render()[name], (
        f"schemas/{name} is stale: run python -m agentauth.schemas"
    )
    jsonschema.Draft202012Validator.check_schema(json.loads(committed.read_text()))


def test_schemas_accept_real_documents_and_refuse_bad_ones() -> None:
    schemas = {name.removesuffix(".schema.json"): json.loads(t) for name, t in render().items()}
    capability = protocol.Capability.transact(
        "payments/*", max_amount="50", currency="USD", payees=["acme"]
    ).to_document()
    jsonschema.validate(capability, schemas["capability"])
    envelope = protocol.Envelope(
        rate_limits=[protocol.RateLimit(max_count=5, window_seconds=3600)],
        spend_limits=[protocol.SpendLimit(amount="200", currency="USD", period="day")],
    ).model_dump(mode="json")
    jsonschema.validate(envelope, schemas["envelope"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"kind": "transact", "resource": "a/*/b"}, schemas["capability"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(
            {"rate_limits": [{"max_count": 0, "window_seconds": 1}]}, schemas["envelope"]
        )


def _declared_closure() -> set[str]:
    """Every distribution `pip install -e '.[server,dev]'` brings in, from the installed
    metadata: the project's requirements and, transitively, theirs (extras followed)."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    groups = project["optional-dependencies"]
    pending = [Requirement(s) for s in project["dependencies"] + groups["server"] + groups["dev"]]
    seen: set[tuple[str, frozenset[str]]] = set()
    names: set[str] = set()
    while pending:
        req = pending.pop()
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        names.add(key[0])
        try:
            requires = metadata.requires(req.name) or []
        except metadata.PackageNotFoundError:
            continue  # not installed here: nothing to follow
        for text in requires:
            inner = Requirement(text)
            extras = req.extras or {""}
            if inner.marker is None or any(inner.marker.evaluate({"extra": e}) for e in extras):
                pending.append(inner)
    return names


def test_every_package_the_tests_import_is_declared() -> None:
    # `./scripts/test` installs '.[server,dev]' on a fresh machine and runs every test: a
    # package that is only installed here by chance fails there at import.
    import ast
    from importlib import metadata

    from packaging.utils import canonicalize_name

    local = {"agentauth", "tests"}
    for folder in (ROOT, ROOT / "tests", ROOT / "bench", ROOT / "chaos"):
        local |= {p.stem for p in folder.glob("*.py")} | {p.name for p in folder.iterdir()}
    imported: dict[str, str] = {}
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top not in sys.stdlib_module_names and top not in local:
                    imported.setdefault(top, path.name)
    declared = _declared_closure()
    providers = metadata.packages_distributions()
    missing = {
        f"{module} (in {where})"
        for module, where in imported.items()
        if not {canonicalize_name(d) for d in providers.get(module, [])} & declared
    }
    assert not missing, f"imported by tests, not in the project's dependencies: {missing}"


def test_the_wheel_carries_every_migration(tmp_path: Path) -> None:
    """The registry applies the SQL files of ``default_migrations_dir()`` as it starts. They
    lay outside the package, so a wheel had none: installed from it, the registry found
    nothing to apply and took a bare database as up to date."""
    import shutil
    import zipfile

    from agentauth.store import default_migrations_dir, discover

    root = Path(agentauth.__file__).resolve().parents[1]
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (root / name).exists():
            shutil.copy(root / name, source / name)
    shutil.copytree(
        root / "agentauth", source / "agentauth", ignore=shutil.ignore_patterns("__pycache__")
    )
    subprocess.run(
        [
            # Built as pip builds it for an install: in its own environment, with the
            # setuptools pyproject.toml asks for (from the package index, as any install).
            *(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps"),
            *("-w", str(tmp_path / "dist"), str(source)),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("agentauth-*.whl")
    shipped = {
        name.rsplit("/", 1)[1]
        for name in zipfile.ZipFile(wheel).namelist()
        if name.startswith("agentauth/store/migrations/") and name.endswith(".sql")
    }
    assert shipped == {m.name for m in discover(default_migrations_dir())}
    assert len(shipped) >= 16
