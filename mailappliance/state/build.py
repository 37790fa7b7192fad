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
from mailappliance.state.serve import ServedStore
from mailappliance.state.supervised import SupervisedStore


class _StoreService(service.Service):
    def __init__(self, store: FailoverStore) -> None:
        self.store = store

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Service is unannotated
        self.store.start()

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]  # Service is unannotated
        self.store.stop()


def build_state_store(settings: StateSettings, reactor: IReactorTime, workers: int = 1,
                      state_fd: int | None = None) -> tuple[StateStore, service.Service | None]:
    """The store of this process, and the service that connects it at start and closes it
    at stop (None when there is nothing to connect):

    - ``[state] redis`` set: Redis with the memory fallback, in every process;
    - else, in worker 1..N-1 (``state_fd``: its end of the state socket): the supervisor's
      store (:class:`SupervisedStore`) with the memory fallback;
    - else memory: this process's own (one process), or the one the supervisor serves
      to its workers (:class:`ServedStore`, ``workers`` > 1)."""
    local = MemoryStore(reactor)
    if not settings.redis:
        if state_fd is not None:
            supervised = SupervisedStore.adopt(state_fd, reactor, settings.timeout)
            store = FailoverStore(supervised, local, reactor, settings.probe_interval, "the supervisor's store")
            return store, _StoreService(store)
        return (ServedStore(reactor) if workers > 1 else local), None
    address = parse_url(settings.redis)
    if settings.username:
        address = attrs.evolve(address, username=settings.username)
    if settings.password:
        address = attrs.evolve(address, password=settings.password)
    client = RedisClient(address, reactor, settings.timeout, settings.ca_file)
    shared = RedisStore(client, reactor, settings.key_prefix)
    store = FailoverStore(shared, local, reactor, settings.probe_interval, f"Redis at {address.describe()}")
    return store, _StoreService(store)
