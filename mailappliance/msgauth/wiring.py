"""Builds the message inspector (msgauth, DKIM keys, rspamd, suspensions) for
``service.py``, and what SIGHUP swaps or re-reads in it."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime, IResolver
from twisted.logger import Logger

from mailappliance.blocking import RunBlocking
from mailappliance.config import Settings
from mailappliance.filter.rspamd import RspamdClient
from mailappliance.filter.suspension import Suspensions
from mailappliance.msgauth.dmarc import organizational_domain
from mailappliance.msgauth.dns import DnsCache
from mailappliance.msgauth.inspect import MessageInspector
from mailappliance.msgauth.keys import KeyStore
from mailappliance.msgauth.settings import FilterSettings
from mailappliance.reload import Live

log = Logger(namespace="mailappliance.msgauth")


class _FilterLive:
    """``[filter]`` swapped on SIGHUP (a new rspamd URL gets a new client)."""

    def __init__(self, inspector: MessageInspector, reactor: IReactorTime) -> None:
        self.inspector = inspector
        self.reactor = reactor

    @property
    def settings(self) -> FilterSettings:
        return self.inspector.filter

    @settings.setter
    def settings(self, value: FilterSettings) -> None:
        old = self.inspector.filter
        self.inspector.filter = value
        if self.inspector.suspensions is not None:
            self.inspector.suspensions.settings = value
        if value.rspamd != old.rspamd or value.timeout != old.timeout:
            self.inspector.rspamd = RspamdClient(value.rspamd, self.reactor, value.timeout) if value.rspamd else None


def log_keys(keys: KeyStore) -> None:
    for problem in keys.problems:
        log.error("DKIM key not used: {problem}", problem=problem)
    for domain, infos in sorted(keys.signing.items()):
        log.info("DKIM signing for {domain}: {selectors}", domain=domain,
                 selectors=", ".join(f"{k.selector} ({k.key_type})" for k in infos))


def build_inspector(settings: Settings, resolver: IResolver, reactor: IReactorTime,
                    run_blocking: RunBlocking) -> tuple[MessageInspector, list[Live], list[Callable[[], None]]]:
    """The inspector, the parts that follow [msgauth], [dkim] and [filter] on SIGHUP, and
    the hooks to run on every SIGHUP (new DKIM selectors, suspensions edited by the admin)."""
    if settings.msgauth.any_verify:
        organizational_domain("example.org")  # read the Public Suffix List now, not in the first message's check
    keys = KeyStore(settings.dkim, settings.local_domains)
    keys.reload()
    log_keys(keys)
    suspensions = Suspensions(settings.spool_dir, settings.filter, reactor)
    f = settings.filter
    inspector = MessageInspector(
        hostname=settings.hostname, msgauth=settings.msgauth, dkim=settings.dkim, filter=f,
        dns=DnsCache(resolver, reactor, settings.msgauth.dns_timeout), keys=keys,
        rspamd=RspamdClient(f.rspamd, reactor, f.timeout) if f.rspamd else None,
        suspensions=suspensions, clock=reactor, run_blocking=run_blocking)

    def rescan_keys() -> None:  # new selectors take over on SIGHUP even when [dkim] did not change
        keys.reload()
        log_keys(keys)

    followers = [Live("msgauth", inspector), Live("dkim", keys), Live("filter", _FilterLive(inspector, reactor))]
    return inspector, followers, [rescan_keys, suspensions.load]
