"""[server] workers = 2 with the real twistd: both processes accept, limits and POP3 locks
hold across them, a killed worker is restarted; plus the pure parts (config, shares, delays)."""

from __future__ import annotations

import base64
import os
import re
import signal
import smtplib
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailappliance.config import ConfigError, load_config
from mailappliance.settings import LimitSettings
from mailappliance.smtp.replies import LIMIT_REPLIES
from mailappliance.state.memory import MemoryStore
from mailappliance.workers import (
    FREE_RESTARTS,
    MAX_RESTART_DELAY,
    SharedRateLimits,
    accept_one_at_a_time,
    restart_delay,
    share_of_limits,
)
from tests.conditions import wait_until
from tests.daemon import BIN, Appliance, free_port
from tests.redis_server import RedisServer
from tests.test_privileges import world_readable_root as world_readable_root  # the fixture

MESSAGES_PER_HOUR = 3
PER_ADDRESS = 6  # concurrent connections per client address, for the whole server (3 per process)
QUEUED_AS = re.compile(rb"queued as \S+?P(\d+)R")


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer, pki: Any) -> Iterator[Appliance]:
    """One daemon with two processes (the supervisor and worker 1), its state in Redis."""
    redis_server.start()
    redis_server.command(b"FLUSHALL")
    root = tmp_path_factory.mktemp("workers")
    sections: dict[str, dict[str, Any]] = {
        "server": {"hostname": "mx.test.example", "local_domains": ["example.org"], "workers": 2},
        "storage": {"maildir_root": str(root / "mail"), "spool_dir": str(root / "spool"), "sync": "fsync"},
        "directory": {"backend": "ldif", "ldif_file": str(root / "users.ldif")},
        "auth": {"failures_before_delay": 1000},
        "tls": {"certificate": str(pki.server_cert), "private_key": str(pki.server_key),
                "generate_self_signed": False},
        "limits": {"messages_per_hour": MESSAGES_PER_HOUR, "concurrent_per_address": PER_ADDRESS,
                   "connections_per_minute": 100_000},
        "state": {"redis": redis_server.url, "timeout": 1},
        "logging": {"json_file": str(root / "log.json")},
    }
    listeners = [{"name": role, "role": role, "address": "127.0.0.1", "port": free_port()}
                 for role in ("mx", "submissions", "pop3s", "metrics")]
    instance = Appliance(root, sections, listeners, pki=pki)
    for name in ("alice", "reader", "sender"):
        assert instance.admin("user", "add", f"{name}@example.org", password=f"{name}-password").returncode == 0
    instance.start()
    wait_until(lambda: worker_pids(instance), 30, what="worker 1 ready")
    try:
        yield instance
    finally:
        instance.stop()


def worker_pids(instance: Appliance) -> list[int]:
    """Live worker processes of the supervisor (children running mailappliance.worker_main)."""
    assert instance.process is not None
    found = []
    for child in _children(instance.process.pid):
        try:
            command = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"mailappliance.worker_main" in command and f"worker 1 ready (pid {child})" in instance.log():
            found.append(child)
    return found


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def serving_pid(instance: Appliance, listener: str, client: socket.socket) -> int:
    """The pid of the process holding the server side of ``client``'s connection."""
    local_port = client.getsockname()[1]
    out = subprocess.run(["ss", "-tnpH", "state", "established",
                          f"( sport = :{instance.ports[listener]} and dport = :{local_port} )"],
                         capture_output=True, text=True, check=True).stdout
    pids = {int(p) for p in re.findall(r"pid=(\d+)", out)}
    assert len(pids) == 1, out
    return pids.pop()


def send_one(instance: Appliance, number: int) -> int:
    """One message over its own MX connection; the pid in the queue id of the 250."""
    with smtplib.SMTP("127.0.0.1", instance.ports["mx"], timeout=10) as smtp:
        smtp.ehlo("client.example.net")
        smtp.mail("bob@example.net")
        smtp.rcpt("alice@example.org")
        code, reply = smtp.data(f"Subject: {number}\r\n\r\nbody {number}\r\n".encode())
    assert code == 250, reply
    match = QUEUED_AS.search(reply)
    assert match, reply
    return int(match.group(1))


def test_connections_are_served_by_both_processes_and_delivered(workers: Appliance) -> None:
    """Mail arriving on one MX port is taken by the supervisor and by the worker, and every 250 is in the Maildir."""
    supervisor = workers.process.pid if workers.process else 0
    seen: set[int] = set()
    sent = 0
    while len(seen) < 2:
        assert sent < 200, f"only {seen} served 200 connections"
        seen.add(send_one(workers, sent))
        sent += 1
    assert seen == {supervisor, *worker_pids(workers)}
    new = workers.maildir_root / "alice" / "new"
    wait_until(lambda: len(os.listdir(new)) >= sent, 10, what=f"{sent} messages in alice's Maildir")


def test_the_per_address_cap_holds_for_the_whole_server(workers: Appliance) -> None:
    """concurrent_per_address = 6 with two processes: never more than 6 sessions from one address at once."""
    held = []
    try:
        greeted = 0
        for _ in range(4 * PER_ADDRESS):
            client = socket.create_connection(("127.0.0.1", workers.ports["mx"]), timeout=10)
            held.append(client)
            greeting = client.recv(200)
            if greeting.startswith(b"220"):
                greeted += 1
            else:
                assert greeting.startswith(b"421 4.7.0"), greeting
        assert PER_ADDRESS // 2 <= greeted <= PER_ADDRESS
    finally:
        for client in held:
            client.close()


def _submit(instance: Appliance, user: str) -> tuple[int, int]:
    """One message on its own submissions connection; (reply code to MAIL, serving pid)."""
    context = instance.client_context()
    with smtplib.SMTP_SSL("127.0.0.1", instance.ports["submissions"], timeout=10, context=context) as smtp:
        pid = serving_pid(instance, "submissions", smtp.sock)
        smtp.ehlo("client.example.net")
        token = base64.b64encode(f"\0{user}@example.org\0{user}-password".encode()).decode()
        assert smtp.docmd("AUTH", f"PLAIN {token}")[0] == 235
        code = smtp.docmd("MAIL", f"FROM:<{user}@example.org>")[0]
        if code == 250:
            assert smtp.docmd("RCPT", "TO:<alice@example.org>")[0] == 250
            assert smtp.data(b"Subject: hourly\r\n\r\nbody\r\n")[0] == 250
    return code, pid


def test_a_subscribers_hourly_limit_holds_across_processes(workers: Appliance) -> None:
    """messages_per_hour = 3, sessions served by both processes: exactly 3 messages accepted in all."""
    results = [_submit(workers, "sender") for _ in range(MESSAGES_PER_HOUR + 2)]
    while len({pid for _, pid in results}) < 2:
        assert len(results) < 60, "every session landed in one process"
        results.append(_submit(workers, "sender"))
    codes = [code for code, _ in results]
    assert codes.count(250) == MESSAGES_PER_HOUR, results
    assert set(codes) == {250, LIMIT_REPLIES["limit.messages_per_hour"].code}, results


def test_a_pop3_session_in_one_process_locks_the_mailbox_in_the_other(workers: Appliance) -> None:
    """One POP3 session per mailbox across processes: a login served by the other process gets [IN-USE]."""
    context = workers.client_context()
    first = workers.pop3("reader@example.org", "reader-password")
    try:
        holder = serving_pid(workers, "pop3s", first.sock)
        for _ in range(100):
            client = socket.create_connection(("127.0.0.1", workers.ports["pop3s"]), timeout=10)
            if serving_pid(workers, "pop3s", client) == holder:
                client.close()
                continue
            with context.wrap_socket(client, server_hostname="127.0.0.1") as tls:
                reader = tls.makefile("rb")
                assert reader.readline().startswith(b"+OK")
                tls.sendall(b"USER reader@example.org\r\n")
                assert reader.readline().startswith(b"+OK")
                tls.sendall(b"PASS reader-password\r\n")
                assert reader.readline().startswith(b"-ERR [IN-USE]")
            break
        else:
            pytest.fail("no POP3 connection reached the other process")
    finally:
        first.quit()


def test_the_log_says_which_worker_wrote_each_event(workers: Appliance) -> None:
    """The worker's events reach the supervisor's JSON log with worker and worker_pid."""
    log = (workers.root / "log.json").read_text()
    assert re.search(r'"worker":1,"worker_pid":\d+', log) or re.search(r'"worker": ?1', log)


def test_a_killed_worker_is_restarted_and_mail_keeps_flowing(workers: Appliance) -> None:
    """kill -9 of worker 1: the supervisor starts a new one, which takes mail again."""
    (old,) = worker_pids(workers)
    os.kill(old, signal.SIGKILL)
    new = wait_until(lambda: [p for p in worker_pids(workers) if p != old], 30, what="a new worker 1")[0]
    assert f"worker 1 (pid {old}) ended" in workers.log()
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{workers.ports['metrics']}/metrics", timeout=10).read()
    assert b"mailappliance_worker_processes 2.0" in metrics and b"mailappliance_worker_restarts 1.0" in metrics
    for number in range(200):
        if send_one(workers, 1000 + number) == new:
            return
    pytest.fail("the restarted worker took no mail")


# -- the pure parts -------------------------------------------------------------------


def _config(tmp_path: Path, server: str, rest: str = "") -> Path:
    path = tmp_path / "mailappliance.toml"
    path.write_text(f'[server]\nhostname = "mx.example.org"\nlocal_domains = ["example.org"]\n{server}\n'
                    f'[storage]\nmaildir_root = "mail"\nspool_dir = "spool"\n{rest}\n'
                    '[[listeners]]\nrole = "mx"\nport = 2525\n')
    return path


def test_workers_without_redis_share_the_supervisors_store(tmp_path: Path) -> None:
    """workers = 2 without [state] redis is a valid config: the supervisor serves its store to the workers."""
    settings = load_config(_config(tmp_path, "workers = 2"))
    assert settings.workers == 2 and not settings.state.redis


def test_workers_default_to_one_journal_each(tmp_path: Path) -> None:
    """workers = 2 takes sync = "journal" by default (each process its own journal); fsync stays selectable."""
    redis = '[state]\nredis = "redis://127.0.0.1:6379"'
    assert load_config(_config(tmp_path, "workers = 2", redis)).sync == "journal"
    assert load_config(_config(tmp_path, "workers = 2", 'sync = "fsync"\n' + redis)).sync == "fsync"


@pytest.mark.parametrize("value", ["0", "65", '"many"', "true", "1.5"])
def test_workers_must_be_a_count_or_auto(tmp_path: Path, value: str) -> None:
    """workers is 1 to 64 or "auto"; anything else is a config error naming the key."""
    with pytest.raises(ConfigError, match=r"server\.workers"):
        load_config(_config(tmp_path, f"workers = {value}"))


def test_workers_auto_is_the_number_of_cores(tmp_path: Path) -> None:
    """workers = "auto" runs one process per core; the default is one process."""
    redis = '[state]\nredis = "redis://127.0.0.1:6379"'
    assert load_config(_config(tmp_path, 'workers = "auto"', 'sync = "fsync"\n' + redis)).workers == (
        os.cpu_count() or 1)
    assert load_config(_config(tmp_path, "")).workers == 1


def test_a_shared_port_takes_one_connection_per_wake_up() -> None:
    """A listening port the processes share accepts one connection each time the reactor
    reads it, although Twisted raises its count after every full round (a burst would
    otherwise all go to the process that woke first)."""

    class Port:
        numberAccepts = 100
        seen: list[int] = []

        def doRead(self) -> None:
            self.seen.append(self.numberAccepts)
            self.numberAccepts += 20  # what tcp.Port does after accepting all it may

    port = Port()
    accept_one_at_a_time(port)
    for _ in range(3):
        port.doRead()
    assert port.seen == [1, 1, 1]


def test_restart_delay_grows_after_a_few_quick_exits() -> None:
    """The first short-lived runs restart at once, more in a row double the wait, up to a minute."""
    assert [restart_delay(streak) for streak in range(1, FREE_RESTARTS + 1)] == [0] * FREE_RESTARTS
    assert restart_delay(FREE_RESTARTS + 1) == 2
    assert restart_delay(FREE_RESTARTS + 2) == 4
    assert restart_delay(40) == restart_delay(10**6) == MAX_RESTART_DELAY


def test_each_process_enforces_its_share_of_the_connection_caps() -> None:
    """Two processes: each counts half of every connection cap, so together they keep the configured numbers."""
    limits = LimitSettings(connections_per_minute=60, concurrent_per_address=20, concurrent_per_network=5,
                           max_connections=1000, messages_per_hour=200)
    shared = share_of_limits(limits, 2)
    assert (shared.connections_per_minute, shared.concurrent_per_address, shared.concurrent_per_network,
            shared.max_connections, shared.messages_per_hour) == (30, 10, 2, 500, 200)
    assert share_of_limits(LimitSettings(concurrent_per_address=1), 4).concurrent_per_address == 1
    assert share_of_limits(limits, 1) is limits


def test_the_shares_follow_a_reload() -> None:
    """SIGHUP assigns new limits: the process keeps counting its share of them, listener caps too."""
    from twisted.internet.task import Clock

    clock = Clock()
    limits = SharedRateLimits(LimitSettings(concurrent_per_address=20), clock, MemoryStore(clock), 2)
    assert limits.settings.concurrent_per_address == 10
    limits.settings = LimitSettings(concurrent_per_address=8)
    assert limits.settings.concurrent_per_address == 4
    limits.set_listener_caps({"mx": 100, "pop3": 0})
    for number in range(50):
        assert limits.connection_opened(f"10.{number}.0.1", "mx") is None
    refused = limits.connection_opened("198.51.100.1", "mx")
    assert refused is not None and refused.rule == "limit.max_connections"


@pytest.mark.parametrize("state", ["redis away", "the supervisor's"])
def test_started_as_root_the_workers_run_as_the_daemons_user(world_readable_root: Path, state: str) -> None:  # noqa: F811
    """twistd --uid/--gid on a port below 1024: the worker runs as nobody too, on the supervisor's socket,
    and shares the supervisor's state store (made after the drop) when there is no Redis."""
    from tests.daemon import toml_table  # noqa: I001
    from tests.test_privileges import (DEBIAN_PYTHON, NOBODY, free_low_port, readable_site, root_started_config,
                                       wait_for_listener)

    root = world_readable_root
    site = readable_site(root)
    mx = free_low_port(set())
    config = root / "mailappliance.toml"
    config.write_text(
        root_started_config(root, workers=2)
        + toml_table("[limits]", {"connections_per_minute": 100_000})
        + toml_table("[directory]", {"backend": "ldif", "ldif_file": str(root / "users.ldif")})
        + (toml_table("[state]", {"redis": f"redis://127.0.0.1:{free_port()}", "timeout": 0.2})  # none there
           if state == "redis away" else "")
        + toml_table("[[listeners]]", {"name": "mx", "role": "mx", "port": mx})
    )
    added = subprocess.run([str(BIN / "mailappliance-admin"), "--config", str(config), "user", "add",
                            "alice@example.org", "--password-stdin"], input="alice-password\n",
                           capture_output=True, text=True)
    assert added.returncode == 0, added.stderr
    (root / "users.ldif").chmod(0o644)
    log = root / "twistd.log"
    process = subprocess.Popen(
        [DEBIAN_PYTHON, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
         "-n", "--pidfile=", "--logfile", str(log), f"--uid={NOBODY}", f"--gid={NOBODY}",
         "mailappliance", "--config", str(config)],
        cwd=root, env={**os.environ, "PYTHONPATH": str(site)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        wait_for_listener(process, mx, log)
        worker = int(wait_until(lambda: re.search(r"worker 1 ready \(pid (\d+)\)", log.read_text()), 30,
                                what="worker 1 ready").group(1))
        status = Path(f"/proc/{worker}/status").read_text()
        assert next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:] == [str(NOBODY)] * 4
        seen: set[int] = set()
        for number in range(200):
            with smtplib.SMTP("127.0.0.1", mx, timeout=10) as smtp:
                smtp.ehlo("client.example.net")
                smtp.mail("friend@example.net")
                smtp.rcpt("alice@example.org")
                code, reply = smtp.data(f"Subject: {number}\r\n\r\nbody\r\n".encode())
            assert code == 250, reply
            seen.add(int(QUEUED_AS.search(reply).group(1)))  # type: ignore[union-attr]
            if len(seen) == 2:
                break
        assert seen == {process.pid, worker}
        if state == "the supervisor's":
            wait_until(lambda: "state store: shared in the supervisor's store" in log.read_text(), 10,
                       what="worker 1 sharing the supervisor's store")
    finally:
        process.terminate()
        process.wait(10)


def test_each_process_keeps_its_share_of_the_mx_byte_budget() -> None:
    """mx_bytes_per_hour_per_network with two processes: each lets a network send half, also after a reload."""
    from twisted.internet.task import Clock

    from mailappliance.workers import SharedByteBudget

    budget = SharedByteBudget(1000, Clock(), 2)
    assert budget.settings == 500
    assert budget.may_receive("192.0.2.1", 500) and not budget.may_receive("192.0.2.1", 501)
    budget.settings = 0
    assert budget.settings == 0 and budget.may_receive("192.0.2.1", 10**9)  # 0 is still "off"


def test_a_workers_failure_keeps_its_message_in_the_supervisors_log() -> None:
    """A failure logged in a worker reaches the supervisor with its message (JSON carries no exception objects)."""
    import io

    from twisted.logger import LogLevel, globalLogPublisher
    from twisted.python.failure import Failure

    from mailappliance.workers import WorkerSupervisor, _JsonLines, _Worker

    stream = io.StringIO()
    try:
        raise OSError(28, "No space left on device")
    except OSError:
        failure = Failure()
    _JsonLines(stream)({"log_format": "commit failed", "log_failure": failure, "log_level": LogLevel.error,
                        "log_namespace": "mailappliance.storage", "log_time": 1.0})
    worker = _Worker(WorkerSupervisor.__new__(WorkerSupervisor), 1, b"")
    worker.pid = 4343
    relayed: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(relayed.append)
    try:
        worker.childDataReceived(1, stream.getvalue().encode())
    finally:
        globalLogPublisher.removeObserver(relayed.append)
    [event] = [e for e in relayed if e.get("worker_pid") == 4343]
    assert event["log_failure"].getErrorMessage() == "[Errno 28] No space left on device"
    assert "worker_error" not in event
