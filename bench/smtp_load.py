"""SMTP load generator: N messages over C concurrent connections, spread over P processes.

asyncio clients with pipelined commands (one round trip for MAIL/RCPT/DATA,
one for the body), so the generator is much faster than the servers it
drives. Prints one JSON line: messages, seconds, messages_per_second, errors.

    python bench/smtp_load.py --port 2525 --messages 2000 --concurrency 100 --size 10240
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
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


async def client(host: str, port: int, count: int, size: int, recipient: str, errors: list[int]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    await read_reply(reader)
    writer.write(b"EHLO bench.example.net\r\n")
    await read_reply(reader)
    payload = make_message(size, 0) + b".\r\n"
    for _ in range(count):
        writer.write(b"MAIL FROM:<bench@example.net>\r\nRCPT TO:<" + recipient.encode() + b">\r\nDATA\r\n")
        codes = [await read_reply(reader) for _ in range(3)]
        if codes != [250, 250, 354]:
            errors.append(codes[-1])
            writer.write(b"RSET\r\n")
            await read_reply(reader)
            continue
        writer.write(payload)
        if await read_reply(reader) != 250:
            errors.append(1)
    writer.write(b"QUIT\r\n")
    await read_reply(reader)
    writer.close()


async def run_clients(host: str, port: int, messages: int, concurrency: int, size: int, recipient: str) -> int:
    errors: list[int] = []
    per_client = [messages // concurrency + (1 if i < messages % concurrency else 0) for i in range(concurrency)]
    await asyncio.gather(*(client(host, port, n, size, recipient, errors) for n in per_client if n))
    return len(errors)


def worker(args: tuple[str, int, int, int, int, str]) -> int:
    return asyncio.run(run_clients(*args))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--size", type=int, default=10240)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--recipient", default="alice@example.org")
    args = parser.parse_args()
    processes = max(1, min(args.processes, args.concurrency))
    jobs = [(args.host, args.port, args.messages // processes + (1 if i < args.messages % processes else 0),
             args.concurrency // processes + (1 if i < args.concurrency % processes else 0), args.size,
             args.recipient) for i in range(processes)]
    started = time.perf_counter()
    with multiprocessing.Pool(processes) as pool:
        errors = sum(pool.map(worker, jobs))
    seconds = time.perf_counter() - started
    print(json.dumps({"messages": args.messages, "seconds": round(seconds, 3),
                      "messages_per_second": round(args.messages / seconds, 1), "errors": errors}))


if __name__ == "__main__":
    main()
