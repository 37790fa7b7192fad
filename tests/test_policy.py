"""Relay decisions and path parsing: pure functions, no sockets."""

from __future__ import annotations

import pytest

from mailappliance.policy import RelayVerdict, Route, decide_recipient
from mailappliance.smtp import replies
from mailappliance.mailpath import PathSyntaxError, parse_path, split_command_argument

LOCAL = frozenset({"example.org", "example.net"})



def refused(result: RelayVerdict) -> tuple[Route, int, str, str]:
    """Route, the SMTP reply the session gives for it, and the logged reason."""
    reply = replies.for_relay(result.verdict)
    return result.route, reply.code, reply.status, result.reason

def verdict(path: str, authenticated: bool = False):
    return decide_recipient(parse_path(path, allow_null=False), LOCAL, authenticated)


@pytest.mark.parametrize("path", ["<alice@example.org>", "<Alice@EXAMPLE.ORG>", "<a.b+tag@example.net>"])
def test_local_recipients(path: str) -> None:
    """An address at exactly one of our domains, in any case, with a plain local part, is local."""
    assert verdict(path).route is Route.LOCAL


@pytest.mark.parametrize("authenticated", [False, True])
@pytest.mark.parametrize(
    "path, reason",
    [
        ("<user%remote.example@example.org>", "routing character in local part"),
        ("<remote.example!user@example.org>", "routing character in local part"),
        ("<@example.org:user@remote.example>", "source route"),
        ("<@example.org,@example.net:user@remote.example>", "source route"),
        ('<"user@remote.example"@example.org>', "quoted local part"),
        ('<"user%remote.example"@example.org>', "quoted local part"),
        ("<user@[192.0.2.1]>", "address literal"),
        ("<user@[127.0.0.1]>", "address literal"),
        ("<user@[IPv6:::1]>", "address literal"),
    ],
)
def test_relay_tricks_refused_for_everyone(path: str, reason: str, authenticated: bool) -> None:
    """Percent hack, bang path, source route, quoted local part and address literal: 554 5.7.1 for everyone."""
    assert refused(verdict(path, authenticated)) == (Route.REFUSED, 554, "5.7.1", reason)


@pytest.mark.parametrize("path", ["<user@remote.example>", "<user@example.org.remote.example>",
                                  "<user@sub.example.org>", "<user@example.org.evil>"])
def test_remote_only_when_authenticated(path: str) -> None:
    """A remote domain (lookalikes and subdomains included) is relay denied, unless the client is authenticated."""
    assert refused(verdict(path)) == (Route.REFUSED, 554, "5.7.1", "relay denied")
    assert verdict(path, authenticated=True).route is Route.REMOTE


@pytest.mark.parametrize(
    "path",
    ["user@example.org", "<user@example.org.>", "<user@@example.org>", "<user@remote@example.org>",
     "<>", "<user@exa mple.org>", "<us er@example.org>", "<user@-bad.example>", "<user@example..org>",
     "<" + "a" * 65 + "@example.org>", "<user@ex\u00e4mple.org>"],
)
def test_malformed_recipients(path: str) -> None:
    """Malformed paths (no brackets, trailing dot, two @, spaces, bad labels, too long, non-ASCII) are syntax errors."""
    with pytest.raises(PathSyntaxError):
        parse_path(path, allow_null=False)


def test_null_sender_allowed_only_as_sender() -> None:
    """The null path <> parses where a null path is allowed."""
    assert parse_path("<>", allow_null=True).is_null


def test_split_command_argument() -> None:
    """MAIL/RCPT arguments split into the path and its parameters; a quoted '>' stays in the path; junk is an error."""
    assert split_command_argument("FROM:<a@b.c> SIZE=10 BODY=8BITMIME", "FROM") == (
        "<a@b.c>", ["SIZE=10", "BODY=8BITMIME"])
    assert split_command_argument("from: <a@b.c>", "FROM") == ("<a@b.c>", [])
    assert split_command_argument('TO:<"a>b"@c.d>', "TO") == ('<"a>b"@c.d>', [])
    with pytest.raises(PathSyntaxError):
        split_command_argument("FROM:<a@b.c>SIZE=1", "FROM")


# -- every local and alias domain: the same tricks, the same verdicts -----------------------

from mailappliance.addressing import Addressing, SrsRefusal, plan_recipient  # noqa: E402
from mailappliance.srs import Srs, SrsKeys  # noqa: E402

ADDRESSING = Addressing(local_domains=LOCAL,
                        alias_domains={"example.com": "example.org", "alias.example": "example.net"},
                        delimiter="+", catch_all={"example.net": "info@example.net"},
                        srs=Srs(SrsKeys(b"0123456789abcdef0123456789abcdef"), "example.org"))
ALL_DOMAINS = sorted(ADDRESSING.accepted_domains)


@pytest.mark.parametrize("domain", ALL_DOMAINS)
@pytest.mark.parametrize("authenticated", [False, True])
@pytest.mark.parametrize("form, reason", [
    ("<user%remote.example@{d}>", "routing character in local part"),
    ("<user+tag%remote.example@{d}>", "routing character in local part"),
    ("<remote.example!user@{d}>", "routing character in local part"),
    ("<postmaster%remote.example@{d}>", "routing character in local part"),
    ("<SRS0=AAAAAAAA=AA=remote.example=user%other.example@{d}>", "routing character in local part"),
    ("<@{d}:user@remote.example>", "source route"),
    ('<"user@remote.example"@{d}>', "quoted local part"),
    ('<"postmaster"@{d}>', "quoted local part"),
])
def test_relay_tricks_refused_at_every_local_and_alias_domain(form: str, reason: str, authenticated: bool,
                                                              domain: str) -> None:
    """Each relay trick is refused 554 5.7.1 at every local and alias domain, logged in or not."""
    path = parse_path(form.format(d=domain), allow_null=False)
    assert refused(decide_recipient(path, ADDRESSING.accepted_domains, authenticated)) == (
        Route.REFUSED, 554, "5.7.1", reason)


@pytest.mark.parametrize("domain", ALL_DOMAINS)
@pytest.mark.parametrize("form", ["<user@{d}.remote.example>", "<user@sub.{d}>", "<user@{d}.evil>"])
def test_lookalikes_of_every_domain_are_remote(form: str, domain: str) -> None:
    """Subdomains and lookalikes of local and alias domains are other domains: relay denied unless logged in."""
    path = parse_path(form.format(d=domain), allow_null=False)
    assert refused(decide_recipient(path, ADDRESSING.accepted_domains, False)) == (
        Route.REFUSED, 554, "5.7.1", "relay denied")
    assert decide_recipient(path, ADDRESSING.accepted_domains, True).route is Route.REMOTE


@pytest.mark.parametrize("domain", ALL_DOMAINS)
@pytest.mark.parametrize("local", ["SRS0=AAAAAAAA=AA=remote.example=user", "srs0=aaaaaaaa=aa=remote.example=user",
                                   "SRS1=AAAAAAAA=remote.example==AAAAAAAA=AA=remote.example=user",
                                   "SRS0+AAAAAAAA=AA=remote.example=user", "SRS1=x", "SRS0="])
def test_srs_looking_addresses_are_local_then_refused(local: str, domain: str) -> None:
    """An SRS-looking address at any of our domains is judged as ours, and a forged one refused, never looked up."""
    path = parse_path(f"<{local}@{domain}>", allow_null=False)
    assert decide_recipient(path, ADDRESSING.accepted_domains, False).route is Route.LOCAL
    assert isinstance(plan_recipient(ADDRESSING, path, 1_700_000_000.0), SrsRefusal)
