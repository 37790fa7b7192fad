"""The LDAP backend (ldap3): the ISP's directory, managed with ordinary LDAP tools.

- Lookups use the read-only service account, one connection per worker
  thread (the daemon calls the store from its own thread pool).  A broken
  connection (slapd restarted, timeout) is dropped and the call retried once
  on a fresh one; if that fails too, DirectoryUnavailable: a temporary error.
- Passwords are verified by binding as the subscriber on a short-lived
  connection, so slapd checks the hash and its own policy; the service
  account never reads ``userPassword``.
- Admin changes bind as ``admin_bind_dn``; passwords are set with the
  Password Modify extended operation (RFC 3062) so the server hashes them.
- Every value put into a filter is escaped.
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

import ldap3
from cryptography import x509
from ldap3.core.exceptions import LDAPException
from ldap3.utils.conv import escape_filter_chars

from mailappliance.addresses import normalize_address, validate_uid
from mailappliance.config import LdapSettings
from mailappliance.directory import (
    DISABLED_ATTRIBUTE,
    DISABLED_VALUE,
    LIMIT_ATTRIBUTE,
    DirectoryAdminError,
    DirectoryUnavailable,
    DuplicateEntry,
    NoSuchSubscriber,
    Subscriber,
    parse_limits,
)

T = TypeVar("T")

CERTIFICATE_ATTRIBUTE = "userCertificate;binary"
ATTRIBUTES = ["uid", "mail", "mailLocalAddress", "cn", DISABLED_ATTRIBUTE, CERTIFICATE_ATTRIBUTE, LIMIT_ATTRIBUTE]
OBJECT_CLASSES = ["top", "person", "organizationalPerson", "inetOrgPerson", "inetLocalMailRecipient"]
INVALID_CREDENTIALS = 49
REFUSED_BIND_RESULTS = {48, 49, 50, 53}  # inappropriateAuth, invalidCredentials, insufficientAccess, unwilling
TEMPORARY_RESULTS = {3, 51, 52, 80}  # timeLimitExceeded, busy, unavailable, other
SIZE_LIMIT_EXCEEDED = 4


def _texts(raw: dict[str, list[bytes]], name: str) -> list[str]:
    for key, values in raw.items():
        if key.lower() == name.lower():
            return [v.decode("utf-8", "replace") for v in values]
    return []


def subscriber_from_ldap(dn: str, raw: dict[str, list[bytes]]) -> Subscriber | None:
    """The Subscriber for one search result, or None when it lacks uid or mail."""
    uids, mails = _texts(raw, "uid"), _texts(raw, "mail")
    if not uids or not mails:
        return None
    mail = mails[0].lower()
    certificates: list[bytes] = []
    for key, values in raw.items():
        if key.lower().startswith("usercertificate"):
            certificates.extend(values)
    return Subscriber(
        dn=dn,
        uid=uids[0],
        mail=mail,
        aliases=tuple(a.lower() for a in _texts(raw, "mailLocalAddress") if a.lower() != mail),
        display_name=(_texts(raw, "cn") or [""])[0],
        disabled=any(v.lower() == DISABLED_VALUE for v in _texts(raw, DISABLED_ATTRIBUTE)),
        certificates=tuple(certificates),
        limits=parse_limits(_texts(raw, LIMIT_ATTRIBUTE)),
    )


def _unbind_quietly(conn: ldap3.Connection) -> None:
    """Close a connection that may already be broken."""
    try:
        conn.unbind()
    except LDAPException:
        pass


class LdapStore:
    """A DirectoryStore on an LDAP server."""

    def __init__(self, settings: LdapSettings) -> None:
        self.settings = settings
        self._servers = [
            ldap3.Server(url, get_info=ldap3.NONE, connect_timeout=settings.timeout) for url in settings.urls
        ]
        servers = self._servers
        self._server: Any = servers[0] if len(servers) == 1 else ldap3.ServerPool(
            servers, ldap3.FIRST, active=1, exhaust=False
        )
        self._local = threading.local()
        # every thread's service connection, so close() (called from another
        # thread when the daemon stops) can unbind them all
        self._open: set[ldap3.Connection] = set()
        self._open_lock = threading.Lock()
        # ldap3 packs this into SO_RCVTIMEO with struct: it must be a whole number
        self._receive_timeout = max(1, math.ceil(settings.timeout))

    # -- connections ---------------------------------------------------------

    def _connect(self, user: str, password: str) -> ldap3.Connection:
        # ldap3 otherwise skips an address for 5 s after one failure; we want
        # the first call after slapd comes back to work.
        for server in self._servers:
            server.reset_availability()
        return ldap3.Connection(
            self._server, user=user or None, password=password or None,
            receive_timeout=self._receive_timeout, raise_exceptions=False, read_only=False,
        )

    def _service_connection(self) -> ldap3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            conn = self._connect(self.settings.bind_dn, self.settings.bind_password)
            if not conn.bind():
                raise DirectoryUnavailable(f"service bind as {self.settings.bind_dn!r} failed: "
                                           f"{conn.result.get('description')}")
            self._local.conn = conn
            with self._open_lock:
                self._open.add(conn)
        return conn

    def _drop_service_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            with self._open_lock:
                self._open.discard(conn)
            _unbind_quietly(conn)

    def _with_retry(self, operation: Callable[[ldap3.Connection], T]) -> T:
        """Run ``operation`` on the service connection; once more on a fresh one if it broke."""
        last_error = ""
        for _ in range(2):
            try:
                return operation(self._service_connection())
            except DirectoryUnavailable as e:
                last_error = str(e)
            except LDAPException as e:
                last_error = f"{type(e).__name__}: {e}"
            self._drop_service_connection()
        raise DirectoryUnavailable(f"LDAP {', '.join(self.settings.urls)}: {last_error}")

    def _search(self, ldap_filter: str) -> list[tuple[str, dict[str, list[bytes]]]]:
        def run(conn: ldap3.Connection) -> list[tuple[str, dict[str, list[bytes]]]]:
            conn.search(self.settings.base_dn, ldap_filter, ldap3.SUBTREE, attributes=ATTRIBUTES,
                        time_limit=self._receive_timeout)
            code = conn.result.get("result")
            if code == SIZE_LIMIT_EXCEEDED:
                raise DirectoryUnavailable(
                    f"the server's size limit stopped the search (OpenLDAP's default olcSizeLimit is 500 "
                    f"entries); give the service account more, e.g. "
                    f'olcLimits: dn.exact="{self.settings.bind_dn}" size=unlimited'
                )
            if code in TEMPORARY_RESULTS or (code not in (0, 32) and code is not None):
                raise DirectoryUnavailable(f"search failed: {conn.result.get('description')}")
            if code is None:
                raise DirectoryUnavailable("no answer from the LDAP server")
            return [(e["dn"], e["raw_attributes"]) for e in conn.response or [] if e.get("type") == "searchResEntry"]

        return self._with_retry(run)

    def _first(self, ldap_filter: str) -> Subscriber | None:
        for dn, raw in self._search(ldap_filter):
            subscriber = subscriber_from_ldap(dn, raw)
            if subscriber is not None:
                return subscriber
        return None

    # -- lookups -------------------------------------------------------------

    def find_by_login(self, login: str) -> Subscriber | None:
        if not login:
            return None
        return self._first(self.settings.login_filter.format(login=escape_filter_chars(login)))

    def find_by_address(self, address: str) -> Subscriber | None:
        if not address:
            return None
        return self._first(self.settings.address_filter.format(address=escape_filter_chars(address)))

    @contextmanager
    def _short_connection(self, user: str, password: str) -> Iterator[ldap3.Connection]:
        """A connection for one job (user bind, admin change); LDAP trouble is temporary."""
        conn = self._connect(user, password)
        try:
            yield conn
        except LDAPException as e:
            raise DirectoryUnavailable(f"LDAP {', '.join(self.settings.urls)}: {type(e).__name__}: {e}") from None
        finally:
            _unbind_quietly(conn)

    def verify_password(self, subscriber: Subscriber, password: str) -> bool:
        if not password:
            return False  # an empty password would be an unauthenticated bind: always "success"
        with self._short_connection(subscriber.dn, password) as conn:
            if conn.bind():
                return True
            if conn.result.get("result") in REFUSED_BIND_RESULTS:
                return False
            raise DirectoryUnavailable(f"bind as {subscriber.dn!r}: {conn.result.get('description')}")

    def find_by_certificate(self, der: bytes) -> Subscriber | None:
        """Search by serial and issuer (certificateExactMatch), then compare the DER bytes.

        A filter on the DER value itself finds nothing on OpenLDAP.
        """
        try:
            certificate = x509.load_der_x509_certificate(der)
        except ValueError:
            return None
        assertion = '{ serialNumber %d, issuer rdnSequence:"%s" }' % (
            certificate.serial_number, certificate.issuer.rfc4514_string().replace('"', '""'),
        )
        ldap_filter = f"(userCertificate={escape_filter_chars(assertion)})"
        for dn, raw in self._search(ldap_filter):
            subscriber = subscriber_from_ldap(dn, raw)
            if subscriber is not None and der in subscriber.certificates:
                return subscriber
        return None

    def list_subscribers(self) -> list[Subscriber]:
        found = [subscriber_from_ldap(dn, raw) for dn, raw in self._search("(objectClass=inetOrgPerson)")]
        return sorted((s for s in found if s is not None), key=lambda s: s.uid.lower())

    def close(self) -> None:
        """Unbind every thread's service connection (the store stays usable: it reconnects)."""
        self._local.conn = None
        with self._open_lock:
            connections, self._open = list(self._open), set()
        for conn in connections:
            _unbind_quietly(conn)

    # -- admin ---------------------------------------------------------------

    def _admin(self, operation: Callable[[ldap3.Connection], T]) -> T:
        if not self.settings.admin_bind_dn:
            raise DirectoryAdminError(
                "changing the LDAP directory needs directory.ldap.admin_bind_dn and "
                "directory.ldap.admin_bind_password in the config"
            )
        with self._short_connection(self.settings.admin_bind_dn, self.settings.admin_bind_password) as conn:
            if not conn.bind():
                if conn.result.get("result") in REFUSED_BIND_RESULTS:
                    raise DirectoryAdminError(f"admin bind as {self.settings.admin_bind_dn!r} refused")
                raise DirectoryUnavailable(f"admin bind failed: {conn.result.get('description')}")
            return operation(conn)

    @staticmethod
    def _check(conn: ldap3.Connection, what: str) -> None:
        code = conn.result.get("result")
        if code == 0:
            return
        if code == 68:
            raise DuplicateEntry(f"{what}: entry already exists")
        if code == 32:
            raise NoSuchSubscriber(f"{what}: no such entry")
        if code in TEMPORARY_RESULTS:
            raise DirectoryUnavailable(f"{what}: {conn.result.get('description')}")
        raise DirectoryAdminError(f"{what}: {conn.result.get('description')} {conn.result.get('message', '')}".strip())

    def _require(self, login: str) -> Subscriber:
        subscriber = self.find_by_login(login) or self.find_by_address(login)
        if subscriber is None:
            raise NoSuchSubscriber(f"no subscriber with login or address {login!r}")
        return subscriber

    def _refuse_taken_address(self, address: str) -> None:
        if self.find_by_address(address) or self.find_by_login(address):
            raise DuplicateEntry(f"address {address!r} already belongs to a subscriber")

    def add_subscriber(
        self, uid: str, mail: str, password: str | None, display_name: str = ""
    ) -> Subscriber:
        uid = validate_uid(uid)
        mail = normalize_address(mail)
        if self.find_by_login(uid):
            raise DuplicateEntry(f"login {uid!r} is already taken")
        self._refuse_taken_address(mail)
        dn = f"uid={ldap3.utils.dn.escape_rdn(uid)},{self.settings.base_dn}"
        attributes = {"uid": uid, "mail": mail, "cn": display_name or uid, "sn": display_name or uid}

        def add(conn: ldap3.Connection) -> None:
            conn.add(dn, OBJECT_CLASSES, attributes)
            self._check(conn, f"adding {dn}")
            if password:
                conn.extend.standard.modify_password(user=dn, new_password=password)
                try:
                    self._check(conn, f"setting the password of {dn}")
                except DirectoryAdminError:
                    conn.delete(dn)  # no half-made subscriber: the admin can simply retry
                    raise

        self._admin(add)
        return self._require(uid)

    def set_password(self, login: str, password: str) -> None:
        dn = self._require(login).dn

        def change(conn: ldap3.Connection) -> None:
            conn.extend.standard.modify_password(user=dn, new_password=password)
            self._check(conn, f"setting the password of {dn}")

        self._admin(change)

    def _modify(self, dn: str, changes: dict[str, Any], what: str, missing_ok: bool = False) -> None:
        def modify(conn: ldap3.Connection) -> None:
            conn.modify(dn, changes)
            if missing_ok and conn.result.get("result") in (16, 20):  # noSuchAttribute, attributeOrValueExists
                return
            if conn.result.get("result") == 16:
                raise NoSuchSubscriber(f"{what}: not present")
            self._check(conn, what)

        self._admin(modify)

    def set_disabled(self, login: str, disabled: bool) -> None:
        dn = self._require(login).dn
        operation = ldap3.MODIFY_ADD if disabled else ldap3.MODIFY_DELETE
        self._modify(dn, {DISABLED_ATTRIBUTE: [(operation, [DISABLED_VALUE])]},
                     f"{'disabling' if disabled else 'enabling'} {login}", missing_ok=True)

    def delete_subscriber(self, login: str) -> None:
        dn = self._require(login).dn

        def delete(conn: ldap3.Connection) -> None:
            conn.delete(dn)
            self._check(conn, f"deleting {dn}")

        self._admin(delete)

    def add_alias(self, login: str, alias: str) -> None:
        alias = normalize_address(alias)
        subscriber = self._require(login)
        self._refuse_taken_address(alias)
        self._modify(subscriber.dn, {"mailLocalAddress": [(ldap3.MODIFY_ADD, [alias])]},
                     f"adding alias {alias} to {login}")

    def delete_alias(self, alias: str) -> None:
        alias = normalize_address(alias)
        subscriber = self.find_by_address(alias)
        if subscriber is None or alias == subscriber.mail:
            raise NoSuchSubscriber(f"no subscriber has the alias {alias!r}")
        self._modify(subscriber.dn, {"mailLocalAddress": [(ldap3.MODIFY_DELETE, [alias])]},
                     f"removing alias {alias}")

    def add_certificate(self, login: str, der: bytes) -> None:
        subscriber = self._require(login)
        if self.find_by_certificate(der) is not None:
            raise DuplicateEntry("that certificate is already stored for a subscriber")
        self._modify(subscriber.dn, {CERTIFICATE_ATTRIBUTE: [(ldap3.MODIFY_ADD, [der])]},
                     f"adding a certificate to {login}")

    def remove_certificate(self, login: str, der: bytes) -> None:
        subscriber = self._require(login)
        if der not in subscriber.certificates:
            raise NoSuchSubscriber(f"{login!r} has no such certificate")
        self._modify(subscriber.dn, {CERTIFICATE_ATTRIBUTE: [(ldap3.MODIFY_DELETE, [der])]},
                     f"removing a certificate from {login}")
