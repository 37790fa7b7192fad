"""Issue 15's benchmark matrix: every scenario against every peer in one command.

    .venv/bin/python bench/run.py matrix --quick --out /tmp/matrix.json     # a few minutes
    .venv/bin/python bench/run.py matrix --out /tmp/matrix.json             # the full counts
    .venv/bin/python bench/run.py matrix --ours ours 'ours@storage.sync="fsync"' --quick
    .venv/bin/python bench/run.py matrix --only inbound --peers twisted --rounds 4

Each scenario runs its servers in turn, round after round (A B C A B C), each
on a fresh server and storage (bench/run.py's Server). Printed: one JSON
line per run, then "scenario | ours | peer | ratio | target | met?" with
medians and [min-max] ranges and CPU milliseconds per message of the server
(every thread and process) and of the load generator; then the durability
audit of every SMTP run (each 250 the generator saw must be a whole file in
the Maildir: see ``audit``), the crash round (kill -9 mid-run, start again,
count), and the JSON lines of the scenarios other files measure
(bench/pop3_index.py, bench/queue_backlog.py: run when present).
``--out FILE`` writes all of it as one JSON document.

Targets are issue 15's: >= 1.3x Twisted (inbound, submission), >= 1.3x
Dovecot (POP3 RETR), >= 1.3x Postfix at 1 MB, >= 2x aiosmtpd and Postfix at
10 KB (kept), <= 1.8 KiB per idle connection; POP3 >= 2x Twisted is issue 7's.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import importlib.util
import json
import os
import poplib
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from run import FSYNC, HERE, Server, idle_round, load, pop3_round, raise_file_limit, remove_finished_roots, tree_pids
from smtp_load import make_message

PEERS = ("twisted", "aiosmtpd", "postfix")
HOOKS = (("pop3 index (large mailbox login)", "pop3_index.py"), ("queue backlog (100k deferred)", "queue_backlog.py"))
# the quick mode's arguments for a hook without --quick, used when its --help names every option
QUICK_HOOK_ARGS = {"pop3_index.py": ["--messages", "2000", "--rounds", "2"],
                   "queue_backlog.py": ["--sizes", "0", "10000", "--messages", "5", "--idle", "10"]}
HOOK_KEYS = ("scenario", "server", "code", "size", "messages")  # what names a group of a hook's lines
SUBJECT = re.compile(rb"^Subject: bench (\S+)$", re.M)


@dataclasses.dataclass(frozen=True)
class Target:
    """What ours must reach against one peer: ours / peer >= ``ratio`` (None: measured, no target)."""

    peer: str
    ratio: float | None = None


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # inbound | submission | submission-implicit | pop3 | idle
    count: int  # messages (idle: connections)
    targets: tuple[Target, ...]
    size: int = 10240
    concurrency: int = 1
    generator: str = "asyncio"  # "smtp-source" (inbound) and "c" (bench/smtp_load.c): no audit, they send no tokens

    @property
    def metric(self) -> str:
        return "kib_per_connection" if self.kind == "idle" else "messages_per_second"

    @property
    def metrics(self) -> tuple[str, ...]:
        """What the table compares: POP3 also apart, the first login (the Argon2id check, the
        same hash and cost for ours and Dovecot) and RETR after it."""
        return (self.metric, "login_ms", "retr_per_second") if self.kind == "pop3" else (self.metric,)


# per metric: the row's label, its unit, whether lower is better, its CPU fields (server, generator)
METRICS = {
    "messages_per_second": ("", "/s", False, ("server_cpu_ms_per_message", "generator_cpu_ms_per_message")),
    "kib_per_connection": ("", " KiB/conn", True, ()),
    "login_ms": (": first login (Argon2id)", " ms", True, ("login_server_cpu_ms",)),
    "retr_per_second": (": RETR after login", "/s", False, ("server_cpu_ms_per_retr",)),
}


def scenarios(quick: bool) -> list[Scenario]:
    """Issue 15's table. ``quick``: small counts and only the peers that have a target."""
    full = not quick
    twisted13, aiosmtpd2, postfix2 = Target("twisted", 1.3), Target("aiosmtpd", 2.0), Target("postfix", 2.0)
    rows = [Scenario(f"inbound 10 KB c={c}", "inbound", (400 if c == 1 else 900) if quick else 3000,
                     (twisted13, aiosmtpd2, postfix2), concurrency=c) for c in (1, 50, 100)]
    # the issue's own method: a C load generator, one command at a time (it costs the generator a
    # tenth of what the asyncio one does, so the servers get the cores); the rows above audit the 250s
    rows += [Scenario(f"inbound 10 KB c={c} (C generator smtp-source)", "inbound", 4000 if quick else 8000,
                      (twisted13, aiosmtpd2, postfix2), concurrency=c, generator="smtp-source") for c in (1, 50)]
    rows += [Scenario(f"inbound 1 MB c={c}", "inbound", 30 if quick else 200,
                      (Target("postfix", 1.3), *((Target("twisted"), Target("aiosmtpd")) if full else ())),
                      size=1048576, concurrency=c) for c in ((10,) if quick else (1, 10, 100))]
    rows += [Scenario(f"submission STARTTLS+PLAIN c={c}, 10/session", "submission", 400 if quick else 3000,
                      (twisted13, *((Target("aiosmtpd"), Target("postfix")) if full else ())), concurrency=c)
             for c in (10, 100)]
    rows += [Scenario(f"submission implicit TLS (Twisted: CRAM-MD5) c={c}, 10/session", "submission-implicit",
                      400 if quick else 3000, (twisted13,), concurrency=c) for c in ((10,) if quick else (10, 100))]
    # the same sessions from bench/smtp_load.c: its TLS costs the generator ~0.2 ms a message instead of
    # ~0.6-0.9, so the servers get the second core (the rows above audit the 250s)
    rows += [Scenario(f"submission {name} c=10, 10/session (C generator)", kind, 1000 if quick else 3000,
                      (twisted13,), concurrency=10, generator="c")
             for name, kind in (("STARTTLS+PLAIN", "submission"),
                                ("implicit TLS (Twisted: CRAM-MD5)", "submission-implicit"))]
    rows.append(Scenario(f"pop3 login+RETR {300 if quick else 1000} x 10 KB", "pop3", 300 if quick else 1000,
                         (Target("postfix", 1.3), Target("twisted", 2.0))))
    rows.append(Scenario(f"idle SMTP connections, {1000 if quick else 5000}", "idle", 1000 if quick else 5000,
                         (Target("twisted"),)))
    return rows


IDLE_TARGET_KIB = 1.8


def available_peers() -> tuple[dict[str, bool], list[str]]:
    """Which peers this machine can run, and a note for each one it cannot."""
    notes = []
    have = {"twisted": True, "aiosmtpd": importlib.util.find_spec("aiosmtpd") is not None,
            "postfix": bool(shutil.which("postfix") and shutil.which("dovecot") and os.geteuid() == 0)}
    if not have["aiosmtpd"]:
        notes.append("aiosmtpd skipped: not installed (./scripts/bench-setup)")
    if not have["postfix"]:
        notes.append("postfix skipped: needs root and postfix + dovecot-pop3d (./scripts/bench-setup --postfix)")
    return have, notes


def audit(maildir: Path, acked_log: Path, deleted: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Every message whose 250 the generator saw (its token in ``acked_log``) must be in
    ``maildir``'s new/ or cur/ exactly once and whole: the Subject with its token in the
    header, and the file ending with the blank line and the body exactly as sent (trace
    headers a server prepends, CRLF or LF line ends are allowed). Files that are not whole
    are counted as broken, copies of one token beyond the first as duplicates; whole files
    without a 250 (a crash between the fsync and the reply) are allowed and counted. Tokens in
    ``deleted`` (a POP3 DELE committed before a crash) must be gone: not one file."""
    acked = set(acked_log.read_text().split()) - deleted if acked_log.exists() else set()
    copies: collections.Counter[str] = collections.Counter()
    broken = 0
    for sub in ("new", "cur"):
        folder = maildir / sub
        for name in os.listdir(folder) if folder.is_dir() else ():
            data = (folder / name).read_bytes().replace(b"\r\n", b"\n")
            found = SUBJECT.search(data)
            if found is None:
                broken += 1
                continue
            token = found.group(1).decode()
            if _whole(data, token):
                copies[token] += 1
            else:
                broken += 1
    acked_whole = sum(1 for token in acked if copies[token])
    result = {"acked": len(acked), "whole_files": sum(copies.values()), "acked_whole": acked_whole,
              "acked_missing": len(acked) - acked_whole,
              "duplicates": sum(count - 1 for count in copies.values() if count > 1),
              "broken_files": broken, "whole_without_250": len(set(copies) - acked - deleted)}
    if deleted:
        result["deleted"], result["deleted_back"] = len(deleted), sum(1 for token in deleted if copies[token])
    result["ok"] = not (result["acked_missing"] or result["duplicates"] or result["broken_files"]
                        or result.get("deleted_back"))
    return result


_sizes: dict[str, int] = {}  # message size by token prefix (the run's tag)


def _whole(data: bytes, token: str) -> bool:
    """``data`` (LF line ends) ends with the body smtp_load.py sent for ``token``, and its
    header holds the token's Subject line."""
    size = _sizes.get(token.split("-", 1)[0])
    if size is None:
        return False
    sent = make_message(size, token).replace(b"\r\n", b"\n")
    header, _, body = sent.partition(b"\n\n")
    return data.endswith(b"\n\n" + body) and header.split(b"\n")[-1] in data.partition(b"\n\n")[0]


@contextlib.contextmanager
def counted_syscalls(server: Server, out: Path, into: dict[str, Any]) -> Iterator[None]:
    """``strace -c -f`` attached to every process of ``server`` (and the children they start)
    while the body runs; ``into`` gets the total of system calls and the five commonest."""
    command = ["strace", "-c", "-f", "-o", str(out)]
    for pid in (pid for top in server.top_pids() for pid in tree_pids(top)):  # worker processes too
        command += ["-p", str(pid)]
    tracer = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    assert tracer.stderr is not None
    line = tracer.stderr.readline()  # "strace: Process N attached" once it is in place
    if "attached" not in line:
        raise RuntimeError(f"strace could not attach: {line.strip()}")
    try:
        yield
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.communicate(timeout=60)
    calls: dict[str, int] = {}
    for row in out.read_text().splitlines():
        fields = row.split()
        if len(fields) >= 5 and fields[0].replace(".", "").isdigit() and fields[3].isdigit():
            calls[fields[-1]] = int(fields[3])
    into["syscalls"] = calls.pop("total", sum(calls.values()))
    into["top_syscalls"] = dict(sorted(calls.items(), key=lambda item: -item[1])[:5])


def syscall_run(scenario: Scenario, kind: str, work: Path, number: int) -> dict[str, Any]:
    """One more run with the server's system calls counted (strace slows it: no throughput
    kept): system calls per message, and the five commonest per message."""
    server = Server(kind).start()
    counted: dict[str, Any] = {}
    trace = work / f"strace-{number}.txt"
    try:
        if scenario.kind == "pop3":
            messages = pop3_round(server, scenario.count, scenario.size,
                                  around=lambda: counted_syscalls(server, trace, counted))["messages"]
        else:
            with counted_syscalls(server, trace, counted):
                messages = load_scenario(server, scenario)["messages"]
    finally:
        server.stop()
    return {"syscalls_per_message": round(counted["syscalls"] / messages, 1),
            "top_syscalls_per_message": {name: round(n / messages, 2) for name, n in counted["top_syscalls"].items()}}


def load_scenario(server: Server, scenario: Scenario, acked_log: Path | None = None) -> dict[str, Any]:
    """One SMTP load of ``scenario`` (inbound: a message a session; submission: 10 a session),
    with sessions per second for submission."""
    submission = scenario.kind != "inbound"
    result = load(server, scenario.count, scenario.concurrency, scenario.size, generator=scenario.generator,
                  per_session=10 if submission else 0, implicit_tls=scenario.kind == "submission-implicit",
                  acked_log=acked_log)
    if submission:
        result["sessions_per_second"] = round(result["sessions"] / result["seconds"], 1)
    return result


def run_once(scenario: Scenario, kind: str, work: Path, number: int) -> dict[str, Any]:
    """One fresh server, one measurement; SMTP runs are audited (``audit``)."""
    server = Server(kind).start()
    try:
        if scenario.generator in ("smtp-source", "c"):
            result = load_scenario(server, scenario)
        elif scenario.kind in ("inbound", "submission", "submission-implicit"):
            tag = f"r{number}"  # the tokens' prefix: which run, and so which size (``_whole``)
            _sizes[tag] = scenario.size
            acked_log = fresh(work / f"{tag}.acked")
            result = load_scenario(server, scenario, acked_log)
            result["durability"] = audit(server.root / "mail" / "alice", acked_log)
        elif scenario.kind == "pop3":
            result = pop3_round(server, scenario.count, scenario.size)
        else:
            result = idle_round(server, scenario.count)
    finally:
        server.stop()
    return result


def fresh(acked_log: Path) -> Path:
    """``acked_log``, emptied: the generator appends to it, and a round run again with the same
    number (a script calling these functions itself) would audit the earlier round's 250s too,
    which this round's Maildir never held."""
    acked_log.unlink(missing_ok=True)
    return acked_log


def crash_round(kind: str, work: Path, messages: int, number: int, at: float = 0.25) -> dict[str, Any]:
    """kill -9 ``kind`` mid-run (when ``at`` of the messages are in new/), start ours again on
    the same storage (its recovery runs at start: wait until it serves, Server.restart_ours),
    then audit: every 250 the generator saw must be whole on disk, once."""
    server = Server(kind)
    ours = server.kind == "ours"
    server.start()
    tag = f"crash{number}"
    _sizes[tag] = 10240
    acked_log = fresh(work / f"{tag}.acked")
    generator = subprocess.Popen(
        [sys.executable, str(HERE / "smtp_load.py"), "--port", str(server.smtp_port), "--messages", str(messages),
         "--concurrency", "50", "--size", "10240", "--processes", "2", "--acked-log", str(acked_log),
         "--tag", acked_log.stem, "--keep-going"], stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while server.delivered() < messages * at and generator.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        mid_run = generator.poll() is None
        in_new_at_kill = server.delivered()
        server.kill()
        output, _ = generator.communicate(timeout=300)
        restarted = False
        if ours:
            server.restart_ours()
            restarted = True
        result = audit(server.root / "mail" / "alice", acked_log)  # recovery is over: no second look
    finally:
        if generator.poll() is None:
            generator.kill()
        server.stop()
    generated = json.loads(output.strip().splitlines()[-1]) if output.strip() else {}
    return {"scenario": f"crash: kill -9 at {at:.0%} of {messages:,}, 10 KB c=50", "server": kind,
            "killed_mid_run": mid_run,
            "in_new_at_kill": in_new_at_kill, "restarted_and_ready": restarted,
            "generator_acked": generated.get("acked"), **result}


def pop3_crash_round(kind: str, work: Path, messages: int, number: int) -> dict[str, Any]:
    """A POP3 DELE must survive a crash, and no message may come back or show twice: deliver
    ``messages``, DELE the first half over POP3 and QUIT, kill -9 ours at the +OK (every
    process of it gone), start it again until it serves (its recovery over), then audit the
    Maildir (the deleted gone, the rest whole once) and log in again: STAT counts the rest,
    UIDLs are unique and none deleted."""
    server = Server(kind)
    server.start()
    tag = f"popcrash{number}"
    _sizes[tag] = 10240
    acked_log = fresh(work / f"{tag}.acked")
    try:
        load(server, messages, 10, 10240, acked_log=acked_log)
        client = poplib.POP3("127.0.0.1", server.pop3_port, timeout=60)
        client.user("alice")
        client.pass_("alice-password")
        count, _ = client.stat()
        uidls = {int(n): uid for n, uid in (line.split() for line in client.uidl()[1])}
        deleted, deleted_uidls = set(), set()
        for n in range(1, count // 2 + 1):
            found = SUBJECT.search(b"\n".join(client.top(n, 0)[1]))
            if found:
                deleted.add(found.group(1).decode())
            deleted_uidls.add(uidls[n])
            client.dele(n)
        client.quit()  # +OK: the deletions are committed
        server.kill()
        server.restart_ours()
        result = audit(server.root / "mail" / "alice", acked_log, frozenset(deleted))
        client = poplib.POP3("127.0.0.1", server.pop3_port, timeout=60)
        client.user("alice")
        client.pass_("alice-password")
        after, _ = client.stat()
        after_uidls = [line.split()[1] for line in client.uidl()[1]]
        client.quit()
    finally:
        server.stop()
    result.update(pop3_count_before=count, pop3_deleted=len(deleted_uidls), pop3_count_after=after,
                  pop3_uidls_repeated=len(after_uidls) - len(set(after_uidls)),
                  pop3_deleted_uidls_back=len(deleted_uidls & set(after_uidls)))
    result["ok"] = bool(result["ok"] and after == count - len(deleted_uidls) and not result["pop3_uidls_repeated"]
                        and not result["pop3_deleted_uidls_back"])
    return {"scenario": f"crash: kill -9 after a POP3 QUIT that deleted {len(deleted_uidls)} of {count}",
            "server": kind, "killed_mid_run": True, "in_new_at_kill": None, "restarted_and_ready": True, **result}


def run_hook(name: str, script: str, quick: bool, given: list[str] | None = None) -> tuple[list[dict[str, Any]], str]:
    """Another file's scenario, as a subprocess: its JSON lines, and a note. Its arguments:
    ``given`` (--hook-args), else in quick mode ``--quick`` or QUICK_HOOK_ARGS if it has
    those options (else it is skipped), else none."""
    path = HERE / script
    if not path.exists():
        return [], f"{name}: bench/{script} absent, skipped"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))}
    helptext = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, env=env,
                              timeout=60).stdout
    arguments = list(given or [])
    if quick and given is None:
        fallback = QUICK_HOOK_ARGS.get(script, [])
        if "--quick" in helptext:
            arguments.append("--quick")
        elif fallback and all(a in helptext for a in fallback if a.startswith("--")):
            arguments += fallback
        else:
            return [], f"{name}: bench/{script} has no --quick, skipped in quick mode (runs in the full matrix)"
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, str(path), *arguments], capture_output=True, text=True, env=env,
                              timeout=3600)
    except subprocess.TimeoutExpired:
        return [], f"{name}: bench/{script} ran over an hour, stopped"
    lines = []
    for line in done.stdout.splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            lines.append({"hook": script, **value})
    status = "ok" if done.returncode == 0 else f"exit {done.returncode}: {done.stderr.strip()[-300:]}"
    return lines, f"{name}: bench/{script} {' '.join(arguments)} {status}, {len(lines)} JSON lines, " \
                  f"{time.perf_counter() - started:.0f} s"


def summarise_hooks(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians and ranges of every number in the hooks' lines, grouped by their naming fields
    (HOOK_KEYS); lists of numbers (e.g. queue latencies) are pooled. Issue 15's targets where
    the fields are known: queue_backlog.py's latency_s < 1 s; pop3_index.py's warm login of
    ours against Dovecot's (ratio Dovecot / ours, >= 1.3x like POP3 RETR)."""
    groups: dict[tuple[Any, ...], dict[str, list[float]]] = {}
    for line in lines:
        group = (line["hook"], *((k, line[k]) for k in HOOK_KEYS if k in line))
        fields = groups.setdefault(group, {})
        for key, value in line.items():
            values = value if isinstance(value, list) else [value]
            if key not in HOOK_KEYS and values and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                      for v in values):
                fields.setdefault(key, []).extend(values)
    summary = []
    for (hook, *names), fields in groups.items():
        label = ", ".join(f"{k}={Path(str(v)).name if k == 'code' else v}" for k, v in names)
        for key, values in fields.items():
            row: dict[str, Any] = {"hook": hook, "group": label, "field": key, "median": statistics.median(values),
                                   "range": [min(values), max(values)]}
            if hook == "queue_backlog.py" and key == "latency_s":
                row["target"], row["met"] = "< 1 s", row["median"] < 1
            summary.append(row)
    warm = {r["group"]: r["median"] for r in summary if r["hook"] == "pop3_index.py" and r["field"] == "warm_ms"}
    ours = [v for g, v in warm.items() if g.startswith("server=ours")]
    if ours and "server=postfix" in warm:
        ratio = warm["server=postfix"] / ours[0] if ours[0] else None
        summary.append({"hook": "pop3_index.py", "group": "ours vs Dovecot", "field": "warm login ratio",
                        "median": ratio, "range": [], "target": ">= 1.3x",
                        "met": None if ratio is None else ratio >= 1.3})
    return summary


def print_hooks(summary: list[dict[str, Any]]) -> None:
    print("\n| other scenario | group | field | median [min-max] | target | met? |")
    print("|---|---|---|---|---|---|")
    for row in summary:
        value = "-" if row["median"] is None else f"{row['median']:,.3f}"
        if row["range"]:
            value += f" [{row['range'][0]:,.3f}-{row['range'][1]:,.3f}]"
        met = {True: "yes", False: "**no**", None: "-"}[row.get("met")]
        print(f"| {row['hook']} | {row['group']} | {row['field']} | {value} | {row.get('target', '-')} | {met} |")


def spread(median: float, values: list[float], decimals: int = 0) -> str:
    """median [min-max]"""
    form = f"{{:,.{decimals}f}}"
    return f"{form.format(median)} [{form.format(min(values))}-{form.format(max(values))}]"


def summarise(scenario: Scenario, ours: str, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The table rows of one scenario for one variant of ours: against each peer measured."""
    def of(server: str, key: str) -> list[float]:
        return [r[key] for r in runs if r["scenario"] == scenario.name and r["server"] == server and key in r]

    def cpu(server: str, fields: tuple[str, ...]) -> dict[str, float]:
        """Median CPU ms of the server and of the generator: per message, per RETR or per login."""
        values = {field.partition("_")[0]: of(server, field) for field in fields}
        return {part: statistics.median(v) for part, v in values.items() if v}

    rows = []
    for metric in scenario.metrics:
        label, _, lower_better, cpu_fields = METRICS[metric]
        mine = of(ours, metric)
        for target in scenario.targets:
            theirs = of(target.peer, metric)
            if not mine or not theirs:
                continue
            rows.append(_row(scenario, ours, target, metric, mine, theirs, label, lower_better,
                             {who: cpu(server, cpu_fields) for who, server in (("ours", ours), ("peer", target.peer))},
                             {who: v[0] for who, server in (("ours", ours), ("peer", target.peer))
                              if metric == scenario.metric and (v := of(server, "syscalls_per_message"))}))
    return rows


def _row(scenario: Scenario, ours: str, target: Target, metric: str, mine: list[float], theirs: list[float],
         label: str, lower_better: bool, cpu: dict[str, dict[str, float]],
         syscalls: dict[str, float]) -> dict[str, Any]:
    """One table row: ours against one peer on one metric (the ratio: above 1, ours is better).
    The POP3 login row has no target: it measures the two Argon2id implementations."""
    a, b = statistics.median(mine), statistics.median(theirs)
    if scenario.kind == "idle":  # memory: lower is better, so the ratio is peer / ours
        ratio = b / a if a > 0 else None
        wanted, met = f"<= {IDLE_TARGET_KIB} KiB", a <= IDLE_TARGET_KIB
    else:
        ratio = (b / a if a > 0 else None) if lower_better else (a / b if b > 0 else None)
        goal = None if metric == "login_ms" else target.ratio
        wanted = f">= {goal}x" if goal else "-"
        met = None if goal is None or ratio is None else ratio >= goal
    return {
        "scenario": scenario.name + label, "ours": ours, "peer": target.peer, "metric": metric,
        "ours_median": a, "ours_range": [min(mine), max(mine)], "peer_median": b,
        "peer_range": [min(theirs), max(theirs)], "ratio": None if ratio is None else round(ratio, 3),
        "target": wanted, "met": met, "peer_fsyncs": FSYNC[target.peer],
        "cpu_ms_per_message": cpu, "syscalls_per_message": syscalls,
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    print("\n| scenario | ours | peer | ratio | target | met? | CPU ms/msg ours (server / generator) | "
          "CPU ms/msg peer | syscalls/msg ours / peer |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:  # CPU: per message; the POP3 login row: per login, the RETR row: per RETR
        decimals = 2 if row["metric"] == "kib_per_connection" else 0
        unit = METRICS[row["metric"]][1]
        ours = f"{row['ours']} {spread(row['ours_median'], row['ours_range'], decimals)}"
        peer = f"{row['peer']}{'' if row['peer_fsyncs'] else ' (no fsync)'} " \
               f"{spread(row['peer_median'], row['peer_range'], decimals)}"
        cpu = ["/".join(f"{v:.3f}" for v in row["cpu_ms_per_message"][who].values()) or "-"
               for who in ("ours", "peer")]
        met = {True: "yes", False: "**no**", None: "-"}[row["met"]]
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}x"
        calls = row["syscalls_per_message"]
        syscalls = f"{calls['ours']:,.1f} / {calls['peer']:,.1f}" if len(calls) == 2 else "-"
        print(f"| {row['scenario']} | {ours}{unit} | {peer}{unit} | {ratio} | {row['target']} | {met} | "
              f"{cpu[0]} | {cpu[1]} | {syscalls} |")


def print_durability(runs: list[dict[str, Any]], crashes: list[dict[str, Any]]) -> None:
    print("\n| durability: scenario | server | runs | 250s | whole files | 250s missing | duplicates | broken | ok? |")
    print("|---|---|---|---|---|---|---|---|---|")
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        if "durability" in r:
            groups.setdefault((r["scenario"], r["server"]), []).append(r["durability"])
    for (scenario, server), audits in groups.items():
        total = {key: sum(a[key] for a in audits) for key in
                 ("acked", "whole_files", "acked_missing", "duplicates", "broken_files")}
        ok = all(a["ok"] for a in audits)
        note = "" if FSYNC[server.partition("@")[0]] else " (no fsync: a crash could lose these)"
        print(f"| {scenario} | {server}{note} | {len(audits)} | {total['acked']} | {total['whole_files']} | "
              f"{total['acked_missing']} | {total['duplicates']} | {total['broken_files']} | "
              f"{'yes' if ok else '**NO**'} |")
    for c in crashes:
        if "error" in c:
            print(f"| {c['scenario']} | {c['server']} | 1 | {c['error']} | | | | | **NO** |")
            continue
        where = f"{c['in_new_at_kill']} in new/ at the kill, " if c["in_new_at_kill"] is not None else ""
        back = f", {c['deleted_back']} deleted back" if "deleted_back" in c else ""
        pop3 = f", POP3 after: {c['pop3_count_after']} (UIDLs repeated {c['pop3_uidls_repeated']}, deleted back " \
               f"{c['pop3_deleted_uidls_back']})" if "pop3_count_after" in c else ""
        print(f"| {c['scenario']} ({where}mid-run: {c['killed_mid_run']}"
              f"{', restarted' if c['restarted_and_ready'] else ''}{back}{pop3}) | {c['server']} | 1 | {c['acked']} | "
              f"{c['whole_files']} | {c['acked_missing']} | {c['duplicates']} | {c['broken_files']} | "
              f"{'yes' if c['ok'] else '**NO**'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small counts, only the peers with a target")
    parser.add_argument("--out", type=Path, help="write every run, the table and the notes here as JSON")
    parser.add_argument("--ours", nargs="+", default=["ours"],
                        help="ours and variants (ours@SECTION.KEY=VALUE), each against every peer")
    parser.add_argument("--peers", nargs="+", choices=PEERS, default=list(PEERS))
    parser.add_argument("--rounds", type=int, help="A B rounds per scenario (default: quick 2, full 3)")
    parser.add_argument("--only", nargs="+", default=[], metavar="PREFIX",
                        help="scenarios whose name starts with one of these (inbound, submission, pop3, idle)")
    parser.add_argument("--no-crash", action="store_true", help="skip the kill -9 round")
    parser.add_argument("--syscalls", action="store_true",
                        help="one more run per server and scenario under strace -c -f: system calls per message")
    parser.add_argument("--no-hooks", action="store_true", help="skip bench/pop3_index.py and bench/queue_backlog.py")
    parser.add_argument("--hook-args", action="append", default=[], metavar="SCRIPT=ARGS",
                        help="arguments for a hook, e.g. 'pop3_index.py=--messages 5000 --rounds 3'")
    parser.add_argument("--list", action="store_true", help="list the scenarios, peers and targets, run nothing")
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 3)
    if args.list:
        for scenario in scenarios(args.quick):
            targets = ", ".join(f"{t.peer}{f' >= {t.ratio}x' if t.ratio else ''}" for t in scenario.targets)
            print(f"{scenario.name}: {scenario.count:,} {'connections' if scenario.kind == 'idle' else 'messages'}"
                  f", {rounds} rounds; {targets}")
        return
    raise_file_limit()
    have, notes = available_peers()
    work = Path(tempfile.mkdtemp(prefix="bench-matrix-"))
    runs: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    crashes: list[dict[str, Any]] = []
    hooks: list[dict[str, Any]] = []
    started = time.perf_counter()
    try:
        chosen = [s for s in scenarios(args.quick) if not args.only or s.name.startswith(tuple(args.only))]
        for scenario in chosen:
            peers = [t.peer for t in scenario.targets if t.peer in args.peers and have[t.peer]]
            for round_ in range(rounds):
                for kind in [*args.ours, *peers]:
                    result = {"scenario": scenario.name, "server": kind, "round": round_ + 1}
                    try:
                        result.update(run_once(scenario, kind, work, len(runs)))
                    except Exception as error:  # noqa: BLE001 (one failed run is reported, the matrix goes on)
                        result["error"] = f"{type(error).__name__}: {error}"[:500]
                    print(json.dumps(result), flush=True)
                    runs.append(result)
            if args.syscalls and scenario.kind != "idle":
                for kind in [*args.ours, *peers]:
                    result = {"scenario": scenario.name, "server": kind, "round": "strace"}
                    try:
                        result.update(syscall_run(scenario, kind, work, len(runs)))
                    except Exception as error:  # noqa: BLE001
                        result["error"] = f"{type(error).__name__}: {error}"[:500]
                    print(json.dumps(result), flush=True)
                    runs.append(result)
            for ours in args.ours:
                rows += summarise(scenario, ours, runs)
        if not args.no_crash:
            rounds_ = [(kind, at) for kind in [*args.ours, *(["aiosmtpd"] if have["aiosmtpd"] and "aiosmtpd" in
                                                             args.peers else [])]
                       for at in ((0.25,) if args.quick else (0.2, 0.5, 0.8))]
            rounds_ += [(kind, -1.0) for kind in args.ours]  # -1: the POP3 round
            for kind, at in rounds_:
                try:
                    crash = pop3_crash_round(kind, work, 300 if args.quick else 1000, len(crashes)) if at < 0 else \
                        crash_round(kind, work, 6000 if args.quick else 20000, len(crashes), at)
                except Exception as error:  # noqa: BLE001
                    crash = {"scenario": "crash: POP3 DELE then kill -9" if at < 0 else f"crash: kill -9 at {at:.0%}",
                             "server": kind, "ok": False, "error": f"{type(error).__name__}: {error}"[:500]}
                print(json.dumps(crash), flush=True)
                crashes.append(crash)
        if not args.no_hooks:
            given = {script: shlex.split(rest) for script, _, rest in (h.partition("=") for h in args.hook_args)}
            for name, script in HOOKS:
                lines, note = run_hook(name, script, args.quick, given.get(script))
                for line in lines:
                    print(json.dumps(line), flush=True)
                hooks += lines
                notes.append(note)
    finally:
        remove_finished_roots()
        shutil.rmtree(work, ignore_errors=True)
    print_table(rows)
    print_durability(runs, crashes)
    for r in runs:
        if "error" in r:
            notes.append(f"{r['scenario']}, {r['server']}, round {r['round']} failed: {r['error']}")
    hook_summary = summarise_hooks(hooks)
    if hook_summary:
        print_hooks(hook_summary)
    notes.append(f"{'quick' if args.quick else 'full'} matrix, {rounds} rounds, {time.perf_counter() - started:.0f} s")
    for note in notes:
        print(f"note: {note}")
    if args.out:
        args.out.write_text(json.dumps({"mode": "quick" if args.quick else "full", "rounds": rounds,
                                        "ours": args.ours, "rows": rows, "runs": runs, "crash": crashes,
                                        "hooks": hooks, "hook_summary": hook_summary, "notes": notes}, indent=1) + "\n")
    sys.stdout.flush()
    durable = [r["durability"]["ok"] for r in runs if "durability" in r and FSYNC[r["server"].partition("@")[0]]]
    failed = any("error" in r for r in runs) or not all(c["ok"] for c in crashes) or not all(durable)
    os._exit(1 if failed else 0)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
