"""The state store the config asks for, and the service that connects it."""

from __future__ import annotations

import attrs
from twisted.application import service
from twisted.internet.interfaces import IReactorTime

from mailappliance.settings import StateSettings, parse_url
from mailappliance.state import StateStore
from mailappliance.state.failover import FailoverStore
from mailappliance.state.memory import MemoryStore
from mailappliance.state.redis import RedisStore
from mailappliance.state.resp import RedisClient


class _StoreService(service.Service):
    def __init__(self, store: FailoverStore) -> None:
        self.store = store

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Service is unannotated
        self.store.start()

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]  # Service is unannotated
        self.store.stop()


def build_state_store(settings: StateSettings, reactor: IReactorTime) -> tuple[StateStore, service.Service | None]:
    """MemoryStore without ``[state] redis``; else Redis with the memory fallback, and
    the service that connects it at start and closes it at stop."""
    local = MemoryStore(reactor)
    if not settings.redis:
        return local, None
    address = parse_url(settings.redis)
    if settings.username:
        address = attrs.evolve(address, username=settings.username)
    if settings.password:
        address = attrs.evolve(address, password=settings.password)
    client = RedisClient(address, reactor, settings.timeout, settings.ca_file)
    shared = RedisStore(client, reactor, settings.key_prefix)
    store = FailoverStore(shared, local, reactor, settings.probe_interval, address.describe())
    return store, _StoreService(store)
