"""Hostile: many POP3 clients DELE a just-delivered message another worker process journaled
and QUIT at once, while that process never checkpoints (stopped).  Their waits hold no thread:
a normal POP3 session and an SMTP delivery still complete promptly, every QUIT is answered
within the bound (-ERR, nothing deleted), and the messages are all still there."""

from __future__ import annotations

import os
import poplib
import signal
import smtplib
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from mailappliance.journal import read_coverage
from tests.conditions import wait_until
from tests.redis_server import RedisServer
from tests.test_crash import message
from tests.test_workers import worker_pids
from tests.test_workers_journal import _journal_workers, _start

CHECKPOINT = 2.0  # seconds (MAILAPPLIANCE_CHECKPOINT_SECONDS): QUIT waits at most three of them
CLIENTS = 6  # more than the storage threads below: a wait that held a thread would starve the rest
PROMPT = 2.0  # seconds a normal session may take while the waits run


def _send(port: int, user: str, token: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.sendmail("friend@example.net", [f"{user}@example.org"], message(token))


def test_quit_waits_for_another_journal_are_bounded_and_starve_nobody(
        tmp_path: Path, redis_server: RedisServer, pki: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Six QUITs wait on a stopped process's journal: others are served meanwhile; each QUIT answers -ERR in time."""
    monkeypatch.setenv("MAILAPPLIANCE_CHECKPOINT_SECONDS", str(CHECKPOINT))
    instance = _journal_workers(tmp_path, redis_server, pki, threads=2)
    users = [f"u{n}" for n in range(CLIENTS)]
    for user in [*users, "other"]:
        assert instance.admin("user", "add", f"{user}@example.org", password=f"{user}-password").returncode == 0
    try:
        supervisor = _start(instance)
        [worker] = worker_pids(instance)
        os.kill(worker, signal.SIGSTOP)  # every delivery goes to the supervisor's journal
        try:
            _send(instance.ports["mx"], "other", "warm-up")  # takes the checkpoint an idle journal does at once
            for user in users:
                _send(instance.ports["mx"], user, f"just-{user}")
        finally:
            os.kill(worker, signal.SIGCONT)
        os.kill(supervisor, signal.SIGSTOP)  # and it never checkpoints them: every POP3 session is the worker's
        try:
            assert not read_coverage(instance.root / "spool" / "journal").idle, "the test needs pending records"
            answers: dict[str, tuple[bytes, float]] = {}
            quitting: list[str] = []

            def dele_and_quit(user: str) -> None:
                client = instance.pop3(f"{user}@example.org", f"{user}-password")
                client.dele(1)
                started = time.monotonic()
                quitting.append(user)
                try:
                    answer = client.quit()
                except poplib.error_proto as e:
                    answer = e.args[0]
                answers[user] = (answer, time.monotonic() - started)

            threads = [threading.Thread(target=dele_and_quit, args=(user,)) for user in users]
            for thread in threads:
                thread.start()
            wait_until(lambda: len(quitting) == CLIENTS, 10, what="every client at QUIT")
            assert not answers, "QUIT answered before the other journal covered the message"
            started = time.monotonic()
            client = instance.pop3("other@example.org", "other-password")
            assert client.stat()[0] == 1
            client.quit()
            _send(instance.ports["mx"], "other", "during")
            assert time.monotonic() - started < PROMPT, "a normal session waited behind the QUIT waits"
            for thread in threads:
                thread.join(3 * CHECKPOINT + 10)
            assert sorted(answers) == users
            for user, (answer, took) in answers.items():
                assert answer.startswith(b"-ERR [SYS/TEMP]"), (user, answer)
                assert took < 3 * CHECKPOINT + 3, (user, took)
                assert len(list((instance.maildir_root / user).glob("*/*,S=*"))) == 1, f"{user}'s message is gone"
        finally:
            os.kill(supervisor, signal.SIGCONT)
        # once that journal checkpoints, the same deletion goes through
        wait_until(lambda: read_coverage(instance.root / "spool" / "journal").idle, 10, what="checkpointed")
        client = instance.pop3("u0@example.org", "u0-password")
        client.dele(1)
        assert client.quit().startswith(b"+OK")
        assert not list((instance.maildir_root / "u0").glob("*/*,S=*"))
    finally:
        instance.stop()
