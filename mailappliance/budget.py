"""How many bytes one client network may send to the MX per hour.

Unauthenticated clients on the MX are counted per network (a /24 for IPv4,
a /64 for IPv6: what one host or one customer usually gets), so a single
sender cannot fill the disk by rotating addresses inside its network.  The
SMTP session asks :meth:`NetworkByteBudget.may_receive` at MAIL (the SIZE the
client declares counts) and reports every accepted message with
:meth:`NetworkByteBudget.received`; a refusal is ``452 4.7.1`` (``REPLY``),
a temporary answer, so real mail is only delayed.

Bookkeeping is in memory with the clock the tests control: per network, the
bytes of each minute of the last hour (at most 60 numbers), and at most
``max_tracked`` networks (the least recently active one is dropped first).
"""

from __future__ import annotations

import functools
import ipaddress
from collections import deque

from twisted.internet.interfaces import IReactorTime

from mailappliance.metrics import METRICS

HOUR = 3600.0
BUCKET = 60.0  # the window slides by whole minutes
MAX_TRACKED = 100_000
IPV4_PREFIX, IPV6_PREFIX = 24, 64
REPLY = (452, "4.7.1", "Too much mail from your network, try again later")


@functools.lru_cache(maxsize=16384)
def network_of(client_ip: str) -> str:
    """The /24 (IPv4, also IPv4-mapped IPv6) or /64 (IPv6) that ``client_ip``
    belongs to; an unparsable address stands for itself.  Remembered for the
    most recent addresses: parsing one costs ~10 us, and every MAIL and every
    stored message asks."""
    try:
        address = ipaddress.ip_address(client_ip.split("%", 1)[0])
    except ValueError:
        return client_ip
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = IPV4_PREFIX if address.version == 4 else IPV6_PREFIX
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


def record_refusal() -> None:
    """Count a MAIL refused for the network's byte budget in /metrics."""
    METRICS.count("mailappliance_messages_refused_total", reason="network_byte_budget")


class _Usage:
    """One network's bytes per minute of the last hour, with their total."""

    __slots__ = ("buckets", "total")

    def __init__(self) -> None:
        self.buckets: deque[list[float | int]] = deque()  # [minute start, bytes]
        self.total = 0

    def expire(self, now: float, span: float) -> None:
        while self.buckets and self.buckets[0][0] <= now - span:
            self.total -= int(self.buckets.popleft()[1])

    def add(self, now: float, size: int) -> None:
        minute = now - now % BUCKET
        if self.buckets and self.buckets[-1][0] == minute:
            self.buckets[-1][1] += size
        else:
            self.buckets.append([minute, size])
        self.total += size


class NetworkByteBudget:
    """Bytes per hour per client network on the MX; ``bytes_per_hour`` 0 turns it off."""

    def __init__(self, bytes_per_hour: int, clock: IReactorTime, max_tracked: int = MAX_TRACKED,
                 span: float = HOUR) -> None:
        self.bytes_per_hour = bytes_per_hour
        self.clock = clock
        self.max_tracked = max_tracked
        self.span = span
        self._networks: dict[str, _Usage] = {}  # least recently active first

    @property
    def settings(self) -> int:
        """``bytes_per_hour`` (what ``Reloader`` swaps on SIGHUP)."""
        return self.bytes_per_hour

    @settings.setter
    def settings(self, value: int) -> None:
        self.bytes_per_hour = value

    def used(self, client_ip: str) -> int:
        """Bytes the client's network sent within the last hour."""
        usage = self._networks.get(network_of(client_ip))
        if usage is None:
            return 0
        usage.expire(self.clock.seconds(), self.span)
        return usage.total

    def may_receive(self, client_ip: str, declared_size: int = 0) -> bool:
        """May this client start a message (of ``declared_size`` bytes, from
        MAIL's SIZE parameter)?  False once its network used its hour's
        budget, or when the declared size does not fit in what is left."""
        if not self.bytes_per_hour:
            return True
        used = self.used(client_ip)
        return used < self.bytes_per_hour and used + declared_size <= self.bytes_per_hour

    def received(self, client_ip: str, size: int) -> None:
        """Count a message of ``size`` bytes that the client's network sent."""
        if not self.bytes_per_hour or size <= 0:
            return
        now = self.clock.seconds()
        network = network_of(client_ip)
        usage = self._networks.pop(network, None)
        if usage is None:
            usage = _Usage()
            while len(self._networks) >= self.max_tracked:
                del self._networks[next(iter(self._networks))]
        usage.expire(now, self.span)
        usage.add(now, size)
        self._networks[network] = usage  # now the most recently active

    @property
    def tracked(self) -> int:
        """Networks with bytes on record (bounded by ``max_tracked``)."""
        return len(self._networks)
