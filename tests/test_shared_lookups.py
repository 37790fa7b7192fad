"""Concurrent recipient lookups for one address share one store call; later ones do not."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed

from mailappliance.directory.threaded import SharedLookups


class Calls:
    def __init__(self) -> None:
        self.started: list[tuple[str, Deferred]] = []
        self.shared = SharedLookups()

    def lookup(self, key: str) -> Deferred:
        return self.shared(key, lambda: self._start(key))

    def _start(self, key: str) -> Deferred:
        d: Deferred = Deferred()
        self.started.append((key, d))
        return d


def test_lookups_in_flight_together_share_one_call_and_its_answer() -> None:
    """Lookups of one address in flight together share one call and get its answer; other addresses get their own."""
    calls = Calls()
    lookups = calls.lookup
    results: list[Any] = []
    for _ in range(3):
        lookups("alice@example.org").addCallback(results.append)
    lookups("bob@example.org").addCallback(results.append)
    assert [key for key, _ in calls.started] == ["alice@example.org", "bob@example.org"]
    calls.started[0][1].callback("ALICE")
    assert results == ["ALICE"] * 3
    calls.started[1][1].callback(None)
    assert results == ["ALICE"] * 3 + [None]


def test_a_lookup_after_the_shared_one_finished_asks_again() -> None:
    """A lookup after the shared call finished makes a new call: nothing is cached."""
    calls = Calls()
    lookups = calls.lookup
    lookups("alice@example.org")
    calls.started[0][1].callback("old entry")
    second: list[Any] = []
    lookups("alice@example.org").addCallback(second.append)
    assert len(calls.started) == 2  # nothing was cached
    calls.started[1][1].callback("changed entry")
    assert second == ["changed entry"]


def test_a_failure_reaches_every_waiting_lookup() -> None:
    """A failed shared call fails every lookup waiting on it."""
    calls = Calls()
    lookups = calls.lookup
    failures: list[Any] = []
    for _ in range(2):
        lookups("alice@example.org").addErrback(failures.append)
    calls.started[0][1].errback(ConnectionError("directory down"))
    assert [f.check(ConnectionError) for f in failures] == [ConnectionError, ConnectionError]


def test_a_call_that_answers_at_once_still_answers_the_caller() -> None:
    """A call whose Deferred has already fired still answers each caller."""
    lookups = SharedLookups()
    results: list[Any] = []
    lookups("a", lambda: succeed("A")).addCallback(results.append)
    lookups("a", lambda: succeed("A")).addCallback(results.append)
    assert results == ["A", "A"]


def test_a_call_that_raises_fails_its_callers_and_frees_the_key() -> None:
    """A call that raises fails its callers and does not block later lookups of the key."""
    lookups = SharedLookups()
    failures: list[Any] = []

    def broken() -> Deferred:
        raise RuntimeError("thread pool stopped")

    lookups("a", broken).addErrback(failures.append)
    assert failures and failures[0].check(RuntimeError)
    later: list[Any] = []
    lookups("a", lambda: succeed("A")).addCallback(later.append)
    assert later == ["A"]
