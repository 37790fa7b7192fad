"""Finding 4: a few addresses must not be able to hold every connection.

Each SMTP and POP3 listener has its own share of ``[limits] max_connections``
(here 50 / 5 listeners = 10 each), so strangers who fill the MX cannot keep
subscribers off submission and POP3; one client network (/24) has a cap of
its own besides each address; and no session lasts longer than
``[limits] session_lifetime``, however busy it keeps itself.

All of 127/8 is loopback, so a client can connect from 127.0.0.2, 127.0.1.2
and so on; note 127.0.0.x are one /24 and 127.0.1.x the next.
"""

from __future__ import annotations

import errno
import os
import poplib
import select
import signal
import smtplib
import socket
import time
from typing import Any, Callable

from tests.conditions import wait_until
from tests.daemon import Appliance


def first_lines(instance: Appliance, listener: str, sources: list[str]) -> tuple[list[socket.socket], list[bytes]]:
    """Open one connection from each source address and read its first line (banner or refusal)."""
    sockets, lines = [], []
    for source in sources:
        sock = socket.create_connection(("127.0.0.1", instance.ports[listener]), timeout=30,
                                        source_address=(source, 0))
        sockets.append(sock)
        lines.append(sock.makefile("rb").readline())
    return sockets, lines


def test_strangers_who_fill_the_mx_leave_room_for_subscribers(appliance: Callable[..., Appliance], pki: Any) -> None:
    """With limits.max_connections = 50, the MX holds 10 (its share), refuses the 11th with 421 4.7.0, and submission and POP3 still serve."""
    instance = appliance(pki=pki, start=False, plaintext_pop3=True, extra={"limits": {
        "max_connections": 50, "concurrent_per_network": 1000, "connections_per_minute": 1000}})
    assert instance.admin("user", "add", "alice@example.org", password="alice-password").returncode == 0
    instance.start()
    sources = [f"127.0.0.{2 + i // 10}" for i in range(50)]  # ten each from five addresses
    held, lines = first_lines(instance, "mx", sources)
    try:
        assert sum(line.startswith(b"220 ") for line in lines) == 10, lines
        assert sum(line.startswith(b"421 4.7.0 ") for line in lines) == 40, lines
        with smtplib.SMTP_SSL("127.0.0.1", instance.ports["submissions"], timeout=30,
                              context=pki.client_context()) as smtp:
            assert smtp.login("alice", "alice-password")[0] == 235
            assert smtp.sendmail("alice@example.org", ["alice@example.org"], b"Subject: x\r\n\r\ny\r\n") == {}
        pop = poplib.POP3("127.0.0.1", instance.ports["pop3"], timeout=30)
        try:
            assert pop.user("alice").startswith(b"+OK") and pop.pass_("alice-password").startswith(b"+OK")
        finally:
            pop.quit()
    finally:
        for sock in held:
            sock.close()
    assert "limit max_connections reached for mx" in instance.log()


def test_one_network_cannot_hold_more_than_its_cap(appliance: Callable[..., Appliance]) -> None:
    """With concurrent_per_network = 15, twenty connections from four addresses of one /24 get 15 banners and five 421 4.7.0; another /24 still gets in."""
    instance = appliance(extra={"limits": {"concurrent_per_network": 15, "concurrent_per_address": 20}})
    sources = [f"127.0.0.{2 + i // 5}" for i in range(20)]
    held, lines = first_lines(instance, "mx", sources)
    try:
        assert sum(line.startswith(b"220 ") for line in lines) == 15, lines
        assert sum(line.startswith(b"421 4.7.0 ") for line in lines) == 5, lines
        other, (line,) = first_lines(instance, "mx", ["127.0.1.2"])
        held += other
        assert line.startswith(b"220 ")
    finally:
        for sock in held:
            sock.close()
    assert "limit concurrent_per_network reached for 127.0.0.0/24" in instance.log()


def test_a_busy_session_still_ends_at_its_lifetime(appliance: Callable[..., Appliance]) -> None:
    """With session_lifetime = 3, an SMTP session sending NOOP twice a second gets 421 and is closed, and so is a POP3 session sending CAPA."""
    instance = appliance(extra={"limits": {"session_lifetime": 3}})
    deadline = time.monotonic() + 30  # ten times the lifetime
    with socket.create_connection(("127.0.0.1", instance.ports["mx"]), timeout=30) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"220 ")
        line = b""
        while time.monotonic() < deadline:
            sock.sendall(b"NOOP\r\n")
            line = reader.readline()
            if not line.startswith(b"250 "):
                break
            time.sleep(0.5)  # pacing the client, not waiting for the result
        assert line.startswith(b"421 "), line
        assert reader.readline() == b""  # closed after the 421
    with socket.create_connection(("127.0.0.1", instance.ports["pop3"]), timeout=30) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"+OK")
        line = b""
        while time.monotonic() < deadline and not line.startswith(b"-ERR"):
            sock.sendall(b"CAPA\r\n")
            line = reader.readline()
            while line and line.rstrip(b"\r\n") != b"." and not line.startswith(b"-ERR"):
                line = reader.readline()
            if not line:
                break
            time.sleep(0.5)
        assert line.startswith(b"-ERR"), line
        assert reader.readline() == b""


def test_a_burst_of_connections_waits_in_the_kernel_not_for_a_second_syn(appliance: Callable[..., Appliance]) -> None:
    """200 clients connecting while the daemon cannot accept (stopped) all complete their TCP handshake:
    the listen backlog holds them (Twisted's default of 50 made the rest wait for a SYN sent again)."""
    instance = appliance()
    assert instance.process is not None
    sockets = []
    os.kill(instance.process.pid, signal.SIGSTOP)
    try:
        for n in range(200):
            sock = socket.socket()
            sock.setblocking(False)
            sock.bind((f"127.0.{2 + n // 100}.{2 + n % 100}", 0))  # per-address caps don't apply before accept
            assert sock.connect_ex(("127.0.0.1", instance.ports["mx"])) in (0, errno.EINPROGRESS)
            sockets.append(sock)

        def connected() -> bool:
            _, writable, _ = select.select([], sockets, [], 0.05)
            return len(writable) == len(sockets) and all(s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
                                                         for s in sockets)

        wait_until(connected, timeout=5, what="all 200 handshakes completed while the daemon was stopped")
    finally:
        os.kill(instance.process.pid, signal.SIGCONT)
        for sock in sockets:
            sock.close()
