"""Hostile conditions for [server] workers: a worker that dies as soon as it starts
(a crash loop must not spin the supervisor), a worker writing junk or huge log lines,
and a supervisor killed with SIGKILL (no orphan worker may keep accepting mail)."""

from __future__ import annotations

import signal
import socket
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.error import ProcessTerminated
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from mailappliance.config import Settings, load_config
from mailappliance.workers import MAX_LOG_LINE, MAX_RESTART_DELAY, WorkerSupervisor, _Worker
from tests.conditions import wait_until
from tests.daemon import Appliance, free_port
from tests.redis_server import RedisServer


class _Transport:
    def __init__(self, pid: int) -> None:
        self.pid = pid

    def write(self, data: bytes) -> None:
        pass

    def closeStdin(self) -> None:
        pass

    def signalProcess(self, name: str) -> None:
        pass


class _Reactor(Clock):
    """A clock that 'starts' processes: each spawn is recorded with its time."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[float, _Worker]] = []

    def spawnProcess(self, worker: _Worker, executable: str, args: list[str], env: dict[str, str],
                     childFDs: dict[int, Any]) -> None:
        worker.makeConnection(_Transport(10_000 + len(self.spawned)))
        self.spawned.append((self.seconds(), worker))


def _settings(tmp_path: Path) -> Settings:
    path = tmp_path / "mailappliance.toml"
    path.write_text('[server]\nhostname = "mx.example.org"\nlocal_domains = ["example.org"]\nworkers = 2\n'
                    '[storage]\nmaildir_root = "mail"\nspool_dir = "spool"\nsync = "fsync"\n'
                    '[state]\nredis = "redis://127.0.0.1:6379"\n[[listeners]]\nrole = "mx"\nport = 2525\n')
    return load_config(path)


def test_a_worker_that_always_crashes_is_restarted_ever_more_slowly(tmp_path: Path) -> None:
    """A worker dying at once, for 10 simulated minutes: a handful of quick restarts, then at most one a minute."""
    reactor = _Reactor()
    supervisor = WorkerSupervisor(_settings(tmp_path), {}, reactor)
    previous = signal.getsignal(signal.SIGHUP)
    supervisor.startService()
    try:
        for _ in range(600):
            _, worker = reactor.spawned[-1]
            if not worker.ended.called:
                worker.processEnded(Failure(ProcessTerminated(exitCode=1)))
            reactor.advance(1)
        starts = [at for at, _ in reactor.spawned]
        assert len(starts) <= 20, starts
        late = [b - a for a, b in zip(starts, starts[1:], strict=False) if a > 300]
        assert late and min(late) >= MAX_RESTART_DELAY
    finally:
        supervisor.stopService()
        signal.signal(signal.SIGHUP, previous)


def test_a_stopping_supervisor_starts_no_worker(tmp_path: Path) -> None:
    """A worker that ends while the supervisor stops is not restarted (no restart racing the shutdown)."""
    reactor = _Reactor()
    supervisor = WorkerSupervisor(_settings(tmp_path), {}, reactor)
    previous = signal.getsignal(signal.SIGHUP)
    supervisor.startService()
    try:
        _, worker = reactor.spawned[-1]
        stopped = supervisor.stopService()
        worker.processEnded(Failure(ProcessTerminated(exitCode=0)))
        assert stopped.called
        reactor.advance(3600)
        assert len(reactor.spawned) == 1
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_junk_and_huge_log_lines_from_a_worker_are_dropped_not_relayed(tmp_path: Path) -> None:
    """A worker's stdout is parsed as one JSON event per line, each bounded: junk and oversize lines are dropped."""
    reactor = _Reactor()
    supervisor = WorkerSupervisor(_settings(tmp_path), {}, reactor)
    worker = _Worker(supervisor, 1, b"")
    worker.makeConnection(_Transport(4242))  # type: ignore[arg-type]
    relayed: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(relayed.append)
    try:
        worker.childDataReceived(1, b"not json\n[1, 2]\n" + b"x" * (MAX_LOG_LINE + 1))
        worker.childDataReceived(1, b"y" * (MAX_LOG_LINE + 1) + b"\n")
        worker.childDataReceived(1, b'{"log_format": "fine", "log_namespace": "mailappliance"}\n')
    finally:
        globalLogPublisher.removeObserver(relayed.append)
    ours = [event for event in relayed if event.get("worker_pid") == 4242]
    assert [event["log_format"] for event in ours] == ["fine"]
    assert ours[0]["worker"] == 1
    assert worker.dropped == 4
    assert all(len(buffer) <= MAX_LOG_LINE for buffer in worker.buffers.values())


def test_workers_die_with_a_killed_supervisor(tmp_path: Path, redis: RedisServer, pki: Any) -> None:
    """SIGKILL to the supervisor: its worker exits too, so nothing keeps accepting on the MX port.
    Its working directory holds a planted mailappliance/ package, which the worker must not import."""
    planted = tmp_path / "mailappliance"
    planted.mkdir()
    (planted / "__init__.py").write_text("raise SystemExit('imported from the working directory')\n")
    sections: dict[str, dict[str, Any]] = {
        "server": {"hostname": "mx.test.example", "local_domains": ["example.org"], "workers": 2},
        "storage": {"maildir_root": str(tmp_path / "mail"), "spool_dir": str(tmp_path / "spool"), "sync": "fsync"},
        "directory": {"backend": "ldif", "ldif_file": str(tmp_path / "users.ldif")},
        "tls": {"certificate": str(pki.server_cert), "private_key": str(pki.server_key),
                "generate_self_signed": False},
        "state": {"redis": redis.url},
    }
    instance = Appliance(tmp_path, sections, [{"name": "mx", "role": "mx", "address": "127.0.0.1",
                                               "port": free_port()}], pki=pki)
    instance.start()
    try:
        assert "imported from the working directory" not in instance.log()
        worker = int(wait_until(lambda: _ready_worker(instance), 30, what="worker 1 ready"))
        instance.kill9()
        wait_until(lambda: not Path(f"/proc/{worker}").exists() or _zombie(worker), 15, what="the worker's exit")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", instance.ports["mx"]), timeout=5).close()
    finally:
        instance.stop()


def _ready_worker(instance: Appliance) -> str | None:
    import re

    found = re.search(r"worker 1 ready \(pid (\d+)\)", instance.log())
    return found.group(1) if found else None


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True

