"""The outbound spool: Postfix-style state directories, so no cost grows with the backlog.

``<spool>/queue/`` holds::

    incoming/<id>.eml, <id>.json   new messages, written by ``enqueue`` (and admin retries)
    active/<id>.json               taken by the runner, in delivery now
    deferred/<hh>/<id>.json        waiting; the file's mtime is the next attempt
    data/<hh>/<id>.eml             message bytes once the runner has taken them
    corrupt/                       envelopes that cannot be read, or whose bytes vanished

``<hh>`` is two hex digits of a hash of the id (256 subdirectories).  The
envelope (JSON) is the commit point, written last via a temp file, fsync and
rename: an ``.eml`` without an envelope anywhere is a transaction that never
got its 250.  An envelope changes directory only by rename(2), so it is in
exactly one place at any moment, crash or not; its bytes are found in
``incoming/`` or ``data/``.  Every change is made under one lock file, so the
daemon's runner and ``mailappliance-admin queue`` never undo each other's
changes.  A flat spool of the previous release (``queue/<id>.json``) is moved
into this layout by ``recover`` at start.  All methods block: the daemon calls
them from a thread.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import stat
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs

from mailappliance.maildir import fsync_directory

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"


@attrs.define
class RecipientState:
    """Where one recipient of a queued message stands."""

    address: str
    state: str = PENDING
    attempts: int = 0
    last_code: int = 0
    last_text: str = ""
    remote_host: str = ""
    notify: str = ""  # DSN NOTIFY as the client gave it ("SUCCESS,FAILURE", "NEVER"; "": not given)
    orcpt: str = ""  # DSN ORCPT decoded, "rfc822;addr" or "utf-8;addr" ("": not given)


@attrs.define
class Envelope:
    """Who sent a queued message, to whom, how it reached us, and its delivery state."""

    queue_id: str
    sender: str
    recipients: list[RecipientState]
    authenticated_as: str = ""
    client_ip: str = ""
    session_id: str = ""
    received_at: float = attrs.field(factory=time.time)
    next_attempt: float = 0.0
    attempts: int = 0
    warned: bool = False
    body_offset: int = 0  # bytes at the start of the file that are not sent (our Return-Path)
    ret: str = ""  # DSN RET: "FULL", "HDRS" or "" (not given)
    envid: str = ""  # DSN ENVID, decoded
    smtputf8: bool = False  # the client sent SMTPUTF8: UTF-8 addresses or header fields

    @classmethod
    def new(cls, queue_id: str, sender: str, recipients: list[str] | tuple[str, ...],
            notify: dict[str, str] | None = None, orcpt: dict[str, str] | None = None, *,
            authenticated_as: str = "", client_ip: str = "", session_id: str = "", received_at: float | None = None,
            body_offset: int = 0, ret: str = "", envid: str = "", smtputf8: bool = False) -> Envelope:
        """``notify`` and ``orcpt``: the DSN parameters per recipient address, where given;
        ``received_at`` defaults to now."""
        notify, orcpt = notify or {}, orcpt or {}
        return cls(queue_id, sender, [RecipientState(r, notify=notify.get(r, ""), orcpt=orcpt.get(r, ""))
                                      for r in recipients],
                   authenticated_as=authenticated_as, client_ip=client_ip, session_id=session_id,
                   received_at=time.time() if received_at is None else received_at, body_offset=body_offset,
                   ret=ret, envid=envid, smtputf8=smtputf8)

    def pending(self) -> list[RecipientState]:
        return [r for r in self.recipients if r.state == PENDING]

    def failed(self) -> list[RecipientState]:
        return [r for r in self.recipients if r.state == FAILED]

    @property
    def finished(self) -> bool:
        return not self.pending()

    def to_json(self) -> dict[str, object]:
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Envelope:
        """From the JSON object as json.load gives it (unknown keys of a newer version are left out)."""
        fields = {f.name for f in attrs.fields(RecipientState)}
        recipients = [RecipientState(**{k: v for k, v in r.items() if k in fields}) for r in data.pop("recipients")]
        known = {f.name for f in attrs.fields(cls)}
        return cls(recipients=recipients, **{k: v for k, v in data.items() if k in known})


class QueueEntryGone(LookupError):
    """The message was delivered or deleted meanwhile."""


class QueueEntryCorrupt(ValueError):
    """The envelope cannot be read, or the message bytes are gone: moved to ``corrupt/``."""


INCOMING, ACTIVE, DEFERRED, LEGACY = "incoming", "active", "deferred", "legacy"
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=-]{0,200}")  # what unique_name gives, and no more
_MAX_ENVELOPE = 4 << 20  # bytes: an envelope larger than this is not ours


def valid_queue_id(text: str) -> bool:
    """One file name that our ids look like: no path, not hidden, bounded."""
    return _ID.fullmatch(text) is not None


def bucket(queue_id: str) -> str:
    """The hashed subdirectory of ``deferred/`` and ``data/`` for ``queue_id``."""
    return f"{zlib.crc32(queue_id.encode()) & 0xFF:02x}"


@attrs.define
class Recovery:
    """What one scan at start found: the schedule to rebuild and what was set aside."""

    due_now: list[str] = attrs.Factory(list)  # incoming/ and active/ (in delivery when we stopped)
    deferred: list[tuple[float, str]] = attrs.Factory(list)  # (next attempt, id) from the files' mtimes
    migrated: int = 0  # envelopes of a flat spool moved into deferred/
    orphans: int = 0  # message files without an envelope (crash before the 250), removed
    skipped: list[str] = attrs.Factory(list)  # foreign or unreadable names, left alone (logged)
    corrupt: list[str] = attrs.Factory(list)  # ids moved to corrupt/
    touched: set[Path] = attrs.Factory(set)  # directories a migration wrote: synced once at the end


class OutboundSpool:
    """Durable storage of outbound messages."""

    def __init__(self, spool_dir: Path) -> None:
        self.queue_dir = spool_dir / "queue"
        self.incoming_dir = self.queue_dir / "incoming"
        self.active_dir = self.queue_dir / "active"
        self.deferred_dir = self.queue_dir / "deferred"
        self.data_dir = self.queue_dir / "data"
        self.corrupt_dir = self.queue_dir / "corrupt"

    def prepare(self) -> None:
        """Create the spool directory, queue/ and its state directories, all 0700
        (messages are private); missing parents of the spool directory get the default mode."""
        if self.incoming_dir.is_dir():
            return
        for directory in (self.queue_dir.parent, self.queue_dir, self.incoming_dir, self.active_dir,
                          self.deferred_dir, self.data_dir, self.corrupt_dir):
            _make_private(directory)

    # -- where things are

    def _envelope_candidates(self, queue_id: str) -> list[tuple[str, Path]]:
        name = f"{queue_id}.json"
        return [(INCOMING, self.incoming_dir / name), (ACTIVE, self.active_dir / name),
                (DEFERRED, self.deferred_dir / bucket(queue_id) / name), (LEGACY, self.queue_dir / name)]

    def _data_candidates(self, queue_id: str) -> list[Path]:
        """In the order a message moves: incoming/ (or the flat spool) before data/."""
        name = f"{queue_id}.eml"
        return [self.incoming_dir / name, self.queue_dir / name, self.data_dir / bucket(queue_id) / name]

    def _find(self, queue_id: str) -> tuple[str, Path]:
        if not valid_queue_id(queue_id):
            raise QueueEntryGone(queue_id)
        for state, path in self._envelope_candidates(queue_id):
            if os.path.lexists(path):
                return state, path
        raise QueueEntryGone(queue_id)

    def envelope_path(self, queue_id: str) -> Path:
        """Where the envelope is now; QueueEntryGone if nowhere."""
        return self._find(queue_id)[1]

    def state_of(self, queue_id: str) -> str:
        """incoming, active, deferred or legacy (a flat spool not yet migrated)."""
        return self._find(queue_id)[0]

    def message_path(self, queue_id: str) -> Path:
        """Where the message bytes are now (the data/ path if they are nowhere)."""
        candidates = self._data_candidates(queue_id)
        return next((p for p in candidates if p.exists()), candidates[-1])

    def read_message(self, queue_id: str) -> bytes:
        """The message bytes, wherever they are; QueueEntryGone if they are nowhere."""
        for path in self._data_candidates(queue_id):  # a move goes forward in this list: nothing is missed
            try:
                return _read_nofollow(path)
            except FileNotFoundError:
                continue
        raise QueueEntryGone(queue_id)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.prepare()
        with open(self.queue_dir / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # -- writing

    def _write_envelope(self, envelope: Envelope, path: Path, mtime: float | None = None) -> None:
        """Durably replace ``path`` with ``envelope`` (temp file, fsync, rename, fsync of the directory)."""
        staged = path.parent / f".{envelope.queue_id}.json.tmp"
        with open(staged, "w", encoding="utf-8") as f:
            json.dump(envelope.to_json(), f)
            f.flush()
            os.fsync(f.fileno())
        if mtime is not None:
            os.utime(staged, (time.time(), mtime))
        os.rename(staged, path)
        fsync_directory(path.parent)

    def enqueue(self, message_path: Path, envelope: Envelope) -> None:
        """Store the (already fsynced) message and its envelope durably in incoming/:
        a hard link, the envelope and one directory fsync, as before the queue had states."""
        self.prepare()
        queue_id = envelope.queue_id
        data_path = self.incoming_dir / f"{queue_id}.eml"
        try:
            os.link(message_path, data_path)
        except OSError:
            staged = self.incoming_dir / f".{queue_id}.eml.tmp"
            shutil.copyfile(message_path, staged)
            with open(staged, "rb+") as f:
                os.fsync(f.fileno())
            os.rename(staged, data_path)
        with self._locked():
            self._write_envelope(envelope, self.incoming_dir / f"{queue_id}.json")

    def _move(self, source: Path, target: Path) -> None:
        try:
            os.rename(source, target)
        except FileNotFoundError:
            if not target.parent.is_dir():  # a hashed subdirectory made on first use
                _make_private(target.parent)
                os.rename(source, target)
            else:
                raise

    # -- reading

    def queued_ids(self) -> list[str]:
        """Ids of committed messages (those with an envelope) in every state, oldest name first.
        Reads every name in the queue: for the admin CLI, not for the runner."""
        return sorted({queue_id for queue_id, _ in self._listing()})

    def _listing(self) -> Iterator[tuple[str, str]]:
        """(id, state) of each envelope name; foreign names are left out."""
        for state, directory in ((INCOMING, self.incoming_dir), (ACTIVE, self.active_dir),
                                 (LEGACY, self.queue_dir)):
            for name in _names(directory):
                if name.endswith(".json") and valid_queue_id(name[:-5]):
                    yield name[:-5], state
        for sub in _names(self.deferred_dir):
            for name in _names(self.deferred_dir / sub):
                if name.endswith(".json") and valid_queue_id(name[:-5]) and bucket(name[:-5]) == sub:
                    yield name[:-5], DEFERRED

    def incoming_ids(self) -> list[str]:
        """Ids of envelopes in incoming/, oldest name first: what is new since the last look."""
        return sorted(name[:-5] for name in _names(self.incoming_dir)
                      if name.endswith(".json") and valid_queue_id(name[:-5]))

    def incoming_stamp(self) -> int:
        """Changes when incoming/ gets or loses a name: a cheap "anything new?" (one stat)."""
        try:
            return os.stat(self.incoming_dir).st_mtime_ns
        except FileNotFoundError:
            return 0

    def envelope(self, queue_id: str) -> Envelope:
        """The stored envelope; QueueEntryGone if there is none, QueueEntryCorrupt if it is unreadable."""
        _, path = self._find(queue_id)
        try:
            return _load(path)
        except FileNotFoundError:
            raise QueueEntryGone(queue_id) from None

    # -- the runner's moves

    def activate(self, queue_id: str) -> Envelope:
        """Take a message for delivery: its envelope into active/, its bytes into data/.
        An unreadable envelope, or one whose bytes are gone, goes to corrupt/ (QueueEntryCorrupt)."""
        with self._locked():
            state, path = self._find(queue_id)
            try:
                envelope = _load(path)
                if envelope.queue_id != queue_id:
                    raise QueueEntryCorrupt(f"{queue_id}: the envelope names {envelope.queue_id!r}")
            except QueueEntryCorrupt:
                self._set_aside(queue_id, path)
                raise
            data = self.data_dir / bucket(queue_id) / f"{queue_id}.eml"
            for source in self._data_candidates(queue_id)[:2]:
                if os.path.lexists(source):
                    self._move(source, data)  # no fsync: both places are looked in
                    break
            else:
                if not data.is_file():
                    self._set_aside(queue_id, path)
                    raise QueueEntryCorrupt(f"{queue_id}: the message file is gone")
            if state != ACTIVE:
                os.rename(path, self.active_dir / f"{queue_id}.json")  # if lost in a crash: retried sooner
            return envelope

    def store_round(self, queue_id: str, change: Callable[[Envelope], None]) -> Envelope:
        """After a delivery round: apply ``change`` to the stored envelope; a finished message is
        removed, an unfinished one written durably into deferred/ with its next attempt as mtime."""
        with self._locked():
            state, path = self._find(queue_id)
            envelope = _load(path)
            change(envelope)
            if envelope.finished:
                self._remove(queue_id, path)
                return envelope
            self._write_envelope(envelope, path, mtime=envelope.next_attempt)
            if state != DEFERRED:
                target = self.deferred_dir / bucket(queue_id) / f"{queue_id}.json"
                self._move(path, target)
                fsync_directory(target.parent)
            return envelope

    def update(self, queue_id: str, change: Callable[[Envelope], None]) -> Envelope:
        """Apply ``change`` to the current envelope and store it durably where it is."""
        with self._locked():
            state, path = self._find(queue_id)
            envelope = _load(path)
            change(envelope)
            self._write_envelope(envelope, path, mtime=envelope.next_attempt if state == DEFERRED else None)
            return envelope

    def retry(self, queue_id: str) -> str:
        """Make a waiting message due now: next_attempt 0 and back into incoming/, which a running
        daemon watches.  Returns the state it was in (an active one is being tried already)."""
        with self._locked():
            state, path = self._find(queue_id)
            if state in (DEFERRED, LEGACY):
                envelope = _load(path)
                envelope.next_attempt = 0.0
                self._write_envelope(envelope, path)
                os.rename(path, self.incoming_dir / f"{queue_id}.json")
                fsync_directory(self.incoming_dir)
            return state

    def remove(self, queue_id: str) -> None:
        """Forget a message: envelope first (the commit point), then the data."""
        with self._locked():
            _, path = self._find(queue_id)
            self._remove(queue_id, path)

    def _remove(self, queue_id: str, path: Path) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            raise QueueEntryGone(queue_id) from None
        fsync_directory(path.parent)
        for data in self._data_candidates(queue_id):
            try:
                os.unlink(data)
            except FileNotFoundError:
                continue

    def _set_aside(self, queue_id: str, path: Path) -> None:
        """An envelope we cannot use, with its bytes if any, into corrupt/ for the admin to look at."""
        _make_private(self.corrupt_dir)
        for source in (path, *self._data_candidates(queue_id)):
            if os.path.lexists(source):
                os.rename(source, self.corrupt_dir / source.name)
        fsync_directory(self.corrupt_dir)

    # -- start

    def recover(self) -> Recovery:
        """One scan at start: migrate a flat spool, set aside what cannot be read, remove message
        files left by transactions that never got their 250, and report what is queued (the
        deferred ones by their files' mtimes: no envelope is read).  Nothing else may write the
        queue meanwhile: the daemon calls this before it listens."""
        found = Recovery()
        with self._locked():
            self._clean_staged(found)
            known: set[str] = set()
            for name, kind in _entries(self.queue_dir):
                if name in {".lock", "incoming", "active", "deferred", "data", "corrupt"} or \
                        (name.endswith(".eml") and kind == "file"):
                    continue
                if kind == "file" and name.endswith(".json") and valid_queue_id(name[:-5]):
                    self._migrate(name[:-5], found)
                elif not name.startswith("."):
                    found.skipped.append(f"queue/{name}")
            for state, directory in ((INCOMING, self.incoming_dir), (ACTIVE, self.active_dir)):
                for name, kind in _entries(directory):
                    queue_id = name[:-5]
                    if kind == "file" and name.endswith(".json") and valid_queue_id(queue_id):
                        if queue_id not in known:
                            found.due_now.append(queue_id)
                            known.add(queue_id)
                    elif not (kind == "file" and state == INCOMING and name.endswith(".eml")):
                        found.skipped.append(f"queue/{state}/{name}")
            for sub, kind in _entries(self.deferred_dir):
                if kind != "dir":
                    found.skipped.append(f"queue/deferred/{sub}")
                    continue
                with os.scandir(self.deferred_dir / sub) as entries:
                    for entry in entries:
                        queue_id = entry.name[:-5]
                        if entry.is_file(follow_symlinks=False) and entry.name.endswith(".json") and \
                                valid_queue_id(queue_id) and bucket(queue_id) == sub:
                            if queue_id not in known:
                                found.deferred.append((entry.stat(follow_symlinks=False).st_mtime, queue_id))
                                known.add(queue_id)
                        else:
                            found.skipped.append(f"queue/deferred/{sub}/{entry.name}")
            self._remove_orphans(known, found)
            for directory in sorted(found.touched | ({self.queue_dir} if found.migrated else set())):
                fsync_directory(directory)
        found.due_now.sort()
        return found

    def _clean_staged(self, found: Recovery) -> None:
        """Temp files of writes a crash interrupted (the old envelope, if any, is still in place)."""
        directories = [self.queue_dir, self.incoming_dir, self.active_dir]
        directories += [self.deferred_dir / sub for sub, kind in _entries(self.deferred_dir) if kind == "dir"]
        for directory in directories:
            for name, kind in _entries(directory):
                if name.startswith(".") and name.endswith(".tmp") and kind == "file":
                    os.unlink(directory / name)

    def _migrate(self, queue_id: str, found: Recovery) -> None:
        """A flat spool's entry: bytes into data/, envelope into deferred/ (mtime: its next attempt)."""
        path = self.queue_dir / f"{queue_id}.json"
        try:
            envelope = _load(path)
        except QueueEntryCorrupt:
            self._set_aside(queue_id, path)
            found.corrupt.append(queue_id)
            return
        data = self.data_dir / bucket(queue_id) / f"{queue_id}.eml"
        legacy_data = self.queue_dir / f"{queue_id}.eml"
        if os.path.lexists(legacy_data):  # no fsync for a move: both places are looked in
            self._move(legacy_data, data)
        target = self.deferred_dir / bucket(queue_id) / f"{queue_id}.json"
        os.utime(path, (time.time(), envelope.next_attempt))
        self._move(path, target)
        found.migrated += 1
        found.touched.update((data.parent, target.parent))

    def _remove_orphans(self, known: set[str], found: Recovery) -> None:
        def orphan(directory: Path, name: str, kind: str) -> None:
            if kind == "file" and name.endswith(".eml") and name[:-4] not in known:
                os.unlink(directory / name)
                found.orphans += 1
        for name, kind in _entries(self.queue_dir):  # a flat spool's, after its envelopes moved
            orphan(self.queue_dir, name, kind)
        for name, kind in _entries(self.incoming_dir):
            orphan(self.incoming_dir, name, kind)
        for sub, kind in _entries(self.data_dir):
            if kind != "dir":
                found.skipped.append(f"queue/data/{sub}")
                continue
            for name, entry_kind in _entries(self.data_dir / sub):
                if name.endswith(".eml") and entry_kind == "file":
                    orphan(self.data_dir / sub, name, entry_kind)
                elif not name.startswith("."):
                    found.skipped.append(f"queue/data/{sub}/{name}")

    def clean_orphans(self) -> int:
        """Remove message files whose envelope was never committed (crash before 250); the
        whole start-up scan (``recover``) under its old name."""
        return self.recover().orphans


def _make_private(directory: Path) -> None:
    try:
        directory.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        return
    os.chmod(directory, 0o700)  # whatever the umask


def _names(directory: Path) -> list[str]:
    try:
        return os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _entries(directory: Path) -> list[tuple[str, str]]:
    """(name, "file" | "dir" | "other") without following symbolic links."""
    try:
        with os.scandir(directory) as entries:
            return [(e.name, "file" if e.is_file(follow_symlinks=False) else
                     "dir" if e.is_dir(follow_symlinks=False) else "other") for e in entries]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _read_nofollow(path: Path, limit: int | None = None) -> bytes:
    """A regular file's bytes, never through a symbolic link; at most ``limit`` bytes (+1)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise QueueEntryCorrupt(f"{path.name}: a symbolic link") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise QueueEntryCorrupt(f"{path.name}: not a regular file")
    with os.fdopen(fd, "rb") as f:
        return f.read() if limit is None else f.read(limit + 1)


def _load(path: Path) -> Envelope:
    """The envelope in ``path``; QueueEntryCorrupt for anything that is not one of ours."""
    raw = _read_nofollow(path, _MAX_ENVELOPE)
    if len(raw) > _MAX_ENVELOPE:
        raise QueueEntryCorrupt(f"{path.name}: larger than {_MAX_ENVELOPE} bytes")
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise TypeError("not an object")
        envelope = Envelope.from_json(data)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise QueueEntryCorrupt(f"{path.name}: {e}") from None
    if not valid_queue_id(envelope.queue_id) or not isinstance(envelope.next_attempt, (int, float)):
        raise QueueEntryCorrupt(f"{path.name}: not an envelope of ours")
    return envelope
