"""``mailappliance-admin directory setup``: make the local slapd ready for the appliance.

Run as root on the slapd host.  It talks to slapd over its local socket
(``ldapi:///``) with SASL EXTERNAL, as the local root user, whom Debian's
slapd lets manage ``cn=config``, and brings slapd to what
``[directory.ldap]`` of the config file describes, changing only what
differs (a second run prints "nothing to do"):

- the schemas cosine, inetorgperson and misc (inetLocalMailRecipient);
- the entries down to ``base_dn`` in the database that holds it;
- the read-only service account ``bind_dn`` and the admin account
  ``admin_bind_dn`` (or, if that is the database's rootDN, its password),
  with the passwords of their ``*_file`` keys, generated into those files
  (service 0640 root:<group>, admin 0600 root) when they do not exist yet;
- the ACLs, the indexes the daemon's searches use and the service account's
  size limit.

Every check that can refuse (no database for the suffix, ACLs written by
someone else, accounts outside the database) is made before the first
change, so a refusal leaves slapd as it was.  The decisions are pure
functions of what was read (``plan_*``), tested without a server.
"""

from __future__ import annotations

import argparse
import errno
import grp
import json
import os
import re
import secrets
import stat
import sys
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict
from urllib.parse import quote, unquote

import attrs
import ldap3
from ldap3.core.exceptions import LDAPException
from ldap3.utils.dn import parse_dn

from mailappliance.directory import DirectoryAdminError
from mailappliance.directory.ldif_format import parse_ldif
from mailappliance.directory.passwords import make_ssha

if TYPE_CHECKING:  # admin.py imports this module when the command runs
    from mailappliance.admin import CommandContext

DEBIAN_LDAPI = "/var/run/slapd/ldapi"  # Debian's slapd: SLAPD_SERVICES="... ldapi:///"
ROOT_IDENTITY = "gidNumber=0+uidNumber=0,cn=peercred,cn=external,cn=auth"
SCHEMAS = ("cosine", "inetorgperson", "misc")  # in load order; core is always loaded
# Ours: (cn, file in etc/slapd, its attribute): not loaded where another schema
# defines the attribute already (qmail.schema has mailForwardingAddress).
OWN_SCHEMAS = (("mailforwarding", "forwarding.ldif", "mailForwardingAddress"),
               ("mailutf8", "smtputf8.ldif", "mailUTF8Address"))  # SMTPUTF8 addresses (ldap.py)
# What the daemon searches by: login (uid, mail), recipient (mail, mailLocalAddress).
WANTED_INDEXES = {"objectclass": "objectClass", "uid": "uid", "mail": "mail",
                  "maillocaladdress": "mailLocalAddress"}
# The ACLs Debian's slapd package writes for its database (slapd.init.ldif).
DEBIAN_DEFAULT_ACLS = (
    "to attrs=userPassword by self write by anonymous auth by * none",
    "to attrs=shadowLastChange by self write by * read",
    "to * by * read",
)
SERVICE_DESCRIPTION = "read-only service account of mailappliance (the daemon binds as it)"
ADMIN_DESCRIPTION = "mailappliance-admin: manages the subscribers below the base DN"


class SetupError(DirectoryAdminError):
    """Setup cannot go on; the message says what to do (exit 1, nothing changed in slapd)."""


# -- pure decisions ---------------------------------------------------------------


def dn_key(dn: str) -> str:
    """A DN in one comparable form: attribute names and values lowercased, no spaces around , and =."""
    try:
        parts = parse_dn(dn)
    except LDAPException:
        raise SetupError(f"{dn!r} is not a DN") from None
    return ",".join(f"{name.strip().lower()}={value.strip().lower()}" for name, value, _ in parts)


def is_within(dn: str, suffix: str) -> bool:
    """``dn`` is ``suffix`` or below it."""
    key, base = dn_key(dn), dn_key(suffix)
    return key == base or key.endswith("," + base)


def parent_dn(dn: str) -> str:
    parts = parse_dn(dn)
    return ",".join(f"{name}={value}" for name, value, _ in parts[1:])


def strip_ordinal(value: str) -> str:
    """``{2}to * by * read`` -> ``to * by * read`` (cn=config numbers multi-valued attributes)."""
    return re.sub(r"^\{-?\d+\}", "", value.strip())


def _acl_form(value: str) -> str:
    """An ACL with its ordinal dropped and white space (including folding) made single spaces."""
    return " ".join(strip_ordinal(value).split())


def wanted_acls(people_dn: str, service_dn: str, admin_dn: str | None) -> list[str]:
    """The database's ACLs, in order:

    0. local root (ldapi, SASL EXTERNAL) manages everything, so this command
       and slapcat-style repairs work without any password;
    1. nobody reads a password: a subscriber may change their own, the admin
       account set one, anyone bind (that is how the daemon checks a password);
    2. below ``people_dn``: the admin account writes, the service account reads,
       a subscriber reads their own entry, nobody else anything;
    3. everywhere else: only one's own entry.
    ``admin_dn`` is None when the admin is the rootDN (which no ACL binds)."""
    admin_write = f'by dn.exact="{admin_dn}" =w ' if admin_dn else ""
    admin_people = f'by dn.exact="{admin_dn}" write ' if admin_dn else ""
    return [
        f"to * by dn.exact={ROOT_IDENTITY} manage by * break",
        f"to attrs=userPassword {admin_write}by self =w by anonymous auth by * none",
        f'to dn.subtree="{people_dn}" {admin_people}by dn.exact="{service_dn}" read by self read by * none',
        "to * by self read by * none",
    ]


def plan_acls(current: list[str], wanted: list[str], service_dn: str) -> str:
    """``"ok"`` (already ours), ``"replace"`` (none, Debian's defaults, or an
    earlier version of ours: they name the service account) or ``"foreign"``
    (someone wrote their own: kept unless the admin says --replace-acls)."""
    have = [_acl_form(v) for v in current]
    if have == [_acl_form(v) for v in wanted]:
        return "ok"
    if not have or have == list(DEBIAN_DEFAULT_ACLS):
        return "replace"
    if any(dn_key(service_dn) in _dns_in(acl) for acl in have):
        return "replace"
    return "foreign"


def _dns_in(acl: str) -> set[str]:
    found = set()
    for text in re.findall(r'dn(?:\.[a-z]+)?="([^"]+)"', acl):
        try:
            found.add(dn_key(text))
        except SetupError:
            continue
    return found


def _parse_index(value: str) -> tuple[list[str], list[str]]:
    """``"cn,uid eq,sub"`` -> (["cn", "uid"], ["eq", "sub"]); no types: the default ones."""
    fields = value.split()
    names = [n for n in fields[0].split(",") if n] if fields else []
    types = [t.lower().replace("equality", "eq") for t in (fields[1].split(",") if len(fields) > 1 else [])]
    return names, types


def plan_indexes(current: list[str]) -> tuple[list[str], list[str]]:
    """(values to delete, values to add) so every attribute in WANTED_INDEXES has
    an equality index.  slapd refuses a second value naming an attribute that
    already has one ("duplicate index definition"), so an attribute indexed
    without ``eq`` is taken out of its value, which is written back without it."""
    delete: list[str] = []
    add: list[str] = []
    missing = dict(WANTED_INDEXES)
    for value in current:
        names, types = _parse_index(strip_ordinal(value))
        lowered = [n.lower() for n in names]
        for name in lowered:
            if name in missing and "eq" in types:
                del missing[name]
        lacking = [n for n, low in zip(names, lowered, strict=True) if low in missing and "eq" not in types]
        if not lacking:
            continue
        delete.append(value)
        kept = [n for n in names if n not in lacking]
        if kept:
            add.append(f"{','.join(kept)} {','.join(types)}".strip())
        for name in lacking:
            add.append(f"{name} {','.join(sorted(set(types or ['eq']) | {'eq'}))}")
            missing.pop(name.lower(), None)
    together = [missing[key] for key in WANTED_INDEXES if key in missing]
    if together:
        add.append(f"{','.join(together)} eq")
    return delete, add


def plan_limits(current: list[str], service_dn: str) -> tuple[list[str], list[str]]:
    """(values to delete, values to add) so the service account has no size limit:
    OpenLDAP answers at most 500 entries per search by default (paged ones too)."""
    wanted = f'dn.exact="{service_dn}" size=unlimited'
    mine = [value for value in current if dn_key(service_dn) in _dns_in(strip_ordinal(value))]
    if len(mine) == 1:
        limits = " ".join(re.sub(r'^\s*\S+?="[^"]*"', "", strip_ordinal(mine[0])).split())
        if limits in ("size=unlimited", "size.soft=unlimited size.hard=unlimited"):
            return [], []
    return mine, [wanted]


def container_entry(dn: str) -> tuple[list[str], dict[str, str]]:
    """Object classes and attributes for an entry that only holds others (suffix, OU)."""
    name, value, _ = parse_dn(dn)[0]
    kind = name.strip().lower()
    if kind == "dc":
        return ["top", "dcObject", "organization"], {"dc": value, "o": value}
    if kind == "o":
        return ["top", "organization"], {"o": value}
    if kind == "ou":
        return ["top", "organizationalUnit"], {"ou": value}
    raise SetupError(f"cannot create {dn}: this command makes dc=, o= and ou= entries only; create it yourself")


def account_entry(dn: str, password: str, description: str) -> tuple[list[str], dict[str, str]]:
    """A bind-only account: simpleSecurityObject + organizationalRole, named cn=."""
    name, value, _ = parse_dn(dn)[0]
    if name.strip().lower() != "cn":
        raise SetupError(f"{dn}: the accounts this command creates are named cn=...; use e.g. cn=mailappliance,...")
    return (["top", "simpleSecurityObject", "organizationalRole"],
            {"cn": value, "description": description, "userPassword": make_ssha(password)})


@attrs.frozen
class Database:
    """One database of slapd's cn=config that holds entries."""

    config_dn: str  # olcDatabase={1}mdb,cn=config
    suffix: str
    root_dn: str
    directory: str  # olcDbDirectory ("" when not a file database)
    acls: tuple[str, ...]
    indexes: tuple[str, ...]
    limits: tuple[str, ...]


def choose_database(databases: Iterable[Database], base_dn: str) -> Database | None:
    """The database whose suffix holds ``base_dn`` (the deepest, if several do)."""
    holding = [d for d in databases if is_within(base_dn, d.suffix)]
    return max(holding, key=lambda d: len(dn_key(d.suffix)), default=None)


def suffix_of(base_dn: str) -> str:
    """The suffix a database for ``base_dn`` would have: its dc= components (dc=example,dc=org),
    else everything above its first RDN."""
    parts = parse_dn(base_dn)
    dcs = [f"{n}={v}" for n, v, _ in parts if n.strip().lower() == "dc"]
    if dcs and len(dcs) == len(parts[len(parts) - len(dcs):]):
        return ",".join(dcs)
    return ",".join(f"{n}={v}" for n, v, _ in parts[1:]) or base_dn


def explain_no_database(base_dn: str, config_file: Path, suffixes: list[str],
                        command: str = "mailappliance-admin directory setup") -> str:
    """What to do when slapd serves other suffixes (Debian's package names its
    database after the host's domain, dc=nodomain without one)."""
    wanted = suffix_of(base_dn)
    domain = ".".join(v for n, v, _ in parse_dn(wanted) if n.strip().lower() == "dc")
    have = suffixes[0] if suffixes else ""
    lines = [
        f"slapd has no database for {wanted} (directory.ldap.base_dn = \"{base_dn}\" in {config_file}); "
        f"it serves: {', '.join(suffixes) or 'nothing'}.",
        "Debian's slapd package names its database after this host's domain. Choose one:",
        f"  1. let this command add a database for {wanted} next to the existing one:",
        f"       {command} --create-database",
    ]
    if domain:
        lines += [
            f"  2. or rebuild slapd's configuration for {domain} (this moves the existing database to "
            "/var/backups and drops schemas loaded since; this command loads them again):",
            f"       echo 'slapd slapd/domain string {domain}' | debconf-set-selections",
            "       dpkg-reconfigure -f noninteractive slapd",
            f"       {command}",
        ]
    if have:
        lines += [
            f"  3. or use {have} as it is: in {config_file} set",
            f"       base_dn = \"ou=people,{have}\"",
            f"       bind_dn = \"cn=mailappliance,{have}\"",
            f"       admin_bind_dn = \"cn=mailappliance-admin,{have}\"",
            "     and run this command again.",
        ]
    return "\n".join(lines)


# -- the config file, as far as setup needs it --------------------------------------


@attrs.frozen
class SecretFile:
    """A password the config names by file, and who may read that file."""

    key: str  # directory.ldap.bind_password_file
    path: Path
    mode: int
    group: int  # gid


@attrs.frozen
class SetupTarget:
    """What ``[directory.ldap]`` asks for."""

    config_file: Path
    base_dn: str
    service_dn: str
    admin_dn: str
    service_password: str | None  # inline in the config, else read from / generated into the file
    admin_password: str | None
    service_file: SecretFile | None
    admin_file: SecretFile | None


def read_target(config_file: Path, group: str) -> SetupTarget:
    """``[directory.ldap]`` of the raw TOML (the secret files may not exist yet, so
    the config cannot be loaded as the daemon loads it before this command ran)."""
    try:
        with config_file.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise SetupError(f"{config_file} does not exist; see etc/mailappliance.toml for an example") from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise SetupError(f"{config_file}: cannot be read: {e}") from None
    directory = data.get("directory", {})
    ldap = directory.get("ldap") if isinstance(directory, dict) else None
    example = ('[directory]\nbackend = "ldap"\n\n[directory.ldap]\nurls = ["ldap://127.0.0.1:389"]\n'
               'base_dn = "ou=people,dc=example,dc=org"\nbind_dn = "cn=mailappliance,dc=example,dc=org"\n'
               'bind_password_file = "/etc/mailappliance/ldap-password"\n'
               'admin_bind_dn = "cn=mailappliance-admin,dc=example,dc=org"\n'
               'admin_bind_password_file = "/etc/mailappliance/ldap-admin-password"')
    if directory.get("backend") != "ldap" or not isinstance(ldap, dict):
        raise SetupError(f"{config_file}: directory.backend is not \"ldap\" or [directory.ldap] is missing; "
                         f"this command sets up slapd for a config like:\n{example}")
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        raise SetupError(f"group {group!r} does not exist: create the daemon's user and group first "
                         "(adduser --system --group --home /var/lib/mailappliance mailappliance) "
                         "or name the daemon's group with --group") from None

    def text(key: str) -> str:
        value = ldap.get(key, "")
        if not isinstance(value, str) or not value:
            raise SetupError(f"{config_file}: directory.ldap.{key} is required for directory setup, e.g.\n{example}")
        return value

    def secret(key: str, mode: int, group_id: int) -> tuple[str | None, SecretFile | None]:
        inline, file = ldap.get(key, ""), ldap.get(f"{key}_file", "")
        if isinstance(file, str) and file:
            path = Path(file).expanduser()
            path = path if path.is_absolute() else (config_file.parent / path).resolve()
            return None, SecretFile(f"directory.ldap.{key}_file", path, mode, group_id)
        if isinstance(inline, str) and inline:
            return inline, None
        raise SetupError(f"{config_file}: set directory.ldap.{key}_file (this command writes a new password "
                         f"into it), e.g.\n{example}")

    service_password, service_file = secret("bind_password", 0o640, gid)
    admin_password, admin_file = secret("admin_bind_password", 0o600, 0)
    target = SetupTarget(config_file, text("base_dn"), text("bind_dn"), text("admin_bind_dn"),
                         service_password, admin_password, service_file, admin_file)
    for key, dn in (("base_dn", target.base_dn), ("bind_dn", target.service_dn),
                    ("admin_bind_dn", target.admin_dn)):
        try:
            dn_key(dn)
        except SetupError:
            raise SetupError(f"{config_file}: directory.ldap.{key}: {dn!r} is not a DN") from None
    if dn_key(target.service_dn) == dn_key(target.admin_dn):
        raise SetupError(f"{config_file}: bind_dn and admin_bind_dn must be two accounts: "
                         "the daemon's may only read")
    return target


def ensure_secret_file(secret: SecretFile) -> tuple[str, list[str]]:
    """The password in ``secret.path`` (a new random one written there if the file
    does not exist), with owner root, the group and mode set; returns what changed.

    Run as root, so the file is opened without following a symbolic link and
    must be a regular file owned by root: otherwise whoever could plant it
    would choose the admin's password, or have us chown a file of root's
    (a link to /etc/shadow) to the daemon's group."""
    path, created = secret.path, False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        os.write(fd, secrets.token_urlsafe(24).encode())  # no newline: ldapadd -y uses every byte
        os.fsync(fd)
        os.lseek(fd, 0, os.SEEK_SET)
        created = True
    except OSError as e:
        why = "it is a symbolic link" if e.errno == errno.ELOOP else e.strerror
        raise SetupError(f"cannot use {path} ({secret.key}): {why}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SetupError(f"{path} ({secret.key}) is not a regular file")
        if info.st_uid != 0:
            raise SetupError(f"{path} ({secret.key}) belongs to uid {info.st_uid}, not root: whoever wrote it "
                             "would choose this password; check it, then chown root it (or remove it)")
        password = os.read(fd, 4096).decode("utf-8", "replace").strip()
        if not password:
            raise SetupError(f"{path} ({secret.key}) is empty: remove it and this command writes a new password")
        wrong = info.st_gid != secret.group or info.st_mode & 0o7777 != secret.mode
        if wrong:
            os.fchown(fd, 0, secret.group)
            os.fchmod(fd, secret.mode)
    finally:
        os.close(fd)
    owner = f"root:{grp.getgrgid(secret.group).gr_name} {secret.mode:04o}"
    if created:
        return password, [f"wrote a new password into {path} ({secret.key}), {owner}"]
    return password, [f"{path}: now {owner}"] if wrong else []


# -- talking to slapd -------------------------------------------------------------


def ldapi_url(url: str) -> str:
    """``ldapi:///`` -> Debian's socket; ``ldapi://%2Fpath`` and a plain path as given (ldap3
    needs the socket path in the URL: it cannot know slapd's compiled-in default)."""
    if url.startswith("/"):
        return "ldapi://" + quote(url, safe="")
    if not url.lower().startswith("ldapi://"):
        raise SetupError(f"--ldapi: expected ldapi:/// or ldapi://%2Fpath%2Fto%2Fsocket, got {url!r}")
    path = unquote(url[len("ldapi://"):].rstrip("/"))
    return "ldapi://" + quote(path or DEBIAN_LDAPI, safe="")


def _socket_path(url: str) -> str:
    return unquote(url[len("ldapi://"):])


def _server(url: str) -> ldap3.Server:
    return ldap3.Server(url, get_info=ldap3.NONE, connect_timeout=5)


def connect_as_root(url: str) -> ldap3.Connection:
    """A connection bound with SASL EXTERNAL over ldapi (slapd sees our uid and gid)."""
    path = _socket_path(url)
    if not os.path.exists(path):
        raise SetupError(
            f"no slapd socket at {path}: install and start slapd (apt-get install slapd; "
            "systemctl start slapd) with ldapi:/// in SLAPD_SERVICES of /etc/default/slapd, "
            "or give the socket with --ldapi")
    try:
        conn = ldap3.Connection(_server(url), authentication=ldap3.SASL, sasl_mechanism=ldap3.EXTERNAL,
                                sasl_credentials="", receive_timeout=30, raise_exceptions=False)
        if not conn.bind():
            raise SetupError(f"SASL EXTERNAL bind over {path} refused: {conn.result.get('description')}")
        identity = conn.extend.standard.who_am_i() or ""
    except LDAPException as e:
        raise SetupError(f"cannot talk to slapd over {path}: {e}") from None
    if dn_key(identity.removeprefix("dn:")) != dn_key(ROOT_IDENTITY):
        conn.unbind()
        raise SetupError(f"slapd sees us as {identity or 'anonymous'}, not as the local root user: "
                         "run this command as root on the slapd host")
    return conn


def _check(conn: ldap3.Connection, what: str) -> None:
    if conn.result.get("result") != 0:
        raise SetupError(f"{what}: {conn.result.get('description')} {conn.result.get('message', '')}".strip())


class SearchEntry(TypedDict, total=False):
    """One item of ldap3's ``Connection.response`` (the fields we read)."""

    type: str  # "searchResEntry" for an entry
    dn: str
    raw_attributes: dict[str, list[bytes]]


def _response(conn: ldap3.Connection) -> list[SearchEntry]:
    """What the search that just succeeded returned (ldap3 sets it for every answered search)."""
    response: list[SearchEntry] | None = conn.response
    assert response is not None
    return response


def _texts(raw: dict[str, list[bytes]], name: str) -> list[str]:
    for key, values in raw.items():
        if key.lower() == name.lower():
            return [v.decode("utf-8") for v in values]
    return []


def read_databases(conn: ldap3.Connection) -> list[Database]:
    conn.search("cn=config", "(olcSuffix=*)", ldap3.LEVEL,
                attributes=["olcSuffix", "olcRootDN", "olcDbDirectory", "olcAccess", "olcDbIndex", "olcLimits"])
    if conn.result.get("result") != 0:
        raise SetupError(
            f"cannot read cn=config as root: {conn.result.get('description')}; slapd's config database needs "
            f"'olcAccess: to * by dn.exact={ROOT_IDENTITY} manage by * break' (Debian's default)")
    found = []
    for entry in _response(conn):
        if entry.get("type") != "searchResEntry":
            continue
        raw = entry["raw_attributes"]
        for suffix in _texts(raw, "olcSuffix"):
            found.append(Database(
                entry["dn"], suffix, (_texts(raw, "olcRootDN") or [""])[0],
                (_texts(raw, "olcDbDirectory") or [""])[0],
                tuple(sorted(_texts(raw, "olcAccess"), key=_ordinal)), tuple(_texts(raw, "olcDbIndex")),
                tuple(_texts(raw, "olcLimits"))))
    return found


def _ordinal(value: str) -> int:
    match = re.match(r"^\{(-?\d+)\}", value)
    return int(match.group(1)) if match else 0


def loaded_schemas(conn: ldap3.Connection) -> tuple[set[str], str]:
    """The names of the loaded schemas, and all their attribute type definitions as one text."""
    conn.search("cn=schema,cn=config", "(objectClass=olcSchemaConfig)", ldap3.LEVEL,
                attributes=["cn", "olcAttributeTypes"])
    _check(conn, "reading cn=schema,cn=config")
    entries = [e["raw_attributes"] for e in _response(conn) if e.get("type") == "searchResEntry"]
    names = {strip_ordinal(name).lower() for raw in entries for name in _texts(raw, "cn")}
    return names, "\n".join(t for raw in entries for t in _texts(raw, "olcAttributeTypes"))


def own_schema_file(filename: str) -> Path | None:
    """One of our schema files (etc/slapd/): installed with the package under
    <prefix>/share/mailappliance/slapd, or next to the package in a checkout."""
    for directory in (Path(sys.prefix) / "share" / "mailappliance" / "slapd",
                      Path(__file__).resolve().parent.parent / "etc" / "slapd"):
        if (directory / filename).is_file():
            return directory / filename
    return None


FRONTEND = "olcDatabase={-1}frontend,cn=config"


def plan_argon2(conn: ldap3.Connection) -> tuple[str, bool] | None:
    """(module list DN to add ``argon2`` to, or "" if loaded; whether olcPasswordHash is
    unset) when slapd's argon2 module exists; None without it (hashes stay slapd's default)."""
    conn.search("cn=config", "(objectClass=olcModuleList)", ldap3.LEVEL,
                attributes=["olcModuleLoad", "olcModulePath"])
    _check(conn, "reading slapd's module lists")
    lists = [e for e in _response(conn) if e.get("type") == "searchResEntry"]
    loaded = any(re.sub(r"\.(so|la)$", "", strip_ordinal(v)).endswith("argon2")
                 for e in lists for v in _texts(e["raw_attributes"], "olcModuleLoad"))
    target = ""
    if not loaded:
        with_path = [e for e in lists if _texts(e["raw_attributes"], "olcModulePath")]
        if not with_path:
            return None
        directory = _texts(with_path[0]["raw_attributes"], "olcModulePath")[0]
        if not (Path(directory) / "argon2.so").exists():
            return None
        target = with_path[0]["dn"]
    conn.search(FRONTEND, "(objectClass=*)", ldap3.BASE, attributes=["olcPasswordHash"])
    _check(conn, f"reading {FRONTEND}")
    unset = not _texts(_response(conn)[0]["raw_attributes"], "olcPasswordHash")
    return (target, unset) if target or unset else None


def _exists(conn: ldap3.Connection, dn: str) -> bool:
    conn.search(dn, "(objectClass=*)", ldap3.BASE, attributes=["1.1"])
    code = conn.result.get("result")
    if code == 32:
        return False
    _check(conn, f"looking up {dn}")
    return True


def _binds(url: str, dn: str, password: str) -> bool:
    conn = ldap3.Connection(_server(url), dn, password, receive_timeout=10, raise_exceptions=False)
    try:
        return bool(conn.bind())
    finally:
        conn.unbind()


# -- the run ----------------------------------------------------------------------


@attrs.frozen
class SetupOptions:
    ldapi: str = "ldapi:///"
    group: str = "mailappliance"
    schema_dir: Path = Path("/etc/ldap/schema")
    replace_acls: bool = False
    create_database: bool = False


def run_setup(config_file: Path, options: SetupOptions) -> list[str]:
    """Bring slapd (and the password files) to what the config asks for; the changes made."""
    if os.geteuid() != 0:
        raise SetupError("directory setup talks to slapd as the local root user and writes "
                         "root-owned password files: run it as root")
    target = read_target(config_file, options.group)
    url = ldapi_url(options.ldapi)
    conn = connect_as_root(url)
    try:
        return _apply(conn, url, target, options)
    finally:
        conn.unbind()


def _apply(conn: ldap3.Connection, url: str, target: SetupTarget, options: SetupOptions) -> list[str]:
    changes: list[str] = []
    # -- checks first: nothing is changed when one refuses
    databases = read_databases(conn)
    database = choose_database(databases, target.base_dn)
    new_database = None
    if database is None:
        if not options.create_database:
            command = "mailappliance-admin directory setup"
            if target.config_file != Path("/etc/mailappliance/mailappliance.toml"):
                command += f" -c {target.config_file}"
            raise SetupError(explain_no_database(target.base_dn, target.config_file,
                                                 [d.suffix for d in databases], command))
        new_database = _new_database_plan(databases, suffix_of(target.base_dn))
    suffix = database.suffix if database else suffix_of(target.base_dn)
    root_dn = database.root_dn if database else ""
    admin_is_root = bool(root_dn) and dn_key(root_dn) == dn_key(target.admin_dn)
    for key, dn in (("bind_dn", target.service_dn), ("admin_bind_dn", target.admin_dn)):
        if not is_within(dn, suffix):
            example = "mailappliance" if key == "bind_dn" else "mailappliance-admin"
            raise SetupError(f"{target.config_file}: directory.ldap.{key} = \"{dn}\" is not inside {suffix}, "
                             f"the database of base_dn; use e.g. \"cn={example},{suffix}\"")
    for dn in (target.service_dn, target.admin_dn):
        if not admin_is_root or dn_key(dn) != dn_key(target.admin_dn):
            account_entry(dn, "x", "")  # refuses a name it cannot create
    acls = wanted_acls(target.base_dn, target.service_dn, None if admin_is_root else target.admin_dn)
    acl_plan = plan_acls(list(database.acls), acls, target.service_dn) if database else "replace"
    if acl_plan == "foreign" and not options.replace_acls:
        assert database is not None
        raise SetupError(
            f"{database.config_dn} has ACLs this command did not write:\n"
            + "".join(f"  olcAccess: {a}\n" for a in database.acls)
            + "They are kept. Run again with --replace-acls to use the appliance's instead "
            "(save the lines above if you need them), or add these yourself:\n"
            + "".join(f"  olcAccess: {{{i}}}{a}\n" for i, a in enumerate(acls)).rstrip())
    loaded, attribute_types = loaded_schemas(conn)
    missing = [(name, options.schema_dir / f"{name}.ldif") for name in SCHEMAS if name not in loaded]
    for name, path in missing:
        if not path.is_file():
            raise SetupError(f"schema {name} is not loaded and {path} does not exist "
                             "(Debian's slapd ships it; or give --schema-dir)")
    for name, filename, attribute in OWN_SCHEMAS:  # optional features: loaded when we have the file
        own = own_schema_file(filename)
        if own and name not in loaded and f"'{attribute.lower()}'" not in attribute_types.lower():
            missing.append((name, own))
    argon2 = plan_argon2(conn)

    # -- then the changes, each printed
    service_password, admin_password = target.service_password, target.admin_password
    if target.service_file is not None:
        service_password, written = ensure_secret_file(target.service_file)
        changes += written
    if target.admin_file is not None:
        admin_password, written = ensure_secret_file(target.admin_file)
        changes += written
    assert service_password is not None and admin_password is not None

    for name, path in missing:
        for entry in parse_ldif(path.read_text(encoding="utf-8")):
            schema_attributes: dict[str, list[str | bytes]] = {}
            for attribute, value in entry.attributes:
                schema_attributes.setdefault(attribute, []).append(value)
            conn.add(entry.dn, attributes=schema_attributes)
            _check(conn, f"loading schema {name} from {path}")
        changes.append(f"loaded schema {name} ({path})")

    if argon2 is not None:
        module_dn, hash_missing = argon2
        if module_dn:
            conn.modify(module_dn, {"olcModuleLoad": [(ldap3.MODIFY_ADD, ["argon2"])]})
            _check(conn, f"loading the argon2 module into {module_dn}")
            changes.append(f"loaded slapd's argon2 module ({module_dn}): {{ARGON2}} hashes, as the LDIF "
                           "directory writes them, now work for binds")
        if hash_missing:
            conn.modify(FRONTEND, {"olcPasswordHash": [(ldap3.MODIFY_ADD, ["{ARGON2}"])]})
            _check(conn, f"setting olcPasswordHash of {FRONTEND}")
            changes.append(f"olcPasswordHash: {{ARGON2}} ({FRONTEND}): passwords set from now on are Argon2 hashes")

    if new_database is not None:
        database = _create_database(conn, new_database)
        changes.append(f"created database {database.config_dn} for {database.suffix} in {database.directory}")
    assert database is not None

    if acl_plan != "ok":
        conn.modify(database.config_dn, {"olcAccess": [(ldap3.MODIFY_REPLACE,
                                                         [f"{{{i}}}{a}" for i, a in enumerate(acls)])]})
        _check(conn, f"setting the ACLs of {database.config_dn}")
        before = "; ".join(strip_ordinal(a) for a in database.acls) or "none"
        changes.append(f"set the ACLs of {database.config_dn} (before: {before})")

    delete, add = plan_indexes(list(database.indexes))
    if delete or add:
        operations = ([(ldap3.MODIFY_DELETE, delete)] if delete else []) + [(ldap3.MODIFY_ADD, add)]
        for operation in operations:  # one attribute, two operations: ldap3 takes them in turn
            conn.modify(database.config_dn, {"olcDbIndex": [operation]})
            _check(conn, f"changing the indexes of {database.config_dn}")
        changes.append(f"indexes of {database.config_dn}: added olcDbIndex: {'; '.join(add)}"
                       + (f" (replacing {'; '.join(delete)})" if delete else ""))

    delete, add = plan_limits(list(database.limits), target.service_dn)
    if delete or add:
        if delete:
            conn.modify(database.config_dn, {"olcLimits": [(ldap3.MODIFY_DELETE, delete)]})
            _check(conn, f"changing the limits of {database.config_dn}")
        conn.modify(database.config_dn, {"olcLimits": [(ldap3.MODIFY_ADD, add)]})
        _check(conn, f"changing the limits of {database.config_dn}")
        changes.append(f"limits of {database.config_dn}: olcLimits: {add[0]} (OpenLDAP's default: 500 entries)")

    containers = _ancestors_below(target.base_dn, database.suffix, include_self=True)
    for dn in (target.service_dn, target.admin_dn):
        containers += [c for c in _ancestors_below(dn, database.suffix, include_self=False) if c not in containers]
    for dn in containers:
        if not _exists(conn, dn):
            classes, attributes = container_entry(dn)
            conn.add(dn, classes, attributes)
            _check(conn, f"adding {dn}")
            changes.append(f"added {dn}")

    accounts = [(target.service_dn, service_password, SERVICE_DESCRIPTION, target.service_file)]
    if admin_is_root:
        if not _binds(url, target.admin_dn, admin_password):
            conn.modify(database.config_dn, {"olcRootPW": [(ldap3.MODIFY_REPLACE, [make_ssha(admin_password)])]})
            _check(conn, f"setting olcRootPW of {database.config_dn}")
            changes.append(f"set the password of the rootDN {target.admin_dn} (olcRootPW) to the one in "
                           f"{target.admin_file.path if target.admin_file else 'the config'}")
    else:
        accounts.append((target.admin_dn, admin_password, ADMIN_DESCRIPTION, target.admin_file))
    for dn, password, description, file in accounts:
        where = str(file.path) if file else "the config"
        if not _exists(conn, dn):
            classes, attributes = account_entry(dn, password, description)
            conn.add(dn, classes, attributes)
            _check(conn, f"adding {dn}")
            changes.append(f"added {dn} with the password in {where}")
        elif not _binds(url, dn, password):
            conn.modify(dn, {"userPassword": [(ldap3.MODIFY_REPLACE, [make_ssha(password)])]})
            _check(conn, f"setting the password of {dn}")
            changes.append(f"set the password of {dn} to the one in {where}")
    for dn, password in ((target.service_dn, service_password), (target.admin_dn, admin_password)):
        if not _binds(url, dn, password):
            raise SetupError(f"{dn} still cannot bind with its password: check slapd's log")
    return changes


def _ancestors_below(dn: str, suffix: str, include_self: bool) -> list[str]:
    """The entries from ``suffix`` down to ``dn`` (``dn`` itself if include_self), top first."""
    parts = parse_dn(dn)
    chain = [",".join(f"{n}={v}" for n, v, _ in parts[i:]) for i in range(len(parts))]
    if not include_self:
        chain = chain[1:]
    return [c for c in reversed(chain) if is_within(c, suffix)]


@attrs.frozen
class NewDatabase:
    suffix: str
    directory: Path
    owner: tuple[int, int]


def _new_database_plan(databases: list[Database], suffix: str) -> NewDatabase:
    """Where a new MDB database goes: a directory next to (inside) the existing one's, same owner."""
    existing = next((d for d in databases if d.directory), None)
    if existing is None:
        raise SetupError(f"slapd has no file database to put one for {suffix} next to; create it yourself")
    slug = ".".join(v for _, v, _ in parse_dn(suffix)) or "mailappliance"
    directory = Path(existing.directory) / re.sub(r"[^A-Za-z0-9.-]", "_", slug)
    info = Path(existing.directory).stat()
    return NewDatabase(suffix, directory, (info.st_uid, info.st_gid))


def _create_database(conn: ldap3.Connection, plan: NewDatabase) -> Database:
    plan.directory.mkdir(mode=0o700, exist_ok=True)
    os.chown(plan.directory, *plan.owner)
    conn.add("olcDatabase=mdb,cn=config", ["olcDatabaseConfig", "olcMdbConfig"], {
        "olcDatabase": "mdb", "olcSuffix": plan.suffix, "olcDbDirectory": str(plan.directory),
        "olcDbMaxSize": "1073741824"})
    _check(conn, f"creating a database for {plan.suffix}")
    created = [d for d in read_databases(conn) if dn_key(d.suffix) == dn_key(plan.suffix)]
    if not created:
        raise SetupError(f"the database for {plan.suffix} was created but cannot be read back")
    return created[0]


def cmd_directory_setup(ctx: CommandContext, args: argparse.Namespace) -> int:
    options = SetupOptions(ldapi=args.ldapi, group=args.group, schema_dir=Path(args.schema_dir),
                           replace_acls=args.replace_acls, create_database=args.create_database)
    assert ctx.config_path is not None  # main() always says which config file
    changes = run_setup(Path(ctx.config_path).expanduser().resolve(), options)
    if ctx.as_json:
        print(json.dumps({"ok": True, "changes": changes}))
    elif changes:
        for change in changes:
            print(change)
        print(f"directory ready: {len(changes)} change(s)")
    else:
        print("nothing to do: slapd and the password files are as the config asks")
    return 0
