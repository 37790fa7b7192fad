"""Finding 7 (first half): a stranger on the MX cannot fill a subscriber's mailbox (or the disk) without end.

Each subscriber has a quota (``[storage] mailbox_quota``, overridden in the
directory with ``limit:mailbox_quota_mb``): a full mailbox gets ``452 4.2.2``
at RCPT, a message that does not fit gets ``552 5.2.2`` after DATA.
"""

from __future__ import annotations

import json
import smtplib
import urllib.request
from typing import Callable

import pytest

from mailappliance.quota import maildir_usage
from tests.daemon import Appliance

KIB = 1024
SENDER = "sender@remote.example"


def message(size: int) -> bytes:
    """A message of about ``size`` bytes, in 78-octet lines."""
    return b"Subject: filler\r\n\r\n" + (b"x" * 76 + b"\r\n") * (size // 78)


@pytest.fixture
def small_quota(appliance: Callable[..., Appliance]) -> Appliance:
    instance = appliance(start=False, extra={"storage": {"mailbox_quota": "100K"}})
    for login in ("alice", "bob", "carol"):
        added = instance.admin("user", "add", f"{login}@example.org", password=f"{login}-password")
        assert added.returncode == 0, added.stderr
    ldif = instance.root / "users.ldif"  # the admin gives carol 1 MiB in the directory
    ldif.write_text(ldif.read_text().replace(
        "mail: carol@example.org", "mail: carol@example.org\ndescription: limit:mailbox_quota_mb=1"))
    instance.start()
    return instance


def mx(instance: Appliance) -> smtplib.SMTP:
    smtp = smtplib.SMTP("127.0.0.1", instance.ports["mx"], timeout=30)
    smtp.ehlo("sender.example.net")
    return smtp


def metric(instance: Appliance, line_start: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{instance.ports['metrics']}/metrics", timeout=10) as response:
        text = response.read().decode()
    return next((line for line in text.splitlines() if line.startswith(line_start)), "")


def test_a_full_mailbox_refuses_rcpt_with_452_4_2_2(small_quota: Appliance) -> None:
    """Strangers fill a 100 KiB mailbox up to its quota; then every RCPT to it gets 452 4.2.2."""
    with mx(small_quota) as smtp:
        for accepted in range(100):
            try:  # smtplib declares SIZE, as most senders do
                smtp.sendmail(SENDER, ["alice@example.org"], message(8000))
            except smtplib.SMTPRecipientsRefused as e:
                code, text = e.recipients["alice@example.org"]
                break
        else:
            pytest.fail("100 messages of 8 KB went into a mailbox with a quota of 100 KiB")
        assert (code, text[:6]) == (452, b"4.2.2 ")
        assert accepted >= 12  # filled up to the quota, not refused early
        smtp.mail(SENDER)  # no SIZE, and a tiny message: still no room
        code, text = smtp.rcpt("alice@example.org")
        assert (code, text[:6]) == (452, b"4.2.2 ")
        smtp.rset()
        assert smtp.sendmail(SENDER, ["bob@example.org"], message(8000)) == {}  # other mailboxes are not affected
    used = maildir_usage(small_quota.maildir_root / "alice")
    assert 100 * KIB <= used <= 110 * KIB
    shown = small_quota.admin("user", "show", "alice")
    assert shown.returncode == 0 and "quota:" in shown.stdout and "of 100.0 KiB" in shown.stdout
    fields = json.loads(small_quota.admin("--json", "user", "show", "alice").stdout)
    assert (fields["quota_used"], fields["quota_limit"]) == (used, 100 * KIB)
    assert float(metric(small_quota, 'mailappliance_quota_refusals_total{stage="rcpt"} ').split()[-1]) == 2
    assert "mailbox full" in small_quota.log()


def test_a_message_that_does_not_fit_gets_552_5_2_2_after_data(small_quota: Appliance) -> None:
    """A message that would take the mailbox past its quota (and grace) is refused with 552 5.2.2 after DATA."""
    with mx(small_quota) as smtp:
        assert smtp.sendmail(SENDER, ["bob@example.org"], message(60_000)) == {}
        assert smtp.mail(SENDER)[0] == 250  # no SIZE: the quota can only be checked after DATA
        assert smtp.rcpt("bob@example.org")[0] == 250
        code, text = smtp.data(message(60_000))
        assert (code, text[:6]) == (552, b"5.2.2 ")
        assert smtp.mail(SENDER, [f"SIZE={60_000}"])[0] == 250  # declared: refused at RCPT already
        code, text = smtp.rcpt("bob@example.org")
        assert (code, text[:6]) == (452, b"4.2.2 ")
        smtp.rset()
        assert smtp.sendmail(SENDER, ["bob@example.org"], message(40_000)) == {}  # what fits still goes in
    assert len(list((small_quota.maildir_root / "bob" / "new").iterdir())) == 2
    assert float(metric(small_quota, 'mailappliance_quota_refusals_total{stage="data"} ').split()[-1]) == 1


def test_the_directory_overrides_the_quota(small_quota: Appliance) -> None:
    """description: limit:mailbox_quota_mb=1 gives carol 1 MiB where the default is 100 KiB."""
    with mx(small_quota) as smtp:
        assert smtp.sendmail(SENDER, ["carol@example.org"], message(500_000)) == {}
        refused = smtp.sendmail(SENDER, ["carol@example.org", "alice@example.org"], message(500_000))
        assert set(refused) == {"alice@example.org"} and refused["alice@example.org"][0] == 452
    assert "of 1.0 MiB" in small_quota.admin("user", "show", "carol").stdout
