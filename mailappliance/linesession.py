"""The session kernel that SMTP and POP3 both stand on.

Everything a line-based session must get right against hostile or unlucky
clients lives here once, so the two protocols cannot drift apart:

* **Framing**: complete lines are cut from one input buffer; an overlong line
  is discarded as it streams in and reported once (:data:`LINE_TOO_LONG`).
* **Ordered work**: input is consumed strictly in order; while a command waits
  for the directory, the disk or a streamed answer (``run``/``stream``), later
  pipelined input stays in the buffer.  At most ``units_per_turn`` commands
  run per reactor turn, so one long pipeline cannot delay other sessions.
* **Bounded input and output**: the session is a streaming producer of its
  transport.  When the transport holds more unsent output than its buffer size
  (Twisted pauses producers at 64 KiB), the session stops executing commands
  and stops reading until the client has read; large answers are produced in
  chunks only while the client keeps up.  Input held meanwhile (or while a
  command is busy) is bounded by ``max_pending_input`` (reading stops) and
  ``hard_input_limit`` (the session ends).
* **Time**: idle timeout, slow-drip guard (a command line must complete within
  ``command_time_limit`` however slowly its bytes arrive) and a session
  lifetime (checked as input arrives: a silent session meets its idle
  timeout first), all on the injected clock.  No session has a timer of its
  own: one :class:`IdleSweeper` per clock keeps every session's idle deadline
  and fires each exactly when it is due.  A session whose client does not read
  is aborted at its timeout instead of waiting for a flush that never comes.
* **Small when idle**: thousands of idle connections are the normal load of a
  mail server, so the session's state lives in ``__slots__`` (no per-session
  dict), an idle session holds no input buffer (``_NO_INPUT``) and keeps its
  id as a number, and what a transaction needs is made when it starts.
* **TLS upgrade**: bytes pipelined before the handshake are discarded and the
  protocol is told to forget what it knew (CVE-2011-0411 class).
* **Connection accounting** against the shared ``RateLimits``.
* **Log context**: every event carries the session id and client address, and
  every value the client supplied is escaped (one rule: control characters and
  non-ASCII become escapes), so nobody can plant a fake log line.
* **No silent drop**: an exception in protocol code ends in a reply and a
  logged traceback, never in a connection that just vanishes.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any, TypeVar, cast

import attrs
from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer, IReactorTime, ITCPTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailappliance import logs
from mailappliance.sessions import (
    client_host,
    format_session_id,
    new_session_serial,
    no_delay,
    write_and_close,
    write_now,
)
from mailappliance.verdicts import Verdict

if TYPE_CHECKING:
    from mailappliance.limits import RateLimits

_T = TypeVar("_T")

LINE_TOO_LONG = object()  # handed to the protocol in place of an overlong line
STREAM_BUDGET = 256 * 1024  # octets a streamed answer may write per reactor turn
MAX_HELD_OUTPUT = 16 * 1024  # octets of replies held back for the rest of a pipeline
_INFO_EMITTERS = frozenset({"info", "debug"})  # Logger methods of the levels below warn


def escape_for_log(value: object) -> str:
    """The one escaping rule for client-supplied values in log lines: printable
    ASCII stays, a backslash and everything else become escapes."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    text = str(value)
    if text.isascii() and text.isprintable() and "\\" not in text and "'" not in text:
        return text
    return text.encode("unicode_escape").decode("ascii").replace("'", "\\'")


class ISessionTransport(ITCPTransport, IConsumer, IPushProducer):
    """What a session's transport is, for the type checker: a TCP connection
    (``tcp.Server``) or TLS over one (``TLSMemoryBIOProtocol``, which passes
    what it does not implement itself to the TCP transport), so a consumer that
    takes the session as its producer and a producer that can stop reading.
    Twisted types ``Protocol.transport`` as ``ITransport | None``; no class
    declares this interface (never ask ``providedBy``)."""


@attrs.frozen
class SessionSettings:
    """What the kernel needs to know about its listener."""

    listener: str = ""
    idle_timeout: float = 300
    command_time_limit: float = 120  # one command line, however slowly it drips in
    session_lifetime: float = 0  # seconds; 0: no limit
    max_pending_input: int = 64 * 1024  # held while a command runs: more stops reading
    units_per_turn: int = 100  # commands (or DATA chunks) per reactor turn: fairness between sessions
    hard_input_limit: int = 1024 * 1024  # a client that ignores that is disconnected


class IdleSweeper:
    """The idle timeouts of every session on one clock, with one timer.

    A timer per session (``TimeoutMixin``: a ``DelayedCall``, its bound method
    and dict, about 470 bytes) was the largest part of an idle session, and
    was moved on every read.  Here activity only records the time
    (``LineSession._active_at``); the sweeper keeps the sessions themselves in
    a heap ordered by the deadline it last knew (``_idle_from`` plus the idle
    timeout; each session keeps its place, ``_idle_index``, so an ended one
    leaves at once in O(log n)) and one ``DelayedCall`` for the earliest.
    When a session comes due it either is idle (timed out, exactly at its
    deadline) or was active since (it goes back with the new deadline):
    O(log n) per session per idle period, not per read, and no allocation
    per session but its place number.
    """

    __slots__ = ("_clock", "_heap", "_call")

    def __init__(self, clock: IReactorTime) -> None:
        try:  # weakly: the registry below keys sweepers by their clock
            self._clock: Callable[[], IReactorTime | None] = weakref.ref(clock)
        except TypeError:
            self._clock = lambda: clock
        self._heap: list[LineSession] = []  # a binary heap on each session's known deadline
        self._call: IDelayedCall | None = None

    def __len__(self) -> int:
        """Sessions being timed."""
        return len(self._heap)

    def entries(self) -> int:
        """Entries held (an ended session leaves at once: the same as ``len``)."""
        return len(self._heap)

    def watch(self, session: LineSession) -> None:
        """Start timing ``session`` from its ``_active_at`` (until it times out or :meth:`forget`)."""
        session._idle_from = session._active_at
        session._idle_index = len(self._heap)
        self._heap.append(session)
        self._sift_up(session._idle_index)
        self._schedule()

    def forget(self, session: LineSession) -> None:
        """The session ended: it is never timed out, and the sweeper keeps no reference to it."""
        index = session._idle_index
        if index is None or index >= len(self._heap) or self._heap[index] is not session:
            return  # not timed here (never was, or by another clock's sweeper)
        self._remove(index)
        if not self._heap and self._call is not None:
            self._call.cancel()
            self._call = None

    def _remove(self, index: int) -> LineSession:
        heap = self._heap
        session = heap[index]
        session._idle_index = None
        last = heap.pop()
        if index < len(heap):  # the last one fills the hole and finds its place
            heap[index] = last
            last._idle_index = index
            if index and _due(last) < _due(heap[(index - 1) >> 1]):
                self._sift_up(index)
            else:
                self._sift_down(index)
        return session

    def _sift_up(self, index: int) -> None:
        heap = self._heap
        session = heap[index]
        due = _due(session)
        while index:
            parent = (index - 1) >> 1
            above = heap[parent]
            if _due(above) <= due:
                break
            heap[index] = above
            above._idle_index = index
            index = parent
        heap[index] = session
        session._idle_index = index

    def _sift_down(self, index: int) -> None:
        heap = self._heap
        size = len(heap)
        session = heap[index]
        due = _due(session)
        while True:
            child = 2 * index + 1
            if child >= size:
                break
            below, below_due = heap[child], _due(heap[child])
            if child + 1 < size:
                right = heap[child + 1]
                right_due = _due(right)
                if right_due < below_due:
                    child, below, below_due = child + 1, right, right_due
            if below_due >= due:
                break
            heap[index] = below
            below._idle_index = index
            index = child
        heap[index] = session
        session._idle_index = index

    def _schedule(self) -> None:
        clock = self._clock()
        if not self._heap or clock is None:
            return
        due = _due(self._heap[0])
        if self._call is not None:
            if self._call.getTime() <= due:
                return
            self._call.cancel()
        self._call = clock.callLater(max(0.0, due - clock.seconds()), self._sweep)

    def _sweep(self) -> None:
        self._call = None
        clock = self._clock()
        if clock is None:
            return
        now = clock.seconds()
        heap = self._heap
        while heap and _due(heap[0]) <= now:
            session = heap[0]
            if session._active_at + session.settings.idle_timeout > now:  # active since it was placed
                session._idle_from = session._active_at
                self._sift_down(0)
                continue
            self._remove(0)
            try:
                session.timeoutConnection()
            except Exception:
                session._unexpected(Failure())
        self._schedule()


def _due(session: LineSession) -> float:
    """The idle deadline the sweeper knows for ``session`` (fixed while it is in the heap)."""
    return session._idle_from + session.settings.idle_timeout


_sweepers: weakref.WeakKeyDictionary[IReactorTime, IdleSweeper] = weakref.WeakKeyDictionary()
_strong_sweepers: dict[int, tuple[IReactorTime, IdleSweeper]] = {}  # clocks that take no weak reference


def idle_sweeper(clock: IReactorTime) -> IdleSweeper:
    """The one sweeper of ``clock`` (the reactor, or a test's ``Clock``)."""
    try:
        sweeper = _sweepers.get(clock)
        if sweeper is None:
            sweeper = _sweepers[clock] = IdleSweeper(clock)
        return sweeper
    except TypeError:  # a clock that takes no weak reference: kept for good (there is one reactor)
        held = _strong_sweepers.get(id(clock))
        if held is None or held[0] is not clock:
            held = _strong_sweepers[id(clock)] = (clock, IdleSweeper(clock))
        return held[1]


class _NoInput(bytearray):
    """The input buffer of every session that has no unprocessed input: one shared
    empty buffer that refuses to grow (``dataReceived`` gives a session a buffer of
    its own with the first bytes; ``pump`` drops an emptied one), so an idle
    session holds no buffer and no session can ever write into another's."""

    __slots__ = ()

    def _refuse(self, *args: object) -> Any:
        raise TypeError("the shared empty input buffer is read-only")

    __iadd__ = __imul__ = __setitem__ = append = extend = insert = _refuse


_NO_INPUT = _NoInput()


class _Stream:
    """A large answer being streamed (``LineSession.stream``): made per stream, not per session."""

    __slots__ = ("chunks", "done", "call")

    def __init__(self, chunks: Iterator[bytes], done: Callable[[bool], None]) -> None:
        self.chunks = chunks
        self.done = done
        self.call: IDelayedCall | None = None  # the next slice, in a later reactor turn


_connection_reprs: dict[tuple[str, object], str] = {}  # one per listener and protocol


def share_connection_repr(transport: object) -> None:
    """Twisted's ``tcp.Server`` keeps a ``repr`` text of its own per connection
    ("<SMTPSession #1234 on 25>", 76 bytes, read only by ``repr``); a connection of
    ours gets one shared per listener instead ("<SMTPSession on 25>")."""
    connection = transport if type(transport) is tcp.Server else getattr(transport, "transport", None)
    if type(connection) is not tcp.Server or connection.server is None:
        return
    key = (type(connection.protocol).__name__, connection.server._realPortNumber)
    text = _connection_reprs.get(key)
    if text is None:
        text = _connection_reprs[key] = "<{} on {}>".format(*key)
    connection.repstr = text


@implementer(IPushProducer)
class LineSession(Protocol):
    """Base class of the SMTP and POP3 sessions (see the module docstring).

    Subclasses implement ``consume_input`` (take what they can from
    ``self.input``), ``greet``, ``refuse_connection``, ``say_timeout`` and
    ``internal_error``; they send with ``send`` and wait with ``run``/``stream``.
    """

    # Every attribute of a session is a slot (subclasses list theirs too): an
    # instance dict of ~45 keys was 1.6 KB of every idle connection.
    # Protocol's own attributes are slots here as well, so the dict that
    # Protocol gives every instance stays empty and unallocated.
    __slots__ = ("transport", "connected", "factory", "settings", "clock", "limits", "_serial", "client_ip",
                 "input", "_busy", "_output_paused", "_reading_paused", "_pumping", "_discarding_long_line",
                 "_partial_since", "_stream", "_pump_call", "_started", "_active_at", "_idle_from",
                 "_idle_index", "_expired", "_counted", "_held", "closing", "closed")

    log = Logger(namespace="mailappliance")
    settings: SessionSettings
    clock: IReactorTime
    limits: RateLimits | None  # the shared RateLimits, or None
    transport: ISessionTransport  # set by makeConnection before any session code runs

    def __init__(self) -> None:
        self.connected = 0
        self.limits = None
        self._serial = new_session_serial()  # the id's number: an int is half the size of its text
        self.client_ip = "unknown"
        self.input: bytearray = _NO_INPUT  # a buffer of its own with the first bytes
        self._busy = 0  # asynchronous steps in progress (login, lookup, commit, handshake, stream)
        self._output_paused = False
        self._reading_paused = False
        self._pumping = False
        self._discarding_long_line = False
        self._partial_since: float | None = None
        self._stream: _Stream | None = None
        self._pump_call: IDelayedCall | None = None  # the rest of a long pipeline, in the next reactor turn
        self._started = 0.0
        self._active_at = 0.0  # the last read (or streamed write): the idle timeout counts from here
        self._idle_from = 0.0  # the sweeper's idle deadline counts from here (see IdleSweeper)
        self._idle_index: int | None = None  # our place in the sweeper's heap while it times us
        self._expired = False
        self._counted = False
        self._held = b""  # replies waiting for the rest of a pipeline (see send)
        self.closing = False
        self.closed = False

    @property
    def session_id(self) -> str:
        """The id in every log line of this session (and in the Received field)."""
        return format_session_id(self._serial)

    # -- connection -------------------------------------------------------------

    def connectionMade(self) -> None:
        share_connection_repr(self.transport)
        self.client_ip = client_host(self.transport.getPeer())  # IPv4-mapped IPv6 -> IPv4
        no_delay(self.transport)
        self.transport.registerProducer(self, True)
        if self.limits is not None:
            hit = self.limits.connection_opened(self.client_ip, self.settings.listener)
            if hit is not None:
                self.log_event(self.log.info, "limit {limit} reached for {key}",
                           limit=hit.rule.removeprefix("limit."), key=hit.value)
                self.refuse_connection(hit)
                self.close()
                return
            self._counted = True
        self._started = self._active_at = self.clock.seconds()  # the lifetime is checked as input arrives
        idle_sweeper(self.clock).watch(self)
        self.greet()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True
        self._held = b""
        if self._idle_index is not None:
            idle_sweeper(self.clock).forget(self)
        stream_call = self._stream.call if self._stream is not None else None
        for call in (stream_call, self._pump_call):
            if call is not None and call.active():
                call.cancel()
        self._pump_call = None
        if self._stream is not None:
            self._stream.call = None
            self._end_stream(False)
        if self._counted and self.limits is not None:
            self._counted = False
            self.limits.connection_closed(self.client_ip, self.settings.listener)
        try:
            self.session_ended()
        finally:
            self.log_event(self.log.info, "disconnect")

    def close(self, last: bytes = b"") -> None:
        """End the session after what was sent and ``last`` (abort if the client does
        not read); on TLS ``last`` leaves in one send with the close_notify."""
        self.closing = True
        self.input.clear()
        if self.closed:
            return
        if self._output_paused:
            self.transport.abortConnection()
        else:
            held, self._held = self._held, b""
            write_and_close(self.transport, held + last)

    def abort(self) -> None:
        """Drop the connection now, unsent output included."""
        self.closing = True
        self.input.clear()
        if not self.closed:
            self.transport.abortConnection()

    def timeoutConnection(self) -> None:
        """The idle timeout (the sweeper calls this once, exactly when it is due)."""
        self.log_event(self.log.info, "idle timeout")
        if self.closing or self._output_paused or self._stream is not None:
            self.abort()  # the client stopped reading: a goodbye would never get out
            return
        self.say_timeout("idle timeout")
        self.close()

    @property
    def lifetime(self) -> float:
        """Seconds a session may last: the shared limits' live value (SIGHUP changes it)."""
        if self.limits is not None:
            return float(getattr(self.limits.settings, "session_lifetime", self.settings.session_lifetime))
        return self.settings.session_lifetime

    def _end_expired(self) -> None:
        self.log_event(self.log.info, "session lifetime of {seconds:.0f} s reached", seconds=self.lifetime)
        if self._output_paused:
            self.abort()
            return
        self.say_timeout("session lifetime reached")
        self.close()

    # -- hooks for the protocol ----------------------------------------------------

    def greet(self) -> None:
        raise NotImplementedError

    def refuse_connection(self, hit: Verdict) -> None:
        raise NotImplementedError

    def say_timeout(self, why: str) -> None:
        raise NotImplementedError

    def consume_input(self) -> bool:
        """Take one unit (a line, a data chunk) from ``self.input``; False when
        nothing complete is there yet."""
        raise NotImplementedError

    def internal_error(self, failure: Failure) -> None:
        """Answer after a bug in protocol code (the traceback is already logged)."""
        raise NotImplementedError

    def session_ended(self) -> None:
        """The connection is gone: release what the session holds."""

    def deadline_passed(self, now: float) -> str | None:
        """A protocol phase that took too long (e.g. DATA), named; None if all is well."""
        return None

    def input_stalled(self) -> bool:
        """Reading must stop now, not only past ``max_pending_input``: the input waits
        for storage (a full spill backlog); asked only while input is held."""
        return False

    # -- input ------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.closing or self.closed:
            return
        now = self._active_at = self.clock.seconds()  # the idle timeout starts again
        if self._too_slow(now):
            return
        lifetime = self.lifetime
        if lifetime > 0 and now - self._started > lifetime:
            self._expired = True  # ends at the next command boundary (after a running command)
        if self.input is _NO_INPUT:
            self.input = bytearray(data)
        else:
            self.input += data
        if len(self.input) > self.settings.hard_input_limit:
            self.log_event(self.log.warn, "too much unprocessed input ({n} octets), disconnecting",
                           n=len(self.input))
            self.abort()
            return
        self.pump()

    def _too_slow(self, now: float) -> bool:
        """Slow-drip defence, checked as bytes arrive (a byte before each idle timeout does not help)."""
        what = self.deadline_passed(now)
        if what is None and self._partial_since is not None \
                and now - self._partial_since > self.settings.command_time_limit:
            what = "command line"
        if what is None:
            return False
        self.log_event(self.log.info, "too slow: {what} took too long", what=what)
        self.say_timeout(f"{what} took too long")
        self.close()
        return True

    @property
    def held(self) -> bool:
        """True while input must wait (a command in progress, or unread output)."""
        return (bool(self._busy) or self._output_paused or self._pump_call is not None
                or self.closing or self.closed)

    def pump(self) -> None:
        """Consume input in order until it runs out or something must be waited for."""
        if self._pumping:
            return  # an outer call up the stack continues the loop
        self._pumping = True
        budget = self.settings.units_per_turn
        try:
            while not self.held:
                if self._expired:
                    self._end_expired()
                    break
                if not self.input:
                    break
                if budget <= 0:  # a long pipeline must not hold the reactor: the rest next turn
                    self._pump_call = self.clock.callLater(0, self._next_turn)
                    break
                if not self.consume_input():
                    break
                budget -= 1
        except Exception:
            self._unexpected(Failure())
        finally:
            self._pumping = False
        if self._held and not (self.held and b"\n" in self.input):
            self.flush_output()  # the client waits for these now (nothing more to answer at once)
        if self.input and not self.held:
            if self._partial_since is None:
                self._partial_since = self.clock.seconds()
        else:
            self._partial_since = None
        self._update_reading()

    def _next_turn(self) -> None:
        self._pump_call = None
        self.pump()

    def _update_reading(self) -> None:
        if self.closed:
            return
        # Unread output alone must not stop reading: a TLS layer pauses its
        # producer while the handshake is pending, and the handshake needs reads.
        want_paused = self.held and (len(self.input) > self.settings.max_pending_input or self.input_stalled())
        if want_paused and not self._reading_paused:
            self._reading_paused = True
            self.transport.pauseProducing()
        elif self._reading_paused and not want_paused:
            self._reading_paused = False
            self.transport.resumeProducing()

    def next_line(self, limit: int) -> bytes | object | None:
        """The next line without its line ending (CRLF or bare LF), LINE_TOO_LONG
        for a line longer than ``limit`` octets, or None while incomplete."""
        buffer = self.input
        if self._discarding_long_line:
            end = buffer.find(b"\n")
            if end < 0:
                buffer.clear()
                return None
            del buffer[: end + 1]
            self._discarding_long_line = False
            return LINE_TOO_LONG
        end = buffer.find(b"\n", 0, limit + 2)
        if end < 0:
            if len(buffer) <= limit + 1:
                return None
            end = buffer.find(b"\n", limit)
            if end < 0:
                buffer.clear()
                self._discarding_long_line = True
                return None
            del buffer[: end + 1]
            return LINE_TOO_LONG
        line = bytes(buffer[:end])
        del buffer[: end + 1]
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > limit:
            return LINE_TOO_LONG
        return line

    def discard_pipelined_input(self, command: str) -> None:
        """Before a TLS handshake: nothing sent in clear may act inside TLS (and the
        replies so far, the one that starts TLS included, go out in clear first)."""
        self.flush_output()
        if self.input or self._discarding_long_line:
            self.log_event(self.log.warn, "discarded {n} octets pipelined after {command}",
                           n=len(self.input), command=command)
        self.input.clear()
        self._discarding_long_line = False

    # -- asynchronous work ---------------------------------------------------------------

    def run(self, d: Deferred[_T]) -> Deferred[None]:
        """Hold later input until ``d`` fires; a failure nobody handled ends in ``internal_error``."""
        self._busy += 1
        d.addErrback(self._unexpected)
        return d.addBoth(self._done)

    def run_coroutine(self, coroutine: Coroutine[Deferred[object], object, _T],
                      then: Callable[[_T], Deferred[None] | None], failed: Callable[[Failure], None]) -> None:
        """``then(result)`` of ``coroutine``, or ``failed`` when it (or ``then``) raises; input
        waits meanwhile, as with ``run``.  A coroutine that finishes without waiting (a lookup
        answered from memory) costs no Deferred at all: see :func:`run_eagerly`."""
        try:
            finished, outcome = run_eagerly(coroutine)
        except Exception:
            failed(Failure())
            return
        if not finished:
            self.run(cast(Deferred[_T], outcome).addCallback(then).addErrback(failed))
            return
        try:
            follow = then(cast(_T, outcome))
        except Exception:
            failed(Failure())
            return
        if follow is not None:
            self.run(follow.addErrback(failed))

    def _done(self, _: object) -> None:
        self._busy -= 1
        if self._busy:
            return
        if self._expired and not self.closing and not self.closed:
            self._end_expired()
            return
        self.pump()

    def _unexpected(self, failure: Failure) -> None:
        self.log_event(self.log.failure, "internal error", failure=failure)
        if not self.closing and not self.closed:
            try:
                self.internal_error(failure)
            except Exception:
                self.log_event(self.log.failure, "internal error while answering an internal error")
                self.abort()

    # -- output -------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """A reply.  While more pipelined commands are already here it is held, so
        their replies leave together (RFC 2920 allows it; one write and, on TLS, one
        record instead of one each); it is flushed once no complete command waits,
        at ``MAX_HELD_OUTPUT``, before a TLS switch, a stream or a close."""
        if self.closed:
            return
        if b"\n" in self.input and len(self._held) + len(data) <= MAX_HELD_OUTPUT:
            self._held += data
            return
        self.flush_output(data)

    def flush_output(self, data: bytes = b"") -> None:
        """Write what is held, then ``data``."""
        if self._held:
            data, self._held = self._held + data, b""
        if data and not self.closed:
            write_now(self.transport, data)

    def stream(self, chunks: Iterator[bytes], done: Callable[[bool], None]) -> None:
        """Send a large answer chunk by chunk, only while the client reads it.

        Input waits meanwhile; ``done(True)`` runs after the last chunk,
        ``done(False)`` if the connection ended first or a chunk could not be
        made (OSError: logged, connection dropped).
        """
        self._busy += 1
        self._stream = _Stream(chunks, done)
        self.flush_output()
        self._continue_stream()

    def _continue_stream(self) -> None:
        stream = self._stream
        if stream is not None:
            stream.call = None
        budget = STREAM_BUDGET
        while stream is not None and self._stream is stream and not self._output_paused and not self.closed:
            if budget <= 0:  # fairness: other sessions get the reactor between slices
                stream.call = self.clock.callLater(0, self._continue_stream)
                return
            try:
                chunk = next(stream.chunks, None)
            except OSError as e:
                self.log_event(self.log.error, "read error while sending: {error}", error=e)
                self._end_stream(False)
                self.abort()
                return
            if chunk is None:
                self._end_stream(True)
                self._done(None)
                return
            budget -= len(chunk)
            self._active_at = self.clock.seconds()  # the idle timeout starts again
            self.flush_output(chunk)  # never held: the transport's flow control bounds a stream

    def _end_stream(self, complete: bool) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.done(complete)

    # IPushProducer: the transport says whether the client keeps up with our output.
    def pauseProducing(self) -> None:
        self._output_paused = True
        self._update_reading()

    def resumeProducing(self) -> None:
        self._output_paused = False
        self._update_reading()
        if self._stream is not None:
            if self._stream.call is None:
                self._continue_stream()
        else:
            self.pump()

    def stopProducing(self) -> None:
        """The connection is going away; connectionLost cleans up."""

    # -- log context -----------------------------------------------------------------------

    def log_event(self, emit: Callable[..., None], fmt: str, **fields: object) -> None:
        """Log with the session id and client address; client-supplied values escaped."""
        if logs.info_dropped() and getattr(emit, "__name__", "") in _INFO_EMITTERS:
            return  # the level drops it anyway: don't build it
        safe = {k: escape_for_log(v) if isinstance(v, (str, bytes)) else v for k, v in fields.items()}
        emit("session={session} client=[{client}] " + fmt, session=self.session_id, client=self.client_ip,
             **safe)


def run_eagerly(coroutine: Coroutine[Deferred[Any], Any, _T]) -> tuple[bool, _T | Deferred[_T]]:
    """Run ``coroutine`` until it finishes or must wait: ``(True, its result)`` (its
    exception is raised here), or ``(False, a Deferred of its result)`` that Twisted
    drives from where it stopped.  ``Deferred.fromCoroutine`` would build a Deferred,
    a context copy and a callback chain even for a coroutine that never waits."""
    try:
        awaited = coroutine.send(None)
    except StopIteration as finished:
        return True, cast(_T, finished.value)
    return False, Deferred.fromCoroutine(_resume(coroutine, awaited))


async def _resume(coroutine: Coroutine[Deferred[Any], Any, _T], awaited: Deferred[Any]) -> _T:
    """Drive a started coroutine on: wait for the Deferred it waits on, then let it go on.
    A result it reads from that Deferred itself, which still holds it when this resumes
    (Twisted resumes a waiter inside the Deferred's callback); a failure is thrown in."""
    while True:
        if not isinstance(awaited, Deferred):
            coroutine.close()
            raise TypeError(f"a coroutine run eagerly waited on {awaited!r}, not a Deferred")
        try:
            await awaited
        except GeneratorExit:
            coroutine.close()
            raise
        except BaseException as error:
            failure: BaseException | None = error
        else:
            failure = None
        try:
            awaited = coroutine.send(None) if failure is None else coroutine.throw(failure)
        except StopIteration as finished:
            return cast(_T, finished.value)
