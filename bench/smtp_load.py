"""SMTP load generator: N messages over C concurrent connections, spread over P processes.

asyncio clients with pipelined commands (one round trip for MAIL/RCPT/DATA,
one for the body), so the generator is much faster than the servers it
drives. Prints one JSON line: messages, seconds, messages_per_second,
sessions, errors.

With ``--submission USER:PASSWORD`` each session is a subscriber's: EHLO,
STARTTLS (the certificate is not checked), EHLO, AUTH PLAIN, then up to
``--per-session`` messages, QUIT, and a new session for the rest.

    python bench/smtp_load.py --port 2525 --messages 2000 --concurrency 100 --size 10240
    python bench/smtp_load.py --port 2587 --submission alice:secret --per-session 10 --sender alice@example.org
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import json
import multiprocessing
import ssl
import time


def make_message(size: int, number: int) -> bytes:
    header = f"From: bench@example.net\r\nTo: alice@example.org\r\nSubject: bench {number}\r\n\r\n".encode()
    line = b"x" * 76 + b"\r\n"
    body = line * max(1, (size - len(header)) // len(line))
    return header + body


async def read_reply(reader: asyncio.StreamReader) -> int:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("server closed the connection")
        if line[3:4] != b"-":
            return int(line[:3])


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


_context: ssl.SSLContext | None = None


def _client_context() -> ssl.SSLContext:
    """One client context per process (making one loads the CA store: ~20 ms)."""
    global _context
    if _context is None:
        _context = ssl.create_default_context()
        _context.check_hostname, _context.verify_mode = False, ssl.CERT_NONE
    return _context


async def open_session(plan: Plan) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(plan.host, plan.port)
    await read_reply(reader)
    writer.write(b"EHLO bench.example.net\r\n")
    await read_reply(reader)
    if plan.login:
        writer.write(b"STARTTLS\r\n")
        if await read_reply(reader) != 220:
            raise ConnectionError("STARTTLS refused")
        await writer.start_tls(_client_context())
        writer.write(b"EHLO bench.example.net\r\n")
        await read_reply(reader)
        user, _, password = plan.login.partition(":")
        token = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())
        writer.write(b"AUTH PLAIN " + token + b"\r\n")
        if await read_reply(reader) != 235:
            raise ConnectionError("AUTH refused")
    return reader, writer


async def close_session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"QUIT\r\n")
    await read_reply(reader)
    writer.close()


async def client(plan: Plan, count: int, errors: list[int], sessions: list[int]) -> None:
    if plan.message_file:
        with open(plan.message_file, "rb") as f:
            payload = f.read() + b".\r\n"
    else:
        payload = make_message(plan.size, 0) + b".\r\n"
    envelope = (b"MAIL FROM:<" + plan.sender.encode() + b">\r\nRCPT TO:<" + plan.recipient.encode() +
                b">\r\nDATA\r\n")
    per_session = plan.per_session or count
    while count > 0:
        reader, writer = await open_session(plan)
        sessions.append(1)
        for _ in range(min(count, per_session)):
            writer.write(envelope)
            codes = [await read_reply(reader) for _ in range(3)]
            if codes != [250, 250, 354]:
                errors.append(codes[-1])
                writer.write(b"RSET\r\n")
                await read_reply(reader)
                continue
            writer.write(payload)
            if await read_reply(reader) != 250:
                errors.append(1)
        count -= per_session
        await close_session(reader, writer)


async def run_clients(plan: Plan, messages: int, concurrency: int) -> tuple[int, int]:
    errors: list[int] = []
    sessions: list[int] = []
    per_client = [messages // concurrency + (1 if i < messages % concurrency else 0) for i in range(concurrency)]
    await asyncio.gather(*(client(plan, n, errors, sessions) for n in per_client if n))
    return len(errors), len(sessions)


def worker(job: tuple[Plan, int, int]) -> tuple[int, int]:
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
                        help="STARTTLS and AUTH PLAIN at the start of every session")
    parser.add_argument("--per-session", type=int, default=0, help="messages per session (0: one session a client)")
    parser.add_argument("--message-file", default="", help="send this message (e.g. a DKIM-signed one) every time")
    args = parser.parse_args()
    plan = Plan(args.host, args.port, args.size, args.recipient, args.sender, args.submission, args.per_session,
                args.message_file)
    processes = max(1, min(args.processes, args.concurrency))
    jobs = [(plan, args.messages // processes + (1 if i < args.messages % processes else 0),
             args.concurrency // processes + (1 if i < args.concurrency % processes else 0)) for i in range(processes)]
    started = time.perf_counter()
    with multiprocessing.Pool(processes) as pool:
        outcomes = pool.map(worker, jobs)
    seconds = time.perf_counter() - started
    print(json.dumps({"messages": args.messages, "seconds": round(seconds, 3),
                      "messages_per_second": round(args.messages / seconds, 1),
                      "sessions": sum(s for _, s in outcomes), "errors": sum(e for e, _ in outcomes)}))


if __name__ == "__main__":
    main()
