"""The POP3 index as an attacker sees it: whoever can write into a Maildir (a
subscriber with file access to it, another tool, a restored backup) can put
anything at ``mailappliance.index``.  None of it may hide a message, invent
one, cut one short, point outside cur/, inject protocol lines, or hang or
exhaust the server: such an index is ignored and rebuilt."""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

import pytest

from mailappliance.pop3 import index as pop3_index
from mailappliance.pop3.index import INDEX_NAME, KEY_NAME, DirState, parse_index, read_index
from tests.test_pop3_index import Maildir, maildir  # noqa: F401 - maildir is a fixture
from tests.test_pop3_protocol import Env, env, unstuff  # noqa: F401 - env is a fixture


def forge(maildir: Maildir, lines: list[str], key: bytes, path: Path | None = None) -> None:  # noqa: F811
    """An index whose header matches cur/ exactly, with ``lines`` as entries, MAC'd with ``key``."""
    st = os.stat(maildir.path / "cur")
    content = (f"{pop3_index.MAGIC} {st.st_dev} {st.st_ino} {st.st_mtime_ns} 1 {len(lines)}\n"
               + "".join(line + "\n" for line in lines)).encode()
    mac = hmac.new(key, os.fsencode(path or maildir.path) + b"\0" + content, hashlib.sha256).hexdigest()
    (maildir.path / INDEX_NAME).write_bytes(f"mac {mac}\n".encode() + content)
    (maildir.path / INDEX_NAME).chmod(0o600)


def real_names(maildir: Maildir) -> list[str]:  # noqa: F811
    return sorted(n for n in os.listdir(maildir.path / "cur"))


def test_forged_index_cannot_hide_or_invent_messages(maildir: Maildir) -> None:  # noqa: F811
    """An index that matches cur/'s state but lists a phantom and omits a real message, MAC'd with a
    guessed key, is ignored: the login shows exactly the files there, and the index is rebuilt."""
    for _ in range(3):
        maildir.deliver()
    real = [m.path.name for m in maildir.settle().messages]
    forge(maildir, [f"1 10 {real[0]}", "2 10 1700000999.phantom,S=10:2,"], key=b"x" * 32)
    mailbox = maildir.load()
    assert [m.path.name for m in mailbox.messages] == real
    rebuilt = read_index(maildir.path, maildir.key.get())
    assert rebuilt is not None and rebuilt.messages.names == real


def test_tampered_entries_break_the_mac(maildir: Maildir) -> None:  # noqa: F811
    """Editing our own index (a size, a name added) makes it foreign: ignored and rebuilt."""
    for _ in range(2):
        maildir.deliver()
    maildir.settle()
    path = maildir.path / INDEX_NAME
    data = path.read_bytes()
    path.write_bytes(data.replace(b" 20 ", b" 99999 ", 1) + b"1 5 1700000998.phantom:2,\n")
    mailbox = maildir.load()
    assert mailbox.stat() == (2, 40) and len(mailbox.messages) == 2


def test_index_copied_from_another_maildir_is_foreign(maildir: Maildir) -> None:  # noqa: F811
    """An index with a valid MAC for another subscriber's Maildir is not accepted for this one."""
    maildir.deliver()
    maildir.settle()
    forge(maildir, ["1 10 1700000997.theirs,S=10:2,"], maildir.key.get(), path=maildir.root / "bob")
    assert [m.uidl for m in maildir.load().messages] == ["1700000001.M1P2Q1.host"]


def test_wrong_sizes_never_cut_a_message_short(env: Env) -> None:  # noqa: F811
    """With our own valid index saying a message is 5 octets (the file grew behind it), LIST
    shows the index's size but RETR sends the whole file and a correct end."""
    message = b"Subject: grown\r\n\r\n" + b"line\r\n" * 2000
    path = env.deliver("alice", message)
    client = env.connect()
    client.login()
    client.send("QUIT\r\n")
    box = env.root / "alice"
    old = 1_700_000_000_000_000_000
    os.utime(box / "cur", ns=(old, old))
    key = (env.root / KEY_NAME).read_bytes()
    name = path.name + ":2,"
    st = os.stat(box / "cur")
    content = (f"{pop3_index.MAGIC} {st.st_dev} {st.st_ino} {st.st_mtime_ns} 1 1\n1 5 {name}\n").encode()
    mac = hmac.new(key, os.fsencode(box) + b"\0" + content, hashlib.sha256).hexdigest()
    (box / INDEX_NAME).write_bytes(f"mac {mac}\n".encode() + content)
    client = env.connect()
    client.login()
    assert client.send("LIST 1\r\n") == "+OK 1 5\r\n"
    assert unstuff(client.send("RETR 1\r\n")) == message


@pytest.mark.parametrize("line", [
    "1 5 ../../../etc/passwd",
    "1 5 .hidden",
    "1 5 a/b",
    "1 5 name\r\n+OK injected",
    "1 -5 name",
    "1 5 name extra",
    "x 5 name",
    "1 5 " + "n" * 300,
])
def test_malformed_entries_are_refused_whole(line: str) -> None:
    """An entry that is not a plain cur/ file name (traversal, hidden, CR LF, spaces, too long) or
    not a non-negative number makes the whole index invalid, whatever else it holds."""
    content = f"{pop3_index.MAGIC} 1 2 3 1 1\n{line}\n".encode()
    assert parse_index(content) is None
    assert parse_index(f"{pop3_index.MAGIC} 1 2 3 1 1\n1 5 good:2,\n".encode()) is not None


def test_huge_index_is_not_read(maildir: Maildir, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """An index file larger than the bound is ignored without reading it, and replaced."""
    maildir.deliver()
    path = maildir.path / INDEX_NAME
    with open(path, "wb") as f:
        f.truncate(pop3_index.MAX_INDEX_BYTES + 1)  # sparse: no disk used
    path.chmod(0o600)
    reads: list[int] = []
    real_read = os.read
    monkeypatch.setattr(os, "read", lambda fd, n: reads.append(n) or real_read(fd, n))
    assert maildir.load().stat()[0] == 1
    assert all(n <= pop3_index.KEY_BYTES + 1 for n in reads)
    assert path.stat().st_size < 1000


def test_symlink_in_place_of_the_index_is_neither_followed_nor_written_through(
        maildir: Maildir, tmp_path: Path) -> None:  # noqa: F811
    """A symlink named mailappliance.index (to a valid-looking index, or to a file of the victim's)
    is not read, and writing the new index replaces the link, never its target."""
    maildir.deliver()
    maildir.settle()
    target = tmp_path / "elsewhere"
    target.write_bytes((maildir.path / INDEX_NAME).read_bytes())
    (maildir.path / INDEX_NAME).unlink()
    (maildir.path / INDEX_NAME).symlink_to(target)
    before = target.read_bytes()
    maildir.deliver(into="cur")
    assert maildir.load().stat()[0] == 2
    assert target.read_bytes() == before
    assert not (maildir.path / INDEX_NAME).is_symlink()


def test_fifo_in_place_of_the_index_does_not_hang(maildir: Maildir) -> None:  # noqa: F811
    """A FIFO at the index's name is not opened for a blocking read: the login goes on and replaces it."""
    maildir.deliver()
    os.mkfifo(maildir.path / INDEX_NAME, 0o600)
    assert maildir.load().stat()[0] == 1
    assert (maildir.path / INDEX_NAME).is_file()


def test_key_that_is_not_ours_alone_is_not_used(maildir: Maildir, tmp_path: Path) -> None:  # noqa: F811
    """A key file that is a symlink (to a key someone else knows) or readable by others is not used:
    no index is trusted, mail is still all there."""
    known = tmp_path / "known-key"
    known.write_bytes(b"k" * 32)
    known.chmod(0o600)
    (maildir.root / KEY_NAME).symlink_to(known)
    maildir.deliver()
    forge(maildir, ["1 10 1700000996.phantom:2,"], b"k" * 32)
    assert [m.uidl for m in maildir.load().messages] == ["1700000001.M1P2Q1.host"]
    assert DirState.of(os.stat(maildir.path / "cur"))  # the Maildir itself is untouched


def test_a_torn_key_is_replaced(maildir: Maildir) -> None:  # noqa: F811
    """A key file of ours cut short (a crash after it was made: it is not fsynced) is replaced by a
    new key, and indexes made with the old one are rebuilt, not trusted."""
    maildir.deliver()
    maildir.settle()
    key_path = maildir.root / KEY_NAME
    old_key = key_path.read_bytes()
    key_path.write_bytes(b"")
    fresh = Maildir(maildir.root)  # a restarted daemon: the key is read again
    fresh.counter = maildir.counter
    fresh.deliver()
    assert fresh.load().stat()[0] == 2
    new_key = key_path.read_bytes()
    assert len(new_key) == pop3_index.KEY_BYTES and new_key != old_key
    assert read_index(fresh.path, new_key) is not None
