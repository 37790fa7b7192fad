"""Finding 1: a client that resets right after its final dot must not corrupt
mail or fail other clients' messages (the message belongs to the commit)."""

from __future__ import annotations

import socket
import struct
import threading
from pathlib import Path
from typing import Callable

from tests.conditions import wait_until
from tests.daemon import Appliance

BODY = b"Subject: race\r\n\r\n" + b"".join(b"line %04d of a message that fills some space\r\n" % n for n in range(60))
ROUNDS, CLIENTS = 5, 40


def read_reply(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n") or b"-" == data.split(b"\r\n")[-2][3:4]:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    return data


def send_message(port: int, reset_after_dot: bool) -> bytes | None:
    """One whole SMTP transaction; returns the final reply, or None for a resetter."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        read_reply(sock)
        for command in (b"EHLO race.example\r\n", b"MAIL FROM:<s@example.net>\r\n",
                        b"RCPT TO:<alice@example.org>\r\n", b"DATA\r\n"):
            sock.sendall(command)
            read_reply(sock)
        if reset_after_dot:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.sendall(BODY + b".\r\n")
            return None  # the close with SO_LINGER 0 sends RST at once
        sock.sendall(BODY + b".\r\n")
        return read_reply(sock)


def test_resets_after_the_dot_leave_only_whole_messages_and_fail_nobody(
        appliance: Callable[..., Appliance]) -> None:
    """Half the clients reset after the dot: no empty or cut file appears, and every
    well-behaved client gets 250 with its message whole on disk."""
    instance = appliance(start=False, extra={"limits": {  # many parallel clients from one address
        "concurrent_per_address": 200, "concurrent_per_network": 200, "connections_per_minute": 10_000}})
    assert instance.admin("user", "add", "alice@example.org", password="pw-alice-1").returncode == 0
    instance.start()
    port = instance.ports["mx"]
    replies: list[bytes] = []
    errors: list[BaseException] = []

    def client(reset: bool) -> None:
        try:
            reply = send_message(port, reset)
            if reply is not None:
                replies.append(reply)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    for _ in range(ROUNDS):
        threads = [threading.Thread(target=client, args=(n % 2 == 0,)) for n in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert not errors, errors[:3]
    # A later message's 250 means the commit thread has finished every earlier batch.
    assert send_message(port, False).startswith(b"250 ")
    assert all(r.startswith(b"250 ") for r in replies), [r for r in replies if not r.startswith(b"250 ")][:3]
    assert len(replies) == ROUNDS * CLIENTS // 2
    new = instance.maildir_root / "alice" / "new"
    files = list(new.iterdir())
    broken = [f.name for f in files if not whole(f)]
    assert broken == [], f"{len(broken)} empty or cut files, e.g. {broken[:3]}"
    queued = {r.split(b"queued as ")[1].split()[0].decode() for r in replies}
    names = {f.name.split(",")[0] for f in files}
    assert queued <= names, f"{len(queued - names)} messages got 250 but are not on disk"
    assert "Bad file descriptor" not in instance.log()


def whole(path: Path) -> bool:
    data = path.read_bytes()
    size = int(path.name.split(",S=")[1].split(":")[0])
    return len(data) == size and data.endswith(BODY)
