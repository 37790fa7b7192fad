"""The thread(s) that make received messages durable, in batches.

Sessions hand a finished message to ``BatchCommitter.commit`` and get a
Deferred that fires (in the reactor thread) once the message is fsynced into
every Maildir, or fails with the OSError that stopped it.  A commit thread
takes every message waiting when it wakes up (up to ``max_batch``) and
commits them with one :func:`~mailappliance.delivery.commit_batch`: many
messages share one journal commit and one ``new/`` fsync, and the results go
back to the reactor in one call; the threads are woken once a reactor turn,
after every final dot of that turn (``_wake_soon``).  Under load that is far
less fsync, thread hand-off and GIL traffic than one pool task per message; at
low load a batch is one message and costs what a single delivery costs.

A spilled (large) message joins the queue only once its own file is written
and fsynced (``IncomingMessage.finishing``, on the sync pool): no commit
thread waits for one message's disk, so a large message on a slow or hung
disk holds back its own 250 and nobody else's.  Until then it waits, counted
(``mailappliance_commit_waiting_for_disk``), without a thread of its own.
"""

from __future__ import annotations

import errno
import threading
import time
from collections import deque
from pathlib import Path
from typing import TypeVar

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailappliance.delivery import CommitJob, CommitOutcome, commit_batch
from mailappliance.journal import Journal
from mailappliance.metrics import METRICS

log = Logger(namespace="mailappliance.storage")
_T = TypeVar("_T")

DEFAULT_MAX_BATCH = 64
SPILLED_LINGER = 0.002  # seconds a batch that starts with a large message waits for more (_linger)


class BatchCommitter:
    """Group commit of received messages on ``threads`` dedicated threads."""

    def __init__(self, reactor: IReactorFromThreads, threads: int = 1, max_batch: int = DEFAULT_MAX_BATCH,
                 sync: str = "fsync", journal: Journal | None = None, clock: IReactorTime | None = None) -> None:
        self._reactor = reactor
        self._clock = clock  # the reactor's: wake the commit threads once a turn (_wake_soon); None: at once
        self._wake_scheduled = False
        self._sync = sync
        self._journal = journal  # sync = "journal": opened (crash recovery) at start, checkpointed at stop
        self._thread_count = threads
        self._max_batch = max_batch
        self._pending: deque[tuple[CommitJob, Deferred[list[Path]]]] = deque()
        self._condition = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._checkpointer: threading.Thread | None = None  # with a journal: checkpoints off the commit threads
        self._checkpoint_wake = threading.Event()
        self._checkpointer_idle = False  # waiting for a batch to make a checkpoint due at all
        self._awaiting_disk = 0  # handed over, waiting for their spill file's write and fsync (under _condition)

    def start(self) -> None:
        if self._journal is not None and not self._journal.is_open:
            self._journal.open()  # replays what a crash left, before any session can commit
        self._stopping = False
        METRICS.gauge("mailappliance_commit_waiting_for_disk", "Received large messages past their final dot "
                      "whose file the disk has not yet written and fsynced (no 250 before it has).",
                      lambda: self._awaiting_disk)
        self._threads = [threading.Thread(target=self._run, name=f"commit-{n}", daemon=True)
                         for n in range(self._thread_count)]
        for thread in self._threads:
            thread.start()
        if self._journal is not None:
            self._checkpoint_wake.clear()
            self._checkpointer = threading.Thread(target=self._run_checkpoints, name="checkpoint", daemon=True)
            self._checkpointer.start()

    def stop(self) -> None:
        """Finish what is waiting (large messages whose disk is still busy too), then end the threads."""
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        for thread in self._threads:
            thread.join()
        self._threads = []
        if self._checkpointer is not None:
            self._checkpoint_wake.set()
            self._checkpointer.join()
            self._checkpointer = None
        if self._journal is not None:
            self._journal.close()  # a clean stop leaves every message durable in its Maildir

    def commit(self, job: CommitJob) -> Deferred[list[Path]]:
        """(In the reactor thread: the wake-up is a ``callLater``.)  Deferred of the delivered
        Maildir paths, once they are durable (an OSError when not: the session answers 451
        and the client retries).
        A large message whose client leaves while it still waits for its disk
        is dropped (``IncomingMessage.abandon``; the session cancels the Deferred)."""
        d: Deferred[list[Path]] = Deferred()
        d.addBoth(_timed_commit, time.monotonic())
        finishing = job.message.finishing
        with self._condition:
            if self._stopping or not self._threads:
                job.message.discard()
                return fail(OSError(errno.ESHUTDOWN, "the server is shutting down"))
            if finishing is None or (finishing.done() and job.message.claim()):
                self._pending.append((job, d))
                self._wake_soon()
                return d
            self._awaiting_disk += 1
        # the future keeps its callbacks: taken out of a box, they leave no cycle (message, future, job)
        # for the garbage collector, and each message's memory goes when its commit is over
        box = [(job, d)]
        finishing.add_done_callback(lambda _: self._finished(*box.pop()))
        return d

    def _wake_soon(self) -> None:
        """(Under the lock, in the reactor thread.)  Wake a commit thread when the reactor has
        handled every input of its turn, not at each final dot: the messages that ended in one
        turn share one wake-up and one batch, and the commit thread starts as the reactor
        turns to ``epoll`` instead of taking the GIL from it mid-turn (measured: a few per cent
        more messages a second under concurrency, fewer context switches; docs/performance.md)."""
        if self._clock is None:
            self._condition.notify()
        elif not self._wake_scheduled:
            self._wake_scheduled = True
            self._clock.callLater(0, self._wake)

    def _wake(self) -> None:
        with self._condition:
            self._wake_scheduled = False
            self._condition.notify(-(-len(self._pending) // self._max_batch))  # a thread per batch waiting

    def _finished(self, job: CommitJob, d: Deferred[list[Path]]) -> None:
        """(The sync pool thread, or this one if it was quicker.)  A large message's file is
        written and fsynced, or failed (its commit raises that: 451, nothing kept): it joins
        the queue now, unless its client abandoned it meanwhile (its Deferred has fired:
        nothing is reported, the files go).  A stop waited for it (``_run`` ends only with
        none left)."""
        claimed = job.message.claim()
        with self._condition:
            self._awaiting_disk -= 1
            if claimed:
                self._pending.append((job, d))
            if self._stopping:
                self._condition.notify_all()  # the last one lets every idle thread end
            else:
                self._condition.notify()
        if not claimed:
            job.message.discard()
            for copy in job.prepared.copies.values() if job.prepared is not None else ():
                copy.discard()

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._pending and (not self._stopping or self._awaiting_disk):
                    self._condition.wait()
                if not self._pending:
                    return
                if self._awaiting_disk and self._pending[0][0].message.spilled:
                    self._linger()
                batch = [self._pending.popleft() for _ in range(min(len(self._pending), self._max_batch))]
            try:
                outcomes: list[CommitOutcome] = commit_batch([job for job, _ in batch], self._sync, self._journal)
            except BaseException as e:  # a bug, not an OSError: fail the batch, keep the thread
                log.failure("commit of {n} message(s) failed", Failure(), n=len(batch))
                outcomes = [e] * len(batch)
            results = [(d, outcome) for (_, d), outcome in zip(batch, outcomes, strict=True)]  # one outcome per job
            self._reactor.callFromThread(_report, results)
            if self._journal is not None and (self._checkpointer_idle or self._journal.checkpoint_due_in() == 0):
                self._checkpoint_wake.set()

    def _linger(self) -> None:
        """(Under the lock.)  A large message is ready and others are about to be (their files
        being fsynced): wait up to ``SPILLED_LINGER`` for them, so they share this batch's
        ``new/`` fsync and report, as when the commit thread waited for each one's disk.
        Bounded: a hung disk under them delays this batch by that much, never more."""
        deadline = time.monotonic() + SPILLED_LINGER
        while self._awaiting_disk and len(self._pending) < self._max_batch:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._condition.wait(left)

    def _run_checkpoints(self) -> None:
        """The checkpoint thread: makes the journaled messages durable in their Maildirs
        when a checkpoint is due, so the commit threads never wait for it; a failure is
        retried later (the journal keeps the messages meanwhile)."""
        assert self._journal is not None
        while not self._stopping:
            due = self._journal.checkpoint_due_in()
            if due is None:
                self._checkpointer_idle = True
                if self._journal.checkpoint_due_in() is None:  # a batch may have come in between
                    self._checkpoint_wake.wait()
                self._checkpointer_idle = False
                self._checkpoint_wake.clear()
                continue
            if due > 0:
                self._checkpoint_wake.wait(due)
                self._checkpoint_wake.clear()
                continue
            try:
                self._journal.checkpoint()
            except OSError:
                log.failure("journal checkpoint failed (retried; the journal keeps the messages)")


def _timed_commit(result: _T, started: float) -> _T:
    """A message's commit latency, hand-over to durable (or failed), for /metrics."""
    METRICS.observe("mailappliance_commit_seconds", time.monotonic() - started)
    return result


def _report(results: list[tuple[Deferred[list[Path]], CommitOutcome]]) -> None:
    for d, outcome in results:
        if isinstance(outcome, BaseException):
            d.errback(Failure(outcome))
        else:
            d.callback(outcome)
