"""DMARC (RFC 7489): policy discovery, identifier alignment and the result.

Pure functions over the SPF and DKIM results and the From header, plus a
repeatable check over the :class:`~mailappliance.msgauth.dns.DnsView`.
Organizational domains come from the Public Suffix List shipped with
``authheaders`` (read once; its own helper re-reads the whole list on every
call).
"""

from __future__ import annotations

import functools
import importlib.resources
import random
from collections.abc import Iterable
from email.utils import getaddresses
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:  # imported when first needed (reading the list takes a moment)
    from publicsuffix2 import PublicSuffixList

from mailappliance.msgauth.dns import DnsTempError, DnsView

POLICIES = ("none", "quarantine", "reject")
MAX_FROM_DOMAINS = 4


@attrs.frozen
class DmarcRecord:
    policy: str  # p=
    subdomain_policy: str  # sp= (p= when absent)
    adkim: str = "r"
    aspf: str = "r"
    pct: int = 100


@attrs.frozen
class DmarcResult:
    result: str  # pass fail none temperror permerror
    from_domain: str = ""
    policy: str = "none"  # what the domain asks for this message ("none" when it passed or has no record)
    reason: str = ""
    sampled_out: bool = False  # pct= excluded this message; policy is already the next lower one


def parse_record(text: str) -> DmarcRecord | None:
    """A DMARC record, or None when ``text`` is not one (RFC 7489 6.3, 6.6.3)."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        name, sep, value = part.partition("=")
        if sep:
            tags.setdefault(name.strip().lower(), value.strip())
    if not text.lstrip().lower().startswith("v=dmarc1") or tags.get("v", "").upper() != "DMARC1":
        return None
    policy = tags.get("p", "").lower()
    if policy not in POLICIES:
        if "rua" not in tags:
            return None
        policy = "none"  # RFC 7489 6.6.3: an invalid or missing p= with rua= counts as none
    subdomain = tags.get("sp", "").lower()
    pct = tags.get("pct", "100")
    return DmarcRecord(
        policy=policy,
        subdomain_policy=subdomain if subdomain in POLICIES else policy,
        adkim="s" if tags.get("adkim", "r").lower() == "s" else "r",
        aspf="s" if tags.get("aspf", "r").lower() == "s" else "r",
        pct=min(100, max(0, int(pct))) if pct.isdigit() else 100,
    )


@functools.lru_cache(maxsize=1)
def _suffix_list() -> PublicSuffixList:
    from publicsuffix2 import PublicSuffixList

    ref = importlib.resources.files("authheaders") / "public_suffix_list.txt"
    with importlib.resources.as_file(ref) as path, open(path, encoding="utf-8") as f:
        return PublicSuffixList(f)


@functools.lru_cache(maxsize=20_000)
def organizational_domain(domain: str) -> str:
    """The registrable domain ("example.co.uk" for "mail.example.co.uk")."""
    domain = domain.lower().rstrip(".")
    found = _suffix_list().get_public_suffix(domain)
    return found or domain


def aligned(identifier: str, from_domain: str, mode: str) -> bool:
    identifier, from_domain = identifier.lower().rstrip("."), from_domain.lower().rstrip(".")
    if not identifier or not from_domain:
        return False
    if mode == "s":
        return identifier == from_domain
    return organizational_domain(identifier) == organizational_domain(from_domain)


def from_domains(from_values: list[str]) -> list[str] | None:
    """The RFC5322.From domains (lower case), None when there is no usable one."""
    domains = []
    for _, address in getaddresses(from_values[:MAX_FROM_DOMAINS]):
        local, at, domain = address.rpartition("@")
        if not at or not domain or "." not in domain:
            return None
        domains.append(domain.lower().rstrip("."))
    return list(dict.fromkeys(domains))[:MAX_FROM_DOMAINS] or None


def evaluate(from_domain: str, record: DmarcRecord, from_record_at_org: bool,
             spf_pass_domain: str | None, dkim_pass_domains: Iterable[str], sample: float = 0.0) -> DmarcResult:
    """Pure: the DMARC result of one From domain with its record."""
    if any(aligned(d, from_domain, record.adkim) for d in dkim_pass_domains):
        return DmarcResult("pass", from_domain, "none", "DKIM aligned")
    if spf_pass_domain and aligned(spf_pass_domain, from_domain, record.aspf):
        return DmarcResult("pass", from_domain, "none", "SPF aligned")
    policy = record.subdomain_policy if from_record_at_org else record.policy
    if record.pct < 100 and sample * 100 >= record.pct:  # RFC 7489 6.6.4: the next policy down
        lower = POLICIES[max(0, POLICIES.index(policy) - 1)]
        return DmarcResult("fail", from_domain, lower, "no aligned SPF or DKIM pass (pct)", sampled_out=True)
    return DmarcResult("fail", from_domain, policy, "no aligned SPF or DKIM pass")


def strictest(results: list[DmarcResult]) -> DmarcResult:
    return max(results, key=lambda r: (POLICIES.index(r.policy), r.result == "fail"))


class DmarcCheck:
    """Repeatable DMARC check (discovery through the view), given the other results."""

    def __init__(self, from_values: list[str], spf_pass_domain: str | None, dkim_pass_domains: list[str]) -> None:
        self.from_values = from_values
        self.spf_pass_domain = spf_pass_domain
        self.dkim_pass_domains = dkim_pass_domains
        self.sample = random.random()

    def __call__(self, view: DnsView) -> DmarcResult:
        domains = from_domains(self.from_values)
        if domains is None:
            return DmarcResult("permerror", reason="no single usable From address")
        results = []
        for domain in domains:
            try:
                found = self._discover(view, domain)
            except DnsTempError:
                results.append(DmarcResult("temperror", domain, reason="DMARC record lookup failed"))
                continue
            if found is None:
                results.append(DmarcResult("none", domain, reason="no DMARC record"))
                continue
            record, at_org = found
            results.append(evaluate(domain, record, at_org, self.spf_pass_domain, self.dkim_pass_domains,
                                    self.sample))
        for kind in ("temperror",):
            if any(r.result == kind for r in results) and not any(r.policy != "none" for r in results):
                return next(r for r in results if r.result == kind)
        return strictest(results)

    @staticmethod
    def _discover(view: DnsView, domain: str) -> tuple[DmarcRecord, bool] | None:
        record = _record_at(view, domain)
        if record is not None:
            return record, False
        org = organizational_domain(domain)
        if org != domain:
            record = _record_at(view, org)
            if record is not None:
                return record, True
        return None


def _record_at(view: DnsView, domain: str) -> DmarcRecord | None:
    records = [r.decode("utf-8", "replace") for r in view.txt(f"_dmarc.{domain}")]
    parsed = [p for p in map(parse_record, [r for r in records if r.lower().startswith("v=dmarc1")]) if p]
    return parsed[0] if len(parsed) == 1 else None  # several records: none (RFC 7489 6.6.3)
