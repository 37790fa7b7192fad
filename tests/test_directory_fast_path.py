"""RCPT lookups in an LDIF directory answer from memory while the file is unchanged (no thread hop),
and a changed file always goes through the directory's thread, which reads it again."""

from __future__ import annotations

from pathlib import Path

from twisted.internet import reactor

from mailappliance.directory.ldif import STALE, LdifStore
from mailappliance.directory.threaded import Directory


def test_an_unchanged_file_answers_at_once_and_a_changed_one_in_the_thread(tmp_path: Path) -> None:
    """With the pool not even started, a lookup in a file already read fires at once; after another
    process changed the file the in-memory answer is refused (STALE) and the lookup waits for the pool."""
    path = tmp_path / "users.ldif"
    store = LdifStore(path)
    store.add_subscriber("alice", "alice@example.org", "alice-password")
    assert store.find_by_address("alice@example.org") is not None  # read once
    directory = Directory(store, reactor)  # type: ignore[arg-type]  # never started: no thread runs
    found = directory.find_by_address("ALICE@example.org")
    assert found.called and found.result is not None and found.result.uid == "alice"
    missing = directory.find_by_address("nobody@example.org")
    assert missing.called and missing.result is None

    LdifStore(path).add_subscriber("zoe", "zoe@example.org", "zoe-password")  # another process's change
    assert store.find_by_address_if_current("zoe@example.org") is STALE
    waiting = directory.find_by_address("zoe@example.org")
    assert not waiting.called  # only the directory's thread may read the changed file
    waiting.cancel()
    waiting.addErrback(lambda _: None)
    assert store.find_by_address("zoe@example.org") is not None
    assert store.find_by_address_if_current("zoe@example.org") is not STALE
