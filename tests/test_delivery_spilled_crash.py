"""kill -9 while large messages (spilled, written by the spill writer with O_DIRECT and
finished on the sync pool) stream in: every 250 is whole in new/, nothing partial ever is."""

from __future__ import annotations

import smtplib
import threading
from collections.abc import Callable
from pathlib import Path

from tests.conditions import wait_until
from tests.daemon import Appliance

BODY_LINES = 26_000  # ~1.4 MB per message: past the 1 MiB memory limit, so every message spills


def large_message(token: str) -> bytes:
    lines = [f"Subject: {token}", "", *(f"{token} line {i:05d} " + "x" * 30 for i in range(BODY_LINES)), f"END {token}"]
    return ("\r\n".join(lines) + "\r\n").encode()


def stored_tokens(root: Path) -> dict[str, int]:
    """Token -> number of copies; asserts that every file in new/ is whole."""
    found: dict[str, int] = {}
    for path in root.glob("*/new/*"):
        data = path.read_bytes()
        token = data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
        assert data.endswith(large_message(token)), f"partial message in new/: {path}"
        assert f",S={len(data)}" in path.name
        found[token] = found.get(token, 0) + 1
    return found


def sender(port: int, worker: int, accepted: list[str], stop: threading.Event) -> None:
    n = 0
    while not stop.is_set():
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                while not stop.is_set():
                    token = f"w{worker}m{n}"
                    n += 1
                    smtp.sendmail("friend@example.net", ["alice@example.org"], large_message(token))
                    accepted.append(token)  # only after the 250
        except (OSError, smtplib.SMTPException):
            return


def test_kill_9_during_large_messages_loses_nothing_and_exposes_nothing_partial(
        appliance: Callable[..., Appliance]) -> None:
    """kill -9 while four clients send 1.4 MB messages: each message that got a 250 is in
    new/ once and whole, no partial file anywhere in new/; the restart empties incoming/."""
    instance = appliance(start=False)
    assert instance.admin("user", "add", "alice@example.org", password="alice-password").returncode == 0
    instance.start()
    accepted: list[str] = []
    stop = threading.Event()
    workers = [threading.Thread(target=sender, args=(instance.ports["mx"], i, accepted, stop)) for i in range(4)]
    for w in workers:
        w.start()
    try:
        wait_until(lambda: len(accepted) >= 12, timeout=60, what="12 large messages accepted")
    finally:
        instance.kill9()  # while the senders are mid-message
        stop.set()
        for w in workers:
            w.join(20)

    found = stored_tokens(instance.maildir_root)
    assert not [t for t in accepted if t not in found], "acknowledged but lost"
    assert all(count == 1 for count in found.values())
    instance.start()  # restart: partial leftovers in incoming/ are removed, new/ is unchanged
    assert not list((instance.root / "spool" / "incoming").iterdir())
    assert stored_tokens(instance.maildir_root) == found
