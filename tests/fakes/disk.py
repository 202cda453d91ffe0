"""What reached the disk: directory fsyncs, as a crash-safe file write needs them."""

from __future__ import annotations

import os
import stat

import pytest


def synced_directories(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, list[str]]]:
    """Records each directory fsync: the directory's inode and the names it held then."""
    synced: list[tuple[int, list[str]]] = []
    fsync = os.fsync

    def spy(fd: int) -> None:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            synced.append((st.st_ino, sorted(os.listdir(fd))))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return synced
