"""Screening: the pure decisions, then the daemon with a DNS server on loopback and
clients connecting from loopback addresses the test controls."""

from __future__ import annotations

import signal
import smtplib
import socket
from pathlib import Path
from typing import Any, Callable

import pytest

from mailappliance.screening import ClientFacts, domain_matches, screen_client, screen_helo, screen_sender
from mailappliance.screening_lists import ScreeningFileError, ScreeningLists, load_lists, parse_lists
from mailappliance.smtp.replies import ACCESS_DENIED
from tests.conditions import wait_until
from tests.daemon import Appliance
from tests.replies import answered

pytest_plugins = ["tests.remote"]

LISTS = parse_lists(Path("screening.toml"), {
    "allow": {"networks": ["192.0.2.10/32"], "client_domains": [".partner.example"],
              "senders": ["friend@spam.example"]},
    "block": {"networks": ["192.0.2.0/24", "2001:db8::/32"], "client_domains": [".spam.example"],
              "helo": ["localhost", ".bad-helo.example"], "senders": ["spam.example", "forger@example.net"]},
    "dnsbl": {"zones": ["dnsbl.test"]},
})


@pytest.mark.parametrize("name, pattern, matches", [
    ("spam.example", ".spam.example", True), ("a.b.spam.example", ".spam.example", True),
    ("notspam.example", ".spam.example", False), ("spam.example", "spam.example", True),
    ("a.spam.example", "spam.example", False), ("SPAM.example.", ".spam.example", True)])
def test_domain_patterns(name: str, pattern: str, matches: bool) -> None:
    """A pattern with a leading dot matches subdomains only; without one, exactly that name, in any case."""
    assert domain_matches(name, pattern) is matches


@pytest.mark.parametrize("facts, action, rule", [
    (ClientFacts("198.51.100.1"), "accept", ""),
    (ClientFacts("192.0.2.5"), "refuse", "block.networks"),
    (ClientFacts("192.0.2.10"), "accept", "allow.networks"),  # allow beats block
    (ClientFacts("192.0.2.5", name="mx.partner.example"), "accept", "allow.client_domains"),
    (ClientFacts("192.0.2.5", name_lookup_failed=True), "defer", "block.networks"),  # could have been allowed
    (ClientFacts("198.51.100.1", name="relay.spam.example"), "refuse", "block.client_domains"),
    (ClientFacts("198.51.100.1", name_lookup_failed=True), "accept", ""),  # DNS trouble blocks nothing
    (ClientFacts("198.51.100.1", dnsbl_listed_in="dnsbl.test"), "refuse", "dnsbl"),
    (ClientFacts("2001:db8::1"), "refuse", "block.networks"),
])
def test_screen_client(facts: ClientFacts, action: str, rule: str) -> None:
    """Client screening: allow beats block, a confirmed name allows a blocked network, DNS trouble defers only that."""
    verdict = screen_client(facts, LISTS)
    assert (verdict.action.value, verdict.rule) == (action, rule)


def test_screen_helo_and_sender() -> None:
    """HELO and sender screening refuse listed names and domains; an allow-listed sender and <> pass."""
    assert screen_helo("localhost", LISTS).refused
    assert screen_helo("mx.bad-helo.example", LISTS).refused
    assert screen_helo("mx.good.example", LISTS).accepted
    assert screen_sender("anyone@spam.example", LISTS).rule == "block.senders"
    assert screen_sender("forger@example.net", LISTS).refused
    assert screen_sender("other@example.net", LISTS).accepted
    assert screen_sender("friend@spam.example", LISTS).accepted  # allow beats block
    assert screen_sender("", LISTS).accepted


@pytest.mark.parametrize("text, words", [
    ("[block]\nnetworks = ['300.1.2.3/8']\n", "block.networks: '300.1.2.3/8' is not an IPv4/IPv6 network"),
    ("[block]\nnetwork = []\n", "block.network: unknown key"),
    ("[deny]\n", "deny: unknown section"),
    ("[block]\nhelo = 'x'\n", "block.helo: must be a list"),
])
def test_file_errors_name_file_and_key(tmp_path: Path, text: str, words: str) -> None:
    """A bad screening file is refused with an error naming the key and what is wrong."""
    path = tmp_path / "screening.toml"
    path.write_text(text)
    with pytest.raises(ScreeningFileError, match=words):
        load_lists(path)


def test_empty_lists_accept_everyone() -> None:
    """With no lists every client is accepted."""
    assert screen_client(ClientFacts("192.0.2.5"), ScreeningLists()).accepted


# -- against the daemon -------------------------------------------------------

SCREENING_FILE = """
[allow]
networks = ["127.0.0.30/32"]
client_domains = [".partner.example"]
senders = ["friend@spam.example"]

[block]
networks = ["127.0.0.22/32", "127.0.0.23/32", "127.0.0.26/31", "127.0.0.30/32"]
client_domains = [".spam.example"]
helo = [".bad-helo.example"]
senders = ["spam.example"]

[dnsbl]
zones = ["dnsbl.test"]
"""


@pytest.fixture
def screened(appliance: Callable[..., Appliance], dns_server: Any, tmp_path: Path) -> Appliance:
    dns_server.serve({
        "0.0.127.in-addr.arpa": [
            "PTR('21.0.0.127.in-addr.arpa', 'mail.spam.example')",
            "PTR('22.0.0.127.in-addr.arpa', 'good.partner.example')",
            "PTR('23.0.0.127.in-addr.arpa', 'liar.partner.example')",  # does not resolve back
        ],
        "spam.example": ["A('mail.spam.example', '127.0.0.21')"],
        "partner.example": ["A('good.partner.example', '127.0.0.22')",
                            "A('liar.partner.example', '127.0.0.99')"],
        "dnsbl.test": ["A('25.0.0.127.dnsbl.test', '127.0.0.2')"],
    })
    lists = tmp_path / "screening.toml"
    lists.write_text(SCREENING_FILE)
    instance = appliance(start=False, extra={"queue": {"resolver": dns_server.address},
                                             "screening": {"file": str(lists), "dns_timeout": 1,
                                                           "refuse_at": "connect"},
                                             "limits": {"connections_per_minute": 10_000}})
    assert instance.admin("user", "add", "alice@example.org", password="alice-password").returncode == 0
    instance.start()
    instance.lists = lists  # type: ignore[attr-defined]
    instance.dns = dns_server  # type: ignore[attr-defined]
    return instance


REFUSED = b"554 5.7.1 mx.test.example Access denied\r\n"
WELCOME = b"220 mx.test.example ESMTP mailappliance\r\n"


def greeting(instance: Appliance, source: str) -> bytes:
    with socket.create_connection(("127.0.0.1", instance.ports["mx"]), timeout=10,
                                  source_address=(source, 0)) as sock:
        return sock.makefile("rb").readline()


@pytest.mark.parametrize("source, expected", [
    ("127.0.0.21", REFUSED),  # forward-confirmed name under .spam.example
    ("127.0.0.22", WELCOME),  # blocked network, but allowed by its confirmed .partner.example name
    ("127.0.0.23", REFUSED),  # claims .partner.example, not confirmed: the network block stands
    ("127.0.0.25", REFUSED),  # listed in the DNSBL
    ("127.0.0.26", REFUSED),  # blocked network
    ("127.0.0.30", WELCOME),  # allow-listed network beats the block
    ("127.0.0.40", WELCOME),  # nothing against it
])
def test_clients_are_screened_at_connect(screened: Appliance, source: str, expected: bytes) -> None:
    """The daemon refuses at the greeting by forward-confirmed name, DNSBL and network; allow lists win."""
    assert greeting(screened, source) == expected


def test_refusals_name_no_internals_but_the_log_does(screened: Appliance) -> None:
    """The client's 554 names no rule; the log names the rule, the value and the client."""
    assert greeting(screened, "127.0.0.26") == REFUSED
    assert "client=[127.0.0.26] screened at client: refuse rule=block.networks value='127.0.0.26/31'" \
        in screened.log()


def test_helo_and_sender_screening(screened: Appliance) -> None:
    """A listed HELO and a listed sender domain get 554 5.7.1; a good HELO and an allowed sender go on."""
    with smtplib.SMTP("127.0.0.1", screened.ports["mx"], timeout=10, source_address=("127.0.0.40", 0)) as smtp:
        assert answered(smtp.ehlo("mx.bad-helo.example"), ACCESS_DENIED)
        assert smtp.ehlo("mx.good.example")[0] == 250
        assert answered(smtp.mail("someone@spam.example"), ACCESS_DENIED)
        assert smtp.mail("friend@spam.example") == (250, b"2.1.0 Ok")  # allow-listed sender


def test_reload_on_sighup_and_on_change(screened: Appliance) -> None:
    """The lists reload on SIGHUP and when the file changes; a broken file keeps the old lists."""
    lists: Path = screened.lists  # type: ignore[attr-defined]
    assert greeting(screened, "127.0.0.41") == WELCOME
    lists.write_text(SCREENING_FILE.replace('"127.0.0.26/31"', '"127.0.0.26/31", "127.0.0.41/32"'))
    assert screened.process is not None
    screened.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "SIGHUP: screening lists reloaded" in screened.log(), what="the SIGHUP reload logged")
    assert greeting(screened, "127.0.0.41") == REFUSED
    lists.write_text(SCREENING_FILE)  # no signal: the change itself is noticed (checked at most once a second)
    wait_until(lambda: greeting(screened, "127.0.0.41") == WELCOME, what="the changed file in force")
    assert "screening lists reloaded from " + str(lists) + " (file changed)" in screened.log()
    lists.write_text("[block\n")  # a broken file keeps the old lists
    screened.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "SIGHUP: screening lists NOT reloaded" in screened.log(), what="the failed reload logged")
    assert greeting(screened, "127.0.0.26") == REFUSED
    assert greeting(screened, "127.0.0.41") == WELCOME


def test_dns_trouble_defers_only_what_dns_could_have_allowed(screened: Appliance) -> None:
    """With DNS down a blocked client whose name might allow it gets 421; an unlisted one is welcomed."""
    screened.dns.stop()  # type: ignore[attr-defined]
    assert greeting(screened, "127.0.0.27").startswith(b"421 4.7.0 ")  # blocked, unless its name was allowed
    assert greeting(screened, "127.0.0.42") == WELCOME  # DNS trouble alone blocks nothing
