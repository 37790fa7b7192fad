"""The POP3 server protocol (RFC 1939, CAPA RFC 2449, STLS RFC 2595, SASL PLAIN RFC 5034).

Our own thin protocol instead of ``twisted.mail.pop3.POP3``, which has no STLS,
deletes at DELE instead of QUIT and gives vague errors.  Rules kept here:

* Secrets only inside TLS: USER, PASS and AUTH PLAIN are refused (and not
  advertised by CAPA) outside TLS unless the listener allows plaintext login.
  The refusal carries ``[AUTH]`` (RFC 2449 has no TLS-specific code; Dovecot
  answers the same way), so clients show it as a login problem.
* Bytes pipelined after STLS are discarded before the TLS handshake.
* Commands are answered strictly in order: while an asynchronous command
  (login, mailbox scan, message transfer, commit) runs, later lines wait in
  the input buffer; beyond ``MAX_PENDING_INPUT`` the transport stops reading.
* Deletions happen at QUIT only; a dropped or timed-out connection keeps all mail.
* Message files are read on the reactor thread in ``CHUNK_SIZE`` blocks paced
  by the transport (push producer); directory scans and unlinks, which grow
  with the mailbox, go through ``run_blocking`` (a thread pool).
"""

from __future__ import annotations

import base64
import binascii
import enum
from typing import Any, BinaryIO, Callable, Iterator

from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from mailappliance.credentials import ClientPassword, LoginThrottled
from mailappliance.directory import DirectoryUnavailable
from mailappliance.metrics import METRICS
from mailappliance.pop3.mailbox import (
    CommitResult,
    IMaildirAccess,
    MailboxInUse,
    MessageDeleted,
    NoSuchMessage,
)
from mailappliance.sessions import new_session_id, no_delay, write_now

log = Logger(namespace="mailappliance.pop3")

MAX_COMMAND_LINE = 255  # RFC 2449 section 4: including the CRLF
MAX_SASL_LINE = 2048  # RFC 5034 section 4: SASL responses may exceed 255 (PLAIN: up to ~1 KiB)
MAX_PENDING_INPUT = 64 * 1024  # pipelined input held while a command runs; more -> stop reading
HARD_INPUT_LIMIT = 1024 * 1024  # a peer that ignores back-pressure is disconnected
CHUNK_SIZE = 64 * 1024

RunBlocking = Callable[..., Deferred]


class State(enum.Enum):
    """RFC 1939 session states."""

    AUTHORIZATION = "AUTHORIZATION"
    TRANSACTION = "TRANSACTION"
    UPDATE = "UPDATE"


class _LineTooLong:
    """Marker handed to the dispatcher in place of an overlong line."""


LINE_TOO_LONG = _LineTooLong()


def read_blocks(file: BinaryIO) -> Iterator[bytes]:
    """The whole message, in ``CHUNK_SIZE`` blocks (RETR)."""
    while block := file.read(CHUNK_SIZE):
        yield block


def read_top(file: BinaryIO, body_lines: int) -> Iterator[bytes]:
    """The header, the blank line and the first ``body_lines`` body lines (TOP)."""
    in_header, at_line_start, remaining = True, True, body_lines
    pending: list[bytes] = []
    size = 0
    while True:
        if not in_header and remaining <= 0:
            break
        line = file.readline(CHUNK_SIZE)
        if not line:
            break
        complete = line.endswith(b"\n")
        if in_header:
            if at_line_start and line in (b"\r\n", b"\n"):
                in_header = False
        elif complete:
            remaining -= 1
        at_line_start = complete
        pending.append(line)
        size += len(line)
        if size >= CHUNK_SIZE:
            yield b"".join(pending)
            pending, size = [], 0
    if pending:
        yield b"".join(pending)


@implementer(IPushProducer)
class MessageSender:
    """Streams one message: status line, dot-stuffed blocks, ``.`` terminator.

    The status line goes out in the same write as the first block, so a
    small RETR costs one segment (no delayed-ACK stall).  The transport
    pauses and resumes us; ``on_done`` runs after the terminator (True) or
    after a read error that dropped the connection (False).
    """

    def __init__(
        self,
        session: "POP3Session",
        status: bytes,
        blocks: Iterator[bytes],
        file: BinaryIO,
        on_done: Callable[[bool], None],
    ) -> None:
        self.session = session
        self.transport = session.transport
        self._prefix = status
        self._blocks = blocks
        self._file = file
        self._on_done = on_done
        self._paused = False
        self._pumping = False
        self._finished = False
        self._sent_any = False
        self._at_line_start = True
        self._last_two = b""

    def start(self) -> None:
        self.transport.registerProducer(self, True)
        self._pump()

    def _pump(self) -> None:
        if self._pumping:
            return
        self._pumping = True
        try:
            while not self._paused and not self._finished:
                try:
                    block = next(self._blocks, None)
                except OSError as e:
                    self._fail(e)
                    return
                if block is None:
                    self._finish()
                    return
                out = self._prefix + self._stuff(block)
                self._prefix = b""
                self.session.resetTimeout()
                write_now(self.transport, out)
        finally:
            self._pumping = False

    def _stuff(self, block: bytes) -> bytes:
        """Dot-stuffing (RFC 1939 section 3) that works across block boundaries."""
        if self._at_line_start and block.startswith(b"."):
            block = b"." + block
        block = block.replace(b"\n.", b"\n..")
        self._at_line_start = block.endswith(b"\n")
        self._last_two = (self._last_two + block)[-2:]
        self._sent_any = True
        return block

    def _finish(self) -> None:
        ending = b"\r\n.\r\n" if self._sent_any and self._last_two != b"\r\n" else b".\r\n"
        self._finished = True
        write_now(self.transport, self._prefix + ending)
        self._prefix = b""
        self._close()
        self._on_done(True)

    def _fail(self, error: OSError) -> None:
        self._finished = True
        self._close()
        self.session.log_event(log.error, "read error while sending a message: {error}", error=error)
        self.transport.abortConnection()
        self._on_done(False)

    def _close(self) -> None:
        self.transport.unregisterProducer()
        self._file.close()

    def abort(self) -> None:
        """Stop without writing more (connection lost or timed out)."""
        if not self._finished:
            self._finished = True
            self._file.close()

    # IPushProducer
    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._pump()

    def stopProducing(self) -> None:
        self.abort()


class POP3Session(Protocol, TimeoutMixin):
    """One POP3 connection."""

    factory: "POP3Factory"

    def __init__(self) -> None:
        self.session_id = new_session_id()
        self.client = "unknown"
        self.state = State.AUTHORIZATION
        self.in_tls = False
        self._buffer = bytearray()
        self._discarding_long_line = False
        self._processing = False
        self._busy = False
        self._reading_paused = False
        self._closing = False
        self._closed = False
        self._pending_user: bytes | None = None
        self._sasl_pending = False
        self._mailbox: Any = None  # IMaildirAccess once logged in
        self._logout: Callable[[], None] | None = None
        self._blocking_in_flight = False
        self._sender: MessageSender | None = None
        self._login_name = ""

    # -- connection -------------------------------------------------------------

    def callLater(self, period: float, func: Callable[[], None]) -> Any:
        return self.factory.reactor.callLater(period, func)

    def connectionMade(self) -> None:
        no_delay(self.transport)
        peer = self.transport.getPeer()
        host, port = getattr(peer, "host", None), getattr(peer, "port", None)
        self.client = f"[{host}]:{port}" if host is not None else str(peer)
        self.in_tls = self.factory.implicit_tls
        self.log_event(log.info, "connect (tls={tls})", tls=self.in_tls)
        METRICS.count("mailappliance_sessions_total", role="pop3s" if self.factory.implicit_tls else "pop3")
        self._counted_address = None
        if self.factory.limits is not None:
            hit = self.factory.limits.connection_opened(host or "")
            if hit is not None:
                self.log_event(log.info, "refused: limit {limit} reached for {key}", limit=hit.limit, key=hit.key)
                self._err(f"[SYS/TEMP] {hit.text}")
                self._close_connection()
                return
            self._counted_address = host or ""
        self.setTimeout(self.factory.idle_timeout)
        self._ok(f"{self.factory.hostname} POP3 server ready")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closed = True
        self.setTimeout(None)
        if getattr(self, "_counted_address", None) is not None and self.factory.limits is not None:
            self.factory.limits.connection_closed(self._counted_address)
            self._counted_address = None
        if self._sender is not None:
            self._sender.abort()
            self._sender = None
        if not self._blocking_in_flight:
            self._release_mailbox()
        self.log_event(log.info, "disconnect")

    def timeoutConnection(self) -> None:
        self.log_event(log.info, "idle timeout in state {state}, nothing deleted", state=self.state.value)
        self._closing = True
        if self._sender is not None:
            self.transport.abortConnection()  # the client stopped reading
            return
        self._err("Idle timeout, closing connection")
        self.transport.loseConnection()

    def log_event(self, emit: Callable[..., None], fmt: str, **kwargs: Any) -> None:
        """Log with the session id and client address in every event."""
        emit("session={session} client={client} " + fmt, session=self.session_id, client=self.client, **kwargs)

    # -- input ------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing or self._closed:
            return
        self.resetTimeout()
        self._buffer += data
        if self._busy and len(self._buffer) > HARD_INPUT_LIMIT:
            self.log_event(log.warn, "too much pipelined input ({n} octets), disconnecting", n=len(self._buffer))
            self._buffer.clear()
            self._err("Too much pipelined input")
            self._close_connection()
            return
        self._process_input()

    def _process_input(self) -> None:
        """Run complete lines one at a time, never past a command still in progress."""
        if self._processing:
            return  # an outer call up the stack continues the loop
        self._processing = True
        try:
            while not self._busy and not self._closing and not self._closed:
                line = self._next_line()
                if line is None:
                    break
                self._handle_line(line)
        finally:
            self._processing = False
        self._apply_back_pressure()

    def _apply_back_pressure(self) -> None:
        if self._closed:
            return
        if not self._reading_paused and self._busy and len(self._buffer) > MAX_PENDING_INPUT:
            self._reading_paused = True
            self.transport.pauseProducing()
        elif self._reading_paused and not self._busy:
            self._reading_paused = False
            self.transport.resumeProducing()

    def _next_line(self) -> bytes | _LineTooLong | None:
        """The next command line without its CRLF (bare LF accepted), or LINE_TOO_LONG."""
        buffer = self._buffer
        if self._discarding_long_line:
            end = buffer.find(b"\n")
            if end < 0:
                buffer.clear()
                return None
            del buffer[: end + 1]
            self._discarding_long_line = False
            return LINE_TOO_LONG
        limit = MAX_SASL_LINE if self._sasl_pending else MAX_COMMAND_LINE
        end = buffer.find(b"\n", 0, limit)
        if end < 0:
            if len(buffer) < limit:
                return None
            end = buffer.find(b"\n", limit)
            if end < 0:
                buffer.clear()
                self._discarding_long_line = True
                return None
            del buffer[: end + 1]
            return LINE_TOO_LONG
        line = bytes(buffer[:end])
        del buffer[: end + 1]
        return line[:-1] if line.endswith(b"\r") else line

    def _handle_line(self, line: bytes | _LineTooLong) -> None:
        if isinstance(line, _LineTooLong):
            self._sasl_pending = False
            self._err("Line too long")
            return
        if self._sasl_pending:
            self._sasl_pending = False
            self._auth_plain_response(line)
            return
        name, _, argument = line.partition(b" ")
        handler = self._HANDLERS.get(name.upper().decode("ascii", "replace"))
        if handler is None:
            self._err("Unknown command")
            return
        handler(self, argument)

    # -- output -----------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if not self._closed:
            write_now(self.transport, data)

    def _ok(self, text: str = "") -> None:
        self._write(f"+OK {text}\r\n".encode() if text else b"+OK\r\n")

    def _err(self, text: str) -> None:
        self._write(f"-ERR {text}\r\n".encode())

    def _multiline(self, status: str, lines: list[str]) -> None:
        """A short multi-line answer (lines never start with '.'), in one write."""
        head = f"+OK {status}\r\n" if status else "+OK\r\n"
        self._write((head + "".join(f"{x}\r\n" for x in lines) + ".\r\n").encode())

    def _close_connection(self) -> None:
        self._closing = True
        if not self._closed:
            self.transport.loseConnection()

    # -- asynchronous steps -------------------------------------------------------

    def _start_async(self) -> None:
        self._busy = True

    def _async_done(self) -> None:
        self._busy = False
        if not self._closed:
            self._process_input()

    def _run_blocking(self, function: Callable[..., Any], *args: Any) -> Deferred:
        """Run mailbox disk work off the reactor; the mailbox stays locked meanwhile."""
        self._blocking_in_flight = True
        d = self.factory.run_blocking(function, *args)

        def settle(result: Any) -> Any:
            self._blocking_in_flight = False
            return result

        d.addBoth(settle)
        return d

    def _release_mailbox(self) -> None:
        logout, self._logout, self._mailbox = self._logout, None, None
        if logout is not None:
            logout()

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
        self._login(login, argument, "USER")  # the whole rest of the line: spaces allowed

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
            self._write(b"+ \r\n")
            return
        self._auth_plain_response(b"" if parts[1] == b"=" else parts[1])

    def _auth_plain_response(self, response: bytes) -> None:
        """RFC 4616 message: authzid NUL authcid NUL password, base64 encoded."""
        if response.strip() == b"*":
            self._err("Authentication cancelled")
            return
        try:
            message = base64.b64decode(response.strip(), validate=True)
        except (binascii.Error, ValueError):
            self._err("Invalid base64 data")
            return
        fields = message.split(b"\0")
        if len(fields) != 3 or not fields[1] or not fields[2]:
            self.log_event(log.info, "login failed: mechanism=PLAIN reason=malformed PLAIN message")
            self._err("[AUTH] Authentication failed")
            return
        authzid, authcid, password = fields
        if authzid and authzid != authcid:
            self.log_event(
                log.info,
                "login failed: login={login} mechanism=PLAIN reason=authorization identity {authzid} not supported",
                login=authcid.decode("utf-8", "replace"), authzid=authzid.decode("utf-8", "replace"),
            )
            self._err("[AUTH] Authentication failed")
            return
        self._login(authcid, password, "PLAIN")

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
        if self._buffer or self._discarding_long_line:
            # CVE-2011-0411 class: nothing sent in clear may act inside TLS.
            self.log_event(log.warn, "discarded {n} octets pipelined after STLS", n=len(self._buffer))
        self._buffer.clear()
        self._discarding_long_line = False
        self.transport.startTLS(self.factory.tls_context_factory)
        self.in_tls = True
        self._pending_user = None
        self._sasl_pending = False
        self.log_event(log.info, "TLS started (STLS)")

    # -- login ------------------------------------------------------------------------

    def _login(self, login: bytes, password: bytes, mechanism: str) -> None:
        self._login_name = login.decode("utf-8", "replace")
        self._start_async()
        credentials = ClientPassword(login, password, self._client_ip())
        d = self.factory.portal.login(credentials, None, IMaildirAccess)
        d.addCallbacks(self._logged_in, self._login_failed, callbackArgs=(mechanism,), errbackArgs=(mechanism,))
        d.addErrback(self._internal_error, "login")

    def _logged_in(self, avatar: tuple[Any, Any, Callable[[], None]], mechanism: str) -> None:
        _, mailbox, logout = avatar
        if self._closed:
            logout()
            return
        self._mailbox, self._logout = mailbox, logout
        d = self._run_blocking(mailbox.load)
        d.addCallbacks(self._mailbox_loaded, self._mailbox_load_failed, callbackArgs=(mechanism,))
        d.addErrback(self._internal_error, "mailbox load")

    def _mailbox_loaded(self, _: None, mechanism: str) -> None:
        if self._closed:
            self._release_mailbox()
            return
        count, octets = self._mailbox.stat()
        METRICS.count("mailappliance_auth_total", protocol="pop3", mechanism=mechanism, result="ok")
        self.state = State.TRANSACTION
        self.log_event(
            log.info if self.in_tls else log.warn,
            "login ok: login={login} uid={uid} mechanism={mechanism} tls={tls} messages={count} octets={octets}",
            login=self._login_name, uid=self._mailbox.subscriber.uid, mechanism=mechanism,
            tls=self.in_tls, count=count, octets=octets,
        )
        self._ok(f"Logged in, {count} messages ({octets} octets)")
        self._async_done()

    def _mailbox_load_failed(self, failure: Failure) -> None:
        self.log_event(
            log.failure, "cannot open mailbox for login={login}", failure=failure, login=self._login_name
        )
        self._release_mailbox()
        self._err("[SYS/TEMP] Unable to open the mailbox, try again later")
        self._async_done()

    def _login_failed(self, failure: Failure, mechanism: str) -> None:
        fields = dict(login=self._login_name, mechanism=mechanism)
        result = "failed" if failure.check(UnauthorizedLogin) else (
            "throttled" if failure.check(LoginThrottled) else "temporary")
        METRICS.count("mailappliance_auth_total", protocol="pop3", mechanism=mechanism, result=result)
        if failure.check(UnauthorizedLogin):
            reason = getattr(failure.value, "reason", None) or "unauthorized"
            self.log_event(
                log.info, "login failed: login={login} mechanism={mechanism} reason={reason}", reason=reason, **fields
            )
            self._err("[AUTH] Authentication failed")
        elif failure.check(LoginThrottled):
            self.log_event(
                log.info, "login failed: login={login} mechanism={mechanism} reason=throttled: {why}",
                why=failure.value.reason, **fields,
            )
            self._err("[LOGIN-DELAY] Too many failed logins, try again later")
        elif failure.check(MailboxInUse):
            self.log_event(log.info, "login refused: login={login} mechanism={mechanism} mailbox in use", **fields)
            self._err("[IN-USE] Mailbox is locked by another session")
        elif failure.check(DirectoryUnavailable):
            self.log_event(
                log.warn, "login deferred: login={login} mechanism={mechanism} directory unavailable: {why}",
                why=failure.getErrorMessage(), **fields,
            )
            self._err("[SYS/TEMP] Directory unavailable, try again later")
        else:
            self.log_event(
                log.failure, "login error: login={login} mechanism={mechanism}", failure=failure, **fields
            )
            self._err("[SYS/TEMP] Directory unavailable, try again later")
        self._async_done()

    def _client_ip(self) -> str:
        return getattr(self.transport.getPeer(), "host", "")

    def _internal_error(self, failure: Failure, step: str) -> None:
        """Last resort: a bug in our own callbacks must not leave the session hanging."""
        self.log_event(log.failure, "internal error during {step}", failure=failure, step=step)
        self._err("[SYS/TEMP] Internal error, try again later")
        self._release_mailbox()
        self._close_connection()

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
            self._mailbox.message(index)
        except NoSuchMessage:
            self._err("No such message")
            return None
        except MessageDeleted:
            self._err("Message already deleted")
            return None
        return index

    def _cmd_stat(self, argument: bytes) -> None:
        if self._require_transaction() and self._require_no_argument("STAT", argument):
            count, octets = self._mailbox.stat()
            self._ok(f"{count} {octets}")

    def _cmd_list(self, argument: bytes) -> None:
        if not self._require_transaction():
            return
        if argument.strip():
            index = self._message_index(argument)
            if index is not None:
                self._ok(f"{index + 1} {self._mailbox.message(index).size}")
            return
        count, octets = self._mailbox.stat()
        lines = [
            f"{i + 1} {m.size}" for i, m in enumerate(self._mailbox.messages) if not self._mailbox.is_deleted(i)
        ]
        self._multiline(f"{count} messages ({octets} octets)", lines)

    def _cmd_uidl(self, argument: bytes) -> None:
        if not self._require_transaction():
            return
        if argument.strip():
            index = self._message_index(argument)
            if index is not None:
                self._ok(f"{index + 1} {self._mailbox.message(index).uidl}")
            return
        lines = [
            f"{i + 1} {m.uidl}" for i, m in enumerate(self._mailbox.messages) if not self._mailbox.is_deleted(i)
        ]
        self._multiline("Unique-id listing follows", lines)

    def _cmd_retr(self, argument: bytes) -> None:
        if not self._require_transaction():
            return
        index = self._message_index(argument)
        if index is not None:
            size = self._mailbox.message(index).size
            self._send_message(index, f"+OK {size} octets\r\n", read_blocks)

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
            file = self._mailbox.open_message(index)
        except OSError as e:
            self.log_event(log.error, "cannot open message {n}: {error}", n=index + 1, error=e)
            self._err("[SYS/TEMP] Message is not available, try again later")
            return
        self._start_async()
        self._sender = MessageSender(self, status.encode(), reader(file), file, self._message_sent)
        self._sender.start()

    def _message_sent(self, complete: bool) -> None:
        self._sender = None
        if complete:
            self._async_done()

    def _cmd_dele(self, argument: bytes) -> None:
        if not self._require_transaction():
            return
        index = self._message_index(argument)
        if index is not None:
            self._mailbox.mark_deleted(index)
            self._ok(f"Message {index + 1} deleted")

    def _cmd_rset(self, argument: bytes) -> None:
        if self._require_transaction() and self._require_no_argument("RSET", argument):
            self._mailbox.undelete_all()
            count, octets = self._mailbox.stat()
            self._ok(f"Maildrop has {count} messages ({octets} octets)")

    def _cmd_noop(self, argument: bytes) -> None:
        if self._require_transaction() and self._require_no_argument("NOOP", argument):
            self._ok()

    def _cmd_quit(self, argument: bytes) -> None:
        if self.state is State.AUTHORIZATION:
            self._ok(f"{self.factory.hostname} closing connection")
            self._close_connection()
            return
        if not self._require_transaction():
            return
        self.state = State.UPDATE
        self._start_async()
        d = self._run_blocking(self._mailbox.commit)
        d.addCallbacks(self._committed, self._commit_failed)
        d.addErrback(self._internal_error, "commit")

    def _committed(self, result: CommitResult) -> None:
        self.log_event(
            log.info, "quit: login={login} deleted={deleted} failed={failed}",
            login=self._login_name, deleted=result.deleted, failed=len(result.failed),
        )
        self._release_mailbox()
        if result.failed:
            self._err(f"[SYS/TEMP] Some deleted messages not removed ({result.deleted} removed)")
        else:
            self._ok(f"{self.factory.hostname} closing connection, {result.deleted} messages deleted")
        self._close_connection()

    def _commit_failed(self, failure: Failure) -> None:
        self.log_event(log.failure, "commit failed for login={login}", failure=failure, login=self._login_name)
        self._release_mailbox()
        self._err("[SYS/TEMP] Deleted messages not removed, try again later")
        self._close_connection()

    _HANDLERS: dict[str, Callable[["POP3Session", bytes], None]] = {
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


class POP3Factory(Factory):
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
        tls_context_factory: Any = None,
        implicit_tls: bool = False,
        idle_timeout: float = 600,
        reactor: Any = None,
        run_blocking: RunBlocking | None = None,
        limits: Any = None,
    ) -> None:
        self.limits = limits  # the shared RateLimits: connection caps
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.portal = portal
        self.hostname = hostname
        self.allow_plaintext_auth = allow_plaintext_auth
        self.tls_context_factory = tls_context_factory
        self.implicit_tls = implicit_tls
        self.idle_timeout = idle_timeout
        self.reactor = reactor
        self.run_blocking: RunBlocking = run_blocking or self._in_reactor_pool

    def _in_reactor_pool(self, function: Callable[..., Any], *args: Any) -> Deferred:
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), function, *args)
