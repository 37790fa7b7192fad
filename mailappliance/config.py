"""TOML configuration -> typed, validated settings.

Every error names the file, the key and what would be valid, in one line, so
the daemon can stop with that line instead of a traceback.  Relative paths are
resolved against the directory that holds the config file; the state the
daemon writes (Maildirs, spool, a generated certificate) defaults to
``/var/lib/mailappliance`` (the systemd unit's ``StateDirectory=``).

Secrets: ``*_file`` keys are read when the config is loaded (as root, before
twistd drops privileges); a reload after the drop that cannot read an
unchanged file keeps the value read before (``SecretFiles``).  The LDAP
admin password is read only when it is used (the admin tool): the daemon
never needs it.
"""

from __future__ import annotations

import socket
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import attrs

from mailappliance.address_settings import AddressSettings, ForwardingSettings, parse_addresses, parse_forwarding
from mailappliance.addresses import normalize_domain
from mailappliance.directory import InvalidAddress
from mailappliance.msgauth.settings import (
    DkimSettings,
    FilterSettings,
    MsgAuthSettings,
    parse_dkim,
    parse_filter,
    parse_msgauth,
)
from mailappliance.screening_lists import ScreeningFileError, load_lists
from mailappliance.settings import (
    DEFAULT_BYTES_PER_HOUR,
    DEFAULT_MAILBOX_QUOTA,
    SYNC_METHODS,
    LimitSettings,
    Relay,
    StateSettings,
    ThrottleSettings,
    parse_size,
    parse_url,
    syncfs_available,
)
from mailappliance.worker_settings import parse_workers

ROLES = ("mx", "submission", "submissions", "pop3", "pop3s", "autoconfig", "autoconfigs", "metrics")
SMTP_ROLES = ("mx", "submission", "submissions")
POP3_ROLES = ("pop3", "pop3s")
WEB_ROLES = ("autoconfig", "autoconfigs", "metrics")

STATE_DIR = Path("/var/lib/mailappliance")  # systemd: StateDirectory=mailappliance
LOG_DIR = Path("/var/log/mailappliance")  # systemd: LogsDirectory=mailappliance
DEFAULT_CONFIG = Path("/etc/mailappliance/mailappliance.toml")
CONFIG_ENVIRONMENT = "MAILAPPLIANCE_CONFIG"


def default_config_path() -> str:
    """The config file when none is named: $MAILAPPLIANCE_CONFIG, else /etc/mailappliance/mailappliance.toml."""
    import os

    return os.environ.get(CONFIG_ENVIRONMENT) or str(DEFAULT_CONFIG)

T = TypeVar("T")


class ConfigError(Exception):
    """A configuration problem, worded for the admin: file, key, what is valid."""

    def __init__(self, file: Path | str, key: str, problem: str) -> None:
        super().__init__(f"{file}: {key}: {problem}")
        self.file = str(file)
        self.key = key
        self.problem = problem


class StartupError(ConfigError):
    """What the config names cannot be used at start (a path not writable, a file not
    readable): the same one line, naming the file and key."""


@attrs.frozen
class ListenerSettings:
    """One listening socket and the role it plays."""

    name: str
    role: str
    address: str
    port: int
    allow_plaintext_auth: bool = False
    # Concurrent connections this listener may hold. SMTP and POP3 listeners
    # always have one after parsing (their share of limits.max_connections, see
    # _connection_shares); HTTP listeners: 0 unless set (their own default applies).
    max_connections: int = 0
    # SMTP AUTH on this listener; None: the role's default (submission yes, MX no:
    # port 25 is no door for password guessing unless the admin opens it).
    auth: bool | None = None

    @property
    def is_smtp(self) -> bool:
        return self.role in SMTP_ROLES

    @property
    def implicit_tls(self) -> bool:
        """465 and 995 style: TLS from the first byte (RFC 8314)."""
        return self.role in ("submissions", "pop3s", "autoconfigs")

    @property
    def offers_auth(self) -> bool:
        """SMTP AUTH is offered here (inside TLS, or in clear where allowed)."""
        return self.auth if self.auth is not None else self.role != "mx"

    @property
    def requires_auth(self) -> bool:
        """Submission listeners take mail only from authenticated subscribers."""
        return self.role in ("submission", "submissions")


@attrs.frozen
class LdapSettings:
    """How to reach the LDAP directory (see docs/admin.md for the schema)."""

    urls: tuple[str, ...] = ("ldap://127.0.0.1:389",)
    base_dn: str = "ou=people,dc=example,dc=org"
    bind_dn: str = ""
    bind_password: str = ""
    login_filter: str = "(&(objectClass=inetOrgPerson)(|(uid={login})(mail={login})))"
    address_filter: str = (
        "(&(objectClass=inetOrgPerson)(|(mail={address})(mailLocalAddress={address})))"
    )
    timeout: float = 5.0
    admin_bind_dn: str = ""
    admin_bind_password: str = ""  # given inline; see admin_password()
    # Read only when the admin tool needs it, never by the daemon (it may be root-only 0600).
    admin_bind_password_file: Path | None = None

    def admin_password(self) -> str:
        """The admin bind password: inline, or read from its file now (ConfigError naming the key)."""
        if self.admin_bind_password_file is None:
            return self.admin_bind_password
        path = self.admin_bind_password_file
        try:
            return path.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise ConfigError(path, "directory.ldap.admin_bind_password_file",
                              f"cannot read {path}: {e.strerror}") from None


@attrs.frozen
class TLSSettings:
    """Server certificate for every listener, and the CA for client certificates."""

    certificate: Path = STATE_DIR / "tls" / "server.pem"
    private_key: Path = STATE_DIR / "tls" / "server.key"
    generate_self_signed: bool = True
    client_ca: Path | None = None
    client_ca_key: Path | None = None


@attrs.frozen
class SMTPOptions:
    """Hostile-input defences of the SMTP listeners (docs/admin.md, screening section)."""

    normalize_line_endings: bool = False
    max_line_length: int = 998
    max_recipients: int = 1000
    max_errors: int = 20
    command_time_limit: float = 120
    data_time_limit: float = 1800
    # NOTIFY=SUCCESS honoured for "authenticated" senders only, "all", or "none" (queue/notices.py)
    dsn_success_notices: str = "authenticated"


@attrs.frozen
class QueueSettings:
    """Outbound delivery: routing, TLS policy, retries."""

    resolver: str = ""
    smtp_port: int = 25
    smarthost: str = ""
    smarthost_user: str = ""
    smarthost_password: str = ""
    transports: tuple[tuple[str, str], ...] = ()
    verify_domains: tuple[str, ...] = ()
    ca_file: Path | None = None
    retry_schedule: tuple[float, ...] = (60, 300, 900, 1800, 3600, 7200, 14400)
    max_age: float = 5 * 86400
    delay_warning_after: float = 0
    concurrency: int = 20
    per_destination: int = 4
    scan_interval: float = 30
    connect_timeout: float = 30
    command_timeout: float = 300
    mta_sts: bool = True  # RFC 8461 for delivery to MX hosts (queue/mta_sts.py)
    mta_sts_port: int = 443  # of the policy host; another port only for tests


@attrs.frozen
class ScreeningSettings:
    """Where the screening lists are and which listeners they guard."""

    file: Path | None = None
    apply_to: tuple[str, ...] = ("mx",)
    dns_timeout: float = 3.0
    # "rcpt": a screened client is refused at RCPT, except for postmaster@ and abuse@
    # (RFC 5321 4.5.1); "connect": refused in the greeting (cheaper, but it cannot complain)
    refuse_at: str = "rcpt"


@attrs.frozen
class DirectorySettings:
    backend: str = "ldif"
    ldif_file: Path = Path("users.ldif")
    ldap: LdapSettings = LdapSettings()
    threads: int = 8


@attrs.frozen
class Settings:
    """The whole validated configuration."""

    source: Path
    hostname: str
    local_domains: tuple[str, ...]
    maildir_root: Path
    spool_dir: Path
    storage_threads: int
    commit_threads: int
    sync: str  # "journal" (one fdatasync per batch, journal.py; default), "fsync" each file, or "syncfs" per batch
    max_message_size: int
    auth_cache_ttl: float
    throttle: ThrottleSettings
    limits: LimitSettings
    smtp_idle_timeout: float
    smtp: SMTPOptions
    pop3_idle_timeout: float
    directory: DirectorySettings
    listeners: tuple[ListenerSettings, ...]
    tls: TLSSettings
    queue: QueueSettings = QueueSettings()
    screening: ScreeningSettings = ScreeningSettings()
    json_log: Path | None = None
    log_level: str = "info"
    mailbox_quota: int = DEFAULT_MAILBOX_QUOTA  # bytes per subscriber, 0 = unlimited (mailappliance.quota)
    mx_bytes_per_hour_per_network: int = DEFAULT_BYTES_PER_HOUR  # 0 = off (mailappliance.budget)
    state: StateSettings = StateSettings()  # where limits, login throttling and mailbox locks live
    addresses: AddressSettings = AddressSettings()  # [server] alias domains, delimiter, catch-all, postmaster
    forwarding: ForwardingSettings = ForwardingSettings()  # [forwarding] SRS
    msgauth: MsgAuthSettings = MsgAuthSettings()  # [msgauth] SPF/DKIM/DMARC/ARC on the MX (mailappliance.msgauth)
    dkim: DkimSettings = DkimSettings()  # [dkim] signing of submitted mail
    filter: FilterSettings = FilterSettings()  # [filter] rspamd
    workers: int = 1  # [server] workers: processes serving the listeners (mailappliance.workers)
    # The secret files read for this config (and their values): a reload that
    # cannot read an unchanged one keeps the value. Not a setting: never compared.
    secrets: SecretFiles | None = attrs.field(default=None, eq=False, repr=False)


class SecretFiles:
    """Secrets read from ``*_file`` keys, by path, with the file's identity when read.

    The daemon reads them as root at start; after twistd's --uid/--gid a
    SIGHUP may no longer be allowed to read a root-only file.  Such a file
    keeps the value read before as long as it is unchanged (same inode, size
    and modification time, as far as the daemon can still see); a file that
    changed but cannot be read is an error, so a new password is never
    silently ignored.
    """

    def __init__(self) -> None:
        self._known: dict[Path, tuple[tuple[int, int, int] | None, str]] = {}

    @staticmethod
    def _identity(path: Path) -> tuple[int, int, int] | None:
        try:
            info = path.stat()
        except OSError:
            return None  # cannot even be looked at: nothing says it changed
        return (info.st_ino, info.st_size, info.st_mtime_ns)

    def read(self, path: Path) -> str:
        """The secret in ``path`` (stripped); OSError when it cannot be read and is not known unchanged."""
        try:
            value = path.read_text(encoding="utf-8").strip()
        except PermissionError:
            known = self._known.get(path)
            if known is None or (known[0] is not None and self._identity(path) not in (None, known[0])):
                raise
            return known[1]
        self._known[path] = (self._identity(path), value)
        return value


class ConfigReader:
    """Typed access to one TOML table, producing ConfigErrors with full key paths."""

    def __init__(self, file: Path, table: dict[str, Any], prefix: str = "",
                 secrets: SecretFiles | None = None) -> None:
        self.file = file
        self.table = table
        self.prefix = prefix
        self.used: set[str] = set()
        self.secrets = secrets if secrets is not None else SecretFiles()

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def error(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.file, self.key(name), problem)

    def _get(self, name: str, default: Any, kind: type | tuple[type, ...], kind_name: str) -> Any:
        self.used.add(name)
        if name not in self.table:
            if default is _REQUIRED:
                raise self.error(name, f"is required ({kind_name})")
            return default
        value = self.table[name]
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise self.error(name, f"must be {kind_name}, got {value!r}")
        if not isinstance(value, kind):
            raise self.error(name, f"must be {kind_name}, got {value!r}")
        return value

    def string(self, name: str, default: Any = None) -> str:
        default = _REQUIRED if default is None else default
        value = self._get(name, default, str, "a string")
        if not value and default is _REQUIRED:
            raise self.error(name, "must not be empty")
        return str(value)

    def boolean(self, name: str, default: bool) -> bool:
        return bool(self._get(name, default, bool, "true or false"))

    def number(self, name: str, default: float, minimum: float, maximum: float) -> float:
        value = self._get(name, default, (int, float), f"a number from {minimum} to {maximum}")
        if not minimum <= value <= maximum:
            raise self.error(name, f"must be a number from {minimum} to {maximum}, got {value!r}")
        return float(value)

    def integer(self, name: str, default: Any, minimum: int, maximum: int) -> int:
        value = self._get(name, default, int, f"a whole number from {minimum} to {maximum}")
        if not minimum <= value <= maximum:
            raise self.error(name, f"must be a whole number from {minimum} to {maximum}, got {value!r}")
        return int(value)

    def choice(self, name: str, default: Any, choices: tuple[str, ...]) -> str:
        valid = " or ".join(repr(c) for c in choices)
        value = self._get(name, default, str, f"one of {valid}")
        if value not in choices:
            raise self.error(name, f"must be one of {valid}, got {value!r}")
        return str(value)

    def path(self, name: str, default: Any = None) -> Path:
        raw = self.string(name, default)
        path = Path(raw).expanduser()
        return path if path.is_absolute() else (self.file.parent / path).resolve()

    def strings(self, name: str, default: Any = None) -> tuple[str, ...]:
        default = _REQUIRED if default is None else default
        value = self._get(name, default, list, "a list of strings")
        if not all(isinstance(v, str) and v for v in value):
            raise self.error(name, f"must be a list of non-empty strings, got {value!r}")
        return tuple(value)

    def table_of(self, name: str) -> ConfigReader:
        value = self._get(name, {}, dict, "a table")
        return ConfigReader(self.file, value, f"{self.prefix}{name}.", self.secrets)

    def secret_file(self, name: str) -> Path | None:
        """The path of ``name_file`` (not read), None when ``name`` is given inline or not at all."""
        file_key = f"{name}_file"
        if file_key not in self.table:
            self.used.add(name)
            return None
        if self.string(name, ""):
            raise self.error(file_key, f"give either {self.key(name)} or {self.key(file_key)}, not both")
        return self.path(file_key)

    def secret(self, name: str) -> str:
        """``name`` inline, or ``name_file`` pointing to a file that holds it (read now)."""
        path = self.secret_file(name)
        if path is None:
            return self.string(name, "")
        try:
            return self.secrets.read(path)
        except OSError as e:
            raise self.error(f"{name}_file", f"cannot read {path}: {e.strerror}") from None

    def reject_unknown(self, nested: tuple[str, ...] = ()) -> None:
        for name in self.table:
            if name not in self.used and name not in nested:
                known = ", ".join(sorted(self.used | set(nested)))
                raise self.error(name, f"unknown setting (known here: {known})")


_REQUIRED = object()


def _validated(reader: ConfigReader, name: str, value: T, check: Callable[[T], Any]) -> T:
    try:
        check(value)
    except (InvalidAddress, ValueError) as e:
        raise reader.error(name, str(e)) from None
    return value


def _size(reader: ConfigReader, name: str, default: int) -> int:
    """Bytes, as a whole number or a text like "500M" or "2G" (0 usually means: no limit)."""
    value = reader._get(name, default, (int, str), "a size in bytes or a text like \"500M\" or \"2G\"")
    try:
        return parse_size(value)
    except ValueError as e:
        raise reader.error(name, str(e)) from None


def _listener(file: Path, index: int, table: Any) -> ListenerSettings:
    if not isinstance(table, dict):
        raise ConfigError(file, f"listeners[{index}]", "must be a table ([[listeners]])")
    reader = ConfigReader(file, table, f"listeners[{index}].")
    role = reader.choice("role", _REQUIRED, ROLES)
    listener = ListenerSettings(
        name=reader.string("name", role),
        role=role,
        address=_validated(reader, "address", reader.string("address", "127.0.0.1"), _check_ip),
        port=reader.integer("port", _REQUIRED, 1, 65535),
        allow_plaintext_auth=reader.boolean("allow_plaintext_auth", False),
        max_connections=reader.integer("max_connections", 1, 1, 10_000_000) if "max_connections" in table else 0,
        auth=reader.boolean("auth", False) if "auth" in table else None,
    )
    reader.reject_unknown()
    return listener


def _connection_shares(file: Path, listeners: tuple[ListenerSettings, ...],
                       limits: LimitSettings) -> tuple[ListenerSettings, ...]:
    """Each SMTP and POP3 listener's share of limits.max_connections: its own
    max_connections, or an equal part of what the listeners that set theirs
    leave. The shares add up to no more than the whole, so a listener that is
    full (an MX held by strangers) never takes the others' connections."""
    counted = [i for i, listener in enumerate(listeners) if listener.role not in WEB_ROLES]
    fixed = sum(listeners[i].max_connections for i in counted)
    unset = [i for i in counted if not listeners[i].max_connections]
    if fixed > limits.max_connections:
        last = max(i for i in counted if listeners[i].max_connections)
        raise ConfigError(file, f"listeners[{last}].max_connections",
                          f"the SMTP and POP3 listeners' max_connections add up to {fixed}, more than "
                          f"limits.max_connections = {limits.max_connections}; lower them or raise the "
                          "server-wide cap (each listener's share must fit in it)")
    if not unset:
        return listeners
    share = (limits.max_connections - fixed) // len(unset)
    if share < 1:
        raise ConfigError(file, "limits.max_connections",
                          f"{limits.max_connections} leaves no connection for listeners[{unset[0]}] "
                          "(its share of what the others' max_connections leave); raise it")
    return tuple(attrs.evolve(listener, max_connections=share) if i in unset else listener
                 for i, listener in enumerate(listeners))


def _check_ip(text: str) -> None:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, text)
            return
        except OSError:
            continue
    raise ValueError(f"must be an IPv4 or IPv6 address, got {text!r}")


def _ldap(reader: ConfigReader) -> LdapSettings:
    defaults = LdapSettings()
    urls = reader.strings("urls", defaults.urls)
    for url in urls:
        if not url.startswith(("ldap://", "ldaps://", "ldapi://")):
            raise reader.error("urls", f"each URL must start with ldap://, ldaps:// or ldapi://, got {url!r}")
    settings = LdapSettings(
        urls=urls,
        base_dn=reader.string("base_dn"),
        bind_dn=reader.string("bind_dn", ""),
        bind_password=reader.secret("bind_password"),
        login_filter=_filter(reader, "login_filter", defaults.login_filter, "{login}"),
        address_filter=_filter(reader, "address_filter", defaults.address_filter, "{address}"),
        timeout=reader.number("timeout", defaults.timeout, 0.1, 120),
        admin_bind_dn=reader.string("admin_bind_dn", ""),
        admin_bind_password=reader.string("admin_bind_password", ""),
        admin_bind_password_file=reader.secret_file("admin_bind_password"),  # never read here
    )
    reader.reject_unknown()
    return settings


def _filter(reader: ConfigReader, name: str, default: str, placeholder: str) -> str:
    value = reader.string(name, default)
    if placeholder not in value or not (value.startswith("(") and value.endswith(")")):
        raise reader.error(name, f"must be an LDAP filter in parentheses containing {placeholder}")
    return value


def _directory(reader: ConfigReader) -> DirectorySettings:
    backend = reader.choice("backend", "ldif", ("ldif", "ldap"))
    ldif_file = reader.path("ldif_file", "users.ldif")
    threads = reader.integer("threads", 8, 1, 64)
    ldap = _ldap(reader.table_of("ldap")) if backend == "ldap" or "ldap" in reader.table else LdapSettings()
    reader.used.add("ldap")
    reader.reject_unknown()
    return DirectorySettings(backend=backend, ldif_file=ldif_file, ldap=ldap, threads=threads)


def _screening(reader: ConfigReader) -> ScreeningSettings:
    file = reader.path("file") if "file" in reader.table else None
    apply_to = reader.strings("apply_to", ("mx",))
    for role in apply_to:
        if role not in SMTP_ROLES:
            raise reader.error("apply_to", f"roles must be among {', '.join(SMTP_ROLES)}, got {role!r}")
    settings = ScreeningSettings(file, apply_to, reader.number("dns_timeout", 3.0, 0.1, 30),
                                 reader.choice("refuse_at", "rcpt", ("rcpt", "connect")))
    reader.reject_unknown()
    if file is not None:
        try:
            load_lists(file)
        except ScreeningFileError as e:
            raise reader.error("file", str(e)) from None
    return settings


def _limits(reader: ConfigReader) -> LimitSettings:
    d = LimitSettings()
    counts = {field.name: reader.integer(field.name, getattr(d, field.name), 1, 10_000_000)
              for field in attrs.fields(LimitSettings) if field.name != "session_lifetime"}
    settings = LimitSettings(**counts,  # every field but the lifetime is an int
                             session_lifetime=reader.number("session_lifetime", d.session_lifetime, 0, 30 * 86400))
    reader.reject_unknown()
    return settings


def _throttle(reader: ConfigReader) -> ThrottleSettings:
    d = ThrottleSettings()
    return ThrottleSettings(
        window=reader.number("failure_window", d.window, 1, 86400),
        free_failures=reader.integer("failures_before_delay", d.free_failures, 0, 1000),
        max_delay=reader.number("max_delay", d.max_delay, 0, 300),
        address_lock_after=reader.integer("address_lock_after", d.address_lock_after, 1, 100000),
        account_lock_after=reader.integer("account_lock_after", d.account_lock_after, 1, 100000),
        lock_time=reader.number("lock_time", d.lock_time, 1, 86400),
        trusted_for=reader.number("trusted_for", d.trusted_for, 0, 365 * 86400),
    )


def _state(reader: ConfigReader) -> StateSettings:
    """``[state]``: Redis shared by several appliances, or this process's memory (docs/admin.md)."""
    d = StateSettings()
    url = reader.string("redis", "")
    if url:
        try:
            address = parse_url(url)
        except ValueError as e:
            raise reader.error("redis", str(e)) from None
    prefix = reader.string("key_prefix", d.key_prefix)
    if not prefix.isascii() or not prefix.isprintable() or " " in prefix or len(prefix) > 64:
        raise reader.error("key_prefix",
                           f"must be up to 64 printable ASCII characters without spaces, got {prefix!r}")
    ca_file = reader.path("ca_file") if "ca_file" in reader.table else None
    if ca_file is not None and not (url and address.tls):
        raise reader.error("ca_file", "is only for a rediss:// (TLS) state.redis")
    if ca_file is not None and not ca_file.is_file():
        raise reader.error("ca_file", f"{ca_file} does not exist")
    settings = StateSettings(
        redis=url,
        username=reader.string("username", ""),
        password=reader.secret("password"),
        key_prefix=prefix,
        timeout=reader.number("timeout", d.timeout, 0.01, 30),
        probe_interval=reader.number("probe_interval", d.probe_interval, 0.1, 3600),
        lock_ttl=reader.number("lock_ttl", d.lock_ttl, 2, 3600),
        ca_file=ca_file,
    )
    reader.reject_unknown()
    return settings


def _tls(reader: ConfigReader) -> TLSSettings:
    certificate = reader.path("certificate", str(STATE_DIR / "tls" / "server.pem"))
    private_key = reader.path("private_key", str(STATE_DIR / "tls" / "server.key"))
    generate = reader.boolean("generate_self_signed", True)
    client_ca = reader.path("client_ca") if "client_ca" in reader.table else None
    client_ca_key = reader.path("client_ca_key") if "client_ca_key" in reader.table else None
    reader.reject_unknown()
    for name, path in (("certificate", certificate), ("private_key", private_key)):
        if not generate and not path.is_file():
            raise reader.error(name, f"{path} does not exist (or set tls.generate_self_signed = true)")
    for name, optional in (("client_ca", client_ca), ("client_ca_key", client_ca_key)):
        if optional is not None and not optional.is_file():
            raise reader.error(name, f"{optional} does not exist")
    if client_ca_key is not None and client_ca is None:
        raise reader.error("client_ca_key", "needs tls.client_ca too")
    return TLSSettings(certificate, private_key, generate, client_ca, client_ca_key)


def _relay(reader: ConfigReader, name: str, text: str) -> str:
    try:
        Relay.parse(text)
    except ValueError as e:
        raise reader.error(name, f"{e}; expected host, host:port, [host] or [host]:port") from None
    return text


def _queue(reader: ConfigReader) -> QueueSettings:
    defaults = QueueSettings()
    resolver = reader.string("resolver", "")
    if resolver and not resolver.rpartition(":")[2].isdigit():
        raise reader.error("resolver", f"must be host:port (e.g. 127.0.0.1:53), got {resolver!r}")
    smarthost = reader.string("smarthost", "")
    if smarthost:
        _relay(reader, "smarthost", smarthost)
    transports_reader = reader.table_of("transports")
    transports = []
    for domain, relay in transports_reader.table.items():
        if not isinstance(relay, str):
            raise transports_reader.error(domain, "must be a string like \"[mail.partner.example]:25\"")
        _validated(transports_reader, domain, domain, normalize_domain)
        transports.append((domain.lower(), _relay(transports_reader, domain, relay)))
    schedule = reader._get("retry_schedule", list(defaults.retry_schedule), list, "a list of seconds")
    if not schedule or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in schedule):
        raise reader.error("retry_schedule", f"must be a non-empty list of positive seconds, got {schedule!r}")
    settings = QueueSettings(
        resolver=resolver,
        smtp_port=reader.integer("smtp_port", 25, 1, 65535),
        smarthost=smarthost,
        smarthost_user=reader.string("smarthost_user", ""),
        smarthost_password=reader.secret("smarthost_password"),
        transports=tuple(transports),
        verify_domains=tuple(
            _validated(reader, "verify_domains", d, normalize_domain).lower()
            for d in reader.strings("verify_domains", ())),
        ca_file=reader.path("ca_file") if "ca_file" in reader.table else None,
        retry_schedule=tuple(float(v) for v in schedule),
        max_age=reader.number("max_age", defaults.max_age, 1, 60 * 86400),
        delay_warning_after=reader.number("delay_warning_after", 0, 0, 60 * 86400),
        concurrency=reader.integer("concurrency", defaults.concurrency, 1, 1000),
        per_destination=reader.integer("per_destination", defaults.per_destination, 1, 100),
        scan_interval=reader.number("scan_interval", defaults.scan_interval, 0.1, 3600),
        connect_timeout=reader.number("connect_timeout", defaults.connect_timeout, 1, 600),
        command_timeout=reader.number("command_timeout", defaults.command_timeout, 1, 3600),
        mta_sts=reader.boolean("mta_sts", defaults.mta_sts),
        mta_sts_port=reader.integer("mta_sts_port", defaults.mta_sts_port, 1, 65535),
    )
    reader.used.add("transports")
    reader.reject_unknown()
    if settings.smarthost_user and not settings.smarthost:
        raise reader.error("smarthost_user", "needs queue.smarthost")
    if settings.ca_file is not None and not settings.ca_file.is_file():
        raise reader.error("ca_file", f"{settings.ca_file} does not exist")
    return settings


def parse_config(file: Path, data: dict[str, Any], secrets: SecretFiles | None = None) -> Settings:
    """Validate an already-parsed TOML document (``secrets``: those read before, for a reload)."""
    top = ConfigReader(file, data, secrets=secrets)
    server = top.table_of("server")
    hostname = server.string("hostname", socket.getfqdn() or "localhost")
    domains = tuple(
        normalize_domain(_validated(server, "local_domains", d, normalize_domain)).rstrip(".")
        for d in server.strings("local_domains")  # an IDN as its A-label, the form SMTP and DNS use
    )
    addresses = parse_addresses(server, domains)
    workers = parse_workers(server)
    server.reject_unknown()

    storage = top.table_of("storage")
    maildir_root = storage.path("maildir_root", str(STATE_DIR / "mail"))
    spool_dir = storage.path("spool_dir", str(STATE_DIR / "spool"))
    storage_threads = storage.integer("threads", 8, 1, 256)
    commit_threads = storage.integer("commit_threads", 1, 1, 64)
    sync = storage.choice("sync", "journal", SYNC_METHODS)  # with several worker processes, one journal each
    forwarding = parse_forwarding(top.table_of("forwarding"), domains, addresses, spool_dir)
    if sync == "syncfs" and not syncfs_available():
        raise storage.error("sync", "\"syncfs\" needs Linux 5.8 or newer (where syncfs reports write errors); "
                                    "use \"fsync\"")
    mailbox_quota = _size(storage, "mailbox_quota", DEFAULT_MAILBOX_QUOTA)
    storage.reject_unknown()

    smtp = top.table_of("smtp")
    max_size = smtp.integer("max_message_size", 25 * 1024 * 1024, 1024, 2**31 - 1)
    smtp_idle = smtp.number("idle_timeout", 300, 1, 3600)
    d = SMTPOptions()  # the defaults are written once, in the record
    smtp_options = SMTPOptions(
        normalize_line_endings=smtp.choice("bare_line_endings", "normalize" if d.normalize_line_endings else "refuse",
                                           ("refuse", "normalize")) == "normalize",
        max_line_length=smtp.integer("max_line_length", d.max_line_length, 78, 100_000),
        max_recipients=smtp.integer("max_recipients", d.max_recipients, 1, 100_000),
        max_errors=smtp.integer("max_errors", d.max_errors, 1, 1000),
        command_time_limit=smtp.number("command_time_limit", d.command_time_limit, 1, 3600),
        data_time_limit=smtp.number("data_time_limit", d.data_time_limit, 10, 86400),
        dsn_success_notices=smtp.choice("dsn_success_notices", d.dsn_success_notices,
                                        ("authenticated", "all", "none")),
    )
    smtp.reject_unknown()

    pop3 = top.table_of("pop3")
    pop3_idle = pop3.number("idle_timeout", 600, 1, 3600)
    pop3.reject_unknown()

    auth = top.table_of("auth")
    cache_ttl = auth.number("cache_ttl", 60, 0, 86400)
    throttle = _throttle(auth)
    auth.reject_unknown()

    directory = _directory(top.table_of("directory"))
    limits_table = top.table_of("limits")
    mx_byte_budget = _size(limits_table, "mx_bytes_per_hour_per_network", DEFAULT_BYTES_PER_HOUR)
    limits = _limits(limits_table)
    screening = _screening(top.table_of("screening"))
    logging = top.table_of("logging")
    json_log = logging.path("json_file") if "json_file" in logging.table else None
    log_level = logging.choice("level", "info", ("debug", "info", "warn", "error", "critical"))
    logging.reject_unknown()
    tls = _tls(top.table_of("tls"))
    queue = _queue(top.table_of("queue"))
    state = _state(top.table_of("state"))
    msgauth = parse_msgauth(top.table_of("msgauth"), domains)
    dkim = parse_dkim(top.table_of("dkim"), domains)
    content_filter = parse_filter(top.table_of("filter"), _size)

    raw_listeners = top._get("listeners", _REQUIRED, list, "a list of [[listeners]] tables")
    listeners = tuple(_listener(file, i, t) for i, t in enumerate(raw_listeners))
    _check_unique_sockets(file, listeners)
    listeners = _connection_shares(file, listeners, limits)
    top.reject_unknown()

    return Settings(
        source=file,
        hostname=hostname,
        local_domains=domains,
        maildir_root=maildir_root,
        spool_dir=spool_dir,
        storage_threads=storage_threads,
        commit_threads=commit_threads,
        sync=sync,
        max_message_size=max_size,
        auth_cache_ttl=cache_ttl,
        throttle=throttle,
        limits=limits,
        screening=screening,
        json_log=json_log,
        log_level=log_level,
        mailbox_quota=mailbox_quota,
        mx_bytes_per_hour_per_network=mx_byte_budget,
        state=state,
        smtp_idle_timeout=smtp_idle,
        smtp=smtp_options,
        pop3_idle_timeout=pop3_idle,
        directory=directory,
        listeners=listeners,
        tls=tls,
        queue=queue,
        addresses=addresses,
        forwarding=forwarding,
        msgauth=msgauth,
        dkim=dkim,
        filter=content_filter,
        secrets=top.secrets,
        workers=workers,
    )


def _check_unique_sockets(file: Path, listeners: tuple[ListenerSettings, ...]) -> None:
    seen: dict[tuple[str, int], int] = {}
    for i, listener in enumerate(listeners):
        key = (listener.address, listener.port)
        if key in seen:
            raise ConfigError(
                file, f"listeners[{i}].port",
                f"{listener.address}:{listener.port} is already used by listeners[{seen[key]}]",
            )
        seen[key] = i
    for i, listener in enumerate(listeners):
        for j, other in enumerate(listeners[:i]):
            if other.port == listener.port and _overlap(other.address, listener.address):
                wildcard = other.address if other.address in ("::", "0.0.0.0") else listener.address
                raise ConfigError(
                    file, f"listeners[{i}].address",
                    f"{listener.address} and listeners[{j}]'s {other.address} cannot both listen on port "
                    f"{listener.port}: {wildcard} takes that port for every "
                    f"{'IPv6 and IPv4' if wildcard == '::' else 'IPv4'} address (a listener on \"::\" "
                    "serves IPv4 clients too; use it alone, or name the addresses)",
                )


def _overlap(first: str, second: str) -> bool:
    """Two different addresses whose listeners on one port collide: a wildcard takes the port
    for its family, and "::" for IPv4 too (Linux dual-stack sockets, bindv6only = 0)."""
    if first == second:
        return False
    for wildcard, other in ((first, second), (second, first)):
        if wildcard == "::" or (wildcard == "0.0.0.0" and ":" not in other):
            return True
    return False


def load_config(path: Path | str, secrets: SecretFiles | None = None) -> Settings:
    """Read and validate the config file at ``path``; a reload passes the running
    config's ``secrets`` so unchanged secret files the daemon can no longer read keep their values."""
    file = Path(path).expanduser().resolve()
    try:
        with file.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(file, "(file)", "does not exist; see etc/mailappliance.toml for an example") from None
    except OSError as e:
        raise ConfigError(file, "(file)", f"cannot be read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(file, "(syntax)", f"not valid TOML: {e}") from None
    return parse_config(file, data, secrets)
