"""Mailbox quotas: how much a subscriber's Maildir may hold, and how much it holds.

The limit is ``[storage] mailbox_quota`` (bytes; 0 = unlimited), overridden per
subscriber in the directory with ``description: limit:mailbox_quota_mb=N``
(MiB) or ``limit:mailbox_quota=N`` (bytes, up to 999,999,999); 0 there means
unlimited too.  Usage is the size of every file in ``new/`` and ``cur/``.

One rule decides at RCPT (``incoming`` = the SIZE the client declared, or 0)
and at the end of DATA (``incoming`` = the message's size): a mailbox has no
room when it is already at or over its limit, or when the message would take
it more than a grace (10 % of the limit, as Dovecot's ``quota_grace``) over
the limit.  So a mailbox fills up to its limit with ordinary messages, after
which RCPT gets ``452 4.2.2``; a message too big for the room left gets
``552 5.2.2`` after DATA.

:class:`MailboxQuotas` scans a Maildir off the reactor (``run_blocking``),
once per uid however many sessions ask at the same moment, and trusts the
result for ``ttl`` seconds, adding what we deliver meanwhile.  Messages
between the end of DATA and the end of their commit are *reserved*, so
parallel sessions cannot all squeeze into the same room.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import cast

import attrs
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from mailappliance.blocking import RunBlocking
from mailappliance.directory import Subscriber
from mailappliance.maildir import maildir_for
from mailappliance.metrics import METRICS
from mailappliance.settings import GIB, KIB, MIB

GRACE_PERCENT = 10
USAGE_TTL = 30.0  # seconds a scanned usage is trusted (our own deliveries are added as they happen)
MAX_REMEMBERED = 100_000  # uids whose usage is cached
LIMIT_BYTES = "mailbox_quota"  # directory override in bytes: description: limit:mailbox_quota=N
LIMIT_MIB = "mailbox_quota_mb"  # directory override in MiB: description: limit:mailbox_quota_mb=N
MAILDIR_PARTS = ("new", "cur")

_SIZE_IN_NAME = re.compile(r",S=([0-9]+)(?:,|$)")


def format_size(size: int) -> str:
    """``size`` for people: "812 B", "97.7 KiB", "1.0 GiB"."""
    if size < KIB:
        return f"{size} B"
    for unit, factor in (("TiB", 1024 * GIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if size >= factor:
            return f"{size / factor:.1f} {unit}"
    return f"{size} B"  # not reached


def quota_for(subscriber: Subscriber, default_quota: int) -> int | None:
    """The subscriber's limit in bytes (directory override, else the default); None: unlimited."""
    overrides = dict(subscriber.limits)
    if LIMIT_MIB in overrides:
        limit = overrides[LIMIT_MIB] * MIB
    elif LIMIT_BYTES in overrides:
        limit = overrides[LIMIT_BYTES]
    else:
        limit = default_quota
    return limit or None


def has_room(usage: int, limit: int | None, incoming: int = 0) -> bool:
    """THE quota rule (see the module docstring): False when ``usage`` is at the
    limit already, or ``incoming`` more would pass it by more than the grace."""
    if limit is None:
        return True
    return usage < limit and usage + incoming <= limit + limit * GRACE_PERCENT // 100


def _size_of(entry: os.DirEntry[str]) -> int:
    """A Maildir file's size: from its name (",S=<size>", which we and Dovecot
    write) without a stat when it is there; 0 for what is not a regular file."""
    try:
        if not entry.is_file(follow_symlinks=False):
            return 0
        match = _SIZE_IN_NAME.search(entry.name.split(":", 1)[0])
        if match:
            return int(match[1])
        return entry.stat(follow_symlinks=False).st_size
    except FileNotFoundError:  # taken away meanwhile (a POP3 DELE)
        return 0


def maildir_usage(path: Path) -> int:
    """Bytes held in ``new/`` and ``cur/`` of the Maildir at ``path`` (0 if
    there is none yet).  Blocking: one directory read per part, and a stat
    only for files whose name does not carry their size."""
    total = 0
    for part in MAILDIR_PARTS:
        try:
            with os.scandir(path / part) as entries:
                total += sum(_size_of(entry) for entry in entries if not entry.name.startswith("."))
        except FileNotFoundError:
            continue
    return total


@attrs.frozen
class QuotaVerdict:
    """One mailbox's state for one message: ``usage`` counts reserved bytes
    too; ``limit`` None is unlimited (then ``usage`` is not measured: 0)."""

    full: bool
    usage: int
    limit: int | None

    def describe(self) -> str:
        """"used 81.2 KiB of 100.0 KiB (81%)", or "used 3.0 MiB (unlimited)"."""
        if self.limit is None:
            return f"used {format_size(self.usage)} (unlimited)"
        return f"used {format_size(self.usage)} of {format_size(self.limit)} ({self.usage * 100 // self.limit}%)"


NO_QUOTA = QuotaVerdict(False, 0, None)  # an unlimited mailbox (usage not measured)


@attrs.frozen
class _Usage:
    size: int
    measured_at: float


class Admission:
    """The end-of-DATA verdict for every local recipient of one message.

    When nobody is ``full``, the message's size is reserved in each mailbox
    until exactly one of :meth:`delivered` (the commit succeeded) or
    :meth:`release` (it failed); both are idempotent.  When somebody is full,
    nothing is reserved.
    """

    def __init__(self, quotas: MailboxQuotas, size: int, verdicts: dict[str, QuotaVerdict]) -> None:
        self.size = size
        self.verdicts = verdicts  # uid -> verdict
        self._quotas = quotas
        self._open = not self.full

    @property
    def full(self) -> list[str]:
        """The uids whose mailbox has no room for the message."""
        return [uid for uid, verdict in self.verdicts.items() if verdict.full]

    def delivered(self) -> None:
        self._settle(delivered=True)

    def release(self) -> None:
        self._settle(delivered=False)

    def _settle(self, delivered: bool) -> None:
        if not self._open:
            return
        self._open = False
        for uid, verdict in self.verdicts.items():
            if verdict.limit is not None:
                self._quotas._unreserve(uid, self.size)
            if delivered:
                self._quotas.delivered(uid, self.size)


def _first_error(failure: Failure) -> Failure:
    """The failure inside gatherResults' FirstError (the OSError of a scan)."""
    return getattr(failure.value, "subFailure", failure)


def record_refusal(stage: str) -> None:
    """Count a quota refusal (``stage`` "rcpt" or "data") in /metrics."""
    METRICS.count("mailappliance_quota_refusals_total", stage=stage)
    METRICS.count("mailappliance_messages_refused_total", reason="mailbox_full")


class MailboxQuotas:
    """Per-subscriber quota checks for the SMTP sessions (reactor thread only)."""

    def __init__(self, default_quota: int, run_blocking: RunBlocking, clock: IReactorTime,
                 ttl: float = USAGE_TTL, scan: Callable[[Path], int] = maildir_usage) -> None:
        self.default_quota = default_quota  # bytes; 0: unlimited unless the directory says otherwise
        self.run_blocking = run_blocking
        self.clock = clock
        self.ttl = ttl
        self._scan = scan
        self._usage: dict[str, _Usage] = {}
        self._scans: dict[str, list[Deferred[int]]] = {}  # uid -> callers waiting for the scan in flight
        self._delivered_during_scan: dict[str, int] = {}
        self._reserved: dict[str, int] = {}
        self._full: set[str] = set()  # uids whose last check found no room
        METRICS.gauge("mailappliance_quota_full_mailboxes",
                      "Mailboxes whose last quota check found them full.", lambda: len(self._full))

    @property
    def settings(self) -> int:
        """The default quota (what ``Reloader`` swaps on SIGHUP)."""
        return self.default_quota

    @settings.setter
    def settings(self, value: int) -> None:
        self.default_quota = value

    def limit_for(self, subscriber: Subscriber) -> int | None:
        """The subscriber's limit in bytes; None: unlimited."""
        return quota_for(subscriber, self.default_quota)

    def usage(self, uid: str, maildir: Path) -> Deferred[int]:
        """Deferred of the bytes in the Maildir (what we delivered since the
        last scan included); a scan runs when the last one is older than ``ttl``,
        and callers asking while one runs share it."""
        known = self._usage.get(uid)
        if known is not None and self.clock.seconds() - known.measured_at < self.ttl:
            return succeed(known.size)
        waiter: Deferred[int] = Deferred()
        if uid in self._scans:
            self._scans[uid].append(waiter)
            return waiter
        self._scans[uid] = [waiter]
        started = self.clock.seconds()
        maybeDeferred(self.run_blocking, self._scan, maildir).addBoth(self._scanned, uid, started)
        return waiter

    def _scanned(self, result: int | Failure, uid: str, started: float) -> None:
        waiters = self._scans.pop(uid, [])
        # a delivery during the scan may or may not have been seen: count it (too much is the safe side)
        extra = self._delivered_during_scan.pop(uid, 0)
        if not isinstance(result, Failure):
            result += extra
            self._remember(uid, _Usage(result, started))
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    def _remember(self, uid: str, usage: _Usage) -> None:
        self._usage.pop(uid, None)
        if len(self._usage) >= MAX_REMEMBERED:
            del self._usage[next(iter(self._usage))]
        self._usage[uid] = usage

    def check(self, subscriber: Subscriber, maildir: Path, incoming: int = 0) -> Deferred[QuotaVerdict]:
        """Deferred QuotaVerdict: is there room for ``incoming`` more bytes?  At
        RCPT ``incoming`` is the declared SIZE (or 0).  Fails with the scan's
        OSError when the Maildir cannot be read (answer 4xx)."""
        verdict = self.check_now(subscriber, incoming)
        if verdict is not None:
            return succeed(verdict)
        limit = self.limit_for(subscriber)
        assert limit is not None  # check_now answered every mailbox without a limit
        return self.usage(subscriber.uid, maildir).addCallback(self._verdict, subscriber.uid, limit, incoming)

    def check_now(self, subscriber: Subscriber, incoming: int = 0) -> QuotaVerdict | None:
        """The verdict of :meth:`check` when it needs no scan (no quota, or the usage
        is known and fresh), without a Deferred; None when only ``check`` can tell."""
        limit = self.limit_for(subscriber)
        if limit is None:
            self._full.discard(subscriber.uid)
            return NO_QUOTA
        known = self._usage.get(subscriber.uid)
        if known is None or self.clock.seconds() - known.measured_at >= self.ttl:
            return None
        return self._verdict(known.size, subscriber.uid, limit, incoming)

    def _verdict(self, usage: int, uid: str, limit: int, incoming: int) -> QuotaVerdict:
        usage += self._reserved.get(uid, 0)
        verdict = QuotaVerdict(not has_room(usage, limit, incoming), usage, limit)
        if verdict.full:
            if len(self._full) < MAX_REMEMBERED:
                self._full.add(uid)
        else:
            self._full.discard(uid)
        return verdict

    def admit(self, recipients: Iterable[tuple[Subscriber, Path]], size: int) -> Deferred[Admission]:
        """Deferred :class:`Admission` for a received message of ``size`` bytes
        and its local recipients (subscriber, Maildir); the same subscriber
        twice counts once.  When every mailbox has room, the size is reserved
        in each at once (no other session can take that room meanwhile)."""
        unique = {subscriber.uid: (subscriber, maildir) for subscriber, maildir in recipients}
        known = [self.check_now(subscriber, size) for subscriber, _ in unique.values()]
        if None not in known:  # no quota, or the usage is known: no scan to wait for (the common case)
            return succeed(self._admitted(cast(list[QuotaVerdict], known), list(unique), size))
        checks = [succeed(verdict) if verdict is not None else self.check(subscriber, maildir, size)
                  for verdict, (subscriber, maildir) in zip(known, unique.values(), strict=True)]
        d = gatherResults(checks, consumeErrors=True)
        return d.addCallbacks(self._admitted, _first_error, (list(unique), size))

    def _admitted(self, verdicts: list[QuotaVerdict], uids: list[str], size: int) -> Admission:
        admission = Admission(self, size, dict(zip(uids, verdicts, strict=True)))  # one verdict per uid
        if not admission.full:
            for uid, verdict in admission.verdicts.items():
                if verdict.limit is not None:
                    self._reserved[uid] = self._reserved.get(uid, 0) + size
        return admission

    def _unreserve(self, uid: str, size: int) -> None:
        left = self._reserved.get(uid, 0) - size
        if left > 0:
            self._reserved[uid] = left
        else:
            self._reserved.pop(uid, None)

    def delivered(self, uid: str, size: int) -> None:
        """A message of ``size`` bytes is now in ``uid``'s Maildir: add it to
        the cached usage (:meth:`Admission.delivered` calls this)."""
        if uid in self._scans:
            self._delivered_during_scan[uid] = self._delivered_during_scan.get(uid, 0) + size
        known = self._usage.get(uid)
        if known is not None:
            self._usage[uid] = _Usage(known.size + size, known.measured_at)

    def forget(self, uid: str) -> None:
        """Drop the cached usage (after POP3 deleted messages): the next check scans."""
        self._usage.pop(uid, None)
        self._full.discard(uid)


@attrs.frozen
class MailboxUsage:
    """What ``mailappliance-admin user show`` prints about a mailbox."""

    used: int
    limit: int | None

    def describe(self) -> str:
        return QuotaVerdict(not has_room(self.used, self.limit), self.used, self.limit).describe()


def mailbox_usage(maildir_root: Path, subscriber: Subscriber, default_quota: int) -> MailboxUsage:
    """Blocking: the subscriber's usage and limit, for the admin CLI."""
    try:
        used = maildir_usage(maildir_for(maildir_root, subscriber.uid))
    except ValueError:  # an unsafe uid names no Maildir
        used = 0
    return MailboxUsage(used, quota_for(subscriber, default_quota))
