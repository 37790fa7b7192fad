"""Server CPU per submission session without messages: EHLO, STARTTLS (or implicit
TLS), EHLO, AUTH, QUIT, nothing else; servers alternate A B A B.

What a session costs apart from its messages (handshake, AUTH, the close):
``bench/run.py submission`` mixes both, and at 10 messages per session the
session's share is a tenth.  Two generator processes, 5 clients each; prints
one JSON line per run, then the medians [min-max] per server.

    PYTHONPATH=. .venv/bin/python bench/tls_sessions.py --sessions 1000 --rounds 3 \\
        --servers ours 'ours@code=/tmp/old' twisted [--implicit-tls]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import smtp_load  # noqa: E402

from bench import run  # noqa: E402


def sessions(job: tuple[int, bool, int, int, str]) -> None:
    """``count`` sessions over ``clients`` concurrent clients, one after another each."""
    port, implicit, count, clients, auth = job
    plan = smtp_load.Plan("127.0.0.1", port, 0, "", "alice@example.org", "alice:alice-password", 1,
                          implicit_tls=implicit, auth=auth)

    async def client(n: int) -> None:
        for _ in range(n):
            reader, writer = await smtp_load.open_session(plan)
            await smtp_load.close_session(reader, writer)

    async def main() -> None:
        await asyncio.gather(*(client(count // clients) for _ in range(clients)))

    asyncio.run(main())


def measure(kind: str, count: int, implicit: bool) -> dict[str, float | str]:
    server = run.Server(kind).start()
    try:
        port = server.submissions_port if implicit else server.submission_port
        auth = "cram-md5" if implicit and server.kind == "twisted" else "plain"  # as bench/run.py's implicit TLS
        with multiprocessing.Pool(2) as pool:
            pool.map(sessions, [(port, implicit, 40, 4, auth)] * 2)  # warm: caches, the first login's hash
            cpu, started = server.cpu_seconds(), time.perf_counter()
            pool.map(sessions, [(port, implicit, count // 2, 5, auth)] * 2)
            seconds, cpu = time.perf_counter() - started, server.cpu_seconds() - cpu
        return {"server": kind, "sessions_per_second": round(count / seconds, 1),
                "server_cpu_ms_per_session": round(cpu * 1000 / count, 3)}
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--servers", nargs="+", default=["ours", "twisted"], help="ours[@...] or twisted")
    parser.add_argument("--implicit-tls", action="store_true", help="the implicit-TLS port (Twisted: CRAM-MD5)")
    args = parser.parse_args()
    results: dict[str, list[dict[str, float | str]]] = {kind: [] for kind in args.servers}
    try:
        for _ in range(args.rounds):
            for kind in args.servers:
                result = measure(kind, args.sessions, args.implicit_tls)
                print(json.dumps(result), flush=True)
                results[kind].append(result)
    finally:
        run.remove_finished_roots()
    for kind, rows in results.items():
        cpu = [float(r["server_cpu_ms_per_session"]) for r in rows]
        rate = [float(r["sessions_per_second"]) for r in rows]
        print(f"{kind}: server CPU {statistics.median(cpu):.3f} ms/session [{min(cpu):.3f}-{max(cpu):.3f}], "
              f"{statistics.median(rate):,.1f} sessions/s [{min(rate):,.1f}-{max(rate):,.1f}]")


if __name__ == "__main__":
    main()
