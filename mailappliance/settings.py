"""Settings records and the value parsers the config needs, at the bottom of the stack.

``config.py`` reads the TOML into these records; the subsystems that use
them (limits, throttle, state, queue routing, quota, storage) import them
from here, so the config imports no subsystem and every default is written
once.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import attrs

KIB, MIB, GIB = 1024, 1024**2, 1024**3


DEFAULT_MAILBOX_QUOTA = GIB


_SIZE_TEXT = re.compile(r"^([0-9]+)\s*([KMGT]?)(?:I?B)?$")


_UNITS = {"": 1, "K": KIB, "M": MIB, "G": GIB, "T": 1024 * GIB}


def parse_size(value: int | str) -> int:
    """Bytes from a whole number or a text like "500M", "2G", "100K", "1GiB"
    (binary units); ValueError for anything else (a config error names the key)."""
    if isinstance(value, bool):
        raise ValueError(f"must be a size in bytes or a text like \"500M\" or \"2G\", got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"must be a size of 0 bytes or more, got {value!r}")
        return value
    match = _SIZE_TEXT.match(value.strip().upper()) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"must be a size in bytes or a text like \"500M\" or \"2G\", got {value!r}")
    return int(match[1]) * _UNITS[match[2]]


DEFAULT_BYTES_PER_HOUR = 500 * 1024 * 1024


SYNC_METHODS = ("fsync", "syncfs", "journal")


def syncfs_available() -> bool:
    """syncfs(2) reports write errors only since Linux 5.8; before, it could
    return success for data that never reached the disk."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        major, minor = (int(part) for part in os.uname().release.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (5, 8) and hasattr(ctypes.CDLL(None), "syncfs")


@attrs.frozen
class LimitSettings:
    connections_per_minute: int = 60  # per client address (IPv6: per /64)
    concurrent_per_address: int = 20
    concurrent_per_network: int = 50  # per IPv4 /24, per IPv6 /64
    max_connections: int = 1000  # the whole server; each listener has its share (config.py)
    session_lifetime: float = 3600.0  # seconds a session may last however busy it is; 0: no limit
    messages_per_hour: int = 200  # per subscriber
    recipients_per_hour: int = 1000
    recipients_per_message: int = 100


@attrs.frozen
class ThrottleSettings:
    window: float = 900
    free_failures: int = 3
    max_delay: float = 30
    address_lock_after: int = 20
    account_lock_after: int = 10
    lock_time: float = 900
    trusted_for: float = 30 * 86400


@attrs.frozen
class StateSettings:
    """``[state]``: where the shared state lives (docs/admin.md, "Shared state")."""

    redis: str = ""  # "" = this process's memory; redis://, rediss:// (TLS) or unix:///path
    username: str = ""  # Redis 6 ACL user ("" = the default user)
    password: str = attrs.field(default="", repr=False)
    key_prefix: str = "mailappliance:"
    timeout: float = 0.5  # seconds a command may take before the appliance degrades to local state
    probe_interval: float = 5.0  # seconds between attempts to reach Redis again while degraded
    lock_ttl: float = 60.0  # POP3 mailbox locks expire this long after their host stops refreshing them
    ca_file: Path | None = None  # rediss://: the CA that signed the Redis server's certificate (default: system)


@attrs.frozen
class RedisAddress:
    """Where Redis is, from a ``[state] redis`` URL."""

    host: str = ""
    port: int = 6379
    socket: str = ""  # a UNIX socket path instead of host/port
    tls: bool = False
    db: int = 0
    username: str = ""
    password: str = attrs.field(default="", repr=False)

    def describe(self) -> str:
        if self.socket:
            return f"unix:{self.socket}"
        return f"{'rediss' if self.tls else 'redis'}://{self.host}:{self.port}/{self.db}"


def parse_url(url: str) -> RedisAddress:
    """``redis://``, ``rediss://`` or ``unix://`` URL -> RedisAddress; ValueError naming the problem."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    query = parse_qs(parts.query)
    if scheme == "unix":
        db_text = query.get("db", ["0"])[0]
    else:
        db_text = query.get("db", [""])[0] or parts.path.strip("/") or "0"
    try:
        db = int(db_text)
    except ValueError:
        raise ValueError(f"the database number in {url!r} is not a whole number") from None
    if not 0 <= db <= 10_000:
        raise ValueError(f"the database number in {url!r} is out of range")
    username, password = unquote(parts.username or ""), unquote(parts.password or "")
    if scheme == "unix":
        if not parts.path.startswith("/"):
            raise ValueError(f"{url!r}: a UNIX socket needs an absolute path (unix:///run/redis/redis.sock)")
        return RedisAddress(socket=parts.path, db=db, username=username, password=password)
    if scheme not in ("redis", "rediss"):
        raise ValueError(f"{url!r}: must start with redis://, rediss:// (TLS) or unix://")
    if not parts.hostname:
        raise ValueError(f"{url!r} names no host")
    try:
        port = parts.port or 6379
    except ValueError:
        raise ValueError(f"{url!r} has a bad port") from None
    return RedisAddress(host=parts.hostname, port=port, tls=scheme == "rediss", db=db,
                        username=username, password=password)


@attrs.frozen
class Relay:
    """A fixed next hop: ``[host]:port`` (no MX lookup) or ``host:port`` (MX of host)."""

    host: str
    port: int
    use_mx: bool

    @classmethod
    def parse(cls, text: str, default_port: int = 25) -> Relay:
        host, port = text.strip(), default_port
        if host.startswith("["):
            end = host.find("]")
            if end < 0:
                raise ValueError(f"missing ']' in {text!r}")
            name, rest = host[1:end], host[end + 1 :]
            use_mx = False
        else:
            name, _, rest = host.partition(":")
            rest = f":{rest}" if rest else ""
            use_mx = True
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit() or not 0 < int(rest[1:]) < 65536:
                raise ValueError(f"bad port in {text!r}")
            port = int(rest[1:])
        if not name:
            raise ValueError(f"no host in {text!r}")
        return cls(name.lower(), port, use_mx)
