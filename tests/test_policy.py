"""Relay decisions and path parsing: pure functions, no sockets."""

from __future__ import annotations

import pytest

from mailappliance.policy import RelayVerdict, Route, decide_recipient
from mailappliance.smtp.paths import PathSyntaxError, parse_path, split_command_argument

LOCAL = frozenset({"example.org", "example.net"})


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
    assert verdict(path, authenticated) == RelayVerdict(Route.REFUSED, reason, 554, "5.7.1")


@pytest.mark.parametrize("path", ["<user@remote.example>", "<user@example.org.remote.example>",
                                  "<user@sub.example.org>", "<user@example.org.evil>"])
def test_remote_only_when_authenticated(path: str) -> None:
    """A remote domain (lookalikes and subdomains included) is relay denied, unless the client is authenticated."""
    assert verdict(path) == RelayVerdict(Route.REFUSED, "relay denied", 554, "5.7.1")
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
