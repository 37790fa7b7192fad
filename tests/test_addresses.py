"""Validation of what the admin puts into the directory, and of uids that name Maildirs."""

from __future__ import annotations

import pytest

from mailappliance.addresses import is_safe_mailbox_name, validate_display_name, validate_uid
from mailappliance.directory import InvalidAddress


@pytest.mark.parametrize("uid", ["alice", "bob.smith", "c+d@e", "Jörg", "a" * 64, "x" * 255])
def test_safe_mailbox_names(uid: str) -> None:
    """One visible path component is a safe Maildir name (directory entries may hold non-ASCII uids)."""
    assert is_safe_mailbox_name(uid)


@pytest.mark.parametrize("uid", ["", ".", "..", "../escape", ".dot", "a/b", "/abs", "a..b", "nul\0",
                                 "tab\tx", "line\nfeed", "del\x7f", "ö" * 128])
def test_unsafe_mailbox_names(uid: str) -> None:
    """Empty, hidden, '..', a '/', a control character or more than 255 bytes: not a mailbox name."""
    assert not is_safe_mailbox_name(uid)


@pytest.mark.parametrize("uid", ["a..b", "../x", ".x", "-x", "a b", "a\x1cb", "a" * 65, "Jörg"])
def test_admin_uids_are_stricter(uid: str) -> None:
    """New uids from the admin: 1-64 of a small ASCII set, no '..'."""
    with pytest.raises(InvalidAddress):
        validate_uid(uid)


def test_display_names() -> None:
    """Printable names up to 128 characters pass (trimmed); control and separator characters do not."""
    assert validate_display_name("  Carol Jones ") == "Carol Jones"
    assert validate_display_name("Zoë Ünal-Çelik") == "Zoë Ünal-Çelik"
    assert validate_display_name("") == ""
    for bad in ("Mallory\x1cmailLocalAddress: alice@example.org", "a\nb", "a\rb", "a\x0bb", "a\u2028b",
                "a\x00b", "x" * 129):
        with pytest.raises(InvalidAddress):
            validate_display_name(bad)
