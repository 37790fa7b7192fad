"""Group commit of received messages: ``commit_batch`` on real files, and the
``BatchCommitter`` threads that run it (with a reactor stand-in that only
collects ``callFromThread`` calls, so the test decides when results arrive)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock

from mailappliance import delivery, maildir
from mailappliance import journal as journal_module
from mailappliance.committer import BatchCommitter
from mailappliance.delivery import CommitJob, SpoolEntry, commit_batch, commit_now
from mailappliance.journal import Journal
from mailappliance.maildir import IncomingMessage
from mailappliance.pop3.mailbox import MaildirMailbox
from mailappliance.settings import syncfs_available
from tests.conditions import wait_until


class CallbackSpool:
    """Stands in for the outbound spool: calls ``on_enqueue(path)`` where the commit enqueues."""

    def __init__(self, on_enqueue: Any) -> None:
        self.on_enqueue = on_enqueue

    def enqueue(self, path: Path, envelope: Any) -> None:
        self.on_enqueue(path)


def spool_entry(on_enqueue: Any) -> SpoolEntry:
    return SpoolEntry(CallbackSpool(on_enqueue), None)  # type: ignore[arg-type]


def message(incoming: Path, body: bytes) -> IncomingMessage:
    incoming.mkdir(exist_ok=True)
    m = IncomingMessage(incoming)
    m.write(body)
    return m


def new_files(box: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((box / "new").iterdir())}


def test_a_batch_delivers_every_message_whole_and_leaves_no_incoming_file(tmp_path: Path) -> None:
    """Twenty messages committed together are each in new/ whole, named by queue id and size; incoming/ is empty."""
    incoming, box = tmp_path / "incoming", tmp_path / "mail" / "alice"
    bodies = [f"Subject: {n}\r\n\r\nbody {n}\r\n".encode() for n in range(20)]
    jobs = [CommitJob(message(incoming, b), (box,)) for b in bodies]
    outcomes = commit_batch(jobs)
    assert all(isinstance(o, list) and len(o) == 1 for o in outcomes)
    assert sorted(new_files(box).values()) == sorted(bodies)
    assert [o[0].name for o in outcomes] == [f"{j.message.name},S={j.message.size}" for j in jobs]  # type: ignore[index]
    assert list(incoming.iterdir()) == []


def test_one_message_for_two_mailboxes_is_in_both(tmp_path: Path) -> None:
    """One message for two mailboxes (one named twice) lands once in each."""
    incoming, alice, bob = tmp_path / "incoming", tmp_path / "alice", tmp_path / "bob"
    [outcome] = commit_batch([CommitJob(message(incoming, b"hello\r\n"), (alice, bob, alice))])
    assert isinstance(outcome, list) and [p.parent.parent for p in outcome] == [alice, bob]
    assert list(new_files(alice).values()) == [b"hello\r\n"] == list(new_files(bob).values())
    assert list(incoming.iterdir()) == []


def test_the_outbound_spool_gets_the_file_before_it_leaves_incoming(tmp_path: Path) -> None:
    """The outbound spool links the whole file before it leaves incoming/, also with no local recipient."""
    incoming, box, spooled = tmp_path / "incoming", tmp_path / "alice", tmp_path / "spooled"
    seen: list[bytes] = []

    def outbound(path: Path) -> None:
        seen.append(path.read_bytes())
        spooled.hardlink_to(path)

    [outcome] = commit_batch([CommitJob(message(incoming, b"out\r\n"), (box,), (spool_entry(outbound),))])
    assert isinstance(outcome, list)
    assert seen == [b"out\r\n"] and spooled.read_bytes() == b"out\r\n"
    [out_only] = commit_batch([CommitJob(message(incoming, b"remote only\r\n"), (), (spool_entry(lambda p: None),))])
    assert out_only == [] and list(incoming.iterdir()) == []


def test_a_failing_mailbox_fails_only_its_own_message(tmp_path: Path) -> None:
    """A Maildir that cannot be written fails its own message only; the others in the batch are delivered."""
    incoming, good, bad = tmp_path / "incoming", tmp_path / "good", tmp_path / "bad"
    bad.write_text("a file where a Maildir should be")
    jobs = [CommitJob(message(incoming, b"1\r\n"), (good,)), CommitJob(message(incoming, b"2\r\n"), (bad,)),
            CommitJob(message(incoming, b"3\r\n"), (good,))]
    first, second, third = commit_batch(jobs)
    assert isinstance(second, OSError)
    assert isinstance(first, list) and isinstance(third, list)
    assert sorted(new_files(good).values()) == [b"1\r\n", b"3\r\n"]
    assert list(incoming.iterdir()) == []  # the failed one is discarded too


def test_a_failed_directory_fsync_fails_every_message_linked_into_that_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed fsync of one new/ directory fails every message linked into it, and no other."""
    incoming, alice, bob = tmp_path / "incoming", tmp_path / "alice", tmp_path / "bob"
    real = maildir.fsync_directory

    def failing(path: Path) -> None:
        if path.parent == bob:
            raise OSError(5, "Input/output error")
        real(path)

    monkeypatch.setattr(delivery, "fsync_directory", failing)
    jobs = [CommitJob(message(incoming, b"a\r\n"), (alice,)), CommitJob(message(incoming, b"ab\r\n"), (alice, bob)),
            CommitJob(message(incoming, b"b\r\n"), (bob,))]
    only_alice, both, only_bob = commit_batch(jobs)
    assert isinstance(only_alice, list)
    assert isinstance(both, OSError) and isinstance(only_bob, OSError)


@pytest.mark.skipif(not syncfs_available(), reason="syncfs needs Linux 5.8")
def test_one_syncfs_for_the_batch_delivers_every_message(tmp_path: Path) -> None:
    """With storage.sync = "syncfs" a batch, a spilled message among them, is delivered whole."""
    incoming, box = tmp_path / "incoming", tmp_path / "alice"
    incoming.mkdir()
    spilled = IncomingMessage(incoming)
    spilled.write(b"y" * (maildir.MEMORY_LIMIT + 1))  # written to its file while it arrived
    jobs = [CommitJob(message(incoming, f"{n}\r\n".encode()), (box,)) for n in range(5)] + [CommitJob(spilled, (box,))]
    outcomes = commit_batch(jobs, sync="syncfs")
    assert all(isinstance(o, list) for o in outcomes)
    assert sorted(len(b) for b in new_files(box).values()) == [3] * 5 + [maildir.MEMORY_LIMIT + 1]
    assert list(incoming.iterdir()) == []


def test_a_failed_syncfs_fails_the_whole_batch_and_places_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed syncfs fails every message of the batch and places none in new/."""
    incoming, box = tmp_path / "incoming", tmp_path / "alice"

    def failing(fd: int) -> None:
        raise OSError(5, "syncfs: Input/output error")

    monkeypatch.setattr(delivery, "syncfs", failing)
    outcomes = commit_batch([CommitJob(message(incoming, f"{n}\r\n".encode()), (box,)) for n in range(3)],
                            sync="syncfs")
    assert all(isinstance(o, OSError) for o in outcomes)
    assert not (box / "new").exists() or new_files(box) == {}
    assert list(incoming.iterdir()) == []


def test_a_large_message_spills_to_disk_while_it_arrives_and_commits_whole(tmp_path: Path) -> None:
    """A message past the memory limit is spilled to incoming/ while it arrives and committed whole."""
    incoming, box = tmp_path / "incoming", tmp_path / "alice"
    incoming.mkdir()
    m = IncomingMessage(incoming)
    chunk = b"x" * 998 + b"\r\n"
    for _ in range(2 * maildir.MEMORY_LIMIT // len(chunk)):
        m.write(chunk)
    maildir._spill_writer.wait_for(m)  # the spill writer thread writes it while it arrives
    assert m.spilled and m.path.stat().st_size >= maildir.MEMORY_LIMIT  # before the end of DATA
    delivered = commit_now(CommitJob(m, (box,)))
    assert delivered[0].stat().st_size == m.size > maildir.MEMORY_LIMIT
    assert not m.path.exists()


def test_a_mailbox_removed_while_remembered_is_made_again(tmp_path: Path) -> None:
    """A Maildir removed after a delivery is made again for the next one."""
    incoming, box = tmp_path / "incoming", tmp_path / "alice"
    commit_now(CommitJob(message(incoming, b"1\r\n"), (box,)))
    for sub in ("new", "cur", "tmp"):
        for f in (box / sub).iterdir():
            f.unlink()
        (box / sub).rmdir()
    box.rmdir()
    [path] = commit_now(CommitJob(message(incoming, b"2\r\n"), (box,)))
    assert path.read_bytes() == b"2\r\n" and (box / "cur").is_dir()


def test_a_refused_message_leaves_nothing(tmp_path: Path) -> None:
    """A discarded message leaves nothing in incoming/."""
    incoming = tmp_path / "incoming"
    m = message(incoming, b"x" * (maildir.MEMORY_LIMIT + 10))
    m.discard()
    assert list(incoming.iterdir()) == []


class CollectingReactor:
    """``callFromThread`` stand-in: keeps the calls for the test to run."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        self.arrived = threading.Condition()

    def callFromThread(self, function: Callable[..., Any], *args: Any) -> None:  # noqa: N802 (Twisted's name)
        with self.arrived:
            self.calls.append((function, args))
            self.arrived.notify_all()

    def wait_for(self, count: int) -> None:
        with self.arrived:
            reported = self.arrived.wait_for(lambda: len(self.calls) >= count, timeout=10)
        assert reported, "the commit thread did not report"

    def run_calls(self) -> None:
        with self.arrived:
            calls, self.calls = self.calls, []
        for function, args in calls:
            function(*args)


def test_messages_waiting_together_are_committed_in_one_batch(tmp_path: Path) -> None:
    """Messages that wait while the commit thread is busy go in its next batch; results fire in the reactor thread."""
    incoming, box = tmp_path / "incoming", tmp_path / "alice"
    reactor = CollectingReactor()
    committer = BatchCommitter(reactor)
    committer.start()
    release, holding = threading.Event(), threading.Event()

    def hold(path: Path) -> None:  # keeps the thread busy while more messages arrive
        holding.set()
        release.wait(10)

    results: list[Any] = []
    committer.commit(CommitJob(message(incoming, b"first\r\n"), (box,), (spool_entry(hold),))).addBoth(results.append)
    assert holding.wait(10)
    for n in range(5):
        committer.commit(CommitJob(message(incoming, f"{n}\r\n".encode()), (box,))).addBoth(results.append)
    release.set()
    reactor.wait_for(2)
    committer.stop()
    assert [len(args[0]) for _, args in reactor.calls] == [1, 5]  # the five waited together
    assert results == []  # nothing fires outside the reactor thread
    reactor.run_calls()
    assert len(results) == 6 and all(isinstance(r, list) for r in results)
    assert len(new_files(box)) == 6


def test_messages_ended_in_one_reactor_turn_wake_the_thread_once_and_go_as_one_batch(tmp_path: Path) -> None:
    """With the reactor's clock, commits wake the (idle) commit thread once, after the reactor's turn:
    three final dots handled in one turn schedule one wake-up and become one batch."""
    incoming, box = tmp_path / "incoming", tmp_path / "alice"
    reactor, clock = CollectingReactor(), Clock()
    committer = BatchCommitter(reactor, clock=clock)
    committer.start()
    for n in range(3):
        committer.commit(CommitJob(message(incoming, f"{n}\r\n".encode()), (box,)))
    wakes = len(clock.getDelayedCalls())
    assert wakes == 1, f"three commits in one turn scheduled {wakes} wake-ups, not one"
    clock.advance(0)  # the reactor's turn is over
    reactor.wait_for(1)
    committer.stop()
    assert [len(args[0]) for _, args in reactor.calls] == [3]
    assert len(new_files(box)) == 3


def test_a_failure_reaches_the_session_as_a_failed_deferred(tmp_path: Path) -> None:
    """A failed commit reaches the session as a failed Deferred (the session answers 451)."""
    incoming, bad = tmp_path / "incoming", tmp_path / "bad"
    bad.write_text("not a directory")
    reactor = CollectingReactor()
    committer = BatchCommitter(reactor, threads=2)
    committer.start()
    failures: list[Any] = []
    committer.commit(CommitJob(message(incoming, b"x\r\n"), (bad,))).addErrback(failures.append)
    reactor.wait_for(1)
    committer.stop()
    reactor.run_calls()
    assert len(failures) == 1 and failures[0].check(OSError)


def test_stop_finishes_what_is_waiting_and_later_commits_fail_temporarily(tmp_path: Path) -> None:
    """stop() commits everything waiting, in batches of max_batch; a commit after stop fails with OSError."""
    incoming, box = tmp_path / "incoming", tmp_path / "alice"
    reactor = CollectingReactor()
    committer = BatchCommitter(reactor, max_batch=3)
    committer.start()
    for n in range(10):
        committer.commit(CommitJob(message(incoming, f"{n}\r\n".encode()), (box,)))
    committer.stop()
    assert sum(len(args[0]) for _, args in reactor.calls) == 10
    assert all(len(args[0]) <= 3 for _, args in reactor.calls)
    assert len(new_files(box)) == 10
    late: list[Any] = []
    committer.commit(CommitJob(message(incoming, b"late\r\n"), (box,))).addErrback(late.append)
    assert len(late) == 1 and late[0].check(OSError)  # the session answers 451


# -- sync = "journal" ---------------------------------------------------------------


def open_journal(tmp_path: Path, **options: Any) -> Journal:
    journal = Journal(tmp_path / "spool" / "journal", tmp_path / "mail", segment_size=256 * 1024,
                      use_syncfs=False, **options)
    journal.open()
    return journal


def test_journal_batch_places_the_same_files_with_one_data_flush(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the journal a batch costs one data flush (a single write with RWF_DSYNC) and no
    fsync; each Maildir gets the file it gets without it."""
    incoming, alice, bob = tmp_path / "incoming", tmp_path / "mail" / "alice", tmp_path / "mail" / "bob"
    journal = open_journal(tmp_path)
    calls: list[str] = []
    real_fdatasync, real_fsync, real_pwritev = os.fdatasync, os.fsync, os.pwritev
    monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append("fdatasync"), real_fdatasync(fd))[1])
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "pwritev", lambda fd, buffers, offset, flags=0: (
        calls.append("pwritev+dsync" if flags & os.RWF_DSYNC else "pwritev"),
        real_pwritev(fd, buffers, offset, flags))[1])
    headers = (b"Delivered-To: alice@example.org\r\n", b"Delivered-To: bob@example.org\r\n")
    jobs = [CommitJob(message(incoming, headers[0] + f"Subject: {n}\r\n\r\nbody\r\n".encode()), (alice, bob), (),
                      headers, (0, len(headers[0]))) for n in range(20)]
    outcomes = commit_batch(jobs, "journal", journal)
    assert calls == ["pwritev+dsync"], "the batch's records are written and flushed in one call, nothing else"
    for job, outcome in zip(jobs, outcomes, strict=True):
        assert isinstance(outcome, list)
        to_alice, to_bob = (p.read_bytes() for p in outcome)
        assert to_bob == to_alice.replace(b"alice@", b"bob@", 1)
        name = job.message.name
        assert [p.name for p in outcome] == [f"{name},S={len(to_alice)}", f"{name},S={len(to_bob)}"]
    assert list(incoming.iterdir()) == []
    journal.close()
    assert "fsync" in calls  # the checkpoint at close makes the placed files durable


def test_journal_leaves_spilled_and_outbound_messages_to_the_fsync_path(tmp_path: Path) -> None:
    """A spilled message and one with outbound spool entries take the per-file fsync path; the rest the journal."""
    incoming, box = tmp_path / "incoming", tmp_path / "mail" / "alice"
    journal = open_journal(tmp_path)
    incoming.mkdir()
    spilled = IncomingMessage(incoming)
    spilled.write(b"y" * (maildir.MEMORY_LIMIT + 1))
    seen: list[bytes] = []
    outbound = spool_entry(lambda p: seen.append(p.read_bytes()))
    jobs = [CommitJob(spilled, (box,)), CommitJob(message(incoming, b"out\r\n"), (box,), (outbound,)),
            CommitJob(message(incoming, b"plain\r\n"), (box,))]
    before = journal._sequence
    outcomes = commit_batch(jobs, "journal", journal)
    assert all(isinstance(o, list) for o in outcomes) and seen == [b"out\r\n"]
    assert journal._sequence == before + 1  # only the plain one was journaled
    assert sorted(len(b) for b in new_files(box).values()) == [5, 7, maildir.MEMORY_LIMIT + 1]
    journal.close()


def test_journal_a_failing_mailbox_fails_only_its_own_message(tmp_path: Path) -> None:
    """With the journal a Maildir that cannot be made fails its own message before anything is journaled."""
    incoming, good, bad = tmp_path / "incoming", tmp_path / "mail" / "good", tmp_path / "mail" / "bad"
    journal = open_journal(tmp_path)
    bad.parent.mkdir(parents=True)
    bad.write_text("a file where a Maildir should be")
    first, second = commit_batch([CommitJob(message(incoming, b"1\r\n"), (good,)),
                                  CommitJob(message(incoming, b"2\r\n"), (bad,))], "journal", journal)
    assert isinstance(first, list) and isinstance(second, OSError)
    assert journal._sequence == 1
    journal.close()


def test_journal_pop3_deleting_an_unsettled_file_checkpoints_first(tmp_path: Path) -> None:
    """POP3 QUIT removing a file only the journal covers checkpoints first; removing a settled one does not."""
    incoming, box = tmp_path / "incoming", tmp_path / "mail" / "alice"
    journal = open_journal(tmp_path)
    commit_batch([CommitJob(message(incoming, f"{n}\r\n".encode()), (box,)) for n in range(2)], "journal", journal)
    checkpoints = len(list(journal.directory.glob("checkpoint")))
    assert checkpoints == 0
    mailbox = MaildirMailbox(box)
    mailbox.load()
    mailbox.mark_deleted(0)
    assert mailbox.commit().deleted == 1
    assert (journal.directory / "checkpoint").exists() and journal.checkpoint_due_in() is None
    stamp = (journal.directory / "checkpoint").stat().st_mtime_ns
    mailbox.load()
    mailbox.mark_deleted(0)
    assert mailbox.commit().deleted == 1
    assert (journal.directory / "checkpoint").stat().st_mtime_ns == stamp  # nothing was pending
    journal.close()


def test_committer_with_a_journal_recovers_at_start_checkpoints_when_due_and_at_stop(tmp_path: Path) -> None:
    """BatchCommitter opens the journal (recovery) at start, checkpoints when one is due and at stop."""
    incoming, box = tmp_path / "incoming", tmp_path / "mail" / "alice"
    now = [0.0]
    journal = Journal(tmp_path / "spool" / "journal", tmp_path / "mail", segment_size=256 * 1024, use_syncfs=False,
                      checkpoint_seconds=5.0, clock=lambda: now[0])
    reactor = CollectingReactor()
    committer = BatchCommitter(reactor, sync="journal", journal=journal)
    committer.start()
    assert journal.is_open
    committer.commit(CommitJob(message(incoming, b"1\r\n"), (box,)))
    reactor.wait_for(1)
    assert journal.checkpoint_due_in() == 5.0
    now[0] = 6.0  # due: the checkpoint thread wakes up after the next batch (or when its wait ends)
    committer.commit(CommitJob(message(incoming, b"2\r\n"), (box,)))
    reactor.wait_for(2)
    wait_until(lambda: (journal.directory / "checkpoint").exists(), timeout=10, what="a checkpoint")
    committer.commit(CommitJob(message(incoming, b"3\r\n"), (box,)))
    committer.stop()
    assert not journal.is_open and journal.checkpoint_due_in() is None
    assert len(new_files(box)) == 3


def test_journal_segments_roll_over_and_are_reused_after_a_checkpoint(tmp_path: Path) -> None:
    """Batches larger than what is free roll over to new segments, then (at the limit) checkpoint and reuse them."""
    incoming, box = tmp_path / "incoming", tmp_path / "mail" / "alice"
    journal = open_journal(tmp_path)
    body = b"z" * 100_000
    for _ in range(30):  # 3 MB through 256 KiB segments
        outcomes = commit_batch([CommitJob(message(incoming, body), (box,)) for _ in range(5)], "journal", journal)
        assert all(isinstance(o, list) for o in outcomes)
    assert len(list(journal.directory.glob("segment.*"))) <= journal_module.MAX_SEGMENTS // 2
    journal.abandon()  # a crash: recovery replays what was not checkpointed, writes nothing twice
    again = open_journal(tmp_path)
    assert len(new_files(box)) == 150
    again.close()


def test_journal_recovery_makes_files_found_whole_durable_before_freeing_the_journal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a kill -9 the placed files are whole but maybe not on disk: recovery fsyncs them before its checkpoint."""
    incoming, box = tmp_path / "incoming", tmp_path / "mail" / "alice"
    journal = open_journal(tmp_path)
    [outcome] = commit_batch([CommitJob(message(incoming, b"kept\r\n"), (box,))], "journal", journal)
    journal.abandon()
    synced: list[Path] = []
    real = journal_module.fsync_file
    monkeypatch.setattr(journal_module, "fsync_file", lambda path: (synced.append(path), real(path))[1])
    again = Journal(tmp_path / "spool" / "journal", tmp_path / "mail", segment_size=256 * 1024, use_syncfs=False)
    assert again.open().written == 0
    assert synced == outcome
    again.close()


def test_journal_appends_go_on_while_a_checkpoint_syncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint syncs outside the append lock: a batch commits meanwhile and stays covered by the journal."""
    incoming, box = tmp_path / "incoming", tmp_path / "mail" / "alice"
    journal = open_journal(tmp_path)
    commit_batch([CommitJob(message(incoming, b"first\r\n"), (box,))], "journal", journal)
    syncing, release = threading.Event(), threading.Event()
    real = journal._make_placed_durable

    def slow(placed: Any, touched: Any) -> None:
        syncing.set()
        assert release.wait(10)
        real(placed, touched)

    monkeypatch.setattr(journal, "_make_placed_durable", slow)
    checkpoint = threading.Thread(target=journal.checkpoint)
    checkpoint.start()
    assert syncing.wait(10)
    [second] = commit_batch([CommitJob(message(incoming, b"second\r\n"), (box,))], "journal", journal)
    assert isinstance(second, list)  # not held by the running checkpoint
    release.set()
    checkpoint.join(10)
    assert journal._read_checkpoint() == 1 and journal.checkpoint_due_in() is not None  # the second still waits
    journal.abandon()
    second[0].unlink()  # lost with the page cache: the journal still has it
    again = Journal(tmp_path / "spool" / "journal", tmp_path / "mail", segment_size=256 * 1024, use_syncfs=False)
    assert again.open().written == 1
    assert sorted(new_files(box).values()) == [b"first\r\n", b"second\r\n"]
    again.close()


def test_journal_and_fsync_give_the_quota_the_same_sizes(tmp_path: Path) -> None:
    """The quota scan (sizes from ",S=" names) counts the same bytes whichever way a message was committed."""
    from mailappliance.quota import maildir_usage

    incoming = tmp_path / "incoming"
    journal = open_journal(tmp_path)
    headers = (b"Delivered-To: alice@example.org\r\n", b"Delivered-To: bobby@example.org\r\n")
    for sync, suffix in (("fsync", "-f"), ("journal", "-j")):
        boxes = (tmp_path / "mail" / f"alice{suffix}", tmp_path / "mail" / f"bob{suffix}")
        jobs = [CommitJob(message(incoming, headers[0] + b"x" * n), boxes, (), headers, (0, len(headers[0])))
                for n in (10, 1000, 50_000)]
        assert all(isinstance(o, list) for o in commit_batch(jobs, sync, journal))
    for user in ("alice", "bob"):
        usage = maildir_usage(tmp_path / "mail" / f"{user}-f")
        assert usage == maildir_usage(tmp_path / "mail" / f"{user}-j") > 0
    journal.close()


def test_unique_names_sort_in_the_order_they_were_made(monkeypatch: pytest.MonkeyPatch) -> None:
    """Microseconds are zero-padded: a name made at .000099 sorts before one made at .100000 of the same second."""
    from mailappliance import maildir

    times = iter([1_000_000.000099, 1_000_000.1])
    monkeypatch.setattr(maildir.time, "time", lambda: next(times))
    first, second = maildir.unique_name(), maildir.unique_name()
    assert ".M000099P" in first and first < second


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 10240, 65536, 65537, 300_000])
def test_a_records_checksum_is_the_crc_of_its_whole_header_and_body(size: int) -> None:
    """Summed in pieces (to keep the GIL) or whole, the CRC is that of the concatenation, as
    journals written before the pieces have it: recovery reads both alike, and a flipped byte
    anywhere in the body changes it."""
    import struct
    import zlib

    body = os.urandom(size)
    assert journal_module.record_crc(7, 1, body) == zlib.crc32(struct.pack("<QB", 7, 1) + body)
    if size:
        flipped = body[:-1] + bytes([body[-1] ^ 1])
        assert journal_module.record_crc(7, 1, flipped) != journal_module.record_crc(7, 1, body)
