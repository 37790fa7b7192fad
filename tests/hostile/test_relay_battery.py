"""Every relay-probe form against every local AND alias domain, and SRS forgeries, on the
real daemon (LDAP backend, catch-alls on, SRS on): nothing is relayed, nothing is stored.

An attacker's view of issue 14: alias domains, sub-addresses, catch-alls and SRS
are new ways to name an address in one of our domains, and each must be exactly
as closed to relaying as the plain local domains: the percent hack, bang paths,
source routes, quoted local parts and lookalike domains are refused before any
of them is looked at, and an SRS address relays only with our own valid hash
and a fresh day stamp.
"""

from __future__ import annotations

import smtplib
import time
from typing import Any, Callable

import pytest

from mailappliance.smtp.replies import SRS_INVALID
from mailappliance.srs import Srs, SrsKeys, read_key
from tests.daemon import Appliance
from tests.replies import answered

LOCAL_DOMAINS = ["example.org", "example.net"]
ALIAS_DOMAINS = {"example.com": "example.org", "alias.example": "example.net"}
DOMAINS = LOCAL_DOMAINS + list(ALIAS_DOMAINS)

TRICK_FORMS = [  # refused for everyone, logged in or not
    "<victim%remote.example@{d}>",
    "<victim%remote.example%{d}@{d}>",
    "<remote.example!victim@{d}>",
    "<{d}!remote.example!victim@{d}>",
    "<@{d}:victim@remote.example>",
    "<@{d},@example.net:victim@remote.example>",
    '<"victim@remote.example"@{d}>',
    '<"victim%remote.example"@{d}>',
    '<"postmaster"@{d}>',
    "<victim@remote.example@{d}>",
    "<victim@{d}.>",
    "<victim@remote.example%{d}>",
    "<postmaster%remote.example@{d}>",
    "<victim+x%remote.example@{d}>",
    "<postmaster+victim!remote.example@{d}>",
]
LOOKALIKE_FORMS = [  # other domains that look like ours: relay denied unless logged in
    "<victim@{d}.remote.example>",
    "<victim@sub.{d}>",
    "<victim+{d}@remote.example>",
]
PROBE_FORMS = TRICK_FORMS + LOOKALIKE_FORMS
SRS_FORMS = [
    "<SRS0=AAAAAAAA=AA=remote.example=victim@{d}>",
    "<srs0=aaaaaaaa=aa=remote.example=victim@{d}>",
    "<SRS0+AAAAAAAA=AA=remote.example=victim@{d}>",
    "<SRS0=AAAAAAAA=AA=remote.example=victim%other.example@{d}>",
    "<SRS1=AAAAAAAA=remote.example==AAAAAAAA=AA=remote.example=victim@{d}>",
    "<SRS1=AAAAAAAA=remote.example=+AAAAAAAA=AA=remote.example=victim@{d}>",
    "<SRS0=remote.example=victim@{d}>",
    "<SRS1=@{d}>",
]
SENDERS = ["<stranger@remote.example>", "<>", "<postmaster@example.com>"]


@pytest.fixture
def battery(appliance: Callable[..., Appliance], slapd: Any, pki: Any) -> Appliance:
    instance = appliance(backend="ldap", slapd=slapd, pki=pki, start=False, extra={"server": {
        "alias_domains": ALIAS_DOMAINS, "catch_all": {"example.net": "info@example.net"},
        "postmaster": "hostmaster@example.org"}})
    for login in ("alice@example.org", "info@example.net", "hostmaster@example.org"):
        assert instance.admin("user", "add", login, password="a-password").returncode == 0
    instance.start()
    return instance


def our_srs(instance: Appliance) -> Srs:
    return Srs(SrsKeys(read_key(instance.root / "srs.key")), "example.org")


def srs_probes(instance: Appliance, domain: str) -> list[str]:
    """Forged SRS forms, plus ones with our own hash that must still fail: expired, or
    made with a key that is not (or no longer) ours."""
    now = time.time()
    expired = our_srs(instance).forward("victim@remote.example", now - 30 * 86400)
    future = our_srs(instance).forward("victim@remote.example", now + 3 * 86400)
    stranger = Srs(SrsKeys(b"not this server's key, but long enough"), domain).forward("victim@remote.example", now)
    made = [a.rpartition("@")[0] + "@" + domain for a in (expired, future, stranger) if a]
    return [form.format(d=domain) for form in SRS_FORMS] + [f"<{a}>" for a in made]


def nothing_relayed_or_stored(instance: Appliance) -> None:
    queue = instance.root / "spool" / "queue"
    assert not queue.exists() or not list(queue.rglob("*.json"))  # any state directory
    assert not list(instance.maildir_root.glob("*/new/*"))


def refused_in_batches(smtp_factory: Callable[[], smtplib.SMTP], sender: str, probes: list[str]) -> None:
    """Each probe's RCPT gets a 5xx; a few per session (the server ends a session after 20 errors)."""
    for start in range(0, len(probes), 8):
        with smtp_factory() as smtp:
            assert smtp.docmd("MAIL", f"FROM:{sender}")[0] == 250
            for probe in probes[start:start + 8]:
                code, text = smtp.docmd("RCPT", f"TO:{probe}")
                assert 500 <= code < 600, (probe, code, text)
                if probe.lower().startswith(("<srs0=", "<srs0+", "<srs1=")) and "%" not in probe and "@" in probe[6:]:
                    assert answered((code, text), SRS_INVALID) or code == 501, (probe, code, text)
            assert smtp.docmd("DATA")[0] == 554


@pytest.mark.parametrize("sender", SENDERS)
def test_relay_probes_for_every_local_and_alias_domain_on_mx(battery: Appliance, sender: str) -> None:
    """Every probe form at each local and alias domain, and every SRS forgery, is refused 5xx on the MX."""
    def mx() -> smtplib.SMTP:
        smtp = smtplib.SMTP("127.0.0.1", battery.ports["mx"], timeout=10)
        smtp.ehlo("probe.remote.example")
        return smtp

    for domain in DOMAINS:
        probes = [form.format(d=domain) for form in PROBE_FORMS] + srs_probes(battery, domain)
        refused_in_batches(mx, sender, probes)
    nothing_relayed_or_stored(battery)


def test_relay_probes_refused_to_an_authenticated_subscriber(battery: Appliance) -> None:
    """Logged in, alice still cannot relay through an address trick or a forged SRS address at any of our domains."""
    def submission() -> smtplib.SMTP:
        smtp = smtplib.SMTP_SSL("127.0.0.1", battery.ports["submissions"], timeout=10,
                                context=battery.client_context())
        smtp.login("alice", "a-password")
        return smtp

    for domain in DOMAINS:
        probes = [form.format(d=domain) for form in TRICK_FORMS]
        refused_in_batches(submission, "<alice@example.com>", probes + srs_probes(battery, domain))
    nothing_relayed_or_stored(battery)


def test_a_valid_srs_address_is_the_only_way_back(battery: Appliance) -> None:
    """The control case: our own fresh SRS address is accepted, so the refusals above are not vacuous."""
    address = our_srs(battery).forward("victim@remote.example", time.time())
    assert address is not None
    with smtplib.SMTP("127.0.0.1", battery.ports["mx"], timeout=10) as smtp:
        smtp.ehlo("mx.remote.example")
        assert smtp.mail("")[0] == 250
        assert smtp.rcpt(address.replace("@example.org", "@alias.example"))[0] == 250
