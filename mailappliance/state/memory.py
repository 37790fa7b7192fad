"""The state store in this process's memory: the embedded default, and what a
:class:`~mailappliance.state.failover.FailoverStore` falls back to.

Every table is bounded (``MAX_TRACKED`` keys; the oldest key is forgotten
first), and every Deferred it returns has already fired.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterator, Sequence
from itertools import count as counter
from typing import TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from mailappliance.state import Key, MarkRule, Token

MAX_TRACKED = 100_000

_K = TypeVar("_K", bound=Hashable)
_V = TypeVar("_V")


class Event:
    """An amount recorded at a time; ``amount`` drops to 0 once it no longer
    counts (expired, given back, or forgotten with its key).  The token of a
    memory reservation."""

    __slots__ = ("at", "amount")

    def __init__(self, at: float, amount: int) -> None:
        self.at = at
        self.amount = amount


class Window:
    """Amounts recorded in a sliding window, per key, with a running total per
    key so that a check costs the same however busy the key is.

    An event can be taken back (:meth:`remove`) until it expires: its amount
    leaves the total at once, and the emptied event is dropped from memory
    soon after (never kept as a negative amount that would expire later).

    A key's events are a list, not a deque: most keys hold a few events, and
    an empty deque alone is 624 bytes.  Expired events leave from the front
    in one slice per check; a key never holds more events than its limit,
    since an event over the limit is never added.
    """

    def __init__(self, span: float, max_tracked: int | None = None) -> None:
        self.span = span
        self.max_tracked = max_tracked
        self._events: dict[Hashable, list[Event]] = {}
        self._totals: dict[Hashable, int] = {}
        self._removed: dict[Hashable, int] = {}  # emptied events still in the key's list

    def total(self, key: Hashable, now: float, span: float | None = None) -> int:
        events = self._events.get(key)
        if not events:
            return 0
        edge = now - (self.span if span is None else span)
        expired = gone = 0
        for event in events:
            if event.at > edge:
                break
            gone += 1
            if event.amount:
                expired += event.amount
                event.amount = 0
            else:
                self._removed[key] = self._removed.get(key, 1) - 1
        if gone:
            del events[:gone]
        if not events:
            self._forget(key)
            return 0
        self._totals[key] -= expired
        return self._totals[key]

    def add(self, key: Hashable, now: float, amount: int = 1) -> Event:
        if amount <= 0:
            return Event(now, 0)  # nothing to count (a message without recipients)
        limit = MAX_TRACKED if self.max_tracked is None else self.max_tracked
        if key not in self._events and len(self._events) >= limit:
            self._forget(next(iter(self._events)))
        event = Event(now, amount)
        self._events.setdefault(key, []).append(event)
        self._totals[key] = self._totals.get(key, 0) + amount
        return event

    def remove(self, key: Hashable, event: Event) -> None:
        """Take back an event recorded under ``key``; nothing if it no longer counts."""
        if not event.amount:
            return
        events = self._events[key]  # an event that still counts is always there
        self._totals[key] -= event.amount
        event.amount = 0
        removed = self._removed.get(key, 0) + 1
        while events and not events[-1].amount:  # the usual case: the newest events
            events.pop()
            removed -= 1
        if removed * 2 > len(events) + 16:  # mostly emptied: rebuild, so memory stays bounded
            events = self._events[key] = [e for e in events if e.amount]
            removed = 0
        if not events:
            self._forget(key)
        else:
            self._removed[key] = removed

    def _forget(self, key: Hashable) -> None:
        for event in self._events.pop(key, ()):
            event.amount = 0  # a reservation that still holds it must not take it back
        self._totals.pop(key, None)
        self._removed.pop(key, None)

    forget = _forget

    def __len__(self) -> int:
        return len(self._events)

    def stored_events(self) -> Iterator[int]:
        """How many events each key keeps in memory (for tests of the memory bound)."""
        return (len(events) for events in self._events.values())


def _bounded_set(table: dict[_K, _V], key: _K, value: _V) -> None:
    table.pop(key, None)
    if len(table) >= MAX_TRACKED:
        del table[next(iter(table))]
    table[key] = value


class MemoryStore:
    """:class:`~mailappliance.state.StateStore` in this process (see the module docstring)."""

    shared = False

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.windows = Window(0)  # spans are given per call
        self._counts: dict[Key, deque[float]] = {}
        self._marks: dict[Key, float] = {}  # key -> until
        self._locks: dict[Key, tuple[str, float]] = {}  # key -> (owner, until)
        self._values: dict[Key, tuple[int, float]] = {}  # key -> (value, until)
        self._fences = counter(1)

    def describe(self) -> str:
        return "memory"

    # -- windows --------------------------------------------------------------------

    def reserve(self, key: Key, span: float, limit: float, amount: int = 1) -> Deferred[Token | None]:
        now = self.clock.seconds()
        if self.windows.total(key, now, span) + amount > limit:
            return succeed(None)
        return succeed(self.windows.add(key, now, amount))

    def release(self, key: Key, token: Token) -> Deferred[None]:
        if isinstance(token, Event) and token.amount:
            self.windows.remove(key, token)
        return succeed(None)

    def total(self, key: Key, span: float) -> Deferred[int]:
        now = self.clock.seconds()
        times = self._counts.get(key)
        if times is not None:  # a window of count()
            return succeed(sum(1 for at in times if at > now - span))
        return succeed(self.windows.total(key, now, span))

    def count(self, key: Key, span: float, keep: int, mark: MarkRule | None = None) -> Deferred[int]:
        now = self.clock.seconds()
        times = self._counts.get(key)
        if times is None or times.maxlen != keep:
            times = deque(times or (), maxlen=keep)
            _bounded_set(self._counts, key, times)
        while times and times[0] <= now - span:
            times.popleft()
        times.append(now)
        found = len(times)
        if mark is not None and found >= mark.threshold:
            _bounded_set(self._marks, mark.key, now + mark.ttl)
        return succeed(found)

    def forget(self, key: Key) -> Deferred[None]:
        self._counts.pop(key, None)
        self.windows.forget(key)
        return succeed(None)

    # -- marks ----------------------------------------------------------------------

    def mark(self, key: Key, ttl: float) -> Deferred[None]:
        _bounded_set(self._marks, key, self.clock.seconds() + ttl)
        return succeed(None)

    def marks(self, keys: Sequence[Key]) -> Deferred[list[float]]:
        now = self.clock.seconds()
        left = []
        for key in keys:
            until = self._marks.get(key, 0.0)
            if until and until <= now:
                del self._marks[key]
            left.append(max(0.0, until - now))
        return succeed(left)

    # -- locks ----------------------------------------------------------------------

    def _holder(self, key: Key, now: float) -> str | None:
        held = self._locks.get(key)
        if held is None:
            return None
        if held[1] <= now:
            del self._locks[key]
            return None
        return held[0]

    def lock(self, key: Key, owner: str, ttl: float) -> Deferred[int | None]:
        now = self.clock.seconds()
        holder = self._holder(key, now)
        if holder is not None and holder != owner:
            return succeed(None)
        _bounded_set(self._locks, key, (owner, now + ttl))
        return succeed(next(self._fences))

    def refresh(self, key: Key, owner: str, ttl: float) -> Deferred[bool]:
        now = self.clock.seconds()
        holder = self._holder(key, now)
        if holder is not None and holder != owner:
            return succeed(False)
        _bounded_set(self._locks, key, (owner, now + ttl))
        return succeed(True)

    def holds(self, key: Key, owner: str) -> Deferred[bool]:
        return succeed(self._holder(key, self.clock.seconds()) == owner)

    def unlock(self, key: Key, owner: str) -> Deferred[None]:
        if self._holder(key, self.clock.seconds()) == owner:
            del self._locks[key]
        return succeed(None)

    # -- cached numbers -----------------------------------------------------------------

    def get_value(self, key: Key) -> Deferred[int | None]:
        held = self._values.get(key)
        if held is None:
            return succeed(None)
        if held[1] <= self.clock.seconds():
            del self._values[key]
            return succeed(None)
        return succeed(held[0])

    def set_value(self, key: Key, value: int, ttl: float) -> Deferred[None]:
        _bounded_set(self._values, key, (value, self.clock.seconds() + ttl))
        return succeed(None)

    def add_value(self, key: Key, amount: int) -> Deferred[None]:
        held = self._values.get(key)
        if held is not None and held[1] > self.clock.seconds():
            self._values[key] = (held[0] + amount, held[1])
        return succeed(None)
