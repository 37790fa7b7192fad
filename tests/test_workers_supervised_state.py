"""[server] workers = 2 WITHOUT Redis: the supervisor serves its state store to worker 1, so an
hourly limit and a POP3 lock hold across both processes, also after worker 1 is killed and restarted."""

from __future__ import annotations

import json
import os
import signal
import socket
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from mailappliance.smtp.replies import LIMIT_REPLIES
from tests.conditions import wait_until
from tests.daemon import Appliance, free_port
from tests.test_workers import _submit, serving_pid, worker_pids
from tests.test_workers import test_a_pop3_session_in_one_process_locks_the_mailbox_in_the_other as _pop3_lock

MESSAGES_PER_HOUR = 3
SHARED = "state store: shared in the supervisor's store"


@pytest.fixture(scope="module")
def supervised(tmp_path_factory: pytest.TempPathFactory, pki: Any) -> Iterator[Appliance]:
    """One daemon with two processes and no [state] redis."""
    root = tmp_path_factory.mktemp("supervised")
    sections: dict[str, dict[str, Any]] = {
        "server": {"hostname": "mx.test.example", "local_domains": ["example.org"], "workers": 2},
        "storage": {"maildir_root": str(root / "mail"), "spool_dir": str(root / "spool")},
        "directory": {"backend": "ldif", "ldif_file": str(root / "users.ldif")},
        "auth": {"failures_before_delay": 1000},
        "tls": {"certificate": str(pki.server_cert), "private_key": str(pki.server_key),
                "generate_self_signed": False},
        "limits": {"messages_per_hour": MESSAGES_PER_HOUR, "connections_per_minute": 100_000},
    }
    listeners = [{"name": role, "role": role, "address": "127.0.0.1", "port": free_port()}
                 for role in ("mx", "submissions", "pop3s", "metrics")]
    instance = Appliance(root, sections, listeners, pki=pki)
    for name in ("alice", "reader", "sender", "later"):
        assert instance.admin("user", "add", f"{name}@example.org", password=f"{name}-password").returncode == 0
    instance.start()
    wait_until(lambda: worker_pids(instance) and SHARED in instance.log(), 30, what="worker 1 ready and shared")
    try:
        yield instance
    finally:
        instance.stop()


def _limit_holds_across_processes(instance: Appliance, user: str, must_reach: int | None = None) -> None:
    results = [_submit(instance, user) for _ in range(MESSAGES_PER_HOUR + 2)]
    pids = {pid for _, pid in results}
    while len(pids) < 2 or (must_reach is not None and must_reach not in pids):
        assert len(results) < 60, f"sessions landed only in {pids}"
        results.append(_submit(instance, user))
        pids.add(results[-1][1])
    codes = [code for code, _ in results]
    assert codes.count(250) == MESSAGES_PER_HOUR, results
    assert set(codes) == {250, LIMIT_REPLIES["limit.messages_per_hour"].code}, results


def test_a_subscribers_hourly_limit_holds_across_processes_without_redis(supervised: Appliance) -> None:
    """messages_per_hour = 3, sessions served by both processes, no Redis: exactly 3 accepted in all."""
    _limit_holds_across_processes(supervised, "sender")


def test_a_pop3_lock_holds_across_processes_without_redis(supervised: Appliance) -> None:
    """A POP3 session in one process: a login to the same mailbox served by the other gets [IN-USE]."""
    _pop3_lock(supervised)


def test_health_says_the_state_is_shared(supervised: Appliance) -> None:
    """/health reports the supervisor's served store as shared ("ok"), not per-process "memory"."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{supervised.ports['metrics']}/health", timeout=10).read()
    assert json.loads(body)["state_store"] == "ok"


def _pop3_login_in(instance: Appliance, pid: int, user: str) -> Any:
    """A POP3 session of ``user`` served by process ``pid`` (connections land where they may)."""
    context = instance.client_context()
    for _ in range(200):
        client = socket.create_connection(("127.0.0.1", instance.ports["pop3s"]), timeout=10)
        if serving_pid(instance, "pop3s", client) != pid:
            client.close()
            continue
        tls = context.wrap_socket(client, server_hostname="127.0.0.1")
        reader = tls.makefile("rb")
        assert reader.readline().startswith(b"+OK")
        tls.sendall(f"USER {user}\r\nPASS {user.split('@')[0]}-password\r\n".encode())
        assert reader.readline().startswith(b"+OK")
        assert reader.readline().startswith(b"+OK"), "the mailbox was not free"
        return tls
    pytest.fail(f"no POP3 connection reached pid {pid}")


def test_a_killed_worker_comes_back_to_the_shared_state(supervised: Appliance) -> None:
    """kill -9 of worker 1 in a POP3 session: its mailbox lock is free at once (not after the
    lease), the new worker asks the supervisor again, and a limit holds across both."""
    (old,) = worker_pids(supervised)
    shared_before = supervised.log().count(SHARED)
    session = _pop3_login_in(supervised, old, "reader@example.org")
    os.kill(old, signal.SIGKILL)
    session.close()
    new = wait_until(lambda: [p for p in worker_pids(supervised) if p != old], 30, what="a new worker 1")[0]
    assert supervised.process is not None
    _pop3_login_in(supervised, supervised.process.pid, "reader@example.org").close()  # lock_ttl is 60 s
    wait_until(lambda: supervised.log().count(SHARED) > shared_before, 30, what="the new worker shared again")
    _limit_holds_across_processes(supervised, "later", must_reach=new)
    assert "DEGRADED" not in supervised.log()
