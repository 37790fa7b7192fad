"""After QUIT over TLS the server closes: the 221 (or +OK), its close_notify, then the TCP
connection, without waiting for the client.  Before, Twisted's TLS close waited for the
session to stop producing and never sent anything: a client that stayed after QUIT held
its session (and its slot under the per-address limit) until the idle timeout."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from typing import Any

import pytest

from tests.daemon import Appliance


def read_line(sock: ssl.SSLSocket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        piece = sock.recv(1)
        assert piece, f"closed after {line!r}"
        line += piece
    return line


def read_reply(sock: ssl.SSLSocket) -> bytes:
    while (line := read_line(sock))[3:4] == b"-":
        pass
    return line


def assert_closed_by_server(sock: ssl.SSLSocket) -> None:
    """The server's close_notify arrives (recv gives b""), then its TCP close: nothing sent by us."""
    assert sock.recv(100) == b""  # close_notify, within the socket's timeout
    raw = sock.unwrap()  # our close_notify; the server's is already here
    assert raw.recv(100) == b""  # the TCP connection is closed from the server's side


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit"])
def test_smtp_quit_over_tls_closes_without_waiting_for_the_client(
        appliance: Callable[..., Appliance], pki: Any, implicit: bool) -> None:
    """A client that reads the 221 and then just waits sees close_notify and the TCP close."""
    instance = appliance(pki=pki)
    context = instance.client_context()
    if implicit:
        sock = context.wrap_socket(socket.create_connection(("127.0.0.1", instance.ports["submissions"]), 10),
                                   server_hostname="localhost")
        assert read_reply(sock).startswith(b"220 ")
    else:
        raw = socket.create_connection(("127.0.0.1", instance.ports["submission"]), 10)
        assert raw.recv(1000).startswith(b"220 ")
        raw.sendall(b"EHLO client.example.net\r\n")
        while b"\r\n250 " not in (reply := raw.recv(4000)) and not reply.startswith(b"250 "):
            pass
        raw.sendall(b"STARTTLS\r\n")
        assert raw.recv(1000).startswith(b"220 ")
        sock = context.wrap_socket(raw, server_hostname="localhost")
    sock.sendall(b"EHLO client.example.net\r\n")
    assert read_reply(sock).startswith(b"250 ")
    sock.sendall(b"QUIT\r\n")
    assert read_reply(sock).startswith(b"221 ")
    assert_closed_by_server(sock)


def test_pop3_quit_over_tls_closes_without_waiting_for_the_client(
        appliance: Callable[..., Appliance], pki: Any) -> None:
    """POP3S: after QUIT's +OK the server sends close_notify and closes the TCP connection."""
    instance = appliance(pki=pki)
    sock = instance.client_context().wrap_socket(
        socket.create_connection(("127.0.0.1", instance.ports["pop3s"]), 10), server_hostname="localhost")
    assert read_line(sock).startswith(b"+OK")
    sock.sendall(b"QUIT\r\n")
    assert read_line(sock).startswith(b"+OK")
    assert_closed_by_server(sock)
