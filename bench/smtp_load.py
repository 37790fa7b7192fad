"""SMTP load generator: N messages over C concurrent connections, spread over P processes.

asyncio clients with pipelined commands (one round trip for MAIL/RCPT/DATA,
one for the body), so the generator is much faster than the servers it
drives. Prints one JSON line: messages, seconds, messages_per_second,
sessions, acked (250s after DATA), errors.

With ``--submission USER:PASSWORD`` each session is a subscriber's: EHLO,
STARTTLS (the certificate is not checked), EHLO, AUTH PLAIN, then up to
``--per-session`` messages, QUIT, and a new session for the rest.
``--implicit-tls`` speaks TLS from the first byte instead (port 465 style),
``--auth cram-md5`` logs in with CRAM-MD5 instead of PLAIN. ``--tls-resume``: each
client offers the TLS session of its previous connection, as mail clients that
reconnect do (TLS 1.3 tickets or session IDs, whatever the server gives); the
output then counts the ``resumed`` handshakes.  Same for every server measured.

With ``--acked-log FILE`` every message gets a unique token in its Subject
(``bench <tag>-<process>-<client>-<n>``) and the token of each message that
got its 250 is appended to FILE, one a line, for an audit of the Maildir
(bench/matrix.py: every 250 must be a whole file). ``--keep-going`` ends a
client quietly when its connection fails (a server killed mid-run) instead
of failing the run.

    python bench/smtp_load.py --port 2525 --messages 2000 --concurrency 100 --size 10240
    python bench/smtp_load.py --port 2587 --submission alice:secret --per-session 10 --sender alice@example.org
    python bench/smtp_load.py --port 2465 --implicit-tls --auth cram-md5 --submission alice:secret --per-session 10
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import hashlib
import hmac
import json
import multiprocessing
import os
import ssl
import time


def make_message(size: int, number: int | str) -> bytes:
    header = f"From: bench@example.net\r\nTo: alice@example.org\r\nSubject: bench {number}\r\n\r\n".encode()
    line = b"x" * 76 + b"\r\n"
    body = line * max(1, (size - len(header)) // len(line))
    return header + body


async def read_reply_line(reader: asyncio.StreamReader) -> bytes:
    """The last line of a (possibly multi-line) reply."""
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("server closed the connection")
        if line[3:4] != b"-":
            return line


async def read_reply(reader: asyncio.StreamReader) -> int:
    return int((await read_reply_line(reader))[:3])


@dataclasses.dataclass(frozen=True)
class Plan:
    """What every client of one generator process does."""

    host: str
    port: int
    size: int
    recipient: str
    sender: str
    login: str  # "user:password" for submission, "" for plain MX sessions
    per_session: int  # messages per session (0: all of a client's messages in one)
    message_file: str = ""  # send this file's bytes (CRLF, no line starting with ".") instead of a made-up message
    implicit_tls: bool = False  # TLS from the first byte (submissions, port 465)
    auth: str = "plain"  # or "cram-md5"
    acked_log: str = ""  # append the unique token of every message that got its 250 here
    tag: str = ""  # the run's part of the tokens
    keep_going: bool = False  # a failed connection ends the client, not the run
    tls_resume: bool = False  # each client offers its previous connection's TLS session


_context: ssl.SSLContext | None = None


def _client_context() -> ssl.SSLContext:
    """One client context per process (making one loads the CA store: ~20 ms)."""
    global _context
    if _context is None:
        _context = ssl.create_default_context()
        _context.check_hostname, _context.verify_mode = False, ssl.CERT_NONE
    return _context


class _ResumingContext(ssl.SSLContext):
    """A client's own context (cheap: no CA store) that offers its last TLS session:
    asyncio's TLS layer calls ``wrap_bio`` without one."""

    saved: ssl.SSLSession | None = None

    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, server_side: bool = False,
                 server_hostname: str | bytes | None = None, session: ssl.SSLSession | None = None) -> ssl.SSLObject:
        return super().wrap_bio(incoming, outgoing, server_side, server_hostname, session or self.saved)


def _resuming_context() -> _ResumingContext:
    context = _ResumingContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return context


async def log_in(plan: Plan, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    user, _, password = plan.login.partition(":")
    if plan.auth == "cram-md5":
        writer.write(b"AUTH CRAM-MD5\r\n")
        line = await read_reply_line(reader)
        if line[:3] != b"334":
            raise ConnectionError("CRAM-MD5 refused")
        challenge = base64.b64decode(line[4:].strip())
        digest = hmac.new(password.encode(), challenge, hashlib.md5).hexdigest()
        writer.write(base64.b64encode(f"{user} {digest}".encode()) + b"\r\n")
    else:
        token = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())
        writer.write(b"AUTH PLAIN " + token + b"\r\n")
    if await read_reply(reader) != 235:
        raise ConnectionError("AUTH refused")


async def open_session(plan: Plan, context: ssl.SSLContext | None = None
                       ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    context = context or _client_context()
    tls = context if plan.implicit_tls else None
    reader, writer = await asyncio.open_connection(plan.host, plan.port, ssl=tls)
    await read_reply(reader)
    writer.write(b"EHLO bench.example.net\r\n")
    await read_reply(reader)
    if plan.login:
        if not plan.implicit_tls:
            writer.write(b"STARTTLS\r\n")
            if await read_reply(reader) != 220:
                raise ConnectionError("STARTTLS refused")
            await writer.start_tls(context)
            writer.write(b"EHLO bench.example.net\r\n")
            await read_reply(reader)
        await log_in(plan, reader, writer)
    return reader, writer


async def close_session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        context: ssl.SSLContext | None = None) -> None:
    if isinstance(context, _ResumingContext):  # its tickets have arrived with the replies by now
        context.saved = writer.get_extra_info("ssl_object").session
    writer.write(b"QUIT\r\n")
    await read_reply(reader)
    writer.close()


async def client(plan: Plan, number: str, count: int, acked: list[str], sessions: list[int],
                 resumed: list[int]) -> None:
    """Send ``count`` messages; the token (or "") of each one that got its 250 goes into ``acked``."""
    if plan.message_file:
        with open(plan.message_file, "rb") as f:
            payload = f.read() + b".\r\n"
    else:
        payload = make_message(plan.size, 0) + b".\r\n"
    envelope = (b"MAIL FROM:<" + plan.sender.encode() + b">\r\nRCPT TO:<" + plan.recipient.encode() +
                b">\r\nDATA\r\n")
    per_session = plan.per_session or count
    sent = 0
    context = _resuming_context() if plan.tls_resume and plan.login else None
    try:
        while sent < count:
            reader, writer = await open_session(plan, context)
            sessions.append(1)
            if context is not None and writer.get_extra_info("ssl_object").session_reused:
                resumed.append(1)
            for _ in range(min(count - sent, per_session)):
                token = f"{plan.tag}-{number}-{sent}" if plan.acked_log else ""
                sent += 1
                writer.write(envelope)
                codes = [await read_reply(reader) for _ in range(3)]
                if codes != [250, 250, 354]:
                    writer.write(b"RSET\r\n")
                    await read_reply(reader)
                    continue
                writer.write(make_message(plan.size, token) + b".\r\n" if token else payload)
                if await read_reply(reader) == 250:
                    acked.append(token)
            await close_session(reader, writer, context)
    except (ConnectionError, OSError, ValueError):
        if not plan.keep_going:
            raise


async def run_clients(plan: Plan, process: int, messages: int, concurrency: int) -> tuple[int, int, int]:
    acked: list[str] = []
    sessions: list[int] = []
    resumed: list[int] = []
    per_client = [messages // concurrency + (1 if i < messages % concurrency else 0) for i in range(concurrency)]
    try:
        await asyncio.gather(*(client(plan, f"{process}-{i}", n, acked, sessions, resumed)
                               for i, n in enumerate(per_client) if n))
    finally:
        if plan.acked_log:  # O_APPEND: the processes' lines never mix
            fd = os.open(plan.acked_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, "".join(f"{token}\n" for token in acked).encode())
            finally:
                os.close(fd)
    return len(acked), len(sessions), len(resumed)


def worker(job: tuple[Plan, int, int, int]) -> tuple[int, int, int]:
    return asyncio.run(run_clients(*job))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--size", type=int, default=10240)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--recipient", default="alice@example.org")
    parser.add_argument("--sender", default="bench@example.net")
    parser.add_argument("--submission", default="", metavar="USER:PASSWORD",
                        help="STARTTLS (or implicit TLS) and AUTH at the start of every session")
    parser.add_argument("--implicit-tls", action="store_true", help="TLS from the first byte (port 465 style)")
    parser.add_argument("--auth", choices=("plain", "cram-md5"), default="plain", help="with --submission")
    parser.add_argument("--per-session", type=int, default=0, help="messages per session (0: one session a client)")
    parser.add_argument("--message-file", default="", help="send this message (e.g. a DKIM-signed one) every time")
    parser.add_argument("--acked-log", default="", help="unique messages; append each 250'd message's token here")
    parser.add_argument("--tag", default="", help="with --acked-log: the run's part of every token")
    parser.add_argument("--keep-going", action="store_true", help="a failed connection ends that client quietly")
    parser.add_argument("--tls-resume", action="store_true",
                        help="with --submission: each client resumes its previous connection's TLS session")
    args = parser.parse_args()
    plan = Plan(args.host, args.port, args.size, args.recipient, args.sender, args.submission, args.per_session,
                args.message_file, args.implicit_tls, args.auth, args.acked_log, args.tag or str(os.getpid()),
                args.keep_going, args.tls_resume)
    processes = max(1, min(args.processes, args.concurrency))
    jobs = [(plan, i, args.messages // processes + (1 if i < args.messages % processes else 0),
             args.concurrency // processes + (1 if i < args.concurrency % processes else 0)) for i in range(processes)]
    started = time.perf_counter()
    with multiprocessing.Pool(processes) as pool:
        outcomes = pool.map(worker, jobs)
    seconds = time.perf_counter() - started
    acked = sum(a for a, _, _ in outcomes)
    print(json.dumps({"messages": args.messages, "seconds": round(seconds, 3),
                      "messages_per_second": round(args.messages / seconds, 1),
                      "sessions": sum(s for _, s, _ in outcomes), "acked": acked, "errors": args.messages - acked,
                      **({"resumed": sum(r for _, _, r in outcomes)} if args.tls_resume else {})}))


if __name__ == "__main__":
    main()
