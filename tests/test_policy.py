"""Relay decisions and path parsing: pure functions, no sockets."""

from __future__ import annotations

import pytest

from mailappliance.policy import Route, decide_recipient
from mailappliance.smtp.paths import PathSyntaxError, parse_path, split_command_argument

LOCAL = frozenset({"example.org", "example.net"})


def verdict(path: str, authenticated: bool = False):
    return decide_recipient(parse_path(path, allow_null=False), LOCAL, authenticated)


@pytest.mark.parametrize("path", ["<alice@example.org>", "<Alice@EXAMPLE.ORG>", "<a.b+tag@example.net>"])
def test_local_recipients(path: str) -> None:
    assert verdict(path).route is Route.LOCAL


@pytest.mark.parametrize("authenticated", [False, True])
@pytest.mark.parametrize(
    "path",
    [
        "<user%remote.example@example.org>",
        "<remote.example!user@example.org>",
        "<@example.org:user@remote.example>",
        "<@example.org,@example.net:user@remote.example>",
        '<"user@remote.example"@example.org>',
        '<"user%remote.example"@example.org>',
        "<user@[192.0.2.1]>",
        "<user@[127.0.0.1]>",
        "<user@[IPv6:::1]>",
    ],
)
def test_relay_tricks_refused_for_everyone(path: str, authenticated: bool) -> None:
    v = verdict(path, authenticated)
    assert v.refused and v.code >= 500


@pytest.mark.parametrize("path", ["<user@remote.example>", "<user@example.org.remote.example>",
                                  "<user@sub.example.org>", "<user@example.org.evil>"])
def test_remote_only_when_authenticated(path: str) -> None:
    assert verdict(path).refused and verdict(path).code == 554
    assert verdict(path, authenticated=True).route is Route.REMOTE


@pytest.mark.parametrize(
    "path",
    ["user@example.org", "<user@example.org.>", "<user@@example.org>", "<user@remote@example.org>",
     "<>", "<user@exa mple.org>", "<us er@example.org>", "<user@-bad.example>", "<user@example..org>",
     "<" + "a" * 65 + "@example.org>", "<user@ex\u00e4mple.org>"],
)
def test_malformed_recipients(path: str) -> None:
    with pytest.raises(PathSyntaxError):
        parse_path(path, allow_null=False)


def test_null_sender_allowed_only_as_sender() -> None:
    assert parse_path("<>", allow_null=True).is_null


def test_split_command_argument() -> None:
    assert split_command_argument("FROM:<a@b.c> SIZE=10 BODY=8BITMIME", "FROM") == (
        "<a@b.c>", ["SIZE=10", "BODY=8BITMIME"])
    assert split_command_argument("from: <a@b.c>", "FROM") == ("<a@b.c>", [])
    assert split_command_argument('TO:<"a>b"@c.d>', "TO") == ('<"a>b"@c.d>', [])
    with pytest.raises(PathSyntaxError):
        split_command_argument("FROM:<a@b.c>SIZE=1", "FROM")
