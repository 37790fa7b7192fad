"""kill -9 while large messages (spilled, written by the spill writer with O_DIRECT and
finished on the sync pool) stream in: every 250 is whole in new/, nothing partial ever is."""

from __future__ import annotations

from collections.abc import Callable

from tests.daemon import Appliance
from tests.token_load import LARGE, assert_each_once, kill_9_after, load_until, stored_tokens


def test_kill_9_during_large_messages_loses_nothing_and_exposes_nothing_partial(
        appliance: Callable[..., Appliance]) -> None:
    """kill -9 while four clients send 1.4 MB messages: each message that got a 250 is in
    new/ once and whole, no partial file anywhere in new/; the restart empties incoming/."""
    instance = appliance(start=False)
    assert instance.admin("user", "add", "alice@example.org", password="alice-password").returncode == 0
    instance.start()
    accepted = load_until(instance.ports["mx"], kill_9_after(instance, 12, 60), lines=LARGE, timeout=10)
    found = stored_tokens(instance.maildir_root, LARGE)
    assert_each_once(accepted, found)
    instance.start()  # restart: partial leftovers in incoming/ are removed, new/ is unchanged
    assert not list((instance.root / "spool" / "incoming").iterdir())
    assert stored_tokens(instance.maildir_root, LARGE) == found
