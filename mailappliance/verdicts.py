"""One verdict shape for every pure decision (relay, screening, limits).

A :class:`Verdict` says what to do (accept, refuse for good, defer: try
later), which rule decided, and why, for the log.  It carries no wire codes:
each protocol maps verdicts to its own replies (``smtp/replies.py``,
``pop3/replies.py``), and the client never sees the logged reason.
"""

from __future__ import annotations

import enum

import attrs


class Action(enum.Enum):
    ACCEPT = "accept"
    REFUSE = "refuse"  # permanent: the same attempt will never succeed
    DEFER = "defer"  # temporary: try again later


@attrs.frozen
class Verdict:
    """A decision; ``rule`` names the rule (e.g. ``relay.denied``, ``block.networks``,
    ``limit.recipients_per_hour``), ``value`` what it matched, ``reason`` the rest for the log."""

    action: Action
    rule: str = ""
    value: str = ""
    reason: str = ""

    @property
    def accepted(self) -> bool:
        return self.action is Action.ACCEPT

    @property
    def refused(self) -> bool:
        return self.action is Action.REFUSE

    @property
    def deferred(self) -> bool:
        return self.action is Action.DEFER


ACCEPT = Verdict(Action.ACCEPT)


def refuse(rule: str, value: str = "", reason: str = "") -> Verdict:
    return Verdict(Action.REFUSE, rule, value, reason)


def defer(rule: str, value: str = "", reason: str = "") -> Verdict:
    return Verdict(Action.DEFER, rule, value, reason)
