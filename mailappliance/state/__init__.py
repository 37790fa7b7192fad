"""The state that protects the service, behind one interface.

Rate-limit windows with reservations, login-failure counters, "locked" and
"trusted" marks, mailbox locks and cached quota usage live in a
:class:`StateStore`.  Two implementations keep the same contract
(tests/test_state_contract.py runs both):

- :class:`~mailappliance.state.memory.MemoryStore`: this process's memory
  (the embedded default, and the fallback while a shared store is away);
- :class:`~mailappliance.state.redis.RedisStore`: one Redis shared by several
  appliances; every operation is one Lua script or one command, atomic on
  the server, never a read-modify-write from two hosts.

:class:`~mailappliance.state.failover.FailoverStore` puts the memory store
behind the Redis one: when Redis does not answer within its timeout the
appliance keeps serving with per-process state ("degraded") until a probe
finds Redis again.

Every call returns a Deferred and never blocks the reactor; the memory
store's Deferreds have already fired.  Times are the caller's clock
(``clock.seconds()``), so appliances' clocks must agree (NTP), as rspamd's
shared rate limits also assume.  Keys are tuples: a kind named by our code,
then the values (a uid, a client address, a login) that may come from
clients; stores never let two different tuples share a key.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import attrs
from twisted.internet.defer import Deferred

Key = tuple[str, ...]

# What :meth:`StateStore.reserve` grants: opaque to callers, who only hand it
# back to :meth:`StateStore.release` (each store has its own kind of token).
Token = object


class StateUnavailable(Exception):
    """The shared store did not answer (refused, timed out, lost, or refused our login)."""


@attrs.frozen
class MarkRule:
    """For :meth:`StateStore.count`: once the count reaches ``threshold``, set
    the mark ``key`` for ``ttl`` seconds (a lock after repeated failures)."""

    key: Key
    threshold: int
    ttl: float


class StateStore(Protocol):
    """What every store offers; all times are the caller's ``now`` (seconds)."""

    def reserve(self, key: Key, span: float, limit: float, amount: int = 1) -> Deferred[Token | None]:
        """Count ``amount`` in the sliding window ``key`` (``span`` seconds) unless the
        window would then hold more than ``limit``; a token for :meth:`release`, or None
        (refused, nothing counted)."""

    def release(self, key: Key, token: Token) -> Deferred[None]:
        """Take back what :meth:`reserve` counted; nothing if it already left the window."""

    def total(self, key: Key, span: float) -> Deferred[int]:
        """What the window (of reserve or of count) holds now."""

    def count(self, key: Key, span: float, keep: int, mark: MarkRule | None = None) -> Deferred[int]:
        """Record one event (no limit), remember at most ``keep`` of them, return how many
        are in the window; with ``mark``, set that mark once the count reaches its threshold."""

    def forget(self, key: Key) -> Deferred[None]:
        """Empty the window ``key``."""

    def mark(self, key: Key, ttl: float) -> Deferred[None]:
        """Set the mark ``key`` for ``ttl`` seconds."""

    def marks(self, keys: Sequence[Key]) -> Deferred[list[float]]:
        """Seconds left on each mark (0: not set)."""

    def lock(self, key: Key, owner: str, ttl: float) -> Deferred[int | None]:
        """Take the lock for ``owner`` for ``ttl`` seconds: a fencing token (a number that
        grows with every grant of this lock), or None while another owner holds it."""

    def refresh(self, key: Key, owner: str, ttl: float) -> Deferred[bool]:
        """Extend ``owner``'s lock (taking it again if it is free); False: another owner has it."""

    def holds(self, key: Key, owner: str) -> Deferred[bool]:
        """Does ``owner`` hold the lock now (the fencing check before an irreversible step)?"""

    def unlock(self, key: Key, owner: str) -> Deferred[None]:
        """Give the lock up, if ``owner`` holds it."""

    def get_value(self, key: Key) -> Deferred[int | None]:
        """A cached number, None when absent or expired."""

    def set_value(self, key: Key, value: int, ttl: float) -> Deferred[None]:
        """Cache a number for ``ttl`` seconds."""

    def add_value(self, key: Key, amount: int) -> Deferred[None]:
        """Add to a cached number, if it is cached (its expiry unchanged)."""

    def describe(self) -> str:
        """"memory", "ok" (shared) or "degraded", for /health."""
