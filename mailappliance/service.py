"""Builds the appliance's MultiService from validated settings.

One directory (with its own thread pool), ONE shared credential checker, one
storage thread pool for fsyncs, and a listener per ``[[listeners]]`` table.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.application import internet, service
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from mailappliance.config import ConfigError, ListenerSettings, Settings
from mailappliance.credentials import SubscriberChecker
from mailappliance.directory.backends import build_store
from mailappliance.directory.threaded import Directory
from mailappliance.maildir import clean_incoming
from mailappliance.pop3.mailbox import MailboxLocks, MaildirRealm
from mailappliance.pop3.server import POP3Factory
from mailappliance.smtp.server import SMTPConfig, SMTPFactory

log = Logger(namespace="mailappliance")


class _PoolService(service.Service):
    """Starts and stops thread pools (and the directory) with the application."""

    def __init__(self, start: Callable[[], None], stop: Callable[[], None]) -> None:
        self._start, self._stop = start, stop

    def startService(self) -> None:
        super().startService()
        self._start()

    def stopService(self) -> None:
        super().stopService()
        self._stop()


class _StartupService(service.Service):
    """Prepares storage and says what is running."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def startService(self) -> None:
        super().startService()
        s = self.settings
        s.maildir_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        removed = clean_incoming(s.spool_dir / "incoming")
        if removed:
            log.info("removed {n} partial message(s) left by an earlier crash", n=removed)
        for listener in s.listeners:
            log.info(
                "listening: {name} ({role}) on {address}:{port}",
                name=listener.name, role=listener.role, address=listener.address, port=listener.port,
            )
        log.info(
            "mailappliance ready: host {host}, domains {domains}, directory {backend}",
            host=s.hostname, domains=", ".join(s.local_domains), backend=s.directory.backend,
        )


def build_service(settings: Settings, reactor: Any = None) -> service.MultiService:
    """Everything the daemon runs, wired together."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    top = service.MultiService()
    _StartupService(settings).setServiceParent(top)

    directory = Directory(build_store(settings.directory), reactor, settings.directory.threads)
    _PoolService(directory.start, directory.stop).setServiceParent(top)
    storage_pool = ThreadPool(minthreads=1, maxthreads=8, name="storage")
    _PoolService(storage_pool.start, storage_pool.stop).setServiceParent(top)

    def run_blocking(function: Callable[..., Any], *args: Any) -> Deferred:
        return deferToThreadPool(reactor, storage_pool, function, *args)

    checker = SubscriberChecker(directory, settings.auth_cache_ttl, reactor)
    locks = MailboxLocks()
    pop3_portal = Portal(MaildirRealm(settings.maildir_root, locks), [checker])

    for index, listener in enumerate(settings.listeners):
        if listener.is_smtp:
            factory: Any = _smtp_factory(settings, index, listener, directory, run_blocking)
        else:
            factory = _pop3_factory(settings, index, listener, pop3_portal, run_blocking, reactor)
        server = internet.TCPServer(listener.port, factory, interface=listener.address)
        server.setName(listener.name)
        server.setServiceParent(top)
    return top


def _require_plain_role(settings: Settings, index: int, listener: ListenerSettings) -> None:
    if listener.role not in ("mx", "pop3"):
        raise ConfigError(
            settings.source, f"listeners[{index}].role",
            f"role {listener.role!r} needs TLS, which this version does not offer yet; use 'mx' or 'pop3'",
        )


def _smtp_factory(
    settings: Settings, index: int, listener: ListenerSettings, directory: Directory,
    run_blocking: Callable[..., Deferred],
) -> SMTPFactory:
    _require_plain_role(settings, index, listener)
    config = SMTPConfig(
        hostname=settings.hostname,
        role=listener.role,
        local_domains=frozenset(settings.local_domains),
        maildir_root=settings.maildir_root,
        incoming_dir=settings.spool_dir / "incoming",
        max_message_size=settings.max_message_size,
        idle_timeout=settings.smtp_idle_timeout,
    )
    return SMTPFactory(config, directory.find_by_address, run_blocking)


def _pop3_factory(
    settings: Settings, index: int, listener: ListenerSettings, portal: Portal,
    run_blocking: Callable[..., Deferred], reactor: Any,
) -> POP3Factory:
    _require_plain_role(settings, index, listener)
    if listener.allow_plaintext_auth:
        log.warn(
            "listener {name}: plaintext POP3 login without TLS is ALLOWED by config "
            "(listeners[{index}].allow_plaintext_auth); passwords cross the network in clear",
            name=listener.name, index=index,
        )
    return POP3Factory(
        portal,
        hostname=settings.hostname,
        allow_plaintext_auth=listener.allow_plaintext_auth,
        idle_timeout=settings.pop3_idle_timeout,
        reactor=reactor,
        run_blocking=run_blocking,
    )
