"""A private, real redis-server for the tests (Debian's redis-server, no mocks).

One per test session, on a UNIX socket in a temp dir (``--port 0``: no TCP),
nothing saved to disk.  The function-scoped ``redis`` fixture makes sure it
runs (tests may stop, pause and restart it) and empties it.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from tests.conditions import ServerProcess, wait_until

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisServer(ServerProcess):
    """A running private redis-server; ``stop()``/``start()`` keep the socket path."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.socket = root / "redis.sock"
        self.url = f"unix://{self.socket}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15) -> None:
        if self.running:
            return
        log = open(self.root / "redis.log", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
             "--save", "", "--appendonly", "no", "--daemonize", "no", "--dir", str(self.root)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )

        def answers() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.root / 'redis.log').read_text()}")
            try:
                return self.command(b"PING") == b"+PONG\r\n"
            except OSError:
                return False

        wait_until(answers, timeout, what="redis-server answering")

    def command(self, *words: bytes) -> bytes:
        """One command over a fresh connection; the raw reply."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.socket))
            s.sendall(b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in words))
            return s.recv(65536)

    def keys(self) -> list[bytes]:
        reply = self.command(b"KEYS", b"*")
        lines = reply.split(b"\r\n")
        return [lines[i] for i in range(2, len(lines), 2) if lines[i - 1].startswith(b"$")]


    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    if not Path(REDIS_SERVER).exists():
        pytest.fail("redis-server is not installed: run `make test` (it installs Debian's redis-server)")
    root = Path(tempfile.mkdtemp(prefix="mailappliance-redis-"))
    server = RedisServer(root)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def redis(redis_server: RedisServer) -> RedisServer:
    """The session's redis-server, running and empty."""
    redis_server.resume()
    redis_server.start()
    redis_server.command(b"FLUSHALL")
    return redis_server
