"""A journaled message's files: the record body format, and placing a record's files.

The commit (delivery.py) encodes each message with its targets into a
journal record and, once the record is durable, places the files; recovery
(journal.py) decodes records and places what a crash left unplaced.  Kept
apart from the journal's segments and checkpoints: this is the part that
touches Maildirs.
"""

from __future__ import annotations

import errno
import functools
import os
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs

from mailappliance.maildir import ensure_maildir_once, forget_maildir, write_all

_FIXED_TARGET = struct.Struct("<HHIIH")  # maildir length, name length, edit start, edit end, replacement length


def crash_point(step: str) -> None:
    """Where a crash test may stop the process (``CRASH_HOOK`` raises); nothing otherwise."""
    if CRASH_HOOK is not None:
        CRASH_HOOK(step)


CRASH_HOOK: Callable[[str], None] | None = None


@attrs.frozen
class Target:
    """One Maildir's file of a journaled message: ``base`` with ``start..end`` replaced."""

    maildir: Path
    filename: str
    start: int = 0
    end: int = 0
    replacement: bytes = b""

    def content(self, base: bytes) -> bytes:
        if self.start == self.end and not self.replacement:
            return base
        return base[: self.start] + self.replacement + base[self.end :]


def encode_body(base: bytes, targets: Sequence[Target]) -> bytes:
    parts = [struct.pack("<HI", len(targets), len(base)), base]
    for t in targets:
        maildir, name = os.fsencode(t.maildir), t.filename.encode("ascii")
        parts += [_FIXED_TARGET.pack(len(maildir), len(name), t.start, t.end, len(t.replacement)),
                  maildir, name, t.replacement]
    return b"".join(parts)


def decode_body(body: bytes) -> tuple[bytes, tuple[Target, ...]]:
    """ValueError (struct.error is one) for a body that is not what ``encode_body`` writes."""
    count, size = struct.unpack_from("<HI", body)
    offset = 6 + size
    if offset > len(body):
        raise ValueError("base longer than the record")
    base = body[6:offset]
    targets = []
    for _ in range(count):
        dlen, nlen, start, end, rlen = _FIXED_TARGET.unpack_from(body, offset)
        offset += _FIXED_TARGET.size
        stop = offset + dlen + nlen + rlen
        if stop > len(body) or not start <= end <= len(base):
            raise ValueError("target outside the record")
        maildir = Path(os.fsdecode(body[offset : offset + dlen]))
        name = body[offset + dlen : offset + dlen + nlen].decode("ascii")
        targets.append(Target(maildir, name, start, end, body[offset + dlen + nlen : stop]))
        offset = stop
    if offset != len(body):
        raise ValueError("trailing bytes in the record")
    return base, tuple(targets)


def unique_part(name: str) -> str:
    return name.split(":", 1)[0].split(",", 1)[0]


def write_file(directory: Path, name: str, content: bytes) -> Path:
    """``content`` as ``directory/tmp/name`` (a leftover of that name replaced), for the
    caller to rename into ``new/`` or ``cur/``."""
    staged = directory / "tmp" / name
    _write_staged(str(staged), content)
    return staged


def _write_staged(staged: str, content: bytes) -> None:
    try:
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # a crash's leftover (or anything planted there): never written through
        os.unlink(staged)
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        write_all(fd, content)
    finally:
        os.close(fd)


@functools.lru_cache(maxsize=4096)
def _subdirectories(maildir: Path) -> tuple[str, str, Path]:
    """``tmp/`` and ``new/`` of a Maildir as path prefixes, and ``new/`` as a Path: a
    delivery builds its two file names from strings, not with pathlib's joins."""
    return f"{maildir}/tmp/", f"{maildir}/new/", maildir / "new"


def place_target(target: Target, base: bytes, linked_from: Path | None = None) -> Path:
    """Put one target's file into ``new/`` (no fsync: the journal holds the bytes).  A
    hard link of ``linked_from`` (the same bytes in another Maildir) when it can."""
    ensure_maildir_once(target.maildir)
    tmp_prefix, new_prefix, new_dir = _subdirectories(target.maildir)
    final = new_prefix + target.filename
    if linked_from is not None:
        try:
            os.link(linked_from, final)
            return new_dir / target.filename
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOENT):
                raise
    staged = tmp_prefix + target.filename
    try:
        _write_staged(staged, target.content(base))
    except FileNotFoundError:  # the Maildir was removed while we remembered it
        forget_maildir(target.maildir)
        ensure_maildir_once(target.maildir)
        _write_staged(staged, target.content(base))
    crash_point("journal.place.written")
    os.rename(staged, final)
    crash_point("journal.place.renamed")
    return new_dir / target.filename


def place_record(base: bytes, targets: Sequence[Target]) -> list[Path]:
    """Every target's file of one message into its ``new/``, equal bytes hard-linked;
    on failure the files already placed are removed again and the error raised."""
    placed: list[Path] = []
    first: dict[tuple[int, int, bytes], Path] = {}
    try:
        for target in targets:
            key = (target.start, target.end, target.replacement)
            path = place_target(target, base, first.get(key))
            first.setdefault(key, path)
            placed.append(path)
    except BaseException:
        for path in placed:
            try:
                os.unlink(path)
            except OSError:
                pass
        raise
    return placed
