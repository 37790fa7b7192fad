"""Benchmarks against peers, measured in one run, alternating A B A B.

    .venv/bin/python bench/run.py inbound --sizes 10240 --concurrency 100 --messages 3000
    .venv/bin/python bench/run.py pop3 --messages 500
    .venv/bin/python bench/run.py idle --connections 1000 5000
    .venv/bin/python bench/run.py logins --logins 300
    .venv/bin/python bench/run.py submission --concurrency 10 100 --per-session 10
    .venv/bin/python bench/run.py submission --implicit-tls   # port 465 style; Twisted with CRAM-MD5
    .venv/bin/python bench/run.py matrix --quick --out /tmp/matrix.json   # every scenario x every peer

Servers (each on loopback, storage in a fresh temp dir):
- ours: `twistd -n mailappliance` (LDIF directory, fsync before 250);
- aiosmtpd: bench/peers/aiosmtpd_maildir.py (fsync before 250);
- twisted: bench/peers/twisted_mail_peer.py, Twisted's own mail classes (NO fsync);
- postfix: bench/peers/postfix_dovecot.py, a private Postfix + Dovecot (fsync into
  its queue before 250, Maildir delivery after it; needs root and the packages).
A variant of ours is named ``ours@SECTION.KEY=VALUE[,...]``, e.g.
``--servers ours ours@storage.commit_threads=2``, to measure a setting A B A B;
``ours@code=DIR`` runs the ``mailappliance`` package of another tree (a copy
with a change, PYTHONPATH=DIR) against this one.
``ours+redis`` is ours with its state (limits, throttling, mailbox locks) in a
private redis-server that the run starts (issue 17):

    .venv/bin/python bench/run.py submission --servers ours ours+redis --concurrency 50
    .venv/bin/python bench/run.py state-logins --concurrency 50
Each result line is JSON; a table of ratios (ours / peer, higher is better for
us) closes the run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
FSYNC = {"ours": True, "ours+redis": True, "aiosmtpd": True, "twisted": False, "postfix": True}


def free_port() -> int:
    """The tests' free port (below the ephemeral range, never twice in a run)."""
    sys.path.insert(0, str(HERE.parent))
    from tests.daemon import free_port as tests_free_port

    return tests_free_port()


def wait_for_port(port: int, timeout: float = 30, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{' '.join(map(str, process.args[:4]))} ... exited ({process.returncode}) "
                               f"before port {port} opened")
        time.sleep(0.05)
    raise RuntimeError(f"port {port} never opened")


_finished_roots: list[Path] = []


def remove_finished_roots() -> None:
    for root in _finished_roots:
        shutil.rmtree(root, ignore_errors=True)


class Server:
    """One server process with its own temp dir."""

    def __init__(self, kind: str) -> None:
        self.kind, _, tuning = kind.partition("@")  # "ours@storage.commit_threads=2,smtp.x=y"
        self.tuning = dict(item.split("=", 1) for item in tuning.split(",") if item)
        # ours runs this checkout's mailappliance (PYTHONPATH, unless the caller set one: the
        # --code of pop3_index.py and queue_backlog.py): twistd's sys.path starts with the venv's
        # bin/, so without it a package installed into the venv (a stale copy) would run;
        # ours@code=DIR: another tree's mailappliance instead, to measure a change A B
        code = self.tuning.pop("code", None)
        self.env = {**os.environ, "PYTHONPATH": str(Path(code).resolve()) if code else
                    os.environ.get("PYTHONPATH") or str(HERE.parent)}
        if self.kind == "ours+redis":  # the shared state store in the run's private redis-server
            self.kind = "ours"
            self.tuning["state.redis"] = f'"{private_redis().url}"'
        self.root = Path(tempfile.mkdtemp(prefix=f"bench-{kind.replace('/', '_')}-"))
        self.smtp_port, self.pop3_port, self.submission_port = free_port(), free_port(), free_port()
        self.submissions_port = free_port()  # implicit TLS (ours and Twisted)
        self.process: subprocess.Popen[bytes] | None = None
        # Dovecot's passdb: an Argon2id hash like ours (it verifies the hash at every login, its
        # auth cache included), or "plain" where only what follows the password check is measured
        self.password_scheme = "argon2id"

    def start(self, cache_ttl: float = 60) -> "Server":
        submission = ["--submission-port", str(self.submission_port), *self._certificate()]
        if self.kind == "ours":
            self._configure_ours(cache_ttl)
            command = [str(BIN / "twistd"), "-n", "--pidfile=", "--logfile", str(self.root / "twistd.log"),
                       "mailappliance", "--config", str(self.root / "mailappliance.toml")]
        elif self.kind == "aiosmtpd":
            command = [sys.executable, str(HERE / "peers" / "aiosmtpd_maildir.py"), "--port", str(self.smtp_port),
                       "--maildir", str(self.root / "mail" / "alice"), *submission]
        elif self.kind == "postfix":
            command = [sys.executable, str(HERE / "peers" / "postfix_dovecot.py"), "--smtp-port", str(self.smtp_port),
                       "--pop3-port", str(self.pop3_port), "--root", str(self.root),
                       "--cache-ttl", str(round(cache_ttl)), "--password-scheme", self.password_scheme, *submission]
        else:
            command = [sys.executable, str(HERE / "peers" / "twisted_mail_peer.py"), "--smtp-port",
                       str(self.smtp_port), "--pop3-port", str(self.pop3_port), "--maildir", str(self.root / "mail"),
                       *submission, "--submissions-port", str(self.submissions_port)]
        self.command = command
        with open(self.root / "server-output.log", "ab") as output:
            self.process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=self.env)
        try:
            wait_for_port(self.smtp_port, process=self.process)
        except RuntimeError as error:  # say why, from its output and ours' log
            tail = [line for name in ("server-output.log", "twistd.log") if (self.root / name).exists()
                    for line in (self.root / name).read_text(errors="replace").strip().splitlines()[-3:]]
            raise RuntimeError(" / ".join([str(error), *tail])) from None
        if self.kind == "ours":
            self._wait_for_workers()
        return self

    def _wait_for_workers(self, timeout: float = 60) -> None:
        """With ``server.workers = N``: the load starts once every worker serves the listeners.
        The supervisor binds the ports before it starts the workers, and ``level = "warn"``
        hides their "ready" lines; a worker opens its journal (``spool/journal.<i>/covered``)
        just before it adopts the listening sockets.  Without the journal: 3 s after they exist."""
        workers = int(self.tuning.get("server.workers", "1"))
        if workers <= 1:
            return
        sync = self.tuning.get("storage.sync", '"journal"').strip('"')
        deadline = time.monotonic() + timeout
        marks = [self.root / "spool" / f"journal.{index}" / "covered" for index in range(1, workers)]
        while sync == "journal" and not all(mark.exists() for mark in marks):
            if time.monotonic() > deadline or (self.process and self.process.poll() is not None):
                raise RuntimeError(f"ours: {workers - 1} worker(s) not ready; see {self.root / 'twistd.log'}")
            time.sleep(0.05)
        if sync != "journal":
            time.sleep(3)

    def restart_ours(self, timeout: float = 120) -> None:
        """Start ours again on the same storage after a crash and wait until it serves: a POP3
        greeting from it.  twistd binds the ports before start-up recovery runs, but no
        connection is answered before every service has started, so a greeting means
        recovery is over and the Maildir may be read.  (Not a count of "mailappliance ready"
        lines: twistd rotates its log at 1 MB, so the count could drop and the wait never end.)"""
        with open(self.root / "server-output.log", "ab") as output:
            self.process = subprocess.Popen(self.command, stdout=output, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + timeout
        while not pop3_greets(self.pop3_port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = [line for name in ("server-output.log", "twistd.log") if (self.root / name).exists()
                        for line in (self.root / name).read_text(errors="replace").strip().splitlines()[-3:]]
                raise RuntimeError(" / ".join(["ours did not serve after the restart", *tail]))
            time.sleep(0.05)

    def kill(self) -> None:
        """kill -9 the server and every process below it, no clean shutdown (the crash round);
        returns once every one of them is gone: a worker process still exiting holds the
        listening sockets (the restart could not bind) and its journal's lock."""
        assert self.process is not None
        pids = tree_pids(self.pid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(20)
        deadline = time.monotonic() + 20
        while any(map(_alive, pids)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes {[pid for pid in pids if _alive(pid)]} outlived kill -9 for 20 s")
            time.sleep(0.01)

    def _certificate(self) -> list[str]:
        """A self-signed certificate for the peers' submission listeners (ours makes its own)."""
        tls = self.root / "peer-tls"
        tls.mkdir(exist_ok=True)
        certificate, key = tls / "cert.pem", tls / "key.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                        "-nodes", "-days", "2", "-subj", "/CN=bench.example.org", "-keyout", str(key),
                        "-out", str(certificate)], check=True, capture_output=True)
        return ["--certificate", str(certificate), "--private-key", str(key)]

    def _configure_ours(self, cache_ttl: float) -> None:
        added = subprocess.run([str(BIN / "mailappliance-admin"), "--config", str(self._write_config(cache_ttl)),
                                "user", "add", "alice@example.org", "--password-stdin"],
                               input="alice-password\n", capture_output=True, text=True, env=self.env)
        if added.returncode:
            raise RuntimeError(added.stderr)

    def _write_config(self, cache_ttl: float) -> Path:
        config = self.root / "mailappliance.toml"
        text = f"""
[server]
hostname = "bench.example.org"
local_domains = ["example.org"]
[storage]
maildir_root = "mail"
spool_dir = "spool"
[auth]
cache_ttl = {cache_ttl}
failures_before_delay = 1000
address_lock_after = 100000
account_lock_after = 100000
[limits]
connections_per_minute = 10000000
concurrent_per_address = 100000
concurrent_per_network = 100000
max_connections = 100000
messages_per_hour = 10000000
recipients_per_hour = 10000000
[logging]
level = "warn"
[state]
[tls]
certificate = "tls/server.pem"
private_key = "tls/server.key"
[[listeners]]
role = "mx"
port = {self.smtp_port}
[[listeners]]
role = "submission"
port = {self.submission_port}
[[listeners]]
role = "submissions"
port = {self.submissions_port}
[[listeners]]
role = "pop3"
port = {self.pop3_port}
allow_plaintext_auth = true
"""
        for setting, value in self.tuning.items():  # a variant of ours: KEY = VALUE in [SECTION], replaced or added
            section, _, key = setting.rpartition(".")
            head, found, rest = text.partition(f"[{section}]\n")
            if not found:
                raise ValueError(f"{setting}: no [{section}] in the bench's config")
            body, next_section, tail = rest.partition("\n[")
            lines = [line for line in body.split("\n") if not line.startswith(f"{key} = ")]
            text = head + found + "\n".join([f"{key} = {value}", *lines]) + next_section + tail
        config.write_text(text)
        return config

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def top_pids(self) -> list[int]:
        """The processes whose trees are the server (Postfix: its master and Dovecot's)."""
        if self.kind == "postfix":
            masters = [self.root / "postfix" / "queue" / "pid" / "master.pid",
                       self.root / "dovecot" / "run" / "master.pid"]
            return [int(m.read_text().split()[0]) for m in masters if m.exists()]
        return [self.pid]

    def cpu_ns(self) -> dict[int, int]:
        """CPU nanoseconds of every live thread of the server's processes, by thread id
        (``/proc/PID/task/TID/schedstat``: exact, where /proc's utime counts 10 ms ticks);
        ``cpu_ns_between`` turns two of these into the CPU spent between them."""
        times: dict[int, int] = {}
        for top in self.top_pids():
            for pid in tree_pids(top):
                try:
                    tids = os.listdir(f"/proc/{pid}/task")
                except OSError:
                    continue
                for tid in tids:
                    try:
                        times[int(tid)] = int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
                    except (OSError, IndexError, ValueError):
                        continue
        return times

    def rss_kib(self) -> int:
        """Resident memory of the server's process, and of its children if it has any (a server
        that forks workers: their sum, which counts pages shared since the fork in each)."""
        total = 0
        for pid in tree_pids(self.pid):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            total += int(next((line for line in status.splitlines() if line.startswith("VmRSS:")),
                              "VmRSS: 0").split()[1])
        return total

    def cpu_seconds(self) -> float:
        """User + system CPU of the server so far: its process (all threads) and
        every process below it, live or reaped (Postfix: below its master, and Dovecot's)."""
        return sum(tree_cpu_seconds(pid) for pid in self.top_pids())

    def delivered(self) -> int:
        """Messages in alice's Maildir new/ (Postfix delivers after its 250)."""
        new = self.root / "mail" / "alice" / "new"
        return len(os.listdir(new)) if new.is_dir() else 0

    def wait_delivered(self, count: int, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while self.delivered() < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.kind}: only {self.delivered()} of {count} messages reached the Maildir")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(20)
        # The storage stays until the whole run is over: deleting thousands of
        # files makes creating files slower for a while afterwards (ext4 skips
        # recently freed inodes), which would tax whichever server runs next.
        _finished_roots.append(self.root)


def _alive(pid: int) -> bool:
    """``pid`` runs (a zombie has closed its files: not alive)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def pop3_greets(port: int) -> bool:
    """A POP3 server on loopback ``port`` accepts a connection and greets with +OK."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            return s.recv(512).startswith(b"+OK")
    except OSError:  # refused, reset, or no greeting within 5 s (still starting): ask again
        return False


def tree_pids(top: int) -> list[int]:
    """``top`` and its live descendants."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
    found, todo = [], [top]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(child for child, parent in parents.items() if parent == pid)
    return found


def tree_cpu_seconds(top: int) -> float:
    """CPU of ``top`` and its descendants: live ones, and reaped ones (cutime)."""
    parents: dict[int, int] = {}
    fields_of: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)], fields_of[int(entry)] = int(fields[1]), fields
    total, todo = 0, [top]
    while todo:
        pid = todo.pop()
        fields = fields_of.get(pid)
        if fields is None:
            continue
        own = int(fields[11]) + int(fields[12])
        total += own + (int(fields[13]) + int(fields[14]) if pid == top else 0)
        todo.extend(child for child, parent in parents.items() if parent == pid)
    return total / os.sysconf("SC_CLK_TCK")


def load(server: Server, messages: int, concurrency: int, size: int, generator: str = "asyncio",
         per_session: int = 0, implicit_tls: bool = False, acked_log: Path | None = None,
         tls_resume: bool = False) -> dict[str, Any]:
    """Run the load generator, then wait until every message is in the Maildir;
    adds that rate and CPU milliseconds per message of server and generator.

    ``asyncio``: bench/smtp_load.py, pipelining; ``c``: bench/smtp_load.c, the
    same sessions (no --acked-log) at a fraction of the CPU (its TLS in C);
    ``smtp-source``: Postfix's C load generator, one command at a time (as many
    real clients send).
    ``per_session`` > 0: authenticated submission (STARTTLS, AUTH PLAIN as
    alice) with that many messages per session; with ``implicit_tls`` on the
    implicit-TLS port instead (Twisted's with CRAM-MD5, as issue 15's reviewers
    ran it; ours offers no CRAM-MD5, so PLAIN). ``acked_log``: unique messages,
    the token of each 250 written there (the durability audit).
    """
    before = server.delivered()
    server_cpu = server.cpu_seconds()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    if generator == "smtp-source":
        done = subprocess.run(["smtp-source", "-d", "-s", str(concurrency), "-m", str(messages), "-l", str(size),
                               "-f", "bench@example.net", "-t", "alice@example.org",
                               f"127.0.0.1:{server.smtp_port}"], capture_output=True, text=True)
        seconds = time.perf_counter() - started
        result = {"messages": messages, "seconds": round(seconds, 3),
                  "messages_per_second": round(messages / seconds, 1),
                  "errors": 0 if done.returncode == 0 else messages}
    else:
        submission = ["--port", str(server.submission_port), "--submission", "alice:alice-password",
                      "--per-session", str(per_session), "--sender", "alice@example.org"] if per_session else \
            ["--port", str(server.smtp_port)]
        if per_session and implicit_tls:
            submission[1] = str(server.submissions_port)
            submission += ["--implicit-tls", "--auth", "cram-md5" if server.kind == "twisted" else "plain"]
        if acked_log is not None:
            submission += ["--acked-log", str(acked_log), "--tag", acked_log.stem]
        if per_session and tls_resume:  # every client resumes its previous TLS session, on every server
            submission += ["--tls-resume"]
        if generator == "c" and acked_log is not None:
            raise ValueError("bench/smtp_load.c keeps no --acked-log: audit with the asyncio generator")
        program = [str(c_generator())] if generator == "c" else [sys.executable, str(HERE / "smtp_load.py")]
        output = subprocess.run(
            [*program, *submission, "--messages", str(messages),
             "--concurrency", str(concurrency), "--size", str(size), "--processes", str(min(4, concurrency))],
            capture_output=True, text=True, check=True).stdout
        result = json.loads(output)
    server.wait_delivered(before + messages - result["errors"])
    result["in_maildir_per_second"] = round(messages / (time.perf_counter() - started), 1)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    generator_cpu = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
    result["server_cpu_ms_per_message"] = round((server.cpu_seconds() - server_cpu) * 1000 / messages, 3)
    result["generator_cpu_ms_per_message"] = round(generator_cpu * 1000 / messages, 3)
    return result


def c_generator() -> Path:
    """bench/smtp_load.c, compiled on first use (gcc and Debian's libssl-dev) into
    bench/.build/, again whenever the source is newer than the program."""
    source, program = HERE / "smtp_load.c", HERE / ".build" / "smtp_load"
    if not program.exists() or program.stat().st_mtime < source.stat().st_mtime:
        program.parent.mkdir(exist_ok=True)
        subprocess.run(["cc", "-O2", "-o", str(program), str(source), "-lssl", "-lcrypto", "-lpthread"], check=True)
    return program


def cpu_ns_between(before: dict[int, int], after: dict[int, int]) -> int:
    """CPU nanoseconds spent between two ``Server.cpu_ns`` snapshots by the threads alive at the
    second (a thread that ended in between loses what it spent after the first: measure spans
    in which the server's processes stay, e.g. a POP3 session between login and QUIT)."""
    return sum(ns - before.get(tid, 0) for tid, ns in after.items())


def alternate(kinds: list[str], rounds: int) -> Iterator[str]:
    for _ in range(rounds):
        yield from kinds


def report(results: list[dict[str, Any]], key: str, *more: str) -> None:
    """Median per server and scenario of ``key`` (and of ``more``), and ours/peer ratios of ``key``."""
    table: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        table.setdefault((r["scenario"], r["server"]), []).append(r)

    def median(scenario: str, server: str, name: str) -> float:
        return statistics.median(r[name] for r in table.get((scenario, server), [{name: 0}]))

    print(f"\n| scenario | server | fsync before 250 | median {key} | {' | '.join(more)}{' | ' if more else ''}"
          "ours / peer |")
    print("|---|---|---|---|" + "---|" * len(more) + "---|")
    for scenario, server in sorted(table):
        value, ours = median(scenario, server, key), median(scenario, "ours", key)
        ratio = "" if server == "ours" or not value else f"{ours / value:.2f}x"
        extra = "".join(f"{median(scenario, server, name):,.3f} | " if "cpu" in name else
                        f"{median(scenario, server, name):,.1f} | " for name in more)
        print(f"| {scenario} | {server} | {FSYNC[server.partition('@')[0]]} | {value:,.1f} | {extra}{ratio} |")


def bench_inbound(args: argparse.Namespace) -> None:
    results = []
    for size in args.sizes:
        for concurrency in args.concurrency:
            messages = args.messages if size <= 65536 else max(100, args.messages // 20)
            for kind in alternate(args.servers, args.rounds):
                server = Server(kind).start()
                try:
                    result = load(server, messages, concurrency, size, args.generator)
                finally:
                    server.stop()
                pipelined = "" if args.generator == "asyncio" else f" ({args.generator})"
                result.update(scenario=f"inbound {size // 1024} KB c={concurrency}{pipelined}", server=kind)
                print(json.dumps(result), flush=True)
                results.append(result)
    report(results, "messages_per_second", "in_maildir_per_second", "server_cpu_ms_per_message",
           "generator_cpu_ms_per_message")


def bench_submission(args: argparse.Namespace) -> None:
    """Subscribers sending: STARTTLS, AUTH PLAIN, --per-session messages, QUIT, again
    (``--implicit-tls``: ours and Twisted only)."""
    results = []
    servers = [k for k in args.servers if k.startswith(("ours", "twisted"))] if args.implicit_tls else args.servers
    for concurrency in args.concurrency:
        for kind in alternate(servers, args.rounds):
            server = Server(kind).start()
            try:
                result = load(server, args.messages, concurrency, args.size, args.generator,
                              per_session=args.per_session, implicit_tls=args.implicit_tls,
                              tls_resume=args.tls_resume)
            finally:
                server.stop()
            result["sessions_per_second"] = round(result["sessions"] / result["seconds"], 1)
            tls = "implicit TLS " if args.implicit_tls else ""
            resumed = ", TLS resumed" if args.tls_resume else ""
            generator = "" if args.generator == "asyncio" else f" ({args.generator})"
            result.update(scenario=f"submission {tls}{args.size // 1024} KB c={concurrency} "
                                   f"{args.per_session}/session{resumed}{generator}", server=kind)
            print(json.dumps(result), flush=True)
            results.append(result)
    report(results, "messages_per_second", "sessions_per_second", "server_cpu_ms_per_message",
           "generator_cpu_ms_per_message")


class RawPop3:
    """A POP3 client on a raw socket that reads whole answers with big recv calls: the
    server is what is measured, not a client's per-line work (poplib's readline per line)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = bytearray()
        self.line()

    def _until(self, end: bytes) -> bytes:
        """Everything up to and including ``end``; each byte is searched once (a 1 MB answer
        in many recv calls would otherwise be scanned from its start after each)."""
        start = 0
        while True:
            found = self.buffer.find(end, start)
            if found >= 0:
                answer = bytes(self.buffer[:found + len(end)])
                del self.buffer[:found + len(end)]
                return answer
            start = max(0, len(self.buffer) - len(end) + 1)
            data = self.sock.recv(1 << 18)
            if not data:
                raise ConnectionError("server closed the connection")
            self.buffer += data

    def line(self) -> bytes:
        return self._until(b"\r\n")

    def command(self, text: bytes) -> bytes:
        self.sock.sendall(text + b"\r\n")
        answer = self.line()
        if not answer.startswith(b"+OK"):
            raise RuntimeError(f"{text!r}: {answer!r}")
        return answer

    def multiline(self, text: bytes) -> bytes:
        self.command(text)
        return self._until(b"\r\n.\r\n")

    def login(self) -> None:
        self.command(b"USER alice")
        self.command(b"PASS alice-password")

    def login_stat(self) -> int:
        self.login()
        return int(self.command(b"STAT").split()[1])

    def close(self) -> None:
        try:
            self.command(b"QUIT")
        finally:
            self.sock.close()


def pop3_round(server: Server, messages: int, size: int, dele: bool = False,
               around: Callable[[], ContextManager[Any]] = contextlib.nullcontext) -> dict[str, Any]:
    """Deliver ``messages``, then one client: login, RETR all (DELE all), QUIT; see
    ``_retrieve_all``. ``around``: a context the retrieval runs in (bench/matrix.py counts
    system calls there)."""
    load(server, messages, 10, size)
    with around():
        return _retrieve_all(server, dele)


def _retrieve_all(server: Server, dele: bool) -> dict[str, Any]:
    """The first login on a fresh server (the password hash checked: Argon2id with argon2-cffi's
    defaults for ours and Dovecot alike) then STAT and RETR of every message one at a time on a
    raw socket, (DELE all,) QUIT. Reported apart: ``login_ms`` (connect to the PASS answer; the
    server's first look at the mailbox included) with ``login_server_cpu_ms`` (/proc's 10 ms ticks,
    which keep the time of threads and processes that ended: Argon2's threads, Dovecot's login
    and auth processes); ``retr_per_second``
    and ``server_cpu_ms_per_retr`` (STAT to the last RETR's end, the session's processes alive
    throughout, so schedstat's nanoseconds are exact); ``messages_per_second``: the whole session
    (connect to QUIT's answer) per message, issue 7's figure, and ``server_cpu_ms_per_message``
    (connect to the last RETR: after QUIT Dovecot's session process ends and its time with it)."""
    ticks = server.cpu_seconds()
    client_cpu = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    client = RawPop3(server.pop3_port)
    client.login()
    logged_in, login_cpu, login_ticks = time.perf_counter(), server.cpu_ns(), server.cpu_seconds()
    count = int(client.command(b"STAT").split()[1])
    for i in range(1, count + 1):
        client.multiline(b"RETR %d" % i)
    retrieved, retr_cpu = time.perf_counter(), server.cpu_ns()
    if dele:  # Twisted's Maildir POP3 fails at DELE on Python 3: compare without it
        for i in range(1, count + 1):
            client.command(b"DELE %d" % i)
    client.close()
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    client_seconds = after.ru_utime + after.ru_stime - client_cpu.ru_utime - client_cpu.ru_stime
    return {"messages": count, "seconds": round(seconds, 3), "messages_per_second": round(count / seconds, 1),
            "login_ms": round((logged_in - started) * 1000, 1),
            "login_server_cpu_ms": round((login_ticks - ticks) * 1000, 1),
            "retr_per_second": round(count / (retrieved - logged_in), 1),
            "server_cpu_ms_per_retr": round(cpu_ns_between(login_cpu, retr_cpu) / 1e6 / max(1, count), 4),
            "server_cpu_ms_per_message": round(((login_ticks - ticks) * 1e9 + cpu_ns_between(login_cpu, retr_cpu))
                                               / 1e6 / max(1, count), 3),
            "generator_cpu_ms_per_message": round(client_seconds * 1000 / max(1, count), 3)}


def bench_pop3(args: argparse.Namespace) -> None:
    """Login, RETR all (DELE all), QUIT on a fresh server per round: login and RETR reported apart."""
    results = []
    for kind in alternate([k for k in args.servers if k != "aiosmtpd"], args.rounds):
        server = Server(kind).start()
        try:
            result = pop3_round(server, args.messages, args.size, args.dele)
        finally:
            server.stop()
        what = "RETR+DELE" if args.dele else "RETR"
        result = {"scenario": f"pop3 login+{what} {args.messages} x {args.size // 1024} KB", "server": kind,
                  **result}
        print(json.dumps(result), flush=True)
        results.append(result)
    report(results, "messages_per_second", "login_ms", "retr_per_second", "server_cpu_ms_per_retr",
           "login_server_cpu_ms", "generator_cpu_ms_per_message")
    ranges(results, {"login_ms": False, "login_server_cpu_ms": False, "retr_per_second": True,
                     "server_cpu_ms_per_retr": False, "messages_per_second": True})


def ranges(results: list[dict[str, Any]], measures: dict[str, bool]) -> None:
    """Per scenario and measure: each server's median [min-max] and ours against it (above 1:
    ours better; ``measures`` says whether higher is better)."""
    servers = list(dict.fromkeys(r["server"] for r in results))
    print(f"\n| scenario | measure | {' | '.join(servers)} | {' | '.join(f'ours vs {k}' for k in servers[1:])} |")
    print("|---|---|" + "---|" * (2 * len(servers) - 1))
    for scenario in dict.fromkeys(r["scenario"] for r in results):
        for measure, higher in measures.items():
            values = {k: [r[measure] for r in results if r["scenario"] == scenario and r["server"] == k]
                      for k in servers}
            medians = {k: statistics.median(v) for k, v in values.items() if v}
            cells = [f"{medians[k]:,.4g} [{min(v):,.4g}-{max(v):,.4g}]" if v else "" for k, v in values.items()]
            ours = medians.get(servers[0])
            ratios = ["" if ours is None or not medians.get(k) or not ours else
                      f"{(ours / medians[k]) if higher else (medians[k] / ours):.2f}x" for k in servers[1:]]
            print(f"| {scenario} | {measure} | {' | '.join(cells)} | {' | '.join(ratios)} |")


def idle_round(server: Server, count: int) -> dict[str, Any]:
    """Resident memory of ``server`` before and after ``count`` idle SMTP connections (each
    greeted), and whether a normal session still delivers meanwhile (``raise_file_limit``
    must run before the server starts: it inherits the limit)."""
    raise_file_limit()
    time.sleep(0.5)
    before = server.rss_kib()
    sockets = []
    try:
        for i in range(count):  # many source addresses, as many clients would be
            s = socket.create_connection(("127.0.0.1", server.smtp_port),
                                         source_address=(f"127.0.{1 + i // 250}.{1 + i % 250}", 0))
            sockets.append(s)
        for s in sockets:
            s.recv(256)
        time.sleep(1)
        after = server.rss_kib()
        with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30) as smtp:
            ok = smtp.sendmail("b@example.net", ["alice@example.org"], b"Subject: x\r\n\r\ny\r\n") == {}
    finally:
        for s in sockets:
            s.close()
    return {"rss_before_kib": before, "rss_after_kib": after, "increase_mib": round((after - before) / 1024, 1),
            "kib_per_connection": round((after - before) / count, 2), "normal_session_ok": ok}


def raise_file_limit() -> None:
    """Descriptors up to the hard limit, for this process and the servers it starts."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def bench_idle(args: argparse.Namespace) -> None:
    raise_file_limit()
    for kind in args.servers:
        for count in args.connections:
            server = Server(kind).start()
            try:
                result = idle_round(server, count)
            finally:
                server.stop()
            print(json.dumps({"scenario": f"idle {count}", "server": kind, **result}), flush=True)


def bench_logins(args: argparse.Namespace) -> None:
    """Logins per second through the shared checker against slapd: cache cold (TTL 0) vs warm."""
    sys.path.insert(0, str(HERE.parent))
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred, gatherResults

    from mailappliance.credentials import ClientPassword, SubscriberChecker
    from mailappliance.directory.ldap import LdapStore
    from mailappliance.directory.threaded import Directory
    from tests.slapd import Slapd

    root = Path(tempfile.mkdtemp(prefix="bench-slapd-"))
    slapd = Slapd(root)
    slapd.start()
    store = LdapStore(slapd.settings())
    # ten subscribers, so that the ten logins in flight at once are all different
    # (identical logins in flight share one check: that would not be "cold")
    for n in range(10):
        store.add_subscriber(f"user{n}", f"user{n}@example.org", f"password-{n}")
    logins = [ClientPassword(f"user{n}".encode(), f"password-{n}".encode(), "127.0.0.1") for n in range(10)]
    results: dict[str, float] = {}

    async def measure(ttl: float) -> float:
        directory = Directory(store, reactor, 8)
        directory.start()
        checker = SubscriberChecker(directory, ttl, reactor)
        await gatherResults([checker.requestAvatarId(c) for c in logins])  # warms the cache when ttl > 0
        started = time.perf_counter()
        for _ in range(args.logins // 10):
            await gatherResults([checker.requestAvatarId(c) for c in logins])
        seconds = time.perf_counter() - started
        directory.stop()
        return (args.logins // 10 * 10) / seconds

    async def both() -> None:
        results["cold (TTL 0: one LDAP bind per login)"] = await measure(0)
        results["warm (cache hit)"] = await measure(60)

    def start() -> None:
        Deferred.fromCoroutine(both()).addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run()
    slapd.stop()
    shutil.rmtree(root, ignore_errors=True)
    for name, rate in results.items():
        print(json.dumps({"scenario": "logins", "cache": name, "logins_per_second": round(rate, 1)}))
    cold, warm = results.values()
    print(f"warm / cold: {warm / cold:.1f}x")


_redis: list[Any] = []


def private_redis() -> Any:
    """The run's private redis-server (tests/redis_server.py), started on first use."""
    if not _redis:
        sys.path.insert(0, str(HERE.parent))
        from tests.redis_server import RedisServer

        server = RedisServer(Path(tempfile.mkdtemp(prefix="bench-redis-")))
        server.start()
        _redis.append(server)
    return _redis[0]


def bench_state_logins(args: argparse.Namespace) -> None:
    """Logins per second through the shared checker, ``--concurrency`` in flight, with the
    throttle's state in this process vs in Redis (A B A B), cache cold (one LDAP bind per
    login) and warm; the ratio redis / memory closes the run."""
    sys.path.insert(0, str(HERE.parent))
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred, gatherResults

    from mailappliance.credentials import ClientPassword, SubscriberChecker
    from mailappliance.directory.ldap import LdapStore
    from mailappliance.directory.threaded import Directory
    from mailappliance.settings import StateSettings
    from mailappliance.state.build import build_state_store
    from mailappliance.state.memory import MemoryStore
    from mailappliance.throttle import AuthThrottle
    from mailappliance.settings import ThrottleSettings
    from tests.slapd import Slapd

    in_flight = max(args.concurrency)
    root = Path(tempfile.mkdtemp(prefix="bench-slapd-"))
    slapd = Slapd(root)
    slapd.start()
    store = LdapStore(slapd.settings())
    for n in range(in_flight):  # all different: identical logins in flight would share one check
        store.add_subscriber(f"user{n}", f"user{n}@example.org", f"password-{n}")
    logins = [ClientPassword(f"user{n}", f"password-{n}", f"192.0.2.{n % 250}") for n in range(in_flight)]
    redis_url = private_redis().url
    results: list[dict[str, Any]] = []

    async def measure(kind: str, ttl: float, rounds: int) -> float:
        if kind == "redis":
            state, service = build_state_store(StateSettings(redis=redis_url), reactor)
            service.startService()
        else:
            state, service = MemoryStore(reactor), None
        directory = Directory(store, reactor, 8)
        directory.start()
        checker = SubscriberChecker(directory, ttl, reactor, AuthThrottle(ThrottleSettings(), reactor, state))
        await gatherResults([checker.requestAvatarId(c) for c in logins])  # warms the cache when ttl > 0
        started = time.perf_counter()
        for _ in range(rounds):
            await gatherResults([checker.requestAvatarId(c) for c in logins])
        seconds = time.perf_counter() - started
        directory.stop()
        if service is not None:
            assert state.describe() == "ok", "Redis degraded during the run"
            service.stopService()
        return rounds * len(logins) / seconds

    async def run() -> None:
        for cache, ttl, rounds in (("cold", 0, max(1, args.logins // in_flight)),
                                   ("warm", 60, max(1, 20 * args.logins // in_flight))):
            for kind in alternate(["memory", "redis"], args.rounds):
                rate = await measure(kind, ttl, rounds)
                result = {"scenario": f"logins {cache} c={in_flight}", "server": kind,
                          "logins_per_second": round(rate, 1)}
                print(json.dumps(result), flush=True)
                results.append(result)

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(run()).addBoth(lambda r: (reactor.stop(), r)[1]))
    reactor.run()
    slapd.stop()
    shutil.rmtree(root, ignore_errors=True)
    for scenario in dict.fromkeys(r["scenario"] for r in results):
        rates = {kind: statistics.median(r["logins_per_second"] for r in results
                                         if r["scenario"] == scenario and r["server"] == kind)
                 for kind in ("memory", "redis")}
        print(f"{scenario}: redis / memory = {rates['redis'] / rates['memory']:.2f}x "
              f"({rates['redis']:.0f} vs {rates['memory']:.0f} logins/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    if sys.argv[1:2] == ["matrix"]:  # every scenario against every peer: bench/matrix.py has its own options
        import matrix

        sys.argv[0:2] = [f"{sys.argv[0]} matrix"]
        matrix.main()
        return
    parser.add_argument("benchmark", choices=("inbound", "submission", "pop3", "idle", "logins", "state-logins",
                                              "matrix"))
    parser.add_argument("--servers", nargs="+", default=["ours", "twisted", "aiosmtpd"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[1024, 10240, 1048576])
    parser.add_argument("--size", type=int, default=10240)
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 10, 100])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connections", nargs="+", type=int, default=[1000, 5000])
    parser.add_argument("--logins", type=int, default=500)
    parser.add_argument("--generator", choices=("asyncio", "c", "smtp-source"), default="asyncio",
                        help="bench/smtp_load.py (pipelining), bench/smtp_load.c (the same in C: its TLS costs "
                             "the generator far less CPU) or, inbound only, Postfix's smtp-source (one command "
                             "at a time)")
    parser.add_argument("--per-session", type=int, default=10, help="submission: messages per session")
    parser.add_argument("--dele", action="store_true", help="pop3: also DELE every message (ours only)")
    parser.add_argument("--tls-resume", action="store_true",
                        help="submission: each client resumes its previous connection's TLS session (every server)")
    parser.add_argument("--implicit-tls", action="store_true",
                        help="submission: the implicit-TLS port (ours and Twisted; Twisted logs in with CRAM-MD5)")
    args = parser.parse_args()
    try:
        benchmarks = {"inbound": bench_inbound, "submission": bench_submission, "pop3": bench_pop3,
                      "idle": bench_idle, "logins": bench_logins, "state-logins": bench_state_logins}
        benchmarks[args.benchmark](args)
    finally:
        remove_finished_roots()
        for server in _redis:
            server.stop()
            shutil.rmtree(server.root, ignore_errors=True)
    os._exit(0)


if __name__ == "__main__":
    main()
