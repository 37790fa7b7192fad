"""SPF (RFC 7208) for the MAIL FROM and HELO identities, with pyspf.

pyspf looks names up through its module-level ``DNSLookup``; we point that
at the :class:`~mailappliance.msgauth.dns.DnsView` of the check running in
this thread, so it never queries the system resolver.  pyspf keeps RFC
7208's limits (10 lookups, 2 void lookups, 10 MX/PTR names).
"""

from __future__ import annotations

import threading

import attrs
import spf

from mailappliance.msgauth.dns import DnsTempError, DnsView, RecordValue

_current = threading.local()


# pyspf's DNSLookup answer: ((owner, type), value), a TXT record's value as its list of strings.
SpfAnswer = list[tuple[tuple[str, str], RecordValue | list[bytes]]]


def _lookup(name: str, qtype: str, strict: bool = True, timeout: float | None = None) -> SpfAnswer:
    view: DnsView | None = getattr(_current, "view", None)
    if view is None:
        raise spf.TempError("DNS: no resolver for this check")  # never dnspython against resolv.conf
    if qtype == "SPF":  # type 99 is obsolete (RFC 7208 3.1); never looked up
        return []
    try:
        answer = view.lookup(name, qtype)
    except DnsTempError as e:
        raise spf.TempError(f"DNS {e}") from None
    results: SpfAnswer = []
    for owner, kind, value in answer.records:
        if kind == "TXT" and isinstance(value, bytes):
            results.append(((owner, kind), [value]))  # pyspf joins a record's strings itself
        else:
            results.append(((owner, kind), value))
    return results


spf.DNSLookup = _lookup


@attrs.frozen
class SpfResult:
    result: str  # pass fail softfail neutral none temperror permerror
    identity: str  # "mailfrom" or "helo"
    domain: str
    explanation: str = ""


def check_spf(view: DnsView, client_ip: str, sender: str, helo: str,
              receiver: str) -> tuple[SpfResult, SpfResult | None]:
    """The MAIL FROM result (for a null sender: the HELO identity, RFC 7208 2.4)
    and the HELO result (None when MAIL FROM is null, since it is the same check)."""
    _current.view = view
    try:
        helo_result = _one(client_ip, "", helo, receiver, "helo") if _is_domain(helo) else \
            SpfResult("none", "helo", helo, "HELO is not a domain name")
        if not sender:
            return helo_result, None
        return _one(client_ip, sender, helo, receiver, "mailfrom"), helo_result
    finally:
        _current.view = None


def _is_domain(name: str) -> bool:
    return "." in name and not name.startswith("[") and all(part for part in name.split("."))


def _one(client_ip: str, sender: str, helo: str, receiver: str, identity: str) -> SpfResult:
    domain = sender.rpartition("@")[2] if sender else helo
    try:
        query = spf.query(i=client_ip, s=sender, h=helo, receiver=receiver, querytime=0)
        result, _, explanation = query.check()
    except (spf.TempError, DnsTempError) as e:
        return SpfResult("temperror", identity, domain, str(e))
    except (spf.PermError, ValueError) as e:
        return SpfResult("permerror", identity, domain, str(e))
    return SpfResult(result, identity, domain, explanation if result == "fail" else "")
