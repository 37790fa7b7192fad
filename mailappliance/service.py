"""Builds the appliance's MultiService from validated settings.

One directory (with its own thread pool), ONE shared credential checker, the
commit threads that make received mail durable, a storage thread pool for
other disk work, and a listener per ``[[listeners]]`` table.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from cryptography.hazmat.primitives import serialization
from twisted.application import internet, service
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocolFactory, IReactorThreads, IReactorTime, IResolver
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from mailappliance.addressing import Addressing, build_addressing
from mailappliance.blocking import RunBlocking
from mailappliance.client_lookup import ClientLookup
from mailappliance.committer import BatchCommitter
from mailappliance.config import WEB_ROLES, ListenerSettings, Settings, StartupError
from mailappliance.credentials import SubscriberChecker, SubscriberRealm
from mailappliance.delivery import Committer
from mailappliance.directory.backends import build_store
from mailappliance.directory.threaded import Directory
from mailappliance.journal import journal_for, recover_journals
from mailappliance.linesession import SessionSettings
from mailappliance.logs import JsonLogService, LogLevelService
from mailappliance.maildir import clean_incoming
from mailappliance.metrics import METRICS
from mailappliance.msgauth.wiring import build_inspector
from mailappliance.pop3.mailbox import MailboxLocks, MaildirRealm
from mailappliance.pop3.server import POP3Factory
from mailappliance.queue.client import TLSContext
from mailappliance.queue.mta_sts import HttpsPolicyFetcher, MtaSts
from mailappliance.queue.notices import SuccessNotices
from mailappliance.queue.reports import ReportDelivery
from mailappliance.queue.routing import NextHop, Router, make_resolver
from mailappliance.queue.runner import QueueRunner
from mailappliance.queue.spool import OutboundSpool
from mailappliance.quota import MailboxQuotas
from mailappliance.reload import Live, LiveParts, Reloader
from mailappliance.screening import ScreeningSource
from mailappliance.settings import Relay
from mailappliance.smtp.server import SMTPConfig, SMTPFactory
from mailappliance.state.build import build_state_store
from mailappliance.state.memory import MemoryStore
from mailappliance.throttle import AuthThrottle
from mailappliance.tls import ServerTLS, client_certificate, ensure_self_signed, fingerprint
from mailappliance.web import HealthResource, autoconfig_site, metrics_site, spool_probe
from mailappliance.workers import WorkerPlan, WorkerSupervisor, adopted, byte_budget, rate_limits, shared_listener

if TYPE_CHECKING:  # Twisted's trust root interface, not re-exported by twisted.internet.ssl
    from twisted.internet._sslverify import IOpenSSLTrustRoot

log = Logger(namespace="mailappliance")
_R = TypeVar("_R")


class _PoolService(service.Service):
    """Starts and stops thread pools (and the directory) with the application."""

    def __init__(self, start: Callable[[], None], stop: Callable[[], None]) -> None:
        self._start, self._stop = start, stop

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Service is unannotated
        self._start()

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]  # Service is unannotated
        self._stop()


class _StartupService(service.Service):
    """Prepares storage (owned by the user the daemon will run as) and says what is running."""

    def __init__(self, settings: Settings, owner: tuple[int, int] | None) -> None:
        self.settings = settings
        self.owner = owner

    def privilegedStartService(self) -> None:
        """Still root (twistd --uid/--gid drops privileges after this): hand the storage over."""
        super().privilegedStartService()  # type: ignore[no-untyped-call]  # Service is unannotated
        if self.owner is None or os.geteuid() != 0:
            return
        for key, path in (("storage.maildir_root", self.settings.maildir_root),
                          ("storage.spool_dir", self.settings.spool_dir)):
            with _names_key(self.settings, key, path):
                path.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.chown(path, *self.owner)

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Service is unannotated
        s = self.settings
        with _names_key(s, "storage.maildir_root", s.maildir_root):
            s.maildir_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        with _names_key(s, "storage.spool_dir", s.spool_dir):
            OutboundSpool(s.spool_dir).prepare()
            removed = clean_incoming(s.spool_dir / "incoming")
            recover_journals(s.spool_dir, s.maildir_root,  # every worker's, before any process accepts;
                             keep=s.workers if s.sync == "journal" else 0)  # then the unused ones go
        if removed:
            log.info("removed {n} partial message(s) left by an earlier crash", n=removed)
        for listener in s.listeners:
            log.info(
                "listening: {name} ({role}) on {address}:{port}",
                name=listener.name, role=listener.role, address=listener.address, port=listener.port,
            )


class _ReadyService(service.Service):
    """The last service started: "ready" means every part runs (listeners bound,
    threads started, the SIGHUP handler installed), which admins and tests wait for."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Service is unannotated
        settle_heap()
        s = self.settings
        log.info(
            "mailappliance ready: host {host}, domains {domains}, directory {backend}",
            host=s.hostname, domains=", ".join(s.local_domains), backend=s.directory.backend,
        )


def settle_heap() -> None:
    """Tune the garbage collector once everything is built.  ``gc.freeze`` moves the
    start-up objects (Twisted, our modules, settings, caches) out of the collector's
    reach, so a full collection no longer walks them all; a larger first threshold
    makes young collections rarer, since every message allocates many short-lived
    containers.  Measured at c=50: 5-9 % fewer CPU ms per message (docs/performance.md)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(5000, 20, 20)


@contextlib.contextmanager
def _names_key(settings: Settings, key: str, path: Path) -> Iterator[None]:
    """An OSError preparing ``path`` becomes the one-line start-up error naming the config key."""
    try:
        yield
    except OSError as e:
        where = f"{e.filename}" if e.filename else str(path)
        raise StartupError(settings.source, key, f"cannot use {where}: {e.strerror or e}") from None


def build_service(settings: Settings, reactor: IReactorTime | None = None,
                  owner: tuple[int, int] | None = None, worker: WorkerPlan | None = None) -> service.MultiService:
    """Everything the daemon runs, wired together; ``owner`` is twistd's --uid/--gid.
    ``worker``: build worker process N of ``[server] workers`` (mailappliance.workers): the
    supervisor's listening sockets, no start-up recovery, queue runner or HTTP listeners."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    threads = IReactorThreads(reactor)  # the same reactor, as the one that runs thread pools (I(x) is x)
    top = service.MultiService()
    log_level = LogLevelService(settings.log_level)
    log_level.setServiceParent(top)  # type: ignore[no-untyped-call]  # Service is unannotated
    if settings.json_log is not None and worker is None:  # a worker's events go to the supervisor's log
        json_log = JsonLogService(settings.json_log, owner, settings.source, log_level)
        json_log.setServiceParent(top)  # type: ignore[no-untyped-call]  # Service is unannotated
    if worker is None:  # recovery runs once, in the supervisor, before any worker starts
        _StartupService(settings, owner).setServiceParent(top)  # type: ignore[no-untyped-call]  # Service is unannotated

    directory = Directory(build_store(settings.directory), threads, settings.directory.threads)
    _PoolService(directory.start, directory.stop).setServiceParent(top)  # type: ignore[no-untyped-call]  # Service is unannotated
    storage_pool = ThreadPool(minthreads=1, maxthreads=settings.storage_threads, name="storage")
    _PoolService(storage_pool.start, storage_pool.stop).setServiceParent(top)  # type: ignore[no-untyped-call]  # Service is unannotated

    journal = journal_for(settings.sync, settings.spool_dir, settings.maildir_root,  # one per worker process
                          worker.index if worker is not None else 0, settings.workers)
    committer = BatchCommitter(threads, settings.commit_threads, sync=settings.sync, journal=journal,
                               clock=reactor)
    _PoolService(committer.start, committer.stop).setServiceParent(top)  # type: ignore[no-untyped-call]  # Service is unannotated

    def run_blocking(function: Callable[..., _R], *args: object) -> Deferred[_R]:
        return deferToThreadPool(threads, storage_pool, function, *args)

    server_tls = _server_tls(settings, owner)
    addressing = build_addressing(settings, owner if owner is not None and os.geteuid() == 0 else None)
    screening = ScreeningSource(settings.screening.file, reactor)
    resolver = make_resolver(settings.queue.resolver)  # every DNS lookup: MX, reverse names, DNSBL
    client_lookup = ClientLookup(resolver, reactor, settings.screening.dns_timeout)
    # DKIM, SPF, DMARC, rspamd
    inspector, inspector_followers, inspector_hooks = build_inspector(settings, resolver, reactor, run_blocking)

    # Limits, login throttling and mailbox locks: this process's memory, or Redis shared by appliances;
    # with workers and no Redis, the supervisor's memory, which a worker asks over its state socket.
    state_store, state_service = build_state_store(settings.state, reactor, settings.workers,
                                                   worker.state_fd if worker is not None else None)
    if state_service is not None:
        state_service.setServiceParent(top)

    # THE shared checker: every portal below uses this one object.
    throttle = AuthThrottle(settings.throttle, reactor, state_store)
    checker = SubscriberChecker(directory, settings.auth_cache_ttl, reactor, throttle)
    smtp_portal = Portal(SubscriberRealm(), [checker])
    locks = MailboxLocks(state_store, reactor, settings.state.lock_ttl)
    pop3_portal = Portal(MaildirRealm(settings.maildir_root, locks), [checker])
    quotas = MailboxQuotas(settings.mailbox_quota, run_blocking, reactor)
    network_budget = byte_budget(settings, reactor)  # per process: its share with several workers
    limits = rate_limits(settings, reactor, state_store)  # shared by every listener (and worker)
    limits.set_listener_caps({listener.name: listener.max_connections for listener in settings.listeners
                              if listener.max_connections})
    followers = [Live("limits", limits), Live("throttle", throttle), Live("log_level", log_level),
                 Live("mailbox_quota", quotas), Live("mx_bytes_per_hour_per_network", network_budget),
                 *inspector_followers]
    Reloader(settings, server_tls, screening, LiveParts(followers, inspector_hooks, limits),
             threads).setServiceParent(top)  # type: ignore[no-untyped-call]  # Service is unannotated
    spool = OutboundSpool(settings.spool_dir)
    runner = _queue_runner(settings, spool, directory, committer.commit, run_blocking, reactor, resolver,
                           addressing)
    if worker is None:  # the queue runs in the supervisor only; it sees workers' mail in incoming/
        runner.setServiceParent(top)  # type: ignore[no-untyped-call]  # Service is unannotated
    kick = runner.kick if worker is None else _no_kick
    success_notices = SuccessNotices(runner.send_report, run_blocking, settings.hostname,
                                     settings.smtp.dsn_success_notices)  # NOTIFY=SUCCESS on local delivery

    _queue_gauges(runner)
    health = HealthResource(lambda: directory.find_by_login("health-check.invalid"),
                            lambda: run_blocking(spool_probe, settings.spool_dir),
                            current_server=directory.current_server, state_store=state_store.describe)
    shared: dict[str, service.Service] = {}  # SMTP and POP3 listeners, for the workers
    for listener in settings.listeners:
        factory: IProtocolFactory
        if worker is not None and listener.role in WEB_ROLES:
            continue  # health, metrics and autoconfig answer from the supervisor
        if listener.role in WEB_ROLES:
            factory = metrics_site(health) if listener.role == "metrics" else autoconfig_site(settings)
        elif listener.is_smtp:
            smtp = _smtp_factory(settings, listener, directory, committer.commit, smtp_portal, spool,
                                 server_tls, kick, addressing)
            smtp.screening, smtp.client_lookup = screening, client_lookup
            smtp.quotas, smtp.network_budget = quotas, network_budget
            smtp.inspector = inspector
            smtp.success_notices = success_notices
            smtp.limits = limits
            factory = smtp
        else:
            pop3 = _pop3_factory(settings, listener, pop3_portal, run_blocking, reactor, server_tls)
            pop3.quotas = quotas
            pop3.limits = limits
            factory = pop3
        if worker is not None:
            server = adopted(listener, factory, server_tls, worker, reactor)
        else:
            server = _listening(listener, factory, server_tls)
        if listener.role not in WEB_ROLES:
            if settings.workers > 1 and worker is None:
                server = shared_listener(server)  # the workers accept from the same socket
            shared[listener.name] = server
        server.setName(listener.name)
        server.setServiceParent(top)
    if worker is not None:
        return top
    if settings.workers > 1:
        WorkerSupervisor(settings, shared, reactor, runner.kick, getattr(spool, "incoming_dir", spool.queue_dir),
                         state_store if isinstance(state_store, MemoryStore) else None).setServiceParent(top)  # type: ignore[no-untyped-call]  # Service is unannotated
    _ReadyService(settings).setServiceParent(top)  # type: ignore[no-untyped-call]  # Service is unannotated
    return top


def _no_kick() -> None:
    """A worker queues mail into incoming/; the supervisor's runner takes it from there."""


def _listening(listener: ListenerSettings, factory: IProtocolFactory, server_tls: ServerTLS) -> service.Service:
    """The service that listens for ``listener`` (TLS from the first byte if it is implicit)."""
    if listener.implicit_tls:
        return internet.SSLServer(listener.port, factory, server_tls, backlog=LISTEN_BACKLOG,
                                  interface=listener.address)
    return internet.TCPServer(listener.port, factory, backlog=LISTEN_BACKLOG, interface=listener.address)


# Connections the kernel may queue before we accept them.  Twisted's default is 50: a burst of
# 100 clients (a mailing list's MX run, a reconnecting submission fleet) overflowed it and the rest
# waited for their SYN to be sent again, a whole second later.  The kernel caps it at somaxconn.
LISTEN_BACKLOG = 1024


def _queue_gauges(runner: QueueRunner) -> None:
    """Queue size and the age of its oldest message, read when /metrics is scraped from the
    runner's memory (listing a queue of 100,000 messages at every scrape would cost more)."""
    METRICS.gauge("mailappliance_queue_messages", "Messages in the outbound queue.", runner.queued)
    METRICS.gauge("mailappliance_queue_oldest_seconds", "Age of the oldest queued message, in seconds.",
                  lambda: runner.oldest_age(time.time()))


def _server_tls(settings: Settings, owner: tuple[int, int] | None) -> ServerTLS:
    """The one TLS context factory of every listener; a self-signed certificate on first start."""
    tls = settings.tls
    handover = owner if owner is not None and os.geteuid() == 0 else None  # SIGHUP re-reads them after --uid
    with _names_key(settings, "tls.certificate", tls.certificate.parent):
        generated = tls.generate_self_signed and ensure_self_signed(tls.certificate, tls.private_key,
                                                                    settings.hostname, owner=handover)
    if generated:
        log.warn(
            "generated a self-signed certificate for {host} in {path}; SHA-256 fingerprint {fp} "
            "(replace it with a real one and send SIGHUP)",
            host=settings.hostname, path=tls.certificate, fp=fingerprint(tls.certificate),
        )
    server_tls = ServerTLS(tls.certificate, tls.private_key, tls.client_ca)
    log.info("TLS certificate {path}, SHA-256 fingerprint {fp}", path=tls.certificate,
             fp=fingerprint(tls.certificate))
    return server_tls


def _queue_runner(settings: Settings, spool: OutboundSpool, directory: Directory, commit: Committer,
                  run_blocking: RunBlocking, reactor: IReactorTime, resolver: IResolver,
                  addressing: Addressing | None = None) -> QueueRunner:
    """The outbound queue: routing from [queue], reports through ReportDelivery."""
    q = settings.queue
    router = Router(
        resolver,
        smtp_port=q.smtp_port,
        smarthost=Relay.parse(q.smarthost) if q.smarthost else None,
        transports={domain: Relay.parse(relay) for domain, relay in q.transports},
        verify_domains=frozenset(q.verify_domains),
    )
    trust_root = _trust_root(q.ca_file)
    smarthost_login = (q.smarthost_user, q.smarthost_password) if q.smarthost_user else None

    def tls_context_for(hop: NextHop) -> TLSContext:
        if hop.verify_tls:
            return optionsForClientTLS(hop.hostname, trustRoot=trust_root)
        return CertificateOptions()  # opportunistic: encrypt, but any certificate will do

    runner: QueueRunner

    def queued() -> None:
        if runner.running:  # a worker's runner never runs: the supervisor's sees incoming/
            runner.kick()

    reports = ReportDelivery(frozenset(settings.local_domains), directory, settings.maildir_root,
                             settings.spool_dir / "incoming", spool, commit, queued, addressing=addressing)
    mta_sts = None
    if q.mta_sts:  # RFC 8461: policies fetched over HTTPS with the same trust as verify_domains
        fetcher = HttpsPolicyFetcher(reactor, router.addresses, trust_root, port=q.mta_sts_port)
        mta_sts = MtaSts(resolver, fetcher, settings.spool_dir / "mta-sts.json", run_blocking)
    runner = QueueRunner(spool, router, q, settings.hostname, run_blocking, reports, tls_context_for, reactor,
                         smarthost_login=smarthost_login, mta_sts=mta_sts)
    return runner


def _trust_root(ca_file: Path | None) -> IOpenSSLTrustRoot:
    root: IOpenSSLTrustRoot  # (platformTrust and trustRootFromCertificates are unannotated)
    if ca_file is None:
        root = platformTrust()
        return root
    from cryptography import x509

    certificates = [Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM))
                    for c in x509.load_pem_x509_certificates(ca_file.read_bytes())]
    root = trustRootFromCertificates(certificates)
    return root


def _smtp_factory(
    settings: Settings, listener: ListenerSettings, directory: Directory,
    commit: Committer, portal: Portal, spool: OutboundSpool, server_tls: ServerTLS,
    on_queued: Callable[[], None], addressing: Addressing | None = None,
) -> SMTPFactory:
    _warn_if_plaintext(listener)
    config = SMTPConfig(
        hostname=settings.hostname,
        role=listener.role,
        local_domains=frozenset(settings.local_domains),
        maildir_root=settings.maildir_root,
        incoming_dir=settings.spool_dir / "incoming",
        max_message_size=settings.max_message_size,
        idle_timeout=settings.smtp_idle_timeout,
        listener=listener.name,
        tls=server_tls,
        implicit_tls=listener.implicit_tls,
        require_auth=listener.requires_auth,
        allow_plaintext_auth=listener.allow_plaintext_auth,
        screen=listener.role in settings.screening.apply_to,
        normalize_line_endings=settings.smtp.normalize_line_endings,
        max_line_length=settings.smtp.max_line_length,
        max_recipients=settings.smtp.max_recipients,
        max_errors=settings.smtp.max_errors,
        command_time_limit=settings.smtp.command_time_limit,
        data_time_limit=settings.smtp.data_time_limit,
        session_lifetime=settings.limits.session_lifetime,
        offer_auth=listener.offers_auth,
        addressing=addressing,
        screen_refuse_at=settings.screening.refuse_at,
    )
    return SMTPFactory(config, directory.find_by_address, commit, portal=portal, spool=spool,
                       peer_certificate=client_certificate, on_queued=on_queued)


def _warn_if_plaintext(listener: ListenerSettings) -> None:
    if listener.allow_plaintext_auth and not listener.implicit_tls:
        log.warn(
            "listener {name}: login WITHOUT TLS is ALLOWED by config (allow_plaintext_auth); "
            "passwords cross the network in clear",
            name=listener.name,
        )


def _pop3_factory(
    settings: Settings, listener: ListenerSettings, portal: Portal,
    run_blocking: RunBlocking, reactor: IReactorTime, server_tls: ServerTLS,
) -> POP3Factory:
    _warn_if_plaintext(listener)
    return POP3Factory(
        portal,
        hostname=settings.hostname,
        allow_plaintext_auth=listener.allow_plaintext_auth,
        tls_context_factory=server_tls,
        implicit_tls=listener.implicit_tls,
        idle_timeout=settings.pop3_idle_timeout,
        reactor=reactor,
        run_blocking=run_blocking,
        session_settings=SessionSettings(listener=listener.name, idle_timeout=settings.pop3_idle_timeout,
                                         command_time_limit=settings.smtp.command_time_limit,
                                         session_lifetime=settings.limits.session_lifetime),
    )
