"""The POP3 server protocol (RFC 1939, CAPA RFC 2449, STLS RFC 2595, SASL PLAIN RFC 5034).

Our own thin protocol instead of ``twisted.mail.pop3.POP3``, which has no STLS,
deletes at DELE instead of QUIT and gives vague errors.  It stands on the
shared session kernel (:class:`~mailappliance.linesession.LineSession`:
framing, ordering, bounded input and output, timers, TLS discard, log
context with escaping) and keeps only POP3's grammar and state.  Rules kept here:

* Secrets only inside TLS: USER, PASS and AUTH PLAIN are refused (and not
  advertised by CAPA) outside TLS unless the listener allows plaintext login.
  The refusal carries ``[AUTH]`` (RFC 2449 has no TLS-specific code; Dovecot
  answers the same way), so clients show it as a login problem.
* Deletions happen at QUIT only; a dropped or timed-out connection keeps all mail.
* One session per mailbox: a new, successful login for a mailbox ends the
  older session (its DELEs are discarded, as RFC 1939 says for a session
  without QUIT), so a phone that lost its network is not locked out.
* Large answers (RETR, TOP, LIST, UIDL) are streamed from iterators
  (:mod:`.transfer`) only while the client reads; directory scans and
  unlinks, which grow with the mailbox, go through ``run_blocking``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, BinaryIO, TypeVar, cast

from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IOpenSSLContextFactory,
    IReactorThreads,
    IReactorTime,
    ITLSTransport,
    ITransport,
)
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailappliance.authenticator import Authenticator, LoginOutcome, LoginResult
from mailappliance.blocking import RunBlocking
from mailappliance.journal import settle_wait_limit
from mailappliance.linesession import LINE_TOO_LONG, LineSession, SessionSettings
from mailappliance.metrics import METRICS
from mailappliance.pop3 import replies
from mailappliance.pop3.mailbox import (
    CommitResult,
    IMaildirAccess,
    MailboxLockLost,
    MessageDeleted,
    NoSuchMessage,
    confirm_lock,
)
from mailappliance.pop3.transfer import listing, message_answer, read_top, retr_answer
from mailappliance.sasl import Collected, FailureKind, SaslExchange, SaslFailure
from mailappliance.verdicts import Verdict

if TYPE_CHECKING:
    from mailappliance.limits import RateLimits
    from mailappliance.quota import MailboxQuotas

log = Logger(namespace="mailappliance.pop3")

MAX_COMMAND_LINE = 255  # RFC 2449 section 4: including the CRLF
MAX_SASL_LINE = 2048  # RFC 5034 section 4: SASL responses may exceed 255 (PLAIN: up to ~1 KiB)
SETTLE_POLL_SECONDS = 0.2  # QUIT asks again this often while another worker's journal covers a DELEd message

_R = TypeVar("_R")
_T = TypeVar("_T")


def _text(wire: bytes) -> str | bytes:
    """UTF-8 text, or the bytes themselves when they are not (the checker refuses those)."""
    try:
        return wire.decode("utf-8")
    except UnicodeDecodeError:
        return wire


class State(enum.Enum):
    """RFC 1939 session states."""

    AUTHORIZATION = "AUTHORIZATION"
    TRANSACTION = "TRANSACTION"
    UPDATE = "UPDATE"


class POP3Session(LineSession):
    """One POP3 connection."""

    # Every attribute is a slot, as in the kernel: an idle connection keeps no per-session dict.
    __slots__ = ("state", "in_tls", "_pending_user", "_sasl_pending", "_mailbox", "_logout",
                 "_blocking_in_flight", "_login_name", "_settle_deadline")

    factory: POP3Factory
    log = log

    def __init__(self) -> None:
        super().__init__()
        self._settle_deadline = 0.0  # set at QUIT
        self.state = State.AUTHORIZATION
        self.in_tls = False
        self._pending_user: bytes | None = None
        self._sasl_pending = False
        self._mailbox: IMaildirAccess | None = None  # once logged in
        self._logout: Callable[[], None] | None = None
        self._blocking_in_flight = False
        self._login_name = ""

    def makeConnection(self, transport: ITransport) -> None:
        self.settings = self.factory.session_settings
        self.clock = self.factory.reactor
        self.limits = self.factory.limits
        super().makeConnection(transport)  # type: ignore[no-untyped-call]  # BaseProtocol is unannotated

    # -- kernel hooks ---------------------------------------------------------------

    def greet(self) -> None:
        self.in_tls = self.factory.implicit_tls
        self.log_event(log.info, "connect to {listener} (tls={tls})", listener=self.settings.listener,
                       tls=self.in_tls)
        METRICS.count("mailappliance_sessions_total", role="pop3s" if self.factory.implicit_tls else "pop3")
        self._ok(f"{self.factory.hostname} POP3 server ready")

    def refuse_connection(self, hit: Verdict) -> None:
        self._err(replies.for_limit(hit))

    def say_timeout(self, why: str) -> None:
        self.log_event(log.info, "{why} in state {state}, nothing deleted", why=why, state=self.state.value)
        self._err("Idle timeout, closing connection" if why == "idle timeout"
                  else f"{why.capitalize()}, closing connection")

    def internal_error(self, failure: Failure) -> None:
        self._err(replies.INTERNAL_ERROR)
        self._release_mailbox()
        self.close()

    def session_ended(self) -> None:
        if not self._blocking_in_flight:
            self._release_mailbox()

    def consume_input(self) -> bool:
        line = self.next_line(MAX_SASL_LINE if self._sasl_pending else MAX_COMMAND_LINE - 2)
        if line is None:
            return False
        self._handle_line(line)
        return True

    def _handle_line(self, line: bytes | object) -> None:
        if line is LINE_TOO_LONG:
            self._sasl_pending = False
            self._err("Line too long")
            return
        assert isinstance(line, bytes)
        if self._sasl_pending:
            self._sasl_pending = False
            self._auth_plain_response(line)
            return
        name, _, argument = line.partition(b" ")
        handler = self._HANDLERS.get(name.upper().decode("ascii", "replace")) if name.isascii() else None
        if handler is None:
            self._err("Unknown command")
            return
        handler(self, argument)

    # -- output -----------------------------------------------------------------

    def _ok(self, text: str = "") -> None:
        self.send(f"+OK {text}\r\n".encode() if text else b"+OK\r\n")

    def _err(self, text: str) -> None:
        self.send(f"-ERR {text}\r\n".encode())

    def _multiline(self, status: str, lines: list[str]) -> None:
        """A short multi-line answer (lines never start with '.'), in one write."""
        for chunk in listing(status, lines):
            self.send(chunk)

    # -- asynchronous steps -------------------------------------------------------

    def _run_blocking(self, function: Callable[..., _R], *args: object) -> Deferred[_R]:
        """Run mailbox disk work off the reactor; the mailbox stays locked meanwhile."""
        self._blocking_in_flight = True
        d = self.factory.run_blocking(function, *args)

        def settle(result: _T) -> _T:
            self._blocking_in_flight = False
            return result

        return d.addBoth(settle)

    @property
    def mailbox(self) -> IMaildirAccess:
        """The mailbox of a logged-in session (TRANSACTION state)."""
        assert self._mailbox is not None, "not logged in"
        return self._mailbox

    def _release_mailbox(self) -> None:
        logout, self._logout, self._mailbox = self._logout, None, None
        if logout is not None:
            logout()

    def evict(self) -> bool:
        """A newer login for this mailbox: end this session without committing its
        DELEs (RFC 1939: no QUIT, no deletion).  False while a QUIT commit runs."""
        if self.state is State.UPDATE or self._blocking_in_flight:
            return False
        self.log_event(log.info, "ended by a newer login for the same mailbox: login={login}, nothing deleted",
                       login=self._login_name)
        self._release_mailbox()
        self.state = State.UPDATE
        self._err(replies.TAKEN_OVER)
        self.abort()
        return True

    # -- capabilities -------------------------------------------------------------

    @property
    def plaintext_allowed(self) -> bool:
        """Passwords may be sent: inside TLS, or the listener explicitly allows it."""
        return self.in_tls or self.factory.allow_plaintext_auth

    @property
    def stls_available(self) -> bool:
        return self.factory.tls_context_factory is not None and not self.in_tls

    def capabilities(self) -> list[str]:
        """What CAPA says; the same list in both states (RFC 2449 section 5)."""
        caps = ["TOP", "UIDL", "RESP-CODES", "PIPELINING", "AUTH-RESP-CODE"]
        if self.plaintext_allowed:
            caps += ["USER", "SASL PLAIN"]
        if self.stls_available:
            caps.append("STLS")
        caps.append("IMPLEMENTATION mailappliance")
        return caps

    def _cmd_capa(self, argument: bytes) -> None:
        self._multiline("Capability list follows", self.capabilities())

    # -- AUTHORIZATION ------------------------------------------------------------

    def _require_authorization(self) -> bool:
        if self.state is State.AUTHORIZATION:
            return True
        self._err("Command not valid after login")
        return False

    def _refuse_plaintext(self) -> bool:
        """Answer and return True if passwords may not be sent on this connection."""
        if self.plaintext_allowed:
            return False
        self.log_event(log.info, "refused login attempt outside TLS")
        if self.stls_available:
            self._err("[AUTH] TLS required, use STLS first")
        else:
            self._err("[AUTH] Plaintext authentication is disabled on this connection")
        return True

    def _cmd_user(self, argument: bytes) -> None:
        if not self._require_authorization() or self._refuse_plaintext():
            return
        name = argument.strip()
        if not name:
            self._err("USER needs a login name")
            return
        self._pending_user = name
        self._ok("Send your password")

    def _cmd_pass(self, argument: bytes) -> None:
        if not self._require_authorization() or self._refuse_plaintext():
            return
        if self._pending_user is None:
            self._err("Send USER first")
            return
        login, self._pending_user = self._pending_user, None
        self._login(_text(login), _text(argument), "USER")  # the whole rest of the line: spaces allowed

    def _cmd_auth(self, argument: bytes) -> None:
        if not self._require_authorization():
            return
        parts = argument.split()
        if not parts:  # de facto mechanism listing (pre-RFC 5034 clients use it)
            self._multiline("", ["PLAIN"] if self.plaintext_allowed else [])
            return
        if parts[0].upper() != b"PLAIN":
            self._err("Unsupported authentication mechanism")
            return
        if len(parts) > 2:
            self._err("Syntax: AUTH PLAIN [initial-response]")
            return
        if self._refuse_plaintext():
            return
        if len(parts) == 1:
            self._sasl_pending = True
            self.send(b"+ \r\n")
            return
        self._auth_plain_response(b"" if parts[1] == b"=" else parts[1])

    def _auth_plain_response(self, response: bytes) -> None:
        """RFC 4616 message: authzid NUL authcid NUL password, base64 encoded (the shared SASL parser)."""
        exchange = SaslExchange("PLAIN", ("PLAIN",))
        step = exchange.respond(response.decode("ascii", "replace"))
        if isinstance(step, SaslFailure):
            if step.kind is FailureKind.MALFORMED:
                self.log_event(log.info, "login failed: login={login} mechanism=PLAIN reason={why}",
                               login=step.login or "?", why=step.reason)
            self._err(replies.SASL_FAILURES[step.kind])
            return
        assert isinstance(step, Collected)
        self._login(step.login, step.password, "PLAIN")

    def _cmd_stls(self, argument: bytes) -> None:
        if not self._require_authorization():
            return
        if self.in_tls:
            self._err("Already using TLS")
            return
        if self.factory.tls_context_factory is None:
            self._err("TLS is not available")
            return
        self._ok("Begin TLS negotiation")
        self.discard_pipelined_input("STLS")  # CVE-2011-0411 class: nothing sent in clear acts inside TLS
        # Not in TLS yet, so the transport is a plain tcp.Server, which is an ITLSTransport; its
        # startTLS takes context factories too (wrapped), though typed for connection creators only.
        cast(ITLSTransport, self.transport).startTLS(self.factory.tls_context_factory)  # type: ignore[arg-type]
        self.in_tls = True
        self._pending_user = None
        self._sasl_pending = False
        self.log_event(log.info, "TLS started (STLS)")

    # -- login ------------------------------------------------------------------------

    def _login(self, login: str | bytes, password: str | bytes, mechanism: str) -> None:
        """Log in through the shared front door; text from SASL, bytes from USER/PASS
        when they are not UTF-8 (the checker then refuses them, counting the failure)."""
        self._login_name = login if isinstance(login, str) else login.decode("utf-8", "replace")
        d = self.factory.authenticator.password(login, password, self.client_ip, mechanism,
                                                IMaildirAccess, mind=self)
        d.addCallback(self._login_outcome, mechanism)
        self.run(d)

    def _login_outcome(self, outcome: LoginOutcome, mechanism: str) -> Deferred[None] | None:
        if not outcome.ok:
            self._login_failed(outcome, mechanism)
            return None
        mailbox, logout = IMaildirAccess(outcome.avatar), outcome.logout  # the MaildirRealm's avatar
        assert logout is not None  # a successful login has one
        if self.closed:
            logout()
            return None
        self._mailbox, self._logout = mailbox, logout
        d = self._run_blocking(mailbox.load)
        return d.addCallbacks(self._mailbox_loaded, self._mailbox_load_failed, callbackArgs=(mechanism,))

    def _mailbox_loaded(self, _: None, mechanism: str) -> None:
        if self.closed or self._mailbox is None:
            self._release_mailbox()
            return
        count, octets = self._mailbox.stat()
        self.state = State.TRANSACTION
        self.log_event(
            log.info if self.in_tls else log.warn,
            "login ok: login={login} uid={uid} mechanism={mechanism} tls={tls} messages={count} octets={octets}",
            login=self._login_name, uid=self._mailbox.subscriber.uid, mechanism=mechanism,
            tls=self.in_tls, count=count, octets=octets,
        )
        self._ok(f"Logged in, {count} messages ({octets} octets)")

    def _mailbox_load_failed(self, failure: Failure) -> None:
        self.log_event(
            log.failure, "cannot open mailbox for login={login}", failure=failure, login=self._login_name
        )
        self._release_mailbox()
        self._err("[SYS/TEMP] Unable to open the mailbox, try again later")

    def _login_failed(self, outcome: LoginOutcome, mechanism: str) -> None:
        if outcome.unexpected is not None:
            self.log_event(log.failure, "login error: login={login} mechanism={mechanism}",
                           failure=outcome.unexpected, login=self._login_name, mechanism=mechanism)
        level = log.warn if outcome.result is LoginResult.TEMPORARY else log.info
        self.log_event(level, "login failed: login={login} mechanism={mechanism} reason={reason}",
                       login=self._login_name, mechanism=mechanism, reason=outcome.reason)
        if outcome.result is LoginResult.TEMPORARY and outcome.unexpected is not None:
            self._err(replies.INTERNAL_ERROR)
        else:
            self._err(replies.LOGIN_FAILURES[outcome.result])

    # -- TRANSACTION ----------------------------------------------------------------

    def _require_transaction(self) -> bool:
        if self.state is State.TRANSACTION:
            return True
        self._err("Not logged in" if self.state is State.AUTHORIZATION else "Session is ending")
        return False

    def _require_no_argument(self, command: str, argument: bytes) -> bool:
        if argument.strip():
            self._err(f"{command} takes no argument")
            return False
        return True

    def _message_index(self, argument: bytes) -> int | None:
        """The 0-based index for a message-number argument, or None after an -ERR."""
        text = argument.strip()
        if not text.isdigit() or not text.isascii() or int(text) == 0:
            self._err("Invalid message number")
            return None
        index = int(text) - 1
        try:
            self.mailbox.size(index)
        except NoSuchMessage:
            self._err("No such message")
            return None
        except MessageDeleted:
            self._err("Message already deleted")
            return None
        return index

    def _cmd_stat(self, argument: bytes) -> None:
        if self._require_transaction() and self._require_no_argument("STAT", argument):
            count, octets = self.mailbox.stat()
            self._ok(f"{count} {octets}")

    def _cmd_list(self, argument: bytes) -> None:
        if not self._require_transaction():
            return
        if argument.strip():
            index = self._message_index(argument)
            if index is not None:
                self._ok(f"{index + 1} {self.mailbox.size(index)}")
            return
        count, octets = self.mailbox.stat()
        mailbox = self.mailbox
        lines = (f"{i + 1} {mailbox.size(i)}" for i in range(mailbox.count()) if not mailbox.is_deleted(i))
        self.stream(listing(f"{count} messages ({octets} octets)", lines), self._answer_sent)

    def _cmd_uidl(self, argument: bytes) -> None:
        if not self._require_transaction():
            return
        if argument.strip():
            index = self._message_index(argument)
            if index is not None:
                self._ok(f"{index + 1} {self.mailbox.uidl(index)}")
            return
        mailbox = self.mailbox
        lines = (f"{i + 1} {mailbox.uidl(i)}" for i in range(mailbox.count()) if not mailbox.is_deleted(i))
        self.stream(listing("Unique-id listing follows", lines), self._answer_sent)

    def _cmd_retr(self, argument: bytes) -> None:
        if not self._require_transaction():
            return
        index = self._message_index(argument)
        if index is None:
            return
        mailbox = self.mailbox
        size = mailbox.size(index)
        try:
            fd = mailbox.open_fd(index)
        except OSError as e:
            self._unavailable(index, e)
            return
        self.stream(retr_answer(f"+OK {size} octets\r\n".encode(), fd, size), self._answer_sent)

    def _cmd_top(self, argument: bytes) -> None:
        if not self._require_transaction():
            return
        parts = argument.split()
        if len(parts) != 2 or not parts[1].isdigit() or not parts[1].isascii():
            self._err("Syntax: TOP message-number lines")
            return
        index = self._message_index(parts[0])
        if index is not None:
            lines = int(parts[1])
            self._send_message(index, "+OK Top of message follows\r\n", lambda f: read_top(f, lines))

    def _send_message(self, index: int, status: str, reader: Callable[[BinaryIO], Iterator[bytes]]) -> None:
        try:
            file = self.mailbox.open_message(index)
        except OSError as e:
            self._unavailable(index, e)
            return
        self.stream(message_answer(status.encode(), file, reader), self._answer_sent)

    def _unavailable(self, index: int, error: OSError) -> None:
        self.log_event(log.error, "cannot open message {n}: {error}", n=index + 1, error=error)
        self._err("[SYS/TEMP] Message is not available, try again later")

    def _answer_sent(self, complete: bool) -> None:
        """A streamed answer ended (False: the connection went first)."""

    def _cmd_dele(self, argument: bytes) -> None:
        if not self._require_transaction():
            return
        index = self._message_index(argument)
        if index is not None:
            self.mailbox.mark_deleted(index)
            self._ok(f"Message {index + 1} deleted")

    def _cmd_rset(self, argument: bytes) -> None:
        if self._require_transaction() and self._require_no_argument("RSET", argument):
            self.mailbox.undelete_all()
            count, octets = self.mailbox.stat()
            self._ok(f"Maildrop has {count} messages ({octets} octets)")

    def _cmd_noop(self, argument: bytes) -> None:
        if self._require_transaction() and self._require_no_argument("NOOP", argument):
            self._ok()

    def _cmd_quit(self, argument: bytes) -> None:
        if self.state is State.AUTHORIZATION:
            self._ok(f"{self.factory.hostname} closing connection")
            self.close()
            return
        if not self._require_transaction():
            return
        self.state = State.UPDATE
        d = confirm_lock(self._mailbox)  # fencing: another appliance may have taken the mailbox over
        committed = d.addCallback(self._commit_if_locked)
        self.run(committed.addCallbacks(self._committed, self._commit_failed))

    def _commit_if_locked(self, ours: bool) -> Deferred[CommitResult]:
        if not ours or self._mailbox is None:
            raise MailboxLockLost(self._login_name)
        self._settle_deadline = self.clock.seconds() + settle_wait_limit()
        return self._commit_when_settled()

    def _commit_when_settled(self) -> Deferred[CommitResult]:
        """The commit; while another worker's journal still covers a just-delivered message
        (journal.peers_to_wait_for), asked again a moment later, holding no thread meanwhile."""
        if self._mailbox is None:
            return succeed(CommitResult(0, waiting=True))
        return self._run_blocking(self._mailbox.commit).addCallback(self._settled_or_again)

    def _settled_or_again(self, result: CommitResult) -> CommitResult | Deferred[CommitResult]:
        if not result.waiting or self.closed or self.clock.seconds() >= self._settle_deadline:
            return result
        later: Deferred[None] = deferLater(self.clock, SETTLE_POLL_SECONDS, lambda: None)
        return later.addCallback(lambda _: self._commit_when_settled())

    def _committed(self, result: CommitResult) -> None:
        if result.waiting:  # gave up waiting (or the client left): every message stays, none is lost
            self.log_event(log.warn, "quit: another worker's journal did not cover the deleted messages in time, "
                           "nothing deleted: login={login}", login=self._login_name)
            self._release_mailbox()
            self._err("[SYS/TEMP] Deleted messages not removed, try again later")
            self.close()
            return
        if result.deleted and self.factory.quotas is not None and self._mailbox is not None:
            self.factory.quotas.forget(self._mailbox.subscriber.uid)
        self.log_event(
            log.info, "quit: login={login} deleted={deleted} failed={failed}",
            login=self._login_name, deleted=result.deleted, failed=len(result.failed),
        )
        self._release_mailbox()
        if result.failed:
            self._err(f"[SYS/TEMP] Some deleted messages not removed ({result.deleted} removed)")
        else:
            self._ok(f"{self.factory.hostname} closing connection, {result.deleted} messages deleted")
        self.close()

    def _commit_failed(self, failure: Failure) -> None:
        if failure.check(MailboxLockLost):
            self.log_event(log.warn, "quit: the mailbox lock passed to another session, nothing deleted: "
                           "login={login}", login=self._login_name)
            self._release_mailbox()
            self._err("[IN-USE] Mailbox taken over by another session, nothing deleted")
            self.close()
            return
        self.log_event(log.failure, "commit failed for login={login}", failure=failure, login=self._login_name)
        self._release_mailbox()
        self._err("[SYS/TEMP] Deleted messages not removed, try again later")
        self.close()

    _HANDLERS: dict[str, Callable[[POP3Session, bytes], None]] = {
        "CAPA": _cmd_capa,
        "USER": _cmd_user,
        "PASS": _cmd_pass,
        "AUTH": _cmd_auth,
        "STLS": _cmd_stls,
        "STAT": _cmd_stat,
        "LIST": _cmd_list,
        "UIDL": _cmd_uidl,
        "RETR": _cmd_retr,
        "TOP": _cmd_top,
        "DELE": _cmd_dele,
        "RSET": _cmd_rset,
        "NOOP": _cmd_noop,
        "QUIT": _cmd_quit,
    }


class POP3Factory(Factory[POP3Session]):
    """Builds POP3 sessions for one listener.

    ``tls_context_factory`` enables STLS; ``implicit_tls`` says the listener
    already wraps connections in TLS (port 995).  ``run_blocking(f, *args)``
    runs mailbox disk work and returns a Deferred (default: the reactor's
    thread pool; tests pass a synchronous one).
    """

    protocol = POP3Session

    def __init__(
        self,
        portal: Portal,
        hostname: str,
        allow_plaintext_auth: bool,
        tls_context_factory: IOpenSSLContextFactory | None = None,
        implicit_tls: bool = False,
        idle_timeout: float = 600,
        reactor: IReactorTime | None = None,
        run_blocking: RunBlocking | None = None,
        limits: RateLimits | None = None,
        session_settings: SessionSettings | None = None,
    ) -> None:
        self.limits = limits  # the shared RateLimits: connection caps
        self.quotas: MailboxQuotas | None = None  # told when QUIT deleted messages
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.portal = portal
        self.authenticator = Authenticator(portal, "pop3")
        self.hostname = hostname
        self.allow_plaintext_auth = allow_plaintext_auth
        self.tls_context_factory = tls_context_factory
        self.implicit_tls = implicit_tls
        self.idle_timeout = idle_timeout
        self.reactor = reactor
        self.run_blocking: RunBlocking = run_blocking or self._in_reactor_pool
        self.session_settings = session_settings or SessionSettings(
            listener="pop3s" if implicit_tls else "pop3", idle_timeout=idle_timeout, command_time_limit=120)

    def _in_reactor_pool(self, function: Callable[..., _R], *args: object) -> Deferred[_R]:
        reactor = IReactorThreads(self.reactor)  # the running reactor has thread pools (I(x) is x)
        return deferToThreadPool(reactor, reactor.getThreadPool(), function, *args)
