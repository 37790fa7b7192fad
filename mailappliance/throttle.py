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

Everything is kept in memory with a clock the tests control, and bounded.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import attrs

MAX_TRACKED = 100_000


@attrs.frozen
class ThrottleSettings:
    window: float = 900
    free_failures: int = 3
    max_delay: float = 30
    address_lock_after: int = 20
    account_lock_after: int = 10
    lock_time: float = 900
    trusted_for: float = 30 * 86400


@attrs.frozen
class Throttling:
    """The verdict before a login attempt is checked."""

    locked: bool = False
    retry_after: float = 0
    reason: str = ""


class AuthThrottle:
    """Counts failures per address and per account; see the module docstring."""

    def __init__(self, settings: ThrottleSettings, clock: Any) -> None:
        self.settings = settings
        self.clock = clock
        self._by_address: dict[str, deque[float]] = {}
        self._by_account: dict[str, deque[float]] = {}
        self._address_locked: dict[str, float] = {}
        self._account_locked: dict[str, float] = {}
        self._trusted: dict[tuple[str, str], float] = {}

    def _recent(self, table: dict[str, deque[float]], key: str, now: float) -> deque[float]:
        times = table.get(key)
        if times is None:
            if len(table) >= MAX_TRACKED:
                table.pop(next(iter(table)))
            times = table[key] = deque(maxlen=self.settings.address_lock_after * 4)
        while times and times[0] <= now - self.settings.window:
            times.popleft()
        return times

    def check(self, address: str, account: str) -> Throttling:
        """May this address try to log in to this account now?"""
        now = self.clock.seconds()
        until = self._address_locked.get(address, 0)
        if until > now:
            return Throttling(True, until - now, f"address {address} locked after repeated failures")
        until = self._account_locked.get(account, 0)
        if until > now and not self._is_trusted(address, account, now):
            return Throttling(True, until - now, f"account {account} locked for new addresses")
        return Throttling()

    def _is_trusted(self, address: str, account: str, now: float) -> bool:
        return self._trusted.get((account, address), 0) > now

    def failed(self, address: str, account: str) -> float:
        """Record a failure; returns how long to wait before answering it."""
        now = self.clock.seconds()
        by_address = self._recent(self._by_address, address, now)
        by_address.append(now)
        if len(by_address) >= self.settings.address_lock_after:
            self._address_locked[address] = now + self.settings.lock_time
        if not self._is_trusted(address, account, now):
            by_account = self._recent(self._by_account, account, now)
            by_account.append(now)
            if len(by_account) >= self.settings.account_lock_after:
                self._account_locked[account] = now + self.settings.lock_time
        excess = len(by_address) - self.settings.free_failures
        return 0.0 if excess <= 0 else min(2.0 ** (excess - 1), self.settings.max_delay)

    def succeeded(self, address: str, account: str) -> None:
        """A good login: the address is trusted for this account and its failures forgiven."""
        now = self.clock.seconds()
        if len(self._trusted) >= MAX_TRACKED:
            self._trusted.pop(next(iter(self._trusted)))
        self._trusted[(account, address)] = now + self.settings.trusted_for
        self._by_address.pop(address, None)
