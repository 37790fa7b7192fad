"""A hung disk under the spill writer (a RAID rebuild, an NFS hiccup, a dying SSD)
while clients stream large messages: only those sessions stop reading; the
event loop keeps serving everyone else, and every message that got a 250 is
whole once the disk comes back."""

from __future__ import annotations

import poplib
import smtplib
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


def spill_waits(instance: Appliance) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{instance.ports['metrics']}/metrics", timeout=5) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith("mailappliance_spill_waits_total "):
                return float(line.split()[1])
    return 0.0


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
