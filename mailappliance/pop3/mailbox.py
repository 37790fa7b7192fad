"""One POP3 session's view of a Maildir, the session lock, and the cred realm.

A session works on a *snapshot*: ``load`` moves ``new/`` into ``cur/`` and
lists ``cur/`` once; mail that arrives later shows up in the next session
(RFC 1939 numbers must not change during a session).  Deletions are only
marked until ``commit`` (QUIT), so a dropped connection loses nothing.

``load``, ``commit`` and ``open_message`` touch the disk and block: the
protocol runs ``load`` and ``commit`` in a thread pool.  The session lock
(:class:`MailboxLocks`) answers with Deferreds: with several appliances it
is a lease in the shared state store.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import stat
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import attrs
from twisted.cred.portal import IRealm
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from mailappliance.authenticator import MailboxInUse
from mailappliance.directory import Subscriber
from mailappliance.journal import peers_to_wait_for, settle_before_removing
from mailappliance.maildir import ensure_maildir, maildir_for
from mailappliance.pop3.index import (
    Columns,
    DirState,
    Entry,
    IndexKey,
    MaildirIndex,
    all_indexable,
    indexable,
    is_settled,
    read_index,
    write_index,
)
from mailappliance.state import StateStore

log = Logger(namespace="mailappliance.pop3")

MAX_UIDL_LENGTH = 70  # RFC 1939 section 7: 1 to 70 characters in 0x21..0x7E
INFO_SUFFIX = ":2,"  # Maildir "info" for a seen-by-the-MUA message without flags


class NoSuchMessage(LookupError):
    """A message index outside the snapshot."""


class MessageDeleted(LookupError):
    """The message is marked deleted in this session."""


@attrs.frozen
class MessageInfo:
    """One message of the snapshot: POP3 unique id, file, size in octets as stored."""

    uidl: str
    path: Path
    size: int


@attrs.frozen
class CommitResult:
    """What ``commit`` did: how many marked messages are gone, and which could not be removed."""

    deleted: int
    failed: tuple[MessageInfo, ...] = ()
    waiting: bool = False  # another worker's journal may still replay one of them: nothing removed, ask again


def uidl_for(filename: str) -> str:
    """The POP3 unique id of a Maildir file: its unique part (before ':' and ',').

    Stable across sessions, restarts and flag changes.  A unique part that is
    not a valid RFC 1939 unique-id (too long, odd characters) is replaced by
    its SHA-256, which is just as stable.
    """
    unique = filename.split(":", 1)[0].split(",", 1)[0]
    # 0x21..0x7E: printable ASCII but the space (checks in C: UIDL of 20,000 messages 36 -> 8 ms)
    if 0 < len(unique) <= MAX_UIDL_LENGTH and unique.isascii() and unique.isprintable() and " " not in unique:
        return unique
    return hashlib.sha256(unique.encode("utf-8", "surrogateescape")).hexdigest()


class IMaildirAccess(Interface):
    """The avatar a POP3 login yields: one subscriber's Maildir for one session.

    Message indexes are 0-based positions in the snapshot; the protocol maps
    POP3 message numbers (1-based) onto them.
    """

    subscriber = Attribute("The Subscriber who owns the mailbox.")
    messages = Attribute("Sequence[MessageInfo]: the snapshot, in delivery order.")

    def load() -> None:
        """Blocking: create the Maildir if missing, move new/ into cur/, take the snapshot."""

    def stat() -> tuple[int, int]:
        """Number and total size of the messages not marked deleted."""

    def message(index: int) -> MessageInfo:
        """The message at ``index``; NoSuchMessage or MessageDeleted otherwise."""

    def size(index: int) -> int:
        """The size of the message at ``index``; NoSuchMessage or MessageDeleted otherwise."""

    def uidl(index: int) -> str:
        """The unique id of the message at ``index``; NoSuchMessage or MessageDeleted otherwise."""

    def count() -> int:
        """Number of messages in the snapshot, deleted ones included (the highest message number)."""

    def is_deleted(index: int) -> bool:
        """True if ``index`` is marked deleted."""

    def mark_deleted(index: int) -> None:
        """Mark for deletion at commit (DELE)."""

    def undelete_all() -> None:
        """Forget every deletion mark (RSET)."""

    def open_message(index: int) -> BinaryIO:
        """Open the message file for reading (binary)."""

    def open_fd(index: int) -> int:
        """Open the message file for reading, as a raw descriptor the caller closes."""

    def commit() -> CommitResult:
        """Blocking: unlink the marked messages (QUIT)."""


@implementer(IMaildirAccess)
class MaildirMailbox:
    """One session's snapshot of the Maildir at ``path``.

    The snapshot is kept as the index keeps it, names and sizes in delivery
    order; a :class:`MessageInfo` is made when a command asks for one, so a
    login on a big mailbox builds nothing per message.
    """

    def __init__(self, path: Path, subscriber: Subscriber | None = None, index_key: IndexKey | None = None) -> None:
        self.path = path
        self.subscriber = subscriber
        self._index_key = index_key  # None: no index (list and stat cur/ at every login)
        self._cur = path / "cur"
        self._names: list[str] = []
        self._sizes: list[int] = []
        self._deleted: set[int] = set()
        self._deleted_octets = 0
        self._octets = 0
        self.held: HeldMailbox | None = None  # the session's lock (MaildirRealm sets it)

    @property
    def messages(self) -> Sequence[MessageInfo]:
        return tuple(self._info(i) for i in range(len(self._names)))

    def _info(self, index: int) -> MessageInfo:
        name = self._names[index]
        return MessageInfo(uidl_for(name), self._cur / name, self._sizes[index])

    # -- blocking -------------------------------------------------------------

    def load(self) -> None:
        """Move new/ into cur/ and take the snapshot, from the index where it
        still describes cur/ (:mod:`.index`): the cost grows with the changes."""
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        ensure_maildir(self.path)
        taken_at = time.time_ns()
        state = DirState.of(os.stat(self._cur))
        key = self._index_key.get() if self._index_key is not None else b""
        index = read_index(self.path, key)
        in_cur: set[str] | None = None
        if index is not None and index.settled and index.state == state:
            messages, complete = index.messages, True
        else:
            messages, in_cur, complete = self._list_cur(index)
        new = [name for name in os.listdir(self.path / "new") if not name.startswith(".")]
        if new:
            moved, moved_all = self._move_new_to_cur(new, set(messages.names) if in_cur is None else in_cur)
            if moved:
                moved.sort()
                if not messages.names or moved[0][:2] > (messages.mtimes[-1], messages.names[-1]):
                    mtimes, names, sizes = zip(*moved, strict=True)  # the usual case: newer than all of cur/
                    messages = Columns(messages.mtimes + list(mtimes), messages.names + list(names),
                                       messages.sizes + list(sizes))
                else:
                    messages = Columns.of(messages.entries() + moved)
                taken_at = time.time_ns()
                state = DirState.of(os.stat(self._cur))  # ours are in it; so may be a change by someone else
            complete = complete and moved_all
        settled = complete and is_settled(state, taken_at)
        if key and (index is None or index.state != state or index.settled != settled
                    or index.messages is not messages):
            kept = messages if complete else Columns.of([e for e in messages.entries() if indexable(e[1])])
            write_index(self.path, MaildirIndex(state, settled, kept), key)
        self._names, self._sizes = messages.names, messages.sizes
        self._octets = sum(messages.sizes)
        self._deleted.clear()
        self._deleted_octets = 0

    def _list_cur(self, index: MaildirIndex | None) -> tuple[Columns, set[str], bool]:
        """cur/ listed by name; only names the index does not know are stat'ed.
        Returns the messages, every name listed, and whether the messages are all
        of them and all indexable (else the index is never trusted without a listing)."""
        cur = str(self._cur)
        names = set(os.listdir(cur))
        known: dict[str, tuple[int, int]] = {}
        if index is not None:
            old = index.messages
            if len(names) == len(old) and names.issuperset(old.names):
                return old, names, True  # the same names: the index was right, only unsettled
            known = dict(zip(old.names, zip(old.mtimes, old.sizes, strict=True), strict=True))
        entries: list[Entry] = []
        unknown: list[str] = []
        complete = True
        for name in names:
            if name.startswith("."):
                continue
            seen = known.get(name)
            if seen is not None:
                entries.append((seen[0], name, seen[1]))
                continue
            try:
                st = os.lstat(f"{cur}/{name}")
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):  # no symlinks, no directories
                entries.append((st.st_mtime_ns, name, st.st_size))
                unknown.append(name)
            else:
                complete = False
        return Columns.of(entries), names, complete and all_indexable(unknown)

    def _move_new_to_cur(self, names: list[str], in_cur: set[str]) -> tuple[list[Entry], bool]:
        """Move ``names`` from new/ into cur/ (``in_cur``: every name there);
        what moved, as entries, and whether all of it can be indexed."""
        moved: list[Entry] = []
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
        new = os.open(self.path / "new", flags)  # names relative to the directories: no path walk each
        try:
            cur = os.open(self._cur, flags)
            try:
                for name in names:
                    target = name if ":" in name else name + INFO_SUFFIX
                    if target in in_cur:
                        # Never overwrite: a clash of unique names must not lose mail.
                        # The file stays in new/ where an admin can see it.
                        continue
                    try:
                        st = os.lstat(name, dir_fd=new)
                        if not stat.S_ISREG(st.st_mode):
                            continue  # not a message: it stays where it is
                        os.rename(name, target, src_dir_fd=new, dst_dir_fd=cur)
                    except FileNotFoundError:
                        continue
                    in_cur.add(target)
                    moved.append((st.st_mtime_ns, target, st.st_size))  # a rename keeps mtime and size
            finally:
                os.close(cur)
        finally:
            os.close(new)
        return moved, all_indexable([name for _, name, _ in moved])

    def open_message(self, index: int) -> BinaryIO:
        path = self.message(index).path
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        return os.fdopen(fd, "rb")

    def open_fd(self, index: int) -> int:
        """The message file opened read-only (a raw descriptor: RETR reads it in
        one system call per block); the caller closes it."""
        name = self._names[self._check(index)]
        return os.open(f"{self._cur}/{name}", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)

    def commit(self) -> CommitResult:
        deleted = 0
        failed: list[MessageInfo] = []
        try:  # a file the write-ahead journal still covers is made durable first (journal.py)
            paths = [self._info(index).path for index in self._deleted]
            settle_before_removing(paths)
            if peers_to_wait_for(paths):  # another worker's journal, checkpointed soon: the caller asks again
                return CommitResult(0, waiting=True)
        except OSError:
            return CommitResult(0, tuple(self._info(index) for index in sorted(self._deleted)))
        for index in sorted(self._deleted):
            info = self._info(index)
            try:
                os.unlink(info.path)
            except FileNotFoundError:
                pass  # already gone: the outcome the client asked for
            except OSError:
                failed.append(info)
                continue
            deleted += 1
        self._deleted.clear()
        self._deleted_octets = 0
        return CommitResult(deleted, tuple(failed))

    # -- in memory --------------------------------------------------------------

    def stat(self) -> tuple[int, int]:
        return len(self._names) - len(self._deleted), self._octets - self._deleted_octets

    def _check(self, index: int) -> int:
        if not 0 <= index < len(self._names):
            raise NoSuchMessage(index)
        if index in self._deleted:
            raise MessageDeleted(index)
        return index

    def message(self, index: int) -> MessageInfo:
        return self._info(self._check(index))

    def size(self, index: int) -> int:
        """The size of a message not marked deleted (LIST n, RETR) without building its MessageInfo."""
        return self._sizes[self._check(index)]

    def uidl(self, index: int) -> str:
        return uidl_for(self._names[self._check(index)])

    def count(self) -> int:
        return len(self._names)

    def is_deleted(self, index: int) -> bool:
        return index in self._deleted

    def mark_deleted(self, index: int) -> None:
        self._check(index)
        self._deleted.add(index)
        self._deleted_octets += self._sizes[index]

    def undelete_all(self) -> None:
        self._deleted.clear()
        self._deleted_octets = 0


LOCK_KIND = "pop3-mailbox"


class MailboxLockLost(Exception):
    """The shared lock on a mailbox passed to another session (its lease expired): do not commit."""


class HeldMailbox:
    """A session's hold on a mailbox: call it to release (idempotent); ``confirm()``
    is the fencing check before QUIT deletes anything."""

    def __init__(self, locks: MailboxLocks, lease: _Lease) -> None:
        self._locks = locks
        self.lease = lease
        self._released = False

    def __call__(self) -> None:
        if not self._released:
            self._released = True
            self._locks._release(self.lease)

    def confirm(self) -> Deferred[bool]:
        """Deferred True while this session still holds the mailbox (here, and in the
        state store when one is shared)."""
        return self._locks._confirm(self.lease, self._released)


class _Lease:
    """One mailbox lock this process holds: its session, and its owner name in the store."""

    __slots__ = ("key", "holder", "owner", "fence", "handing_over")

    def __init__(self, key: str, holder: object, owner: str) -> None:
        self.key = key
        self.holder = holder
        self.owner = owner
        self.fence: int | None = None  # None while the store is asked
        self.handing_over = False


class MailboxLocks:
    """At most one POP3 session per mailbox (keyed by uid).

    Within this process a newer login takes the mailbox over: the holder is
    asked to ``evict()`` itself (end without committing deletions) and the
    lock passes on.  Only a holder that cannot stop now (it is committing its
    QUIT) keeps it, and the newcomer gets ``MailboxInUse``.

    With a state ``store`` shared by several appliances the lock is also a
    lease there (``ttl`` seconds, refreshed every third of it while the
    session lives, with a fencing token): a login on another appliance gets
    ``MailboxInUse`` (``[IN-USE]``) until the session ends or, if its host
    died, until the lease expires.  A session whose lease was lost (another
    appliance took the mailbox after it expired) is ended, and its QUIT
    deletes nothing (:meth:`HeldMailbox.confirm`).
    """

    def __init__(self, store: StateStore | None = None, clock: IReactorTime | None = None, ttl: float = 60.0) -> None:
        self.store = store
        self.clock = clock
        self.ttl = ttl
        self._held: dict[str, _Lease] = {}
        self._owner_base = os.urandom(8).hex()
        self._serial = itertools.count()
        self._refresher: LoopingCall | None = None

    def acquire(self, key: str, holder: object = None) -> Deferred[HeldMailbox]:
        """Deferred HeldMailbox, or a failure with MailboxInUse."""
        lease = self._held.get(key)
        if lease is not None:
            if lease.fence is None:  # its login is still asking the store
                return fail(MailboxInUse(key))
            evict = getattr(lease.holder, "evict", None)
            lease.handing_over = True  # the lease in the store passes on with the mailbox
            try:
                evicted = evict is not None and evict()
            finally:
                lease.handing_over = False
            if not evicted or key in self._held:
                return fail(MailboxInUse(key))
            successor = _Lease(key, holder, lease.owner)
            successor.fence = lease.fence
            self._held[key] = successor
            return succeed(HeldMailbox(self, successor))
        lease = _Lease(key, holder, f"{self._owner_base}-{next(self._serial)}")
        self._held[key] = lease
        if self.store is None:
            lease.fence = 0
            return succeed(HeldMailbox(self, lease))
        d = self.store.lock((LOCK_KIND, key), lease.owner, self.ttl)
        return d.addCallbacks(self._granted, self._not_granted, callbackArgs=(lease,), errbackArgs=(lease,))

    def _granted(self, fence: int | None, lease: _Lease) -> HeldMailbox:
        if fence is None:  # a session on another appliance holds it
            self._forget(lease)
            raise MailboxInUse(lease.key)
        lease.fence = fence
        self._keep_refreshing()
        return HeldMailbox(self, lease)

    def _not_granted(self, failure: Failure, lease: _Lease) -> Failure:
        self._forget(lease)
        return failure

    def _forget(self, lease: _Lease) -> None:
        if self._held.get(lease.key) is lease:
            del self._held[lease.key]

    def _release(self, lease: _Lease) -> None:
        self._forget(lease)
        if self.store is not None and not lease.handing_over and lease.fence is not None:
            d = self.store.unlock((LOCK_KIND, lease.key), lease.owner)
            d.addErrback(lambda failure: log.failure("releasing the lock of mailbox {uid}", failure, uid=lease.key))
        if not self._held and self._refresher is not None and self._refresher.running:
            self._refresher.stop()

    def _confirm(self, lease: _Lease, released: bool) -> Deferred[bool]:
        if released or self._held.get(lease.key) is not lease:
            return succeed(False)
        if self.store is None:
            return succeed(True)
        return self.store.holds((LOCK_KIND, lease.key), lease.owner)

    def _keep_refreshing(self) -> None:
        if self._refresher is None:
            self._refresher = LoopingCall(self._refresh_all)
            if self.clock is not None:
                self._refresher.clock = self.clock
        if not self._refresher.running:
            self._refresher.start(self.ttl / 3, now=False)

    def _refresh_all(self) -> None:
        for lease in list(self._held.values()):
            if lease.fence is None:
                continue
            d = self.store.refresh((LOCK_KIND, lease.key), lease.owner, self.ttl)  # type: ignore[union-attr]
            d.addCallbacks(self._refreshed, lambda failure: log.failure("refreshing a mailbox lock", failure),
                           (lease,))

    def _refreshed(self, ours: bool, lease: _Lease) -> None:
        if ours or self._held.get(lease.key) is not lease:
            return
        log.warn("lock of mailbox {uid} lost to a session on another appliance: ending ours", uid=lease.key)
        evict = getattr(lease.holder, "evict", None)
        if evict is None or not evict():
            self._forget(lease)  # committing its QUIT: the fencing check stops the deletions

    def is_locked(self, key: str) -> bool:
        return key in self._held


def confirm_lock(mailbox: object) -> Deferred[bool]:
    """Does the session of ``mailbox`` still hold it?  (True for a mailbox without a lock.)"""
    held = getattr(mailbox, "held", None)
    return held.confirm() if held is not None else succeed(True)


@implementer(IRealm)
class MaildirRealm:
    """Turns a Subscriber (the shared checker's avatar id) into a locked Maildir session."""

    def __init__(self, maildir_root: Path, locks: MailboxLocks) -> None:
        self.maildir_root = maildir_root
        self.locks = locks
        self.index_key = IndexKey(maildir_root)

    def requestAvatar(
        self, avatarId: object, mind: object, *interfaces: type[Interface]
    ) -> Deferred[tuple[type[Interface], object, Callable[[], None]]]:
        """``avatarId`` is the Subscriber our checker returns (twisted.cred types avatar ids as bytes)."""
        if IMaildirAccess not in interfaces:
            raise NotImplementedError("MaildirRealm only provides IMaildirAccess")
        if not isinstance(avatarId, Subscriber):
            raise TypeError(f"avatar id must be a Subscriber, not {type(avatarId).__name__}")
        mailbox = MaildirMailbox(maildir_for(self.maildir_root, avatarId.uid), avatarId, self.index_key)
        d = self.locks.acquire(avatarId.uid, mind)  # mind: the POP3 session, which a newer login may end

        def locked(held: HeldMailbox) -> tuple[type[Interface], object, Callable[[], None]]:
            mailbox.held = held
            return IMaildirAccess, mailbox, held

        return d.addCallback(locked)
