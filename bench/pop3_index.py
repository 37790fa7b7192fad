"""POP3 on a big mailbox, ours against Dovecot, A B A B (issue 15).

    .venv/bin/python bench/pop3_index.py                         # 20,000 messages, 5 rounds
    .venv/bin/python bench/pop3_index.py --messages 20000 --rounds 3 --servers ours postfix
    .venv/bin/python bench/pop3_index.py --retr 2000             # also RETR throughput, 10 KB messages
    .venv/bin/python bench/pop3_index.py --code /tmp/old-checkout --servers ours ours@old

Scenarios (each server in its own temp dir, started by bench/run.py's Server;
``postfix`` is bench/peers/postfix_dovecot.py, whose Dovecot serves POP3):

- **cold login+STAT**: the mailbox's ``--messages`` files (1 KB each) are all
  in ``new/`` and no index exists (ours: ``mailappliance.index``; Dovecot:
  ``dovecot.index*``, ``dovecot-uidlist``); time from connect to the STAT
  answer.  The messages are written straight into ``new/`` (as a delivery
  leaves them) and put back there before every cold round.
- **warm login+STAT**: the same again with nothing changed since the last
  login: the case of a phone that polls every few minutes.  Median of
  ``--warm`` logins per round.  **warm login+STAT+UIDL**: the same with the
  full UIDL listing a client that leaves mail on the server asks for.
- **RETR** (``--retr N``): N messages of 10 KB; one client with a raw socket
  (no per-line client work, so the server is what is measured) sends RETR 1..N
  one at a time, ``--passes`` times; messages per second and server CPU
  milliseconds per RETR (ours: the daemon; Dovecot: its master and every
  child, pop3 included; nanoseconds from /proc/PID/task/TID/schedstat).

The password check is excluded: ours caches a good login (a login before the
rounds warms the cache, every timed login hits it) and Dovecot's peer runs
here with a plain-text password (``--password-scheme plain``), because
Dovecot checks an Argon2id hash again at every login, its auth cache
included (~80-100 ms each on this machine).  bench/run.py pop3 measures the
first login with the same Argon2id hash for both.
Figures are medians over rounds with their range; ratios are peer / ours
for times (above 1: we are faster) and ours / peer for rates.

``ours@NAME`` with ``--code DIR``: ours run from another checkout's
``mailappliance`` package (PYTHONPATH=DIR), to measure a change A B.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402  (bench/run.py: Server, alternate, tree_cpu_seconds)

Raw = bench.RawPop3  # reads whole answers with big recv calls


def maildir(server: bench.Server) -> Path:
    return server.root / "mail" / "alice"


def owner(server: bench.Server) -> tuple[int, int]:
    if server.kind == "postfix":
        user = pwd.getpwnam("nobody")
        return user.pw_uid, user.pw_gid
    return os.geteuid(), os.getegid()


def fill(server: bench.Server, count: int, size: int) -> None:
    """``count`` messages of ``size`` octets written into new/ as a delivery leaves them."""
    new = maildir(server) / "new"
    for sub in ("tmp", "new", "cur"):
        (maildir(server) / sub).mkdir(parents=True, exist_ok=True)
    uid, gid = owner(server)
    line = b"x" * 76 + b"\r\n"
    body = b"From: bench@example.net\r\nTo: alice@example.org\r\nSubject: %d\r\n\r\n"
    for n in range(count):
        data = body % n
        data += line * max(0, (size - len(data)) // len(line))
        path = new / f"{1_700_000_000 + n}.M{n}P1Q{n}.bench,S={len(data)}"
        path.write_bytes(data)
        os.utime(path, ns=(1_700_000_000_000_000_000 + n * 1000, 1_700_000_000_000_000_000 + n * 1000))
        os.chown(path, uid, gid)


def make_cold(server: bench.Server) -> None:
    """Every message back into new/ under its delivery name, and no index."""
    box = maildir(server)
    for name in os.listdir(box / "cur"):
        os.rename(box / "cur" / name, box / "new" / name.split(":", 1)[0])
    for name in os.listdir(box):
        if name.startswith(("mailappliance.index", "dovecot.index", "dovecot-uidlist", "dovecot.list")):
            os.unlink(box / name)


def server_cpu(server: bench.Server) -> float:
    """CPU seconds of the server's live threads (exact, from schedstat; Dovecot: its master's
    and Postfix's trees): a difference over the RETRs, whose processes all stay."""
    return sum(server.cpu_ns().values()) / 1e9


def login_stat(server: bench.Server, expected: int, uidl: bool = False) -> float:
    started = time.perf_counter()
    client = Raw(server.pop3_port)
    count = client.login_stat()
    if uidl and client.multiline(b"UIDL").count(b"\r\n") != expected + 1:
        raise RuntimeError(f"{server.kind}: UIDL did not list {expected} messages")
    seconds = time.perf_counter() - started
    client.close()
    if count != expected:
        raise RuntimeError(f"{server.kind}: STAT says {count} messages, {expected} expected")
    return seconds


def start(kind: str, code: Path | None) -> bench.Server:
    saved = os.environ.get("PYTHONPATH")
    variant = kind.partition("@")[2]
    os.environ["PYTHONPATH"] = str(code) if variant and code else str(HERE.parent)
    try:
        server = bench.Server(kind.partition("@")[0])
        server.kind = kind.partition("@")[0]
        server.password_scheme = "plain"  # see the module docstring
        return server.start()
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def wait_pop3(server: bench.Server) -> None:
    bench.wait_for_port(server.pop3_port)
    client = Raw(server.pop3_port)  # warms our credential cache (see the module docstring)
    client.login_stat()
    client.close()


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", nargs="+", default=["ours", "postfix"])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warm", type=int, default=5, help="warm logins per round")
    parser.add_argument("--retr", type=int, default=0, help="also RETR this many 10 KB messages")
    parser.add_argument("--passes", type=int, default=3, help="RETR every message this many times per round")
    parser.add_argument("--code", type=Path, help="checkout whose mailappliance ours@NAME runs")
    args = parser.parse_args()
    results: dict[str, dict[str, list[float]]] = {kind: {} for kind in args.servers}
    servers = {kind: start(kind, args.code) for kind in args.servers}
    retr_servers: dict[str, bench.Server] = {}
    try:
        for server in servers.values():
            wait_pop3(server)
            fill(server, args.messages, 1024)
        for kind in bench.alternate(args.servers, args.rounds):
            server = servers[kind]
            make_cold(server)
            record = results[kind]
            record.setdefault("cold login+STAT ms", []).append(login_stat(server, args.messages) * 1000)
            warm = [login_stat(server, args.messages) * 1000 for _ in range(args.warm)]
            record.setdefault("warm login+STAT ms", []).append(statistics.median(warm))
            uidl = [login_stat(server, args.messages, uidl=True) * 1000 for _ in range(args.warm)]
            record.setdefault("warm login+STAT+UIDL ms", []).append(statistics.median(uidl))
            print(json.dumps({"server": kind, "cold_ms": round(record["cold login+STAT ms"][-1], 1),
                              "warm_ms": round(record["warm login+STAT ms"][-1], 1),
                              "warm_uidl_ms": round(record["warm login+STAT+UIDL ms"][-1], 1)}), flush=True)
        for server in servers.values():
            server.stop()
        servers = {}
        if args.retr:
            retr_servers = {kind: start(kind, args.code) for kind in args.servers}
            for server in retr_servers.values():
                wait_pop3(server)
                fill(server, args.retr, 10240)
                wait_pop3(server)  # the move into cur/ and the index are not what is timed
            for kind in bench.alternate(args.servers, args.rounds):
                server = retr_servers[kind]
                client = Raw(server.pop3_port)
                count = client.login_stat()
                cpu, started = server_cpu(server), time.perf_counter()
                for _ in range(args.passes):
                    for n in range(1, count + 1):
                        client.multiline(b"RETR %d" % n)
                seconds, cpu = time.perf_counter() - started, server_cpu(server) - cpu
                client.close()
                retrs = count * args.passes
                record = results[kind]
                record.setdefault("RETR messages/s", []).append(retrs / seconds)
                record.setdefault("server CPU ms/RETR", []).append(cpu * 1000 / retrs)
                print(json.dumps({"server": kind, "retr_per_second": round(retrs / seconds),
                                  "cpu_ms_per_retr": round(cpu * 1000 / retrs, 4)}), flush=True)
    finally:
        for server in (*servers.values(), *retr_servers.values()):
            server.stop()
        bench.remove_finished_roots()
    ours = args.servers[0]
    print(f"\n| measure | server | median | range | {ours} vs peer |")
    print("|---|---|---|---|---|")
    for measure in results[ours]:
        for kind in args.servers:
            values = summary(results[kind][measure])
            mine = statistics.median(results[ours][measure])
            higher_better = "/s" in measure
            ratio = "" if kind == ours or not mine or not values["median"] else \
                f"{(mine / values['median'] if higher_better else values['median'] / mine):.2f}x"
            print(f"| {measure} | {kind} | {values['median']:,.3f} | {values['min']:,.3f}-{values['max']:,.3f} "
                  f"| {ratio} |")


if __name__ == "__main__":
    main()
