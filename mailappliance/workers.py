"""``[server] workers = N``: N processes serve the listeners, so TLS and per-message CPU use every core.

The twistd process is the supervisor and also worker 0.  It binds every
listening socket (before twistd drops privileges), runs the start-up
recovery, the outbound queue runner and the HTTP listeners, and then starts
workers 1..N-1 (``python -m mailappliance.worker_main``), each with the SMTP and
POP3 listening sockets as inherited descriptors (``childFDs``), which the
worker adopts (``adoptStreamPort``): every process accepts from the same
sockets, and the kernel hands each connection to one of them (a busy process
picks fewer up).  The supervisor hands a worker its validated settings
through a pipe (a restarted worker needs no config file or root-only secret
file it could no longer read), relays the worker's log events (JSON lines on
its stdout) into its own log with ``worker`` and ``worker_pid`` added,
forwards SIGHUP, restarts a worker that dies (:func:`restart_delay` stops a
crash loop from spinning), and stops the workers before it exits.  A worker
dies with its supervisor (``PR_SET_PDEATHSIG``).

What the processes share: the Maildirs and the spool (every write was already
safe against concurrent writers, the unique names carry the pid), the state
store (hourly limits, login throttling, POP3 locks: ``[state] redis`` when it
is set, else the supervisor's own store, which it uses directly and serves to
each worker on a socketpair made at that worker's spawn and inherited like
the listeners, as Postfix's anvil(8) serves its smtpd processes; see
:mod:`mailappliance.state.serve`), and the connection caps, which each process enforces
for its share (:func:`share_of_limits`), so the whole server never holds more
than the configured numbers.  Mail that a worker queues is seen by the
supervisor's queue runner through inotify on the spool's incoming directory.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import pickle
import signal
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import IO, Any, cast

import attrs
from twisted.application import service
from twisted.internet import protocol
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IProtocolFactory
from twisted.logger import ILogObserver, LogEvent, Logger, eventAsJSON, eventFromJSON, globalLogPublisher
from twisted.python.failure import Failure

from mailappliance.budget import NetworkByteBudget
from mailappliance.config import ListenerSettings, Settings
from mailappliance.limits import RateLimits
from mailappliance.metrics import METRICS
from mailappliance.settings import LimitSettings
from mailappliance.state import StateStore
from mailappliance.state.memory import MemoryStore
from mailappliance.state.serve import StateServerFactory

log = Logger(namespace="mailappliance.workers")

HEALTHY_UPTIME = 60.0  # a worker that ran this long before it ended was not crash-looping
FREE_RESTARTS = 3  # short-lived runs in a row restarted at once
MAX_RESTART_DELAY = 60.0
MAX_LOG_LINE = 64 * 1024  # bytes of one relayed log event; longer ones are dropped (and counted)
STOP_GRACE = 10.0  # seconds a worker has to stop before it is killed
FIRST_FD = 3  # the listening sockets' descriptors in a worker: 3, 4, ...


# -- pure policy ------------------------------------------------------------------


def restart_delay(streak: int) -> float:
    """Seconds to wait before restarting a worker after ``streak`` short-lived runs in a
    row (the one that just ended included): the first few at once, then doubling up to
    a minute; a run of HEALTHY_UPTIME or more starts the count again."""
    if streak <= FREE_RESTARTS:
        return 0.0
    return min(MAX_RESTART_DELAY, float(2 ** min(streak - FREE_RESTARTS, 16)))


def _share(value: int, workers: int) -> int:
    return max(1, value // workers)


def share_of_limits(limits: LimitSettings, workers: int) -> LimitSettings:
    """One process's part of the connection caps: each process counts its own
    connections, so together they never exceed the configured numbers (a
    client whose connections land unevenly may be refused a little early)."""
    if workers <= 1:
        return limits
    return attrs.evolve(
        limits,
        connections_per_minute=_share(limits.connections_per_minute, workers),
        concurrent_per_address=_share(limits.concurrent_per_address, workers),
        concurrent_per_network=_share(limits.concurrent_per_network, workers),
        max_connections=_share(limits.max_connections, workers),
    )


class SharedRateLimits(RateLimits):
    """RateLimits of one of ``workers`` processes: connection caps are this process's
    share, also after SIGHUP assigns new settings; hourly allowances are in the
    shared state store as before."""

    def __init__(self, settings: LimitSettings, clock: Any, store: StateStore, workers: int) -> None:
        self.workers = workers
        super().__init__(settings, clock, store)

    @property
    def settings(self) -> LimitSettings:
        return self._shared

    @settings.setter
    def settings(self, limits: LimitSettings) -> None:
        self._shared = share_of_limits(limits, self.workers)

    def set_listener_caps(self, caps: dict[str, int]) -> None:
        super().set_listener_caps({name: _share(cap, self.workers) if cap > 0 else cap
                                   for name, cap in caps.items()})


class SharedByteBudget(NetworkByteBudget):
    """The MX's bytes per hour per client network, this process's 1/N share (also after SIGHUP)."""

    def __init__(self, bytes_per_hour: int, clock: Any, workers: int) -> None:
        self.workers = workers
        super().__init__(bytes_per_hour, clock)
        self.settings = bytes_per_hour

    @property
    def settings(self) -> int:
        return self.bytes_per_hour

    @settings.setter
    def settings(self, value: int) -> None:
        self.bytes_per_hour = _share(value, self.workers) if value > 0 else 0  # 0 stays "off"


def byte_budget(settings: Settings, clock: Any) -> NetworkByteBudget:
    """The MX byte budget of this process (a share of it when there are several)."""
    if settings.workers > 1:
        return SharedByteBudget(settings.mx_bytes_per_hour_per_network, clock, settings.workers)
    return NetworkByteBudget(settings.mx_bytes_per_hour_per_network, clock)


def rate_limits(settings: Settings, clock: Any, store: StateStore) -> RateLimits:
    """The limits object of this process (shared caps when there are several)."""
    if settings.workers > 1:
        return SharedRateLimits(settings.limits, clock, store, settings.workers)
    return RateLimits(settings.limits, clock, store)


# -- sharing the listening sockets ----------------------------------------------------


def accept_one_at_a_time(port: Any) -> None:
    """Make a listening port shared with the other processes take one connection per
    wake-up.  Twisted's port accepts up to ``numberAccepts`` at once (100 at first, more
    after a full round): the process that wakes first takes a whole burst, and with
    long-lived connections every session can end up in one process (measured: 6,000 of
    6,000 messages of 50 sessions, twice in three runs, the other process idle).  One
    at a time, each wake-up lets the other processes race for the next connection
    (measured: 36-45 % to the less busy process in three of three runs, 2,176-2,528
    messages/s against 1,224-2,144)."""
    take = port.doRead

    def doRead() -> object:
        port.numberAccepts = 1  # Twisted adapts it after each round: set it again every time
        return take()

    port.doRead = doRead


def shared_listener(server: service.Service) -> service.Service:
    """The supervisor's listening service ``server`` (internet.TCPServer or SSLServer),
    made to accept one connection per wake-up once its port exists (see
    :func:`accept_one_at_a_time`)."""
    get_port = server._getPort  # type: ignore[attr-defined]  # twisted.application.internet._AbstractServer

    def _getPort() -> Any:
        port = get_port()
        accept_one_at_a_time(port)
        return port

    server._getPort = _getPort  # type: ignore[attr-defined]
    return server


# -- the worker's side ----------------------------------------------------------------


@attrs.frozen
class WorkerPlan:
    """What a worker serves: its number and the inherited descriptor of each listener (by name)."""

    index: int
    descriptors: dict[str, int]
    state_fd: int | None = None  # this worker's end of the state socket (no [state] redis)


class AdoptedPort(service.Service):
    """A listener of the supervisor's, served in this worker through the inherited socket."""

    def __init__(self, descriptor: int, factory: IProtocolFactory, reactor: Any) -> None:
        self.descriptor, self.factory, self.reactor = descriptor, factory, reactor
        self.port: IListeningPort | None = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Service is unannotated
        probe = socket.socket(fileno=self.descriptor)  # the family of the inherited socket
        family = probe.family
        probe.detach()
        self.port = self.reactor.adoptStreamPort(self.descriptor, family, self.factory)
        os.close(self.descriptor)  # adoptStreamPort listens on a duplicate
        accept_one_at_a_time(self.port)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()  # type: ignore[no-untyped-call]  # Service is unannotated
        if self.port is None:
            return None
        d: Deferred[None] | None = self.port.stopListening()
        return d


def adopted(listener: ListenerSettings, factory: IProtocolFactory, server_tls: Any, plan: WorkerPlan,
            reactor: Any) -> service.Service:
    """The worker's counterpart of service._listening: the same factory on the inherited socket."""
    if listener.implicit_tls:
        from twisted.protocols.tls import TLSMemoryBIOFactory

        factory = TLSMemoryBIOFactory(server_tls, False, factory)
    return AdoptedPort(plan.descriptors[listener.name], factory, reactor)


class _JsonLines:
    """Log observer of a worker: one JSON event per line on its stdout, to the supervisor."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.lock = threading.Lock()  # commit and directory threads log too

    def __call__(self, event: LogEvent) -> None:
        failure = event.get("log_failure")
        if isinstance(failure, Failure):  # JSON keeps its traceback text, not the exception: send the message
            event = {**event, "worker_error": failure.getErrorMessage()}
        line = eventAsJSON(event) + "\n"
        with self.lock:
            self.stream.write(line)
            self.stream.flush()


def _die_with_parent(parent: int) -> None:
    """SIGTERM this process when the supervisor dies (Linux), so no orphan keeps accepting."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # it died before prctl took effect
        raise SystemExit(1)


def worker_main(argv: Sequence[str] | None = None) -> None:
    """``python -m mailappliance.worker_main --index I --listener NAME=FD ... --parent PID``;
    the settings arrive pickled on stdin from the supervisor."""
    parser = argparse.ArgumentParser(prog="mailappliance worker")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--listener", action="append", default=[])
    parser.add_argument("--state", type=int, default=None)  # the state socket's descriptor
    args = parser.parse_args(argv)
    _die_with_parent(args.parent)
    settings: Settings = pickle.loads(sys.stdin.buffer.read())  # noqa: S301  # our parent, over a private pipe
    descriptors = {name: int(fd) for name, _, fd in (item.partition("=") for item in args.listener)}

    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner

    globalLogBeginner.beginLoggingTo([cast(ILogObserver, _JsonLines(open(1, "w", closefd=False)))],  # noqa: SIM115
                                     redirectStandardIO=False, discardBuffer=True)
    from mailappliance.service import build_service
    from mailappliance.tap import STARTUP_ERRORS, startup_error_line

    try:
        top = build_service(settings, reactor, worker=WorkerPlan(args.index, descriptors, args.state))
    except STARTUP_ERRORS as e:  # e.g. a key file this user cannot read: one line, then exit
        log.critical("worker {index}: {line}", index=args.index, line=startup_error_line(e))
        raise SystemExit(1) from None

    def start() -> None:
        try:
            top.privilegedStartService()
            top.startService()
        except Exception:
            log.failure("worker {index} could not start", index=args.index)
            os._exit(1)
        log.info("worker {index} ready (pid {pid})", index=args.index, pid=os.getpid())

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    reactor.run()


# -- the supervisor's side ------------------------------------------------------------


class RelayedError(Exception):
    """A worker's exception, as its message (the exception object stays in the worker)."""


class _Worker(protocol.ProcessProtocol):
    """One worker process as the supervisor sees it: its log lines and its end."""

    def __init__(self, supervisor: WorkerSupervisor, index: int, settings: bytes) -> None:
        self.supervisor, self.index, self.settings = supervisor, index, settings
        self.buffers = {1: b"", 2: b""}
        self.dropped = 0
        self.ended: Deferred[None] = Deferred()
        self.pid = 0
        self.started = 0.0
        self.state_link: Any = None  # the supervisor's end of this worker's state socket (a transport)

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pid = self.transport.pid or 0
        self.transport.write(self.settings)
        self.transport.closeStdin()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        buffer = self.buffers.get(childFD, b"") + data
        *lines, rest = buffer.split(b"\n")
        if len(rest) > MAX_LOG_LINE:
            rest, self.dropped = b"", self.dropped + 1
        self.buffers[childFD] = rest
        for line in lines:
            if len(line) > MAX_LOG_LINE:
                self.dropped += 1
            elif childFD == 1:
                self._relay(line)
            elif line.strip():
                log.warn("worker {index} (pid {pid}) wrote: {line}", index=self.index, pid=self.pid,
                         line=line.decode("utf-8", "replace"))

    def _relay(self, line: bytes) -> None:
        try:
            event = eventFromJSON(line.decode("utf-8", "replace"))
        except ValueError:
            self.dropped += 1
            return
        if not isinstance(event, dict):
            self.dropped += 1
            return
        event["worker"], event["worker_pid"] = self.index, self.pid
        failure, message = event.get("log_failure"), event.pop("worker_error", None)
        if isinstance(failure, Failure) and isinstance(message, str):
            failure.value = RelayedError(message)
        globalLogPublisher(event)

    def processEnded(self, reason: Failure) -> None:
        if self.dropped:
            log.warn("worker {index} (pid {pid}): {n} log line(s) too long or not JSON, dropped",
                     index=self.index, pid=self.pid, n=self.dropped)
        self.supervisor.ended(self, reason)
        self.ended.callback(None)


class WorkerSupervisor(service.Service):
    """Starts workers 1..N-1 on the listeners' sockets, restarts them, forwards SIGHUP, stops them."""

    def __init__(self, settings: Settings, listeners: dict[str, service.Service], reactor: Any,
                 kick: Callable[[], None] | None = None, incoming: Any = None,
                 state: MemoryStore | None = None) -> None:
        self.settings = settings
        self.state = state  # served to the workers (None: they share Redis, or nothing to serve)
        self.listeners = listeners  # SMTP and POP3 listening services by listener name, bound by now
        self.reactor: Any = reactor
        self.kick, self.incoming = kick, incoming
        self.workers: dict[int, _Worker] = {}
        self.streaks: dict[int, int] = {}  # short-lived runs in a row, by worker number
        self.restarted = 0
        self.restarts: dict[int, IDelayedCall] = {}
        self.stopping = False
        self._previous_hup: Any = None
        self._notifier: Any = None
        self._kick_due = False

    def descriptors(self) -> dict[str, int]:
        """The listening socket of each SMTP and POP3 listener (bound in privilegedStartService)."""
        return {name: getattr(listening, "_port").fileno() for name, listening in self.listeners.items()}  # noqa: B009

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Service is unannotated
        self.stopping = False
        self._settings_bytes = pickle.dumps(self.settings)
        for index in range(1, self.settings.workers):
            self.spawn(index)
        self._previous_hup = signal.signal(signal.SIGHUP, self._on_hup)
        self._watch_incoming()
        METRICS.gauge("mailappliance_worker_processes",
                      "Processes serving the listeners: this one and its live workers.", lambda: 1 + len(self.workers))
        METRICS.gauge("mailappliance_worker_restarts",
                      "Workers started again after one ended, since this process started.", lambda: self.restarted)
        log.info("{n} worker processes besides this one (pid {pid}) share the listeners; limits, login "
                 "throttling and POP3 locks are shared in {where}", n=self.settings.workers - 1, pid=os.getpid(),
                 where="this process's store, served to each worker" if self.state is not None else "Redis")

    def spawn(self, index: int) -> None:
        self.restarts.pop(index, None)
        if self.stopping:
            return
        fds = self.descriptors()
        child_fds: dict[int, int | str] = {0: "w", 1: "r", 2: "r"}
        # -P: not the working directory first on sys.path; the supervisor's own sys.path instead,
        # so a worker runs exactly the code its supervisor runs, wherever it was started from
        arguments = [sys.executable, "-P", "-m", "mailappliance.worker_main", "--index", str(index),
                     "--parent", str(os.getpid())]
        for offset, (name, fd) in enumerate(sorted(fds.items())):
            child_fds[FIRST_FD + offset] = fd
            arguments += ["--listener", f"{name}={FIRST_FD + offset}"]
        worker = _Worker(self, index, self._settings_bytes)
        worker.started = self.reactor.seconds()
        self.workers[index] = worker
        worker_end = None
        if self.state is not None:
            worker_end = self._state_socket(worker)
            child_fds[FIRST_FD + len(fds)] = worker_end.fileno()
            arguments += ["--state", str(FIRST_FD + len(fds))]
        environment = {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in sys.path if path)}
        try:
            self.reactor.spawnProcess(worker, sys.executable, arguments, env=environment, childFDs=child_fds)
        finally:
            if worker_end is not None:
                worker_end.close()  # the worker has its copy
        log.info("worker {index} started (pid {pid})", index=index, pid=worker.pid)

    def _state_socket(self, worker: _Worker) -> socket.socket:
        """A socketpair for ``worker``'s state requests: the supervisor serves its end from
        ``self.state``; the other end, returned, is for the worker to inherit.  No path in the
        filesystem, so no other process can connect, and nothing to clean up after a crash."""
        assert self.state is not None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

        def violated(why: str) -> None:  # a worker that breaks the format is broken: start it afresh
            log.error("worker {index} (pid {pid}) broke the state socket's format; stopping it",
                      index=worker.index, pid=worker.pid)
            _signal(worker, "KILL")

        factory = StateServerFactory(self.state, f"worker {worker.index}", violated)
        try:
            worker.state_link = self.reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX, factory)
        finally:
            ours.close()  # the reactor has its copy
        return theirs

    def ended(self, worker: _Worker, reason: Failure) -> None:
        if worker.state_link is not None:
            worker.state_link.abortConnection()
            worker.state_link = None
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        if self.stopping:
            return
        short = self.reactor.seconds() - worker.started < HEALTHY_UPTIME
        streak = self.streaks[worker.index] = self.streaks.get(worker.index, 0) + 1 if short else 1
        delay = restart_delay(streak)
        self.restarted += 1
        log.error("worker {index} (pid {pid}) ended ({why}); restarting it in {delay:.0f} s",
                  index=worker.index, pid=worker.pid, why=reason.getErrorMessage(), delay=delay)
        self.restarts[worker.index] = self.reactor.callLater(delay, self.spawn, worker.index)

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        if callable(self._previous_hup):
            self._previous_hup(signum, frame)
        for worker in list(self.workers.values()):
            if worker.pid:
                try:
                    os.kill(worker.pid, signal.SIGHUP)
                except ProcessLookupError:
                    pass

    def _watch_incoming(self) -> None:
        """Kick the queue runner when a worker queues mail (its own kick reaches only itself)."""
        if self.kick is None or self.incoming is None:
            return
        try:
            from twisted.internet import inotify
            from twisted.python.filepath import FilePath
        except ImportError:  # not Linux: the runner's own periodic look finds it
            return
        self._notifier = inotify.INotify(self.reactor)
        self._notifier.startReading()
        self._notifier.watch(FilePath(str(self.incoming)), mask=inotify.IN_MOVED_TO | inotify.IN_CLOSE_WRITE,
                             callbacks=[self._queued])

    def _queued(self, *ignored: object) -> None:
        if self._kick_due or self.kick is None:
            return
        self._kick_due = True  # one kick per reactor turn however many files arrived

        def kick() -> None:
            self._kick_due = False
            if self.kick is not None:
                self.kick()

        self.reactor.callLater(0, kick)

    def stopService(self) -> Deferred[Any]:
        super().stopService()  # type: ignore[no-untyped-call]  # Service is unannotated
        self.stopping = True
        if self._previous_hup is not None:
            signal.signal(signal.SIGHUP, self._previous_hup)
            self._previous_hup = None
        if self._notifier is not None:
            self._notifier.loseConnection()
            self._notifier = None
        for call in self.restarts.values():
            if call.active():
                call.cancel()
        self.restarts.clear()
        running = list(self.workers.values())
        for worker in running:
            _signal(worker, "TERM")

        def kill() -> None:
            for worker in running:
                _signal(worker, "KILL")

        killer = self.reactor.callLater(STOP_GRACE, kill)
        done: Deferred[Any] = DeferredList([w.ended for w in running])

        def stopped(result: object) -> object:
            if killer.active():
                killer.cancel()
            return result

        return done.addBoth(stopped)


def _signal(worker: _Worker, name: str) -> None:
    transport = worker.transport
    if transport is None or worker.ended.called:
        return
    try:
        transport.signalProcess(name)
    except Exception:  # noqa: BLE001  # already gone (ProcessExitedAlready)
        pass


