"""Brute-force throttling: delays, address locks, account locks that spare known addresses;
the same behaviour whether the state is in this process or in a real redis-server."""

from __future__ import annotations

from typing import Any, Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock

from mailappliance.state.memory import MemoryStore
from mailappliance.state.redis import RedisStore
from mailappliance.state.resp import RedisClient
from mailappliance.settings import parse_url
from mailappliance.throttle import AuthThrottle
from mailappliance.settings import ThrottleSettings

SETTINGS = ThrottleSettings(window=600, free_failures=2, max_delay=8, address_lock_after=6,
                            account_lock_after=4, lock_time=300, trusted_for=3600)


@pytest.fixture(params=["memory", "redis"])
def throttle(request: pytest.FixtureRequest) -> Iterator[AuthThrottle]:
    clock = Clock()
    clock.advance(1_700_000_000)
    if request.param == "memory":
        yield AuthThrottle(SETTINGS, clock, MemoryStore(clock))
        return
    client = RedisClient(parse_url(request.getfixturevalue("redis").url), reactor, timeout=2)
    yield AuthThrottle(SETTINGS, clock, RedisStore(client, clock))
    client.close()


def advance(throttle: AuthThrottle, seconds: float) -> None:
    clock: Any = throttle.clock
    clock.advance(seconds)


@pytest_twisted.ensureDeferred
async def test_delays_grow_then_the_address_is_locked(throttle: AuthThrottle) -> None:
    """Failures past the free ones are delayed 1, 2, 4, 8 s, then the address is locked for lock_time."""
    delays = [await throttle.failed("192.0.2.1", f"user{i}") for i in range(6)]
    assert delays == [0, 0, 1, 2, 4, 8]
    verdict = await throttle.check("192.0.2.1", "anyone")
    assert verdict.locked and verdict.retry_after == pytest.approx(300)
    assert not (await throttle.check("192.0.2.2", "anyone")).locked
    advance(throttle, 301)
    assert not (await throttle.check("192.0.2.1", "anyone")).locked


@pytest_twisted.ensureDeferred
async def test_failures_expire_after_the_window(throttle: AuthThrottle) -> None:
    """Failures older than the window no longer count towards delays."""
    for _ in range(5):
        await throttle.failed("192.0.2.1", "x")
    advance(throttle, 601)
    assert await throttle.failed("192.0.2.1", "x") == 0


@pytest_twisted.ensureDeferred
async def test_account_lock_spares_addresses_that_logged_in_before(throttle: AuthThrottle) -> None:
    """A botnet locks the account against strangers, not against the subscriber's own address."""
    await throttle.succeeded("198.51.100.7", "alice")  # alice's usual address
    for i in range(4):  # a botnet: one failure from each of many addresses
        await throttle.failed(f"203.0.113.{i}", "alice")
    assert (await throttle.check("203.0.113.99", "alice")).locked
    assert not (await throttle.check("198.51.100.7", "alice")).locked
    assert not (await throttle.check("203.0.113.99", "bob")).locked


@pytest_twisted.ensureDeferred
async def test_success_forgives_the_address(throttle: AuthThrottle) -> None:
    """A good login clears the address's failures."""
    for _ in range(4):
        await throttle.failed("192.0.2.1", "alice")
    assert await throttle.failures("192.0.2.1") == 4
    await throttle.succeeded("192.0.2.1", "alice")
    assert await throttle.failed("192.0.2.1", "alice") == 0
