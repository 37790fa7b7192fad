"""The subscribers the unit tests share, and an in-memory directory that holds them.

The daemon tests create the same people with ``mailappliance-admin`` (alice,
bob); here they are records, so protocol tests run without a backend.  The
directory stands in only for the store: the credential checker in front of it
is the real :class:`SubscriberChecker` with its cache and throttle, as in
production.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from mailappliance.credentials import SubscriberChecker
from mailappliance.directory import DirectoryUnavailable, Subscriber
from mailappliance.throttle import AuthThrottle
from mailappliance.settings import ThrottleSettings

ALICE_CERTIFICATE = b"DER of alice's client certificate"  # what the directory stores; tests never parse it

ALICE = Subscriber(dn="uid=alice,ou=people,dc=example,dc=org", uid="alice", mail="alice@example.org",
                   aliases=("a.liddell@example.org", "postmaster@example.org"),
                   certificates=(ALICE_CERTIFICATE,))
BOB = Subscriber(dn="uid=bob,ou=people,dc=example,dc=org", uid="bob", mail="bob@example.org")
CAROL = Subscriber(dn="uid=carol,ou=people,dc=example,dc=org", uid="carol", mail="carol@example.org",
                   disabled=True)
SUBSCRIBERS = (ALICE, BOB, CAROL)
PASSWORDS = {"alice": "alice-password", "bob": "correct horse battery", "carol": "carol-password"}


class InMemoryDirectory:
    """The Directory calls that sessions and the checker make, answered from records
    at once (Deferreds that have fired).  Lookups are case-insensitive, like the
    backends; ``authenticate`` returns a disabled subscriber too (the checker refuses
    it).  With ``up = False`` every call fails with DirectoryUnavailable."""

    def __init__(self, subscribers: tuple[Subscriber, ...] = SUBSCRIBERS,
                 passwords: dict[str, str] | None = None) -> None:
        self.subscribers = subscribers
        self.passwords = dict(PASSWORDS if passwords is None else passwords)
        self.up = True

    def _answer(self, subscriber: Subscriber | None) -> "Deferred[Subscriber | None]":
        if not self.up:
            return fail(DirectoryUnavailable("ldap://127.0.0.1:389 timed out"))
        return succeed(subscriber)

    def _by_login(self, login: str) -> Subscriber | None:
        wanted = login.lower()
        return next((s for s in self.subscribers if wanted in (s.uid.lower(), s.mail.lower())), None)

    def find_by_login(self, login: str) -> "Deferred[Subscriber | None]":
        return self._answer(self._by_login(login))

    def find_by_address(self, address: str) -> "Deferred[Subscriber | None]":
        return self._answer(next((s for s in self.subscribers if s.owns_address(address)), None))

    def find_by_certificate(self, der: bytes) -> "Deferred[Subscriber | None]":
        return self._answer(next((s for s in self.subscribers if der in s.certificates), None))

    def authenticate(self, login: str, password: str) -> "Deferred[Subscriber | None]":
        subscriber = self._by_login(login)
        if subscriber is not None and self.passwords.get(subscriber.uid) != password:
            subscriber = None
        return self._answer(subscriber)


def subscriber_checker(directory: InMemoryDirectory, clock: Any = None, cache_ttl: float = 60,
                       throttle: ThrottleSettings | None = None) -> SubscriberChecker:
    """The production checker over ``directory``, on ``clock`` (a fresh Clock by default)."""
    clock = clock if clock is not None else Clock()
    return SubscriberChecker(directory, cache_ttl, clock,  # type: ignore[arg-type]
                             AuthThrottle(throttle or ThrottleSettings(), clock))
