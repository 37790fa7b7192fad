"""A small asynchronous Redis client on Twisted (RESP2), for the shared state store.

Why not redis-py in a thread pool: every rate-limit check is on the path of
an SMTP command, so a thread hand-off per call (and a pool sized for the
worst burst) would cost more than the round trip itself; RESP2 is a few
dozen lines, and one pipelined connection on the reactor carries every
session's commands in order (Redis answers in order).

- ``redis://[user[:password]@]host[:port][/db]``, ``rediss://`` (TLS, the
  server's certificate checked against ``ca_file`` or the system's CAs) and
  ``unix:///path/to/socket[?db=N]``.
- AUTH (with an ACL user) and SELECT when the connection opens; commands
  issued meanwhile wait for it.
- Every command has a deadline (``timeout``, the connection included): when it
  passes, that command fails with StateUnavailable and the connection is
  dropped (the answers still owed would come out of order); so does every
  other command waiting on it.  The next command connects again.
- Replies are bounded (size and nesting): a server that sends garbage or
  too much is dropped, never buffered without end.
- Scripts go by EVALSHA, and by EVAL once after NOSCRIPT (a restarted Redis).
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Generic, TypeAlias, TypeVar, cast

import attrs
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail, gatherResults, succeed
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint, ITCPTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

from mailappliance.settings import RedisAddress
from mailappliance.state import StateUnavailable

MAX_REPLY = 1024 * 1024  # bytes buffered for one reply
MAX_ITEMS = 100_000  # elements of one array reply
MAX_DEPTH = 4  # arrays inside arrays


class RedisError(Exception):
    """An error reply from Redis (``-ERR ...``, ``-NOSCRIPT ...``)."""


class ReplyError(Exception):
    """The server broke RESP or our bounds: the connection is dropped."""


class _Incomplete(Exception):
    pass


_INCOMPLETE = _Incomplete()

# A reply: simple and bulk strings are bytes, integers int, nil None, error
# replies RedisError instances (handed to the caller's errback), arrays lists.
Reply: TypeAlias = "bytes | int | RedisError | list[Reply] | None"
# A command's arguments; each is sent as a bulk string.
Arg: TypeAlias = str | bytes | int | float
_R = TypeVar("_R")


def encode(args: Sequence[Arg]) -> bytes:
    """A command as a RESP array of bulk strings (binary-safe: nothing in a key or
    value can end the command early)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode()
        elif isinstance(arg, (int, float)):
            arg = repr(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


def parse(buffer: bytes | bytearray, position: int = 0, depth: int = 0) -> tuple[Reply, int]:
    """One reply from ``buffer`` at ``position``: (value, position after it).
    Bulk strings are bytes, errors RedisError instances, nil None; raises
    _Incomplete when more bytes are needed, ReplyError on garbage."""
    end = buffer.find(b"\r\n", position)
    if end < 0:
        if len(buffer) - position > 1024:
            raise ReplyError("reply line too long")
        raise _INCOMPLETE
    kind, line = buffer[position:position + 1], bytes(buffer[position + 1:end])
    after = end + 2
    if kind == b"+":
        return line, after
    if kind == b"-":
        return RedisError(line.decode("utf-8", "replace")), after
    try:
        number = int(line)
    except ValueError:
        raise ReplyError(f"bad number in reply: {line[:40]!r}") from None
    if kind == b":":
        return number, after
    if kind == b"$":
        if number < 0:
            return None, after
        if number > MAX_REPLY:
            raise ReplyError("bulk reply too large")
        if len(buffer) < after + number + 2:
            raise _INCOMPLETE
        if buffer[after + number:after + number + 2] != b"\r\n":
            raise ReplyError("bulk reply not terminated")
        return bytes(buffer[after:after + number]), after + number + 2
    if kind == b"*":
        if number < 0:
            return None, after
        if number > MAX_ITEMS or depth >= MAX_DEPTH:
            raise ReplyError("array reply too large or too deep")
        items: list[Reply] = []
        for _ in range(number):
            item, after = parse(buffer, after, depth + 1)
            items.append(item)
        return items, after
    raise ReplyError(f"unknown reply type {kind!r}")


class RespProtocol(Protocol):
    """One connection: commands written as they come, replies matched in order."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._waiting: deque[Deferred[Reply]] = deque()
        self.lost = False

    def send(self, args: Sequence[Arg]) -> Deferred[Reply]:
        if self.lost:
            return fail(StateUnavailable("connection lost"))
        d: Deferred[Reply] = Deferred()
        self._waiting.append(d)
        assert self.transport is not None  # set before connectProtocol hands us out; not lost yet
        self.transport.write(encode(args))
        return d

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        position = 0
        try:
            while position < len(self._buffer):
                try:
                    reply, position_after = parse(self._buffer, position)
                except _Incomplete:
                    break
                position = position_after
                if not self._waiting:
                    raise ReplyError("a reply nobody asked for")
                d = self._waiting.popleft()
                if d.called:  # its deadline passed already
                    pass
                elif isinstance(reply, RedisError):
                    d.errback(reply)
                else:
                    d.callback(reply)
                if self.lost:
                    return
        except ReplyError as e:
            self.drop(str(e))
            return
        del self._buffer[:position]
        if len(self._buffer) > MAX_REPLY + 1024:
            self.drop("reply too large")

    def drop(self, why: str) -> None:
        """Close now and fail everything still waiting (the order is lost)."""
        if self.lost:
            return
        self.lost = True
        waiting, self._waiting = self._waiting, deque()
        if self.transport is not None:
            # TCP, UNIX and TLS transports all abort; ITransport just does not declare it.
            cast(ITCPTransport, self.transport).abortConnection()
        for d in waiting:
            if not d.called:
                d.errback(StateUnavailable(why))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.drop("connection lost")


@attrs.frozen
class Script(Generic[_R]):
    """A Lua script, sent by its SHA-1 (EVALSHA); ``_R`` is what its Lua returns
    (as a :data:`Reply`: a number is an int, false is None)."""

    source: str

    @property
    def sha(self) -> str:
        return hashlib.sha1(self.source.encode()).hexdigest()


def _pass_on(result: Reply | Failure, d: Deferred[Reply]) -> None:
    """Hand a reply to the caller's Deferred, unless its deadline has failed it already."""
    if not d.called:
        if isinstance(result, Failure):
            d.errback(result)
        else:
            d.callback(result)


class RedisClient:
    """Commands to one Redis server over one pipelined connection (see the module docstring)."""

    def __init__(self, address: RedisAddress, reactor: IReactorTime, timeout: float,
                 ca_file: Path | None = None) -> None:
        self.address = address
        self.reactor = reactor
        self.timeout = timeout
        self.ca_file = ca_file
        self._protocol: RespProtocol | None = None
        self._connecting: list[tuple[Sequence[Arg], Deferred[Reply]]] | None = None
        self._attempt: Deferred[RespProtocol] | None = None
        self._handshaking: RespProtocol | None = None
        self._deadlines: deque[tuple[float, Deferred[Reply]]] = deque()  # commands in the order sent
        self._watchdog: IDelayedCall | None = None

    def _endpoint(self) -> IStreamClientEndpoint:
        a = self.address
        if a.socket:
            return UNIXClientEndpoint(self.reactor, a.socket, timeout=self.timeout)
        endpoint: IStreamClientEndpoint = HostnameEndpoint(self.reactor, a.host, a.port, timeout=self.timeout)
        if a.tls:
            from twisted.internet.ssl import Certificate, optionsForClientTLS, platformTrust

            trust = Certificate.loadPEM(Path(self.ca_file).read_bytes()) if self.ca_file else platformTrust()
            endpoint = wrapClientTLS(optionsForClientTLS(a.host, trustRoot=trust), endpoint)
        return endpoint

    def execute(self, *args: Arg) -> Deferred[Reply]:
        """Run one command: Deferred of its reply; StateUnavailable when the
        deadline passes or the connection fails, RedisError for an error reply."""
        protocol = self._protocol
        if protocol is not None and not protocol.lost:
            d = protocol.send(args)
        else:
            d = Deferred[Reply]()
            if self._connecting is None:
                try:
                    self._connect()
                except StateUnavailable as e:
                    return fail(e)
            assert self._connecting is not None
            self._connecting.append((args, d))
        return self._with_deadline(d)

    def _with_deadline(self, d: Deferred[Reply]) -> Deferred[Reply]:
        """Watch ``d``'s deadline.  Commands are answered in order, so one timer for the
        oldest unanswered command is enough (a timer per command costs more than the command)."""
        deadlines = self._deadlines
        while deadlines and deadlines[0][1].called:
            deadlines.popleft()
        deadlines.append((self.reactor.seconds() + self.timeout, d))
        if self._watchdog is None:
            self._watchdog = self.reactor.callLater(self.timeout, self._watch)
        return d

    def _watch(self) -> None:
        self._watchdog = None
        deadlines = self._deadlines
        while deadlines:
            deadline, d = deadlines[0]
            if d.called:
                deadlines.popleft()
                continue
            now = self.reactor.seconds()
            if deadline > now:
                self._watchdog = self.reactor.callLater(deadline - now, self._watch)
                return
            deadlines.popleft()
            self._expired(d)  # the connection is dropped: what waited on it has failed too

    def _expired(self, d: Deferred[Reply]) -> None:
        if d.called:
            return
        protocol, self._protocol = self._protocol, None  # a caller's errback may send again: on a new connection
        d.errback(StateUnavailable(f"no answer from Redis within {self.timeout:g} s"))
        if protocol is not None:
            protocol.drop("a command timed out")  # the answers still owed would come out of order

    def _connect(self) -> None:
        self._connecting = []
        try:
            endpoint = self._endpoint()
        except OSError as e:  # the CA file of rediss://
            self._connecting = None
            raise StateUnavailable(f"cannot set up TLS for Redis: {e}") from None
        attempt: Deferred[RespProtocol] = connectProtocol(endpoint, RespProtocol())
        self._attempt = attempt
        attempt.addCallback(self._handshake)
        attempt.addTimeout(self.timeout, self.reactor)  # the set-up too: a server that never answers AUTH
        attempt.addCallbacks(self._connected, self._connect_failed)

    def _handshake(self, protocol: RespProtocol) -> Deferred[RespProtocol]:
        self._handshaking = protocol
        a = self.address
        steps: list[Deferred[Reply]] = []
        if a.password:
            steps.append(protocol.send(("AUTH", a.username, a.password) if a.username else ("AUTH", a.password)))
        if a.db:
            steps.append(protocol.send(("SELECT", a.db)))
        if not steps:
            return succeed(protocol)
        d = gatherResults(steps, consumeErrors=True)

        def refused(failure: Failure) -> Failure:
            inner = getattr(failure.value, "subFailure", failure)
            protocol.drop("handshake failed")
            return Failure(StateUnavailable(f"Redis refused the connection's set-up: {inner.getErrorMessage()}"))

        return d.addCallbacks(lambda _: protocol, refused)

    def _connected(self, protocol: RespProtocol) -> None:
        waiting, self._connecting, self._attempt = self._connecting or [], None, None
        self._handshaking = None
        self._protocol = protocol
        for args, d in waiting:
            if d.called:  # its deadline passed while connecting
                continue
            protocol.send(args).addBoth(_pass_on, d)

    def _connect_failed(self, failure: Failure) -> None:
        waiting, self._connecting, self._attempt = self._connecting or [], None, None
        if self._handshaking is not None:
            self._handshaking.drop("set-up failed")
            self._handshaking = None
        if isinstance(failure.value, StateUnavailable):
            why = failure.value
        elif failure.check(TimeoutError, CancelledError):
            why = StateUnavailable(f"Redis at {self.address.describe()} did not answer within {self.timeout:g} s")
        else:
            why = StateUnavailable(f"cannot connect to Redis at {self.address.describe()}: "
                                   f"{failure.getErrorMessage()}")
        for _, d in waiting:
            if not d.called:
                d.errback(why)

    def evaluate(self, script: Script[_R], keys: Sequence[str], args: Sequence[Arg]) -> Deferred[_R]:
        """EVALSHA, and EVAL when the server does not know the script yet."""
        d = self.execute("EVALSHA", script.sha, len(keys), *keys, *args)

        def unknown(failure: Failure) -> Deferred[Reply] | Failure:
            if failure.check(RedisError) and str(failure.value).startswith("NOSCRIPT"):
                return self.execute("EVAL", script.source, len(keys), *keys, *args)
            return failure

        d.addErrback(unknown)
        # The reply is what the script's Lua returns, which Script[_R] states.
        return cast("Deferred[_R]", d)

    def close(self) -> None:
        if self._watchdog is not None and self._watchdog.active():
            self._watchdog.cancel()
        self._watchdog = None
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            protocol.drop("closed")
        if self._attempt is not None:
            self._attempt.cancel()
