"""kill -9 while messages stream in: every 250 is whole in new/, nothing partial ever is."""

from __future__ import annotations

import smtplib
from collections.abc import Callable

import pytest

from mailappliance.settings import syncfs_available
from tests.daemon import Appliance
from tests.token_load import assert_each_once, kill_9_after, load_until, message, stored_tokens

USERS = ("alice", "bob")


@pytest.mark.parametrize("sync", ["fsync", "syncfs", "journal"])
def test_kill_9_loses_nothing_and_exposes_nothing_partial(appliance: Callable[..., Appliance], sync: str) -> None:
    """kill -9 under load: each message that got 250 is in new/ once and whole, nothing partial; restart cleans up."""
    if sync == "syncfs" and not syncfs_available():
        pytest.skip("syncfs needs Linux 5.8")
    instance = appliance(start=False, extra={"storage": {"sync": sync}})
    for user in USERS:
        assert instance.admin("user", "add", f"{user}@example.org", password=f"{user}-password").returncode == 0
    instance.start()
    accepted = load_until(instance.ports["mx"], kill_9_after(instance, 20, 20),
                          recipients=[f"{u}@example.org" for u in USERS])
    found = stored_tokens(instance.maildir_root)
    assert_each_once(accepted, found)

    instance.start()  # restart: partial leftovers in incoming/ are removed, new/ is unchanged
    assert not list((instance.root / "spool" / "incoming").iterdir())
    after = stored_tokens(instance.maildir_root)
    if sync == "journal":
        assert list((instance.root / "spool" / "journal").glob("segment.*"))
    if sync == "journal":  # a record made durable just before the kill, placed now: whole, once, never a 250 lost
        assert after.items() >= found.items() and all(count == 1 for count in after.values())
    else:
        assert after == found
    with smtplib.SMTP("127.0.0.1", instance.ports["mx"], timeout=5) as smtp:
        smtp.sendmail("friend@example.net", ["alice@example.org"], message("after-restart"))
    assert "after-restart" in stored_tokens(instance.maildir_root)


def test_a_pop3_delete_of_journaled_mail_survives_kill_9(appliance: Callable[..., Appliance], pki: object) -> None:
    """With the journal: mail just delivered, deleted over POP3, then kill -9: the restart does not bring it back."""
    instance = appliance(pki=pki, start=False, extra={"storage": {"sync": "journal"}})
    assert instance.admin("user", "add", "alice@example.org", password="alice-password").returncode == 0
    instance.start()
    with smtplib.SMTP("127.0.0.1", instance.ports["mx"], timeout=5) as smtp:
        for token in ("gone", "kept"):
            smtp.sendmail("friend@example.net", ["alice@example.org"], message(token))
    client = instance.pop3("alice@example.org", "alice-password")
    listed = [client.retr(n + 1)[1] for n in range(len(client.list()[1]))]
    first = next(n for n, lines in enumerate(listed) if b"Subject: gone" in lines)
    client.dele(first + 1)
    client.quit()  # within the checkpoint interval: the journal still covers both
    instance.kill9()
    instance.start()
    assert set(stored_tokens(instance.maildir_root, folders=("new", "cur"))) == {"kept"}
