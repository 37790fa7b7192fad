"""Durable Maildir delivery.

A message is received in memory (larger ones spill into one file in
``<spool>/incoming``) while DATA streams in.  ``delivery.commit_batch``
(blocking: the ``BatchCommitter`` thread runs it) writes and fsyncs that file, hard-links it
into each recipient's ``new/`` (copying when the spool is on another
filesystem, via ``tmp/``, fsync, rename), fsyncs each ``new/`` directory, and
only then may the SMTP layer answer 250.  A file in ``new/`` is
therefore always whole: it appears by an atomic link or rename of a file whose
bytes are already on disk.  Maildir files are never modified in place, so
recipients sharing one inode is safe (Dovecot does the same).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import os
import shutil
import socket
import time
from pathlib import Path
from typing import BinaryIO

from mailappliance.addresses import is_safe_mailbox_name

_counter = itertools.count()
_hostname = socket.gethostname().replace("/", "\\057").replace(":", "\\072").replace(",", "\\054")

MAILDIR_SUBDIRS = ("tmp", "new", "cur")


def maildir_for(root: Path, uid: str) -> Path:
    """Where subscriber ``uid`` keeps mail; ValueError for a uid that cannot
    safely name a directory there (the directory may hold entries made with
    other tools than ours)."""
    if not is_safe_mailbox_name(uid):
        raise ValueError(f"unsafe mailbox name {uid!r}")
    return root / uid


JUNK_FOLDER = ".Junk"


def junk_folder(maildir: Path) -> Path:
    """The subscriber's Junk folder: a Maildir++ folder inside their Maildir
    (what Dovecot and most IMAP servers show as "Junk")."""
    return maildir / JUNK_FOLDER


def ensure_maildir(path: Path) -> None:
    """Create ``path`` with tmp/new/cur, private to the daemon's user (a Maildir++
    folder such as ``.Junk`` also gets its ``maildirfolder`` marker)."""
    folder = path.name.startswith(".")  # a uid never starts with "." (is_safe_mailbox_name)
    if folder:
        ensure_maildir(path.parent)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.mkdir(mode=0o700, exist_ok=True)
    for sub in MAILDIR_SUBDIRS:
        (path / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
    if folder:
        (path / "maildirfolder").touch(mode=0o600, exist_ok=True)


def _process_tag() -> str:
    """Pid and a random part, fixed per process (renewed in a forked child)."""
    return f"P{os.getpid()}R{os.urandom(4).hex()}"


_process = _process_tag()


def _renew_process_tag() -> None:
    global _process
    _process = _process_tag()


os.register_at_fork(after_in_child=_renew_process_tag)


def unique_name() -> str:
    """A Maildir unique name (time, microseconds, pid and random part, counter,
    host); no ',' or ':'.  It costs no system call.  The microseconds have six
    digits, so one process's names sort in the order they were made."""
    now = time.time()
    seconds = int(now)
    micros = int((now - seconds) * 1_000_000)
    return f"{seconds}.M{micros:06d}{_process}Q{next(_counter)}.{_hostname}"


def fsync_directory(path: Path) -> None:
    _fsync_opened(path, os.O_RDONLY | os.O_DIRECTORY)


def fsync_file(path: Path) -> None:
    """fsync a file by name (a symbolic link is refused, never followed)."""
    _fsync_opened(path, os.O_RDONLY | os.O_NOFOLLOW)


def _fsync_opened(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    """Write every byte of ``data`` to ``fd`` (os.write may take less than all)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


_libc = None


def syncfs(fd: int) -> None:
    """Flush every write on the filesystem that holds ``fd`` (and wait)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.syncfs(fd) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"syncfs: {os.strerror(code)}")


_known_maildirs: set[Path] = set()


def ensure_maildir_once(path: Path) -> None:
    """``ensure_maildir``, remembered: a delivery costs no mkdir calls once a
    Maildir is known to exist (``forget_maildir`` when it turns out gone)."""
    if path not in _known_maildirs:
        ensure_maildir(path)
        _known_maildirs.add(path)


def forget_maildir(path: Path) -> None:
    _known_maildirs.discard(path)


MEMORY_LIMIT = 1024 * 1024


class IncomingMessage:
    """One message being received.

    Up to ``MEMORY_LIMIT`` octets are kept in memory, so a typical message
    costs the reactor thread no file I/O at all (creating a file can wait on
    the filesystem journal behind other deliveries' fsyncs); the file in the
    spool's ``incoming`` directory is created at commit, in a commit thread,
    with one write.  Larger messages spill to that file as they stream in.
    """

    def __init__(self, incoming_dir: Path) -> None:
        self.name = unique_name()
        self.path = incoming_dir / self.name
        self.size = 0
        self._chunks: list[bytes] = []
        self._file: BinaryIO | None = None  # a spilled (large) message
        self._fd: int | None = None  # the written file, between write_out and sync
        self._moved = False  # renamed into a Maildir: the incoming name is gone
        self._created = False  # the incoming file exists (spilled, or written out)
        self._edit: tuple[int, int, bytes] | None = None  # a spilled message's pending head edit

    def write(self, data: bytes) -> None:
        """Append bytes (nothing is durable until it is committed)."""
        self.size += len(data)
        if self._file is not None:
            self._file.write(data)
            return
        self._chunks.append(data)
        if self.size > MEMORY_LIMIT:
            self._file = os.fdopen(self._create(), "wb", buffering=256 * 1024)
            self._file.write(b"".join(self._chunks))
            self._chunks = []

    def _create(self) -> int:
        # read-write: message authentication reads a spilled message back (read()) before commit
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self._created = True
        return fd

    def content(self) -> bytes:
        """The whole message of one that is not spilled (the journal's record)."""
        if self._file is not None:
            raise ValueError("a spilled message is read from its file")
        return self.read()

    @property
    def spilled(self) -> bool:
        return self._file is not None

    def read(self, start: int = 0, limit: int | None = None) -> bytes:
        """Bytes ``start`` .. ``start + limit`` of the message as received so far
        (before any pending edit).  A spilled message is read from its file:
        cheap for a header section, meant for a worker thread for the whole."""
        end = self.size if limit is None else min(self.size, start + limit)
        if self._file is None:
            if len(self._chunks) > 1:
                self._chunks = [b"".join(self._chunks)]
            return self._chunks[0][start:end] if self._chunks else b""
        self._file.flush()
        return os.pread(self._file.fileno(), max(0, end - start), start)

    def edit(self, start: int, end: int, replacement: bytes) -> None:
        """Replace bytes ``start`` .. ``end`` by ``replacement`` (message
        authentication's header fields, just after our Received header).  In
        memory at once; a spilled message's file is rewritten by ``write_out``
        in the commit thread, so the reactor never copies a big file."""
        if self._edit is not None:
            raise RuntimeError("one edit per message")
        if self._file is None:
            whole = self.read()
            self._chunks = [whole[:start] + replacement + whole[end:]]
        else:
            self._edit = (start, end, replacement)
        self.size += len(replacement) - (end - start)

    def _apply_edit(self) -> None:
        """The pending edit of a spilled file: a new file beside it, renamed over it."""
        assert self._file is not None and self._edit is not None
        start, end, replacement = self._edit
        self._file.flush()
        old = self._file.fileno()
        staged = self.path.with_name(self.path.name + ".edit")
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            new = os.fdopen(fd, "wb", buffering=256 * 1024)
        except BaseException:
            os.close(fd)
            raise
        try:
            new.write(os.pread(old, start, 0))
            new.write(replacement)
            offset = end
            while chunk := os.pread(old, 1024 * 1024, offset):
                new.write(chunk)
                offset += len(chunk)
            new.flush()
            os.rename(staged, self.path)
        except BaseException:
            new.close()
            with contextlib.suppress(OSError):
                os.unlink(staged)
            raise
        self._file.close()
        self._file, self._edit = new, None

    def write_out(self) -> None:
        """Put every byte into the incoming file (not yet durable)."""
        if self._file is not None:
            if self._edit is not None:
                self._apply_edit()
            self._file.flush()
            self._fd = self._file.fileno()
            return
        self._fd = self._create()
        data, self._chunks = b"".join(self._chunks), []
        write_all(self._fd, data)

    def fileno(self) -> int:
        """The written file (between ``write_out`` and ``sync``)."""
        assert self._fd is not None
        return self._fd

    def sync(self, fsync: bool = True) -> None:
        """fsync (unless a syncfs already covered it) and close the incoming
        file (after ``write_out``)."""
        assert self._fd is not None
        try:
            if fsync:
                os.fsync(self._fd)
        finally:
            self._close()

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
        elif self._fd is not None:
            os.close(self._fd)
        self._file = self._fd = None

    def place(self, maildir: Path, last: bool = False) -> Path:
        """Put the (synced) file into ``maildir``'s ``new/``: a hard link, or
        for the ``last`` place a rename; the caller then fsyncs ``new/``."""
        ensure_maildir_once(maildir)
        target = maildir / "new" / f"{self.name},S={self.size}"
        try:
            self._place(target, last)
        except FileNotFoundError:  # the Maildir was removed while we remembered it
            forget_maildir(maildir)
            ensure_maildir_once(maildir)
            self._place(target, last)
        return target

    def _place(self, target: Path, last: bool) -> None:
        try:
            if last:
                os.rename(self.path, target)
                self._moved = True  # nothing left under the incoming name
            else:
                os.link(self.path, target)
            return
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise
        staged = target.parent.parent / "tmp" / target.name
        with open(self.path, "rb") as src, open(staged, "xb") as dst:
            shutil.copyfileobj(src, dst, 1024 * 1024)
            dst.flush()
            os.fsync(dst.fileno())
        os.rename(staged, target)

    def discard(self) -> None:
        """Forget the message (after commit, or when it is refused)."""
        self._chunks = []
        self._close()
        if self._moved or not self._created:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def clean_incoming(incoming_dir: Path) -> int:
    """Remove leftovers of transactions that never got a 250 (a crash mid-DATA)."""
    incoming_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    removed = 0
    for leftover in incoming_dir.iterdir():
        if leftover.is_file():
            leftover.unlink()
            removed += 1
    return removed
