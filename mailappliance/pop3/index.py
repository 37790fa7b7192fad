"""The per-Maildir POP3 index: names, sizes and delivery order of ``cur/``.

Kept in ``<maildir>/mailappliance.index`` so that a login does not stat every
message: it is valid for one state of ``cur/`` (device, inode and mtime in
nanoseconds), and a login whose ``cur/`` still has that state uses it as it
is; otherwise ``cur/`` is listed (names only) and only names the index does
not know are stat'ed.  Either way the work grows with the changes, not with
the mailbox.

A directory mtime can miss a change made in the same timestamp tick as the
listing that it describes, so (Dovecot's rule) a state whose mtime was too
recent when it was taken is recorded as *unsettled*: the next login lists
``cur/`` again instead of trusting it.  Too recent: within ``SETTLE_NS``
(0.1 s) for nanosecond timestamps (Linux stamps a change with a clock at
most one tick, a few milliseconds, behind), within ``COARSE_SETTLE_NS``
(3 s) for a filesystem that keeps whole seconds (or FAT's two).  The age
is judged by this host's clock: on a network filesystem whose server's clock
runs behind ours, a change within one of the server's ticks after a listing
could stay unseen until ``cur/`` changes again (Dovecot has the same limit).

It is a cache and nothing more: written atomically (a private file in the
Maildir's ``tmp/`` renamed over it), never fsynced, never followed through a symlink, and a
file that is not ours, too large or malformed in any way is ignored and
rebuilt.  Each index carries an HMAC-SHA256 over its Maildir's path and its
content, keyed with the installation's secret (``<maildir_root>/.pop3-index.key``,
made at the first login): an index copied from another Maildir or written
by anybody without the key (a subscriber with file access to their own
Maildir, say) is foreign and ignored, so it cannot hide messages or invent
them.  Even an index that passes is trusted only for sizes and order of
names; message content never depends on it (RETR reads each file to its
end), and every name is checked to be a plain file name before it is used.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import stat
import threading
from pathlib import Path

import attrs

from mailappliance.maildir import write_all

INDEX_NAME = "mailappliance.index"
KEY_NAME = ".pop3-index.key"  # in maildir_root, beside the Maildirs (no uid starts with '.')
KEY_BYTES = 32
MAGIC = "mailappliance-pop3-index 1"
SETTLE_NS = 100_000_000  # a nanosecond directory mtime younger than this may hide a change made in its tick
COARSE_SETTLE_NS = 3_000_000_000  # the same for an mtime in whole seconds
MAX_INDEX_BYTES = 32 * 1024 * 1024  # about 400,000 messages; above it logins list and stat as before

# One entry per line: "<mtime_ns> <size> <name>"; a name is 1 to 255 characters
# of printable ASCII without '/' or a space and does not start with '.' (the
# listing skips those).
_BODY = re.compile(r"(?:[0-9]{1,19} [0-9]{1,15} [!-\-0-~][!-.0-~]{0,254}\n)*")
_NAMES = re.compile(r"(?:[!-\-0-~][!-.0-~]{0,254}\n)*")
_MAC_LINE = re.compile(r"mac ([0-9a-f]{64})")
_HEADER = re.compile(rf"{MAGIC} ([0-9]{{1,20}}) ([0-9]{{1,20}}) ([0-9]{{1,20}}) ([01]) ([0-9]{{1,9}})")

Entry = tuple[int, str, int]  # (mtime_ns, name, size): sorts into delivery order


@attrs.frozen
class DirState:
    """What identifies one state of a directory: replaced, or changed in any way, it differs."""

    device: int
    inode: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> DirState:
        return cls(st.st_dev, st.st_ino, st.st_mtime_ns)


@attrs.define
class Columns:
    """Messages in delivery order as three parallel lists: a list of tuples
    would be 20,000 objects for the garbage collector on a big mailbox,
    which doubled the time to read an index."""

    mtimes: list[int] = attrs.Factory(list)
    names: list[str] = attrs.Factory(list)
    sizes: list[int] = attrs.Factory(list)

    @classmethod
    def of(cls, entries: list[Entry]) -> Columns:
        """From (mtime_ns, name, size) entries, sorted here."""
        entries.sort()
        if not entries:
            return cls()
        mtimes, names, sizes = zip(*entries, strict=True)
        return cls(list(mtimes), list(names), list(sizes))

    def entries(self) -> list[Entry]:
        return list(zip(self.mtimes, self.names, self.sizes, strict=True))

    def __len__(self) -> int:
        return len(self.names)


@attrs.frozen
class MaildirIndex:
    """``cur/`` as it was in ``state``; ``settled``: that state can be trusted next time."""

    state: DirState
    settled: bool
    messages: Columns


def indexable(name: str) -> bool:
    """Can this file name be written into the index (the grammar ``_BODY`` accepts)?"""
    return _NAMES.fullmatch(name + "\n") is not None


def all_indexable(names: list[str]) -> bool:
    """``indexable`` for every name, in one pass of the regular expression (20,000
    names: 2 ms, against 28 ms name by name)."""
    return _NAMES.fullmatch("".join(name + "\n" for name in names)) is not None


class IndexKey:
    """The installation's secret for index MACs, read (or made) at first use, in
    the thread that loads a mailbox: after the daemon dropped its privileges,
    so the key file is the daemon user's.  Empty when it cannot be had: then
    no index is read or written and logins list and stat as before."""

    def __init__(self, maildir_root: Path) -> None:
        self.path = maildir_root / KEY_NAME
        self._key: bytes | None = None
        self._lock = threading.Lock()

    def get(self) -> bytes:
        if self._key is None:
            with self._lock:
                if self._key is None:
                    self._key = _load_key(self.path)
        return self._key


def _load_key(path: Path) -> bytes:
    """The key in ``path`` (a regular file of ours, private, KEY_BYTES long), made if
    missing or torn (a crash right after it was made: it is not fsynced); b"" if the
    file is anything else (a link, somebody else's, readable by others)."""
    for _ in range(3):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            _make_key(path, replace=False)
            continue
        except OSError:
            return b""
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
                return b""
            key = os.read(fd, KEY_BYTES + 1)
        except OSError:
            return b""
        finally:
            os.close(fd)
        if len(key) == KEY_BYTES:
            return key
        _make_key(path, replace=True)  # indexes made with the torn key become foreign: rebuilt
    return b""


def _make_key(path: Path, replace: bool) -> None:
    """A new random key; published with link() so that two logins racing keep one,
    or renamed over a torn one."""
    staged = path.with_name(f"{KEY_NAME}.{os.urandom(6).hex()}.tmp")
    try:
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError:
        return
    try:
        try:
            os.write(fd, os.urandom(KEY_BYTES))
        finally:
            os.close(fd)
        if replace:
            os.rename(staged, path)
        else:
            os.link(staged, path)
    except OSError:
        pass
    finally:
        try:
            os.unlink(staged)
        except OSError:
            pass


def _mac(key: bytes, maildir: Path, content: bytes) -> str:
    message = os.fsencode(maildir) + b"\0" + content
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def read_index(maildir: Path, key: bytes) -> MaildirIndex | None:
    """The index of ``maildir``, or None if there is none we may trust: missing,
    a symlink or not a regular file, not owned by us, writable by others,
    larger than ``MAX_INDEX_BYTES``, without our MAC for this Maildir, or
    malformed in any way."""
    if not key:
        return None
    try:
        fd = os.open(maildir / INDEX_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if (not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022
                or st.st_size > MAX_INDEX_BYTES):
            return None
        data = os.read(fd, MAX_INDEX_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    first, newline, content = data.partition(b"\n")
    match = _MAC_LINE.fullmatch(first.decode("ascii", "replace"))
    if not newline or match is None or not hmac.compare_digest(match.group(1), _mac(key, maildir, content)):
        return None
    return parse_index(content)


def parse_index(data: bytes) -> MaildirIndex | None:
    """The index in ``data`` (after its MAC line), or None unless every byte of it is well formed."""
    if len(data) > MAX_INDEX_BYTES or not data.isascii():
        return None
    text = data.decode("ascii")
    header, newline, body = text.partition("\n")
    match = _HEADER.fullmatch(header)
    if not newline or match is None or _BODY.fullmatch(body) is None:
        return None
    device, inode, mtime_ns, settled, count = (int(g) for g in match.groups())
    fields = body.split()
    if len(fields) != 3 * count:
        return None
    messages = Columns(list(map(int, fields[0::3])), fields[2::3], list(map(int, fields[1::3])))
    return MaildirIndex(DirState(device, inode, mtime_ns), settled == 1, messages)


def format_index(index: MaildirIndex) -> bytes | None:
    """The file content for ``index`` without its MAC line; None if it cannot be
    written (a name the grammar does not allow, or larger than ``MAX_INDEX_BYTES``)."""
    state, messages = index.state, index.messages
    lines = [f"{MAGIC} {state.device} {state.inode} {state.mtime_ns} {int(index.settled)} {len(messages)}\n"]
    lines += [f"{mtime_ns} {size} {name}\n" for mtime_ns, name, size in zip(messages.mtimes, messages.names,
                                                                           messages.sizes, strict=True)]
    data = "".join(lines)
    if len(data) > MAX_INDEX_BYTES - 70 or _BODY.fullmatch(data, len(lines[0])) is None:
        return None
    return data.encode("ascii")


def write_index(maildir: Path, index: MaildirIndex, key: bytes) -> bool:
    """Replace the index of ``maildir`` atomically (mode 0600, no fsync: a cache);
    False if it could not be written (then no stale index is left behind)."""
    target = maildir / INDEX_NAME
    if not key:
        return False
    content = format_index(index)
    if content is None:
        remove_index(maildir)
        return False
    data = f"mac {_mac(key, maildir, content)}\n".encode() + content
    staged = maildir / "tmp" / f"{INDEX_NAME}.{os.urandom(6).hex()}"  # tmp/: where a crash's leftovers belong
    try:
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError:
        remove_index(maildir)
        return False
    try:
        try:
            write_all(fd, data)
        finally:
            os.close(fd)
        os.rename(staged, target)  # replaces a symlink itself, never what it points at
    except OSError:
        for path in (staged, target):
            try:
                os.unlink(path)
            except OSError:
                pass
        return False
    return True


def remove_index(maildir: Path) -> None:
    """Drop the index (it will be rebuilt at the next login)."""
    try:
        os.unlink(maildir / INDEX_NAME)
    except OSError:
        pass


def is_settled(state: DirState, taken_at_ns: int) -> bool:
    """Must any change made after ``taken_at_ns`` give the directory another mtime
    than ``state``'s?  (Not while the mtime could share a timestamp tick with it.)"""
    margin = COARSE_SETTLE_NS if state.mtime_ns % 1_000_000_000 == 0 else SETTLE_NS
    return state.mtime_ns < taken_at_ns - margin
