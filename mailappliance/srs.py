"""The Sender Rewriting Scheme (SRS): forwarding that passes SPF, bounces that find their way back.

A message we forward to another domain leaves with an envelope sender in one
of *our* domains, so SPF at the destination checks our servers:

    eve@sender.example  ->  SRS0=HHHHHHHH=TT=sender.example=eve@example.net

``HHHHHHHH`` is an HMAC (SHA-256, base32, 40 bits) over the timestamp and the
original address under a secret key of this installation; ``TT`` is the day
(base32, modulo 1024).  A bounce to that address is accepted only if the hash
is ours and the day is at most ``max_age_days`` old, and is then relayed to
``eve@sender.example``: nobody can make us relay by inventing SRS addresses.

A sender that is already an SRS0 address of another forwarder becomes SRS1
(Shevek's scheme, as in libsrs2/postsrsd), so a bounce goes straight back to
the first forwarder, which checks its own hash and timestamp:

    SRS0=opaque@fwd1.example   ->  SRS1=HHHHHHHH=fwd1.example==opaque@example.net

Hashes and timestamps are base32, compared without regard to case (remote
servers may change the case of a local part).  Everything here is pure: the
time is an argument, the keys are bytes handed in by the caller.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from collections.abc import Sequence
from pathlib import Path

import attrs

from mailappliance.mailpath import PathSyntaxError, parse_path

_BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
HASH_LENGTH = 8  # base32 characters: 40 bits
TIMESTAMP_CYCLE = 1024  # days; two base32 characters
MAX_KEY_BYTES = 4096
MIN_KEY_BYTES = 16
DEFAULT_MAX_AGE_DAYS = 21

_SRS_PREFIX = re.compile(r"^srs[01][=+-]", re.IGNORECASE)


class SrsError(ValueError):
    """An SRS address that is not ours to reverse (forged, expired, malformed)."""


def looks_like_srs(local_part: str) -> bool:
    """True for ``SRS0=...``/``SRS1=...`` local parts (also with ``+`` or ``-``, any case)."""
    return bool(_SRS_PREFIX.match(local_part))


def _timestamp(now: float) -> str:
    day = int(now // 86400) % TIMESTAMP_CYCLE
    return _BASE32[day >> 5] + _BASE32[day & 31]


def _age_days(stamp: str, now: float) -> int | None:
    stamp = stamp.upper()
    if len(stamp) != 2 or any(c not in _BASE32 for c in stamp):
        return None
    then = _BASE32.index(stamp[0]) * 32 + _BASE32.index(stamp[1])
    today = int(now // 86400) % TIMESTAMP_CYCLE
    return (today - then) % TIMESTAMP_CYCLE


@attrs.frozen
class SrsKeys:
    """The signing key and the older keys still accepted for bounces (rotation)."""

    current: bytes = attrs.field(repr=False)
    previous: tuple[bytes, ...] = attrs.field(default=(), repr=False)

    @property
    def all(self) -> tuple[bytes, ...]:
        return (self.current, *self.previous)


def _hash(key: bytes, *parts: str) -> str:
    message = "\0".join(p.lower() for p in parts).encode("utf-8", "surrogateescape")
    digest = hmac.new(key, message, hashlib.sha256).digest()
    return base64.b32encode(digest).decode("ascii")[:HASH_LENGTH]


def _valid_hash(keys: SrsKeys, given: str, *parts: str) -> bool:
    given = given.upper()
    return any(hmac.compare_digest(_hash(key, *parts), given) for key in keys.all)


@attrs.frozen
class Srs:
    """Rewrites senders into ``domain`` and reverses bounces, under ``keys``."""

    keys: SrsKeys
    domain: str
    max_age_days: int = DEFAULT_MAX_AGE_DAYS

    def forward(self, sender: str, now: float) -> str | None:
        """The envelope sender for a copy of a message from ``sender`` that we forward;
        None when it cannot be rewritten (null sender, no domain, or the result
        would be longer than an SMTP path may be)."""
        local, _, domain = sender.rpartition("@")
        if not local or not domain:
            return None
        if looks_like_srs(local):
            rewritten = self._forward_srs(local, domain)
        else:
            stamp = _timestamp(now)
            signature = _hash(self.keys.current, "SRS0", stamp, domain, local)
            rewritten = f"SRS0={signature}={stamp}={domain}={local}"
        if rewritten is None:
            return None
        address = f"{rewritten}@{self.domain}"
        try:  # a quoted or odd original local part cannot become a dot-atom: leave it
            parse_path(f"<{address}>", allow_null=False)
        except PathSyntaxError:
            return None
        return address

    def _forward_srs(self, local: str, domain: str) -> str | None:
        """SRS0 of another forwarder -> SRS1 pointing at it; SRS1 -> SRS1 pointing at the first one."""
        tag, separator, rest = local[:4].upper(), local[4], local[5:]
        if tag == "SRS0":
            first_hop, opaque = domain, separator + rest
        else:
            parts = rest.split("=", 2)  # hash, first hop, =opaque
            if len(parts) != 3 or not parts[1] or not parts[2]:
                return None
            first_hop, opaque = parts[1], parts[2]
        signature = _hash(self.keys.current, "SRS1", first_hop, opaque)
        return f"SRS1={signature}={first_hop}={opaque}"

    def reverse(self, local_part: str, now: float, check_age: bool = True) -> str:
        """Where a bounce to ``local_part@<one of our domains>`` goes; SrsError if
        the address is not one we made (bad hash), too old, or malformed.
        ``check_age=False``: our own queue reporting on a copy it forwarded."""
        if not looks_like_srs(local_part):
            raise SrsError("not an SRS address")
        tag, rest = local_part[:4].upper(), local_part[5:]
        if tag == "SRS0":
            parts = rest.split("=", 3)
            if len(parts) != 4 or not all(parts):
                raise SrsError("malformed SRS0 address")
            signature, stamp, domain, local = parts
            if not _valid_hash(self.keys, signature, "SRS0", stamp, domain, local):
                raise SrsError("SRS0 hash does not match")
            age = _age_days(stamp, now)
            if age is None or (check_age and age > self.max_age_days):
                raise SrsError("SRS0 address has expired")
            return f"{local}@{domain}"
        parts = rest.split("=", 2)
        if len(parts) != 3 or not all(parts):
            raise SrsError("malformed SRS1 address")
        signature, first_hop, opaque = parts
        if not _valid_hash(self.keys, signature, "SRS1", first_hop, opaque):
            raise SrsError("SRS1 hash does not match")
        return f"SRS0{opaque}@{first_hop}"


# -- the key file ----------------------------------------------------------------

def read_key(path: Path) -> bytes:
    """A key file's secret (its stripped content); OSError/ValueError naming the problem."""
    with open(path, "rb") as f:
        data = f.read(MAX_KEY_BYTES + 1).strip()
    if len(data) > MAX_KEY_BYTES:
        raise ValueError(f"{path} is larger than {MAX_KEY_BYTES} bytes: not an SRS key")
    if len(data) < MIN_KEY_BYTES:
        raise ValueError(f"{path} holds fewer than {MIN_KEY_BYTES} bytes: too short for an SRS key")
    return data


def ensure_key(path: Path, owner: tuple[int, int] | None = None) -> bool:
    """Create a new random key file at ``path`` (0600, 32 random bytes as hex) unless
    one exists; ``owner`` (uid, gid) gets it when we run as root.  True if created."""
    # the file is private; its directory (the state directory, above the spool) keeps the
    # default mode: the daemon's user must still reach the spool and Maildirs through it
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        if owner is not None and os.geteuid() == 0:
            os.fchown(fd, *owner)
        os.write(fd, os.urandom(32).hex().encode("ascii") + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def load_keys(current: Path, previous: Sequence[Path] = ()) -> SrsKeys:
    """The keys for an Srs: the current file (must exist) and the old ones still accepted."""
    return SrsKeys(read_key(current), tuple(read_key(p) for p in previous))
