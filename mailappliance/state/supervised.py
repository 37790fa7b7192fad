"""A worker's state store: the supervisor's, asked over the state socket.

With ``[server] workers = N`` and no ``[state] redis``, workers 1..N-1 keep
no limits, throttling or locks of their own: each call is one request to
the supervisor (:mod:`mailappliance.state.serve`) on the socket it handed
the worker at spawn.  Requests are pipelined, each with an id, and each has
a deadline (``[state] timeout``): when it passes the call fails with
StateUnavailable and :class:`~mailappliance.state.failover.FailoverStore`
answers from the worker's own memory ("degraded") until a PING is answered
again; the connection stays up (a late answer's id is no longer waited for,
so it is dropped).  At most ``MAX_PENDING`` requests wait at once; more
fail at once rather than queue without end.  A reply that breaks the format
drops the connection, as does the supervisor on a request that does; a
worker whose connection is gone stays degraded (the supervisor restarts a
worker it dropped; if the supervisor itself is gone, the worker dies with it).
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Callable, Sequence
from itertools import count as counter
from typing import Any, cast

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITCPTransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from mailappliance.state import Key, MarkRule, StateUnavailable
from mailappliance.state.wire import INCOMPLETE, MAX_TEXT, FrameError, FrameReader, frame, reply

MAX_PENDING = 10_000  # requests waiting for the supervisor's answer at once


def wire_key(key: Key) -> list[str]:
    """``key`` as sent: a value longer than the wire allows (a client's 5,000-character
    login) travels as its SHA-256, and so does one that starts with NUL, so that no
    short value can spell another's digest: two different tuples never share a key."""
    return [part if len(part) <= MAX_TEXT // 4 and not part.startswith("\0")
            else "\0sha256:" + hashlib.sha256(part.encode("utf-8", "surrogateescape")).hexdigest()
            for part in key]


def _nothing(result: object) -> None:
    return None


def _optional_int(result: object) -> int | None:
    return None if result is None else int(cast(int, result))


def _int(result: object) -> int:
    return int(cast(int, result))


def _bool(result: object) -> bool:
    return bool(result)


def _seconds(result: object) -> list[float]:
    return [float(left) for left in cast(list[float], result)]


_Convert = Callable[[object], Any]


class _Link(Protocol):
    def __init__(self, store: SupervisedStore) -> None:
        self.store = store

    def connectionMade(self) -> None:
        self.store.transport = self.transport

    def dataReceived(self, data: bytes) -> None:
        self.store.received(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.store.drop("the connection to the supervisor was lost")


class _LinkFactory(Factory):
    def __init__(self, store: SupervisedStore) -> None:
        self.store = store

    def buildProtocol(self, addr: object) -> _Link:
        return _Link(self.store)


class SupervisedStore:
    """:class:`~mailappliance.state.StateStore` in the supervisor (see the module docstring)."""

    shared = True

    def __init__(self, reactor: IReactorTime, timeout: float, max_pending: int = MAX_PENDING) -> None:
        self.reactor = reactor
        self.timeout = timeout
        self.max_pending = max_pending
        self.transport: Any = None
        self.why = "not connected to the supervisor"
        self._frames = FrameReader()
        self._ids = counter(1)
        self._pending: dict[int, tuple[Deferred[Any], float, _Convert]] = {}  # by id: oldest first
        self._timer: IDelayedCall | None = None

    @classmethod
    def adopt(cls, descriptor: int, reactor: Any, timeout: float) -> SupervisedStore:
        """The store on the inherited socket ``descriptor`` (the reactor takes a duplicate;
        ``descriptor`` itself is closed)."""
        store = cls(reactor, timeout)
        reactor.adoptStreamConnection(descriptor, socket.AF_UNIX, _LinkFactory(store))
        socket.close(descriptor)
        return store

    def describe(self) -> str:
        return "ok"

    def close(self) -> None:
        self.drop("closed")

    # -- requests -----------------------------------------------------------------------------

    def _ask(self, op: str, args: Sequence[object], convert: _Convert = _nothing) -> Deferred[Any]:
        if self.transport is None:
            return fail(StateUnavailable(self.why))
        if len(self._pending) >= self.max_pending:
            return fail(StateUnavailable(f"{self.max_pending} requests already wait for the supervisor"))
        ident = next(self._ids)
        try:
            data = frame([ident, op, args])
        except (FrameError, ValueError) as e:  # our bug (a key of 1,000 parts): this call fails, not the link
            return fail(StateUnavailable(f"request not sent: {e}"))
        d: Deferred[Any] = Deferred()
        self._pending[ident] = (d, self.reactor.seconds() + self.timeout, convert)
        self.transport.write(data)
        if self._timer is None:
            self._timer = self.reactor.callLater(self.timeout, self._expire)
        return d

    def received(self, data: bytes) -> None:
        self._frames.feed(data)
        try:
            while True:
                message = self._frames.next()
                if message is INCOMPLETE:
                    return
                ident, result, error = reply(message)
                waiting = self._pending.pop(ident, None)
                if waiting is None:
                    continue  # answered after its deadline: the caller has moved on
                d, _, convert = waiting
                if error is not None:
                    d.errback(StateUnavailable(f"the supervisor could not serve it: {error}"))
                    continue
                try:
                    value = convert(result)
                except (TypeError, ValueError):
                    d.errback(StateUnavailable(f"a reply of the wrong kind: {str(result)[:40]}"))
                    continue
                d.callback(value)
        except FrameError as e:
            self.drop(f"the supervisor's reply broke the format: {e}")

    def _expire(self) -> None:
        """Fail every request whose deadline has passed; wait for the next oldest."""
        self._timer = None
        now = self.reactor.seconds()
        late = []
        for ident, (_, deadline, _) in self._pending.items():
            if deadline > now:
                break
            late.append(ident)
        for ident in late:
            d = self._pending.pop(ident)[0]
            d.errback(StateUnavailable(f"the supervisor did not answer within {self.timeout:g} s"))
        if self._pending and self._timer is None:
            deadline = next(iter(self._pending.values()))[1]
            self._timer = self.reactor.callLater(max(0.0, deadline - now), self._expire)

    def drop(self, why: str) -> None:
        """Close the connection and fail every waiting request; later ones fail at once."""
        transport, self.transport = self.transport, None
        if transport is None:
            return
        self.why = why
        self._frames.clear()
        cast(ITCPTransport, transport).abortConnection()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        waiting, self._pending = self._pending, {}
        for d, _, _ in waiting.values():
            d.errback(StateUnavailable(why))

    # -- StateStore -----------------------------------------------------------------------------

    def ping(self) -> Deferred[Any]:
        return self._ask("ping", ())

    def reserve(self, key: Key, span: float, limit: float, amount: int = 1) -> Deferred[int | None]:
        """The token is the supervisor's number for this reservation."""
        bound = None if limit == float("inf") else limit
        return self._ask("reserve", (wire_key(key), span, bound, int(amount)), _optional_int)

    def release(self, key: Key, token: object) -> Deferred[None]:
        if not isinstance(token, int):
            return succeed(None)  # not one of ours: nothing to give back
        return self._ask("release", (wire_key(key), token))

    def total(self, key: Key, span: float) -> Deferred[int]:
        return self._ask("total", (wire_key(key), span), _int)

    def count(self, key: Key, span: float, keep: int, mark: MarkRule | None = None) -> Deferred[int]:
        rule = None if mark is None else (wire_key(mark.key), mark.threshold, mark.ttl)
        return self._ask("count", (wire_key(key), span, keep, rule), _int)

    def forget(self, key: Key) -> Deferred[None]:
        return self._ask("forget", (wire_key(key),))

    def mark(self, key: Key, ttl: float) -> Deferred[None]:
        return self._ask("mark", (wire_key(key), ttl))

    def marks(self, keys: Sequence[Key]) -> Deferred[list[float]]:
        return self._ask("marks", ([wire_key(key) for key in keys],), _seconds)

    def lock(self, key: Key, owner: str, ttl: float) -> Deferred[int | None]:
        return self._ask("lock", (wire_key(key), owner, ttl), _optional_int)

    def refresh(self, key: Key, owner: str, ttl: float) -> Deferred[bool]:
        return self._ask("refresh", (wire_key(key), owner, ttl), _bool)

    def holds(self, key: Key, owner: str) -> Deferred[bool]:
        return self._ask("holds", (wire_key(key), owner), _bool)

    def unlock(self, key: Key, owner: str) -> Deferred[None]:
        return self._ask("unlock", (wire_key(key), owner))

    def get_value(self, key: Key) -> Deferred[int | None]:
        return self._ask("get_value", (wire_key(key),), _optional_int)

    def set_value(self, key: Key, value: int, ttl: float) -> Deferred[None]:
        return self._ask("set_value", (wire_key(key), int(value), ttl))

    def add_value(self, key: Key, amount: int) -> Deferred[None]:
        return self._ask("add_value", (wire_key(key), int(amount)))
