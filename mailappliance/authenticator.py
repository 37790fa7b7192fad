"""One authentication front door for every protocol.

Protocols hand over what the client proved (a password from a SASL exchange
or USER/PASS, or a TLS client certificate) and get back a typed
:class:`LoginOutcome`; they only map the outcome to their own reply.  The
result is counted here, once (``mailappliance_auth_total``), and the reason
stays for the log, never for the client.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import attrs
from twisted.cred.credentials import ICredentials
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from zope.interface import Interface

from mailappliance.credentials import ClientCertificateCredentials, ClientPassword, LoginThrottled
from mailappliance.directory import DirectoryUnavailable
from mailappliance.metrics import METRICS


class MailboxInUse(Exception):
    """Another session holds this mailbox and cannot give it up now (POP3 ``[IN-USE]``)."""


class LoginResult(enum.Enum):
    OK = "ok"
    REFUSED = "failed"  # wrong login or password, disabled, certificate not mapped
    THROTTLED = "throttled"  # too many failures: try later
    TEMPORARY = "temporary"  # directory trouble (or our own): try later
    IN_USE = "in_use"  # the mailbox is busy


@attrs.frozen
class LoginOutcome:
    """What a login attempt came to; ``reason`` is for the log only."""

    result: LoginResult
    avatar: object = None  # what the realm gave for the interface asked (SMTP: the Subscriber)
    logout: Callable[[], None] | None = None
    reason: str = ""
    unexpected: Failure | None = None  # a bug behind a TEMPORARY: log its traceback

    @property
    def ok(self) -> bool:
        return self.result is LoginResult.OK


def classify(failure: Failure) -> LoginOutcome:
    """A failed login, as a typed outcome."""
    if isinstance(failure.value, LoginThrottled):
        return LoginOutcome(LoginResult.THROTTLED, reason=failure.value.reason)
    if failure.check(UnauthorizedLogin):
        return LoginOutcome(LoginResult.REFUSED, reason=getattr(failure.value, "reason", None) or "refused")
    if failure.check(MailboxInUse):
        return LoginOutcome(LoginResult.IN_USE, reason="mailbox in use")
    if failure.check(DirectoryUnavailable):
        return LoginOutcome(LoginResult.TEMPORARY, reason=f"directory unavailable: {failure.getErrorMessage()}")
    return LoginOutcome(LoginResult.TEMPORARY, reason=f"internal error: {failure.getErrorMessage()}",
                        unexpected=failure)


class Authenticator:
    """Logs subscribers in through the portal (THE shared checker behind it)."""

    def __init__(self, portal: Portal, protocol: str) -> None:
        self.portal = portal
        self.protocol = protocol

    def password(self, login: str | bytes, password: str | bytes, client_ip: str, mechanism: str,
                 interface: type[Interface], mind: object = None) -> Deferred[LoginOutcome]:
        """Text from SASL; bytes from POP3's USER/PASS when they are not UTF-8 (the checker refuses them)."""
        credentials = ClientPassword(login, password, client_ip)
        return self._login(credentials, mind, interface, mechanism)

    def certificate(self, der: bytes, verified: bool, subject: str, interface: type[Interface],
                    mind: object = None) -> Deferred[LoginOutcome]:
        credentials = ClientCertificateCredentials(der, verified, subject)
        return self._login(credentials, mind, interface, "certificate")

    def _login(self, credentials: ICredentials, mind: object, interface: type[Interface],
               mechanism: str) -> Deferred[LoginOutcome]:
        d = self.portal.login(credentials, mind, interface)
        outcome = d.addCallbacks(lambda avatar: LoginOutcome(LoginResult.OK, avatar[1], avatar[2]), classify)
        return outcome.addCallback(self._count, mechanism)

    def _count(self, outcome: LoginOutcome, mechanism: str) -> LoginOutcome:
        METRICS.count("mailappliance_auth_total", protocol=self.protocol, mechanism=mechanism,
                      result=outcome.result.value)
        return outcome
