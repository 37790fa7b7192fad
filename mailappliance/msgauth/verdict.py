"""What happens to a message, from the facts: pure functions, no I/O.

Inputs are the authentication results (SPF, DKIM, DMARC, ARC), the content
filter's verdict and each recipient domain's policy; the output is one
:class:`Outcome` for the whole message (one reply after DATA), with the
recipients whose copy goes to ``.Junk``.
"""

from __future__ import annotations

from typing import Final, Literal

import attrs

from mailappliance.filter.rspamd import SpamVerdict
from mailappliance.msgauth.dkim_check import ArcResult, DkimResult
from mailappliance.msgauth.dmarc import DmarcResult
from mailappliance.msgauth.settings import DomainPolicy, FilterSettings
from mailappliance.msgauth.spf_check import SpfResult

SEVERITY = ("none", "flag", "junk", "reject", "tempfail")
UNAVAILABLE: Final = "unavailable"  # the content filter could not answer
TOO_LARGE: Final = "too large"  # not scanned: over [filter] max_size
# What the content filter said: its verdict, why there is none, or None when it did not run.
SpamResult = SpamVerdict | Literal["unavailable", "too large"] | None


@attrs.define
class AuthFacts:
    """Everything the checks found (None: that check did not run)."""

    client_ip: str = ""
    spf: SpfResult | None = None
    helo_spf: SpfResult | None = None
    dkim: list[DkimResult] = attrs.Factory(list)
    dkim_none: bool = False  # checked, and the message has no signature
    arc: ArcResult | None = None
    dmarc: DmarcResult | None = None
    disposition: str = "none"  # what we did about DMARC: none, quarantine, reject

    @property
    def unsure(self) -> bool:
        """A DNS failure may have hidden a pass that DMARC needed."""
        if self.dmarc is None:
            return False
        temporary = (self.spf is not None and self.spf.result == "temperror") or \
            any(d.result == "temperror" for d in self.dkim)
        return self.dmarc.result == "temperror" or (self.dmarc.result == "fail" and temporary)


@attrs.frozen
class Outcome:
    action: str  # "accept", "reject" (550 5.7.1) or "tempfail" (451)
    kind: str = ""  # why: "dmarc", "spf", "spam", "dns", "filter" (for the reply and the log)
    reason: str = ""
    junk: frozenset[str] = frozenset()  # recipient addresses whose copy is filed into .Junk
    flag: bool = False  # X-Spam-Flag: YES
    disposition: str = "none"


def _worst(actions: list[tuple[str, str, str]]) -> tuple[str, str, str]:
    return max(actions, key=lambda a: SEVERITY.index(a[0]), default=("none", "", ""))


def auth_action(facts: AuthFacts, policy: DomainPolicy, trusted_sealers: tuple[str, ...]) -> tuple[str, str, str]:
    """(action, kind, reason) that the authentication results call for under ``policy``."""
    if not policy.verify:
        return "none", "", ""
    if facts.unsure and policy.dns_failure == "tempfail":
        return "tempfail", "dns", "DNS lookups for SPF/DKIM/DMARC did not finish"
    found: list[tuple[str, str, str]] = []
    dmarc = facts.dmarc
    if dmarc is not None and dmarc.result == "fail" and dmarc.policy != "none":
        action = policy.dmarc_reject if dmarc.policy == "reject" else policy.dmarc_quarantine
        arc = facts.arc
        if arc is not None and arc.result == "pass" and arc.sealer in trusted_sealers:
            action = "none"  # a forwarder we trust vouches for the original authentication
        found.append((action, "dmarc", f"DMARC {dmarc.from_domain} p={dmarc.policy}: {dmarc.reason}"))
    if facts.spf is not None and facts.spf.identity == "mailfrom" and facts.spf.result == "fail":
        found.append((policy.spf_fail, "spf", f"SPF fail for {facts.spf.domain}"))
    return _worst(found)


def spam_action(verdict: SpamResult, settings: FilterSettings) -> tuple[str, str, str]:
    """(action, kind, reason) for the content filter's verdict (a SpamVerdict,
    UNAVAILABLE, TOO_LARGE or None when it did not run)."""
    if not isinstance(verdict, SpamVerdict):  # None, TOO_LARGE or UNAVAILABLE
        if verdict == UNAVAILABLE and settings.on_failure == "tempfail":
            return "tempfail", "filter", "content filter unavailable"
        return "none", "", ""
    reason = f"rspamd {verdict.action} score={verdict.score:.2f}/{verdict.required:.2f}"
    if verdict.action == "reject":
        return "reject", "spam", reason
    if verdict.action in ("soft reject", "greylist"):
        return "tempfail", "spam", reason
    if verdict.action in ("add header", "rewrite subject"):
        return ("junk" if settings.junk else "flag"), "spam", reason
    return "none", "", ""


def decide(recipients: list[tuple[str, DomainPolicy]], facts: AuthFacts | None, verdict: SpamResult,
           filter_settings: FilterSettings, trusted_sealers: tuple[str, ...] = ()) -> Outcome:
    """One outcome for the message: tempfail if any recipient's policy says so,
    reject only if every recipient's does (a refusal after DATA refuses them
    all), else deliver, filing into .Junk the copies of recipients whose policy
    says reject or junk."""
    spam = spam_action(verdict, filter_settings)
    per_recipient = []
    for address, policy in recipients:
        auth = auth_action(facts, policy, trusted_sealers) if facts is not None else ("none", "", "")
        per_recipient.append((address, _worst([auth, spam])))
    dmarc_actions = [a for _, a in per_recipient if a[1] == "dmarc"]
    disposition = "none"
    if dmarc_actions:
        disposition = "reject" if all(a[0] == "reject" for _, a in per_recipient) else \
            "quarantine" if any(a[0] in ("junk", "flag", "reject") for a in dmarc_actions) else "none"
    tempfail = [a for _, a in per_recipient if a[0] == "tempfail"]
    if tempfail:
        return Outcome("tempfail", tempfail[0][1], tempfail[0][2], disposition=disposition)
    if per_recipient and all(a[0] == "reject" for _, a in per_recipient):
        action = per_recipient[0][1]
        return Outcome("reject", action[1], action[2], disposition=disposition)
    junk = frozenset(address for address, a in per_recipient if a[0] in ("reject", "junk"))
    flag = any(a[0] in ("reject", "junk", "flag") for _, a in per_recipient)
    worst = _worst([a for _, a in per_recipient])
    return Outcome("accept", worst[1], worst[2], junk, flag, disposition)
