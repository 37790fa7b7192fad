"""Outbound queue at scale (issue 15): does new mail wait for a deferred backlog?

Not a test and never run by CI. For each backlog size it writes that many
deferred messages straight into the spool (for a destination that is down:
a transport to a loopback port where nothing listens; next attempt in two
hours, so none falls due during the run), starts the real ``twistd -n
mailappliance`` and measures:

- start: seconds from launch to "mailappliance ready" (the start-up scan);
- latency: seconds from the 250 after DATA (a submission over implicit TLS)
  to the message's arrival at a reachable receiver on loopback; median and
  range over ``--messages``;
- idle CPU: the daemon's CPU seconds (user + system, all threads) per
  minute, over ``--idle`` seconds with the backlog waiting and nothing new
  (with ``--due 0`` the backlog is due: the runner works through it);
- RSS of the daemon at the end;
- with ``--strace``: the daemon's system calls per fresh message (strace -f -c
  over the fresh messages: SMTP, commit and queue together; deterministic
  enough to compare on a busy machine).

With ``--baseline DIR`` (a copy of an older tree, e.g. ``git archive
<commit> mailappliance twisted | tar -x -C DIR``) the same is done for that
code, alternating A B A B; the backlog is written in the layout each code
uses (flat ``queue/<id>.json`` when its spool.py has no ``deferred_dir``).

    .venv/bin/python bench/queue_backlog.py --sizes 0 10000 100000
    .venv/bin/python bench/queue_backlog.py --baseline /tmp/old --sizes 0 10000 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import smtplib
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tests.daemon import Appliance, free_port  # noqa: E402
from tests.remote import SMTPReceiver  # noqa: E402

MESSAGE = b"From: alice@example.org\r\nTo: friend@reach.example\r\nSubject: fresh\r\n\r\n" + (b"x" * 78 + b"\r\n") * 125
OLD = b"From: alice@example.org\r\nSubject: old\r\n\r\n" + (b"y" * 78 + b"\r\n") * 125


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and all its threads, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def write_backlog(spool_dir: Path, count: int, new_layout: bool, due: float) -> None:
    """``count`` deferred messages to down.example, written directly (no fsync: a fixture)."""
    queue = spool_dir / "queue"
    for sub in ("", "incoming", "active", "deferred", "data", "corrupt") if new_layout else ("",):
        (queue / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
    made: set[tuple[str, str]] = set()
    for n in range(count):
        queue_id = f"{int(time.time()) - 3600}.M{n}P1Q1.backlog"
        envelope = {"queue_id": queue_id, "sender": "alice@example.org", "authenticated_as": "alice",
                    "recipients": [{"address": f"user{n}@down.example", "attempts": 3, "last_code": 451,
                                    "last_text": "4.4.1 connection refused"}],
                    "received_at": time.time() - 3600, "next_attempt": due, "attempts": 3}
        if new_layout:
            hh = f"{zlib.crc32(queue_id.encode()) & 0xFF:02x}"
            for top in ("deferred", "data"):
                if (top, hh) not in made:
                    (queue / top / hh).mkdir(mode=0o700, exist_ok=True)
                    made.add((top, hh))
            json_path, eml_path = queue / "deferred" / hh / f"{queue_id}.json", queue / "data" / hh / f"{queue_id}.eml"
        else:
            json_path, eml_path = queue / f"{queue_id}.json", queue / f"{queue_id}.eml"
        eml_path.write_bytes(OLD)
        json_path.write_text(json.dumps(envelope))
        if new_layout:
            os.utime(json_path, (due, due))


def one_point(code: Path, size: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    new_layout = "deferred_dir" in (code / "mailappliance" / "queue" / "spool.py").read_text()
    root = Path(tempfile.mkdtemp(prefix="qb-", dir=work))
    sink_port, dead_port = free_port(), free_port()
    receiver = SMTPReceiver("127.0.0.1", sink_port, None)
    sections: dict[str, dict[str, Any]] = {
        "server": {"hostname": "mx.bench.example", "local_domains": ["example.org"]},
        "storage": {"maildir_root": str(root / "mail"), "spool_dir": str(root / "spool")},
        "directory": {"backend": "ldif", "ldif_file": str(root / "users.ldif")},
        "tls": {"certificate": str(root / "tls" / "server.pem"), "private_key": str(root / "tls" / "server.key")},
        "queue": {"resolver": f"127.0.0.1:{free_port()}", "retry_schedule": [7200]},
        "queue.transports": {'"reach.example"': f"[127.0.0.1]:{sink_port}",
                             '"down.example"': f"[127.0.0.1]:{dead_port}"},
    }
    listeners = [{"name": role, "role": role, "address": "127.0.0.1", "port": free_port()}
                 for role in ("mx", "submissions")]
    os.environ["PYTHONPATH"] = str(code)
    instance = Appliance(root, sections, listeners)
    try:
        assert instance.admin("user", "add", "alice@example.org", password="alice-password").returncode == 0
        started = time.time()
        write_backlog(root / "spool", size, new_layout, due=time.time() + args.due)
        written = time.time() - started
        launched = time.monotonic()
        instance.start(timeout=600)
        start_seconds = time.monotonic() - launched
        assert instance.process is not None
        time.sleep(2)  # the first scan (old code) and the start-up work settle
        latencies = []
        context = instance.client_context()
        tracer = None
        if args.strace:  # system calls of the daemon (all threads) while the fresh messages go through
            trace_file = root / "strace.txt"
            tracer = subprocess.Popen(["strace", "-f", "-c", "-o", str(trace_file), "-p", str(instance.process.pid)],
                                      stderr=subprocess.DEVNULL)
            time.sleep(1)  # attached
        for _ in range(args.messages):
            before = len(receiver.messages)
            with smtplib.SMTP_SSL("127.0.0.1", instance.ports["submissions"], timeout=60, context=context) as smtp:
                smtp.login("alice", "alice-password")
                smtp.sendmail("alice@example.org", ["friend@reach.example"], MESSAGE)
                accepted = time.monotonic()
            deadline = accepted + args.timeout
            while len(receiver.messages) <= before and time.monotonic() < deadline:
                time.sleep(0.002)
            latencies.append(time.monotonic() - accepted if len(receiver.messages) > before else float("inf"))
        syscalls = None
        if tracer is not None:
            time.sleep(0.5)  # the round's last writes
            tracer.send_signal(signal.SIGINT)
            tracer.wait(30)
            total = [line.split() for line in trace_file.read_text().splitlines() if line.rstrip().endswith("total")]
            syscalls = round(int(total[0][3]) / args.messages) if total else None
        cpu_before, t0 = cpu_seconds(instance.process.pid), time.monotonic()
        time.sleep(args.idle)
        cpu = (cpu_seconds(instance.process.pid) - cpu_before) / (time.monotonic() - t0) * 60
        rss = int(next(line.split()[1] for line in Path(f"/proc/{instance.process.pid}/status").read_text()
                       .splitlines() if line.startswith("VmRSS:")))
        return {"size": size, "code": str(code), "write_s": round(written, 1), "start_s": round(start_seconds, 2),
                "latency_s": [round(x, 3) for x in latencies], "idle_cpu_s_per_min": round(cpu, 3),
                "rss_mib": round(rss / 1024, 1), "syscalls_per_message": syscalls}
    finally:
        instance.stop()
        receiver.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[0, 10_000, 100_000], help="backlog sizes")
    parser.add_argument("--messages", type=int, default=5, help="fresh messages per point")
    parser.add_argument("--due", type=float, default=7200,
                        help="the backlog's next attempt, seconds from now (0: all due at start, "
                             "the runner works through it while fresh mail is measured)")
    parser.add_argument("--idle", type=float, default=30, help="seconds of idle CPU measured per point")
    parser.add_argument("--rounds", type=int, default=1, help="A B rounds per size")
    parser.add_argument("--timeout", type=float, default=120, help="give up on a fresh message after this")
    parser.add_argument("--baseline", type=Path, help="an older tree to compare with (A); B is this checkout")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()), help="where spools are made")
    parser.add_argument("--json", type=Path, help="write the results there too")
    parser.add_argument("--keep", action="store_true", help="keep each run's directory")
    parser.add_argument("--strace", action="store_true",
                        help="count the daemon's system calls (strace -f -c) per fresh message, whole daemon")
    args = parser.parse_args()
    codes = ([args.baseline.resolve()] if args.baseline else []) + [HERE.parent]
    results = []
    for size in args.sizes:
        for _ in range(args.rounds):
            for code in codes:
                point = one_point(code, size, args, args.work)
                results.append(point)
                print(json.dumps(point), flush=True)
    print(f"\n{'code':<10} {'backlog':>8} {'start s':>8} {'latency median s (range)':>28} {'CPU s/min':>15} "
          f"{'RSS MiB':>8}" + (f" {'syscalls/msg':>9}" if args.strace else ""))
    for code in codes:
        label = "baseline" if args.baseline and code == codes[0] else "this"
        for size in args.sizes:
            points = [p for p in results if p["code"] == str(code) and p["size"] == size]
            latencies = [x for p in points for x in p["latency_s"]]
            cpus = [p["idle_cpu_s_per_min"] for p in points]
            starts = [p["start_s"] for p in points]
            print(f"{label:<10} {size:>8} {statistics.median(starts):>8.2f} "
                  f"{statistics.median(latencies):>10.3f} ({min(latencies):.3f}-{max(latencies):.3f})"
                  f"{'':>6} {statistics.median(cpus):>10.3f} ({min(cpus):.2f}-{max(cpus):.2f})"
                  f" {statistics.median(p['rss_mib'] for p in points):>8.1f}"
                  + (f" {statistics.median(p['syscalls_per_message'] or 0 for p in points):>9}" if args.strace else ""))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
