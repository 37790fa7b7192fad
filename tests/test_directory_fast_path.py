"""RCPT lookups in an LDIF directory answer from memory while the file is unchanged (no thread hop),
and a changed file always goes through the directory's thread, which reads it again."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet import reactor

from mailappliance.directory import ldif as ldif_module
from mailappliance.directory.ldif import RECHECK_SECONDS, STALE, LdifStore
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


def test_the_file_is_looked_at_once_per_recheck_interval_and_before_every_no(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Within RECHECK_SECONDS of a stat that found the file unchanged, a found entry is answered
    without another stat (an entry another process just removed is still found, as from a cache);
    after it, the change is seen; and an address not in memory is always checked against the
    file first, so a subscriber just added is never refused."""
    path = tmp_path / "users.ldif"
    store = LdifStore(path)
    store.add_subscriber("alice", "alice@example.org", "alice-password")
    assert store.find_by_address("alice@example.org") is not None  # read once
    now = [1000.0]
    monkeypatch.setattr(ldif_module.time, "monotonic", lambda: now[0])
    assert store.find_by_address_if_current("alice@example.org") not in (None, STALE)  # the stat at 1000

    other = LdifStore(path)
    other.delete_subscriber("alice")
    other.add_subscriber("zoe", "zoe@example.org", "zoe-password")
    now[0] += RECHECK_SECONDS / 2
    assert store.find_by_address_if_current("alice@example.org") not in (None, STALE), \
        "a found entry within the recheck interval should not have needed a stat"
    assert store.find_by_address_if_current("zoe@example.org") is STALE, \
        "an address missing from memory must be checked against the file before a 'no'"
    now[0] += RECHECK_SECONDS
    assert store.find_by_address_if_current("alice@example.org") is STALE, \
        "after the recheck interval the changed file must be noticed"
