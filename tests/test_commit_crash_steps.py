"""A crash at every step of the commit, for every ``[storage] sync`` method.

The commit calls ``journal.crash_point(step)`` after each write, fsync,
rename and journal step; a hook raises :class:`Crash` (standing for the
process dying) at the k-th step, for every k a clean run passes.  Then the
start-up clean-up runs (incoming/ cleared; with the journal, its recovery)
and the Maildirs are checked: every message whose commit returned (its 250)
is whole exactly once per recipient, nothing without a 250 is half-visible,
and a POP3 DELE applied before the crash stays applied.  With the journal,
files placed since the last checkpoint are also deleted or truncated before
recovery, as a power loss may leave them.
"""

from __future__ import annotations

import os
from pathlib import Path

import attrs
import pytest

from mailappliance import journal_files as journal_module
from mailappliance.delivery import CommitJob, CommitOutcome, commit_batch
from mailappliance.journal import Journal
from mailappliance.journal_files import unique_part
from mailappliance.maildir import IncomingMessage, clean_incoming, forget_maildir
from mailappliance.pop3.mailbox import MaildirMailbox
from mailappliance.settings import syncfs_available

METHODS = ["fsync", "journal"] + (["syncfs"] if syncfs_available() else [])
RECIPIENTS = ("alice", "bob")


class Crash(BaseException):
    """The process dies here (BaseException: no commit step catches it)."""


@attrs.define
class World:
    root: Path
    mail: Path
    incoming: Path
    sync: str
    journal: Journal | None = None
    sent: dict[str, dict[str, bytes]] = attrs.Factory(dict)  # unique name -> maildir name -> expected bytes
    acknowledged: set[str] = attrs.Factory(set)
    deleted: set[str] = attrs.Factory(set)  # (unique name) removed from alice's Maildir by POP3

    def open_journal(self) -> None:
        if self.sync == "journal":
            self.journal = Journal(self.root / "spool" / "journal", self.mail, segment_size=256 * 1024,
                                   use_syncfs=syncfs_available())
            self.journal.open()

    def batch(self, label: str, count: int) -> None:
        jobs = []
        for n in range(count):
            body = f"Delivered-To: alice@example.org\r\nSubject: {label}{n}\r\n\r\n{label} body {n}\r\n".encode()
            m = IncomingMessage(self.incoming)
            m.write(body)
            headers = tuple(f"Delivered-To: {u}@example.org\r\n".encode() for u in RECIPIENTS)
            jobs.append(CommitJob(m, tuple(self.mail / u for u in RECIPIENTS), (), headers, (0, len(headers[0]))))
            self.sent[m.name] = {u: body.replace(b"alice@", f"{u}@".encode(), 1) for u in RECIPIENTS}
        outcomes: list[CommitOutcome] = commit_batch(jobs, self.sync, self.journal)
        for job, outcome in zip(jobs, outcomes, strict=True):
            assert isinstance(outcome, list), outcome
            self.acknowledged.add(job.message.name)  # the 250

    def pop3_delete_first(self) -> None:
        box = MaildirMailbox(self.mail / "alice")
        box.load()
        box.mark_deleted(0)
        uid = unique_part(box.messages[0].path.name)
        result = box.commit()
        assert result.deleted == 1
        self.deleted.add(uid)


def scenario(world: World) -> None:
    world.open_journal()
    world.batch("a", 3)
    world.pop3_delete_first()
    world.batch("b", 3)
    journal_module.crash_point("scenario.acknowledged")  # every 250 given, nothing checkpointed since POP3's
    if world.journal is not None:
        world.journal.close()


def make_world(tmp_path: Path, sync: str) -> World:
    incoming = tmp_path / "spool" / "incoming"
    incoming.mkdir(parents=True)
    for user in RECIPIENTS:
        forget_maildir(tmp_path / "mail" / user)
    return World(tmp_path, tmp_path / "mail", incoming, sync)


def count_steps(tmp_path: Path, sync: str, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    steps: list[str] = []
    monkeypatch.setattr(journal_module, "CRASH_HOOK", steps.append)
    scenario(make_world(tmp_path / "clean", sync))
    monkeypatch.setattr(journal_module, "CRASH_HOOK", None)
    return steps


def lose_unsynced(world: World, k: int) -> None:
    """What a power loss may do to files placed after the journal's last checkpoint."""
    assert world.journal is not None
    pending = set(world.journal._pending_names)
    for path in world.mail.glob("*/*/*"):
        if path.parent.name in ("new", "cur") and unique_part(path.name) in pending:
            if k % 2:
                path.unlink()
            else:
                os.truncate(path, path.stat().st_size // 2)


def restart(world: World) -> None:
    """What the daemon does at start after a crash."""
    clean_incoming(world.incoming)
    if world.journal is not None:
        world.journal.abandon()  # the dead process's journal
        for user in RECIPIENTS:
            forget_maildir(world.mail / user)
        world.open_journal()
        world.journal.close()


def check(world: World) -> None:
    for user in RECIPIENTS:
        files: dict[str, list[Path]] = {}
        for sub in ("new", "cur"):
            directory = world.mail / user / sub
            for path in directory.iterdir() if directory.exists() else ():
                files.setdefault(unique_part(path.name), []).append(path)
        for uid, paths in files.items():
            assert uid in world.sent, f"a file nobody sent: {paths}"
            assert len(paths) == 1, f"{uid} is in {user}'s Maildir {len(paths)} times"
            assert paths[0].read_bytes() == world.sent[uid][user], f"{paths[0]} is not whole"
        for uid in world.acknowledged:
            if user == "alice" and uid in world.deleted:
                assert uid not in files, f"{uid} was deleted by POP3 and came back"
            else:
                assert uid in files, f"{uid} got its 250 and is not in {user}'s Maildir"


@pytest.mark.parametrize("sync", METHODS)
def test_a_crash_at_every_commit_step_loses_no_acknowledged_message(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sync: str) -> None:
    """A crash after any commit step: 250'd mail whole once per recipient, DELE kept, nothing torn."""
    steps = count_steps(tmp_path, sync, monkeypatch)
    assert len(steps) >= 8
    if sync == "journal":
        assert {"journal.append.synced", "journal.place.renamed", "journal.checkpoint.written"} <= set(steps)
    for k, step in enumerate(steps):
        world = make_world(tmp_path / f"crash{k}", sync)

        def hook(name: str, left: list[int] = [k]) -> None:  # noqa: B006 (a counter per run)
            if left[0] == 0:
                raise Crash(name)
            left[0] -= 1

        monkeypatch.setattr(journal_module, "CRASH_HOOK", hook)
        with pytest.raises(Crash):
            scenario(world)
        monkeypatch.setattr(journal_module, "CRASH_HOOK", None)
        if world.journal is not None and not step.startswith("journal.checkpoint."):  # else synced already
            lose_unsynced(world, k)
        restart(world)
        try:
            check(world)
            restart(world)  # a second start changes nothing
            check(world)
        except AssertionError as e:
            raise AssertionError(f"crash at step {k} ({step}): {e}") from None
