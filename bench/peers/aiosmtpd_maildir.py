"""Peer: an aiosmtpd server that writes each message to a Maildir and fsyncs it
(file and directory) before answering 250 - the same durability rule as ours.

With ``--submission-port`` and a certificate it also listens for
subscribers: STARTTLS required, then AUTH PLAIN (alice / alice-password).

    python bench/peers/aiosmtpd_maildir.py --port 2600 --maildir /tmp/peer-maildir
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import ssl
import time
from pathlib import Path

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from peer_options import add_submission_options

_counter = 0


def deliver(maildir: Path, data: bytes) -> None:
    global _counter
    _counter += 1
    name = f"{time.time():.6f}.P{os.getpid()}Q{_counter}.{socket.gethostname()}"
    tmp = maildir / "tmp" / name
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, maildir / "new" / name)
    dir_fd = os.open(maildir / "new", os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class MaildirHandler:
    def __init__(self, maildir: Path) -> None:
        self.maildir = maildir

    async def handle_DATA(self, server: SMTP, session: object, envelope: object) -> str:
        data = envelope.original_content  # type: ignore[attr-defined]
        await asyncio.get_running_loop().run_in_executor(None, deliver, self.maildir, data)
        return "250 OK"


def authenticate(server: SMTP, session: object, envelope: object, mechanism: str, data: object) -> AuthResult:
    ok = isinstance(data, LoginPassword) and (data.login, data.password) == (b"alice", b"alice-password")
    return AuthResult(success=ok)


async def serve(port: int, maildir: Path, submission: tuple[int, Path, Path] | None = None) -> None:
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    handler = MaildirHandler(maildir)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(handler, data_size_limit=26214400), "127.0.0.1", port)
    if submission is not None:
        submission_port, certificate, key = submission
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(certificate, key)
        await loop.create_server(
            lambda: SMTP(handler, data_size_limit=26214400, tls_context=context, require_starttls=True,
                         authenticator=authenticate, auth_required=True), "127.0.0.1", submission_port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--maildir", type=Path, required=True)
    add_submission_options(parser)
    args = parser.parse_args()
    submission = (args.submission_port, args.certificate, args.private_key) if args.submission_port else None
    asyncio.run(serve(args.port, args.maildir, submission))
