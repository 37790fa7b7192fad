"""One POP3 session's view of a Maildir, the session lock, and the cred realm.

A session works on a *snapshot*: ``load`` moves ``new/`` into ``cur/`` and
lists ``cur/`` once; mail that arrives later shows up in the next session
(RFC 1939 numbers must not change during a session).  Deletions are only
marked until ``commit`` (QUIT), so a dropped connection loses nothing.

``load``, ``commit`` and ``open_message`` touch the disk and block: the
protocol runs ``load`` and ``commit`` in a thread pool.  Nothing here knows
about Twisted's reactor.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import BinaryIO, Callable, Sequence

import attrs
from twisted.cred.portal import IRealm
from zope.interface import Attribute, Interface, implementer

from mailappliance.authenticator import MailboxInUse
from mailappliance.directory import Subscriber
from mailappliance.maildir import ensure_maildir, maildir_for

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


def uidl_for(filename: str) -> str:
    """The POP3 unique id of a Maildir file: its unique part (before ':' and ',').

    Stable across sessions, restarts and flag changes.  A unique part that is
    not a valid RFC 1939 unique-id (too long, odd characters) is replaced by
    its SHA-256, which is just as stable.
    """
    unique = filename.split(":", 1)[0].split(",", 1)[0]
    if 0 < len(unique) <= MAX_UIDL_LENGTH and all(0x21 <= ord(c) <= 0x7E for c in unique):
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

    def is_deleted(index: int) -> bool:
        """True if ``index`` is marked deleted."""

    def mark_deleted(index: int) -> None:
        """Mark for deletion at commit (DELE)."""

    def undelete_all() -> None:
        """Forget every deletion mark (RSET)."""

    def open_message(index: int) -> BinaryIO:
        """Open the message file for reading (binary)."""

    def commit() -> CommitResult:
        """Blocking: unlink the marked messages (QUIT)."""


@implementer(IMaildirAccess)
class MaildirMailbox:
    """One session's snapshot of the Maildir at ``path``."""

    def __init__(self, path: Path, subscriber: Subscriber | None = None) -> None:
        self.path = path
        self.subscriber = subscriber
        self._messages: list[MessageInfo] = []
        self._deleted: set[int] = set()

    @property
    def messages(self) -> Sequence[MessageInfo]:
        return tuple(self._messages)

    # -- blocking -------------------------------------------------------------

    def load(self) -> None:
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        ensure_maildir(self.path)
        self._move_new_to_cur()
        self._messages = self._scan_cur()
        self._deleted.clear()

    def _move_new_to_cur(self) -> None:
        new, cur = self.path / "new", self.path / "cur"
        with os.scandir(new) as entries:
            names = [e.name for e in entries if not e.name.startswith(".")]
        for name in names:
            target = cur / (name if ":" in name else name + INFO_SUFFIX)
            if target.exists():
                # Never overwrite: a clash of unique names must not lose mail.
                # The file stays in new/ where an admin can see it.
                continue
            try:
                os.rename(new / name, target)
            except FileNotFoundError:
                continue

    def _scan_cur(self) -> list[MessageInfo]:
        found: list[tuple[int, str, MessageInfo]] = []
        with os.scandir(self.path / "cur") as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if not stat.S_ISREG(st.st_mode):  # no symlinks, no directories
                    continue
                info = MessageInfo(uidl_for(entry.name), Path(entry.path), st.st_size)
                found.append((st.st_mtime_ns, entry.name, info))
        found.sort(key=lambda item: (item[0], item[1]))
        return [info for _, _, info in found]

    def open_message(self, index: int) -> BinaryIO:
        path = self.message(index).path
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        return os.fdopen(fd, "rb")

    def commit(self) -> CommitResult:
        deleted = 0
        failed: list[MessageInfo] = []
        for index in sorted(self._deleted):
            info = self._messages[index]
            try:
                os.unlink(info.path)
            except FileNotFoundError:
                pass  # already gone: the outcome the client asked for
            except OSError:
                failed.append(info)
                continue
            deleted += 1
        self._deleted.clear()
        return CommitResult(deleted, tuple(failed))

    # -- in memory --------------------------------------------------------------

    def stat(self) -> tuple[int, int]:
        visible = [m for i, m in enumerate(self._messages) if i not in self._deleted]
        return len(visible), sum(m.size for m in visible)

    def message(self, index: int) -> MessageInfo:
        if not 0 <= index < len(self._messages):
            raise NoSuchMessage(index)
        if index in self._deleted:
            raise MessageDeleted(index)
        return self._messages[index]

    def is_deleted(self, index: int) -> bool:
        return index in self._deleted

    def mark_deleted(self, index: int) -> None:
        self.message(index)
        self._deleted.add(index)

    def undelete_all(self) -> None:
        self._deleted.clear()


class MailboxLocks:
    """At most one POP3 session per mailbox (keyed by uid), within this process.

    A newer login takes the mailbox over: the holder is asked to ``evict()``
    itself (end without committing deletions) and the lock passes on.  Only
    a holder that cannot stop now (it is committing its QUIT) keeps it, and
    the newcomer gets ``MailboxInUse``.
    """

    def __init__(self) -> None:
        self._held: dict[str, object] = {}

    def acquire(self, key: str, holder: object = None) -> Callable[[], None]:
        """Take the lock or raise MailboxInUse; returns an idempotent release function."""
        if key in self._held:
            current = self._held[key]
            evict = getattr(current, "evict", None)
            if evict is None or not evict() or key in self._held:
                raise MailboxInUse(key)
        token = object()
        self._held[key] = holder if holder is not None else token
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                if self._held.get(key) is (holder if holder is not None else token):
                    del self._held[key]

        return release

    def is_locked(self, key: str) -> bool:
        return key in self._held


@implementer(IRealm)
class MaildirRealm:
    """Turns a Subscriber (the shared checker's avatar id) into a locked Maildir session."""

    def __init__(self, maildir_root: Path, locks: MailboxLocks) -> None:
        self.maildir_root = maildir_root
        self.locks = locks

    def requestAvatar(
        self, avatarId: Subscriber, mind: object, *interfaces: type[Interface]
    ) -> tuple[type[Interface], MaildirMailbox, Callable[[], None]]:
        if IMaildirAccess not in interfaces:
            raise NotImplementedError("MaildirRealm only provides IMaildirAccess")
        if not isinstance(avatarId, Subscriber):
            raise TypeError(f"avatar id must be a Subscriber, not {type(avatarId).__name__}")
        path = maildir_for(self.maildir_root, avatarId.uid)
        release = self.locks.acquire(avatarId.uid, mind)  # mind: the POP3 session, which a newer login may end
        return IMaildirAccess, MaildirMailbox(path, avatarId), release
