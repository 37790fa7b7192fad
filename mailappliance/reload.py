"""SIGHUP: re-read what can change safely, and say in the log what did and what did not.

Applied at once: the TLS certificate files, the screening lists (and the
screening file's location), rate limits (with the SMTP and POP3 listeners'
connection caps) and login-throttling settings.
Everything else in the config file is compared with what is running, and
the log names each changed section that needs a restart.

The daemon reads only what it uses: secret files it read as root at start
(the service bind password, the smarthost password) keep their values when
the unprivileged daemon cannot read them again and they have not changed;
the LDAP admin password is never read here (only the admin tool uses it).
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any, Protocol

import attrs
from twisted.application import service
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger

from mailappliance.config import WEB_ROLES, ConfigError, ListenerSettings, Settings, load_config
from mailappliance.limits import RateLimits
from mailappliance.screening import ScreeningSource
from mailappliance.screening_lists import ScreeningFileError
from mailappliance.tls import ServerTLS

log = Logger(namespace="mailappliance")


class Reloadable(Protocol):
    """A running part that follows one section of the settings: SIGHUP assigns
    it the new value of that section (its ``settings`` property applies it)."""

    settings: Any  # each part its own section's record (LimitSettings, ThrottleSettings, a level name, ...)


def _is_section(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if value not in attrs.fields_dict(Settings):
        raise ValueError(f"{value!r} is not a section of Settings")


@attrs.frozen
class Live:
    """``part`` follows ``Settings.<section>`` on SIGHUP (a wrong name fails at start, not at reload)."""

    section: str = attrs.field(validator=_is_section)
    part: Reloadable


@attrs.frozen
class LiveParts:
    """What a SIGHUP changes in the running daemon besides TLS and screening."""

    followers: Sequence[Live] = ()
    hooks: Sequence[Callable[[], None]] = ()  # run on every SIGHUP, changed config or not (DKIM keys)
    limits: RateLimits | None = None  # its listener caps follow [[listeners]] max_connections


class Reloader(service.Service):
    """Installs the SIGHUP handler; ``reload()`` does the work (also callable from tests)."""

    def __init__(self, settings: Settings, server_tls: ServerTLS, screening: ScreeningSource,
                 live: LiveParts, reactor: IReactorFromThreads) -> None:
        self.settings = settings
        self.server_tls = server_tls
        self.screening = screening
        self.live = live
        self.followers = {follower.section: follower.part for follower in live.followers}
        self.reactor = reactor
        self._previous: Callable[[int, FrameType | None], object] | int | None = None  # the handler before ours

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Service is unannotated
        self._previous = signal.signal(signal.SIGHUP, self._on_signal)

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]  # Service is unannotated
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.reactor.callFromThread(self.reload)

    def reload(self) -> None:
        self._reload_settings()
        for hook in self.live.hooks:
            try:
                hook()
            except Exception:
                log.failure("SIGHUP: a reload step failed")
        try:
            log.info("SIGHUP: TLS certificate reloaded, SHA-256 fingerprint {fp}", fp=self.server_tls.reload())
        except Exception as e:  # keep serving with the old certificate
            log.error("SIGHUP: TLS certificate NOT reloaded, keeping the old one: {why}", why=e)
        try:
            if self.screening.reload():
                log.info("SIGHUP: screening lists reloaded from {file}", file=self.screening.file)
        except ScreeningFileError as e:
            log.error("SIGHUP: screening lists NOT reloaded, keeping the old ones: {why}", why=str(e))

    def _reload_settings(self) -> None:
        try:
            new = load_config(self.settings.source, self.settings.secrets)
        except ConfigError as e:
            log.error("SIGHUP: configuration NOT reloaded, keeping the running one: {why}", why=str(e))
            return
        applied: list[str] = []
        restart: list[str] = []
        for field in attrs.fields(Settings):
            if field.name == "secrets":
                continue
            old_value, new_value = getattr(self.settings, field.name), getattr(new, field.name)
            if old_value == new_value:
                continue
            if field.name == "listeners" and self.live.limits is not None:
                running = self._apply_listener_caps(old_value, new_value, applied)
                if running != new_value:
                    restart.append(field.name)
                self.settings = attrs.evolve(self.settings, listeners=running)
                continue
            if field.name in self.followers:
                self.followers[field.name].settings = new_value
                applied.append(field.name)
            elif field.name == "screening" and attrs.evolve(old_value, file=new_value.file) == new_value:
                self.screening.file = new_value.file
                applied.append("screening.file")
            else:
                restart.append(field.name)
                continue
            self.settings = attrs.evolve(self.settings, **{field.name: new_value})
        log.warn("SIGHUP: configuration reloaded; applied: {applied}; changed but needing a restart: {restart}",
                 applied=", ".join(applied) or "nothing", restart=", ".join(restart) or "nothing")

    def _apply_listener_caps(self, old: tuple[ListenerSettings, ...], new: tuple[ListenerSettings, ...],
                             applied: list[str]) -> tuple[ListenerSettings, ...]:
        """Apply changed connection caps of the running listeners (a changed
        limits.max_connections changes the default shares too); returns the
        running listeners with the new caps, to compare the rest with ``new``."""
        caps = {listener.name: listener.max_connections for listener in new if listener.role not in WEB_ROLES}
        running = tuple(attrs.evolve(listener, max_connections=caps.get(listener.name, listener.max_connections))
                        if listener.role not in WEB_ROLES else listener for listener in old)
        if running != old and self.live.limits is not None:
            self.live.limits.set_listener_caps({listener.name: listener.max_connections for listener in running})
            applied.append("listeners.max_connections")
        return running
