"""Where mail for a domain goes: transport map, smarthost, or MX records (RFC 5321 5.1).

Name resolution uses ``twisted.names`` against a configurable resolver, so it
never blocks the reactor and tests can point it at a DNS server on loopback.
Failures say whether they are permanent (no such domain, null MX) or
temporary (timeouts, server failures): only the first kind may bounce mail.
"""

from __future__ import annotations

import random
import socket
from typing import cast

import attrs
import idna
from twisted.internet.interfaces import IResolver
from twisted.names import client, dns, error

from mailappliance.settings import Relay

DNS_TIMEOUT = (2, 4, 8)


@attrs.frozen
class NextHop:
    """Where to connect: a host name (for TLS checks and logs), its address, a port."""

    hostname: str
    address: str
    port: int
    verify_tls: bool = False
    is_smarthost: bool = False
    tls_policy: str = ""  # why TLS is required and verified, e.g. "MTA-STS enforce" (for the deferral text)


# What IResolver's lookups fire with: (answers, authority, additional), each a list of
# records (Twisted types it as a tuple of three single records).
DnsResult = tuple[list[dns.RRHeader], list[dns.RRHeader], list[dns.RRHeader]]


class RoutingError(Exception):
    """No next hop; ``code`` 5xx is permanent (bounce), 4xx temporary (retry)."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text


def make_resolver(address: str) -> IResolver:
    """A twisted.names resolver for ``host:port`` (or the system's resolv.conf if empty)."""
    if not address:
        resolver: IResolver = client.createResolver()
        return resolver
    host, _, port = address.rpartition(":")
    return client.Resolver(servers=[(host.strip("[]"), int(port))])


class Router:
    """Turns a recipient domain into an ordered list of next hops."""

    def __init__(
        self,
        resolver: IResolver,
        smtp_port: int = 25,
        smarthost: Relay | None = None,
        transports: dict[str, Relay] | None = None,
        verify_domains: frozenset[str] = frozenset(),
    ) -> None:
        self.resolver = resolver
        self.smtp_port = smtp_port
        self.smarthost = smarthost
        self.transports = transports or {}
        self.verify_domains = verify_domains

    def uses_relay(self, domain: str) -> bool:
        """Mail for ``domain`` goes to a transport or the smarthost, not to its MX hosts."""
        return domain.lower() in self.transports or self.smarthost is not None

    async def addresses(self, host: str) -> list[str]:
        """The A and AAAA addresses of ``host`` (a literal is itself)."""
        return await self._addresses(host)

    async def next_hops(self, domain: str) -> list[NextHop]:
        domain = ascii_domain(domain.lower())
        relay = self.transports.get(domain) or self.smarthost
        via_smarthost = relay is not None and relay is self.smarthost
        verify = domain in self.verify_domains or via_smarthost
        if relay is not None:
            use_mx = relay.use_mx and ip_literal(relay.host) is None  # "127.0.0.1:25" has no MX to ask for
            names = await self._mx_hosts(relay.host) if use_mx else [relay.host]
            port = relay.port
        else:
            names = await self._mx_hosts(domain)
            port = self.smtp_port
        hops: list[NextHop] = []
        for name in names:
            hops += [NextHop(name, address, port, verify, via_smarthost) for address in await self._addresses(name)]
        if not hops:
            raise RoutingError(451, f"4.4.4 no address found for the mail servers of {domain}")
        return hops

    async def _mx_hosts(self, domain: str) -> list[str]:
        try:
            answers, _, _ = cast(DnsResult, await self.resolver.lookupMailExchange(domain, timeout=DNS_TIMEOUT))
        except error.DNSNameError:
            raise RoutingError(550, f"5.1.2 domain {domain} does not exist") from None
        except Exception as e:  # timeouts, SERVFAIL, refused: try again later
            raise RoutingError(451, f"4.4.3 DNS lookup of MX for {domain} failed: {type(e).__name__}") from None
        records: list[tuple[int, str]] = []
        for rr in answers:
            mx = rr.payload  # (isinstance: the payload class of an MX record, for the type checker)
            if rr.type == dns.MX and isinstance(mx, dns.Record_MX):
                records.append((mx.preference, str(mx.name).lower().rstrip(".")))
        if not records:
            return [domain]  # implicit MX: the domain's own address (RFC 5321 5.1)
        if any(name == "" for _, name in records):
            raise RoutingError(556, f"5.1.10 {domain} does not accept mail (null MX, RFC 7505)")
        random.shuffle(records)  # equal preferences in random order
        records.sort(key=lambda record: record[0])
        return list(dict.fromkeys(name for _, name in records))

    async def _addresses(self, host: str) -> list[str]:
        literal = ip_literal(host)
        if literal is not None:  # [192.0.2.1], [::1], [IPv6:2001:db8::1]: never a DNS question
            return [literal]
        addresses: list[str] = []
        for lookup, record_type in ((self.resolver.lookupAddress, dns.A),
                                    (self.resolver.lookupIPV6Address, dns.AAAA)):
            try:
                answers, _, _ = cast(DnsResult, await lookup(host, timeout=DNS_TIMEOUT))
            except Exception:
                continue
            for rr in answers:  # (isinstance: the payload class of the record type, for the type checker)
                if rr.type == dns.A and record_type == dns.A and isinstance(rr.payload, dns.Record_A):
                    addresses.append(rr.payload.dottedQuad())
                elif rr.type == dns.AAAA and record_type == dns.AAAA and isinstance(rr.payload, dns.Record_AAAA):
                    addresses.append(socket.inet_ntop(socket.AF_INET6, rr.payload.address))
        return addresses


def ascii_domain(domain: str) -> str:
    """The A-label form of an internationalised domain (DNS asks in ASCII); others unchanged."""
    if domain.isascii():
        return domain
    try:
        return idna.encode(domain).decode("ascii")
    except (idna.IDNAError, UnicodeError, ValueError):
        raise RoutingError(553, f"5.1.3 {domain!r} is not a valid internationalised domain name") from None


def ip_literal(host: str) -> str | None:
    """The address if ``host`` is an IPv4 or IPv6 literal (RFC 5321 "IPv6:" tag allowed), else None."""
    text = host[5:] if host.lower().startswith("ipv6:") else host
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            return socket.inet_ntop(family, socket.inet_pton(family, text))
        except OSError:
            continue
    return None
