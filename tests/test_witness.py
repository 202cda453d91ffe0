"""The witness file of ``audit verify --witness``: its comparisons, and reading and writing it."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
from pathlib import Path

import pytest

from agentauth._witness import Seen, WitnessError, advance, compare, load, save, vanished
from agentauth.protocol import EMPTY_ROOT, b64url_encode

R40 = hashlib.sha256(b"forty").digest()
R80 = hashlib.sha256(b"eighty").digest()


def test_the_same_root_at_the_remembered_size_passes() -> None:
    assert compare(Seen(40, R40), size=80, root=R40) is None
    assert compare(Seen(40, R40), size=40, root=R40) is None
    assert compare(Seen(0, EMPTY_ROOT), size=0, root=EMPTY_ROOT) is None
    assert compare(None, size=7, root=None) is None  # a chain new since the last run


def test_another_root_at_the_remembered_size_is_a_rewrite() -> None:
    wrong = compare(Seen(40, R40), size=80, root=R80)
    assert wrong is not None
    assert f"40 event(s) with root {b64url_encode(R40)}" in wrong
    assert f"the root there is now {b64url_encode(R80)}" in wrong
    assert "rewritten" in wrong


def test_a_chain_shorter_than_remembered_fails() -> None:
    wrong = compare(Seen(80, R80), size=40, root=None)
    assert wrong is not None and "only 40 verify now" in wrong


def test_no_root_at_the_remembered_size_fails() -> None:
    # An archive whose segments no longer end there: re-cut, or that segment failed.
    wrong = compare(Seen(40, R40), size=80, root=None)
    assert wrong is not None and "no verified root at 40" in wrong


def test_a_remembered_chain_that_is_gone_fails() -> None:
    remembered = {"a": Seen(40, R40), "b": Seen(80, R80)}
    assert vanished(remembered, {"a", "b", "c"}) == {}
    assert vanished(remembered, {"a"}) == {
        "b": "the witness recorded 80 event(s), and the chain is gone"
    }


def test_the_witness_never_moves_back() -> None:
    remembered = {"a": Seen(40, R40), "b": Seen(80, R80)}
    verified = {"a": Seen(80, R80), "b": Seen(40, R40), "c": Seen(0, EMPTY_ROOT)}
    assert advance(remembered, verified) == {
        "a": Seen(80, R80),
        "b": Seen(80, R80),  # its latest checkpoint deleted, the events intact: kept
        "c": Seen(0, EMPTY_ROOT),
    }


def test_saved_privately_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "witness.json"
    assert load(path, of="database") is None  # the first run
    save(path, {"b": Seen(80, R80), "a": Seen(0, EMPTY_ROOT)}, of="database")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load(path, of="database") == {"a": Seen(0, EMPTY_ROOT), "b": Seen(80, R80)}
    assert json.loads(path.read_text())["chains"]["b"] == {
        "size": 80,
        "root": b64url_encode(R80),
    }
    save(path, {"a": Seen(40, R40)}, of="database")  # replaced whole
    assert load(path, of="database") == {"a": Seen(40, R40)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["witness.json"]  # no temporary left


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        '{"format": "agentauth.audit-witness.v1", "of": "database", "chains": []}',
        '{"format": "agentauth.audit-witness.v2", "of": "database", "chains": {}}',
        '{"format": "agentauth.audit-witness.v1", "of": "database", "chains": {}, "extra": 1}',
        '{"format": "agentauth.audit-witness.v1", "of": "database",'
        ' "chains": {"a": {"size": -1, "root": "' + b64url_encode(R40) + '"}}}',
        '{"format": "agentauth.audit-witness.v1", "of": "database",'
        ' "chains": {"a": {"size": "40", "root": "' + b64url_encode(R40) + '"}}}',
        '{"format": "agentauth.audit-witness.v1", "of": "database",'
        ' "chains": {"a": {"size": 40, "root": "' + "A" * 42 + 'B"}}}',  # spare bits set
        '{"format": "agentauth.audit-witness.v1", "of": "database",'
        ' "chains": {"a": {"size": 40, "root": "AAAA"}}}',
    ],
    ids=[
        "empty",
        "not-json",
        "chains-a-list",
        "unknown-format",
        "extra-field",
        "negative-size",
        "size-a-string",
        "root-not-canonical",
        "root-too-short",
    ],
)
def test_a_corrupt_witness_is_an_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "witness.json"
    path.write_text(text)
    path.chmod(0o600)
    with pytest.raises(WitnessError, match="is corrupt"):
        load(path, of="database")


def test_an_unreadable_or_foreign_witness_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "witness.json"
    save(path, {"a": Seen(40, R40)}, of="archive")
    with pytest.raises(WitnessError, match="records an archive, not a database"):
        load(path, of="database")
    path.chmod(0o620)  # anyone in the group could rewrite what it remembers
    with pytest.raises(WitnessError, match="writable by group or others"):
        load(path, of="archive")
    with pytest.raises(WitnessError, match="cannot read"):
        load(tmp_path, of="archive")
    with pytest.raises(WitnessError, match="cannot write"):
        save(tmp_path / "missing" / "witness.json", {}, of="archive")


def test_a_witness_another_user_owns_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its owner can rewrite what it remembers whatever its mode says (or chmod it), as
    group or others can a file they may write: 0600 and another user's was trusted."""
    path = tmp_path / "witness.json"
    save(path, {"a": Seen(40, R40)}, of="archive")
    if os.geteuid() == 0:
        os.chown(path, 54321, -1)  # root's own files pass; one of another user's must not
    else:
        real = os.geteuid()
        monkeypatch.setattr(os, "geteuid", lambda: real + 1)
    with pytest.raises(WitnessError, match="owned by uid"):
        load(path, of="archive")


def test_a_fifo_at_the_witness_path_is_an_error_not_a_wait_for_ever(tmp_path: Path) -> None:
    """open() of a FIFO waits for a writer, so the run hung before the regular-file check."""
    path = tmp_path / "witness.json"
    os.mkfifo(path, 0o600)
    outcome: list[BaseException | object] = []

    def read() -> None:
        try:
            outcome.append(load(path, of="archive"))
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(5)
    if reader.is_alive():  # release the blocked open: a writer arrives, at once
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(5)
        pytest.fail("load waited on a FIFO")
    assert isinstance(outcome[0], WitnessError)
    assert "not a regular file" in str(outcome[0])
