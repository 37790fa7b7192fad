"""The write-ahead journal of ``[storage] sync = "journal"``: one flush per batch, not per message.

A batch of received messages is appended to a journal segment in
``<spool>/journal/`` (one record per message: the bytes and, per target
Maildir, its file name and its own head edit, the Delivered-To copy) and
made durable with ONE flushed write (``pwritev`` with ``RWF_DSYNC``: the
flush of an ``fdatasync`` in the same system call, so the commit thread
takes the GIL back once, not twice).  Segments are preallocated and
zero-filled once, so an append changes no metadata and the flush is a
pure data flush (0.15 ms here against 0.25 ms for a fallocated segment and
0.53 ms for a new file plus fsync; docs/performance.md).  Then each file is
written into its Maildir's ``tmp/`` and renamed into ``new/`` under the name
it would get without the journal, without any fsync, and only then the
messages' Deferreds fire (the 250): the file is where POP3 and the quota
scan look, and its bytes are durable in the journal.

A *checkpoint* (every ``checkpoint_seconds``, every ``checkpoint_bytes``, at
clean shutdown, and before POP3 removes a file still covered only by the
journal) makes the placed files durable (syncfs of each touched filesystem,
or an fsync per file and directory) and then records the last sequence
number it covered in ``journal/checkpoint``; segments before that are free
for reuse.  At start, before any listener opens, :meth:`Journal.open`
replays every record after the checkpoint: a target already in ``new/`` or
``cur/`` (POP3 moved it) with the same bytes is left alone, anything else is
written again.  A torn last record (bad CRC) never got a 250 and is ignored.
Recovery writes only below the configured Maildir root.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import attrs
from twisted.logger import Logger

from mailappliance.journal_files import Target, crash_point, decode_body, unique_part, write_file
from mailappliance.maildir import ensure_maildir_once, fsync_directory, fsync_file, syncfs, write_all
from mailappliance.metrics import METRICS
from mailappliance.settings import syncfs_available

log = Logger(namespace="mailappliance.storage")

MAGIC = b"MAJ1"
HEADER = struct.Struct("<4sIIQB")  # magic, body length, crc32 of (seq, kind, body), sequence, kind
KIND_MESSAGE, KIND_CANCEL = 1, 2
SEGMENT_SIZE = 16 * 1024 * 1024
MAX_SEGMENTS = 64  # files in journal/ recovery looks at; more is not ours
SEGMENT_NAME = re.compile(r"^segment\.([0-9]{6})$")
TARGET_NAME = re.compile(r"[^/\x00-\x1f.][^/\x00-\x1f]{0,240},S=([0-9]{1,12})")  # fullmatch: a plain name
CHECKPOINT_SECONDS = 5.0
CHECKPOINT_BYTES = 64 * 1024 * 1024


@attrs.frozen
class Record:
    """A whole record found in a segment; a message's body stays on disk until
    :meth:`load` (recovery holds one message in memory at a time)."""

    sequence: int
    kind: int
    fd: int = -1
    offset: int = 0
    length: int = 0
    cancels: int = 0  # KIND_CANCEL: the sequence number it voids

    def load(self) -> tuple[bytes, tuple[Target, ...]]:
        """The message's bytes and targets; ValueError for a malformed body."""
        body = os.pread(self.fd, self.length, self.offset)
        if len(body) != self.length:
            raise ValueError("record shorter than when it was read")
        return decode_body(body)


# zlib.crc32 releases the GIL for more than 5 KiB: in the commit thread that is a hand-off to
# the reactor and a wait to get it back (~0.1 ms under load, longer than the checksum itself).
# A small record is summed in pieces that keep it; a large one is worth the release.
_CRC_PIECE = 4096
_CRC_PIECES_UP_TO = 64 * 1024


def record_crc(sequence: int, kind: int, body: bytes) -> int:
    """CRC-32 of the sequence number, kind and body (as of their concatenation)."""
    crc = zlib.crc32(struct.pack("<QB", sequence, kind))
    if len(body) > _CRC_PIECES_UP_TO:
        return zlib.crc32(body, crc)
    view = memoryview(body)
    for start in range(0, len(body), _CRC_PIECE):
        crc = zlib.crc32(view[start:start + _CRC_PIECE], crc)
    return crc


def encode_record(sequence: int, kind: int, body: bytes) -> bytes:
    return HEADER.pack(MAGIC, len(body), record_crc(sequence, kind, body), sequence, kind) + body


def read_records(fd: int, limit: int) -> Iterator[Record]:
    """The whole records at the start of a segment, up to the first torn, zeroed or
    foreign one (``limit``: bytes of the segment to look at)."""
    offset = 0
    while offset + HEADER.size <= limit:
        head = os.pread(fd, HEADER.size, offset)
        if len(head) < HEADER.size:
            return
        magic, length, crc, sequence, kind = HEADER.unpack(head)
        if magic != MAGIC or offset + HEADER.size + length > limit or kind not in (KIND_MESSAGE, KIND_CANCEL):
            return
        body = os.pread(fd, length, offset + HEADER.size)
        if len(body) != length or record_crc(sequence, kind, body) != crc:
            return  # torn: the batch it belonged to never got its 250
        if kind == KIND_CANCEL:
            if length == 8:
                yield Record(sequence, kind, cancels=struct.unpack("<Q", body)[0])
        else:
            yield Record(sequence, kind, fd, offset + HEADER.size, length)
        offset += HEADER.size + length


class UnsafeTarget(ValueError):
    """A journal target that is not a Maildir file below the Maildir root."""


def check_target(root: Path, target: Target, base: bytes) -> None:
    """UnsafeTarget unless ``target`` names a plain file name with the right size in a
    Maildir below ``root`` (after resolving symbolic links)."""
    match = TARGET_NAME.fullmatch(target.filename)
    size = len(base) - (target.end - target.start) + len(target.replacement)
    if match is None or target.filename.startswith(".") or int(match[1]) != size:
        raise UnsafeTarget(f"bad file name {target.filename!r}")
    if not target.maildir.is_absolute() or ".." in target.maildir.parts:
        raise UnsafeTarget(f"{target.maildir} is not an absolute path without '..'")
    resolved, top = target.maildir.resolve(), root.resolve()
    if resolved == top or not resolved.is_relative_to(top):
        raise UnsafeTarget(f"{target.maildir} is not below the Maildir root {root}")


@attrs.define
class RecoveryReport:
    records: int = 0
    written: int = 0  # files written again (missing or damaged)
    refused: int = 0  # targets outside the Maildir root, or malformed


@attrs.define
class _Segment:
    index: int
    fd: int


class Journal:
    """The journal in ``directory``; message files go below ``maildir_root`` only."""

    def __init__(self, directory: Path, maildir_root: Path, segment_size: int = SEGMENT_SIZE,
                 checkpoint_seconds: float = CHECKPOINT_SECONDS, checkpoint_bytes: int = CHECKPOINT_BYTES,
                 use_syncfs: bool = True, clock: Callable[[], float] = time.monotonic,
                 peers: Sequence[Path] = (), advertise: bool = False) -> None:
        self.directory = directory
        self.peers = tuple(peers)  # the other worker processes' journal directories (POP3 asks them)
        self.advertise = advertise  # keep journal/covered up to date for them
        self.maildir_root = maildir_root
        self.segment_size = segment_size
        self.checkpoint_seconds = checkpoint_seconds
        self.checkpoint_bytes = checkpoint_bytes
        self.use_syncfs = use_syncfs
        self._clock = clock
        self._lock = threading.RLock()  # appends, checkpoints
        self._placing = threading.Condition(self._lock)
        self._unplaced = 0  # records appended whose files are not placed yet
        self._sequence = 0
        self._segments: list[_Segment] = []  # every segment file, by index
        self._current = 0  # position in _segments
        self._offset = 0
        self._dirty_segments: set[int] = set()  # positions holding records since the checkpoint
        self._segment_last: dict[int, int] = {}  # position -> the highest sequence written there
        self._checkpointed = 0  # the sequence number in journal/checkpoint
        self._checkpointing = threading.Lock()  # one checkpoint at a time (taken before _lock)
        self._settling_names: set[str] = set()  # unique parts a running checkpoint is syncing
        self._settling: tuple[list[Path], set[Path]] = ([], set())  # and its files and Maildirs
        self._since_checkpoint = 0  # bytes
        self._last_checkpoint = clock()
        self._placed: list[Path] = []  # files placed since the checkpoint (fsync fallback)
        self._pending_names: set[str] = set()  # their unique parts (POP3 asks)
        self._touched: set[Path] = set()  # Maildirs placed into since the checkpoint
        self._retry_at = 0.0  # after a failed checkpoint
        self._lock_fd: int | None = None
        self._misfits: list[int] = []  # segments found with the wrong size
        self._covered = Coverage(0.0, 0.0, idle=False)  # what journal/covered says now
        self.is_open = False

    # -- start and stop ---------------------------------------------------------

    def open(self, lock_wait: float = 0.0) -> RecoveryReport:
        """Replay what the last run left un-checkpointed, then get ready to append (blocking);
        ``lock_wait``: seconds to wait for another process to let go of the journal."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._take_lock(lock_wait)
        checkpointed = self._checkpointed = self._read_checkpoint()
        records: list[Record] = []
        highest = checkpointed
        for index, fd in self._existing_segments():
            self._segments.append(_Segment(index, fd))
            for record in read_records(fd, self.segment_size):
                highest = max(highest, record.sequence)
                if record.sequence > checkpointed:
                    records.append(record)
        report = self._replay(records)
        self._sequence = highest
        if records:
            self._make_placed_durable(self._placed, self._touched)
            self._write_checkpoint(highest)
            crash_point("journal.recovery.checkpointed")
        self._reset_placed()
        self._reset_misfits()
        while len(self._segments) < 2:
            self._segments.append(self._new_segment())
        self._current, self._offset = 0, 0
        self._advertise(time.time(), time.monotonic(), idle=True)  # everything before now is checkpointed
        self.is_open = True
        _register(self)
        if report.records:
            log.info("journal: replayed {records} message(s) after a crash, {written} file(s) written again, "
                     "{refused} target(s) refused", records=report.records, written=report.written,
                     refused=report.refused)
        return report

    def abandon(self) -> None:
        """Close without a checkpoint: what a crash leaves behind (crash tests)."""
        with self._lock:
            for fd in [s.fd for s in self._segments] + ([self._lock_fd] if self._lock_fd is not None else []):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._segments, self._lock_fd, self.is_open = [], None, False
            _unregister(self)

    def _take_lock(self, wait: float = 0.0) -> None:
        """One process per journal: a second daemon on the same spool would replay and
        reuse segments under the first one's feet."""
        fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)  # start-up only: nothing else runs yet
                    continue
            os.close(fd)
            raise OSError(errno.EBUSY, f"{self.directory} is in use by another process "
                                       "(one journal per daemon: give each its own spool_dir)") from None
        self._lock_fd = fd

    def close(self) -> None:
        """Checkpoint (everything placed becomes durable in its Maildir) and close."""
        with self._lock:
            if not self.is_open:
                return
            self.checkpoint()
            self.is_open = False
            for segment in self._segments:
                os.close(segment.fd)
            self._segments = []
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
            _unregister(self)

    def _existing_segments(self) -> list[tuple[int, int]]:
        """Our segment files (symbolic links removed unread, other odd files left alone),
        opened; one of the wrong size is read up to a segment's size and reset after replay."""
        found: list[tuple[int, int]] = []
        with os.scandir(self.directory) as entries:
            for entry in entries:
                match = SEGMENT_NAME.match(entry.name)
                if match is None:
                    continue
                if len(found) >= MAX_SEGMENTS:
                    log.error("journal: more than {n} segments in {dir}: {name} ignored", n=MAX_SEGMENTS,
                              dir=str(self.directory), name=entry.name)
                    continue
                if entry.is_symlink():
                    log.error("journal: {path} is a symbolic link: removed, not read", path=entry.path)
                    os.unlink(entry.path)
                    continue
                if not entry.is_file(follow_symlinks=False):
                    log.error("journal: {path} is not a regular file: ignored", path=entry.path)
                    continue
                fd = os.open(entry.path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)
                if os.fstat(fd).st_size != self.segment_size:
                    log.warn("journal: {path} is not a {size}-byte segment: reset after replay",
                             path=entry.path, size=self.segment_size)
                    self._misfits.append(fd)
                found.append((int(match[1]), fd))
        found.sort()
        return found

    def _reset_misfits(self) -> None:
        for fd in self._misfits:
            os.ftruncate(fd, 0)
            _zero_fill(fd, self.segment_size)
            os.fsync(fd)
        self._misfits = []

    def _new_segment(self) -> _Segment:
        """A zero-filled, fsynced segment (then appends change no metadata)."""
        index = max((s.index for s in self._segments), default=0) + 1
        path = self.directory / f"segment.{index:06d}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            _zero_fill(fd, self.segment_size)
            os.fsync(fd)
            fsync_directory(self.directory)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        return _Segment(index, fd)

    # -- appending --------------------------------------------------------------

    def append(self, bodies: Sequence[bytes]) -> list[int]:
        """Append one message record per body and make them durable with one
        flushed write per segment touched (one, nearly always); their sequence numbers.
        The caller places the files, then calls :meth:`placed`."""
        with self._lock:
            if not self.is_open:
                raise OSError(errno.ESHUTDOWN, "the journal is closed")
            sizes = [HEADER.size + len(body) for body in bodies]
            if max(sizes, default=0) > self.segment_size:
                raise ValueError("record larger than a journal segment")
            plan = self._plan(sizes)
            if self._covered.idle:
                self._advertise_busy()
            first = self._sequence + 1
            self._sequence += len(bodies)
            runs: dict[int, tuple[int, list[bytes]]] = {}
            for n, (body, (position, offset)) in enumerate(zip(bodies, plan, strict=True)):
                record = encode_record(first + n, KIND_MESSAGE, body)
                runs.setdefault(position, (offset, []))[1].append(record)
            for position, (offset, records) in runs.items():
                fd = self._segments[position].fd
                # written and flushed in ONE system call: with RWF_DSYNC the write's data is
                # on stable storage when it returns, as after an fdatasync (the segment is
                # preallocated, so no metadata is involved)
                _pwritev_all(fd, records, offset, os.RWF_DSYNC)
                self._dirty_segments.add(position)
                self._segment_last[position] = first + len(bodies) - 1
                crash_point("journal.append.written")
                crash_point("journal.append.synced")
            self._since_checkpoint += sum(sizes)
            self._unplaced += len(bodies)
            return list(range(first, first + len(bodies)))

    def _plan(self, sizes: Sequence[int]) -> list[tuple[int, int]]:
        """(segment position, offset) for records of ``sizes``; moves on to free
        segments (new ones up to a limit, else after a checkpoint frees them all)."""
        for attempt in range(2):
            free = [p for p in range(len(self._segments)) if p != self._current and p not in self._dirty_segments]
            position, offset = self._current, self._offset
            plan: list[tuple[int, int]] = []
            for size in sizes:
                if offset + size > self.segment_size:
                    if not free and len(self._segments) < MAX_SEGMENTS // 2:
                        self._segments.append(self._new_segment())
                        free.append(len(self._segments) - 1)
                    if not free:
                        break
                    position, offset = free.pop(0), 0
                plan.append((position, offset))
                offset += size
            if len(plan) == len(sizes):
                self._current, self._offset = position, offset
                return plan
            if attempt == 0:
                self._checkpoint_locked()  # every segment is free after it
        raise OSError(errno.ENOSPC, "the batch does not fit into the journal")

    def cancel(self, sequence: int) -> None:
        """Void a record whose files could not all be placed (the client got 4xx): recovery
        skips it.  Not synced now: it rides on the next batch's flush (lost, the message
        would be delivered once more, never lost)."""
        with self._lock:
            self._sequence += 1
            record = encode_record(self._sequence, KIND_CANCEL, struct.pack("<Q", sequence))
            [(position, offset)] = self._plan([len(record)])
            os.pwrite(self._segments[position].fd, record, offset)
            self._dirty_segments.add(position)
            self._segment_last[position] = self._sequence

    def placed(self, paths: Iterable[Path], count: int = 1) -> None:
        """``count`` appended records' files are in place (or given up): a checkpoint may cover them."""
        with self._lock:
            for path in paths:
                self._placed.append(path)
                self._pending_names.add(unique_part(path.name))
                self._touched.add(path.parent.parent)
            self._unplaced -= count
            self._placing.notify_all()

    # -- checkpoints ------------------------------------------------------------

    def checkpoint_due_in(self) -> float | None:
        """Seconds until the next checkpoint is due (0: now); None when nothing waits for one."""
        with self._lock:
            if not self._dirty_segments and not self._placed:
                return None
            now = self._clock()
            if self._since_checkpoint >= self.checkpoint_bytes:
                return max(0.0, self._retry_at - now)
            return max(0.0, self._last_checkpoint + self.checkpoint_seconds - now, self._retry_at - now)

    def checkpoint(self) -> None:
        """Make every placed file durable, then free the journal behind it (blocking).
        Appends go on meanwhile: the sync runs outside the append lock."""
        with self._checkpointing:
            with self._lock:
                if not self._placing.wait_for(lambda: self._unplaced == 0, timeout=60):
                    raise OSError(errno.EBUSY, "journal checkpoint: files still being placed after 60 s")
                if not self._dirty_segments and not self._placed:
                    if self.advertise and not self._covered.idle:
                        self._advertise(time.time(), time.monotonic(), idle=True)
                    return
                through, placed, touched = self._sequence, self._placed, self._touched
                snapshot = (time.time(), time.monotonic())  # every record appended before it is placed
                self._settling_names, self._settling = self._pending_names, (placed, touched)
                self._reset_placed()
            started = time.monotonic()
            try:
                self._make_placed_durable(placed, touched)
                crash_point("journal.checkpoint.synced")
                with self._lock:
                    self._write_checkpoint(through)
                    crash_point("journal.checkpoint.written")
                    self._dirty_segments = {p for p in self._dirty_segments if self._segment_last.get(p, 0) > through}
                    self._settling_names, self._settling = set(), ([], set())
                    self._advertise(*snapshot, idle=self._sequence == through and self._unplaced == 0)
                METRICS.observe("mailappliance_journal_checkpoint_seconds", time.monotonic() - started)
            except OSError:
                with self._lock:  # the next attempt covers these files again
                    self._placed = list(placed) + self._placed
                    self._touched |= touched
                    self._pending_names |= self._settling_names
                    self._settling_names, self._settling = set(), ([], set())
                    self._retry_at = self._clock() + 1.0  # the journal keeps the messages meanwhile
                raise

    def _checkpoint_locked(self) -> None:
        """A checkpoint while holding the append lock (the journal is full): nothing
        appends meanwhile, and the files a concurrent checkpoint is syncing are synced again."""
        if not self._placing.wait_for(lambda: self._unplaced == 0, timeout=60):
            raise OSError(errno.EBUSY, "journal checkpoint: files still being placed after 60 s")
        snapshot = (time.time(), time.monotonic())
        try:
            settling_placed, settling_touched = self._settling  # a checkpoint outside the lock may not be done
            self._make_placed_durable([*settling_placed, *self._placed], settling_touched | self._touched)
            crash_point("journal.checkpoint.synced")
            self._write_checkpoint(self._sequence)
        except OSError:
            self._retry_at = self._clock() + 1.0
            raise
        crash_point("journal.checkpoint.written")
        self._dirty_segments.clear()  # every record is <= the checkpoint: every segment is free
        self._reset_placed()
        self._advertise(*snapshot, idle=True)

    def _reset_placed(self) -> None:
        self._placed, self._pending_names, self._touched = [], set(), set()
        self._since_checkpoint = 0
        self._last_checkpoint = self._clock()

    def _advertise(self, wall: float, mono: float, idle: bool) -> None:
        """Write journal/covered (with several workers): every record appended before
        ``wall``/``mono`` is durable in its Maildir and checkpointed; ``idle``: and none since.
        No fsync: after a power loss every journal is replayed and the file written again
        before any process reads it.  A failure only makes readers wait longer."""
        coverage = Coverage(wall, mono, idle)
        if not self.advertise:
            self._covered = coverage
            return
        try:
            _write_small(self.directory / COVERED, coverage.encode())
        except OSError:
            log.failure("journal: could not write {path} (POP3 in other processes waits longer)",
                        path=str(self.directory / COVERED))
            return
        self._covered = coverage

    def _advertise_busy(self) -> None:
        """Before the first record after an idle spell: readers must no longer take
        "idle" for "everything covered".  Must not fail silently: a file left saying
        "idle" would let another process delete a message recovery brings back."""
        coverage = attrs.evolve(self._covered, idle=False)
        if self.advertise:
            try:
                _write_small(self.directory / COVERED, coverage.encode())
            except OSError:
                os.unlink(self.directory / COVERED)  # absent reads as "nothing covered"; else the append fails
        self._covered = coverage

    def settle(self, paths: Iterable[Path]) -> None:
        """Before POP3 removes ``paths``: checkpoint if any of them is still covered only by
        the journal (recovery would write it again: a message back from the dead)."""
        listed = {unique_part(p.name) for p in paths}
        with self._lock:
            pending = not listed.isdisjoint(self._pending_names) or not listed.isdisjoint(self._settling_names)
        if pending:
            self.checkpoint()  # waits for a running one first, then syncs what is left

    def _make_placed_durable(self, placed: Sequence[Path], touched: set[Path]) -> None:
        """Every file ``placed`` since the checkpoint, and its directory entry, on stable storage."""
        if self.use_syncfs:
            devices: dict[int, Path] = {}
            for maildir in touched:
                with contextlib.suppress(FileNotFoundError):
                    devices.setdefault(os.stat(maildir).st_dev, maildir)
            for maildir in devices.values():
                fd = os.open(maildir, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    syncfs(fd)
                finally:
                    os.close(fd)
            return
        missing: dict[Path, set[str]] = {}
        for path in placed:
            try:
                fsync_file(path)
            except FileNotFoundError:  # POP3 moved it to cur/ (or deleted it after a settle)
                missing.setdefault(path.parent.parent, set()).add(unique_part(path.name))
        for maildir, names in missing.items():
            with contextlib.suppress(FileNotFoundError), os.scandir(maildir / "cur") as entries:
                for entry in entries:
                    if unique_part(entry.name) in names:
                        with contextlib.suppress(FileNotFoundError):
                            fsync_file(Path(entry.path))
        for maildir in touched:
            for sub in ("new", "cur"):
                with contextlib.suppress(FileNotFoundError):
                    fsync_directory(maildir / sub)

    def _read_checkpoint(self) -> int:
        try:
            data = (self.directory / "checkpoint").read_bytes()
        except FileNotFoundError:
            return 0
        if len(data) != 12 or zlib.crc32(data[:8]) != struct.unpack("<I", data[8:])[0]:
            raise OSError(errno.EIO, f"{self.directory / 'checkpoint'} is damaged: "
                                     "move it aside to replay every journal record")
        return int(struct.unpack("<Q", data[:8])[0])

    def _write_checkpoint(self, sequence: int) -> None:
        sequence = max(sequence, self._checkpointed)  # never backwards (two checkpoints crossing)
        head = struct.pack("<Q", sequence)
        staged = self.directory / "checkpoint.tmp"
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, head + struct.pack("<I", zlib.crc32(head)))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(staged, self.directory / "checkpoint")
        fsync_directory(self.directory)
        self._checkpointed = sequence

    # -- recovery ---------------------------------------------------------------

    def _replay(self, records: list[Record]) -> RecoveryReport:
        report = RecoveryReport()
        cancelled = {r.cancels for r in records if r.kind == KIND_CANCEL}
        listings: dict[Path, dict[str, str]] = {}
        for record in sorted(records, key=lambda r: r.sequence):
            if record.kind != KIND_MESSAGE or record.sequence in cancelled:
                continue
            report.records += 1
            try:
                base, targets = record.load()
            except (ValueError, UnicodeDecodeError):
                log.error("journal record {seq} is malformed (its CRC matched): skipped", seq=record.sequence)
                report.refused += 1
                continue
            for target in targets:
                try:
                    check_target(self.maildir_root, target, base)
                except UnsafeTarget as e:
                    log.error("journal record {seq}: target refused: {why}", seq=record.sequence, why=str(e))
                    report.refused += 1
                    continue
                if self._restore(target, base, listings):
                    report.written += 1
        return report

    def _restore(self, target: Target, base: bytes, listings: dict[Path, dict[str, str]]) -> bool:
        """Make ``target`` whole where it is (new/ or cur/); True when it had to be written."""
        content = target.content(base)
        ensure_maildir_once(target.maildir)
        unique = unique_part(target.filename)
        where = target.maildir / "new" / target.filename
        if not where.exists():
            if target.maildir not in listings:
                with os.scandir(target.maildir / "cur") as entries:
                    listings[target.maildir] = {unique_part(e.name): e.name for e in entries}
            name = listings[target.maildir].get(unique)
            if name is not None:
                where = target.maildir / "cur" / name
        self._touched.add(target.maildir)  # found whole after a kill -9 is not yet durable either
        if where.exists() and _same_bytes(where, content):
            self._placed.append(where)
            return False
        staged = write_file(target.maildir, target.filename, content)
        final = where if where.exists() else target.maildir / "new" / target.filename
        os.rename(staged, final)
        self._placed.append(final)
        return True


def _same_bytes(path: Path, content: bytes) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        if os.fstat(fd).st_size != len(content):
            return False
        return os.pread(fd, len(content) + 1, 0) == content
    finally:
        os.close(fd)


def _pwritev_all(fd: int, buffers: Sequence[bytes], offset: int, flags: int) -> None:
    """Every byte of ``buffers`` at ``offset`` (a short write is continued)."""
    if len(buffers) > _IOV_MAX:
        buffers = [b"".join(buffers)]
    total = sum(len(b) for b in buffers)
    done = os.pwritev(fd, buffers, offset, flags)
    if done < total:
        rest = memoryview(b"".join(buffers))[done:]
        while rest:
            written = os.pwritev(fd, [rest], offset + done, flags)
            rest, done = rest[written:], done + written


_IOV_MAX = 512  # buffers per pwritev (the kernel takes at most 1024)


def _zero_fill(fd: int, size: int) -> None:
    block = bytes(1024 * 1024)
    written = 0
    while written < size:
        written += os.pwrite(fd, block[: min(len(block), size - written)], written)


COVERED = "covered"
COVER_MARGIN = 1.0  # seconds: a file's mtime is the kernel's coarse clock, behind the real time by a tick
CLOCK_STEP = 0.25  # seconds the wall clock may move against the monotonic one before mtimes count for nothing


@attrs.frozen
class Coverage:
    """A journal's ``covered`` file: every record it appended before ``wall`` (the wall
    clock) and ``mono`` (CLOCK_MONOTONIC, the same in every process) is durable in its
    Maildir and will never be replayed; ``idle``: and it has appended none since."""

    wall: float
    mono: float
    idle: bool

    def encode(self) -> bytes:
        return f"{self.wall:.6f} {self.mono:.6f} {int(self.idle)}\n".encode()

    @classmethod
    def decode(cls, data: bytes) -> Coverage:
        """Anything but what :meth:`encode` writes means "nothing covered" (readers wait)."""
        try:
            wall, mono, idle = data.decode("ascii").split()
            coverage = cls(float(wall), float(mono), idle == "1")
        except (ValueError, UnicodeDecodeError):
            return NOTHING_COVERED
        if not (all(map(_finite, (coverage.wall, coverage.mono))) and idle in ("0", "1")):
            return NOTHING_COVERED
        return coverage


NOTHING_COVERED = Coverage(0.0, 0.0, idle=False)


def _finite(value: float) -> bool:
    return value == value and abs(value) < 1e12


def must_wait(mtime: float, seen: float, coverage: Coverage, now_wall: float, now_mono: float) -> bool:
    """Must removing a Maildir file wait for another process's journal?  The pure rule.

    ``mtime``: the file's modification time (its bytes were written after its journal
    record was appended); ``seen``: a monotonic time at which the file was known to
    exist (so its record was appended before that); ``coverage``: the other journal's
    ``covered`` file, read after ``seen``; ``now_*``: the clocks when it was read.
    No wait when that journal was idle, or its coverage began after the file existed
    (monotonic: immune to clock steps), or after the file's mtime plus a margin, when
    the wall clock has not stepped since the coverage was taken."""
    if coverage.idle or coverage.mono > seen:
        return False
    stepped = abs((coverage.wall - coverage.mono) - (now_wall - now_mono)) > CLOCK_STEP
    return stepped or mtime + COVER_MARGIN >= coverage.wall


def read_coverage(directory: Path) -> Coverage:
    """A journal's ``covered`` file; unreadable or absent: nothing covered."""
    try:
        fd = os.open(directory / COVERED, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return NOTHING_COVERED
    try:
        return Coverage.decode(os.read(fd, 128))
    except OSError:
        return NOTHING_COVERED
    finally:
        os.close(fd)


def _write_small(path: Path, data: bytes) -> None:
    """``data`` into ``path`` by rename (readers see the old file or the new one, whole)."""
    staged = path.with_name(path.name + ".tmp")
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        write_all(fd, data)
    finally:
        os.close(fd)
    os.rename(staged, path)


_active: list[Journal] = []
_active_lock = threading.Lock()


def _register(journal: Journal) -> None:
    with _active_lock:
        _active.append(journal)


def _unregister(journal: Journal) -> None:
    with _active_lock:
        if journal in _active:
            _active.remove(journal)


def settle_before_removing(paths: Iterable[Path]) -> None:
    """POP3 calls this (blocking) before it unlinks messages at QUIT: any of them still
    covered only by the journal is made durable first, so recovery never brings a deleted
    message back.  Nothing to do without a journal."""
    with _active_lock:
        journals = list(_active)
    if journals:
        listed = list(paths)
        for journal in journals:
            journal.settle(listed)


def peers_to_wait_for(paths: Iterable[Path]) -> list[Path]:
    """POP3 calls this (blocking, after :func:`settle_before_removing`) before it unlinks
    messages at QUIT: the other worker processes' journals that may still replay one of
    ``paths`` (:func:`must_wait`).  The caller waits without blocking and asks again; an
    empty list: safe to remove.  A file already gone needs nobody."""
    with _active_lock:
        peers = sorted({peer for journal in _active for peer in journal.peers})
    if not peers:
        return []
    mtimes = []
    for path in paths:
        try:
            mtimes.append(os.stat(path, follow_symlinks=False).st_mtime)
        except FileNotFoundError:
            continue
    if not mtimes:
        return []
    seen = time.monotonic()  # every file above existed before this
    youngest = max(mtimes)
    waiting = []
    for peer in peers:
        coverage = read_coverage(peer)
        if must_wait(youngest, seen, coverage, time.time(), time.monotonic()):
            waiting.append(peer)
    return waiting


def journal_directory(spool_dir: Path, index: int) -> Path:
    """Worker ``index``'s journal: ``<spool>/journal`` for the supervisor (as with one
    process, so an existing spool recovers), ``<spool>/journal.<index>`` for the others."""
    return spool_dir / "journal" if index == 0 else spool_dir / f"journal.{index}"


JOURNAL_DIRECTORY = re.compile(r"^journal(?:\.([1-9][0-9]{0,5}))?$")


def journal_for(sync: str, spool_dir: Path, maildir_root: Path, index: int = 0, workers: int = 1) -> Journal | None:
    """The journal ``[storage] sync`` asks for, of worker process ``index`` of ``workers``, or None."""
    if sync != "journal":
        return None
    peers = [journal_directory(spool_dir, other) for other in range(workers) if other != index]
    return Journal(journal_directory(spool_dir, index), maildir_root, use_syncfs=syncfs_available(),
                   checkpoint_seconds=checkpoint_seconds(), peers=peers, advertise=workers > 1)


def checkpoint_seconds() -> float:
    """The checkpoint interval: CHECKPOINT_SECONDS, or MAILAPPLIANCE_CHECKPOINT_SECONDS
    (0.5 to 300; tests use it to hold a checkpoint back)."""
    try:
        value = float(os.environ.get("MAILAPPLIANCE_CHECKPOINT_SECONDS", CHECKPOINT_SECONDS))
    except ValueError:
        return CHECKPOINT_SECONDS
    return min(300.0, max(0.5, value)) if _finite(value) else CHECKPOINT_SECONDS


def settle_wait_limit() -> float:
    """How long POP3's QUIT waits for other processes' journals before it answers -ERR
    (and deletes nothing): three checkpoint intervals."""
    return 3 * checkpoint_seconds()


def recover_journals(spool_dir: Path, maildir_root: Path, lock_wait: float = 12.0,
                     keep: int | None = None) -> RecoveryReport:
    """The supervisor at start, before any listener accepts or worker starts: replay and
    checkpoint every journal directory in the spool (also those of worker numbers an
    earlier, larger ``workers`` left), whatever ``sync`` says now.  Waits up to
    ``lock_wait`` seconds for a journal's lock (a worker of the previous run still stopping).
    ``keep``: how many journals the configuration uses (``workers``, or 0 without
    ``sync = "journal"``); the directory of any other worker number is removed once replayed
    (:func:`remove_journal_directory`); None keeps every one."""
    total = RecoveryReport()
    try:
        names = [entry.name for entry in os.scandir(spool_dir)]
    except FileNotFoundError:
        return total
    for name in sorted(n for n in names if REMOVING_DIRECTORY.match(n)):
        if _finish_removal(spool_dir / name):  # a removal a crash interrupted: nothing there is replayed
            log.info("journal: finished removing {path} (a removal an earlier stop interrupted)",
                     path=str(spool_dir / name))
    for name in sorted(names):
        match = JOURNAL_DIRECTORY.match(name)
        if match is None:
            continue
        directory = spool_dir / name
        if directory.is_symlink() or not directory.is_dir():
            log.error("journal: {path} is not a directory: not replayed", path=str(directory))
            continue
        unused = keep is not None and int(match[1] or 0) >= keep
        if any(SEGMENT_NAME.match(entry) for entry in os.listdir(directory)):
            journal = Journal(directory, maildir_root, use_syncfs=syncfs_available(), advertise=True)
            report = journal.open(lock_wait=lock_wait)
            journal.close()
            total.records += report.records
            total.written += report.written
            total.refused += report.refused
        if unused:
            remove_journal_directory(directory)
    return total


REMOVING_DIRECTORY = re.compile(r"^journal(?:\.[1-9][0-9]{0,5})?\.removing$")


def remove_journal_directory(directory: Path) -> bool:
    """Remove a replayed and checkpointed journal directory no process of this configuration
    uses (``workers`` lowered, or ``sync`` no longer "journal"); True when it is gone.

    Crash-safe: under the journal's own lock (a process holding it keeps its directory), the
    directory is renamed to ``<name>.removing`` and the rename made durable, and only then
    emptied.  A crash before the rename leaves the whole journal (replayed again next start:
    nothing past its checkpoint, so nothing happens); after it, a ``.removing`` directory
    that is never replayed and that the next start finishes removing."""
    try:
        fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        log.error("journal: {path} not removed: {why}", path=str(directory), why=e.strerror or str(e))
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warn("journal: {path} is in use by another process: not removed", path=str(directory))
            return False
        trash = directory.with_name(directory.name + ".removing")
        try:
            os.rename(directory, trash)
        except OSError as e:
            log.error("journal: {path} not removed: {why}", path=str(directory), why=e.strerror or str(e))
            return False
        try:
            fsync_directory(directory.parent)  # durable before anything in it goes
        except OSError as e:
            log.error("journal: {path} not removed: {why}", path=str(directory), why=e.strerror or str(e))
            return False  # the next start finishes (or finds the whole journal again)
        crash_point("journal.remove.renamed")
    finally:
        os.close(fd)
    if _finish_removal(trash):
        log.info("journal: removed {path}, which no worker of this configuration uses (replayed and "
                 "checkpointed)", path=str(directory))
        return True
    return False


def _finish_removal(trash: Path) -> bool:
    """Remove a ``.removing`` directory (every record in it was replayed and checkpointed)."""
    try:
        if trash.is_symlink() or not trash.is_dir():
            log.error("journal: {path} is not a directory: left alone", path=str(trash))
            return False
        with os.scandir(trash) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)  # none of ours; never follows a symbolic link
                else:
                    os.unlink(entry.path)
                crash_point("journal.remove.unlinked")
        os.rmdir(trash)
    except OSError as e:
        log.error("journal: could not finish removing {path}: {why}", path=str(trash), why=e.strerror or str(e))
        return False
    return True
