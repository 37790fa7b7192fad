"""The daemon's view of the directory: the blocking store run in its own thread pool.

LDAP round trips and password hashing must never block the reactor, and must
not starve the reactor's default pool (which also serves name lookups), so
the directory owns a dedicated ``ThreadPool``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar, cast

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from mailappliance.directory import DirectoryStore, DirectoryUnavailable, Subscriber
from mailappliance.directory.ldif import STALE
from mailappliance.directory.passwords import password_candidates
from mailappliance.metrics import METRICS

T = TypeVar("T")


def _timed(function: Callable[..., T], *args: object) -> T:
    """Run a store call, recording its latency and result for /metrics."""
    operation = getattr(function, "__name__", "call").lstrip("_")
    started = time.monotonic()
    result = "error"
    try:
        value = function(*args)
        result = "ok"
        return value
    except DirectoryUnavailable:
        result = "unavailable"
        raise
    finally:
        METRICS.count("mailappliance_directory_requests_total", operation=operation, result=result)
        METRICS.observe("mailappliance_directory_seconds", time.monotonic() - started, operation=operation)


class SharedLookups(Generic[T]):
    """Calls in flight at the same time for the same key share one call (of result ``T``).

    A burst of mail for one address (a mailing list's run, a spam wave, a
    load test) then costs one store call and one thread hop instead of one
    each; a burst of logins with the same password, one password hash.
    Nothing is cached: a call that starts after the shared one finished makes
    a new one, so directory changes are seen as soon as before.
    """

    def __init__(self) -> None:
        self._waiting: dict[Hashable, list[Deferred[T]]] = {}

    def __call__(self, key: Hashable, start: Callable[[], Deferred[T]]) -> Deferred[T]:
        d: Deferred[T] = Deferred()
        if key in self._waiting:
            self._waiting[key].append(d)
            return d
        self._waiting[key] = [d]
        maybeDeferred(start).addBoth(self._finish, key)  # a call that raises still releases the key
        return d

    def _finish(self, result: T | Failure, key: Hashable) -> None:
        for d in self._waiting.pop(key):
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)


class Directory:
    """Asynchronous lookups over a DirectoryStore; every method returns a Deferred."""

    def __init__(self, store: DirectoryStore, reactor: IReactorFromThreads, threads: int = 8) -> None:
        self.store = store
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=1, maxthreads=threads, name="directory")
        self._address_lookups = SharedLookups[Subscriber | None]()
        if hasattr(store, "server_states"):  # LDAP: which server serves, which are marked down
            METRICS.labelled_gauge(
                "mailappliance_directory_server_up", "1 unless the directory server is marked down, by server.",
                lambda: [({"server": url}, float(up)) for url, up in self.server_states()])
            METRICS.labelled_gauge(
                "mailappliance_directory_server_in_use", "1 for the directory server lookups go to, by server.",
                lambda: [({"server": url}, float(url == self.current_server())) for url, _ in self.server_states()])

    def current_server(self) -> str:
        """The directory server lookups go to first (an LDAP URL); "" for the embedded
        LDIF directory, or while every LDAP server is marked down.  Cheap: no I/O."""
        current = getattr(self.store, "current_server", None)
        return current() if current is not None else ""

    def server_states(self) -> list[tuple[str, bool]]:
        """(url, up) of every configured LDAP server, in order; [] for the LDIF directory."""
        states = getattr(self.store, "server_states", None)
        return states() if states is not None else []

    def start(self) -> None:
        self._pool.start()

    def stop(self) -> None:
        self._pool.stop()
        self.store.close()

    def _run(self, function: Callable[..., T], *args: object) -> Deferred[T]:
        return deferToThreadPool(self._reactor, self._pool, _timed, function, *args)

    def find_by_login(self, login: str) -> Deferred[Subscriber | None]:
        return self._run(self.store.find_by_login, login)

    def find_by_address(self, address: str) -> Deferred[Subscriber | None]:
        """The recipient lookup of every RCPT (concurrent ones for one address are shared).
        A store that holds the directory in memory (LDIF) answers at once while its file
        is unchanged: a thread hop costs more than the lookup."""
        in_memory = getattr(self.store, "find_by_address_if_current", None)
        if in_memory is not None:
            started = time.monotonic()
            found = in_memory(address)
            if found is not STALE:
                METRICS.count("mailappliance_directory_requests_total", operation="find_by_address", result="ok")
                METRICS.observe("mailappliance_directory_seconds", time.monotonic() - started,
                                operation="find_by_address")
                return succeed(cast(Subscriber | None, found))
        return self._address_lookups(address, lambda: self._run(self.store.find_by_address, address))

    def find_by_certificate(self, der: bytes) -> Deferred[Subscriber | None]:
        return self._run(self.store.find_by_certificate, der)

    def authenticate(self, login: str, password: str) -> Deferred[Subscriber | None]:
        """The subscriber if ``login``/``password`` are right, else None (one thread hop)."""
        return self._run(self._authenticate, login, password)

    def _authenticate(self, login: str, password: str) -> Subscriber | None:
        """The password in its normal form, then as typed if that differs (hashes
        stored before normalisation).  A login that finds nobody costs the same
        checks, so the time of a refusal does not tell whether the login exists."""
        subscriber = self.store.find_by_login(login)
        for candidate in password_candidates(password):
            if subscriber is None:
                self.store.verify_unknown(candidate)
            elif self.store.verify_password(subscriber, candidate):
                return subscriber
        return None
