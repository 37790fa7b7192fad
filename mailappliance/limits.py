"""Rate limits: connection caps (per listener, per client address, per client
network, the whole server) and hourly allowances per subscriber.

Counters are in memory with a clock the tests control, bounded in size.
Each check returns None (go ahead) or a :class:`LimitHit` that names the
limit, the key (address, network, listener or uid) and the reply to give.

Client addresses are grouped so that one host cannot pass for many: an IPv4
address counts as itself and its /24 is its network; an IPv6 client counts
as its /64 for every per-address limit (one host usually owns a whole /64 and
picks addresses from it at will), and the /64 is its network too.

Hourly allowances are reserved, not merely checked: a session reserves a
message at MAIL and each recipient at RCPT (:class:`Reservation`), so
parallel sessions of one subscriber see each other's reservations at once;
what a transaction never sends is given back.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from typing import Any, Iterator

import attrs

HOUR = 3600.0
MINUTE = 60.0
MAX_TRACKED = 100_000
LIMIT_NAMES = ("messages_per_hour", "recipients_per_hour", "recipients_per_message")
IPV4_NETWORK_BITS = 24
IPV6_NETWORK_BITS = 64


@attrs.frozen
class LimitSettings:
    connections_per_minute: int = 60  # per client address (IPv6: per /64)
    concurrent_per_address: int = 20
    concurrent_per_network: int = 50  # per IPv4 /24, per IPv6 /64
    max_connections: int = 1000  # the whole server; each listener has its share (config.py)
    session_lifetime: float = 3600.0  # seconds a session may last however busy it is; 0: no limit
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


def client_keys(address: str) -> tuple[str, str | None]:
    """The keys a client address is counted under: (address, network).

    IPv4: ``192.0.2.7`` and ``192.0.2.0/24``; an IPv4-mapped IPv6 address
    counts as its IPv4 address. IPv6: the /64 for both. Anything that is not
    an IP address (a UNIX socket, "unknown") counts as itself, with no network.
    """
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])  # no zone index in a key
    except ValueError:
        return address, None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv4Address):
        keep = IPV4_NETWORK_BITS
        network = ipaddress.IPv4Network((int(ip) >> (32 - keep) << (32 - keep), keep))
        return str(ip), str(network)
    keep = IPV6_NETWORK_BITS
    prefix = str(ipaddress.IPv6Network((int(ip) >> (128 - keep) << (128 - keep), keep)))
    return prefix, prefix


class _Event:
    """An amount recorded at a time; ``amount`` drops to 0 once it no longer
    counts (expired, given back, or forgotten with its key)."""

    __slots__ = ("at", "amount")

    def __init__(self, at: float, amount: int) -> None:
        self.at = at
        self.amount = amount


class _Window:
    """Amounts recorded in a sliding window, per key, with a running total per
    key so that a check costs the same however busy the key is.

    An event can be taken back (:meth:`remove`) until it expires: its amount
    leaves the total at once, and the emptied event is dropped from memory
    soon after (never kept as a negative amount that would expire later).
    """

    def __init__(self, span: float) -> None:
        self.span = span
        self._events: dict[str, deque[_Event]] = {}
        self._totals: dict[str, int] = {}
        self._removed: dict[str, int] = {}  # emptied events still in the key's deque

    def total(self, key: str, now: float) -> int:
        events = self._events.get(key)
        if not events:
            return 0
        expired = 0
        while events and events[0].at <= now - self.span:
            event = events.popleft()
            if event.amount:
                expired += event.amount
                event.amount = 0
            else:
                self._removed[key] = self._removed.get(key, 1) - 1
        if not events:
            self._forget(key)
            return 0
        self._totals[key] -= expired
        return self._totals[key]

    def add(self, key: str, now: float, amount: int = 1) -> _Event:
        if amount <= 0:
            return _Event(now, 0)  # nothing to count (a message without recipients)
        if key not in self._events and len(self._events) >= MAX_TRACKED:
            self._forget(next(iter(self._events)))
        event = _Event(now, amount)
        self._events.setdefault(key, deque()).append(event)
        self._totals[key] = self._totals.get(key, 0) + amount
        return event

    def remove(self, key: str, event: _Event) -> None:
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
            events = self._events[key] = deque(e for e in events if e.amount)
            removed = 0
        if not events:
            self._forget(key)
        else:
            self._removed[key] = removed

    def _forget(self, key: str) -> None:
        for event in self._events.pop(key, ()):
            event.amount = 0  # a reservation that still holds it must not take it back
        self._totals.pop(key, None)
        self._removed.pop(key, None)

    def __len__(self) -> int:
        return len(self._events)

    def stored_events(self) -> Iterator[int]:
        """How many events each key keeps in memory (for tests of the memory bound)."""
        return (len(events) for events in self._events.values())


def subscriber_limits(defaults: LimitSettings, overrides: tuple[tuple[str, int], ...]) -> LimitSettings:
    """The defaults with a subscriber's overrides from the directory applied."""
    known = {name: value for name, value in overrides if name in LIMIT_NAMES}
    return attrs.evolve(defaults, **known) if known else defaults


def _up(counts: dict[str, int], key: str) -> None:
    counts[key] = counts.get(key, 0) + 1


def _down(counts: dict[str, int], key: str) -> None:
    count = counts.get(key, 0) - 1
    if count > 0:
        counts[key] = count
    else:
        counts.pop(key, None)


class RateLimits:
    """Shared by every listener; sessions call it at connect and disconnect, and
    hold a :class:`Reservation` per subscriber session for MAIL and RCPT.

    ``settings`` may be replaced at any time (SIGHUP); listener caps are set
    apart with :meth:`set_listener_caps`.
    """

    def __init__(self, settings: LimitSettings, clock: Any) -> None:
        self.settings = settings
        self.clock = clock
        self._connections = _Window(MINUTE)
        self._messages = _Window(HOUR)
        self._recipients = _Window(HOUR)
        self._listener_caps: dict[str, int] = {}
        self._open: dict[str, int] = {}  # by address key
        self._open_networks: dict[str, int] = {}
        self._open_listeners: dict[str, int] = {}
        self.open_total = 0

    # -- connections ------------------------------------------------------------

    def set_listener_caps(self, caps: dict[str, int]) -> None:
        """Concurrent connections each listener may hold (by listener name); a
        listener not named, or with 0, has only the server-wide cap."""
        self._listener_caps = {name: cap for name, cap in caps.items() if cap > 0}

    def open_connections(self, listener: str) -> int:
        """Connections open now on one listener."""
        return self._open_listeners.get(listener, 0)

    def connection_opened(self, address: str, listener: str = "") -> LimitHit | None:
        """Count a new connection to ``listener`` from ``address``; a hit means:
        answer 421 and close (it is not counted, and needs no connection_closed)."""
        now = self.clock.seconds()
        s = self.settings
        address_key, network_key = client_keys(address)
        cap = self._listener_caps.get(listener)
        if cap is not None and self._open_listeners.get(listener, 0) >= cap:
            return LimitHit("max_connections", listener, 421, "4.7.0", "Server busy, try again later")
        if self.open_total >= s.max_connections:
            return LimitHit("max_connections", "*", 421, "4.7.0", "Server busy, try again later")
        if self._open.get(address_key, 0) >= s.concurrent_per_address:
            return LimitHit("concurrent_per_address", address_key, 421, "4.7.0",
                            "Too many connections from your address")
        if network_key is not None and self._open_networks.get(network_key, 0) >= s.concurrent_per_network:
            return LimitHit("concurrent_per_network", network_key, 421, "4.7.0",
                            "Too many connections from your network")
        if self._connections.total(address_key, now) >= s.connections_per_minute:
            return LimitHit("connections_per_minute", address_key, 421, "4.7.0", "Too many connections, slow down")
        self._connections.add(address_key, now)
        _up(self._open, address_key)
        if network_key is not None:
            _up(self._open_networks, network_key)
        _up(self._open_listeners, listener)
        self.open_total += 1
        return None

    def connection_closed(self, address: str, listener: str = "") -> None:
        """A connection that :meth:`connection_opened` counted has ended."""
        address_key, network_key = client_keys(address)
        _down(self._open, address_key)
        if network_key is not None:
            _down(self._open_networks, network_key)
        _down(self._open_listeners, listener)
        self.open_total = max(0, self.open_total - 1)

    # -- subscribers --------------------------------------------------------------

    def reservation(self, uid: str, limits: LimitSettings) -> Reservation:
        """A session's hold on ``uid``'s hourly allowance under ``limits`` (the
        subscriber's own, see :func:`subscriber_limits`)."""
        return Reservation(self, uid, limits)

    # The check-then-count calls below predate reservations: a check at MAIL and
    # RCPT, the count after DATA. Parallel sessions do not see each other's
    # transactions with them; use reservation() instead (never both for one message).

    def may_start_message(self, uid: str, limits: LimitSettings) -> LimitHit | None:
        if self._messages.total(uid, self.clock.seconds()) >= limits.messages_per_hour:
            return _messages_hit(uid)
        return None

    def may_add_recipient(self, uid: str, in_message: int, limits: LimitSettings) -> LimitHit | None:
        if in_message >= limits.recipients_per_message:
            return _per_message_hit(uid)
        if self._recipients.total(uid, self.clock.seconds()) + in_message >= limits.recipients_per_hour:
            return _recipients_hit(uid)
        return None

    def message_sent(self, uid: str, recipients: int) -> None:
        now = self.clock.seconds()
        self._messages.add(uid, now)
        self._recipients.add(uid, now, recipients)


def _messages_hit(uid: str) -> LimitHit:
    return LimitHit("messages_per_hour", uid, 450, "4.7.1", "Sending limit reached (messages per hour), try again later")


def _recipients_hit(uid: str) -> LimitHit:
    return LimitHit("recipients_per_hour", uid, 452, "4.7.1",
                    "Sending limit reached (recipients per hour), try again later")


def _per_message_hit(uid: str) -> LimitHit:
    return LimitHit("recipients_per_message", uid, 452, "4.5.3", "Too many recipients for one message")


class Reservation:
    """One session's transaction against a subscriber's hourly allowance.

    ``start_message`` (MAIL) and ``add_recipient`` (RCPT) count at once, so a
    parallel session of the same subscriber sees them; ``commit`` (after the
    250 to the message) keeps them counted, ``release`` (RSET, a refused or
    failed message, disconnect) gives back whatever was not committed. One
    object may serve a whole session: each ``start_message`` begins a new
    transaction (giving back an unfinished one). Reserved amounts are dated
    when reserved and leave the hourly window an hour after that.
    """

    def __init__(self, owner: RateLimits, uid: str, limits: LimitSettings) -> None:
        self.uid = uid
        self.limits = limits
        self._owner = owner
        self._message: _Event | None = None
        self._recipients: list[_Event] = []
        self.recipients = 0  # in the current message

    def start_message(self) -> LimitHit | None:
        """MAIL: reserve one message against messages_per_hour."""
        self.release()
        owner = self._owner
        now = owner.clock.seconds()
        if owner._messages.total(self.uid, now) >= self.limits.messages_per_hour:
            return _messages_hit(self.uid)
        self._message = owner._messages.add(self.uid, now)
        return None

    def add_recipient(self) -> LimitHit | None:
        """RCPT: reserve one recipient against recipients_per_hour, within recipients_per_message."""
        owner = self._owner
        if self.recipients >= self.limits.recipients_per_message:
            return _per_message_hit(self.uid)
        now = owner.clock.seconds()
        if owner._recipients.total(self.uid, now) >= self.limits.recipients_per_hour:
            return _recipients_hit(self.uid)
        self._recipients.append(owner._recipients.add(self.uid, now))
        self.recipients += 1
        return None

    def withdraw_recipient(self) -> None:
        """The recipient reserved last was refused after all (e.g. unknown
        address): give it back, keep the rest of the transaction."""
        if self._recipients:
            self._owner._recipients.remove(self.uid, self._recipients.pop())
            self.recipients -= 1

    def commit(self) -> None:
        """The message was accepted: what is reserved stays counted; the next
        transaction starts from zero recipients."""
        self._message = None
        self._recipients.clear()
        self.recipients = 0

    def release(self) -> None:
        """Give back everything not committed; harmless to call again."""
        owner = self._owner
        if self._message is not None:
            owner._messages.remove(self.uid, self._message)
            self._message = None
        for event in reversed(self._recipients):
            owner._recipients.remove(self.uid, event)
        self._recipients.clear()
        self.recipients = 0
