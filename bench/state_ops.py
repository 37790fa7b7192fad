"""CPU per state-store operation, the way a submission message uses the store (a reserve
of its message and its recipients, a total of each), ``--in-flight`` sessions at once:
this process's memory, the supervisor's store asked over the state socket (the worker's
SupervisedStore and the supervisor's server in two processes, both measured), and Redis
(our client here, redis-server's CPU added).  A B C alternation, medians and ranges.

    PYTHONPATH=. .venv/bin/python bench/state_ops.py --ops 20000 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serve(fd: int) -> None:
    """The supervisor's side in its own process: serve until the socket closes."""
    from twisted.internet import reactor

    from mailappliance.state.serve import ServedStore, StateServerFactory

    transport = reactor.adoptStreamConnection(fd, socket.AF_UNIX, StateServerFactory(ServedStore(reactor), "bench"))
    os.close(fd)
    protocol = transport.protocol
    lost = protocol.connectionLost

    def stop(reason: object) -> None:
        lost(reason)
        reactor.stop()

    protocol.connectionLost = stop
    reactor.run()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ops", type=int, default=20_000, help="messages (each 2 reserves + 2 totals)")
    parser.add_argument("--in-flight", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serve-fd", type=int, help=argparse.SUPPRESS)  # the server process
    args = parser.parse_args()
    if args.serve_fd is not None:
        serve(args.serve_fd)
        return

    from twisted.internet import reactor
    from twisted.internet.defer import Deferred, gatherResults

    from mailappliance.settings import StateSettings
    from mailappliance.state.build import build_state_store
    from mailappliance.state.memory import MemoryStore
    from mailappliance.state.supervised import SupervisedStore
    from tests.redis_server import RedisServer

    redis = RedisServer(Path(tempfile.mkdtemp(prefix="bench-state-redis-")))
    redis.start()
    assert redis.process is not None
    ours, theirs = socket.socketpair()
    server = subprocess.Popen([sys.executable, __file__, "--serve-fd", str(theirs.fileno())],
                              pass_fds=[theirs.fileno()])
    server_pid = server.pid
    theirs.close()
    supervised = SupervisedStore.adopt(ours.detach(), reactor, 5)
    redis_store, redis_service = build_state_store(StateSettings(redis=redis.url), reactor)
    assert redis_service is not None
    redis_service.startService()
    stores = {"memory": (MemoryStore(reactor), None), "supervised": (supervised, server_pid),
              "redis": (redis_store, redis.process.pid)}
    results: list[dict[str, object]] = []

    async def one_message(store: object, n: int) -> None:
        uid = f"user{n % 500}"
        await store.total(("messages", uid), 3600)  # type: ignore[attr-defined]
        await store.total(("recipients", uid), 3600)  # type: ignore[attr-defined]
        await store.reserve(("messages", uid), 3600, 10**9)  # type: ignore[attr-defined]
        await store.reserve(("recipients", uid), 3600, 10**9)  # type: ignore[attr-defined]

    async def session(store: object, start: int, count: int) -> None:
        for n in range(start, start + count):
            await one_message(store, n)

    async def measure(kind: str) -> None:
        store, other = stores[kind]
        per = args.ops // args.in_flight
        await gatherResults([Deferred.fromCoroutine(session(store, i * per, 20)) for i in range(args.in_flight)])
        cpu, other_cpu, started = time.process_time(), _cpu_seconds(other) if other else 0.0, time.perf_counter()
        await gatherResults([Deferred.fromCoroutine(session(store, i * per, per)) for i in range(args.in_flight)])
        seconds = time.perf_counter() - started
        here = time.process_time() - cpu
        there = (_cpu_seconds(other) - other_cpu) if other else 0.0
        messages = per * args.in_flight
        result = {"store": kind, "messages_per_second": round(messages / seconds),
                  "client_cpu_us_per_op": round(here / messages / 4 * 1e6, 2),
                  "server_cpu_us_per_op": round(there / messages / 4 * 1e6, 2),
                  "total_cpu_us_per_op": round((here + there) / messages / 4 * 1e6, 2)}
        print(json.dumps(result), flush=True)
        results.append(result)

    async def run() -> None:
        for _ in range(args.rounds):
            for kind in ("memory", "supervised", "redis"):
                await measure(kind)

    def done(result: object) -> object:
        reactor.stop()
        return result

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(run()).addBoth(done))
    reactor.run()
    supervised.close()
    server.wait()
    redis.stop()
    print("\n| store | messages/s (median, range) | CPU µs per op, this process | other process | total |")
    print("|---|---|---|---|---|")
    for kind in ("memory", "supervised", "redis"):
        rows = [r for r in results if r["store"] == kind]

        def med(key: str) -> str:
            values = [float(r[key]) for r in rows]  # type: ignore[arg-type]
            return f"{statistics.median(values):,.1f} ({min(values):,.1f}-{max(values):,.1f})"

        print(f"| {kind} | {med('messages_per_second')} | {med('client_cpu_us_per_op')} | "
              f"{med('server_cpu_us_per_op')} | {med('total_cpu_us_per_op')} |")


if __name__ == "__main__":
    main()
