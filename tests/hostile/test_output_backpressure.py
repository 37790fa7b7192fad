"""Finding 2: a client that pipelines and never reads must not grow the
server's memory or starve other clients."""

from __future__ import annotations

import select
import smtplib
import socket
import time
from typing import Callable

from tests.conditions import process_rss
from tests.daemon import Appliance

MiB = 1024 * 1024


def flood_without_reading(port: int, total: int, seconds: float) -> tuple[socket.socket, int]:
    """Send pipelined ``EHLO x`` lines and never read; stop when ``total`` octets
    went out or the server has stopped taking them for a while."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setblocking(False)
    chunk = b"EHLO x\r\n" * 8192
    sent, stalled_since, deadline = 0, None, time.monotonic() + seconds
    while sent < total and time.monotonic() < deadline:
        _, writable, _ = select.select([], [sock], [], 0.2)
        if not writable:
            stalled_since = stalled_since or time.monotonic()
            if time.monotonic() - stalled_since > 3:
                break  # the server stopped reading us: what this test wants
            continue
        stalled_since = None
        try:
            sent += sock.send(chunk)
        except BlockingIOError:
            continue
    return sock, sent


def test_a_client_that_never_reads_cannot_grow_memory_or_starve_others(
        appliance: Callable[..., Appliance]) -> None:
    """48 MiB of pipelined EHLO on the MX: the server stops reading at its bound,
    its memory stays flat, and another client is served meanwhile."""
    instance = appliance()
    assert instance.process is not None
    before = process_rss(instance.process.pid)
    hog, sent = flood_without_reading(instance.ports["mx"], 48 * MiB, 30)
    try:
        grown = process_rss(instance.process.pid) - before
        assert grown < 64 * MiB, f"RSS grew by {grown // MiB} MiB after {sent // MiB} MiB of unread replies"
        assert sent < 48 * MiB, "the server never stopped reading from a client that does not read"
        with smtplib.SMTP("127.0.0.1", instance.ports["mx"], timeout=10) as other:  # starved: a timeout
            assert other.ehlo("other.example")[0] == 250
    finally:
        hog.close()
