"""Hostile peers on the state socket (workers without Redis): a worker that sends garbage,
frames over the bound, requests of the wrong shape, or never reads its answers cannot crash
the supervisor or grow its memory; a supervisor that never answers costs a worker one
timeout (it degrades to its own memory), never a hung session."""

from __future__ import annotations

import contextlib
import json
import os
import smtplib
import socket
import struct
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from mailappliance.state import StateUnavailable
from mailappliance.state import serve as serve_module
from mailappliance.state.failover import FailoverStore
from mailappliance.state.memory import MemoryStore
from mailappliance.state.serve import StateServerFactory, StateServerProtocol
from mailappliance.state.supervised import SupervisedStore
from mailappliance.state.wire import INCOMPLETE, MAX_FRAME, FrameError, frame, request, take
from tests.conditions import process_rss, wait_until
from tests.daemon import Appliance
from tests.test_workers import worker_pids


async def until(condition: Callable[[], object], timeout: float = 5, what: str = "condition") -> None:
    """Let the reactor run until ``condition`` holds (a wait on a condition, as
    tests.conditions.wait_until, that gives up after ``timeout``: not a speed check)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        await deferLater(reactor, 0.005, lambda: None)


class Served:
    """The supervisor's end of one worker's state socket in this process; the worker's end raw."""

    def __init__(self) -> None:
        self.store = MemoryStore(reactor)
        self.violations: list[str] = []
        ours, self.worker = socket.socketpair()
        self.factory = StateServerFactory(self.store, "worker 1", self.violations.append)
        self.transport = reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX, self.factory)
        ours.close()
        self.worker.setblocking(False)

    @property
    def protocol(self) -> StateServerProtocol:
        assert self.factory.protocol_made is not None
        return self.factory.protocol_made

    def close(self) -> None:
        self.worker.close()
        self.transport.abortConnection()


def _raw(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


# -- the format's refusals (pure) ---------------------------------------------------------


def test_an_oversized_frame_is_refused_from_its_length_alone() -> None:
    """A length over MAX_FRAME is refused before a byte of its body is buffered."""
    with pytest.raises(FrameError, match="over"):
        take(bytearray(struct.pack(">I", MAX_FRAME + 1)))
    with pytest.raises(FrameError):
        take(bytearray(b"\xff\xff\xff\xff"))
    assert take(bytearray(struct.pack(">I", 10) + b"[1,")) is INCOMPLETE  # waits for the rest, within bounds


@pytest.mark.parametrize("body", [b"\xff\xfe garbage", b"[1, 2", b"[" * 50_000 + b"]" * 50_000, b"NaN",
                                  b"[1, \"reserve\", [[\"k\"], Infinity, 1, 1]]"])
def test_garbled_json_is_refused(body: bytes) -> None:
    """Bytes that are not JSON, JSON nested 50,000 deep, and NaN/Infinity are a FrameError, never a crash."""
    with pytest.raises(FrameError):
        request(take(bytearray(_raw(body))))


@pytest.mark.parametrize("message", [
    {"id": 1}, [1, "reserve"], ["1", "ping", []], [True, "ping", []], [1, "__class__", []],
    [1, "op_ping", []], [1, "ping", [1]], [1, "total", [["k"], "600"]], [1, "total", [[], 600]],
    [1, "total", [["k"] * 9, 600]], [1, "total", [["x" * 1025], 600]], [1, "total", [[1, 2], 600]],
    [1, "count", [["k"], 600, 0, None]], [1, "count", [["k"], 600, 10**9, None]],
    [1, "count", [["k"], 600, 5, [["m"], 3]]], [1, "marks", [[["k"]] * 65]], [1, "lock", [["k"], 7, 60]],
    [1, "reserve", [["k"], 600, 1, 10**30]], [1, "set_value", [["k"], 1.5, 60]],
])
def test_requests_of_the_wrong_shape_are_refused(message: Any) -> None:
    """Wrong ids, unknown ops (our method names included), wrong arities, kinds and bounds: a FrameError."""
    with pytest.raises(FrameError):
        request(take(bytearray(_raw(json.dumps(message).encode()))))


def test_a_well_formed_request_passes() -> None:
    """The refusals above are not refusing everything: a good request reads back as its values."""
    assert request(json.loads(frame([7, "reserve", [["messages", "alice"], 3600, None, 2]])[4:])) == (
        7, "reserve", [("messages", "alice"), 3600.0, float("inf"), 2])


# -- the supervisor's side against a hostile worker --------------------------------------------


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("attack", [
    struct.pack(">I", 2**31) + b"x" * 1000,  # "a 2 GiB frame follows"
    _raw(b"\x00garbage\xff"),
    _raw(json.dumps([1, "op_drop", ["x"]]).encode()),
    _raw(b"[" * 10_000),
])
async def test_garbage_on_the_state_socket_drops_that_worker_only(attack: bytes) -> None:
    """The supervisor drops a worker that sends garbage or an oversized frame (asking for its restart),
    keeps nothing of it, and keeps serving the other workers."""
    hostile, other = Served(), Served()
    other_store = SupervisedStore.adopt(other.worker.detach(), reactor, 2)
    try:
        await other_store.reserve(("messages", "alice"), 3600, 10)
        hostile.worker.sendall(_raw(json.dumps([1, "ping", []]).encode()) + attack)
        await until(lambda: hostile.violations, what="the violation")
        assert hostile.protocol.dropped and len(hostile.protocol.frames) == 0
        await until(lambda: _closed(hostile.worker), what="the hostile worker's socket closed")
        assert await other_store.total(("messages", "alice"), 3600) == 1  # the other worker is still served
    finally:
        hostile.close()
        other_store.close()
        other.transport.abortConnection()


def _closed(sock: socket.socket) -> bool:
    try:
        while True:
            if sock.recv(65536) == b"":
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


@pytest_twisted.ensureDeferred
async def test_a_worker_that_never_reads_its_answers_does_not_grow_the_supervisor() -> None:
    """A worker sending requests without end and reading nothing: the supervisor stops reading it once
    a socket buffer of answers waits, so its buffers stay bounded whatever the worker sends."""
    served = Served()
    request_bytes = frame([1, "total", [["messages", "alice"], 3600]])
    burst = request_bytes * 4096
    sent = stuck = 0
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and stuck < 20:
            try:
                sent += served.worker.send(burst[sent % len(burst):])  # whole frames, in order
                stuck = 0
            except BlockingIOError:  # the kernel's buffers are full too: let the supervisor run
                await deferLater(reactor, 0.005, lambda: None)
                stuck += 1
        protocol = served.protocol
        assert protocol.paused, "the supervisor never stopped reading"
        waiting = protocol.transport._tempDataLen + len(protocol.transport.dataBuffer)  # type: ignore[union-attr]
        assert waiting <= 256 * 1024, waiting
        assert len(protocol.frames) <= 64 * 1024 + MAX_FRAME + 4
        assert not served.violations
        assert protocol.served * len(request_bytes) < sent  # far from everything sent was read
    finally:
        served.close()


@pytest_twisted.ensureDeferred
async def test_reservation_tokens_a_worker_never_gives_back_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reservations that are never released (most are not) leave at most MAX_TOKENS tokens per worker."""
    monkeypatch.setattr(serve_module, "MAX_TOKENS", 100)
    served = Served()
    store = SupervisedStore.adopt(served.worker.detach(), reactor, 2)
    try:
        tokens = [await store.reserve(("messages", "alice"), 3600, 10**9) for _ in range(1000)]
        assert all(isinstance(token, int) for token in tokens)
        assert len(served.protocol.tokens) <= 100
        await store.release(("messages", "alice"), tokens[-1])  # a recent one can still be given back
        assert await store.total(("messages", "alice"), 3600) == 999
    finally:
        store.close()
        served.transport.abortConnection()


@pytest_twisted.ensureDeferred
async def test_locks_of_a_worker_that_ends_are_freed_but_not_of_one_cut_off() -> None:
    """A worker's link ends (it died): the mailbox locks it held are free at once.  A worker cut
    off for garbage may still run until its SIGKILL lands: its locks wait for their lease."""
    for ending in ("died", "cut off"):
        served = Served()
        key = ["pop3-mailbox", "alice"]
        served.worker.setblocking(True)
        served.worker.sendall(frame([1, "lock", [key, "worker-1/1", 60]]))
        await until(lambda: served.protocol.served == 1, what="the lock granted")
        assert await served.store.holds(("pop3-mailbox", "alice"), "worker-1/1")
        if ending == "died":
            served.worker.close()
        else:
            served.worker.sendall(b"\xff\xff\xff\xff")
        await until(lambda: served.protocol.dropped, what="the link ended")
        held = await served.store.holds(("pop3-mailbox", "alice"), "worker-1/1")
        assert held == (ending == "cut off"), ending
        served.close()


# -- the worker's side against a silent supervisor --------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_silent_supervisor_costs_a_worker_one_timeout_then_it_degrades() -> None:
    """A supervisor that never answers: the first calls wait the timeout and are answered from the
    worker's memory, later ones at once; requests never queue without end."""
    worker_end, silent = socket.socketpair()
    supervised = SupervisedStore.adopt(worker_end.detach(), reactor, 0.2)
    supervised.max_pending = 50
    store = FailoverStore(supervised, MemoryStore(reactor), reactor, 60, "the supervisor's store")
    try:
        started = time.monotonic()
        tokens = [await d for d in [store.reserve(("messages", "alice"), 3600, 2) for _ in range(3)]]
        assert time.monotonic() - started < 1.5
        assert store.describe() == "degraded"
        assert [t is not None for t in tokens] == [True, True, False]  # the local limit still applies
        many = [supervised.total(("k",), 60) for _ in range(60)]
        refused = [d for d in many if d.called]
        assert len(refused) == 10  # over max_pending: failed at once
        for d in many:
            with pytest.raises(StateUnavailable):
                await d
    finally:
        store.stop()
        silent.close()


# -- the real daemon: a worker's state socket taken over ---------------------------------------


def _state_socket_of(pid: int) -> int:
    """A duplicate of worker ``pid``'s end of its state socket (its only UNIX socket), taken
    with pidfd_getfd(2): what a compromised worker could send, we send."""
    import ctypes

    unix = {line.split()[6] for line in Path("/proc/net/unix").read_text().splitlines()[1:]}  # the inodes
    targets = [int(fd.name) for fd in Path(f"/proc/{pid}/fd").iterdir()
               if (link := os.readlink(fd)).startswith("socket:[") and link[8:-1] in unix]
    assert len(targets) == 1, targets
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = libc.syscall(434, pid, 0)  # pidfd_open
    if pidfd < 0:
        pytest.skip("pidfd_open is not available")
    try:
        fd = libc.syscall(438, pidfd, targets[0], 0)  # pidfd_getfd
        if fd < 0:
            pytest.skip(f"pidfd_getfd failed (errno {ctypes.get_errno()})")
        return int(fd)
    finally:
        os.close(pidfd)


def test_a_worker_sending_garbage_is_restarted_and_the_supervisor_serves_on(
        appliance: Callable[..., Appliance], pki: Any) -> None:
    """An oversized frame and then a megabyte of junk on worker 1's state socket: the supervisor
    cuts that link off and restarts worker 1 (which shares its state again), its memory does
    not grow, and mail keeps being accepted."""
    instance = appliance(pki=pki, start=False, extra={"server": {"workers": 2}})
    assert instance.admin("user", "add", "alice@example.org", password="alice-password").returncode == 0
    instance.start()
    shared = "state store: shared in the supervisor's store"
    old = wait_until(lambda: worker_pids(instance), 30, what="worker 1 ready")[0]
    wait_until(lambda: shared in instance.log(), 30, what="worker 1 shares the state")
    assert instance.process is not None
    rss_before = process_rss(instance.process.pid)
    stolen = socket.socket(fileno=_state_socket_of(old))
    try:
        stolen.sendall(struct.pack(">I", 2**31))
        with contextlib.suppress(OSError):  # the supervisor hangs up after the length: EPIPE
            stolen.sendall(b"\xff" * 1024 * 1024)
    finally:
        stolen.close()
    new = wait_until(lambda: [p for p in worker_pids(instance) if p != old], 30, what="a new worker 1")[0]
    assert "state socket of worker 1: frame of 2147483648 bytes is over 65536; connection dropped" in instance.log()
    wait_until(lambda: instance.log().count(shared) >= 2, 30, what=f"worker 1 (pid {new}) shares the state again")
    assert process_rss(instance.process.pid) - rss_before < 4 * 1024 * 1024
    assert instance.process.poll() is None
    with smtplib.SMTP("127.0.0.1", instance.ports["mx"], timeout=10) as smtp:
        smtp.ehlo("client.example.net")
        assert smtp.sendmail("bob@example.net", ["alice@example.org"], b"Subject: x\r\n\r\nx\r\n") == {}
