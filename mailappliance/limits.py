"""Rate limits: per client address, per subscriber, and a global connection cap.

Counters are in memory with a clock the tests control, bounded in size.
Each check returns None (go ahead) or a :class:`LimitHit` that names the
limit, the key (address or uid) and the reply to give.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import attrs

HOUR = 3600.0
MINUTE = 60.0
MAX_TRACKED = 100_000
LIMIT_NAMES = ("messages_per_hour", "recipients_per_hour", "recipients_per_message")


@attrs.frozen
class LimitSettings:
    connections_per_minute: int = 60  # per client address
    concurrent_per_address: int = 20
    max_connections: int = 1000  # the whole server
    messages_per_hour: int = 200  # per subscriber
    recipients_per_hour: int = 1000
    recipients_per_message: int = 100


@attrs.frozen
class LimitHit:
    """A limit was reached: ``code``/``status``/``text`` is the reply."""

    limit: str
    key: str
    code: int
    status: str
    text: str


class _Window:
    """Amounts recorded in a sliding window, per key, with a running total per
    key so that a check costs the same however busy the key is."""

    def __init__(self, span: float) -> None:
        self.span = span
        self._events: dict[str, deque[tuple[float, int]]] = {}
        self._totals: dict[str, int] = {}

    def total(self, key: str, now: float) -> int:
        events = self._events.get(key)
        if not events:
            return 0
        expired = 0
        while events and events[0][0] <= now - self.span:
            expired += events.popleft()[1]
        if not events:
            del self._events[key], self._totals[key]
            return 0
        self._totals[key] -= expired
        return self._totals[key]

    def add(self, key: str, now: float, amount: int = 1) -> None:
        if key not in self._events and len(self._events) >= MAX_TRACKED:
            oldest = next(iter(self._events))
            del self._events[oldest], self._totals[oldest]
        self._events.setdefault(key, deque()).append((now, amount))
        self._totals[key] = self._totals.get(key, 0) + amount


def subscriber_limits(defaults: LimitSettings, overrides: tuple[tuple[str, int], ...]) -> LimitSettings:
    """The defaults with a subscriber's overrides from the directory applied."""
    known = {name: value for name, value in overrides if name in LIMIT_NAMES}
    return attrs.evolve(defaults, **known) if known else defaults


class RateLimits:
    """Shared by every listener; protocols call it at connect, MAIL, RCPT and after DATA."""

    def __init__(self, settings: LimitSettings, clock: Any) -> None:
        self.settings = settings
        self.clock = clock
        self._connections = _Window(MINUTE)
        self._messages = _Window(HOUR)
        self._recipients = _Window(HOUR)
        self._open: dict[str, int] = {}
        self.open_total = 0

    def connection_opened(self, address: str) -> LimitHit | None:
        """Count a new connection; a hit means: answer 421 and close (it is not counted)."""
        now = self.clock.seconds()
        s = self.settings
        if self.open_total >= s.max_connections:
            return LimitHit("max_connections", "*", 421, "4.7.0", "Server busy, try again later")
        if self._open.get(address, 0) >= s.concurrent_per_address:
            return LimitHit("concurrent_per_address", address, 421, "4.7.0", "Too many connections from your address")
        if self._connections.total(address, now) >= s.connections_per_minute:
            return LimitHit("connections_per_minute", address, 421, "4.7.0", "Too many connections, slow down")
        self._connections.add(address, now)
        self._open[address] = self._open.get(address, 0) + 1
        self.open_total += 1
        return None

    def connection_closed(self, address: str) -> None:
        count = self._open.get(address, 0) - 1
        if count > 0:
            self._open[address] = count
        else:
            self._open.pop(address, None)
        self.open_total = max(0, self.open_total - 1)

    def may_start_message(self, uid: str, limits: LimitSettings) -> LimitHit | None:
        if self._messages.total(uid, self.clock.seconds()) >= limits.messages_per_hour:
            return LimitHit("messages_per_hour", uid, 450, "4.7.1",
                            "Sending limit reached (messages per hour), try again later")
        return None

    def may_add_recipient(self, uid: str, in_message: int, limits: LimitSettings) -> LimitHit | None:
        if in_message >= limits.recipients_per_message:
            return LimitHit("recipients_per_message", uid, 452, "4.5.3", "Too many recipients for one message")
        if self._recipients.total(uid, self.clock.seconds()) + in_message >= limits.recipients_per_hour:
            return LimitHit("recipients_per_hour", uid, 452, "4.7.1",
                            "Sending limit reached (recipients per hour), try again later")
        return None

    def message_sent(self, uid: str, recipients: int) -> None:
        now = self.clock.seconds()
        self._messages.add(uid, now)
        self._recipients.add(uid, now, recipients)
