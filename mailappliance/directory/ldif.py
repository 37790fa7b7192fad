"""The embedded directory: an LDIF file with the same schema as the LDAP backend.

The file is re-read whenever it changes on disk (checked by a cheap stat on
each lookup), so an admin's edit or a ``mailappliance-admin`` change takes
effect without a restart.  Writes replace the file atomically (temp file,
fsync, rename) under an exclusive lock, keeping the leading comment block and
every entry the store does not manage (base entries, groups, ...).

The file holds password hashes, so it is private: every write makes it 0600
(0640 if the admin had made it readable for a group only), keeping its owner
and group, and opening the store tightens a file its owner left readable for
everyone (see :func:`tighten_file_mode`).
"""

from __future__ import annotations

import fcntl
import os
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ldap3.utils.dn import escape_rdn
from twisted.logger import Logger

from mailappliance.addresses import normalize_address, validate_new_subscriber
from mailappliance.directory import (
    DISABLED_ATTRIBUTE,
    DISABLED_VALUE,
    FORWARD_ATTRIBUTE,
    LIMIT_ATTRIBUTE,
    DirectoryUnavailable,
    DuplicateEntry,
    NoSuchSubscriber,
    Subscriber,
    parse_limits,
)
from mailappliance.directory.ldif_format import Entry, LdifSyntaxError, format_ldif, parse_ldif, physical_lines
from mailappliance.directory.passwords import hash_password, spend_a_check, verify_stored
from mailappliance.maildir import write_all

log = Logger()

PRIVATE_MODE = 0o600
DEFAULT_PARENT_DN = "ou=people,dc=example,dc=org"
CERTIFICATE_ATTRIBUTE = "userCertificate;binary"
SUBSCRIBER_CLASSES = ("top", "person", "organizationalPerson", "inetOrgPerson", "inetLocalMailRecipient")


def _is_subscriber_entry(entry: Entry) -> bool:
    classes = {c.lower() for c in entry.texts("objectClass")}
    return "inetorgperson" in classes and bool(entry.first("uid")) and bool(entry.first("mail"))


def subscriber_from_entry(entry: Entry) -> Subscriber:
    """The Subscriber record for one directory entry."""
    mail = entry.first("mail").lower()
    aliases = tuple(a.lower() for a in entry.texts("mailLocalAddress") if a.lower() != mail)
    certificates = tuple(
        v if isinstance(v, bytes) else v.encode("latin-1") for v in entry.values(CERTIFICATE_ATTRIBUTE)
    )
    return Subscriber(
        dn=entry.dn,
        uid=entry.first("uid"),
        mail=mail,
        aliases=aliases,
        display_name=entry.first("cn"),
        disabled=any(v.lower() == DISABLED_VALUE for v in entry.texts(DISABLED_ATTRIBUTE)),
        certificates=certificates,
        limits=parse_limits(entry.texts(LIMIT_ATTRIBUTE)),
        forwards=tuple(entry.texts(FORWARD_ATTRIBUTE)),
    )


class _Snapshot:
    """One parsed version of the file with its lookup indexes."""

    def __init__(self, header: str, entries: list[Entry]) -> None:
        self.header = header
        self.entries = entries
        self.by_login: dict[str, Entry] = {}
        self.by_address: dict[str, Entry] = {}
        self.by_certificate: dict[bytes, Entry] = {}
        self._subscribers: dict[int, Subscriber] = {}  # id(entry) -> its record, made on first use
        for entry in entries:
            if not _is_subscriber_entry(entry):
                continue
            for der in entry.values(CERTIFICATE_ATTRIBUTE):
                if isinstance(der, bytes):
                    self.by_certificate.setdefault(der, entry)
            self.by_login.setdefault(entry.first("uid").lower(), entry)
            self.by_login.setdefault(entry.first("mail").lower(), entry)
            for address in [entry.first("mail"), *entry.texts("mailLocalAddress")]:
                self.by_address.setdefault(address.lower(), entry)


    def subscriber(self, entry: Entry) -> Subscriber:
        """The (immutable) record of one of this snapshot's entries, made once: a snapshot
        never changes (an edit reads a fresh one), and every RCPT for the same mailbox
        would otherwise lower-case and scan its attributes again."""
        known = self._subscribers.get(id(entry))
        if known is None:
            known = self._subscribers[id(entry)] = subscriber_from_entry(entry)
        return known


def _leading_comments(text: str) -> str:
    lines = []
    for line in physical_lines(text):
        if not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


def written_mode(old_mode: int | None) -> int:
    """The mode a rewrite of the file gets: 0600, or 0640 when the old file was
    readable by its group but not by everyone (an admin's deliberate choice,
    e.g. root:mailappliance 0640).  Never readable or writable by others."""
    if old_mode is not None and old_mode & stat.S_IRGRP and not old_mode & stat.S_IROTH:
        return 0o640
    return PRIVATE_MODE


def mode_problem(path: Path) -> str | None:
    """What is wrong with who may read ``path`` (it holds password hashes), or None."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return None
    if mode & 0o007:
        return (f"{path} is readable or writable by every user (mode {mode:04o}) and holds password hashes: "
                f"give it to the daemon's user and make it private (chown mailappliance {path}; chmod 600 {path})")
    if mode & 0o070:
        return (f"{path} is {'writable' if mode & 0o020 else 'readable'} by its group (mode {mode:04o}); "
                "fine only if that group is the daemon's own")
    return None


def tighten_file_mode(path: Path) -> str | None:
    """Take away every user's access to ``path`` (and a group's write), if we may.

    The owner keeps its access, so the file's owner does it, or root for a
    file another user owns.  A file root owns is left alone (with a note):
    root may be starting a daemon that drops to another user (twistd --uid)
    and reads the file through exactly those bits.  Returns a note for the
    admin (what was done, or what to do), or None when all is well.
    """
    try:
        st = os.stat(path)
    except OSError:
        return None
    mode = stat.S_IMODE(st.st_mode)
    if not mode & 0o027:
        return None
    wanted = written_mode(mode)
    euid = os.geteuid()
    if st.st_uid != 0 and euid in (0, st.st_uid):
        try:
            os.chmod(path, wanted)
        except OSError as e:  # a read-only mount (systemd ReadOnlyPaths): say what to do
            return f"could not make {path} private ({e.strerror}): {mode_problem(path)}"
        return f"{path} holds password hashes: its mode was {mode:04o}, now {wanted:04o}"
    return mode_problem(path)


STALE = object()  # find_by_address_if_current: ask in a thread
RECHECK_SECONDS = 0.1  # find_by_address_if_current trusts a stat this long


class LdifStore:
    """A DirectoryStore over one LDIF file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._snapshot = _Snapshot("", [])
        self._checked_at = float("-inf")  # when a stat last found the file unchanged (monotonic)
        self.mode_note = tighten_file_mode(self.path)
        if self.mode_note:
            log.warn("directory file: {note}", note=self.mode_note)

    # -- reading -----------------------------------------------------------

    def _current(self) -> _Snapshot:
        """The snapshot for the file as it is now; re-parsed only when it changed."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            with self._lock:
                self._stamp, self._snapshot = None, _Snapshot("", [])
                return self._snapshot
        except OSError as e:
            raise DirectoryUnavailable(f"cannot stat {self.path}: {e.strerror}") from None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        with self._lock:
            if stamp != self._stamp:
                self._snapshot = self._read()
                self._stamp = stamp
            return self._snapshot

    def _read(self) -> _Snapshot:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return _Snapshot("", [])
        except (OSError, UnicodeDecodeError) as e:
            raise DirectoryUnavailable(f"cannot read {self.path}: {e}") from None
        try:
            return _Snapshot(_leading_comments(text), parse_ldif(text))
        except LdifSyntaxError as e:
            raise DirectoryUnavailable(f"{self.path}: {e}") from None

    def find_by_login(self, login: str) -> Subscriber | None:
        snapshot = self._current()
        entry = snapshot.by_login.get(login.lower())
        return snapshot.subscriber(entry) if entry else None

    def find_by_address(self, address: str) -> Subscriber | None:
        snapshot = self._current()
        entry = snapshot.by_address.get(address.lower())
        return snapshot.subscriber(entry) if entry else None

    def find_by_address_if_current(self, address: str) -> Subscriber | None | object:
        """``find_by_address`` for the reactor thread: answered from memory when the file
        is unchanged since it was last read (a dict lookup, no thread hop); ``STALE`` when
        it changed, is being read, or cannot be looked at (the caller then asks
        ``find_by_address`` in a thread, which re-reads it).  Whether it changed is
        checked with a stat at most every ``RECHECK_SECONDS`` (a busy MX asks hundreds of
        times a second), and always before answering "no such address", so a subscriber
        just added is never refused; an entry just removed or disabled may still be
        found for that long, as a cached LDAP answer would be."""
        now = time.monotonic()
        checked = now - self._checked_at < RECHECK_SECONDS
        snapshot = self._snapshot if checked else self._checked_snapshot(now)
        if snapshot is None:
            return STALE
        entry = snapshot.by_address.get(address.lower())
        if entry is None:
            if checked and self._checked_snapshot(now) is not snapshot:
                return STALE  # "no such address" only from the file as it is now
            return None
        return snapshot.subscriber(entry)

    def _checked_snapshot(self, now: float) -> _Snapshot | None:
        """Stat the file: the snapshot if the file is still the one it was read from
        (remembering ``now`` as the time of that check), None when it changed or is
        being read."""
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        if not self._lock.acquire(blocking=False):
            return None
        try:
            if (st.st_ino, st.st_mtime_ns, st.st_size) != self._stamp:
                self._checked_at = float("-inf")
                return None
            self._checked_at = now
            return self._snapshot
        finally:
            self._lock.release()

    def verify_password(self, subscriber: Subscriber, password: str) -> bool:
        entry = self._current().by_login.get(subscriber.uid.lower())
        if entry is None or entry.dn != subscriber.dn:
            return spend_a_check(password)
        return verify_stored(entry.texts("userPassword"), password)

    def verify_unknown(self, password: str) -> bool:
        """A login with no subscriber: cost what a refused password costs, then refuse."""
        return spend_a_check(password)

    def find_by_certificate(self, der: bytes) -> Subscriber | None:
        entry = self._current().by_certificate.get(der)
        return subscriber_from_entry(entry) if entry else None

    def list_subscribers(self) -> list[Subscriber]:
        snapshot = self._current()
        found = [subscriber_from_entry(e) for e in snapshot.entries if _is_subscriber_entry(e)]
        return sorted(found, key=lambda s: s.uid.lower())

    def close(self) -> None:
        """Nothing to release."""

    # -- writing -----------------------------------------------------------

    @contextmanager
    def _editing(self) -> Iterator[_Snapshot]:
        """Lock the file, yield a fresh snapshot to change, then replace the file atomically."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        with open(lock_path, "a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                snapshot = self._read()
                yield snapshot
                self._write(snapshot)
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    def _write(self, snapshot: _Snapshot) -> None:
        """Replace the file: a new private temp file (mkstemp: 0600, a fresh name),
        the old file's owner and group when we may set them, fsync, rename."""
        data = format_ldif(snapshot.entries, snapshot.header).encode("utf-8")
        try:
            old: os.stat_result | None = os.stat(self.path)
        except FileNotFoundError:
            old = None
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            try:
                if old is not None and os.geteuid() == 0:
                    os.fchown(fd, old.st_uid, old.st_gid)
                old_mode = stat.S_IMODE(old.st_mode) if old else None
                mode = written_mode(old_mode)
                os.fchmod(fd, mode)
                if old is not None and old_mode is not None and old_mode & 0o077 & ~mode:
                    self.mode_note = (
                        f"{self.path} holds password hashes: its mode was {old_mode:04o}, now {mode:04o}; "
                        f"if the daemon runs as another user than uid {old.st_uid}, give it the file "
                        f"(chown mailappliance {self.path})")
                write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    @staticmethod
    def _entry_for(snapshot: _Snapshot, login: str) -> Entry:
        entry = snapshot.by_login.get(login.lower()) or snapshot.by_address.get(login.lower())
        if entry is None:
            raise NoSuchSubscriber(f"no subscriber with login or address {login!r}")
        return entry

    @staticmethod
    def _parent_dn(snapshot: _Snapshot) -> str:
        for entry in snapshot.entries:
            if _is_subscriber_entry(entry) and "," in entry.dn:
                return entry.dn.split(",", 1)[1]
        for entry in snapshot.entries:
            if entry.dn.lower().startswith("ou=people,"):
                return entry.dn
        return DEFAULT_PARENT_DN

    def add_subscriber(
        self, uid: str, mail: str, password: str | None, display_name: str = ""
    ) -> Subscriber:
        uid, mail, display_name = validate_new_subscriber(uid, mail, display_name)
        with self._editing() as snapshot:
            if uid.lower() in snapshot.by_login:
                raise DuplicateEntry(f"login {uid!r} is already taken")
            if mail in snapshot.by_address or mail in snapshot.by_login:
                raise DuplicateEntry(f"address {mail!r} already belongs to a subscriber")
            entry = Entry(dn=f"uid={escape_rdn(uid)},{self._parent_dn(snapshot)}")
            for object_class in SUBSCRIBER_CLASSES:
                entry.add("objectClass", object_class)
            entry.add("uid", uid)
            entry.add("cn", display_name or uid)
            entry.add("sn", display_name or uid)
            entry.add("mail", mail)
            if password:
                entry.add("userPassword", hash_password(password))
            snapshot.entries.append(entry)
        return subscriber_from_entry(entry)

    def set_password(self, login: str, password: str) -> None:
        hashed = hash_password(password)
        with self._editing() as snapshot:
            entry = self._entry_for(snapshot, login)
            entry.remove("userPassword")
            entry.add("userPassword", hashed)

    def set_disabled(self, login: str, disabled: bool) -> None:
        with self._editing() as snapshot:
            entry = self._entry_for(snapshot, login)
            entry.remove(DISABLED_ATTRIBUTE, DISABLED_VALUE)
            if disabled:
                entry.add(DISABLED_ATTRIBUTE, DISABLED_VALUE)

    def delete_subscriber(self, login: str) -> None:
        with self._editing() as snapshot:
            entry = self._entry_for(snapshot, login)
            snapshot.entries.remove(entry)

    def add_alias(self, login: str, alias: str) -> None:
        alias = normalize_address(alias)
        with self._editing() as snapshot:
            entry = self._entry_for(snapshot, login)
            if alias in snapshot.by_address or alias in snapshot.by_login:
                raise DuplicateEntry(f"address {alias!r} already belongs to a subscriber")
            classes = {c.lower() for c in entry.texts("objectClass")}
            if "inetlocalmailrecipient" not in classes:
                entry.add("objectClass", "inetLocalMailRecipient")
            entry.add("mailLocalAddress", alias)

    def delete_alias(self, alias: str) -> None:
        alias = normalize_address(alias)
        with self._editing() as snapshot:
            entry = snapshot.by_address.get(alias)
            if entry is None or entry.remove("mailLocalAddress", alias) == 0:
                raise NoSuchSubscriber(f"no subscriber has the alias {alias!r}")

    def add_certificate(self, login: str, der: bytes) -> None:
        with self._editing() as snapshot:
            entry = self._entry_for(snapshot, login)
            if der in snapshot.by_certificate:
                raise DuplicateEntry("that certificate is already stored for a subscriber")
            entry.add(CERTIFICATE_ATTRIBUTE, der)

    def remove_certificate(self, login: str, der: bytes) -> None:
        with self._editing() as snapshot:
            entry = self._entry_for(snapshot, login)
            if entry.remove(CERTIFICATE_ATTRIBUTE, der) == 0:
                raise NoSuchSubscriber(f"{login!r} has no such certificate")
