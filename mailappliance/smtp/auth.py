"""SMTP AUTH (RFC 4954) and TLS client certificates: the session's login stage.

A mixin of :class:`~mailappliance.smtp.server.SMTPSession`.  Secrets only
inside TLS: AUTH is refused (and not advertised) before TLS unless the admin
allowed plaintext on the listener, and on the MX it is off unless the
listener enables it.  Both ways in go through the one
:class:`~mailappliance.authenticator.Authenticator`; this module only maps
its outcomes to replies.
"""

from __future__ import annotations

from typing import cast

from mailappliance.authenticator import LoginOutcome, LoginResult
from mailappliance.credentials import ISubscriberIdentity
from mailappliance.directory import Subscriber
from mailappliance.sasl import Challenge, FailureKind, SaslExchange, SaslFailure, Step
from mailappliance.smtp import replies
from mailappliance.smtp.session_base import SMTPSessionBase
from mailappliance.tls import ClientCertificate

SASL_FAILURE_REPLIES = {
    FailureKind.CANCELLED: replies.Reply(501, "5.0.0", "Authentication cancelled"),
    FailureKind.BAD_ENCODING: replies.Reply(501, "5.5.2", "Cannot decode response"),
    FailureKind.MALFORMED: replies.AUTH_INVALID,
    FailureKind.UNSUPPORTED: replies.Reply(504, "5.5.4", "Unrecognized authentication type"),
}
LOGIN_REPLIES = {
    LoginResult.REFUSED: replies.AUTH_INVALID,
    LoginResult.THROTTLED: replies.AUTH_THROTTLED,
    LoginResult.TEMPORARY: replies.AUTH_TEMPORARY,
    LoginResult.IN_USE: replies.AUTH_TEMPORARY,
}


def _subscriber(outcome: LoginOutcome) -> Subscriber:
    """The avatar of a successful SMTP login: the SubscriberRealm gives the Subscriber
    record for ISubscriberIdentity (twisted.cred hands avatars out as objects)."""
    return cast(Subscriber, outcome.avatar)


class AuthCommands(SMTPSessionBase):
    """AUTH PLAIN/LOGIN and certificate login."""

    @property
    def may_authenticate(self) -> bool:
        """AUTH is offered only inside TLS (unless the admin allowed it, loudly)
        and only on listeners that take logins."""
        return (self.factory.authenticator is not None and self.config.offer_auth
                and (self.secure or self.config.allow_plaintext_auth))

    def check_client_certificate(self) -> None:
        """After a TLS handshake: a mapped client certificate logs the subscriber in."""
        certificate = self.factory.peer_certificate(self.transport)
        if certificate is None or self.factory.authenticator is None:
            return
        d = self.factory.authenticator.certificate(certificate.der, certificate.verified, certificate.subject,
                                                   ISubscriberIdentity)
        d.addCallback(self._certificate_outcome, certificate)
        self.run(d)

    def _certificate_outcome(self, outcome: LoginOutcome, certificate: ClientCertificate) -> None:
        if outcome.ok:
            self.authenticated(_subscriber(outcome), "certificate", certificate.subject)
            return
        why = certificate.reason if not certificate.verified else outcome.reason
        self._log_failure("certificate", certificate.subject, why, outcome)

    def authenticated(self, subscriber: Subscriber, method: str, login: str) -> None:
        self.subscriber, self.auth_method = subscriber, method
        self.log_event(self.log.info, "auth ok: uid={uid} login='{login}' mechanism={method} listener={listener}",
                       uid=subscriber.uid, login=login, method=method, listener=self.config.listener)

    def smtp_AUTH(self, argument: str) -> None:
        if not self.may_authenticate:
            offered_here = self.config.offer_auth and self.factory.authenticator is not None
            self.error(replies.TLS_FIRST if offered_here else replies.NOT_IMPLEMENTED)
            return
        if not self.esmtp:
            self.error(replies.NEED_EHLO)
            return
        if self.subscriber is not None:
            self.error(replies.ALREADY_AUTHENTICATED)
            return
        if self.transaction is not None:
            self.error(replies.MAIL_IN_PROGRESS)
            return
        mechanism, _, initial = argument.partition(" ")
        if not mechanism:
            self.error(replies.Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]"))
            return
        exchange = SaslExchange(mechanism)
        self._sasl_step(exchange, exchange.start(initial.strip() or None))

    def sasl_line(self, line: str) -> None:
        """A line while an AUTH exchange waits for the client's response."""
        exchange, self.sasl = self.sasl, None
        assert exchange is not None
        self._sasl_step(exchange, exchange.respond(line))

    def sasl_line_too_long(self) -> None:
        """RFC 4954: an overlong response cancels the exchange (500 5.5.6)."""
        exchange, self.sasl = self.sasl, None
        self._log_failure(exchange.mechanism if exchange else "?", "?", "response line too long")
        self.error(replies.AUTH_LINE_TOO_LONG)

    def _sasl_step(self, exchange: SaslExchange, step: Step) -> None:
        self.sasl = None
        if isinstance(step, Challenge):
            self.sasl = exchange
            self.send(f"334 {step.text}\r\n".encode())
            return
        if isinstance(step, SaslFailure):
            self._log_failure(exchange.mechanism, step.login or "?", step.reason)
            self.error(SASL_FAILURE_REPLIES[step.kind])
            return
        assert self.factory.authenticator is not None  # may_authenticate said so
        d = self.factory.authenticator.password(step.login, step.password, self.client_ip, exchange.mechanism,
                                                ISubscriberIdentity)
        d.addCallback(self._password_outcome, exchange.mechanism, step.login)
        self.run(d)

    def _password_outcome(self, outcome: LoginOutcome, mechanism: str, login: str) -> None:
        if outcome.ok:
            self.authenticated(_subscriber(outcome), mechanism, login)
            self.respond(replies.AUTH_OK)
            return
        self._log_failure(mechanism, login, outcome.reason, outcome)
        reply = LOGIN_REPLIES[outcome.result]
        if reply.permanent:
            self.error(reply)
        else:
            self.respond(reply)

    def _log_failure(self, mechanism: str, login: str, why: str, outcome: LoginOutcome | None = None) -> None:
        if outcome is not None and outcome.unexpected is not None:
            self.log_event(self.log.failure, "auth error", failure=outcome.unexpected)
        result = outcome.result.value if outcome is not None else "failed"
        if mechanism == "certificate":
            self.log_event(self.log.info, "auth failed: mechanism=certificate subject='{subject}' result={result} "
                           "listener={listener} reason={why}", subject=login, result=result,
                           listener=self.config.listener, why=why)
            return
        self.log_event(self.log.info, "auth failed: login='{login}' mechanism={mechanism} result={result} "
                       "listener={listener} reason={why}", login=login, mechanism=mechanism, result=result,
                       listener=self.config.listener, why=why)
