"""THE shared credential checker: every listener's Portal uses this one object.

It turns credentials into a :class:`Subscriber` (the avatar id), so SMTP and
POP3 follow the same rules and share one cache.  The positive cache keeps an
HMAC of the password under a per-process random key, never the password, and
expires after ``cache_ttl`` seconds, so a deleted or disabled subscriber stops
working within that time.  TLS client certificates are the second
credential interface (``IClientCertificate``).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections.abc import Callable
from typing import NoReturn, TypeVar

import attrs
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ICredentials, IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from mailappliance.addresses import is_safe_mailbox_name
from mailappliance.directory import DirectoryUnavailable, Subscriber
from mailappliance.directory.threaded import Directory, SharedLookups
from mailappliance.metrics import METRICS
from mailappliance.settings import ThrottleSettings
from mailappliance.throttle import AuthThrottle, Throttling

MAX_CACHE_ENTRIES = 50_000
_log = Logger(namespace="mailappliance.auth")
_T = TypeVar("_T")


class IClientCertificate(ICredentials):
    """A TLS client certificate presented in the handshake."""

    der = Attribute("The certificate, DER bytes")
    verified = Attribute("True if it chained to the client CA and is within its validity")
    subject = Attribute("Its subject, for logs and the Received header")


@implementer(IClientCertificate)
@attrs.frozen
class ClientCertificateCredentials:
    der: bytes = attrs.field(repr=False)
    verified: bool
    subject: str = ""


def _raise(error: Exception) -> NoReturn:
    raise error


def _refuse_unsafe_uid(subscriber: Subscriber) -> None:
    """A directory entry whose uid cannot name a Maildir is the admin's to fix:
    a temporary failure that names the entry, never a login with it."""
    if not is_safe_mailbox_name(subscriber.uid):
        raise DirectoryUnavailable(
            f"directory entry {subscriber.dn!r} has an unsafe uid {subscriber.uid!r} (it names the Maildir: "
            "not empty, no '/', no leading '.', no '..', no control characters); fix the entry"
        )


class LoginThrottled(Exception):
    """Too many failures from this address (or for this account): try again later.

    Not an UnauthorizedLogin: protocols answer with a temporary code.
    """

    def __init__(self, login: str, reason: str, retry_after: float) -> None:
        super().__init__(f"login {login!r} throttled: {reason}")
        self.login = login
        self.reason = reason
        self.retry_after = retry_after


@implementer(IUsernamePassword)
class ClientPassword(UsernamePassword):
    """A login and password plus the client address they came from (for throttling).

    The protocols decode the wire bytes once (SASL: UTF-8) and pass text;
    bytes are accepted too and decoded by the checker."""

    def __init__(self, username: str | bytes, password: str | bytes, client_address: str) -> None:
        super().__init__(username, password)  # type: ignore[arg-type]  # UsernamePassword says bytes; text too
        self.client_address = client_address


class LoginRefused(UnauthorizedLogin):
    """Wrong login, wrong password or disabled account; ``reason`` is for the log only."""

    def __init__(self, login: str, reason: str) -> None:
        super().__init__(f"login {login!r} refused: {reason}")
        self.login = login
        self.reason = reason


@attrs.frozen
class _CacheEntry:
    digest: bytes
    subscriber: Subscriber
    expires: float


def _timed_login(result: _T, started: float) -> _T:
    """Record a login's latency (cache, throttle delay, directory) by result, for /metrics."""
    failure: Failure | None = result if isinstance(result, Failure) else None
    if failure is None:
        kind = "ok"
    elif failure.check(LoginRefused):
        kind = "refused"
    elif failure.check(LoginThrottled):
        kind = "throttled"
    elif failure.check(DirectoryUnavailable):
        kind = "unavailable"
    else:
        kind = "error"
    METRICS.observe("mailappliance_login_seconds", time.monotonic() - started, result=kind)
    return result


@implementer(ICredentialsChecker)
class SubscriberChecker:
    """Checks logins against the directory, with a short positive cache."""

    credentialInterfaces = (IUsernamePassword, IClientCertificate)

    def __init__(self, directory: Directory, cache_ttl: float, clock: IReactorTime,
                 throttle: AuthThrottle | None = None) -> None:
        self.directory = directory
        self.throttle = throttle or AuthThrottle(ThrottleSettings(), clock)
        self.cache_ttl = cache_ttl
        self.clock = clock
        self._key = os.urandom(32)
        self._cache: dict[str, _CacheEntry] = {}
        self._verifications = SharedLookups[Subscriber]()  # keyed by (login, HMAC of the password)

    def _digest(self, login: str, password: str) -> bytes:
        message = login.encode() + b"\0" + password.encode()
        return hmac.new(self._key, message, hashlib.sha256).digest()

    # twisted.cred types avatar ids as bytes; ours is the Subscriber record (the realms take it as such).
    def requestAvatarId(self, credentials: ICredentials) -> Deferred[Subscriber]:  # type: ignore[override]
        started = time.monotonic()
        # The portal passes only credentials of our credentialInterfaces; I(x) is x itself, typed as I.
        if IClientCertificate.providedBy(credentials):
            d = self._check_certificate(IClientCertificate(credentials))
        else:
            d = self._check_password(IUsernamePassword(credentials))
        return d.addBoth(_timed_login, started)

    def _check_certificate(self, credentials: IClientCertificate) -> Deferred[Subscriber]:
        """A certificate counts only if it verified AND a subscriber holds exactly it."""
        if not credentials.verified:
            return fail(LoginRefused(credentials.subject, "certificate not trusted or expired"))
        d = self.directory.find_by_certificate(credentials.der)
        return d.addCallback(self._certificate_verdict, credentials.subject)

    @staticmethod
    def _certificate_verdict(subscriber: Subscriber | None, subject: str) -> Subscriber:
        if subscriber is None:
            raise LoginRefused(subject, "certificate is not stored for any subscriber")
        if subscriber.disabled:
            raise LoginRefused(subject, "subscriber is disabled")
        _refuse_unsafe_uid(subscriber)
        return subscriber

    def _check_password(self, credentials: IUsernamePassword) -> Deferred[Subscriber]:
        address = getattr(credentials, "client_address", "")
        try:
            username, secret = credentials.username, credentials.password
            login = (username if isinstance(username, str) else username.decode("utf-8")).strip()
            password = secret if isinstance(secret, str) else secret.decode("utf-8")
        except UnicodeDecodeError:
            return self._refuse(LoginRefused("?", "login or password is not UTF-8"), address, "?")
        key = login.lower()
        d = self.throttle.check(address, key)  # the state store may be Redis: a Deferred
        return d.addCallback(self._throttle_checked, login, password, key, address)

    def _throttle_checked(self, throttling: Throttling, login: str, password: str, key: str,
                          address: str) -> Subscriber | Deferred[Subscriber]:
        if throttling.locked:
            raise LoginThrottled(login, throttling.reason, throttling.retry_after)
        if not login or not password:
            return self._refuse(LoginRefused(login, "empty login or password"), address, key)
        digest = self._digest(key, password)
        cached = self._cache.get(key)
        now = self.clock.seconds()
        if cached and cached.expires > now and hmac.compare_digest(cached.digest, digest):
            self._trust(address, key, throttling)
            return cached.subscriber
        d = self._verifications((key, digest), lambda: self._verify(login, password, key, digest))
        return d.addCallbacks(self._succeeded, self._failed, callbackArgs=(address, key, throttling),
                              errbackArgs=(address, key))

    def _trust(self, address: str, key: str, throttling: Throttling | None = None) -> None:
        """Tell the throttle about a good login; the answer does not wait for it."""
        self.throttle.succeeded(address, key, throttling).addErrback(
            lambda failure: _log.failure("recording a good login for {login}", failure, login=key))

    def _verify(self, login: str, password: str, key: str, digest: bytes) -> Deferred[Subscriber]:
        """One directory check (a password hash or an LDAP bind), shared by
        every identical login that arrives while it runs (each still counts
        for the throttle on its own)."""
        d = self.directory.authenticate(login, password)
        return d.addCallback(self._verdict, login, key, digest)

    def _succeeded(self, subscriber: Subscriber, address: str, key: str,
                   throttling: Throttling | None = None) -> Subscriber:
        self._trust(address, key, throttling)
        return subscriber

    def _failed(self, failure: Failure, address: str, key: str) -> Failure | Deferred[Subscriber]:
        if not isinstance(failure.value, LoginRefused):
            return failure  # directory trouble: not the client's fault
        return self._refuse(failure.value, address, key)

    def _refuse(self, error: LoginRefused, address: str, key: str) -> Deferred[Subscriber]:
        """Count the failure; answer only after the throttle's delay."""
        d = self.throttle.failed(address, key)
        return d.addCallback(self._refusal_after, error)

    def _refusal_after(self, delay: float, error: LoginRefused) -> Deferred[Subscriber]:
        if delay <= 0:
            return fail(error)
        return deferLater(self.clock, delay, _raise, error)

    def _verdict(self, subscriber: Subscriber | None, login: str, key: str, digest: bytes) -> Subscriber:
        if subscriber is None:
            self._cache.pop(key, None)
            raise LoginRefused(login, "unknown login or wrong password")
        if subscriber.disabled:
            self._cache.pop(key, None)
            raise LoginRefused(login, "subscriber is disabled")
        _refuse_unsafe_uid(subscriber)
        if self.cache_ttl > 0:
            self._remember(key, _CacheEntry(digest, subscriber, self.clock.seconds() + self.cache_ttl))
        return subscriber

    def _remember(self, key: str, entry: _CacheEntry) -> None:
        if len(self._cache) >= MAX_CACHE_ENTRIES:
            now = self.clock.seconds()
            self._cache = {k: v for k, v in self._cache.items() if v.expires > now}
            while len(self._cache) >= MAX_CACHE_ENTRIES:
                self._cache.pop(next(iter(self._cache)))
        self._cache[key] = entry


class ISubscriberIdentity(Interface):
    """The avatar SMTP asks for: the authenticated Subscriber record itself."""


@implementer(IRealm)
class SubscriberRealm:
    """Gives back the Subscriber the checker found; SMTP needs nothing more."""

    def requestAvatar(self, avatarId: object, mind: object,
                      *interfaces: type[Interface]) -> tuple[type[Interface], object, Callable[[], None]]:
        """``avatarId`` is the Subscriber our checker returns (twisted.cred types avatar ids as bytes)."""
        if ISubscriberIdentity not in interfaces:
            raise NotImplementedError("SubscriberRealm only offers ISubscriberIdentity")
        return ISubscriberIdentity, avatarId, lambda: None
