"""Every state store keeps one contract: windows with reservations, counts with marks,
locks with expiry and fencing, cached numbers.  The Redis store runs against a real
private redis-server, the supervised one (a worker's) against the supervisor's server on
a real socketpair in this process; all take "now" from the same controlled clock."""

from __future__ import annotations

import socket
from typing import Any, AsyncIterator

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock

from mailappliance.state import MarkRule
from mailappliance.state.memory import MemoryStore
from mailappliance.state.redis import RedisStore, encode_key
from mailappliance.state.resp import RedisClient
from mailappliance.state.serve import StateServerFactory
from mailappliance.state.supervised import SupervisedStore, wire_key
from mailappliance.settings import parse_url
from tests.redis_server import RedisServer

START = 1_700_000_000.0


class Env:
    def __init__(self, store: Any, clock: Clock) -> None:
        self.store = store
        self.clock = clock


@pytest.fixture(params=["memory", "redis", "supervised"])
def env(request: pytest.FixtureRequest) -> Any:
    clock = Clock()
    clock.advance(START)
    if request.param == "memory":
        yield Env(MemoryStore(clock), clock)
        return
    if request.param == "supervised":
        store, transport = supervised(MemoryStore(clock))
        yield Env(store, clock)
        store.close()
        transport.abortConnection()
        return
    server: RedisServer = request.getfixturevalue("redis")
    client = RedisClient(parse_url(server.url), reactor, timeout=2)
    yield Env(RedisStore(client, clock, "test:"), clock)
    client.close()


@pytest_twisted.ensureDeferred
async def test_a_window_refuses_past_its_limit_and_expires(env: Env) -> None:
    """reserve counts up to the limit, refuses beyond it, and forgets what left the span."""
    store, key = env.store, ("messages", "alice")
    tokens = [await store.reserve(key, 3600, 3) for _ in range(4)]
    assert [t is not None for t in tokens] == [True, True, True, False]
    assert await store.total(key, 3600) == 3
    assert await store.total(("messages", "bob"), 3600) == 0
    env.clock.advance(1800)
    assert await store.reserve(key, 3600, 3) is None
    env.clock.advance(1800)  # exactly one span after the first three: they no longer count
    assert await store.total(key, 3600) == 0
    assert await store.reserve(key, 3600, 3) is not None


@pytest_twisted.ensureDeferred
async def test_release_gives_back_once_and_amounts_count(env: Env) -> None:
    """A released reservation leaves the total at once; releasing twice or after expiry changes nothing."""
    store, key = env.store, ("bytes", "alice")
    big = await store.reserve(key, 600, 1000, 700)
    assert await store.reserve(key, 600, 1000, 400) is None
    small = await store.reserve(key, 600, 1000, 300)
    assert await store.total(key, 600) == 1000
    await store.release(key, big)
    await store.release(key, big)
    assert await store.total(key, 600) == 300
    env.clock.advance(601)
    await store.release(key, small)
    assert await store.total(key, 600) == 0
    assert await store.reserve(key, 600, float("inf"), 10**9) is not None


@pytest_twisted.ensureDeferred
async def test_count_keeps_a_bounded_window_and_sets_its_mark(env: Env) -> None:
    """count records every event, keeps at most ``keep``, and sets the mark at the threshold."""
    store = env.store
    rule = MarkRule(("locked", "192.0.2.1"), threshold=3, ttl=300)
    found = [await store.count(("failures", "192.0.2.1"), 600, 5, rule) for _ in range(7)]
    assert found == [1, 2, 3, 4, 5, 5, 5]
    left = await store.marks([("locked", "192.0.2.1"), ("locked", "192.0.2.2")])
    assert left[0] == pytest.approx(300) and left[1] == 0
    env.clock.advance(301)
    assert await store.marks([("locked", "192.0.2.1")]) == [0]
    env.clock.advance(300)
    assert await store.count(("failures", "192.0.2.1"), 600, 5) == 1
    await store.forget(("failures", "192.0.2.1"))
    assert await store.count(("failures", "192.0.2.1"), 600, 5) == 1


@pytest_twisted.ensureDeferred
async def test_marks_expire(env: Env) -> None:
    """A mark set for ttl seconds reads as the time left, then as 0."""
    store = env.store
    await store.mark(("trusted", "alice", "192.0.2.1"), 60)
    env.clock.advance(20)
    assert (await store.marks([("trusted", "alice", "192.0.2.1")]))[0] == pytest.approx(40)
    env.clock.advance(40)
    assert await store.marks([("trusted", "alice", "192.0.2.1")]) == [0]


@pytest_twisted.ensureDeferred
async def test_a_lock_has_one_owner_a_growing_fence_and_expires(env: Env) -> None:
    """lock grants one owner (again to the same owner), refreshes extend it, it expires, and
    every grant has a larger fencing token."""
    store, key = env.store, ("mailbox", "alice")
    first = await store.lock(key, "host-a", 60)
    assert first is not None
    assert await store.lock(key, "host-b", 60) is None
    assert await store.holds(key, "host-a") and not await store.holds(key, "host-b")
    env.clock.advance(50)
    assert await store.refresh(key, "host-a", 60)
    assert not await store.refresh(key, "host-b", 60)
    env.clock.advance(50)
    assert await store.lock(key, "host-b", 60) is None  # refreshed: still host-a's
    env.clock.advance(11)  # host-a stopped refreshing (crashed): the lock expired
    assert not await store.holds(key, "host-a")
    second = await store.lock(key, "host-b", 60)
    assert second is not None and second > first
    assert not await store.refresh(key, "host-a", 60)  # host-a comes back: not its lock any more
    await store.unlock(key, "host-a")  # not the holder: nothing happens
    assert await store.holds(key, "host-b")
    await store.unlock(key, "host-b")
    assert await store.refresh(key, "host-a", 60)  # free again: refresh takes it


@pytest_twisted.ensureDeferred
async def test_cached_numbers(env: Env) -> None:
    """set_value caches for ttl, add_value adds only to a cached number."""
    store, key = env.store, ("usage", "alice")
    assert await store.get_value(key) is None
    await store.add_value(key, 5)
    assert await store.get_value(key) is None
    await store.set_value(key, 10**12, 30)
    await store.add_value(key, 5)
    assert await store.get_value(key) == 10**12 + 5
    env.clock.advance(31)
    assert await store.get_value(key) is None


def supervised(served: MemoryStore, timeout: float = 2) -> tuple[SupervisedStore, Any]:
    """A worker's store and the supervisor's end serving ``served``, on a socketpair in this process."""
    supervisor_end, worker_end = socket.socketpair()
    transport = reactor.adoptStreamConnection(supervisor_end.fileno(), socket.AF_UNIX,
                                              StateServerFactory(served, "worker 1"))
    supervisor_end.close()
    return SupervisedStore.adopt(worker_end.detach(), reactor, timeout), transport


def test_supervised_keys_never_collide_and_stay_short() -> None:
    """A worker sends a long or NUL-led key value as its digest: short on the wire, and no value
    a client can send spells another's digest."""
    long = "x" * 5000
    sent = wire_key(("failures", long))
    assert sent[0] == "failures" and len(sent[1]) < 100
    assert wire_key(("failures", sent[1])) != sent  # the digest's text, sent as a value, is hashed again
    assert wire_key(("failures", "a", "b")) != wire_key(("failures", "a\0b"))
    assert wire_key(("failures", "alice")) == ["failures", "alice"]


def test_redis_keys_never_collide_and_never_carry_client_text() -> None:
    """Values are hashed with their lengths: ("a:b", "c") and ("a", "b:c") differ; kinds never mix;
    a key is short and printable whatever a client sent."""
    assert encode_key("p:", ("x", "a:b", "c")) != encode_key("p:", ("x", "a", "b:c"))
    assert encode_key("p:", ("x", "ab", "")) != encode_key("p:", ("x", "a", "b"))
    assert encode_key("p:", ("x", "a")) != encode_key("p:", ("y", "a"))
    key = encode_key("p:", ("failures", "\r\n*1\r\n$8\r\nFLUSHALL\r\n" + "x" * 100_000))
    assert key.startswith("p:failures:") and len(key) == len("p:failures:") + 64 and key.isprintable()
