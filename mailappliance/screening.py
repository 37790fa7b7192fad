"""Screening: keep selected networks, client domains, HELO names and senders out.

The lists live in one TOML file the admin edits (reloaded on SIGHUP and when
it changes); the decisions are pure functions of facts:

- allow rules win over block rules;
- a domain pattern ``name.example`` matches exactly, ``.name.example``
  matches that domain and every name below it;
- client domain names are *forward-confirmed* reverse DNS names (the PTR
  name must resolve back to the client's address), so a spammer cannot
  claim a partner's name;
- DNS trouble never blocks mail by itself: a failed lookup matches no
  block rule.  Only when a failed lookup could have *allowed* a client that
  a block rule refuses is the answer temporary (4xx) instead of 554.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs
from twisted.logger import Logger

from mailappliance.screening_lists import Network, ScreeningFileError, ScreeningLists, load_lists
from mailappliance.verdicts import ACCEPT, Action, Verdict

log = Logger(namespace="mailappliance.screening")

@attrs.frozen
class ClientFacts:
    """What we know about a connecting client; ``None`` name = none or not confirmed."""

    address: str
    name: str | None = None
    name_lookup_failed: bool = False
    dnsbl_listed_in: str | None = None




def domain_matches(name: str, pattern: str) -> bool:
    name, pattern = name.lower().rstrip("."), pattern.lower()
    if pattern.startswith("."):
        return name == pattern[1:] or name.endswith(pattern)
    return name == pattern


def _first_domain_match(name: str | None, patterns: Iterable[str]) -> str | None:
    if name is None:
        return None
    return next((p for p in patterns if domain_matches(name, p)), None)


def _network_match(address: str, networks: Iterable[Network]) -> Network | None:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    return next((n for n in networks if ip.version == n.version and ip in n), None)


def screen_client(facts: ClientFacts, lists: ScreeningLists) -> Verdict:
    """Decide at connect time."""
    if (network := _network_match(facts.address, lists.allow_networks)) is not None:
        return Verdict(Action.ACCEPT, "allow.networks", str(network))
    if (pattern := _first_domain_match(facts.name, lists.allow_client_domains)) is not None:
        return Verdict(Action.ACCEPT, "allow.client_domains", pattern)
    could_be_allowed = facts.name_lookup_failed and bool(lists.allow_client_domains)
    refusal: Verdict | None = None
    if (network := _network_match(facts.address, lists.block_networks)) is not None:
        refusal = Verdict(Action.REFUSE, "block.networks", str(network))
    elif (pattern := _first_domain_match(facts.name, lists.block_client_domains)) is not None:
        refusal = Verdict(Action.REFUSE, "block.client_domains", f"{pattern} ({facts.name})")
    elif facts.dnsbl_listed_in is not None:
        refusal = Verdict(Action.REFUSE, "dnsbl", facts.dnsbl_listed_in)
    if refusal is None:
        return ACCEPT
    if could_be_allowed:
        return Verdict(Action.DEFER, refusal.rule, f"{refusal.value}; reverse DNS lookup failed")
    return refusal


def screen_helo(helo: str, lists: ScreeningLists) -> Verdict:
    if (pattern := _first_domain_match(helo, lists.block_helo)) is not None:
        return Verdict(Action.REFUSE, "block.helo", pattern)
    return ACCEPT


def _sender_match(address: str, patterns: Iterable[str]) -> str | None:
    address = address.lower()
    domain = address.rpartition("@")[2]
    for pattern in patterns:
        if "@" in pattern:
            if address == pattern.lower():
                return pattern
        elif domain_matches(domain, pattern):
            return pattern
    return None


def screen_sender(address: str, lists: ScreeningLists) -> Verdict:
    """Decide at MAIL FROM; the null sender is never screened here."""
    if not address or _sender_match(address, lists.allow_senders):
        return ACCEPT
    if (pattern := _sender_match(address, lists.block_senders)) is not None:
        return Verdict(Action.REFUSE, "block.senders", pattern)
    return ACCEPT


# -- the file -----------------------------------------------------------------

class ScreeningSource:
    """The current lists: re-read when the file changes (checked at most every second) or on reload()."""

    def __init__(self, file: Path | None, clock: Any) -> None:
        self.file = file
        self.clock = clock
        self._stamp: tuple[int, int, int] | None = None
        self._checked = -1.0
        self.lists = ScreeningLists()
        if file is not None:
            self.reload()

    def _file_stamp(self) -> tuple[int, int, int] | None:
        assert self.file is not None
        try:
            st = os.stat(self.file)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def reload(self) -> bool:
        """Read the file now; raises ScreeningFileError (keeping the old lists) when it is wrong."""
        if self.file is None:
            return False
        stamp = self._file_stamp()
        self.lists = load_lists(self.file)
        self._stamp = stamp
        return True

    def current(self) -> ScreeningLists:
        now = self.clock.seconds()
        if self.file is not None and now - self._checked >= 1.0:
            self._checked = now
            if self._file_stamp() != self._stamp:
                try:
                    self.reload()
                    log.info("screening lists reloaded from {file} (file changed)", file=self.file)
                except ScreeningFileError as e:
                    self._stamp = self._file_stamp()
                    log.error("screening lists NOT reloaded, keeping the old ones: {why}", why=str(e))
        return self.lists
