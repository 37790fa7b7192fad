"""The LDAP backend (ldap3): the ISP's directory, managed with ordinary LDAP tools.

- Lookups use the read-only service account, one connection per worker
  thread (the daemon calls the store from its own thread pool).  A broken
  connection (slapd restarted) is dropped and the call retried once on a
  fresh one; if that fails too, DirectoryUnavailable: a temporary error.
- Several ``urls``: the first one that is not marked down serves every call.
  A server that times out, refuses or answers "busy" is marked down and the
  next one tried within the same call, so a hung server (accepts, never
  answers) costs one timeout once, not one per call; a background probe
  brings it back.  ldap3's ServerPool cannot do this: it only skips servers
  that refuse the TCP connection, and a receive timeout is not one.
- Passwords are verified by binding as the subscriber on a short-lived
  connection, so slapd checks the hash and its own policy; the service
  account never reads ``userPassword``.  A login that finds no subscriber
  costs the same: a bind to a DN that does not exist, refused by slapd.
- Admin changes bind as ``admin_bind_dn``; passwords are set with the
  Password Modify extended operation (RFC 3062) so the server hashes them.
- Every value put into a filter is escaped.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

import ldap3
from cryptography import x509
from ldap3.core.exceptions import LDAPException, LDAPResponseTimeoutError
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import escape_rdn
from twisted.logger import Logger

from mailappliance.addresses import normalize_address, validate_new_subscriber
from mailappliance.config import LdapSettings
from mailappliance.directory import (
    DISABLED_ATTRIBUTE,
    DISABLED_VALUE,
    FORWARD_ATTRIBUTE,
    LIMIT_ATTRIBUTE,
    DirectoryAdminError,
    DirectoryUnavailable,
    DuplicateEntry,
    NoSuchSubscriber,
    Subscriber,
    parse_limits,
)
from mailappliance.directory.passwords import prepare_password
from mailappliance.metrics import METRICS

log = Logger(namespace="mailappliance.directory")

T = TypeVar("T")
PROBE_INTERVAL = 10.0  # seconds between probes of a server marked down

CERTIFICATE_ATTRIBUTE = "userCertificate;binary"
# SMTPUTF8 addresses: mail and mailLocalAddress are IA5String (ASCII only), so UTF-8 addresses
# live in mailUTF8Address (etc/slapd/smtputf8.ldif) and are looked up by this filter alone
UTF8_ADDRESS_ATTRIBUTE = "mailUTF8Address"
UTF8_OBJECT_CLASS = "mailUTF8Recipient"
UTF8_ADDRESS_FILTER = "(&(objectClass=inetOrgPerson)(mailUTF8Address={address}))"
ATTRIBUTES = ["uid", "mail", "mailLocalAddress", "cn", DISABLED_ATTRIBUTE, CERTIFICATE_ATTRIBUTE, LIMIT_ATTRIBUTE,
              FORWARD_ATTRIBUTE, UTF8_ADDRESS_ATTRIBUTE]
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
    uids, mails = _texts(raw, "uid"), _texts(raw, "mail") + _texts(raw, UTF8_ADDRESS_ATTRIBUTE)
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
        aliases=tuple(a.lower() for a in _texts(raw, "mailLocalAddress") + _texts(raw, UTF8_ADDRESS_ATTRIBUTE)
                      if a.lower() != mail),
        display_name=(_texts(raw, "cn") or [""])[0],
        disabled=any(v.lower() == DISABLED_VALUE for v in _texts(raw, DISABLED_ATTRIBUTE)),
        certificates=tuple(certificates),
        limits=parse_limits(_texts(raw, LIMIT_ATTRIBUTE)),
        forwards=tuple(_texts(raw, FORWARD_ATTRIBUTE)),
    )


def _unbind_quietly(conn: ldap3.Connection) -> None:
    """Close a connection that may already be broken."""
    try:
        conn.unbind()
    except LDAPException:
        pass


def _describe(error: LDAPException) -> str:
    return f"{type(error).__name__}: {error}"


def _timed_out(error: LDAPException) -> bool:
    """ldap3 raises socket timeouts as a class that is both LDAPSocket...Error and TimeoutError."""
    return isinstance(error, (TimeoutError, LDAPResponseTimeoutError))


class ServerTrouble(Exception):
    """This server did not serve the call (no answer, timeout, refused, busy): try the next one."""


class ServerSet:
    """The configured servers in order of preference, and which are marked down.

    Pure bookkeeping, shared by the directory threads (hence the lock).
    """

    def __init__(self, urls: Sequence[str]) -> None:
        self.urls = tuple(urls)
        self._down: dict[str, str] = {}  # url -> why
        self._lock = threading.Lock()

    def order(self) -> list[str]:
        """Where to try a call: the servers up, in configured order, then those down (a last resort)."""
        with self._lock:
            return [u for u in self.urls if u not in self._down] + [u for u in self.urls if u in self._down]

    def current(self) -> str:
        """The server calls go to first; "" when every one is marked down."""
        with self._lock:
            return next((u for u in self.urls if u not in self._down), "")

    def down(self) -> dict[str, str]:
        with self._lock:
            return dict(self._down)

    def is_down(self, url: str) -> bool:
        with self._lock:
            return url in self._down

    def mark_down(self, url: str, why: str) -> bool:
        """True if it was up until now."""
        with self._lock:
            was_up = url not in self._down
            self._down[url] = why
            return was_up

    def mark_up(self, url: str) -> bool:
        """True if it was down until now."""
        with self._lock:
            return self._down.pop(url, None) is not None


class LdapStore:
    """A DirectoryStore on one or more LDAP servers (the first that works serves)."""

    def __init__(self, settings: LdapSettings, probe_interval: float = PROBE_INTERVAL) -> None:
        self.settings = settings
        self._servers = {
            url: ldap3.Server(url, get_info=ldap3.NONE, connect_timeout=settings.timeout) for url in settings.urls
        }
        self.servers = ServerSet(settings.urls)
        self._probe_interval = probe_interval
        self._probe: threading.Thread | None = None
        self._probe_stop = threading.Event()
        self._probe_lock = threading.Lock()
        self._local = threading.local()
        # every thread's service connection, so close() (called from another
        # thread when the daemon stops) can unbind them all
        self._open: set[ldap3.Connection] = set()
        self._open_lock = threading.Lock()
        # ldap3 packs this into SO_RCVTIMEO with struct: it must be a whole number
        self._receive_timeout = max(1, math.ceil(settings.timeout))
        # where a login that finds nobody binds (random: no entry can have it)
        self._nobody_dn = f"uid=nobody-{os.urandom(12).hex()},{settings.base_dn}"

    def current_server(self) -> str:
        """The URL new calls go to ("" while every server is marked down)."""
        return self.servers.current()

    def server_states(self) -> list[tuple[str, bool]]:
        """(url, up) for every configured server, in order of preference."""
        down = self.servers.down()
        return [(url, url not in down) for url in self.servers.urls]

    # -- servers -------------------------------------------------------------

    def _on_servers(self, attempt: Callable[[str], T]) -> T:
        """``attempt(url)`` on the servers in order until one serves the call.

        A server that fails is marked down and the next one is tried at once;
        one that serves as a last resort (all were down) is marked up again.
        """
        if self.servers.down():
            self._ensure_probe()  # also after close(): the store stays usable
        failures = []
        for url in self.servers.order():
            try:
                result = attempt(url)
            except ServerTrouble as e:
                failures.append(f"{url}: {e}")
                self._mark_down(url, str(e))
                continue
            if self.servers.is_down(url) and self.servers.mark_up(url):
                log.info("directory server {url} answers again: back in use", url=url)
            return result
        raise DirectoryUnavailable(f"LDAP {'; '.join(failures)}")

    def _mark_down(self, url: str, why: str) -> None:
        if self.servers.mark_down(url, why):
            METRICS.count("mailappliance_directory_failovers_total", server=url)
            log.warn(
                "directory server {url} marked down: {why}; now using {current} (probed every {interval:g} s)",
                url=url, why=why, current=self.servers.current() or "none (all down)",
                interval=self._probe_interval,
            )
        self._ensure_probe()

    def _ensure_probe(self) -> None:
        with self._probe_lock:
            if self._probe is not None:
                return
            self._probe_stop = threading.Event()
            self._probe = threading.Thread(target=self._run_probe, args=(self._probe_stop,),
                                           name="ldap-probe", daemon=True)
            self._probe.start()

    def _run_probe(self, stop: threading.Event) -> None:
        """Every probe interval, try the servers marked down; ends when none is (or on close)."""
        while not stop.wait(self._probe_interval):
            for url in self.servers.down():
                why = self._probe_server(url)
                if why is None and self.servers.mark_up(url):
                    log.info("directory server {url} answered a probe: back in use", url=url)
            with self._probe_lock:
                if stop.is_set() or not self.servers.down():
                    if self._probe is threading.current_thread():
                        self._probe = None
                    return

    def _probe_server(self, url: str) -> str | None:
        """None if ``url`` binds the service account and finds the base entry, else why not."""
        conn = self._connect(url, self.settings.bind_dn, self.settings.bind_password)
        try:
            if not conn.bind():
                return f"service bind failed: {conn.result.get('description')}"
            conn.search(self.settings.base_dn, "(objectClass=*)", ldap3.BASE, attributes=[ldap3.NO_ATTRIBUTES],
                        time_limit=self._receive_timeout)
            if conn.result.get("result") != 0:
                return f"search of {self.settings.base_dn} failed: {conn.result.get('description')}"
            return None
        except LDAPException as e:
            return _describe(e)
        finally:
            _unbind_quietly(conn)

    # -- connections ---------------------------------------------------------

    def _connect(self, url: str, user: str, password: str | bytes) -> ldap3.Connection:
        server = self._servers[url]
        # ldap3 otherwise skips an address for 5 s after one failure; we want
        # the first call after slapd comes back to work.
        server.reset_availability()
        return ldap3.Connection(
            # ldap3 sends a bytes password as it is (no SASLprep: see _bind_as); its stub says str only
            server, user=user or None, password=password or None,  # type: ignore[arg-type]
            receive_timeout=self._receive_timeout, raise_exceptions=False, read_only=False,
        )

    def _new_service_connection(self, url: str) -> ldap3.Connection:
        conn = self._connect(url, self.settings.bind_dn, self.settings.bind_password)
        try:
            bound = conn.bind()
        except LDAPException as e:
            _unbind_quietly(conn)
            raise ServerTrouble(_describe(e)) from None
        if not bound:
            _unbind_quietly(conn)
            raise ServerTrouble(f"service bind as {self.settings.bind_dn!r} failed: "
                                f"{conn.result.get('description')}")
        self._local.conn, self._local.url = conn, url
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

    def _service_call(self, url: str, operation: Callable[[ldap3.Connection], T]) -> T:
        """``operation`` on this thread's service connection to ``url``.

        A reused connection that broke (the server restarted, or closed it as
        idle) gets one more try on a fresh one; a timeout does not: the
        server is not answering, and the caller moves on to the next one.
        """
        conn = getattr(self._local, "conn", None)
        if conn is not None and (conn.closed or getattr(self._local, "url", None) != url):
            self._drop_service_connection()
            conn = None
        if conn is not None:
            try:
                return operation(conn)
            except LDAPException as e:
                self._drop_service_connection()
                if _timed_out(e):
                    raise ServerTrouble(_describe(e)) from None
            except ServerTrouble:
                self._drop_service_connection()
                raise
        conn = self._new_service_connection(url)
        try:
            return operation(conn)
        except LDAPException as e:
            self._drop_service_connection()
            raise ServerTrouble(_describe(e)) from None
        except ServerTrouble:
            self._drop_service_connection()
            raise

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
            if code is None:
                raise ServerTrouble("no answer from the LDAP server")
            if code in TEMPORARY_RESULTS:
                raise ServerTrouble(f"search failed: {conn.result.get('description')}")
            if code not in (0, 32):
                raise DirectoryUnavailable(f"search failed: {conn.result.get('description')}")
            return [(e["dn"], e["raw_attributes"]) for e in conn.response or [] if e.get("type") == "searchResEntry"]

        return self._on_servers(lambda url: self._service_call(url, run))

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
        template = self.settings.address_filter if address.isascii() else UTF8_ADDRESS_FILTER
        return self._first(template.format(address=escape_filter_chars(address)))

    def _bound(self, user: str, password: str | bytes, job: Callable[[ldap3.Connection, bool], T]) -> T:
        """``job(conn, bound)`` on a connection of its own (user bind, admin change), on the
        first server that answers the bind (yes or no); the connection is closed afterwards."""

        def attempt(url: str) -> T:
            conn = self._connect(url, user, password)
            try:
                try:
                    bound = conn.bind()
                except LDAPException as e:
                    raise ServerTrouble(_describe(e)) from None
                if not bound and conn.result.get("result") not in REFUSED_BIND_RESULTS:
                    raise ServerTrouble(f"bind as {user!r}: {conn.result.get('description')}")
                try:
                    return job(conn, bound)
                except LDAPException as e:  # half-way through a change: not repeated elsewhere
                    raise DirectoryUnavailable(f"LDAP {url}: {_describe(e)}") from None
            finally:
                _unbind_quietly(conn)

        return self._on_servers(attempt)

    def verify_password(self, subscriber: Subscriber, password: str) -> bool:
        return self._bind_as(subscriber.dn, password)

    def verify_unknown(self, password: str) -> bool:
        """A login with no subscriber: cost what a refused password costs (a
        fresh connection and a bind that slapd refuses), then refuse.

        A bind, not a local Argon2 hash: with slapd's usual {SSHA} a refused
        bind takes a few milliseconds, and an Argon2 here would make unknown
        logins the slow ones, telling them apart as well as before.
        """
        self._bind_as(self._nobody_dn, password)
        return False

    def _bind_as(self, dn: str, password: str) -> bool:
        """Bind with exactly ``password`` (as UTF-8 bytes: ldap3 would SASLprep a str,
        which makes the as-typed retry of password_candidates useless and raises
        for a client's control characters, which must be a plain refusal)."""
        if not password:
            return False  # an empty password would be an unauthenticated bind: always "success"
        secret = password.encode("utf-8", "surrogateescape")
        return self._bound(dn, secret, lambda conn, bound: bound)

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
        """Unbind every thread's service connection, stop probing (the store stays usable: it reconnects)."""
        with self._probe_lock:
            self._probe_stop.set()
            self._probe = None
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

        def job(conn: ldap3.Connection, bound: bool) -> T:
            if not bound:
                raise DirectoryAdminError(f"admin bind as {self.settings.admin_bind_dn!r} refused")
            return operation(conn)

        return self._bound(self.settings.admin_bind_dn, self.settings.admin_password(), job)

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
        uid, mail, display_name = validate_new_subscriber(uid, mail, display_name)
        if password:
            password = prepare_password(password)  # ldap3 applies the same SASLprep again: no change
        if self.find_by_login(uid):
            raise DuplicateEntry(f"login {uid!r} is already taken")
        self._refuse_taken_address(mail)
        dn = f"uid={escape_rdn(uid)},{self.settings.base_dn}"
        attributes = {"uid": uid, "mail": mail, "cn": display_name or uid, "sn": display_name or uid}
        classes = OBJECT_CLASSES
        if not mail.isascii():  # a UTF-8 primary address (SMTPUTF8): mail is ASCII only
            attributes[UTF8_ADDRESS_ATTRIBUTE] = attributes.pop("mail")
            classes = [*OBJECT_CLASSES, UTF8_OBJECT_CLASS]

        def add(conn: ldap3.Connection) -> None:
            conn.add(dn, classes, attributes)
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
        password = prepare_password(password)
        dn = self._require(login).dn

        def change(conn: ldap3.Connection) -> None:
            conn.extend.standard.modify_password(user=dn, new_password=password)
            self._check(conn, f"setting the password of {dn}")

        self._admin(change)

    def _modify(self, dn: str, changes: dict[str, list[tuple[str, list[str | bytes]]]], what: str,
                missing_ok: bool = False) -> None:
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
        attribute = "mailLocalAddress" if alias.isascii() else UTF8_ADDRESS_ATTRIBUTE
        if not alias.isascii():
            self._modify(subscriber.dn, {"objectClass": [(ldap3.MODIFY_ADD, [UTF8_OBJECT_CLASS])]},
                         f"allowing UTF-8 addresses for {login}", missing_ok=True)
        self._modify(subscriber.dn, {attribute: [(ldap3.MODIFY_ADD, [alias])]},
                     f"adding alias {alias} to {login}")

    def delete_alias(self, alias: str) -> None:
        alias = normalize_address(alias)
        subscriber = self.find_by_address(alias)
        if subscriber is None or alias == subscriber.mail:
            raise NoSuchSubscriber(f"no subscriber has the alias {alias!r}")
        attribute = "mailLocalAddress" if alias.isascii() else UTF8_ADDRESS_ATTRIBUTE
        self._modify(subscriber.dn, {attribute: [(ldap3.MODIFY_DELETE, [alias])]},
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
