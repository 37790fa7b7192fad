"""MTA-STS (RFC 8461) pieces without sockets: TXT records, policy text, MX patterns,
the cache (memory and disk), and which policy applies when lookups fail."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.names import dns, error

from mailappliance.queue.mta_sts import (
    MtaSts,
    PolicyError,
    StsPolicy,
    StsVerdict,
    load_cache,
    parse_policy,
    parse_txt,
    save_cache,
)
from mailappliance.queue.routing import NextHop
from mailappliance.queue.runner import sts_hops

POLICY = b"version: STSv1\r\nmode: enforce\r\nmx: mx1.example.net\r\nmx: *.backup.example.net\r\nmax_age: 604800\r\n"


def test_txt_record() -> None:
    """v=STSv1 must come first; the id is 1-32 alphanumerics; strings of one record are joined."""
    assert parse_txt([b"v=STSv1; id=20160831085700Z;"]) == "20160831085700Z"
    assert parse_txt([b"v=STSv1; ", b"id=abc"]) == "abc"
    assert parse_txt([b"id=abc; v=STSv1"]) is None
    assert parse_txt([b"v=spf1 -all"]) is None
    assert parse_txt([b"v=STSv1; id=has-dash"]) is None


def test_policy_text() -> None:
    """The RFC's example parses; LF line ends are fine; unknown keys are ignored; max_age is capped at a year."""
    policy = parse_policy(POLICY, "id1", 1000.0)
    assert (policy.mode, policy.mx, policy.max_age, policy.policy_id) == \
        ("enforce", ("mx1.example.net", "*.backup.example.net"), 604800, "id1")
    assert parse_policy(b"version: STSv1\nmode: testing\nmx: a.example\nmax_age: 9999999999\nfoo: bar\n").max_age \
        == 31557600
    assert parse_policy(b"version: STSv1\nmode: none\nmax_age: 0\n").mode == "none"


@pytest.mark.parametrize("body", [
    b"mode: enforce\nmx: a.example\nmax_age: 1\n",  # no version
    b"version: STSv2\nmode: enforce\nmx: a.example\nmax_age: 1\n",
    b"version: STSv1\nmode: strict\nmx: a.example\nmax_age: 1\n",
    b"version: STSv1\nmode: enforce\nmax_age: 1\n",  # no mx
    b"version: STSv1\nmode: enforce\nmx: a.example\nmax_age: soon\n",
    b"version: STSv1\nmode: enforce\nmode: testing\nmx: a.example\nmax_age: 1\n",
    b"version: STSv1\nmode enforce\n",
    "version: STSv1\nmode: enforce\nmx: ä.example\nmax_age: 1\n".encode(),
])
def test_invalid_policies(body: bytes) -> None:
    """A policy that breaks the grammar is sts-policy-invalid (delivery goes on as without one)."""
    with pytest.raises(PolicyError) as e:
        parse_policy(body)
    assert e.value.result_type == "sts-policy-invalid"


def test_mx_patterns() -> None:
    """RFC 8461 4.1: exact names, and '*.' for exactly one leftmost label; case and a final dot do not matter."""
    policy = parse_policy(POLICY)
    assert policy.matches("MX1.example.net.") and policy.matches("a.backup.example.net")
    assert not policy.matches("a.b.backup.example.net") and not policy.matches("backup.example.net")
    assert not policy.matches("mx1.example.net.evil.example") and not policy.matches("xmx1.example.net")


def test_enforced_hops_are_only_matching_ones_with_verified_tls() -> None:
    """Under enforce the next hops are the matching MX hosts, each with TLS required and verified."""
    hops = [NextHop("mx1.example.net", "192.0.2.1", 25), NextHop("rogue.example", "192.0.2.2", 25)]
    [hop] = sts_hops(StsVerdict(parse_policy(POLICY)), hops)
    assert (hop.hostname, hop.verify_tls, hop.tls_policy) == ("mx1.example.net", True, "MTA-STS enforce")


class FakeResolver:
    def __init__(self) -> None:
        self.records: dict[str, list[bytes]] = {}
        self.broken = False
        self.asked = 0

    def lookupText(self, name: str, timeout: Any = None) -> Deferred:
        self.asked += 1
        if self.broken:
            return fail(error.DNSServerError("SERVFAIL"))
        if name not in self.records:
            return fail(error.DNSNameError(name))
        answers = [dns.RRHeader(name, dns.TXT, payload=dns.Record_TXT(*self.records[name]))]
        return succeed((answers, [], []))


class Clock:
    now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def verdict(sts: MtaSts, domain: str) -> StsVerdict:
    results: list[StsVerdict] = []
    Deferred.fromCoroutine(sts.verdict(domain)).addCallback(results.append)
    assert results, "the lookup should have finished at once"
    return results[0]


def test_policy_cache_and_failures(tmp_path: Path) -> None:
    """A policy is fetched once per TXT id and cached until max_age; a new id fetches again; DNS or
    fetch trouble keeps a cached policy in force (RFC 8461 5); none cached means no policy."""
    resolver, clock, fetched = FakeResolver(), Clock(), []
    bodies = {"example.net": POLICY}

    def fetch(domain: str) -> Deferred:
        fetched.append(domain)
        return succeed(bodies[domain]) if domain in bodies else fail(PolicyError("sts-policy-fetch-error", "404"))

    sts = MtaSts(resolver, fetch, clock=clock)
    assert verdict(sts, "example.net").policy is None and not fetched  # no TXT record: no policy
    resolver.records["_mta-sts.example.net"] = [b"v=STSv1; id=1"]
    clock.now += 301  # the TXT answer was cached for 300 s
    assert verdict(sts, "example.net").enforced and fetched == ["example.net"]
    clock.now += 301
    assert verdict(sts, "example.net").enforced and fetched == ["example.net"]  # same id: cached
    resolver.records["_mta-sts.example.net"] = [b"v=STSv1; id=2"]
    bodies["example.net"] = b"garbage"
    clock.now += 301
    found = verdict(sts, "example.net")
    assert found.enforced and found.failure == "sts-policy-invalid"  # the cached policy still holds
    resolver.broken = True
    clock.now += 301
    assert verdict(sts, "example.net").enforced
    clock.now += 604800
    assert verdict(sts, "example.net").policy is None  # expired, and nothing new could be had
    resolver.broken = False
    resolver.records["_mta-sts.other.example"] = [b"v=STSv1; id=1"]
    assert verdict(sts, "other.example") == StsVerdict(None, "sts-policy-fetch-error")


def test_two_txt_records_are_no_policy() -> None:
    """RFC 8461 3.1: more than one STSv1 record means no policy."""
    resolver = FakeResolver()
    resolver.records["_mta-sts.example.net"] = [b"v=STSv1; id=1"]
    sts = MtaSts(resolver, lambda d: succeed(POLICY), clock=Clock())
    original = resolver.lookupText

    def twice(name: str, timeout: Any = None) -> Deferred:
        return original(name).addCallback(lambda r: (r[0] * 2, [], []))

    resolver.lookupText = twice  # type: ignore[method-assign]
    assert verdict(sts, "example.net").policy is None


def test_cache_file_round_trip(tmp_path: Path) -> None:
    """Policies survive a restart through the cache file; expired or damaged entries are dropped."""
    path = tmp_path / "mta-sts.json"
    fresh = StsPolicy("enforce", ("mx.example.net",), 86400, "1", 1000.0)
    stale = StsPolicy("enforce", ("mx.example.org",), 10, "1", 1000.0)
    save_cache(path, {"example.net": fresh, "example.org": stale})
    assert load_cache(path, 2000.0) == {"example.net": fresh}
    path.write_text("{not json")
    assert load_cache(path, 2000.0) == {}
    assert load_cache(tmp_path / "missing.json", 0) == {}
