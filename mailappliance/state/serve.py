"""The supervisor's side of the state socket: its one MemoryStore, served to the workers.

With ``[server] workers = N`` and no ``[state] redis``, the supervisor
(worker 0) holds the only store of hourly limits, login throttling and POP3
locks, as Postfix's anvil(8) does for its smtpd processes; it uses it
directly, and each worker asks it over its own socket (a socketpair made
at the worker's spawn, see :mod:`mailappliance.workers`).  Frames are
:mod:`mailappliance.state.wire`'s.

Bounds, so that a broken or compromised worker cannot take the supervisor
down: a frame over ``wire.MAX_FRAME``, garbage, or a request of the wrong
shape drops that worker's connection at once (and ``on_violation`` lets the
supervisor restart the worker); replies wait in at most about one socket
buffer (the connection stops reading while the worker does not read its
answers, so its requests stay in the kernel, not in our memory); the
reservation tokens a worker holds are at most ``MAX_TOKENS``, the oldest
forgotten first (a reservation that old has left its window), and so are
the locks it holds (which it gives up when its link ends: a killed worker's
POP3 mailboxes are free at once, not after their lease); the store bounds
its own tables (``memory.MAX_TRACKED``).
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import count as counter
from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, ITCPTransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailappliance.metrics import METRICS
from mailappliance.state import Key, MarkRule
from mailappliance.state.memory import Event, MemoryStore
from mailappliance.state.wire import INCOMPLETE, FrameError, FrameReader, frame, request

log = Logger(namespace="mailappliance.state")

MAX_TOKENS = 100_000  # reservations a worker may still give back


class ServedStore(MemoryStore):
    """The supervisor's MemoryStore while it serves workers: shared by every process ("ok")."""

    shared = True

    def describe(self) -> str:
        return "ok"


def _fired(d: Deferred[Any]) -> Any:
    """The result of a Deferred that has already fired (every MemoryStore call's)."""
    result = d.result
    if isinstance(result, Failure):
        d.addErrback(lambda _: None)  # handled here: no "Unhandled error in Deferred" later
        result.raiseException()
    return result


class StateServerProtocol(Protocol):
    """One worker's connection: requests answered in order, from ``store``, at once."""

    def __init__(self, store: MemoryStore, label: str, on_violation: Callable[[str], None] | None = None) -> None:
        self.store, self.label, self.on_violation = store, label, on_violation
        self.frames = FrameReader()
        self.paused = False
        self.dropped = False
        self.violated = False
        self.tokens: dict[int, tuple[Key, Event]] = {}
        self.locks: dict[tuple[Key, str], None] = {}  # held through this link, oldest first: freed when it ends
        self._token_ids = counter(1)
        self.served = 0

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.registerProducer(self, True)  # type: ignore[attr-defined]  # unix.Server is a consumer

    # -- flow control: stop reading while our replies wait to be read -----------------------

    def pauseProducing(self) -> None:
        self.paused = True
        cast(IPushProducer, self.transport).pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        cast(IPushProducer, self.transport).resumeProducing()
        self._serve()

    def stopProducing(self) -> None:
        self.paused = True

    # -- requests ---------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.dropped:
            return
        self.frames.feed(data)
        self._serve()

    def _serve(self) -> None:
        """Answer what has arrived, in order; the answers go out in one write (a read of
        at most one socket buffer's worth of requests, so the write is bounded too)."""
        assert self.transport is not None
        answers: list[bytes] = []
        try:
            while not self.paused:
                message = self.frames.next()
                if message is INCOMPLETE:
                    break
                ident, op, args = request(message)
                try:
                    answer = [ident, getattr(self, "op_" + op)(*args)]
                except (ValueError, TypeError, OverflowError) as e:  # well-formed, yet the store refused it
                    log.warn("state request {op} from {label} failed: {why}", op=op, label=self.label, why=e)
                    answer = [ident, None, type(e).__name__]
                answers.append(frame(answer))
        except FrameError as e:
            self.drop(str(e))
            return
        self.served += len(answers)
        if answers:
            self.transport.write(b"".join(answers))  # may pause us (pauseProducing) until they are read

    def drop(self, why: str) -> None:
        """Close this worker's connection at once (it broke the format or a bound)."""
        if self.dropped:
            return
        self.dropped = self.violated = True
        self.frames.clear()
        METRICS.count("mailappliance_state_socket_violations_total")
        log.error("state socket of {label}: {why}; connection dropped", label=self.label, why=why)
        if self.transport is not None:
            cast(ITCPTransport, self.transport).abortConnection()
        if self.on_violation is not None:
            self.on_violation(why)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """The worker is gone (killed, crashed, cut off): its POP3 sessions went with it, so
        its mailbox locks are freed now rather than when their lease runs out (not so for a
        worker we cut off: it may still run until its SIGKILL lands)."""
        self.dropped = True
        self.frames.clear()
        self.tokens.clear()
        locks, self.locks = self.locks, {}
        if self.violated:  # cut off by us, maybe not dead yet: its leases end its locks
            return
        for key, owner in locks:
            _fired(self.store.unlock(key, owner))  # only if that owner still holds it

    # -- the operations (wire.OPS names them; arguments already checked) ----------------------

    def op_ping(self) -> str:
        return "pong"

    def op_reserve(self, key: Key, span: float, limit: float, amount: int) -> int | None:
        event = _fired(self.store.reserve(key, span, limit, amount))
        if not isinstance(event, Event):
            return None
        token = next(self._token_ids)
        if len(self.tokens) >= MAX_TOKENS:
            self._forget_tokens()
        self.tokens[token] = (key, event)
        return token

    def _forget_tokens(self) -> None:
        """Drop the tokens whose reservation no longer counts; if most still do, the oldest half."""
        self.tokens = {token: held for token, held in self.tokens.items() if held[1].amount}
        if len(self.tokens) > MAX_TOKENS // 2:
            kept = list(self.tokens.items())[len(self.tokens) - MAX_TOKENS // 2:]
            self.tokens = dict(kept)

    def op_release(self, key: Key, token: int) -> None:
        held = self.tokens.pop(token, None)
        if held is not None:
            _fired(self.store.release(held[0], held[1]))

    def op_total(self, key: Key, span: float) -> int:
        return int(_fired(self.store.total(key, span)))

    def op_count(self, key: Key, span: float, keep: int, rule: tuple[Key, int, float] | None) -> int:
        mark = MarkRule(*rule) if rule is not None else None
        return int(_fired(self.store.count(key, span, keep, mark)))

    def op_forget(self, key: Key) -> None:
        _fired(self.store.forget(key))

    def op_mark(self, key: Key, ttl: float) -> None:
        _fired(self.store.mark(key, ttl))

    def op_marks(self, keys: list[Key]) -> list[float]:
        return list(_fired(self.store.marks(keys)))

    def _held(self, key: Key, owner: str) -> None:
        if (key, owner) not in self.locks and len(self.locks) >= MAX_TOKENS:
            del self.locks[next(iter(self.locks))]  # forgotten here; its lease still ends it
        self.locks[(key, owner)] = None

    def op_lock(self, key: Key, owner: str, ttl: float) -> int | None:
        fence = cast("int | None", _fired(self.store.lock(key, owner, ttl)))
        if fence is not None:
            self._held(key, owner)
        return fence

    def op_refresh(self, key: Key, owner: str, ttl: float) -> bool:
        ours = bool(_fired(self.store.refresh(key, owner, ttl)))
        if ours:
            self._held(key, owner)
        return ours

    def op_holds(self, key: Key, owner: str) -> bool:
        return bool(_fired(self.store.holds(key, owner)))

    def op_unlock(self, key: Key, owner: str) -> None:
        self.locks.pop((key, owner), None)
        _fired(self.store.unlock(key, owner))

    def op_get_value(self, key: Key) -> int | None:
        return cast("int | None", _fired(self.store.get_value(key)))

    def op_set_value(self, key: Key, value: int, ttl: float) -> None:
        _fired(self.store.set_value(key, value, ttl))

    def op_add_value(self, key: Key, amount: int) -> None:
        _fired(self.store.add_value(key, amount))


class StateServerFactory(Factory):
    """Builds the protocol of one worker's connection (adopted from a socketpair), and keeps it."""

    def __init__(self, store: MemoryStore, label: str, on_violation: Callable[[str], None] | None = None) -> None:
        self.store, self.label, self.on_violation = store, label, on_violation
        self.protocol_made: StateServerProtocol | None = None

    def buildProtocol(self, addr: object) -> StateServerProtocol:
        self.protocol_made = StateServerProtocol(self.store, self.label, self.on_violation)
        return self.protocol_made
