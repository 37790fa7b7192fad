"""The delivery transaction: a received message on its way to durable storage.

A session *stages* a message (``Delivery.write`` while DATA streams in), then
either *aborts* it (refused, connection lost mid-DATA) or *commits* it to its
targets (Maildirs, the outbound spool) and gets a Deferred.  Commit hands the
bytes over for good: from then on only the commit thread touches them, and
nothing the session does (a disconnect, a timeout) can change them.  A client
that vanishes after its final dot merely never hears the 250; the message is
delivered whole or not at all.  One exception bounds memory on a hung disk: a
large message still waiting for its own file's write and fsync (it is in no
commit batch yet) is dropped when its client goes (``abandon``).

``commit_batch`` is the group commit the ``BatchCommitter`` thread runs: every
job's file is written, made durable, linked into each Maildir's ``new/`` and
entered into the spool; one ``new/`` fsync per directory for the batch.  A
failure fails that job alone (or the jobs one failed flush covered): one
client's trouble never fails another client's message.
"""

from __future__ import annotations

import errno
import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mailappliance.delivered_to import RecipientCopy, plan_copies
from mailappliance.folders import FolderTarget, filing_path
from mailappliance.journal import Journal
from mailappliance.journal_files import Target, crash_point, encode_body, place_record
from mailappliance.maildir import IncomingMessage, ensure_maildir_once, fsync_directory, syncfs
from mailappliance.queue.spool import Envelope, OutboundSpool

log = Logger(namespace="mailappliance.storage")


@attrs.frozen
class SpoolEntry:
    """The outbound spool as a commit target: the remote recipients' envelope."""

    spool: OutboundSpool
    envelope: Envelope


@attrs.define
class PreparedCopies:
    """A spilled message's Maildirs and the recipients' own copies (Delivered-To), written
    and fsynced on the sync pool before its commit (:func:`prepare_copies`)."""

    targets: list[Path] | None = None  # None: not prepared, the commit thread plans them
    copies: dict[Path, RecipientCopy] = attrs.field(factory=dict)


@attrs.frozen
class CommitJob:
    """One received message and where it must be made durable."""

    message: IncomingMessage
    maildirs: tuple[Path | FolderTarget, ...] = ()
    spool_entries: tuple[SpoolEntry, ...] = ()
    # Delivered-To per Maildir (same order as maildirs; empty: none), and where the
    # first one's field is in the message: other recipients get their own copy (delivered_to.py)
    delivered_to: tuple[bytes, ...] = ()
    delivered_to_span: tuple[int, int] = (0, 0)
    prepared: PreparedCopies | None = attrs.field(default=None, eq=False)  # several Maildirs: prepare_copies


CommitOutcome = list[Path] | BaseException
Committer = Callable[[CommitJob], Deferred[list[Path]]]  # BatchCommitter.commit


class Delivery:
    """One message: staged while it is received, then committed or aborted (never both)."""

    def __init__(self, incoming_dir: Path) -> None:
        self.message = IncomingMessage(incoming_dir)
        self._handed_over = False
        self._committed: Deferred[list[Path]] | None = None  # the commit's outcome, until it fires

    @property
    def name(self) -> str:
        return self.message.name

    @property
    def size(self) -> int:
        return self.message.size

    def write(self, data: bytes) -> None:
        """Append received bytes (nothing is durable before commit)."""
        if self._handed_over:
            raise RuntimeError("message already handed to the commit")
        self.message.write(data)

    @property
    def spilled(self) -> bool:
        """Larger than memory: the bytes are in a file (read them in a worker thread)."""
        return self.message.spilled

    def read(self, start: int = 0, limit: int | None = None) -> bytes:
        """The staged bytes from ``start`` (at most ``limit``): message
        authentication and the content filter read the message before commit."""
        if self._handed_over:
            raise RuntimeError("message already handed to the commit")
        return self.message.read(start, limit)

    def edit(self, start: int, end: int, replacement: bytes) -> None:
        """Replace staged bytes ``start`` .. ``end`` (header fields added after our
        Received header, forged ones removed); once, before commit."""
        if self._handed_over:
            raise RuntimeError("message already handed to the commit")
        self.message.edit(start, end, replacement)

    def commit(self, committer: Committer, maildirs: Sequence[Path | FolderTarget] = (),
               spool_entries: Sequence[SpoolEntry] = (), delivered_to: Sequence[bytes] = (),
               delivered_to_span: tuple[int, int] = (0, 0)) -> Deferred[list[Path]]:
        """Hand the message to ``committer``; the Deferred fires with the Maildir
        paths once everything is durable (OSError: nothing was kept)."""
        if self._handed_over:
            raise RuntimeError("message already handed to the commit")
        self._handed_over = True
        copies = len(maildirs) > 1 and delivered_to_span != (0, 0)
        job = CommitJob(self.message, tuple(maildirs), tuple(spool_entries), tuple(delivered_to), delivered_to_span,
                        PreparedCopies() if copies else None)
        # a spilled message: its last piece, fsync (and recipients' own copies) start now, off the commit threads
        self.message.finish_early(functools.partial(prepare_copies, job) if copies else None)
        self._committed = committer(job)
        return self._committed

    def abandon(self) -> None:
        """The client is gone before its 250 (disconnect, timeout): a message still waiting
        for its disk (a large one, the disk slow or hung) is dropped, its memory at once; it
        never reached a Maildir and its client retries.  One that a commit thread has, or
        that is durable, stays delivered.  Before commit this is ``abort``."""
        if not self._handed_over:
            self.abort()
        elif self._committed is not None and not self._committed.called and self.message.abandon():
            self._committed.cancel()  # fails at once (CancelledError); the committer reports nothing for it

    def abort(self) -> None:
        """Forget a message that was not committed; after commit this does nothing."""
        if not self._handed_over:
            self._handed_over = True
            self.message.discard()


def commit_batch(jobs: Sequence[CommitJob], sync: str = "fsync", journal: Journal | None = None) -> list[CommitOutcome]:
    """Make several messages durable together (group commit); blocking.

    Every job's file is written first and only then made durable: with
    ``sync="fsync"`` each is fsynced, one after the other (the first fsync's
    journal commit carries the others' data, so the rest cost little); with
    ``"syncfs"`` one syncfs(2) flushes the whole filesystem once for the batch
    (for a mail filesystem of its own).  Then come the outbound spool entries,
    the links into each ``new/``, and one fsync per distinct ``new/`` directory
    for the whole batch.  A recipient whose Delivered-To differs from the one
    in the received file gets a copy of its own, written and synced with the
    received files and renamed into its ``new/`` (delivered_to.py).
    A job's outcome is its Maildir paths only after its
    file and every ``new/`` it was linked into were synced.  A failure fails
    that job alone (any exception: a bug in one job must not take the others
    down), or every job that a failed syncfs or directory fsync covered;
    failed jobs are discarded and their outcome is the exception.

    With ``sync="journal"`` and a ``journal``, jobs for local Maildirs only
    go through it (:func:`commit_journaled`); the rest take the path above.
    """
    if sync == "journal" and journal is not None:
        return commit_journaled(jobs, journal)
    outcomes: list[CommitOutcome | None] = [None] * len(jobs)
    delivered: dict[int, list[Path]] = {}
    targets: dict[int, list[Path]] = {}
    copies: dict[int, dict[Path, RecipientCopy]] = {}

    def live() -> list[int]:
        return [i for i, outcome in enumerate(outcomes) if outcome is None]

    def fail(i: int, error: BaseException) -> None:
        outcomes[i] = error
        try:
            jobs[i].message.discard()
            for copy in copies.get(i, {}).values():
                copy.discard()
        except Exception:
            log.failure("discarding a failed message")

    def each(step: Callable[[int], None]) -> None:
        for i in live():
            try:
                step(i)
            except OSError as e:
                fail(i, e)
            except Exception as e:
                log.failure("commit step failed for one message")
                fail(i, OSError(errno.EIO, f"internal error: {e!r}"))

    def plan(i: int) -> None:
        """Where the job goes; Maildirs with their own Delivered-To get their own copy, written now
        (a spilled message's were written and synced before, on the sync pool)."""
        job = jobs[i]
        if job.prepared is not None and job.prepared.targets is not None:
            targets[i], copies[i] = job.prepared.targets, job.prepared.copies
            return
        targets[i], copies[i] = _plan_targets(job)
        for copy in copies[i].values():
            copy.write()

    def sync_job(i: int) -> None:
        jobs[i].message.sync(fsync=sync == "fsync")
        for copy in copies[i].values():
            copy.sync(fsync=sync == "fsync")

    def place(i: int) -> None:
        job = jobs[i]
        for entry in job.spool_entries:
            entry.spool.enqueue(job.message.path, entry.envelope)
        own = copies[i]
        shared = [maildir for maildir in targets[i] if maildir not in own]
        delivered[i] = [job.message.place(maildir, last=n == len(shared) - 1) for n, maildir in enumerate(shared)]
        delivered[i] += [own[maildir].place(maildir) for maildir in targets[i] if maildir in own]

    each(lambda i: jobs[i].message.write_out())
    each(plan)
    crash_point("classic.written")
    if sync == "syncfs" and live():
        try:
            syncfs(jobs[live()[0]].message.fileno())
        except OSError as e:
            for i in live():
                fail(i, e)
    each(sync_job)
    crash_point("classic.synced")
    each(place)
    crash_point("classic.placed")
    for new_dir in dict.fromkeys(p.parent for i in live() for p in delivered[i]):
        try:
            fsync_directory(new_dir)
        except OSError as e:
            for i in live():
                if any(p.parent == new_dir for p in delivered[i]):
                    fail(i, e)
    crash_point("classic.directories_synced")
    for i in live():
        jobs[i].message.discard()  # the incoming name only; the Maildir links keep the data
        for copy in copies[i].values():
            copy.discard()  # a copy shared by several Maildirs keeps its incoming name until now
        outcomes[i] = delivered[i]
    return outcomes  # type: ignore[return-value]  # no None left: every job failed or was delivered


def _plan_targets(job: CommitJob) -> tuple[list[Path], dict[Path, RecipientCopy]]:
    """The job's Maildirs (a +tag folder, if it exists) and the copies of those whose
    Delivered-To differs from the received file's (not yet written)."""
    pairs: dict[Path, bytes] = {}
    for maildir, header in zip(job.maildirs, job.delivered_to or (b"",) * len(job.maildirs), strict=True):
        pairs.setdefault(filing_path(maildir), header)
    return list(pairs), plan_copies(job.message, list(pairs.items()), job.delivered_to_span)


def prepare_copies(job: CommitJob) -> None:
    """(The sync pool, once a spilled message's file is fsynced.)  Write and fsync the
    recipients' own copies now: in a commit thread, copying a large message (up to
    ``COPY_BUDGET``) on a slow disk would hold back every other message's 250.  A
    failure removes them and fails the message's commit."""
    assert job.prepared is not None
    targets, copies = _plan_targets(job)
    try:
        for copy in copies.values():
            copy.write()
            copy.sync()
    except BaseException:
        for copy in copies.values():
            copy.discard()
        raise
    job.prepared.targets, job.prepared.copies = targets, copies


def journal_targets(job: CommitJob, maildir_root: Path) -> list[Target] | None:
    """Where a job's files go, for the journal: None for a job it does not take (outbound
    spool entries, a spilled message, a Maildir outside the root, no Maildir)."""
    if job.spool_entries or job.message.spilled or not job.maildirs:
        return None
    pairs: dict[Path, bytes] = {}
    for maildir, header in zip(job.maildirs, job.delivered_to or (b"",) * len(job.maildirs), strict=True):
        pairs.setdefault(filing_path(maildir), header)
    if not all(_is_below(maildir, maildir_root) for maildir in pairs):
        return None
    copies = plan_copies(job.message, list(pairs.items()), job.delivered_to_span)
    name, targets = job.message.name, []
    for maildir in pairs:
        copy = copies.get(maildir)
        if copy is None:
            targets.append(Target(maildir, f"{name},S={job.message.size}"))
        else:
            targets.append(Target(maildir, f"{name},S={copy.size}", copy.span[0], copy.span[1], copy.header))
    return targets


@functools.lru_cache(maxsize=4096)
def _is_below(maildir: Path, root: Path) -> bool:
    """``maildir.is_relative_to(root)``, remembered: pathlib takes microseconds for it."""
    return maildir.is_relative_to(root)


def commit_journaled(jobs: Sequence[CommitJob], journal: Journal) -> list[CommitOutcome]:
    """Group commit through the write-ahead journal (journal.py): one record per job,
    ONE flushed write for the batch, then each file written into its Maildir's tmp/ and
    renamed into new/ without an fsync (the next checkpoint makes it durable there).
    A job's outcome is its Maildir paths once its record is durable and its files are
    in place.  A failure fails that job alone (its record is voided), or every
    journaled job when the append fails."""
    outcomes: list[CommitOutcome | None] = [None] * len(jobs)
    entries: dict[int, tuple[bytes, list[Target]]] = {}
    classic: list[int] = []
    for i, job in enumerate(jobs):
        try:
            targets = journal_targets(job, journal.maildir_root)
            if targets is None:
                classic.append(i)
                continue
            for target in targets:
                ensure_maildir_once(target.maildir)  # a Maildir that cannot be made fails before the journal
            entries[i] = (job.message.content(), targets)
        except Exception as e:
            outcomes[i] = e if isinstance(e, OSError) else OSError(errno.EIO, f"internal error: {e!r}")
            job.message.discard()
    if classic:
        for i, outcome in zip(classic, commit_batch([jobs[i] for i in classic], "fsync"), strict=True):
            outcomes[i] = outcome
    if entries:
        order = list(entries)
        try:
            sequences = journal.append([encode_body(*entries[i]) for i in order])
        except OSError as e:
            for i in order:
                outcomes[i] = e
                jobs[i].message.discard()
            order, sequences = [], []
        for i, sequence in zip(order, sequences, strict=True):
            outcomes[i] = _place_journaled(journal, sequence, *entries[i])
            jobs[i].message.discard()
    return outcomes  # type: ignore[return-value]  # every job has its outcome


def _place_journaled(journal: Journal, sequence: int, base: bytes, targets: list[Target]) -> CommitOutcome:
    """One journaled job's files into their Maildirs, equal bytes hard-linked; a record
    whose files cannot all be placed is voided (the client gets a 4xx)."""
    try:
        placed = place_record(base, targets)
    except Exception as e:
        if not isinstance(e, OSError):
            log.failure("placing a journaled message")
        try:
            journal.cancel(sequence)
        except OSError:
            log.failure("voiding journal record {seq}: a crash now delivers it once more", seq=sequence)
        journal.placed((), 1)
        return e if isinstance(e, OSError) else OSError(errno.EIO, f"internal error: {e!r}")
    journal.placed(placed, 1)
    return placed


def commit_now(job: CommitJob, sync: str = "fsync") -> list[Path]:
    """Commit one message in the calling thread (blocking); raises on failure."""
    outcome = commit_batch([job], sync)[0]
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome
