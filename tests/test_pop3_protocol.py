"""POP3 protocol unit tests: in-memory transports, a real Portal and real Maildirs.

Mailbox disk work runs synchronously (``run_blocking=sync_run``) unless a test
wants to control when it finishes (``ManualRunner``).  The STLS tests run real
TLS (pyOpenSSL via ``TLSMemoryBIOProtocol``) over in-memory transports.
"""

from __future__ import annotations

import base64
import datetime
import functools
import os
from pathlib import Path
from typing import Any, Callable

import attrs
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet import _newtls
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from mailappliance.directory import DirectoryUnavailable, Subscriber
from mailappliance.pop3 import server as pop3_server
from mailappliance.pop3 import transfer as pop3_transfer
from mailappliance.pop3.mailbox import MailboxLocks, MaildirRealm, uidl_for
from mailappliance.pop3.server import POP3Factory, POP3Session

HOSTNAME = "pop.example.test"

ALICE = Subscriber(dn="uid=alice,ou=people,dc=example,dc=org", uid="alice", mail="alice@example.org")
BOB = Subscriber(dn="uid=bob,ou=people,dc=example,dc=org", uid="bob", mail="bob@example.org")
PASSWORDS = {"alice": "secret", "bob": "correct horse battery"}

MESSAGE_1 = b"From: carol@example.net\r\nSubject: one\r\n\r\nHello Alice.\r\n"
MESSAGE_2 = (
    b"From: dave@example.net\r\nSubject: two\r\n\r\n"
    b"line 1\r\n.starts with a dot\r\n..two dots\r\n.\r\nline 5\r\nline 6\r\n"
)


# -- directory stand-ins ------------------------------------------------------


@implementer(ICredentialsChecker)
class DictChecker:
    """Answers like the shared checker: the Subscriber record is the avatar id."""

    credentialInterfaces = (IUsernamePassword,)

    def requestAvatarId(self, credentials: Any) -> Deferred:
        login = credentials.username.decode()
        for subscriber in (ALICE, BOB):
            if login in (subscriber.uid, subscriber.mail):
                if credentials.checkPassword(PASSWORDS[subscriber.uid].encode()):
                    return succeed(subscriber)
        return fail(UnauthorizedLogin(f"login {login!r} refused"))


@implementer(ICredentialsChecker)
class BrokenChecker:
    """The directory is down."""

    credentialInterfaces = (IUsernamePassword,)

    def requestAvatarId(self, credentials: Any) -> Deferred:
        return fail(DirectoryUnavailable("ldap://127.0.0.1:389 timed out"))


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


# -- harness ---------------------------------------------------------------------


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
    root: Path
    locks: MailboxLocks
    clock: Clock
    counter: int = 0

    def factory(self, checker: Any = None, **kwargs: Any) -> POP3Factory:
        portal = Portal(MaildirRealm(self.root, self.locks), [checker or DictChecker()])
        kwargs.setdefault("allow_plaintext_auth", True)
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


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path / "maildirs", MailboxLocks(), Clock())


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
    client = env.connect()
    assert client.send("QUIT\r\n") == f"+OK {HOSTNAME} closing connection\r\n"
    assert client.transport.disconnecting


def test_capa_without_plaintext_auth_hides_user_and_sasl(env: Env) -> None:
    client = env.connect(allow_plaintext_auth=False, tls_context_factory=object())
    caps = multiline(client.send("CAPA\r\n"))
    assert caps == [
        "TOP", "UIDL", "RESP-CODES", "PIPELINING", "AUTH-RESP-CODE", "STLS", "IMPLEMENTATION mailappliance",
    ]


def test_capa_without_tls_context_has_no_stls(env: Env) -> None:
    client = env.connect(allow_plaintext_auth=False)
    caps = multiline(client.send("capa\r\n"))
    assert "STLS" not in caps and "USER" not in caps and "SASL PLAIN" not in caps


def test_capa_with_plaintext_allowed_before_and_after_login(env: Env) -> None:
    client = env.connect(allow_plaintext_auth=True)
    before = multiline(client.send("CAPA\r\n"))
    assert "USER" in before and "SASL PLAIN" in before and "STLS" not in before
    client.login()
    after = multiline(client.send("CAPA\r\n"))
    assert after == before


def test_capa_with_implicit_tls_offers_login_but_not_stls(env: Env) -> None:
    client = env.connect(allow_plaintext_auth=False, implicit_tls=True, tls_context_factory=object())
    caps = multiline(client.send("CAPA\r\n"))
    assert "USER" in caps and "SASL PLAIN" in caps and "STLS" not in caps


# -- USER/PASS -------------------------------------------------------------------


def test_user_pass_good(env: Env) -> None:
    env.deliver("alice", MESSAGE_1)
    client = env.connect()
    assert client.send("USER alice\r\n") == "+OK Send your password\r\n"
    assert client.send("PASS secret\r\n") == f"+OK Logged in, 1 messages ({len(MESSAGE_1)} octets)\r\n"


def test_user_pass_by_address_and_password_with_spaces(env: Env) -> None:
    client = env.connect()
    client.send("USER bob@example.org\r\n")
    assert client.send("PASS correct horse battery\r\n") == "+OK Logged in, 0 messages (0 octets)\r\n"
    assert (env.root / "bob" / "cur").is_dir()
    assert (env.root / "bob").stat().st_mode & 0o777 == 0o700


def test_user_pass_bad(env: Env) -> None:
    client = env.connect()
    client.send("USER alice\r\n")
    assert client.send("PASS wrong\r\n") == "-ERR [AUTH] Authentication failed\r\n"
    assert client.send("PASS secret\r\n") == "-ERR Send USER first\r\n"
    client.login()


def test_directory_unavailable_is_temporary(env: Env) -> None:
    client = env.connect(checker=BrokenChecker())
    client.send("USER alice\r\n")
    assert client.send("PASS secret\r\n") == "-ERR [SYS/TEMP] Directory unavailable, try again later\r\n"
    assert not client.transport.disconnecting


def test_a_newer_login_ends_the_older_session_without_its_deletions(env: Env) -> None:
    """A client that vanished without QUIT (no FIN) must not lock its owner out:
    the next login takes the mailbox over and the old DELEs are discarded."""
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
    first.send("USER alice\r\nPASS secret\r\n")
    runner.run_one()
    first.send("DELE 1\r\nQUIT\r\n")
    second = env.connect()
    second.send("USER alice\r\n")
    assert second.send("PASS secret\r\n") == "-ERR [IN-USE] Mailbox is locked by another session\r\n"
    runner.run_one()
    second.login()


def test_plaintext_login_refused_outside_tls(env: Env) -> None:
    client = env.connect(allow_plaintext_auth=False, tls_context_factory=object())
    assert client.send("USER alice\r\n") == "-ERR [AUTH] TLS required, use STLS first\r\n"
    assert client.send("PASS secret\r\n") == "-ERR [AUTH] TLS required, use STLS first\r\n"
    assert client.send("AUTH PLAIN\r\n") == "-ERR [AUTH] TLS required, use STLS first\r\n"
    assert client.send("AUTH\r\n") == "+OK\r\n.\r\n"


# -- AUTH PLAIN ---------------------------------------------------------------------


def plain(authzid: str, authcid: str, password: str) -> str:
    return base64.b64encode(f"{authzid}\0{authcid}\0{password}".encode()).decode()


def test_auth_lists_mechanisms(env: Env) -> None:
    client = env.connect()
    assert client.send("AUTH\r\n") == "+OK\r\nPLAIN\r\n.\r\n"


def test_auth_plain_initial_response(env: Env) -> None:
    client = env.connect()
    reply = client.send(f"AUTH PLAIN {plain('', 'alice', 'secret')}\r\n")
    assert reply.startswith("+OK Logged in")


def test_auth_plain_continuation(env: Env) -> None:
    client = env.connect()
    assert client.send("auth plain\r\n") == "+ \r\n"
    assert client.send(plain("bob", "bob", PASSWORDS["bob"]) + "\r\n").startswith("+OK Logged in")


def test_auth_plain_failures(env: Env) -> None:
    client = env.connect()
    assert client.send(f"AUTH PLAIN {plain('', 'alice', 'nope')}\r\n") == "-ERR [AUTH] Authentication failed\r\n"
    assert client.send(f"AUTH PLAIN {plain('bob', 'alice', 'secret')}\r\n") == "-ERR [AUTH] Authentication failed\r\n"
    assert client.send("AUTH PLAIN !!!notbase64\r\n") == "-ERR Invalid base64 data\r\n"
    assert client.send("AUTH PLAIN =\r\n") == "-ERR [AUTH] Authentication failed\r\n"
    assert client.send("AUTH CRAM-MD5\r\n") == "-ERR Unsupported authentication mechanism\r\n"
    client.send("AUTH PLAIN\r\n")
    assert client.send("*\r\n") == "-ERR Authentication cancelled\r\n"
    assert client.send("NOOP\r\n") == "-ERR Not logged in\r\n"


def test_auth_plain_continuation_may_exceed_command_line_limit(env: Env) -> None:
    client = env.connect()
    client.send("AUTH PLAIN\r\n")
    response = plain("", "alice", "x" * 400)
    assert len(response) > 255
    assert client.send(response + "\r\n") == "-ERR [AUTH] Authentication failed\r\n"


# -- TRANSACTION ------------------------------------------------------------------------


def test_stat_list_uidl(env: Env) -> None:
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
    path = env.deliver("alice", MESSAGE_1)
    client = env.connect()
    client.login()
    assert env.files("alice") == [path.name + ":2,"]


def test_uidl_stable_across_sessions_and_restarts(env: Env) -> None:
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
    assert uidl_for("123.abc,S=10:2,S") == "123.abc"
    long_name = "1700000000.M1P2Q3R4." + "h" * 80
    assert uidl_for(long_name) == uidl_for(long_name + ",S=5:2,") != long_name
    assert len(uidl_for(long_name)) <= 70


def test_retr_dot_stuffing(env: Env) -> None:
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
    monkeypatch.setattr(pop3_transfer, "CHUNK_SIZE", chunk_size)
    message = b".first\r\n" + MESSAGE_2 + b".\r\n..\r\n.last"
    env.deliver("alice", message)
    client = env.connect()
    client.login()
    reply = client.send("RETR 1\r\n")
    assert reply.endswith(".last\r\n.\r\n")  # CRLF added before the terminator
    assert unstuff(reply) == message + b"\r\n"


def test_retr_status_and_first_block_in_one_write(env: Env) -> None:
    env.deliver("alice", MESSAGE_1)
    client = env.connect()
    client.login()
    writes: list[bytes] = []
    original = client.transport.write
    client.transport.write = lambda data: (writes.append(data), original(data))[1]  # type: ignore[method-assign]
    client.send("RETR 1\r\n")
    assert writes[0].startswith(b"+OK") and writes[0].endswith(MESSAGE_1)
    assert writes[1:] == [b".\r\n"]


def test_retr_empty_message(env: Env) -> None:
    env.deliver("alice", b"")
    client = env.connect()
    client.login()
    assert client.send("RETR 1\r\n") == "+OK 0 octets\r\n.\r\n"


def test_top(env: Env) -> None:
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
    env.deliver("alice", MESSAGE_1)
    client = env.connect()
    client.login()
    client.send("DELE 1\r\n")
    client.drop()
    assert len(env.files("alice")) == 1
    assert not env.locks.is_locked("alice")


def test_idle_timeout_closes_without_deleting(env: Env) -> None:
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
    env.deliver("alice", MESSAGE_1)
    client = env.connect()
    reply = client.send("USER alice\r\nPASS secret\r\nSTAT\r\nUIDL 1\r\nRETR 1\r\nDELE 1\r\nQUIT\r\n")
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
    env.deliver("alice", MESSAGE_1)
    runner = ManualRunner()
    client = env.connect(run_blocking=runner)
    reply = client.send("USER alice\r\nPASS secret\r\nSTAT\r\nDELE 1\r\nQUIT\r\nNOOP\r\n")
    assert reply == "+OK Send your password\r\n"  # the mailbox scan is still running
    runner.run_one()
    reply = client.take()
    assert reply == (
        f"+OK Logged in, 1 messages ({len(MESSAGE_1)} octets)\r\n"
        f"+OK 1 {len(MESSAGE_1)}\r\n"
        "+OK Message 1 deleted\r\n"
    )  # QUIT's commit is running; NOOP waits and is then dropped with the connection
    assert len(env.files("alice")) == 1
    runner.run_one()
    assert client.take() == f"+OK {HOSTNAME} closing connection, 1 messages deleted\r\n"
    assert env.files("alice") == []


class PausingTransport(StringTransport):
    """A transport whose buffer, once ``full``, is always full: it pauses a
    streaming producer after every write (as a client that reads slowly)."""

    full = False

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.full and self.producer is not None and self.streaming:
            self.producer.pauseProducing()


def test_retr_is_paced_by_the_transport_and_later_commands_wait(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
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
    runner = ManualRunner()
    client = env.connect(run_blocking=runner)
    client.send("USER alice\r\nPASS secret\r\n")
    client.send("NOOP\r\n" * 20_000)
    assert client.transport.producerState == "paused"  # stop reading until we catch up
    runner.run_one()
    reply = client.take()
    assert reply.count("+OK\r\n") == 20_000
    assert client.transport.producerState == "producing"


def test_connection_lost_during_mailbox_scan_releases_lock_afterwards(env: Env) -> None:
    runner = ManualRunner()
    client = env.connect(run_blocking=runner)
    client.send("USER alice\r\nPASS secret\r\n")
    client.drop()
    assert env.locks.is_locked("alice")  # the scan still owns the mailbox
    runner.run_one()
    assert not env.locks.is_locked("alice")
    assert client.take() == ""


def test_overlong_line(env: Env) -> None:
    client = env.connect()
    assert client.send("NOOP " + "x" * 300 + "\r\n") == "-ERR Line too long\r\n"
    assert client.send("USER " + "a" * 248 + "\r\n") == "+OK Send your password\r\n"  # 255 octets with CRLF
    assert client.send("USER " + "a" * 249 + "\r\n") == "-ERR Line too long\r\n"


def test_overlong_line_in_pieces_keeps_buffer_bounded(env: Env) -> None:
    client = env.connect()
    for _ in range(100):
        assert client.send("y" * 10_000) == ""
        assert len(client.session.input) <= pop3_server.MAX_COMMAND_LINE
    assert client.send("\r\nCAPA\r\n").startswith("-ERR Line too long\r\n+OK Capability list follows\r\n")


def test_bare_lf_and_case_insensitive_commands(env: Env) -> None:
    client = env.connect()
    client.send("user alice\n")
    assert client.send("pAsS secret\n").startswith("+OK Logged in")
    assert client.send("stat\n") == "+OK 0 0\r\n"


def test_unknown_command(env: Env) -> None:
    client = env.connect()
    assert client.send("XYZZY\r\n") == "-ERR Unknown command\r\n"
    assert client.send("\r\n") == "-ERR Unknown command\r\n"
    assert client.send("APOP alice 0123456789abcdef\r\n") == "-ERR Unknown command\r\n"


def test_commands_in_the_wrong_state(env: Env) -> None:
    client = env.connect(tls_context_factory=object())
    for command in ("STAT", "LIST", "UIDL", "RETR 1", "TOP 1 1", "DELE 1", "RSET", "NOOP"):
        assert client.send(command + "\r\n") == "-ERR Not logged in\r\n", command
    assert client.send("PASS secret\r\n") == "-ERR Send USER first\r\n"
    client.login()
    for command in ("USER alice", "PASS secret", "AUTH PLAIN", "STLS"):
        assert client.send(command + "\r\n") == "-ERR Command not valid after login\r\n", command
    assert client.send("STAT 1\r\n") == "-ERR STAT takes no argument\r\n"


def test_stls_without_tls_context(env: Env) -> None:
    client = env.connect()
    assert client.send("STLS\r\n") == "-ERR TLS is not available\r\n"


def test_stls_when_already_in_tls(env: Env) -> None:
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
def tls_contexts() -> tuple[Any, Any]:
    """(server options, client options) from a fresh self-signed certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOSTNAME)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(HOSTNAME)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    server = PrivateCertificate.loadPEM(cert_pem + key_pem).options()
    client = optionsForClientTLS(HOSTNAME, trustRoot=Certificate.loadPEM(cert_pem))
    return server, client


def tls_pair(
    env: Env, server_context: Any, **kwargs: Any
) -> tuple[POP3Session, Collector, MemoryTLSTransport, MemoryTLSTransport]:
    """A server session and a client, connected in clear, greeting already read."""
    factory = env.factory(tls_context_factory=server_context, **kwargs)
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
    ct.write(b"PASS secret\r\n")
    pump(st, ct)
    assert client.take() == "-ERR Send USER first\r\n"  # the pipelined USER was never executed
    ct.write(b"CAPA\r\n")
    pump(st, ct)
    caps = multiline(client.take())
    assert "STLS" not in caps and "USER" in caps
    ct.write(b"USER alice\r\nPASS secret\r\nRETR 1\r\nQUIT\r\n")
    pump(st, ct)
    reply = client.take()
    assert reply.startswith("+OK Send your password\r\n+OK Logged in, 1 messages")
    retr = reply[reply.index(f"+OK {len(MESSAGE_2)} octets"):]
    retr = retr[: retr.index("\r\n.\r\n") + 5]
    assert unstuff(retr) == MESSAGE_2
    assert reply.endswith("closing connection, 0 messages deleted\r\n")


@pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")
def test_stls_enables_login_when_plaintext_is_refused(env: Env, tls_contexts: tuple[Any, Any]) -> None:
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
    ct.write(f"AUTH PLAIN {plain('', 'alice', 'secret')}\r\nSTLS\r\n".encode())
    pump(st, ct)
    assert client.take() == "+OK Logged in, 0 messages (0 octets)\r\n-ERR Command not valid after login\r\n"
