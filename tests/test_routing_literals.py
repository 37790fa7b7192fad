"""Next hops given as IP literals never wait for DNS (a dead resolver cost 28 s per message)."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred, ensureDeferred

from mailappliance.queue.routing import Router, ip_literal

from mailappliance.settings import Relay


class SilentResolver:
    """A resolver that never answers: any question would hang the test."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def __getattr__(self, name: str) -> Any:
        def lookup(host: str, timeout: Any = None) -> Deferred:
            self.asked.append(f"{name} {host}")
            return Deferred()

        return lookup


@pytest.mark.parametrize("transport, address, port", [
    ("[127.0.0.1]:2525", "127.0.0.1", 2525),
    ("127.0.0.1:2526", "127.0.0.1", 2526),
    ("[::1]:25", "::1", 25),
    ("[IPv6:2001:db8::1]", "2001:db8::1", 25),
])
def test_literal_transports_skip_dns(transport: str, address: str, port: int) -> None:
    """A transport or smarthost written as an address goes straight to it, asking DNS nothing."""
    resolver = SilentResolver()
    router = Router(resolver, transports={"example.net": Relay.parse(transport)})
    result = ensureDeferred(router.next_hops("example.net"))
    hops = result.result  # fired at once: nothing waited on the silent resolver
    assert [(h.address, h.port) for h in hops] == [(address, port)]
    assert resolver.asked == []


def test_ip_literal_recognises_only_addresses() -> None:
    """Host names are not literals; IPv6 is accepted bare or with the RFC 5321 tag."""
    assert ip_literal("mx.example.net") is None
    assert ip_literal("ipv6:::1") == "::1"
    assert ip_literal("192.0.2.300") is None
