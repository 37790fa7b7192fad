"""A hung disk under the spill writer (a RAID rebuild, an NFS hiccup, a dying SSD)
while clients stream large messages: only those sessions stop reading; the
event loop keeps serving everyone else, and every message that got a 250 is
whole once the disk comes back.  Large messages already past their final dot
wait for their own file only: the commit threads go on giving other messages
their 250 (an attacker who slows our disk costs the large senders, not everyone)."""

from __future__ import annotations

import poplib
import smtplib
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from mailappliance.maildir import TEST_STALL_ENVIRONMENT
from tests.conditions import wait_until
from tests.daemon import Appliance

MiB = 1024 * 1024
BIG_CLIENTS = 3
BIG_SIZE = 20 * MiB  # each past the spill writer's 16 MiB backlog: none can complete while the disk hangs
PROMPT = 5.0  # seconds an unrelated session may take while the disk hangs (a loaded test machine)


def big_message(n: int) -> bytes:
    line = b"%d " % n + b"x" * 75 + b"\r\n"
    lines = [b"%08d " % i + line for i in range(BIG_SIZE // (len(line) + 9))]
    return b"Subject: big %d\r\n\r\n" % n + b"".join(lines)


def metric(instance: Appliance, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{instance.ports['metrics']}/metrics", timeout=5) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def spill_waits(instance: Appliance) -> float:
    return metric(instance, "mailappliance_spill_waits_total")


def waiting_for_disk(instance: Appliance) -> float:
    return metric(instance, "mailappliance_commit_waiting_for_disk")


def test_a_hung_disk_pauses_only_the_large_senders(
        appliance: Callable[..., Appliance], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three clients (one over STARTTLS) send 20 MiB messages while the spill writer's disk hangs: their sessions pause
    (the metric counts it), a small-message SMTP session and a POP3 login meanwhile each complete
    within seconds; when the disk comes back all three get their 250 and are stored whole."""
    stall = tmp_path / "hung-disk"
    stall.touch()
    monkeypatch.setenv(TEST_STALL_ENVIRONMENT, str(stall))
    instance = appliance(start=False, plaintext_pop3=True)
    for user in ("alice", "bob"):
        assert instance.admin("user", "add", f"{user}@example.org", password=f"{user}-password").returncode == 0
    instance.start()
    results: dict[int, object] = {}

    def send_big(n: int) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", instance.ports["mx"], timeout=120) as smtp:
                if n == 0:  # one over TLS: pausing must reach the TCP connection under it
                    smtp.starttls(context=instance.client_context())
                results[n] = smtp.sendmail("big@example.net", ["alice@example.org"], big_message(n))
        except Exception as e:  # reported below
            results[n] = e

    senders = [threading.Thread(target=send_big, args=(n,), daemon=True) for n in range(BIG_CLIENTS)]
    try:
        for sender in senders:
            sender.start()
        wait_until(lambda: spill_waits(instance) > 0, what="a large sender paused by the full backlog")

        started = time.monotonic()
        with smtplib.SMTP("127.0.0.1", instance.ports["mx"], timeout=PROMPT) as smtp:
            assert smtp.sendmail("friend@example.net", ["bob@example.org"], b"Subject: small\r\n\r\nhi\r\n") == {}
        smtp_seconds = time.monotonic() - started
        started = time.monotonic()
        pop = poplib.POP3("127.0.0.1", instance.ports["pop3"], timeout=PROMPT)
        pop.user("bob@example.org")
        pop.pass_("bob-password")
        assert pop.stat()[0] == 1
        pop.quit()
        pop_seconds = time.monotonic() - started
        print(f"while the disk hangs: SMTP {smtp_seconds:.3f} s, POP3 login {pop_seconds:.3f} s")
        assert smtp_seconds < PROMPT and pop_seconds < PROMPT, (smtp_seconds, pop_seconds)
        assert not results and all(sender.is_alive() for sender in senders), "a 250 before the disk wrote"
    finally:
        stall.unlink()
    for sender in senders:
        sender.join(120)
    assert results == {n: {} for n in range(BIG_CLIENTS)}
    stored = sorted(path.read_bytes() for path in (instance.maildir_root / "alice" / "new").iterdir())
    assert len(stored) == BIG_CLIENTS
    for n in range(BIG_CLIENTS):
        assert sum(body.endswith(b"\r\n" + big_message(n)) for body in stored) == 1, f"message {n} not whole"


STUCK_CLIENTS = 4  # more than the commit threads and the sync pool's threads: every one of them busy
STUCK_SIZE = 2 * MiB  # past memory's share (spilled), and all four within the spill writer's backlog


def stuck_message(n: int) -> bytes:
    line = b"%d " % n + b"y" * 75 + b"\r\n"
    return b"Subject: stuck %d\r\n\r\n" % n + b"".join(b"%08d " % i + line for i in range(STUCK_SIZE // 88))


def test_large_messages_stuck_at_their_final_dot_hold_back_no_other_250(
        appliance: Callable[..., Appliance], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Four clients' 2 MiB messages are past their final dot while the disk hangs under them (the metric
    shows all four waiting for their disk): another client's small message gets its 250 within seconds;
    when the disk comes back all four get their 250, and every 250'd message is stored whole exactly once."""
    stall = tmp_path / "hung-disk"
    stall.touch()
    monkeypatch.setenv(TEST_STALL_ENVIRONMENT, str(stall))
    instance = appliance(start=False)
    for user in ("alice", "bob"):
        assert instance.admin("user", "add", f"{user}@example.org", password=f"{user}-password").returncode == 0
    instance.start()
    results: dict[int, object] = {}

    def send_stuck(n: int) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", instance.ports["mx"], timeout=60) as smtp:
                results[n] = smtp.sendmail("big@example.net", ["alice@example.org"], stuck_message(n))
        except Exception as e:  # reported below
            results[n] = e

    senders = [threading.Thread(target=send_stuck, args=(n,), daemon=True) for n in range(STUCK_CLIENTS)]
    try:
        for sender in senders:
            sender.start()
        wait_until(lambda: waiting_for_disk(instance) == STUCK_CLIENTS,
                   what="every large message past its final dot, waiting for the hung disk")
        started = time.monotonic()
        with smtplib.SMTP("127.0.0.1", instance.ports["mx"], timeout=PROMPT) as smtp:
            assert smtp.sendmail("friend@example.net", ["bob@example.org"], b"Subject: small\r\n\r\nhi\r\n") == {}
        seconds = time.monotonic() - started
        print(f"a small message while {STUCK_CLIENTS} large ones wait for the hung disk: {seconds:.3f} s")
        assert seconds < PROMPT, seconds
        assert not results and all(sender.is_alive() for sender in senders), "a 250 before the disk wrote"
    finally:
        stall.unlink()
    for sender in senders:
        sender.join(60)
    assert results == {n: {} for n in range(STUCK_CLIENTS)}
    stored = [path.read_bytes() for path in (instance.maildir_root / "alice" / "new").iterdir()]
    assert len(stored) == STUCK_CLIENTS
    for n in range(STUCK_CLIENTS):
        assert sum(body.endswith(b"\r\n" + stuck_message(n)) for body in stored) == 1, f"message {n} not whole"
    assert len(list((instance.maildir_root / "bob" / "new").iterdir())) == 1
    assert waiting_for_disk(instance) == 0


def test_a_client_whose_disk_never_comes_back_gets_its_idle_timeout_and_no_250(
        appliance: Callable[..., Appliance], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client waiting past its final dot for a hung disk keeps the session's idle timeout: it gets
    421 4.4.2 and the connection closes, never a 250; its message, in no Maildir yet, is dropped with
    the session (no memory held for a client long gone), and the disk coming back stores nothing."""
    stall = tmp_path / "hung-disk"
    stall.touch()
    monkeypatch.setenv(TEST_STALL_ENVIRONMENT, str(stall))
    instance = appliance(start=False, extra={"smtp": {"idle_timeout": 1}})
    assert instance.admin("user", "add", "alice@example.org", password="alice-password").returncode == 0
    instance.start()
    try:
        with socket.create_connection(("127.0.0.1", instance.ports["mx"]), timeout=30) as client:
            stream = client.makefile("rb")
            assert stream.readline().startswith(b"220")
            client.sendall(b"EHLO big.example.net\r\n")
            while not stream.readline().startswith(b"250 "):
                pass
            client.sendall(b"MAIL FROM:<big@example.net>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
            assert [stream.readline()[:3] for _ in range(3)] == [b"250", b"250", b"354"]
            client.sendall(stuck_message(0) + b".\r\n")
            wait_until(lambda: waiting_for_disk(instance) == 1, what="the message waiting for the hung disk")
            assert stream.readline().startswith(b"421 4.4.2")
            assert stream.readline() == b""  # closed, and no 250 came before the close
    finally:
        stall.unlink()
    incoming = instance.root / "spool" / "incoming"
    wait_until(lambda: waiting_for_disk(instance) == 0 and not list(incoming.iterdir()),
               what="the disk back, the abandoned message's file removed")
    new = instance.maildir_root / "alice" / "new"
    assert not new.exists() or list(new.iterdir()) == []
