"""A private, real OpenLDAP slapd for the tests (Debian's slapd, no mocks).

One slapd per test session, in a temp dir, on a free loopback port: cn=config
built with ``slapadd -n0`` (schemas core, cosine, inetorgperson, misc and our
etc/slapd/forwarding.ldif; an mdb
database for dc=example,dc=org), an admin (rootdn), a read-only service
account that cannot read passwords, and ``ou=people``.  The function-scoped
``slapd`` fixture empties ``ou=people`` and makes sure the server runs, so
tests are independent and may stop and restart it.  The service account
gets ``olcLimits ... size=unlimited``: without it OpenLDAP answers at most
500 entries (paged searches too), and listing a real ISP's subscribers fails.

``debian_slapd`` makes another kind: a slapd configured exactly as Debian's
package configures a fresh one (its slapd.init.ldif and base entry, as its
postinst does; rootDN password unknown), with a private ``ldapi://`` socket
on which root (SASL EXTERNAL) manages cn=config: what ``mailappliance-admin
directory setup`` meets on a fresh Debian.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import quote

from tests.conditions import ServerProcess, wait_until
from tests.daemon import free_port

import ldap3
import pytest

from mailappliance.config import LdapSettings
from mailappliance.directory.ldap import LdapStore
from mailappliance.directory.passwords import make_ssha

SLAPD = shutil.which("slapd") or "/usr/sbin/slapd"
SLAPADD = shutil.which("slapadd") or "/usr/sbin/slapadd"
SCHEMA_DIR = Path("/etc/ldap/schema")
DEBIAN_INIT_LDIF = Path("/usr/share/slapd/slapd.init.ldif")  # what Debian's postinst slapadds
MODULE_DIR = Path("/usr/lib/ldap")
FORWARDING_SCHEMA = Path(__file__).resolve().parent.parent / "etc" / "slapd" / "forwarding.ldif"
UTF8_SCHEMA = FORWARDING_SCHEMA.with_name("smtputf8.ldif")  # mailUTF8Address (SMTPUTF8)
SUFFIX = "dc=example,dc=org"

CONFIG_LDIF = """\
dn: cn=config
objectClass: olcGlobal
cn: config
olcPidFile: {root}/slapd.pid

dn: cn=module{{0}},cn=config
objectClass: olcModuleList
cn: module{{0}}
olcModulePath: {modules}
olcModuleLoad: back_mdb
{modules_extra}
dn: cn=schema,cn=config
objectClass: olcSchemaConfig
cn: schema

include: file://{schemas}/core.ldif

include: file://{schemas}/cosine.ldif

include: file://{schemas}/inetorgperson.ldif

include: file://{schemas}/misc.ldif

include: file://{forwarding}

include: file://{utf8}

dn: olcDatabase={{-1}}frontend,cn=config
objectClass: olcDatabaseConfig
objectClass: olcFrontendConfig
olcDatabase: {{-1}}frontend

dn: olcDatabase={{0}}config,cn=config
objectClass: olcDatabaseConfig
olcDatabase: {{0}}config
olcAccess: {{0}}to * by * none

dn: olcDatabase={{1}}mdb,cn=config
objectClass: olcDatabaseConfig
objectClass: olcMdbConfig
olcDatabase: {{1}}mdb
olcSuffix: {suffix}
olcRootDN: cn=admin,{suffix}
olcRootPW: {admin_hash}
olcDbDirectory: {root}/data
olcDbMaxSize: 67108864
olcDbIndex: objectClass eq
olcDbIndex: uid,mail,mailLocalAddress,mailUTF8Address eq
olcAccess: {{0}}to attrs=userPassword by self =w by anonymous auth by * none
olcAccess: {{1}}to * by dn.exact="cn=mailappliance,{suffix}" read by self read by * none
olcLimits: dn.exact="cn=mailappliance,{suffix}" size=unlimited
{database_extra}{overlay}"""

# A syncrepl provider: the syncprov overlay on the database (replication pointers in design.md).
PROVIDER_MODULES = "olcModuleLoad: syncprov\n"
PROVIDER_DATABASE = "olcDbIndex: entryCSN,entryUUID eq\n"
PROVIDER_OVERLAY = """
dn: olcOverlay=syncprov,olcDatabase={1}mdb,cn=config
objectClass: olcOverlayConfig
objectClass: olcSyncProvConfig
olcOverlay: syncprov
olcSpCheckpoint: 100 10
"""
# A consumer: refreshAndPersist from the provider as its rootdn; writes are referred to the provider.
CONSUMER_DATABASE = """olcDbIndex: entryCSN,entryUUID eq
olcSyncrepl: rid=001 provider={provider} bindmethod=simple binddn="cn=admin,{suffix}"
  credentials={password} searchbase="{suffix}" type=refreshAndPersist retry="1 +" timeout=3
olcUpdateRef: {provider}
"""

DATA_LDIF = """\
dn: {suffix}
objectClass: dcObject
objectClass: organization
dc: example
o: Example ISP

dn: ou=people,{suffix}
objectClass: organizationalUnit
ou: people

dn: cn=mailappliance,{suffix}
objectClass: simpleSecurityObject
objectClass: organizationalRole
cn: mailappliance
userPassword: {service_hash}
"""


class Slapd(ServerProcess):
    """A running private slapd; ``stop()``/``start()`` keep data and port."""

    base_dn = f"ou=people,{SUFFIX}"
    admin_dn = f"cn=admin,{SUFFIX}"
    admin_password = "admin-secret"
    bind_dn = f"cn=mailappliance,{SUFFIX}"
    bind_password = "service-secret"

    def __init__(self, root: Path, build: bool = True, port: int | None = None, role: str = "standalone",
                 provider: "Slapd | None" = None) -> None:
        """``build=False``: use the cn=config and database already in ``root`` (a restored one).
        ``role``: "standalone", "provider" (syncprov) or "consumer" (of ``provider``, starting empty)."""
        self.root = root
        self.role = role
        self.provider = provider
        self.port = port or free_port()
        self.url = f"ldap://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        if build:
            self._build()

    def _build(self) -> None:
        config_dir, data_dir = self.root / "slapd.d", self.root / "data"
        config_dir.mkdir()
        data_dir.mkdir()
        extra = {"modules_extra": "", "database_extra": "", "overlay": ""}
        if self.role == "provider":
            extra = {"modules_extra": PROVIDER_MODULES, "database_extra": PROVIDER_DATABASE,
                     "overlay": PROVIDER_OVERLAY}
        elif self.role == "consumer":
            assert self.provider is not None
            extra["database_extra"] = CONSUMER_DATABASE.format(provider=self.provider.url, suffix=SUFFIX,
                                                               password=self.provider.admin_password)
        config = CONFIG_LDIF.format(
            root=self.root, modules=MODULE_DIR, schemas=SCHEMA_DIR, suffix=SUFFIX, forwarding=FORWARDING_SCHEMA, utf8=UTF8_SCHEMA,
            admin_hash=make_ssha(self.admin_password), **extra,
        )
        data = DATA_LDIF.format(suffix=SUFFIX, service_hash=make_ssha(self.bind_password))
        (self.root / "config.ldif").write_text(config)
        (self.root / "data.ldif").write_text(data)
        loads = [("0", "config.ldif")] + ([("1", "data.ldif")] if self.role != "consumer" else [])
        for number, ldif in loads:
            result = subprocess.run(
                [SLAPADD, "-n", number, "-F", str(config_dir), "-l", str(self.root / ldif)],
                capture_output=True, text=True,
            )
            if result.returncode != 0:
                raise RuntimeError(f"slapadd -n{number} failed:\n{result.stdout}{result.stderr}")

    def start(self, timeout: float = 15) -> None:
        if self.running:
            return
        log = open(self.root / "slapd.log", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            [SLAPD, "-d", "0", "-h", " ".join(self.listen_urls()), "-F", str(self.root / "slapd.d")],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"slapd exited: {(self.root / 'slapd.log').read_text()}")
            try:
                self.probe()
                return
            except ldap3.core.exceptions.LDAPException:
                time.sleep(0.05)
        raise RuntimeError("slapd did not answer in time")

    def listen_urls(self) -> list[str]:
        return [f"{self.url}/"]

    def probe(self) -> None:
        """Returns when slapd answers (raises an LDAPException while it does not)."""
        with self.admin_connection():
            return

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def admin_connection(self) -> ldap3.Connection:
        server = ldap3.Server(self.url, get_info=ldap3.NONE, connect_timeout=2)
        return ldap3.Connection(server, self.admin_dn, self.admin_password, auto_bind=True,
                                receive_timeout=5, raise_exceptions=False)

    def clear_people(self) -> None:
        """Delete everything below ou=people, leaves first."""
        with self.admin_connection() as conn:
            conn.search(self.base_dn, "(objectClass=*)", ldap3.SUBTREE, attributes=[])
            dns = sorted((e["dn"] for e in conn.response if e.get("dn") and e["dn"] != self.base_dn),
                         key=lambda dn: -dn.count(","))
            for dn in dns:
                conn.delete(dn)

    def add_ldif(self, text: str) -> None:
        """ldapadd as the admin (to add entries the way an admin's tools would)."""
        result = subprocess.run(
            ["ldapadd", "-x", "-H", self.url, "-D", self.admin_dn, "-w", self.admin_password],
            input=text, capture_output=True, text=True, timeout=30,
        )
        if result.returncode != 0:
            raise RuntimeError(f"ldapadd failed: {result.stderr}")

    def settings(self, timeout: float = 2.0) -> LdapSettings:
        return LdapSettings(
            urls=(self.url,), base_dn=self.base_dn, bind_dn=self.bind_dn, bind_password=self.bind_password,
            timeout=timeout, admin_bind_dn=self.admin_dn, admin_bind_password=self.admin_password,
        )


class DebianSlapd(Slapd):
    """A fresh Debian slapd in a temp dir: cn=config from the package's own
    slapd.init.ldif and the base entry its postinst adds, for ``domain``
    (Debian takes the host's domain; ``nodomain`` without one).  The rootDN
    password is random and unknown, as after a noninteractive install.  It
    listens on ldap://127.0.0.1:<port> and on ``ldapi_url``, a private socket
    where the local root user (SASL EXTERNAL) manages cn=config."""

    def __init__(self, root: Path, domain: str = "example.org") -> None:
        self.domain = domain
        self.suffix = "dc=" + domain.replace(".", ",dc=")
        self.socket = root / "ldapi"
        self.ldapi_url = "ldapi://" + quote(str(self.socket), safe="")
        super().__init__(root)

    def _build(self) -> None:
        if not DEBIAN_INIT_LDIF.exists():
            pytest.fail(f"{DEBIAN_INIT_LDIF} is missing: Debian's slapd package is not installed")
        config_dir, data_dir = self.root / "slapd.d", self.root / "data"
        config_dir.mkdir()
        data_dir.mkdir()
        config = (DEBIAN_INIT_LDIF.read_text()
                  .replace("@SUFFIX@", self.suffix)
                  .replace("@PASSWORD@", make_ssha(os.urandom(16).hex()))
                  .replace("/var/run/slapd", str(self.root))
                  .replace("/var/lib/ldap", str(data_dir)))
        dc = self.domain.split(".")[0]
        base = (f"dn: {self.suffix}\nobjectClass: top\nobjectClass: dcObject\nobjectClass: organization\n"
                f"o: {self.domain}\ndc: {dc}\n\n")
        (self.root / "config.ldif").write_text(config)
        (self.root / "data.ldif").write_text(base)
        for base_dn, ldif in (("cn=config", "config.ldif"), (self.suffix, "data.ldif")):
            result = subprocess.run([SLAPADD, "-F", str(config_dir), "-b", base_dn, "-l", str(self.root / ldif)],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"slapadd -b {base_dn} failed:\n{result.stdout}{result.stderr}")

    def listen_urls(self) -> list[str]:
        return [f"{self.url}/", f"{self.ldapi_url}/"]

    def probe(self) -> None:
        server = ldap3.Server(self.url, get_info=ldap3.NONE, connect_timeout=2)
        with ldap3.Connection(server, auto_bind=True, receive_timeout=5):
            return

    def root_connection(self) -> ldap3.Connection:
        """Bound as the local root user over the private ldapi socket (SASL EXTERNAL)."""
        server = ldap3.Server(self.ldapi_url, get_info=ldap3.NONE, connect_timeout=2)
        return ldap3.Connection(server, authentication=ldap3.SASL, sasl_mechanism=ldap3.EXTERNAL,
                                sasl_credentials="", auto_bind=True, receive_timeout=5, raise_exceptions=False)


@pytest.fixture
def debian_slapd() -> Iterator[Callable[..., DebianSlapd]]:
    """A factory of fresh, running Debian-configured slapds (``debian_slapd(domain=...)``),
    stopped and removed after the test."""
    made: list[DebianSlapd] = []

    def make(domain: str = "example.org") -> DebianSlapd:
        root = Path(tempfile.mkdtemp(prefix="ma-debslapd-"))  # short: a socket path has <= 107 bytes
        server = DebianSlapd(root, domain)
        made.append(server)
        server.start()
        return server

    yield make
    for server in made:
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture(scope="session")
def slapd_server() -> Iterator[Slapd]:
    if not Path(SLAPD).exists():
        pytest.fail("slapd is not installed: run `make test` (it installs Debian's slapd and ldap-utils)")
    root = Path(tempfile.mkdtemp(prefix="mailappliance-slapd-"))
    server = Slapd(root)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


def has_entry(server: Slapd, dn: str) -> bool:
    """Does ``server`` hold the entry ``dn`` (asked as its rootdn)?"""
    try:
        with server.admin_connection() as conn:
            return bool(conn.search(dn, "(objectClass=*)", ldap3.BASE, attributes=[]))
    except ldap3.core.exceptions.LDAPException:
        return False


@pytest.fixture(scope="session")
def replicated_slapds() -> Iterator[tuple[Slapd, Slapd]]:
    """A syncrepl pair of private slapds: (provider, consumer); the consumer holds a copy
    of everything (the service account included) before this returns."""
    if not Path(SLAPD).exists():
        pytest.fail("slapd is not installed: run `make test` (it installs Debian's slapd and ldap-utils)")
    root = Path(tempfile.mkdtemp(prefix="mailappliance-syncrepl-"))
    (root / "provider").mkdir()
    (root / "consumer").mkdir()
    provider = Slapd(root / "provider", role="provider")
    consumer = Slapd(root / "consumer", role="consumer", provider=provider)
    try:
        provider.start()
        consumer.start()
        wait_until(lambda: has_entry(consumer, Slapd.bind_dn) and has_entry(consumer, Slapd.base_dn), 30,
                   what="the consumer's first copy of the provider")
        yield provider, consumer
    finally:
        consumer.stop()
        provider.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def slapd(slapd_server: Slapd) -> Slapd:
    """The session's slapd, running, with an empty ou=people."""
    if slapd_server.running:
        slapd_server.resume()  # harmless if it was not paused; rescues a test that failed while paused
    slapd_server.start()
    slapd_server.clear_people()
    return slapd_server


@pytest.fixture
def ldap_store(slapd: Slapd) -> Iterator[LdapStore]:
    """An LdapStore on the private slapd, with an empty ou=people, closed afterwards."""
    store = LdapStore(slapd.settings())
    yield store
    store.close()
