"""The outbound ESMTP client: one transaction to one host for several recipients.

Not ``twisted.mail.smtp.ESMTPSender``: its ``transformChunk`` turns every LF
into CRLF (so stored CRLF becomes CR CR LF) and misses dot-stuffing across
chunk boundaries.  This client sends canonical CRLF with correct
dot-stuffing (:func:`to_wire`), uses STARTTLS whenever offered, and reports
a reply for every recipient: the remote answer, or a synthetic 4xx when the
session broke (connection refused, timeout, TLS failure).

ESMTP it carries on: DSN (RET, ENVID on MAIL; NOTIFY, ORCPT on RCPT) when
the next hop offers DSN (else the runner sends "relayed" notices itself);
SMTPUTF8 when the message needs it (:func:`smtputf8_need`), and if the next
hop does not offer it, a permanent refusal in our own words: 553 5.6.7 for
UTF-8 addresses, 550 5.6.9 for a UTF-8 header (RFC 6531 3.2, no downgrade).
A TLS failure is named the way TLS-RPT (RFC 8460) names it.
"""

from __future__ import annotations

import base64
import re
import time

import attrs
from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IAddress,
    IConnector,
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IOpenSSLContextFactory,
    ITLSTransport,
)
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from mailappliance.dsn_params import Orcpt, xtext_encode

_LINE_ENDINGS = re.compile(rb"\r\n|\r|\n")
MAX_REPLY_LINES = 100
MAX_REPLY_BUFFER = 64 * 1024

# What the client may start TLS with: a connection creator (optionsForClientTLS, verifying)
# or a context factory (CertificateOptions, opportunistic), which startTLS wraps.
TLSContext = IOpenSSLClientConnectionCreator | IOpenSSLContextFactory


def smtputf8_need(flag: bool, sender: str, recipients: tuple[str, ...] | list[str], data: bytes) -> str:
    """Why a transaction needs SMTPUTF8: "address" (a UTF-8 sender or recipient),
    "header" (the client asked for SMTPUTF8 and the header is not ASCII), or ""."""
    if not sender.isascii() or not all(r.isascii() for r in recipients):
        return "address"
    if flag:
        end = data.find(b"\r\n\r\n")
        if not (data if end < 0 else data[:end]).isascii():
            return "header"
    return ""


def tls_failure_type(reason: str) -> str:
    """The TLS-RPT (RFC 8460 4.3) result type of a failed handshake, from its error text."""
    text = reason.lower()
    if "mismatch" in text or "verificationerror" in text or "hostname" in text:
        return "certificate-host-mismatch"
    if "expired" in text:
        return "certificate-expired"
    if "certificate verify failed" in text or "unknown ca" in text or "self-signed" in text \
            or "self signed" in text:
        return "certificate-not-trusted"
    return "validation-failure"


def to_wire(message: bytes) -> bytes:
    """The DATA payload: canonical CRLF, dot-stuffed, with the terminating ``.``."""
    data = _LINE_ENDINGS.sub(b"\r\n", message)
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    if data.startswith(b"."):
        data = b"." + data
    return data.replace(b"\r\n.", b"\r\n..") + b".\r\n"


@attrs.frozen
class Reply:
    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(self.lines)


@attrs.frozen
class TransactionResult:
    """Per-recipient (code, text) and whether the session used TLS."""

    replies: dict[str, tuple[int, str]]
    tls: bool
    dsn: bool = False  # the next hop offered DSN (it reports from here on)
    tls_failure: str = ""  # TLS-RPT result type when TLS was wanted and failed


class SessionBroken(Exception):
    """The connection ended or timed out before the transaction finished."""


@implementer(IHandshakeListener)
class OutboundSession(protocol.Protocol, TimeoutMixin):
    """Drives one SMTP transaction; ``finished`` fires with a TransactionResult."""

    transport: ITLSTransport  # set by makeConnection: a TCP connection (tcp.Client), which can start TLS

    def __init__(self, job: OutboundJob) -> None:
        self.job = job
        self.finished: Deferred[TransactionResult] = Deferred()
        self._buffer = b""
        self._lines: list[str] = []
        self._waiting: Deferred[Reply] | None = None
        self._handshake: Deferred[None] | None = None
        self._tls = False
        self._dsn = False
        self._tls_failure = ""
        self._lost: Failure | None = None

    # -- transport events ----------------------------------------------------

    def connectionMade(self) -> None:
        self.setTimeout(self.job.timeout)  # type: ignore[no-untyped-call]  # TimeoutMixin is unannotated
        Deferred.fromCoroutine(self._converse()).addBoth(self._done)

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()  # type: ignore[no-untyped-call]  # TimeoutMixin is unannotated
        self._buffer += data
        while b"\n" in self._buffer:
            raw, self._buffer = self._buffer.split(b"\n", 1)
            self._line(raw.rstrip(b"\r").decode("utf-8", "replace"))
        if len(self._buffer) > MAX_REPLY_BUFFER:
            self.transport.loseConnection()

    def _line(self, line: str) -> None:
        self._lines.append(line[4:])
        if len(self._lines) > MAX_REPLY_LINES:
            self.transport.loseConnection()
            return
        if line[3:4] == "-":
            return
        code = int(line[:3]) if line[:3].isdigit() else 0
        reply, self._lines = Reply(code, tuple(self._lines)), []
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.callback(reply)

    def handshakeCompleted(self) -> None:
        self._tls = True
        if self._handshake is not None:
            handshake, self._handshake = self._handshake, None
            handshake.callback(None)

    def timeoutConnection(self) -> None:
        self._lost = Failure(SessionBroken(f"timeout after {self.job.timeout:g} s"))
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.setTimeout(None)  # type: ignore[no-untyped-call]  # TimeoutMixin is unannotated
        failure = self._lost or Failure(SessionBroken(f"connection lost: {reason.getErrorMessage()}"))
        for pending in (self._waiting, self._handshake):
            if pending is not None:
                pending.errback(failure)
        self._waiting = self._handshake = None

    # -- conversation --------------------------------------------------------

    def _reply(self) -> Deferred[Reply]:
        self._waiting = Deferred()
        return self._waiting

    def _command(self, line: str) -> Deferred[Reply]:
        waiting = self._reply()
        self.transport.write(line.encode("utf-8") + b"\r\n")
        return waiting

    async def _converse(self) -> TransactionResult:
        job = self.job
        replies: dict[str, tuple[int, str]] = {}

        def everyone(reply: Reply) -> TransactionResult:
            return TransactionResult({r: (reply.code, reply.text) for r in job.recipients}, self._tls,
                                     self._dsn, self._tls_failure)

        greeting = await self._reply()
        if greeting.code != 220:
            return everyone(greeting)
        ehlo = await self._command(f"EHLO {job.helo}")
        if ehlo.code != 250:
            helo = await self._command(f"HELO {job.helo}")
            if helo.code != 250:
                return everyone(helo)
        extensions = {line.split(" ", 1)[0].upper() for line in ehlo.lines[1:]} if ehlo.code == 250 else set()

        if "STARTTLS" in extensions and job.tls_context is not None:
            started = await self._command("STARTTLS")
            if started.code == 220:
                self._handshake = Deferred()
                # startTLS takes context factories too (wrapped), though typed for connection creators only.
                self.transport.startTLS(job.tls_context)  # type: ignore[arg-type]
                try:
                    await self._handshake
                except SessionBroken as e:
                    self._tls_failure = tls_failure_type(str(e))
                    raise
                ehlo = await self._command(f"EHLO {job.helo}")
                if ehlo.code != 250:
                    return everyone(ehlo)
                extensions = {line.split(" ", 1)[0].upper() for line in ehlo.lines[1:]}
            elif job.require_tls:
                self._tls_failure = "starttls-not-supported"
                return everyone(Reply(451, (f"4.7.5 STARTTLS refused by server: {started.text}",)))
        if job.require_tls and not self._tls:
            self._tls_failure = "starttls-not-supported"
            why = f" ({job.tls_policy})" if job.tls_policy else ""
            return everyone(Reply(451, (f"4.7.5 TLS is required for this destination{why} but was not offered",)))

        if job.auth is not None:
            if "AUTH" not in extensions and not any(e.startswith("AUTH=") for e in extensions):
                return everyone(Reply(451, ("4.7.0 the relay offers no AUTH; not sending the password",)))
            login, password = job.auth
            token = base64.b64encode(f"\0{login}\0{password}".encode()).decode()
            authenticated = await self._command(f"AUTH PLAIN {token}")
            if authenticated.code != 235:  # our configuration problem: never bounce mail for it
                return everyone(Reply(451, (f"4.7.0 relay refused our login: {authenticated.code} "
                                            f"{authenticated.text}",)))

        self._dsn = "DSN" in extensions
        utf8 = smtputf8_need(job.smtputf8, job.sender, job.recipients, job.data)
        if utf8 and "SMTPUTF8" not in extensions:
            if utf8 == "address":
                return everyone(Reply(553, ("5.6.7 the next hop does not offer SMTPUTF8, needed for a "
                                            "non-ASCII address (RFC 6531)",)))
            return everyone(Reply(550, ("5.6.9 the next hop does not offer SMTPUTF8, needed for a "
                                        "non-ASCII header (RFC 6531)",)))
        mail_parameters = f" SIZE={len(job.data)}" if "SIZE" in extensions else ""
        if (utf8 or job.smtputf8) and "SMTPUTF8" in extensions:
            mail_parameters += " SMTPUTF8"
        if self._dsn:
            mail_parameters += f" RET={job.ret}" if job.ret else ""
            mail_parameters += f" ENVID={xtext_encode(job.envid)}" if job.envid else ""
        mail = await self._command(f"MAIL FROM:<{job.sender}>{mail_parameters}")
        if mail.code != 250:
            return everyone(mail)
        accepted = []
        for recipient in job.recipients:
            rcpt = await self._command(f"RCPT TO:<{recipient}>{self._rcpt_parameters(recipient)}")
            replies[recipient] = (rcpt.code, rcpt.text)
            if 200 <= rcpt.code < 300:
                accepted.append(recipient)
        if accepted:
            data = await self._command("DATA")
            if data.code == 354:
                self.transport.write(to_wire(job.data))
                final = await self._reply()
            else:
                final = data
            for recipient in accepted:
                replies[recipient] = (final.code, final.text)
        self.transport.write(b"QUIT\r\n")
        return TransactionResult(replies, self._tls, self._dsn, self._tls_failure)

    def _rcpt_parameters(self, recipient: str) -> str:
        """NOTIFY and ORCPT as the client gave them, if the next hop takes DSN."""
        if not self._dsn:
            return ""
        notify, orcpt = self.job.dsn.get(recipient, ("", ""))
        text = f" NOTIFY={notify}" if notify else ""
        original = Orcpt.from_stored(orcpt) if orcpt else None
        return text + (f" ORCPT={original.parameter()}" if original else "")

    def _done(self, result: TransactionResult | Failure) -> None:
        self.setTimeout(None)  # type: ignore[no-untyped-call]  # TimeoutMixin is unannotated
        if self.transport is not None and not isinstance(result, Failure):
            self.transport.loseConnection()
        if isinstance(result, Failure):
            reason = result.getErrorMessage()
            result = TransactionResult(
                {r: (451, f"4.4.2 {reason}") for r in self.job.recipients}, self._tls, self._dsn,
                self._tls_failure)
            self.transport.loseConnection()
        if not self.finished.called:
            self.finished.callback(result)


@attrs.frozen
class OutboundJob:
    """Everything one delivery attempt to one host needs."""

    helo: str
    sender: str
    recipients: tuple[str, ...]
    data: bytes = attrs.field(repr=False)
    tls_context: TLSContext | None = None  # None: never STARTTLS
    require_tls: bool = False
    timeout: float = 300
    auth: tuple[str, str] | None = attrs.field(default=None, repr=False)  # smarthost login, inside TLS only
    ret: str = ""  # DSN RET and ENVID of the message, NOTIFY and ORCPT ("rfc822;addr") per recipient
    envid: str = ""
    dsn: dict[str, tuple[str, str]] = attrs.field(factory=dict, hash=False)
    smtputf8: bool = False  # the client sent SMTPUTF8
    tls_policy: str = ""  # why TLS is required ("MTA-STS enforce"), for the deferral text


class OutboundFactory(protocol.ClientFactory[OutboundSession]):
    """Connects once; ``finished`` fires with the TransactionResult (never errbacks)."""

    noisy = False  # no "Starting factory" line per delivery attempt

    def __init__(self, job: OutboundJob) -> None:
        self.job = job
        self.finished: Deferred[TransactionResult] = Deferred()
        self.connected_at: float | None = None  # time.monotonic() when the TCP connection was made

    def buildProtocol(self, addr: IAddress | None) -> OutboundSession:
        self.connected_at = time.monotonic()
        session = OutboundSession(self.job)
        session.finished.chainDeferred(self.finished)
        return session

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        if not self.finished.called:
            message = f"4.4.1 connection failed: {reason.getErrorMessage()}"
            self.finished.callback(TransactionResult({r: (451, message) for r in self.job.recipients}, False))
