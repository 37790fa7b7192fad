"""Soak benchmark (issue 11): normal mail traffic alongside hostile clients, then an audit.

Not a test and never run by CI. It starts the real ``twistd -n mailappliance``
(this checkout's code; ``--code installed``: the venv's copy) in a fresh temp
dir (the shipped etc/mailappliance.toml with ports, paths and the directory
moved there; the screening file is empty, so 127/8 is treated like the
Internet), every socket on 127.0.0.0/8, and stops by itself:

1. baseline (the first third): normal senders (smtplib, 10 KB messages over
   the MX, latency from connect to the 250 after DATA, queue id of every 250)
   and POP3 readers (pop3s, unverified TLS, STAT/LIST/RETR a few, QUIT
   without DELE);
2. attack (the rest): the same, plus, from a subprocess running asyncio,
   resetters (a whole message, then RST right after the final dot),
   non-readers (megabytes of pipelined ``EHLO x``; pipelined ``UIDL`` on a big
   mailbox) that never read, slowloris on every listener (HTTP included; one
   byte every few seconds), idle holders (NOOP or CAPA every minute) and
   oversize senders (SIZE beyond the limit; DATA streamed beyond it);
3. audit, with the daemon stopped: every 250 of the normal senders must be a
   whole file in each recipient's Maildir (name starting with the queue id),
   and no file in any Maildir may be empty or truncated (size equal to
   ``,S=``, ending with the message's own last line).

Printed (and written with ``--json FILE``): 250s vs whole copies on disk, bad
files, RSS peak (VmRSS sampled every 0.5 s, and VmHWM), open descriptors at
peak, p50/p99 of the normal transactions per phase and their ratio, POP3 logins,
what each attacker achieved, and PASS/FAIL against the issue's targets.

    .venv/bin/python bench/soak.py                       # 5 minutes
    .venv/bin/python bench/soak.py --minutes 1 --json /tmp/soak.json
    .venv/bin/python bench/soak.py --minutes 0.5 --slowloris 20 --idle 30   # a quick check
    .venv/bin/python bench/soak.py --set limits.max_connections=2000        # a setting changed
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import fcntl
import json
import math
import os
import poplib
import random
import re
import resource
import shutil
import smtplib
import socket
import select
import ssl
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
import tomllib
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar

HERE = Path(__file__).resolve().parent
HOST = "127.0.0.1"
T = TypeVar("T")

# Source address blocks (127.<block>.<net>.<host>): normal clients and each
# kind of attacker apart, so per-address and per-network limits see them as
# the different clients they are.
NORMAL_SENDER_BLOCK, NORMAL_READER_BLOCK = 10, 11
SLOWLORIS_BLOCK, IDLE_BLOCK, NONREADER_BLOCK, RESETTER_BLOCK, OVERSIZE_BLOCK = 21, 22, 23, 24, 25

SMTP_ROLES, POP3_ROLES = {"mx", "submission", "submissions"}, {"pop3", "pop3s"}
HTTP_ROLES = {"autoconfig", "autoconfigs", "metrics"}
IMPLICIT_TLS_ROLES = {"submissions", "pop3s", "autoconfigs"}
STALL_SECONDS = 10.0  # a write that the daemon does not take within this is a push-back, not an error


# -- addresses, messages, numbers ---------------------------------------------


def source_address(block: int, index: int, per_address: int = 1, networks: int = 1) -> str:
    """The ``index``-th client's loopback address: ``per_address`` clients share one,
    addresses spread round-robin over ``networks`` /24s of 127.<block>/16."""
    n = index // max(1, per_address)
    return f"127.{block}.{n % networks}.{n // networks % 250 + 1}"


def make_message(token: str, size: int, sender: str, recipients: list[str]) -> bytes:
    """A message of about ``size`` octets whose header and last line carry ``token``."""
    header = (f"From: <{sender}>\r\nTo: {', '.join(f'<{r}>' for r in recipients)}\r\n"
              f"Subject: soak {token}\r\nMessage-ID: <{token}@soak.example.net>\r\nX-Soak: {token}\r\n\r\n").encode()
    end = f"soak-end {token}\r\n".encode()
    line = b"x" * 76 + b"\r\n"
    return header + line * max(1, (size - len(header) - len(end)) // len(line)) + end


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (None for no values; inf when it falls on a failure)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def rounded(value: float | None, digits: int = 4) -> float | str | None:
    if value is None:
        return None
    return "inf" if math.isinf(value) else round(value, digits)


def unverified_context() -> ssl.SSLContext:
    """The daemon's certificate is self-signed: encrypt, don't verify."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return context


# -- the daemon --------------------------------------------------------------


def toml_value_of(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def soak_settings(base: Path, root: Path,
                  overrides: list[str]) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """The shipped config with storage, TLS, directory, screening and logs under ``root``,
    every listener on a free loopback port, and ``overrides`` (SECTION.KEY=VALUE) applied."""
    from tests.daemon import free_port

    data = tomllib.loads(base.read_text())
    data.setdefault("storage", {}).update(maildir_root=str(root / "mail"), spool_dir=str(root / "spool"))
    data["directory"] = {**data.get("directory", {}), "backend": "ldif", "ldif_file": str(root / "users.ldif")}
    data["directory"].pop("ldap", None)
    tls = {k: v for k, v in data.get("tls", {}).items() if not k.startswith("client_ca")}
    data["tls"] = {**tls, "certificate": str(root / "tls" / "server.pem"),
                   "private_key": str(root / "tls" / "server.key"), "generate_self_signed": True}
    (root / "screening.toml").write_text("# soak: nothing allowed, nothing blocked, no DNS\n")
    data.setdefault("screening", {})["file"] = str(root / "screening.toml")
    data.setdefault("queue", {})["resolver"] = f"{HOST}:{free_port()}"  # nothing listens: no DNS leaves loopback
    if "json_file" in data.get("logging", {}):
        data["logging"]["json_file"] = str(root / "log.json")
    listeners = [dict(listener, name=listener.get("name", listener["role"]), address=HOST, port=free_port())
                 for listener in data.pop("listeners", [])]
    for item in overrides:
        setting, _, value = item.partition("=")
        section, _, key = setting.rpartition(".")
        if not section or not key:
            raise SystemExit(f"--set {item!r}: expected SECTION.KEY=VALUE")
        table = data
        for part in section.split("."):
            table = table.setdefault(part, {})
        table[key] = toml_value_of(value)
    sections: dict[str, dict[str, Any]] = {}

    def flatten(prefix: str, table: dict[str, Any]) -> None:
        sections[prefix] = {k: v for k, v in table.items() if not isinstance(v, dict)}
        for k, v in table.items():
            if isinstance(v, dict):
                flatten(f"{prefix}.{k}", v)

    for name, table in data.items():
        flatten(name, table)
    return sections, listeners


@dataclasses.dataclass
class Users:
    """Subscribers of the run: ``normal`` get the normal (and the resetters') mail, ``bulk``
    hold big mailboxes for the UIDL non-readers."""

    domain: str
    normal: list[str]
    bulk: list[str]

    @staticmethod
    def password(uid: str) -> str:
        return f"soak-password-{uid}"

    def address(self, uid: str) -> str:
        return f"{uid}@{self.domain}"


UNKNOWN_SETTING = re.compile(r"\.toml: (\S+): unknown setting")


def checked_appliance(make: Callable[..., Any], root: Path, sections: dict[str, dict[str, Any]],
                      listeners: list[dict[str, Any]]) -> tuple[Any, list[str]]:
    """The daemon's config, without settings of the base file that this build does not know
    (the shipped file can be ahead of the code in a working tree): those are dropped and named."""
    dropped: list[str] = []
    for _ in range(100):
        appliance = make(root, sections, listeners)
        checked = appliance.admin("user", "list")
        unknown = UNKNOWN_SETTING.search(checked.stderr)
        if checked.returncode == 0 or unknown is None:
            return appliance, dropped
        section, _, key = unknown.group(1).rpartition(".")
        if key not in sections.get(section, {}):
            return appliance, dropped  # not ours to fix: the next admin call shows the error
        del sections[section][key]
        dropped.append(unknown.group(1))
    return appliance, dropped


def prepare_users(appliance: Any, users: Users, bulk_messages: int) -> None:
    """Add the subscribers; fill each bulk mailbox's cur/ directly (before the daemon starts)."""
    for uid in users.normal + users.bulk:
        added = appliance.admin("user", "add", users.address(uid), password=Users.password(uid))
        if added.returncode:
            raise RuntimeError(f"user add {uid}: {added.stderr or added.stdout}")
    for uid in users.bulk:
        maildir = appliance.maildir_root / uid
        for sub in ("tmp", "new", "cur"):
            (maildir / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        now = int(time.time())
        for i in range(bulk_messages):
            token = f"b-{uid}-{i}"
            body = make_message(token, 300, "bulk@example.net", [users.address(uid)])
            (maildir / "cur" / f"{now}.M{i}P0Rsoak{uid}Q{i}.soak,S={len(body)}:2,").write_bytes(body)


class Sampler(threading.Thread):
    """VmRSS, open descriptors and CPU of the daemon every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        super().__init__(name="sampler", daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, int, int, float]] = []  # (monotonic, rss KiB, fds, cpu seconds)
        self.stopping = threading.Event()
        self.hwm_kib = 0

    def run(self) -> None:
        ticks = os.sysconf("SC_CLK_TCK")
        while not self.stopping.wait(self.interval):
            try:
                status = Path(f"/proc/{self.pid}/status").read_text()
                fds = len(os.listdir(f"/proc/{self.pid}/fd"))
                stat = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                return  # the daemon is gone: the report says so
            fields = {line.split(":")[0]: line.split()[1] for line in status.splitlines() if line.startswith("Vm")}
            self.hwm_kib = max(self.hwm_kib, int(fields.get("VmHWM", 0)))  # a zombie shows none
            cpu = (int(stat[11]) + int(stat[12])) / ticks
            self.samples.append((time.monotonic(), int(fields.get("VmRSS", 0)), fds, cpu))

    def between(self, start: float, end: float) -> dict[str, Any]:
        inside = [s for s in self.samples if start <= s[0] < end]
        if len(inside) < 2:
            return {"samples": len(inside)}
        return {"samples": len(inside), "rss_peak_mib": round(max(s[1] for s in inside) / 1024, 1),
                "fds_peak": max(s[2] for s in inside),
                "cpu_percent": round(100 * (inside[-1][3] - inside[0][3]) / (inside[-1][0] - inside[0][0]), 1)}


# -- normal clients (threads in this process) ----------------------------------


@dataclasses.dataclass
class Attempt:
    """One normal transaction: what was sent and what came back."""

    token: str
    recipients: list[str]
    started: float
    seconds: float = 0.0
    outcome: str = "unfinished"  # "250", another reply code, or an error name
    queue_id: str = ""


class Recorder:
    """Thread-safe lists of what the normal clients saw."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.attempts: list[Attempt] = []
        self.pop3: list[tuple[float, float, str, int]] = []  # (started, seconds, outcome, bad RETRs)

    def add(self, attempt: Attempt) -> None:
        with self.lock:
            self.attempts.append(attempt)

    def add_pop3(self, started: float, seconds: float, outcome: str, bad: int) -> None:
        with self.lock:
            self.pop3.append((started, seconds, outcome, bad))


QUEUED_AS = re.compile(r"queued as (\S+)")


def error_name(error: BaseException) -> str:
    if isinstance(error, smtplib.SMTPResponseException):
        return str(error.smtp_code)
    return type(error).__name__


def normal_sender(number: int, port: int, users: Users, rate: float, size: int, until: float,
                  recorder: Recorder, stopping: threading.Event, timeout: float) -> None:
    """Send one message per ``1/rate`` seconds until ``until`` (each in its own session)."""
    interval, next_at = 1 / rate, time.monotonic() + random.uniform(0, 1 / rate)
    sender = f"sender{number}@example.net"
    for seq in range(1_000_000):
        if stopping.wait(max(0.0, next_at - time.monotonic())) or time.monotonic() >= until:
            return
        next_at = max(next_at + interval, time.monotonic())  # behind schedule: no burst to catch up
        count = 2 if seq % 5 == 4 else 1  # every fifth message to two mailboxes (hard links)
        recipients = random.sample(users.normal, min(count, len(users.normal)))
        attempt = Attempt(f"n{number}-{seq}", recipients, time.monotonic())
        body = make_message(attempt.token, size, sender, [users.address(r) for r in recipients])
        address = f"127.{NORMAL_SENDER_BLOCK}.{number}.{seq % 50 + 1}"  # a /24 per sender, 50 addresses each
        client: smtplib.SMTP | None = None
        try:
            client = smtplib.SMTP(HOST, port, "sender.example.net", timeout, (address, 0))
            client.ehlo("sender.example.net")
            code, reply = client.mail(sender)
            if code != 250:
                raise smtplib.SMTPResponseException(code, reply)
            for r in recipients:
                code, reply = client.rcpt(users.address(r))
                if code != 250:
                    raise smtplib.SMTPResponseException(code, reply)
            code, reply = client.data(body)
            attempt.seconds = time.monotonic() - attempt.started
            attempt.outcome = str(code)
            found = QUEUED_AS.search(reply.decode(errors="replace"))
            attempt.queue_id = found.group(1) if found and code == 250 else ""
        except (OSError, smtplib.SMTPException, EOFError) as e:
            attempt.seconds, attempt.outcome = time.monotonic() - attempt.started, error_name(e)
        finally:
            recorder.add(attempt)
            if client is not None:
                try:
                    client.quit()
                except (OSError, smtplib.SMTPException):
                    client.close()


class SourcedPOP3(poplib.POP3_SSL):
    """POP3 over implicit TLS from a chosen loopback address."""

    def __init__(self, host: str, port: int, source: str, context: ssl.SSLContext, timeout: float) -> None:
        self.source = source
        super().__init__(host, port, context=context, timeout=timeout)

    def _create_socket(self, timeout: float) -> ssl.SSLSocket:
        sock = socket.create_connection((self.host, self.port), timeout, source_address=(self.source, 0))
        return self.context.wrap_socket(sock, server_hostname=self.host)


def pop3_reader(number: int, port: int, uids: list[str], interval: float, until: float,
                recorder: Recorder, stopping: threading.Event, timeout: float) -> None:
    """Every ``interval`` seconds: log in as the next of ``uids``, STAT, LIST, RETR the
    newest three, QUIT (no DELE); each RETR must end with its message's last line."""
    context = unverified_context()
    next_at = time.monotonic() + random.uniform(0, interval)
    for seq in range(1_000_000):
        if stopping.wait(max(0.0, next_at - time.monotonic())) or time.monotonic() >= until:
            return
        next_at = max(next_at + interval, time.monotonic())
        uid, started, bad, outcome = uids[seq % len(uids)], time.monotonic(), 0, "ok"
        client: SourcedPOP3 | None = None
        try:
            client = SourcedPOP3(HOST, port, f"127.{NORMAL_READER_BLOCK}.{number}.{seq % 50 + 1}", context, timeout)
            try:
                client.user(uid)
                client.pass_(Users.password(uid))
            except poplib.error_proto as e:
                outcome = "in_use" if "IN-USE" in str(e) else "login_failed"
                raise
            count, _ = client.stat()
            client.list()
            for which in range(max(1, count - 2), count + 1):
                lines = client.retr(which)[1]
                if not lines or not lines[-1].startswith(b"soak-end "):
                    bad += 1
            client.quit()
            client = None
        except (OSError, poplib.error_proto, EOFError) as e:
            outcome = outcome if outcome != "ok" else f"error:{type(e).__name__}"
        finally:
            recorder.add_pop3(started, time.monotonic() - started, outcome, bad)
            if client is not None:
                client.close()


# -- the attackers (a subprocess running asyncio) ----------------------------------


class Tally:
    """Per attacker and listener: counters, connections live now and at most."""

    def __init__(self) -> None:
        self.counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.live: collections.Counter[str] = collections.Counter()
        self.peak: collections.Counter[str] = collections.Counter()
        self.held: dict[str, float] = collections.defaultdict(float)  # longest connection the daemon allowed

    def count(self, key: str, what: str, amount: int = 1) -> None:
        self.counts[key][what] += amount

    def opened(self, key: str) -> None:
        self.count(key, "opened")
        self.live[key] += 1
        self.peak[key] = max(self.peak[key], self.live[key])

    def closed(self, key: str, seconds: float) -> None:
        self.live[key] -= 1
        self.held[key] = max(self.held[key], seconds)

    def report(self) -> dict[str, Any]:
        return {key: {**dict(counts), **({"peak_open": self.peak[key], "longest_held_s": round(self.held[key], 1)}
                                         if counts["opened"] else {})}
                for key, counts in sorted(self.counts.items())}


class Attack:
    """Every hostile client, in one event loop, until ``deadline`` (loop time)."""

    def __init__(self, plan: dict[str, Any]) -> None:
        self.plan = plan
        self.tally = Tally()
        self.loop = asyncio.get_running_loop()
        self.deadline = self.loop.time()  # set when the attack is due (``soak`` sends it)
        self.context = unverified_context()
        self.payloads = {l["role"]: self.slowloris_payload(l["role"]) for l in plan["listeners"]}

    def left(self) -> float:
        return max(0.0, self.deadline - self.loop.time())

    async def pause(self, seconds: float) -> None:
        await asyncio.sleep(min(seconds, self.left()))

    async def bounded(self, awaitable: Awaitable[T], seconds: float) -> T:
        return await asyncio.wait_for(awaitable, max(0.01, min(seconds, self.left() + 1)))

    async def connect(self, port: int, source: str, tls: bool = False,
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await self.bounded(asyncio.open_connection(
            HOST, port, local_addr=(source, 0), ssl=self.context if tls else None,
            ssl_handshake_timeout=15 if tls else None), 15)

    async def greeted(self, key: str, port: int, source: str, pop3: bool = False, tls: bool = False,
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """A session past its greeting, or None (counted: connect_failed, or refused when the
        greeting is not 220 / +OK)."""
        try:
            reader, writer = await self.connect(port, source, tls)
        except (OSError, asyncio.TimeoutError, ssl.SSLError):
            self.tally.count(key, "connect_failed")
            return None
        try:
            greeting = await self.reply(reader, pop3)
        except (OSError, asyncio.TimeoutError, ssl.SSLError):
            greeting = None
        if greeting not in ("220", "+OK"):
            self.tally.count(key, "refused")
            self.abort(writer)
            return None
        return reader, writer

    async def reply(self, reader: asyncio.StreamReader, pop3: bool = False, multiline: bool = False,
                    seconds: float = 30) -> str | None:
        """The status of the next SMTP reply ("250") or POP3 one ("+OK"/"-ERR"); None at EOF."""
        line = await self.bounded(reader.readline(), seconds)
        if not line:
            return None
        if pop3:
            if multiline and line.startswith(b"+OK"):
                for _ in range(10_000):
                    more = await self.bounded(reader.readline(), seconds)
                    if not more or more == b".\r\n":
                        break
            return "+OK" if line.startswith(b"+OK") else "-ERR"
        for _ in range(1000):
            if line[3:4] != b"-":
                break
            line = await self.bounded(reader.readline(), seconds)
        return line[:3].decode(errors="replace")

    def run(self, coroutines: list[Awaitable[None]]) -> Awaitable[None]:
        async def everything() -> None:
            tasks = [asyncio.ensure_future(c) for c in coroutines]
            await asyncio.wait(tasks, timeout=self.left() + 5)
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                    self.tally.count("attacker", f"crashed:{type(result).__name__}")
        return everything()

    @staticmethod
    def abort(writer: asyncio.StreamWriter | None) -> None:
        if writer is not None:
            writer.transport.abort()

    # slowloris: a partial request, one byte every few seconds ------------------

    def slowloris_payload(self, role: str) -> bytes:
        if role in IMPLICIT_TLS_ROLES:  # a real ClientHello, dripped
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            tls = self.context.wrap_bio(incoming, outgoing)
            try:
                tls.do_handshake()
            except ssl.SSLWantReadError:
                pass
            return outgoing.read()
        if role in HTTP_ROLES:
            return (b"GET /mail/config-v1.1.xml?emailaddress=user1%40example.org HTTP/1.1\r\n"
                    b"Host: autoconfig.example.org\r\nX-Slow: " + b"a" * 4000)
        if role in POP3_ROLES:
            return b"USER " + b"u" * 4000
        return b"EHLO " + b"h" * 4000

    async def slowloris(self, name: str, role: str, port: int, index: int, delay: float) -> None:
        key, payload, drip = f"slowloris:{name}", self.payloads[role], self.plan["drip_seconds"]
        source = source_address(SLOWLORIS_BLOCK, index, self.plan["per_address"], self.plan["networks"])
        await self.pause(delay)  # connections open at the ramp's rate, not all at once
        for _ in range(10_000):
            if not self.left():
                return
            try:
                reader, writer = await self.connect(port, source)
            except (OSError, asyncio.TimeoutError):
                self.tally.count(key, "connect_failed")
                await self.pause(random.uniform(2, 6))
                continue
            self.tally.opened(key)
            started, first = self.loop.time(), bytearray()
            gone = asyncio.ensure_future(self.discard(reader, first))
            try:
                for i in range(len(payload)):
                    await asyncio.wait([gone], timeout=min(self.left(), drip * random.uniform(0.5, 1.5)))
                    if gone.done() or not self.left():
                        break
                    writer.write(payload[i:i + 1])
                    await self.bounded(writer.drain(), STALL_SECONDS)
                else:
                    await asyncio.wait([gone], timeout=self.left())
            except (OSError, asyncio.TimeoutError):
                pass
            finally:
                held = self.loop.time() - started
                self.tally.closed(key, held)
                self.abort(writer)
                gone.cancel()
            if self.left():
                refused = first.startswith((b"421", b"-ERR", b"HTTP/1.1 503", b"HTTP/1.0 503")) or held < 1
                self.tally.count(key, "refused" if refused else "dropped_by_daemon")
                await self.pause(random.uniform(1, 3))

    @staticmethod
    async def discard(reader: asyncio.StreamReader, first: bytearray) -> None:
        """Read (and forget) until the daemon closes; keep the first bytes (the greeting)."""
        for _ in range(100_000):
            data = await reader.read(4096)
            if not data:
                return
            if len(first) < 64:
                first.extend(data[:64])

    # idle holders: a NOOP (POP3: CAPA) every minute ----------------------------

    async def idle_holder(self, name: str, role: str, port: int, index: int, delay: float) -> None:
        key, pop3 = f"idle:{name}", role in POP3_ROLES
        source = source_address(IDLE_BLOCK, index, self.plan["per_address"], self.plan["networks"])
        await self.pause(delay)  # connections open at the ramp's rate, not all at once
        for _ in range(1000):
            if not self.left():
                return
            session = await self.greeted(key, port, source, pop3, tls=role in IMPLICIT_TLS_ROLES)
            if session is None:
                await self.pause(random.uniform(5, 15))
                continue
            reader, writer = session
            self.tally.opened(key)
            started, wait = self.loop.time(), random.uniform(0, self.plan["idle_interval"])
            try:
                for _ in range(100_000):
                    await self.pause(wait)
                    if not self.left():
                        break
                    wait = self.plan["idle_interval"] * random.uniform(0.9, 1.1)
                    writer.write(b"CAPA\r\n" if pop3 else b"NOOP\r\n")
                    answer = await self.reply(reader, pop3, multiline=True)
                    if answer not in ("250", "+OK"):
                        self.tally.count(key, "dropped_by_daemon")
                        break
                    self.tally.count(key, "kept_alive")
            except (OSError, asyncio.TimeoutError, ssl.SSLError):
                self.tally.count(key, "dropped_by_daemon")
            finally:
                self.tally.closed(key, self.loop.time() - started)
                self.abort(writer)
            await self.pause(random.uniform(1, 5))

    # non-readers: pipeline without end, never read ------------------------------

    async def flood(self, key: str, writer: asyncio.StreamWriter, chunk: bytes, limit: int) -> None:
        """Write ``chunk`` until ``limit`` octets or until the daemon stops taking them."""
        sent = 0
        for _ in range(limit // len(chunk) + 1):
            if sent >= limit or not self.left():
                break
            writer.write(chunk)
            try:
                await self.bounded(writer.drain(), STALL_SECONDS)
            except asyncio.TimeoutError:
                self.tally.count(key, "pushed_back")  # the daemon stopped reading: what we want to see
                break
            sent += len(chunk)
        self.tally.count(key, "octets_sent", sent)

    async def smtp_non_reader(self, name: str, port: int, index: int) -> None:
        key = f"nonreader:{name}"
        source = source_address(NONREADER_BLOCK, index, 1, self.plan["networks"])
        chunk = b"EHLO x\r\n" * 8192
        for _ in range(1000):
            if not self.left():
                return
            writer, started = None, self.loop.time()
            try:
                session = await self.greeted(key, port, source)
                if session is None:
                    continue
                reader, writer = session
                self.tally.opened(key)
                try:
                    await self.flood(key, writer, chunk, self.plan["nonreader_octets"])
                    await self.pause(self.plan["nonreader_hold"])  # holding, reading nothing
                finally:
                    self.tally.closed(key, self.loop.time() - started)
            except (OSError, asyncio.TimeoutError):
                self.tally.count(key, "dropped_by_daemon")
            finally:
                self.abort(writer)
                await self.pause(1)

    async def pop3_non_reader(self, name: str, role: str, port: int, uid: str, index: int) -> None:
        key = f"nonreader:{name}"
        source = source_address(NONREADER_BLOCK, 100 + index, 1, self.plan["networks"])
        for _ in range(1000):
            if not self.left():
                return
            writer, started = None, self.loop.time()
            try:
                session = await self.greeted(key, port, source, pop3=True, tls=role in IMPLICIT_TLS_ROLES)
                if session is None:
                    continue
                reader, writer = session
                writer.write(f"USER {uid}\r\n".encode())
                user = await self.reply(reader, pop3=True)
                writer.write(f"PASS {Users.password(uid)}\r\n".encode())
                if user != "+OK" or await self.reply(reader, pop3=True) != "+OK":
                    self.tally.count(key, "login_refused")  # e.g. [IN-USE] while the last one lingers
                    await self.pause(2)
                    continue
                self.tally.opened(key)
                try:
                    await self.flood(key, writer, b"UIDL\r\n" * self.plan["uidl_commands"],
                                     6 * self.plan["uidl_commands"])
                    await self.pause(self.plan["nonreader_hold"])
                finally:
                    self.tally.closed(key, self.loop.time() - started)
            except (OSError, asyncio.TimeoutError, ssl.SSLError):
                self.tally.count(key, "dropped_by_daemon")
            finally:
                self.abort(writer)
                await self.pause(1)

    # resetters: a whole message, then RST right after the final dot ------------

    async def resetter(self, port: int, users: Users, index: int) -> None:
        key = "resetter:mx"
        interval = 1 / self.plan["reset_rate"]
        for seq in range(1_000_000):
            if not self.left():
                return
            next_at, writer = self.loop.time() + interval, None
            # 50 addresses each, so that connections_per_minute does not stop them before the daemon sees a reset
            source = source_address(RESETTER_BLOCK, index + self.plan["resetters"] * (seq % 50), 1,
                                    self.plan["networks"])
            try:
                session = await self.greeted(key, port, source)
                if session is None:
                    continue
                reader, writer = session
                writer.write(b"EHLO resetter.example.net\r\n")
                await self.reply(reader)
                token = f"r{index}-{seq}"
                recipient = users.address(random.choice(users.normal))
                writer.write(f"MAIL FROM:<reset@example.net>\r\nRCPT TO:<{recipient}>\r\nDATA\r\n".encode())
                codes = [await self.reply(reader) for _ in range(3)]
                if codes[-1] != "354":
                    self.tally.count(key, f"refused_{codes[-1]}")
                    continue
                writer.write(make_message(token, 3000, "reset@example.net", [recipient]) + b".\r\n")
                await self.bounded(writer.drain(), STALL_SECONDS)
                sock = writer.get_extra_info("socket")
                for _ in range(500):  # until the daemon's kernel has every octet (the final dot included)
                    if struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0] == 0:
                        break
                    await asyncio.sleep(0.001)
                await asyncio.sleep(random.uniform(0, 0.01))  # land the reset anywhere in the commit
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.tally.count(key, "reset_after_dot")
            except (OSError, asyncio.TimeoutError):
                self.tally.count(key, "failed_before_dot")
            finally:
                self.abort(writer)
                await self.pause(next_at - self.loop.time())

    # oversize senders: SIZE beyond the limit, DATA beyond the limit ------------

    async def oversize(self, port: int, users: Users, index: int) -> None:
        key, limit = "oversize:mx", self.plan["max_message_size"]
        line = b"y" * 76 + b"\r\n"
        chunk = line * 862  # ~67 KB
        for seq in range(100_000):
            if not self.left():
                return
            writer = None
            source = source_address(OVERSIZE_BLOCK, index + self.plan["oversize"] * (seq % 50), 1,
                                    self.plan["networks"])
            try:
                session = await self.greeted(key, port, source)
                if session is None:
                    continue
                reader, writer = session
                writer.write(b"EHLO big.example.net\r\n")
                await self.reply(reader)
                if seq % 2 == 0:
                    writer.write(f"MAIL FROM:<big@example.net> SIZE={limit + 1}\r\n".encode())
                    self.tally.count(key, f"mail_size_{await self.reply(reader)}")
                    continue
                token = f"o{index}-{seq}"
                writer.write(f"MAIL FROM:<big@example.net>\r\nRCPT TO:<{users.address(users.normal[0])}>\r\n"
                             f"DATA\r\n".encode())
                codes = [await self.reply(reader) for _ in range(3)]
                if codes[-1] != "354":
                    self.tally.count(key, f"data_refused_{codes[-1]}")
                    continue
                writer.write(f"From: <big@example.net>\r\nX-Soak: {token}\r\n\r\n".encode())
                sent, started = 0, self.loop.time()
                for _ in range(limit // len(chunk) + 64):
                    if sent > limit + (1 << 20) or not self.left():
                        break
                    writer.write(chunk)
                    await self.bounded(writer.drain(), 30)
                    sent += len(chunk)
                    await self.pause(started + sent / self.plan["oversize_rate"] - self.loop.time())
                if sent <= limit:  # out of time before the limit: no final dot, or a small message would count
                    self.tally.count(key, "data_unfinished_at_end")
                    continue
                writer.write(f"soak-end {token}\r\n.\r\n".encode())
                self.tally.count(key, f"data_{await self.reply(reader, seconds=60)}")
            except (OSError, asyncio.TimeoutError):
                self.tally.count(key, "dropped_by_daemon")
            finally:
                self.abort(writer)
                await self.pause(1)


async def attack_main(plan: dict[str, Any]) -> dict[str, Any]:
    attack = Attack(plan)
    users = Users(**plan["users"])
    listeners: list[dict[str, Any]] = plan["listeners"]
    port_of = {l["role"]: l["port"] for l in listeners}
    jobs: list[Awaitable[None]] = []
    n = 0
    for listener in listeners:
        for _ in range(plan["slowloris"]):
            jobs.append(attack.slowloris(listener["name"], listener["role"], listener["port"], n,
                                         n / plan["ramp_per_second"]))
            n += 1
    holders = [l for l in listeners if l["role"] in SMTP_ROLES | POP3_ROLES]
    for i in range(plan["idle"] if holders else 0):
        listener = holders[i % len(holders)]
        jobs.append(attack.idle_holder(listener["name"], listener["role"], listener["port"], i,
                                       (n + i) / plan["ramp_per_second"]))
    if "mx" in port_of:
        mx = port_of["mx"]
        jobs += [attack.smtp_non_reader("mx", mx, i) for i in range(plan["smtp_nonreaders"])]
        jobs += [attack.resetter(mx, users, i) for i in range(plan["resetters"])]
        jobs += [attack.oversize(mx, users, i) for i in range(plan["oversize"])]
    pop3 = next((l for l in listeners if l["role"] == "pop3s"), None)
    if pop3 is not None:
        jobs += [attack.pop3_non_reader(pop3["name"], pop3["role"], pop3["port"], uid, i)
                 for i, uid in enumerate(users.bulk)]
    print("ready", flush=True)
    times = json.loads(sys.stdin.readline())  # blocking is fine: nothing runs yet
    attack.deadline = times["end_at"]  # loop.time() is time.monotonic(): one clock for both processes
    await asyncio.sleep(max(0.0, times["attack_at"] - attack.loop.time()))
    await attack.run(jobs)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    attack.tally.count("attackers' process", "cpu_ms", round((usage.ru_utime + usage.ru_stime) * 1000))
    return attack.tally.report()


def attack_worker() -> None:
    """``soak.py _attack``: the plan as a JSON line on stdin, "ready" on stdout, then the
    attack's start and end (monotonic) as a JSON line on stdin, the tally as JSON on stdout."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # our side of thousands of connections
    plan = json.loads(sys.stdin.readline())
    print(json.dumps(asyncio.run(attack_main(plan))), flush=True)


# -- the audit ----------------------------------------------------------------


SIZE_IN_NAME = re.compile(r",S=(\d+)")
TOKEN_HEADER = re.compile(rb"^X-Soak: (\S+)\r?$", re.MULTILINE)


@dataclasses.dataclass
class Audit:
    """What the Maildirs hold: bad files by kind, and the whole ones by the token they carry."""

    files: int = 0
    bad: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    bad_examples: list[str] = dataclasses.field(default_factory=list)
    whole: dict[str, list[tuple[str, str]]] = dataclasses.field(default_factory=dict)  # token -> [(uid, name)]
    left_in_tmp: int = 0


def audit_maildirs(root: Path) -> Audit:
    """Every file in every Maildir's new/ and cur/: whole (size as named, own last line) or bad."""
    audit = Audit()
    if not root.is_dir():
        return audit
    for mailbox in sorted(root.iterdir()):
        if (mailbox / "tmp").is_dir():
            audit.left_in_tmp += len(os.listdir(mailbox / "tmp"))
        for sub in ("new", "cur"):
            folder = mailbox / sub
            if not folder.is_dir():
                continue
            for name in os.listdir(folder):
                audit.files += 1
                problem, token = check_file(folder / name, name)
                if problem:
                    audit.bad[problem] += 1
                    if len(audit.bad_examples) < 10:
                        audit.bad_examples.append(f"{problem}: {mailbox.name}/{sub}/{name}")
                else:
                    audit.whole.setdefault(token, []).append((mailbox.name, name))
    return audit


def check_file(path: Path, name: str) -> tuple[str, str]:
    """("", token) for a whole message, (problem, "") otherwise."""
    try:
        data = path.read_bytes()
    except OSError as e:
        return f"unreadable ({e.strerror})", ""
    if not data:
        return "empty", ""
    named = SIZE_IN_NAME.search(name)
    if named is None:
        return "no ,S= in name", ""
    if int(named.group(1)) != len(data):
        return "size differs from ,S=", ""
    found = TOKEN_HEADER.search(data, 0, 16384)
    if found is None:
        return "no X-Soak header", ""
    token = found.group(1).decode()
    if not data.endswith(b"\r\nsoak-end " + found.group(1) + b"\r\n"):
        return "truncated (last line missing)", ""
    return "", token


# -- the run ------------------------------------------------------------------


def latency_figures(attempts: list[Attempt], started: float) -> dict[str, Any]:
    """Percentiles of the 250s, and the slowest few (``at``: seconds into the run) to find in the log."""
    ok = [a.seconds for a in attempts if a.outcome == "250"]
    counted = [a.seconds if a.outcome == "250" else math.inf for a in attempts]  # a failure: slower than any
    outcomes = collections.Counter(a.outcome for a in attempts)
    slowest = sorted(attempts, key=lambda a: a.seconds, reverse=True)[:5]
    return {"transactions": len(attempts), "outcomes": dict(outcomes),
            "p50_s": rounded(percentile(ok, 50)), "p90_s": rounded(percentile(ok, 90)),
            "p99_s": rounded(percentile(ok, 99)), "max_s": rounded(max(ok) if ok else None),
            "p99_failures_as_slowest_s": rounded(percentile(counted, 99)),
            "slowest": [{"at": round(a.started - started, 1), "seconds": round(a.seconds, 3), "outcome": a.outcome,
                         "queue_id": a.queue_id} for a in slowest]}


def pop3_figures(sessions: list[tuple[float, float, str, int]]) -> dict[str, Any]:
    ok = [s[1] for s in sessions if s[2] == "ok"]
    return {"sessions": len(sessions), "outcomes": dict(collections.Counter(s[2] for s in sessions)),
            "bad_retr": sum(s[3] for s in sessions),
            "p50_s": rounded(percentile(ok, 50)), "p99_s": rounded(percentile(ok, 99))}


LOG_MARKS = {"tracebacks": "Traceback", "unhandled": "Unhandled", "bad_file_descriptor": "Bad file descriptor",
             "too_many_open_files": "Too many open files"}


def daemon_log_figures(path: Path) -> dict[str, int]:
    """Lines of the daemon's log, and how many tell of trouble."""
    figures = dict.fromkeys(["lines", *LOG_MARKS], 0)
    if path.exists():
        with path.open(errors="replace") as log:
            for line in log:
                figures["lines"] += 1
                for name, mark in LOG_MARKS.items():
                    figures[name] += mark in line
    return figures


def drain(stream: Any) -> None:
    """Read the daemon's stdout to the end, so a full pipe never blocks it."""
    for _ in iter(lambda: stream.read(65536), b""):
        pass


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Prepare, start the daemon, baseline, attack, stop, audit: the figures as a dict."""
    sys.path.insert(0, str(HERE.parent))
    from tests.daemon import Appliance

    if args.code == "checkout":  # the daemon and mailappliance-admin run this checkout's code
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))
    total = args.minutes * 60
    baseline_seconds = total * args.baseline_fraction
    root = Path(tempfile.mkdtemp(prefix="soak-"))
    users = Users("", [f"user{i}" for i in range(1, args.mailboxes + 1)],
                  [f"bulk{i}" for i in range(1, args.pop3_nonreaders + 1)])
    for attempt in range(3):  # a free port can be taken by someone else before the daemon binds it
        sections, listeners = soak_settings(Path(args.config), root, args.set)
        by_role = {l["role"]: l for l in listeners}
        if "mx" not in by_role or "pop3s" not in by_role:
            raise SystemExit("the config needs an mx and a pop3s listener")
        appliance, dropped = checked_appliance(Appliance, root, sections, listeners)
        if attempt == 0:
            if dropped:
                print(f"soak: settings of {args.config} this build does not know, left out: {', '.join(dropped)}")
            users.domain = sections["server"].get("local_domains", ["example.org"])[0]
            print(f"soak: {root}; preparing {len(users.normal)} mailboxes and {len(users.bulk)} x "
                  f"{args.bulk_messages} bulk messages", flush=True)
            prepare_users(appliance, users, args.bulk_messages)
        try:
            appliance.start(timeout=60)
            break
        except RuntimeError as e:
            if "Address already in use" not in str(e) or attempt == 2:
                raise
            print("soak: a listener's port was taken meanwhile; again with other ports", flush=True)
    result: dict[str, Any] = {"root": str(root), "minutes": args.minutes, "code": args.code, "settings": args.set,
                              "settings_left_out": dropped,
                              "listeners": {l["name"]: l["role"] for l in listeners}}
    assert appliance.process is not None
    threading.Thread(target=drain, args=(appliance.process.stdout,), daemon=True, name="drain").start()
    pid = appliance.process.pid
    sampler = Sampler(pid)
    sampler.start()
    plan = {"users": dataclasses.asdict(users),
            "listeners": [{"name": l["name"], "role": l["role"], "port": l["port"]} for l in listeners],
            "slowloris": args.slowloris, "idle": args.idle, "smtp_nonreaders": args.smtp_nonreaders,
            "resetters": args.resetters, "oversize": args.oversize,
            "drip_seconds": args.drip_seconds, "idle_interval": args.idle_interval,
            "per_address": args.per_address, "networks": args.attack_networks, "ramp_per_second": args.ramp,
            "nonreader_octets": int(args.nonreader_mib * 1024 * 1024), "nonreader_hold": args.nonreader_hold,
            "uidl_commands": args.uidl_commands, "reset_rate": args.reset_rate,
            "oversize_rate": args.oversize_mib_per_second * 1024 * 1024,
            "max_message_size": int(sections.get("smtp", {}).get("max_message_size", 25 * 1024 * 1024))}
    # The attackers' process starts (and gets ready) before the baseline, so that its start-up
    # costs no CPU in either phase; it waits for the attack on the shared monotonic clock.
    attacker = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "_attack"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert attacker.stdin is not None and attacker.stdout is not None
    recorder, stopping = Recorder(), threading.Event()
    threads: list[threading.Thread] = []
    tally: dict[str, Any] = {}
    try:
        attacker.stdin.write(json.dumps(plan) + "\n")
        attacker.stdin.flush()
        if not select.select([attacker.stdout], [], [], 60)[0] or attacker.stdout.readline().strip() != "ready":
            raise RuntimeError("the attackers' process did not get ready")
        started = time.monotonic()
        attack_at, end_at = started + baseline_seconds, started + total
        attacker.stdin.write(json.dumps({"attack_at": attack_at, "end_at": end_at}) + "\n")
        attacker.stdin.close()
        threads = [threading.Thread(target=normal_sender, daemon=True, name=f"sender{i}",
                                    args=(i, by_role["mx"]["port"], users, args.rate / args.senders, args.size,
                                          end_at, recorder, stopping, args.client_timeout))
                   for i in range(args.senders)]
        reader_uids = [users.normal[i::args.readers] for i in range(args.readers)]
        threads += [threading.Thread(target=pop3_reader, daemon=True, name=f"reader{i}",
                                     args=(i, by_role["pop3s"]["port"], reader_uids[i], args.read_interval, end_at,
                                           recorder, stopping, args.client_timeout))
                    for i in range(args.readers) if reader_uids[i]]
        for thread in threads:
            thread.start()
        print(f"soak: baseline for {baseline_seconds:.0f} s", flush=True)
        time.sleep(max(0.0, attack_at - time.monotonic()))
        print(f"soak: attack for {end_at - attack_at:.0f} s", flush=True)
        try:
            attacker.wait(max(1.0, end_at - time.monotonic()) + 60)
            output = attacker.stdout.read()
            tally = json.loads(output) if output.strip() else {"attacker": {"exit": attacker.returncode}}
        except subprocess.TimeoutExpired:
            attacker.kill()
            tally = {"attacker": {"killed_after_deadline": 1}}
    finally:
        stopping.set()
        if attacker.poll() is None:
            attacker.kill()
            attacker.wait()
        join_until = time.monotonic() + args.client_timeout * 2
        for thread in threads:
            thread.join(max(0.1, join_until - time.monotonic()))
        hung = [t.name for t in threads if t.is_alive()]
        sampler.stopping.set()
        sampler.join(5)
        daemon_alive = appliance.process.poll() is None
        hwm_kib = sampler.hwm_kib
        appliance.stop()
        for thread in threads:
            thread.join(1)
    stopped = time.monotonic()
    with recorder.lock:
        attempts, sessions = list(recorder.attempts), list(recorder.pop3)
    audit = audit_maildirs(appliance.maildir_root)
    result.update(report(attempts, sessions, audit, sampler, tally, started, attack_at, stopped, hwm_kib,
                         daemon_alive))
    result["daemon"] = {"alive_at_end": daemon_alive, "exit_code": appliance.process.returncode,
                        "log": daemon_log_figures(appliance.log_path)}
    result["client_threads_hung"] = hung
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["normal_clients_cpu_s"] = round(usage.ru_utime + usage.ru_stime, 1)  # this process: clients and audit
    if args.keep:
        result["kept"] = str(root)
    else:
        shutil.rmtree(root, ignore_errors=True)
    return result


def report(attempts: list[Attempt], sessions: list[tuple[float, float, str, int]], audit: Audit,
           sampler: Sampler, tally: dict[str, Any], started: float, attack_at: float, stopped: float,
           hwm_kib: int, daemon_alive: bool) -> dict[str, Any]:
    """The figures and the verdicts against the issue's targets."""
    baseline = [a for a in attempts if a.started < attack_at]
    attacked = [a for a in attempts if a.started >= attack_at]
    accepted = [a for a in attempts if a.outcome == "250"]
    copies_expected = sum(len(a.recipients) for a in accepted)
    copies_whole = 0
    for a in accepted:
        on_disk = audit.whole.get(a.token, [])
        copies_whole += sum(1 for uid in a.recipients
                            if any(u == uid and name.split(",")[0] == a.queue_id for u, name in on_disk))
    not_accepted = {a.token for a in attempts if a.outcome != "250"}
    delivered_without_250 = sum(1 for token in audit.whole if token in not_accepted)
    resetter_copies = sum(len(v) for token, v in audit.whole.items() if token.startswith("r"))
    oversize_copies = sum(len(v) for token, v in audit.whole.items() if token.startswith("o"))
    samples = sampler.samples
    rss_peak_mib = round(max((s[1] for s in samples), default=0) / 1024, 1)
    fds_peak = max((s[2] for s in samples), default=0)
    base_fig, attack_fig = latency_figures(baseline, started), latency_figures(attacked, started)
    b99, a99 = percentile([a.seconds if a.outcome == "250" else math.inf for a in baseline], 99), \
        percentile([a.seconds if a.outcome == "250" else math.inf for a in attacked], 99)
    ratio = (a99 / b99 if b99 and a99 is not None and not math.isinf(b99) else None)
    lost = copies_expected - copies_whole
    targets = {
        "daemon ran to the end": daemon_alive,
        "nothing lost (250s == whole copies on disk)": lost == 0 and bool(accepted),
        "no empty or truncated file": sum(audit.bad.values()) == 0,
        "RSS peak < 300 MB": max(max((s[1] for s in samples), default=0), hwm_kib) * 1024 < 300_000_000,
        "attack p99 < 5x baseline p99 (failures count as slowest)": ratio is not None and ratio < 5,
    }
    return {
        "normal_senders": {"messages_250": len(accepted), "copies_expected": copies_expected,
                           "whole_copies_on_disk": copies_whole, "lost_copies": lost,
                           "delivered_without_250": delivered_without_250},
        "maildirs": {"files": audit.files, "bad_files": sum(audit.bad.values()), "bad": dict(audit.bad),
                     "bad_examples": audit.bad_examples, "left_in_tmp": audit.left_in_tmp,
                     "resetter_copies_delivered": resetter_copies, "oversize_copies_delivered": oversize_copies},
        "daemon_resources": {"rss_peak_mib": rss_peak_mib, "vm_hwm_mib": round(hwm_kib / 1024, 1),
                             "fds_peak": fds_peak, "baseline": sampler.between(started, attack_at),
                             "attack": sampler.between(attack_at, stopped),
                             "timeline": [{"t": round(s[0] - started, 1), "rss_mib": round(s[1] / 1024, 1),
                                           "fds": s[2]} for s in samples[::10]]},
        "latency": {"baseline": base_fig, "attack": attack_fig,
                    "p99_ratio_attack_over_baseline": rounded(ratio, 2)},
        "pop3": {"baseline": pop3_figures([s for s in sessions if s[0] < attack_at]),
                 "attack": pop3_figures([s for s in sessions if s[0] >= attack_at]),
                 "logins_ok": sum(1 for s in sessions if s[2] == "ok"),
                 "logins_failed": sum(1 for s in sessions if s[2] != "ok")},
        "attackers": tally,
        "targets": {name: "PASS" if ok else "FAIL" for name, ok in targets.items()},
    }


def print_report(result: dict[str, Any]) -> None:
    n, m, r = result["normal_senders"], result["maildirs"], result["daemon_resources"]
    lat, pop = result["latency"], result["pop3"]
    print(f"\nsoak: {result['minutes']} min; daemon alive at end: {result['daemon']['alive_at_end']}; "
          f"log: {result['daemon']['log']}")
    print(f"normal senders: {n['messages_250']} got 250 ({n['copies_expected']} copies); whole copies on disk: "
          f"{n['whole_copies_on_disk']}; lost: {n['lost_copies']}; on disk without a 250: "
          f"{n['delivered_without_250']}")
    print(f"maildirs: {m['files']} files, {m['bad_files']} empty or truncated {m['bad'] or ''}; "
          f"resetters' messages delivered: {m['resetter_copies_delivered']}; oversize delivered: "
          f"{m['oversize_copies_delivered']}; left in tmp/: {m['left_in_tmp']}")
    for example in m["bad_examples"]:
        print(f"  {example}")
    print(f"daemon: RSS peak {r['rss_peak_mib']} MiB (VmHWM {r['vm_hwm_mib']} MiB), descriptors at peak "
          f"{r['fds_peak']}; baseline {r['baseline']}; attack {r['attack']}")
    print("| phase | transactions | outcomes | p50 s | p99 s | p99 s, failures as slowest | POP3 sessions | "
          "POP3 p99 s |")
    print("|---|---|---|---|---|---|---|---|")
    for phase in ("baseline", "attack"):
        f, p = lat[phase], pop[phase]
        print(f"| {phase} | {f['transactions']} | {f['outcomes']} | {f['p50_s']} | {f['p99_s']} | "
              f"{f['p99_failures_as_slowest_s']} | {p['sessions']} {p['outcomes']} | {p['p99_s']} |")
    for phase in ("baseline", "attack"):
        slowest = ", ".join(f"{a['seconds']} s ({a['outcome']}) at {a['at']} s" for a in lat[phase]["slowest"])
        print(f"slowest normal transactions, {phase}: {slowest}")
    print(f"p99 attack / baseline: {lat['p99_ratio_attack_over_baseline']}; POP3 logins ok "
          f"{pop['logins_ok']}, failed {pop['logins_failed']}")
    print("attackers:")
    for key, counts in result["attackers"].items():
        print(f"  {key}: {counts}")
    print(f"CPU of this process (normal clients, audit): {result['normal_clients_cpu_s']} s")
    if result["client_threads_hung"]:
        print(f"client threads still hung at the end: {result['client_threads_hung']}")
    for name, verdict in result["targets"].items():
        print(f"{verdict}  {name}")
    if "kept" in result:
        print(f"files kept in {result['kept']}")


def main() -> None:
    if sys.argv[1:2] == ["_attack"]:
        attack_worker()
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0, help="whole run (fractions allowed)")
    parser.add_argument("--baseline-fraction", type=float, default=1 / 3, help="share of the run without attackers")
    parser.add_argument("--json", metavar="FILE", help="write the figures there too")
    parser.add_argument("--config", default=str(HERE.parent / "etc" / "mailappliance.toml"),
                        help="base config (paths and ports are moved into the run's temp dir)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="change a setting of the base config (repeatable)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (Maildirs, log)")
    parser.add_argument("--code", choices=("checkout", "installed"), default="checkout",
                        help="run this checkout's mailappliance (PYTHONPATH) or the one installed in the venv")
    normal = parser.add_argument_group("normal clients")
    normal.add_argument("--senders", type=int, default=4, help="sender threads")
    normal.add_argument("--rate", type=float, default=2.0, help="messages per second, all senders together")
    normal.add_argument("--size", type=int, default=10240, help="message size in octets")
    normal.add_argument("--mailboxes", type=int, default=4, help="subscribers receiving the normal mail")
    normal.add_argument("--readers", type=int, default=2, help="POP3 reader threads")
    normal.add_argument("--read-interval", type=float, default=3.0, help="seconds between a reader's sessions")
    normal.add_argument("--client-timeout", type=float, default=30.0, help="socket timeout of normal clients")
    hostile = parser.add_argument_group("hostile clients (attack phase)")
    hostile.add_argument("--slowloris", type=int, default=100, help="connections per listener")
    hostile.add_argument("--drip-seconds", type=float, default=5.0, help="seconds between a slowloris' bytes")
    hostile.add_argument("--idle", type=int, default=150, help="idle holders over the SMTP and POP3 listeners")
    hostile.add_argument("--idle-interval", type=float, default=60.0, help="seconds between an idle holder's NOOPs")
    hostile.add_argument("--ramp", type=float, default=100.0,
                         help="slowloris and idle connections opened per second at the attack's start")
    hostile.add_argument("--per-address", type=int, default=10, help="slowloris/idle connections per address")
    hostile.add_argument("--attack-networks", type=int, default=4, help="/24s each kind of attacker comes from")
    hostile.add_argument("--smtp-nonreaders", type=int, default=2, help="MX clients pipelining EHLO x, never reading")
    hostile.add_argument("--nonreader-mib", type=float, default=8.0, help="MiB a non-reader pipelines per connection")
    hostile.add_argument("--nonreader-hold", type=float, default=20.0, help="seconds it then holds, reading nothing")
    hostile.add_argument("--pop3-nonreaders", type=int, default=1, help="pop3s clients pipelining UIDL (each has "
                         "its own bulk mailbox)")
    hostile.add_argument("--bulk-messages", type=int, default=10000, help="messages in each bulk mailbox")
    hostile.add_argument("--uidl-commands", type=int, default=200, help="UIDLs pipelined per connection")
    hostile.add_argument("--resetters", type=int, default=4, help="clients resetting right after the final dot")
    hostile.add_argument("--reset-rate", type=float, default=2.0, help="messages per second per resetter")
    hostile.add_argument("--oversize", type=int, default=1, help="clients sending beyond the size limit")
    hostile.add_argument("--oversize-mib-per-second", type=float, default=4.0, help="their DATA rate")
    args = parser.parse_args()
    if args.minutes <= 0 or not 0 < args.baseline_fraction < 1 or args.rate <= 0 or args.senders < 1:
        parser.error("--minutes and --rate must be positive, --baseline-fraction between 0 and 1, --senders >= 1")
    args.readers = max(0, min(args.readers, args.mailboxes))
    result = run(args)
    print_report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    sys.exit(0 if all(v == "PASS" for v in result["targets"].values()) else 1)


if __name__ == "__main__":
    main()
