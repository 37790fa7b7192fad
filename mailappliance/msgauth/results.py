"""The Authentication-Results header field (RFC 8601) we add on the MX."""

from __future__ import annotations

import re

from mailappliance.msgauth.headers import authserv_id
from mailappliance.msgauth.verdict import AuthFacts

_TOKEN = re.compile(r"^[A-Za-z0-9._@+\-]{1,255}$")


def quote(value: str) -> str:
    """A property value as a token, or a quoted string of printable ASCII (the
    values come from the message: nothing in them may end our field early)."""
    value = value[:255]
    if _TOKEN.match(value):
        return value
    safe = "".join(c if " " <= c <= "~" else "?" for c in value)
    return '"' + safe.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment(text: str) -> str:
    safe = "".join(c if " " <= c <= "~" and c not in "()\\" else " " for c in text[:120]).strip()
    return f" ({safe})" if safe else ""


def authentication_results(authserv: str, facts: AuthFacts) -> str:
    """The field's value: ``authserv; method=result props; ...`` (``none`` when nothing was checked)."""
    parts: list[str] = []
    if facts.spf is not None:
        spf = facts.spf
        prop = "smtp.mailfrom" if spf.identity == "mailfrom" else "smtp.helo"
        parts.append(f"spf={spf.result}{_comment(spf.explanation)} {prop}={quote(spf.domain)}")
    if facts.helo_spf is not None and facts.helo_spf.result != "none":
        parts.append(f"spf={facts.helo_spf.result} smtp.helo={quote(facts.helo_spf.domain)}")
    for dkim in facts.dkim:
        props = [f"header.d={quote(dkim.domain)}" if dkim.domain else "",
                 f"header.s={quote(dkim.selector)}" if dkim.selector else "",
                 f"header.a={quote(dkim.algorithm)}" if dkim.algorithm else "",
                 f"header.b={quote(dkim.header_b)}" if dkim.header_b else ""]
        parts.append(f"dkim={dkim.result}{_comment(dkim.reason)} " + " ".join(p for p in props if p))
    if facts.dkim_none:
        parts.append("dkim=none")
    if facts.arc is not None and facts.arc.result != "none":
        arc = facts.arc
        why = f"i={arc.instances} sealed by {arc.sealer}" if arc.result == "pass" else arc.reason
        parts.append(f"arc={arc.result}{_comment(why)}")
    if facts.dmarc is not None:
        dmarc = facts.dmarc
        comment = f"p={dmarc.policy} dis={facts.disposition}" if dmarc.result == "fail" else dmarc.reason
        parts.append(f"dmarc={dmarc.result}{_comment(comment)}"
                     + (f" header.from={quote(dmarc.from_domain)}" if dmarc.from_domain else ""))
    return f"{authserv};" + ("".join(f" {p.strip()};" for p in parts)[:-1] if parts else " none")


def claims(value: str, authserv: str) -> bool:
    """Does an incoming Authentication-Results value claim to come from us?"""
    return authserv_id(value) == authserv.lower().rstrip(".")
