"""Durable Maildir delivery.

A message is received into one file in ``<spool>/incoming`` while DATA
streams in.  ``commit`` (blocking: run it in a thread) fsyncs that file, then
hard-links it into each recipient's ``new/`` (copying when the spool is on
another filesystem, via ``tmp/``, fsync, rename), fsyncs each ``new/``
directory, and only then may the SMTP layer answer 250.  A file in ``new/`` is
therefore always whole: it appears by an atomic link or rename of a file whose
bytes are already on disk.  Maildir files are never modified in place, so
recipients sharing one inode is safe (Dovecot does the same).
"""

from __future__ import annotations

import errno
import itertools
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

_counter = itertools.count()
_hostname = socket.gethostname().replace("/", "\\057").replace(":", "\\072").replace(",", "\\054")

MAILDIR_SUBDIRS = ("tmp", "new", "cur")


def maildir_for(root: Path, uid: str) -> Path:
    """Where subscriber ``uid`` keeps mail (uids are validated: no '/', no leading '.')."""
    if not uid or "/" in uid or uid.startswith(".") or "\0" in uid:
        raise ValueError(f"unsafe mailbox name {uid!r}")
    return root / uid


def ensure_maildir(path: Path) -> None:
    """Create ``path`` with tmp/new/cur, private to the daemon's user."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.mkdir(mode=0o700, exist_ok=True)
    for sub in MAILDIR_SUBDIRS:
        (path / sub).mkdir(mode=0o700, parents=True, exist_ok=True)


def unique_name() -> str:
    """A Maildir unique name (time, microseconds, pid, counter, host); no ',' or ':'."""
    now = time.time()
    seconds = int(now)
    micros = int((now - seconds) * 1_000_000)
    return f"{seconds}.M{micros}P{os.getpid()}Q{next(_counter)}R{os.urandom(4).hex()}.{_hostname}"


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class GroupDirectorySync:
    """Directory fsyncs shared by concurrent deliveries (group commit).

    A thread that needs ``path`` synced after its link waits for a sync that
    *started* after its request; one fsync then covers every delivery that
    linked into the directory before it began.  Durability is unchanged:
    nobody returns before a directory fsync that followed their link.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._requested: dict[Path, int] = {}
        self._done: dict[Path, int] = {}
        self._running: set[Path] = set()

    def sync(self, path: Path) -> None:
        with self._condition:
            ticket = self._requested[path] = self._requested.get(path, 0) + 1
            while self._done.get(path, 0) < ticket:
                if path in self._running:
                    self._condition.wait()
                    continue
                self._running.add(path)
                covered = self._requested[path]
                self._condition.release()
                try:
                    fsync_directory(path)
                finally:
                    self._condition.acquire()
                    self._running.discard(path)
                    self._condition.notify_all()
                self._done[path] = max(self._done.get(path, 0), covered)


DIRECTORY_SYNC = GroupDirectorySync()


MEMORY_LIMIT = 1024 * 1024


class IncomingMessage:
    """One message being received.

    Up to ``MEMORY_LIMIT`` octets are kept in memory, so a typical message
    costs the reactor thread no file I/O at all (creating a file can wait on
    the filesystem journal behind other deliveries' fsyncs); the file in the
    spool's ``incoming`` directory is created in ``commit``, in a worker
    thread.  Larger messages spill to that file as they stream in.
    """

    def __init__(self, incoming_dir: Path) -> None:
        self.name = unique_name()
        self.path = incoming_dir / self.name
        self.size = 0
        self._chunks: list[bytes] = []
        self._file: BinaryIO | None = None

    def write(self, data: bytes) -> None:
        """Append bytes (nothing is durable until ``commit``)."""
        self.size += len(data)
        if self._file is not None:
            self._file.write(data)
            return
        self._chunks.append(data)
        if self.size > MEMORY_LIMIT:
            self._open_file()

    def _open_file(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._file = os.fdopen(fd, "wb", buffering=256 * 1024)
        self._file.write(b"".join(self._chunks))
        self._chunks = []

    def commit(self, maildirs: Iterable[Path], outbound: Callable[[Path], None] | None = None) -> list[Path]:
        """Make the message durable in every maildir (and, via ``outbound``, in
        the outbound spool); returns the delivered Maildir paths.

        Blocking: fsync and directory operations.  Raises OSError on failure,
        in which case the caller answers 4xx and calls ``discard``.
        """
        if self._file is None:
            self._open_file()
        assert self._file is not None
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        if outbound is not None:
            outbound(self.path)
        delivered: list[Path] = []
        for maildir in dict.fromkeys(maildirs):
            ensure_maildir(maildir)
            target = maildir / "new" / f"{unique_name()},S={self.size}"
            self._place(target)
            delivered.append(target)
        for new_dir in dict.fromkeys(p.parent for p in delivered):
            DIRECTORY_SYNC.sync(new_dir)
        self.discard()
        return delivered

    def _place(self, target: Path) -> None:
        try:
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
        if self._file is not None:
            self._file.close()
            self._file = None
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
