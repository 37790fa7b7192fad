"""DNS facts about a connecting client: forward-confirmed reverse name, DNSBL listings.

Asynchronous (twisted.names), bounded by a timeout, cached per address.
A failed or timed-out lookup is reported as such, never as "listed".
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from typing import cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime, IResolver
from twisted.names import dns, error

from mailappliance.queue.routing import DnsResult
from mailappliance.screening import ClientFacts
from mailappliance.screening_lists import ScreeningLists

MAX_CACHED = 50_000


FAILED_NAME_TTL = 60.0  # a reverse lookup that failed is tried again after this long

# An IResolver lookup method (lookupPointer, lookupAddress, ...), as Twisted types it.
Lookup = Callable[..., Deferred[tuple[dns.RRHeader, dns.RRHeader, dns.RRHeader]]]


class ClientLookup:
    def __init__(self, resolver: IResolver, clock: IReactorTime, timeout: float = 3.0,
                 cache_ttl: float = 600.0) -> None:
        self.resolver = resolver
        self.clock = clock
        self.timeout = timeout
        self.cache_ttl = cache_ttl
        self._cache: dict[tuple[str, bool, tuple[str, ...]], tuple[float, ClientFacts]] = {}
        self._names: dict[str, tuple[float, str | None]] = {}

    async def trace_name(self, address: str) -> str | None:
        """The client's forward-confirmed reverse name for the Received header, None when it
        has none or the lookup failed (cached; failures for a minute only).  A loopback
        client is "localhost" without asking DNS."""
        if ipaddress.ip_address(address).is_loopback:
            return "localhost"
        now = self.clock.seconds()
        cached = self._names.get(address)
        if cached and cached[0] > now:
            return cached[1]
        name, failed = await self._confirmed_name(address)
        if len(self._names) >= MAX_CACHED:
            self._names.clear()
        self._names[address] = (now + (FAILED_NAME_TTL if failed else self.cache_ttl), name)
        return name

    async def facts(self, address: str, lists: ScreeningLists) -> ClientFacts:
        key = (address, lists.needs_client_name, lists.dnsbl_zones)
        cached = self._cache.get(key)
        now = self.clock.seconds()
        if cached and cached[0] > now:
            return cached[1]
        name, failed = (await self._confirmed_name(address)) if lists.needs_client_name else (None, False)
        listed = await self._dnsbl(address, lists.dnsbl_zones) if lists.dnsbl_zones else None
        facts = ClientFacts(address, name, failed, listed)
        if not failed:
            if len(self._cache) >= MAX_CACHED:
                self._cache.clear()
            self._cache[key] = (now + self.cache_ttl, facts)
        return facts

    async def _lookup(self, method: Lookup, name: str) -> list[dns.RRHeader] | None:
        """Answers, [] for "no such name/record", None when the lookup failed."""
        try:
            answers, _, _ = cast(DnsResult, await method(name, timeout=(self.timeout,)))
            return list(answers)
        except (error.DNSNameError, error.DomainError):
            return []
        except Exception:
            return None

    async def _confirmed_name(self, address: str) -> tuple[str | None, bool]:
        reverse = ipaddress.ip_address(address).reverse_pointer
        answers = await self._lookup(self.resolver.lookupPointer, reverse)
        if answers is None:
            return None, True
        names: list[str] = []
        for rr in answers:  # (isinstance: the PTR type's payload class, for the type checker)
            if rr.type == dns.PTR and isinstance(rr.payload, dns.Record_PTR):
                names.append(str(rr.payload.name).rstrip(".").lower())
        for name in names[:5]:
            forward = await self._forward(name)
            if forward is None:
                return None, True
            if address in forward:
                return name, False
        return None, False

    async def _forward(self, name: str) -> set[str] | None:
        found: set[str] = set()
        for method, record_type in ((self.resolver.lookupAddress, dns.A),
                                    (self.resolver.lookupIPV6Address, dns.AAAA)):
            answers = await self._lookup(method, name)
            if answers is None:
                return None
            for rr in answers:  # (isinstance: the payload class of the record type, for the type checker)
                if rr.type == dns.A and record_type == dns.A and isinstance(rr.payload, dns.Record_A):
                    found.add(rr.payload.dottedQuad())
                elif rr.type == dns.AAAA and record_type == dns.AAAA and isinstance(rr.payload, dns.Record_AAAA):
                    found.add(socket.inet_ntop(socket.AF_INET6, rr.payload.address))
        return found

    async def _dnsbl(self, address: str, zones: tuple[str, ...]) -> str | None:
        ip = ipaddress.ip_address(address)
        if ip.version == 4:
            prefix = ".".join(reversed(address.split(".")))
        else:
            prefix = ".".join(reversed(ip.exploded.replace(":", "")))
        for zone in zones:
            answers = await self._lookup(self.resolver.lookupAddress, f"{prefix}.{zone}")
            if answers and any(rr.type == dns.A and isinstance(rr.payload, dns.Record_A)
                               and rr.payload.dottedQuad().startswith("127.") for rr in answers):
                return zone
        return None
