"""The shared store first (Redis, or the supervisor's with ``[server] workers``), this
process's memory when it is away: degraded, never down.

The text below says Redis; the supervisor's store (mailappliance.state.supervised)
is switched from and back to in the same way.  While Redis answers, every call goes there ("ok": state shared by every
appliance).  The first call that fails (refused, timed out after
``[state] timeout``, connection lost) switches to the memory store
("degraded"): that call and the next ones are answered from this process's
state at once, so sessions never wait on a dead Redis more than one
timeout, and local limits and login throttling keep applying.  A probe
(PING) every ``probe_interval`` seconds switches back when Redis answers.
Each switch is logged once and counted in /metrics.

What a call reserved or locked is given back to the store that granted it.
Counts made while degraded stay local (they are not merged into Redis).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailappliance.metrics import METRICS
from mailappliance.state import Key, MarkRule, StateUnavailable, Token
from mailappliance.state.memory import MemoryStore
from mailappliance.state.redis import RedisStore
from mailappliance.state.resp import RedisError
from mailappliance.state.supervised import SupervisedStore

log = Logger(namespace="mailappliance.state")

_T = TypeVar("_T")
_Store = MemoryStore | RedisStore | SupervisedStore


class _Granted:
    """A reservation token with the store that granted it."""

    __slots__ = ("store", "token")

    def __init__(self, store: _Store, token: Token) -> None:
        self.store = store
        self.token = token


class FailoverStore:
    """:class:`~mailappliance.state.StateStore`: RedisStore (or SupervisedStore), with MemoryStore
    while it is away."""

    def __init__(self, shared: RedisStore | SupervisedStore, local: MemoryStore, reactor: IReactorTime,
                 probe_interval: float, where: str) -> None:
        self.shared_store = shared
        self.local = local
        self.reactor = reactor
        self.probe_interval = probe_interval
        self.where = where  # for the log: "Redis at redis://host:6379/0", "the supervisor"
        self.degraded = False
        self.reason = ""
        self._probe = LoopingCall(self._try_again)
        self._probe.clock = reactor
        self._lock_homes: dict[tuple[Key, str], _Store] = {}  # (key, owner) -> the store that granted the lock
        METRICS.gauge("mailappliance_state_store_shared",
                      "1 while limits, login throttling and mailbox locks are shared (in Redis, or a worker's "
                      "in the supervisor's store); 0 while degraded to this process's memory.",
                      lambda: 0 if self.degraded else 1)

    @property
    def shared(self) -> bool:
        return not self.degraded

    def describe(self) -> str:
        return "degraded" if self.degraded else "ok"

    # -- switching --------------------------------------------------------------------

    def start(self) -> None:
        """Connect now (a PING), so a Redis that is away shows at start-up, not at the first login."""
        d = self.shared_store.ping()
        d.addCallbacks(lambda _: log.info("state store: shared in {where}", where=self.where),
                       self._unavailable)

    def stop(self) -> None:
        if self._probe.running:
            self._probe.stop()
        self.shared_store.close()

    def _unavailable(self, failure: Failure) -> None:
        METRICS.count("mailappliance_state_store_errors_total")
        if self.degraded:
            return
        self.degraded = True
        self.reason = failure.getErrorMessage()
        METRICS.count("mailappliance_state_store_transitions_total", to="degraded")
        log.error("state store DEGRADED: {why}; limits, login throttling and mailbox locks are per process "
                  "until {where} answers again (trying every {interval:g} s)",
                  why=self.reason, where=self.where, interval=self.probe_interval)
        if not self._probe.running:
            self._probe.start(self.probe_interval, now=False)

    def _try_again(self) -> Deferred[None]:
        return self.shared_store.ping().addCallbacks(self._recovered, lambda failure: None)

    def _recovered(self, _: object) -> None:
        if not self.degraded:
            return
        self.degraded = False
        METRICS.count("mailappliance_state_store_transitions_total", to="shared")
        log.warn("state store shared again: {where} answers (it was away: {why})",
                 where=self.where, why=self.reason)
        if self._probe.running:
            self._probe.stop()

    def _call(self, call: Callable[[_Store], Deferred[_T]]) -> Deferred[_T]:
        """``call`` on Redis, or on memory while degraded or when this call fails."""
        if self.degraded:
            return call(self.local)
        return call(self.shared_store).addErrback(self._fall_back, call)

    def _fall_back(self, failure: Failure, call: Callable[[_Store], Deferred[_T]]) -> Deferred[_T]:
        failure.trap(StateUnavailable, RedisError)  # anything else is our bug: let it show
        self._unavailable(failure)
        return call(self.local)

    def _lost(self, failure: Failure) -> None:
        """Errback of a call not worth redoing locally (Redis's copy expires with time)."""
        failure.trap(StateUnavailable, RedisError)
        self._unavailable(failure)

    # -- windows --------------------------------------------------------------------

    def reserve(self, key: Key, span: float, limit: float, amount: int = 1) -> Deferred[Token | None]:
        def granted(token: Token | None, store: _Store) -> Token | None:
            return None if token is None else _Granted(store, token)

        if self.degraded:
            return self.local.reserve(key, span, limit, amount).addCallback(granted, self.local)
        d = self.shared_store.reserve(key, span, limit, amount)
        return d.addCallback(granted, self.shared_store).addErrback(
            self._fall_back_reserve, key, span, limit, amount)

    def _fall_back_reserve(self, failure: Failure, key: Key, span: float, limit: float,
                           amount: int) -> Deferred[Token | None]:
        failure.trap(StateUnavailable, RedisError)  # anything else is our bug: let it show
        self._unavailable(failure)
        d = self.local.reserve(key, span, limit, amount)
        return d.addCallback(lambda token: None if token is None else _Granted(self.local, token))

    def release(self, key: Key, token: Token) -> Deferred[None]:
        if not isinstance(token, _Granted):
            return succeed(None)
        if token.store is self.local:
            return self.local.release(key, token.token)
        if self.degraded:
            return succeed(None)  # it leaves Redis's window with time
        return self.shared_store.release(key, token.token).addErrback(self._lost)

    def total(self, key: Key, span: float) -> Deferred[int]:
        return self._call(lambda store: store.total(key, span))

    def count(self, key: Key, span: float, keep: int, mark: MarkRule | None = None) -> Deferred[int]:
        return self._call(lambda store: store.count(key, span, keep, mark))

    def forget(self, key: Key) -> Deferred[None]:
        self.local.forget(key)
        return self._call(lambda store: store.forget(key)) if not self.degraded else succeed(None)

    # -- marks ----------------------------------------------------------------------

    def mark(self, key: Key, ttl: float) -> Deferred[None]:
        return self._call(lambda store: store.mark(key, ttl))

    def marks(self, keys: Sequence[Key]) -> Deferred[list[float]]:
        return self._call(lambda store: store.marks(keys))

    # -- locks ----------------------------------------------------------------------

    def _current(self) -> _Store:
        return self.local if self.degraded else self.shared_store

    def lock(self, key: Key, owner: str, ttl: float) -> Deferred[int | None]:
        d = self._call(lambda store: store.lock(key, owner, ttl))

        def granted(fence: int | None) -> int | None:
            if fence is not None:  # by Redis, unless this call (or an earlier one) found it away
                self._lock_homes[(key, owner)] = self._current()
            return fence

        d.addCallback(granted)
        return d

    def refresh(self, key: Key, owner: str, ttl: float) -> Deferred[bool]:
        """Extend the lock where it is held now; a lock taken while degraded moves to
        Redis when Redis is back (False when another host took it meanwhile)."""
        home = self._lock_homes.get((key, owner))
        d = self._call(lambda store: store.refresh(key, owner, ttl))

        def refreshed(ours: bool) -> bool:
            now_home = self._current()
            if ours:
                if home is self.local and now_home is self.shared_store:
                    self.local.unlock(key, owner)
                self._lock_homes[(key, owner)] = now_home
            return ours

        d.addCallback(refreshed)
        return d

    def holds(self, key: Key, owner: str) -> Deferred[bool]:
        if self.degraded:
            return succeed(True)  # per process now: the caller's own lock table decides
        d = self.shared_store.holds(key, owner)

        def unknown(failure: Failure) -> bool:
            failure.trap(StateUnavailable, RedisError)
            self._unavailable(failure)
            return True

        d.addErrback(unknown)
        return d

    def unlock(self, key: Key, owner: str) -> Deferred[None]:
        self._lock_homes.pop((key, owner), None)
        self.local.unlock(key, owner)
        if self.degraded:
            return succeed(None)  # Redis's copy, if any, expires
        return self.shared_store.unlock(key, owner).addErrback(self._lost)

    # -- cached numbers -----------------------------------------------------------------

    def get_value(self, key: Key) -> Deferred[int | None]:
        return self._call(lambda store: store.get_value(key))

    def set_value(self, key: Key, value: int, ttl: float) -> Deferred[None]:
        return self._call(lambda store: store.set_value(key, value, ttl))

    def add_value(self, key: Key, amount: int) -> Deferred[None]:
        return self._call(lambda store: store.add_value(key, amount))
