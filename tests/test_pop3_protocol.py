"""POP3 protocol unit tests: in-memory transports, the production Portal, checker
(with its cache and throttle) and realm, and real Maildirs; only the directory
behind the checker is in memory (tests/subscribers.py).

Sessions are set up as on the pop3s listener (TLS already there) unless a test
is about the plaintext listener and says so.  Mailbox disk work runs
synchronously (``run_blocking=sync_run``) unless a test wants to control when
it finishes (``ManualRunner``).  The STLS tests run real TLS (pyOpenSSL via
``TLSMemoryBIOProtocol``) over in-memory transports, with the test PKI.
"""

from __future__ import annotations

import base64
import functools
import os
from pathlib import Path
from typing import Any, Callable

import attrs
import pytest
from twisted.cred.portal import Portal
from twisted.internet import _newtls
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOProtocol

from mailappliance.credentials import SubscriberChecker
from mailappliance.pop3 import server as pop3_server
from mailappliance.pop3 import transfer as pop3_transfer
from mailappliance.pop3.mailbox import MailboxLocks, MaildirRealm, uidl_for
from mailappliance.pop3.server import POP3Factory, POP3Session
from mailappliance.settings import ThrottleSettings
from tests.subscribers import PASSWORDS, InMemoryDirectory, subscriber_checker

HOSTNAME = "pop.example.test"

ALICE_PASSWORD = PASSWORDS["alice"]

MESSAGE_1 = b"From: carol@example.net\r\nSubject: one\r\n\r\nHello Alice.\r\n"
MESSAGE_2 = (
    b"From: dave@example.net\r\nSubject: two\r\n\r\n"
    b"line 1\r\n.starts with a dot\r\n..two dots\r\n.\r\nline 5\r\nline 6\r\n"
)


# -- harness ---------------------------------------------------------------------


def sync_run(function: Callable[..., Any], *args: Any) -> Deferred:
    return maybeDeferred(function, *args)


class ManualRunner:
    """run_blocking whose work the test finishes explicitly (to prove ordering)."""

    def __init__(self) -> None:
        self.pending: list[tuple[Deferred, Callable[..., Any], tuple[Any, ...]]] = []

    def __call__(self, function: Callable[..., Any], *args: Any) -> Deferred:
        d: Deferred = Deferred()
        self.pending.append((d, function, args))
        return d

    def run_one(self) -> None:
        d, function, args = self.pending.pop(0)
        d.callback(function(*args))


@attrs.define
class Client:
    """One server session on a StringTransport; ``send`` returns what the server wrote."""

    session: POP3Session
    transport: StringTransport

    def send(self, data: bytes | str) -> str:
        if isinstance(data, str):
            data = data.encode()
        self.session.dataReceived(data)
        return self.take()

    def take(self) -> str:
        out = self.transport.value().decode("latin-1")
        self.transport.clear()
        return out

    def login(self, user: str = "alice") -> str:
        self.send(f"USER {user}\r\n")
        reply = self.send(f"PASS {PASSWORDS[user]}\r\n")
        assert reply.startswith("+OK"), reply
        return reply

    def drop(self) -> None:
        self.session.connectionLost(None)


@attrs.define
class Env:
    """Maildirs, locks and clock of one test, and the one checker every session shares."""

    root: Path
    locks: MailboxLocks
    clock: Clock
    directory: InMemoryDirectory
    checker: SubscriberChecker
    counter: int = 0

    def factory(self, **kwargs: Any) -> POP3Factory:
        """A listener like pop3s (TLS from the start, no plaintext logins) unless ``kwargs`` say otherwise."""
        portal = Portal(MaildirRealm(self.root, self.locks), [self.checker])
        kwargs.setdefault("allow_plaintext_auth", False)
        kwargs.setdefault("implicit_tls", True)
        kwargs.setdefault("tls_context_factory", object())  # a stand-in: no handshake on a StringTransport
        kwargs.setdefault("run_blocking", sync_run)
        kwargs.setdefault("reactor", self.clock)
        return POP3Factory(portal, HOSTNAME, **kwargs)

    def connect(self, factory: POP3Factory | None = None, **kwargs: Any) -> Client:
        factory = factory or self.factory(**kwargs)
        session = factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
        session.makeConnection(transport)
        client = Client(session, transport)
        greeting = client.take()
        assert greeting == f"+OK {HOSTNAME} POP3 server ready\r\n"
        return client

    def deliver(self, uid: str, content: bytes) -> Path:
        """Put a message into new/ the way mailappliance.maildir does, in order."""
        self.counter += 1
        for sub in ("tmp", "new", "cur"):
            (self.root / uid / sub).mkdir(parents=True, exist_ok=True)
        path = self.root / uid / "new" / f"17000000{self.counter:02d}.M1P2Q{self.counter}.host,S={len(content)}"
        path.write_bytes(content)
        stamp = 1_700_000_000 + self.counter
        os.utime(path, (stamp, stamp))
        return path

    def files(self, uid: str) -> list[str]:
        return sorted(os.listdir(self.root / uid / "cur")) + sorted(os.listdir(self.root / uid / "new"))


def make_env(root: Path, throttle: ThrottleSettings | None = None) -> Env:
    clock, directory = Clock(), InMemoryDirectory()
    return Env(root, MailboxLocks(), clock, directory, subscriber_checker(directory, clock, throttle=throttle))


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return make_env(tmp_path / "maildirs")


def multiline(reply: str) -> list[str]:
    """The lines of a multi-line answer between the status line and the '.'."""
    lines = reply.split("\r\n")
    assert lines[0].startswith("+OK"), reply
    end = lines.index(".")
    return lines[1:end]


def unstuff(reply: str) -> bytes:
    """The message body of a RETR/TOP answer, dot-stuffing removed, checked for the terminator."""
    raw = reply.encode("latin-1")
    status, _, rest = raw.partition(b"\r\n")
    assert status.startswith(b"+OK")
    assert rest.endswith(b"\r\n.\r\n") or rest == b".\r\n"
    body = rest[:-3]
    lines = body.split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


# -- greeting, CAPA ------------------------------------------------------------


def test_greeting_and_quit_before_login(env: Env) -> None:
    """The server greets with +OK and its name; QUIT before login says goodbye and closes."""
    client = env.connect()
    assert client.send("QUIT\r\n") == f"+OK {HOSTNAME} closing connection\r\n"
    assert client.transport.disconnecting


def test_capa_without_plaintext_auth_hides_user_and_sasl(env: Env) -> None:
    """On the STLS listener without plaintext logins, CAPA offers STLS but neither USER nor SASL PLAIN."""
    client = env.connect(allow_plaintext_auth=False, implicit_tls=False, tls_context_factory=object())
    caps = multiline(client.send("CAPA\r\n"))
    assert caps == [
        "TOP", "UIDL", "RESP-CODES", "PIPELINING", "AUTH-RESP-CODE", "STLS", "IMPLEMENTATION mailappliance",
    ]


def test_capa_without_tls_context_has_no_stls(env: Env) -> None:
    """Without a TLS context CAPA offers no STLS, and with plaintext refused no login method either."""
    client = env.connect(allow_plaintext_auth=False, implicit_tls=False, tls_context_factory=None)
    caps = multiline(client.send("capa\r\n"))
    assert "STLS" not in caps and "USER" not in caps and "SASL PLAIN" not in caps


def test_capa_with_plaintext_allowed_before_and_after_login(env: Env) -> None:
    """Plaintext login allowed (admin's explicit choice): CAPA offers USER and SASL PLAIN, the same after login."""
    client = env.connect(allow_plaintext_auth=True, implicit_tls=False, tls_context_factory=None)
    before = multiline(client.send("CAPA\r\n"))
    assert "USER" in before and "SASL PLAIN" in before and "STLS" not in before
    client.login()
    after = multiline(client.send("CAPA\r\n"))
    assert after == before


def test_capa_with_implicit_tls_offers_login_but_not_stls(env: Env) -> None:
    """On the pop3s listener CAPA offers USER and SASL PLAIN, and no STLS."""
    client = env.connect(allow_plaintext_auth=False, implicit_tls=True, tls_context_factory=object())
    caps = multiline(client.send("CAPA\r\n"))
    assert "USER" in caps and "SASL PLAIN" in caps and "STLS" not in caps


# -- USER/PASS -------------------------------------------------------------------


def test_user_pass_good(env: Env) -> None:
    """USER/PASS with the right password logs in and reports the message count and octets."""
    env.deliver("alice", MESSAGE_1)
    client = env.connect()
    assert client.send("USER alice\r\n") == "+OK Send your password\r\n"
    assert client.send("PASS alice-password\r\n") == f"+OK Logged in, 1 messages ({len(MESSAGE_1)} octets)\r\n"


def test_user_pass_by_address_and_password_with_spaces(env: Env) -> None:
    """The full address logs in too, a password may contain spaces, and a new Maildir is made private (0700)."""
    client = env.connect()
    client.send("USER bob@example.org\r\n")
    assert client.send("PASS correct horse battery\r\n") == "+OK Logged in, 0 messages (0 octets)\r\n"
    assert (env.root / "bob" / "cur").is_dir()
    assert (env.root / "bob").stat().st_mode & 0o777 == 0o700


def test_user_pass_bad(env: Env) -> None:
    """A wrong password gets -ERR [AUTH]; PASS without a new USER gets -ERR; a later right login works."""
    client = env.connect()
    client.send("USER alice\r\n")
    assert client.send("PASS wrong\r\n") == "-ERR [AUTH] Authentication failed\r\n"
    assert client.send("PASS alice-password\r\n") == "-ERR Send USER first\r\n"
    client.login()


def test_directory_unavailable_is_temporary(env: Env) -> None:
    """With the directory down a login gets -ERR [SYS/TEMP] and the session stays open."""
    env.directory.up = False
    client = env.connect()
    client.send("USER alice\r\n")
    assert client.send("PASS alice-password\r\n") == "-ERR [SYS/TEMP] Directory unavailable, try again later\r\n"
    assert not client.transport.disconnecting


def test_failures_past_the_free_ones_are_answered_late(tmp_path: Path) -> None:
    """The shared checker's throttle: three wrong passwords are answered at once, the fourth after 1 s."""
    env = make_env(tmp_path / "maildirs")
    client = env.connect()
    for _ in range(3):
        client.send("USER alice\r\n")
        assert client.send("PASS wrong\r\n") == "-ERR [AUTH] Authentication failed\r\n"
    client.send("USER alice\r\n")
    assert client.send("PASS wrong\r\n") == ""
    env.clock.advance(0.9)
    assert client.take() == ""
    env.clock.advance(0.1)
    assert client.take() == "-ERR [AUTH] Authentication failed\r\n"


def test_a_locked_address_gets_login_delay_even_with_the_right_password(tmp_path: Path) -> None:
    """After address_lock_after failures the address gets [LOGIN-DELAY], right password or not, from any session."""
    env = make_env(tmp_path / "maildirs", ThrottleSettings(free_failures=100, address_lock_after=3))
    for _ in range(3):
        client = env.connect()
        client.send("USER alice\r\n")
        assert client.send("PASS wrong\r\n") == "-ERR [AUTH] Authentication failed\r\n"
    client = env.connect()
    client.send("USER alice\r\n")
    assert client.send("PASS alice-password\r\n") == "-ERR [LOGIN-DELAY] Too many failed logins, try again later\r\n"
    assert client.send(f"AUTH PLAIN {plain('', 'bob', PASSWORDS['bob'])}\r\n") == \
        "-ERR [LOGIN-DELAY] Too many failed logins, try again later\r\n"


def test_a_newer_login_ends_the_older_session_without_its_deletions(env: Env) -> None:
    """A newer login takes the mailbox from a session that vanished without QUIT, discarding its DELEs."""
    env.deliver("alice", MESSAGE_1)
    first = env.connect()
    first.login()
    assert first.send("DELE 1\r\n").startswith("+OK")
    second = env.connect()
    second.login()
    assert first.take() == "-ERR [IN-USE] Mailbox opened by a newer session, closing\r\n"
    assert first.transport.disconnecting or first.session.closing
    first.drop()
    assert second.send("STAT\r\n") == f"+OK 1 {len(MESSAGE_1)}\r\n"  # the DELE died with the old session
    second.send("QUIT\r\n")
    third = env.connect()
    third.login()


def test_a_session_committing_its_quit_keeps_the_mailbox(env: Env) -> None:
    """While the older session's QUIT unlinks files, a newer login waits its turn ([IN-USE])."""
    runner = ManualRunner()
    env.deliver("alice", MESSAGE_1)
    first = env.connect(run_blocking=runner)
    first.send("USER alice\r\nPASS alice-password\r\n")
    runner.run_one()
    first.send("DELE 1\r\nQUIT\r\n")
    second = env.connect()
    second.send("USER alice\r\n")
    assert second.send("PASS alice-password\r\n") == "-ERR [IN-USE] Mailbox is locked by another session\r\n"
    runner.run_one()
    second.login()


def test_plaintext_login_refused_outside_tls(env: Env) -> None:
    """Before STLS, USER, PASS and AUTH PLAIN get -ERR [AUTH] TLS required; bare AUTH lists no mechanism."""
    client = env.connect(allow_plaintext_auth=False, implicit_tls=False, tls_context_factory=object())
    assert client.send("USER alice\r\n") == "-ERR [AUTH] TLS required, use STLS first\r\n"
    assert client.send("PASS alice-password\r\n") == "-ERR [AUTH] TLS required, use STLS first\r\n"
    assert client.send("AUTH PLAIN\r\n") == "-ERR [AUTH] TLS required, use STLS first\r\n"
    assert client.send("AUTH\r\n") == "+OK\r\n.\r\n"


# -- AUTH PLAIN ---------------------------------------------------------------------


def plain(authzid: str, authcid: str, password: str) -> str:
    return base64.b64encode(f"{authzid}\0{authcid}\0{password}".encode()).decode()


def test_auth_lists_mechanisms(env: Env) -> None:
    """AUTH without an argument lists PLAIN."""
    client = env.connect()
    assert client.send("AUTH\r\n") == "+OK\r\nPLAIN\r\n.\r\n"


def test_auth_plain_initial_response(env: Env) -> None:
    """AUTH PLAIN with an initial response logs in."""
    client = env.connect()
    reply = client.send(f"AUTH PLAIN {plain('', 'alice', ALICE_PASSWORD)}\r\n")
    assert reply.startswith("+OK Logged in")


def test_auth_plain_continuation(env: Env) -> None:
    """AUTH PLAIN with the response on the next line logs in."""
    client = env.connect()
    assert client.send("auth plain\r\n") == "+ \r\n"
    assert client.send(plain("bob", "bob", PASSWORDS["bob"]) + "\r\n").startswith("+OK Logged in")


def test_auth_plain_failures(env: Env) -> None:
    """Wrong password, foreign authzid, bad base64, empty response, unknown mechanism and cancel each get their -ERR."""
    client = env.connect()
    assert client.send(f"AUTH PLAIN {plain('', 'alice', 'nope')}\r\n") == "-ERR [AUTH] Authentication failed\r\n"
    assert client.send(f"AUTH PLAIN {plain('bob', 'alice', ALICE_PASSWORD)}\r\n") == "-ERR [AUTH] Authentication failed\r\n"
    assert client.send("AUTH PLAIN !!!notbase64\r\n") == "-ERR Invalid base64 data\r\n"
    assert client.send("AUTH PLAIN =\r\n") == "-ERR [AUTH] Authentication failed\r\n"
    assert client.send("AUTH CRAM-MD5\r\n") == "-ERR Unsupported authentication mechanism\r\n"
    client.send("AUTH PLAIN\r\n")
    assert client.send("*\r\n") == "-ERR Authentication cancelled\r\n"
    assert client.send("NOOP\r\n") == "-ERR Not logged in\r\n"


def test_auth_plain_continuation_may_exceed_command_line_limit(env: Env) -> None:
    """An AUTH PLAIN response longer than a command line is read whole and judged, not cut."""
    client = env.connect()
    client.send("AUTH PLAIN\r\n")
    response = plain("", "alice", "x" * 400)
    assert len(response) > 255
    assert client.send(response + "\r\n") == "-ERR [AUTH] Authentication failed\r\n"


# -- TRANSACTION ------------------------------------------------------------------------


def test_stat_list_uidl(env: Env) -> None:
    """STAT, LIST and UIDL report every message, single or all, and bad message numbers get -ERR."""
    p1 = env.deliver("alice", MESSAGE_1)
    p2 = env.deliver("alice", MESSAGE_2)
    client = env.connect()
    client.login()
    total = len(MESSAGE_1) + len(MESSAGE_2)
    assert client.send("STAT\r\n") == f"+OK 2 {total}\r\n"
    reply = client.send("LIST\r\n")
    assert reply.startswith(f"+OK 2 messages ({total} octets)\r\n")
    assert multiline(reply) == [f"1 {len(MESSAGE_1)}", f"2 {len(MESSAGE_2)}"]
    assert client.send("LIST 2\r\n") == f"+OK 2 {len(MESSAGE_2)}\r\n"
    uid1, uid2 = p1.name.split(",")[0], p2.name.split(",")[0]
    assert multiline(client.send("UIDL\r\n")) == [f"1 {uid1}", f"2 {uid2}"]
    assert client.send("UIDL 1\r\n") == f"+OK 1 {uid1}\r\n"
    assert client.send("LIST 3\r\n") == "-ERR No such message\r\n"
    assert client.send("LIST 0\r\n") == "-ERR Invalid message number\r\n"
    assert client.send("UIDL x\r\n") == "-ERR Invalid message number\r\n"
    assert client.send("NOOP\r\n") == "+OK\r\n"


def test_new_mail_moves_to_cur_with_info_suffix(env: Env) -> None:
    """Logging in moves new mail to cur/ with the ":2," info suffix."""
    path = env.deliver("alice", MESSAGE_1)
    client = env.connect()
    client.login()
    assert env.files("alice") == [path.name + ":2,"]


def test_uidl_stable_across_sessions_and_restarts(env: Env) -> None:
    """UIDLs stay the same in a later session and after a restart, new mail added at the end."""
    env.deliver("alice", MESSAGE_1)
    env.deliver("alice", MESSAGE_2)
    first = env.connect()
    first.login()
    uidls_first = multiline(first.send("UIDL\r\n"))
    first.send("QUIT\r\n")
    env.deliver("alice", b"Subject: three\r\n\r\n3\r\n")
    second = env.connect(factory=env.factory())  # a new factory: as after a restart
    second.login()
    uidls_second = multiline(second.send("UIDL\r\n"))
    assert uidls_second[:2] == uidls_first
    assert len(uidls_second) == 3


def test_uidl_for_long_or_odd_names_is_a_stable_hash() -> None:
    """A UIDL is the Maildir unique name, or a stable hash of it when that is too long."""
    assert uidl_for("123.abc,S=10:2,S") == "123.abc"
    long_name = "1700000000.M1P2Q3R4." + "h" * 80
    assert uidl_for(long_name) == uidl_for(long_name + ",S=5:2,") != long_name
    assert len(uidl_for(long_name)) <= 70


@pytest.mark.parametrize("odd", [" ", "\x7f", "\x00", "\r", "\n", "\t", "\u00e9", "\u2028", "\udc80"])
def test_uidl_outside_0x21_to_0x7e_is_hashed(odd: str) -> None:
    """A unique name with a space, a control character or anything not ASCII never becomes a
    UIDL as it is (RFC 1939: 0x21..0x7E), so no UIDL line can be split or forged."""
    uidl = uidl_for(f"1700000000.M1{odd}P2.host,S=5:2,")
    assert len(uidl) == 64 and all(c in "0123456789abcdef" for c in uidl)
    assert uidl_for("1700000000.M1!~P2.host:2,") == "1700000000.M1!~P2.host"


def test_retr_dot_stuffing(env: Env) -> None:
    """RETR dot-stuffs lines that start with a dot and ends with a lone dot."""
    env.deliver("alice", MESSAGE_2)
    client = env.connect()
    client.login()
    reply = client.send("RETR 1\r\n")
    assert reply.startswith(f"+OK {len(MESSAGE_2)} octets\r\n")
    assert "\r\n..starts with a dot\r\n...two dots\r\n..\r\nline 5\r\n" in reply
    assert reply.endswith("line 6\r\n.\r\n")
    assert unstuff(reply) == MESSAGE_2


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 7, 64 * 1024])
def test_retr_dot_stuffing_across_block_boundaries(
    env: Env, monkeypatch: pytest.MonkeyPatch, chunk_size: int
) -> None:
    """Dot-stuffing is right wherever the file's read blocks split lines, and a missing final CRLF is added."""
    monkeypatch.setattr(pop3_transfer, "CHUNK_SIZE", chunk_size)
    message = b".first\r\n" + MESSAGE_2 + b".\r\n..\r\n.last"
    env.deliver("alice", message)
    client = env.connect()
    client.login()
    reply = client.send("RETR 1\r\n")
    assert reply.endswith(".last\r\n.\r\n")  # CRLF added before the terminator
    assert unstuff(reply) == message + b"\r\n"


def test_retr_small_message_in_one_write(env: Env) -> None:
    """RETR of a message under 64 KiB is one write: status line, message and terminator (no delayed-ACK stall)."""
    env.deliver("alice", MESSAGE_1)
    client = env.connect()
    client.login()
    writes: list[bytes] = []
    original = client.transport.write
    client.transport.write = lambda data: (writes.append(data), original(data))[1]  # type: ignore[method-assign]
    client.send("RETR 1\r\n")
    assert writes == [b"+OK %d octets\r\n" % len(MESSAGE_1) + MESSAGE_1 + b".\r\n"]


def test_retr_empty_message(env: Env) -> None:
    """RETR of an empty message is the status line and the terminator."""
    env.deliver("alice", b"")
    client = env.connect()
    client.login()
    assert client.send("RETR 1\r\n") == "+OK 0 octets\r\n.\r\n"


def test_top(env: Env) -> None:
    """TOP gives the header and the asked number of body lines; bad arguments get -ERR."""
    env.deliver("alice", MESSAGE_2)
    client = env.connect()
    client.login()
    header = b"From: dave@example.net\r\nSubject: two\r\n\r\n"
    assert unstuff(client.send("TOP 1 0\r\n")) == header
    assert unstuff(client.send("TOP 1 2\r\n")) == header + b"line 1\r\n.starts with a dot\r\n"
    assert unstuff(client.send("TOP 1 100\r\n")) == MESSAGE_2
    assert client.send("TOP 1\r\n") == "-ERR Syntax: TOP message-number lines\r\n"
    assert client.send("TOP 2 1\r\n") == "-ERR No such message\r\n"


def test_dele_rset_quit_keeps_messages(env: Env) -> None:
    """RSET undoes DELE: QUIT then deletes nothing."""
    env.deliver("alice", MESSAGE_1)
    env.deliver("alice", MESSAGE_2)
    client = env.connect()
    client.login()
    assert client.send("DELE 1\r\n") == "+OK Message 1 deleted\r\n"
    assert client.send("STAT\r\n") == f"+OK 1 {len(MESSAGE_2)}\r\n"
    assert client.send("RSET\r\n") == f"+OK Maildrop has 2 messages ({len(MESSAGE_1) + len(MESSAGE_2)} octets)\r\n"
    assert client.send("QUIT\r\n") == f"+OK {HOSTNAME} closing connection, 0 messages deleted\r\n"
    assert len(env.files("alice")) == 2


def test_dele_quit_removes_and_deleted_messages_are_invisible(env: Env) -> None:
    """A deleted message is gone for every command at once, removed from disk at QUIT, and the lock released."""
    env.deliver("alice", MESSAGE_1)
    env.deliver("alice", MESSAGE_2)
    client = env.connect()
    client.login()
    client.send("DELE 1\r\n")
    assert client.send("DELE 1\r\n") == "-ERR Message already deleted\r\n"
    assert client.send("RETR 1\r\n") == "-ERR Message already deleted\r\n"
    assert client.send("LIST 1\r\n") == "-ERR Message already deleted\r\n"
    assert client.send("UIDL 1\r\n") == "-ERR Message already deleted\r\n"
    assert client.send("TOP 1 0\r\n") == "-ERR Message already deleted\r\n"
    assert multiline(client.send("LIST\r\n")) == [f"2 {len(MESSAGE_2)}"]
    assert len(multiline(client.send("UIDL\r\n"))) == 1
    assert client.send("QUIT\r\n") == f"+OK {HOSTNAME} closing connection, 1 messages deleted\r\n"
    assert client.transport.disconnecting
    remaining = env.files("alice")
    assert len(remaining) == 1 and (env.root / "alice" / "cur" / remaining[0]).read_bytes() == MESSAGE_2
    assert not env.locks.is_locked("alice")


def test_dele_then_connection_lost_keeps_everything(env: Env) -> None:
    """A session lost after DELE deletes nothing and releases the mailbox lock."""
    env.deliver("alice", MESSAGE_1)
    client = env.connect()
    client.login()
    client.send("DELE 1\r\n")
    client.drop()
    assert len(env.files("alice")) == 1
    assert not env.locks.is_locked("alice")


def test_idle_timeout_closes_without_deleting(env: Env) -> None:
    """After 600 s idle the session is closed with -ERR, deleting nothing and releasing the lock."""
    env.deliver("alice", MESSAGE_1)
    client = env.connect()
    client.login()
    client.send("DELE 1\r\n")
    env.clock.advance(599)
    assert not client.transport.disconnecting
    env.clock.advance(2)
    assert client.take() == "-ERR Idle timeout, closing connection\r\n"
    assert client.transport.disconnecting
    client.drop()
    assert len(env.files("alice")) == 1
    assert not env.locks.is_locked("alice")


# -- pipelining, line handling, states ---------------------------------------------------


def test_pipelined_commands_answered_in_order(env: Env) -> None:
    """A pipelined login-to-QUIT sequence is answered in order and its deletion committed."""
    env.deliver("alice", MESSAGE_1)
    client = env.connect()
    reply = client.send("USER alice\r\nPASS alice-password\r\nSTAT\r\nUIDL 1\r\nRETR 1\r\nDELE 1\r\nQUIT\r\n")
    statuses = [line for line in reply.split("\r\n") if line.startswith(("+OK", "-ERR"))]
    assert statuses[0] == "+OK Send your password"
    assert statuses[1].startswith("+OK Logged in, 1 messages")
    assert statuses[2] == f"+OK 1 {len(MESSAGE_1)}"
    assert statuses[3].startswith("+OK 1 ")
    assert statuses[4] == f"+OK {len(MESSAGE_1)} octets"
    assert statuses[5] == "+OK Message 1 deleted"
    assert statuses[6].endswith("1 messages deleted")
    assert env.files("alice") == []


def test_pipelined_commands_wait_for_asynchronous_work(env: Env) -> None:
    """Pipelined commands wait for the mailbox scan and QUIT's commit; their replies are held while a
    complete command is still waiting and leave together; nothing after QUIT is answered."""
    env.deliver("alice", MESSAGE_1)
    runner = ManualRunner()
    client = env.connect(run_blocking=runner)
    reply = client.send("USER alice\r\nPASS alice-password\r\nSTAT\r\nDELE 1\r\nQUIT\r\nNOOP\r\n")
    assert reply == ""  # USER's reply waits for the rest of the pipeline (the mailbox scan is running)
    runner.run_one()
    assert client.take() == ""  # QUIT's commit is running and NOOP still waits: still held
    assert len(env.files("alice")) == 1
    runner.run_one()
    assert client.take() == (
        "+OK Send your password\r\n"
        f"+OK Logged in, 1 messages ({len(MESSAGE_1)} octets)\r\n"
        f"+OK 1 {len(MESSAGE_1)}\r\n"
        "+OK Message 1 deleted\r\n"
        f"+OK {HOSTNAME} closing connection, 1 messages deleted\r\n"
    )  # flushed by the close; NOOP is dropped with the connection
    assert env.files("alice") == []


def test_replies_are_not_held_when_nothing_else_waits(env: Env) -> None:
    """One command at a time: each reply leaves at once (holding is only for a pipeline)."""
    client = env.connect()
    assert client.send("USER alice\r\n") == "+OK Send your password\r\n"
    assert client.send("CAPA\r\n").startswith("+OK")


class PausingTransport(StringTransport):
    """A transport whose buffer, once ``full``, is always full: it pauses a
    streaming producer after every write (as a client that reads slowly)."""

    full = False

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.full and self.producer is not None and self.streaming:
            self.producer.pauseProducing()


def test_retr_is_paced_by_the_transport_and_later_commands_wait(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow reader paces RETR's writes, and a pipelined NOOP is answered only after the terminator."""
    monkeypatch.setattr(pop3_transfer, "CHUNK_SIZE", 16)
    env.deliver("alice", MESSAGE_2)
    session = env.factory().buildProtocol(IPv4Address("TCP", "192.0.2.7", 40000))
    transport = PausingTransport()
    session.makeConnection(transport)
    client = Client(session, transport)
    client.take()
    client.login()
    transport.full = True
    first = client.send("RETR 1\r\nNOOP\r\n")
    assert first.startswith(f"+OK {len(MESSAGE_2)} octets\r\n") and len(first) < 16 + 30
    writes = 1
    out = first
    while not out.endswith("+OK\r\n") and writes < 1000:
        transport.producer.resumeProducing()
        out += client.take()
        writes += 1
    assert writes > 5
    assert out.endswith("line 6\r\n.\r\n+OK\r\n")  # NOOP answered only after the terminator
    assert unstuff(out[: -len("+OK\r\n")]) == MESSAGE_2


def test_pipelined_input_is_bounded_while_a_command_runs(env: Env) -> None:
    """A flood of pipelined commands during a login pauses reading, then every command is answered."""
    runner = ManualRunner()
    client = env.connect(run_blocking=runner)
    client.send("USER alice\r\nPASS alice-password\r\n")
    client.send("NOOP\r\n" * 20_000)
    assert client.transport.producerState == "paused"  # stop reading until we catch up
    runner.run_one()
    reply = client.take()
    assert reply.count("+OK\r\n") <= 101  # a long pipeline yields the reactor between slices
    env.clock.advance(0)  # (Clock runs the slices it schedules for now in one advance)
    reply += client.take()
    assert reply.count("+OK\r\n") == 20_000
    assert client.transport.producerState == "producing"


def test_connection_lost_during_mailbox_scan_releases_lock_afterwards(env: Env) -> None:
    """A client gone during the mailbox scan leaves the lock held until the scan ends, then released."""
    runner = ManualRunner()
    client = env.connect(run_blocking=runner)
    client.send("USER alice\r\nPASS alice-password\r\n")
    client.drop()
    assert env.locks.is_locked("alice")  # the scan still owns the mailbox
    runner.run_one()
    assert not env.locks.is_locked("alice")
    assert client.take() == ""


def test_overlong_line(env: Env) -> None:
    """A command line over 255 octets gets -ERR Line too long; one of exactly 255 is accepted."""
    client = env.connect()
    assert client.send("NOOP " + "x" * 300 + "\r\n") == "-ERR Line too long\r\n"
    assert client.send("USER " + "a" * 248 + "\r\n") == "+OK Send your password\r\n"  # 255 octets with CRLF
    assert client.send("USER " + "a" * 249 + "\r\n") == "-ERR Line too long\r\n"


def test_overlong_line_in_pieces_keeps_buffer_bounded(env: Env) -> None:
    """An endless line arriving in pieces is never buffered past the limit and the session goes on."""
    client = env.connect()
    for _ in range(100):
        assert client.send("y" * 10_000) == ""
        assert len(client.session.input) <= pop3_server.MAX_COMMAND_LINE
    assert client.send("\r\nCAPA\r\n").startswith("-ERR Line too long\r\n+OK Capability list follows\r\n")


def test_bare_lf_and_case_insensitive_commands(env: Env) -> None:
    """Commands end with bare LF too and are case-insensitive."""
    client = env.connect()
    client.send("user alice\n")
    assert client.send("pAsS alice-password\n").startswith("+OK Logged in")
    assert client.send("stat\n") == "+OK 0 0\r\n"


def test_unknown_command(env: Env) -> None:
    """Unknown commands, empty lines and APOP get -ERR Unknown command."""
    client = env.connect()
    assert client.send("XYZZY\r\n") == "-ERR Unknown command\r\n"
    assert client.send("\r\n") == "-ERR Unknown command\r\n"
    assert client.send("APOP alice 0123456789abcdef\r\n") == "-ERR Unknown command\r\n"


def test_commands_in_the_wrong_state(env: Env) -> None:
    """Transaction commands before login and login commands after it get -ERR (STLS listener, plaintext allowed)."""
    client = env.connect(allow_plaintext_auth=True, implicit_tls=False, tls_context_factory=object())
    for command in ("STAT", "LIST", "UIDL", "RETR 1", "TOP 1 1", "DELE 1", "RSET", "NOOP"):
        assert client.send(command + "\r\n") == "-ERR Not logged in\r\n", command
    assert client.send("PASS alice-password\r\n") == "-ERR Send USER first\r\n"
    client.login()
    for command in ("USER alice", "PASS alice-password", "AUTH PLAIN", "STLS"):
        assert client.send(command + "\r\n") == "-ERR Command not valid after login\r\n", command
    assert client.send("STAT 1\r\n") == "-ERR STAT takes no argument\r\n"


def test_stls_without_tls_context(env: Env) -> None:
    """STLS without a TLS context gets -ERR TLS is not available."""
    client = env.connect(implicit_tls=False, tls_context_factory=None)
    assert client.send("STLS\r\n") == "-ERR TLS is not available\r\n"


def test_stls_when_already_in_tls(env: Env) -> None:
    """STLS on the pop3s listener gets -ERR Already using TLS."""
    client = env.connect(implicit_tls=True, tls_context_factory=object())
    assert client.send("STLS\r\n") == "-ERR Already using TLS\r\n"


# -- STLS with real TLS ---------------------------------------------------------------------


class MemoryTLSTransport(StringTransport):
    """A StringTransport that can startTLS for real, the way Twisted's TCP transports do."""

    TLS = False

    def __init__(self, is_client: bool) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "192.0.2.8", 40001))
        self._tlsClientDefault = is_client
        self.protocol: Any = None

    @property
    def streamingProducer(self) -> Any:
        return self.streaming

    def startTLS(self, context_factory: Any, normal: bool = True) -> None:
        _newtls.startTLS(self, context_factory, normal, StringTransport)
        # Twisted aggregates small TLS writes until the next reactor turn; there
        # is no reactor here, so write through at once.
        self.protocol.write = functools.partial(TLSMemoryBIOProtocol.write, self.protocol)

    def write(self, data: bytes) -> None:
        if self.TLS:
            self.protocol.write(data)
        else:
            super().write(data)

    def loseConnection(self) -> None:
        if self.TLS:
            self.protocol.loseConnection()
        else:
            super().loseConnection()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self.TLS:
            self.protocol.registerProducer(producer, streaming)
        else:
            super().registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        if self.TLS:
            self.protocol.unregisterProducer()
        else:
            super().unregisterProducer()


class Collector(Protocol):
    """The client side: remembers what it received (decrypted, once in TLS)."""

    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def take(self) -> str:
        out, self.received = self.received, b""
        return out.decode("latin-1")


def pump(a: MemoryTLSTransport, b: MemoryTLSTransport) -> None:
    """Move bytes both ways until both sides are quiet."""
    for _ in range(1000):
        moved = False
        for source, target in ((a, b), (b, a)):
            data = source.value()
            if data:
                source.clear()
                target.protocol.dataReceived(data)
                moved = True
        if not moved:
            return
    raise AssertionError("connection never went quiet")


@pytest.fixture(scope="module")
def tls_contexts(pki: Any) -> tuple[Any, Any]:
    """(server options, client options) from the test PKI: the localhost certificate and its CA."""
    return pki.twisted_contexts()


def tls_pair(
    env: Env, server_context: Any, **kwargs: Any
) -> tuple[POP3Session, Collector, MemoryTLSTransport, MemoryTLSTransport]:
    """A server session and a client, connected in clear, greeting already read."""
    factory = env.factory(tls_context_factory=server_context, implicit_tls=False, **kwargs)
    session = factory.buildProtocol(IPv4Address("TCP", "192.0.2.8", 40001))
    server_transport = MemoryTLSTransport(is_client=False)
    server_transport.protocol = session
    session.makeConnection(server_transport)
    client = Collector()
    client_transport = MemoryTLSTransport(is_client=True)
    client_transport.protocol = client
    client.makeConnection(client_transport)
    pump(server_transport, client_transport)
    assert client.take() == f"+OK {HOSTNAME} POP3 server ready\r\n"
    return session, client, server_transport, client_transport


@pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")  # inside Twisted's TLS setup
def test_stls_discards_pipelined_command_and_logs_in_over_tls(env: Env, tls_contexts: tuple[Any, Any]) -> None:
    """A USER pipelined after STLS is discarded, not run inside TLS; login and RETR then work over real TLS."""
    server_context, client_context = tls_contexts
    env.deliver("alice", MESSAGE_2)
    # Plaintext login is allowed here so that a smuggled USER would visibly count.
    session, client, st, ct = tls_pair(env, server_context, allow_plaintext_auth=True)
    ct.write(b"STLS\r\nUSER alice\r\n")
    pump(st, ct)
    assert client.take() == "+OK Begin TLS negotiation\r\n"  # nothing answers the smuggled USER
    ct.startTLS(client_context)
    pump(st, ct)
    assert client.take() == ""
    ct.write(b"PASS alice-password\r\n")
    pump(st, ct)
    assert client.take() == "-ERR Send USER first\r\n"  # the pipelined USER was never executed
    ct.write(b"CAPA\r\n")
    pump(st, ct)
    caps = multiline(client.take())
    assert "STLS" not in caps and "USER" in caps
    ct.write(b"USER alice\r\nPASS alice-password\r\nRETR 1\r\nQUIT\r\n")
    pump(st, ct)
    reply = client.take()
    assert reply.startswith("+OK Send your password\r\n+OK Logged in, 1 messages")
    retr = reply[reply.index(f"+OK {len(MESSAGE_2)} octets"):]
    retr = retr[: retr.index("\r\n.\r\n") + 5]
    assert unstuff(retr) == MESSAGE_2
    assert reply.endswith("closing connection, 0 messages deleted\r\n")


@pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")
def test_stls_enables_login_when_plaintext_is_refused(env: Env, tls_contexts: tuple[Any, Any]) -> None:
    """Plaintext refused: USER is offered only after STLS, a pipelined CAPA is discarded, AUTH PLAIN works in TLS."""
    server_context, client_context = tls_contexts
    session, client, st, ct = tls_pair(env, server_context, allow_plaintext_auth=False)
    ct.write(b"CAPA\r\n")
    pump(st, ct)
    assert "USER" not in multiline(client.take())
    ct.write(b"STLS\r\nCAPA\r\n")
    pump(st, ct)
    assert client.take() == "+OK Begin TLS negotiation\r\n"
    ct.startTLS(client_context)
    pump(st, ct)
    assert client.take() == ""  # the pipelined CAPA was discarded
    assert session.in_tls
    ct.write(f"AUTH PLAIN {plain('', 'alice', ALICE_PASSWORD)}\r\nSTLS\r\n".encode())
    pump(st, ct)
    assert client.take() == "+OK Logged in, 0 messages (0 octets)\r\n-ERR Command not valid after login\r\n"
