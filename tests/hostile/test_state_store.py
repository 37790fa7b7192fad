"""Hostile conditions for the shared state store (issue 17): a Redis that accepts
connections but never answers, a Redis that answers garbage, and client input that
tries to collide with or inject into Redis keys."""

from __future__ import annotations

import base64
import re
import smtplib
import socket
import time
from typing import Any, Callable, Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol

from mailappliance.state.failover import FailoverStore
from mailappliance.state.memory import MemoryStore
from mailappliance.state.redis import RedisStore
from mailappliance.state.resp import RedisClient, ReplyError, parse
from mailappliance.settings import parse_url
from tests.daemon import Appliance
from tests.redis_server import RedisServer
from tests.test_operations import http

TIMEOUT = 0.3


@pytest.fixture
def silent_redis() -> Iterator[int]:
    """A TCP port whose kernel completes every handshake and that never reads or answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield listener.getsockname()[1]


def failover(port: int, probe_interval: float = 60) -> FailoverStore:
    client = RedisClient(parse_url(f"redis://127.0.0.1:{port}"), reactor, timeout=TIMEOUT)
    return FailoverStore(RedisStore(client, reactor), MemoryStore(reactor), reactor, probe_interval,
                         f"redis://127.0.0.1:{port}")


@pytest_twisted.ensureDeferred
async def test_a_silent_redis_costs_one_timeout_then_nothing(silent_redis: int) -> None:
    """The first call waits at most the timeout and is answered from local state; later calls do not wait."""
    store = failover(silent_redis)
    try:
        started = time.monotonic()
        calls = [store.reserve(("messages", "alice"), 3600, 2) for _ in range(3)]  # in flight together
        tokens = [await d for d in calls]
        assert time.monotonic() - started < TIMEOUT + 1.0
        assert store.describe() == "degraded"
        assert [t is not None for t in tokens] == [True, True, False]  # the local limit still applies
        later = store.count(("login-failures-address", "192.0.2.1"), 900, 80)
        assert later.called and later.result == 1  # answered at once, from this process's memory
    finally:
        store.stop()


class _Garbage(Protocol):
    def connectionMade(self) -> None:
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")


@pytest_twisted.ensureDeferred
async def test_a_redis_that_answers_garbage_is_dropped_and_degrades() -> None:
    """A server that speaks something else is dropped at its first reply, and the store degrades."""
    port = reactor.listenTCP(0, Factory.forProtocol(_Garbage), interface="127.0.0.1")  # type: ignore[attr-defined]
    store = failover(port.getHost().port)
    try:
        started = time.monotonic()
        assert await store.marks([("login-trusted", "alice", "192.0.2.1")]) == [0.0]
        assert store.describe() == "degraded" and time.monotonic() - started < TIMEOUT + 1.0
    finally:
        store.stop()
        await port.stopListening()


def test_replies_are_bounded() -> None:
    """Oversized bulk strings, huge arrays, deep nesting and unknown types are refused, never buffered."""
    for reply in (b"$999999999\r\n", b"*999999999\r\n", b"*1\r\n" * 10 + b":1\r\n", b"?x\r\n",
                  b"+" + b"x" * 5000):
        with pytest.raises(ReplyError):
            parse(reply)


def test_login_names_cannot_inject_into_or_collide_in_redis(appliance: Callable[..., Appliance], pki: Any,
                                                            redis: RedisServer) -> None:
    """Logins full of RESP syntax, separators and sheer length become hashed keys; Redis itself is untouched."""
    redis.command(b"SET", b"canary", b"alive")
    instance = appliance(pki=pki, extra={"state": {"redis": redis.url}})
    hostile_logins = ["x\r\n*1\r\n$8\r\nFLUSHALL\r\n", "a:b", "a", "mailappliance:login-trusted:*", "é" * 200,
                      "\x00\x01", "y" * 400]
    for login in hostile_logins:
        with smtplib.SMTP_SSL("127.0.0.1", instance.ports["submissions"], timeout=10,
                              context=instance.client_context()) as smtp:
            smtp.ehlo()
            response = base64.b64encode(f"\0{login}\0wrong".encode()).decode()
            assert smtp.docmd("AUTH", f"PLAIN {response}")[0] in (535, 501)
    assert redis.command(b"GET", b"canary") == b"$5\r\nalive\r\n"
    keys = [key.decode() for key in redis.keys() if key != b"canary"]
    assert keys, "the failures were counted in Redis"
    assert all(re.fullmatch(r"mailappliance:[a-z-]+:[0-9a-f]{64}(:[tfm])?", key) for key in keys), keys


def test_a_silent_redis_does_not_hang_the_daemon(appliance: Callable[..., Appliance], pki: Any,
                                                 silent_redis: int) -> None:
    """With Redis accepting but never answering, a subscriber still logs in and sends, and /health says degraded."""
    instance = appliance(pki=pki, start=False, extra={"state": {
        "redis": f"redis://127.0.0.1:{silent_redis}", "timeout": TIMEOUT, "probe_interval": 60}})
    assert instance.admin("user", "add", "alice@example.org", password="alice-password").returncode == 0
    instance.start()
    with smtplib.SMTP_SSL("127.0.0.1", instance.ports["submissions"], timeout=10,
                          context=instance.client_context()) as smtp:
        smtp.login("alice", "alice-password")
        assert smtp.sendmail("alice@example.org", ["bob@remote.example"], b"Subject: x\r\n\r\ny\r\n") == {}
    status, body = http(instance, "metrics", "/health")
    assert status == 200 and b'"state_store": "degraded"' in body
    assert instance.log().count("state store DEGRADED") == 1
