"""Brute-force throttling for the shared checker: one memory for SMTP and POP3.

Two counters, with different jobs:

- **per client address**: after ``free_failures`` failures in ``window``
  each further failure is answered only after a growing delay (1, 2, 4 ...
  up to ``max_delay`` seconds); after ``address_lock_after`` failures the
  address may not try any login for ``lock_time``.
- **per account**: after ``account_lock_after`` failures in ``window`` the
  account is locked for ``lock_time`` - but only for addresses that have not
  logged in to it successfully in the last ``trusted_for`` seconds.  A
  password-guessing botnet can thus lock the account against strangers, but
  not lock its real subscriber out from the places they use.

The counters, locks and "trusted" marks live in the state store
(:mod:`mailappliance.state`): this process's memory, or Redis shared by
several appliances, so a guesser spreading attempts over them meets one
count.  While Redis is away each process counts on its own (never
unlimited).  The calls return Deferreds; the clock is the caller's.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import Deferred, gatherResults, succeed

from mailappliance.settings import ThrottleSettings
from mailappliance.state import MarkRule, StateStore
from mailappliance.state.memory import MemoryStore

KEEP_FACTOR = 4  # failures remembered per key: this many times the lock threshold


@attrs.frozen
class Throttling:
    """The verdict before a login attempt is checked."""

    locked: bool = False
    retry_after: float = 0
    reason: str = ""
    trusted_left: float = 0  # seconds this address stays trusted for the account
    failures: int = 0  # recent failures from this address


REMARK_AFTER = 3600.0  # a good login renews the "trusted" mark once it is this old (one write per hour, not per login)


def _address_lock(address: str) -> tuple[str, str]:
    return ("login-address-locked", address)


def _account_lock(account: str) -> tuple[str, str]:
    return ("login-account-locked", account)


def _address_failures(address: str) -> tuple[str, str]:
    return ("login-failures-address", address)


def _trusted(address: str, account: str) -> tuple[str, str, str]:
    return ("login-trusted", account, address)


class AuthThrottle:
    """Counts failures per address and per account; see the module docstring."""

    def __init__(self, settings: ThrottleSettings, clock: Any, store: StateStore | None = None) -> None:
        self.settings = settings
        self.clock = clock
        self.store: StateStore = store if store is not None else MemoryStore(clock)

    def check(self, address: str, account: str) -> Deferred[Throttling]:
        """May this address try to log in to this account now?"""
        asked: list[Deferred[Any]] = [  # sent together: one round trip to Redis
            self.store.marks([_address_lock(address), _account_lock(account), _trusted(address, account)]),
            self.store.total(_address_failures(address), self.settings.window)]
        d: Deferred[list[Any]] = gatherResults(asked)

        def verdict(found: list[Any]) -> Throttling:
            (address_locked, account_locked, trusted), failures = found
            if address_locked > 0:
                return Throttling(True, address_locked, f"address {address} locked after repeated failures")
            if account_locked > 0 and not trusted:
                return Throttling(True, account_locked, f"account {account} locked for new addresses")
            return Throttling(trusted_left=trusted, failures=failures)

        return d.addCallback(verdict)

    def failed(self, address: str, account: str) -> Deferred[float]:
        """Record a failure; Deferred of how long to wait before answering it."""
        s = self.settings
        by_address = self.store.count(_address_failures(address), s.window, s.address_lock_after * KEEP_FACTOR,
                                      MarkRule(_address_lock(address), s.address_lock_after, s.lock_time))
        trusted = self.store.marks([_trusted(address, account)])

        def count_account(left: list[float]) -> Deferred[int]:
            if left[0] > 0:  # a failure from an address the account's owner uses does not lock it
                return by_address
            counted = self.store.count(("login-failures-account", account), s.window,
                                       s.account_lock_after * KEEP_FACTOR,
                                       MarkRule(_account_lock(account), s.account_lock_after, s.lock_time))
            return counted.addCallback(lambda _: by_address)

        return trusted.addCallback(count_account).addCallback(self._delay)

    def _delay(self, failures: int) -> float:
        excess = failures - self.settings.free_failures
        return 0.0 if excess <= 0 else min(2.0 ** (excess - 1), self.settings.max_delay)

    def succeeded(self, address: str, account: str, checked: Throttling | None = None) -> Deferred[None]:
        """A good login: the address is trusted for this account and its failures forgiven.
        With the verdict of :meth:`check` for this login, only what changes is written."""
        writes: list[Deferred[Any]] = []
        if checked is None or checked.trusted_left < self.settings.trusted_for - REMARK_AFTER:
            writes.append(self.store.mark(_trusted(address, account), self.settings.trusted_for))
        if checked is None or checked.failures:
            writes.append(self.store.forget(_address_failures(address)))
        if not writes:  # the usual warm login: nothing to write, no Deferred list to gather
            return succeed(None)
        written: Deferred[list[Any]] = gatherResults(writes, consumeErrors=True)
        return written.addCallback(lambda _: None)

    def failures(self, address: str) -> Deferred[int]:
        """Failures counted against ``address`` in the window (for tests and the admin)."""
        return self.store.total(_address_failures(address), self.settings.window)
