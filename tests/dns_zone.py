"""A scriptable DNS server on loopback for message-authentication tests.

Records live in a dict the test changes at any time (no restart); a name
can also be made to answer SERVFAIL or never to answer at all, which
``twistd dns`` cannot do.  UDP (truncated over 512 octets, as RFC 1035 says
without EDNS) and TCP, in threads, with dnspython's message codec.
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
from typing import Any, Iterator

import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

from tests.daemon import free_port


def txt_strings(text: str) -> str:
    """A TXT value in zone syntax, split into 255-octet strings."""
    return " ".join('"' + text[i:i + 255].replace('"', '\\"') + '"' for i in range(0, len(text), 255)) or '""'


class ZoneServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.records: dict[tuple[str, str], list[str]] = {}
        self.servfail: set[str] = set()
        self.silent: set[str] = set()
        self.ttl = 300
        self.queries: list[tuple[str, str]] = []
        server = self

        class Udp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                reply = server.answer(data, udp=True)
                if reply is not None:
                    sock.sendto(reply, self.client_address)

        class Tcp(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                while True:
                    head = self.rfile.read(2)
                    if len(head) < 2:
                        return
                    reply = server.answer(self.rfile.read(struct.unpack("!H", head)[0]), udp=False)
                    if reply is None:
                        return
                    self.wfile.write(struct.pack("!H", len(reply)) + reply)

        socketserver.ThreadingUDPServer.allow_reuse_address = True
        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self._udp = socketserver.ThreadingUDPServer(("127.0.0.1", self.port), Udp)
        self._tcp = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), Tcp)
        for srv in (self._udp, self._tcp):
            srv.daemon_threads = True
            threading.Thread(target=srv.serve_forever, daemon=True).start()

    def add(self, name: str, rtype: str, *values: str) -> None:
        """``add("example.org", "TXT", txt_strings("v=spf1 -all"))``; values in zone syntax."""
        self.records.setdefault((name.lower().rstrip("."), rtype.upper()), []).extend(values)

    def txt(self, name: str, text: str) -> None:
        """Set ``name``'s TXT record to ``text`` (replacing any earlier one)."""
        self.records[(name.lower().rstrip("."), "TXT")] = [txt_strings(text)]

    def answer(self, wire: bytes, udp: bool) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            return None
        question = query.question[0]
        name = question.name.to_text().lower().rstrip(".")
        rtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, rtype))
        if name in self.silent:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if name in self.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        values = self.records.get((name, rtype))
        if values:
            response.answer.append(dns.rrset.from_text(question.name, self.ttl, "IN", rtype, *values))
        elif not any(key[0] == name for key in self.records):
            response.set_rcode(dns.rcode.NXDOMAIN)
        wire = response.to_wire()
        if udp and len(wire) > 512 and query.edns < 0:
            response.answer = []
            response.flags |= dns.flags.TC
            wire = response.to_wire()
        return wire

    def stop(self) -> None:
        for srv in (self._udp, self._tcp):
            srv.shutdown()
            srv.server_close()

    def resolver(self) -> Any:
        """A dnspython resolver asking only this server (for verifiers in the test)."""
        import dns.resolver

        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.port = self.port
        resolver.lifetime = 5
        return resolver

    def dkim_dnsfunc(self) -> Any:
        """dkimpy's dnsfunc, against this server."""
        resolver = self.resolver()

        def dnsfunc(name: Any, timeout: float = 5) -> bytes | None:
            name = name.decode() if isinstance(name, bytes) else name
            try:
                answer = resolver.resolve(name, "TXT")
            except Exception:
                return None
            return b"".join(answer.rrset[0].strings)

        return dnsfunc


@pytest.fixture
def zone() -> Iterator[ZoneServer]:
    server = ZoneServer()
    yield server
    server.stop()
