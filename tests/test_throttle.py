"""Brute-force throttling: delays, address locks, account locks that spare known addresses."""

from __future__ import annotations

from twisted.internet.task import Clock

from mailappliance.throttle import AuthThrottle, ThrottleSettings

SETTINGS = ThrottleSettings(window=600, free_failures=2, max_delay=8, address_lock_after=6,
                            account_lock_after=4, lock_time=300, trusted_for=3600)


def test_delays_grow_then_the_address_is_locked() -> None:
    """Failures past the free ones are delayed 1, 2, 4, 8 s, then the address is locked for lock_time."""
    clock = Clock()
    throttle = AuthThrottle(SETTINGS, clock)
    delays = [throttle.failed("192.0.2.1", f"user{i}") for i in range(6)]
    assert delays == [0, 0, 1, 2, 4, 8]
    verdict = throttle.check("192.0.2.1", "anyone")
    assert verdict.locked and verdict.retry_after == 300
    assert not throttle.check("192.0.2.2", "anyone").locked
    clock.advance(301)
    assert not throttle.check("192.0.2.1", "anyone").locked


def test_failures_expire_after_the_window() -> None:
    """Failures older than the window no longer count."""
    clock = Clock()
    throttle = AuthThrottle(SETTINGS, clock)
    for _ in range(5):
        throttle.failed("192.0.2.1", "x")
    clock.advance(601)
    assert throttle.failed("192.0.2.1", "x") == 0


def test_account_lock_spares_addresses_that_logged_in_before() -> None:
    """An account locked by failures from many addresses stays open to an address that logged in before."""
    clock = Clock()
    throttle = AuthThrottle(SETTINGS, clock)
    throttle.succeeded("198.51.100.7", "alice")  # alice's usual address
    for i in range(4):  # a botnet: one failure from each of many addresses
        throttle.failed(f"203.0.113.{i}", "alice")
    assert throttle.check("203.0.113.99", "alice").locked
    assert not throttle.check("198.51.100.7", "alice").locked
    assert not throttle.check("203.0.113.99", "bob").locked


def test_success_forgives_the_address() -> None:
    """A good login clears the address's failures."""
    clock = Clock()
    throttle = AuthThrottle(SETTINGS, clock)
    for _ in range(4):
        throttle.failed("192.0.2.1", "alice")
    throttle.succeeded("192.0.2.1", "alice")
    assert throttle.failed("192.0.2.1", "alice") == 0
