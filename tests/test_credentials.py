"""The shared credential checker: verdicts, cache, temporary failures."""

from __future__ import annotations

import pytest
from twisted.cred.credentials import UsernamePassword
from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock

from mailappliance.credentials import LoginRefused, SubscriberChecker
from mailappliance.directory import DirectoryUnavailable, Subscriber

ALICE = Subscriber(dn="uid=alice,dc=x", uid="alice", mail="alice@example.org")


class CountingDirectory:
    """Answers authenticate() from a dict and counts the calls (each one is a bind)."""

    def __init__(self) -> None:
        self.passwords = {"alice": ("s3cret-pass", ALICE)}
        self.calls = 0
        self.up = True

    def authenticate(self, login: str, password: str):
        self.calls += 1
        if not self.up:
            return fail(DirectoryUnavailable("down"))
        entry = self.passwords.get(login.lower())
        return succeed(entry[1] if entry and entry[0] == password else None)


def login(checker: SubscriberChecker, user: str, password: str):
    results: list = []
    checker.requestAvatarId(UsernamePassword(user.encode(), password.encode())).addBoth(results.append)
    return results[0]


@pytest.fixture
def setup():
    directory, clock = CountingDirectory(), Clock()
    return directory, clock, SubscriberChecker(directory, cache_ttl=60, clock=clock)


def test_good_login_returns_subscriber_and_is_cached(setup) -> None:
    directory, clock, checker = setup
    assert login(checker, "alice", "s3cret-pass") == ALICE
    assert login(checker, "ALICE", "s3cret-pass") == ALICE
    assert directory.calls == 1
    clock.advance(61)
    assert login(checker, "alice", "s3cret-pass") == ALICE
    assert directory.calls == 2


def test_cache_never_accepts_another_password(setup) -> None:
    directory, _, checker = setup
    login(checker, "alice", "s3cret-pass")
    result = login(checker, "alice", "wrong-pass")
    assert result.check(LoginRefused)
    assert directory.calls == 2


def test_cache_holds_no_plaintext(setup) -> None:
    _, _, checker = setup
    login(checker, "alice", "s3cret-pass")
    assert b"s3cret-pass" not in repr(checker._cache).encode()
    assert all(b"s3cret-pass" not in e.digest for e in checker._cache.values())


def test_disabled_and_unknown_refused(setup) -> None:
    directory, _, checker = setup
    directory.passwords["carol"] = ("pw-carol-1", Subscriber(dn="uid=carol", uid="carol", mail="c@x.org",
                                                             disabled=True))
    assert login(checker, "carol", "pw-carol-1").check(LoginRefused)
    assert login(checker, "nobody", "whatever-1").check(LoginRefused)
    assert login(checker, "alice", "").check(LoginRefused)
    assert directory.calls == 2  # the empty password never reached the directory


def test_directory_down_is_not_a_refusal(setup) -> None:
    directory, _, checker = setup
    directory.up = False
    result = login(checker, "alice", "s3cret-pass")
    assert result.check(DirectoryUnavailable) and not result.check(LoginRefused)


def test_ttl_zero_disables_cache() -> None:
    directory = CountingDirectory()
    checker = SubscriberChecker(directory, cache_ttl=0, clock=Clock())
    login(checker, "alice", "s3cret-pass")
    login(checker, "alice", "s3cret-pass")
    assert directory.calls == 2


class SlowDirectory(CountingDirectory):
    """authenticate() answers only when the test says (a password hash in progress)."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: list = []

    def authenticate(self, login: str, password: str):
        from twisted.internet.defer import Deferred

        self.calls += 1
        d: Deferred = Deferred()
        self.pending.append((d, login, password))
        return d

    def answer_all(self) -> None:
        for d, login, password in self.pending:
            entry = self.passwords.get(login.lower())
            d.callback(entry[1] if entry and entry[0] == password else None)
        self.pending = []


def test_identical_logins_in_flight_share_one_check_and_each_counts_for_the_throttle() -> None:
    directory, clock = SlowDirectory(), Clock()
    checker = SubscriberChecker(directory, cache_ttl=0, clock=clock)  # no cache: only sharing helps
    results: list = []
    for password in ("s3cret-pass", "s3cret-pass", "s3cret-pass", "wrong-pass", "wrong-pass"):
        credentials = UsernamePassword(b"alice", password.encode())
        checker.requestAvatarId(credentials).addBoth(results.append)
    assert directory.calls == 2  # one per distinct password, however many sessions asked
    directory.answer_all()
    assert results[:3] == [ALICE] * 3
    assert all(r.check(LoginRefused) for r in results[3:])
    assert checker.throttle.failures("").result == 2  # each refused attempt counted on its own
    later: list = []
    checker.requestAvatarId(UsernamePassword(b"alice", b"s3cret-pass")).addBoth(later.append)
    assert directory.calls == 3  # a finished check is not reused (TTL 0: no cache)
    directory.answer_all()
    assert later == [ALICE]


@pytest.mark.parametrize("uid", ["../escape", ".dot", "", "a/b"])
def test_a_subscriber_whose_uid_cannot_name_a_maildir_is_a_temporary_failure_naming_the_entry(uid: str) -> None:
    """Right password, broken entry: a temporary failure that names the entry, never a login."""
    directory = CountingDirectory()
    directory.passwords["eve"] = ("eve-password", Subscriber(dn="uid=eve,ou=people,dc=x", uid=uid, mail="e@x.org"))
    checker = SubscriberChecker(directory, cache_ttl=60, clock=Clock())
    result = login(checker, "eve", "eve-password")
    assert result.check(DirectoryUnavailable) and not result.check(LoginRefused)
    assert "uid=eve,ou=people,dc=x" in str(result.value) and "unsafe uid" in str(result.value)
    assert checker._cache == {}
