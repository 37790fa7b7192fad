"""The outside world on loopback: a DNS server (twisted.names, run by twistd) and
scriptable SMTP receivers, for testing outbound delivery end to end."""

from __future__ import annotations

import socket
import socketserver
import ssl
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import attrs
import pytest

from tests.conditions import wait_until
from tests.daemon import free_port

BIN = Path(sys.executable).parent


class DNSServer:
    """``twistd dns`` serving Python zone files; ``serve(zones)`` (re)starts it with new records.

    ``zones`` maps a zone origin to record lines in twisted.names' pyzone
    syntax, e.g. ``{"remote.example": ["MX('remote.example', 10, 'mx1.remote.example')",
    "A('mx1.remote.example', '127.0.0.2')"]}``.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def serve(self, zones: dict[str, list[str]]) -> None:
        self.stop()
        arguments = []
        for origin, records in zones.items():
            path = self.root / f"{origin}.zone.py"
            soa = (f"SOA({origin!r}, mname='ns.{origin}', rname='root.{origin}', serial=1, "
                   "refresh=60, retry=60, expire=60, minimum=1)")
            path.write_text("zone = [\n    " + ",\n    ".join([soa, *records]) + ",\n]\n")
            arguments += ["--pyzone", str(path)]
        self.process = subprocess.Popen(
            [str(BIN / "twistd"), "-n", "--pidfile=", "--logfile", str(self.root / "dns.log"), "dns",
             "--interface", "127.0.0.1", "--port", str(self.port), *arguments],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        process = self.process

        def answering() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"twistd dns exited with {process.returncode} (bad zone syntax?)")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        try:
            wait_until(answering, 15, what="twistd dns answering")
        except AssertionError:
            raise RuntimeError(f"twistd dns did not start: {(self.root / 'dns.log').read_text()}") from None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@pytest.fixture
def dns_server(tmp_path: Path) -> Iterator[DNSServer]:
    root = tmp_path / "dns"
    root.mkdir()
    server = DNSServer(root)
    yield server
    server.stop()


@attrs.define
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    tls: bool
    mail_line: str = ""  # MAIL and RCPT as the client sent them (their parameters: DSN, SMTPUTF8)
    rcpt_lines: list[str] = attrs.Factory(list)


class SMTPReceiver:
    """A small, strict-enough SMTP server in threads, scripted by the test."""

    def __init__(self, host: str, port: int, tls: tuple[Path, Path] | None) -> None:
        self.host, self.port = host, port
        self.messages: list[Received] = []
        self.rcpt_replies: dict[str, str] = {}
        self.data_replies: list[str] = []
        self.extensions = ["PIPELINING", "SIZE 10000000", "8BITMIME"]  # a test may add DSN, SMTPUTF8
        self.sessions = 0
        self._condition = threading.Condition()
        self._tls_context: ssl.SSLContext | None = None
        if tls is not None:
            self._tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._tls_context.load_cert_chain(str(tls[0]), str(tls[1]))
        receiver = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                receiver._session(self)

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        server_class = socketserver.ThreadingTCPServer
        if ":" in host:  # an IPv6 receiver, e.g. on ::1

            class server_class(socketserver.ThreadingTCPServer):  # type: ignore[no-redef]
                address_family = socket.AF_INET6

        self._server = server_class((host, port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def _session(self, handler: Any) -> None:
        with self._condition:
            self.sessions += 1
        connection, tls = handler.connection, False
        reader = connection.makefile("rb")

        def send(line: str) -> None:
            connection.sendall(line.encode() + b"\r\n")

        send("220 receiver.test ESMTP")
        mail_from, rcpts, mail_line, rcpt_lines = "", [], "", []
        while True:
            line = reader.readline()
            if not line:
                return
            command = line.decode(errors="replace").strip()
            verb = command[:4].upper()
            if verb == "EHLO":
                offer = ["250-receiver.test", *(f"250-{e}" for e in self.extensions)]
                if self._tls_context is not None and not tls:
                    offer.append("250-STARTTLS")
                send("\r\n".join(offer + ["250 ENHANCEDSTATUSCODES"]))
            elif verb == "STAR" and self._tls_context is not None and not tls:
                send("220 2.0.0 ready")
                connection = self._tls_context.wrap_socket(connection, server_side=True)
                reader, tls = connection.makefile("rb"), True
            elif verb == "MAIL":
                mail_from, rcpts = command[10:].split(">")[0].lstrip("<"), []
                mail_line, rcpt_lines = command, []
                send("250 2.1.0 ok")
            elif verb == "RCPT":
                address = command[8:].split(">")[0].lstrip("<").lower()
                reply = self.rcpt_replies.get(address, "250 2.1.5 ok")
                rcpt_lines.append(command)
                if reply.startswith("2"):
                    rcpts.append(address)
                send(reply)
            elif verb == "DATA":
                send("354 go ahead")
                data = b""
                while (chunk := reader.readline()) not in (b".\r\n", b""):
                    data += chunk[1:] if chunk.startswith(b".") else chunk
                if not chunk:
                    return  # the client went away before its final dot: no message, no reply
                with self._condition:
                    reply = self.data_replies.pop(0) if self.data_replies else "250 2.0.0 queued"
                    if reply.startswith("2"):
                        self.messages.append(Received(mail_from, rcpts, data, tls, mail_line, rcpt_lines))
                    self._condition.notify_all()
                send(reply)
            elif verb == "QUIT":
                send("221 2.0.0 bye")
                return
            else:
                send("250 2.0.0 ok" if verb in ("RSET", "NOOP", "HELO") else "502 5.5.1 not implemented")

    def wait_for(self, count: int, timeout: float = 30) -> list[Received]:
        with self._condition:
            if not self._condition.wait_for(lambda: len(self.messages) >= count, timeout):
                raise AssertionError(f"expected {count} message(s), got {len(self.messages)}")
            return list(self.messages)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def smtp_receiver() -> Iterator[Any]:
    started: list[SMTPReceiver] = []

    def start(host: str = "127.0.0.2", port: int | None = None,
              tls: tuple[Path, Path] | None = None) -> SMTPReceiver:
        receiver = SMTPReceiver(host, port or free_port(), tls)
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        receiver.stop()
