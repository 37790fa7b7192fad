"""Mail under load for the kill -9 tests: SMTP clients that remember each message's
token once its 250 came, and an audit of the Maildirs (every file whole, copies per token)."""

from __future__ import annotations

import itertools
import smtplib
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from tests.conditions import wait_until
from tests.daemon import Appliance

SMALL = 2000  # body lines: ~100 KB, so a kill often lands mid-DATA
LARGE = 26_000  # ~1.4 MB: past the 1 MiB memory limit, so every message spills


def message(token: str, lines: int = SMALL) -> bytes:
    """A message whose Subject is ``token`` and whose last line names it again."""
    body = [f"Subject: {token}", "", *(f"{token} line {i:05d} " + "x" * 30 for i in range(lines)), f"END {token}"]
    return ("\r\n".join(body) + "\r\n").encode()


def _send(port: int, number: int, accepted: list[str], stop: threading.Event, lines: int,
          recipients: Sequence[str], timeout: float, reconnects: int, per_connection: int) -> None:
    n = 0
    while not stop.is_set():
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=timeout) as smtp:
                for _ in itertools.count() if not per_connection else range(per_connection):
                    if stop.is_set():
                        break
                    token = f"w{number}m{n}"
                    n += 1
                    smtp.sendmail("friend@example.net", [recipients[number % len(recipients)]], message(token, lines))
                    accepted.append(token)  # only after the 250
        except (OSError, smtplib.SMTPException):
            if reconnects <= 0:
                return  # the server was killed
            reconnects -= 1  # one process of several was: the others still serve


def load_until(port: int, until: Callable[[list[str]], None], clients: int = 4, lines: int = SMALL,
               recipients: Sequence[str] = ("alice@example.org",), timeout: float = 5.0,
               reconnects: int = 0, per_connection: int = 0) -> list[str]:
    """Send from ``clients`` connections (client i to ``recipients[i % len]``) until
    ``until(accepted)`` returns (it waits for enough 250s, then kills what it kills);
    the tokens that got their 250.  A client whose connection fails stops, or connects
    again up to ``reconnects`` times (when one worker process of several is killed).
    ``per_connection`` > 0: each client connects anew after that many messages, so that
    with several worker processes every process gets connections (four long-lived ones
    can all land in one process)."""
    accepted: list[str] = []
    stop = threading.Event()
    threads = [threading.Thread(target=_send, args=(port, i, accepted, stop, lines, recipients, timeout, reconnects,
                                                    per_connection))
               for i in range(clients)]
    for thread in threads:
        thread.start()
    try:
        until(accepted)
    finally:
        stop.set()
        for thread in threads:
            thread.join(2 * timeout)
    return accepted


def kill_9_after(instance: Appliance, count: int, timeout: float) -> Callable[[list[str]], None]:
    """For :func:`load_until`: once ``count`` messages got their 250, kill -9 the daemon
    while the clients are mid-message (also when the count never comes)."""

    def until(accepted: list[str]) -> None:
        try:
            wait_until(lambda: len(accepted) >= count, timeout=timeout, what=f"{count} messages accepted")
        finally:
            instance.kill9()

    return until


def stored_tokens(root: Path, lines: int = SMALL, folders: Sequence[str] = ("new",)) -> dict[str, int]:
    """Token -> copies in every Maildir's ``folders`` under ``root``; asserts that each
    file is whole (its bytes end with the whole message, its name carries its size)."""
    found: dict[str, int] = {}
    for folder in folders:
        for path in root.glob(f"*/{folder}/*"):
            data = path.read_bytes()
            token = data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
            assert data.endswith(message(token, lines)), f"partial message in {folder}/: {path}"
            assert f",S={len(data)}" in path.name, f"size not in the name: {path}"
            found[token] = found.get(token, 0) + 1
    return found


def assert_each_once(accepted: list[str], found: dict[str, int]) -> None:
    """Every message that got its 250 is stored, and nothing is stored twice."""
    missing = [t for t in accepted if t not in found]
    assert not missing, f"acknowledged but lost: {missing}"
    assert all(count == 1 for count in found.values()), "delivered twice"
