"""Abuse control against the real daemon: shared auth throttling, hostile clients."""

from __future__ import annotations

import poplib
import smtplib
import socket
from typing import Any, Callable

import pytest

from mailappliance.smtp.replies import AUTH_INVALID, AUTH_OK, AUTH_THROTTLED, BARE_LINE_ENDING, BYE
from tests.daemon import Appliance
from tests.replies import answered

THROTTLE = {"failures_before_delay": 100, "address_lock_after": 3, "account_lock_after": 3, "lock_time": 600}


@pytest.fixture
def guarded(appliance: Callable[..., Appliance], pki: Any, request: pytest.FixtureRequest) -> Appliance:
    throttle = {**THROTTLE, **getattr(request, "param", {})}
    instance = appliance(pki=pki, start=False, extra={"auth": throttle})
    assert instance.admin("user", "add", "alice@example.org", password="alice-password").returncode == 0
    instance.start()
    return instance


def smtp_login(instance: Appliance, password: str, source: str = "127.0.0.1") -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", instance.ports["submission"], timeout=10,
                      source_address=(source, 0)) as smtp:
        smtp.starttls(context=instance.client_context())
        smtp.ehlo("client.example.net")
        smtp.user, smtp.password = "alice", password
        try:
            return smtp.auth("PLAIN", smtp.auth_plain)  # one attempt (login() would retry with LOGIN)
        except smtplib.SMTPResponseException as e:
            return e.smtp_code, e.smtp_error


def pop3_login(instance: Appliance, password: str) -> bytes:
    """alice's login over STLS on the pop3 listener; the server's answer to PASS."""
    client = poplib.POP3("127.0.0.1", instance.ports["pop3"], timeout=10)
    client.stls(context=instance.client_context())
    client.user("alice")
    try:
        return client.pass_(password)
    except poplib.error_proto as e:
        return e.args[0]
    finally:
        client.close()


@pytest.mark.parametrize("guarded", [{"account_lock_after": 100}], indirect=True)
def test_pop3_failures_count_for_smtp(guarded: Appliance) -> None:
    """Failed POP3 logins lock the address for SMTP AUTH too (one shared throttle); other addresses still log in."""
    for _ in range(3):
        assert pop3_login(guarded, "wrong-password") == b"-ERR [AUTH] Authentication failed"
    assert pop3_login(guarded, "alice-password") == b"-ERR [LOGIN-DELAY] Too many failed logins, try again later"
    assert answered(smtp_login(guarded, "alice-password"), AUTH_THROTTLED)
    assert answered(smtp_login(guarded, "alice-password", source="127.0.0.3"), AUTH_OK)  # another address is fine
    assert "address 127.0.0.1 locked after repeated failures" in guarded.log()  # the refusal's logged reason


def test_account_lock_does_not_lock_out_the_subscribers_own_address(guarded: Appliance) -> None:
    """An account locked by guesses from strangers still lets alice in from the address she used before."""
    assert answered(smtp_login(guarded, "alice-password", source="127.0.0.1"), AUTH_OK)  # alice's usual address
    for attacker in ("127.0.0.4", "127.0.0.5", "127.0.0.6"):
        assert answered(smtp_login(guarded, "guess-1234", source=attacker), AUTH_INVALID)
    assert answered(smtp_login(guarded, "alice-password", source="127.0.0.7"), AUTH_THROTTLED)  # a stranger
    assert answered(smtp_login(guarded, "alice-password", source="127.0.0.1"), AUTH_OK)


def test_hostile_clients_do_not_hurt_a_normal_subscriber(guarded: Appliance) -> None:
    """Idle holders, a slowloris and a garbage sender leave room for normal mail and a login, and the daemon lives."""
    port = guarded.ports["mx"]
    # 200 idle connections from 20 addresses (each address stays under its own cap of 20)
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(f"127.0.1.{i % 20 + 1}", 0))
            for i in range(200)]
    drip = socket.create_connection(("127.0.0.1", port), timeout=10)
    drip.recv(1024)
    garbage = socket.create_connection(("127.0.0.1", port), timeout=10)
    garbage.recv(1024)
    try:
        for byte in b"EHLO slow.example":  # slowloris: a byte at a time
            drip.send(bytes([byte]))
        garbage.sendall(bytes(range(256)) * 400 + b"\r\n" * 5)
        garbage.sendall(b"MAIL FROM:<" + b"a" * 100_000 + b">\r\n")
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            smtp.ehlo("normal.example.net")
            assert smtp.sendmail("friend@example.net", ["alice@example.org"], b"Subject: hi\r\n\r\nhello\r\n") == {}
        assert answered(smtp_login(guarded, "alice-password", source="127.0.0.9"), AUTH_OK)
    finally:
        for sock in [*idle, drip, garbage]:
            sock.close()
    assert guarded.process is not None and guarded.process.poll() is None
    assert len(list((guarded.maildir_root / "alice" / "new").iterdir())) == 1


@pytest.mark.parametrize("smuggle", [b"\n.\n", b"\r.\r\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r"])
def test_smtp_smuggling_against_the_daemon(guarded: Appliance, smuggle: bytes) -> None:
    """A bare CR or LF around a dot never ends DATA on the daemon: 550 5.6.0, and nothing is stored."""
    sock = socket.create_connection(("127.0.0.1", guarded.ports["mx"]), timeout=10)
    reader = sock.makefile("rb")
    reader.readline()
    sock.sendall(b"EHLO probe.example.net\r\n")
    while reader.readline()[3:4] == b"-":
        pass
    sock.sendall(b"MAIL FROM:<a@example.net>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
    replies = [reader.readline() for _ in range(3)]
    assert [r[:3] for r in replies] == [b"250", b"250", b"354"]
    sock.sendall(b"Subject: one\r\n\r\nbody" + smuggle + b"MAIL FROM:<evil@example.net>\r\n"
                 b"RCPT TO:<alice@example.org>\r\nDATA\r\nSubject: smuggled\r\n\r\nevil\r\n.\r\nQUIT\r\n")
    assert answered(reader.readline().decode(), BARE_LINE_ENDING)
    assert answered(reader.readline().decode(), BYE)  # every byte was read as message text, then QUIT
    sock.close()
    # Replies come in order and a message is stored before its 250: with 550 and 221 answered,
    # nothing of this session is left to be written.
    assert not (guarded.maildir_root / "alice" / "new").exists() or \
        not list((guarded.maildir_root / "alice" / "new").iterdir())
