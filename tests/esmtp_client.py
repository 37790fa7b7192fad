"""A small raw SMTP client for what smtplib and swaks cannot send: BDAT chunks
(RFC 3030), exact parameter words, UTF-8 addresses, and IPv6 sources."""

from __future__ import annotations

import base64
import socket
import ssl
from typing import Any


class RawSMTP:
    """One connection; ``command`` returns (code, reply lines without the code)."""

    def __init__(self, host: str, port: int, timeout: float = 20, tls: ssl.SSLContext | None = None) -> None:
        """``tls``: implicit TLS (port 465) with this client context."""
        self.socket = socket.create_connection((host, port), timeout=timeout)
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_hostname="localhost")
        self.reader = self.socket.makefile("rb")
        self.greeting = self.reply()

    def __enter__(self) -> RawSMTP:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.socket.sendall(b"QUIT\r\n")
        except OSError:
            pass
        self.reader.close()
        self.socket.close()

    def reply(self) -> tuple[int, list[str]]:
        lines = []
        while True:
            raw = self.reader.readline()
            if not raw:
                raise ConnectionError(f"connection closed after {lines!r}")
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(line[4:])
            if line[3:4] != "-":
                return int(line[:3]), lines

    def send(self, data: bytes) -> None:
        self.socket.sendall(data)

    def command(self, line: str | bytes) -> tuple[int, list[str]]:
        self.send((line.encode("utf-8") if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def ehlo(self, name: str = "client.example.net") -> list[str]:
        code, lines = self.command(f"EHLO {name}")
        assert code == 250, lines
        return lines[1:]

    def login(self, login: str, password: str) -> None:
        token = base64.b64encode(f"\0{login}\0{password}".encode()).decode()
        code, lines = self.command(f"AUTH PLAIN {token}")
        assert code == 235, lines

    def bdat(self, chunk: bytes, last: bool = False) -> tuple[int, list[str]]:
        self.send(b"BDAT %d%s\r\n" % (len(chunk), b" LAST" if last else b"") + chunk)
        return self.reply()

    def data(self, message: bytes) -> tuple[int, list[str]]:
        code, lines = self.command("DATA")
        if code != 354:
            return code, lines
        stuffed = message.replace(b"\r\n.", b"\r\n..")
        self.send((b"." if stuffed.startswith(b".") else b"") + stuffed + b".\r\n")
        return self.reply()
