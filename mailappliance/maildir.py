"""Durable Maildir delivery.

A message is received in memory (larger ones spill into one file in
``<spool>/incoming``, written by the spill writer thread) while DATA streams in.  ``delivery.commit_batch``
(blocking: the ``BatchCommitter`` thread runs it) writes and fsyncs that file, hard-links it
into each recipient's ``new/`` (copying when the spool is on another
filesystem, via ``tmp/``, fsync, rename), fsyncs each ``new/`` directory, and
only then may the SMTP layer answer 250.  A file in ``new/`` is
therefore always whole: it appears by an atomic link or rename of a file whose
bytes are already on disk.  Maildir files are never modified in place, so
recipients sharing one inode is safe (Dovecot does the same).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import ctypes
import errno
import fcntl
import functools
import itertools
import mmap
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from mailappliance.addresses import is_safe_mailbox_name

_counter = itertools.count()
_hostname = socket.gethostname().replace("/", "\\057").replace(":", "\\072").replace(",", "\\054")

MAILDIR_SUBDIRS = ("tmp", "new", "cur")


@functools.lru_cache(maxsize=4096)
def maildir_for(root: Path, uid: str) -> Path:
    """Where subscriber ``uid`` keeps mail; ValueError for a uid that cannot
    safely name a directory there (the directory may hold entries made with
    other tools than ours).  Remembered: every RCPT asks, and a Path costs a parse."""
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
DIRECT_LIMIT = 256 * 1024  # a larger message handed to the commit is written like a spilled one, not journaled
SPILL_PIECE = 256 * 1024  # a spilled message goes to the spill writer in pieces of about this size
SPILL_BACKLOG = 16 * 1024 * 1024  # handed to the spill writer and not yet written, all messages together
DIRECT_IO = True  # large messages' files written with O_DIRECT (SpillWriter)
_IOV_GROUP = 512  # buffers per writev (the kernel takes at most IOV_MAX, 1024 on Linux)


def writev_all(fd: int, chunks: list[bytes]) -> None:
    """Write ``chunks`` in order with few system calls (os.writev may take less than all)."""
    for first in range(0, len(chunks), _IOV_GROUP):
        group = chunks[first:first + _IOV_GROUP]
        done = os.writev(fd, group)
        total = sum(map(len, group))
        if done < total:
            write_all(fd, b"".join(group)[done:])


TEST_STALL_ENVIRONMENT = "MAILAPPLIANCE_TEST_SPILL_STALL"  # tests only: a file that, while it exists, hangs the disk
_test_stall = os.environ.get(TEST_STALL_ENVIRONMENT, "")


def _hung_disk_for_tests() -> None:
    """A test's hung disk (tests/hostile/test_spill_stall.py): the spill writer writes
    nothing while the file named by ``$MAILAPPLIANCE_TEST_SPILL_STALL`` exists."""
    while _test_stall and os.path.exists(_test_stall):
        time.sleep(0.02)


class SpillWriter:
    """The thread that writes spilled messages into their incoming files.

    The reactor thread hands over a large message's bytes in pieces and goes
    on reading; copying them into the page cache (a 1 MB message: ~2.7 ms in
    the kernel here, most of the reactor's time when it wrote them itself)
    runs on another core meanwhile.  One thread, in order, so each file is
    written front to back.  The pieces handed over and not yet written are
    bounded for the whole process (``backlog``).  Past it nothing waits in
    the reactor thread: ``offer`` keeps the piece in its message, which joins
    ``_waiting`` (first come, first handed over), and its session stops
    reading.  Once the disk has taken the backlog down to ``low_water`` the
    writer asks the reactor thread (``call_from_thread``, no polling) to hand
    the waiting pieces over in order and let their sessions go on.  A slow or
    hung disk so pauses the sessions that send large messages, never the
    others.  A write error is kept in the message and raised by its commit
    (4xx, never a lost message).
    """

    def __init__(self, backlog: int = SPILL_BACKLOG,
                 call_from_thread: Callable[[Callable[[], None]], object] | None = None) -> None:
        self.lock = threading.Condition()  # the queue, the waiting messages and each one's pieces in flight
        self._staging: mmap.mmap | None = None  # page-aligned, for O_DIRECT writes
        self._jobs: collections.deque[tuple[IncomingMessage, list[bytes] | None, int]] = collections.deque()
        self._queued = 0
        self._backlog = backlog
        self.low_water = backlog // 2  # waiting messages are handed over once the backlog is down to this
        self._waiting: collections.deque[IncomingMessage] = collections.deque()  # held back, in arrival order
        self._wake_due = False  # an _admit is on its way to the reactor thread
        self._call_from_thread = call_from_thread  # the reactor's callFromThread unless a test gives one
        self._thread: threading.Thread | None = None

    @property
    def waiting(self) -> int:
        """Messages whose pieces wait for room in the backlog (their sessions are paused)."""
        return len(self._waiting)

    def submit(self, message: IncomingMessage, chunks: list[bytes] | None, size: int) -> None:
        """Queue ``chunks`` (``size`` bytes) for the end of ``message``'s file; None: close
        and remove the file once everything before it is done (a discarded message).
        Never waits, past the backlog too: for a complete message whose bytes are held in
        memory either way (``offer`` is the bounded way in)."""
        with self.lock:
            self._enqueue(message, chunks, size)

    def offer(self, message: IncomingMessage) -> bool:
        """Hand over ``message``'s pending pieces if the backlog has room for them and
        no message waits before it.  Otherwise (False) they stay in the message, which
        waits for the writer to drain (``IncomingMessage.held_back``); the reactor thread
        hands them over later and calls the message's ``when_room`` callback.  Never waits."""
        with self.lock:
            if not self._waiting and not self._full(message._pending):
                self._take(message)
                return True
            if self._call_from_thread is None:  # the reactor thread, the first time a message waits
                from twisted.internet import reactor
                self._call_from_thread = reactor.callFromThread  # type: ignore[attr-defined]
            message._held_back = True
            self._waiting.append(message)
            wake = self._wake_needed()
        if wake:
            self._wake()
        return False

    def withdraw(self, message: IncomingMessage) -> None:
        """``message`` no longer waits (it is complete, or discarded); its pieces stay in it.
        Any thread: the reactor's ``_admit`` hands nothing of it over after this."""
        with self.lock:
            if message._held_back:
                message._held_back = False
                self._waiting.remove(message)
            message._on_room = None

    def _full(self, size: int) -> bool:
        return bool(self._queued) and self._queued + size > self._backlog

    def _take(self, message: IncomingMessage) -> None:
        """(Under the lock.)  The message's pending pieces into the queue."""
        chunks, size = message._chunks, message._pending
        message._chunks, message._pending = [], 0
        self._enqueue(message, chunks, size)

    def _enqueue(self, message: IncomingMessage, chunks: list[bytes] | None, size: int) -> None:
        if chunks is not None:
            message._in_flight.append(chunks)
        self._jobs.append((message, chunks, size))
        self._queued += size
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="spill-writer", daemon=True)
            self._thread.start()
        self.lock.notify_all()

    def _wake_needed(self) -> bool:
        """(Under the lock.)  Whether to send an ``_admit`` to the reactor thread now: a
        message waits, the backlog is down to the low-water mark and none is on its way."""
        if self._waiting and not self._wake_due and self._queued <= self.low_water:
            self._wake_due = True
            return True
        return False

    def _wake(self) -> None:
        assert self._call_from_thread is not None
        try:
            self._call_from_thread(self._admit)
        except Exception:  # the reactor is gone (shutting down): nobody is left to go on
            with self.lock:
                self._wake_due = False

    def _admit(self) -> None:
        """(The reactor thread.)  Hand the waiting messages' pieces over, first come first,
        while they fit; each one handed over is told (its session reads again)."""
        admitted = []
        with self.lock:
            self._wake_due = False
            while self._waiting and not self._full(self._waiting[0]._pending):
                message = self._waiting.popleft()
                message._held_back = False
                self._take(message)
                admitted.append(message)
        for message in admitted:
            callback, message._on_room = message._on_room, None
            if callback is not None:
                callback()

    def drop_queued(self, message: IncomingMessage) -> None:
        """(Under the lock.)  Empty ``message``'s pieces that wait in the queue (not the one
        being written): an abandoned message's memory goes now, not when a hung disk returns."""
        for queued, chunks, _ in self._jobs:
            if queued is message and chunks:
                chunks.clear()

    def wait_for(self, message: IncomingMessage) -> None:
        """Until every piece of ``message`` handed over is written (or failed)."""
        with self.lock:
            while message._in_flight:
                self.lock.wait()

    def _run(self) -> None:
        while True:
            with self.lock:
                while not self._jobs:
                    self.lock.wait()
                message, chunks, size = self._jobs.popleft()
            error: OSError | None = None
            if chunks is None:
                message._close()
                message._unlink()
            elif message._error is None and not message._discarded:  # a refused message's rest is not written
                if _test_stall:
                    _hung_disk_for_tests()
                try:
                    if message._fd is None:
                        message._fd = message._create(direct=True)
                    if message._direct:
                        try:
                            self._write_direct(message, chunks)
                        except OSError as e:  # EINVAL at the first write: O_DIRECT opened but not taken
                            if e.errno != errno.EINVAL or message._direct_offset:
                                raise
                            message._buffered()
                            writev_all(message._fd, [message._carry, *chunks])
                            message._direct_offset, message._carry = size + len(message._carry), b""
                    else:
                        writev_all(message._fd, chunks)
                        message._direct_offset += size
                except OSError as e:
                    error = e
                except Exception as e:  # a bug must not stop the thread every large message needs
                    error = OSError(errno.EIO, f"internal error: {e!r}")
            with self.lock:
                if chunks is not None:
                    if error is not None and message._error is None:
                        message._error = error
                    message._in_flight.popleft()
                    message._written, message._unwritten = message._direct_offset, message._carry
                self._queued -= size
                wake = self._wake_needed()
                self.lock.notify_all()
            if wake:
                self._wake()

    def _write_direct(self, message: IncomingMessage, chunks: list[bytes]) -> None:
        """Write what fills whole blocks with O_DIRECT (through the page-aligned staging
        buffer); the rest waits in ``message._carry`` for the next piece or the finish."""
        assert message._fd is not None
        if self._staging is None:
            self._staging = mmap.mmap(-1, DIRECT_STAGING)
        staging, capacity = self._staging, len(self._staging)
        data = [message._carry, *chunks] if message._carry else chunks
        left = sum(map(len, data))
        left -= left % DIRECT_BLOCK  # through the staging buffer; the rest is carried
        filled, carried = 0, []
        for chunk in data:
            view = memoryview(chunk)
            while view and left:
                n = min(len(view), capacity - filled, left)
                staging[filled:filled + n] = view[:n]
                filled, left, view = filled + n, left - n, view[n:]
                if filled == capacity or not left:
                    _pwrite_all(message._fd, memoryview(staging)[:filled], message._direct_offset)
                    message._direct_offset += filled
                    filled = 0
            if view:
                carried.append(bytes(view))
        message._carry = b"".join(carried)


FRONT = 128 * 1024  # the start of a spilled message kept in memory: message authentication reads 64 KiB of head


def _chunks_covering(chunks: list[bytes], size: int) -> int:
    """How many of the first ``chunks`` hold at least ``size`` bytes (or all of them)."""
    total = 0
    for n, chunk in enumerate(chunks, 1):
        total += len(chunk)
        if total >= size:
            return n
    return len(chunks)


DIRECT_BLOCK = 4096  # O_DIRECT offsets and lengths: a multiple of the logical block size (512 or 4096)
DIRECT_STAGING = 2 * 1024 * 1024


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


_spill_writer = SpillWriter()
SYNC_THREADS = 4
_sync_threads: concurrent.futures.ThreadPoolExecutor | None = None


def _sync_pool() -> concurrent.futures.ThreadPoolExecutor:
    """The threads that finish spilled messages (IncomingMessage.finish_early)."""
    global _sync_threads
    if _sync_threads is None:
        _sync_threads = concurrent.futures.ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="spill-sync")
    return _sync_threads


def _new_spill_writer() -> None:
    global _spill_writer, _sync_threads
    _spill_writer, _sync_threads = SpillWriter(), None


os.register_at_fork(after_in_child=_new_spill_writer)


class IncomingMessage:
    """One message being received.

    Up to ``MEMORY_LIMIT`` octets are kept in memory, so a typical message
    costs the reactor thread no file I/O at all (creating a file can wait on
    the filesystem journal behind other deliveries' fsyncs); the file in the
    spool's ``incoming`` directory is created at commit, in a commit thread,
    with one write.  Larger messages spill to that file as they stream in,
    written by the :class:`SpillWriter` thread in pieces of ``SPILL_PIECE``
    (a piece the writer's full backlog has no room for stays here, ``held_back``,
    and the session stops reading until ``when_room`` calls back);
    once handed to the commit, a sync pool thread writes the last piece and
    fsyncs the file (``finish_early``), and only then does the message join a
    commit batch (``finishing``: no commit thread waits for one message's disk).  A
    message over ``DIRECT_LIMIT`` is spilled whole when it is handed over:
    written once with O_DIRECT and synced on its own, it is quicker than the
    journal's two writes (512 KB messages: 2.2-2.6x).
    """

    def __init__(self, incoming_dir: Path) -> None:
        self.name = unique_name()
        self.path = incoming_dir / self.name
        self.size = 0
        self._chunks: list[bytes] = []  # in memory; once spilled, the bytes not yet handed over
        self._pending = 0  # bytes in _chunks of a spilled message
        self._spilled = False
        self._in_flight: collections.deque[list[bytes]] = collections.deque()  # handed over, not yet written
        self._written = 0  # bytes of a spilled message in its file (the spill writer's count)
        self._unwritten = b""  # and the bytes after those that it carries to its next piece
        self._direct = False  # the file is written with O_DIRECT (whole blocks only)
        self._direct_offset = 0  # the spill writer's own: bytes written
        self._carry = b""  # the spill writer's own: bytes short of a whole block
        self._error: OSError | None = None  # the spill writer's failure, raised at commit
        self._fd: int | None = None  # the file: the spill writer's, then the commit's
        self._moved = False  # renamed into a Maildir: the incoming name is gone
        self._created = False  # the incoming file exists (spilled, or written out)
        self._edit: tuple[int, int, bytes] | None = None  # a spilled message's pending head edit
        self._discarded = False
        self._finishing: concurrent.futures.Future[None] | None = None  # finish_early's work
        self._claimed = False  # the committer took it once finished (under the spill writer's lock)
        self._abandoned = False  # its client left first: no commit takes it (abandon)
        self._synced = False  # fsynced by finish_early
        self._front = b""  # a spilled message's first FRONT bytes or more, kept for reads of its head
        self._held_back = False  # its pending pieces wait for room in the spill writer's backlog
        self._on_room: Callable[[], None] | None = None  # told when they are handed over (when_room)

    def write(self, data: bytes) -> None:
        """Append bytes (nothing is durable until it is committed)."""
        data = bytes(data)  # kept until written: never a buffer its owner may change
        self.size += len(data)
        self._chunks.append(data)
        if self._spilled:
            self._pending += len(data)
            if self._pending >= SPILL_PIECE and not self._held_back:  # held back: they follow in order
                _spill_writer.offer(self)
        elif self.size > MEMORY_LIMIT:
            self._spill()

    def _spill(self, bounded: bool = True) -> None:
        """From now on the bytes go to the incoming file, through the spill writer
        (``bounded``: only if its backlog has room; otherwise they wait here)."""
        self._spilled = True
        self._pending = self.size
        self._front = b"".join(itertools.islice(self._chunks, _chunks_covering(self._chunks, FRONT)))
        if bounded:
            _spill_writer.offer(self)
        else:
            chunks, size = self._chunks, self._pending
            self._chunks, self._pending = [], 0
            _spill_writer.submit(self, chunks, size)

    @property
    def held_back(self) -> bool:
        """Bytes of this spilled message wait for room in the spill writer's backlog:
        whoever feeds it should stop reading until ``when_room`` calls back."""
        return self._held_back

    def when_room(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (in the reactor thread) once the held-back bytes are handed
        to the spill writer; at once if none are held back.  Not called when the message
        is discarded or completed first."""
        if not self._held_back:
            callback()
            return
        self._on_room = callback

    def _create(self, direct: bool = False) -> int:
        """The incoming file; ``direct``: written with O_DIRECT where the filesystem takes it
        (the bytes go to the disk as they arrive, so the fsync at the end has little left
        to write, and they take no page cache)."""
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL
        if direct and DIRECT_IO:
            try:
                fd = os.open(self.path, flags | os.O_DIRECT, 0o600)
            except OSError as e:
                if e.errno != errno.EINVAL:  # EINVAL: no O_DIRECT on this filesystem (tmpfs)
                    raise
            else:
                self._created, self._direct = True, True
                return fd
        fd = os.open(self.path, flags, 0o600)
        self._created = True
        return fd

    def _buffered(self) -> None:
        """No more O_DIRECT on the file (its last part, or a filesystem that refuses it)."""
        assert self._fd is not None
        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self._direct = False

    def content(self) -> bytes:
        """The whole message of one that is not spilled (the journal's record)."""
        if self._spilled:
            raise ValueError("a spilled message is read from its file")
        return self.read()

    @property
    def spilled(self) -> bool:
        return self._spilled

    def read(self, start: int = 0, limit: int | None = None) -> bytes:
        """Bytes ``start`` .. ``start + limit`` of the message as received so far
        (before any pending edit).  A spilled message is read from its file as
        far as it is written, the rest from the pieces still in memory: cheap for
        a header section, meant for a worker thread for the whole."""
        end = self.size if limit is None else min(self.size, start + limit)
        if not self._spilled:
            if len(self._chunks) > 1:
                self._chunks = [b"".join(self._chunks)]
            return self._chunks[0][start:end] if self._chunks else b""
        if end <= len(self._front):  # the head: O_DIRECT left it in no page cache, and this may be the reactor
            return self._front[start:end]
        with _spill_writer.lock:
            written = self._written
            in_memory = [self._unwritten, *(c for piece in self._in_flight for c in piece)]
        in_memory += self._chunks
        parts = []
        if start < written:  # through a descriptor of its own: an O_DIRECT one reads whole blocks only
            fd = os.open(self.path, os.O_RDONLY)
            try:
                parts.append(os.pread(fd, min(end, written) - start, start))
            finally:
                os.close(fd)
        offset = written
        for chunk in in_memory:
            if offset >= end:
                break
            if offset + len(chunk) > start:
                parts.append(chunk[max(0, start - offset):end - offset])
            offset += len(chunk)
        return b"".join(parts)

    def edit(self, start: int, end: int, replacement: bytes) -> None:
        """Replace bytes ``start`` .. ``end`` by ``replacement`` (message
        authentication's header fields, just after our Received header).  In
        memory at once; a spilled message's file is rewritten by ``write_out``
        in the commit thread, so the reactor never copies a big file."""
        if self._edit is not None:
            raise RuntimeError("one edit per message")
        if not self._spilled:
            whole = self.read()
            self._chunks = [whole[:start] + replacement + whole[end:]]
        else:
            self._edit = (start, end, replacement)
        self.size += len(replacement) - (end - start)

    def _apply_edit(self) -> None:
        """The pending edit of a spilled file: a new file beside it, renamed over it."""
        assert self._fd is not None and self._edit is not None
        start, end, replacement = self._edit
        old = self._fd
        staged = self.path.with_name(self.path.name + ".edit")
        new = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            writev_all(new, [os.pread(old, start, 0), replacement])
            offset = end
            while chunk := os.pread(old, 1024 * 1024, offset):
                write_all(new, chunk)
                offset += len(chunk)
            os.rename(staged, self.path)
        except BaseException:
            os.close(new)
            with contextlib.suppress(OSError):
                os.unlink(staged)
            raise
        os.close(old)
        self._fd, self._edit = new, None

    def finish_early(self, then: Callable[[], None] | None = None) -> None:
        """A spilled message is complete (handed to the commit): write its last piece
        and fsync it now, on a thread of the sync pool, then run ``then`` there (the
        recipients' own copies); the committer hands the message to a commit thread
        once all that is done (``finishing``), and ``write_out`` takes its result.
        Large files' fsyncs overlap (the disk here takes four at once in about the
        time of one).  A message that is not spilled: nothing happens, ``then`` neither."""
        if not self._spilled and self.size > DIRECT_LIMIT:
            self._spill(bounded=False)  # all of it, now: O_DIRECT and an fsync of its own beat the journal's two writes
        if self._held_back:
            _spill_writer.withdraw(self)  # complete: what waited for room is written by _finish
        if self._spilled and self._finishing is None:
            self._finishing = _sync_pool().submit(self._finish, True, then)

    @property
    def finishing(self) -> concurrent.futures.Future[None] | None:
        """``finish_early``'s work (None: not started, or not a spilled message): the commit
        takes the message only once it is done, so a slow disk under it holds back no other."""
        return self._finishing

    def _finish(self, fsync: bool, then: Callable[[], None] | None = None) -> None:
        _spill_writer.withdraw(self)  # nothing of it is handed over after this: the rest is ours
        _spill_writer.wait_for(self)
        if self._error is not None:
            raise self._error
        if self._fd is None:
            self._fd = self._create()
        chunks, self._chunks = self._chunks, []
        if self._direct:  # the last part (not whole blocks) through the page cache
            self._buffered()
            os.lseek(self._fd, self._direct_offset, os.SEEK_SET)
            chunks.insert(0, self._carry)
        writev_all(self._fd, chunks)
        if self._edit is not None:
            self._apply_edit()
        if fsync:
            os.fsync(self._fd)
            self._synced = True
        if then is not None:
            then()

    def abandon(self) -> bool:
        """The client left before its 250: if this spilled message is still waiting for its
        disk (the committer has not claimed it), it is given up (True): its bytes in memory
        go now, its queued pieces too, and its finish fails (ECANCELED) without writing
        more; the committer discards it.  A hung disk so holds no memory for clients long
        gone, however often they come back.  False: the commit has it (or it never waited)."""
        if self._finishing is None:
            return False
        with _spill_writer.lock:
            if self._claimed:
                return False
            self._abandoned = True
            if self._error is None:
                self._error = OSError(errno.ECANCELED, "the client left before its 250")
            _spill_writer.drop_queued(self)
            self._chunks, self._pending, self._front = [], 0, b""
        return True

    def claim(self) -> bool:
        """(The committer, once ``finishing`` is done.)  True: the commit takes the message,
        ``abandon`` no longer can; False: it was abandoned first."""
        with _spill_writer.lock:
            if self._abandoned:
                return False
            self._claimed = True
            return True

    def write_out(self) -> None:
        """Put every byte into the incoming file (not yet durable, unless
        ``finish_early`` made it so)."""
        if self._spilled:
            if self._finishing is not None:
                self._finishing.result()  # raises what stopped it
            else:
                self._finish(fsync=False)
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
            if fsync and not self._synced:
                os.fsync(self._fd)
        finally:
            self._close()

    def _close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

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
        """Forget the message (after commit, or when it is refused).  Pieces of a
        spilled one still being written: the spill writer removes the file after them."""
        if self._discarded:
            return
        self._discarded = True
        if self._held_back:
            _spill_writer.withdraw(self)  # its place among the waiting goes, and its callback
        self._chunks = []
        if self._spilled:
            with _spill_writer.lock:
                busy = bool(self._in_flight)
            if busy:
                _spill_writer.submit(self, None, 0)
                return
        self._close()
        self._unlink()

    def _unlink(self) -> None:
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
