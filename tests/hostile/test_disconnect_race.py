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


def test_a_disconnect_during_the_commit_does_not_touch_the_message(tmp_path: Path) -> None:
    """At the depth where it lives: the session hands the message over at the dot;
    connectionLost while the commit is pending leaves the bytes to the commit."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.defer import Deferred
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from mailappliance.delivery import CommitJob, commit_now
    from mailappliance.directory import Subscriber
    from mailappliance.smtp.server import SMTPConfig, SMTPFactory

    alice = Subscriber(dn="uid=alice,dc=x", uid="alice", mail="alice@example.org")
    pending: list[tuple[CommitJob, Deferred]] = []

    def commit(job: CommitJob) -> Deferred:
        d: Deferred = Deferred()
        pending.append((job, d))
        return d

    config = SMTPConfig(hostname="mx.example.org", role="mx", local_domains=frozenset({"example.org"}),
                        maildir_root=tmp_path / "mail", incoming_dir=tmp_path / "incoming", max_message_size=10**6)
    config.incoming_dir.mkdir()
    factory = SMTPFactory(config, lambda address: _found(alice), commit,
                          clock=Clock())
    session = factory.buildProtocol(None)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
    session.makeConnection(transport)
    session.dataReceived(b"EHLO x\r\nMAIL FROM:<s@example.net>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n"
                         + BODY + b".\r\n")
    assert len(pending) == 1
    session.connectionLost(None)  # the client reset after its dot
    job, d = pending[0]
    [path] = commit_now(job)
    d.callback([path])
    assert path.read_bytes().endswith(BODY)


def _found(subscriber: object) -> object:
    from twisted.internet.defer import succeed

    return succeed(subscriber)
