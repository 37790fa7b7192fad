"""Settings of message authentication (``[msgauth]``), DKIM signing (``[dkim]``)
and the content filter (``[filter]``), read from the config by ``config.py``.

Every action is one of ``ACTIONS``: ``reject`` (550 5.7.1 at the end of DATA),
``junk`` (deliver into the recipient's ``.Junk`` folder, with
``X-Spam-Flag: YES``), ``flag`` (deliver to the inbox with ``X-Spam-Flag: YES``,
for the subscriber's own filters) or ``none`` (only the
Authentication-Results header tells).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:  # config.py imports this module
    from mailappliance.config import ConfigReader

ACTIONS = ("reject", "junk", "flag", "none")
DNS_FAILURE = ("accept", "tempfail")


@attrs.frozen
class DomainPolicy:
    """What the MX does for the recipients of one local domain."""

    verify: bool = False  # SPF, DKIM, DMARC, ARC on mail for this domain
    dmarc_reject: str = "reject"  # the sender domain publishes p=reject and the message fails DMARC
    dmarc_quarantine: str = "flag"  # p=quarantine (junk hides mail from POP3-only subscribers: opt in)
    spf_fail: str = "none"  # SPF hard fail (-all) of the MAIL FROM, whatever DMARC says
    dns_failure: str = "accept"  # the checks could not finish (DNS): accept (header says so) or 451


@attrs.frozen
class MsgAuthSettings:
    default: DomainPolicy = DomainPolicy()
    domains: tuple[tuple[str, DomainPolicy], ...] = ()  # overrides per local domain
    dns_timeout: float = 5.0  # seconds of DNS per message, all lookups together
    trusted_arc_sealers: tuple[str, ...] = ()  # an ARC pass sealed by one of these lifts a DMARC reject/quarantine

    def policy_for(self, domain: str) -> DomainPolicy:
        return dict(self.domains).get(domain.lower(), self.default)

    @property
    def any_verify(self) -> bool:
        return self.default.verify or any(policy.verify for _, policy in self.domains)


@attrs.frozen
class DkimSettings:
    sign: bool = True  # sign submitted mail for remote recipients when the domain has a key
    key_dir: Path = Path("var/dkim")  # <key_dir>/<domain>/<selector>.key
    selectors: tuple[tuple[str, tuple[str, ...]], ...] = ()  # explicit selectors per domain (else: newest key per type)


@attrs.frozen
class FilterSettings:
    rspamd: str = ""  # http://127.0.0.1:11333; empty: no content filter
    inbound: bool = True
    outbound: bool = False
    timeout: float = 10.0
    on_failure: str = "accept"  # rspamd down: accept (X-Spam-Status: Unchecked) or tempfail (451)
    junk: bool = False  # "add header" and "rewrite subject" verdicts into .Junk (else: the inbox, flagged)
    max_size: int = 10 * 1024 * 1024  # larger messages are not scanned (header says so)
    suspend_after: int = 3  # outbound spam verdicts within suspend_window that suspend a subscriber (0: never)
    suspend_window: float = 3600.0

    @property
    def enabled(self) -> bool:
        return bool(self.rspamd)


def _policy(reader: ConfigReader, base: DomainPolicy) -> DomainPolicy:
    return DomainPolicy(
        verify=reader.boolean("verify", base.verify),
        dmarc_reject=reader.choice("dmarc_reject", base.dmarc_reject, ACTIONS),
        dmarc_quarantine=reader.choice("dmarc_quarantine", base.dmarc_quarantine, ACTIONS),
        spf_fail=reader.choice("spf_fail", base.spf_fail, ACTIONS),
        dns_failure=reader.choice("dns_failure", base.dns_failure, DNS_FAILURE),
    )


def _local_domain_keys(reader: ConfigReader, local_domains: tuple[str, ...]) -> list[str]:
    """The keys of a per-domain table; each must be one of ours (else a config error naming it)."""
    for domain in reader.table:
        if domain.lower() not in local_domains:
            raise reader.error(domain, f"is not in server.local_domains ({', '.join(local_domains)})")
    return list(reader.table)


def parse_msgauth(reader: ConfigReader, local_domains: tuple[str, ...]) -> MsgAuthSettings:
    default = _policy(reader, DomainPolicy())
    domains_reader = reader.table_of("domains")
    domains = []
    for domain in _local_domain_keys(domains_reader, local_domains):
        table = domains_reader.table_of(domain)
        domains.append((domain.lower(), _policy(table, default)))
        table.reject_unknown()
    domains_reader.used.update(domains_reader.table)
    settings = MsgAuthSettings(
        default=default,
        domains=tuple(domains),
        dns_timeout=reader.number("dns_timeout", 5.0, 0.5, 60),
        trusted_arc_sealers=tuple(d.lower().rstrip(".") for d in reader.strings("trusted_arc_sealers", ())),
    )
    reader.used.add("domains")
    reader.reject_unknown()
    return settings


def parse_dkim(reader: ConfigReader, local_domains: tuple[str, ...]) -> DkimSettings:
    selectors_reader = reader.table_of("selectors")
    selectors = []
    for domain in _local_domain_keys(selectors_reader, local_domains):
        names = selectors_reader.strings(domain)
        for name in names:
            if not _is_selector(name):
                raise selectors_reader.error(domain, f"{name!r} is not a selector (letters, digits, '-', '.')")
        selectors.append((domain.lower(), names))
    settings = DkimSettings(
        sign=reader.boolean("sign", True),
        key_dir=reader.path("key_dir", "var/dkim"),
        selectors=tuple(selectors),
    )
    reader.used.add("selectors")
    reader.reject_unknown()
    return settings


def parse_filter(reader: ConfigReader, size_parser: Callable[[ConfigReader, str, int], int]) -> FilterSettings:
    url = reader.string("rspamd", "")
    if url and not (url.startswith("http://") and url.count(":") >= 2):
        raise reader.error("rspamd",
                           f"must be an http:// URL with a port, like \"http://127.0.0.1:11333\", got {url!r}")
    settings = FilterSettings(
        rspamd=url,
        inbound=reader.boolean("inbound", True),
        outbound=reader.boolean("outbound", False),
        timeout=reader.number("timeout", 10.0, 0.5, 300),
        on_failure=reader.choice("on_failure", "accept", DNS_FAILURE),
        junk=reader.boolean("junk", False),
        max_size=size_parser(reader, "max_size", 10 * 1024 * 1024),
        suspend_after=reader.integer("suspend_after", 3, 0, 1_000_000),
        suspend_window=reader.number("suspend_window", 3600, 60, 30 * 86400),
    )
    reader.reject_unknown()
    return settings


def _is_selector(name: str) -> bool:
    labels = name.split(".")
    return all(label and len(label) <= 63 and all(c.isascii() and (c.isalnum() or c == "-") for c in label)
               for label in labels) and len(name) <= 200
