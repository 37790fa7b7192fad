"""The ESMTP server protocol shared by the MX and submission listeners.

We do not use ``twisted.mail.smtp.ESMTP``: it advertises AUTH before TLS,
keeps executing commands pipelined after STARTTLS, has no SIZE enforcement or
enhanced status codes, and its line handling cannot tell CRLF from bare LF
(SMTP smuggling).  This class is a thin state machine: parsing lives in
``paths``/``data``, decisions in :mod:`mailappliance.policy`, storage in
:mod:`mailappliance.maildir`.  Commands are handled strictly in order; while
one waits for the directory or the disk, later pipelined input stays queued.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import attrs
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet import protocol
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IHandshakeListener
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from mailappliance.credentials import (
    ClientCertificateCredentials,
    ClientPassword,
    ISubscriberIdentity,
    LoginThrottled,
)
from mailappliance.directory import DirectoryUnavailable, Subscriber
from mailappliance.limits import subscriber_limits
from mailappliance.maildir import IncomingMessage, maildir_for
from mailappliance.metrics import METRICS
from mailappliance.policy import Route, decide_recipient, decide_sender
from mailappliance.queue.spool import Envelope, OutboundSpool
from mailappliance.screening import ClientFacts, screen_client, screen_helo, screen_sender
from mailappliance.sessions import new_session_id, no_delay, write_now
from mailappliance.smtp.data import DataReader
from mailappliance.smtp.paths import MailPath, PathSyntaxError, parse_path, split_command_argument
from mailappliance.smtp.received import received_header, return_path_header
from mailappliance.smtp.sasl import Challenge, Collected, SaslExchange, SaslFailure, Step

log = Logger(namespace="mailappliance.smtp")

MAX_COMMAND_LINE = 4096  # RFC 5321 says 512; AUTH (RFC 4954) needs more
MAX_QUEUED_INPUT = 64 * 1024


@attrs.frozen
class SMTPConfig:
    """Everything an SMTP session needs to know about its listener."""

    hostname: str
    role: str
    local_domains: frozenset[str]
    maildir_root: Path
    incoming_dir: Path
    max_message_size: int
    max_line_length: int = 998
    max_recipients: int = 1000
    max_errors: int = 20
    idle_timeout: float = 300
    listener: str = ""
    tls: Any = None  # a ServerTLS context factory: offers STARTTLS when not implicit
    implicit_tls: bool = False
    require_auth: bool = False  # submission: MAIL only after AUTH or a client certificate
    allow_plaintext_auth: bool = False  # AUTH without TLS (never by default)
    screen: bool = False  # apply the screening lists on this listener
    normalize_line_endings: bool = False  # bare CR/LF in DATA: refuse (default) or turn into CRLF
    command_time_limit: float = 120  # seconds for one command line to arrive completely
    data_time_limit: float = 1800  # seconds for a whole DATA phase


@attrs.define
class Transaction:
    """One MAIL ... DATA transaction."""

    sender: MailPath
    local_recipients: list[tuple[str, Subscriber]] = attrs.Factory(list)
    remote_recipients: list[str] = attrs.Factory(list)

    @property
    def recipient_count(self) -> int:
        return len(self.local_recipients) + len(self.remote_recipients)


@implementer(IHandshakeListener)
class SMTPSession(protocol.Protocol, TimeoutMixin):
    """One SMTP connection."""

    def __init__(self, factory: "SMTPFactory") -> None:
        self.factory = factory
        self.config = factory.config
        self.session_id = new_session_id()
        self._buffer = b""
        self._busy = False
        self._paused = False
        self._discarding_long_line = False
        self._data: DataReader | None = None
        self._message: IncomingMessage | None = None
        self.helo: str | None = None
        self.esmtp = False
        self.transaction: Transaction | None = None
        self.errors = 0
        self.client_ip = "unknown"
        self._closing = False
        self.secure = False
        self._tls_started = False
        self.subscriber: Subscriber | None = None
        self.auth_method = ""
        self._sasl: SaslExchange | None = None
        self._return_path_length = 0
        self._screening = False
        self._partial_since: float | None = None
        self._data_started = 0.0
        self.client_facts: ClientFacts | None = None
        self.client_allowed = False

    # -- connection ----------------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.client_ip = getattr(peer, "host", "unknown")
        no_delay(self.transport)
        log.info(
            "session={session} connect from [{client}] to {listener} ({role})",
            session=self.session_id, client=self.client_ip, role=self.config.role,
            listener=self.config.listener or self.config.role,
        )
        METRICS.count("mailappliance_sessions_total", role=self.config.role)
        self._counted = False
        if self.factory.limits is not None:
            hit = self.factory.limits.connection_opened(self.client_ip)
            if hit is not None:
                self._limit_hit(hit)
                self.close_with(hit.code, hit.status, f"{self.config.hostname} {hit.text}")
                return
            self._counted = True
        self._tls_started = self.config.implicit_tls
        if self._tls_started:
            self._busy = True  # nothing is read as a command before the handshake is done
        self.setTimeout(self.config.idle_timeout)
        if self.factory.screening is not None and self.config.screen:
            self._screening = True  # commands wait until the client is screened
            d = Deferred.fromCoroutine(self._screen_client())
            d.addErrback(self._screening_failed)
            return
        self._greet()

    def _greet(self) -> None:
        self.reply(220, f"{self.config.hostname} ESMTP mailappliance")

    async def _screen_client(self) -> None:
        lists = self.factory.screening.current()
        facts = ClientFacts(self.client_ip)
        if lists.needs_client_name or lists.dnsbl_zones:
            facts = await self.factory.client_lookup.facts(self.client_ip, lists)
        self.client_facts = facts
        verdict = screen_client(facts, lists)
        self._screening = False
        if self._closing:
            return
        if not verdict.accepted:
            self._screened(verdict, "client")
            if verdict.action == "refuse":
                self.close_with(554, "5.7.1", f"{self.config.hostname} Access denied")
            else:
                self.close_with(421, "4.7.0", f"{self.config.hostname} Try again later")
            return
        self.client_allowed = verdict.rule.startswith("allow.")
        self._greet()
        self._process()

    def _screening_failed(self, failure: Failure) -> None:
        log.failure("session={session} screening failed; accepting the client", failure, session=self.session_id)
        self._screening = False
        self._greet()
        self._process()

    def _screened(self, verdict: Any, stage: str) -> None:
        METRICS.count("mailappliance_messages_refused_total", reason=f"screened_{stage}")
        name = self.client_facts.name if self.client_facts else None
        log.info(
            "session={session} screened at {stage}: {action} rule={rule} value={value!r} client=[{client}] "
            "name={name}",
            session=self.session_id, stage=stage, action=verdict.action, rule=verdict.rule,
            value=verdict.value, client=self.client_ip, name=name or "-",
        )

    def _screening_applies(self) -> bool:
        return self.factory.screening is not None and self.config.screen and not self.client_allowed

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.setTimeout(None)
        self._drop_message()
        if getattr(self, "_counted", False):
            self.factory.limits.connection_closed(self.client_ip)
            self._counted = False
        log.info("session={session} disconnect", session=self.session_id)

    def _limit_hit(self, hit: Any) -> None:
        METRICS.count("mailappliance_messages_refused_total", reason=f"limit_{hit.limit}")
        log.info(
            "session={session} limit {limit} reached for {key} client=[{client}]",
            session=self.session_id, limit=hit.limit, key=hit.key, client=self.client_ip,
        )

    def _subscriber_limits(self) -> Any:
        assert self.subscriber is not None
        return subscriber_limits(self.factory.limits.settings, self.subscriber.limits)

    def timeoutConnection(self) -> None:
        log.info("session={session} idle timeout", session=self.session_id)
        self.close_with(421, "4.4.2", f"{self.config.hostname} Error: timeout exceeded")

    def reply(self, code: int, text: str, status: str = "") -> None:
        """Send a (possibly multi-line) reply; ``status`` is the enhanced code."""
        lines = text.split("\n")
        prefix = f"{status} " if status else ""
        out = []
        for i, line in enumerate(lines):
            separator = " " if i == len(lines) - 1 else "-"
            out.append(f"{code}{separator}{prefix}{line}\r\n")
        write_now(self.transport, "".join(out).encode("utf-8"))

    def close_with(self, code: int, status: str, text: str) -> None:
        self.reply(code, text, status)
        self._closing = True
        self._buffer = b""
        self.transport.loseConnection()

    # -- TLS ---------------------------------------------------------------

    def handshakeCompleted(self) -> None:
        """TLS is up (STARTTLS or implicit): note it, then try the client certificate."""
        self.secure = True
        tls = self.transport.getHandle() if hasattr(self.transport, "getHandle") else None
        version = tls.get_protocol_version_name() if tls is not None else "TLS"
        cipher = tls.get_cipher_name() if tls is not None else ""
        log.info(
            "session={session} TLS established: {version} {cipher}",
            session=self.session_id, version=version, cipher=cipher,
        )
        certificate = self.factory.peer_certificate(self.transport)
        if certificate is None:
            self._resume(None)
            return
        self._busy = True
        credentials = ClientCertificateCredentials(
            certificate.der, certificate.verified, certificate.subject
        )
        d = self.factory.portal.login(credentials, None, ISubscriberIdentity)
        d.addCallbacks(self._certificate_accepted, self._certificate_refused,
                       (certificate.subject,), None, (certificate,))
        d.addBoth(self._resume)

    def _certificate_accepted(self, result: tuple[Any, Subscriber, Any], subject: str) -> None:
        self._authenticated(result[1], "certificate", subject)

    def _certificate_refused(self, failure: Failure, certificate: Any) -> None:
        METRICS.count("mailappliance_auth_total", protocol="smtp", mechanism="certificate", result="failed")
        why = certificate.reason if not certificate.verified else failure.getErrorMessage()
        log.info(
            "session={session} auth failed: mechanism=certificate subject={subject!r} client=[{client}] "
            "listener={listener} reason={why}",
            session=self.session_id, subject=certificate.subject, client=self.client_ip,
            listener=self.config.listener, why=why,
        )

    def _authenticated(self, subscriber: Subscriber, method: str, login: str) -> None:
        METRICS.count("mailappliance_auth_total", protocol="smtp", mechanism=method, result="ok")
        self.subscriber, self.auth_method = subscriber, method
        log.info(
            "session={session} auth ok: uid={uid} login={login!r} mechanism={method} client=[{client}] "
            "listener={listener}",
            session=self.session_id, uid=subscriber.uid, login=login, method=method,
            client=self.client_ip, listener=self.config.listener,
        )

    @property
    def may_authenticate(self) -> bool:
        """AUTH is offered only inside TLS (unless the admin allowed it, loudly)."""
        return self.factory.portal is not None and (self.secure or self.config.allow_plaintext_auth)

    def smtp_STARTTLS(self, argument: str) -> None:
        if self.config.tls is None:
            self.error(502, "5.5.1", "Error: command not implemented")
            return
        if self._tls_started:
            self.error(503, "5.5.1", "Error: TLS already active")
            return
        if argument:
            self.error(501, "5.5.4", "Syntax: STARTTLS")
            return
        self.reply(220, "Ready to start TLS", "2.0.0")
        if self._buffer:  # pipelined before the handshake: never executed (CVE-2011-0411 class)
            log.warn(
                "session={session} discarded {n} octets pipelined after STARTTLS from [{client}]",
                session=self.session_id, n=len(self._buffer), client=self.client_ip,
            )
            self._buffer = b""
        self._tls_started = True
        self.helo, self.esmtp, self.transaction = None, False, None  # RFC 3207 4.2
        self._busy = True  # until handshakeCompleted
        self.transport.startTLS(self.config.tls)

    # -- AUTH (RFC 4954) -----------------------------------------------------

    def smtp_AUTH(self, argument: str) -> Deferred | None:
        if not self.may_authenticate:
            self.error(530, "5.7.0", "Must issue a STARTTLS command first")
            return None
        if not self.esmtp:
            self.error(503, "5.5.1", "Error: send EHLO first")
            return None
        if self.subscriber is not None:
            self.error(503, "5.5.1", "Error: already authenticated")
            return None
        if self.transaction is not None:
            self.error(503, "5.5.1", "Error: MAIL transaction in progress")
            return None
        mechanism, _, initial = argument.partition(" ")
        if not mechanism:
            self.error(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
            return None
        exchange = SaslExchange(mechanism)
        return self._sasl_step(exchange, exchange.start(initial.strip() or None))

    def _sasl_step(self, exchange: SaslExchange, step: Step) -> Deferred | None:
        self._sasl = None
        if isinstance(step, Challenge):
            self._sasl = exchange
            write_now(self.transport, f"334 {step.text}\r\n".encode())
            return None
        if isinstance(step, SaslFailure):
            self._auth_failed(exchange.mechanism, "?", step.text)
            self.error(step.code, step.status, step.text)
            return None
        return self._check_password(exchange.mechanism, step)

    def _check_password(self, mechanism: str, collected: Collected) -> Deferred:
        credentials = ClientPassword(collected.login.encode(), collected.password.encode(), self.client_ip)
        d = self.factory.portal.login(credentials, None, ISubscriberIdentity)
        d.addCallbacks(self._password_accepted, self._password_refused,
                       (mechanism, collected.login), None, (mechanism, collected.login))
        return d

    def _password_accepted(self, result: tuple[Any, Subscriber, Any], mechanism: str, login: str) -> None:
        self._authenticated(result[1], mechanism, login)
        self.reply(235, "Authentication successful", "2.7.0")

    def _password_refused(self, failure: Failure, mechanism: str, login: str) -> None:
        if failure.check(UnauthorizedLogin):
            self._auth_failed(mechanism, login, getattr(failure.value, "reason", "refused"))
            self.error(535, "5.7.8", "Authentication credentials invalid")
            return
        if failure.check(LoginThrottled):
            self._auth_failed(mechanism, login, f"throttled: {failure.value.reason}")
            self.error(454, "4.7.0", "Too many failed logins, try again later")
            return
        if not failure.check(DirectoryUnavailable):
            log.failure("session={session} auth error", failure, session=self.session_id)
        self._auth_failed(mechanism, login, f"temporary: {failure.getErrorMessage()}")
        self.reply(454, "Temporary authentication failure, try again later", "4.7.0")

    def _auth_failed(self, mechanism: str, login: str, why: str) -> None:
        METRICS.count("mailappliance_auth_total", protocol="smtp", mechanism=mechanism,
                      result=why.split(":")[0] if why.startswith(("throttled", "temporary")) else "failed")
        log.info(
            "session={session} auth failed: login={login!r} mechanism={mechanism} client=[{client}] "
            "listener={listener} reason={why}",
            session=self.session_id, login=login, mechanism=mechanism, client=self.client_ip,
            listener=self.config.listener, why=why,
        )

    # -- input ---------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self.resetTimeout()
        if self._too_slow():
            return
        self._buffer += data
        self._process()
        if self._buffer and self._data is None:
            if self._partial_since is None:
                self._partial_since = self.factory.clock.seconds()
        else:
            self._partial_since = None

    def _too_slow(self) -> bool:
        """Slow-drip defence: a command line or a whole DATA phase must finish in time.

        Checked when bytes arrive, so a client that sends one byte just
        before each idle timeout still gets cut off.
        """
        now = self.factory.clock.seconds()
        if self._partial_since is not None and now - self._partial_since > self.config.command_time_limit:
            what = "command line"
        elif self._data is not None and now - self._data_started > self.config.data_time_limit:
            what = "DATA"
        else:
            return False
        log.info("session={session} too slow: {what} took too long, client=[{client}]",
                 session=self.session_id, what=what, client=self.client_ip)
        self.close_with(421, "4.4.2", f"{self.config.hostname} Error: timeout exceeded")
        return True

    def _process(self) -> None:
        while self._buffer and not self._busy and not self._screening and not self._closing:
            if self._data is not None:
                rest = self._data.feed(self._buffer)
                self._buffer = b""
                if rest is None:
                    return
                self._buffer = rest
                self._end_of_data()
                continue
            line = self._next_line()
            if line is None:
                break
            self._handle_command(line)
        self._apply_backpressure()

    def _apply_backpressure(self) -> None:
        """Stop reading while a command is in progress and too much is queued."""
        if self._busy and not self._paused and len(self._buffer) > MAX_QUEUED_INPUT:
            self._paused = True
            self.transport.pauseProducing()
        elif self._paused and not self._busy:
            self._paused = False
            self.transport.resumeProducing()

    def _next_line(self) -> str | None:
        end = self._buffer.find(b"\n")
        if end < 0:
            if len(self._buffer) > MAX_COMMAND_LINE:
                self._buffer = b""
                self._discarding_long_line = True
            return None
        raw, self._buffer = self._buffer[:end], self._buffer[end + 1 :]
        if self._discarding_long_line or len(raw) > MAX_COMMAND_LINE:
            self._discarding_long_line = False
            self.error(500, "5.5.2", "Error: line too long")
            return None
        return raw.rstrip(b"\r").decode("utf-8", "replace")

    def _handle_command(self, line: str) -> None:
        if self._sasl is not None:
            exchange = self._sasl
            result: Any = self._sasl_step(exchange, exchange.respond(line))
        else:
            verb, _, argument = line.partition(" ")
            handler = getattr(self, f"smtp_{verb.upper()}", None) if verb.isalpha() else None
            if handler is None:
                self.error(500, "5.5.2", "Error: command not recognized")
                return
            result = handler(argument.strip())
        if isinstance(result, Deferred):
            self._busy = True
            result.addErrback(self._unexpected_failure)
            result.addBoth(self._resume)

    def _resume(self, _: Any) -> None:
        self._busy = False
        if not self._closing and not self._screening:
            self._process()

    def _unexpected_failure(self, failure: Failure) -> None:
        log.failure("session={session} internal error", failure, session=self.session_id)
        self.reply(451, "Error: internal error, try again later", "4.3.0")

    def error(self, code: int, status: str, text: str) -> None:
        """Reply with an error and count it; too many errors end the session."""
        self.errors += 1
        if self.errors >= self.config.max_errors:
            log.info("session={session} too many errors", session=self.session_id)
            self.close_with(421, "4.7.0", f"{self.config.hostname} Error: too many errors")
            return
        self.reply(code, text, status)

    # -- commands ------------------------------------------------------------

    def extensions(self) -> list[str]:
        extensions = [f"SIZE {self.config.max_message_size}", "8BITMIME", "PIPELINING",
                      "ENHANCEDSTATUSCODES"]
        if self.config.tls is not None and not self._tls_started:
            extensions.append("STARTTLS")
        if self.may_authenticate and self.subscriber is None:
            extensions.append("AUTH PLAIN LOGIN")
        return extensions

    def _helo_refused(self, helo: str) -> bool:
        if not self._screening_applies():
            return False
        verdict = screen_helo(helo, self.factory.screening.current())
        if verdict.accepted:
            return False
        self._screened(verdict, "helo")
        self.error(554, "5.7.1", f"<{helo}>: Helo command rejected: Access denied")
        return True

    def _hello(self, verb: str, argument: str, esmtp: bool) -> None:
        """EHLO and HELO: check the name, reset the transaction, greet (with extensions for EHLO)."""
        if not argument:
            self.error(501, "5.5.4", f"Syntax: {verb} hostname")
            return
        name = argument.split()[0]
        if self._helo_refused(name):
            return
        self.helo, self.esmtp, self.transaction = name, esmtp, None
        self.reply(250, "\n".join([self.config.hostname, *(self.extensions() if esmtp else [])]))

    def smtp_EHLO(self, argument: str) -> None:
        self._hello("EHLO", argument, esmtp=True)

    def smtp_HELO(self, argument: str) -> None:
        self._hello("HELO", argument, esmtp=False)

    def smtp_NOOP(self, argument: str) -> None:
        self.reply(250, "Ok", "2.0.0")

    def smtp_RSET(self, argument: str) -> None:
        self.transaction = None
        self.reply(250, "Ok", "2.0.0")

    def smtp_QUIT(self, argument: str) -> None:
        self.close_with(221, "2.0.0", "Bye")

    def smtp_VRFY(self, argument: str) -> None:
        self.reply(252, "Cannot VRFY user, but will accept message and attempt delivery", "2.5.0")

    def smtp_EXPN(self, argument: str) -> None:
        self.error(502, "5.5.1", "Error: command not implemented")

    def smtp_HELP(self, argument: str) -> None:
        self.reply(214, "See RFC 5321; this server speaks ESMTP", "2.0.0")

    def smtp_MAIL(self, argument: str) -> Deferred | None:
        if self.helo is None:
            self.error(503, "5.5.1", "Error: send HELO/EHLO first")
            return None
        if self.transaction is not None:
            self.error(503, "5.5.1", "Error: nested MAIL command")
            return None
        try:
            path_text, parameters = split_command_argument(argument, "FROM")
            sender = parse_path(path_text, allow_null=True)
        except PathSyntaxError as e:
            self.error(501, "5.1.7", f"Bad sender address syntax: {e}")
            return None
        problem = self._check_mail_parameters(parameters)
        if problem:
            self.error(*problem)
            return None
        if self.config.require_auth and self.subscriber is None:
            self.error(530, "5.7.0", "Authentication required")
            return None
        if self.subscriber is None and self._screening_applies():
            verdict = screen_sender(sender.address, self.factory.screening.current())
            if not verdict.accepted:
                self._screened(verdict, "mail")
                self.error(554, "5.7.1", f"<{sender.address}>: Sender address rejected: Access denied")
                return None
        if self.subscriber is not None:
            refusal = decide_sender(sender, self.subscriber)
            if refusal:
                METRICS.count("mailappliance_messages_refused_total", reason="sender_not_owned")
                log.info(
                    "session={session} sender refused: uid={uid} from=<{sender}> client=[{client}]",
                    session=self.session_id, uid=self.subscriber.uid, sender=sender.address,
                    client=self.client_ip,
                )
                self.error(553, "5.7.1", f"<{sender.address}>: Sender address rejected: {refusal}")
                return None
            if self.factory.limits is not None:
                hit = self.factory.limits.may_start_message(self.subscriber.uid, self._subscriber_limits())
                if hit is not None:
                    self._limit_hit(hit)
                    self.reply(hit.code, hit.text, hit.status)
                    return None
        self.transaction = Transaction(sender=sender)
        self.reply(250, "Ok", "2.1.0")
        return None

    def _check_mail_parameters(self, parameters: list[str]) -> tuple[int, str, str] | None:
        if parameters and not self.esmtp:
            return (555, "5.5.4", "Error: MAIL parameters need EHLO")
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            name = name.upper()
            if name == "SIZE":
                if not value.isdigit():
                    return (501, "5.5.4", "Error: bad SIZE parameter")
                if int(value) > self.config.max_message_size:
                    return (552, "5.3.4", "Error: message size exceeds fixed limit")
            elif name == "BODY":
                if value.upper() not in ("7BIT", "8BITMIME"):
                    return (501, "5.5.4", "Error: BODY must be 7BIT or 8BITMIME")
            else:
                return (555, "5.5.4", f"Error: unsupported MAIL parameter {name}")
        return None

    def smtp_RCPT(self, argument: str) -> Deferred | None:
        if self.transaction is None:
            self.error(503, "5.5.1", "Error: need MAIL command")
            return None
        try:
            path_text, parameters = split_command_argument(argument, "TO")
            recipient = parse_path(path_text, allow_null=False)
        except PathSyntaxError as e:
            self.error(501, "5.1.3", f"Bad recipient address syntax: {e}")
            return None
        if parameters:
            self.error(555, "5.5.4", "Error: unsupported RCPT parameter")
            return None
        if self.transaction.recipient_count >= self.config.max_recipients:
            self.reply(452, "Error: too many recipients", "4.5.3")
            return None
        if self.subscriber is not None and self.factory.limits is not None:
            hit = self.factory.limits.may_add_recipient(
                self.subscriber.uid, self.transaction.recipient_count, self._subscriber_limits())
            if hit is not None:
                self._limit_hit(hit)
                self.reply(hit.code, hit.text, hit.status)
                return None
        if recipient.local_part.lower() == "postmaster" and not recipient.domain:
            recipient = attrs.evolve(recipient, domain=sorted(self.config.local_domains)[0])
        verdict = decide_recipient(recipient, self.config.local_domains, self.is_authenticated)
        if verdict.refused:
            METRICS.count("mailappliance_messages_refused_total", reason=verdict.reason.replace(" ", "_"))
            log.info(
                "session={session} relay refused from [{client}] rcpt=<{rcpt}> reason={reason}",
                session=self.session_id, client=self.client_ip, rcpt=recipient.address,
                reason=verdict.reason,
            )
            text = "Relay access denied" if verdict.reason == "relay denied" else "Recipient address rejected"
            self.error(verdict.code, verdict.status, f"<{recipient.address}>: {text} ({verdict.reason})")
            return None
        if verdict.route is Route.REMOTE:
            return self._accept_remote(recipient)
        address = recipient.address.lower()
        d = maybeDeferred(self.factory.find_recipient, address)
        d.addCallbacks(self._rcpt_found, self._rcpt_lookup_failed, (address,), None, (address,))
        return d

    def _rcpt_found(self, subscriber: Subscriber | None, address: str) -> None:
        if subscriber is None:
            METRICS.count("mailappliance_messages_refused_total", reason="unknown_user")
            log.info(
                "session={session} unknown recipient <{rcpt}> from [{client}]",
                session=self.session_id, rcpt=address, client=self.client_ip,
            )
            self.error(550, "5.1.1", f"<{address}>: Recipient address rejected: User unknown")
            return
        if subscriber.disabled:
            self.error(550, "5.2.1", f"<{address}>: Recipient address rejected: Mailbox disabled")
            return
        assert self.transaction is not None
        self.transaction.local_recipients.append((address, subscriber))
        self.reply(250, "Ok", "2.1.5")

    def _rcpt_lookup_failed(self, failure: Failure, address: str) -> None:
        if not failure.check(DirectoryUnavailable):
            log.failure("session={session} recipient lookup failed", failure, session=self.session_id)
        else:
            log.warn(
                "session={session} directory unavailable for <{rcpt}>: {why}",
                session=self.session_id, rcpt=address, why=failure.getErrorMessage(),
            )
        self.reply(451, f"<{address}>: Temporary lookup failure, try again later", "4.3.0")

    def _accept_remote(self, recipient: MailPath) -> None:
        """An authenticated subscriber's mail for another domain: to the outbound spool."""
        assert self.transaction is not None and self.subscriber is not None
        if self.factory.spool is None:
            self.error(554, "5.7.1", f"<{recipient.address}>: Relay access denied")
            return None
        self.transaction.remote_recipients.append(recipient.address)
        self.reply(250, "Ok", "2.1.5")
        return None

    @property
    def is_authenticated(self) -> bool:
        return self.subscriber is not None

    def smtp_DATA(self, argument: str) -> None:
        if self.transaction is None:
            self.error(503, "5.5.1", "Error: need MAIL command")
            return
        if not self.transaction.recipient_count:
            self.error(554, "5.5.1", "Error: no valid recipients")
            return
        if argument:
            self.error(501, "5.5.4", "Syntax: DATA")
            return
        try:
            self._message = IncomingMessage(self.config.incoming_dir)
            # Return-Path belongs to final delivery only: the spool copy skips it (body_offset)
            self._message.write(return_path_header(self.transaction.sender.address))
            self._return_path_length = self._message.size
            self._message.write(self._received_header())
        except OSError as e:
            log.error("session={session} cannot start message: {why}", session=self.session_id, why=e)
            self._drop_message()
            self.reply(451, "Error: local storage unavailable, try again later", "4.3.0")
            return
        self._data = DataReader(self._message.write, self.config.max_message_size, self.config.max_line_length,
                                normalize_line_endings=self.config.normalize_line_endings)
        self._data_started = self.factory.clock.seconds()
        self.reply(354, "End data with <CR><LF>.<CR><LF>")

    def _received_header(self) -> bytes:
        assert self.transaction is not None and self._message is not None
        protocol_name = "ESMTP" if self.esmtp else "SMTP"
        if self.esmtp and (self.secure or self.subscriber):  # RFC 3848
            protocol_name += ("S" if self.secure else "") + ("A" if self.subscriber else "")
        identity = None
        if self.subscriber is not None:
            identity = f"{self.subscriber.uid} via {self.auth_method}"
        return received_header(
            helo=self.helo or "unknown",
            client_ip=self.client_ip,
            hostname=self.config.hostname,
            protocol=protocol_name,
            message_id=self._message.name,
            recipients=[a for a, _ in self.transaction.local_recipients] + self.transaction.remote_recipients,
            authenticated_as=identity,
        )

    def _end_of_data(self) -> None:
        reader, message, transaction = self._data, self._message, self.transaction
        assert reader is not None and message is not None and transaction is not None
        self._data = None
        self.transaction = None
        refusal = self._data_refusal(reader)
        if refusal:
            self._drop_message()
            METRICS.count("mailappliance_messages_refused_total", reason="message_content")
            log.info(
                "session={session} message refused from [{client}]: {why}",
                session=self.session_id, client=self.client_ip, why=refusal[2],
            )
            code, status, text = refusal
            self.reply(code, text, status)
            return
        maildirs = [maildir_for(self.config.maildir_root, s.uid) for _, s in transaction.local_recipients]
        outbound = self._outbound(message, transaction)
        self._busy = True
        d = self.factory.commit(message, maildirs, outbound)
        d.addCallbacks(self._stored, self._store_failed, (message, transaction), None, (message,))
        d.addBoth(self._resume)

    def _outbound(self, message: IncomingMessage, transaction: Transaction) -> Callable[[Path], None] | None:
        """How to put the remote recipients' copy into the spool (None when there are none)."""
        if not transaction.remote_recipients:
            return None
        spool = self.factory.spool
        assert spool is not None
        envelope = Envelope.new(
            queue_id=message.name,
            sender=transaction.sender.address,
            recipients=transaction.remote_recipients,
            authenticated_as=self.subscriber.uid if self.subscriber else "",
            client_ip=self.client_ip,
            session_id=self.session_id,
            body_offset=self._return_path_length,
        )
        return lambda path: spool.enqueue(path, envelope)

    def _data_refusal(self, reader: DataReader) -> tuple[int, str, str] | None:
        problems = reader.problems
        if problems.too_big:
            return (552, "5.3.4", "Error: message size exceeds fixed limit")
        if problems.bare_line_ending:
            return (550, "5.6.0", "Error: bare CR or LF in message; lines must end with CRLF")
        if problems.line_too_long:
            return (550, "5.6.0", f"Error: message has a line longer than {self.config.max_line_length} octets "
                                  "(RFC 5321 4.5.3.1.6)")
        return None

    def _stored(self, _: Any, message: IncomingMessage, transaction: Transaction) -> None:
        self._message = None
        METRICS.count("mailappliance_messages_accepted_total", role=self.config.role)
        log.info(
            "session={session} accepted id={id} from=<{sender}> rcpts={count} remote={remote} size={size} "
            "client=[{client}] uid={uid}",
            session=self.session_id, id=message.name, sender=transaction.sender.address,
            count=transaction.recipient_count, remote=len(transaction.remote_recipients),
            size=message.size, client=self.client_ip,
            uid=self.subscriber.uid if self.subscriber else "-",
        )
        self.reply(250, f"Ok: queued as {message.name}", "2.0.0")
        if self.subscriber is not None and self.factory.limits is not None:
            self.factory.limits.message_sent(self.subscriber.uid, transaction.recipient_count)
        if transaction.remote_recipients:
            self.factory.on_queued()

    def _store_failed(self, failure: Failure, message: IncomingMessage) -> None:
        log.failure("session={session} delivery to Maildir failed", failure, session=self.session_id)
        self._drop_message()
        self.reply(451, "Error: local delivery failed, try again later", "4.3.0")

    def _drop_message(self) -> None:
        if self._message is not None:
            self._message.discard()
            self._message = None
        self._data = None


class SMTPFactory(protocol.ServerFactory):
    """Builds sessions for one listener; holds what they share."""

    def __init__(
        self,
        config: SMTPConfig,
        find_recipient: Callable[[str], Deferred],
        commit: Callable[[IncomingMessage, list[Path], Callable[[Path], None] | None], Deferred],
        portal: Portal | None = None,
        spool: OutboundSpool | None = None,
        peer_certificate: Callable[[Any], Any] = lambda transport: None,
        on_queued: Callable[[], None] = lambda: None,
        limits: Any = None,
        screening: Any = None,
        client_lookup: Any = None,
        clock: Any = None,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        self.on_queued = on_queued
        self.screening = screening  # a ScreeningSource (None: no screening)
        self.client_lookup = client_lookup
        self.limits = limits  # the shared RateLimits (None: no limits, e.g. in unit tests)
        self.config = config
        self.find_recipient = find_recipient
        self.commit = commit  # makes a message durable: BatchCommitter.commit
        self.portal = portal
        self.spool = spool
        self.peer_certificate = peer_certificate

    def buildProtocol(self, addr: Any) -> SMTPSession:
        return SMTPSession(self)
