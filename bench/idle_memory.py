"""What an idle connection costs inside the server process, deterministically.

    .venv/bin/python bench/idle_memory.py --servers ours twisted --connections 5000
    .venv/bin/python bench/idle_memory.py --servers ours --tracemalloc 2000   # where it goes
    .venv/bin/python bench/idle_memory.py --servers ours twisted --protocol pop3  # idle POP3 instead

``bench/run.py idle`` reports RSS growth, which depends on how much free
memory the server's start-up left behind (Twisted's mail peer moves between
1.9 and 2.6 KiB per connection with the same allocations).  This starts each
server with a ``sitecustomize`` hook that answers SIGUSR2 with its RSS,
``sys.getallocatedblocks()`` and the count of GC-tracked objects (or, with
``--tracemalloc``, a tracemalloc snapshot), opens idle MX connections from
many source addresses (``--protocol pop3``: POP3 connections) in two steps (a fifth, then the rest) and reports the
slope between the steps per connection.  The server runs the tree on
``PYTHONPATH`` (set it to compare two trees).  docs/performance.md, "Idle
connections".
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import socket
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402  (bench/run.py: the servers and their configs)

HOOK = '''
import gc, json, os, signal, sys
def _answer(*_):
    gc.collect()
    n = _answer.count = getattr(_answer, "count", 0) + 1
    out = os.environ["IDLE_MEMORY_OUT"] + f".{n}"
    if os.environ.get("IDLE_MEMORY_TRACE"):
        import tracemalloc
        tracemalloc.take_snapshot().dump(out + ".tmp")
    else:
        rss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS"))
        json.dump({"rss_kib": rss, "blocks": sys.getallocatedblocks(), "objects": len(gc.get_objects())},
                  open(out + ".tmp", "w"))
    os.rename(out + ".tmp", out)
if os.environ.get("IDLE_MEMORY_OUT"):
    if os.environ.get("IDLE_MEMORY_TRACE"):
        import tracemalloc
        tracemalloc.start(1)
    signal.signal(signal.SIGUSR2, _answer)
'''


def measure(kind: str, count: int, trace: bool, protocol: str = "smtp") -> None:
    hook = Path(tempfile.mkdtemp(prefix="idle-hook-"))
    (hook / "sitecustomize.py").write_text(HOOK)
    out = str(hook / "answer")
    saved = dict(os.environ)
    os.environ.update(IDLE_MEMORY_OUT=out, PYTHONPATH=os.pathsep.join(
        [str(hook), os.environ.get("PYTHONPATH", str(HERE.parent))]))
    if trace:
        os.environ["IDLE_MEMORY_TRACE"] = "1"
    try:
        server = bench.Server(kind).start()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    answers = 0

    def ask() -> object:
        nonlocal answers
        answers += 1
        assert server.process is not None
        server.process.send_signal(signal.SIGUSR2)
        path = Path(f"{out}.{answers}")
        deadline = time.monotonic() + 120
        while not path.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{kind} did not answer SIGUSR2")
            time.sleep(0.05)
        return tracemalloc.Snapshot.load(str(path)) if trace else json.loads(path.read_text())

    sockets: list[socket.socket] = []

    def open_idle(upto: int) -> None:
        for i in range(len(sockets), upto):  # many source addresses, as many clients would be
            port = server.pop3_port if protocol == "pop3" else server.smtp_port
            sockets.append(socket.create_connection(("127.0.0.1", port),
                                                    source_address=(f"127.0.{1 + i // 250}.{1 + i % 250}", 0)))

    try:
        time.sleep(0.5)
        open_idle(count // 5)
        for s in sockets:
            s.recv(256)  # every greeting arrived: the sessions are made and idle
        time.sleep(1)
        first = ask()
        start = len(sockets)
        open_idle(count)
        for s in sockets[start:]:
            s.recv(256)
        time.sleep(1)
        second = ask()
    finally:
        for s in sockets:
            s.close()
        server.stop()
    added = count - count // 5
    if trace:
        assert isinstance(first, tracemalloc.Snapshot) and isinstance(second, tracemalloc.Snapshot)
        stats = second.compare_to(first, "lineno")
        print(json.dumps({"server": kind, "protocol": protocol, "connections": added,
                          "tracemalloc_bytes_per_connection": round(sum(s.size_diff for s in stats) / added)}))
        for stat in stats[:20]:
            print(f"  {stat.size_diff / added:7.1f} B {stat.count_diff / added:5.2f} blocks  {stat.traceback[0]}")
        return
    assert isinstance(first, dict) and isinstance(second, dict)
    print(json.dumps({"server": kind, "protocol": protocol, "connections": added,
                      "rss_bytes_per_connection": round((second["rss_kib"] - first["rss_kib"]) * 1024 / added),
                      "blocks_per_connection": round((second["blocks"] - first["blocks"]) / added, 2),
                      "gc_objects_per_connection": round((second["objects"] - first["objects"]) / added, 2)}),
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", nargs="+", default=["ours", "twisted"])
    parser.add_argument("--connections", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--tracemalloc", type=int, metavar="N", help="instead: where N connections' bytes go")
    parser.add_argument("--protocol", choices=("smtp", "pop3"), default="smtp", help="idle connections of this kind")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    for _ in range(args.rounds):
        for kind in args.servers:
            measure(kind, args.tracemalloc or args.connections, trace=bool(args.tracemalloc), protocol=args.protocol)


if __name__ == "__main__":
    main()
