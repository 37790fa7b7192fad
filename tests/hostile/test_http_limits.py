"""Issue 11, finding 3: the HTTP listener can neither take the file descriptors
nor fill the disk (connection caps, header deadline, body limit while reading)."""

from __future__ import annotations

import os
import poplib
import resource
import socket
import time
from pathlib import Path
from typing import Callable

import pytest

from tests.daemon import Appliance

SLOW_CLIENTS = 300
DAEMON_FILE_LIMIT = 256  # below SLOW_CLIENTS: without a cap the slow clients alone exhaust it
PER_ADDRESS_CAP = 8  # web_limits.HttpLimits.concurrent_per_address
HEADER_TIMEOUT = 10  # web_limits.HttpLimits.header_timeout


def wait_until(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


class SlowClient:
    """A request that never finishes its headers; notes what the server did with it."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setblocking(False)
        self.reply = b""
        self.closed = False
        try:
            self.sock.send(b"GET /mail/config-v1.1.xml HTTP/1.1\r\nHost: autoconfig.example.org\r\nX-Wait: ")
        except OSError:
            self.closed = True

    def poll(self) -> bool:
        """Has the server closed this connection (reading whatever it answered)?"""
        while not self.closed:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                break
            except OSError:  # reset: the server closed with our bytes unread
                self.closed = True
                break
            if not data:
                self.closed = True
            self.reply += data
        return self.closed

    def close(self) -> None:
        self.sock.close()


def start_with_file_limit(instance: Appliance, limit: int) -> None:
    """Start the daemon with at most ``limit`` file descriptors (this process keeps its own)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(limit, hard), hard))
    try:
        instance.start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def banner(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        return sock.makefile("rb").readline()


def test_slow_partial_requests_are_capped_and_mail_is_still_served(appliance: Callable[..., Appliance]) -> None:
    """300 never-finished requests from one address: all but 8 get 503 at once, those 8 get 408 at the header deadline, POP3 and MX still greet."""
    instance = appliance(start=False)
    start_with_file_limit(instance, DAEMON_FILE_LIMIT)
    clients = [SlowClient(instance.ports["autoconfig"]) for _ in range(SLOW_CLIENTS)]
    try:
        wait_until(lambda: sum(c.poll() for c in clients) >= SLOW_CLIENTS - PER_ADDRESS_CAP)
        held = [c for c in clients if not c.poll()]
        assert len(held) <= PER_ADDRESS_CAP
        answered = [c.reply for c in clients if c.reply]
        assert answered, "no refused connection read the 503"
        assert all(reply.startswith(b"HTTP/1.1 503 Service Unavailable\r\n") for reply in answered)

        pop3 = poplib.POP3("127.0.0.1", instance.ports["pop3"], timeout=10)
        assert pop3.getwelcome().startswith(b"+OK")
        pop3.quit()
        assert banner(instance.ports["mx"]).startswith(b"220 ")

        wait_until(lambda: all(c.poll() for c in held), timeout=HEADER_TIMEOUT + 20)
        assert all(c.reply == b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
                   for c in held)
    finally:
        for c in clients:
            c.close()


def daemon_temp_files(instance: Appliance, temp_dir: Path) -> list[tuple[str, int]]:
    """Files under ``temp_dir`` the daemon holds open (O_TMPFILE ones are in no listing), with their sizes."""
    assert instance.process is not None
    fd_dir = Path(f"/proc/{instance.process.pid}/fd")
    found = []
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
            if target.startswith(str(temp_dir)):
                found.append((target, os.stat(fd).st_size))
        except OSError:  # closed meanwhile
            continue
    found += [(str(p), p.stat().st_size) for p in temp_dir.rglob("*") if p.is_file()]
    return found


def read_reply(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (a reset after its reply counts as a close)."""
    reply = b""
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return reply
        if not data:
            return reply
        reply += data


def test_oversized_autodiscover_post_gets_413_and_nothing_is_spooled(
        appliance: Callable[..., Appliance], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2 GB Content-Length gets 413 before any body byte, a chunked body is cut off at 64 KiB with 413; no temp file."""
    temp_dir = tmp_path / "daemon-tmp"
    temp_dir.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp_dir))  # where twisted.web would spool bodies
    instance = appliance()
    port = instance.ports["autoconfig"]

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /autodiscover/autodiscover.xml HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: text/xml\r\nContent-Length: 2000000000\r\n\r\n")
        assert read_reply(sock).startswith(b"HTTP/1.1 413 Payload Too Large\r\n")
        assert daemon_temp_files(instance, temp_dir) == []

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /Autodiscover/Autodiscover.xml HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: text/xml\r\nTransfer-Encoding: chunked\r\n\r\n")
        sock.sendall(b"%x\r\n" % (70 * 1024) + b"<" * (70 * 1024) + b"\r\n")
        assert read_reply(sock).startswith(b"HTTP/1.1 413 Payload Too Large\r\n")
        assert daemon_temp_files(instance, temp_dir) == []
