"""Rate limits: connection caps (per listener, per client address, per client
network, the whole server) and hourly allowances per subscriber.

Counters are in memory with a clock the tests control, bounded in size.
Each check returns None (go ahead) or a deferring
:class:`~mailappliance.verdicts.Verdict` whose rule names the limit
(``limit.<name>``) and whose value is the key (address, network, listener or
uid); the protocols choose the reply (``smtp/replies.py``, ``pop3/replies.py``).

Client addresses are grouped so that one host cannot pass for many: an IPv4
address counts as itself and its /24 is its network; an IPv6 client counts
as its /64 for every per-address limit (one host usually owns a whole /64 and
picks addresses from it at will), and the /64 is its network too.

Hourly allowances are reserved, not merely checked: a session reserves a
message at MAIL and each recipient at RCPT (:class:`Reservation`), so
parallel sessions of one subscriber see each other's reservations at once;
what a transaction never sends is given back.  The allowances live in the
state store (:mod:`mailappliance.state`): this process's memory, or Redis
shared by several appliances, so the reservation calls return Deferreds.
Connection caps and connection rates stay in each process.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Any

import attrs
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.logger import Logger

from mailappliance.settings import LimitSettings
from mailappliance.state import StateStore
from mailappliance.state.memory import MAX_TRACKED, MemoryStore
from mailappliance.verdicts import Verdict, defer

log = Logger(namespace="mailappliance.limits")

HOUR = 3600.0
MINUTE = 60.0
LIMIT_NAMES = ("messages_per_hour", "recipients_per_hour", "recipients_per_message")
IPV4_NETWORK_BITS = 24
IPV6_NETWORK_BITS = 64


def limit_hit(name: str, key: str) -> Verdict:
    """The verdict for limit ``name`` reached for ``key``: always temporary (try later)."""
    return defer(f"limit.{name}", key)


@functools.lru_cache(maxsize=4096)  # twice per connection; parsing costs ~6 us, a hit ~0.1
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
        text = str(ip)
        return (address if text == address else text), str(network)  # the session's string, not a copy per table
    keep = IPV6_NETWORK_BITS
    prefix = str(ipaddress.IPv6Network((int(ip) >> (128 - keep) << (128 - keep), keep)))
    return prefix, prefix


def subscriber_limits(defaults: LimitSettings, overrides: tuple[tuple[str, int], ...]) -> LimitSettings:
    """The defaults with a subscriber's overrides from the directory applied."""
    known = {name: value for name, value in overrides if name in LIMIT_NAMES}
    return attrs.evolve(defaults, **known) if known else defaults


class RecentConnections:
    """Connections per client address key in the last ``span`` seconds.

    The connection rate is counted for every client, and most addresses
    connect once: one float per such address (a sliding window's list and
    event objects were ~190 bytes of every idle connection from a new
    address), a list of times only for an address that comes back.  At most
    ``MAX_TRACKED`` keys, the oldest forgotten first; times are never more
    than the limit per key, since a connection over it is not counted.
    """

    __slots__ = ("span", "_times")

    def __init__(self, span: float) -> None:
        self.span = span
        self._times: dict[str, float | list[float]] = {}

    def total(self, key: str, now: float) -> int:
        times = self._times.get(key)
        if times is None:
            return 0
        edge = now - self.span
        if not isinstance(times, list):  # one connection (a clock may give int seconds)
            if times > edge:
                return 1
            del self._times[key]
            return 0
        gone = 0
        for at in times:
            if at > edge:
                break
            gone += 1
        if gone:
            del times[:gone]
        if not times:
            del self._times[key]
        return len(times)

    def add(self, key: str, now: float) -> None:
        times = self._times.get(key)
        if times is None:
            if len(self._times) >= MAX_TRACKED:
                del self._times[next(iter(self._times))]
            self._times[key] = now
        elif not isinstance(times, list):
            self._times[key] = [times, now]
        else:
            times.append(now)

    def __len__(self) -> int:
        return len(self._times)


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
    apart with :meth:`set_listener_caps`.  ``store`` keeps the subscribers'
    hourly allowances (default: this process's memory).
    """

    def __init__(self, settings: LimitSettings, clock: Any, store: StateStore | None = None) -> None:
        self.settings = settings
        self.clock = clock
        self.store: StateStore = store if store is not None else MemoryStore(clock)
        self._connections = RecentConnections(MINUTE)
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

    def connection_opened(self, address: str, listener: str = "") -> Verdict | None:
        """Count a new connection to ``listener`` from ``address``; a hit means:
        answer 421 and close (it is not counted, and needs no connection_closed)."""
        now = self.clock.seconds()
        s = self.settings
        address_key, network_key = client_keys(address)
        cap = self._listener_caps.get(listener)
        if cap is not None and self._open_listeners.get(listener, 0) >= cap:
            return limit_hit("max_connections", listener)
        if self.open_total >= s.max_connections:
            return limit_hit("max_connections", "*")
        if self._open.get(address_key, 0) >= s.concurrent_per_address:
            return limit_hit("concurrent_per_address", address_key)
        if network_key is not None and self._open_networks.get(network_key, 0) >= s.concurrent_per_network:
            return limit_hit("concurrent_per_network", network_key)
        if self._connections.total(address_key, now) >= s.connections_per_minute:
            return limit_hit("connections_per_minute", address_key)
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

    def held(self, uid: str) -> Deferred[tuple[int, int]]:
        """Messages and recipients counted against ``uid`` this hour (for tests and the admin)."""
        totals: Deferred[list[int]] = gatherResults([self.store.total(("messages", uid), HOUR),
                                                     self.store.total(("recipients", uid), HOUR)])
        return totals.addCallback(lambda found: (found[0], found[1]))


def _messages_hit(uid: str) -> Verdict:
    return limit_hit("messages_per_hour", uid)


def _recipients_hit(uid: str) -> Verdict:
    return limit_hit("recipients_per_hour", uid)


def _per_message_hit(uid: str) -> Verdict:
    return limit_hit("recipients_per_message", uid)


class Reservation:
    """One session's transaction against a subscriber's hourly allowance.

    ``start_message`` (MAIL) and ``add_recipient`` (RCPT) count at once, so a
    parallel session of the same subscriber (on any appliance sharing the
    store) sees them; ``commit`` (after the 250 to the message) keeps them
    counted, ``release`` (RSET, a refused or failed message, disconnect)
    gives back whatever was not committed. One object may serve a whole
    session: each ``start_message`` begins a new transaction (giving back an
    unfinished one). Reserved amounts are dated when reserved and leave the
    hourly window an hour after that.

    ``start_message`` and ``add_recipient`` return Deferreds (None, or the
    Verdict to answer); the session waits for each before the next command.
    A reservation that arrives after ``release`` (the client left while the
    store answered) is given back at once.
    """

    def __init__(self, owner: RateLimits, uid: str, limits: LimitSettings) -> None:
        self.uid = uid
        self.limits = limits
        self._store = owner.store
        self._message: Any = None
        self._recipients: list[Any] = []
        self._generation = 0  # bumped by release: late answers of an older transaction are given back
        self.recipients = 0  # in the current message

    @property
    def _message_key(self) -> tuple[str, str]:
        return ("messages", self.uid)

    @property
    def _recipient_key(self) -> tuple[str, str]:
        return ("recipients", self.uid)

    def start_message(self) -> Deferred[Verdict | None]:
        """MAIL: reserve one message against messages_per_hour."""
        self.release()
        generation = self._generation
        d = self._store.reserve(self._message_key, HOUR, self.limits.messages_per_hour)

        def reserved(token: Any) -> Verdict | None:
            if token is None:
                return _messages_hit(self.uid)
            if generation != self._generation:
                self._give_back(self._message_key, token)
                return None
            self._message = token
            return None

        return d.addCallback(reserved)

    def add_recipient(self) -> Deferred[Verdict | None]:
        """RCPT: reserve one recipient against recipients_per_hour, within recipients_per_message."""
        if self.recipients >= self.limits.recipients_per_message:
            return succeed(_per_message_hit(self.uid))
        generation = self._generation
        self.recipients += 1  # counted at once: the per-message limit holds while the store answers
        d = self._store.reserve(self._recipient_key, HOUR, self.limits.recipients_per_hour)

        def reserved(token: Any) -> Verdict | None:
            if generation != self._generation:
                if token is not None:
                    self._give_back(self._recipient_key, token)
                return None
            if token is None:
                self.recipients -= 1
                return _recipients_hit(self.uid)
            self._recipients.append(token)
            return None

        return d.addCallback(reserved)

    def withdraw_recipient(self) -> None:
        """The recipient reserved last was refused after all (e.g. unknown
        address): give it back, keep the rest of the transaction."""
        if self._recipients:
            self._give_back(self._recipient_key, self._recipients.pop())
            self.recipients -= 1

    def commit(self) -> None:
        """The message was accepted: what is reserved stays counted; the next
        transaction starts from zero recipients."""
        self._message = None
        self._recipients.clear()
        self.recipients = 0

    def release(self) -> None:
        """Give back everything not committed; harmless to call again."""
        self._generation += 1
        if self._message is not None:
            self._give_back(self._message_key, self._message)
            self._message = None
        for token in reversed(self._recipients):
            self._give_back(self._recipient_key, token)
        self._recipients.clear()
        self.recipients = 0

    def _give_back(self, key: tuple[str, str], token: Any) -> None:
        d = self._store.release(key, token)
        d.addErrback(lambda failure: log.failure("giving back a reservation of {uid}", failure, uid=self.uid))
