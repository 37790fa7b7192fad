"""Relay and sender decisions: pure functions from facts to verdicts, no I/O.

The rule is short on purpose: a recipient is *local* only when its domain is
exactly one of our domains (local domains and alias domains alike: callers pass
``Addressing.accepted_domains``) and its local part is a plain dot-atom without
routing characters; it is *remote* only for an authenticated subscriber;
everything else is refused.  Address forms that once made servers relay
(percent hack, bang paths, source routes, quoted local parts hiding '@',
address literals) are refused for everyone, authenticated or not.
"""

from __future__ import annotations

import enum

import attrs

from mailappliance.addressing import Addressing, sender_forms
from mailappliance.directory import Subscriber
from mailappliance.mailpath import MailPath
from mailappliance.verdicts import ACCEPT, Verdict, refuse

ROUTING_CHARACTERS = frozenset("%!@:")


class Route(enum.Enum):
    LOCAL = "local"
    REMOTE = "remote"
    REFUSED = "refused"


@attrs.frozen
class RelayVerdict:
    """Where a recipient goes; when refused, ``verdict`` says by which rule (``relay.*``)."""

    route: Route
    verdict: Verdict = ACCEPT

    @property
    def refused(self) -> bool:
        return self.route is Route.REFUSED

    @property
    def reason(self) -> str:
        return self.verdict.reason


def _refuse(rule: str, reason: str) -> RelayVerdict:
    return RelayVerdict(Route.REFUSED, refuse(f"relay.{rule}", reason=reason))


def is_local_domain(domain: str, local_domains: frozenset[str] | tuple[str, ...]) -> bool:
    """Exact, case-insensitive match; no trailing dots, no subdomains."""
    return domain.lower() in local_domains


def decide_recipient(
    recipient: MailPath, local_domains: frozenset[str] | tuple[str, ...], authenticated: bool
) -> RelayVerdict:
    """Decide whether ``recipient`` may be accepted, and how it will be routed."""
    if recipient.is_null:
        return _refuse("null_recipient", "null recipient")
    if recipient.source_route:
        return _refuse("source_route", "source route")
    if recipient.quoted:
        return _refuse("quoted", "quoted local part")
    if ROUTING_CHARACTERS & set(recipient.local_part):
        return _refuse("routing_character", "routing character in local part")
    if not recipient.domain:
        return _refuse("no_domain", "no domain")
    if recipient.is_address_literal:
        return _refuse("address_literal", "address literal")
    if is_local_domain(recipient.domain, local_domains):
        return RelayVerdict(Route.LOCAL)
    if authenticated:
        return RelayVerdict(Route.REMOTE)
    return _refuse("denied", "relay denied")


def decide_sender(sender: MailPath, subscriber: Subscriber, addressing: Addressing | None = None) -> str | None:
    """Why an authenticated subscriber may not use ``sender`` (None: they may).

    Only the addresses the directory gives them (``mail``, ``mailLocalAddress``)
    and the null sender are theirs to use, in any alias-domain form and with
    or without a sub-address (``addressing``); anything else is a forgery,
    which is exactly what a stolen account is used for.
    """
    if sender.is_null:
        return None
    forms = sender_forms(addressing, sender.address) if addressing is not None else (sender.address,)
    if not (sender.source_route or sender.quoted) and any(subscriber.owns_address(f) for f in forms):
        return None
    return f"not owned by user {subscriber.uid}"
