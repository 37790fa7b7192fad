"""Message authentication's pure parts and small mechanisms, without sockets: DMARC records and
alignment, the verdict across recipient domains, header parsing and quoting, the DNS cache, the
staged message's edit (in memory and spilled), key selection, outgoing-spam strikes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, task
from twisted.names import dns, error

from mailappliance.filter.suspension import Suspensions, clear_suspension, read_suspension
from mailappliance.maildir import MEMORY_LIMIT, IncomingMessage
from mailappliance.msgauth import dmarc, headers, keys
from mailappliance.msgauth.dkim_check import ArcResult
from mailappliance.msgauth.dns import FAILURE_TTL, DnsCache
from mailappliance.msgauth.inspect import HEAD_FIRST_READ, MessageSource
from mailappliance.msgauth.results import claims, quote
from mailappliance.msgauth.settings import DomainPolicy, FilterSettings
from mailappliance.msgauth.spf_check import SpfResult
from mailappliance.msgauth.verdict import AuthFacts, decide


def test_dmarc_record_parsing() -> None:
    """v=DMARC1 must come first; p= is required unless rua= is there (then none); sp defaults to p."""
    assert dmarc.parse_record("v=DMARC1; p=reject; sp=none; pct=50; adkim=s") == \
        dmarc.DmarcRecord("reject", "none", "s", "r", 50)
    assert dmarc.parse_record("p=reject; v=DMARC1") is None
    assert dmarc.parse_record("v=DMARC1; p=bogus") is None
    assert dmarc.parse_record("v=DMARC1; rua=mailto:x@example.org").policy == "none"


def test_dmarc_alignment_relaxed_and_strict() -> None:
    """Relaxed alignment compares organizational domains (the PSL), strict the exact domain."""
    record = dmarc.DmarcRecord("reject", "reject")
    assert dmarc.evaluate("example.co.uk", record, False, "bounce.example.co.uk", []).result == "pass"
    strict = dmarc.DmarcRecord("reject", "reject", adkim="s", aspf="s")
    assert dmarc.evaluate("example.co.uk", strict, False, "bounce.example.co.uk", ["mail.example.co.uk"]).result \
        == "fail"
    assert dmarc.evaluate("other.co.uk", record, False, "example.co.uk", []).policy == "reject"
    sub = dmarc.DmarcRecord("reject", "quarantine")
    assert dmarc.evaluate("a.example.org", sub, True, None, []).policy == "quarantine"
    sampled = dmarc.evaluate("x.example", dmarc.DmarcRecord("reject", "reject", pct=10), False, None, [], 0.5)
    assert sampled.policy == "quarantine" and sampled.sampled_out


def _facts(dmarc_policy: str = "reject", spf: str = "pass", arc: ArcResult | None = None) -> AuthFacts:
    return AuthFacts(spf=SpfResult(spf, "mailfrom", "bad.example"), arc=arc,
                     dmarc=dmarc.DmarcResult("fail", "bank.example", dmarc_policy, "no aligned pass"))


def test_verdict_across_recipient_domains() -> None:
    """Reject only when every recipient's domain says so; else the rejecting domains' copies go to
    .Junk; a DNS doubt tempfails where the policy says so; a trusted ARC sealer lifts DMARC."""
    strict, lenient = DomainPolicy(verify=True), DomainPolicy(verify=True, dmarc_reject="none")
    f = FilterSettings()
    assert decide([("a@x", strict), ("b@y", strict)], _facts(), None, f).action == "reject"
    mixed = decide([("a@x", strict), ("b@y", lenient)], _facts(), None, f)
    assert mixed.action == "accept" and mixed.junk == {"a@x"} and mixed.flag
    doubt = AuthFacts(spf=SpfResult("temperror", "mailfrom", "bad.example"),
                      dmarc=dmarc.DmarcResult("fail", "bank.example", "reject"))
    assert decide([("a@x", DomainPolicy(verify=True, dns_failure="tempfail"))], doubt, None, f).action == "tempfail"
    arc = ArcResult("pass", "lists.example", 1)
    assert decide([("a@x", strict)], _facts(arc=arc), None, f, ("lists.example",)).action == "accept"
    assert decide([("a@x", DomainPolicy(verify=False))], _facts(), None, f).action == "accept"


def test_authserv_id_and_quoting_of_hostile_values() -> None:
    """Comments, quotes, case and a trailing dot do not hide our authserv-id; values from the message
    never end our field early."""
    for value in ("mx.test.example; spf=pass", "(x (y)) MX.Test.Example. 1; none", '"mx.test.example"; dkim=pass'):
        assert claims(value, "mx.test.example")
    assert not claims("mx.test.example.evil; spf=pass", "mx.test.example")
    assert quote('bad"; dmarc=pass\r\n') == '"bad\\"; dmarc=pass??"'
    assert quote("example.org") == "example.org"
    fields = headers.parse_fields(b"Subject: a\r\n b\r\nnot a field\r\nFrom: x@y\r\n\r\n")
    assert [f.name for f in fields] == ["subject", "", "from"] and fields[0].value == b"a b"


class FakeResolver:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.pending: dict[str, defer.Deferred] = {}

    def lookupText(self, name: str, timeout: Any = None) -> defer.Deferred:
        self.calls.append(name)
        d = self.pending[name] = defer.Deferred()
        return d


def _txt(name: str, text: bytes, ttl: int) -> Any:
    return dns.RRHeader(name, dns.TXT, ttl=ttl, payload=dns.Record_TXT(text, ttl=ttl))


def test_dns_cache_ttl_shared_queries_and_failures() -> None:
    """Lookups in flight together share one query; answers live for their TTL; a failure is kept
    only briefly; a lookup that outlives its time budget comes back failed, not late."""
    clock, resolver = task.Clock(), FakeResolver()
    cache = DnsCache(resolver, clock)
    first = defer.Deferred.fromCoroutine(cache.fetch("a.example", "TXT", 5))
    second = defer.Deferred.fromCoroutine(cache.fetch("a.example", "TXT", 5))
    resolver.pending["a.example"].callback(([_txt("a.example", b"v=spf1 -all", 60)], [], []))
    assert first.result.values("TXT") == [b"v=spf1 -all"] and second.result is first.result
    assert resolver.calls == ["a.example"]
    clock.advance(61)
    assert cache.get("a.example", "TXT") is None
    late = defer.Deferred.fromCoroutine(cache.fetch("slow.example", "TXT", 2))
    clock.advance(2)
    assert late.result.failed
    resolver.pending["slow.example"].errback(error.DNSServerError())
    assert cache.get("slow.example", "TXT").failed
    clock.advance(FAILURE_TTL + 1)
    assert cache.get("slow.example", "TXT") is None


@pytest.mark.parametrize("size", [1000, MEMORY_LIMIT + 5000])
def test_staged_message_edit_in_memory_and_spilled(tmp_path: Path, size: int) -> None:
    """An edit replaces a range of the staged message at once (memory) or when written out (spilled
    file, in the commit thread); read() sees the bytes as received."""
    message = IncomingMessage(tmp_path)
    message.write(b"Return-Path: <a@b>\r\nReceived: x\r\n")
    start = message.size
    message.write(b"X-Old: forged\r\nSubject: s\r\n\r\n" + b"b" * size)
    assert message.read(start, 15) == b"X-Old: forged\r\n"
    message.edit(start, start + 15, b"Authentication-Results: mx; none\r\n")
    message.write_out()
    message.sync()
    data = message.path.read_bytes()
    assert data.startswith(b"Return-Path: <a@b>\r\nReceived: x\r\nAuthentication-Results: mx; none\r\nSubject: s")
    assert len(data) == message.size and data.endswith(b"b" * 100)
    assert not list(tmp_path.glob("*.edit"))


@pytest.mark.parametrize("header_size", [100, HEAD_FIRST_READ - 60, HEAD_FIRST_READ - 4, HEAD_FIRST_READ + 500])
def test_the_head_holds_the_whole_header_section(tmp_path: Path, header_size: int) -> None:
    """MessageSource.head reads a first 64 KiB and all of the head only when the header section
    does not end inside it: callers see the same section and know it is complete."""
    message = IncomingMessage(tmp_path)
    message.write(b"Received: x\r\n")
    field = b"X-Long: " + b"v" * (header_size - 12) + b"\r\n"
    message.write(field + b"\r\n" + b"b" * (2 * MEMORY_LIMIT))
    head = MessageSource(message, 13, lambda *a, **k: None).head()  # type: ignore[arg-type]
    length = headers.head_length(head)
    assert head[:length] == field + b"\r\n" and length < len(head)
    message.discard()


def test_active_keys_newest_per_type_or_configured(tmp_path: Path) -> None:
    """Without [dkim] selectors the newest key of each type signs; with them, exactly those."""
    for selector, kind, when in (("old", "rsa", 1000), ("new", "rsa", 2000), ("ed", "ed25519", 1500)):
        path = keys.write_key(tmp_path, "example.org", selector, keys.generate(kind), None)
        os.utime(path, (when, when))
    found, problems = keys.scan(tmp_path, ("example.org",))
    assert not problems
    assert sorted(k.selector for k in keys.active(found, {})["example.org"]) == ["ed", "new"]
    assert [k.selector for k in keys.active(found, {"example.org": ("old",)})["example.org"]] == ["old"]
    assert not keys.is_selector("../x") and not keys.is_selector(".hidden") and keys.is_selector("m202612e")


def test_outgoing_spam_strikes_suspend_and_enable_lifts(tmp_path: Path) -> None:
    """suspend_after strikes within the window suspend (a file says why); older strikes expire;
    removing the file (user enable) lifts it."""
    clock = task.Clock()
    suspensions = Suspensions(tmp_path, FilterSettings(suspend_after=2, suspend_window=60), clock)
    assert not suspensions.strike("alice", "spam 1")
    clock.advance(61)
    assert not suspensions.strike("alice", "spam 2")
    assert suspensions.strike("alice", "spam 3") and suspensions.is_suspended("alice")
    assert "spam 3" in read_suspension(tmp_path, "alice")["reason"]
    assert clear_suspension(tmp_path, "alice") and not suspensions.is_suspended("alice")
    assert not suspensions.strike("../etc", "x") and read_suspension(tmp_path, "../etc") is None


def _quiet_inspector(tmp_path: Path) -> Any:
    """An MX inspector that verifies nothing and has no content filter (the default settings)."""
    from twisted.internet.task import Clock

    from mailappliance.msgauth.dns import DnsCache
    from mailappliance.msgauth.inspect import MessageInspector
    from mailappliance.msgauth.keys import KeyStore
    from mailappliance.msgauth.settings import DkimSettings, FilterSettings, MsgAuthSettings

    dkim_settings = DkimSettings(key_dir=tmp_path)
    clock = Clock()
    return MessageInspector(hostname="mx.test.example", msgauth=MsgAuthSettings(), dkim=dkim_settings,
                            filter=FilterSettings(), dns=DnsCache(None, clock),  # type: ignore[arg-type]
                            keys=KeyStore(dkim_settings, ()), rspamd=None, suspensions=None, clock=clock,
                            run_blocking=None)  # type: ignore[arg-type]


class _Staged:
    def __init__(self, data: bytes) -> None:
        self.data, self.size, self.spilled = data, len(data), False

    def read(self, start: int = 0, limit: int | None = None) -> bytes:
        return self.data[start:] if limit is None else self.data[start:start + limit]


@pytest.mark.parametrize("forged", [False, True])
def test_without_verification_only_forged_results_are_touched(tmp_path: Path, forged: bool) -> None:
    """With nothing to verify or scan, a plain message is left as it is (the fast path), and an
    Authentication-Results field claiming our host is still removed."""
    from mailappliance.msgauth.inspect import Envelope, MessageSource

    head = b"From: a@example.net\r\nSubject: hi\r\n"
    if forged:
        head = b"Authentication-Results: MX.test.example; dkim=pass\r\n" + head
    staged = _Staged(head + b"\r\nbody\r\n")
    envelope = Envelope(client_ip="192.0.2.1", helo="h", sender="a@example.net", recipients=("b@example.org",),
                        queue_id="q", client_name="", user="")
    d = defer.Deferred.fromCoroutine(_quiet_inspector(tmp_path).inbound(envelope, MessageSource(staged, 0, None)))
    inspection = d.result
    assert inspection.outcome.action == "accept" and inspection.facts is None
    assert inspection.changes is forged
    if forged:
        assert b"Authentication-Results" not in inspection.replacement and b"Subject: hi" in inspection.replacement


def test_outbound_is_quiet_only_without_scanning_or_signing(tmp_path: Path) -> None:
    """A subscriber's message skips the inspection only when nothing scans it (no outbound filter) and
    nothing signs it (local recipients only, or no signing keys)."""
    import types

    import attrs

    inspector = _quiet_inspector(tmp_path)
    assert inspector.outbound_is_quiet(False) and inspector.outbound_is_quiet(True)  # no keys, no filter
    inspector.keys = types.SimpleNamespace(signing=[object()])
    assert inspector.outbound_is_quiet(False)  # signed only when the message leaves
    assert not inspector.outbound_is_quiet(True)
    inspector.keys = types.SimpleNamespace(signing=[])
    inspector.rspamd, inspector.filter = object(), attrs.evolve(inspector.filter, outbound=True)
    assert not inspector.outbound_is_quiet(False)
