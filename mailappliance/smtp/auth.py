"""SMTP AUTH (RFC 4954) and TLS client certificates: the session's login stage.

A mixin of :class:`~mailappliance.smtp.server.SMTPSession`.  Secrets only
inside TLS: AUTH is refused (and not advertised) before TLS unless the admin
allowed plaintext on the listener, and on the MX it is off unless the
listener enables it.  Both ways in end at the one shared credential checker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.cred.error import UnauthorizedLogin
from twisted.python.failure import Failure

from mailappliance.credentials import (
    ClientCertificateCredentials,
    ClientPassword,
    ISubscriberIdentity,
    LoginThrottled,
)
from mailappliance.directory import DirectoryUnavailable, Subscriber
from mailappliance.metrics import METRICS
from mailappliance.smtp import replies
from mailappliance.smtp.sasl import Challenge, Collected, SaslExchange, SaslFailure, Step

if TYPE_CHECKING:
    from mailappliance.smtp.server import SMTPSession

    _Base = SMTPSession
else:
    _Base = object


class AuthCommands(_Base):
    """AUTH PLAIN/LOGIN and certificate login."""

    @property
    def may_authenticate(self) -> bool:
        """AUTH is offered only inside TLS (unless the admin allowed it, loudly)
        and only on listeners that take logins."""
        return (self.factory.portal is not None and self.config.offer_auth
                and (self.secure or self.config.allow_plaintext_auth))

    def check_client_certificate(self) -> None:
        """After a TLS handshake: a mapped client certificate logs the subscriber in."""
        certificate = self.factory.peer_certificate(self.transport)
        if certificate is None:
            return
        credentials = ClientCertificateCredentials(
            certificate.der, certificate.verified, certificate.subject
        )
        d = self.factory.portal.login(credentials, None, ISubscriberIdentity)
        d.addCallbacks(self._certificate_accepted, self._certificate_refused,
                       (certificate.subject,), None, (certificate,))
        self.run(d)

    def _certificate_accepted(self, result: tuple[Any, Subscriber, Any], subject: str) -> None:
        self.authenticated(result[1], "certificate", subject)

    def _certificate_refused(self, failure: Failure, certificate: Any) -> None:
        METRICS.count("mailappliance_auth_total", protocol="smtp", mechanism="certificate", result="failed")
        why = certificate.reason if not certificate.verified else failure.getErrorMessage()
        self.log_event(self.log.info, "auth failed: mechanism=certificate subject='{subject}' listener={listener} "
                       "reason={why}", subject=certificate.subject, listener=self.config.listener, why=why)

    def authenticated(self, subscriber: Subscriber, method: str, login: str) -> None:
        METRICS.count("mailappliance_auth_total", protocol="smtp", mechanism=method, result="ok")
        self.subscriber, self.auth_method = subscriber, method
        self.log_event(self.log.info, "auth ok: uid={uid} login='{login}' mechanism={method} listener={listener}",
                       uid=subscriber.uid, login=login, method=method, listener=self.config.listener)

    def smtp_AUTH(self, argument: str) -> None:
        if not self.may_authenticate:
            self.error(replies.TLS_FIRST if self.config.offer_auth and self.factory.portal is not None
                       else replies.NOT_IMPLEMENTED)
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
        self.auth_failed(exchange.mechanism if exchange else "?", "?", "response line too long")
        self.error(replies.AUTH_LINE_TOO_LONG)

    def _sasl_step(self, exchange: SaslExchange, step: Step) -> None:
        self.sasl = None
        if isinstance(step, Challenge):
            self.sasl = exchange
            self.send(f"334 {step.text}\r\n".encode())
            return
        if isinstance(step, SaslFailure):
            self.auth_failed(exchange.mechanism, "?", step.text)
            self.error(replies.Reply(step.code, step.status, step.text))
            return
        self._check_password(exchange.mechanism, step)

    def _check_password(self, mechanism: str, collected: Collected) -> None:
        credentials = ClientPassword(collected.login.encode(), collected.password.encode(), self.client_ip)
        d = self.factory.portal.login(credentials, None, ISubscriberIdentity)
        d.addCallbacks(self._password_accepted, self._password_refused,
                       (mechanism, collected.login), None, (mechanism, collected.login))
        self.run(d)

    def _password_accepted(self, result: tuple[Any, Subscriber, Any], mechanism: str, login: str) -> None:
        self.authenticated(result[1], mechanism, login)
        self.respond(replies.AUTH_OK)

    def _password_refused(self, failure: Failure, mechanism: str, login: str) -> None:
        if failure.check(UnauthorizedLogin):
            self.auth_failed(mechanism, login, getattr(failure.value, "reason", "refused"))
            self.error(replies.AUTH_INVALID)
            return
        if failure.check(LoginThrottled):
            self.auth_failed(mechanism, login, f"throttled: {failure.value.reason}")
            self.error(replies.AUTH_THROTTLED)
            return
        if not failure.check(DirectoryUnavailable):
            self.log_event(self.log.failure, "auth error", failure=failure)
        self.auth_failed(mechanism, login, f"temporary: {failure.getErrorMessage()}")
        self.respond(replies.AUTH_TEMPORARY)

    def auth_failed(self, mechanism: str, login: str, why: str) -> None:
        METRICS.count("mailappliance_auth_total", protocol="smtp", mechanism=mechanism,
                      result=why.split(":")[0] if why.startswith(("throttled", "temporary")) else "failed")
        self.log_event(self.log.info, "auth failed: login='{login}' mechanism={mechanism} listener={listener} "
                       "reason={why}", login=login, mechanism=mechanism, listener=self.config.listener, why=why)

