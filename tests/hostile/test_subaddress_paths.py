"""A sub-address names a folder, so an attacker will try to make it name a path: every tag
that is not one plain component files into the inbox, no folder is ever created, a
symbolic link planted as a folder is not followed, and nothing is written outside the
subscriber's Maildir."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_smtp_addressing import Session

TAGS = [b"..", b"../../../tmp/x", b"a/../../b", b".hidden", b"/etc", b"tmp", b"new", b"cur",
        b"x" * 50, b"lists/../../..", b".lists", b"..lists", b"%2e%2e"]


@pytest.fixture
def session(tmp_path: Path) -> Session:
    return Session(tmp_path)


def files_outside(root: Path, mailbox: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and mailbox not in p.parents]


def test_hostile_tags_file_into_the_inbox_only(session: Session, tmp_path: Path) -> None:
    """Traversal, hidden and special names as tags: refused as addresses or delivered to alice's inbox, no folder made."""
    delivered = 0
    for tag in TAGS:
        rcpt = b"RCPT TO:<alice+" + tag + b"@example.org>\r\n"
        lines = session.send(b"MAIL FROM:<eve@sender.example>\r\n" + rcpt + b"DATA\r\n")
        if lines[1].startswith(("501 5.1.3", "554 5.7.1")):  # not even an address, or a routing character
            session.send(b"RSET\r\n")
            continue
        assert lines[-1].startswith("354"), (tag, lines)
        assert session.send(b"Subject: x\r\n\r\nx\r\n.\r\n")[0].startswith("250 "), tag
        delivered += 1
    mailbox = session.root / "alice"
    assert delivered >= 7 and len(session.mailbox("alice")) == delivered
    assert sorted(p.name for p in mailbox.iterdir()) == ["cur", "new", "tmp"]
    assert files_outside(session.root, mailbox) == []
    assert not (tmp_path / "tmp").exists() and not Path("/tmp/x").exists()


def test_a_planted_symlink_folder_is_not_followed(session: Session, tmp_path: Path) -> None:
    """A .lists that is a symbolic link to another Maildir is not a folder: the message stays in the inbox."""
    elsewhere = tmp_path / "elsewhere"
    for sub in ("new", "cur", "tmp"):
        (elsewhere / sub).mkdir(parents=True)
    (session.root / "alice").mkdir(parents=True)
    (session.root / "alice" / ".lists").symlink_to(elsewhere)
    lines = session.send(b"MAIL FROM:<eve@sender.example>\r\nRCPT TO:<alice+lists@example.org>\r\nDATA\r\n")
    assert lines[-1].startswith("354")
    assert session.send(b"Subject: x\r\n\r\nx\r\n.\r\n")[0].startswith("250 ")
    assert len(session.mailbox("alice")) == 1 and list((elsewhere / "new").iterdir()) == []
