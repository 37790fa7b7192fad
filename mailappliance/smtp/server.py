"""The ESMTP server protocol shared by the MX and submission listeners.

We do not use ``twisted.mail.smtp.ESMTP``: it advertises AUTH before TLS,
keeps executing commands pipelined after STARTTLS, has no SIZE enforcement or
enhanced status codes, and its line handling cannot tell CRLF from bare LF
(SMTP smuggling).  The session stands on the shared kernel
(:class:`~mailappliance.linesession.LineSession`: framing, ordering, bounded
input and output, timers, TLS discard, log context) and keeps only SMTP's
grammar and state here; the login stage is in :mod:`.auth`, the
MAIL/RCPT/DATA stage in :mod:`.transaction`, reply texts in :mod:`.replies`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import cast

import attrs
from OpenSSL import SSL
from twisted.cred.portal import Portal
from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IAddress,
    IHandshakeListener,
    IOpenSSLContextFactory,
    IReactorTime,
    ISystemHandle,
    ITLSTransport,
    ITransport,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailappliance.addressing import Addressing
from mailappliance.authenticator import Authenticator
from mailappliance.budget import NetworkByteBudget
from mailappliance.client_lookup import ClientLookup
from mailappliance.config import SMTPOptions
from mailappliance.delivery import Committer, Delivery
from mailappliance.directory import Subscriber
from mailappliance.limits import RateLimits
from mailappliance.linesession import LINE_TOO_LONG, LineSession, SessionSettings
from mailappliance.metrics import METRICS
from mailappliance.msgauth.inspect import MessageInspector
from mailappliance.queue.notices import SuccessNotices
from mailappliance.queue.spool import OutboundSpool
from mailappliance.quota import MailboxQuotas
from mailappliance.sasl import SaslExchange
from mailappliance.screening import ClientFacts, ScreeningSource, screen_client, screen_helo
from mailappliance.smtp import replies
from mailappliance.smtp.auth import AuthCommands
from mailappliance.smtp.chunking import ChunkingCommands
from mailappliance.smtp.data import DataReader
from mailappliance.smtp.transaction import MailTransaction, Transaction
from mailappliance.tls import ClientCertificate
from mailappliance.verdicts import Verdict

MAX_COMMAND_LINE = 4096  # RFC 5321 says 512; AUTH (RFC 4954) needs more
COMMANDS = frozenset({"EHLO", "HELO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "QUIT", "VRFY",
                      "EXPN", "HELP", "STARTTLS", "AUTH"})


_SMTP_DEFAULTS = SMTPOptions()  # the [smtp] defaults, written once (config.py)


@attrs.frozen
class SMTPConfig:
    """Everything an SMTP session needs to know about its listener (defaults: ``[smtp]``'s)."""

    hostname: str
    role: str
    local_domains: frozenset[str]
    maildir_root: Path
    incoming_dir: Path
    max_message_size: int
    max_line_length: int = _SMTP_DEFAULTS.max_line_length
    max_recipients: int = _SMTP_DEFAULTS.max_recipients
    max_errors: int = _SMTP_DEFAULTS.max_errors
    idle_timeout: float = 300
    listener: str = ""
    tls: IOpenSSLContextFactory | None = None  # ServerTLS: offers STARTTLS when not implicit
    implicit_tls: bool = False
    require_auth: bool = False  # submission: MAIL only after AUTH or a client certificate
    offer_auth: bool = True  # AUTH on this listener at all (off on the MX unless configured)
    allow_plaintext_auth: bool = False  # AUTH without TLS (never by default)
    screen: bool = False  # apply the screening lists on this listener
    normalize_line_endings: bool = _SMTP_DEFAULTS.normalize_line_endings  # bare CR/LF in DATA: refuse or turn into CRLF
    command_time_limit: float = _SMTP_DEFAULTS.command_time_limit  # seconds for one command line to arrive
    data_time_limit: float = _SMTP_DEFAULTS.data_time_limit  # seconds for a whole DATA phase
    session_lifetime: float = 0  # seconds a session may last at most (0: no limit)
    addressing: Addressing | None = None  # alias domains, sub-addresses, SRS (None: local_domains only)
    screen_refuse_at: str = "rcpt"  # a screened client: refused at RCPT (postmaster@/abuse@ open) or "connect"

    @property
    def session(self) -> SessionSettings:
        return SessionSettings(listener=self.listener or self.role, idle_timeout=self.idle_timeout,
                               command_time_limit=self.command_time_limit,
                               session_lifetime=self.session_lifetime)


@implementer(IHandshakeListener)
class SMTPSession(AuthCommands, ChunkingCommands, MailTransaction, LineSession):
    """One SMTP connection."""

    __slots__ = ("_handshake",)  # the rest: SMTPSessionBase (the stages' state) and LineSession (the kernel's)

    log = Logger(namespace="mailappliance.smtp")

    def __init__(self, factory: SMTPFactory) -> None:
        super().__init__()
        self.factory = factory
        self.config = factory.config
        self.settings = factory.session_settings  # one record per listener, not per session
        self.clock = factory.clock
        self.limits = factory.limits
        self.helo: str | None = None
        self.esmtp = False
        self.transaction: Transaction | None = None
        self.delivery: Delivery | None = None
        self.committing: Delivery | None = None
        self.data_reader: DataReader | None = None
        self.data_started = 0.0
        self.return_path_length = 0
        self.skip_octets = 0  # of a refused BDAT chunk
        self.chunked = None  # a message arriving in BDAT chunks (chunking.py)
        self.errors = 0
        self.secure = False
        self.tls_started = False
        self.subscriber: Subscriber | None = None
        self.auth_method = ""
        self.sasl: SaslExchange | None = None
        self.client_facts: ClientFacts | None = None
        self.client_allowed = False
        self.held_refusals = None  # screening refusals waiting for RCPT (recipients.py); most sessions have none
        self._handshake: Deferred[None] | None = None

    # -- kernel hooks -----------------------------------------------------------------

    def greet(self) -> None:
        self.log_event(self.log.info, "connect to {listener} ({role})", listener=self.settings.listener,
                       role=self.config.role)
        METRICS.count("mailappliance_sessions_total", role=self.config.role)
        if self.config.implicit_tls:
            self._wait_for_handshake()  # nothing is read as a command before the handshake is done
        if self.factory.screening is not None and self.config.screen:
            self.run(Deferred.fromCoroutine(self._screen_client(self.factory.screening)))  # commands wait for it
            return
        self._banner()

    def _banner(self) -> None:
        self.respond(replies.Reply(220, "", f"{self.config.hostname} ESMTP mailappliance"))

    def refuse_connection(self, hit: Verdict) -> None:
        METRICS.count("mailappliance_messages_refused_total", reason=hit.rule.replace(".", "_"))
        reply = replies.for_limit(hit)
        self.respond(reply.with_text(f"{self.config.hostname} {reply.text}"))

    def say_timeout(self, why: str) -> None:
        self.respond(replies.TIMEOUT.with_text(f"{self.config.hostname} {replies.TIMEOUT.text}"))

    def internal_error(self, failure: Failure) -> None:
        self.reset_transaction()
        self.sasl = None
        self.respond(replies.INTERNAL_ERROR)

    def session_ended(self) -> None:
        self.reset_transaction()  # a message still being received; one handed to the commit is not ours
        if self.committing is not None:
            self.committing.abandon()  # unless it is still waiting for its disk (no 250 reached anyone)
        self.sasl = None

    def deadline_passed(self, now: float) -> str | None:
        receiving = self.data_reader is not None or self.chunked is not None
        if receiving and now - self.data_started > self.config.data_time_limit:
            return "DATA"
        return None

    def input_stalled(self) -> bool:
        return self.delivery is not None and self.delivery.message.held_back

    def _wait_for_spill(self) -> None:
        """The spill writer's backlog is full (a slow disk): this session alone holds its
        input and stops reading until its message's bytes are handed over; the reactor
        and every other session go on."""
        delivery = self.delivery
        if delivery is None or not delivery.message.held_back:
            return
        METRICS.count("mailappliance_spill_waits_total")
        room: Deferred[None] = Deferred()
        delivery.message.when_room(lambda: room.callback(None))
        self.run(room)

    def consume_input(self) -> bool:
        if self.skip_octets:
            skipped = min(self.skip_octets, len(self.input))
            del self.input[:skipped]
            self.skip_octets -= skipped
            return True
        if self.chunks_in_progress():
            self.take_chunk_octets()
            self._wait_for_spill()
            return True
        if self.data_reader is not None:
            data = bytes(self.input)
            self.input.clear()
            rest = self.data_reader.feed(data)
            if rest is not None:
                self.input[:0] = rest
                self.end_of_data()
            else:
                self._wait_for_spill()
            return True
        line = self.next_line(MAX_COMMAND_LINE)
        if line is None:
            return False
        if line is LINE_TOO_LONG:
            if self.sasl is not None:
                self.sasl_line_too_long()
            else:
                self.error(replies.LINE_TOO_LONG)
            return True
        assert isinstance(line, bytes)
        text = line.decode("utf-8", "replace")
        if self.sasl is not None:
            self.sasl_line(text)
        else:
            self._dispatch(text)
        return True

    def _dispatch(self, line: str) -> None:
        verb, _, argument = line.partition(" ")
        if not verb.isascii() or verb.upper() not in COMMANDS:  # "ſTARTTLS".upper() is "STARTTLS"
            self.error(replies.NOT_RECOGNIZED)
            return
        getattr(self, f"smtp_{verb.upper()}")(argument.strip())

    # -- screening --------------------------------------------------------------------

    async def _screen_client(self, screening: ScreeningSource) -> None:
        lists = screening.current()
        facts = ClientFacts(self.client_ip)
        try:
            if lists.needs_client_name or lists.dnsbl_zones:
                client_lookup = self.factory.client_lookup
                assert client_lookup is not None  # service.py gives the listeners with screening one
                facts = await client_lookup.facts(self.client_ip, lists)
        except Exception:
            self.log_event(self.log.failure, "screening lookup failed; accepting the client", failure=Failure())
        self.client_facts = facts if facts.name else None  # only the name is used later: nothing to keep
        verdict = screen_client(facts, lists)
        if self.closing or self.closed:
            return
        if not verdict.accepted:
            self.screened(verdict, "client")
            held = replies.CLIENT_REFUSED if verdict.refused else replies.CLIENT_DEFERRED
            held = held.with_text(f"<{self.client_ip}>: {held.text}")
            if self.hold_screening("client", verdict, held):
                self._banner()  # refused at RCPT, where postmaster@ and abuse@ stay open
            elif verdict.refused:
                self.close_with(replies.ACCESS_DENIED.with_text(f"{self.config.hostname} Access denied"))
            else:
                self.close_with(replies.SERVICE_BUSY.with_text(f"{self.config.hostname} Try again later"))
            return
        self.client_allowed = verdict.rule.startswith("allow.")
        self._banner()

    def screened(self, verdict: Verdict, stage: str) -> None:
        METRICS.count("mailappliance_messages_refused_total", reason=f"screened_{stage}")
        name = self.client_facts.name if self.client_facts else None
        self.log_event(self.log.info, "screened at {stage}: {action} rule={rule} value='{value}' name={name}",
                       stage=stage, action=verdict.action.value, rule=verdict.rule, value=verdict.value,
                       name=name or "-")

    def screening_applies(self) -> bool:
        return self.factory.screening is not None and self.config.screen and not self.client_allowed

    def limit_hit(self, hit: Verdict) -> None:
        METRICS.count("mailappliance_messages_refused_total", reason=hit.rule.replace(".", "_"))
        self.log_event(self.log.info, "limit {limit} reached for {key}",
                           limit=hit.rule.removeprefix("limit."), key=hit.value)
        self.respond(replies.for_limit(hit))

    # -- replies ----------------------------------------------------------------------

    def respond(self, reply: replies.Reply) -> None:
        """Send a (possibly multi-line) reply with its enhanced status code."""
        self.send(replies.encode(reply))

    def error(self, reply: replies.Reply) -> None:
        """Reply with an error and count it; too many errors end the session."""
        self.errors += 1
        if self.errors >= self.config.max_errors:
            self.log_event(self.log.info, "too many errors")
            self.close_with(replies.TOO_MANY_ERRORS.with_text(f"{self.config.hostname} Error: too many errors"))
            return
        self.respond(reply)

    def close_with(self, reply: replies.Reply) -> None:
        """The session's last reply, then the end (on TLS one send for the reply and close_notify)."""
        self.close(replies.encode(reply))

    # -- TLS --------------------------------------------------------------------------

    def _wait_for_handshake(self) -> None:
        self.tls_started = True
        self._handshake = Deferred()
        self.run(self._handshake)

    def handshakeCompleted(self) -> None:
        """TLS is up (STARTTLS or implicit): note it, then try the client certificate."""
        self.secure = True
        # ISystemHandle types the handle as object: a TLS transport's is its pyOpenSSL Connection.
        tls = cast(SSL.Connection, cast(ISystemHandle, self.transport).getHandle()) \
            if hasattr(self.transport, "getHandle") else None
        version = tls.get_protocol_version_name() if tls is not None else "TLS"
        cipher = tls.get_cipher_name() if tls is not None else ""
        self.log_event(self.log.info, "TLS established: {version} {cipher}", version=version, cipher=cipher)
        self.check_client_certificate()
        handshake, self._handshake = self._handshake, None
        if handshake is not None:
            handshake.callback(None)

    def smtp_STARTTLS(self, argument: str) -> None:
        if self.config.tls is None:
            self.error(replies.NOT_IMPLEMENTED)
            return
        if self.tls_started:
            self.error(replies.TLS_ACTIVE)
            return
        if argument:
            self.error(replies.Reply(501, "5.5.4", "Syntax: STARTTLS"))
            return
        self.respond(replies.READY_FOR_TLS)
        self.discard_pipelined_input("STARTTLS")  # never executed (CVE-2011-0411 class)
        # RFC 3207 4.2: forget everything learnt before TLS, an earlier login included
        self.reset_transaction()
        self.helo, self.esmtp = None, False
        self.subscriber, self.auth_method = None, ""
        self._wait_for_handshake()
        # Not in TLS yet, so the transport is a plain tcp.Server, which is an ITLSTransport; its
        # startTLS takes context factories too (wrapped), though typed for connection creators only.
        cast(ITLSTransport, self.transport).startTLS(self.config.tls)  # type: ignore[arg-type]

    # -- simple commands --------------------------------------------------------------

    def extensions(self) -> list[str]:
        extensions = [f"SIZE {self.config.max_message_size}", "8BITMIME", "PIPELINING", "DSN", "SMTPUTF8",
                      "CHUNKING", "ENHANCEDSTATUSCODES"]  # no BINARYMIME: chunking.py
        if self.config.tls is not None and not self.tls_started:
            extensions.append("STARTTLS")
        if self.may_authenticate and self.subscriber is None:
            extensions.append("AUTH PLAIN LOGIN")
        return extensions

    def _helo_refused(self, helo: str) -> bool:
        screening = self.factory.screening
        if screening is None or not self.screening_applies():
            return False
        if self.held_refusals:
            self.held_refusals.pop("helo", None)
        verdict = screen_helo(helo, screening.current())
        if verdict.accepted:
            return False
        self.screened(verdict, "helo")
        if self.hold_screening("helo", verdict, replies.ACCESS_DENIED.with_text(
                f"<{helo}>: Helo command rejected: Access denied")):
            return False
        self.error(replies.ACCESS_DENIED.with_text(f"<{helo}>: Helo command rejected: Access denied"))
        return True

    def _hello(self, verb: str, argument: str, esmtp: bool) -> None:
        """EHLO and HELO: check the name, reset the transaction, greet (with extensions for EHLO)."""
        if not argument:
            self.error(replies.Reply(501, "5.5.4", f"Syntax: {verb} hostname"))
            return
        name = argument.split()[0]
        if self._helo_refused(name):
            return
        self.reset_transaction()
        self.helo, self.esmtp = name, esmtp
        self.respond(replies.Reply(250, "", "\n".join([self.config.hostname,
                                                       *(self.extensions() if esmtp else [])])))

    def smtp_EHLO(self, argument: str) -> None:
        self._hello("EHLO", argument, esmtp=True)

    def smtp_HELO(self, argument: str) -> None:
        self._hello("HELO", argument, esmtp=False)

    def smtp_NOOP(self, argument: str) -> None:
        self.respond(replies.OK)

    def smtp_RSET(self, argument: str) -> None:
        self.reset_transaction()
        self.respond(replies.OK)

    def smtp_QUIT(self, argument: str) -> None:
        self.close_with(replies.BYE)

    def smtp_VRFY(self, argument: str) -> None:
        self.respond(replies.Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery"))

    def smtp_EXPN(self, argument: str) -> None:
        self.error(replies.NOT_IMPLEMENTED)

    def smtp_HELP(self, argument: str) -> None:
        self.respond(replies.Reply(214, "2.0.0", "See RFC 5321; this server speaks ESMTP"))


class SMTPFactory(protocol.ServerFactory[SMTPSession]):
    """Builds sessions for one listener; holds what they share."""

    inspector: MessageInspector | None = None  # set by service.py: DKIM, SPF, DMARC, the content filter
    success_notices: SuccessNotices | None = None  # set by service.py: NOTIFY=SUCCESS for local deliveries

    def __init__(
        self,
        config: SMTPConfig,
        find_recipient: Callable[[str], Deferred[Subscriber | None]],
        commit: Committer,
        portal: Portal | None = None,
        spool: OutboundSpool | None = None,
        peer_certificate: Callable[[ITransport | None], ClientCertificate | None] = lambda transport: None,
        on_queued: Callable[[], None] = lambda: None,
        limits: RateLimits | None = None,
        screening: ScreeningSource | None = None,
        client_lookup: ClientLookup | None = None,
        clock: IReactorTime | None = None,
        quotas: MailboxQuotas | None = None,
        network_budget: NetworkByteBudget | None = None,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as default_reactor

            clock = default_reactor
        self.clock = clock
        self.on_queued = on_queued
        self.screening = screening  # a ScreeningSource (None: no screening)
        self.client_lookup = client_lookup
        self.limits = limits  # the shared RateLimits (None: no limits, e.g. in unit tests)
        self.quotas = quotas  # quota.MailboxQuotas (None: no mailbox quota)
        self.network_budget = network_budget  # the MX's per-network byte budget (None: none)
        self.config = config
        self.session_settings = config.session
        self.find_recipient = find_recipient
        self.commit = commit  # makes a message durable: BatchCommitter.commit
        self.portal = portal
        self.authenticator = Authenticator(portal, "smtp") if portal is not None else None
        self.spool = spool
        self.peer_certificate = peer_certificate

    def buildProtocol(self, addr: IAddress | None) -> SMTPSession:
        session = SMTPSession(self)
        session.factory = self
        return session
