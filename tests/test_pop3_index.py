"""The per-Maildir POP3 index (mailappliance/pop3/index.py): a login reads it
instead of stat'ing every message, and still sees every change.  Real
Maildirs on disk; the directory mtimes are set explicitly where a test needs
a state that is old enough to be trusted."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mailappliance.pop3 import index as pop3_index
from mailappliance.pop3.index import INDEX_NAME, KEY_NAME, DirState, IndexKey, is_settled, read_index
from mailappliance.pop3.mailbox import MaildirMailbox
from tests.test_pop3_protocol import Env, env, unstuff  # noqa: F401 - env is a fixture


class Maildir:
    """One subscriber's Maildir under a root that holds the index key."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / "alice"
        for sub in ("tmp", "new", "cur"):
            (self.path / sub).mkdir(parents=True, exist_ok=True)
        self.key = IndexKey(root)
        self.counter = 0

    def deliver(self, content: bytes = b"Subject: x\r\n\r\nbody\r\n", into: str = "new") -> str:
        """A message as a delivery leaves it, with a distinct mtime in delivery order."""
        self.counter += 1
        name = f"17000000{self.counter:02d}.M1P2Q{self.counter}.host,S={len(content)}"
        if into == "cur":
            name += ":2,"
        path = self.path / into / name
        path.write_bytes(content)
        stamp = 1_700_000_000_000_000_000 + self.counter * 1_000_000
        os.utime(path, ns=(stamp, stamp))
        return name

    def load(self) -> MaildirMailbox:
        mailbox = MaildirMailbox(self.path, None, self.key)
        mailbox.load()
        return mailbox

    def age_cur(self) -> None:
        """cur/'s mtime a minute back: the state the next listing records is trusted."""
        old = time.time_ns() - 60_000_000_000
        os.utime(self.path / "cur", ns=(old, old))

    def settle(self) -> MaildirMailbox:
        """Logins until the index is trusted as it stands (no listing of cur/ next time)."""
        self.load()
        self.age_cur()
        mailbox = self.load()
        index = read_index(self.path, self.key.get())
        assert index is not None and index.settled
        return mailbox


@pytest.fixture
def maildir(tmp_path: Path) -> Maildir:
    return Maildir(tmp_path / "maildirs")


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Counts the directory listings and stats a load makes, by path."""
    seen: dict[str, list[str]] = {"listdir": [], "lstat": []}

    def spy(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(path: Any, *args: Any, **kwargs: Any) -> Any:
            seen[name].append(os.fspath(path))
            return real(path, *args, **kwargs)
        return call

    monkeypatch.setattr(os, "listdir", spy("listdir", os.listdir))
    monkeypatch.setattr(os, "lstat", spy("lstat", os.lstat))
    return seen


def snapshot(mailbox: MaildirMailbox) -> list[tuple[str, str, int]]:
    return [(m.uidl, m.path.name, m.size) for m in mailbox.messages]


def test_index_is_private_and_carries_a_mac(maildir: Maildir) -> None:
    """The first login writes the index (mode 0600, a MAC line first) and the installation's key (0600, 32 bytes)."""
    maildir.deliver()
    maildir.load()
    index = maildir.path / INDEX_NAME
    assert stat.S_IMODE(index.stat().st_mode) == 0o600
    assert index.read_bytes().startswith(b"mac ")
    key = maildir.root / KEY_NAME
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and key.stat().st_size == 32
    assert os.listdir(maildir.path / "tmp") == []


def test_warm_login_neither_lists_nor_stats_cur(maildir: Maildir, calls: dict[str, list[str]]) -> None:
    """With a trusted index and nothing new, a login lists only new/ and stats no message."""
    for _ in range(50):
        maildir.deliver()
    before = snapshot(maildir.settle())
    calls["listdir"].clear()
    calls["lstat"].clear()
    mailbox = maildir.load()
    assert snapshot(mailbox) == before and mailbox.stat() == (50, 50 * len(b"Subject: x\r\n\r\nbody\r\n"))
    assert calls["listdir"] == [str(maildir.path / "new")]
    assert calls["lstat"] == []


def test_new_mail_costs_a_stat_per_new_message_only(maildir: Maildir, calls: dict[str, list[str]]) -> None:
    """After new mail only the new messages are stat'ed (cur/ is not listed) and they come last, in order."""
    for _ in range(30):
        maildir.deliver()
    maildir.settle()
    first, second = maildir.deliver(), maildir.deliver()
    calls["listdir"].clear()
    calls["lstat"].clear()
    mailbox = maildir.load()
    assert str(maildir.path / "cur") not in calls["listdir"]
    assert sorted(calls["lstat"]) == sorted([first, second])  # relative to new/
    assert [m.path.name for m in mailbox.messages][-2:] == [first + ":2,", second + ":2,"]
    assert mailbox.stat()[0] == 32


def test_changes_in_cur_are_found(maildir: Maildir) -> None:
    """A message put into cur/ by another tool, and one removed from it, show at the next login."""
    for _ in range(5):
        maildir.deliver()
    mailbox = maildir.settle()
    gone = mailbox.messages[0].path
    gone.unlink()
    added = maildir.deliver(into="cur")
    names = [m.path.name for m in maildir.load().messages]
    assert gone.name not in names and added in names and len(names) == 5


def test_a_change_in_the_same_mtime_tick_is_not_missed(maildir: Maildir) -> None:
    """A file added to cur/ that leaves cur/'s mtime as the index recorded it (same timestamp tick)
    is still found: a state that recent is recorded as unsettled, and the next login lists cur/."""
    maildir.deliver()
    maildir.load()
    recorded = read_index(maildir.path, maildir.key.get())
    assert recorded is not None and not recorded.settled
    added = maildir.deliver(into="cur")
    os.utime(maildir.path / "cur", ns=(recorded.state.mtime_ns, recorded.state.mtime_ns))
    assert DirState.of(os.stat(maildir.path / "cur")) == recorded.state
    assert added in [m.path.name for m in maildir.load().messages]


def test_settled_needs_the_mtime_older_than_a_tick() -> None:
    """Nanosecond mtimes are trusted 0.1 s after the change, whole-second ones (coarse filesystems) after 3 s."""
    now = 1_800_000_000_123_456_789
    assert not is_settled(DirState(1, 2, now - 50_000_000), now)
    assert is_settled(DirState(1, 2, now - 200_000_000), now)
    whole_second = (now // 1_000_000_000 - 1) * 1_000_000_000
    assert not is_settled(DirState(1, 2, whole_second), now)
    assert is_settled(DirState(1, 2, whole_second - 3_000_000_000), now)


def test_index_matches_a_full_scan_and_deleting_it_is_harmless(maildir: Maildir) -> None:
    """Order, UIDLs and sizes from the index equal a scan without one; removing the index changes nothing."""
    for n in range(20):
        maildir.deliver(b"Subject: %d\r\n\r\n" % n + b"x" * n, into="cur" if n % 3 == 0 else "new")
    from_index = snapshot(maildir.settle())
    scanned = MaildirMailbox(maildir.path)  # no key: no index
    scanned.load()
    assert snapshot(scanned) == from_index
    (maildir.path / INDEX_NAME).unlink()
    assert snapshot(maildir.load()) == from_index


def test_quit_deletions_are_gone_at_the_next_login(maildir: Maildir) -> None:
    """Messages deleted at QUIT (commit) are not in the next snapshot, with or without a trusted index."""
    for _ in range(4):
        maildir.deliver()
    mailbox = maildir.settle()
    mailbox.mark_deleted(1)
    mailbox.mark_deleted(2)
    assert mailbox.stat()[0] == 2
    assert mailbox.commit().deleted == 2
    assert maildir.load().stat()[0] == 2


def test_names_the_index_cannot_hold_are_listed_every_time(maildir: Maildir) -> None:
    """A file name with a space is shown but kept out of the index, which is then never trusted unlisted."""
    maildir.deliver()
    odd = maildir.path / "cur" / "1700000099.odd name:2,"
    odd.write_bytes(b"Subject: odd\r\n\r\n")
    maildir.load()
    maildir.age_cur()
    mailbox = maildir.load()
    assert odd.name in [m.path.name for m in mailbox.messages]
    index = read_index(maildir.path, maildir.key.get())
    assert index is not None and not index.settled and odd.name not in index.messages.names


def test_no_index_without_a_usable_key(maildir: Maildir) -> None:
    """A key file that is not private is not used: no index is read or written, logins scan as before."""
    key = maildir.root / KEY_NAME
    key.write_bytes(b"k" * 32)
    key.chmod(0o644)
    maildir.deliver()
    assert maildir.load().stat()[0] == 1
    assert not (maildir.path / INDEX_NAME).exists()


def test_an_oversized_mailbox_gets_no_index(maildir: Maildir, monkeypatch: pytest.MonkeyPatch) -> None:
    """An index that would pass the size bound is not written (and an old one goes): logins scan as before."""
    for _ in range(3):
        maildir.deliver()
    maildir.load()
    assert (maildir.path / INDEX_NAME).exists()
    monkeypatch.setattr(pop3_index, "MAX_INDEX_BYTES", 200)
    maildir.deliver()
    assert maildir.load().stat()[0] == 4
    assert not (maildir.path / INDEX_NAME).exists()


def test_retr_reads_a_large_message_whole(env: Env) -> None:  # noqa: F811
    """RETR of messages around the 64 KiB read size (one byte under, at, over, and several blocks) is whole."""
    sizes = [64 * 1024 - 1, 64 * 1024, 64 * 1024 + 1, 300 * 1024 + 5]
    messages = [b"Subject: big\r\n\r\n" + (b".line\r\n" * (size // 7 + 1))[: size - 16] for size in sizes]
    for message in messages:
        env.deliver("alice", message)
    client = env.connect()
    client.login()
    for n, message in enumerate(messages, start=1):
        reply = client.send(f"RETR {n}\r\n")
        while not reply.endswith("\r\n.\r\n"):  # the kernel streams 256 KiB per reactor turn
            env.clock.advance(0)
            reply += client.take()
        assert unstuff(reply) == message + (b"" if message.endswith(b"\r\n") else b"\r\n")


def test_a_renamed_message_is_found_under_its_new_name(maildir: Maildir) -> None:
    """A message renamed in cur/ by another tool (a flag added: same count of names) is listed
    under its new name with the same UIDL, while the index was still unsettled or settled."""
    for _ in range(3):
        maildir.deliver()
    for settle in (False, True):
        mailbox = maildir.settle() if settle else maildir.load()
        old = mailbox.messages[1].path
        new = old.with_name(old.name + "S" if settle else old.name + "F")
        old.rename(new)
        names = [m.path.name for m in maildir.load().messages]
        assert new.name in names and old.name not in names and len(names) == 3
        assert [m.uidl for m in maildir.load().messages][1] == mailbox.messages[1].uidl
