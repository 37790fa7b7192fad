"""Delivered-To (RFC 9228): each local recipient's copy names the address it came in for.

A message with one local recipient carries the field in its one file (the
session writes it after Return-Path, so it costs nothing).  With several
local recipients that file goes to the first one's Maildir, and every other
Maildir gets a :class:`RecipientCopy`: the same bytes with its own
Delivered-To in place of the first one's, written beside the received file,
fsynced with it and renamed into ``new/`` (the durability rules of
``delivery.commit_batch``: nothing is in ``new/`` before its bytes are on
disk, one ``new/`` fsync per directory per batch).  The outbound spool's copy
skips the field (its ``body_offset`` starts after it): Delivered-To belongs
to final delivery, like Return-Path.

Copies cost disk and commit-thread time that hard links did not, so they
are bounded: at most ``COPY_BUDGET`` bytes of copies per message.  Past that
(one big message to many mailboxes: a cheap way to fill a disk and stall the
commit thread) the remaining recipients share one copy without Delivered-To,
hard-linked into each of their Maildirs, as before this field existed.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from mailappliance.maildir import IncomingMessage, ensure_maildir_once, write_all

COPY_BLOCK = 1024 * 1024
COPY_BUDGET = 64 * 1024 * 1024  # bytes of per-recipient copies one message may cost


def delivered_to_header(address: str) -> bytes:
    """The field for one recipient address (as received: an alias or sub-address stays visible)."""
    if address.isascii() and address.isprintable() and " " not in address:  # the usual case: as it is
        return f"Delivered-To: {address[:998]}\r\n".encode("ascii")
    safe = "".join(c if 0x20 < ord(c) < 0x7F or (ord(c) > 0x7F and c.isprintable() and not c.isspace())
                   else "?" for c in address)[:998]  # UTF-8 (SMTPUTF8, RFC 6532), never a line break
    return f"Delivered-To: {safe}\r\n".encode()


class RecipientCopy:
    """One recipient's own file: ``message`` with bytes ``span`` replaced by ``header``."""

    def __init__(self, message: IncomingMessage, span: tuple[int, int], header: bytes, index: int,
                 shared: bool = False) -> None:
        self.message = message
        self.span = span
        self.header = header
        self.shared = shared  # linked into several Maildirs (no Delivered-To): the budget ran out
        self.path = message.path.with_name(f"{message.name}.r{index}")
        self.size = message.size - (span[1] - span[0]) + len(header)
        self._fd: int | None = None
        self._written = False
        self._moved = False

    def write(self) -> None:
        """Write the copy from the received file (after its ``write_out``); once, however
        many Maildirs share it."""
        if self._written:
            return
        self._written = True
        source = os.open(self.message.path, os.O_RDONLY)  # just written: read from the page cache
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            start, end = self.span
            self._copy(source, 0, start)
            write_all(self._fd, self.header)
            self._copy(source, end, self.message.size)
        finally:
            os.close(source)

    def _copy(self, source: int, start: int, end: int) -> None:
        assert self._fd is not None
        while start < end:
            block = os.pread(source, min(COPY_BLOCK, end - start), start)
            if not block:
                raise OSError(errno.EIO, f"{self.message.path}: shorter than {end} bytes")
            write_all(self._fd, block)
            start += len(block)

    def sync(self, fsync: bool = True) -> None:
        """fsync (unless a syncfs covered it) and close."""
        if self._fd is None:
            return
        try:
            if fsync:
                os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = None

    def place(self, maildir: Path) -> Path:
        """Rename the synced copy into ``maildir``'s ``new/`` (copy via ``tmp/`` across filesystems)."""
        ensure_maildir_once(maildir)
        target = maildir / "new" / f"{self.message.name},S={self.size}"
        try:
            (os.link if self.shared else os.rename)(self.path, target)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise
            staged = maildir / "tmp" / target.name
            with open(self.path, "rb") as src, open(staged, "xb") as dst:
                shutil.copyfileobj(src, dst, COPY_BLOCK)
                dst.flush()
                os.fsync(dst.fileno())
            os.rename(staged, target)
            if not self.shared:
                os.unlink(self.path)
        self._moved = not self.shared  # a shared copy's incoming name goes at discard()
        return target

    def discard(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if not self._moved:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass




def plan_copies(message: IncomingMessage, targets: list[tuple[Path, bytes]],
                span: tuple[int, int], budget: int | None = None) -> dict[Path, RecipientCopy]:
    """The Maildirs (after the first) that need a file of their own: their Delivered-To differs
    from the one in the received file.  ``targets``: (Maildir, header), duplicates removed.
    Past ``budget`` bytes of copies the rest share one copy without Delivered-To."""
    if span == (0, 0) or len(targets) < 2:
        return {}
    left = COPY_BUDGET if budget is None else budget
    first = targets[0][1]
    copies: dict[Path, RecipientCopy] = {}
    generic: RecipientCopy | None = None
    for n, (maildir, header) in enumerate(targets[1:], start=1):
        if not header or header == first:
            continue
        copy = RecipientCopy(message, span, header, n)
        if copy.size <= left:
            left -= copy.size
            copies[maildir] = copy
            continue
        if generic is None:
            generic = RecipientCopy(message, span, b"", 0, shared=True)
        copies[maildir] = generic
    return copies
