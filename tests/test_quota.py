"""Mailbox quotas and the MX's per-network byte budget, as pure bookkeeping with a controlled clock."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from mailappliance.budget import NetworkByteBudget, network_of
from mailappliance.config import ConfigError, load_config
from mailappliance.directory import Subscriber, parse_limits
from mailappliance.metrics import METRICS
from mailappliance.settings import parse_size
from mailappliance.quota import (
    KIB,
    MIB,
    Admission,
    MailboxQuotas,
    QuotaVerdict,
    format_size,
    has_room,
    mailbox_usage,
    maildir_usage,
    quota_for,
    record_refusal,
)


def subscriber(uid: str = "alice", *limits: str) -> Subscriber:
    return Subscriber(dn=f"uid={uid}", uid=uid, mail=f"{uid}@example.org", limits=parse_limits(list(limits)))


def maildir(root: Path, uid: str = "alice") -> Path:
    path = root / uid
    for part in ("tmp", "new", "cur"):
        (path / part).mkdir(parents=True, exist_ok=True)
    return path


def put(path: Path, part: str, name: str, size: int) -> None:
    (path / part / name).write_bytes(b"x" * size)


class Blocking:
    """A run_blocking whose calls wait until the test lets them run."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred]] = []
        self.count = 0

    def __call__(self, function: Callable[..., Any], *args: Any) -> Deferred:
        d: Deferred = Deferred()
        self.calls.append((function, args, d))
        self.count += 1
        return d

    def run(self) -> None:
        calls, self.calls = self.calls, []
        for function, args, d in calls:
            try:
                d.callback(function(*args))
            except OSError as e:
                d.errback(e)


def result(d: Deferred) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    return out[0]


def now(function: Callable[..., Any], *args: Any) -> Deferred:
    return succeed(function(*args))


# -- sizes and the rule --------------------------------------------------------


@pytest.mark.parametrize("text, size", [
    (0, 0), (1234, 1234), ("1234", 1234), ("100K", 100 * KIB), ("500M", 500 * MIB), ("2G", 2 * 1024 * MIB),
    (" 1 GiB ", 1024 * MIB), ("10kb", 10 * KIB), ("1T", 1024 * 1024 * MIB),
])
def test_sizes_are_bytes_or_binary_units(text: Any, size: int) -> None:
    """A size is a whole number of bytes or a number with K, M, G or T (binary units)."""
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "-1", -1, "1.5G", "1P", "G", "lots", True])
def test_sizes_that_are_not_sizes_are_refused(text: Any) -> None:
    """Anything else is a ValueError (the config turns it into an error naming the key)."""
    with pytest.raises(ValueError):
        parse_size(text)


def test_sizes_for_people() -> None:
    """format_size speaks binary units with one decimal."""
    assert [format_size(n) for n in (0, 812, 100 * KIB, 1536 * KIB, 1024 * MIB)] == [
        "0 B", "812 B", "100.0 KiB", "1.5 MiB", "1.0 GiB"]


def test_the_rule_fills_a_mailbox_up_to_its_limit_with_a_grace_for_the_last_message() -> None:
    """Room while under the limit and the message stays within limit + 10 %; none at or over the limit."""
    assert has_room(0, None, 10**12)
    assert has_room(0, 1000, 0) and has_room(999, 1000, 0)
    assert not has_room(1000, 1000, 0) and not has_room(1500, 1000, 0)
    assert has_room(950, 1000, 150)  # the message that fills it: 1100 is the grace's edge
    assert not has_room(950, 1000, 151)
    assert not has_room(0, 1000, 1101)  # too big even for an empty mailbox


def test_the_limit_comes_from_the_directory_else_the_default() -> None:
    """limit:mailbox_quota_mb (MiB) or limit:mailbox_quota (bytes) override the default; 0 is unlimited."""
    assert quota_for(subscriber(), 5000) == 5000
    assert quota_for(subscriber(), 0) is None
    assert quota_for(subscriber("a", "limit:mailbox_quota_mb=2048"), 5000) == 2048 * MIB
    assert quota_for(subscriber("a", "limit:mailbox_quota=123456"), 5000) == 123456
    assert quota_for(subscriber("a", "limit:mailbox_quota_mb=0"), 5000) is None
    assert quota_for(subscriber("a", "limit:mailbox_quota=0", "limit:mailbox_quota_mb=3"), 0) == 3 * MIB
    assert quota_for(subscriber("a", "limit:messages_per_hour=3"), 5000) == 5000


# -- measuring a Maildir -------------------------------------------------------------


def test_usage_counts_new_and_cur_and_trusts_the_size_in_the_name(tmp_path: Path) -> None:
    """new/ and cur/ count; ",S=<size>" in a name is believed without a stat; tmp/, dot files, directories don't."""
    path = maildir(tmp_path)
    put(path, "new", "1.M1P1Q1.host,S=5000", 10)  # the name says 5000: no stat needed
    put(path, "cur", "2.M2P1Q2.host,S=700:2,S", 700)
    put(path, "cur", "3.M3.host,S=300,W=310:2,", 300)  # Dovecot style
    put(path, "cur", "4.M4.host:2,", 42)  # no size in the name: stat
    put(path, "tmp", "5.M5.host,S=99999", 99999)
    put(path, "new", ".hidden", 123)
    (path / "cur" / "subdir,S=777").mkdir()
    assert maildir_usage(path) == 5000 + 700 + 300 + 42
    assert maildir_usage(tmp_path / "nobody") == 0


def test_admin_sees_used_of_limit(tmp_path: Path) -> None:
    """mailbox_usage is what `mailappliance-admin user show` prints."""
    put(maildir(tmp_path), "new", "1.M1.host,S=51200", 1)
    usage = mailbox_usage(tmp_path, subscriber(), 100 * KIB)
    assert (usage.used, usage.limit) == (50 * KIB, 100 * KIB)
    assert usage.describe() == "used 50.0 KiB of 100.0 KiB (50%)"
    assert mailbox_usage(tmp_path, subscriber(), 0).describe() == "used 50.0 KiB (unlimited)"
    assert mailbox_usage(tmp_path, subscriber("../escape"), 1000).used == 0


# -- MailboxQuotas -----------------------------------------------------------------


def test_a_burst_of_checks_costs_one_scan_and_the_result_is_cached(tmp_path: Path) -> None:
    """Concurrent checks for one uid share one scan; later ones use the cache until the TTL ends."""
    path = maildir(tmp_path)
    put(path, "new", "1.M1.host,S=600", 1)
    clock, blocking = Clock(), Blocking()
    quotas = MailboxQuotas(1000, blocking, clock, ttl=30)
    waiting = [quotas.check(subscriber(), path) for _ in range(50)]
    assert blocking.count == 1
    blocking.run()
    assert {result(d) for d in waiting} == {QuotaVerdict(False, 600, 1000)}
    clock.advance(29)
    assert result(quotas.check(subscriber(), path, incoming=600)) == QuotaVerdict(True, 600, 1000)
    assert blocking.count == 1
    put(path, "cur", "2.M2.host,S=400:2,", 1)  # arrived another way: seen after the TTL
    clock.advance(2)
    d = quotas.check(subscriber(), path)
    assert blocking.count == 2
    blocking.run()
    assert result(d) == QuotaVerdict(True, 1000, 1000)


def test_unlimited_mailboxes_are_never_scanned(tmp_path: Path) -> None:
    """With no limit there is nothing to measure."""
    blocking = Blocking()
    quotas = MailboxQuotas(0, blocking, Clock())
    assert result(quotas.check(subscriber(), maildir(tmp_path), 10**12)) == QuotaVerdict(False, 0, None)
    assert blocking.count == 0


def test_deliveries_add_to_the_cache_and_forget_drops_it(tmp_path: Path) -> None:
    """delivered() keeps the cached usage true without a scan; forget() (POP3 deleted) makes the next check scan."""
    path = maildir(tmp_path)
    blocking = Blocking()
    quotas = MailboxQuotas(1000, blocking, Clock())
    d = quotas.usage("alice", path)
    blocking.run()
    assert result(d) == 0
    quotas.delivered("alice", 700)
    assert result(quotas.usage("alice", path)) == 700
    quotas.forget("alice")
    d = quotas.usage("alice", path)
    assert blocking.count == 2
    blocking.run()
    assert result(d) == 0


def test_a_delivery_during_a_scan_is_not_lost(tmp_path: Path) -> None:
    """A message delivered while a scan runs counts even if the scan missed it."""
    path = maildir(tmp_path)
    blocking = Blocking()
    quotas = MailboxQuotas(1000, blocking, Clock())
    d = quotas.usage("alice", path)
    quotas.delivered("alice", 300)
    blocking.run()
    assert result(d) == 300


def test_a_failed_scan_fails_the_check_and_the_next_one_scans_again(tmp_path: Path) -> None:
    """An unreadable Maildir is an error for the session (4xx), not a verdict, and is not cached."""
    clock, blocking = Clock(), Blocking()

    def broken(path: Path) -> int:
        raise PermissionError(13, "Permission denied")

    quotas = MailboxQuotas(1000, blocking, clock, scan=broken)
    first, second = quotas.check(subscriber(), tmp_path), quotas.check(subscriber(), tmp_path)
    blocking.run()
    assert result(first).check(PermissionError) and result(second).check(PermissionError)
    quotas.check(subscriber(), tmp_path)
    assert blocking.count == 2
    blocking.run()  # consume


def test_admission_reserves_room_until_the_commit_ends(tmp_path: Path) -> None:
    """Parallel messages cannot share the same room: the first one's bytes are reserved until delivered or released."""
    path = maildir(tmp_path)
    quotas = MailboxQuotas(1000, now, Clock())
    first = result(quotas.admit([(subscriber(), path)], 800))
    assert isinstance(first, Admission) and first.full == []
    second = result(quotas.admit([(subscriber(), path)], 800))
    assert second.full == ["alice"] and second.verdicts["alice"] == QuotaVerdict(True, 800, 1000)
    first.release()
    first.release()  # idempotent
    third = result(quotas.admit([(subscriber(), path)], 800))
    assert third.full == []
    third.delivered()
    third.delivered()
    assert result(quotas.check(subscriber(), path)) == QuotaVerdict(False, 800, 1000)
    assert result(quotas.check(subscriber(), path, 400)) == QuotaVerdict(True, 800, 1000)


def test_admission_is_all_or_nothing_and_counts_a_mailbox_once(tmp_path: Path) -> None:
    """One full recipient: nothing is reserved for the others; two aliases of one subscriber are one mailbox."""
    alice, bob = subscriber("alice"), subscriber("bob", "limit:mailbox_quota=100")
    quotas = MailboxQuotas(1000, now, Clock())
    admission = result(quotas.admit([(alice, maildir(tmp_path, "alice")), (alice, maildir(tmp_path, "alice")),
                                     (bob, maildir(tmp_path, "bob"))], 200))
    assert admission.full == ["bob"] and list(admission.verdicts) == ["alice", "bob"]
    assert result(quotas.check(alice, tmp_path / "alice")).usage == 0  # nothing reserved for alice
    both = result(quotas.admit([(alice, tmp_path / "alice"), (alice, tmp_path / "alice")], 600))
    assert both.full == [] and result(quotas.check(alice, tmp_path / "alice")).usage == 600


def test_quota_metrics() -> None:
    """Refusals are counted by stage and as a refused-message reason; full mailboxes are a gauge."""
    before = METRICS.value("mailappliance_quota_refusals_total", stage="rcpt")
    refused = METRICS.value("mailappliance_messages_refused_total", reason="mailbox_full")
    record_refusal("rcpt")
    assert METRICS.value("mailappliance_quota_refusals_total", stage="rcpt") == before + 1
    assert METRICS.value("mailappliance_messages_refused_total", reason="mailbox_full") == refused + 1
    quotas = MailboxQuotas(10, lambda function, *args: succeed(50), Clock())
    result(quotas.check(subscriber(), Path("/nonexistent")))
    assert METRICS.value("mailappliance_quota_full_mailboxes") == 1
    quotas.forget("alice")
    assert METRICS.value("mailappliance_quota_full_mailboxes") == 0


# -- the MX's byte budget per client network ----------------------------------------------


def test_networks_are_slash_24_and_slash_64() -> None:
    """IPv4 (and IPv4-mapped IPv6) by /24, IPv6 by /64; an odd address stands for itself."""
    assert network_of("198.51.100.7") == "198.51.100.0/24"
    assert network_of("::ffff:198.51.100.9") == "198.51.100.0/24"
    assert network_of("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert network_of("unknown") == "unknown"


def test_a_network_may_send_its_budget_per_hour() -> None:
    """Addresses of one /24 share a budget; another network has its own; it comes back as the hour slides."""
    clock = Clock()
    budget = NetworkByteBudget(1000, clock)
    assert budget.may_receive("198.51.100.7", declared_size=1000)
    assert not budget.may_receive("198.51.100.7", declared_size=1001)
    budget.received("198.51.100.7", 600)
    clock.advance(1800)
    budget.received("198.51.100.8", 400)
    assert not budget.may_receive("198.51.100.200")  # the same /24, used up
    assert budget.may_receive("198.51.101.7", declared_size=1000)  # the next /24
    clock.advance(1800)
    assert budget.used("198.51.100.1") == 400 and budget.may_receive("198.51.100.1", declared_size=600)
    assert not budget.may_receive("198.51.100.1", declared_size=601)
    clock.advance(1800)
    assert budget.used("198.51.100.1") == 0


def test_a_budget_of_zero_is_off() -> None:
    """0 turns the budget off: nothing is refused, nothing is tracked."""
    budget = NetworkByteBudget(0, Clock())
    budget.received("198.51.100.7", 10**12)
    assert budget.may_receive("198.51.100.7", 10**12) and budget.tracked == 0


def test_the_budget_remembers_a_bounded_number_of_networks() -> None:
    """Memory is bounded: past max_tracked networks the least recently active one is forgotten."""
    clock = Clock()
    budget = NetworkByteBudget(1000, clock, max_tracked=3)
    for i in range(3):
        budget.received(f"10.0.{i}.1", 1000)
    budget.received("10.0.0.1", 1)  # 10.0.0.0/24 is active again: 10.0.1.0/24 is now the oldest
    budget.received("10.0.9.1", 1)
    assert budget.tracked == 3
    assert budget.may_receive("10.0.1.1") and not budget.may_receive("10.0.0.1")
    for minute in range(120):  # a busy network keeps at most one number per minute
        budget.received("10.0.9.1", 1)
        clock.advance(60)
    assert len(budget._networks["10.0.9.0/24"].buckets) <= 61


# -- configuration -----------------------------------------------------------------------------


def config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "m.toml"
    path.write_text('listeners = []\n[server]\nlocal_domains = ["example.org"]\n' + text)
    return path


def test_config_defaults_and_suffixes(tmp_path: Path) -> None:
    """mailbox_quota defaults to 1 GiB, the byte budget to 500 MiB; both take "100K"-style sizes and 0."""
    settings = load_config(config(tmp_path, ""))
    assert (settings.mailbox_quota, settings.mx_bytes_per_hour_per_network) == (1024 * MIB, 500 * MIB)
    settings = load_config(config(tmp_path, '[storage]\nmailbox_quota = "100K"\n'
                                            '[limits]\nmx_bytes_per_hour_per_network = 0\n'))
    assert (settings.mailbox_quota, settings.mx_bytes_per_hour_per_network) == (100 * KIB, 0)


@pytest.mark.parametrize("text, key", [
    ('[storage]\nmailbox_quota = "lots"\n', "storage.mailbox_quota"),
    ("[storage]\nmailbox_quota = -5\n", "storage.mailbox_quota"),
    ("[limits]\nmx_bytes_per_hour_per_network = 1.5\n", "limits.mx_bytes_per_hour_per_network"),
])
def test_config_errors_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    """A bad size is a config error naming the key and what would be valid."""
    with pytest.raises(ConfigError, match=re.escape(key) + ": .*size"):
        load_config(config(tmp_path, text))
